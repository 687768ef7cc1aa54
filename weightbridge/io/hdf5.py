"""HDF5: reader for generic files and Keras weights, streaming writer; h5py does the parsing.

A tensor is a dataset; its name is the dataset's path without the leading ``/``. That covers
generic files, Keras 2 ``.h5`` (``model_weights/dense/dense/kernel:0``) and Keras 3
``.weights.h5`` (``layers/dense/vars/0``). A Keras 3 ``.keras`` file is a zip holding
``model.weights.h5``; it is read in place when that member is stored uncompressed (and through
zipfile, slower, when it is not).

Specs come from the file's metadata through h5py, no data read. A dataset that is contiguous,
unfiltered, allocated, and little-endian is returned as a zero-copy memory map at its file
offset; any other dataset (chunked, compressed, big-endian, compact, or of a type whose bytes are
not exactly numpy's) is read by h5py into a copy.

Order: HDF5 lists a group's members by name, which loses definition order. Specs follow
creation order in groups that track it (the writer's do), Keras 2's ``layer_names`` and
``weight_names`` attributes where present, and otherwise a natural sort (``dense_2`` before
``dense_10``, ``vars/2`` before ``vars/10``).

h5py cannot store `ml_dtypes` types faithfully (it writes bfloat16 as an untagged opaque
type), so the writer stores bfloat16 as uint16 and fp8 as uint8 with the attribute
``weightbridge_dtype`` naming the true dtype; the reader honours that attribute, and refuses an
opaque dataset without it. Datasets that are not numeric (strings, references, compound
records, empty dataspaces) are not tensors: they are listed in `skipped`.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any

import h5py
import numpy as np

from weightbridge import dtypes
from weightbridge.errors import DtypeError, FormatError
from weightbridge.io._obstore import is_object_url
from weightbridge.io._tiles import TileCursor
from weightbridge.io._window import Window
from weightbridge.io.base import (
    ZIP_MAGIC,
    BaseReader,
    ByteRange,
    MappedFile,
    local_range,
    map_source,
    open_source,
    open_zip,
    source_size,
    zip_member_data_start,
)
from weightbridge.spec import MAX_NBYTES, CheckpointSpec, TensorSpec

NAME = "hdf5"
SUFFIXES = (".h5", ".hdf5", ".keras", ".weights.h5")

# The HDF5 superblock signature. A file with a user block has it at 512, 1024, ... instead;
# detection only looks at offset 0 (pass format="hdf5" for such files).
SIGNATURE = b"\x89HDF\r\n\x1a\n"
# The member of a Keras 3 `.keras` archive that holds the weights.
KERAS_WEIGHTS_MEMBER = "model.weights.h5"
# Attribute naming the true dtype of a dataset stored as unsigned integers.
DTYPE_ATTR = "weightbridge_dtype"
# What the writer stores each ml_dtypes type as: unsigned integers of the same width.
STORED_AS: dict[str, np.dtype[Any]] = {
    "BF16": np.dtype(np.uint16),
    "F8_E4M3": np.dtype(np.uint8),
    "F8_E5M2": np.dtype(np.uint8),
}
# What h5py raises on a corrupt file's structure, depending on where the damage is: OSError from
# the HDF5 library mostly, but also RuntimeError (a failed visit), KeyError (an object that does
# not open), ValueError and TypeError (attributes and types it cannot decode).
_H5PY_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError)
# Numeric kinds that can be tensors: bool, signed, unsigned, float, complex, and opaque (V)
# bytes, which may be bfloat16/fp8 with an attribute saying so.
TENSOR_KINDS = frozenset("biufcV")


def detect(path: str, head: bytes) -> bool:
    """True for an HDF5 file, or a `.keras` zip holding ``model.weights.h5``.

    >>> detect("w.h5", b"\\x89HDF\\r\\n\\x1a\\n\\x00"), detect("w.h5", b"PK\\x03\\x04")
    (True, False)
    """
    if head.startswith(SIGNATURE):
        return True
    if head.startswith(ZIP_MAGIC) and path.endswith(".keras"):
        try:
            with open_zip(path) as zf:
                return KERAS_WEIGHTS_MEMBER in zf.namelist()
        except (OSError, zipfile.BadZipFile, ValueError, EOFError, NotImplementedError):
            return False
    return False


def _natural(name: str) -> tuple[Any, ...]:
    """Sort key that puts ``dense_2`` before ``dense_10`` (str and int parts alternate)."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def _text(value: Any) -> str:
    """An attribute value as a metadata string: text as is, anything else as JSON."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        return value
    if isinstance(value, np.ndarray):
        return json.dumps([_text(v) if isinstance(v, bytes | str) else v for v in value.tolist()])
    if isinstance(value, np.generic):
        return str(value.item())
    return str(value)


def _names(value: Any) -> list[str]:
    """A Keras name-list attribute (bytes or str, array or list) as strings."""
    if value is None:
        return []
    if isinstance(value, np.ndarray):
        items = value.reshape(-1).tolist()
    elif isinstance(value, (bytes, str, np.generic)):  # one name where a list was expected
        items = [value.item() if isinstance(value, np.generic) else value]
    else:
        return []
    return [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v) for v in items]


def _is_little(dt: np.dtype[Any]) -> bool:
    return dt.byteorder in ("<", "|") or (dt.byteorder == "=" and sys.byteorder == "little")


@dataclass(frozen=True, slots=True)
class _Dataset:
    path: str  # HDF5 path without the leading '/'
    offset: int | None  # of its elements in the file, when they can be mapped as they are


class HDF5Reader(BaseReader):
    """Reads one HDF5 file (or a `.keras` archive); contiguous datasets are zero-copy maps.

    Attributes:
        skipped: datasets that are not tensors, with why they were left out.
    """

    def __init__(self, path: str) -> None:
        self.path = os.fspath(path)
        self.skipped: dict[str, str] = {}
        self._base = 0  # where the HDF5 bytes start in `path` (inside a .keras zip, not 0)
        self._window: io.RawIOBase | IO[bytes] | None = None
        self._zip: zipfile.ZipFile | None = None
        self._file: MappedFile | None = None
        self._datasets: dict[str, _Dataset] = {}
        try:
            size = source_size(self.path)
            with open_source(self.path) as f:
                head = f.read(len(ZIP_MAGIC))
        except FileNotFoundError as e:
            raise FormatError(f"{self.path}: file not found") from e
        mappable = True
        try:
            if head == ZIP_MAGIC:
                self._h5, size, mappable = self._open_keras_archive()
            elif is_object_url(self.path):  # h5py reads its metadata by ranged reads
                self._window = open_source(self.path)
                self._h5 = h5py.File(self._window, "r")
            else:
                self._h5 = h5py.File(self.path, "r")
        except (
            OSError,
            zipfile.BadZipFile,
            EOFError,
            ValueError,
            RuntimeError,  # zipfile: an encrypted member
            NotImplementedError,  # zipfile: a compression method it does not have
        ) as e:
            self.close()
            raise FormatError(
                f"{self.path}: HDF5 cannot open it ({e}); the file is truncated ({size} bytes), "
                "corrupt, or not HDF5: copy it again"
            ) from e
        except BaseException:
            self.close()
            raise
        try:
            # A user block shifts every address; mapping then needs care we do not take.
            mappable = mappable and self._h5.userblock_size == 0
            self._spec = self._walk(size, mappable)
        except _H5PY_ERRORS as e:
            self.close()
            raise FormatError(
                f"{self.path}: HDF5 cannot read its structure ({type(e).__name__}: {e}); the file "
                "is corrupt: copy it again"
            ) from e
        except BaseException:
            self.close()
            raise

    def _open_keras_archive(self) -> tuple[Any, int, bool]:
        """Open ``model.weights.h5`` inside a `.keras` zip: (h5py file, its size, mappable)."""
        with open_zip(self.path) as zf:
            try:
                info = zf.getinfo(KERAS_WEIGHTS_MEMBER)
            except KeyError as e:
                raise FormatError(
                    f"{self.path}: a zip, but not a Keras archive: it has no "
                    f"{KERAS_WEIGHTS_MEMBER!r} member (members: {zf.namelist()[:5]})"
                ) from e
            if info.flag_bits & 0x1:
                raise FormatError(
                    f"{self.path}: member {KERAS_WEIGHTS_MEMBER!r} is encrypted; decrypt it first"
                )
            if info.compress_type == zipfile.ZIP_STORED:
                with open_source(self.path) as raw:
                    self._base = zip_member_data_start(raw, info, self.path)
                    end = raw.seek(0, io.SEEK_END)
                if self._base + info.file_size > end:
                    raise FormatError(
                        f"{self.path}: file is truncated: member {KERAS_WEIGHTS_MEMBER!r} runs "
                        f"through byte {self._base + info.file_size}, file is {end} bytes"
                    )
                self._window = Window(
                    open_source(self.path), self._base, info.file_size, name=self.path
                )
                return h5py.File(self._window, "r"), info.file_size, True
        # Compressed: h5py reads through zipfile (seeks decompress again); no mapping.
        self._zip = open_zip(self.path)
        self._window = self._zip.open(KERAS_WEIGHTS_MEMBER)
        return h5py.File(self._window, "r"), info.file_size, False

    def _walk(self, size: int, mappable: bool) -> CheckpointSpec:
        found: list[str] = []

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset):
                found.append(name)

        self._h5.visititems(visit)
        tensors: list[TensorSpec] = []
        for name in self._ordered(found):
            ds = self._h5[name]
            spec = self._spec_of(name, ds)
            if spec is None:
                continue
            self._datasets[name] = _Dataset(name, self._offset(ds, spec, size, mappable))
            tensors.append(spec)
        meta: dict[str, str] = {}
        for key in self._h5.attrs:
            try:
                meta[str(key)] = _text(self._h5.attrs[key])
            except (OSError, TypeError, ValueError):  # an attribute type h5py cannot read
                continue
        return CheckpointSpec(tuple(tensors), meta)

    def _spec_of(self, name: str, ds: Any) -> TensorSpec | None:
        where = f"{self.path}: tensor {name!r}"
        dt: np.dtype[Any] = ds.dtype
        if ds.shape is None:
            self.skipped[name] = "empty dataspace (no shape)"
            return None
        if dt.kind not in TENSOR_KINDS or dt.fields is not None or dt.subdtype is not None:
            self.skipped[name] = f"not numeric (dtype {dt})"
            return None
        if ds.is_virtual or ds.external:
            # Its bytes live in other files, named by (possibly absolute) paths in this one.
            raise FormatError(
                f"{where}: the dataset's data lives in other files "
                f"({'a virtual dataset' if ds.is_virtual else 'external storage'}); refusing to "
                "read files a checkpoint names. Copy the data into the file (h5repack) first"
            )
        recorded = ds.attrs.get(DTYPE_ATTR)
        if recorded is not None:
            text = _text(recorded)
            try:
                code = dtypes.canonical(text)
            except DtypeError as e:
                raise FormatError(f"{where}: attribute {DTYPE_ATTR}={text!r}: {e}") from e
            if dtypes.itemsize(code) != dt.itemsize or dt.kind not in "uiV":
                raise FormatError(
                    f"{where}: attribute {DTYPE_ATTR} says {code}, but the dataset holds {dt}; "
                    f"only raw {dtypes.itemsize(code)}-byte integers or opaque values can be "
                    f"reinterpreted as {code}: delete the attribute or re-save the dataset"
                )
        elif dt.kind == "V":
            raise FormatError(
                f"{where}: dtype {dt} is opaque {dt.itemsize}-byte values with no record of "
                "what they are; h5py saves bfloat16 and float8 this way and forgets the dtype. "
                f"Set the attribute (f[{name!r}].attrs[{DTYPE_ATTR!r}] = 'BF16'), or save with "
                "weightbridge (weightbridge.io.write_checkpoint(path, arrays)), which does"
            )
        else:
            try:
                code = dtypes.from_numpy(dt)
            except DtypeError as e:
                raise FormatError(f"{where}: {e}; cast the dataset before saving") from e
        spec = TensorSpec(name, ds.shape, code)
        if spec.nbytes > MAX_NBYTES:  # chunks never written take no space, so a file can say so
            raise FormatError(
                f"{where}: shape {spec.shape} of {code} is {spec.nbytes} bytes, more than numpy "
                "can index; the file is corrupt or hostile"
            )
        return spec

    def _offset(self, ds: Any, spec: TensorSpec, size: int, mappable: bool) -> int | None:
        """File offset of a dataset's elements when they can be mapped as they are, else None."""
        if not mappable or not _is_little(ds.dtype) or spec.nbytes == 0:
            return None
        plist = ds.id.get_create_plist()
        if plist.get_layout() != h5py.h5d.CONTIGUOUS or plist.get_nfilters() or ds.external:
            return None
        if ds.id.get_type() != h5py.h5t.py_create(ds.dtype):
            return None  # e.g. 12-bit integers in 16: h5py converts them, raw bytes would lie
        offset = ds.id.get_offset()
        if offset is None:  # never written: h5py returns the fill value
            return None
        if offset + spec.nbytes > size:
            raise FormatError(
                f"{self.path}: tensor {spec.name!r}: file is truncated: its data runs through "
                f"byte {offset + spec.nbytes}, file is {size} bytes; copy the file again"
            )
        return int(offset)

    def _ordered(self, paths: list[str]) -> list[str]:
        """Datasets in definition order where the file records it, else natural name order."""
        keras = {p: i for i, p in enumerate(self._keras2_order())}
        ranks: dict[str, dict[str, int] | None] = {}

        def rank_in(group: str, child: str) -> tuple[Any, ...]:
            if group not in ranks:
                g = self._h5[group or "/"]  # "/": the root group's plist, not the file's
                tracked = g.id.get_create_plist().get_link_creation_order()
                ranks[group] = {k: i for i, k in enumerate(g.keys())} if tracked else None
            order = ranks[group]
            return (order[child],) if order is not None else _natural(child)

        def key(path: str) -> tuple[Any, ...]:
            if path in keras:
                return (0, keras[path])
            parts = path.split("/")
            return (1, tuple(rank_in("/".join(parts[:i]), p) for i, p in enumerate(parts)))

        return sorted(paths, key=key)

    def _keras2_order(self) -> list[str]:
        """Keras 2 lists layers in ``layer_names`` and each layer's weights in ``weight_names``."""
        out: list[str] = []
        for prefix in ("", "model_weights/"):
            group = self._child(self._h5, prefix.rstrip("/")) if prefix else self._h5
            if group is None:
                continue
            for layer in _names(group.attrs.get("layer_names")):
                layer_group = self._child(group, layer)
                if layer_group is not None:
                    weights = _names(layer_group.attrs.get("weight_names"))
                    out += [f"{prefix}{layer}/{w}" for w in weights]
        optimizer = self._child(self._h5, "optimizer_weights")
        if optimizer is not None:
            weights = _names(optimizer.attrs.get("weight_names"))
            out += [f"optimizer_weights/{w}" for w in weights]
        return out

    @staticmethod
    def _child(group: Any, name: str) -> Any:
        """`group[name]` if it is a group inside this file, else None.

        Only hard links are followed: names come from attributes, and an external link would
        make HDF5 open whatever file it names (a FIFO would block forever).
        """
        try:
            for part in name.split("/"):  # each step: HDF5 would follow a link on the way too
                if not isinstance(group.get(part, getlink=True), h5py.HardLink):
                    return None
                group = group[part]
                if not isinstance(group, h5py.Group):
                    return None
        except _H5PY_ERRORS:  # a name HDF5 cannot look up
            return None
        return group

    def read(self, name: str) -> np.ndarray:
        """The tensor as a read-only array: a memory map when contiguous and little-endian."""
        entry = self._datasets.get(name)
        if entry is None:
            raise self._missing(name)
        spec = self._spec[name]
        want = dtypes.to_numpy(spec.dtype)
        if entry.offset is not None:
            if self._file is None:
                self._file = map_source(self.path)
            arr = self._file.array(self._base + entry.offset, spec)
        else:
            try:
                ds = self._h5[entry.path]
                # Never written: every element is the fill value. A view of that one value, not
                # an allocation of the size the file claims.
                unwritten = spec.nbytes > 0 and ds.id.get_storage_size() == 0
                arr = np.asarray(ds.fillvalue, dtype=ds.dtype) if unwritten else np.asarray(ds[()])
            except _H5PY_ERRORS as e:
                raise FormatError(
                    f"{self.path}: tensor {name!r}: HDF5 cannot read it ({e}); the file is "
                    "corrupt: copy it again"
                ) from e
            except MemoryError as e:
                raise FormatError(
                    f"{self.path}: tensor {name!r}: its {spec.nbytes} bytes do not fit in memory "
                    "(a chunked or compressed dataset is read whole)"
                ) from e
            if not _is_little(arr.dtype):
                arr = arr.astype(arr.dtype.newbyteorder("<"))
            arr = arr.view(want) if arr.dtype != want else arr
            if unwritten:
                arr = np.broadcast_to(arr, spec.shape)
        if arr.flags.writeable:
            arr.flags.writeable = False
        return arr

    def byte_range(self, name: str) -> ByteRange | None:
        entry = self._datasets.get(name)
        if entry is None or entry.offset is None:
            return None
        return local_range(self.path, self._base + entry.offset, self._spec[name].nbytes)

    def release(self, name: str) -> None:
        entry = self._datasets.get(name)
        if self._file is not None and entry is not None and entry.offset is not None:
            self._file.release(self._base + entry.offset, self._spec[name].nbytes)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        h5 = getattr(self, "_h5", None)
        if h5 is not None:
            h5.close()
        if self._window is not None:
            self._window.close()
            self._window = None
        if self._zip is not None:
            self._zip.close()
            self._zip = None


def _check_names(path: str, tensors: Sequence[TensorSpec]) -> None:
    """Refuse names that would not read back the same as HDF5 paths, before creating anything."""
    groups: dict[str, str] = {}
    for t in tensors:
        parts = t.name.split("/")
        if any(p in ("", ".", "..") for p in parts) or "\0" in t.name:
            raise FormatError(
                f"{path}: tensor name {t.name!r} cannot be an HDF5 path: a leading, trailing or "
                "doubled '/', a '.' or '..' part, or a NUL would read back under another name; "
                "rename it (e.g. with a rule)"
            )
        for i in range(1, len(parts)):
            groups.setdefault("/".join(parts[:i]), t.name)
    for t in tensors:
        if t.name in groups:
            raise FormatError(
                f"{path}: tensor {t.name!r} would also have to be the HDF5 group holding "
                f"{groups[t.name]!r}, and a path cannot be both; rename one of them"
            )


class HDF5Writer:
    """Writes one HDF5 file: every dataset declared up front, then filled as tiles arrive."""

    suffix = ".h5"

    def __init__(
        self, path: str, tensors: Sequence[TensorSpec], metadata: dict[str, str] | None = None
    ) -> None:
        self.path = os.fspath(path)
        tensors = list(tensors)
        self._cursor = TileCursor(self.path, tensors)
        _check_names(self.path, tensors)
        # Tracking creation order lets readers list tensors in declared order.
        self._h5 = h5py.File(self.path, "w", track_order=True)
        self._datasets: dict[str, Any] = {}
        try:
            for key, value in (metadata or {}).items():
                self._h5.attrs[str(key)] = str(value)
            for t in tensors:
                self._datasets[t.name] = self._declare(t)
        except BaseException:
            self._h5.close()
            raise

    def _declare(self, spec: TensorSpec) -> Any:
        *parents, leaf = spec.name.split("/")
        group = self._h5
        for part in parents:
            existing = group.get(part)
            group = existing if existing is not None else group.create_group(part, track_order=True)
        stored = STORED_AS.get(spec.dtype, dtypes.to_numpy(spec.dtype))
        # No chunks, no filters: contiguous, so readers can map it. Space is allocated at the
        # first write, so data lands in the file in the order tiles arrive.
        ds = group.create_dataset(leaf, shape=spec.shape, dtype=stored)
        if spec.dtype in STORED_AS:
            ds.attrs[DTYPE_ATTR] = spec.dtype
        return ds

    def write(self, name: str, tile: np.ndarray, row: int) -> None:
        """Write one tile: consecutive whole rows of `name`, in declared order."""
        spec, data = self._cursor.tile(name, tile, row)
        if data.size == 0:
            return
        if spec.dtype in STORED_AS:
            data = data.view(STORED_AS[spec.dtype])
        ds = self._datasets[name]
        if not spec.shape:
            ds[()] = data
        else:
            ds.write_direct(data, dest_sel=np.s_[row : row + data.shape[0]])

    def copy_from(self, name: str, src: ByteRange) -> bool:
        """Not supported: HDF5 places the bytes itself; the caller writes tiles instead."""
        return False

    def close(self) -> None:
        """Check every tensor is complete, then flush, close and fsync the file.

        Raises:
            FormatError: some declared tensor did not get all its rows.
        """
        self._cursor.close()
        self._datasets.clear()
        self._h5.flush()
        self._h5.close()
        fd = os.open(self.path, os.O_RDONLY)  # h5py does not expose its descriptor
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def abort(self) -> None:
        """Close the file without checks; the caller deletes it."""
        self._datasets.clear()
        try:
            self._h5.close()
        except (OSError, ValueError, RuntimeError):  # a half-written file: nothing left to save
            pass


Writer = HDF5Writer


def open_reader(path: str) -> HDF5Reader:
    """Open an HDF5 file or `.keras` archive; specs are read now, data on `read`."""
    return HDF5Reader(path)
