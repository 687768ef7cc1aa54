"""numpy `.npy` and `.npz`: header-first reader and streaming `.npz` writer.

An `.npy` file is a 6-byte magic, a version, a Python-literal header (``descr``,
``fortran_order``, ``shape``) padded so the data starts 64-byte aligned, then the raw elements.
An `.npz` is a zip archive of ``<name>.npy`` members. Specs come from the npy headers alone,
parsed with `numpy.lib.format` and never with pickle. A member stored without compression is
returned as a zero-copy memory map (its data offset is the member's local zip header, then its
npy header); a compressed member is decompressed into one array of exactly the declared size.

bfloat16 and fp8 (`ml_dtypes`) have no npy descriptor: numpy itself saves bfloat16 and
float8_e4m3fn as raw void bytes (``<V2``, ``<V1``), which lose the dtype, and float8_e5m2 as
``<f1``, which it cannot load back. The writer saves all three as void bytes (``|V2``, ``|V1``),
so ``np.load`` reads the file, and records the true dtypes in the zip archive comment, which
``np.load`` never looks at::

    {"weightbridge_dtypes": {"embed.weight": "BF16"}, "weightbridge_metadata": {...}}

The reader honours that record and refuses a void array without one. It does not read pickled
object arrays, structured (record) dtypes or encrypted members; each is refused by name. Zip
members whose names do not end in ``.npy`` are not arrays: they are listed in `skipped`.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import tokenize
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
from numpy.lib import format as npy_format

from weightbridge import dtypes
from weightbridge._files import ZIP_ALIGN, zip_align_extra
from weightbridge.errors import DtypeError, FormatError, SpecError
from weightbridge.io._tiles import TileCursor
from weightbridge.io.base import (
    ZIP_LOCAL_HEADER_SIZE,
    ZIP_MAGIC,
    BaseReader,
    ByteRange,
    MappedFile,
    local_range,
    map_source,
    open_source,
    open_zip,
    source_size,
    zip_first_member_name,
    zip_member_data_start,
)
from weightbridge.spec import CheckpointSpec, TensorSpec, parse_json

NAME = "numpy"
SUFFIXES = (".npz", ".npy")

NPY_MAGIC = b"\x93NUMPY"
# A zip starts with a member's local file header (ZIP_MAGIC), or, when it has no members
# (np.savez with no arrays), with its end-of-directory record.
ZIP_EMPTY = b"PK\x05\x06"
# Keys of the archive-comment record. Names, not a version number: a reader that meets keys it
# does not know ignores them.
DTYPES_KEY = "weightbridge_dtypes"
METADATA_KEY = "weightbridge_metadata"
# The zip comment length is a 16-bit field.
MAX_COMMENT_BYTES = 0xFFFF
# Dtypes numpy can only save as raw void bytes, so the archive comment must record them.
VOID_CODES = frozenset({"BF16", "F8_E4M3", "F8_E5M2"})
# numpy aligns the data inside an .npy to 64 bytes; we also pad each member's local header so
# the .npy itself starts 64-byte aligned in the archive, so mapped arrays are aligned in memory.
ALIGN = ZIP_ALIGN
# Extra-field id of that padding ("WB"); readers skip extra fields whose id they do not know.
PAD_EXTRA_ID = 0x4257
# Decompress at most this much per read call: bounds the temporary `bytes` next to the array.
READ_CHUNK = 16 << 20
# zip's earliest timestamp; a fixed one makes the same tensors give the same bytes.
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
# Bit 0 of a member's general-purpose flags: encrypted.
ENCRYPTED_FLAG = 0x1
# numpy refuses npy headers over 10 000 bytes, but only after reading them: a version 2.0
# header's 4-byte length could make it allocate 4 GB. Anything over this is refused unread.
MAX_HEADER_BYTES = 1 << 16
# DEFLATE cannot expand data more than 1032-fold (a 258-byte match coded in about two bits), so a
# deflated member claiming more than that of its compressed size lies about its size: refused
# before anything is allocated for it. numpy only ever deflates; other methods (bzip2, LZMA)
# have no such bound and are refused by name.
MAX_DEFLATE_RATIO = 1032


def detect(path: str, head: bytes) -> bool:
    """True for an `.npy`, or a zip whose members are `.npy` arrays.

    torch checkpoints are zips too; a zip is claimed only when its first member is an ``.npy``,
    or when it is named ``*.npz`` and holds at least one ``.npy`` member.

    >>> detect("w.npy", b"\\x93NUMPY\\x01\\x00"), detect("w.bin", b"PK\\x03\\x04")
    (True, False)
    """
    if head.startswith(NPY_MAGIC):
        return True
    if head.startswith(ZIP_MAGIC):
        if zip_first_member_name(path, head).endswith(b".npy"):
            return True
        return path.endswith(".npz") and _has_npy_member(path)
    return head.startswith(ZIP_EMPTY) and path.endswith(".npz")


def _has_npy_member(path: str) -> bool:
    try:
        with open_zip(path) as zf:
            return any(n.endswith(".npy") for n in zf.namelist())
    except (OSError, zipfile.BadZipFile, ValueError, EOFError, NotImplementedError):
        return False


@dataclass(frozen=True, slots=True)
class _Entry:
    """Where one array's elements are and how they are laid out."""

    member: str | None  # zip member name; None for a lone .npy file
    offset: int  # of the elements: in the file when `stored`, else inside the member
    stored: bool  # elements sit uncompressed in the file at `offset`
    fortran: bool  # elements are in Fortran (column-major) order
    swapped: bool  # elements are big-endian


def _is_little(dt: np.dtype[Any]) -> bool:
    return dt.byteorder in ("<", "|") or (dt.byteorder == "=" and sys.byteorder == "little")


def read_npy_header(fp: IO[bytes], where: str) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    """Parse an npy magic and header from `fp`; return (shape, fortran_order, dtype).

    `fp` is left at the first data byte. Never evaluates anything but Python literals.

    Raises:
        FormatError: naming `where`, when the bytes are not a valid npy header.
    """
    try:
        start = fp.tell()
        lead = fp.read(len(NPY_MAGIC) + 2 + 4)  # magic, version, a 2.0 header's length
        if lead[:6] == NPY_MAGIC and lead[6:7] in (b"\x02", b"\x03") and len(lead) == 12:
            (header_len,) = struct.unpack("<I", lead[8:])
            if header_len > MAX_HEADER_BYTES:
                raise FormatError(
                    f"{where}: npy header claims {header_len} bytes (numpy writes at most a few "
                    "hundred); the file is corrupt: re-save it with np.save"
                )
        fp.seek(start)
        version = npy_format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dt = npy_format.read_array_header_1_0(fp)
        elif version in ((2, 0), (3, 0)):  # 3.0 differs from 2.0 only in UTF-8 field names
            shape, fortran, dt = npy_format.read_array_header_2_0(fp)
        else:
            raise FormatError(
                f"{where}: npy format version {version[0]}.{version[1]} is not one numpy "
                "writes (1.0, 2.0, 3.0); re-save the array with np.save"
            )
    except (
        ValueError,
        TypeError,
        SyntaxError,
        tokenize.TokenError,  # numpy tokenizes the header to fix up old files; it can fail
        EOFError,
        OSError,
        zipfile.BadZipFile,
        zlib.error,
    ) as e:
        raise FormatError(
            f"{where}: not a valid npy header ({e}); the file is truncated, corrupt, or not "
            "written by numpy: re-save it with np.save / np.savez"
        ) from e
    return tuple(shape), bool(fortran), dt


def _code_of(dt: np.dtype[Any], recorded: str | None, where: str) -> str:
    """The canonical dtype code of an npy header dtype, with the archive's record for voids."""
    if dt.hasobject:
        raise FormatError(
            f"{where}: holds Python objects (dtype=object), which only pickle can read, and "
            "weightbridge never unpickles; re-save it as a numeric array "
            "(np.asarray(x, dtype=np.float32))"
        )
    if dt.fields is not None or dt.subdtype is not None:
        raise FormatError(
            f"{where}: has structured dtype {dt}, which is a table, not a tensor; save each field "
            "as its own array (np.savez(path, a=x['a'], b=x['b']))"
        )
    if dt.kind == "V":
        if recorded is None:
            raise FormatError(
                f"{where}: dtype {dt.str} is raw {dt.itemsize}-byte values with no record of what "
                "they are; numpy saves bfloat16 and float8 arrays this way and forgets the dtype. "
                "Save with weightbridge (weightbridge.io.write_checkpoint(path, arrays)), which "
                f"records it in the archive comment as {{{DTYPES_KEY!r}: {{name: 'BF16'}}}}, or "
                "save a bfloat16 array as arr.view(np.uint16) and convert with a cast rule"
            )
        try:
            code = dtypes.canonical(recorded)
        except DtypeError as e:
            raise FormatError(f"{where}: archive comment records dtype {recorded!r}: {e}") from e
        if dtypes.itemsize(code) != dt.itemsize:
            raise FormatError(
                f"{where}: archive comment records dtype {code} ({dtypes.itemsize(code)} bytes "
                f"per element), but the array holds {dt.itemsize}-byte values; the comment does "
                "not belong to this archive: delete it (zip -z) or re-save the file"
            )
        return code
    try:
        code = dtypes.from_numpy(dt)
    except DtypeError as e:
        raise FormatError(
            f"{where}: {e}; convert the array before saving (arr.astype(np.float32))"
        ) from e
    try:
        matches = recorded is None or dtypes.canonical(recorded) == code
    except DtypeError as e:
        raise FormatError(f"{where}: archive comment records dtype {recorded!r}: {e}") from e
    if not matches:
        raise FormatError(
            f"{where}: archive comment records dtype {recorded!r}, but the array is {code}; the "
            "comment does not belong to this archive: delete it (zip -z) or re-save the file"
        )
    return code


def _spec(name: str, shape: tuple[int, ...], code: str, path: str) -> TensorSpec:
    try:
        return TensorSpec(name, shape, code)
    except SpecError as e:  # a negative dimension, or more than numpy has
        raise FormatError(f"{path}: {e}") from e


def _parse_comment(path: str, comment: bytes) -> tuple[dict[str, str], dict[str, str]]:
    """(recorded dtypes, metadata) from an archive comment; other comments are not ours."""
    try:
        record = parse_json(comment.decode("utf-8"))
    except ValueError:
        return {}, {}
    if not isinstance(record, dict) or not ({DTYPES_KEY, METADATA_KEY} & set(record)):
        return {}, {}
    found, meta = record.get(DTYPES_KEY, {}), record.get(METADATA_KEY, {})
    for key, value in ((DTYPES_KEY, found), (METADATA_KEY, meta)):
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise FormatError(
                f"{path}: archive comment {key!r} must map names to strings, found {value!r}; "
                "the comment is corrupt: delete it (zip -z) or re-save the file"
            )
    return found, meta


class NumpyReader(BaseReader):
    """Reads one `.npy` or `.npz`; stored members are zero-copy memory maps.

    Attributes:
        skipped: zip members that are not arrays, with why they were left out.
    """

    def __init__(self, path: str) -> None:
        self.path = os.fspath(path)
        self.skipped: dict[str, str] = {}
        try:
            self._size = source_size(self.path)
            with open_source(self.path) as f:
                is_npy = f.read(len(NPY_MAGIC)) == NPY_MAGIC
        except FileNotFoundError as e:
            raise FormatError(f"{self.path}: file not found") from e
        self._entries: dict[str, _Entry] = {}
        meta: dict[str, str] = {}
        if is_npy:
            tensors = [self._open_npy()]
        else:
            tensors, meta = self._open_npz()
        self._spec = CheckpointSpec(tuple(tensors), meta)
        self._file: MappedFile | None = None
        self._zip: zipfile.ZipFile | None = None

    def _open_npy(self) -> TensorSpec:
        name = os.path.basename(self.path)
        name = name[: -len(".npy")] if name.endswith(".npy") else name
        where = f"{self.path}: tensor {name!r}"
        with open_source(self.path) as f:
            shape, fortran, dt = read_npy_header(f, where)
            offset = f.tell()
        spec = _spec(name, shape, _code_of(dt, None, where), self.path)
        if offset + spec.nbytes > self._size:
            raise FormatError(
                f"{where}: file is truncated: header declares data through byte "
                f"{offset + spec.nbytes} ({shape} of {spec.dtype}), file is {self._size} bytes"
            )
        self._entries[name] = _Entry(None, offset, True, fortran, not _is_little(dt))
        return spec

    def _open_npz(self) -> tuple[list[TensorSpec], dict[str, str]]:
        try:
            zf = open_zip(self.path)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
            raise FormatError(
                f"{self.path}: not a readable zip archive ({e}): the file is truncated (an .npz "
                f"keeps its directory at the end, which a cut-off copy of {self._size} bytes "
                "loses), corrupt, or not an .npz: copy it again"
            ) from e
        tensors: list[TensorSpec] = []
        with zf, open_source(self.path) as raw:
            recorded, meta = _parse_comment(self.path, zf.comment)
            for info in zf.infolist():
                parts = info.filename.replace("\\", "/").split("/")
                if parts[0] == "" or ".." in parts:
                    # Not a path we open, but a name that escapes when the archive is unpacked.
                    raise FormatError(
                        f"{self.path}: member {info.filename!r} is an absolute path or climbs "
                        "out with '..'; refusing the archive: re-save it with np.savez"
                    )
                if info.is_dir() or not info.filename.endswith(".npy"):
                    self.skipped[info.filename] = "not an .npy member"
                    continue
                name = info.filename[: -len(".npy")]
                if name in self._entries:
                    raise FormatError(
                        f"{self.path}: member {info.filename!r} appears twice in the archive; "
                        "it is ambiguous which is the tensor: re-save the file"
                    )
                tensors.append(self._open_member(zf, raw, info, name, recorded.get(name)))
            unknown = sorted(set(recorded) - set(self._entries))
            if unknown:
                raise FormatError(
                    f"{self.path}: archive comment records dtypes of tensors it does not hold: "
                    f"{unknown[:5]}; members are missing (expected member "
                    f"{unknown[0] + '.npy'!r}): copy the file again"
                )
        return tensors, meta

    def _open_member(
        self,
        zf: zipfile.ZipFile,
        raw: IO[bytes],
        info: zipfile.ZipInfo,
        name: str,
        recorded: str | None,
    ) -> TensorSpec:
        where = f"{self.path}: tensor {name!r}"
        if info.flag_bits & ENCRYPTED_FLAG:
            raise FormatError(f"{where}: member {info.filename!r} is encrypted; decrypt it first")
        stored = info.compress_type == zipfile.ZIP_STORED
        if not stored and info.compress_type != zipfile.ZIP_DEFLATED:
            raise FormatError(
                f"{where}: member {info.filename!r} is compressed with zip method "
                f"{info.compress_type}; weightbridge reads stored and deflated members (what "
                "np.savez and np.savez_compressed write): re-save the file with numpy"
            )
        start = zip_member_data_start(raw, info, self.path)
        on_disk = info.file_size if stored else info.compress_size
        if start + on_disk > self._size:
            raise FormatError(
                f"{where}: file is truncated: member {info.filename!r} runs through byte "
                f"{start + on_disk}, file is {self._size} bytes; copy the file again"
            )
        if not stored and info.file_size > MAX_DEFLATE_RATIO * info.compress_size + 1024:
            raise FormatError(
                f"{where}: member {info.filename!r} claims {info.file_size} bytes from "
                f"{info.compress_size} deflated bytes, more than DEFLATE can expand to; "
                "refusing (this is how zip bombs look): the archive is corrupt or hostile"
            )
        if stored:
            raw.seek(start)
            shape, fortran, dt = read_npy_header(raw, where)
            header_len = raw.tell() - start
        else:
            try:
                with zf.open(info) as member:
                    shape, fortran, dt = read_npy_header(member, where)
                    header_len = member.tell()
            except (
                zipfile.BadZipFile,
                zlib.error,
                EOFError,
                OSError,
                RuntimeError,
                NotImplementedError,
                ValueError,  # a local header whose name does not decode
            ) as e:
                raise FormatError(
                    f"{where}: member {info.filename!r} does not decompress ({e}); the archive "
                    "is corrupt: copy it again"
                ) from e
        spec = _spec(name, shape, _code_of(dt, recorded, where), self.path)
        if info.file_size != header_len + spec.nbytes:
            raise FormatError(
                f"{where}: member {info.filename!r} declares {info.file_size} bytes, but its npy "
                f"header ({header_len} bytes) says {shape} of {spec.dtype}, which needs "
                f"{header_len + spec.nbytes}; the archive is corrupt: re-save it"
            )
        offset = start + header_len if stored else header_len
        self._entries[name] = _Entry(info.filename, offset, stored, fortran, not _is_little(dt))
        return spec

    def read(self, name: str) -> np.ndarray:
        """The tensor as a read-only array: a memory map when stored little-endian."""
        entry = self._entries.get(name)
        if entry is None:
            raise self._missing(name)
        spec = self._spec[name]
        # Fortran order is the C order of the reversed shape; transposing that is a free view.
        layout = TensorSpec(name, spec.shape[::-1] if entry.fortran else spec.shape, spec.dtype)
        if entry.stored:
            if self._file is None:
                self._file = map_source(self.path)
            arr = self._file.array(entry.offset, layout)
        else:
            arr = self._decompress(entry, layout)
        if entry.fortran:
            arr = arr.T
        if entry.swapped:
            arr = arr.byteswap()  # a native-endian copy: mapped bytes are never modified
        if arr.flags.writeable:
            arr.flags.writeable = False
        return arr

    def _decompress(self, entry: _Entry, layout: TensorSpec) -> np.ndarray:
        assert entry.member is not None  # compressed entries exist only in archives
        where = f"{self.path}: tensor {layout.name!r}"
        buf = np.empty(layout.nbytes, dtype=np.uint8)
        got = 0
        try:
            if self._zip is None:
                self._zip = open_zip(self.path)
            with self._zip.open(entry.member) as member:
                member.read(entry.offset)  # the npy header; seeking would decompress it anyway
                while got < layout.nbytes:
                    chunk = member.read(min(READ_CHUNK, layout.nbytes - got))
                    if not chunk:
                        break
                    buf[got : got + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
                    got += len(chunk)
        except (
            zipfile.BadZipFile,
            zlib.error,
            EOFError,
            OSError,
            ValueError,
            RuntimeError,
            NotImplementedError,
        ) as e:
            raise FormatError(
                f"{where}: member {entry.member!r} does not decompress ({e}); the archive is "
                "corrupt: copy it again"
            ) from e
        if got != layout.nbytes:
            raise FormatError(
                f"{where}: member {entry.member!r} holds {got} bytes of data, its header "
                f"declares {layout.nbytes}; the archive is corrupt: copy it again"
            )
        return buf.view(dtypes.to_numpy(layout.dtype)).reshape(layout.shape)

    def byte_range(self, name: str) -> ByteRange | None:
        entry = self._entries.get(name)
        if entry is None or not entry.stored or entry.swapped:
            return None
        spec = self._spec[name]
        if entry.fortran and sum(d > 1 for d in spec.shape) > 1:
            return None  # column-major bytes of a true matrix are not its C-order bytes
        return local_range(self.path, entry.offset, spec.nbytes)

    def release(self, name: str) -> None:
        entry = self._entries.get(name)
        if self._file is not None and entry is not None and entry.stored:
            self._file.release(entry.offset, self._spec[name].nbytes)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._zip is not None:
            self._zip.close()
            self._zip = None


def encode_comment(tensors: Sequence[TensorSpec], metadata: dict[str, str] | None) -> bytes:
    """The archive comment recording void-saved dtypes and metadata (empty if neither).

    >>> encode_comment([TensorSpec("w", (2,), "BF16"), TensorSpec("b", (2,), "F32")], None)
    b'{"weightbridge_dtypes":{"w":"BF16"}}'
    """
    record: dict[str, dict[str, str]] = {}
    voids = {t.name: t.dtype for t in tensors if t.dtype in VOID_CODES}
    if voids:
        record[DTYPES_KEY] = voids
    if metadata:
        record[METADATA_KEY] = {str(k): str(v) for k, v in metadata.items()}
    if not record:
        return b""
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _align_extra(offset: int, name: bytes) -> bytes:
    """Extra-field padding that puts a member's data (after its zip64 extra) on an ALIGN boundary.

    Best effort: if zipfile ever lays headers out differently the data is merely unaligned.
    """
    zip64_extra = 20  # zipfile adds one to every local header it opens with force_zip64
    return zip_align_extra(offset + ZIP_LOCAL_HEADER_SIZE + len(name) + zip64_extra, PAD_EXTRA_ID)


class NpzWriter:
    """Writes one uncompressed `.npz`, streaming each tensor into its member as tiles arrive."""

    suffix = ".npz"

    def __init__(
        self, path: str, tensors: Sequence[TensorSpec], metadata: dict[str, str] | None = None
    ) -> None:
        self.path = os.fspath(path)
        tensors = list(tensors)
        self._comment = encode_comment(tensors, metadata)
        if len(self._comment) > MAX_COMMENT_BYTES:
            raise FormatError(
                f"{self.path}: the record of bfloat16/float8 dtypes and metadata takes "
                f"{len(self._comment)} bytes, more than the {MAX_COMMENT_BYTES} a zip comment "
                "holds; split the checkpoint into smaller shards (max_shard_size) or write "
                "safetensors"
            )
        for t in tensors:
            if "\0" in t.name:  # zipfile cuts member names at a NUL: it would read back shorter
                raise FormatError(
                    f"{self.path}: tensor name {t.name!r} contains a NUL character, which a zip "
                    "member name cannot hold; rename it"
                )
        self._cursor = TileCursor(self.path, tensors, begin=self._begin, end=self._end)
        self._f = open(self.path, "wb")  # noqa: SIM115 - closed in close()/abort()
        self._zip = zipfile.ZipFile(self._f, "w", zipfile.ZIP_STORED, allowZip64=True)
        self._member: IO[bytes] | None = None

    def _begin(self, spec: TensorSpec) -> None:
        info = zipfile.ZipInfo(spec.name + ".npy", date_time=ZIP_EPOCH)
        info.compress_type = zipfile.ZIP_STORED
        info.external_attr = 0o644 << 16  # rw-r--r--, like np.savez; zipfile's default is 0o600
        name = info.filename.encode("ascii" if info.filename.isascii() else "utf-8")
        info.extra = _align_extra(self._f.tell(), name)
        self._member = self._zip.open(info, "w", force_zip64=True)
        dt = dtypes.to_numpy(spec.dtype)
        if spec.dtype in VOID_CODES:
            # Raw bytes, as numpy saves bfloat16; it would write float8_e5m2 as '<f1', which
            # it cannot read back.
            dt = np.dtype(f"V{dt.itemsize}")
        header = {
            "descr": npy_format.dtype_to_descr(dt),
            "fortran_order": False,
            "shape": spec.shape,
        }
        try:
            npy_format.write_array_header_1_0(self._member, header)
        except ValueError:  # a header over 64 KiB (thousands of dimensions) needs version 2.0
            npy_format.write_array_header_2_0(self._member, header)

    def _end(self, spec: TensorSpec) -> None:
        if self._member is not None:
            self._member.close()
            self._member = None

    def write(self, name: str, tile: np.ndarray, row: int) -> None:
        """Append one tile: consecutive whole rows of `name`, in declared order."""
        _, data = self._cursor.tile(name, tile, row)
        if data.size and self._member is not None:
            self._member.write(data.reshape(-1).view(np.uint8).data)

    def copy_from(self, name: str, src: ByteRange) -> bool:
        """Not supported: the member's CRC needs every byte to pass through Python anyway."""
        return False

    def close(self) -> None:
        """Finish the archive, then flush and fsync it.

        Raises:
            FormatError: some declared tensor did not get all its rows.
        """
        self._cursor.close()
        self._zip.comment = self._comment
        self._zip.close()
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def abort(self) -> None:
        """Close everything without finishing the archive; the caller deletes the file."""
        for closer in (
            self._member.close if self._member else None,
            self._zip.close,
            self._f.close,
        ):
            if closer is None:
                continue
            try:
                closer()
            except (OSError, ValueError):  # a half-written file: nothing left to save
                pass
        self._member = None


Writer = NpzWriter


def open_reader(path: str) -> NumpyReader:
    """Open an `.npy` or `.npz`; specs are read now, data on `read`."""
    return NumpyReader(path)
