"""Framework layouts: how each framework names parameters and orders their axes.

What the matcher asks of one parameter: its role (matrix, scale, bias, mean, var), whether it
is an embedding table, the axis permutation between the [out, in, *k] and [*k, in, out]
families, and the ops that turn a source tensor into the shape a target demands. The answer
uses what the parameter *is* (its name, its rank, and the target's shape), not rank alone: an
embedding and a dense kernel are both 2-D, and only the dense kernel is transposed.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from typing import Protocol

from weightbridge.errors import PlanError
from weightbridge.ops import Op, Permute, Reshape

FRAMEWORKS: tuple[str, ...] = ("pytorch", "flax", "haiku", "tensorflow", "keras", "numpy")
_ALIASES = {"torch": "pytorch", "pt": "pytorch", "tf": "tensorflow", "jax": "flax", "np": "numpy"}

# Families: torch stores Linear [out, in] and conv [O, I, *k]; the others store Dense [in, out]
# and conv [*k, I, O].
_OUT_IN = {"pytorch"}

# Names that mark a 2-D parameter as an embedding table (never transposed).
_EMBEDDING = re.compile(
    r"(embed|embedding|wte|wpe|token_type|position_ids|lookup|vocab)", re.IGNORECASE
)


def canonical_framework(name: str | None) -> str | None:
    """Normalise a framework name (``torch`` -> ``pytorch``); None stays None."""
    if name is None:
        return None
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in FRAMEWORKS:
        raise PlanError(f"unknown framework {name!r}; choose one of {', '.join(FRAMEWORKS)}")
    return key


class TensorSpecLike(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...


def _shape_after(shape: tuple[int, ...], ops: tuple[Op, ...]) -> tuple[int, ...]:
    for op in ops:
        shape = op.out_shape([shape])
    return shape


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
    leaf: str,
    shape: tuple[int, ...],
    siblings: Mapping[str, tuple[int, ...]],
    family: str,
    path: str,
) -> str:
    """What a parameter is: matrix, scale, bias, mean, var, or param (anything else).

    `siblings` maps the leaf names of the tensors in its module to their shapes (Keras 3's
    numbered ``vars/<i>`` are told apart by them).

    >>> leaf_role("weight", (8,), {"weight": (8,), "bias": (8,)}, "pytorch", "bn.weight")
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
    if leaf in _SCALE_LEAVES and (rank == 1 or _one_axis(shape)):
        return "scale"  # (1, 1, 1, C) too: ConvNeXt-V2's GRN gamma is timm's (C,) weight
    if leaf in _BIAS_LEAVES and rank >= 1:
        return "bias"  # rank 2 for DenseGeneral biases [heads, dim]
    return "param"


def _one_axis(shape: tuple[int, ...]) -> bool:
    return sum(d != 1 for d in shape) == 1


def _keras3_role(index: int, rank: int, siblings: Mapping[str, tuple[int, ...]]) -> str:
    """Role of Keras 3's ``layers/<layer>/vars/<i>``: the layer's variables in build order.

    Dense/Conv: kernel, bias. BatchNormalization: gamma, beta, moving_mean, moving_variance.
    LayerNormalization: gamma, beta. Embedding: embeddings.
    """
    if rank >= 2:
        return "matrix"
    shapes = [shape for k, shape in sorted(siblings.items()) if k.isdigit()]
    has_matrix = any(len(s) >= 2 for s in shapes)
    if has_matrix:
        return "bias"
    if len(shapes) == 4:
        return ("scale", "bias", "mean", "var")[index] if index < 4 else "param"
    if len(shapes) == 2:
        return ("scale", "bias")[index]
    return "param"


def is_embedding(name: str) -> bool:
    """True for an embedding table (never transposed), judged by its own module's name: a
    ``word_embeddings`` or ``wte`` table, or an ``embedding`` leaf; not ELECTRA's
    ``embeddings_project`` or ALBERT's ``embedding_hidden_mapping_in``, which are projections.

    >>> is_embedding("bert.embeddings.word_embeddings.weight"), is_embedding("embeddings.LayerNorm.weight")
    (True, False)
    >>> is_embedding("electra.embeddings_project.weight"), is_embedding("params/embed/embedding")
    (False, True)
    """
    # str.split: ~3x faster than re.split (the matcher asks for every tensor)
    parts = name.replace(":0", "").replace("/", ".").split(".")
    if "" in parts:
        parts = [p for p in parts if p]
    if not parts:
        return False
    if parts[-1].lower() in ("embedding", "embeddings", "embeddings_0"):
        return True
    if len(parts) > 2 and parts[-2] == "vars":  # Keras 3: layers/<layer>/vars/<i>
        parts = parts[:-2] + [parts[-1]]
    return _embedding_module(parts[-2] if len(parts) > 1 else parts[-1])


@functools.lru_cache(maxsize=1 << 12)
def _embedding_module(module: str) -> bool:
    """Cached: module names repeat in every layer, and the matcher asks for every tensor."""
    return bool(_EMBEDDING.search(module)) and not _PROJECTION.search(module)


# Module names that say "a projection", even when they also say "embedding".
_PROJECTION = re.compile(r"(proj|mapping|dense|linear|fc|head|norm)", re.IGNORECASE)


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
    transpose2d: bool | None = None,
    flatten_channels: int | None = None,
    embedding: bool | None = None,
) -> tuple[Op, ...] | None:
    """Ops that turn `src` into `tgt`'s shape by a named layout rule, or None if no rule does.

    The rules form a closed set; "some reshape makes the shapes fit" is never one of them:
    - a 2-D kernel is transposed exactly when `transpose2d` says so (a property of the whole
      checkpoint, decided by the matcher; by default, when the families differ);
    - a conv kernel of rank >= 3 is permuted between ``[O, I, *k]`` and ``[*k, I, O]``;
    - a depthwise kernel: Keras ``(h, w, C, M)`` <-> torch ``(C*M, 1, h, w)`` <-> Flax
      ``(h, w, 1, C*M)``;
    - a DenseGeneral kernel (``[in, heads, dim]``, ``[heads, dim, out]``) is a 2-D kernel with
      adjacent axes split or merged;
    - the dense layer after a flatten regroups its input axis (only with `flatten_channels`);
    - size-1 axes may be added or dropped (``(1, 1, 1, C)`` vs ``(C,)``);
    - a tensor with no layout (bias, norm scale, statistics, unknown parameter) may have
      adjacent axes split or merged (``(8, 8)`` vs ``(64,)``); an embedding table may not be
      transposed.

    >>> from weightbridge.spec import TensorSpec
    >>> fit_ops(TensorSpec("q.weight", (8, 4), "F32"), TensorSpec("q/kernel", (4, 2, 4), "F32"),
    ...         "matrix", "pytorch", "flax")
    (Permute(axes=(1, 0)), Reshape(shape=(4, 2, 4)))
    >>> fit_ops(TensorSpec("w", (2, 3), "F32"), TensorSpec("w", (3, 2), "F32"),
    ...         "matrix", "pytorch", "pytorch") is None  # never a reshape standing in for .T
    True
    """
    s_shape, t_shape = tuple(src.shape), tuple(tgt.shape)
    if math.prod(s_shape) != math.prod(t_shape):
        return None
    if transpose2d is None:
        transpose2d = (src_family in _OUT_IN) != (dst_family in _OUT_IN)
    if embedding is None:  # the caller may know it already (`is_embedding` of either name)
        embedding = is_embedding(src.name) or is_embedding(tgt.name)
    if role != "matrix" or (
        embedding and len(_squeezed(s_shape)) <= 2 and len(_squeezed(t_shape)) <= 2
    ):
        if s_shape == t_shape:
            return ()
        if role == "matrix":  # an embedding table: only size-1 axes may change
            return (Reshape(t_shape),) if _squeezed(s_shape) == _squeezed(t_shape) else None
        return (Reshape(t_shape),) if is_regroup(s_shape, t_shape) else None
    for ops in _matrix_rules(
        s_shape, t_shape, src_family, dst_family, transpose2d, flatten_channels
    ):
        if _shape_after(s_shape, ops) == t_shape:
            return ops
    return None


def _matrix_rules(
    s: tuple[int, ...],
    t: tuple[int, ...],
    src_family: str,
    dst_family: str,
    transpose2d: bool,
    flatten_channels: int | None,
) -> list[tuple[Op, ...]]:
    """Candidate ops for a kernel, each from one named rule, most specific first."""
    t2d: tuple[Op, ...] = (Permute((1, 0)),) if transpose2d else ()
    if flatten_channels and len(s) == 2 and len(t) == 2:
        return [_flatten_order_ops(s, flatten_channels, src_family in _OUT_IN)]
    out: list[tuple[Op, ...]] = []
    if len(s) == len(t) == 2:
        out.append(t2d)
    if len(s) >= 3 and len(t) >= 3:
        depthwise = _depthwise(s, t, src_family, dst_family)
        if depthwise is not None:
            out.append(depthwise)
        perm = layout_permutation(len(s), src_family, dst_family)
        out.append(perm)
        if len(s) == len(t):
            return out
    # 1x1 convs as dense kernels (and back): the conv rule on the conv side, size-1 axes dropped.
    if len(s) >= 3 and _squeezed(s) != s:
        perm = layout_permutation(len(s), src_family, dst_family)
        after = _shape_after(s, perm)
        if _squeezed(after) == _squeezed(t):
            out.append((*perm, Reshape(t)))
    if len(s) == 2 and len(t) >= 3 and _squeezed(_shape_after(s, t2d)) == _squeezed(t):
        out.append((*t2d, Reshape(t)))
    # torch only: a Linear over a flattened NCHW map is a conv whose kernel covers the map
    # (timm's VGG pre_logits): flatten order c*H*W + h*W + w is the kernel's (C, H, W) order.
    if src_family in _OUT_IN and dst_family in _OUT_IN and not transpose2d:
        if len(s) == 2 and len(t) == 4 and s[0] == t[0] and math.prod(t[1:]) == s[1]:
            out.append((Reshape(t),))
        if len(s) == 4 and len(t) == 2 and s[0] == t[0] and math.prod(s[1:]) == t[1]:
            out.append((Reshape(t),))
    out += _dense_general(s, t, transpose2d)
    return out


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def is_regroup(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """True if one shape is the other with adjacent axes merged (size-1 axes ignored).

    >>> is_regroup((8, 8), (64,)), is_regroup((1, 8, 8), (8, 8)), is_regroup((2, 6), (3, 4))
    (True, True, False)
    """
    a, b = _squeezed(a), _squeezed(b)
    if len(a) < len(b):
        a, b = b, a
    i = 0
    for d in b:
        prod = 1
        while prod < d and i < len(a):
            prod *= a[i]
            i += 1
        if prod != d:
            return False
    return i == len(a)


def _depthwise(
    s: tuple[int, ...], t: tuple[int, ...], src_family: str, dst_family: str
) -> tuple[Op, ...] | None:
    """Depthwise kernels: Keras ``(h, w, C, M)``, Flax ``(h, w, 1, C*M)``, torch ``(C*M, 1, h, w)``.

    Output channel ``c*M + m`` everywhere: merging C and M (Flax's layout) keeps that order,
    permuting first would interleave them the other way.
    """
    if len(s) != 4 or len(t) != 4:
        return None
    src_torch, dst_torch = src_family in _OUT_IN, dst_family in _OUT_IN
    if not src_torch and dst_torch:
        h, w, c, m = s
        if t == (c * m, 1, h, w) and (c, m) != (1, c * m):
            return (Reshape((h, w, 1, c * m)), Permute((3, 2, 0, 1)))
    if src_torch and not dst_torch:
        cm, one, h, w = s
        if one == 1 and t[:2] == (h, w) and t[2] * t[3] == cm and t[2] != 1:
            return (Permute((2, 3, 1, 0)), Reshape(t))
    same_family = not src_torch and not dst_torch
    if (
        same_family
        and s[:2] == t[:2]
        and s != t
        and ((s[2] == 1 and t[2] * t[3] == s[3]) or (t[2] == 1 and s[2] * s[3] == t[3]))
    ):
        return (Reshape(t),)
    return None


def _dense_general(
    s: tuple[int, ...], t: tuple[int, ...], transpose2d: bool
) -> list[tuple[Op, ...]]:
    """DenseGeneral <-> Linear kernels: merge adjacent axes to 2-D, transpose as the checkpoint
    does, split adjacent axes again. Only where one side is 2-D and the other is not."""
    if sorted((len(s), len(t))) != [2, 3] and not (len(s) == 3 and len(t) == 3 and s != t):
        return []
    out: list[tuple[Op, ...]] = []
    for k in range(1, len(s)):
        two_d = (math.prod(s[:k]), math.prod(s[k:]))
        want = (two_d[1], two_d[0]) if transpose2d else two_d
        for j in range(1, len(t)):
            if (math.prod(t[:j]), math.prod(t[j:])) != want:
                continue
            ops: tuple[Op, ...] = () if two_d == s else (Reshape(two_d),)
            if transpose2d:
                ops = (*ops, Permute((1, 0)))
            if want != t:
                ops = (*ops, Reshape(t))
            out.append(ops)
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
