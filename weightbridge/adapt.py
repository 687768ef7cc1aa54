"""`adapt(theirs, mine)`: the in-memory call of the original weightbridge, drop-in.

Returns mine's structure (nesting, names, shapes, dtypes, leaf types) filled with their values,
planned by the same matcher that drives `weightbridge convert --like`. Frameworks are detected
from the objects without importing anything the caller has not imported.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from weightbridge import dtypes
from weightbridge import io as wio
from weightbridge.errors import DtypeError, PlanError, SpecError
from weightbridge.plan import Plan
from weightbridge.planning.match import Matcher
from weightbridge.planning.planner import MINE, make_plan
from weightbridge.spec import CheckpointSpec, TensorSpec
from weightbridge.streaming.transform import compute

Hint = tuple[str, str]


def adapt(
    theirs: Any,
    mine: Any,
    *,
    in_format: str | None = None,
    out_format: str | None = None,
    hints: Sequence[Hint] = (),
    cache: str | os.PathLike[str] | None = None,
    verbose: bool = False,
    rules: Mapping[str, Any] | None = None,
    partial: bool = False,
    slice_mismatched: bool = False,
    flatten: str | None = None,
    check: tuple[Callable[..., Any], Callable[..., Any], Any] | None = None,
    dequantize: bool = False,
) -> Any:
    """Mine's structure with their values.

    Args:
        theirs: pretrained weights: a checkpoint path, a torch module/state dict, a jax/flax
            pytree or variables dict, a Flax NNX module or ``nnx.State``, or nested dicts of
            numpy/tf arrays. A training checkpoint (``{"model": state_dict, "epoch": 3,
            "optimizer": ...}``; also ``state_dict``, ``module``, ``ema``...) is unwrapped;
            leaves that are not arrays (ints, strings, None) are skipped.
        mine: the freshly initialised weights, in any of those forms; leaves may be metadata
            only (torch meta tensors, ``jax.ShapeDtypeStruct``). The result has its structure:
            a torch module gives a state dict, an NNX module or state an ``nnx.State`` for
            ``nnx.update``; a wrapped checkpoint comes back wrapped, metadata untouched.
        in_format, out_format: ``pytorch``, ``tensorflow``, ``keras``, ``flax``, ``haiku`` (guessed
            from names when not given).
        hints: ``[("reduce", "conv1")]``: unique substrings (target first) that pair tensors the
            matcher found ambiguous; its error says which hint resolves each conflict.
        cache: a plan file saved on first use and reused while both sides' specs match. A
            relative path is taken relative to the directory of the calling module.
        verbose: print the matching steps and the final mapping table.
        rules: ``{target_regex: Transform}`` applied before matching (`weightbridge.planning.rules`);
            here, in memory, ``value_fn`` works too.
        partial: load what fits and keep mine's own values for the rest (seed: torch_liberator).
        slice_mismatched: with `partial`, copy the leading block of same-named tensors whose
            shapes differ (a 1000-class head into a 10-class one).
        flatten: the dense layer after a conv stack: ``"nhwc"`` if the non-torch model
            flattens its feature map directly, ``"nchw"`` if it transposes to NCHW first. Only
            asked for when the weights show such a layer (the matcher never guesses it).
        check: ``(their_apply, my_apply, inputs)`` to decide by execution what metadata cannot:
            ``their_apply(theirs, *inputs)`` and ``my_apply(result, *inputs)`` run the two
            models (``inputs`` a tuple, or one input); every combination of the choices the
            matcher left open is tried and the one whose outputs agree is kept (and a plan that
            needed no choice is confirmed). `verbose` prints what execution decided.
        dequantize: block-scaled FP8 weights (``X.weight`` float8 with ``X.weight_scale_inv``,
            DeepSeek-V3 style) become ``float32(w) * scale`` per 128x128 block in mine's dtype,
            and the scales are dropped (see `weightbridge.api.plan`).

    Tensors that are one tensor in memory (tied: T5's ``shared.weight`` and
    ``encoder.embed_tokens.weight``, an lm_head tied to the embedding) are planned once; in
    mine, every alias gets the value and torch aliases come back as one tensor.

    Raises:
        MatchError: tensors could not be paired without guessing (the message lists them).

    >>> import numpy as np
    >>> theirs = {"fc.weight": np.arange(6.0).reshape(3, 2), "fc.bias": np.zeros(3)}
    >>> mine = {"Dense_0": {"kernel": np.zeros((2, 3)), "bias": np.ones(3)}}
    >>> adapt(theirs, mine)["Dense_0"]["kernel"].tolist()
    [[0.0, 2.0, 4.0], [1.0, 3.0, 5.0]]
    """
    if flatten is not None:
        hints = (*hints, ("@flatten", flatten))
    if check is not None:
        return _adapt_checked(
            theirs,
            mine,
            check,
            hints,
            verbose=verbose,
            cache=cache,
            in_format=in_format,
            out_format=out_format,
            rules=rules,
            partial=partial,
            slice_mismatched=slice_mismatched,
            dequantize=dequantize,
        )
    notes: list[str] = []
    src = _source_tree(theirs, notes)
    try:
        tgt = _tree(mine, "mine", notes)
        src_specs = {k: _spec(k, v, "theirs") for k, v in src.leaves.items()}
        tgt_specs = {k: _spec(k, v, "mine") for k, v in tgt.leaves.items()}
        tgt_spec = CheckpointSpec.of(tgt_specs[k] for k in tgt.planned)
        # Tied source tensors are one tensor: planned once (under their first name), unless
        # that fails and the target wants them apart (an untied lm_head): then each alias is
        # its own source tensor, as a file would store them.
        candidates = [CheckpointSpec.of(src_specs[k] for k in src.planned)]
        if src.ties:
            candidates.append(CheckpointSpec.of(src_specs.values()))
        cache_path = _cache_path(cache) if cache is not None else None
        plan = None
        for candidate in candidates:
            plan = _cached_plan(cache_path, candidate, tgt_spec)
            if plan is not None:
                break
        log: list[str] = []
        if plan is None:
            plan, log = _plan(
                candidates,
                tgt_spec,
                src,
                tgt,
                Matcher(
                    in_format,
                    out_format,
                    tuple(hints),
                    partial=partial,
                    slice_mismatched=slice_mismatched,
                ),
                rules,
                partial,
                dequantize,
            )
            if cache_path:
                plan.save(cache_path)
        elif verbose:
            log.append(f"reused the plan in {cache_path}")
        if verbose:
            print("\n".join(notes + log), file=sys.stderr)
            print(plan.explain(), file=sys.stderr)
        if partial and verbose:
            print(plan.summary(), file=sys.stderr)
        values: dict[str, Any] = {}
        for step in plan.steps:
            if step.sources[0].startswith(MINE):
                continue  # kept: the rebuilt structure keeps mine's own leaf
            arrays = [_to_numpy(src.leaves[s]) for s in step.sources]
            values[step.target.name] = compute(arrays, step.ops, step.target)
        for rep, aliases in tgt.ties.items():
            if rep in values:  # tied in mine: every alias holds the one value (and stays tied)
                values.update(dict.fromkeys(aliases, values[rep]))
        return tgt.rebuild(values)
    finally:
        src.close()


def _plan(
    candidates: list[CheckpointSpec],
    tgt_spec: CheckpointSpec,
    src: _Tree,
    tgt: _Tree,
    matcher: Matcher,
    rules: Mapping[str, Any] | None,
    partial: bool,
    dequantize: bool = False,
) -> tuple[Plan, list[str]]:
    """The first candidate source spec that plans (with `partial`: the one keeping fewest)."""
    best: tuple[Plan, list[str], int] | None = None
    first_error: PlanError | None = None
    for i, candidate in enumerate(candidates):
        log: list[str] = []
        try:
            plan = make_plan(
                candidate,
                tgt_spec,
                matcher=matcher,
                rules=rules,
                partial=partial,
                log=log,
                dequantize=dequantize,
            )
        except PlanError as e:
            first_error = first_error or e
            continue
        if i:
            log.insert(
                0,
                "planning with the tied source tensors as one tensor did not pair every "
                "target; planned with each of their names as its own tensor",
            )
        kept = sum(step.sources[0].startswith(MINE) for step in plan.steps)
        if best is None or kept < best[2]:
            best = (plan, log, kept)
        if not kept:
            break
    if best is not None:
        return best[0], best[1]
    assert first_error is not None
    note = _ties_note(src, tgt, retried=len(candidates) > 1)
    if not note:
        raise first_error
    raise type(first_error)(f"{first_error}\n{note}") from None


def _ties_note(src: _Tree, tgt: _Tree, *, retried: bool) -> str:
    lines = []
    for side, tree in (("theirs", src), ("mine", tgt)):
        for rep, aliases in tree.ties.items():
            lines.append(
                f"  {side}: {', '.join([rep, *aliases])} are one tensor in memory (tied); "
                f"planned once, as {rep}"
            )
    if not lines:
        return ""
    tail = (
        "planning again with each tied source name as its own tensor failed too"
        if retried
        else "pass separate arrays if these are not meant to be tied"
    )
    return "note: tensors that share memory were planned once:\n" + "\n".join(lines) + f"\n{tail}"


def _adapt_checked(
    theirs: Any,
    mine: Any,
    check: tuple[Callable[..., Any], Callable[..., Any], Any],
    hints: Sequence[Hint],
    *,
    verbose: bool,
    cache: str | os.PathLike[str] | None,
    **options: Any,
) -> Any:
    """`adapt` with `check=`: see `weightbridge.frameworks.check`."""
    result, report = _decide(theirs, mine, check, hints, **options)
    if verbose:
        print("\n".join(report.lines), file=sys.stderr)
    if cache is not None:  # save the plan that execution confirmed
        adapt(theirs, mine, hints=(*hints, *report.hints), cache=cache, **options)
    return result


def hints_by_execution(
    theirs: Any,
    mine: Any,
    check: tuple[Callable[..., Any], Callable[..., Any], Any],
    hints: Sequence[Hint],
    **options: Any,
) -> tuple[tuple[Hint, ...], list[str]]:
    """The hints that make `adapt` agree with the source model when both are run (`check=`),
    and what execution decided; for `api.plan(check=...)`, which then plans with them."""
    _, report = _decide(theirs, mine, check, hints, **options)
    return (*hints, *report.hints), report.lines


def _decide(
    theirs: Any,
    mine: Any,
    check: tuple[Callable[..., Any], Callable[..., Any], Any],
    hints: Sequence[Hint],
    **options: Any,
) -> tuple[Any, Any]:
    """Run both models and let `frameworks.check.decide` settle what metadata left open:
    (mine's weights, its `CheckReport`)."""
    from weightbridge.frameworks.check import decide

    their_apply, my_apply, inputs = check
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    return decide(
        lambda h: adapt(theirs, mine, hints=h, **options),
        lambda converted: my_apply(converted, *args),
        their_apply(theirs, *args),
        hints,
    )


def _cache_path(cache: str | os.PathLike[str]) -> str:
    path = os.fspath(cache)
    if os.path.isabs(path):
        return path
    # Relative to the module that called adapt(), as the original weightbridge documents.
    here = os.path.dirname(os.path.abspath(__file__))
    for frame in inspect.stack()[1:]:
        caller = os.path.abspath(frame.filename)
        if os.path.dirname(caller) != here and not frame.filename.startswith("<"):
            return os.path.join(os.path.dirname(caller), path)
    return os.path.abspath(path)


def _cached_plan(path: str | None, src: CheckpointSpec, tgt: CheckpointSpec) -> Plan | None:
    if not path or not os.path.exists(path):
        return None
    plan = Plan.load(path)
    if plan.source_fingerprint != src.fingerprint() or plan.target_fingerprint != tgt.fingerprint():
        return None  # specs changed: plan again (and overwrite the cache)
    try:
        plan.validate(src, target=tgt)
    except PlanError:
        return None
    return plan


def _spec(name: str, leaf: Any, side: str) -> TensorSpec:
    dtype = getattr(leaf, "dtype", None)
    try:
        if "torch" in sys.modules:
            import torch

            if isinstance(dtype, torch.dtype):
                return TensorSpec(name, tuple(leaf.shape), str(dtype).removeprefix("torch."))
        return TensorSpec(
            name,
            tuple(leaf.shape),
            dtypes.from_numpy(np.dtype(getattr(dtype, "as_numpy_dtype", dtype))),
        )
    except (TypeError, ValueError, DtypeError) as e:
        raise SpecError(
            f"{side}: leaf {name!r} is a {type(leaf).__module__}.{type(leaf).__qualname__} with "
            f"shape {getattr(leaf, 'shape', None)!r} and dtype {dtype!r}, which weightbridge "
            f"cannot read ({e}); pass a numpy, torch or jax array of a numeric dtype there "
            "(e.g. np.asarray(x, np.float32)), or leave the entry out"
        ) from e


def _to_numpy(leaf: Any) -> np.ndarray:
    if isinstance(leaf, np.ndarray):
        return leaf
    if "torch" in sys.modules:
        import torch

        if isinstance(leaf, torch.Tensor):
            from weightbridge.frameworks.torch import to_numpy

            return to_numpy(leaf)
    if hasattr(leaf, "numpy") and callable(leaf.numpy):  # tf tensors and variables
        return np.asarray(leaf.numpy())
    return np.asarray(leaf)


@dataclass
class _Tree:
    """One side of adapt(): its array leaves by name, the tied ones, and how to rebuild it."""

    leaves: dict[str, Any]
    rebuild: Callable[[dict[str, Any]], Any]
    # First name of each group of leaves that are one tensor in memory -> the other names.
    ties: dict[str, list[str]] = field(default_factory=dict)
    close: Callable[[], None] = lambda: None

    @property
    def planned(self) -> list[str]:
        aliases = {a for group in self.ties.values() for a in group}
        return [k for k in self.leaves if k not in aliases]


def _source_tree(theirs: Any, notes: list[str]) -> _Tree:
    if isinstance(theirs, (str, os.PathLike)):
        reader = wio.open_reader(theirs)
        leaves = {name: _Lazy(reader, name) for name in reader.specs().names}
        return _Tree(leaves, lambda values: values, close=reader.close)
    return _tree(theirs, "theirs", notes)


class _Lazy:
    """A source tensor read (memory-mapped) only when a step needs it."""

    def __init__(self, reader: Any, name: str) -> None:
        spec = reader.specs()[name]
        self.reader, self.name = reader, name
        self.shape, self.dtype = spec.shape, dtypes.to_numpy(spec.dtype)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self.reader.read(self.name), dtype=dtype)


# Keys under which checkpoints keep the model's weights beside training metadata:
# {"model": state_dict, "epoch": 3, "optimizer": {...}} (torch.save of a training loop),
# {"state_dict": ...} (Lightning, timm), {"module": ...} (DeepSpeed), {"ema": ...}.
# Flax collections ("params", "batch_stats") are not wrappers: they are part of the names.
_WRAPPERS = (
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "net",
    "network",
    "weights",
    "ema",
    "model_ema",
    "ema_model",
    "state_dict_ema",
    "ema_state_dict",
)
# Entries of a checkpoint that hold tensors but not the model's: optimizer moments have the
# weights' shapes and would only confuse the matcher.
_TRAINING_STATE = frozenset(
    {
        "optimizer",
        "optimizers",
        "optimizer_state",
        "optimizer_states",
        "optimizer_state_dict",
        "optim",
        "opt_state",
        "scheduler",
        "lr_scheduler",
        "lr_schedulers",
        "scheduler_state_dict",
        "scaler",
        "grad_scaler",
        "amp",
        "rng_state",
        "rng_states",
        "callbacks",
        "loops",
        "args",
        "config",
        "hparams",
        "hyper_parameters",
    }
)


def _tree(obj: Any, side: str, notes: list[str]) -> _Tree:
    """The array leaves of any supported structure, its tied leaves, and a rebuild function."""
    obj, module_ties = _as_tree(obj)
    inner_key, dropped = _unwrap(obj, side, notes)
    if inner_key is not None:
        assert isinstance(obj, dict)
        body, module_ties = _as_tree(obj[inner_key])
    elif dropped:
        assert isinstance(obj, dict)
        body = {k: v for k, v in obj.items() if k not in dropped}
    else:
        body = obj
    flat, skipped, rebuild_body = _flatten_any(body, side)
    if skipped:
        shown = ", ".join(f"{n} ({why})" for n, why in skipped[:10])
        more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        notes.append(
            f"{side}: skipped {len(skipped)} leaves that are not weights: {shown}{more}"
            + ("; mine keeps them as they are" if side == "mine" else "")
        )
    ties = _ties(flat, module_ties, allow_identity=side == "theirs")
    for rep, aliases in ties.items():
        notes.append(
            f"{side}: {', '.join([rep, *aliases])} are one tensor in memory (tied); "
            + (
                f"read once, as {rep}"
                if side == "theirs"
                else f"planned once, as {rep}, and all of them get its value"
            )
        )

    def rebuild(values: dict[str, Any]) -> Any:
        new = rebuild_body(values)
        if inner_key is None and not dropped:
            return new
        items = dict(obj)  # the wrapper's other entries (epoch, optimizer...) as they were
        if inner_key is not None:
            items[inner_key] = new
        else:
            items.update((k, new[k]) for k in body)
        return _remake(obj, items)

    return _Tree(flat, rebuild, ties)


def _as_tree(obj: Any) -> tuple[Any, list[list[str]]]:
    """A module becomes its state (torch state dict, nnx.State); with the torch module's ties."""
    if "torch" in sys.modules:
        import torch

        if isinstance(obj, torch.nn.Module):
            from weightbridge.frameworks.torch import tied_names

            return obj.state_dict(), tied_names(obj)
    if "flax.nnx" in sys.modules:
        from weightbridge.frameworks.jax import nnx_state_of

        state = nnx_state_of(obj)
        if state is not None:
            return state, []
    return obj, []


def _unwrap(obj: Any, side: str, notes: list[str]) -> tuple[str | None, set[str]]:
    """(the key holding the weights of a wrapped checkpoint or None, training-state keys).

    ``{"model": sd, "epoch": 3, "optimizer": {...}}`` holds its weights under "model": the one
    entry with tensors besides training state, or one of the usual wrapper names.
    """
    if not isinstance(obj, dict) or not obj:
        return None, set()
    dropped = {k for k in obj if k in _TRAINING_STATE and _holds_arrays(obj[k])}
    if any(_is_array(v) for v in obj.values()):
        return None, dropped  # a state dict itself (perhaps with some nested parts)
    holders = [k for k, v in obj.items() if k not in dropped and _holds_arrays(v)]
    wrappers = [k for k in holders if k in _WRAPPERS]
    if len(wrappers) > 1:
        raise SpecError(
            f"{side} holds several sets of weights ({', '.join(map(repr, wrappers))}); pass the "
            f"one you mean, e.g. adapt(checkpoint[{wrappers[0]!r}], ...)"
        )
    if len(holders) == 1 and isinstance(holders[0], str):
        key = holders[0]
        if key in _WRAPPERS or (len(obj) > 1 and key not in ("params", "batch_stats")):
            others = [str(k) for k in obj if k != key]
            notes.append(
                f"{side}: using the weights under {key!r}"
                + (f" (left aside: {', '.join(others)})" if others else "")
            )
            return key, dropped
    if dropped:
        notes.append(f"{side}: left out training state: {', '.join(sorted(dropped))}")
    return None, dropped


def _is_array(leaf: Any) -> bool:
    if isinstance(leaf, (np.ndarray, _Lazy)):
        return True
    if isinstance(leaf, (np.generic, type, str, bytes)):
        return False  # numpy scalars in a checkpoint are metadata (best_acc), not weights
    if "torch" in sys.modules:
        import torch

        if isinstance(leaf, torch.Tensor):
            return True
    if "jax" in sys.modules:
        import jax

        if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
            from weightbridge.frameworks.jax import is_array

            return is_array(leaf)
    return hasattr(leaf, "shape") and hasattr(leaf, "dtype")


def _is_module(obj: Any) -> bool:
    if "torch" in sys.modules:
        import torch

        if isinstance(obj, torch.nn.Module):
            return True
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(obj, nnx.Module)


def _holds_arrays(obj: Any, depth: int = 0) -> bool:
    if _is_array(obj) or _is_module(obj):
        return True
    if depth > 50:
        return False
    if isinstance(obj, Mapping):
        return any(_holds_arrays(v, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_holds_arrays(v, depth + 1) for v in obj)
    return False


def _flatten_any(
    body: Any, side: str
) -> tuple[dict[str, Any], list[tuple[str, str]], Callable[[dict[str, Any]], Any]]:
    """Flat array leaves, skipped leaves (name, why), and a function rebuilding `body`."""
    if "jax" in sys.modules and _is_jax_tree(body):
        from weightbridge.frameworks.jax import flatten_tree, unflatten_like

        names, leaves, why, treedef = flatten_tree(body)
        flat: dict[str, Any] = {}
        skipped: list[tuple[str, str]] = []
        for name, leaf, reason in zip(names, leaves, why, strict=True):
            if reason is None and _is_array(leaf):
                flat[name] = leaf
            else:
                skipped.append((name, reason or _kind(leaf)))

        def rebuild_jax(values: dict[str, Any]) -> Any:
            memo: dict[tuple[Any, ...], Any] = {}
            new = [
                _like(values[n], leaf, memo) if n in flat and n in values else leaf
                for n, leaf in zip(names, leaves, strict=True)
            ]
            return unflatten_like(treedef, new)

        return flat, skipped, rebuild_jax
    if not isinstance(body, Mapping):
        raise SpecError(
            f"cannot adapt {'into' if side == 'mine' else 'from'} an object of type "
            f"{type(body).__name__}; pass "
            "a torch module/state dict, a flax nnx module/state, a jax pytree or nested dicts of "
            "arrays" + (" (or a checkpoint path)" if side == "theirs" else "")
        )
    flat, skipped = {}, []
    _walk(body, "", flat, skipped)

    def rebuild_dict(values: dict[str, Any]) -> Any:
        return _rebuild(body, values, "", {})

    return flat, skipped, rebuild_dict


def _is_jax_tree(body: Any) -> bool:
    import jax

    leaves = jax.tree_util.tree_leaves(body)
    if "torch" in sys.modules:
        import torch

        if any(isinstance(x, (torch.Tensor, torch.nn.Module)) for x in leaves):
            return False
    return any(isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) for x in leaves)


def _kind(leaf: Any) -> str:
    return "None" if leaf is None else type(leaf).__name__


def _children(node: Any) -> list[tuple[Any, str, Any]] | None:
    """(key, name component, child) of a mapping or of a list/tuple holding arrays."""
    if isinstance(node, Mapping):
        return [(k, str(k), v) for k, v in node.items()]
    if isinstance(node, (list, tuple)) and _holds_arrays(node):
        return [(i, str(i), v) for i, v in enumerate(node)]
    return None


def _walk(node: Any, prefix: str, flat: dict[str, Any], skipped: list[tuple[str, str]]) -> None:
    for _, part, child in _children(node) or []:
        name = f"{prefix}/{part}" if prefix else part
        child, _ = _as_tree(child)
        if _is_array(child):
            flat[name] = child
        elif _children(child) is not None:
            _walk(child, name, flat, skipped)
        else:
            skipped.append((name, _kind(child)))


def _rebuild(
    like: Any, values: dict[str, Any], prefix: str, memo: dict[tuple[Any, ...], Any]
) -> Any:
    out: dict[Any, Any] = {}
    for key, part, child in _children(like) or []:
        name = f"{prefix}/{part}" if prefix else part
        child, _ = _as_tree(child)
        if _is_array(child):
            out[key] = _like(values[name], child, memo) if name in values else child
        elif _children(child) is not None:
            out[key] = _rebuild(child, values, name, memo)
        else:
            out[key] = child
    return _remake(like, out)


def _remake(like: Any, items: dict[Any, Any]) -> Any:
    """A container of `like`'s type holding `items` (a dict when that type will not take them)."""
    if isinstance(like, (list, tuple)):
        seq = [items[i] for i in range(len(like))]
        if hasattr(like, "_fields"):  # a namedtuple
            return type(like)(*seq)
        try:
            return type(like)(seq)
        except TypeError:
            return seq if isinstance(like, list) else tuple(seq)
    try:
        out = type(like)(items)
    except TypeError:
        out = dict(items)
    meta = getattr(like, "_metadata", None)  # torch state dicts: module versions for loading
    if meta is not None:
        try:
            out._metadata = meta
        except AttributeError:
            pass
    return out


def _ties(
    flat: dict[str, Any], module_ties: list[list[str]], *, allow_identity: bool
) -> dict[str, list[str]]:
    """Groups of names that are one tensor in memory: {first name: the other names}.

    Only exact aliases count (same memory, offset, shape, strides, dtype): a slice or a
    transposed view of a tensor is another tensor. Identical jax array objects count on the
    source side only, where merging them cannot change a result.
    """
    parent = {name: name for name in flat}

    def root(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    def union(a: str, b: str) -> None:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[rb] = ra

    for group in module_ties:
        present = [n for n in group if n in parent]
        for other in present[1:]:
            union(present[0], other)
    first: dict[tuple[Any, ...], str] = {}
    for name, leaf in flat.items():
        key = _memory_key(leaf, allow_identity)
        if key is None:
            continue
        if key in first:
            union(first[key], name)
        else:
            first[key] = name
    groups: dict[str, list[str]] = {}
    for name in flat:  # in leaf order, so each group's first name is its representative
        groups.setdefault(root(name), []).append(name)
    return {g[0]: g[1:] for g in groups.values() if len(g) > 1}


def _memory_key(leaf: Any, allow_identity: bool) -> tuple[Any, ...] | None:
    if isinstance(leaf, np.ndarray):
        if leaf.size == 0:
            return None
        ptr = leaf.__array_interface__["data"][0]
        return ("numpy", ptr, leaf.shape, leaf.strides, leaf.dtype.str)
    if "torch" in sys.modules:
        import torch

        if isinstance(leaf, torch.Tensor):
            from weightbridge.frameworks.torch import memory_key

            key = memory_key(leaf)
            return None if key is None else ("torch", *key)
    if allow_identity and "jax" in sys.modules:
        import jax

        if isinstance(leaf, jax.Array):
            return ("jax", id(leaf))
    return None


def _like(value: Any, template: Any, memo: dict[tuple[Any, ...], Any]) -> Any:
    """`value` as the same kind of array as `template` (numpy stays numpy).

    `memo` makes one array of one value: tied target leaves, filled with the same value,
    come back as one tensor (still tied).
    """
    key = (
        id(value),
        type(template),
        str(getattr(template, "dtype", "")),
        str(getattr(template, "device", "")),
    )
    if key not in memo:
        memo[key] = _convert(value, template)
    return memo[key]


def _convert(value: Any, template: Any) -> Any:
    if isinstance(template, np.ndarray) or not hasattr(template, "shape"):
        return value
    if "torch" in sys.modules:
        import torch

        if isinstance(template, torch.Tensor):
            from weightbridge.frameworks.torch import from_numpy

            return from_numpy(value, template)
    if "jax" in sys.modules:
        import jax

        if isinstance(template, (jax.Array, jax.ShapeDtypeStruct)):
            from weightbridge.frameworks.jax import as_jax

            return as_jax(value)
    if hasattr(template, "numpy") and "tensorflow" in sys.modules:
        import tensorflow as tf

        return tf.convert_to_tensor(value)
    return value
