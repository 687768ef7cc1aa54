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

A llama.cpp split set (``model-00001-of-00003.gguf`` ..., with ``split.no``/``split.count``/
``split.tensors.count``) reads as one checkpoint from its first file or its folder.

`GgufWriter` writes F32, F16, BF16, F64 and integer tensors as they are (Q8_0 and Q4_0 on request),
with the header computed from the specs first, then each tensor's tiles at its aligned offset;
gguf-py's `GGUFReader` is the oracle in the tests. For a conversion (``--format gguf``):
``--dtype q8_0`` quantizes what llama.cpp's ``--outtype q8_0`` quantizes (`stored_type`,
`with_outtype`), ``--gguf-metadata FILE`` copies another GGUF's key-values, and several output
shards are a split set named and keyed as gguf-split writes them.
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from weightbridge import dtypes
from weightbridge.errors import DtypeError, FormatError, SpecError
from weightbridge.io._gguf_quants import BY_NAME, QUANTIZERS, TYPES, GgmlType, dequantize
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
from weightbridge.ops import Cast
from weightbridge.plan import Note, Plan, Step
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

# llama.cpp's split files (gguf-split, gguf-py's GGUFWriter): ``<stem>-00001-of-00003.gguf``, each
# with these key-values (gguf-py's `Keys.Split`; llama.cpp's LLM_KV_SPLIT_*): the split's number
# from 0 (UINT16), the number of splits (UINT16) and the tensors in all splits (INT32).
SPLIT_NAME = re.compile(r"-(\d{5})-of-(\d{5})\.gguf")
SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS = "split.no", "split.count", "split.tensors.count"
# Key-values whose values the writer decides (the layout), never copied from another file.
_LAYOUT_KEYS = ("general.alignment", SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS)

# Options of `GgufWriter` that travel in a shard's string metadata: the one channel from
# `convert` to each shard's writer, in whichever process it runs. The writer takes them out of
# the metadata; they are not written as key-values.
OPTION_OUTTYPE = "weightbridge.gguf.outtype"  # "Q8_0": quantize as llama.cpp's --outtype q8_0
OPTION_KEY_VALUES = "weightbridge.gguf.key_values_from"  # a GGUF whose key-values are copied
OPTION_TENSORS = "weightbridge.gguf.tensor_count"  # tensors in all splits (split.tensors.count)
_OPTIONS = (OPTION_OUTTYPE, OPTION_KEY_VALUES, OPTION_TENSORS)
# llama.cpp's `general.file_type` (gguf-py's LlamaFileType) of a file quantized to each type.
_FILE_TYPES = {"Q8_0": 7, "Q4_0": 2}

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
    """True when the file starts with the GGUF magic, or for a directory holding the first
    file of a llama.cpp split set (``*-00001-of-0000N.gguf``)."""
    if head[:4] == MAGIC:
        return True
    return not head and os.path.isdir(path) and bool(_first_splits(path))


def _first_splits(folder: str) -> list[str]:
    """The first files of the split sets in `folder`."""
    pattern = "*-00001-of-[0-9][0-9][0-9][0-9][0-9].gguf"
    return sorted(glob.glob(os.path.join(glob.escape(folder), pattern)))


def _first_split_in(folder: str) -> str | None:
    """The first file of the one split set in `folder` (None if there is none).

    Raises:
        FormatError: the folder holds several split sets.
    """
    found = _first_splits(folder)
    if len(found) > 1:
        raise FormatError(
            f"{folder}: several GGUF split sets {[os.path.basename(f) for f in found]}; pass "
            "the first file of the one you mean"
        )
    return found[0] if found else None


def split_files(first: str, count: int) -> list[str]:
    """The files of the split set whose first file is `first`, by llama.cpp's naming.

    >>> split_files("/m/llama-00001-of-00003.gguf", 3)[1:]
    ['/m/llama-00002-of-00003.gguf', '/m/llama-00003-of-00003.gguf']
    """
    m = SPLIT_NAME.search(os.path.basename(first))
    folder, base = os.path.split(first)
    if m is None or m.group(1) != "00001":
        raise FormatError(
            f"{first}: holds split 1 of {count} of a GGUF split set, but is not named like "
            "<stem>-00001-of-0000N.gguf, so the other files cannot be found; rename it as "
            "llama.cpp's gguf-split names them"
        )
    stem = base[: m.start()]
    return [
        os.path.join(folder, f"{stem}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)
    ]


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

    def stored_bytes(self, name: str) -> np.ndarray:
        """Tensor `name`'s bytes as the file stores them (a quantized tensor's blocks), mapped:
        what the shard checksum of a conversion that wrote this file covers."""
        info = self._infos.get(name)
        if info is None:
            raise self._missing(name)
        return self._mapped().array(info.offset, TensorSpec(name, (info.nbytes,), "U8"))

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
# Which tensors a quantized file quantizes: llama.cpp's rule.

# The tensors llama.cpp's convert_hf_to_gguf.py keeps in F32 whatever --outtype says (its
# `match_model_tensor_name` list: MoE routers, position and token-type embeddings, SSM and
# RWKV mixing weights, ...), by their GGUF names.
_F32_NAMES = re.compile(
    r"^blk\.\d+\.(ffn_gate_inp|ssm_conv1d|shortconv\.conv|time_mix_first|time_mix_w1|"
    r"time_mix_w2|time_mix_decay_w1|time_mix_decay_w2|time_mix_lerp_fused|altup_correct_coef|"
    r"altup_predict_coef)\.weight$|^(position_embd|token_types|v\.position_embd|a\.position_embd)"
    r"\.weight$|^posnet\.\d+\.norm[12]\.weight$"
)
# The source dtypes a quantized file quantizes (llama.cpp converts floats only).
_QUANTIZABLE = ("F32", "F16", "BF16")


def outtype_of(dtype: str | None) -> str | None:
    """The GGML type `dtype` names when it is a GGUF quantization (``"q8_0"`` -> ``"Q8_0"``),
    else None (a plain dtype such as ``bf16``).

    >>> outtype_of("q8_0"), outtype_of("bf16"), outtype_of(None)
    ('Q8_0', None, None)
    """
    if dtype is None:
        return None
    name = dtype.strip().upper()
    return name if name in QUANTIZERS else None


def stored_type(spec: TensorSpec, outtype: str) -> str:
    """The GGML type llama.cpp's ``convert_hf_to_gguf.py --outtype q8_0`` (or ``q4_0``) gives
    a tensor: F32 for 1-D tensors, norms, names not ending in ``.weight`` and the tensors it
    always keeps in F32; F16 for rows that are not whole blocks (its fallback when gguf-py
    cannot quantize them); `outtype` for the other float tensors. Integer tensors keep their
    dtype.

    >>> [stored_type(TensorSpec(n, s, "BF16"), "Q8_0") for n, s in [
    ...     ("blk.0.attn_q.weight", (64, 64)), ("blk.0.attn_norm.weight", (64,)),
    ...     ("output.bias", (64, 64)), ("blk.0.ffn_gate_inp.weight", (8, 64)),
    ...     ("blk.0.ffn_up.weight", (64, 48))]]
    ['Q8_0', 'F32', 'F32', 'F32', 'F16']
    """
    if spec.dtype not in _QUANTIZABLE:
        return spec.dtype
    name = spec.name
    if (
        len(spec.shape) <= 1
        or name.endswith("_norm.weight")
        or not name.endswith(".weight")
        or _F32_NAMES.match(name)
    ):
        return "F32"
    if spec.shape[-1] % BY_NAME[outtype].block_size:
        return "F16"
    return outtype


def with_outtype(plan: Plan, outtype: str) -> Plan:
    """`plan` for a GGUF file quantized to `outtype` as llama.cpp does (see `stored_type`):
    tensors llama.cpp keeps in F32 (or F16) get that cast in the plan, the rest keep their
    float dtype and are quantized by the writer (``--dtype q8_0 --format gguf``). A note says
    what goes where.

    Raises:
        SpecError: `outtype` is not a type weightbridge quantizes to.
    """
    if outtype not in QUANTIZERS:
        raise SpecError(
            f"cannot quantize GGUF tensors to {outtype!r}; choose one of {sorted(QUANTIZERS)}"
        )
    steps: list[Step] = []
    kinds: dict[str, list[str]] = {}
    for step in plan.steps:
        t = step.target
        kind = stored_type(t, outtype)
        kinds.setdefault(kind, []).append(t.name)
        if kind in ("F32", "F16") and t.dtype in _QUANTIZABLE and t.dtype != kind:
            cast = Cast(kind)
            step = Step(TensorSpec(t.name, t.shape, kind), step.sources, (*step.ops, cast))
        steps.append(step)
    block = BY_NAME[outtype].block_size
    parts = [f"{len(kinds.get(outtype, []))} tensor(s) quantized to {outtype}"]
    if kinds.get("F32"):
        parts.append(f"{len(kinds['F32'])} kept in F32 (1-D, norms, and the ones llama.cpp keeps)")
    if kinds.get("F16"):
        some = ", ".join(kinds["F16"][:3]) + (", ..." if len(kinds["F16"]) > 3 else "")
        parts.append(
            f"{len(kinds['F16'])} in F16 (rows not whole blocks of {block}, llama.cpp's "
            f"fallback: {some})"
        )
    others = sum(len(v) for k, v in kinds.items() if k not in (outtype, "F32", "F16"))
    if others:
        parts.append(f"{others} non-float tensor(s) as they are")
    text = f"quantize: GGUF {outtype}: " + "; ".join(parts)
    notes = tuple(n for n in plan.notes if n.kind != "quantize") + (Note("quantize", text),)
    return Plan(tuple(steps), plan.source_fingerprint, dict(plan.unused), notes)


_OUTTYPE_NOTE = re.compile(r"^quantize: GGUF (\w+): ")


def outtype_of_plan(plan: Plan) -> str | None:
    """The type `with_outtype` made `plan` for (its ``quantize`` note, which the plan file
    keeps), else None: what `weightbridge verify` expects a GGUF output's tensors stored as.

    >>> from weightbridge.spec import CheckpointSpec
    >>> plain = Plan.build(CheckpointSpec(()), [])
    >>> outtype_of_plan(with_outtype(plain, "Q4_0")), outtype_of_plan(plain)
    ('Q4_0', None)
    """
    for note in plan.notes:
        m = _OUTTYPE_NOTE.match(note.text) if note.kind == "quantize" else None
        if m and m.group(1) in QUANTIZERS:
            return m.group(1)
    return None


def requantized(outtype: str, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What a GGUF writer quantizing to `outtype` stores for `values` (its blocks, as
    `GgufReader.stored_bytes` reads them) and what a reader then gives (dequantized, F32, in
    `values`' shape): quantized from float32 and dequantized again, tile by tile, by the
    writer's and the reader's own kernels, so both are bit-exact.

    >>> x = np.zeros((1, 32), np.float32); x[0, :3] = [127, -3.5, 2.5]  # scale 1
    >>> blocks, back = requantized("Q8_0", x)
    >>> blocks.shape, back.shape, back[0, :3].tolist()
    ((34,), (1, 32), [127.0, -4.0, 3.0])
    """
    kind = BY_NAME[outtype]
    flat = values.reshape(-1)
    blocks = np.empty(flat.size // kind.block_size * kind.type_size, np.uint8)
    back = np.empty(flat.size, np.float32)
    with np.errstate(all="ignore"):  # a NaN or infinite value quantizes as the writer's did
        for start in range(0, flat.size, _TILE_ELEMENTS):
            part = quantize_blocks(kind, flat[start : start + _TILE_ELEMENTS].astype(np.float32))
            part = part.reshape(-1)
            at = start // kind.block_size * kind.type_size
            blocks[at : at + part.size] = part
            back[start : start + _TILE_ELEMENTS] = dequantize(kind, part)
    return blocks, back.reshape(values.shape)


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


@dataclass(frozen=True, slots=True)
class Split:
    """Where one file sits in a llama.cpp split set: its number from 0, the number of files,
    and the tensors in all of them."""

    no: int
    count: int
    tensors: int


class GgufWriter:
    """Writes one `.gguf` file: F32, F16, BF16, F64 and integer tensors kept as they are, and
    the float tensors named in `quantize` (name -> ``"Q8_0"`` or ``"Q4_0"``) quantized tile by tile.

    The whole header (key-values, tensor infos with every data offset) depends only on the
    specs, so it is written first; each tensor's tiles then follow at its aligned offset.
    String `metadata` becomes STRING key-values (``general.alignment``, if given, a UINT32);
    `key_values` (from `GgufReader.key_values`) are written with their own types.

    Options that come through `metadata` from a conversion (see `OPTION_OUTTYPE`): the type to
    quantize to by llama.cpp's rule (`stored_type`), a GGUF file whose key-values are copied
    (all but the layout keys: ``general.alignment``, ``split.*``), and the tensor count of a
    split set. A file in a split set (`split`, or a name like ``model-00002-of-00003.gguf``)
    gets the ``split.*`` keys, and key-values other than the alignment only in the first
    file, as llama.cpp's gguf-split writes them.
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
        split: Split | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self._quantize: dict[str, GgmlType] = {}
        strings = dict(metadata or {})
        options = {k: strings.pop(k) for k in _OPTIONS if k in strings}
        split = split or self._split_of_name(options.get(OPTION_TENSORS))
        first = split is None or split.no == 0
        kvs: dict[str, KeyValue] = {}
        source = options.get(OPTION_KEY_VALUES)
        if source and first:
            for kv in key_values_of(source).values():
                if kv.key not in _LAYOUT_KEYS:
                    kvs[kv.key] = kv
        kvs.update((kv.key, kv) for kv in key_values)
        for key, value in strings.items():
            if key == "general.alignment":
                kvs[key] = KeyValue(key, "UINT32", int(value))
            else:
                kvs.setdefault(key, KeyValue(key, "STRING", str(value)))
        outtype = options.get(OPTION_OUTTYPE)
        if outtype is not None:
            if outtype not in QUANTIZERS:
                raise FormatError(
                    f"{self.path}: cannot quantize to {outtype!r}; choose one of "
                    f"{sorted(QUANTIZERS)}"
                )
            kvs["general.file_type"] = KeyValue("general.file_type", "UINT32", _FILE_TYPES[outtype])
            quantize = dict(quantize or {})
            for spec in tensors:
                if spec.name not in quantize and stored_type(spec, outtype) == outtype:
                    quantize[spec.name] = outtype
        align_kv = kvs.get("general.alignment")
        self.alignment = int(align_kv.value) if align_kv is not None else DEFAULT_ALIGNMENT
        if self.alignment <= 0 or self.alignment & (self.alignment - 1):
            raise FormatError(
                f"{self.path}: general.alignment {self.alignment} is not a power of two"
            )
        if not first:  # the other files of a split set: the layout's keys only
            kvs = {k: v for k, v in kvs.items() if k == "general.alignment"}
        if split is not None:
            for split_key, type_name, number in (
                (SPLIT_NO, "UINT16", split.no),
                (SPLIT_COUNT, "UINT16", split.count),
                (SPLIT_TENSORS, "INT32", split.tensors),
            ):
                kvs.pop(split_key, None)  # written last, as gguf-py and gguf-split do
                kvs[split_key] = KeyValue(split_key, type_name, number)
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

    @staticmethod
    def stored_sizes(metadata: Mapping[str, str] | None) -> Callable[[TensorSpec], int] | None:
        """The bytes each tensor takes in a file written with `metadata` when they are not its
        spec's: with `OPTION_OUTTYPE`, the quantized sizes of `stored_type` (for shard
        assignment: a Q8_0 split set's files are then as large as ``--max-shard-size``
        allows); None without quantization.

        >>> size = GgufWriter.stored_sizes({OPTION_OUTTYPE: "Q8_0"})
        >>> size(TensorSpec("blk.0.attn_q.weight", (64, 64), "BF16")), 64 * 64 * 34 // 32
        (4352, 4352)
        >>> size(TensorSpec("blk.0.attn_norm.weight", (64,), "BF16"))  # kept in F32
        256
        """
        outtype = (metadata or {}).get(OPTION_OUTTYPE)
        if outtype is None or outtype not in QUANTIZERS:
            return None  # the writer itself refuses an unknown type, by name
        kind = BY_NAME[outtype]

        def size(spec: TensorSpec) -> int:
            stored = stored_type(spec, outtype)
            if stored == outtype:
                return spec.numel // kind.block_size * kind.type_size
            if stored in ("F32", "F16") and stored != spec.dtype:
                return spec.numel * dtypes.itemsize(stored)
            return spec.nbytes

        return size

    def _split_of_name(self, tensors: str | None) -> Split | None:
        """The split a file named like ``model-00002-of-00003.gguf`` is (None for one file)."""
        m = SPLIT_NAME.search(os.path.basename(self.path))
        if m is None or int(m.group(2)) < 2:
            return None
        no, count = int(m.group(1)), int(m.group(2))
        if tensors is None or not tensors.isdigit() or not 1 <= no <= count:
            raise FormatError(
                f"{self.path}: file {no} of a {count}-file GGUF split set needs the number of "
                f"tensors in all files (metadata {OPTION_TENSORS!r}, or split=); "
                "weightbridge's convert passes it"
            )
        return Split(no - 1, count, int(tensors))

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

    def write(self, name: str, tile: np.ndarray, row: int) -> np.ndarray | None:
        """Append one tile: consecutive whole rows of `name`, in declared order. For a
        quantized tensor, return the bytes stored (its blocks; the shard's checksum is of
        them, as `GgufReader.stored_bytes` reads them back), else None (the tile's own)."""
        _, data = self._cursor.tile(name, tile, row)
        kind = self._quantize.get(name)
        if kind is not None and data.size:
            # Whole rows are whole blocks, so a tile quantizes alone, and a tile's blocks a few
            # at a time: the float32 copy and the kernel's temporaries stay a few MB however
            # large the tile.
            flat = data.reshape(-1)
            stored = np.empty(flat.size // kind.block_size * kind.type_size, np.uint8)
            for start in range(0, flat.size, _TILE_ELEMENTS):
                part = flat[start : start + _TILE_ELEMENTS].astype(np.float32)
                blocks = quantize_blocks(kind, part).reshape(-1)
                at = start // kind.block_size * kind.type_size
                stored[at : at + blocks.size] = blocks
                self._f.write(blocks.data)
            return stored
        if data.size:
            self._f.write(data.reshape(-1).view(np.uint8).data)
        return None

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


def key_values_of(path: str) -> dict[str, KeyValue]:
    """Every key-value of the GGUF file at `path` (for ``--gguf-metadata``).

    Raises:
        FormatError: `path` is missing or not a GGUF file (the message names it).
    """
    if not os.path.isfile(path):
        raise FormatError(
            f"{path}: no such GGUF file to copy key-values from; pass a .gguf such as one "
            "written by llama.cpp's convert_hf_to_gguf.py --vocab-only"
        )
    reader = GgufReader(path)
    try:
        return reader.key_values()
    finally:
        reader.close()


class GgufSplitReader(BaseReader):
    """Reads a llama.cpp split set (``model-00001-of-00003.gguf`` ...) as one checkpoint:
    the first file's key-values, every file's tensors."""

    def __init__(self, first: GgufReader) -> None:
        self.path = first.path
        kvs = first.key_values()
        count = int(kvs[SPLIT_COUNT].value)
        self._parts = [first]
        try:
            for i, path in enumerate(split_files(first.path, count)[1:], 1):
                if not os.path.isfile(path):
                    raise FormatError(
                        f"{path}: missing: {first.path} is split 1 of a {count}-file GGUF split "
                        "set; put every file of the set in one folder"
                    )
                part = GgufReader(path, dtype=first.dtype)
                self._parts.append(part)
                no = part.key_values().get(SPLIT_NO)
                if no is None or no.value != i:
                    raise FormatError(
                        f"{path}: expected split.no = {i} in file {i + 1} of the set, found "
                        f"{None if no is None else no.value}; the set is mixed up"
                    )
        except BaseException:
            self.close()
            raise
        self._owner: dict[str, GgufReader] = {}
        tensors: list[TensorSpec] = []
        for part in self._parts:
            for spec in part.specs():
                if spec.name in self._owner:
                    raise FormatError(
                        f"{part.path}: tensor {spec.name!r} is also in "
                        f"{self._owner[spec.name].path}; the split set is corrupt"
                    )
                self._owner[spec.name] = part
                tensors.append(spec)
        expected = kvs.get(SPLIT_TENSORS)
        if expected is not None and expected.value != len(tensors):
            self.close()
            raise FormatError(
                f"{first.path}: split.tensors.count says {expected.value} tensors, the "
                f"{count} files hold {len(tensors)}; a file of the set is from another model"
            )
        meta = dict(first.specs().metadata)
        meta["gguf.splits"] = str(count)
        self._spec = CheckpointSpec(tuple(tensors), meta)

    def _part(self, name: str) -> GgufReader:
        part = self._owner.get(name)
        if part is None:
            raise self._missing(name)
        return part

    def key_values(self) -> dict[str, KeyValue]:
        """The first file's key-values (the metadata of the whole set)."""
        return self._parts[0].key_values()

    def tensor_info(self, name: str) -> TensorInfo:
        return self._part(name).tensor_info(name)

    def read(self, name: str) -> np.ndarray:
        return self._part(name).read(name)

    def byte_range(self, name: str) -> ByteRange | None:
        return self._part(name).byte_range(name)

    def stored_bytes(self, name: str) -> np.ndarray:
        return self._part(name).stored_bytes(name)

    def prefetch(self, name: str) -> None:
        if name in self._owner:
            self._owner[name].prefetch(name)

    def release(self, name: str) -> None:
        if name in self._owner:
            self._owner[name].release(name)

    def files(self) -> list[str]:
        return [f for p in self._parts for f in p.files()]

    def close(self) -> None:
        for part in self._parts:
            part.close()


def open_reader(path: str, *, dtype: str = "F32") -> GgufReader | GgufSplitReader:
    """Open a GGUF file, or a llama.cpp split set given its first file or its folder;
    quantized tensors read as `dtype` (F32, F16 or BF16)."""
    if os.path.isdir(path):
        first = _first_split_in(path)
        if first is None:
            raise FormatError(f"{path}: no GGUF split set (*-00001-of-0000N.gguf) in this folder")
        path = first
    reader = GgufReader(path, dtype=dtype)
    kvs = reader.key_values()
    count, no = kvs.get(SPLIT_COUNT), kvs.get(SPLIT_NO)
    # A later file of a set alone reads its own tensors (the first file stands for the set).
    if count is None or int(count.value) < 2 or (no is not None and no.value != 0):
        return reader
    return GgufSplitReader(reader)
