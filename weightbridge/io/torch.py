"""PyTorch checkpoints (`torch.save` zip and legacy files): read and write without importing torch.

A `torch.save` file is a pickle of containers holding tensors, whose storages (the raw element
buffers) live outside the pickle: the pickle names each storage by a *persistent id*
``('storage', <storage type>, key, location, numel)`` and rebuilds each tensor by calling
``torch._utils._rebuild_tensor_v2(storage, offset, shape, stride, ...)``.

- **Zip format** (torch >= 1.6): ``<prefix>/data.pkl`` is the pickle, ``<prefix>/data/<key>``
  holds each storage's bytes (stored uncompressed, 64-byte aligned), ``<prefix>/byteorder`` says
  ``little`` or ``big`` (absent means little).
- **Legacy format** (``_use_new_zipfile_serialization=False``): five pickles one after another
  (magic number, protocol version, sys info, the main pickle, the list of storage keys), then for
  each key an 8-byte little-endian element count followed by the storage's bytes.

This module never imports torch, and never gives these pickles to the standard unpickler
(unpickling runs code by design): `weightbridge.io._pickle` resolves only the few globals a
tensor checkpoint needs and refuses every other global before anything runs. The result is a
spec per tensor (name, shape, dtype) plus where its elements sit (storage, offset, strides);
`read` maps the storage zero-copy and lays the strides over it with numpy.

Writing (`Writer`, from `weightbridge.io._torchzip`) emits the zip format that
``torch.load(path, weights_only=True)`` accepts, without torch. torch is the oracle in the tests.

This module does not read TorchScript archives (``torch.jit.save``), tensor subclasses other than
`Parameter`, quantized or sparse tensors, or the tar format of PyTorch before 0.4; each is refused
with a message that says so.
"""

from __future__ import annotations

import io
import math
import os
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from weightbridge import dtypes
from weightbridge.errors import DtypeError, FormatError, SpecError
from weightbridge.io._pickle import StorageRef, TensorRef, brief, flatten, load_pickle
from weightbridge.io._torchzip import TorchWriter
from weightbridge.io.base import (
    ZIP_MAGIC,
    BaseReader,
    ByteRange,
    MappedFile,
    check_safe_relative,
    local_range,
    open_source,
    open_zip,
    source_size,
    zip_first_member_name,
    zip_member_data_start,
)
from weightbridge.spec import MAX_NBYTES, CheckpointSpec, TensorSpec

NAME = "torch"
SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

# torch's legacy files start with this number pickled; pickled with protocol >= 2 it is the
# LONG1 opcode, a length byte of 10 and the 10 little-endian bytes of the number.
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_MAGIC_BYTES = b"\x8a\x0a" + _LEGACY_MAGIC_NUMBER.to_bytes(10, "little")
# The only protocol version torch has ever written in legacy files.
_LEGACY_PROTOCOL_VERSION = 1001
# A state dict's pickle is about 100 bytes per tensor (a few MB for the largest models); a
# data.pkl over 256 MB is corrupt or hostile, and refusing it bounds what a deflated entry (a
# zip bomb) can make us allocate.
_MAX_PICKLE_BYTES = 256 << 20
# DEFLATE cannot expand data more than 1032-fold (a 258-byte match coded in about two bits): a
# deflated entry claiming more than that of its compressed size lies, and is refused before
# anything is allocated for it. Other zip methods (bzip2, LZMA) have no such bound; torch never
# compresses, so they are refused by name.
_MAX_DEFLATE_RATIO = 1032


def detect(path: str, head: bytes) -> bool:
    """True for a `torch.save` zip (an entry ``<prefix>/data.pkl``) or a legacy torch pickle."""
    if head.startswith(ZIP_MAGIC):
        return _zip_is_torch(path, head)
    # PROTO opcode, then (for protocol 4 and up) a 9-byte FRAME, then the magic number.
    return head[:1] == b"\x80" and _LEGACY_MAGIC_BYTES in head[:32]


def _zip_is_torch(path: str, head: bytes) -> bool:
    first = zip_first_member_name(path, head)
    if not first:
        return False
    if first == b"data.pkl" or first.endswith(b"/data.pkl"):
        return True
    if first.endswith(b".npy") or not path.endswith(SUFFIXES):
        return False  # .npz archives, or zips no suffix of ours vouches for
    # Writers other than torch may put entries in another order: look at the whole directory.
    try:
        with open_zip(path) as zf:
            return any(n == "data.pkl" or n.endswith("/data.pkl") for n in zf.namelist())
    except (OSError, zipfile.BadZipFile, ValueError, EOFError, NotImplementedError):
        return False


@dataclass(frozen=True, slots=True)
class _Stored:
    """Where one storage's bytes are: `offset` in the file, or a deflated zip entry."""

    key: str
    offset: int
    nbytes: int
    deflated: zipfile.ZipInfo | None = None


class TorchReader(BaseReader):
    """Reads a `torch.save` file (zip or legacy) without torch; tensors are zero-copy maps.

    `extra_globals` lets formats built on torch.save (DeepSpeed's) allow their own classes,
    each as a stand-in of theirs; `pickled` is the unpickled object (tensor references and
    plain containers), whose tensors `read_ref` reads.
    """

    def __init__(
        self, path: str, *, extra_globals: Mapping[tuple[str, str], Any] | None = None
    ) -> None:
        self.path = os.fspath(path)
        self._extra_globals = extra_globals
        try:
            with open_source(self.path) as f:
                head = f.read(512)
        except OSError as e:
            raise FormatError(f"{self.path}: cannot open: {e.strerror or e}") from e
        self._big_endian = False
        if head.startswith(ZIP_MAGIC):
            obj, storages = self._open_zip()
        elif head[:1] == b"\x80":
            obj, storages = self._open_legacy()
        elif len(head) > 262 and head[257:262] == b"ustar":
            raise FormatError(
                f"{self.path}: this is the tar format of PyTorch before 0.4, which weightbridge "
                "does not read; load and re-save it with a current torch"
            )
        else:
            raise FormatError(
                f"{self.path}: not a PyTorch checkpoint: it is neither a zip archive nor a pickle "
                f"(first bytes {head[:8]!r})"
            )
        self._storages = storages
        self.pickled = obj
        refs, meta = flatten(obj, source=self.path)
        self._refs: dict[str, TensorRef] = {}
        specs = []
        for name, ref in refs.items():
            specs.append(self._check(name, ref))
            self._refs[name] = ref
        try:
            self._spec = CheckpointSpec(tuple(specs), meta)
        except SpecError as e:
            raise FormatError(f"{self.path}: {e}") from e
        self._file: MappedFile | None = None

    # -- opening --------------------------------------------------------------------------

    def _open_zip(self) -> tuple[Any, dict[str, _Stored]]:
        try:
            zf = open_zip(self.path)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
            size = source_size(self.path)
            raise FormatError(
                f"{self.path}: not a readable zip archive ({e}); a torch.save file of {size} "
                "bytes whose zip directory is missing is usually truncated: copy it again"
            ) from e
        with zf:
            infos = {}
            for info in zf.infolist():
                name = check_safe_relative(info.filename, index_path=self.path, what="entry")
                if name in infos:
                    raise FormatError(
                        f"{self.path}: entry {name!r} appears twice in the archive; it is "
                        "ambiguous which holds the data: the file is corrupt or hostile"
                    )
                infos[name] = info
            pickles = [
                n
                for n in infos
                if n == "data.pkl" or (n.count("/") == 1 and n.endswith("/data.pkl"))
            ]
            if len(pickles) != 1:
                raise FormatError(
                    f"{self.path}: a torch.save zip has exactly one '<prefix>/data.pkl' entry, "
                    f"found {pickles or 'none'} among {list(infos)[:5]}"
                )
            prefix = pickles[0][: -len("data.pkl")]
            if f"{prefix}constants.pkl" in infos or any(
                n.startswith(f"{prefix}code/") for n in infos
            ):
                raise FormatError(
                    f"{self.path}: this is a TorchScript archive (torch.jit.save), which holds "
                    "code; weightbridge reads torch.save checkpoints: save the model's "
                    "state_dict() with torch.save instead"
                )
            order = infos.get(f"{prefix}byteorder")
            if order is not None:
                value = self._read_entry(zf, order, 16).strip()
                if value not in (b"little", b"big"):
                    raise FormatError(
                        f"{self.path}: byteorder entry must be 'little' or 'big', found {value!r}"
                    )
                self._big_endian = value == b"big"
            raw = self._read_entry(zf, infos[pickles[0]], _MAX_PICKLE_BYTES)
            obj, keys = load_pickle(
                io.BytesIO(raw),
                source=f"{self.path}:{pickles[0]}",
                legacy=False,
                extra_globals=self._extra_globals,
            )
            size = source_size(self.path)
            storages: dict[str, _Stored] = {}
            with open_source(self.path) as f:
                for key, ref in keys.items():
                    check_safe_relative(key, index_path=self.path, what="storage key")
                    entry = f"{prefix}data/{key}"
                    found = infos.get(entry)
                    if found is None:
                        raise FormatError(
                            f"{self.path}: the pickle names storage {key!r} but the archive has "
                            f"no entry {entry!r}; the file is incomplete"
                        )
                    storages[key] = self._locate(f, size, found, ref)
        return obj, storages

    def _check_compression(self, info: zipfile.ZipInfo) -> None:
        """Refuse a compressed entry we cannot decompress within a bound its own bytes set."""
        where = f"{self.path}: entry {info.filename!r}"
        if info.compress_type == zipfile.ZIP_STORED:
            return
        if info.compress_type != zipfile.ZIP_DEFLATED:
            raise FormatError(
                f"{where} is compressed with zip method {info.compress_type}; weightbridge reads "
                "stored and deflated entries. Re-save the checkpoint with torch.save, which does "
                "not compress"
            )
        if info.file_size > _MAX_DEFLATE_RATIO * info.compress_size + 1024:
            raise FormatError(
                f"{where} claims {info.file_size} bytes from {info.compress_size} deflated bytes, "
                "more than DEFLATE can expand to; refusing (this is how zip bombs look)"
            )

    def _read_entry(self, zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
        if info.file_size > limit:
            raise FormatError(
                f"{self.path}: entry {info.filename!r} claims {info.file_size} bytes, more than "
                f"the {limit} it may hold; the file is corrupt or hostile"
            )
        self._check_compression(info)
        try:
            with zf.open(info) as f:
                data = f.read(limit + 1)
        except (
            zipfile.BadZipFile,
            OSError,
            EOFError,
            RuntimeError,  # an encrypted entry
            NotImplementedError,  # a compression method zipfile does not have
            ValueError,  # a local header whose name does not decode
        ) as e:
            raise FormatError(f"{self.path}: cannot read entry {info.filename!r}: {e}") from e
        if len(data) > limit:
            raise FormatError(f"{self.path}: entry {info.filename!r} expands past {limit} bytes")
        return data

    def _locate(self, f: IO[bytes], size: int, info: zipfile.ZipInfo, ref: StorageRef) -> _Stored:
        where = f"{self.path}: storage entry {info.filename!r}"
        if info.flag_bits & 0x1:
            raise FormatError(f"{where} is encrypted; weightbridge cannot read it")
        need = ref.byte_offset + ref.nbytes
        start = zip_member_data_start(f, info, self.path)
        if info.compress_type != zipfile.ZIP_STORED:
            # torch never compresses, but a re-zipped checkpoint might. Decompressing is the
            # fallback; an entry that claims more than its tensors need, or more than its
            # compressed bytes can hold, is refused so that a small file cannot make us
            # allocate without bound.
            if info.file_size != need:
                raise FormatError(
                    f"{where} is compressed and claims {info.file_size} bytes, but the pickle "
                    f"declares {need} bytes for it; refusing (a mismatch here is how zip bombs "
                    "look). Re-save the checkpoint with torch.save, which does not compress"
                )
            self._check_compression(info)
            if start + info.compress_size > size:
                raise FormatError(
                    f"{self.path}: file is truncated: entry {info.filename!r} declares data "
                    f"through byte {start + info.compress_size}, file is {size} bytes"
                )
            return _Stored(ref.key, -1, need, info)
        if info.file_size < need:
            raise FormatError(
                f"{where} holds {info.file_size} bytes, but the pickle declares {need} bytes "
                f"for storage {ref.key!r}; the file is truncated or corrupt"
            )
        if start + info.file_size > size:
            raise FormatError(
                f"{self.path}: file is truncated: entry {info.filename!r} declares data through "
                f"byte {start + info.file_size}, file is {size} bytes"
            )
        return _Stored(ref.key, start, info.file_size)

    def _open_legacy(self) -> tuple[Any, dict[str, _Stored]]:
        size = source_size(self.path)
        with open_source(self.path) as f:
            magic, _ = load_pickle(f, source=self.path, legacy=True)
            if magic != _LEGACY_MAGIC_NUMBER:
                raise FormatError(
                    f"{self.path}: a pickle, but not a PyTorch checkpoint: expected torch's magic "
                    f"number {_LEGACY_MAGIC_NUMBER:#x}, found {brief(magic)}"
                )
            version, _ = load_pickle(f, source=self.path, legacy=True)
            if version != _LEGACY_PROTOCOL_VERSION:
                raise FormatError(
                    f"{self.path}: legacy protocol version {brief(version)} is not the "
                    f"{_LEGACY_PROTOCOL_VERSION} weightbridge reads"
                )
            load_pickle(f, source=self.path, legacy=True)  # sys_info: not needed, see below
            obj, refs = load_pickle(f, source=self.path, legacy=True)
            order, _ = load_pickle(f, source=self.path, legacy=True)
            if not isinstance(order, list) or not all(isinstance(k, str) for k in order):
                raise FormatError(f"{self.path}: the storage key list is corrupt ({brief(order)})")
            storages: dict[str, _Stored] = {}
            # Storages follow the key list back to back, each as an 8-byte element count and
            # its bytes; torch writes them little-endian whatever the machine (sys_info's
            # little_endian describes the writer, not the data), and reads them the same way.
            pos = f.tell()
            for key in order:
                ref = refs.get(key)
                if ref is None:
                    raise FormatError(
                        f"{self.path}: storage key {key!r} is listed but the pickle never names "
                        "it, so its size is unknown; the file is corrupt"
                    )
                if ref.code is None:  # its element size is unknown, so we cannot skip past it
                    raise FormatError(
                        f"{self.path}: storage {key!r} is a {ref.type_name}, which weightbridge "
                        "cannot read; convert those tensors to a plain dtype in torch first"
                    )
                f.seek(pos)
                raw = f.read(8)
                if len(raw) < 8:
                    raise FormatError(
                        f"{self.path}: file is truncated: storage {key!r} header expected at "
                        f"byte {pos}, file is {size} bytes"
                    )
                (numel,) = struct.unpack("<q", raw)
                itemsize = dtypes.itemsize(ref.code) if ref.code else 1
                nbytes = numel * itemsize
                if numel < 0 or ref.byte_offset + ref.nbytes > nbytes:
                    raise FormatError(
                        f"{self.path}: storage {key!r} holds {numel} elements, but the pickle "
                        f"needs {(ref.byte_offset + ref.nbytes) // itemsize}; the file is corrupt"
                    )
                if pos + 8 + nbytes > size:
                    raise FormatError(
                        f"{self.path}: file is truncated: storage {key!r} declares data through "
                        f"byte {pos + 8 + nbytes}, file is {size} bytes"
                    )
                storages[key] = _Stored(key, pos + 8, nbytes)
                pos += 8 + nbytes
        missing = [k for k in refs if k not in storages]
        if missing:
            raise FormatError(
                f"{self.path}: storages {missing[:5]} are used by tensors but not in the file"
            )
        return obj, storages

    # -- validation -----------------------------------------------------------------------

    def _check(self, name: str, ref: TensorRef) -> TensorSpec:
        where = f"{self.path}: tensor {name!r}"
        if ref.code is None:
            raise FormatError(
                f"{where} has dtype {ref.dtype_name}, which weightbridge cannot represent; "
                f"supported: {', '.join(dtypes.CODES)}. Cast it in torch before converting"
            )
        try:
            spec = TensorSpec(name, ref.shape, ref.code)
        except DtypeError as e:
            raise FormatError(f"{where}: {e}") from e
        except SpecError as e:  # it names the tensor already
            raise FormatError(f"{self.path}: {e}") from e
        if spec.nbytes > MAX_NBYTES:  # only a view with zero strides gets this far
            raise FormatError(
                f"{where}: shape {ref.shape} of {spec.dtype} is {spec.nbytes} bytes, more than "
                "numpy can index; the checkpoint is corrupt or hostile"
            )
        stored = self._storages[ref.storage.key]
        # Bytes of the storage (view) the tensor may reach, counted from the storage's start.
        available = min(ref.storage.byte_offset + ref.storage.nbytes, stored.nbytes)
        _, end = _extent(ref, dtypes.itemsize(ref.code))
        if spec.numel and end > available:
            raise FormatError(
                f"{where}: shape {ref.shape}, strides {ref.stride} at offset {ref.offset} reach "
                f"byte {end} of storage {ref.storage.key!r}, which has {available} bytes; "
                "the checkpoint is corrupt"
            )
        return spec

    # -- reading --------------------------------------------------------------------------

    def read(self, name: str) -> np.ndarray:
        if name not in self._refs:
            raise self._missing(name)
        return self._array(self._refs[name], self._spec[name])

    def read_ref(self, ref: TensorRef, what: str) -> np.ndarray:
        """A tensor of `pickled` by its reference, checked against its storage first; `what`
        names it in errors."""
        return self._array(ref, self._check(what, ref))

    def ref_range(self, ref: TensorRef, what: str) -> ByteRange | None:
        """`byte_range` of a tensor of `pickled`, by its reference."""
        return self._range(ref, self._check(what, ref))

    def release_bytes(self, offset: int, length: int) -> None:
        """Let mapped pages of a byte range of the file leave this process's RSS."""
        if self._file is not None:
            self._file.release(offset, length)

    def _array(self, ref: TensorRef, spec: TensorSpec) -> np.ndarray:
        dt = dtypes.to_numpy(spec.dtype)
        if spec.numel == 0:
            empty = np.empty(spec.shape, dtype=dt)
            empty.flags.writeable = False
            return empty
        stored = self._storages[ref.storage.key]
        start, end = _extent(ref, dt.itemsize)
        count = (end - start) // dt.itemsize
        if stored.deflated is not None:
            raw = self._inflate(stored.deflated, stored.nbytes)
            flat = np.frombuffer(raw, dtype=dt, count=count, offset=start)
        else:
            flat = self._mapped().array(
                stored.offset + start, TensorSpec(spec.name, (count,), spec.dtype)
            )
        # as_strided rebuilds the array from its typestr, which numpy cannot parse for some
        # ml_dtypes (float8 is "<f1"): stride over same-sized unsigned ints, then view back.
        arr = np.lib.stride_tricks.as_strided(
            flat.view(f"u{dt.itemsize}"),
            shape=spec.shape,
            strides=tuple(s * dt.itemsize for s in ref.stride),
            writeable=False,
        ).view(dt)
        if self._big_endian and dt.itemsize > 1:
            return _swapped(arr)
        return arr

    def _inflate(self, info: zipfile.ZipInfo, nbytes: int) -> bytes:
        """A compressed storage's bytes, decompressed (at most `nbytes`) on every read."""
        try:
            with open_zip(self.path) as zf:
                data = self._read_entry(zf, info, nbytes)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
            raise FormatError(f"{self.path}: cannot reopen the archive: {e}") from e
        if len(data) != nbytes:
            raise FormatError(
                f"{self.path}: entry {info.filename!r} holds {len(data)} bytes, its header says "
                f"{nbytes}; the archive is corrupt: copy it again"
            )
        return data

    def byte_range(self, name: str) -> ByteRange | None:
        """The tensor's bytes in the file when they are contiguous, uncompressed, little-endian."""
        if name not in self._refs:
            return None
        return self._range(self._refs[name], self._spec[name])

    def _range(self, ref: TensorRef, spec: TensorSpec) -> ByteRange | None:
        stored = self._storages[ref.storage.key]
        if stored.deflated is not None or (self._big_endian and dtypes.itemsize(spec.dtype) > 1):
            return None
        if spec.numel and ref.stride != _contiguous_strides(ref.shape, ref.stride):
            return None
        start, _ = _extent(ref, dtypes.itemsize(spec.dtype))
        return local_range(self.path, stored.offset + start, spec.nbytes)

    def release(self, name: str) -> None:
        if self._file is None or name not in self._refs:
            return
        ref = self._refs[name]
        stored = self._storages[ref.storage.key]
        if stored.deflated is None:
            start, end = _extent(ref, dtypes.itemsize(self._spec[name].dtype))
            self._file.release(stored.offset + start, end - start)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _extent(ref: TensorRef, itemsize: int) -> tuple[int, int]:
    """[start, end) bytes of a tensor's elements within its storage view (end = start if empty)."""
    start = ref.storage.byte_offset + ref.offset * itemsize
    if math.prod(ref.shape) == 0:
        return start, start
    last = sum((d - 1) * s for d, s in zip(ref.shape, ref.stride, strict=True))
    return start, start + (last + 1) * itemsize


def _contiguous_strides(shape: tuple[int, ...], actual: tuple[int, ...]) -> tuple[int, ...]:
    """C-order strides for `shape`, keeping `actual` where a dimension of size 1 makes it moot."""
    out, step = [], 1
    for d, s in zip(reversed(shape), reversed(actual), strict=True):
        out.append(s if d == 1 else step)
        step *= d
    return tuple(reversed(out))


def _swapped(arr: np.ndarray) -> np.ndarray:
    """A native (little-endian) copy of an array whose bytes are big-endian."""
    out = np.array(arr)  # C-contiguous copy, still big-endian bytes
    unit = out.dtype.itemsize // 2 if out.dtype.kind == "c" else out.dtype.itemsize
    flat = out.reshape(-1).view(f"u{unit}")
    flat.byteswap(inplace=True)
    return out


Writer = TorchWriter


def open_reader(path: str) -> TorchReader:
    return TorchReader(path)
