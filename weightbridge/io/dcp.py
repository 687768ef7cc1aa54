"""PyTorch Distributed Checkpoint (DCP): read a `torch.distributed.checkpoint.save` directory
without importing torch.

Layout (torch's ``FileSystemWriter``, `torch/distributed/checkpoint/filesystem.py`):

- ``.metadata`` is a pickle of a ``Metadata`` object: for each entry of the saved state dict
  (names flattened with dots), either a ``TensorStorageMetadata`` (dtype, global size, and the
  list of chunks, each an ``offsets``/``sizes`` box of the global tensor) or a
  ``BytesStorageMetadata`` (any other object); and ``storage_data``, which maps each
  ``MetadataIndex(fqn, offset)`` to a ``_StorageInfo(relative_path, offset, length)``.
- ``__{rank}_{n}.distcp`` files hold the chunks back to back. Each tensor chunk is a complete
  `torch.save` zip of that chunk (one stored, 64-byte aligned storage) at ``[offset, offset +
  length)``; a non-tensor entry is raw bytes there (a `torch.save` of the object, or the bytes
  of a ``BytesIO``).

The ``.metadata`` pickle is read with the restricted unpickler of `weightbridge.io._pickle`
(extended with inert stand-ins for the DCP metadata classes): no code from the file runs.
Specs come from ``.metadata`` alone; `read` memory-maps each chunk's storage inside its zip blob
and places chunks by their offsets: a zero-copy view when a tensor is one chunk, else one new
array of the tensor's size filled chunk by chunk (each chunk's pages released after its copy),
so memory stays within the largest tensor. Opening also checks, with one `stat` per file, that
every chunk lies inside its file. Non-tensor entries are listed by `non_tensor_entries` and in
the spec's metadata, and never converted.

In an object store the checkpoint is a prefix (``s3://bucket/ckpt``, found by one listing), or
its ``.metadata`` object (``https://`` cannot list): ``.metadata`` is fetched whole; for each
chunk read, its blob's two ends (the zip headers and pickle, `_BLOB_END_BYTES` each) in one
request each, then its tensor's bytes by ranged reads (`weightbridge.io._remote`).

Megatron's ``torch_dist`` is this format plus ``metadata.json``, ``common.pt``,
``Metadata.all_local_plans`` (inert records here) and, before mcore 0.14,
``Metadata.mcore_data``. Read as plain DCP, tensors are the stacked tensors mcore wrote
("N-D flattened" ones as stored, their original global shape noted in the spec's metadata);
`weightbridge.io.megatron` (tried first by the registry) reads such a directory as the model's
per-layer tensors.

Not read: chunks written through stream-transform extensions (compression, encryption),
checkpoints saved with ``SerializationFormat.SAFETENSORS``, and rank-local ``__{rank}.metadata``
files without a global ``.metadata``; each is refused with a message that says so.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import pickle
import zipfile
from dataclasses import dataclass
from typing import IO, Any, cast

import numpy as np

from weightbridge import dtypes
from weightbridge.errors import FormatError, WeightbridgeError
from weightbridge.io import _remote
from weightbridge.io._obstore import is_object_url
from weightbridge.io._pickle import (  # the restricted unpickler
    ALLOWED,
    TensorRef,
    _BadPickle,
    _Bounded,
    _check_memo,
    _DType,
    _Global,
    _ReadOnlyClass,
    load_pickle,
)
from weightbridge.io._pickle import brief as _brief
from weightbridge.io._remote import RemoteFile
from weightbridge.io._window import Window
from weightbridge.io.base import (
    BaseReader,
    ByteRange,
    MappedFile,
    check_safe_relative,
    local_range,
    map_source,
    open_source,
    source_isdir,
    source_isfile,
    source_join,
    source_listdir,
    source_size,
    zip_member_data_start,
)
from weightbridge.spec import MAX_NBYTES, CheckpointSpec, TensorSpec

NAME = "dcp"
SUFFIXES = (".distcp",)

METADATA_FILE = ".metadata"
DATA_SUFFIX = ".distcp"
# A DCP `.metadata` holds a few hundred bytes per chunk; even a 1T-parameter model sharded over
# thousands of ranks stays well under this. A larger file is corrupt or hostile.
_MAX_METADATA_BYTES = 1 << 30
# A `torch.save` blob's zip directory and pickle are a few KB; the zip members we read whole
# (data.pkl, byteorder) are refused above this, bounding what a hostile blob can allocate.
_MAX_PICKLE_BYTES = 1 << 20
# Chunks of one tensor: real shardings have one per rank that holds a piece (thousands at most);
# a file claiming more is corrupt or hostile.
_MAX_CHUNKS = 1 << 20
# Cells of the grid the tiling check builds (8 bytes each): a sharding over thousands of ranks
# in two dimensions stays far below; only a hostile file reaches it.
_MAX_GRID_CELLS = 1 << 22

_DCP_META = "torch.distributed.checkpoint.metadata"
_DCP_FS = "torch.distributed.checkpoint.filesystem"
_DCP_PLANNER = "torch.distributed.checkpoint.planner"


# --------------------------------------------------------------------------------------------
# Unpickling `.metadata`: inert stand-ins for DCP's classes.


class _Record:
    """Stands for an instance of a DCP metadata class: keeps its constructor arguments and its
    pickled state, runs nothing. Subclasses (one per allowed class) carry only `kind`."""

    __slots__ = ("args", "state")
    kind: str = ""
    args: tuple[Any, ...]
    state: Any

    def __new__(cls, *args: Any, **kwargs: Any) -> _Record:
        obj = object.__new__(cls)
        obj.args = args
        obj.state = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        if self.state is not None:
            raise _BadPickle(f"the pickle sets the state of a {self.kind} twice")
        self.state = state

    def field(self, name: str) -> Any:
        """A field of the pickled state (a dict of the dataclass's fields)."""
        if not isinstance(self.state, dict):
            raise _BadPickle(
                f"a {self.kind} must have a dict of fields, found {_brief(self.state)}"
            )
        return self.state.get(name)


def _record_class(kind: str) -> type[_Record]:
    # The metaclass keeps a pickle from setting attributes on the class all files share.
    cls = _ReadOnlyClass(kind.rsplit(".", 1)[-1], (_Record,), {"__slots__": (), "kind": kind})
    return cast(type[_Record], cls)


@dataclass(frozen=True, slots=True)
class _Layout:
    """`torch.serialization._get_layout(name)` as a pickle calls it."""

    name: str

    def __setstate__(self, state: Any) -> None:
        # One `_Layout` is shared by every file; BUILD must not change it for later reads.
        raise _BadPickle(f"the pickle sets the state of {self!r}; no DCP metadata does that")


def _get_layout(name: Any) -> _Layout:
    if not isinstance(name, str):
        raise _BadPickle(f"a tensor layout must be named by a string, found {_brief(name)}")
    return _Layout(name)


def _path(*parts: Any) -> str:
    """`pathlib.PosixPath(*parts)` (StorageMeta.checkpoint_id) as a plain string."""
    if not all(isinstance(p, str) for p in parts):
        raise _BadPickle(f"a path must be made of strings, found {_brief(parts)}")
    return "/".join(parts)


_DCP_CLASSES = (
    f"{_DCP_META}.Metadata",
    f"{_DCP_META}.TensorStorageMetadata",
    f"{_DCP_META}.BytesStorageMetadata",
    f"{_DCP_META}.ChunkStorageMetadata",
    f"{_DCP_META}.TensorProperties",
    f"{_DCP_META}.StorageMeta",
    f"{_DCP_META}.MetadataIndex",
    f"{_DCP_META}._MEM_FORMAT_ENCODING",
    f"{_DCP_FS}._StorageInfo",
    # Megatron's torch_dist keeps every rank's save plan in ``Metadata.all_local_plans`` (to
    # reuse it on the next save); inert records, never read.
    f"{_DCP_PLANNER}.SavePlan",
    f"{_DCP_PLANNER}.WriteItem",
    f"{_DCP_PLANNER}.WriteItemType",
    f"{_DCP_PLANNER}.TensorWriteData",
    f"{_DCP_PLANNER}.BytesIOWriteData",
)
_RECORDS: dict[str, type[_Record]] = {k: _record_class(k) for k in _DCP_CLASSES}
_DCPALLOWED: dict[tuple[str, str], Any] = {
    **{tuple(k.rsplit(".", 1)): cls for k, cls in _RECORDS.items()},  # type: ignore[misc]
    ("torch.serialization", "_get_layout"): _Global(_get_layout),
    ("torch", "strided"): _Layout("torch.strided"),
    ("pathlib", "PosixPath"): _Global(_path),
    ("pathlib", "PurePosixPath"): _Global(_path),
    ("pathlib", "WindowsPath"): _Global(_path),
    ("pathlib", "PureWindowsPath"): _Global(_path),
    ("collections", "OrderedDict"): ALLOWED[("collections", "OrderedDict")],
    ("torch", "Size"): ALLOWED[("torch", "Size")],
}


class _MetadataUnpickler(pickle.Unpickler):
    """The restricted unpickler for `.metadata`: DCP's metadata classes become `_Record`s,
    torch dtypes and sizes become the torch reader's stand-ins, every other global is refused
    before it is called."""

    def __init__(self, file: IO[bytes], *, source: str) -> None:
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        found = _DCPALLOWED.get(key)
        if found is None and module == "torch" and isinstance(ALLOWED.get(key), _DType):
            found = ALLOWED[key]
        if found is not None:
            return found
        raise FormatError(
            f"{self._source}: refusing to load global {module}.{name}: a DCP .metadata file "
            "may only name torch.distributed.checkpoint's metadata classes, torch dtypes and "
            "sizes, and nothing from it is run. If a custom planner wrote extra objects and "
            "you trust the checkpoint, load it with torch.distributed.checkpoint and save the "
            "state dict as safetensors."
        )

    def persistent_load(self, pid: Any) -> Any:
        raise _BadPickle(f"a .metadata pickle has no persistent ids, found {_brief(pid)}")


def _load_metadata(path: str) -> Any:
    try:
        size = source_size(path)
        if size > _MAX_METADATA_BYTES:
            raise FormatError(
                f"{path}: {size} bytes is too large for a DCP .metadata file (limit "
                f"{_MAX_METADATA_BYTES}); the file is corrupt or not DCP metadata"
            )
        with open_source(path) as source:
            # An object is fetched whole, in one request: the unpickler's many small reads
            # then cost nothing. A local file is read where it is.
            f = io.BytesIO(source.read()) if is_object_url(path) else source
            _check_memo(_Bounded(f, size), path, size)
            f.seek(0)
            return _MetadataUnpickler(f, source=path).load()
    except FormatError:
        raise
    except FileNotFoundError as e:
        raise FormatError(f"{path}: file not found") from e
    except _BadPickle as e:
        raise FormatError(f"{path}: {e}") from e
    except RecursionError as e:
        raise FormatError(f"{path}: pickle nests too deeply to be DCP metadata") from e
    except Exception as e:  # any unpickling failure: corrupt or truncated
        raise FormatError(
            f"{path}: the pickle is corrupt or truncated ({type(e).__name__}: {e}); it is not "
            "the .metadata of a torch.distributed.checkpoint"
        ) from e


# --------------------------------------------------------------------------------------------
# The validated metadata.


@dataclass(frozen=True, slots=True)
class Chunk:
    """One saved box of a tensor: where it sits in the global tensor and in which file."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str  # path of the .distcp file
    offset: int  # where its `torch.save` blob starts in that file
    length: int


@dataclass(frozen=True, slots=True)
class NonTensorEntry:
    """A state-dict entry that is not a tensor (an int, a string, a BytesIO): never converted."""

    name: str
    file: str
    offset: int
    length: int


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_NBYTES for v in value
    ):
        raise _BadPickle(
            f"{what} must be a torch.Size of non-negative integers, found {_brief(value)}"
        )
    return value


def _is(obj: Any, cls_name: str) -> bool:
    return isinstance(obj, _Record) and obj.kind.endswith("." + cls_name)


class _Parsed:
    """`.metadata` turned into tensor specs, their chunks and the non-tensor entries."""

    def __init__(self, directory: str, meta: Any, source: str) -> None:
        self.directory = directory
        self.source = source
        if not _is(meta, "Metadata"):
            raise _BadPickle(f"the pickle holds {_brief(meta)}, not a DCP Metadata object")
        entries = meta.field("state_dict_metadata")
        storage = meta.field("storage_data")
        if not isinstance(entries, dict) or not isinstance(storage, dict):
            raise _BadPickle(
                "Metadata.state_dict_metadata and .storage_data must be dicts; this checkpoint's "
                "storage layer is not torch's FileSystemWriter"
            )
        self.version = meta.field("version")
        self.mcore_shapes = _mcore_shapes(meta.field("mcore_data"))
        self._locations = self._storage_locations(storage)
        self.tensors: list[TensorSpec] = []
        self.chunks: dict[str, list[Chunk]] = {}
        self.non_tensors: list[NonTensorEntry] = []
        for name, entry in entries.items():
            if not isinstance(name, str):
                raise _BadPickle(f"entry names must be strings, found {_brief(name)}")
            if _is(entry, "BytesStorageMetadata"):
                file, off, length = self._where(name, None)
                self.non_tensors.append(NonTensorEntry(name, file, off, length))
            elif _is(entry, "TensorStorageMetadata"):
                self._add_tensor(name, entry)
            else:
                raise _BadPickle(f"entry {name!r} has unknown storage metadata {_brief(entry)}")

    def _storage_locations(
        self, storage: dict[Any, Any]
    ) -> dict[tuple[str, tuple[int, ...] | None], tuple[str, int, int]]:
        out: dict[tuple[str, tuple[int, ...] | None], tuple[str, int, int]] = {}
        for index, info in storage.items():
            if not _is(index, "MetadataIndex") or not _is(info, "_StorageInfo"):
                raise _BadPickle(
                    f"storage_data must map MetadataIndex to _StorageInfo, found {_brief(index)}: "
                    f"{_brief(info)}"
                )
            fqn, offset = index.field("fqn"), index.field("offset")
            if not isinstance(fqn, str):
                raise _BadPickle(f"a MetadataIndex names {_brief(fqn)}, not a string")
            key = (fqn, None if offset is None else _ints(offset, f"{fqn!r} chunk offset"))
            rel = info.field("relative_path")
            off, length = info.field("offset"), info.field("length")
            if info.field("transform_descriptors"):
                raise _BadPickle(
                    f"entry {fqn!r} was written through stream transforms "
                    f"{_brief(info.field('transform_descriptors'))} (compression or similar), "
                    "which weightbridge does not read; save the checkpoint without extensions"
                )
            for v, what in ((off, "offset"), (length, "length")):
                if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_NBYTES:
                    raise _BadPickle(
                        f"entry {fqn!r}: storage {what} {_brief(v)} is not a byte count"
                    )
            if isinstance(rel, str) and "\0" in rel:
                raise _BadPickle(f"entry {fqn!r}: data file name {rel!r} holds a NUL byte")
            rel = check_safe_relative(rel, index_path=self.source, what="data file")
            out[key] = (source_join(self.directory, rel), off, length)
        return out

    def _where(self, name: str, offsets: tuple[int, ...] | None) -> tuple[str, int, int]:
        try:
            return self._locations[(name, offsets)]
        except KeyError:
            where = "" if offsets is None else f" at offsets {offsets}"
            raise _BadPickle(
                f"entry {name!r}{where} has no storage location in storage_data; the "
                ".metadata file is incomplete"
            ) from None

    def _add_tensor(self, name: str, entry: _Record) -> None:
        props, size, chunks = entry.field("properties"), entry.field("size"), entry.field("chunks")
        shape = _ints(size, f"tensor {name!r} size")
        if (
            not _is(props, "TensorProperties")
            or not isinstance(props.state, tuple)
            or not props.state
        ):
            raise _BadPickle(f"tensor {name!r} has properties {_brief(props)}")
        dtype, layout = props.state[0], props.state[1] if len(props.state) > 1 else None
        if not isinstance(dtype, _DType):
            raise _BadPickle(f"tensor {name!r} has dtype {_brief(dtype)}, not a torch dtype")
        if dtype.code is None:
            raise _BadPickle(
                f"tensor {name!r} has dtype torch.{dtype.name}, which numpy cannot hold"
            )
        if layout is not None and layout != _Layout("torch.strided"):
            raise _BadPickle(
                f"tensor {name!r} has layout {_brief(layout)}; only dense (strided) tensors are read"
            )
        spec = TensorSpec(name, shape, dtype.code)
        if not isinstance(chunks, list):
            raise _BadPickle(f"tensor {name!r} chunks must be a list, found {_brief(chunks)}")
        out: list[Chunk] = []
        covered = 0
        for c in chunks:
            if not _is(c, "ChunkStorageMetadata"):
                raise _BadPickle(f"tensor {name!r} has a chunk {_brief(c)}")
            offs = _ints(c.field("offsets"), f"tensor {name!r} chunk offsets")
            sizes = _ints(c.field("sizes"), f"tensor {name!r} chunk sizes")
            if (
                len(offs) != len(shape)
                or len(sizes) != len(shape)
                or any(o + s > d for o, s, d in zip(offs, sizes, shape, strict=True))
            ):
                raise _BadPickle(
                    f"tensor {name!r} of shape {shape}: chunk at {offs} of size {sizes} lies "
                    "outside it"
                )
            file, off, length = self._where(name, offs)
            out.append(Chunk(offs, sizes, file, off, length))
            covered += math.prod(sizes)
        if len(out) > _MAX_CHUNKS:
            raise _BadPickle(
                f"tensor {name!r} claims {len(out)} chunks (limit {_MAX_CHUNKS}); the .metadata "
                "file is corrupt or hostile"
            )
        # Exact tiling (no gap, no overlap) matters: a gap would leave output bytes unwritten.
        if covered != spec.numel or not _tiles_exactly(shape, out):
            raise _BadPickle(
                f"tensor {name!r} of shape {shape}: its {len(out)} chunks do not tile it exactly "
                f"(they cover {covered} of {spec.numel} elements, or overlap)"
            )
        self.tensors.append(spec)
        self.chunks[name] = out


def _mcore_shapes(mcore_data: Any) -> dict[str, tuple[int, ...]]:
    """Megatron's `torch_dist` adds ``Metadata.mcore_data``: for each N-D flattened tensor, the
    global shape it had before mcore reformulated it for saving. Kept only as a note."""
    out: dict[str, tuple[int, ...]] = {}
    if isinstance(mcore_data, dict):
        for key, entry in mcore_data.items():
            shape = (
                entry.get("nd_reformulated_orig_global_shape") if isinstance(entry, dict) else None
            )
            if isinstance(key, str) and shape is not None:
                out[key] = _ints(
                    tuple(shape) if isinstance(shape, list) else shape, f"{key!r} shape"
                )
    return out


def _tiles_exactly(shape: tuple[int, ...], chunks: list[Chunk]) -> bool:
    """Whether the chunks cover every element of `shape` exactly once.

    The chunks' edges cut the tensor into a grid of cells; each chunk adds 1 to the cells it
    covers (a difference array: +-1 at its corners, then a prefix sum along every axis), and
    every cell must end at 1. Linear in the chunks, unlike comparing every pair.
    """
    boxes = [c for c in chunks if all(c.sizes)]
    if 0 in shape:
        return True
    if not shape:
        return len(boxes) == 1
    cuts = [
        np.unique(
            [0, d, *(c.offsets[k] for c in boxes), *(c.offsets[k] + c.sizes[k] for c in boxes)]
        )
        for k, d in enumerate(shape)
    ]
    if math.prod(len(c) for c in cuts) > _MAX_GRID_CELLS:
        raise _BadPickle(
            f"its {len(chunks)} chunks cut the tensor into more than {_MAX_GRID_CELLS} cells; no "
            "sharding does that, the .metadata file is corrupt or hostile"
        )
    starts = np.array([c.offsets for c in boxes], dtype=np.int64).reshape(len(boxes), -1)
    ends = starts + np.array([c.sizes for c in boxes], dtype=np.int64).reshape(starts.shape)
    lo = np.stack([np.searchsorted(cuts[k], starts[:, k]) for k in range(len(shape))], axis=1)
    hi = np.stack([np.searchsorted(cuts[k], ends[:, k]) for k in range(len(shape))], axis=1)
    count = np.zeros([len(c) for c in cuts], dtype=np.int64)
    for corner in itertools.product((False, True), repeat=len(shape)):
        where = np.where(np.array(corner), hi, lo)
        np.add.at(count, tuple(where.T), -1 if sum(corner) % 2 else 1)
    for axis in range(len(shape)):
        count = np.cumsum(count, axis=axis)
    return bool(np.all(count[tuple(slice(0, -1) for _ in shape)] == 1))


# --------------------------------------------------------------------------------------------
# Reading a chunk's `torch.save` blob in place.


# A `torch.save` blob of one tensor has its zip headers and pickle (a few hundred bytes) before
# the storage and its directory (a few hundred more) after it. From an object store, both ends
# are fetched with one request each before zipfile reads them in many small reads; 4 KiB holds
# them with room for long names, and a blob this size or smaller is fetched whole.
_BLOB_END_BYTES = 4 << 10


@dataclass(frozen=True, slots=True)
class _Placed:
    """Where a chunk's elements sit: file offset of its storage and the tensor's view of it."""

    data_offset: int  # file offset of the storage's first byte
    ref: TensorRef


def _open_blob(chunk: Chunk) -> Window:
    """A chunk's `torch.save` blob as a file: a window of its local file, or of its object with
    both ends fetched ahead (see _BLOB_END_BYTES)."""
    source = open_source(chunk.file)
    if isinstance(source, RemoteFile):
        start, end = chunk.offset, chunk.offset + chunk.length
        if chunk.length <= 2 * _BLOB_END_BYTES:
            source.keep(start, end)
        else:
            source.keep(start, start + _BLOB_END_BYTES)
            source.keep(end - _BLOB_END_BYTES, end)
    return Window(source, chunk.offset, chunk.length, name=chunk.file)


def _locate(size: int, chunk: Chunk, spec: TensorSpec) -> _Placed:
    """Parse a chunk's `torch.save` zip blob: the pickle says which storage and which view."""
    where = f"{chunk.file}: tensor {spec.name!r} chunk at {chunk.offsets} (bytes {chunk.offset}..)"
    if chunk.offset + chunk.length > size:
        raise FormatError(f"{where}: the file has {size} bytes; it is truncated")
    with _open_blob(chunk) as window:
        return _parse_blob(window, chunk, spec, where)


def _parse_blob(window: Window, chunk: Chunk, spec: TensorSpec, where: str) -> _Placed:
    if bytes(window.read(4)) != b"PK\x03\x04":
        raise FormatError(
            f"{where}: the bytes are not a torch.save zip; weightbridge reads DCP checkpoints "
            "saved with the default FileSystemWriter (not SerializationFormat.SAFETENSORS)"
        )
    window.seek(0)
    try:
        with zipfile.ZipFile(window) as zf:
            infos = {i.filename.split("/", 1)[-1]: i for i in zf.infolist()}
            pkl = infos.get("data.pkl")
            if (
                pkl is None
                or pkl.file_size > _MAX_PICKLE_BYTES
                or pkl.compress_type != zipfile.ZIP_STORED  # torch never compresses
            ):
                raise FormatError(f"{where}: the torch.save blob has no plain, sane data.pkl")
            raw = zf.read(pkl)
            order = infos.get("byteorder")
            if order is not None and zf.read(order) not in (b"little", b""):
                raise FormatError(f"{where}: big-endian torch.save blobs are not read")
            ref, _ = load_pickle(io.BytesIO(raw), source=where, legacy=False)
            if not isinstance(ref, TensorRef):
                raise FormatError(f"{where}: the blob holds {_brief(ref)}, not a tensor")
            member = infos.get(f"data/{ref.storage.key}")
            if member is None or member.compress_type != zipfile.ZIP_STORED:
                raise FormatError(
                    f"{where}: storage {ref.storage.key!r} is missing or compressed in the blob"
                )
            start = chunk.offset + zip_member_data_start(cast(IO[bytes], window), member, where)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
        raise FormatError(
            f"{where}: the torch.save blob is corrupt ({e}); the file is damaged"
        ) from e
    end = start + member.file_size
    if end > chunk.offset + chunk.length:
        raise FormatError(f"{where}: storage runs past the chunk's {chunk.length} bytes")
    item = dtypes.itemsize(ref.code) if ref.code else 1
    if ref.shape != chunk.sizes or ref.code != spec.dtype:
        raise FormatError(
            f"{where}: the blob holds shape {ref.shape} of {ref.dtype_name}; .metadata says "
            f"{chunk.sizes} of {spec.dtype}"
        )
    last = ref.storage.byte_offset + ref.offset * item
    if math.prod(ref.shape):
        last += (sum((d - 1) * s for d, s in zip(ref.shape, ref.stride, strict=True)) + 1) * item
    if last > member.file_size:
        raise FormatError(
            f"{where}: the tensor reaches past its storage's {member.file_size} bytes"
        )
    return _Placed(start, ref)


def _c_strides(shape: tuple[int, ...], actual: tuple[int, ...]) -> tuple[int, ...]:
    """C-order strides for `shape`, keeping `actual` where a dimension of size 1 makes it moot."""
    out, step = [], 1
    for d, s in zip(reversed(shape), reversed(actual), strict=True):
        out.append(s if d == 1 else step)
        step *= d
    return tuple(reversed(out))


# --------------------------------------------------------------------------------------------
# The reader.


def _names_a_file(path: str) -> bool:
    return path.endswith(DATA_SUFFIX) or path.rstrip("/").rsplit("/", 1)[-1] == METADATA_FILE


def _directory_of(path: str) -> str:
    """A DCP checkpoint is its directory (local, or a prefix in an object store); its
    `.metadata` or one `.distcp` stands for it."""
    if is_object_url(path):
        return _remote.dirname(path) if _names_a_file(path) else path.rstrip("/")
    if os.path.isdir(path):
        return path
    return os.path.dirname(path) or "."


# A local directory or an object-store prefix alike (megatron.py uses these names too).
_isdir, _join, _listdir = source_isdir, source_join, source_listdir


def detect(path: str, head: bytes) -> bool:
    """True for a directory with a `.metadata` file (or a file inside one) and `.distcp` files.

    An object URL naming the `.metadata` itself (a pickle) is enough: it names every data file,
    so nothing needs listing (over HTTP nothing can be listed).
    """
    if is_object_url(path) and path.endswith("/" + METADATA_FILE) and head[:1] == b"\x80":
        return True
    if not (_names_a_file(path) or source_isdir(path)):
        return False
    try:
        names = source_listdir(_directory_of(path))
    except (OSError, WeightbridgeError):
        return False
    return METADATA_FILE in names and any(n.endswith(DATA_SUFFIX) for n in names)


class DcpReader(BaseReader):
    """Reads a DCP checkpoint directory; single-chunk tensors come back as memory maps."""

    def __init__(self, path: str) -> None:
        self.path = _directory_of(os.fspath(path))
        source = source_join(self.path, METADATA_FILE)
        if not source_isfile(source):
            raise FormatError(
                f"{self.path}: no {METADATA_FILE} file; a DCP checkpoint directory has one "
                "(rank-local __N.metadata files are not read)"
            )
        try:
            parsed = _Parsed(self.path, _load_metadata(source), source)
        except _BadPickle as e:
            raise FormatError(f"{source}: {e}") from e
        self._chunks = parsed.chunks
        self._non_tensors = parsed.non_tensors
        self._check_files(parsed, source)
        meta: dict[str, str] = {}
        if isinstance(parsed.version, str):
            meta["dcp.version"] = parsed.version
        for name, shape in parsed.mcore_shapes.items():
            if name in self._chunks:
                meta[f"dcp.mcore.{name}"] = (
                    f"Megatron N-D flattened tensor: stored as {self._spec_shape(parsed, name)}, "
                    f"original global shape {shape}; read as stored"
                )
        for entry in self._non_tensors:
            meta[f"dcp.non_tensor.{entry.name}"] = (
                f"non-tensor entry ({entry.length} bytes in {os.path.basename(entry.file)}); "
                "not converted"
            )
        self._spec = CheckpointSpec(tuple(parsed.tensors), meta)
        self._files: dict[str, MappedFile] = {}
        self._placed: dict[tuple[str, int], _Placed] = {}

    @staticmethod
    def _spec_shape(parsed: _Parsed, name: str) -> tuple[int, ...]:
        return next(t.shape for t in parsed.tensors if t.name == name)

    def _check_files(self, parsed: _Parsed, source: str) -> None:
        """Every chunk's byte range lies inside its file (one `stat` per file)."""
        sizes: dict[str, int] = {}
        spans = [
            (c.file, c.offset + c.length, f"tensor {n!r} chunk at {c.offsets}")
            for n, cs in self._chunks.items()
            for c in cs
        ] + [(e.file, e.offset + e.length, f"entry {e.name!r}") for e in self._non_tensors]
        for file, end, what in spans:
            if file not in sizes:
                try:
                    sizes[file] = source_size(file)
                except (OSError, FormatError) as e:
                    cause = e.strerror if isinstance(e, OSError) and e.strerror else e
                    raise FormatError(
                        f"{file}: cannot read it ({cause}); {source} places {what} in it"
                    ) from e
            if end > sizes[file]:
                raise FormatError(
                    f"{file}: file is truncated: {source} places {what} through byte {end}, the "
                    f"file has {sizes[file]} bytes"
                )

    def non_tensor_entries(self) -> list[NonTensorEntry]:
        """State-dict entries that are not tensors (ints, strings, BytesIO): listed, not read."""
        return list(self._non_tensors)

    def chunks(self, name: str) -> list[Chunk]:
        """The saved chunks of tensor `name`, as `.metadata` lists them."""
        if name not in self._chunks:
            raise self._missing(name)
        return list(self._chunks[name])

    def files(self) -> list[str]:
        found = {c.file for cs in self._chunks.values() for c in cs}
        return [source_join(self.path, METADATA_FILE), *sorted(found)]

    def _mapped_file(self, path: str) -> MappedFile:
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = map_source(path)
        return f

    def _place(self, name: str, i: int) -> tuple[MappedFile, _Placed]:
        chunk = self._chunks[name][i]
        mapped = self._mapped_file(chunk.file)
        placed = self._placed.get((name, i))
        if placed is None:
            placed = self._placed[(name, i)] = _locate(mapped.size, chunk, self._spec[name])
        return mapped, placed

    def _extent(self, name: str, i: int) -> tuple[MappedFile, _Placed, int, int]:
        """(file, placement, first byte, bytes) of chunk `i`'s elements in its file."""
        mapped, placed = self._place(name, i)
        ref = placed.ref
        item = dtypes.itemsize(self._spec[name].dtype)
        start = placed.data_offset + ref.storage.byte_offset + ref.offset * item
        if math.prod(ref.shape) == 0:
            return mapped, placed, start, 0
        extent = sum((d - 1) * s for d, s in zip(ref.shape, ref.stride, strict=True)) + 1
        return mapped, placed, start, extent * item

    def _chunk_array(self, name: str, i: int) -> np.ndarray:
        mapped, placed, start, nbytes = self._extent(name, i)
        ref, code = placed.ref, self._spec[name].dtype
        dt = dtypes.to_numpy(code)
        if nbytes == 0:
            empty = np.empty(ref.shape, dtype=dt)
            empty.flags.writeable = False
            return empty
        flat = mapped.array(start, TensorSpec(name, (nbytes // dt.itemsize,), code))
        if ref.stride == _c_strides(ref.shape, ref.stride):  # the usual case: a plain view
            return flat.reshape(ref.shape)
        # As in the torch reader: stride over same-sized unsigned ints (numpy cannot parse some
        # ml_dtypes' typestr), then view back.
        return np.lib.stride_tricks.as_strided(
            flat.view(f"u{dt.itemsize}"),
            shape=ref.shape,
            strides=tuple(s * dt.itemsize for s in ref.stride),
            writeable=False,
        ).view(dt)

    def read(self, name: str) -> np.ndarray:
        if name not in self._chunks:
            raise self._missing(name)
        spec, chunks = self._spec[name], self._chunks[name]
        if len(chunks) == 1:
            return self._chunk_array(name, 0)
        out = np.empty(spec.shape, dtype=dtypes.to_numpy(spec.dtype))
        for i, c in enumerate(chunks):
            box = tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes, strict=True))
            out[box] = self._chunk_array(name, i)
            self._release_chunk(name, i)
        out.flags.writeable = False
        return out

    def byte_range(self, name: str) -> ByteRange | None:
        """The bytes of a single-chunk, C-contiguous tensor inside its local `.distcp` file
        (None from an object store: its bytes come through `read`)."""
        chunks = self._chunks.get(name)
        if not chunks or len(chunks) != 1 or is_object_url(chunks[0].file):
            return None
        _, placed, start, nbytes = self._extent(name, 0)
        ref = placed.ref
        if ref.stride != _c_strides(ref.shape, ref.stride):
            return None
        return local_range(chunks[0].file, start, nbytes)

    def _release_chunk(self, name: str, i: int) -> None:
        if (name, i) in self._placed:
            mapped, _, start, nbytes = self._extent(name, i)
            mapped.release(start, nbytes)

    def release(self, name: str) -> None:
        for i in range(len(self._chunks.get(name, ()))):
            self._release_chunk(name, i)

    def prefetch(self, name: str) -> None:
        for i, c in enumerate(self._chunks.get(name, ())):
            if is_object_url(c.file):
                # The exact range `read` asks for (the blob's ends are fetched to find it),
                # so the prefetched bytes are the ones used.
                mapped, _, start, nbytes = self._extent(name, i)
                mapped.prefetch(start, nbytes)
            else:  # the whole blob, without parsing it: advice to the page cache
                self._mapped_file(c.file).prefetch(c.offset, c.length)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def open_reader(path: str) -> DcpReader:
    return DcpReader(path)
