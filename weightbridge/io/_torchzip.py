"""Writing `torch.save` files without torch: the pickle encoder and the zip writer.

The pickle depends only on the specs, so `encode_pickle` writes it by hand (the standard
`pickle.Pickler` would import torch to check each global it writes); `TorchWriter` then writes
the zip format that ``torch.load(path, weights_only=True)`` accepts, one aligned, uncompressed
entry per tensor as its tiles arrive. torch is the oracle in the tests.
"""

from __future__ import annotations

import os
import struct
import zipfile
from collections.abc import Sequence
from typing import IO

import numpy as np

from weightbridge._files import ZIP_ALIGN, zip_align_extra
from weightbridge.errors import FormatError
from weightbridge.io._pickle import STORAGE_DTYPES
from weightbridge.io._tiles import TileCursor
from weightbridge.io.base import ZIP_LOCAL_HEADER_SIZE, ByteRange
from weightbridge.spec import TensorSpec

# Extra-field id torch uses for its alignment padding ("FB"); any id would do, readers skip it.
_PAD_EXTRA_ID = 0x4246
# code -> storage class name for the writer (dtypes without a typed storage class are written
# as an untyped storage plus `_rebuild_tensor_v3`, as torch itself does).
_STORAGE_FOR_CODE = {code: name for name, code in STORAGE_DTYPES.items() if code is not None}
_TORCH_DTYPE_FOR_CODE = {
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


class PickleBuilder:
    """Emits pickle opcodes (protocol 2) by hand: enough for a state dict of tensors.

    The standard `pickle.Pickler` would import torch to check each global it writes.
    """

    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")  # PROTO 2, what torch.save writes by default

    def global_(self, module: str, name: str) -> None:
        self.out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"

    def str_(self, text: str) -> None:
        raw = text.encode("utf-8")
        self.out += b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE

    def int_(self, value: int) -> None:
        if 0 <= value < 1 << 8:
            self.out += b"K" + bytes([value])  # BININT1
        elif 0 <= value < 1 << 16:
            self.out += b"M" + struct.pack("<H", value)  # BININT2
        elif -(1 << 31) <= value < 1 << 31:
            self.out += b"J" + struct.pack("<i", value)  # BININT
        else:
            raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
            self.out += b"\x8a" + bytes([len(raw)]) + raw  # LONG1

    def tuple_(self, values: Sequence[int]) -> None:
        if not values:
            self.out += b")"  # EMPTY_TUPLE
            return
        self.out += b"("  # MARK
        for v in values:
            self.int_(v)
        self.out += b"t"  # TUPLE

    def ordered_dict(self) -> None:
        self.global_("collections", "OrderedDict")
        self.out += b")R"  # EMPTY_TUPLE, REDUCE: OrderedDict()

    def tensor(self, key: str, spec: TensorSpec) -> None:
        storage = _STORAGE_FOR_CODE.get(spec.dtype)
        v3 = storage is None
        self.global_("torch._utils", "_rebuild_tensor_v3" if v3 else "_rebuild_tensor_v2")
        self.out += b"("  # MARK: the rebuild arguments
        self.out += b"("  # MARK: the persistent id
        self.str_("storage")
        if storage is None:  # untyped storage: its size counts bytes
            self.global_("torch.storage", "UntypedStorage")
        else:
            self.global_("torch", storage)
        self.str_(key)
        self.str_("cpu")
        self.int_(spec.nbytes if v3 else spec.numel)
        self.out += b"tQ"  # TUPLE, BINPERSID
        self.int_(0)  # storage offset
        self.tuple_(spec.shape)
        self.tuple_(_c_strides(spec.shape))
        self.out += b"\x89"  # NEWFALSE: requires_grad
        self.ordered_dict()  # backward hooks
        if v3:
            self.global_("torch", _TORCH_DTYPE_FOR_CODE[spec.dtype])
        self.out += b"tR"  # TUPLE, REDUCE

    def stop(self) -> bytes:
        return bytes(self.out + b".")


def _c_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, step = [], 1
    for d in reversed(shape):
        out.append(step)
        step *= max(d, 1)
    return tuple(reversed(out))


def encode_pickle(tensors: Sequence[TensorSpec]) -> bytes:
    """The `data.pkl` bytes for an OrderedDict of `tensors`, tensor i in storage ``str(i)``.

    >>> import pickletools
    >>> [op.name for op, _, _ in pickletools.genops(encode_pickle([]))]
    ['PROTO', 'GLOBAL', 'EMPTY_TUPLE', 'REDUCE', 'STOP']
    """
    p = PickleBuilder()
    p.ordered_dict()
    if tensors:
        p.out += b"("  # MARK
        for i, spec in enumerate(tensors):
            p.str_(spec.name)
            p.tensor(str(i), spec)
        p.out += b"u"  # SETITEMS
    return p.stop()


class TorchWriter:
    """Writes one `torch.save`-compatible zip: tensors stream into aligned, stored entries.

    The pickle depends only on the specs, so it is written first (as torch does); each tensor's
    tiles then go straight into its own ``archive/data/<i>`` entry. Metadata has no place in a
    state dict that `torch.load` returns, so it is not written.
    """

    suffix = ".bin"
    # The archive's top-level folder. torch names it after the file, but reads any name; a fixed
    # one keeps output bytes independent of the (temporary) file name.
    prefix = "archive"

    def __init__(
        self, path: str, tensors: Sequence[TensorSpec], metadata: dict[str, str] | None = None
    ) -> None:
        self.path = path
        self._tensors = list(tensors)
        for spec in self._tensors:
            if spec.dtype not in _STORAGE_FOR_CODE and spec.dtype not in _TORCH_DTYPE_FOR_CODE:
                raise FormatError(
                    f"{path}: tensor {spec.name!r}: torch has no dtype for {spec.dtype}"
                )
        self._cursor = TileCursor(path, self._tensors, begin=self._begin, end=self._end)
        self._f = open(path, "wb")  # noqa: SIM115 - closed in close()/abort()
        self._zip = zipfile.ZipFile(self._f, "w", zipfile.ZIP_STORED, allowZip64=True)
        self._entry: IO[bytes] | None = None
        self._i = 0  # index of the tensor being written: its entry is data/<i>
        self._put("data.pkl", encode_pickle(self._tensors))
        self._put("byteorder", b"little")

    def _info(self, name: str, size: int) -> zipfile.ZipInfo:
        info = zipfile.ZipInfo(f"{self.prefix}/{name}")
        info.compress_type = zipfile.ZIP_STORED
        info.file_size = size
        # zipfile adds a 20-byte zip64 extra field for entries near 4 GiB (its own rule).
        zip64 = 20 if size * 1.05 > zipfile.ZIP64_LIMIT else 0
        start = self._f.tell() + ZIP_LOCAL_HEADER_SIZE + len(info.filename.encode("utf-8")) + zip64
        info.extra = zip_align_extra(start, _PAD_EXTRA_ID, fill=b"Z", always=True)
        return info

    def _put(self, name: str, data: bytes) -> None:
        with self._zip.open(self._info(name, len(data)), "w") as entry:
            entry.write(data)

    def _begin(self, spec: TensorSpec) -> None:
        """Open the entry of the next tensor (`TileCursor` calls this in declared order)."""
        self._entry = self._zip.open(self._info(f"data/{self._i}", spec.nbytes), "w")
        if self._f.tell() % ZIP_ALIGN:  # our padding arithmetic disagrees with zipfile's header
            raise FormatError(f"{self.path}: internal error: tensor {spec.name!r} data unaligned")

    def _end(self, spec: TensorSpec) -> None:
        if self._entry is not None:
            self._entry.close()
            self._entry = None
        self._i += 1

    def write(self, name: str, tile: np.ndarray, row: int) -> None:
        """Append one tile: consecutive whole rows of `name`, in declared order."""
        _, data = self._cursor.tile(name, tile, row)
        if data.nbytes and self._entry is not None:
            self._entry.write(data.reshape(-1).view(np.uint8).data)

    def copy_from(self, name: str, src: ByteRange) -> bool:
        """Decline: every zip entry needs a CRC-32 of its bytes, so they pass through tiles."""
        return False

    def close(self) -> None:
        """Finish every entry and the archive, then flush and fsync it.

        Raises:
            FormatError: some declared tensor did not get all its rows.
        """
        self._cursor.close()
        # The reader in torch requires a `version` record; 3 is what torch.save writes.
        self._put("version", b"3\n")
        self._zip.close()
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def abort(self) -> None:
        for closer in (
            self._entry.close if self._entry is not None else None,
            self._zip.close,
            self._f.close,
        ):
            if closer is not None:
                try:
                    closer()
                except Exception:  # abort promises nothing; the caller deletes the file
                    pass
        self._entry = None
        # If zipfile could not finish, its finaliser would try again on the closed file.
        self._zip.fp = None
