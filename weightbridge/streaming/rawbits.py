"""Tensors that only move: their bits read as same-width unsigned integers, straight from the file.

A step whose ops only rearrange (permute, reshape, slice, concat, stack) and whose sources
already have the target's dtype never looks at a value: a bf16 weight transposed is the same
16-bit patterns in another order. Such a step's sources are mapped from their files' byte
ranges as `uint16` (`uint8`, `uint32`, ...) arrays, so nothing asks numpy for a bf16 or fp8
dtype, and `ml_dtypes` (which provides them) is never imported: with ml_dtypes 0.7 on numpy 2.4
that import alone costs ~0.9 s of CPU, a third of a 1 GB conversion on the test machine
(`python -X importtime -m weightbridge convert ...`). numpy's integer copy loops are also the
fastest it has.

Only local files with known byte ranges take this path (`Reader.byte_range`); everything else,
and every step that casts or dequantizes, goes through `Reader.read` as before.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from weightbridge import dtypes
from weightbridge.io.base import ByteRange, MappedFile, Reader
from weightbridge.ops import Concat, Permute, Reshape, Slice, Stack
from weightbridge.plan import Step
from weightbridge.spec import CheckpointSpec

_MOVES = (Permute, Reshape, Slice, Concat, Stack)
_UINT: dict[int, Any] = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def bits_dtype(code: str) -> np.dtype[Any] | None:
    """The unsigned integer dtype as wide as `code`'s elements (None: no such width)."""
    width = _UINT.get(dtypes.itemsize(code))
    return None if width is None else np.dtype(width)


class RawSources:
    """Maps the source files of steps that only move bits; one map per file, closed at the end."""

    def __init__(self, reader: Reader, specs: CheckpointSpec) -> None:
        self._reader = reader
        self._specs = specs
        self._files: dict[str, MappedFile] = {}

    def ranges(self, step: Step) -> list[ByteRange] | None:
        """The sources' byte ranges if `step` only moves bits and every source is a local
        file range; else None (read it through the reader)."""
        target = step.target
        if bits_dtype(target.dtype) is None or not all(isinstance(op, _MOVES) for op in step.ops):
            return None
        out = []
        for name in step.sources:
            if self._specs[name].dtype != target.dtype:
                return None
            brange = self._reader.byte_range(name)
            if brange is None or brange.length != self._specs[name].nbytes:
                return None
            out.append(brange)
        return out

    def arrays(self, step: Step, ranges: list[ByteRange]) -> list[np.ndarray]:
        """The sources of `step` (see `ranges`) as unsigned-integer views of the mapped files."""
        dtype = bits_dtype(step.target.dtype)
        assert dtype is not None  # `ranges` checked it
        return [
            self._file(r.path).bits(r.offset, self._specs[name], dtype)
            for name, r in zip(step.sources, ranges, strict=True)
        ]

    def release(self, ranges: list[ByteRange]) -> None:
        for r in ranges:
            self._file(r.path).release(r.offset, r.length)

    def _file(self, path: str) -> MappedFile:
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = MappedFile(path)
        return f

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
