"""The protocols the converter writes through: where shards go (`Destination`) and one shard
being written (`ShardSink`, whose writer is a `weightbridge.io.base.ShardWriter`).

A local directory (`weightbridge.streaming.dest.local`) and an object store
(`weightbridge.streaming.dest.object_store`, for ``s3://``, ``gs://``, ``memory://`` URLs and
the zarr/orbax formats) both implement `Destination`, so the converter never asks which one it
has. When a conversion is complete is decided by the converter alone
(`weightbridge.streaming.convert`): it calls `Destination.start` once before the first shard
and `Destination.finalize` once, with a `Completed`, after the last shard and the index.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from weightbridge.io.base import Reader, ShardWriter
from weightbridge.spec import TensorSpec

# Output formats that are trees of arrays in a kvstore rather than files (only an object-store
# destination writes them), and the array layout each one writes.
ARRAY_FORMATS = {"zarr": "zarr", "zarr3": "zarr", "orbax": "orbax"}


class ShardSink(Protocol):
    """One shard being written: its writer, then `commit` (atomic; returns the shard's size)
    or `abort` (leaves nothing that looks complete)."""

    @property
    def writer(self) -> ShardWriter: ...

    def commit(self) -> int: ...

    def abort(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Completed:
    """The converter's signal that a conversion is complete: every output is committed.

    `outputs` are the conversion's shard names and its index name (when there is one), in order.
    """

    outputs: tuple[str, ...]


class Destination(Protocol):
    """A place a conversion writes into (a directory, or a prefix in an object store)."""

    url: str

    def prepare(self) -> None:
        """Create the place (or check it can be reached) before any work."""

    def exists(self, name: str) -> bool: ...

    def size(self, name: str) -> int | None: ...

    def stamp(self, name: str) -> str | None:
        """What identifies `name` as stored now, changed by any rewrite (a file's size, mtime
        and inode; an object's ETag), or None where there is no such thing. A shard whose
        stamp equals its record's is trusted on resume without reading it again."""
        ...

    def remove(self, name: str) -> None: ...

    def remove_temporaries(self, names: Sequence[str] | None = None) -> None:
        """Delete what a killed run left behind (temporary files, uncommitted shards): all of
        it, or only what belongs to the outputs `names` (other writers may own the rest)."""

    def read_json(self, name: str) -> Any: ...

    def write_json(self, name: str, obj: Any) -> None: ...

    def names(self, prefix: str) -> list[str]:
        """The names that start with `prefix` (one listing; no temporaries), sorted."""
        ...

    def open_shard(
        self, name: str, format: str, tensors: Sequence[TensorSpec], metadata: dict[str, str] | None
    ) -> ShardSink: ...

    def open_reader(self, name: str | None = None) -> Reader:
        """A reader of one written shard, or of the whole output when `name` is None."""
        ...

    def free_space(self) -> int | None: ...

    def lock(self, part: str | None = None) -> contextlib.AbstractContextManager[None]:
        """Hold the place for one conversion: exclusively, or (`part` named) shared with the
        other parts of a partitioned conversion and exclusive for this part."""
        ...

    def max_object_size(self, format: str) -> int | None:
        """The largest shard of `format` this place takes in bounded memory (None: any)."""
        ...

    def start(self, outputs: Sequence[str]) -> None:
        """A conversion writing `outputs` (re)starts: nothing may look complete until
        `finalize`. Called once, before the journal first records the conversion."""

    def finalize(self, completed: Completed) -> None:
        """Make the output readable as a whole (zarr/orbax top-level metadata). Called once per
        conversion, after every shard and the index are committed, before the journal records
        the conversion complete."""
