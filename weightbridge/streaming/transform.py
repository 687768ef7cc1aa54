"""Apply a step's ops to memory-mapped sources, producing the target tensor tile by tile.

Structural ops are applied as numpy views, so nothing is copied until a tile of the output is
filled; each element is then copied exactly once, from the mapped source straight into a tile
buffer, in blocks that keep both the reads and the writes inside the CPU cache. A tile is a run
of whole rows along axis 0, so every writer can append it or store it at a row offset.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from weightbridge import dtypes
from weightbridge._blockscale import BlockScaledView
from weightbridge.ops import Cast, Dequantize, Op, Permute, Reshape
from weightbridge.spec import TensorSpec

_transpose: Any
try:  # the compiled kernel (setup.py); absent where no C compiler was found at install
    from weightbridge import _transpose
except ImportError:  # pragma: no cover - WEIGHTBRIDGE_NO_KERNEL tests the numpy path
    _transpose = None

# A tile of this many bytes keeps the tiles in flight (transform window + writer queue, about
# eight) well under the 256 MB memory budget, splits a typical 30-100 MB weight into several
# tiles so both cores transform at once, and keeps each write() large enough that syscall
# overhead disappears against the disk's bandwidth.
TILE_BYTES = 16 << 20

# Without the compiled kernel (_transpose.c, 2-3x faster), the blocks a transposing copy moves
# at a time: BLOCK_LONG elements along the source's contiguous axis by BLOCK_SHORT along the
# output's last axis. Tall and narrow beats square: each block
# reads 16 short runs of the source and writes 1024 runs of 16 elements, which keeps both the
# cache lines and the TLB entries it touches few. Measured on the 2-core test machine
# (5632x2048, same-dtype copy on integer views): 128x128 0.3-0.9 GB/s, 1024x16 1.25 GB/s for
# 2-byte and 1.9 GB/s for 4-byte elements; numpy's naive strided copy 0.2-0.4 GB/s.
BLOCK_LONG = 1024
BLOCK_SHORT = 16
# Casting copies (bf16 -> f32 ...) spend their time converting, not moving; square blocks.
BLOCK = 128

# Same-width unsigned views: a copy that does not cast moves bits, and numpy's integer copy
# loops are several times faster than ml_dtypes' per-element bf16/fp8 loops.
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


# What a step's tiles are cut from: a (mapped) array or view, or a block-scaled weight that is
# dequantized tile by tile as the tiles are copied out (`blocked_copy`).
Rows = np.ndarray | BlockScaledView


def source_view(arrays: Sequence[np.ndarray], ops: Sequence[Op]) -> Rows:
    """Apply the structural ops (everything but casts) to the source arrays, as views if possible.

    A leading dequantize stays lazy when only casts follow it; before other structural ops, the
    tensor is dequantized once, in the step's final dtype, a block-row at a time.
    """
    current: list[np.ndarray] = list(arrays)
    if ops and isinstance(ops[0], Dequantize):
        lazy = BlockScaledView(arrays[0], arrays[1], ops[0].block)
        if lazy_dequantize(ops):
            return lazy
        ops = ops[1:]
        casts = [op.dtype for op in ops if isinstance(op, Cast)]
        current = [lazy.materialize(dtypes.to_numpy(casts[-1]) if casts else np.float32)]
    for op in ops:
        if isinstance(op, Cast):
            continue  # elementwise: applied per tile by `tiles`
        if isinstance(op, Reshape):  # noqa: SIM108 - the isinstance narrows op for mypy
            current = [_reshape(current[0], op.shape)]
        else:
            current = [op.apply(current)]
    return current[0]


def lazy_dequantize(ops: Sequence[Op]) -> bool:
    """Whether these ops dequantize a block-scaled weight tile by tile: a dequantize followed by
    casts only (other structural ops need the dequantized tensor whole, see `source_view`)."""
    return (
        bool(ops) and isinstance(ops[0], Dequantize) and all(isinstance(op, Cast) for op in ops[1:])
    )


def may_copy(ops: Sequence[Op], sources: int) -> bool:
    """Whether `source_view` may copy the sources into a new array (not a view): concat or
    stack of several sources, a reshape after a permute, a dequantize other ops follow."""
    if sources > 1 and not lazy_dequantize(ops):
        return True
    permuted = False
    for op in ops:
        if isinstance(op, Dequantize) and not lazy_dequantize(ops):
            return True
        permuted = permuted or isinstance(op, Permute)
        if permuted and isinstance(op, Reshape):
            return True
    return False


def _reshape(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    try:
        return a.reshape(shape, copy=False)
    except ValueError:
        # Merging axes of a permuted view cannot be a view; materialise once (bounded by this
        # one tensor), with the cache-friendly copy, then reshape the contiguous result.
        out = np.empty(a.shape, dtype=a.dtype)
        blocked_copy(out, a)
        return out.reshape(shape)
    except TypeError:  # numpy < 2.1 has no copy= on reshape
        return a.reshape(shape)


def blocked_copy(dst: np.ndarray, src: Rows) -> None:
    """Copy `src` into C-contiguous `dst` (casting if dtypes differ), in cache-sized blocks.

    numpy's own strided copy walks the destination in order and so jumps through the source
    by a whole row per element when `src` is a transposed view; here the source axis that is
    contiguous in memory and the destination's last axis are walked in square blocks instead.
    A block-scaled view is dequantized into `dst` here.
    """
    if isinstance(src, BlockScaledView):
        src.copy_to(dst)
        return
    if src.ndim < 2 or src.size == 0:
        np.copyto(dst, src, casting="unsafe")
        return
    strides = [abs(s) if n > 1 else math.inf for s, n in zip(src.strides, src.shape, strict=True)]
    inner = int(np.argmin(strides))
    last = src.ndim - 1
    if inner == last or (src.shape[inner] <= BLOCK and src.shape[last] <= BLOCK):
        np.copyto(dst, src, casting="unsafe")
        return
    if src.dtype == dst.dtype and _kernel_copy(dst, src, inner, last):
        return
    long_side, short_side = BLOCK, BLOCK
    if src.dtype == dst.dtype and src.dtype.itemsize in _UINT:
        bits = _UINT[src.dtype.itemsize]
        src, dst = src.view(bits), dst.view(bits)
        long_side, short_side = BLOCK_LONG, BLOCK_SHORT
    index: list[slice] = [slice(None)] * src.ndim
    for i in range(0, src.shape[inner], long_side):
        index[inner] = slice(i, i + long_side)
        for j in range(0, src.shape[last], short_side):
            index[last] = slice(j, j + short_side)
            key = tuple(index)
            np.copyto(dst[key], src[key], casting="unsafe")


def kernel_available() -> bool:
    """Whether transposes run in the compiled kernel (else numpy's blocked copy)."""
    return _transpose is not None and not os.environ.get("WEIGHTBRIDGE_NO_KERNEL")


def _kernel_copy(dst: np.ndarray, src: np.ndarray, inner: int, last: int) -> bool:
    """Transpose `src` into `dst` plane by plane in the C kernel; False if it does not apply.

    A plane spans `inner` (contiguous in the source) and `last` (contiguous in `dst`); the
    other axes are looped over here. The kernel gets raw addresses, so everything it relies on
    is checked first: same item size, a writable C-contiguous `dst` of the same shape, and a
    source whose `inner` stride is exactly one item.
    """
    item = src.dtype.itemsize
    if (
        not kernel_available()
        or dst.shape != src.shape
        or not dst.flags.c_contiguous
        or not dst.flags.writeable
        or dst.dtype.itemsize != item
        or src.strides[inner] != item
    ):
        return False
    rows, cols = src.shape[inner], src.shape[last]
    dst_row, src_col = dst.strides[inner], src.strides[last]
    dst_base = dst.__array_interface__["data"][0]
    src_base = src.__array_interface__["data"][0]
    outer = [a for a in range(src.ndim) if a not in (inner, last)]
    for index in np.ndindex(*(src.shape[a] for a in outer)):
        d = dst_base + sum(i * dst.strides[a] for i, a in zip(index, outer, strict=True))
        s = src_base + sum(i * src.strides[a] for i, a in zip(index, outer, strict=True))
        _transpose.transpose(d, s, rows, cols, dst_row, src_col, item)
    return True


def tiles(
    view: Rows, target: TensorSpec, tile_bytes: int = TILE_BYTES
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (first row, C-contiguous tile in the target dtype) covering `view` along axis 0."""
    out_dtype = dtypes.to_numpy(target.dtype)
    if view.ndim == 0 or view.size == 0:
        if isinstance(view, BlockScaledView):
            view = view.materialize()
        yield 0, np.ascontiguousarray(view.astype(out_dtype, copy=False))
        return
    row_bytes = max(1, (view.size // view.shape[0]) * max(out_dtype.itemsize, view.dtype.itemsize))
    rows = max(1, tile_bytes // row_bytes)
    for r0 in range(0, view.shape[0], rows):
        part = view[r0 : r0 + rows]
        buf = np.empty(part.shape, dtype=out_dtype)
        blocked_copy(buf, part)
        yield r0, buf


def compute(arrays: Sequence[np.ndarray], ops: Sequence[Op], target: TensorSpec) -> np.ndarray:
    """The whole target tensor in memory (for `verify` and small in-memory conversions)."""
    view = source_view(arrays, ops)
    out = np.empty(target.shape, dtype=dtypes.to_numpy(target.dtype))
    if out.size:
        blocked_copy(out, view.reshape(target.shape) if view.shape != target.shape else view)
    return out
