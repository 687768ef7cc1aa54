"""Block-scaled FP8 weights (DeepSeek-V3/R1 style), dequantized on numpy arrays a few rows at a time.

A 2-D ``weight`` in float8 comes with ``weight_scale_inv``, a matrix of one scale per `block`
(128x128) tile of the weight; element ``(i, j)`` is ``float32(weight[i, j]) * scale[i // 128,
j // 128]`` (DeepSeek's reference formula, their ``weight_dequant`` kernel), and the last block of
a row or a column is partial when the shape is not a multiple of the block. The scale is called
"inverse" because the quantizer divided by it; dequantizing multiplies.

Both phases use this module: the ``dequantize`` op applies it to whole arrays, the streaming
converter to tiles (`BlockScaledView`), so that a few rows of float32 are all it holds beyond
the output tile. It imports nothing else of the package.
"""

from __future__ import annotations

import functools

import numpy as np

# DeepSeek-V3's ``quantization_config.weight_block_size``.
DEFAULT_BLOCK = (128, 128)

# Rows are dequantized this many float32 bytes at a time, so the float32 temporaries stay in
# the CPU cache between the lookup, the multiply and the rounding copy. Measured on the 2-core
# test machine (4096x16384 fp8 -> bf16, one thread): whole 128-row block-rows 0.2-0.3 GB/s of
# fp8 in, 256 KB chunks 0.4-0.6 GB/s; smaller chunks lose to per-call overhead.
CHUNK_BYTES = 256 << 10


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """The shape of the scale matrix of a 2-D weight of `shape` in `block` tiles.

    >>> scale_shape((300, 128), (128, 128))
    (3, 1)
    """
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


@functools.cache
def _pair_table(dtype: np.dtype[np.generic]) -> np.ndarray:
    """float32 values of every pair of adjacent 1-byte elements, indexed by the pair read as one
    uint16 (in this machine's byte order, as the lookup reads them).

    Looking up two elements at once runs at about 1.2 GB/s on the 2-core test machine, against
    0.55 GB/s for one at a time and 0.16 GB/s for ml_dtypes' own element-wise cast, and is
    exact: every value comes from that cast. The table is 512 KB.
    """
    pairs = np.arange(1 << 16, dtype=np.uint16).view(np.uint8).view(dtype)
    return pairs.astype(np.float32).view(np.uint64)


def to_float32(a: np.ndarray) -> np.ndarray:
    """A new float32 array of the values of `a` (1-byte floats through a lookup table)."""
    if a.dtype.itemsize != 1 or a.dtype.kind != "V":
        # ml_dtypes' float8 types have kind "V"; anything else converts as numpy does.
        return a.astype(np.float32)
    flat = np.ascontiguousarray(a).reshape(-1)
    out = np.empty(flat.size, np.float32)
    pairs = flat.size // 2
    if pairs:
        # mode="clip": every uint16 is a valid index, and the default mode buffers `out`.
        codes = flat[: 2 * pairs].view(np.uint16)
        np.take(_pair_table(a.dtype), codes, out=out[: 2 * pairs].view(np.uint64), mode="clip")
    if flat.size % 2:
        out[-1] = flat[-1:].astype(np.float32)[0]
    return out.reshape(a.shape)


def dequantize_rows(
    weight: np.ndarray,
    scale: np.ndarray,
    block: tuple[int, int],
    start: int,
    stop: int,
    out: np.ndarray,
) -> None:
    """Write rows ``start:stop`` of the dequantized `weight` into `out` (cast to its dtype).

    A few rows at a time (`CHUNK_BYTES` of float32, inside one block-row) are converted to
    float32, multiplied by their block-row's scales, and copied into `out`; the float32 result
    is rounded once, to `out`'s dtype, as ``(float32(w) * s).astype(dtype)`` would.

    >>> w = np.array([[1.0, 2.0, 3.0]], np.float32)
    >>> out = np.empty((1, 3), np.float32)
    >>> dequantize_rows(w, np.array([[10.0, 100.0]], np.float32), (1, 2), 0, 1, out)
    >>> out
    array([[ 10.,  20., 300.]], dtype=float32)
    """
    rows_per_block, cols_per_block = block
    cols = weight.shape[1]
    rows_per_chunk = max(1, CHUNK_BYTES // (4 * max(1, cols)))
    row = start
    while row < stop:
        block_end = min(stop, (row // rows_per_block + 1) * rows_per_block)
        scales = np.repeat(scale[row // rows_per_block].astype(np.float32), cols_per_block)
        scales = scales[:cols]
        while row < block_end:
            end = min(block_end, row + rows_per_chunk)
            values = to_float32(weight[row:end])
            values *= scales
            np.copyto(out[row - start : end - start], values, casting="unsafe")
            row = end


def dequantize(
    weight: np.ndarray,
    scale: np.ndarray,
    block: tuple[int, int] = DEFAULT_BLOCK,
    dtype: np.dtype[np.generic] | type = np.float32,
) -> np.ndarray:
    """The whole dequantized weight, as a new array of `dtype` (float32 by default).

    >>> w = np.ones((3, 2), np.float32)
    >>> dequantize(w, np.array([[2.0], [3.0]], np.float32), (2, 2))[:, 0]
    array([2., 2., 3.], dtype=float32)
    """
    out = np.empty(weight.shape, dtype=dtype)
    dequantize_rows(weight, scale, block, 0, weight.shape[0], out)
    return out


class BlockScaledView:
    """Rows ``start:stop`` of a dequantized weight, computed only when copied out (`copy_to`).

    It has what the streaming converter's tiling asks of a source view (shape, dtype, slicing
    rows), so a dequantized tensor streams tile by tile like any mapped tensor, and each
    transform worker dequantizes its own tile.
    """

    __slots__ = ("block", "scale", "start", "stop", "weight")
    dtype = np.dtype(np.float32)
    ndim = 2

    def __init__(
        self,
        weight: np.ndarray,
        scale: np.ndarray,
        block: tuple[int, int],
        start: int = 0,
        stop: int | None = None,
    ) -> None:
        self.weight, self.scale, self.block = weight, scale, block
        self.start = start
        self.stop = weight.shape[0] if stop is None else stop

    @property
    def shape(self) -> tuple[int, int]:
        return (self.stop - self.start, self.weight.shape[1])

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    def __getitem__(self, rows: slice) -> BlockScaledView:
        first, last, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError("a block-scaled view is sliced by consecutive rows only")
        last = max(first, last)
        return BlockScaledView(
            self.weight, self.scale, self.block, self.start + first, self.start + last
        )

    def copy_to(self, out: np.ndarray) -> None:
        """Dequantize these rows into `out` (of this view's shape, any float dtype)."""
        dequantize_rows(self.weight, self.scale, self.block, self.start, self.stop, out)

    def materialize(self, dtype: np.dtype[np.generic] | type = np.float32) -> np.ndarray:
        """These rows as a new array of `dtype`."""
        out = np.empty(self.shape, dtype=dtype)
        self.copy_to(out)
        return out

    def reshape(self, shape: tuple[int, ...]) -> np.ndarray:
        """The rows materialised as float32, reshaped (the converter tiles this view unshaped)."""
        return self.materialize().reshape(shape)
