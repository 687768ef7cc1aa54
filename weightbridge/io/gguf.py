"""GGUF (llama.cpp): a header-first reader that dequantizes on read, and a streaming writer.

Layout (little-endian; GGUF versions 2 and 3):

- ``GGUF`` magic, a u32 version, a u64 tensor count and a u64 key-value count;
- the key-values: a string key (u64 length + UTF-8 bytes), a u32 value type, the value (scalars,
  strings, or arrays of one type: u32 element type, u64 count, elements);
- the tensor infos: a string name, a u32 dimension count, that many u64 dimensions ``ne``
  (``ne[0]`` varies fastest), a u32 GGML type id, a u64 offset from the start of the data;
- padding to the alignment (``general.alignment``, default 32), then the data.

Shapes are numpy's, as gguf-py's reader gives them: row-major, the reverse of ``ne``. Plain
types (F32, F16, BF16, F64, I8-I64) are memory-mapped views. Quantized types are dequantized
on read (float32 by default; `open_reader(path, dtype="BF16")` chooses) tile by tile, each tile
whole blocks in file order, so the memory beyond the output tensor stays a few tiles;
`weightbridge.io._gguf_quants` says which types it can dequantize (bit-exact with gguf-py), the
others are refused by name. Every count, length and offset is checked against the file size
before it is used.

Key-values are kept whole (`key_values`); the spec's metadata shows each as a short string.

`GgufWriter` writes F32, F16, BF16, F64 and integer tensors as they are (Q8_0 and Q4_0 on request),
with the header computed from the specs first, then each tensor's tiles at its aligned offset;
gguf-py's `GGUFReader` is the oracle in the tests.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from weightbridge import dtypes
from weightbridge.errors import DtypeError, FormatError
from weightbridge.io._gguf_quants import QUANTIZERS, TYPES, GgmlType, dequantize
from weightbridge.io._gguf_quants import quantize as quantize_blocks
from weightbridge.io._tiles import TileCursor
from weightbridge.io.base import (
    BaseReader,
    ByteRange,
    Sliceable,
    local_range,
    source_buffer,
    source_size,
)
from weightbridge.spec import MAX_NBYTES, CheckpointSpec, TensorSpec

NAME = "gguf"
SUFFIXES = (".gguf",)

MAGIC = b"GGUF"
# The versions with 64-bit counts; version 1 (2023, 32-bit counts) is long gone from the hubs.
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# ggml tensors have at most 4 dimensions (GGML_MAX_DIMS).
MAX_DIMS = 4
# Nested arrays deeper than this are no GGUF writer's output; stops a recursion bomb.
_MAX_ARRAY_DEPTH = 8
# Array items in all key-values together, each becoming a Python object: a 256k-token vocabulary
# with its scores, types and merges is about 1M. A header claiming far more (8-byte empty
# strings fill a large file cheaply) would cost gigabytes of objects, so it is refused.
_MAX_ARRAY_ITEMS = 1 << 22
# Elements dequantized per tile: 4 MB of float32 output, and the kernels' temporaries a few
# times that, whatever the tensor's size.
_TILE_ELEMENTS = 1 << 20
# How the spec's metadata shows key-values: arrays (a vocabulary of 150k tokens) by their first
# items, strings (a chat template of several KB) by their start.
_SHOWN_ITEMS = 8
_SHOWN_CHARS = 200
# The GGML types `read` handles, for messages.
_READABLE = tuple(t.name for t in TYPES.values() if t.code is not None or t.kernel is not None)
# The output dtypes a quantized tensor can be dequantized to.
OUTPUT_DTYPES = ("F32", "F16", "BF16")

# GGUF value types: id -> (name, struct format). STRING (8) and ARRAY (9) have no format.
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("UINT8", "<B"),
    1: ("INT8", "<b"),
    2: ("UINT16", "<H"),
    3: ("INT16", "<h"),
    4: ("UINT32", "<I"),
    5: ("INT32", "<i"),
    6: ("FLOAT32", "<f"),
    7: ("BOOL", "<?"),
    10: ("UINT64", "<Q"),
    11: ("INT64", "<q"),
    12: ("FLOAT64", "<d"),
}
_STRING, _ARRAY = 8, 9


def value_type_name(type_id: int) -> str:
    """The GGUF name of a value type id (``8`` -> ``"STRING"``)."""
    if type_id == _STRING:
        return "STRING"
    if type_id == _ARRAY:
        return "ARRAY"
    return _SCALARS[type_id][0]


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One GGUF key-value: its value type (``UINT32``; for arrays ``ARRAY`` and the element
    type in `item_type`) and the value as Python (ints, floats, bools, str, lists)."""

    key: str
    type: str
    value: Any
    item_type: str | None = None


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor as the header declares it: GGUF dims (``ne``), GGML type, data offset."""

    name: str
    ne: tuple[int, ...]
    kind: GgmlType
    offset: int  # absolute, in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.ne))


def detect(path: str, head: bytes) -> bool:
    """True when the file starts with the GGUF magic."""
    return head[:4] == MAGIC


class _Cursor:
    """Reads the header from a mapped file; every read checks the bytes are there."""

    def __init__(self, path: str, data: Sliceable, size: int) -> None:
        self.path, self.data, self.size, self.pos = path, data, size, 0
        self.items = 0  # array items read so far

    def take(self, n: int, what: str) -> bytes:
        if n > self.size - self.pos:
            raise FormatError(
                f"{self.path}: file is truncated: {what} at byte {self.pos} needs {n} bytes, "
                f"the file has {self.size}"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return bytes(out)

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def u32(self, what: str) -> int:
        return int(self.unpack("<I", what))

    def u64(self, what: str) -> int:
        return int(self.unpack("<Q", what))

    def string(self, what: str) -> str:
        n = self.u64(f"the length of {what}")
        raw = self.take(n, what)  # refuses a length past the end before allocating
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise FormatError(f"{self.path}: {what} at byte {self.pos - n} is not UTF-8") from e

    def count(self, n: int, min_bytes: int, what: str) -> int:
        """`n` items of at least `min_bytes` each must fit in what is left of the file."""
        if n * min_bytes > self.size - self.pos:
            raise FormatError(
                f"{self.path}: the header declares {n} {what}, which cannot fit in the "
                f"{self.size - self.pos} bytes left after byte {self.pos}; the file is corrupt "
                "or truncated"
            )
        return n

    def value(self, type_id: int, what: str, depth: int = 0) -> Any:
        scalar = _SCALARS.get(type_id)
        if scalar is not None:
            return self.unpack(scalar[1], what)
        if type_id == _STRING:
            return self.string(what)
        if type_id == _ARRAY and depth < _MAX_ARRAY_DEPTH:
            item = self.u32(f"the element type of {what}")
            n = self.count(self.u64(f"the length of {what}"), _min_size(item), f"items in {what}")
            self.items += n
            if self.items > _MAX_ARRAY_ITEMS:
                raise FormatError(
                    f"{self.path}: {what} brings the header's array items to {self.items}, over "
                    f"the {_MAX_ARRAY_ITEMS} weightbridge reads (a large vocabulary has about "
                    "1M); the file is corrupt or hostile"
                )
            if item in _SCALARS and item != 7:  # numbers: one read for all (a vocab's scores)
                fmt = _SCALARS[item][1]
                raw = self.take(n * struct.calcsize(fmt), what)
                return np.frombuffer(raw, dtype=np.dtype(fmt)).tolist()
            return [self.value(item, f"{what}[{i}]", depth + 1) for i in range(n)]
        raise FormatError(
            f"{self.path}: {what} has value type {type_id}, which GGUF does not define "
            f"(known: 0-12); the file is corrupt or from a newer GGUF"
        )


def _min_size(type_id: int) -> int:
    """The fewest bytes a value of a type takes (an empty string or array still has lengths)."""
    scalar = _SCALARS.get(type_id)
    if scalar is not None:
        return struct.calcsize(scalar[1])
    return 12 if type_id == _ARRAY else 8


class GgufReader(BaseReader):
    """Reads one `.gguf` file. Plain tensors are memory maps; quantized ones are dequantized
    to `dtype` (F32, F16 or BF16) on each read."""

    def __init__(self, path: str, *, dtype: str = "F32") -> None:
        self.path = os.fspath(path)
        self.dtype = dtype.upper()
        if self.dtype not in OUTPUT_DTYPES:
            raise FormatError(
                f"{self.path}: cannot dequantize to {dtype!r}; choose one of {OUTPUT_DTYPES}"
            )
        with contextlib.ExitStack() as stack:
            try:
                size = source_size(self.path)
                data = stack.enter_context(source_buffer(self.path))
            except FileNotFoundError as e:
                raise FormatError(f"{self.path}: file not found") from e
            except OSError as e:
                raise FormatError(f"{self.path}: cannot read: {e.strerror or e}") from e
            self._parse(_Cursor(self.path, data, size))

    def _parse(self, cur: _Cursor) -> None:
        if cur.take(4, "the magic") != MAGIC:
            raise FormatError(f"{self.path}: not a GGUF file (it does not start with 'GGUF')")
        version = cur.u32("the version")
        if version not in VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            hint = (
                "; it is a big-endian GGUF, which weightbridge does not read"
                if swapped in VERSIONS
                else ""
            )
            raise FormatError(
                f"{self.path}: GGUF version {version} is not read (versions {VERSIONS}){hint}"
            )
        n_tensors = cur.u64("the tensor count")
        n_kv = cur.u64("the key-value count")
        # A key-value is at least an 8-byte key length, a 4-byte type and a 1-byte value; a
        # tensor info at least an 8-byte name length, 4-byte dim count, type and offset.
        cur.count(n_kv, 13, "key-values")
        self._kv: dict[str, KeyValue] = {}
        for i in range(n_kv):
            key = cur.string(f"the key of key-value {i}")
            type_id = cur.u32(f"the value type of {key!r}")
            start = cur.pos
            value = cur.value(type_id, f"key-value {key!r}")
            if key in self._kv:
                raise FormatError(f"{self.path}: key {key!r} appears twice in the header")
            item = None
            if type_id == _ARRAY:
                item_id = struct.unpack("<I", cur.data[start : start + 4])[0]
                item = (
                    value_type_name(item_id) if item_id in _SCALARS or item_id in (8, 9) else None
                )
            self._kv[key] = KeyValue(key, value_type_name(type_id), value, item)
        self._align = alignment = self._alignment()
        cur.count(n_tensors, 32, "tensors")
        raw_infos = [self._tensor_info(cur, i) for i in range(n_tensors)]
        data_start = cur.pos + (-cur.pos % alignment)
        self._infos: dict[str, TensorInfo] = {}
        for name, ne, kind, offset in raw_infos:
            if name in self._infos:
                raise FormatError(f"{self.path}: tensor {name!r} is declared twice")
            self._infos[name] = self._check_info(name, ne, kind, offset, data_start, cur.size)
        self._check_overlaps()
        self._data_start = data_start
        tensors = [self._spec_of(info) for info in self._infos.values()]
        self._spec = CheckpointSpec(tuple(tensors), self._metadata(version))

    def _alignment(self) -> int:
        kv = self._kv.get("general.alignment")
        if kv is None:
            return DEFAULT_ALIGNMENT
        if kv.type != "UINT32" or kv.value <= 0 or kv.value & (kv.value - 1):
            raise FormatError(
                f"{self.path}: general.alignment must be a UINT32 power of two, found "
                f"{kv.type} {kv.value!r}"
            )
        return int(kv.value)

    def _tensor_info(self, cur: _Cursor, i: int) -> tuple[str, tuple[int, ...], GgmlType, int]:
        name = cur.string(f"the name of tensor {i}")
        where = f"tensor {name!r}"
        n_dims = cur.u32(f"the dimension count of {where}")
        if n_dims > MAX_DIMS:
            raise FormatError(
                f"{self.path}: {where} has {n_dims} dimensions; GGUF tensors have at most "
                f"{MAX_DIMS}"
            )
        ne = tuple(cur.u64(f"dimension {d} of {where}") for d in range(n_dims))
        type_id = cur.u32(f"the type of {where}")
        offset = cur.u64(f"the data offset of {where}")
        kind = TYPES.get(type_id)
        if kind is None:
            raise FormatError(
                f"{self.path}: {where} has GGML type id {type_id}, which weightbridge does not "
                f"know (known: {sorted(TYPES)}); the file is corrupt or from a newer ggml"
            )
        return name, ne, kind, offset

    def _check_info(
        self,
        name: str,
        ne: tuple[int, ...],
        kind: GgmlType,
        offset: int,
        data_start: int,
        size: int,
    ) -> TensorInfo:
        where = f"{self.path}: tensor {name!r}"
        if any(d > MAX_NBYTES for d in ne) or math.prod(ne) > MAX_NBYTES:
            raise FormatError(f"{where}: dimensions {ne} are absurd; the header is corrupt")
        row = ne[0] if ne else 1
        if kind.quantized and row % kind.block_size:
            raise FormatError(
                f"{where}: rows of {row} elements are not whole {kind.name} blocks of "
                f"{kind.block_size}; the header is corrupt"
            )
        nbytes = math.prod(ne) // kind.block_size * kind.type_size
        alignment = self._align
        if offset % alignment:
            raise FormatError(
                f"{where}: data offset {offset} is not a multiple of the alignment {alignment}"
            )
        end = data_start + offset + nbytes
        if end > size:
            raise FormatError(
                f"{where}: file is truncated or the offset is wrong: the header puts its "
                f"{nbytes} bytes of {kind.name} at bytes [{data_start + offset}, {end}), the "
                f"file has {size} bytes"
            )
        return TensorInfo(name, ne, kind, data_start + offset, nbytes)

    def _check_overlaps(self) -> None:
        prev: TensorInfo | None = None
        for info in sorted(self._infos.values(), key=lambda t: t.offset):
            if prev is not None and info.offset < prev.offset + prev.nbytes:
                raise FormatError(
                    f"{self.path}: tensor {info.name!r} at byte {info.offset} overlaps tensor "
                    f"{prev.name!r}, which ends at {prev.offset + prev.nbytes}; the header is "
                    "corrupt"
                )
            if info.nbytes:
                prev = info

    def _spec_of(self, info: TensorInfo) -> TensorSpec:
        return TensorSpec(info.name, info.shape, info.kind.code or self.dtype)

    def _metadata(self, version: int) -> dict[str, str]:
        meta = {"gguf.version": str(version)}
        for kv in self._kv.values():
            meta[kv.key] = _show(kv)
        quantized: dict[str, int] = {}
        for info in self._infos.values():
            if info.kind.quantized:
                quantized[info.kind.name] = quantized.get(info.kind.name, 0) + 1
        if quantized:
            counts = ", ".join(f"{n} {k}" for k, n in sorted(quantized.items()))
            meta["gguf.dequantized"] = f"{counts} tensors, read as {self.dtype}"
        return meta

    # -- the header, whole ----------------------------------------------------------------

    def key_values(self) -> dict[str, KeyValue]:
        """Every key-value of the header, in file order, with its full value."""
        return dict(self._kv)

    def tensor_info(self, name: str) -> TensorInfo:
        """The header's record of tensor `name` (its GGML type, ``ne``, byte range)."""
        if name not in self._infos:
            raise self._missing(name)
        return self._infos[name]

    # -- data -------------------------------------------------------------------------------

    def read(self, name: str) -> np.ndarray:
        info = self._infos.get(name)
        if info is None:
            raise self._missing(name)
        spec = self._spec[name]
        if not info.kind.quantized:
            return self._mapped().array(info.offset, spec)
        if info.kind.kernel is None:
            raise DtypeError(
                f"{self.path}: tensor {name!r} is {info.kind.name}, which weightbridge cannot "
                f"dequantize yet (it reads {', '.join(_READABLE)}); requantize the file with "
                "llama.cpp's llama-quantize first"
            )
        return self._dequantized(info, spec)

    def _dequantized(self, info: TensorInfo, spec: TensorSpec) -> np.ndarray:
        out = np.empty(spec.shape, dtype=dtypes.to_numpy(spec.dtype))
        if out.size:
            mapped = self._mapped()
            raw = mapped.array(info.offset, TensorSpec(info.name, (info.nbytes,), "U8"))
            kind = info.kind
            flat = out.reshape(-1)
            # Blocks follow each other in the file in the output's C order (rows are whole
            # blocks), so tiles of whole blocks bound memory even within one long row.
            step = max(1, _TILE_ELEMENTS // kind.block_size)
            blocks = out.size // kind.block_size
            # A NaN or infinite scale is what the file says; no warning for passing it on.
            with np.errstate(all="ignore"):
                for b in range(0, blocks, step):
                    end = min(blocks, b + step)
                    start, stop = b * kind.type_size, end * kind.type_size
                    flat[b * kind.block_size : end * kind.block_size] = dequantize(
                        kind, raw[start:stop]
                    )
                    mapped.release(info.offset + start, stop - start)
        out.flags.writeable = False
        return out

    def byte_range(self, name: str) -> ByteRange | None:
        info = self._infos.get(name)
        if info is None or info.kind.quantized:
            return None
        return local_range(self.path, info.offset, info.nbytes)

    def prefetch(self, name: str) -> None:
        info = self._infos.get(name)
        if info is not None:
            self._mapped().prefetch(info.offset, info.nbytes)

    def release(self, name: str) -> None:
        info = self._infos.get(name)
        if self._file is not None and info is not None:
            self._file.release(info.offset, info.nbytes)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _show(kv: KeyValue) -> str:
    """A key-value as one short line for `inspect`."""

    def one(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            text = v if len(v) <= _SHOWN_CHARS else v[:_SHOWN_CHARS] + f"... ({len(v)} chars)"
            return repr(text) if kv.type == "ARRAY" else text
        return repr(v)

    if kv.type != "ARRAY":
        return one(kv.value)
    items = kv.value
    shown = ", ".join(one(v) for v in items[:_SHOWN_ITEMS])
    more = ", ..." if len(items) > _SHOWN_ITEMS else ""
    return f"[{shown}{more}] ({len(items)} x {kv.item_type or '?'})"


# --------------------------------------------------------------------------------------------
# Writing.

# weightbridge dtype code -> GGML type id of the types written as they are.
_WRITE_TYPES = {t.code: t for t in TYPES.values() if t.code is not None}
_TYPE_BY_NAME = {t.name: t.id for t in TYPES.values()}
# The value types of key-values we write, by name (the reverse of `value_type_name`).
_TYPE_IDS = {name: i for i, (name, _) in _SCALARS.items()} | {"STRING": _STRING, "ARRAY": _ARRAY}


def _encode_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _encode_value(type_name: str, value: Any, item_type: str | None, where: str) -> bytes:
    """The bytes of one key-value's value (without its type id)."""
    type_id = _TYPE_IDS.get(type_name)
    if type_id is None:
        raise FormatError(f"{where}: unknown GGUF value type {type_name!r}")
    if type_id == _STRING:
        return _encode_string(str(value))
    if type_id == _ARRAY:
        if item_type is None or item_type == "ARRAY" or not isinstance(value, (list, tuple)):
            raise FormatError(f"{where}: arrays of arrays or of unknown items are not written")
        items = b"".join(_encode_value(item_type, v, None, where) for v in value)
        return struct.pack("<IQ", _TYPE_IDS[item_type], len(value)) + items
    try:
        return struct.pack(_SCALARS[type_id][1], value)
    except struct.error as e:
        raise FormatError(f"{where}: {value!r} is not a {type_name} ({e})") from e


def encode_key_value(kv: KeyValue) -> bytes:
    """One key-value as GGUF stores it: key, value type, value.

    >>> encode_key_value(KeyValue("general.alignment", "UINT32", 64)).hex()
    '110000000000000067656e6572616c2e616c69676e6d656e740400000040000000'
    """
    value = _encode_value(kv.type, kv.value, kv.item_type, f"key-value {kv.key!r}")
    return _encode_string(kv.key) + struct.pack("<I", _TYPE_IDS[kv.type]) + value


class GgufWriter:
    """Writes one `.gguf` file: F32, F16, BF16, F64 and integer tensors kept as they are, and
    the float tensors named in `quantize` (name -> ``"Q8_0"`` or ``"Q4_0"``) quantized tile by tile.

    The whole header (key-values, tensor infos with every data offset) depends only on the
    specs, so it is written first; each tensor's tiles then follow at its aligned offset.
    String `metadata` becomes STRING key-values (``general.alignment``, if given, a UINT32);
    `key_values` (from `GgufReader.key_values`) are written with their own types.
    """

    suffix = ".gguf"

    def __init__(
        self,
        path: str,
        tensors: Sequence[TensorSpec],
        metadata: dict[str, str] | None = None,
        *,
        key_values: Sequence[KeyValue] = (),
        quantize: Mapping[str, str] | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self._quantize: dict[str, GgmlType] = {}
        kvs: dict[str, KeyValue] = {kv.key: kv for kv in key_values}
        for key, value in (metadata or {}).items():
            if key == "general.alignment":
                kvs[key] = KeyValue(key, "UINT32", int(value))
            else:
                kvs.setdefault(key, KeyValue(key, "STRING", str(value)))
        align_kv = kvs.get("general.alignment")
        self.alignment = int(align_kv.value) if align_kv is not None else DEFAULT_ALIGNMENT
        if self.alignment <= 0 or self.alignment & (self.alignment - 1):
            raise FormatError(
                f"{self.path}: general.alignment {self.alignment} is not a power of two"
            )
        infos = b""
        self._offsets: dict[str, int] = {}
        offset = 0
        for spec in tensors:
            kind = _WRITE_TYPES.get(spec.dtype)
            qname = (quantize or {}).get(spec.name)
            if qname is not None:
                kind = self._quantized_kind(spec, qname)
            if kind is None:
                raise FormatError(
                    f"{self.path}: tensor {spec.name!r}: GGUF has no type for {spec.dtype}; "
                    f"write one of {sorted(_WRITE_TYPES)} (cast with dtype=)"
                )
            if len(spec.shape) > MAX_DIMS:
                raise FormatError(
                    f"{self.path}: tensor {spec.name!r} has {len(spec.shape)} dimensions; GGUF "
                    f"tensors have at most {MAX_DIMS}"
                )
            ne = tuple(reversed(spec.shape))
            infos += _encode_string(spec.name) + struct.pack("<I", len(ne))
            infos += b"".join(struct.pack("<Q", d) for d in ne)
            infos += struct.pack("<IQ", kind.id, offset)
            self._offsets[spec.name] = offset
            nbytes = spec.numel // kind.block_size * kind.type_size
            offset += nbytes + (-nbytes % self.alignment)
        header = MAGIC + struct.pack("<IQQ", VERSIONS[-1], len(self._offsets), len(kvs))
        header += b"".join(encode_key_value(kv) for kv in kvs.values()) + infos
        header += b"\0" * (-len(header) % self.alignment)
        self._data_start = len(header)
        self._end = self._data_start + offset
        self._cursor = TileCursor(self.path, tensors, begin=self._begin)
        self._f = open(self.path, "wb")  # noqa: SIM115 - closed in close()/abort()
        self._f.write(header)

    def _quantized_kind(self, spec: TensorSpec, name: str) -> GgmlType:
        kind = TYPES.get(_TYPE_BY_NAME.get(name.upper(), -1))
        where = f"{self.path}: tensor {spec.name!r}"
        if kind is None or kind.name not in QUANTIZERS:
            raise FormatError(
                f"{where}: cannot quantize to {name!r}; choose one of {sorted(QUANTIZERS)}"
            )
        if spec.dtype not in OUTPUT_DTYPES:
            raise FormatError(
                f"{where}: only float tensors are quantized, this one is {spec.dtype}"
            )
        row = spec.shape[-1] if spec.shape else 1
        if row % kind.block_size:
            raise FormatError(
                f"{where}: rows of {row} elements are not whole {kind.name} blocks of "
                f"{kind.block_size}; keep it as {spec.dtype}"
            )
        self._quantize[spec.name] = kind
        return kind

    def _begin(self, spec: TensorSpec) -> None:
        # Padding up to the tensor's aligned offset (a zero-byte tensor still has one).
        self._f.write(b"\0" * (self._data_start + self._offsets[spec.name] - self._f.tell()))

    def write(self, name: str, tile: np.ndarray, row: int) -> None:
        """Append one tile: consecutive whole rows of `name`, in declared order."""
        _, data = self._cursor.tile(name, tile, row)
        kind = self._quantize.get(name)
        if kind is not None and data.size:  # whole rows are whole blocks: quantize tile by tile
            data = quantize_blocks(kind, data.astype(np.float32).reshape(-1))
        if data.size:
            self._f.write(data.reshape(-1).view(np.uint8).data)

    def copy_from(self, name: str, src: ByteRange) -> bool:
        """Decline: tensors pass through as tiles (a file-to-file copy is a later speed-up)."""
        return False

    def close(self) -> None:
        """Pad the last tensor, then flush and fsync.

        Raises:
            FormatError: some declared tensor did not get all its rows.
        """
        self._cursor.close()
        self._f.write(b"\0" * (self._end - self._f.tell()))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def abort(self) -> None:
        """Close the file unfinished; the caller deletes it."""
        try:
            self._f.close()
        except OSError:  # a half-written file: nothing left to save
            pass


Writer = GgufWriter


def open_reader(path: str, *, dtype: str = "F32") -> GgufReader:
    """Open a GGUF file; quantized tensors read as `dtype` (F32, F16 or BF16)."""
    return GgufReader(path, dtype=dtype)
