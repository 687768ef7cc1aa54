"""The corpus harness: real architecture pairs, with "does model B compute what model A does" as
the oracle, and adversarial variants of every pair.

A `Case` builds (lazily) a `Pair`: model A's flat source weights ("theirs"), model B's flat target
template ("mine"), and two closures that run A (reference output) and B (loaded with given flat
weights) on one fixed input. `run_case` applies a variant to the pair, calls `weightbridge.adapt`,
loads the result into B and compares outputs:

- ``equal``: B computes A's outputs (within tolerance);
- ``refused``: adapt raised a `WeightbridgeError` (a refusal, allowed: "certain or refuse");
- ``wrong``: adapt returned weights and B computes something else (never allowed);
- ``crash``: adapt (or loading its result) raised anything else (a bug).

Variants (all deterministic given the seed):

- ``plain``: the pair as built;
- ``shuffled``: the target's keys in a random order;
- ``shuffled_source``: the source's keys in a random order;
- ``opaque``: target names replaced by ids that keep only the last component
  (``p0007.weight``, ``p0007/kernel``), so only shapes, roles and order are left;
- ``siblings``: decoys in the source: for a few modules, ``<module>.extra_copy.<leaf>`` tensors
  of the same shapes and different values, next to the real ones, so that pairing by shape
  alone could pick a decoy.
"""

from __future__ import annotations

import ast
import collections
import contextlib
import itertools
import re
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Outcome = Literal["equal", "refused", "wrong", "crash"]

VARIANTS = ("plain", "shuffled", "shuffled_source", "opaque", "siblings")


@dataclass(frozen=True)
class Pair:
    """One conversion problem and its functional oracle.

    `theirs` is the source's flat weights in its natural order and names (torch state dict names,
    numpy arrays); `mine` the target's flat template (zeros are fine) in its natural order and
    names (flax: ``params/Dense_0/kernel``). `run_theirs()` is model A's output on a fixed input;
    `run_mine(flat)` is model B's output on that input with `flat` (mine's names) loaded.
    Outputs match when ``allclose(got, want, rtol, atol * max|want|)``: `atol` is relative to
    the output's scale. `reference`, when given, is the right pairing (used to name mispaired
    tensors).
    """

    theirs: dict[str, np.ndarray]
    mine: dict[str, np.ndarray]
    run_theirs: Callable[[], np.ndarray]
    run_mine: Callable[[dict[str, np.ndarray]], np.ndarray]
    adapt_kwargs: dict[str, Any] = field(default_factory=dict)
    rtol: float = 1e-4
    atol: float = 1e-4
    # Optional, for diagnosis: the known-right pairing {mine name: theirs name} of the float
    # tensors (values only reshaped), checked by `test_corpus_oracle`.
    reference: dict[str, str] | None = None


@dataclass(frozen=True)
class Case:
    """A named pair builder and what adapt must do with it (the `plain` variant)."""

    name: str
    build: Callable[[], Pair]
    expect: Literal["equal", "refused"] = "equal"
    framework: tuple[str, ...] = ("torch",)
    # False only where it is known that following the refusal's suggested hints round after
    # round does not reach "equal" within the search budget (say why at the case); the
    # closing report lists these, they are gaps, not passes.
    hints_lead_to_equal: bool = True


# --- variants ------------------------------------------------------------------------------------


def _sep(name: str) -> str:
    """The separator a flat name uses between components ('/' for flax/keras, '.' for torch)."""
    return "/" if "/" in name else "."


def _split(name: str) -> tuple[str, str, str]:
    """(module path, separator, leaf) of a flat name; the module is '' for a top-level leaf."""
    sep = _sep(name)
    module, _, leaf = name.rpartition(sep)
    return module, sep, leaf


def _permuted(d: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    keys = list(d)
    order = rng.permutation(len(keys))
    return {keys[i]: d[keys[i]] for i in order}


def _opaque(mine: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Target names replaced by ``p<index><sep><leaf>``; returns the renamed dict and the way back.

    The index is the position of the module (the name minus its leaf) in first-seen order, so
    tensors of one module stay together, and the order of the dict is kept.
    """
    modules: dict[str, int] = {}
    out: dict[str, np.ndarray] = {}
    back: dict[str, str] = {}
    for name, value in mine.items():
        module, sep, leaf = _split(name)
        idx = modules.setdefault(module, len(modules))
        new = f"p{idx:04d}{sep}{leaf}"
        out[new] = value
        back[new] = name
    return out, back


def _with_siblings(
    theirs: dict[str, np.ndarray], rng: np.random.Generator, count: int = 4
) -> dict[str, np.ndarray]:
    """Theirs with decoy copies of a few modules' float tensors (same shapes, other values).

    Decoys go directly before or after their module's tensors (chosen at random), named
    ``<module><sep>extra_copy<sep><leaf>``.
    """
    groups: dict[str, list[str]] = {}
    for name, value in theirs.items():
        module, _, _ = _split(name)
        if module and np.issubdtype(np.asarray(value).dtype, np.floating):
            groups.setdefault(module, []).append(name)
    modules = [m for m, names in groups.items() if any(theirs[n].ndim >= 1 for n in names)]
    if not modules:
        return dict(theirs)
    chosen = {modules[i] for i in rng.choice(len(modules), min(count, len(modules)), replace=False)}
    before = {m: bool(rng.integers(2)) for m in sorted(chosen)}
    decoys: dict[str, dict[str, np.ndarray]] = {}
    for m in sorted(chosen):
        sep = _sep(groups[m][0])
        made = {}
        for n in groups[m]:
            v = np.asarray(theirs[n])
            scale = float(v.std()) if v.size > 1 else 1.0
            noise = rng.standard_normal(v.shape) * max(scale, 0.1) + float(v.mean())
            made[f"{m}{sep}extra_copy{sep}{_split(n)[2]}"] = noise.astype(v.dtype)
        decoys[m] = made
    out: dict[str, np.ndarray] = {}
    last_of = {m: names[-1] for m, names in groups.items()}
    first_of = {m: names[0] for m, names in groups.items()}
    for name, value in theirs.items():
        module = _split(name)[0]
        if module in decoys and before[module] and first_of[module] == name:
            out.update(decoys[module])
        out[name] = value
        if module in decoys and not before[module] and last_of[module] == name:
            out.update(decoys[module])
    return out


def apply_variant(
    pair: Pair, variant: str, seed: int = 0
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, str]]:
    """(theirs, mine, back) for a variant; `back` maps the variant's target names to mine's."""
    rng = np.random.default_rng([seed, sum(map(ord, variant))])
    theirs, mine = dict(pair.theirs), dict(pair.mine)
    back = {k: k for k in mine}
    if variant == "plain":
        pass
    elif variant == "shuffled":
        mine = _permuted(mine, rng)
    elif variant == "shuffled_source":
        theirs = _permuted(theirs, rng)
    elif variant == "opaque":
        mine, back = _opaque(mine)
    elif variant == "siblings":
        theirs = _with_siblings(theirs, rng)
    else:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    return theirs, mine, back


# --- running -------------------------------------------------------------------------------------


def compare(want: np.ndarray, got: np.ndarray, rtol: float, atol: float) -> tuple[bool, str]:
    """Whether `got` is `want` within tolerance; `atol` is relative to the output's magnitude
    (its largest absolute value), so outputs of any scale are held to the same precision."""
    want, got = np.asarray(want), np.asarray(got)
    if want.shape != got.shape:
        return False, f"output shape {got.shape}, expected {want.shape}"
    if not np.all(np.isfinite(got)):
        return False, "output has non-finite values"
    scale = max(1e-6, float(np.abs(want).max()) if want.size else 1.0)
    diff = float(np.abs(want - got).max()) if want.size else 0.0
    ok = bool(np.allclose(got, want, rtol=rtol, atol=atol * scale))
    return ok, f"max abs diff {diff:.3g} (output scale {scale:.3g})"


def run_case(
    pair: Pair,
    variant: str = "plain",
    seed: int = 0,
    extra_hints: list[tuple[str, str]] | None = None,
) -> tuple[Outcome, str]:
    """Adapt a variant of `pair`, run model B on the result and classify the outcome."""
    import weightbridge
    from weightbridge.errors import WeightbridgeError

    theirs, mine, back = apply_variant(pair, variant, seed)
    kwargs = dict(pair.adapt_kwargs)
    if extra_hints:
        kwargs["hints"] = list(kwargs.get("hints", ())) + list(extra_hints)
    try:
        out = weightbridge.adapt(theirs, mine, **kwargs)
    except WeightbridgeError as e:
        return "refused", f"{type(e).__name__}: {e}"
    except Exception:
        return "crash", traceback.format_exc()
    try:
        flat = _flat(out)
        missing = [k for k in mine if k not in flat]
        if missing:
            return "crash", f"adapt's result lacks {len(missing)} target(s), e.g. {missing[:3]}"
        loaded = {back[k]: np.asarray(flat[k]) for k in mine}
        for k, v in loaded.items():
            if v.shape != np.asarray(pair.mine[k]).shape:
                return (
                    "crash",
                    f"{k}: adapt returned shape {v.shape}, target is {pair.mine[k].shape}",
                )
        got = pair.run_mine(loaded)
    except Exception:
        return "crash", "loading/running adapt's result failed:\n" + traceback.format_exc()
    ok, detail = compare(pair.run_theirs(), got, pair.rtol, pair.atol)
    return ("equal", detail) if ok else ("wrong", detail)


def _flat(out: Any, prefix: str = "") -> dict[str, Any]:
    """adapt returns mine's structure; the corpus passes flat dicts, but flatten nesting anyway."""
    if not isinstance(out, dict):
        raise TypeError(f"adapt returned a {type(out).__name__}, expected a dict")
    flat: dict[str, Any] = {}
    for k, v in out.items():
        name = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            flat.update(_flat(v, name))
        else:
            flat[name] = v
    return flat


_PLACEHOLDERS = {"target part", "source part", "target_part", "source_part", "name", "..."}
_HINTS = re.compile(r"hints=(\[\(.*?\)\])")


def refusal_hints(message: str) -> list[tuple[str, str]]:
    """Every concrete hint a refusal message suggests (``hints=[('a', 'b')]``), in order.

    Placeholders (``'<part of its target name>'``, ``('target part', 'source part')``) are not
    concrete and are skipped.
    """
    found: list[tuple[str, str]] = []
    for m in _HINTS.finditer(message):
        try:
            value = ast.literal_eval(m.group(1))
        except (ValueError, SyntaxError):
            continue
        for h in value:
            if (
                isinstance(h, tuple)
                and len(h) == 2
                and all(isinstance(s, str) and s.lower() not in _PLACEHOLDERS for s in h)
                and not any(s.startswith("<") for s in h)
                and h not in found
            ):
                found.append(h)
    return found


def hint_choices(message: str) -> list[list[tuple[str, str]]]:
    """The ways to follow a refusal's suggestions: each a list of hints to add together.

    Suggestions for different targets (one per ambiguous group) are meant to be given together;
    suggestions that share their first part (``('@transpose', 'yes')`` or ``('@transpose', 'no')``)
    are alternatives, so every combination of alternatives is one choice.
    """
    groups: dict[str, list[tuple[str, str]]] = {}
    for h in refusal_hints(message):
        groups.setdefault(h[0], []).append(h)
    return [list(c) for c in itertools.islice(itertools.product(*groups.values()), 16)]


def run_with_suggested_hints(
    pair: Pair, variant: str = "plain", seed: int = 0, budget: int = 12
) -> tuple[Outcome, str, list[tuple[str, str]]]:
    """Run a case; while it is refused with suggested hints, follow them and run again.

    Searches the suggestions (each further refusal may suggest more hints, for the next
    conflict) for one that leads to "equal", within `budget` runs. Returns that outcome, its
    message and the hints given; when none leads to "equal", the first dead end reached: a
    "wrong" or "crash" if any choice gave one, else the last refusal.
    """
    first, first_msg = run_case(pair, variant, seed)
    found: list[tuple[Outcome, str, list[tuple[str, str]]]] = []
    runs = 0

    def search(hints: list[tuple[str, str]], outcome: Outcome, msg: str) -> bool:
        nonlocal runs
        if outcome != "refused":
            found.append((outcome, msg, hints))
            return outcome == "equal"
        # All suggestions together first (one per ambiguous group), then each group's alone
        # (a suggestion is conditional, "if A corresponds to B": one wrong guess must not
        # spoil the others).
        together = hint_choices(msg)
        singles = [[h] for h in refusal_hints(msg)]
        choices = [c for c in together + singles if not set(c) <= set(hints)]
        if not choices:
            found.append((outcome, msg, hints))
            return False
        for choice in choices:
            if runs >= budget:
                return False
            runs += 1
            more = hints + [h for h in choice if h not in hints]
            o, m = run_case(pair, variant, seed, extra_hints=more)
            if search(more, o, m):
                return True
        return False

    if search([], first, first_msg):
        return found[-1]
    bad = [f for f in found if f[0] in ("wrong", "crash")]
    if bad:
        return bad[0]
    return found[-1] if found else (first, first_msg, [])


def _signature(v: Any) -> bytes | None:
    """Values up to order: the same for a tensor and any reshape/transpose of it."""
    a = np.asarray(v)
    if not np.issubdtype(a.dtype, np.floating) or a.size < 2:
        return None
    return np.sort(a.astype(np.float32).ravel()).tobytes()


def diagnose(pair: Pair, variant: str, seed: int = 0, limit: int = 6) -> str:
    """For a "wrong" outcome: which targets got other values than in the plain variant.

    Each target's source is identified by its values (all source tensors are distinct), so this
    names the mispaired tensors (``target <- source, plain: other source``) and those paired
    like plain but filled differently (a wrong transpose/reshape). Needs the plain variant to be
    "equal" to serve as the reference; otherwise lists what each target was filled from.
    """
    import weightbridge

    theirs, mine, back = apply_variant(pair, variant, seed)
    try:
        got = _flat(weightbridge.adapt(theirs, mine, **pair.adapt_kwargs))
    except Exception as e:
        return f"adapt raised {type(e).__name__}"
    got = {back[k]: np.asarray(got[k]) for k in mine}
    by_sig: dict[bytes, str] = {}
    for name, v in theirs.items():
        sig = _signature(v)
        if sig is not None:
            by_sig.setdefault(sig, name)

    def source_of(v: Any) -> str:
        sig = _signature(v)
        return "?" if sig is None else by_sig.get(sig, "<computed>")

    ref: dict[str, np.ndarray] | None = None
    if pair.reference is not None:
        ref = load_reference(pair)
    elif variant != "plain" and run_case(pair, "plain", seed)[0] == "equal":
        plain = _flat(weightbridge.adapt(pair.theirs, pair.mine, **pair.adapt_kwargs))
        ref = {k: np.asarray(plain[k]) for k in pair.mine}
    lines: list[str] = []
    if ref is None:
        lines = [f"{k} <- {source_of(v)}" for k, v in got.items() if _signature(v) is not None]
        return "no reference (plain is not equal); pairing: " + "; ".join(lines[:limit])
    what = "reference" if pair.reference is not None else "plain"
    mispaired, reshaped = [], []
    for k, v in got.items():
        if k not in ref or _signature(v) is None:
            continue
        if _signature(v) != _signature(ref[k]):
            mispaired.append(f"{k} <- {source_of(v)} ({what}: {source_of(ref[k])})")
        elif v.shape != ref[k].shape or not np.array_equal(v, ref[k]):
            reshaped.append(f"{k} <- {source_of(v)} laid out differently")
    parts = []
    if mispaired:
        parts.append(f"{len(mispaired)} mispaired: " + "; ".join(mispaired[:limit]))
    if reshaped:
        parts.append(f"{len(reshaped)} wrong op: " + "; ".join(reshaped[:limit]))
    return " | ".join(parts) or f"same tensors as {what} (difference elsewhere)"


def load_reference(pair: Pair) -> dict[str, np.ndarray]:
    """Mine's template filled by `pair.reference` (each source tensor reshaped to its target)."""
    assert pair.reference is not None
    out = {k: np.asarray(v) for k, v in pair.mine.items()}
    for t, src in pair.reference.items():
        out[t] = np.asarray(pair.theirs[src]).reshape(out[t].shape)
    return out


def check_reference(pair: Pair) -> tuple[bool, str]:
    """The oracle's own test: the reference pairing gives "equal", and swapping two same-shaped
    float tensors of it (norm statistics if there are any) gives "wrong"."""
    assert pair.reference is not None
    want = pair.run_theirs()
    flat = load_reference(pair)
    ok, detail = compare(want, pair.run_mine(flat), pair.rtol, pair.atol)
    if not ok:
        return False, f"the reference pairing is not equal: {detail}"
    names = list(pair.reference)
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for n in names:
        by_shape.setdefault(flat[n].shape, []).append(n)
    swaps = [g for g in by_shape.values() if len(g) > 1]
    if not swaps:
        return True, "no two same-shaped tensors to swap"
    pref = [g for g in swaps if any(n.endswith(("running_var", "running_mean")) for n in g)]
    a, b = (pref or swaps)[-1][:2]
    flat[a], flat[b] = flat[b], flat[a]
    ok, detail = compare(want, pair.run_mine(flat), pair.rtol, pair.atol)
    if ok:
        return False, f"swapping {a} and {b} was not noticed ({detail}): the oracle is blind"
    return True, f"swap noticed: {detail}"


# --- torch helpers shared by the torch-based case modules -----------------------------------------


def perturb_torch(module: Any, seed: int) -> Any:
    """Every float tensor moved away from its init so that all are distinct; eval mode.

    Norm statistics and affine parameters (which default init leaves identical across layers,
    hiding mispairings) get random values in safe ranges; other tensors get noise of a tenth of
    their spread, which keeps activations in range in deep nets.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict(keep_vars=True).items():
            if not t.dtype.is_floating_point:
                continue
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "running_var":
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif leaf == "running_mean":
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
            elif t.ndim <= 1:
                # biases, norm weights, layer scales, tokens: their own spread, at least 0.1
                spread = max(float(t.std()) if t.numel() > 1 else 0.0, 0.1)
                t.add_(torch.randn(t.shape, generator=gen) * 0.1 * spread)
                if leaf == "weight" and bool((t.abs() > 0.5).all()):  # a norm's scale
                    t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            else:
                spread = max(float(t.std()), 0.02)
                t.add_(torch.randn(t.shape, generator=gen) * 0.1 * spread)
    return module.eval()


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread inside (restored after): the small models of the corpus gain nothing
    from more, and on a shared 2-core machine the threads of parallel runs only contend."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torch_flat(module_or_sd: Any, drop: Callable[[str], bool] = lambda _: False) -> dict:
    """A torch state dict as {name: numpy array} (copies), minus names `drop` picks."""
    sd = module_or_sd.state_dict() if hasattr(module_or_sd, "state_dict") else module_or_sd
    return {k: v.detach().cpu().numpy().copy() for k, v in sd.items() if not drop(k)}


def torch_pair(
    make_a: Callable[[], Any],
    make_b: Callable[[], Any],
    x_shape: tuple[int, ...],
    *,
    seed: int = 0,
    drop_theirs: Callable[[str], bool] = lambda _: False,
    drop_mine: Callable[[str], bool] = lambda _: False,
    adapt_kwargs: dict[str, Any] | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-4,
    reference_order: Callable[[list[str]], list[str]] | None = None,
) -> Pair:
    """A Pair of two torch modules: A perturbed (the source), B's state dict as the template.

    Names `drop_mine` picks are left out of the template (B keeps its own values for them, e.g.
    constant index buffers one side stores and the other computes); `drop_theirs` likewise.
    `reference_order`, when given, puts a list of float tensor names (either side's) in a
    canonical order; zipping both sides' canonical orders gives `Pair.reference`.
    """
    import torch

    with one_torch_thread():
        torch.manual_seed(seed)
        a = perturb_torch(make_a(), seed + 1)
        b = make_b().eval()
    x = torch.from_numpy(
        np.random.default_rng(seed + 2).standard_normal(x_shape).astype(np.float32)
    )

    def run(model: Any) -> np.ndarray:
        with one_torch_thread(), torch.no_grad():
            y = model(x)
        if isinstance(y, (tuple, list)):
            y = y[0]
        return y.detach().cpu().numpy().astype(np.float64)

    want = run(a)
    sd0 = b.state_dict()
    base = {k: v.clone() for k, v in sd0.items()}
    metadata = getattr(sd0, "_metadata", None)  # versions some modules check (torchvision MNASNet)

    def run_mine(flat: dict[str, np.ndarray]) -> np.ndarray:
        sd: Any = collections.OrderedDict(base)
        if metadata is not None:
            sd._metadata = metadata
        for k, v in flat.items():
            sd[k] = torch.from_numpy(np.ascontiguousarray(v)).to(base[k].dtype)
        b.load_state_dict(sd, strict=True)
        return run(b)

    mine = {k: np.zeros(v.shape, v.detach().cpu().numpy().dtype) for k, v in base.items()}
    mine = {k: v for k, v in mine.items() if not drop_mine(k)}
    theirs = torch_flat(a, drop_theirs)
    reference = None
    if reference_order is not None:
        fa = reference_order([k for k, v in theirs.items() if v.dtype.kind == "f"])
        fb = reference_order([k for k, v in mine.items() if v.dtype.kind == "f"])
        if len(fa) != len(fb) or any(
            theirs[x].size != mine[y].size for x, y in zip(fa, fb, strict=True)
        ):
            raise ValueError("reference_order does not line the two sides up")
        reference = dict(zip(fb, fa, strict=True))
    return Pair(
        theirs=theirs,
        mine=mine,
        run_theirs=lambda: want,
        run_mine=run_mine,
        adapt_kwargs=dict(adapt_kwargs or {}),
        rtol=rtol,
        atol=atol,
        reference=reference,
    )
