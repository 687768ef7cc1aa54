"""Flax msgpack checkpoints: a lazy, zero-copy reader and a streaming writer.

`flax.serialization.to_bytes(state)` writes a state dict as one msgpack object: nested maps with
string keys, whose array leaves are msgpack *ext* objects of type 1 (type 3 for numpy scalars)
holding, msgpack-encoded, ``[shape, dtype name, raw C-order bytes]``. Arrays over 1 GiB are
split by flax into a map ``{"__msgpack_chunked_array__": True, "shape": {"0": d0, ...},
"chunks": {"0": <1-D array>, ...}}``, because msgpack cannot hold one object over 4 GiB.

We parse the msgpack structure ourselves over a memory map, recording where each array's raw
bytes begin instead of copying them (the `msgpack` package would hand us every tensor as a
copy), so specs cost one pass over the headers and `read` returns a zero-copy view. A chunked
array is the one exception: its chunks are not adjacent, so `read` assembles one new array.

Names are the map keys joined with ``/`` (``params/Dense_0/kernel``); list items are named by
their index, as flax names them. Scalar leaves (numbers, strings, booleans) become metadata
strings under their name, as the torch reader does; a top-level ``__metadata__`` map of strings,
which our writer adds when given metadata, is read back as metadata by key. Other leaves
(``None``, complex numbers, raw bytes, empty maps) are not tensors: they are listed in `skipped`.

The writer lays out the whole file from the declared specs, since each array's length is
known up front, writes the structure, then puts each tile's bytes at its place. Its output is
byte-identical to `flax.serialization.to_bytes` of the same nested dict (in declared order), so
`msgpack_restore` reads it back unchanged; only little-endian arrays are written, as flax does
on every platform we know.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from weightbridge import dtypes
from weightbridge._files import pwrite_all
from weightbridge.errors import DtypeError, FormatError, SpecError
from weightbridge.io._tiles import TileCursor
from weightbridge.io.base import (
    BaseReader,
    ByteRange,
    MappedFile,
    local_range,
    source_buffer,
    source_size,
)
from weightbridge.spec import CheckpointSpec, TensorSpec

NAME = "msgpack"
SUFFIXES = (".msgpack",)

# flax.serialization._MsgpackExtType: the ext type codes flax writes.
EXT_NDARRAY, EXT_COMPLEX, EXT_NPSCALAR = 1, 2, 3
# flax's marker key of a chunked array, and its chunk size (flax.serialization.MAX_CHUNK_SIZE):
# arrays of more bytes than this are split, so that no msgpack object nears msgpack's limits.
CHUNKED_KEY = "__msgpack_chunked_array__"
MAX_CHUNK_BYTES = 2**30
# Where our writer keeps metadata. flax restores it as one more dict entry; `from_bytes`
# ignores keys its target does not have.
METADATA_KEY = "__metadata__"
SEPARATOR = "/"
# Real state dicts nest a handful of levels; a deeper file is hostile or corrupt, and refusing
# it keeps the recursive parser far from Python's stack limit.
MAX_DEPTH = 100

_MAP_MARKERS = frozenset({0xDE, 0xDF}) | frozenset(range(0x80, 0x90))
_STR_MARKERS = frozenset({0xD9, 0xDA, 0xDB}) | frozenset(range(0xA0, 0xC0))


def detect(path: str, head: bytes) -> bool:
    """True when the file starts like a flax state dict: a msgpack map whose first key is text.

    >>> detect("m.msgpack", b"\\x81\\xa6params\\x80"), detect("m.bin", b"\\x89HDF\\r\\n")
    (True, False)
    """
    if not head or head[0] not in _MAP_MARKERS:
        return False
    pos = {0xDE: 3, 0xDF: 5}.get(head[0], 1)
    count = head[0] & 0x0F if head[0] < 0x90 else int.from_bytes(head[1:pos], "big")
    if count == 0:  # `to_bytes({})`: a valid, empty state dict; only its name can tell
        return len(head) == pos and path.endswith(SUFFIXES)
    key = _first_key(head, pos)
    # Non-empty printable text rules out binary formats whose first byte happens to be a map
    # marker (a safetensors header length of 0x88, say, is followed by zero bytes).
    return bool(key) and key is not None and key.isprintable()


def _first_key(head: bytes, pos: int) -> str | None:
    if len(head) <= pos or head[pos] not in _STR_MARKERS:
        return None
    marker = head[pos]
    if marker >= 0xA0:
        n, start = marker & 0x1F, pos + 1
    else:
        width = 1 << (marker - 0xD9)
        n, start = int.from_bytes(head[pos + 1 : pos + 1 + width], "big"), pos + 1 + width
    key = head[start : start + n]
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError:
        if len(key) == n:
            return None
        return key.decode("utf-8", "ignore")  # the head cut a character in two


# --- reading --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _ArrayRef:
    """An array leaf: its header fields and where its raw bytes are."""

    shape: tuple[int, ...]
    dtype: str
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class _Other:
    """A leaf that is not a tensor nor a metadata scalar (bytes, complex, unknown ext)."""

    what: str


def _join(where: str, key: str) -> str:
    return f"{where}{SEPARATOR}{key}" if where else key


def _place(where: str) -> str:
    """A position in the tree, for messages: its name so far, or the top level."""
    return repr(where) if where else "the top level"


class _Parser:
    """Recursive-descent msgpack decoder that copies only small values.

    Raw byte strings become offsets, arrays become `_ArrayRef`s; maps are dicts in file order.
    """

    def __init__(self, buf: Any, path: str, limit: int | None = None, pos: int = 0) -> None:
        self.buf = buf
        self.path = path
        self.limit = len(buf) if limit is None else limit
        self.pos = pos

    def _truncated(self, end: int, where: str, what: str) -> FormatError:
        if self.limit < len(self.buf):
            return FormatError(
                f"{self.path}: {what} at {_place(where)} runs past the end of its array record "
                f"(byte {self.limit}); the file is corrupt"
            )
        return FormatError(
            f"{self.path}: file is truncated: {what} at {_place(where)} needs bytes through {end}, "
            f"file is {self.limit} bytes; copy it again"
        )

    def take(self, n: int, where: str, what: str = "a value") -> int:
        start, end = self.pos, self.pos + n
        if end > self.limit:
            raise self._truncated(end, where, what)
        self.pos = end
        return start

    def uint(self, n: int, where: str) -> int:
        start = self.take(n, where)
        return int.from_bytes(self.buf[start : start + n], "big")

    def _count(self, n: int, per_item: int, where: str, what: str) -> int:
        # Every item takes at least `per_item` bytes: a count the rest of the file cannot hold
        # is refused before we loop over it.
        if n * per_item > self.limit - self.pos:
            raise self._truncated(self.pos + n * per_item, where, f"a {what} of {n} items")
        return n

    def value(self, where: str, depth: int) -> Any:
        b = self.uint(1, where)
        if b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        if b <= 0x8F:
            return self.map(b & 0x0F, where, depth)
        if b <= 0x9F:
            return self.array(b & 0x0F, where, depth)
        if b <= 0xBF:
            return self.text(b & 0x1F, where)
        if b == 0xC0:
            return None
        if b in (0xC2, 0xC3):
            return b == 0xC3
        if b in (0xC4, 0xC5, 0xC6):
            n = self.uint(1 << (b - 0xC4), where)
            self.take(n, where, f"a byte string of {n} bytes")
            return _Other(f"byte string of {n} bytes")
        if b in (0xC7, 0xC8, 0xC9):
            n = self.uint(1 << (b - 0xC7), where)
            return self.ext(n, where)
        if b in (0xCA, 0xCB):
            width = 4 if b == 0xCA else 8
            start = self.take(width, where)
            return struct.unpack(">f" if b == 0xCA else ">d", self.buf[start : start + width])[0]
        if 0xCC <= b <= 0xCF:
            return self.uint(1 << (b - 0xCC), where)
        if 0xD0 <= b <= 0xD3:
            width = 1 << (b - 0xD0)
            start = self.take(width, where)
            return int.from_bytes(self.buf[start : start + width], "big", signed=True)
        if 0xD4 <= b <= 0xD8:
            return self.ext(1 << (b - 0xD4), where)
        if b in (0xD9, 0xDA, 0xDB):
            return self.text(self.uint(1 << (b - 0xD9), where), where)
        if b in (0xDC, 0xDD):
            return self.array(self.uint(2 if b == 0xDC else 4, where), where, depth)
        if b in (0xDE, 0xDF):
            return self.map(self.uint(2 if b == 0xDE else 4, where), where, depth)
        raise FormatError(
            f"{self.path}: byte {self.pos - 1} (at {_place(where)}): 0x{b:02x} never starts a msgpack "
            "value; the file is corrupt or not msgpack"
        )

    def text(self, n: int, where: str) -> str:
        start = self.take(n, where, f"a string of {n} bytes")
        try:
            return bytes(self.buf[start : start + n]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise FormatError(f"{self.path}: at {_place(where)}: string is not UTF-8 ({e})") from e

    def _nested(self, depth: int, where: str) -> int:
        if depth >= MAX_DEPTH:
            raise FormatError(
                f"{self.path}: at {_place(where)}: maps and lists nest over {MAX_DEPTH} deep; a state dict "
                "never does, so the file is corrupt or hostile"
            )
        return depth + 1

    def array(self, n: int, where: str, depth: int) -> list[Any]:
        depth = self._nested(depth, where)
        self._count(n, 1, where, "list")
        return [self.value(_join(where, str(i)), depth) for i in range(n)]

    def map(self, n: int, where: str, depth: int) -> dict[str, Any]:
        depth = self._nested(depth, where)
        self._count(n, 2, where, "map")
        out: dict[str, Any] = {}
        for _ in range(n):
            key = self.value(where, depth)
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise FormatError(
                    f"{self.path}: at {_place(where)}: map key {key!r} is not a string or integer; a state "
                    "dict's keys are names"
                )
            key = str(key)
            sub = _join(where, key)
            if key in out:
                raise FormatError(
                    f"{self.path}: at {_place(sub)}: key appears twice in one map; which value is meant is "
                    "ambiguous, so the file is refused"
                )
            out[key] = self.value(sub, depth)
        return out

    def ext(self, n: int, where: str) -> _ArrayRef | _Other:
        code = self.uint(1, where)
        code = code - 0x100 if code >= 0x80 else code
        kind = "an array record" if code in (EXT_NDARRAY, EXT_NPSCALAR) else "an ext object"
        start = self.take(n, where, f"{kind} of {n} bytes")
        if code not in (EXT_NDARRAY, EXT_NPSCALAR):
            kind = "complex number" if code == EXT_COMPLEX else f"msgpack ext type {code}"
            return _Other(kind)
        inner = _Parser(self.buf, self.path, limit=start + n, pos=start)
        return inner.ndarray(where)

    def _string_length(self, where: str, what: str) -> int:
        """Read a str or bin header (either holds bytes in old and new writers); return its size."""
        marker = self.uint(1, where)
        if 0xA0 <= marker <= 0xBF:  # fixstr
            return marker & 0x1F
        if marker in (0xC4, 0xC5, 0xC6):  # bin 8/16/32: what flax writes for data
            return self.uint(1 << (marker - 0xC4), where)
        if marker in (0xD9, 0xDA, 0xDB):  # str 8/16/32: data from writers without use_bin_type
            return self.uint(1 << (marker - 0xD9), where)
        raise FormatError(
            f"{self.path}: at {_place(where)}: array {what} must be a string, found msgpack "
            f"marker 0x{marker:02x}; the file was not written by flax or is corrupt"
        )

    def ndarray(self, where: str) -> _ArrayRef:
        """flax's array record: ``[shape, dtype name, bytes]``, packed inside the ext payload."""
        head = self.uint(1, where)
        count = head & 0x0F if 0x90 <= head <= 0x9F else -1
        if head == 0xDC:
            count = self.uint(2, where)
        if count != 3:
            raise FormatError(
                f"{self.path}: at {_place(where)}: array record must be [shape, dtype, bytes], "
                f"found msgpack marker 0x{head:02x}; the file was not written by flax or is corrupt"
            )
        shape = self.value(where, MAX_DEPTH - 1)
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise FormatError(
                f"{self.path}: at {_place(where)}: array shape must be a list of non-negative "
                f"integers, found {shape!r}"
            )
        n = self._string_length(where, "dtype name")
        start = self.take(n, where, f"a dtype name of {n} bytes")
        dtype = bytes(self.buf[start : start + n]).decode("utf-8", "replace")
        n = self._string_length(where, "data")
        offset = self.take(n, where, f"array data of {n} bytes")
        if self.pos != self.limit:
            raise FormatError(
                f"{self.path}: at {_place(where)}: {self.limit - self.pos} stray bytes after the "
                "array data inside its record; the file is corrupt"
            )
        return _ArrayRef(tuple(shape), dtype, offset, n)


@dataclass(frozen=True, slots=True)
class _Entry:
    """Where a tensor's bytes are: one run, or one per chunk of a chunked array."""

    segments: tuple[tuple[int, int], ...]  # (file offset, length), in element order


class MsgpackReader(BaseReader):
    """Reads a flax `.msgpack` state dict; arrays are zero-copy memory maps.

    Attributes:
        skipped: leaves that are neither tensors nor metadata, with why they were left out.
    """

    def __init__(self, path: str) -> None:
        self.path = os.fspath(path)
        self.skipped: dict[str, str] = {}
        try:
            size = source_size(self.path)
        except FileNotFoundError as e:
            raise FormatError(f"{self.path}: file not found") from e
        if size == 0:
            raise FormatError(f"{self.path}: file is empty; a flax msgpack file holds one map")
        with source_buffer(self.path) as mm:
            parser = _Parser(mm, self.path)
            tree = parser.value("", 0)
            if parser.pos != size:
                raise FormatError(
                    f"{self.path}: {size - parser.pos} bytes follow the msgpack object, which "
                    f"ends at byte {parser.pos}; a flax file holds exactly one object"
                )
        if not isinstance(tree, (dict, list)):
            raise FormatError(
                f"{self.path}: the top level is {_kind(tree)}, not a map of names; flax writes a "
                "state dict (flax.serialization.to_bytes({'params': ...}))"
            )
        self._entries: dict[str, _Entry] = {}
        self._tensors: list[TensorSpec] = []
        self._meta: dict[str, str] = {}
        items = list(tree.items()) if isinstance(tree, dict) else list(enumerate(tree))
        for key, node in items:
            if key == METADATA_KEY and _is_string_map(node):
                for mkey, mvalue in node.items():
                    self._add_meta(mkey, mvalue)
                continue
            self._walk(node, [str(key)])
        self._spec = CheckpointSpec(tuple(self._tensors), self._meta)
        self._file: MappedFile | None = None

    def _walk(self, node: Any, parts: list[str]) -> None:
        name = SEPARATOR.join(parts)
        if isinstance(node, dict) and node.get(CHUNKED_KEY) is True:
            self._add(name, *self._chunked(name, node))
        elif isinstance(node, dict) and node:
            for key, child in node.items():
                self._walk(child, parts + [key])
        elif isinstance(node, list) and node:
            for i, child in enumerate(node):
                self._walk(child, parts + [str(i)])
        elif isinstance(node, _ArrayRef):
            spec = self._spec_of(name, node)
            if node.length != spec.nbytes:
                raise FormatError(
                    f"{self.path}: tensor {name!r}: shape {spec.shape} of {spec.dtype} needs "
                    f"{spec.nbytes} bytes, but its record holds {node.length}; the file is corrupt"
                )
            self._add(name, spec, ((node.offset, node.length),))
        elif isinstance(node, (bool, int, float, str)):
            self._add_meta(name, str(node))
        else:
            self.skipped[name] = _kind(node)

    def _spec_of(self, name: str, ref: _ArrayRef) -> TensorSpec:
        try:
            code = dtypes.canonical(ref.dtype)
        except DtypeError as e:
            raise FormatError(
                f"{self.path}: tensor {name!r} has dtype {ref.dtype!r}, which weightbridge does "
                f"not convert (supported: {', '.join(dtypes.CODES)}); cast it before saving"
            ) from e
        return self._tensor_spec(name, ref.shape, code)

    def _tensor_spec(self, name: str, shape: tuple[int, ...], code: str) -> TensorSpec:
        """A TensorSpec, or a FormatError naming this file (rank > 64, a bad shape)."""
        try:
            return TensorSpec(name, shape, code)
        except (SpecError, DtypeError) as e:  # the message names the tensor already
            raise FormatError(f"{self.path}: {e}") from e

    def _chunked(self, name: str, node: dict[str, Any]) -> tuple[TensorSpec, tuple[Any, ...]]:
        """Validate flax's chunked-array map and return its spec and chunk runs."""
        where = f"{self.path}: tensor {name!r} (a chunked array)"
        shape_map, chunks = node.get("shape"), node.get("chunks")
        if not isinstance(shape_map, dict) or not isinstance(chunks, dict) or not chunks:
            raise FormatError(f"{where}: needs a 'shape' map and a non-empty 'chunks' map")
        try:
            shape = tuple(shape_map[str(i)] for i in range(len(shape_map)))
            refs = [chunks[str(i)] for i in range(len(chunks))]
        except KeyError as e:
            raise FormatError(
                f"{where}: keys must be '0', '1', ... in order; {e} is missing"
            ) from e
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise FormatError(f"{where}: shape must be non-negative integers, found {shape}")
        if not all(isinstance(r, _ArrayRef) and len(r.shape) == 1 for r in refs):
            raise FormatError(f"{where}: every chunk must be a 1-D array")
        kinds = {r.dtype for r in refs}
        if len(kinds) != 1:
            raise FormatError(f"{where}: chunks have different dtypes {sorted(kinds)}")
        spec = self._spec_of(name, refs[0])
        spec = self._tensor_spec(name, shape, spec.dtype)
        itemsize = dtypes.itemsize(spec.dtype)
        for i, r in enumerate(refs):
            if r.length != r.shape[0] * itemsize:
                raise FormatError(
                    f"{where}: chunk {i} declares {r.shape[0]} elements but holds {r.length} bytes"
                )
        total = sum(r.shape[0] for r in refs)
        if total != spec.numel:
            raise FormatError(
                f"{where}: shape {shape} has {spec.numel} elements, its chunks hold {total}"
            )
        return spec, tuple((r.offset, r.length) for r in refs)

    def _add_meta(self, key: str, value: str) -> None:
        if key in self._meta or key in self._entries:
            raise FormatError(
                f"{self.path}: {key!r} names two values (metadata under {METADATA_KEY!r} and a "
                "leaf, or a key holding '/' beside a nested map); the file is ambiguous"
            )
        self._meta[key] = value

    def _add(self, name: str, spec: TensorSpec, segments: tuple[tuple[int, int], ...]) -> None:
        if name in self._entries or name in self._meta:
            raise FormatError(
                f"{self.path}: two leaves are both named {name!r} (a key holding '/' beside a "
                "nested map); weightbridge cannot tell them apart"
            )
        self._entries[name] = _Entry(segments)
        self._tensors.append(spec)

    def read(self, name: str) -> np.ndarray:
        entry = self._entries.get(name)
        if entry is None:
            raise self._missing(name)
        spec = self._spec[name]
        if len(entry.segments) == 1:
            return self._mapped().array(entry.segments[0][0], spec)
        # A chunked array: its chunks are apart in the file, so it is assembled (one copy).
        out = np.empty(spec.numel, dtype=dtypes.to_numpy(spec.dtype))
        at = 0
        itemsize = dtypes.itemsize(spec.dtype)
        for offset, length in entry.segments:
            count = length // itemsize
            chunk = TensorSpec(name, (count,), spec.dtype)
            out[at : at + count] = self._mapped().array(offset, chunk)
            self._mapped().release(offset, length)
            at += count
        out = out.reshape(spec.shape)
        out.flags.writeable = False
        return out

    def byte_range(self, name: str) -> ByteRange | None:
        entry = self._entries.get(name)
        if entry is None or len(entry.segments) != 1:
            return None
        offset, length = entry.segments[0]
        return local_range(self.path, offset, length)

    def release(self, name: str) -> None:
        entry = self._entries.get(name)
        if self._file is not None and entry is not None:
            for offset, length in entry.segments:
                self._file.release(offset, length)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _is_string_map(node: Any) -> bool:
    return isinstance(node, dict) and all(isinstance(v, str) for v in node.values())


def _kind(node: Any) -> str:
    if isinstance(node, _Other):
        return node.what
    if isinstance(node, dict):
        return "an empty map"
    if isinstance(node, list):
        return "an empty list"
    if isinstance(node, _ArrayRef):
        return "an array"
    return "nil" if node is None else type(node).__name__


# --- writing --------------------------------------------------------------------------------
# Each encoder picks the shortest form, as msgpack-python does, so our bytes equal flax's.


def pack_uint(n: int) -> bytes:
    """A non-negative integer, in its shortest msgpack form.

    >>> pack_uint(5), pack_uint(200), pack_uint(70000)
    (b'\\x05', b'\\xcc\\xc8', b'\\xce\\x00\\x01\\x11p')
    """
    if n < 0x80:
        return bytes([n])
    for marker, fmt, top in ((0xCC, ">B", 0xFF), (0xCD, ">H", 0xFFFF), (0xCE, ">I", 0xFFFFFFFF)):
        if n <= top:
            return bytes([marker]) + struct.pack(fmt, n)
    return b"\xcf" + struct.pack(">Q", n)


def _header(
    n: int, fix: int | None, fix_max: int, sized: tuple[tuple[int, str, int], ...]
) -> bytes:
    if fix is not None and n <= fix_max:
        return bytes([fix | n])
    for marker, fmt, top in sized:
        if n <= top:
            return bytes([marker]) + struct.pack(fmt, n)
    raise FormatError(f"a msgpack object of {n} items or bytes is over msgpack's 4 GiB limit")


_U8, _U16, _U32 = 0xFF, 0xFFFF, 0xFFFFFFFF


def pack_str(text: str) -> bytes:
    raw = text.encode("utf-8")
    sized = ((0xD9, ">B", _U8), (0xDA, ">H", _U16), (0xDB, ">I", _U32))
    return _header(len(raw), 0xA0, 0x1F, sized) + raw


def pack_map_header(n: int) -> bytes:
    return _header(n, 0x80, 0x0F, ((0xDE, ">H", _U16), (0xDF, ">I", _U32)))


def pack_array_header(n: int) -> bytes:
    return _header(n, 0x90, 0x0F, ((0xDC, ">H", _U16), (0xDD, ">I", _U32)))


def pack_bin_header(n: int) -> bytes:
    return _header(n, None, 0, ((0xC4, ">B", _U8), (0xC5, ">H", _U16), (0xC6, ">I", _U32)))


def pack_ext_header(n: int, code: int) -> bytes:
    fixed = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
    if n in fixed:
        return bytes([fixed[n], code])
    sized = ((0xC7, ">B", _U8), (0xC8, ">H", _U16), (0xC9, ">I", _U32))
    return _header(n, None, 0, sized) + bytes([code])


def array_head(shape: tuple[int, ...], code: str, nbytes: int) -> bytes:
    """Every byte of flax's array leaf that precedes the raw data.

    >>> array_head((2,), "F32", 8)
    b'\\xc7\\x15\\x01\\x93\\x91\\x02\\xa7float32\\xc4\\x08'
    """
    record = pack_array_header(3) + pack_array_header(len(shape))
    record += b"".join(pack_uint(d) for d in shape)
    record += pack_str(dtypes.to_numpy(code).name) + pack_bin_header(nbytes)
    return pack_ext_header(len(record) + nbytes, EXT_NDARRAY) + record


@dataclass(frozen=True, slots=True)
class Layout:
    """Where everything goes in a file, computed from specs alone.

    Attributes:
        structure: (offset, bytes) runs of msgpack structure between the arrays' raw bytes.
        segments: tensor name -> (offset, length) runs that its raw bytes fill, in order.
        size: total file size.
    """

    structure: tuple[tuple[int, bytes], ...]
    segments: dict[str, tuple[tuple[int, int], ...]]
    size: int


def nest(path: str, tensors: Sequence[TensorSpec]) -> dict[str, Any]:
    """Split names on ``/`` into nested dicts, keys in order of first appearance.

    >>> list(nest("x", [TensorSpec("a/w", (1,), "F32"), TensorSpec("b", (1,), "F32")]))
    ['a', 'b']
    """
    root: dict[str, Any] = {}
    for t in tensors:
        parts = t.name.split(SEPARATOR)
        if not all(parts):
            raise FormatError(
                f"{path}: tensor {t.name!r} cannot be a msgpack name: '/' separates nested map "
                "keys, so a name may not start or end with '/' or hold '//'; rename it"
            )
        node = root
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if isinstance(child, TensorSpec):
                raise FormatError(
                    f"{path}: tensor {child.name!r} is also a map holding {t.name!r}; a msgpack "
                    "state dict cannot have both: rename one of them"
                )
            node = child
            if depth + 2 >= MAX_DEPTH:
                raise FormatError(f"{path}: tensor {t.name!r} nests over {MAX_DEPTH} deep")
        if parts[-1] in node:
            raise FormatError(
                f"{path}: tensor {t.name!r} is also a map holding other tensors; a msgpack "
                "state dict cannot have both: rename one of them"
            )
        node[parts[-1]] = t
    return root


def plan_layout(
    path: str, tensors: Sequence[TensorSpec], metadata: dict[str, str] | None = None
) -> Layout:
    """Lay out the file flax would write for these tensors (and metadata), without any data."""
    root = nest(path, tensors)
    if metadata:
        if METADATA_KEY in root:
            raise FormatError(
                f"{path}: a tensor is named under {METADATA_KEY!r}, where the metadata goes; "
                "rename it or write without metadata"
            )
        root[METADATA_KEY] = {str(k): str(v) for k, v in metadata.items()}
    structure: list[tuple[int, bytes]] = []
    segments: dict[str, tuple[tuple[int, int], ...]] = {}
    pending = bytearray()
    offset = 0  # file offset of pending[0]

    def data(n: int) -> tuple[int, int]:
        nonlocal offset, pending
        if pending:
            structure.append((offset, bytes(pending)))
        start = offset + len(pending)
        offset, pending = start + n, bytearray()
        return start, n

    def leaf(t: TensorSpec) -> None:
        if t.nbytes <= MAX_CHUNK_BYTES:
            pending.extend(array_head(t.shape, t.dtype, t.nbytes))
            segments[t.name] = (data(t.nbytes),)
            return
        # What flax's `_chunk` makes of an array over MAX_CHUNK_BYTES, key order included.
        itemsize = dtypes.itemsize(t.dtype)
        per_chunk = max(1, int(MAX_CHUNK_BYTES / itemsize))
        counts = [min(per_chunk, t.numel - i) for i in range(0, t.numel, per_chunk)]
        pending.extend(pack_map_header(3) + pack_str(CHUNKED_KEY) + b"\xc3")
        pending.extend(pack_str("shape") + pack_map_header(len(t.shape)))
        for i, d in enumerate(t.shape):
            pending.extend(pack_str(str(i)) + pack_uint(d))
        pending.extend(pack_str("chunks") + pack_map_header(len(counts)))
        runs = []
        for i, count in enumerate(counts):
            pending.extend(pack_str(str(i)) + array_head((count,), t.dtype, count * itemsize))
            runs.append(data(count * itemsize))
        segments[t.name] = tuple(runs)

    def node(tree: dict[str, Any]) -> None:
        pending.extend(pack_map_header(len(tree)))
        for key, child in tree.items():
            pending.extend(pack_str(key))
            if isinstance(child, TensorSpec):
                leaf(child)
            elif isinstance(child, str):
                pending.extend(pack_str(child))
            else:
                node(child)

    node(root)
    end = offset + len(pending)
    if pending:
        structure.append((offset, bytes(pending)))
    return Layout(tuple(structure), segments, end)


class MsgpackWriter:
    """Writes one flax `.msgpack` file: the structure first, then each tile at its place.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     path = os.path.join(d, "m.msgpack")
    ...     w = MsgpackWriter(path, [TensorSpec("params/w", (2,), "F32")])
    ...     w.write("params/w", np.array([1.0, 2.0], np.float32), 0)
    ...     w.close()
    ...     with open_reader(path) as r:
    ...         print(r.specs().names, r.read("params/w"))
    ['params/w'] [1. 2.]
    """

    suffix = ".msgpack"

    def __init__(
        self, path: str, tensors: Sequence[TensorSpec], metadata: dict[str, str] | None = None
    ) -> None:
        self.path = os.fspath(path)
        self._layout = plan_layout(self.path, tensors, metadata)
        self._cursor = TileCursor(self.path, tensors, begin=self._begin)
        self._runs: tuple[tuple[int, int], ...] = ()
        self._run = self._in_run = 0
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            # The file gets its final size now; the holes left for array data fill as tiles come.
            os.ftruncate(self._fd, self._layout.size)
            for offset, blob in self._layout.structure:
                pwrite_all(self._fd, memoryview(blob), offset)
        except BaseException:
            self.abort()
            raise

    def _begin(self, spec: TensorSpec) -> None:
        self._runs = self._layout.segments[spec.name]
        self._run = self._in_run = 0

    def write(self, name: str, tile: np.ndarray, row: int) -> None:
        fd = self._fd
        if fd is None:
            raise FormatError(f"{self.path}: write({name!r}) after close() or abort()")
        _, data = self._cursor.tile(name, tile, row)
        raw = data.reshape(-1).view(np.uint8).data
        while raw:  # a tile may span the boundary between two chunks of a chunked array
            offset, length = self._runs[self._run]
            n = min(len(raw), length - self._in_run)
            pwrite_all(fd, raw[:n], offset + self._in_run)
            raw = raw[n:]
            self._in_run += n
            if self._in_run == length:
                self._run, self._in_run = self._run + 1, 0

    def copy_from(self, name: str, src: ByteRange) -> bool:
        """Not offered: the converter then sends tiles of the memory-mapped source instead."""
        return False

    def close(self) -> None:
        if self._fd is None:
            raise FormatError(f"{self.path}: close() after close() or abort()")
        self._cursor.close()
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


Writer = MsgpackWriter


def open_reader(path: str) -> MsgpackReader:
    return MsgpackReader(path)
