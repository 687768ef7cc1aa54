"""Framework layouts: how each framework names parameters and orders their axes.

For each (from, to) pair of frameworks this module answers, for one source tensor: which ops turn
its layout into the target framework's, and what the parameter's last name component becomes.
The decision uses what the parameter *is* (its name, its rank, and when known the target's
shape), not rank alone: an embedding and a dense kernel are both 2-D, and only the dense kernel
is transposed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from weightbridge.errors import PlanError
from weightbridge.ops import Op, Permute

Framework = Literal["pytorch", "flax", "haiku", "tensorflow", "keras", "numpy"]
FRAMEWORKS: tuple[str, ...] = ("pytorch", "flax", "haiku", "tensorflow", "keras", "numpy")
_ALIASES = {"torch": "pytorch", "pt": "pytorch", "tf": "tensorflow", "jax": "flax", "np": "numpy"}

# Families: torch stores Linear [out, in] and conv [O, I, *k]; the others store Dense [in, out]
# and conv [*k, I, O].
_OUT_IN = {"pytorch"}

# Names that mark a 2-D parameter as an embedding table (never transposed).
_EMBEDDING = re.compile(
    r"(embed|embedding|wte|wpe|token_type|position_ids|lookup|vocab)", re.IGNORECASE
)
_NORM = re.compile(r"(norm|bn|ln_|_ln|ln\d|layernorm|batchnorm|groupnorm)", re.IGNORECASE)


def canonical_framework(name: str | None) -> str | None:
    """Normalise a framework name (``torch`` -> ``pytorch``); None stays None."""
    if name is None:
        return None
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in FRAMEWORKS:
        raise PlanError(f"unknown framework {name!r}; choose one of {', '.join(FRAMEWORKS)}")
    return key


@dataclass(frozen=True, slots=True)
class LayoutChange:
    ops: tuple[Op, ...]
    leaf: str  # the new last name component


def convert_param(
    name: str,
    shape: tuple[int, ...],
    src: str,
    dst: str,
    target_shape: tuple[int, ...] | None = None,
) -> LayoutChange:
    """Ops and new leaf name for one parameter moving from framework `src` to `dst`.

    >>> convert_param("fc.weight", (4, 3), "pytorch", "flax")
    LayoutChange(ops=(Permute(axes=(1, 0)),), leaf='kernel')
    >>> convert_param("wte.weight", (50, 8), "pytorch", "flax")
    LayoutChange(ops=(), leaf='embedding')
    """
    leaf = re.split(r"[./]", name)[-1]
    src_out_in, dst_out_in = src in _OUT_IN, dst in _OUT_IN
    is_embedding = bool(_EMBEDDING.search(name))
    rank = len(shape)
    ops: tuple[Op, ...] = ()
    if src_out_in != dst_out_in and rank >= 2 and not is_embedding and leaf in _KERNEL_LEAVES:
        if rank == 2:
            ops = (Permute((1, 0)),)
        elif src_out_in:  # [O, I, *k] -> [*k, I, O]
            ops = (Permute((*range(2, rank), 1, 0)),)
        else:  # [*k, I, O] -> [O, I, *k]
            ops = (Permute((rank - 1, rank - 2, *range(rank - 2))),)
        if target_shape is not None and rank == 2 and shape[0] == shape[1] == target_shape[0]:
            pass  # square: the name says it is a kernel, so it is transposed
        elif (
            target_shape is not None
            and _shape_after(shape, ops) != target_shape
            and shape == target_shape
        ):
            ops = ()  # the target keeps the source layout (e.g. a tied projection)
    return LayoutChange(ops, _rename_leaf(leaf, name, rank, is_embedding, dst))


_KERNEL_LEAVES = {"weight", "kernel", "w"}


class TensorSpecLike(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...


def _shape_after(shape: tuple[int, ...], ops: tuple[Op, ...]) -> tuple[int, ...]:
    for op in ops:
        shape = op.out_shape([shape])
    return shape


def _rename_leaf(leaf: str, name: str, rank: int, is_embedding: bool, dst: str) -> str:
    norm = rank == 1 and bool(_NORM.search(name))
    if dst == "pytorch":
        return {
            "kernel": "weight",
            "scale": "weight",
            "gamma": "weight",
            "beta": "bias",
            "embedding": "weight",
            "mean": "running_mean",
            "var": "running_var",
            "moving_mean": "running_mean",
            "moving_variance": "running_var",
            "w": "weight",
            "b": "bias",
            "offset": "bias",
        }.get(leaf, leaf)
    if dst == "flax":
        if leaf in ("weight", "w", "gamma"):
            if is_embedding:
                return "embedding"
            return "scale" if norm or leaf == "gamma" else "kernel"
        return {
            "running_mean": "mean",
            "running_var": "var",
            "moving_mean": "mean",
            "moving_variance": "var",
            "beta": "bias",
            "b": "bias",
            "offset": "bias",
        }.get(leaf, leaf)
    if dst in ("keras", "tensorflow"):
        if leaf in ("weight", "w", "scale"):
            if is_embedding:
                return "embeddings"
            return "gamma" if norm or leaf == "scale" else "kernel"
        return {
            "running_mean": "moving_mean",
            "running_var": "moving_variance",
            "mean": "moving_mean",
            "var": "moving_variance",
            "bias": "beta" if norm else "bias",
            "b": "bias",
            "offset": "beta",
        }.get(leaf, leaf)
    if dst == "haiku":
        if leaf in ("weight", "kernel"):
            if is_embedding:
                return "embeddings"
            return "scale" if norm else "w"
        return {"bias": "offset" if norm else "b", "gamma": "scale", "beta": "offset"}.get(
            leaf, leaf
        )
    return leaf


# --- roles and shape fitting, used by the matcher ------------------------------------------

_MATRIX_LEAVES = {
    "weight",
    "kernel",
    "w",
    "depthwise_kernel",
    "pointwise_kernel",
    "embedding",
    "embeddings",
    "in_proj_weight",
}
_SCALE_LEAVES = {"weight", "scale", "gamma", "w"}
_BIAS_LEAVES = {"bias", "b", "beta", "offset", "in_proj_bias"}
_MEAN_LEAVES = {"running_mean", "moving_mean", "mean"}
_VAR_LEAVES = {"running_var", "moving_variance", "var"}
_TORCH_LEAVES = {"weight", "running_mean", "running_var", "num_batches_tracked", "in_proj_weight"}
_OTHER_LEAVES = {
    "kernel",
    "scale",
    "gamma",
    "beta",
    "moving_mean",
    "moving_variance",
    "embedding",
    "embeddings",
    "w",
    "b",
    "offset",
    "mean",
    "var",
}


def _leaf(name: str) -> str:
    return re.split(r"[./]", name.replace(":0", ""))[-1]


def guess_family(names: list[str], framework: str | None = None) -> str:
    """The framework whose layout a side uses: given, or guessed from its parameter names.

    >>> guess_family(["fc.weight", "fc.bias"]), guess_family(["Dense_0/kernel", "Dense_0/bias"])
    ('pytorch', 'flax')
    """
    if framework:
        return canonical_framework(framework) or "numpy"
    leaves = [_leaf(n) for n in names]
    torch_votes = sum(leaf in _TORCH_LEAVES for leaf in leaves)
    other_votes = sum(leaf in _OTHER_LEAVES for leaf in leaves)
    if torch_votes > other_votes:
        return "pytorch"
    if any(
        leaf in ("gamma", "moving_mean", "moving_variance") or ":0" in n
        for leaf, n in zip(leaves, names, strict=True)
    ):
        return "keras"
    if any(leaf in ("w", "offset") for leaf in leaves):
        return "haiku"
    return "flax"


def leaf_role(
    leaf: str, shape: tuple[int, ...], siblings: Mapping[str, object], family: str, path: str
) -> str:
    """What a parameter is: matrix, scale, bias, mean, var, or param (anything else).

    >>> leaf_role("weight", (8,), {"weight": 0, "bias": 0, "running_mean": 0}, "pytorch", "bn.weight")
    'scale'
    """
    rank = len(shape)
    if leaf.isdigit() and re.search(r"(^|[./])vars[./]\d+$", path):
        return _keras3_role(int(leaf), rank, siblings)
    if leaf in _MEAN_LEAVES and rank == 1:
        return "mean"
    if leaf in _VAR_LEAVES and rank == 1:
        return "var"
    if leaf in _MATRIX_LEAVES and rank >= 2:
        return "matrix"
    if leaf in _SCALE_LEAVES and rank == 1:
        return "scale"
    if leaf in _BIAS_LEAVES and rank >= 1:
        return "bias"  # rank 2 for DenseGeneral biases [heads, dim]
    return "param"


# Buffers that carry no learned weights: dropped from a source, kept at their own value in a
# target (torch refills a missing num_batches_tracked itself).
_BUFFERS = re.compile(
    r"(^|[./])(num_batches_tracked|position_ids|attn_mask|relative_position_index)$"
)


def is_buffer(name: str) -> bool:
    """True for buffers such as ``num_batches_tracked`` that a conversion need not carry over."""
    return bool(_BUFFERS.search(name))


def _keras3_role(index: int, rank: int, siblings: Mapping[str, object]) -> str:
    """Role of Keras 3's ``layers/<layer>/vars/<i>``: the layer's variables in build order.

    Dense/Conv: kernel, bias. BatchNormalization: gamma, beta, moving_mean, moving_variance.
    LayerNormalization: gamma, beta. Embedding: embeddings.
    """
    if rank >= 2:
        return "matrix"
    shapes = [getattr(v, "shape", ()) for k, v in sorted(siblings.items()) if k.isdigit()]
    has_matrix = any(len(s) >= 2 for s in shapes)
    if has_matrix:
        return "bias"
    if len(shapes) == 4:
        return ("scale", "bias", "mean", "var")[index] if index < 4 else "param"
    if len(shapes) == 2:
        return ("scale", "bias")[index]
    return "param"


def is_embedding(name: str) -> bool:
    return bool(_EMBEDDING.search(name))


def layout_permutation(rank: int, src: str, dst: str) -> tuple[Op, ...]:
    """Axis permutation of a dense/conv kernel between the [out, in, *k] and [*k, in, out] families."""
    if (src in _OUT_IN) == (dst in _OUT_IN) or rank < 2:
        return ()
    if rank == 2:
        return (Permute((1, 0)),)
    if src in _OUT_IN:
        return (Permute((*range(2, rank), 1, 0)),)
    return (Permute((rank - 1, rank - 2, *range(rank - 2))),)


def fit_ops(
    src: TensorSpecLike,
    tgt: TensorSpecLike,
    role: str,
    src_family: str,
    dst_family: str,
    *,
    flatten_channels: int | None = None,
) -> tuple[Op, ...] | None:
    """Ops that turn `src` into `tgt`'s shape under the two layouts, or None if nothing fits.

    The layout change is tried first for kernels (identity first for embeddings); a trailing
    reshape covers ``(8, 8)`` vs ``(64,)``; a dense kernel of rank 3 (Flax ``DenseGeneral``,
    ``[in, heads, dim]``) is split into 2-D at the one point that makes the shapes agree.

    >>> from weightbridge.spec import TensorSpec
    >>> fit_ops(TensorSpec("q.weight", (8, 4), "F32"), TensorSpec("q/kernel", (4, 2, 4), "F32"),
    ...         "matrix", "pytorch", "flax")
    (Permute(axes=(1, 0)), Reshape(shape=(4, 2, 4)))
    """
    from weightbridge.ops import Reshape

    s_shape, t_shape = tuple(src.shape), tuple(tgt.shape)
    if math.prod(s_shape) != math.prod(t_shape):
        return None
    candidates: list[tuple[Op, ...]] = []
    families_differ = (src_family in _OUT_IN) != (dst_family in _OUT_IN)
    if role == "matrix" and families_differ:
        depthwise = _keras_depthwise_to_torch(s_shape, t_shape, src_family)
        if depthwise:
            candidates.append(depthwise)
        if flatten_channels:
            candidates.append(_flatten_order_ops(s_shape, flatten_channels, src_family in _OUT_IN))
        permuted = layout_permutation(len(s_shape), src_family, dst_family)
        dense = _dense_general_candidates(s_shape, t_shape)
        if is_embedding(src.name) or is_embedding(tgt.name):
            candidates += [(), permuted, *dense]
        elif len(s_shape) != len(t_shape) and dense:
            candidates += [*dense, permuted]
        else:
            candidates += [permuted, *dense]
    else:
        candidates.append(())
    for ops in candidates:
        if _shape_after(s_shape, ops) == t_shape:
            return ops
    first = candidates[0]
    return (*first, Reshape(t_shape))


def _keras_depthwise_to_torch(
    s_shape: tuple[int, ...], t_shape: tuple[int, ...], src_family: str
) -> tuple[Op, ...] | None:
    """Keras depthwise ``(h, w, C, M)`` -> torch ``(C*M, 1, h, w)``: output channel c*M + m.

    Merging C and M first (Flax's ``(h, w, 1, C*M)``) keeps that channel order; permuting first
    would interleave them the other way.
    """
    from weightbridge.ops import Reshape

    if src_family in _OUT_IN or len(s_shape) != 4 or len(t_shape) != 4:
        return None
    h, w, c, m = s_shape
    if m == 1 or c == 1 or t_shape != (c * m, 1, h, w):
        return None
    return (Reshape((h, w, 1, c * m)), Permute((3, 2, 0, 1)))


def _dense_general_candidates(
    s_shape: tuple[int, ...], t_shape: tuple[int, ...]
) -> list[tuple[Op, ...]]:
    """Reshape to 2-D at some split, transpose, reshape: DenseGeneral <-> Linear kernels."""
    from weightbridge.ops import Reshape

    out: list[tuple[Op, ...]] = []
    for k in range(1, len(s_shape)):
        two_d = (math.prod(s_shape[:k]), math.prod(s_shape[k:]))
        ops: tuple[Op, ...] = (
            (Permute((1, 0)),) if two_d == s_shape else (Reshape(two_d), Permute((1, 0)))
        )
        flipped = (two_d[1], two_d[0])
        if flipped == t_shape:
            out.append(ops)
            continue
        for j in range(1, len(t_shape)):
            if (math.prod(t_shape[:j]), math.prod(t_shape[j:])) == flipped:
                out.append((*ops, Reshape(t_shape)))
                break
    return out


def _flatten_order_ops(shape: tuple[int, ...], channels: int, src_out_in: bool) -> tuple[Op, ...]:
    """The first dense layer after a conv stack: NCHW flatten order <-> NHWC flatten order."""
    from weightbridge.ops import Reshape

    if src_out_in:  # torch [out, C*HW] -> flax [HW*C, out]
        out, fan_in = shape
        hw = fan_in // channels
        return (
            Reshape((out, channels, hw)),
            Permute((0, 2, 1)),
            Reshape((out, hw * channels)),
            Permute((1, 0)),
        )
    fan_in, out = shape  # flax [HW*C, out] -> torch [out, C*HW]
    hw = fan_in // channels
    return (Reshape((hw, channels, out)), Permute((2, 1, 0)), Reshape((out, channels * hw)))
