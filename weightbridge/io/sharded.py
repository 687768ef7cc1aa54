"""Sharded checkpoints: an index JSON (Hugging Face style) naming the shard of each tensor.

``model.safetensors.index.json`` is ``{"metadata": {"total_size": N}, "weight_map": {name:
shard}}``. We write the same structure for npz and h5 shards (``model.npz.index.json``). A path
may name the index file or the directory holding it. Every shard path is checked to stay inside
the directory, every shard must exist, and the index must agree with the shards' own headers,
all before any tensor data is read.
"""

from __future__ import annotations

import glob
import os
import reprlib
from collections.abc import Callable
from typing import Any

import numpy as np

from weightbridge._files import atomic_write_json
from weightbridge.errors import FormatError
from weightbridge.io._obstore import is_object_url
from weightbridge.io.base import (
    BaseReader,
    ByteRange,
    Reader,
    check_safe_relative,
    open_source,
    source_isfile,
)
from weightbridge.spec import CheckpointSpec, parse_json

NAME = "sharded"
SUFFIXES = (".index.json",)
INDEX_SUFFIX = ".index.json"


def find_index(path: str) -> str | None:
    if is_object_url(path):
        return _find_remote_index(path)
    if os.path.isfile(path) and path.endswith(INDEX_SUFFIX):
        return path
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(glob.escape(path), "*" + INDEX_SUFFIX)))
        if len(found) > 1:
            raise FormatError(
                f"{path}: several index files {[os.path.basename(f) for f in found]}; "
                "pass the one you mean"
            )
        return found[0] if found else None
    return None


def _find_remote_index(url: str) -> str | None:
    """`find_index` for an object URL: the index object itself, or the one index under a prefix."""
    from weightbridge.io import _remote

    if url.endswith(INDEX_SUFFIX) and source_isfile(url):
        return url
    if url.endswith(INDEX_SUFFIX):
        return None
    found = [n for n in _remote.list_directory(url).files if n.endswith(INDEX_SUFFIX)]
    if len(found) > 1:
        raise FormatError(f"{url}: several index files {found}; pass the one you mean")
    return _remote.join(url, found[0]) if found else None


def detect(path: str, head: bytes) -> bool:
    return find_index(path) is not None


def read_index(index_path: str) -> tuple[dict[str, str], dict[str, str]]:
    """Parse an index file: its weight map (tensor -> shard, checked to stay beside the index)
    and its metadata (values as text). The one place an index is read.

    Raises:
        FormatError: the file cannot be read, is not JSON, has no ``weight_map`` object, or
            names a shard outside its directory or another index as a shard.
    """
    try:
        with open_source(index_path) as f:
            index: Any = parse_json(f.read().decode("utf-8"))
    except OSError as e:
        raise FormatError(f"{index_path}: cannot read the index ({e.strerror or e})") from e
    except ValueError as e:  # bad UTF-8 or JSON, a name listed twice, absurd nesting
        raise FormatError(f"{index_path}: index is not valid JSON ({e})") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise FormatError(f"{index_path}: index must be an object with a 'weight_map' object")
    checked: dict[str, str] = {}
    for tensor, shard in weight_map.items():
        name = check_safe_relative(shard, index_path=index_path)
        if name.endswith(INDEX_SUFFIX):  # an index as a shard would open indexes forever
            raise FormatError(
                f"{index_path}: index names {reprlib.repr(shard)} as a shard, but it is an "
                "index file; shards must be checkpoint files"
            )
        checked[tensor] = name
    metadata = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
    return checked, {k: str(v) for k, v in metadata.items()}


class ShardedReader(BaseReader):
    """Reads a checkpoint split over several files by an index."""

    def __init__(self, path: str) -> None:
        from weightbridge.io import open_reader

        index_path = find_index(path)
        if index_path is None:
            raise FormatError(f"{path}: no '*{INDEX_SUFFIX}' index file here")
        self.path = index_path
        weight_map, metadata = read_index(index_path)
        if is_object_url(index_path):
            base, exists = _remote_shards(index_path)
        else:
            base = os.path.dirname(os.path.abspath(index_path))
            exists = os.path.isfile
        self._readers: dict[str, Reader] = {}
        for shard in dict.fromkeys(weight_map.values()):
            shard_path = f"{base}/{shard}" if is_object_url(base) else os.path.join(base, shard)
            if not exists(shard_path):
                raise FormatError(
                    f"{index_path}: index names shard {shard!r}, which does not exist in {base}"
                )
            self._readers[shard] = open_reader(shard_path)
        self._where: dict[str, Reader] = {}
        tensors = []
        for shard, reader in self._readers.items():
            for spec in reader.specs():
                claimed = weight_map.get(spec.name)
                if claimed is None:
                    raise FormatError(
                        f"{index_path}: shard {shard!r} holds tensor {spec.name!r}, which the index "
                        "does not list; the index and shards are out of step"
                    )
                if claimed != shard:
                    continue  # the index says this tensor lives elsewhere; that shard is read
                self._where[spec.name] = reader
                tensors.append(spec)
        missing = [n for n in weight_map if n not in self._where]
        if missing:
            raise FormatError(
                f"{index_path}: index lists {len(missing)} tensor(s) its shards do not hold, e.g. "
                f"{missing[0]!r} in {weight_map[missing[0]]!r}"
            )
        self._spec = CheckpointSpec(tuple(tensors), metadata)

    def read(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise self._missing(name)
        return self._where[name].read(name)

    def part(self, name: str) -> Reader:
        """The reader of the file that holds tensor `name` (for what only its format knows,
        such as a GGUF tensor's stored type)."""
        if name not in self._where:
            raise self._missing(name)
        return self._where[name]

    def byte_range(self, name: str) -> ByteRange | None:
        return self._where[name].byte_range(name)

    def release(self, name: str) -> None:
        self._where[name].release(name)

    def prefetch(self, name: str) -> None:
        self._where[name].prefetch(name)

    def files(self) -> list[str]:
        return [self.path, *(f for r in self._readers.values() for f in r.files())]

    def close(self) -> None:
        for r in self._readers.values():
            r.close()


def _remote_shards(index_url: str) -> tuple[str, Callable[[str], bool]]:
    """The prefix holding a remote index, and a test of which shards exist there: one listing
    of the prefix (where the store can list) instead of a request per shard."""
    from weightbridge.io import _remote

    base = _remote.dirname(index_url)
    listing = _remote.list_directory(base)
    if not listing.files:  # HTTP cannot list: ask per shard
        return base, source_isfile
    names = set(listing.files)

    def exists(shard_path: str) -> bool:
        name = shard_path[len(base) + 1 :]
        return name in names if "/" not in name else source_isfile(shard_path)

    return base, exists


def open_reader(path: str) -> ShardedReader:
    return ShardedReader(path)


def index_json(
    weight_map: dict[str, str], total_size: int, metadata: dict[str, str] | None = None
) -> dict[str, Any]:
    """The index as a JSON object: ``{"metadata": {"total_size": N, ...}, "weight_map": ...}``.

    >>> index_json({"w": "model-00001-of-00002.safetensors"}, 24)
    {'metadata': {'total_size': 24}, 'weight_map': {'w': 'model-00001-of-00002.safetensors'}}
    """
    meta: dict[str, Any] = {"total_size": total_size}
    if metadata:
        meta.update(metadata)
    return {"metadata": meta, "weight_map": weight_map}


def write_index(
    path: str, weight_map: dict[str, str], total_size: int, metadata: dict[str, str] | None = None
) -> None:
    """Write an index file atomically and durably (see `atomic_write_json`)."""
    atomic_write_json(path, index_json(weight_map, total_size, metadata), indent=2)
