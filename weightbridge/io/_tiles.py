"""Check that a streaming writer receives each declared tensor's tiles in order, whole and once.

A `ShardWriter` is promised every tensor it declared, in declared order, as C-order tiles of
consecutive whole rows along axis 0 (a 0-d tensor as one tile at row 0). `TileCursor` holds a
writer to that promise so that a bug upstream becomes a `FormatError` naming the tensor rather
than a silently scrambled file. It tells the writer when a tensor's bytes begin and end (the
npz writer opens and closes a zip member there); tensors of zero bytes need no tile at all.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

import numpy as np

from weightbridge import dtypes
from weightbridge.errors import DtypeError, FormatError
from weightbridge.spec import TensorSpec

# How many names an error message lists before "...": enough to recognise, short enough to read.
_SHOWN = 5


def _ignore(spec: TensorSpec) -> None:
    pass


class TileCursor:
    """Tracks which declared tensor a writer is on and how many of its rows have arrived.

    >>> c = TileCursor("out.npz", [TensorSpec("a", (3,), "F32")])
    >>> c.tile("a", np.zeros(2, np.float32), 0)[1].shape
    (2,)
    >>> c.close()  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    weightbridge.errors.FormatError: out.npz: closing before ... 'a' (2 of 3 rows); ...
    """

    def __init__(
        self,
        path: str,
        tensors: Sequence[TensorSpec],
        *,
        begin: Callable[[TensorSpec], None] = _ignore,
        end: Callable[[TensorSpec], None] = _ignore,
    ) -> None:
        self.path = path
        names: set[str] = set()
        for t in tensors:
            if t.name in names:
                raise FormatError(
                    f"{path}: tensor {t.name!r} is declared twice; every tensor in a file needs "
                    "its own name"
                )
            names.add(t.name)
        self._names = names
        self._pending: deque[TensorSpec] = deque(tensors)
        self._done: set[str] = set()
        self._current: TensorSpec | None = None
        self._rows = 0
        self._bytes = 0
        self._begin, self._end = begin, end
        self._closed = False

    def tile(self, name: str, tile: np.ndarray, row: int) -> tuple[TensorSpec, np.ndarray]:
        """Check one tile and return its tensor's spec and the tile as a C-contiguous array.

        A 0-d tensor's tile comes back with shape ``()``.

        Raises:
            FormatError: the tile is out of order, of the wrong dtype or shape, or overflows.
        """
        if self._closed:
            raise FormatError(f"{self.path}: tile for {name!r} arrived after close()")
        spec = self._enter(name)
        data = self._check(spec, np.asarray(tile), row)
        self._rows += 1 if not spec.shape else data.shape[0]
        self._bytes += data.nbytes
        return spec, data

    def close(self) -> None:
        """End the last tensor; refuse if any declared tensor is missing bytes.

        Raises:
            FormatError: listing the tensors that are incomplete or were never started.
        """
        missing = []
        cur = self._current
        if cur is not None and self._bytes != cur.nbytes:
            total = cur.shape[0] if cur.shape else 1
            missing.append(f"{cur.name!r} ({self._rows} of {total} rows)")
        missing += [f"{t.name!r} (not started)" for t in self._pending if t.nbytes]
        if missing:
            shown = ", ".join(missing[:_SHOWN]) + (", ..." if len(missing) > _SHOWN else "")
            raise FormatError(
                f"{self.path}: closing before every declared tensor was written: {shown}; "
                "write the missing tiles first, or call abort() to discard the file"
            )
        if cur is not None:
            self._finish(cur)
        while self._pending:  # only zero-byte tensors are left: they need no tile
            t = self._pending.popleft()
            self._begin(t)
            self._finish(t)
        self._closed = True

    def _finish(self, spec: TensorSpec) -> None:
        self._end(spec)
        self._done.add(spec.name)
        self._current = None

    def _enter(self, name: str) -> TensorSpec:
        cur = self._current
        if cur is not None and cur.name == name:
            return cur
        if cur is not None:
            if self._bytes != cur.nbytes:
                total = cur.shape[0] if cur.shape else 1
                raise FormatError(
                    f"{self.path}: a tile of {name!r} arrived while {cur.name!r} has "
                    f"{self._rows} of its {total} rows; each tensor's tiles must all come before "
                    "the next tensor's"
                )
            self._finish(cur)
        while self._pending:
            nxt = self._pending[0]
            if nxt.name != name and nxt.nbytes == 0:
                # A zero-byte tensor needs no tile; write its (empty) entry in passing.
                self._pending.popleft()
                self._begin(nxt)
                self._finish(nxt)
                continue
            if nxt.name != name:
                break
            self._pending.popleft()
            self._begin(nxt)
            self._current, self._rows, self._bytes = nxt, 0, 0
            return nxt
        raise self._out_of_order(name)

    def _out_of_order(self, name: str) -> FormatError:
        if name in self._done:
            return FormatError(
                f"{self.path}: tensor {name!r} was already written in full; each tensor's "
                "tiles come once, in declared order"
            )
        if name not in self._names:
            declared = sorted(self._names)[:_SHOWN]
            return FormatError(
                f"{self.path}: tensor {name!r} was not declared when this writer was created "
                f"(declared: {declared}{', ...' if len(self._names) > _SHOWN else ''})"
            )
        expected = self._pending[0].name if self._pending else "nothing more"
        return FormatError(
            f"{self.path}: writer expected tensor {expected!r} next (declared order), got {name!r}"
        )

    def _check(self, spec: TensorSpec, tile: np.ndarray, row: int) -> np.ndarray:
        where = f"{self.path}: tensor {spec.name!r}"
        want = dtypes.to_numpy(spec.dtype)
        if tile.dtype != want:
            try:
                same = dtypes.from_numpy(tile.dtype) == spec.dtype
            except DtypeError:
                same = False
            if not same:
                raise FormatError(
                    f"{where} is declared {spec.dtype}, but a tile of dtype {tile.dtype} arrived; "
                    f"cast it first (tile.astype(np.{want.name}))"
                )
            tile = tile.astype(want)  # the same numbers in the other byte order
        if not spec.shape:
            if tile.size != 1 or tile.ndim > 1 or row != 0 or self._bytes:
                raise FormatError(
                    f"{where} is 0-d: it takes one tile of one element at row 0, got shape "
                    f"{tile.shape} at row {row}"
                    + (" after it was already written" if self._bytes else "")
                )
            return np.ascontiguousarray(tile).reshape(())
        if tile.ndim != len(spec.shape) or tile.shape[1:] != spec.shape[1:]:
            raise FormatError(
                f"{where} has shape {spec.shape}: a tile must have shape (rows, "
                f"{', '.join(map(str, spec.shape[1:]))}), got {tile.shape}"
            )
        if row != self._rows:
            raise FormatError(
                f"{where}: tile starts at row {row}, but the {self._rows} rows written so far end "
                f"at row {self._rows}; tiles must be consecutive and in order"
            )
        if row + tile.shape[0] > spec.shape[0]:
            raise FormatError(
                f"{where}: tile of {tile.shape[0]} rows at row {row} runs past its "
                f"{spec.shape[0]} rows"
            )
        return np.ascontiguousarray(tile)
