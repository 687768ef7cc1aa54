"""The contract of a format module (`FormatModule`), the `Reader` and `ShardWriter` protocols
it implements, and the helpers readers share.

A format module (``weightbridge.io.safetensors`` and its siblings) has a `NAME`, its `SUFFIXES`,
a `detect(path, head)` that looks at magic bytes and directory structure, and `open_reader(path)`;
a format that can be written also has a `Writer` class (`WritableFormatModule`). A new format is
one such module plus one `weightbridge.io.register_format` call.

A `Reader` answers `specs()` from headers alone and `read(name)` with a read-only numpy array,
memory-mapped where the bytes are contiguous on disk. A `ShardWriter` writes one output file whose
full layout (every tensor's spec, in order) is declared up front; it then takes each tensor's
data as C-order tiles of whole rows along axis 0, in order, and `close()` flushes and fsyncs.
A `PlacingWriter` can also take tiles in any order. Atomic commit (temp name, rename) and the
journal belong to `weightbridge.streaming`, not here.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Protocol, cast, runtime_checkable

import numpy as np

from weightbridge import dtypes
from weightbridge.errors import FormatError
from weightbridge.io._obstore import is_object_url
from weightbridge.spec import CheckpointSpec, TensorSpec

if TYPE_CHECKING:
    from typing import Self  # Python 3.11; annotations only, so 3.10 runs too


@dataclass(frozen=True, slots=True)
class ByteRange:
    """Where a tensor's raw bytes (C order, little-endian, its spec's dtype) sit in a file."""

    path: str
    offset: int
    length: int


@runtime_checkable
class Reader(Protocol):
    """Reads one checkpoint (one or more files). Every `BaseReader` is one."""

    path: str

    def specs(self) -> CheckpointSpec:
        """Every tensor's name, shape and dtype, from headers alone."""
        ...

    def read(self, name: str) -> np.ndarray:
        """`name`'s data, read-only; memory-mapped where its bytes are contiguous on disk."""
        ...

    def byte_range(self, name: str) -> ByteRange | None:
        """Where `name`'s raw bytes sit in a file, if they are stored plainly (else None)."""
        ...

    def release(self, name: str) -> None:
        """`name` is done with: mapped pages may leave this process's RSS."""
        ...

    def prefetch(self, name: str) -> None:
        """A hint that `name` is read soon (may do nothing)."""
        ...

    def files(self) -> list[str]:
        """The files (local paths or object URLs) the checkpoint is read from."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


class ShardWriter(Protocol):
    """Writes one output file with a layout declared up front.

    Tensors arrive in declared order, each as C-order tiles of whole rows (`write`) or, where the
    writer accepts it, as a byte range copied file to file (`copy_from` returns False to decline).
    `close` checks every tensor is complete, flushes and fsyncs; `abort` just releases the file.
    """

    # The file suffix of a shard (".safetensors"); names the output shards and the index.
    suffix: str
    path: str

    def __init__(
        self, path: str, tensors: Sequence[TensorSpec], metadata: dict[str, str] | None = None
    ) -> None: ...

    # Returns None, or the bytes it stored for the tile when they are not the tile's (a GGUF
    # writer that quantizes): the shard's checksum is then of those (see `pipeline.hash_shard`).
    def write(self, name: str, tile: np.ndarray, row: int) -> np.ndarray | None: ...

    def copy_from(self, name: str, src: ByteRange) -> bool: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


@runtime_checkable
class PlacingWriter(ShardWriter, Protocol):
    """A `ShardWriter` whose layout fixes every tensor's offset (safetensors), so tiles can be
    placed in any order, by several threads, straight into the mapped output file. Not to be
    mixed with in-order `write`/`copy_from` on the same writer."""

    def target_array(self, name: str) -> np.ndarray:
        """`name`'s place in the output, as a writable array to fill."""
        ...

    def copy_at(self, name: str, src: ByteRange) -> bool:
        """Copy `name`'s bytes file to file into its place; False declines (fill it instead)."""
        ...

    def write_at(self, name: str, start: int, data: memoryview) -> None:
        """Write `data` (C-order bytes) at byte `start` of `name`'s place."""
        ...

    def placed_through(self, nbytes: int) -> None:
        """Every tensor byte before `nbytes` (in file order) is in place (a hint)."""
        ...


class FormatModule(Protocol):
    """What a format module offers the registry (`weightbridge.io`): a module, not a class.

    `detect` must be cheap (it sees the path and the file's first bytes, `b""` for a
    directory) and must not raise on files of other formats.
    """

    # Read-only properties, so a module's plain constants (`NAME = "numpy"`) satisfy them.
    @property
    def NAME(self) -> str: ...

    @property
    def SUFFIXES(self) -> tuple[str, ...]: ...

    def detect(self, path: str, head: bytes) -> bool: ...

    def open_reader(self, path: str) -> Reader: ...


class WritableFormatModule(FormatModule, Protocol):
    """A format module that can also write: its `Writer` writes one shard."""

    @property
    def Writer(self) -> type[ShardWriter]: ...


class BaseReader:
    """What every reader shares: `specs()` from `self._spec` (set by the subclass from headers),
    a lazily opened map of `self.path`, default `byte_range`/`release`/`prefetch`, and
    context-manager plumbing."""

    path: str
    _spec: CheckpointSpec
    _file: MappedFile | None = None

    def specs(self) -> CheckpointSpec:
        return self._spec

    def _mapped(self) -> MappedFile:
        if self._file is None:
            self._file = map_source(self.path)
        return self._file

    def read(self, name: str) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def byte_range(self, name: str) -> ByteRange | None:
        return None

    def release(self, name: str) -> None:
        """Tell the reader `name` is done with, so mapped pages can leave this process's RSS."""

    def prefetch(self, name: str) -> None:
        """Ask for `name`'s bytes to be read ahead, in the background (a hint; may do nothing)."""

    def files(self) -> list[str]:
        """The files (local paths or object URLs) this checkpoint is read from (a resume
        checks none has changed)."""
        path = getattr(self, "path", "")
        return [path] if path and (is_object_url(path) or os.path.isfile(path)) else []

    def close(self) -> None:
        pass

    def _missing(self, name: str) -> FormatError:
        names = self.specs().names
        near = [n for n in names if name.split(".")[-1] in n][:5] or names[:5]
        return FormatError(f"{self.path}: no tensor named {name!r}; some names it has: {near}")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MappedFile:
    """A read-only memory map of a whole file, shared by the tensors inside it.

    Mapped pages are page cache, not anonymous memory: the kernel can drop them under pressure,
    so mapping a file larger than RAM is fine. `release` advises the kernel we are done with a
    range so it leaves our RSS promptly.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.size = os.stat(path).st_size
        self._mm: mmap.mmap | None = None
        if self.size:
            with open(path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def array(self, offset: int, spec: TensorSpec) -> np.ndarray:
        dt = dtypes.to_numpy(spec.dtype)
        if spec.numel == 0 or self._mm is None:
            empty = np.empty(spec.shape, dtype=dt)
            empty.flags.writeable = False  # read-only like every mapped tensor
            return empty
        arr = np.frombuffer(self._mm, dtype=dt, count=spec.numel, offset=offset)
        return arr.reshape(spec.shape)

    def bits(self, offset: int, spec: TensorSpec, dtype: np.dtype[Any]) -> np.ndarray:
        """`spec`'s bytes at `offset` as `dtype` (a same-width stand-in for the spec's dtype,
        for tensors that only move: see `streaming/rawbits.py`)."""
        if spec.numel == 0 or self._mm is None:
            return np.empty(spec.shape, dtype=dtype)
        return np.frombuffer(self._mm, dtype=dtype, count=spec.numel, offset=offset).reshape(
            spec.shape
        )

    def release(self, offset: int, length: int) -> None:
        if self._mm is None or length <= 0 or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        start = (offset // page) * page
        try:
            self._mm.madvise(mmap.MADV_DONTNEED, start, min(offset + length, self.size) - start)
        except (OSError, ValueError):  # advice only; never worth failing a conversion over
            pass

    def prefetch(self, offset: int, length: int) -> None:
        """Start reading a range from disk now, sequentially, before it is touched.

        A transposing copy walks its source in column bands, which on a cold file would fault
        pages in scattered order; WILLNEED makes the kernel read the whole range ahead.
        """
        if self._mm is None or length <= 0 or not hasattr(mmap, "MADV_WILLNEED"):
            return
        page = mmap.PAGESIZE
        start = (offset // page) * page
        try:
            self._mm.madvise(mmap.MADV_WILLNEED, start, min(offset + length, self.size) - start)
        except (OSError, ValueError):  # advice only
            pass

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a caller still holds a view; the GC closes it later
                pass
            self._mm = None


# -- sources: a local path or an object URL --------------------------------------------------
# Readers open their files through these, so one reader reads a local file (memory-mapped) or an
# object in s3://, gs://, https:// (ranged reads, `weightbridge.io._remote`) alike.


class Sliceable(Protocol):
    """A whole file as a read-only buffer: ``len(buf)`` and ``buf[a:b]`` (bytes)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: slice, /) -> bytes: ...


def source_size(path: str) -> int:
    """Bytes in a local file or an object (asks the store once; see `_remote.remote_object`)."""
    if is_object_url(path):
        from weightbridge.io._remote import remote_object

        return remote_object(path).size
    return os.stat(path).st_size


def source_isfile(path: str) -> bool:
    """Whether a local file or an object exists at `path`."""
    if is_object_url(path):
        from weightbridge.io._remote import MissingObject, remote_object

        try:
            remote_object(path)
        except MissingObject:
            return False
        return True
    return os.path.isfile(path)


# Checkpoints that are directories (DCP, DeepSpeed ZeRO, TensorFlow) are prefixes in an object
# store: its listing stands for the directory's (one request; HTTP cannot list, so a directory
# there is empty).


def source_isdir(path: str) -> bool:
    """Whether `path` is a local directory, or a prefix with objects under it."""
    if is_object_url(path):
        from weightbridge.io._remote import probe

        return probe(path) == "dir"
    return os.path.isdir(path)


def source_join(directory: str, name: str) -> str:
    """`name` inside a local directory or an object-store prefix.

    >>> source_join("s3://b/ckpt/", "latest"), source_join("ckpt", "latest")
    ('s3://b/ckpt/latest', 'ckpt/latest')
    """
    if is_object_url(directory):
        from weightbridge.io._remote import join

        return join(directory, name)
    return os.path.join(directory, name)


def source_listdir(directory: str) -> list[str]:
    """The names directly in a local directory, or of the objects and sub-prefixes directly
    under a prefix.

    Raises:
        OSError: a local directory that cannot be listed.
        WeightbridgeError: the store did not answer (`StoreUnreachable`).
    """
    if is_object_url(directory):
        from weightbridge.io._remote import list_directory

        listing = list_directory(directory)
        return [*listing.files, *listing.dirs]
    return os.listdir(directory)


def open_source(path: str) -> IO[bytes]:
    """A binary file object reading `path`: a local file, or an object by ranged reads."""
    if is_object_url(path):
        from weightbridge.io._remote import RemoteFile

        return cast(IO[bytes], RemoteFile(path))
    return open(path, "rb")  # the caller closes it


def open_zip(path: str) -> zipfile.ZipFile:
    """A zip archive at a local path or an object URL (its directory read by ranged reads)."""
    if is_object_url(path):
        from weightbridge.io._remote import RemoteFile

        return zipfile.ZipFile(cast(IO[bytes], RemoteFile(path)))
    return zipfile.ZipFile(path)


def map_source(path: str) -> MappedFile:
    """A `MappedFile` of a local file, or its counterpart for an object (each tensor fetched
    by one ranged read when asked for)."""
    if is_object_url(path):
        from weightbridge.io._remote import RemoteMappedFile

        return RemoteMappedFile(path)
    return MappedFile(path)


@contextlib.contextmanager
def source_buffer(path: str) -> Iterator[Sliceable]:
    """The whole of `path` as a sliceable buffer: a memory map of a local file, or an object
    whose slices are fetched on demand. For parsers that slice a file (GGUF, msgpack)."""
    if is_object_url(path):
        from weightbridge.io._remote import RemoteBuffer

        remote = RemoteBuffer(path)
        try:
            yield remote
        finally:
            remote.close()
        return
    if not os.stat(path).st_size:
        yield b""
        return
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        yield mm


def local_range(path: str, offset: int, length: int) -> ByteRange | None:
    """A tensor's `ByteRange` for the kernel to copy file to file, or None for an object URL
    (its bytes come through `read`, fetched by ranged reads)."""
    if is_object_url(path):
        return None
    return ByteRange(path, offset, length)


def check_safe_relative(path_in_index: Any, *, index_path: str, what: str = "shard") -> str:
    """Refuse absolute paths and `..` in a name an index or archive gives us."""
    if not isinstance(path_in_index, str) or not path_in_index:
        raise FormatError(
            f"{index_path}: {what} name must be a non-empty string, found {path_in_index!r}"
        )
    norm = path_in_index.replace("\\", "/")
    if (
        norm.startswith("/")
        or any(part == ".." for part in norm.split("/"))
        or ":" in norm.split("/")[0]
    ):
        raise FormatError(
            f"{index_path}: {what} path {path_in_index!r} points outside the checkpoint directory; "
            "refusing to read it (an index may only name files beside it)"
        )
    return norm


class UnionReader(BaseReader):
    """One reader over several: names starting with a prefix go to that prefix's reader.

    Partial loading reads the target checkpoint's own values as ``mine:<name>`` beside the
    source's tensors, so a plan can mix both and still be one plan.
    """

    def __init__(self, readers: dict[str, Reader]) -> None:
        self._readers = readers
        self.path = " + ".join(r.path for r in readers.values())
        tensors = []
        for prefix, reader in readers.items():
            for t in reader.specs():
                tensors.append(TensorSpec(prefix + t.name, t.shape, t.dtype))
        self._spec = CheckpointSpec(tuple(tensors))

    def _route(self, name: str) -> tuple[Reader, str]:
        for prefix, reader in self._readers.items():
            if prefix and name.startswith(prefix):
                return reader, name[len(prefix) :]
        return self._readers[""], name

    def read(self, name: str) -> np.ndarray:
        reader, inner = self._route(name)
        return reader.read(inner)

    def byte_range(self, name: str) -> ByteRange | None:
        reader, inner = self._route(name)
        return reader.byte_range(inner)

    def release(self, name: str) -> None:
        reader, inner = self._route(name)
        reader.release(inner)

    def prefetch(self, name: str) -> None:
        reader, inner = self._route(name)
        reader.prefetch(inner)

    def files(self) -> list[str]:
        return [f for r in self._readers.values() for f in r.files()]


# A zip local file header is 30 fixed bytes after its magic; the member's name length sits at
# bytes 26-27 and the extra field's length at 28-29.
ZIP_MAGIC = b"PK\x03\x04"
ZIP_LOCAL_HEADER_SIZE = 30


def zip_member_data_start(raw: IO[bytes], info: zipfile.ZipInfo, path: str) -> int:
    """File offset of a zip member's first byte: after its local header, name and extra field.

    The local header's extra field may differ from the central directory's, so it is read:
    this is what lets a stored member be memory-mapped in place.
    """
    # zipfile shifts offsets by bytes found before the archive; a corrupt one comes out negative.
    raw.seek(max(info.header_offset, 0))
    local = raw.read(ZIP_LOCAL_HEADER_SIZE)
    if (
        info.header_offset < 0
        or len(local) < ZIP_LOCAL_HEADER_SIZE
        or not local.startswith(ZIP_MAGIC)
    ):
        raise FormatError(
            f"{path}: member {info.filename!r}: no local zip header at byte {info.header_offset} "
            "where the archive directory puts it; the archive is corrupt: copy it again"
        )
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return int(info.header_offset + ZIP_LOCAL_HEADER_SIZE + name_len + extra_len)


def zip_first_member_name(path: str, head: bytes) -> bytes:
    """The name of a zip's first member, from its local header (b"" when it cannot be read).

    Detection looks only at the first bytes of a file; zips that share the PK magic (npz,
    PyTorch's zip format) are told apart by their first member's name.
    """
    if len(head) < ZIP_LOCAL_HEADER_SIZE:
        return b""
    (n,) = struct.unpack("<H", head[26:28])
    name = head[ZIP_LOCAL_HEADER_SIZE : ZIP_LOCAL_HEADER_SIZE + n]
    if len(name) < n:
        try:
            with open_source(path) as f:
                f.seek(ZIP_LOCAL_HEADER_SIZE)
                name = f.read(n)
        except OSError:
            return b""
    return name
