"""Layout flags: the name and axis change of each parameter under ``--from F --to G``.

Without a target (``weightbridge convert SRC -o OUT --from pytorch --to flax``) nothing but the
framework conventions says how a tensor changes, so every parameter gets a *role* decided from
its own module (the path component right before its leaf) and its siblings (the other
parameters of that module), never from words further up its path:

- torch ``weight``: 1-D is a norm scale (BatchNorm when a ``running_mean`` sibling exists,
  LayerNorm/GroupNorm-like otherwise), never a kernel; 2-D is an ``Embedding`` table when the
  module's own name says so (``word_embeddings``, ``wte``, ``embed_tokens``) and it has no bias,
  else a ``Linear`` kernel; 3-D and more is a convolution kernel.
- Keras 3 ``.weights.h5`` names (``layers/dense/vars/0``) carry no leaf name: the layer class
  (``dense``, ``conv2d``, ``depthwise_conv2d``, ``batch_normalization``...) and the variables'
  count and shapes give each variable's role, or the tensor is refused.
- flax/haiku/Keras 2 leaves name their role (``kernel``, ``scale``, ``embedding``, ``gamma``,
  ``w``...); a rank-3 kernel is a convolution only when its module's name says ``conv``
  (otherwise it may be a ``DenseGeneral``/``EinsumDense`` kernel).

Certain or refuse: a tensor whose role the flags cannot decide (an unknown rank >= 2 leaf, a
transposed convolution into or out of flax/haiku, a Keras 3 layer with an ambiguous variable
list) is an error naming it, never copied unchanged. With a target (``--like``) such tensors
are left to the automatic matcher instead.

When only ``--to`` is given, the source framework is inferred from the leaf names when they
leave no doubt (see `infer_framework`); the plan notes what was inferred.
"""

from __future__ import annotations

import functools
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from weightbridge.errors import PlanError
from weightbridge.ops import Op, Permute, Reshape
from weightbridge.plan import is_buffer
from weightbridge.planning.layouts import canonical_framework

Shape = tuple[int, ...]

# Torch stores Linear [out, in] and conv [O, I, *k]; the others Dense [in, out], conv [*k, I, O].
_OUT_IN = {"pytorch"}
_LAYOUT_FRAMEWORKS = ("pytorch", "flax", "haiku", "keras", "tensorflow")
_KERAS = {"keras", "tensorflow"}
_FLAXLIKE = {"flax", "haiku"}

# Roles. The first four carry an axis order; the others are elementwise or kept as they are.
DENSE, CONV, CONV_T, DEPTHWISE = "dense", "conv", "conv_transpose", "depthwise"
EMBEDDING, SCALE, BIAS, NORM_BIAS = "embedding", "scale", "bias", "norm_bias"
MEAN, VAR = "mean", "var"
KEEP = "keep"  # a buffer, a scalar or a 1-D parameter of no known role: copied as it is

_LEAVES: dict[str, dict[str, str]] = {
    "pytorch": {
        DENSE: "weight",
        CONV: "weight",
        CONV_T: "weight",
        DEPTHWISE: "weight",
        EMBEDDING: "weight",
        SCALE: "weight",
        BIAS: "bias",
        NORM_BIAS: "bias",
        MEAN: "running_mean",
        VAR: "running_var",
    },
    "flax": {
        DENSE: "kernel",
        CONV: "kernel",
        CONV_T: "kernel",
        DEPTHWISE: "kernel",
        EMBEDDING: "embedding",
        SCALE: "scale",
        BIAS: "bias",
        NORM_BIAS: "bias",
        MEAN: "mean",
        VAR: "var",
    },
    "keras": {
        DENSE: "kernel",
        CONV: "kernel",
        CONV_T: "kernel",
        DEPTHWISE: "depthwise_kernel",
        EMBEDDING: "embeddings",
        SCALE: "gamma",
        BIAS: "bias",
        NORM_BIAS: "beta",
        MEAN: "moving_mean",
        VAR: "moving_variance",
    },
    # Haiku keeps BatchNorm statistics in state modules of their own (``~/mean_ema``): the
    # source leaf name is kept for those.
    "haiku": {
        DENSE: "w",
        CONV: "w",
        CONV_T: "w",
        DEPTHWISE: "w",
        EMBEDDING: "embeddings",
        SCALE: "scale",
        BIAS: "b",
        NORM_BIAS: "offset",
    },
}
_LEAVES["tensorflow"] = _LEAVES["keras"]

# A torch module whose own name says "embedding table" (a 2-D weight without a bias).
_EMBED_WORD = re.compile(r"emb|wte|wpe|lookup|vocab|token_type", re.IGNORECASE)
_NOT_EMBED = re.compile(r"proj|out|head|linear|fc|dense", re.IGNORECASE)
_EMBED_EXACT = {"shared", "relative_attention_bias"}  # T5's nn.Embedding modules
_CONV_T_WORD = re.compile(r"transpose|deconv|convt", re.IGNORECASE)
_KERAS3 = re.compile(r"^(?P<head>(?:.*[./])?)vars[./](?P<index>\d+)$")


@dataclass(frozen=True, slots=True)
class ParamChange:
    """What `--from/--to` does to one source tensor.

    `problem` is set (and `name`/`ops` leave the tensor as it is) when the flags cannot decide
    the tensor's role; without a target that is an error.
    """

    source: str
    name: str
    ops: tuple[Op, ...]
    role: str
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class Inference:
    """The source framework guessed from leaf names: `framework` when certain, else None."""

    framework: str | None
    candidates: tuple[str, ...]
    evidence: str
    voted: bool = False  # some leaves belong to one framework only


# Not frozen: one is made for every tensor, and a frozen dataclass is twice as slow to make.
@dataclass(slots=True)
class _Name:
    head: str  # everything before the leaf, separator included: "encoder.fc.", "layers/dense/"
    leaf: str  # as written: "weight", "kernel:0", "vars/0"
    key: str  # normalised: "kernel" (":0" and a leading "_" dropped), "0" for Keras 3 vars
    keras3: bool

    @property
    def sep(self) -> str:
        return self.head[-1] if self.head else "."

    @property
    def module(self) -> str:
        """The module's own name (the last component of the head); "" at the top level."""
        return _last_component(self.head)

    @property
    def parent(self) -> str:
        head = self.head.rstrip("./")
        cut = max(head.rfind("."), head.rfind("/"))
        return _last_component(head[:cut]) if cut >= 0 else ""


def _last_component(path: str) -> str:
    """The last non-empty component of `path` ("" if none), without splitting all of it."""
    path = path.rstrip("./")
    return path[max(path.rfind("."), path.rfind("/")) + 1 :]


def _parse(name: str, family: str) -> _Name:
    m = _KERAS3.match(name) if family in _KERAS else None
    if m:
        return _Name(m["head"], name[len(m["head"]) :], m["index"], True)
    leaf = name[max(name.rfind("."), name.rfind("/")) + 1 :]  # the last component
    key = leaf
    if family in _KERAS:
        key = re.sub(r":\d+$", "", key).lstrip("_") or key
    return _Name(name[: len(name) - len(leaf)], leaf, key, False)


@dataclass(slots=True)  # not frozen, like _Name
class _Role:
    kind: str
    problem: str | None = None
    prefix: str = ""  # a module component added before the new leaf (separable convolutions)


def _unknown(why: str) -> _Role:
    return _Role(KEEP, why)


def convert_param(
    name: str,
    shape: Shape,
    siblings: Mapping[str, Shape],
    src: str,
    dst: str,
    target_shape: Shape | None = None,
) -> ParamChange:
    """The new name and ops of one parameter; `siblings` maps the full names of the parameters
    of its module (itself included) to their shapes.

    >>> convert_param("fc.weight", (4, 3), {"fc.bias": (4,)}, "pytorch", "flax").ops
    (Permute(axes=(1, 0)),)
    >>> convert_param("embeddings.LayerNorm.weight", (8,),
    ...               {"embeddings.LayerNorm.bias": (8,)}, "pytorch", "flax").name
    'embeddings.LayerNorm.scale'
    >>> change = convert_param("layers/dense/vars/0", (3, 6), {"layers/dense/vars/1": (6,)},
    ...                        "keras", "pytorch")
    >>> change.name, change.ops
    ('layers/dense/weight', (Permute(axes=(1, 0)),))
    """
    src_c, dst_c = canonical_framework(src), canonical_framework(dst)
    if src_c is None or dst_c is None:
        raise PlanError("convert_param needs both frameworks")
    parsed = _parse(name, src_c)
    sib: dict[str, Shape] = {}
    for other, other_shape in siblings.items():
        p = _parse(other, src_c)
        if p.head == parsed.head and p.keras3 == parsed.keras3:
            sib[p.key] = tuple(other_shape)
    sib[parsed.key] = tuple(shape)
    return _change(name, parsed, tuple(shape), sib, src_c, dst_c, target_shape)


def _change(
    name: str,
    parsed: _Name,
    shape: Shape,
    sib: Mapping[str, Shape],
    src_c: str,
    dst_c: str,
    target_shape: Shape | None,
) -> ParamChange:
    role = _role(name, parsed, shape, sib, src_c)
    if role.problem is None and role.kind == CONV_T and (src_c in _FLAXLIKE or dst_c in _FLAXLIKE):
        role = _unknown(
            f"module {parsed.module!r} looks like a transposed convolution, whose {src_c} -> "
            f"{dst_c} kernel layout depends on the model (Flax's ConvTranspose flips the kernel "
            "unless transpose_kernel=True)"
        )
    if role.problem is not None:
        return ParamChange(name, name, (), role.kind, role.problem)
    ops = _ops(role.kind, shape, src_c, dst_c)
    leaf = _LEAVES[dst_c].get(role.kind) if role.kind != KEEP else None
    if leaf is None:
        new = name  # kept as written
    else:
        prefix = role.prefix + parsed.sep if role.prefix else ""
        new = parsed.head + prefix + leaf
    return _against_target(ParamChange(name, new, ops, role.kind), shape, dst_c, target_shape)


def _against_target(
    change: ParamChange, shape: Shape, dst_c: str, target_shape: Shape | None
) -> ParamChange:
    """`change`, or a problem when the target holds the tensor in the source's own layout."""
    new, ops = change.name, change.ops
    if ops and target_shape is not None and new != change.source:
        after = _shape_after(shape, ops)
        if tuple(target_shape) != after and tuple(target_shape) == shape:
            return ParamChange(
                change.source,
                change.source,
                (),
                change.role,
                f"the target's {new!r} has the source's own shape {shape}, not the "
                f"{dst_c} layout {after}",
            )
    return change


# The parameter names each non-torch family uses, and their roles.
_KNOWN: dict[str, dict[str, str]] = {
    "flax": {
        "kernel": DENSE,
        "embedding": EMBEDDING,
        "scale": SCALE,
        "bias": BIAS,
        "mean": MEAN,
        "var": VAR,
    },
    "haiku": {
        "w": DENSE,
        "embeddings": EMBEDDING,
        "scale": SCALE,
        "offset": NORM_BIAS,
        "b": BIAS,
    },
    "keras": {
        "kernel": DENSE,
        "depthwise_kernel": DEPTHWISE,
        "pointwise_kernel": CONV,
        "embeddings": EMBEDDING,
        "gamma": SCALE,
        "beta": NORM_BIAS,
        "bias": BIAS,
        "moving_mean": MEAN,
        "moving_variance": VAR,
    },
}


def _role(full: str, n: _Name, shape: Shape, sib: Mapping[str, Shape], family: str) -> _Role:
    rank = len(shape)
    if is_buffer(full):
        return _Role(KEEP)
    if family == "pytorch":
        return _torch_role(n, shape, sib)
    if family in _KERAS and n.keras3:
        return _keras3_role(n, shape, sib)
    kind = _KNOWN["keras" if family in _KERAS else family].get(n.key)
    if kind is None:
        if rank <= 1:
            return _Role(KEEP)
        return _unknown(
            f"{n.key!r} is not a {family} parameter name the flags know, so its axis order is "
            "unknown"
        )
    separable = family in _KERAS and "pointwise_kernel" in sib
    if kind == DENSE:
        if rank == 2:
            return _Role(DENSE)
        if rank < 2:
            return _unknown(f"a {rank}-D kernel")
        return _kernel_role(n, rank)
    if kind in (CONV, DEPTHWISE):  # Keras' pointwise/depthwise kernels
        if rank < 3:
            return _unknown(f"a {rank}-D {n.key}")
        return _Role(kind, prefix=("depthwise" if kind == DEPTHWISE else "pointwise") * separable)
    if kind == EMBEDDING:
        return _Role(EMBEDDING) if rank == 2 else _unknown(f"a {rank}-D embedding table")
    if rank != 1:
        if rank == 0:
            return _Role(KEEP)
        hint = " (a DenseGeneral bias?)" if kind == BIAS else ""
        return _unknown(f"a {rank}-D {n.key!r}{hint}, whose axis order is unknown")
    if kind == BIAS:
        if separable:
            return _Role(BIAS, prefix="pointwise")
        if family == "flax" and "scale" in sib and "kernel" not in sib:
            return _Role(NORM_BIAS)
    return _Role(kind)


def _kernel_role(n: _Name, rank: int) -> _Role:
    """A rank >= 3 kernel outside torch: convolution, transposed convolution, or unknown."""
    own = n.module.lower()
    if _CONV_T_WORD.search(own):
        return _Role(CONV_T)
    if "conv" in own:
        return _Role(CONV)
    if rank == 3:
        return _unknown(
            f"a 3-D kernel in module {n.module!r}, which may be a Conv1D or a DenseGeneral/"
            "EinsumDense kernel ([in, heads, dim]); only a module named *conv* is taken as a "
            "convolution"
        )
    if re.search(r"dense|einsum|query|key|value|attention", own):
        return _unknown(f"a {rank}-D kernel in module {n.module!r} (a DenseGeneral kernel?)")
    return _Role(CONV)


def _torch_role(n: _Name, shape: Shape, sib: Mapping[str, Shape]) -> _Role:
    rank, leaf = len(shape), n.key
    if leaf == "weight":
        if rank <= 1:
            return _Role(SCALE if rank == 1 else KEEP)  # BatchNorm/LayerNorm/GroupNorm scale
        if rank >= 3:
            return _Role(CONV_T if _CONV_T_WORD.search(n.module) else CONV)
        if len(sib.get("bias", ())) == 1:
            return _Role(DENSE)  # an Embedding has no bias
        own = n.module
        if own.isdigit():
            if n.parent and _embedding_name(n.parent):
                return _unknown(
                    f"a 2-D weight without a bias in {n.parent}[{own}]: a Linear in a "
                    "Sequential or an Embedding in a ModuleList?"
                )
            return _Role(DENSE)
        return _Role(EMBEDDING if _embedding_name(own) else DENSE)
    if leaf == "bias":
        if rank > 1:
            return _unknown(f"a {rank}-D bias")
        if rank == 0:
            return _Role(KEEP)
        norm = len(sib.get("weight", (0, 0))) == 1 or "running_mean" in sib
        return _Role(NORM_BIAS if norm else BIAS)
    if leaf in ("running_mean", "running_var") and rank == 1:
        return _Role(MEAN if leaf == "running_mean" else VAR)
    if rank <= 1:
        return _Role(KEEP)
    if leaf == "in_proj_weight":
        return _unknown(
            "MultiheadAttention's fused q/k/v projection, which the other frameworks keep as "
            "three kernels"
        )
    return _unknown(
        f"{leaf!r} is not a parameter of a torch layer (weight, bias, running_mean, "
        "running_var), so its axis order is unknown"
    )


@functools.lru_cache(maxsize=4096)
def _embedding_name(own: str) -> bool:
    if own in _EMBED_EXACT:
        return True
    return bool(_EMBED_WORD.search(own)) and not _NOT_EMBED.search(own)


# Keras 3 layer classes (``layers/<snake_case class>[_N]/vars/<i>``) whose variables the flags
# know: the kernel's rank, and where the bias size is read from the kernel.
_K3_KERNELS: dict[str, tuple[str, int]] = {"dense": (DENSE, 2)}
for _d in (1, 2, 3):
    _K3_KERNELS[f"conv{_d}d"] = (CONV, _d + 2)
    _K3_KERNELS[f"conv{_d}d_transpose"] = (CONV_T, _d + 2)
for _d in (1, 2):
    _K3_KERNELS[f"depthwise_conv{_d}d"] = (DEPTHWISE, _d + 2)


def _keras3_role(n: _Name, shape: Shape, sib: Mapping[str, Shape]) -> _Role:
    layer = n.module
    cls = re.sub(r"_\d+$", "", layer)
    count = len(sib)
    shapes = [sib.get(str(i)) for i in range(count)]
    index, rank = int(n.key), len(shape)
    if any(s is None for s in shapes):
        return _unknown(f"layer {layer!r} has variables {sorted(sib)}, not 0..{count - 1}")
    vs: list[Shape] = [s for s in shapes if s is not None]

    def bad(why: str) -> _Role:
        return _unknown(f"Keras 3 layer {layer!r} ({cls}): {why}")

    if cls in _K3_KERNELS:
        kind, want = _K3_KERNELS[cls]
        kernel = vs[0]
        if count > 2 or len(kernel) != want:
            return bad(f"expected a {want}-D kernel and a bias, found shapes {vs}")
        out = kernel[-2] * kernel[-1] if kind == DEPTHWISE else kernel[-2 if kind == CONV_T else -1]
        if count == 2 and vs[1] != (out,):
            return bad(f"the bias {vs[1]} does not fit the kernel {kernel}")
        return _Role(kind if index == 0 else BIAS)
    m = re.fullmatch(r"separable_conv([12])d", cls)
    if m:
        want = int(m[1]) + 2
        if count not in (2, 3) or any(len(s) != want for s in vs[:2]):
            return bad(f"expected depthwise and pointwise {want}-D kernels, found shapes {vs}")
        depth, point = vs[0], vs[1]
        if point[-2] != depth[-2] * depth[-1] or (count == 3 and vs[2] != (point[-1],)):
            return bad(f"kernel shapes {vs} do not fit together")
        kind = (DEPTHWISE, CONV, BIAS)[index]
        return _Role(kind, prefix=("depthwise", "pointwise", "pointwise")[index])
    if cls == "embedding":
        if count != 1 or rank != 2:
            return bad(f"expected one 2-D table, found shapes {vs}")
        return _Role(EMBEDDING)
    if any(len(s) != 1 for s in vs) and cls in _K3_NORMS:
        return bad(f"expected 1-D variables, found shapes {vs}")
    if cls == "batch_normalization":
        if count == 4:
            return _Role((SCALE, NORM_BIAS, MEAN, VAR)[index])
        if count == 2:
            return _Role((MEAN, VAR)[index])
        return bad(
            f"{count} variables: gamma or beta is missing (scale=False or center=False) and the "
            "names do not say which"
        )
    if cls in ("layer_normalization", "group_normalization"):
        if count == 2:
            return _Role((SCALE, NORM_BIAS)[index])
        return bad(f"{count} variable(s): gamma or beta is missing and the names do not say which")
    if cls == "rms_normalization":
        return _Role(SCALE) if count == 1 else bad(f"{count} variables, expected one scale")
    if rank <= 1:
        return _Role(KEEP)
    return _unknown(
        f"Keras 3 layer {layer!r} is not one whose variables the flags know (Dense, Conv, "
        "ConvTranspose, DepthwiseConv, SeparableConv, Embedding, BatchNormalization, "
        "LayerNormalization, GroupNormalization)"
    )


_K3_NORMS = {
    "batch_normalization",
    "layer_normalization",
    "group_normalization",
    "rms_normalization",
}


@functools.lru_cache(maxsize=256)
def _kernel_axes(rank: int, src: str, dst: str) -> tuple[Op, ...]:
    if (src in _OUT_IN) == (dst in _OUT_IN) or rank < 2:
        return ()
    if rank == 2:
        return (Permute((1, 0)),)
    if src in _OUT_IN:  # [O, I, *k] -> [*k, I, O]
        return (Permute((*range(2, rank), 1, 0)),)
    return (Permute((rank - 1, rank - 2, *range(rank - 2))),)  # [*k, I, O] -> [O, I, *k]


def _ops(kind: str, shape: Shape, src: str, dst: str) -> tuple[Op, ...]:
    if kind in (DENSE, CONV, CONV_T):
        return _kernel_axes(len(shape), src, dst)
    if kind == DEPTHWISE and dst not in _KERAS:
        # Keras [*k, C, M] -> [*k, 1, C*M] (output channel c*M + m, as torch and flax number
        # them), then the ordinary conv permutation into torch's [C*M, 1, *k].
        *k, c, m = shape
        return (Reshape((*k, 1, c * m)), *_kernel_axes(len(shape), src, dst))
    return ()


def _shape_after(shape: Shape, ops: Sequence[Op]) -> Shape:
    for op in ops:
        shape = op.out_shape([shape])
    return shape


# --- the source framework, from leaf names -----------------------------------------------

_EXCLUSIVE: dict[str, set[str]] = {
    "pytorch": {
        "weight",
        "running_mean",
        "running_var",
        "num_batches_tracked",
        "in_proj_weight",
        "in_proj_bias",
    },
    "flax": {"embedding", "mean", "var"},
    "keras": {
        "gamma",
        "beta",
        "moving_mean",
        "moving_variance",
        "depthwise_kernel",
        "pointwise_kernel",
        "recurrent_kernel",
    },
    "haiku": {"w", "b", "offset"},
}
_SHARED: dict[str, set[str]] = {
    "kernel": {"flax", "keras"},
    "scale": {"flax", "haiku"},
    "embeddings": {"keras", "haiku"},
    "bias": {"pytorch", "flax", "keras"},
}


def infer_framework(names: Sequence[str]) -> Inference:
    """The framework whose conventions `names` follow, when the leaf names leave no doubt.

    Leaves only one framework uses (torch's ``weight``/``running_mean``, Keras' ``gamma``/
    ``moving_mean``/``vars/0``/``:0``, Haiku's ``w``/``b``, Flax's ``embedding``/``mean``)
    vote; a winner needs more than twice the votes of any other framework. Names with only
    shared leaves (``kernel``, ``bias``) leave several candidates.

    >>> infer_framework(["fc.weight", "fc.bias", "bn.running_mean"]).framework
    'pytorch'
    >>> infer_framework(["Dense_0/kernel", "Dense_0/bias"]).candidates
    ('flax', 'keras')
    """
    votes: Counter[str] = Counter()
    examples: dict[str, list[str]] = defaultdict(list)
    shared: set[str] | None = None
    for name in names:
        if is_buffer(name) and not name.endswith("num_batches_tracked"):
            continue
        raw = re.split(r"[./]", name)[-1]
        if _KERAS3.match(name) or re.search(r":\d+$", raw):
            fam, leaf = "keras", ("vars/N" if _KERAS3.match(name) else raw)
        else:
            leaf = raw
            fam = next((f for f, leaves in _EXCLUSIVE.items() if leaf in leaves), "")
            if not fam and leaf.lstrip("_") in _EXCLUSIVE["keras"] | {"kernel"} and leaf[:1] == "_":
                fam = "keras"  # TensorFlow object-graph names of Keras 3 layers: "_kernel"
        if fam:
            votes[fam] += 1
            if leaf not in examples[fam] and len(examples[fam]) < 3:
                examples[fam].append(leaf)
        elif leaf in _SHARED:
            shared = set(_SHARED[leaf]) if shared is None else shared & _SHARED[leaf]
    if votes:
        ranked = votes.most_common()
        top, n = ranked[0]
        said = "; ".join(
            f"{c} {f} leaves such as {', '.join(repr(x) for x in examples[f])}" for f, c in ranked
        )
        runner_up = ranked[1][1] if len(ranked) > 1 else 0
        if n > 2 * runner_up:
            return Inference(top, (top,), said, True)
        return Inference(None, tuple(f for f, _ in ranked), said, True)
    if shared:
        order = [f for f in _LAYOUT_FRAMEWORKS if f in shared]
        said = "only leaves several frameworks use (kernel, bias, scale, embeddings)"
        if len(order) == 1:
            return Inference(order[0], tuple(order), said)
        return Inference(None, tuple(order), said)
    return Inference(None, (), "no leaf name that any framework's convention explains")


# --- all parameters at once ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LayoutResult:
    changes: tuple[ParamChange, ...]  # one per parameter, in order
    notes: tuple[str, ...] = ()


def convert_params(
    params: Sequence[tuple[str, Shape]],
    src: str | None,
    dst: str | None,
    target_shapes: Mapping[str, Shape] | None = None,
    *,
    strict: bool = True,
) -> LayoutResult:
    """The layout change of every parameter (names after the user's renames).

    `strict` (no target): anything the flags cannot decide is a `PlanError` that names the
    tensors and what to do; ``--to`` without ``--from`` infers the source framework or
    refuses. Not strict (a target, whose matcher pairs what is left): undecided tensors keep
    their name (``problem`` says why) and an uncertain source framework means no change.
    """
    src_c, dst_c = canonical_framework(src), canonical_framework(dst)

    def same() -> tuple[ParamChange, ...]:  # every tensor as it is (made only when returned)
        return tuple(ParamChange(n, n, (), KEEP) for n, _ in params)

    if dst_c is None:
        if src_c is not None and strict:
            raise PlanError(
                f"--from {src_c} without --to changes nothing: add --to with the framework to "
                f"convert into ({', '.join(f for f in _LAYOUT_FRAMEWORKS if f != src_c)}), or "
                "leave --from out to copy the tensors as they are"
            )
        return LayoutResult(same())
    if strict and "numpy" in (src_c, dst_c):
        raise PlanError(
            "numpy has no layout convention, so --from/--to numpy cannot say how tensors change; "
            f"choose from {', '.join(_LAYOUT_FRAMEWORKS)}, or leave --from/--to out to copy the "
            "tensors as they are"
        )
    notes: list[str] = []
    if src_c is None:
        inferred = infer_framework([n for n, _ in params])
        if inferred.framework is not None:
            src_c = inferred.framework
            notes.append(
                f"layout: --from {src_c} inferred from the parameter names ({inferred.evidence})"
            )
        elif len(inferred.candidates) > 1 and not inferred.voted:
            results = [_all(params, c, dst_c, target_shapes) for c in inferred.candidates]
            if all(_same(r, results[0]) for r in results[1:]):
                said = " and ".join(inferred.candidates)
                notes.append(
                    f"layout: the source names fit the {said} conventions ({inferred.evidence}), "
                    f"which convert them alike into {dst_c}"
                )
                return _finish(params, results[0], f"--from {said}", dst_c, notes, strict)
        if src_c is None:
            if not strict:
                return LayoutResult(same())
            choices = inferred.candidates or tuple(f for f in _LAYOUT_FRAMEWORKS if f != dst_c)
            raise PlanError(
                f"--to {dst_c} needs --from: the source framework cannot be told from the names "
                f"({inferred.evidence}); pass --from {' or --from '.join(choices)}"
            )
    if src_c == dst_c:
        return LayoutResult(same(), tuple(notes))
    changes = _all(params, src_c, dst_c, target_shapes)
    return _finish(params, changes, f"--from {src_c}", dst_c, notes, strict)


def _finish(
    params: Sequence[tuple[str, Shape]],
    changes: list[ParamChange],
    src_flag: str,
    dst: str,
    notes: list[str],
    strict: bool,
) -> LayoutResult:
    problems = [c for c in changes if c.problem is not None]
    if problems and strict:
        shapes = dict(params)
        lines = [
            f"{src_flag} --to {dst} cannot decide {len(problems)} tensor(s) from their names; "
            "copying them unchanged could silently mis-orient them:"
        ]
        lines += [f"  {c.source} {shapes[c.source]}: {c.problem}" for c in problems[:20]]
        if len(problems) > 20:
            lines.append(f"  ... and {len(problems) - 20} more")
        guess = infer_framework([n for n, _ in params]).framework
        if guess is not None and f"--from {guess}" != src_flag:
            lines.append(f"  (the names look like {guess}'s: is {src_flag} right?)")
        lines.append(
            "pass --like TARGET (a spec or checkpoint of the model to produce) so the matcher "
            "decides from the target's shapes, give them explicit rules in a --rules file (used "
            "with --like), or drop them with --rename 'PATTERN=' and handle them yourself"
        )
        raise PlanError("\n".join(lines))
    return LayoutResult(tuple(changes), tuple(notes))


def _same(a: Sequence[ParamChange], b: Sequence[ParamChange]) -> bool:
    return [(c.name, c.ops, c.problem) for c in a] == [(c.name, c.ops, c.problem) for c in b]


def _all(
    params: Sequence[tuple[str, Shape]],
    src: str,
    dst: str,
    target_shapes: Mapping[str, Shape] | None,
) -> list[ParamChange]:
    if src == dst:
        return [ParamChange(n, n, (), KEEP) for n, _ in params]
    by_module: dict[tuple[str, bool], dict[str, Shape]] = defaultdict(dict)
    parsed = [_parse(n, src) for n, _ in params]
    for (_, shape), p in zip(params, parsed, strict=True):
        by_module[(p.head, p.keras3)][p.key] = tuple(shape)
    out = []
    for (name, shape), p in zip(params, parsed, strict=True):
        sib = by_module[(p.head, p.keras3)]
        change = _change(name, p, tuple(shape), sib, src, dst, None)
        if target_shapes is not None and change.ops and change.name in target_shapes:
            change = _against_target(change, tuple(shape), dst, target_shapes[change.name])
        out.append(change)
    return out
