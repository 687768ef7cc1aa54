"""Writing zarr3 arrays for the ``zarr`` and ``orbax`` output formats: where each tensor's
array goes (`array_path`), its chunk shape, and `ArrayWriter`, which takes a shard's tiles and
writes whole chunks. The object-store destination
(`weightbridge.streaming.dest.object_store`) drives it; `weightbridge.io.zarr` reads the result.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from weightbridge import dtypes
from weightbridge.errors import ConversionError, FormatError
from weightbridge.io._kvstore import Store, as_dir, ts_context, ts_module
from weightbridge.io._tiles import TileCursor
from weightbridge.io.base import ByteRange
from weightbridge.io.zarr import (
    OCDBT_MANIFEST,
    ORBAX_CHECKPOINT_METADATA,
    ORBAX_COMMIT_SUCCESS,
    ORBAX_METADATA,
    SHARD_SUFFIX,
    ZARR3_METADATA,
)
from weightbridge.spec import TensorSpec

# Rows per chunk are chosen so one chunk holds about this many bytes: large enough that an
# object store spends its time moving data rather than on per-request latency, small enough that
# the one partly filled chunk the writer buffers stays well under the converter's memory budget
# (a few 32 MB tiles).
CHUNK_BYTES = 16 << 20
# Chunk uploads a shard writer lets run while it takes the next tile. tensorstore holds a copy
# of each block until its upload is done, so this bounds that memory (two 32 MB tiles) while
# keeping an object store's latency off the critical path.
WRITES_IN_FLIGHT = 2


_RESERVED = frozenset(
    {ORBAX_METADATA, ORBAX_CHECKPOINT_METADATA, ORBAX_COMMIT_SUCCESS, OCDBT_MANIFEST, "_sharding"}
    | {ZARR3_METADATA, "d", "array_metadatas"}
)


def array_path(name: str, format: str) -> str:
    """The key prefix of a tensor's array: the name itself (zarr) or its orbax parameter name.

    >>> array_path("params/Dense_0/kernel", "orbax"), array_path("enc/w", "zarr")
    ('params.Dense_0.kernel', 'enc/w')
    """
    parts = name.split("/")
    bad = [p for p in parts if not p or p in (".", "..") or p.startswith(".")]
    if bad or (parts[0] in _RESERVED):
        raise FormatError(
            f"tensor {name!r} cannot be stored as a {format} array: its path parts must be "
            "non-empty, must not start with '.', and the first must not be one of "
            f"{sorted(_RESERVED)}; rename it in the plan (--rename)"
        )
    return ".".join(parts) if format == "orbax" else name


def check_paths(paths: dict[str, str], where: str) -> None:
    """Refuse two tensors in one array, or an array inside another (its deletion would take both)."""
    by_path: dict[str, str] = {}
    for name, path in paths.items():
        if path in by_path:
            raise ConversionError(
                f"{where}: tensors {by_path[path]!r} and {name!r} would both be stored as array "
                f"{path!r}; rename one of them in the plan"
            )
        by_path[path] = name
    ordered = sorted(by_path)
    for a, b in itertools.pairwise(ordered):
        if b.startswith(a + "/"):
            raise ConversionError(
                f"{where}: tensor {by_path[b]!r} would be stored inside the array of tensor "
                f"{by_path[a]!r}; zarr arrays cannot nest, rename one of them in the plan"
            )


def chunk_shape(shape: Sequence[int], itemsize: int) -> list[int]:
    """Whole rows along axis 0, about CHUNK_BYTES per chunk (every extent at least 1).

    >>> chunk_shape((100_000, 1024), 4)
    [4096, 1024]
    >>> chunk_shape((), 4)
    []
    """
    if not shape:
        return []
    rest = [max(1, int(d)) for d in shape[1:]]
    row_bytes = max(1, int(np.prod(rest, dtype=np.int64)) * itemsize)
    rows = max(1, min(int(shape[0]), CHUNK_BYTES // row_bytes))
    return [rows, *rest]


def _zarr3_spec(kvstore: dict[str, Any], spec: TensorSpec) -> dict[str, Any]:
    dt = dtypes.to_numpy(spec.dtype)
    # No compression: chunk bytes are the tensor's own bytes, so two runs write identical
    # objects, and numbers that rarely compress (trained weights) cost no CPU.
    codec: dict[str, Any] = {"name": "bytes"}
    if dt.itemsize > 1:
        codec["configuration"] = {"endian": "little"}
    return {
        "driver": "zarr3",
        "kvstore": kvstore,
        "metadata": {
            "shape": list(spec.shape),
            "data_type": ts_module().dtype(dt).name,
            "chunk_grid": {
                "name": "regular",
                "configuration": {"chunk_shape": chunk_shape(spec.shape, dt.itemsize)},
            },
            "chunk_key_encoding": {"name": "default"},
            "codecs": [codec],
        },
        # Store every chunk, even one equal to the fill value: orbax refuses a missing chunk
        # (store_array_data_equal_to_fill_value), and on S3 skipping one turns into a DELETE.
        "store_data_equal_to_fill_value": True,
    }


class ArrayWriter:
    """Writes each tensor of one shard as a zarr3 array, whole chunks at a time.

    Tiles arrive as consecutive whole rows; rows that do not yet fill a chunk wait in a buffer
    (at most one chunk), so every chunk is written exactly once. A `ShardWriter` whose "file"
    is a group of arrays in `store`; `path` names the shard (for messages).
    """

    suffix = SHARD_SUFFIX

    def __init__(
        self, store: Store, tensors: Sequence[TensorSpec], paths: dict[str, str], where: str
    ) -> None:
        self._store, self._paths, self.where = store, paths, where
        self.path = where
        self._cursor = TileCursor(where, tensors, begin=self._begin, end=self._end)
        self._array: Any = None
        self._chunk_rows = 1
        self._flushed = 0
        self._pending: list[np.ndarray] = []
        self._inflight: list[tuple[Any, str]] = []
        self.created: list[str] = []

    def _begin(self, spec: TensorSpec) -> None:
        path = self._paths[spec.name]
        create = _zarr3_spec(self._store.spec_at(as_dir(path)), spec)
        self.created.append(path)
        self._array = self._store.wait(
            ts_module().open(create, context=ts_context(), create=True, delete_existing=True),
            f"creating array {path!r}",
        )
        chunk = create["metadata"]["chunk_grid"]["configuration"]["chunk_shape"]
        self._chunk_rows = chunk[0] if chunk else 1
        self._flushed = 0
        self._pending = []

    def _end(self, spec: TensorSpec) -> None:
        self._flush(final=True)
        self._array = None

    def _put(self, start: int, block: np.ndarray) -> None:
        target = self._array if block.ndim == 0 else self._array[start : start + block.shape[0]]
        what = f"writing {self._paths_current()} rows {start}+"
        futures = target.write(block)
        # Once tensorstore has copied the block, the tile can go; its upload continues while
        # the next tile is prepared, with a few uploads in flight at most.
        self._store.wait(futures.copy, what)
        self._inflight.append((futures.commit, what))
        while len(self._inflight) > WRITES_IN_FLIGHT:
            self._drain(1)

    def _drain(self, count: int | None = None) -> None:
        while self._inflight and (count is None or count > 0):
            future, what = self._inflight.pop(0)
            self._store.wait(future, what)
            count = None if count is None else count - 1

    def _paths_current(self) -> str:
        return self.created[-1] if self.created else "?"

    def _flush(self, *, final: bool) -> None:
        if not self._pending:
            return
        rows = sum(p.shape[0] for p in self._pending)
        if rows < self._chunk_rows and not final:
            return
        block = self._pending[0] if len(self._pending) == 1 else np.concatenate(self._pending)
        self._put(self._flushed, block)
        self._flushed += rows
        self._pending = []

    def write(self, name: str, tile: np.ndarray, row: int) -> None:
        _, data = self._cursor.tile(name, tile, row)
        if data.ndim == 0:
            self._put(0, data)
            return
        if self._pending:  # top up the waiting partial chunk first
            need = self._chunk_rows - sum(p.shape[0] for p in self._pending)
            self._pending.append(data[:need])
            data = data[need:]
            self._flush(final=False)
        whole = (data.shape[0] // self._chunk_rows) * self._chunk_rows
        if whole:
            self._put(self._flushed, data[:whole])
            self._flushed += whole
        if data.shape[0] > whole:
            self._pending.append(np.array(data[whole:]))  # own copy: the tile is not ours

    def copy_from(self, name: str, src: ByteRange) -> bool:
        return False  # arrays are written through tensorstore; there is no file to copy into

    def close(self) -> None:
        self._cursor.close()
        self._drain()  # every chunk is stored before the shard's record is written

    def abort(self) -> None:
        for future, _ in self._inflight:
            future.cancel()
        self._array, self._pending, self._inflight = None, [], []


def zarr3_group(attributes: dict[str, Any]) -> dict[str, Any]:
    return {"zarr_format": 3, "node_type": "group", "attributes": attributes}
