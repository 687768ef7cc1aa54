"""TensorFlow checkpoints (tensor bundles), read without TensorFlow.

`tf.train.Checkpoint` and `tf.compat.v1.train.Saver` both write a *tensor bundle*: a
``<prefix>.index`` file and data shards ``<prefix>.data-00000-of-00001`` (more than one when
variables sat on several devices or a sharding policy split them). Tensors are raw little-endian
C-order bytes in a data shard; the index says where.

The index is a LevelDB-style SSTable: data blocks of prefix-compressed keys with a restart
array, an index block pointing at the data blocks, and a 48-byte footer holding the block
handles and a magic number. Every block carries a masked CRC-32C, which we check. Blocks may be
snappy-compressed, but TensorFlow writes bundle indexes uncompressed and we refuse compressed
blocks by name rather than carry a decompressor nothing we have seen needs. Keys are tensor
names; the empty key holds a ``BundleHeaderProto`` (shard count, endianness), every other value a
``BundleEntryProto`` (dtype, shape, shard, offset, size, checksum). We decode those protobufs by
hand: eight fields do not justify a protobuf dependency.

Names are TensorFlow's keys, with one change: the suffix ``/.ATTRIBUTES/VARIABLE_VALUE`` that
`tf.train.Checkpoint` appends to every variable is stripped, since it is the same on every key
and says nothing (``model/layer_with_weights-0/kernel/.ATTRIBUTES/VARIABLE_VALUE`` is read as
``model/layer_with_weights-0/kernel``). `TFCheckpointReader.tf_keys` maps each name back to its
key. Saver checkpoints keep their plain variable names (``dense/kernel``).

Not read: the object graph (``_CHECKPOINTABLE_OBJECT_GRAPH``, a string tensor describing Python
objects; listed in `skipped`), other string, resource, variant and quantized tensors (refused,
naming the tensor), partitioned variables saved as slices (refused), big-endian bundles
(refused). Tensor data is memory-mapped and not checksummed: CRC-32C over every byte in pure
Python would cost more than the conversion; the index's own checksums are verified. Writing
TensorFlow checkpoints is not supported.

In an object store a checkpoint is a prefix (listed like a directory) or its ``.index`` object
(over ``https://``, which cannot list): the index is fetched whole, each tensor by a ranged read
of its shard.
"""

from __future__ import annotations

import codecs
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from weightbridge.errors import DtypeError, FormatError, SpecError, WeightbridgeError
from weightbridge.io._remote import MissingObject
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
)
from weightbridge.spec import CheckpointSpec, TensorSpec

NAME = "tfcheckpoint"
SUFFIXES = (".index",)

INDEX_SUFFIX = ".index"
# The text file `tf.train.CheckpointManager` and `Saver` keep beside checkpoints, naming the latest.
STATE_FILE = "checkpoint"
# The state file's first line names the latest checkpoint; a few hundred bytes show it.
_STATE_HEAD_BYTES = 4096
# tensorflow/tsl/lib/io/format.h: kTableMagicNumber, stored as two little-endian fixed32s.
TABLE_MAGIC = 0xDB4775248B80FB57
# Two block handles padded to their maximum encoded length (2 x 20 bytes), then the magic.
FOOTER_SIZE = 48
# After every block: one compression-type byte and a masked CRC-32C of block + type byte.
BLOCK_TRAILER_SIZE = 5
NO_COMPRESSION, SNAPPY_COMPRESSION = 0, 1
# `tf.train.Checkpoint` appends this to every variable's key; it is stripped from our names.
VARIABLE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
# The serialized object graph of a `tf.train.Checkpoint`: metadata, not a tensor.
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
# tensor_bundle.h: kTensorBundleVersion. A bundle whose min_consumer exceeds it needs a newer reader.
BUNDLE_VERSION = 1
# The data shard of each shard id: tensor_bundle.cc DataFilename.
DATA_NAME = "{prefix}.data-{shard:05d}-of-{count:05d}"
_DATA_FILE = re.compile(r"(.+)\.data-\d{5}-of-\d{5}")
# A protobuf varint is at most 10 bytes (64 bits, 7 per byte).
_MAX_VARINT_BYTES = 10

# TensorFlow DataType enum (tensorflow/core/framework/types.proto) -> weightbridge code.
TF_DTYPES: dict[int, str] = {
    1: "F32",  # DT_FLOAT
    2: "F64",  # DT_DOUBLE
    3: "I32",  # DT_INT32
    4: "U8",  # DT_UINT8
    5: "I16",  # DT_INT16
    6: "I8",  # DT_INT8
    8: "C64",  # DT_COMPLEX64
    9: "I64",  # DT_INT64
    10: "BOOL",  # DT_BOOL (one byte per element, 0 or 1)
    14: "BF16",  # DT_BFLOAT16
    17: "U16",  # DT_UINT16
    19: "F16",  # DT_HALF
    22: "U32",  # DT_UINT32
    23: "U64",  # DT_UINT64
    24: "F8_E5M2",  # DT_FLOAT8_E5M2
    25: "F8_E4M3",  # DT_FLOAT8_E4M3FN
}
# Names of the enum values we refuse, so the error says what the tensor is.
_TF_DTYPE_NAMES: dict[int, str] = {
    7: "DT_STRING",
    11: "DT_QINT8",
    12: "DT_QUINT8",
    13: "DT_QINT32",
    15: "DT_QINT16",
    16: "DT_QUINT16",
    18: "DT_COMPLEX128",
    20: "DT_RESOURCE",
    21: "DT_VARIANT",
    26: "DT_FLOAT8_E4M3FNUZ",
    27: "DT_FLOAT8_E4M3B11FNUZ",
    28: "DT_FLOAT8_E5M2FNUZ",
    29: "DT_INT4",
    30: "DT_UINT4",
}


# --- CRC-32C (Castagnoli), as LevelDB masks it -----------------------------------------------


def _crc_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    """CRC-32C of `data` (pure Python: fine for index blocks, too slow for tensor data).

    >>> hex(crc32c(b"123456789"))
    '0xe3069283'
    """
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """LevelDB's masked CRC: rotated and offset, so a CRC of data holding CRCs stays strong."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# --- protobuf wire format --------------------------------------------------------------------


def _varint(buf: bytes, pos: int, where: str) -> tuple[int, int]:
    """Decode one unsigned varint at `pos`; return (value, position after it)."""
    result = shift = 0
    for i in range(_MAX_VARINT_BYTES):
        if pos + i >= len(buf):
            raise FormatError(f"{where}: varint runs past the end of its {len(buf)}-byte record")
        byte = buf[pos + i]
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos + i + 1
        shift += 7
    raise FormatError(
        f"{where}: varint longer than {_MAX_VARINT_BYTES} bytes; the record is corrupt"
    )


def _signed64(value: int) -> int:
    """A varint read as protobuf int64/int32 (negative numbers are 10-byte two's complement)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def proto_fields(buf: bytes, where: str) -> Iterator[tuple[int, int | bytes]]:
    """Yield (field number, value) of a protobuf message: ints for varint/fixed, bytes otherwise.

    >>> list(proto_fields(bytes([0x08, 0x96, 0x01, 0x12, 0x02, 0x68, 0x69]), "x"))
    [(1, 150), (2, b'hi')]
    """
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos, where)
        field, wire = tag >> 3, tag & 7
        value: int | bytes
        if wire == 0:
            value, pos = _varint(buf, pos, where)
        elif wire == 1 or wire == 5:
            width = 8 if wire == 1 else 4
            if pos + width > len(buf):
                raise FormatError(f"{where}: fixed-width field {field} runs past the record's end")
            value = int.from_bytes(buf[pos : pos + width], "little")
            pos += width
        elif wire == 2:
            n, pos = _varint(buf, pos, where)
            if pos + n > len(buf):
                raise FormatError(
                    f"{where}: field {field} declares {n} bytes, the record has {len(buf) - pos} left"
                )
            value = bytes(buf[pos : pos + n])
            pos += n
        else:  # groups (3, 4) are long deprecated; 6 and 7 are not wire types
            raise FormatError(
                f"{where}: protobuf wire type {wire} (field {field}) is not valid here"
            )
        if field == 0:
            raise FormatError(f"{where}: protobuf field number 0 is invalid; the record is corrupt")
        yield field, value


@dataclass(frozen=True, slots=True)
class BundleHeader:
    """`BundleHeaderProto`: how many data shards, their byte order, the format version."""

    num_shards: int
    big_endian: bool
    min_consumer: int


@dataclass(frozen=True, slots=True)
class BundleEntry:
    """`BundleEntryProto`: where one tensor is and what it is."""

    dtype: int  # TensorFlow DataType enum
    shape: tuple[int, ...] | None  # None: unknown rank
    shard_id: int
    offset: int
    size: int
    crc32c: int
    slices: int  # number of TensorSliceProto: > 0 for a partitioned variable


def parse_header(buf: bytes, where: str) -> BundleHeader:
    num_shards, big, min_consumer = 0, False, 0
    for field, value in proto_fields(buf, where):
        if field == 1 and isinstance(value, int):
            num_shards = _signed64(value)
        elif field == 2 and isinstance(value, int):
            big = value == 1
        elif field == 3 and isinstance(value, bytes):  # VersionDef
            for vfield, vvalue in proto_fields(value, where):
                if vfield == 2 and isinstance(vvalue, int):
                    min_consumer = _signed64(vvalue)
    return BundleHeader(num_shards, big, min_consumer)


def _parse_shape(buf: bytes, where: str) -> tuple[int, ...] | None:
    dims: list[int] = []
    for field, value in proto_fields(buf, where):
        if field == 2 and isinstance(value, bytes):  # Dim
            size = 0
            for dfield, dvalue in proto_fields(value, where):
                if dfield == 1 and isinstance(dvalue, int):
                    size = _signed64(dvalue)
            dims.append(size)
        elif field == 3 and value:  # unknown_rank
            return None
    return tuple(dims)


def parse_entry(buf: bytes, where: str) -> BundleEntry:
    """Decode a `BundleEntryProto`; fields we do not know are ignored, as protobuf does.

    >>> parse_entry(bytes([0x08, 0x01, 0x12, 0x04, 0x12, 0x02, 0x08, 0x03, 0x28, 0x0C]), "x")
    BundleEntry(dtype=1, shape=(3,), shard_id=0, offset=0, size=12, crc32c=0, slices=0)
    """
    dtype, shard, offset, size, crc, slices = 0, 0, 0, 0, 0, 0
    shape: tuple[int, ...] | None = ()  # an absent shape is a scalar, as in protobuf
    for field, value in proto_fields(buf, where):
        if isinstance(value, int):
            if field == 1:
                dtype = value
            elif field == 3:
                shard = _signed64(value)
            elif field == 4:
                offset = _signed64(value)
            elif field == 5:
                size = _signed64(value)
            elif field == 6:
                crc = value
        elif field == 2:
            shape = _parse_shape(value, where)
        elif field == 7:
            slices += 1
    return BundleEntry(dtype, shape, shard, offset, size, crc, slices)


# --- the SSTable ----------------------------------------------------------------------------


def _handle(buf: bytes, pos: int, where: str) -> tuple[tuple[int, int], int]:
    """A BlockHandle: (offset, size) varints."""
    offset, pos = _varint(buf, pos, where)
    size, pos = _varint(buf, pos, where)
    return (offset, size), pos


def _block(data: bytes, handle: tuple[int, int], path: str, what: str) -> bytes:
    """The contents of one block, after checking bounds, compression type and checksum."""
    offset, size = handle
    end = offset + size + BLOCK_TRAILER_SIZE
    limit = len(data) - FOOTER_SIZE
    if end > limit:
        raise FormatError(
            f"{path}: {what} at bytes [{offset}, {end}) runs past the table's data, which ends at "
            f"byte {limit}; the index file is truncated or corrupt: copy it again"
        )
    kind = data[offset + size]
    if kind == SNAPPY_COMPRESSION:
        raise FormatError(
            f"{path}: {what} is snappy-compressed; weightbridge reads only uncompressed tensor "
            "bundle indexes (what TensorFlow writes). Re-save the checkpoint with TensorFlow "
            "(tf.train.Checkpoint(...).write) to get an uncompressed index"
        )
    if kind != NO_COMPRESSION:
        raise FormatError(
            f"{path}: {what} has compression type {kind}, which is not a table compression "
            "(0 none, 1 snappy); the index file is corrupt"
        )
    (stored,) = struct.unpack_from("<I", data, offset + size + 1)
    actual = masked_crc32c(data[offset : offset + size + 1])
    if stored != actual:
        raise FormatError(
            f"{path}: {what} at byte {offset} fails its checksum (stored {stored:#010x}, computed "
            f"{actual:#010x}); the index file is corrupt: copy it again"
        )
    return data[offset : offset + size]


def _block_entries(block: bytes, path: str, what: str) -> Iterator[tuple[bytes, bytes]]:
    """Yield (key, value) of a block: keys share a prefix with the previous key, then restarts."""
    where = f"{path}: {what}"
    if len(block) < 4:
        raise FormatError(f"{where} is {len(block)} bytes, too short for its restart count")
    (restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    limit = len(block) - 4 * (restarts + 1)
    if restarts == 0 or limit < 0:
        raise FormatError(
            f"{where} declares {restarts} restart points, which cannot fit its {len(block)} bytes"
        )
    pos, key = 0, b""
    while pos < limit:
        shared, pos = _varint(block, pos, where)
        unshared, pos = _varint(block, pos, where)
        value_len, pos = _varint(block, pos, where)
        if shared > len(key) or pos + unshared + value_len > limit:
            raise FormatError(
                f"{where}: entry at byte {pos} (shares {shared} key bytes, adds {unshared}, value "
                f"{value_len}) does not fit the block; the index file is corrupt"
            )
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        yield key, block[pos : pos + value_len]
        pos += value_len


def read_table(path: str) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of an SSTable file, in key order.

    Raises:
        FormatError: naming `path`, when the file is missing, truncated, not a table or corrupt.
    """
    try:
        # An index is small (entries are ~100 bytes per tensor): read whole, from an object
        # store in one request.
        with open_source(path) as f:
            data = f.read()
    except FileNotFoundError as e:
        raise FormatError(f"{path}: file not found") from e
    if len(data) < FOOTER_SIZE:
        raise FormatError(
            f"{path}: file is truncated: a tensor bundle index ends with a {FOOTER_SIZE}-byte "
            f"footer, but the file has {len(data)} bytes"
        )
    footer = data[-FOOTER_SIZE:]
    (magic,) = struct.unpack_from("<Q", footer, FOOTER_SIZE - 8)
    if magic != TABLE_MAGIC:
        raise FormatError(
            f"{path}: not a TensorFlow checkpoint index: its last 8 bytes are {magic:#018x}, "
            f"expected the table magic {TABLE_MAGIC:#018x} (is the file truncated or another "
            "format?)"
        )
    where = f"{path}: footer"
    _, pos = _handle(footer, 0, where)  # the metaindex block: TF writes it empty
    index_handle, _ = _handle(footer, pos, where)
    index = _block(data, index_handle, path, "index block")
    out: list[tuple[bytes, bytes]] = []
    for n, (_, value) in enumerate(_block_entries(index, path, "index block")):
        handle, _ = _handle(value, 0, f"{path}: index block entry {n}")
        block = _block(data, handle, path, f"data block {n}")
        out.extend(_block_entries(block, path, f"data block {n}"))
    return out


# --- locating a checkpoint ------------------------------------------------------------------


def _index_files(directory: str) -> list[str]:
    """The ``*.index`` files in a directory (or an object-store prefix), sorted."""
    names = source_listdir(directory)
    return sorted(source_join(directory, n) for n in names if n.endswith(INDEX_SUFFIX))


def _has_magic(index_path: str) -> bool:
    try:
        with open_source(index_path) as f:
            f.seek(0, os.SEEK_END)
            if f.tell() < FOOTER_SIZE:
                return False
            f.seek(-8, os.SEEK_END)
            return int.from_bytes(f.read(8), "little") == TABLE_MAGIC
    except (OSError, WeightbridgeError):
        return False


def _latest_in_state_file(directory: str) -> str:
    """The prefix a directory's ``checkpoint`` file names as ``model_checkpoint_path``.

    Relative paths are taken beside the state file; an absolute path (old `Saver`s write them)
    is taken by its base name beside the state file, so a moved directory still works and the
    state file cannot send us to files elsewhere.
    """
    state = source_join(directory, STATE_FILE)
    try:
        with open_source(state) as f:
            text = f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise FormatError(f"{state}: cannot read the checkpoint state file ({e})") from e
    m = re.search(r'^\s*model_checkpoint_path\s*:\s*"((?:[^"\\]|\\.)*)"', text, re.MULTILINE)
    if m is None:
        raise FormatError(
            f"{state}: no model_checkpoint_path line; expected a line like "
            'model_checkpoint_path: "ckpt-1". Pass the checkpoint prefix or its .index file instead'
        )
    try:  # a text-format proto string: C escapes, octal for non-ASCII bytes
        named = codecs.escape_decode(m.group(1).encode("utf-8"))[0].decode("utf-8")
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(
            f"{state}: model_checkpoint_path {m.group(1)!r} is malformed ({e})"
        ) from e
    if os.path.isabs(named) or re.match(r"^[A-Za-z]:[\\/]", named):
        rel = os.path.basename(named.replace("\\", "/"))
    else:
        rel = check_safe_relative(named, index_path=state, what="checkpoint")
    prefix = source_join(directory, rel)
    if not source_isfile(prefix + INDEX_SUFFIX):
        raise FormatError(
            f"{state}: names checkpoint {named!r}, but {prefix + INDEX_SUFFIX} does not exist; "
            "the directory is incomplete, or pass the prefix of a checkpoint that is there"
        )
    return prefix


def find_prefix(path: str) -> str | None:
    """The bundle prefix `path` stands for, or None when it is not a TensorFlow checkpoint.

    `path` may be the ``.index`` file, a data shard, the prefix itself, or a directory (its
    ``checkpoint`` state file decides; without one, the directory's only ``.index``).

    Raises:
        FormatError: a directory's state file is broken, or it holds several checkpoints and no
            state file says which.
    """
    if source_isdir(path):
        if _is_state_file(source_join(path, STATE_FILE)):
            return _latest_in_state_file(path)
        found = [f for f in _index_files(path) if _has_magic(f)]
        if len(found) > 1:
            names = [os.path.basename(f)[: -len(INDEX_SUFFIX)] for f in found]
            raise FormatError(
                f"{path}: holds several TensorFlow checkpoints {names[:5]} and no 'checkpoint' "
                "state file saying which is current; pass the prefix of the one you mean, e.g. "
                f"{source_join(path, names[-1])}"
            )
        return found[0][: -len(INDEX_SUFFIX)] if found else None
    if path.endswith(INDEX_SUFFIX) and source_isfile(path):
        return path[: -len(INDEX_SUFFIX)]
    m = _DATA_FILE.fullmatch(path)
    if m and source_isfile(m.group(1) + INDEX_SUFFIX):
        return m.group(1)
    if source_isfile(path + INDEX_SUFFIX):
        return path
    return None


def _is_state_file(path: str) -> bool:
    # Other formats name files "checkpoint" too (an Orbax msgpack, say): look for TF's field.
    try:
        with open_source(path) as f:
            return b"model_checkpoint_path" in f.read(_STATE_HEAD_BYTES)
    except (OSError, WeightbridgeError):
        return False


def detect(path: str, head: bytes) -> bool:
    """True for a bundle ``.index`` (by its footer magic), a data shard, a prefix or a directory.

    A directory counts when it has a TensorFlow ``checkpoint`` state file or an ``.index`` with
    the magic.
    """
    if source_isdir(path):
        if _is_state_file(source_join(path, STATE_FILE)):
            return True
        return any(_has_magic(f) for f in _index_files(path))
    try:
        prefix = find_prefix(path)
    except FormatError:
        return False
    return prefix is not None and _has_magic(prefix + INDEX_SUFFIX)


# --- the reader -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Location:
    shard: int
    offset: int
    size: int


class TFCheckpointReader(BaseReader):
    """Reads a TensorFlow tensor bundle; tensors are zero-copy memory maps of the data shards.

    Attributes:
        prefix: the bundle prefix (``.../ckpt-1``).
        tf_keys: our name -> TensorFlow's key (which may end in ``/.ATTRIBUTES/VARIABLE_VALUE``).
        skipped: keys that are not tensors, with why they were left out.
    """

    def __init__(self, path: str) -> None:
        path = os.fspath(path)
        prefix = find_prefix(path)
        if prefix is None:
            raise FormatError(
                f"{path}: not a TensorFlow checkpoint: no {path}{INDEX_SUFFIX}, no '.index' file "
                "and no 'checkpoint' state file; pass the prefix (e.g. 'ckpt-1'), its .index file "
                "or the directory holding them"
            )
        self.prefix = prefix
        self.path = prefix + INDEX_SUFFIX
        self.tf_keys: dict[str, str] = {}
        self.skipped: dict[str, str] = {}
        table = read_table(self.path)
        if not table or table[0][0] != b"":
            raise FormatError(
                f"{self.path}: no bundle header (the entry with the empty key); this SSTable is "
                "not a TensorFlow checkpoint index"
            )
        header = parse_header(table[0][1], f"{self.path}: bundle header")
        self._check_header(header)
        self._data_paths = [
            DATA_NAME.format(prefix=prefix, shard=i, count=header.num_shards)
            for i in range(header.num_shards)
        ]
        self._where: dict[str, _Location] = {}
        found: list[tuple[int, int, TensorSpec]] = []
        for key, value in table[1:]:
            spec = self._parse(key, value, header)
            if spec is not None:
                loc = self._where[spec.name]
                found.append((loc.shard, loc.offset, spec))
        self._check_data(found)
        # Shard by shard in file order, so reading in spec order is sequential on disk.
        found.sort(key=lambda t: (t[0], t[1]))
        self._spec = CheckpointSpec(tuple(t for _, _, t in found))
        self._files: dict[int, MappedFile] = {}

    def _check_header(self, header: BundleHeader) -> None:
        if header.big_endian:
            raise FormatError(
                f"{self.path}: the bundle is big-endian; weightbridge reads little-endian bundles "
                "only. Load and re-save it with TensorFlow on a little-endian machine"
            )
        if header.min_consumer > BUNDLE_VERSION:
            raise FormatError(
                f"{self.path}: bundle format needs a reader of version >= {header.min_consumer}; "
                f"this one reads version {BUNDLE_VERSION}"
            )
        if header.num_shards < 1:
            raise FormatError(
                f"{self.path}: bundle header declares {header.num_shards} data shards; expected "
                "at least 1"
            )

    def _parse(self, raw_key: bytes, value: bytes, header: BundleHeader) -> TensorSpec | None:
        if raw_key.startswith(b"\x00"):
            # An ordered-code key: one slice of a partitioned variable. Its full-tensor entry
            # (which has `slices`) is refused below with the variable's readable name.
            return None
        try:
            key = raw_key.decode("utf-8")
        except UnicodeDecodeError as e:
            raise FormatError(f"{self.path}: tensor key {raw_key!r} is not UTF-8") from e
        where = f"{self.path}: tensor {key!r}"
        entry = parse_entry(value, where)
        if key == OBJECT_GRAPH_KEY:
            self.skipped[key] = "object graph of a tf.train.Checkpoint (metadata, not a tensor)"
            return None
        if entry.slices:
            raise FormatError(
                f"{where} is a partitioned variable saved as {entry.slices} slices; weightbridge "
                "does not reassemble slices. Load it with TensorFlow and save it unpartitioned"
            )
        code = TF_DTYPES.get(entry.dtype)
        if code is None:
            tf_name = _TF_DTYPE_NAMES.get(entry.dtype, f"DataType {entry.dtype}")
            raise FormatError(
                f"{where} has dtype {tf_name}, which is not a numeric tensor weightbridge can "
                f"convert (supported: {', '.join(sorted(set(TF_DTYPES.values())))}); save the "
                "checkpoint without it"
            )
        if entry.shape is None or any(d < 0 for d in entry.shape):
            raise FormatError(
                f"{where} has an unknown shape {entry.shape}; a saved tensor needs one"
            )
        name = key[: -len(VARIABLE_SUFFIX)] if key.endswith(VARIABLE_SUFFIX) else key
        if name in self.tf_keys:
            raise FormatError(
                f"{where}: keys {self.tf_keys[name]!r} and {key!r} both name tensor {name!r} once "
                f"{VARIABLE_SUFFIX!r} is stripped; weightbridge cannot tell them apart"
            )
        try:
            spec = TensorSpec(name, entry.shape, code)
        except (SpecError, DtypeError) as e:  # rank > 64: the message names the tensor
            raise FormatError(f"{self.path}: {e} (key {key!r})") from e
        if not 0 <= entry.shard_id < header.num_shards:
            raise FormatError(
                f"{where} is in data shard {entry.shard_id}, but the header declares "
                f"{header.num_shards} shards (0 to {header.num_shards - 1}); the index is corrupt"
            )
        if entry.size != spec.nbytes or entry.offset < 0:
            raise FormatError(
                f"{where}: shape {spec.shape} of {code} needs {spec.nbytes} bytes, but the index "
                f"records {entry.size} bytes at offset {entry.offset}; the index is corrupt"
            )
        self.tf_keys[name] = key
        self._where[name] = _Location(entry.shard_id, entry.offset, entry.size)
        return spec

    def _check_data(self, found: list[tuple[int, int, TensorSpec]]) -> None:
        """Every shard a tensor lives in exists, and every tensor ends inside its shard."""
        sizes: dict[int, int] = {}
        for shard, offset, spec in found:
            data_path = self._data_paths[shard]
            if shard not in sizes:
                try:
                    sizes[shard] = source_size(data_path)
                except (FileNotFoundError, MissingObject) as e:
                    raise FormatError(
                        f"{data_path}: data shard {shard} of {len(self._data_paths)} is missing "
                        f"(tensor {spec.name!r} is in it, says {self.path}); copy every "
                        f"'{os.path.basename(self.prefix)}.data-*' file beside the index"
                    ) from e
            if offset + spec.nbytes > sizes[shard]:
                raise FormatError(
                    f"{data_path}: file is truncated: tensor {spec.name!r} needs bytes "
                    f"[{offset}, {offset + spec.nbytes}), file is {sizes[shard]} bytes; copy it again"
                )

    def _mapped_shard(self, shard: int) -> MappedFile:
        mf = self._files.get(shard)
        if mf is None:
            mf = self._files[shard] = map_source(self._data_paths[shard])
        return mf

    def read(self, name: str) -> np.ndarray:
        loc = self._where.get(name)
        if loc is None:
            raise self._missing(name)
        return self._mapped_shard(loc.shard).array(loc.offset, self._spec[name])

    def byte_range(self, name: str) -> ByteRange | None:
        loc = self._where.get(name)
        if loc is None:
            return None
        return local_range(self._data_paths[loc.shard], loc.offset, loc.size)

    def files(self) -> list[str]:
        shards = sorted({loc.shard for loc in self._where.values()})
        return [self.path, *(self._data_paths[s] for s in shards)]

    def prefetch(self, name: str) -> None:
        loc = self._where.get(name)
        if loc is not None:
            self._mapped_shard(loc.shard).prefetch(loc.offset, loc.size)

    def release(self, name: str) -> None:
        loc = self._where.get(name)
        if loc is not None and loc.shard in self._files:
            self._files[loc.shard].release(loc.offset, loc.size)

    def close(self) -> None:
        for mf in self._files.values():
            mf.close()
        self._files = {}


def open_reader(path: str) -> TFCheckpointReader:
    return TFCheckpointReader(path)
