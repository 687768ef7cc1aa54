"""Ops: the steps that turn source tensor(s) into one target tensor.

Each op knows its output shape and dtype from input shapes alone (planning is metadata-only)
and applies itself to numpy arrays. Structural ops (permute, reshape, slice) return *views*
where numpy can, so the streaming converter copies each element once, tile by tile, straight
from the memory-mapped source into the output buffer. Concat and stack take several sources,
and dequantize two (a block-scaled weight and its scales); they must come first in a step's
op list. Cast is elementwise, so the converter applies it per tile at the end, whatever its
position.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from weightbridge import _blockscale, dtypes
from weightbridge.errors import PlanError

Shape = tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Permute:
    """Reorder axes: output axis i is input axis ``axes[i]`` (as ``numpy.transpose``)."""

    axes: tuple[int, ...]
    kind: ClassVar[str] = "permute"

    def out_shape(self, shapes: Sequence[Shape]) -> Shape:
        (shape,) = shapes
        if self.axes == (1, 0) and len(shape) == 2:  # a 2-D transpose, the common case
            return (shape[1], shape[0])
        if sorted(self.axes) != list(range(len(shape))):
            raise PlanError(f"permute {list(self.axes)} does not fit a tensor of shape {shape}")
        return tuple([shape[a] for a in self.axes])

    def apply(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        return arrays[0].transpose(self.axes)

    def to_json(self) -> dict[str, Any]:
        return {"op": self.kind, "axes": list(self.axes)}


@dataclass(frozen=True, slots=True)
class Reshape:
    """Reinterpret the elements (C order) with a new shape of the same size."""

    shape: tuple[int, ...]
    kind: ClassVar[str] = "reshape"

    def out_shape(self, shapes: Sequence[Shape]) -> Shape:
        (shape,) = shapes
        if math.prod(shape) != math.prod(self.shape):
            raise PlanError(
                f"reshape to {self.shape} ({math.prod(self.shape)} elements) does not fit a tensor "
                f"of shape {shape} ({math.prod(shape)} elements)"
            )
        return self.shape

    def apply(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        return arrays[0].reshape(self.shape)

    def to_json(self) -> dict[str, Any]:
        return {"op": self.kind, "shape": list(self.shape)}


@dataclass(frozen=True, slots=True)
class Slice:
    """Keep ``[start, stop)`` along one axis (a split of a fused tensor is one slice per part)."""

    axis: int
    start: int
    stop: int
    kind: ClassVar[str] = "slice"

    def out_shape(self, shapes: Sequence[Shape]) -> Shape:
        (shape,) = shapes
        if not -len(shape) <= self.axis < len(shape):
            raise PlanError(f"slice axis {self.axis} does not exist in shape {shape}")
        ax = self.axis % len(shape)
        if not 0 <= self.start <= self.stop <= shape[ax]:
            raise PlanError(
                f"slice [{self.start}:{self.stop}] on axis {ax} is outside shape {shape}"
            )
        return shape[:ax] + (self.stop - self.start,) + shape[ax + 1 :]

    def apply(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        a = arrays[0]
        index = [slice(None)] * a.ndim
        index[self.axis] = slice(self.start, self.stop)
        return a[tuple(index)]

    def to_json(self) -> dict[str, Any]:
        return {"op": self.kind, "axis": self.axis, "start": self.start, "stop": self.stop}


@dataclass(frozen=True, slots=True)
class Concat:
    """Join all sources along an existing axis (q, k, v -> fused qkv)."""

    axis: int
    kind: ClassVar[str] = "concat"
    multi: ClassVar[bool] = True

    def out_shape(self, shapes: Sequence[Shape]) -> Shape:
        first = shapes[0]
        if not -len(first) <= self.axis < len(first):
            raise PlanError(f"concat axis {self.axis} does not exist in shape {first}")
        ax = self.axis % len(first)
        for s in shapes[1:]:
            if len(s) != len(first) or s[:ax] + s[ax + 1 :] != first[:ax] + first[ax + 1 :]:
                raise PlanError(f"concat on axis {ax}: shapes {list(shapes)} differ off that axis")
        return first[:ax] + (sum(s[ax] for s in shapes),) + first[ax + 1 :]

    def apply(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate(arrays, axis=self.axis)

    def to_json(self) -> dict[str, Any]:
        return {"op": self.kind, "axis": self.axis}


@dataclass(frozen=True, slots=True)
class Stack:
    """Stack all sources along a new axis (per-expert weights -> one [experts, ...] tensor)."""

    axis: int
    kind: ClassVar[str] = "stack"
    multi: ClassVar[bool] = True

    def out_shape(self, shapes: Sequence[Shape]) -> Shape:
        first = shapes[0]
        if any(s != first for s in shapes):
            raise PlanError(f"stack needs equal shapes, found {list(shapes)}")
        ax = self.axis % (len(first) + 1)
        return first[:ax] + (len(shapes),) + first[ax:]

    def apply(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        return np.stack(arrays, axis=self.axis)

    def to_json(self) -> dict[str, Any]:
        return {"op": self.kind, "axis": self.axis}


@dataclass(frozen=True, slots=True)
class Cast:
    """Convert elements to another dtype (rounding as numpy / ml_dtypes do)."""

    dtype: str
    kind: ClassVar[str] = "cast"

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", dtypes.canonical(self.dtype))

    def out_shape(self, shapes: Sequence[Shape]) -> Shape:
        return shapes[0]

    def apply(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        return arrays[0].astype(dtypes.to_numpy(self.dtype))

    def to_json(self) -> dict[str, Any]:
        return {"op": self.kind, "dtype": self.dtype}


@dataclass(frozen=True, slots=True)
class Dequantize:
    """Block-scaled FP8 to float32: sources (weight, scale), one scale per `block` tile of the
    2-D weight, ``float32(w) * scale`` (DeepSeek-V3's ``weight_scale_inv``; `_blockscale`)."""

    block: tuple[int, int] = _blockscale.DEFAULT_BLOCK
    kind: ClassVar[str] = "dequantize"
    multi: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if len(self.block) != 2 or min(self.block) < 1:
            raise PlanError(f"dequantize block must be two positive sizes, found {self.block}")

    def out_shape(self, shapes: Sequence[Shape]) -> Shape:
        if len(shapes) != 2:
            raise PlanError(
                f"dequantize takes two sources (weight, scale), found {len(shapes)}; it must be "
                "the first op"
            )
        weight, scale = shapes
        if len(weight) != 2:
            raise PlanError(f"dequantize needs a 2-D weight, found shape {weight}")
        want = _blockscale.scale_shape(weight, self.block)
        if tuple(scale) != want:
            raise PlanError(
                f"dequantize: a weight of shape {weight} in {self.block[0]}x{self.block[1]} "
                f"blocks needs a scale of shape {want}, found {scale}"
            )
        return weight

    def apply(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        return _blockscale.dequantize(arrays[0], arrays[1], self.block)

    def to_json(self) -> dict[str, Any]:
        return {"op": self.kind, "block": list(self.block)}


Op = Permute | Reshape | Slice | Concat | Stack | Cast | Dequantize
MULTI_SOURCE = (Concat, Stack, Dequantize)


def op_from_json(obj: Any, *, where: str = "plan") -> Op:
    """Parse one op from its JSON form, with errors that name `where`."""
    if not isinstance(obj, dict) or "op" not in obj:
        raise PlanError(f"{where}: an op must be an object with an 'op' key, found {obj!r}")
    kind = obj["op"]
    try:
        if kind == "permute":
            return Permute(tuple(int(a) for a in obj["axes"]))
        if kind == "reshape":
            return Reshape(tuple(int(d) for d in obj["shape"]))
        if kind == "slice":
            return Slice(int(obj["axis"]), int(obj["start"]), int(obj["stop"]))
        if kind == "concat":
            return Concat(int(obj["axis"]))
        if kind == "stack":
            return Stack(int(obj["axis"]))
        if kind == "cast":
            return Cast(str(obj["dtype"]))
        if kind == "dequantize":
            block = obj.get("block", list(_blockscale.DEFAULT_BLOCK))
            if not isinstance(block, list) or len(block) != 2:
                raise ValueError(f"block must be a list of two sizes, found {block!r}")
            return Dequantize((int(block[0]), int(block[1])))
    except (KeyError, TypeError, ValueError) as e:
        raise PlanError(f"{where}: op {obj!r} is missing or has a bad field ({e})") from e
    raise PlanError(
        f"{where}: unknown op {kind!r}; known ops: permute, reshape, slice, concat, stack, cast, "
        "dequantize"
    )


def infer(
    ops: Sequence[Op], shapes: Sequence[Shape], dtype: str, *, where: str = "step"
) -> tuple[Shape, str]:
    """The (shape, dtype) a list of ops produces from sources of the given shapes.

    >>> infer([Permute((1, 0)), Cast("bf16")], [(2, 3)], "F32")
    ((3, 2), 'BF16')
    """
    if len(shapes) > 1 and not (ops and isinstance(ops[0], MULTI_SOURCE)):
        raise PlanError(
            f"{where}: {len(shapes)} sources need a concat or stack (or a dequantize) as the "
            "first op"
        )
    current = list(shapes)
    try:
        for op in ops:
            current = [op.out_shape(current)]
            if isinstance(op, Cast):
                dtype = op.dtype
            elif isinstance(op, Dequantize):
                dtype = "F32"
    except PlanError as e:
        raise PlanError(f"{where}: {e}") from e
    return current[0], dtype


def describe(ops: Sequence[Op]) -> str:
    """A short human form of an op list, for plan tables.

    >>> describe([Permute((1, 0)), Reshape((6,))])
    'permute(1,0) reshape(6)'
    """
    parts = []
    for op in ops:
        fields = [",".join(map(str, v)) if isinstance(v, list) else str(v) for v in _values(op)]
        parts.append(f"{op.kind}({' '.join(fields)})")
    return " ".join(parts)


def _values(op: Op) -> list[Any]:
    return [v for k, v in op.to_json().items() if k != "op"]
