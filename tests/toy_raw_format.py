"""A toy checkpoint format, written the way a new format module is: to prove that adding a
format is one module plus one `weightbridge.io.register_format` call.

A file is `MAGIC`, an 8-byte little-endian header length, a JSON header
``{"tensors": [[name, dtype, shape, offset], ...], "metadata": {...}}``, then each tensor's raw
C-order little-endian bytes at its offset (counted from the end of the header).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence

import numpy as np

from weightbridge.errors import FormatError
from weightbridge.io._tiles import TileCursor
from weightbridge.io.base import BaseReader, ByteRange
from weightbridge.spec import CheckpointSpec, TensorSpec

NAME = "toyraw"
SUFFIXES = (".raw",)
MAGIC = b"TOYRAW1\n"
_LENGTH = struct.Struct("<Q")


def detect(path: str, head: bytes) -> bool:
    return head.startswith(MAGIC)


class ToyRawReader(BaseReader):
    """Specs from the JSON header; `read` maps each tensor's bytes in place."""

    def __init__(self, path: str) -> None:
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                raise FormatError(f"{self.path}: not a {NAME} file")
            (n,) = _LENGTH.unpack(f.read(_LENGTH.size))
            header = json.loads(f.read(n))
        start = len(MAGIC) + _LENGTH.size + n
        tensors = [
            TensorSpec(name, tuple(shape), dtype) for name, dtype, shape, _ in header["tensors"]
        ]
        self._offsets = {t[0]: start + t[3] for t in header["tensors"]}
        self._spec = CheckpointSpec(tuple(tensors), header["metadata"])

    def read(self, name: str) -> np.ndarray:
        if name not in self._offsets:
            raise self._missing(name)
        return self._mapped().array(self._offsets[name], self._spec[name])

    def byte_range(self, name: str) -> ByteRange | None:
        return ByteRange(self.path, self._offsets[name], self._spec[name].nbytes)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class ToyRawWriter:
    """Writes the header first (every offset is known from the specs), then tiles in order."""

    suffix = ".raw"

    def __init__(
        self, path: str, tensors: Sequence[TensorSpec], metadata: dict[str, str] | None = None
    ) -> None:
        self.path = path
        self._cursor = TileCursor(path, tensors)
        entries, offset = [], 0
        for t in tensors:
            entries.append([t.name, t.dtype, list(t.shape), offset])
            offset += t.nbytes
        header = json.dumps({"tensors": entries, "metadata": metadata or {}}).encode()
        self._f = open(path, "wb")  # noqa: SIM115 - closed in close()/abort()
        self._f.write(MAGIC + _LENGTH.pack(len(header)) + header)

    def write(self, name: str, tile: np.ndarray, row: int) -> None:
        _, data = self._cursor.tile(name, tile, row)
        self._f.write(data.reshape(-1).view(np.uint8).data)

    def copy_from(self, name: str, src: ByteRange) -> bool:
        return False

    def close(self) -> None:
        self._cursor.close()
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def abort(self) -> None:
        self._f.close()


Writer = ToyRawWriter


def open_reader(path: str) -> ToyRawReader:
    return ToyRawReader(path)
