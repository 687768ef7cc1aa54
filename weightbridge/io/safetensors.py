"""safetensors: header-first reader and streaming writer (single files; see `sharded` for indexes).

Layout: 8-byte little-endian header length N, N bytes of JSON (padded with spaces to a multiple
of 8), then the data; each tensor's ``data_offsets`` are relative to the end of the header.
We parse the header ourselves (rather than `safetensors.safe_open`) so that every offset is
checked against the file size with one ``stat`` before any data is touched, and so tensors come
back as zero-copy memory maps. The `safetensors` package is the oracle in the tests.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from weightbridge import dtypes
from weightbridge.errors import DtypeError, FormatError, SpecError
from weightbridge.io.base import (
    BaseReader,
    ByteRange,
    MappedFile,
    local_range,
    open_source,
    source_size,
)
from weightbridge.spec import CheckpointSpec, TensorSpec, parse_json

NAME = "safetensors"
SUFFIXES = (".safetensors",)

# safetensors itself refuses headers over 100 MB; a larger claim means a corrupt or hostile file,
# and refusing it early keeps us from allocating what the file claims.
MAX_HEADER_BYTES = 100_000_000
# The header is padded so the data starts 8-byte aligned, as the reference writer does.
HEADER_ALIGN = 8
# How much written data may sit dirty before the writer starts its writeback: large enough
# for big sequential I/O, small enough that the final fsync has little left to do.
WRITEBACK_BYTES = 64 << 20


def detect(path: str, head: bytes) -> bool:
    """True when the first bytes look like a safetensors header: a sane length, then '{'."""
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n <= MAX_HEADER_BYTES and head[8:9] == b"{"


def parse_header(path: str) -> tuple[int, dict[str, Any]]:
    """Return (data start offset, header dict) after validating the framing."""
    try:
        size = source_size(path)
        with open_source(path) as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise FormatError(
                    f"{path}: file is truncated: a safetensors file starts with an 8-byte header "
                    f"length, but the file has {size} bytes"
                )
            (n,) = struct.unpack("<Q", raw_len)
            if n > MAX_HEADER_BYTES:
                raise FormatError(
                    f"{path}: header length {n} is absurd (limit {MAX_HEADER_BYTES} bytes); "
                    "the file is corrupt or not safetensors"
                )
            if 8 + n > size:
                raise FormatError(
                    f"{path}: file is truncated: header declares {n} header bytes, "
                    f"file is {size} bytes"
                )
            raw = f.read(n)
    except FileNotFoundError as e:
        raise FormatError(f"{path}: file not found") from e
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        header = parse_json(raw.decode("utf-8"))
    except ValueError as e:  # bad UTF-8 or JSON, a duplicate tensor name, absurd nesting
        raise FormatError(f"{path}: safetensors header is not valid UTF-8 JSON ({e})") from e
    if not isinstance(header, dict):
        raise FormatError(
            f"{path}: safetensors header must be a JSON object, found {type(header).__name__}"
        )
    return 8 + n, header


class SafetensorsReader(BaseReader):
    """Reads one `.safetensors` file; tensors are zero-copy memory maps."""

    def __init__(self, path: str) -> None:
        self.path = os.fspath(path)
        self._data_start, header = parse_header(self.path)
        size = source_size(self.path)
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise FormatError(f"{self.path}: __metadata__ must be an object of strings")
        self._offsets: dict[str, tuple[int, int]] = {}
        tensors: list[TensorSpec] = []
        spans: list[tuple[int, int, str]] = []
        for name, entry in header.items():
            spec, (begin, end) = self._parse_entry(name, entry)
            tensors.append(spec)
            self._offsets[name] = (begin, end)
            spans.append((begin, end, name))
        spans.sort()
        prev_end, prev_name = 0, None
        for begin, end, name in spans:
            if begin < prev_end:
                raise FormatError(
                    f"{self.path}: tensor {name!r} bytes [{begin}, {end}) overlap tensor "
                    f"{prev_name!r} which ends at {prev_end}; the header is corrupt"
                )
            prev_end, prev_name = end, name
        if self._data_start + prev_end > size:
            raise FormatError(
                f"{self.path}: file is truncated: header declares data through byte "
                f"{self._data_start + prev_end}, file is {size} bytes (tensor {prev_name!r})"
            )
        # Keep the file's own order by offset: reading in that order is sequential on disk.
        order = {name: i for i, (_, _, name) in enumerate(spans)}
        tensors.sort(key=lambda t: order[t.name])
        self._spec = CheckpointSpec(tuple(tensors), {str(k): str(v) for k, v in meta.items()})
        self._file: MappedFile | None = None

    def _parse_entry(self, name: str, entry: Any) -> tuple[TensorSpec, tuple[int, int]]:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise FormatError(f"{where}: header entry must be an object, found {entry!r}")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise FormatError(
                f"{where}: shape must be a list of non-negative integers, found {shape!r}"
            )
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
            or offsets[1] < offsets[0]
        ):
            raise FormatError(
                f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, found {offsets!r}"
            )
        try:
            spec = TensorSpec(name, tuple(shape), entry.get("dtype", "?"))
        except DtypeError as e:
            raise FormatError(f"{where}: {e}") from e
        except SpecError as e:  # it names the tensor already
            raise FormatError(f"{self.path}: {e}") from e
        begin, end = offsets
        if end - begin != spec.nbytes:
            raise FormatError(
                f"{where}: shape {tuple(shape)} of {spec.dtype} needs {spec.nbytes} bytes, "
                f"but data_offsets {offsets} span {end - begin}"
            )
        return spec, (begin, end)

    def read(self, name: str) -> np.ndarray:
        if name not in self._offsets:
            raise self._missing(name)
        begin, _ = self._offsets[name]
        return self._mapped().array(self._data_start + begin, self._spec[name])

    def byte_range(self, name: str) -> ByteRange | None:
        begin, end = self._offsets[name]
        return local_range(self.path, self._data_start + begin, end - begin)

    def prefetch(self, name: str) -> None:
        if name in self._offsets:
            begin, end = self._offsets[name]
            self._mapped().prefetch(self._data_start + begin, end - begin)

    def release(self, name: str) -> None:
        if self._file is not None and name in self._offsets:
            begin, end = self._offsets[name]
            self._file.release(self._data_start + begin, end - begin)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def encode_header(tensors: Sequence[TensorSpec], metadata: dict[str, str] | None) -> bytes:
    """The exact header bytes (length prefix included) for tensors laid out in the given order."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    body = json.dumps(header, separators=(",", ":")).encode("utf-8")
    body += b" " * (-len(body) % HEADER_ALIGN)
    return struct.pack("<Q", len(body)) + body


class SafetensorsWriter:
    """Writes one `.safetensors` file: header first, then each tensor's bytes.

    Two ways to fill it, not to be mixed: in order (`write`, `copy_from`: tensors and tiles in
    file order, as every writer takes them), or at random (`target_array`, `copy_at`: any
    tensor, any tile, from any thread). Random access maps the file and lets the transforms
    write each tile straight into the page cache: the layout is fixed by the header, so every
    tile's place is known, no writer thread orders them, and no buffer is copied into the file
    (the copy cost as much CPU as the transpose itself on the test machine).
    """

    suffix = ".safetensors"

    def __init__(
        self, path: str, tensors: Sequence[TensorSpec], metadata: dict[str, str] | None = None
    ) -> None:
        self.path = path
        self._tensors = list(tensors)
        self._f = open(path, "w+b")  # noqa: SIM115 - closed in close()/abort(); + for mmap
        header = encode_header(self._tensors, metadata)
        self._f.write(header)
        self._data_start = len(header)
        self._expect = iter(self._tensors)
        self._current: TensorSpec | None = None
        self._written = 0
        self._synced_to = 0  # bytes handed to the kernel's writeback so far
        # Random access: the mapped file, each tensor's (offset, spec), tensors handed out.
        self._map: mmap.mmap | None = None
        self._array: np.ndarray | None = None
        self._size = 0  # the file's size once laid out for random access
        self._places: dict[str, tuple[int, TensorSpec]] = {}
        self._touched: set[str] = set()
        self._lock = threading.Lock()

    def _advance(self, name: str) -> TensorSpec:
        if self._places:
            raise FormatError(f"{self.path}: in-order write of {name!r} after random access")
        if (
            self._current is not None
            and self._written == self._current.nbytes
            and self._current.name != name
        ):
            self._current = None
        if self._current is None:
            self._current = next(self._expect, None)
            self._written = 0
        if self._current is None or self._current.name != name:
            expected = self._current.name if self._current else "nothing more"
            raise FormatError(f"{self.path}: writer expected tensor {expected!r}, got {name!r}")
        return self._current

    def write(self, name: str, tile: np.ndarray, row: int) -> None:
        spec = self._advance(name)
        data = np.ascontiguousarray(tile)
        if data.dtype != dtypes.to_numpy(spec.dtype):
            raise FormatError(
                f"{self.path}: tensor {name!r} expects {spec.dtype}, got {data.dtype}"
            )
        self._f.write(data.reshape(-1).view(np.uint8).data)
        self._written += data.nbytes
        self._start_writeback()

    def _start_writeback(self, pos: int | None = None) -> None:
        """Start writing dirty pages before `pos` (default: the in-order write position) out
        every WRITEBACK_BYTES, instead of all at close.

        The kernel otherwise holds gigabytes dirty (10% of RAM) until the final fsync, which
        then runs alone; FADV_DONTNEED starts asynchronous writeback of the range and drops
        its clean pages, so the disk works while we transform and the fsync is short.
        """
        if pos is None:
            self._f.flush()
            pos = self._f.tell()
        if pos - self._synced_to < WRITEBACK_BYTES or not hasattr(os, "posix_fadvise"):
            return
        try:
            os.posix_fadvise(
                self._f.fileno(), self._synced_to, pos - self._synced_to, os.POSIX_FADV_DONTNEED
            )
        except OSError:  # advice only
            pass
        self._synced_to = pos

    def copy_from(self, name: str, src: ByteRange) -> bool:
        """Copy raw bytes file to file in the kernel (no pass through Python memory)."""
        spec = self._advance(name)
        if src.length != spec.nbytes or not hasattr(os, "copy_file_range"):
            return False
        self._f.flush()
        out_off = self._f.tell()
        with open(src.path, "rb") as fin:
            done = _kernel_copy(fin.fileno(), self._f.fileno(), src.offset, out_off, src.length)
            if done < src.length:  # cross-device or unsupported: plain reads for the rest
                fin.seek(src.offset + done)
                self._f.seek(out_off + done)
                remaining = src.length - done
                while remaining:
                    chunk = fin.read(min(remaining, 16 << 20))
                    if not chunk:
                        raise FormatError(f"{src.path}: unexpected end of file copying {name!r}")
                    self._f.write(chunk)
                    remaining -= len(chunk)
            self._f.seek(out_off + src.length)
        self._written += src.length
        self._start_writeback()
        return True

    def _open_random(self) -> None:
        """Size the file, reserve its blocks, and map it for writing (once, on first use)."""
        with self._lock:
            if self._places:
                return
            if self._current is not None or self._written:
                raise FormatError(f"{self.path}: random access after in-order writes")
            offset = self._data_start
            places = {}
            for t in self._tensors:
                places[t.name] = (offset, t)
                offset += t.nbytes
            self._f.flush()
            fd = self._f.fileno()
            os.ftruncate(fd, offset)
            if offset > self._data_start and hasattr(os, "posix_fallocate"):
                # Reserve the blocks now: a full disk then fails here with ENOSPC, not later
                # with SIGBUS in a page fault of the mapping.
                os.posix_fallocate(fd, self._data_start, offset - self._data_start)
            self._size = offset
            self._places = places

    def _mapped(self) -> np.ndarray | None:
        """The whole file mapped for writing (made on the first `target_array`: tiles placed
        with `write_at` need no map)."""
        with self._lock:
            if self._array is None and self._size:
                self._map = mmap.mmap(self._f.fileno(), self._size)
                self._array = np.frombuffer(self._map, dtype=np.uint8)
            return self._array

    def _place(self, name: str) -> tuple[int, TensorSpec]:
        self._open_random()
        place = self._places.get(name)
        if place is None:
            raise FormatError(f"{self.path}: the writer has no tensor {name!r}")
        self._touched.add(name)
        return place

    def target_array(self, name: str) -> np.ndarray:
        """A writable array over tensor `name`'s bytes in the file (random access)."""
        offset, spec = self._place(name)
        dt = dtypes.to_numpy(spec.dtype)
        array = self._mapped() if spec.nbytes else None
        if array is None:
            return np.empty(spec.shape, dtype=dt)
        return array[offset : offset + spec.nbytes].view(dt).reshape(spec.shape)

    def write_at(self, name: str, start: int, data: memoryview) -> None:
        """Write `data` at byte `start` of tensor `name`'s place (random access; any thread).

        `pwrite` of a small, cache-hot buffer: the kernel copies it into page-cache pages it
        need not zero first, where storing into the mapped file faults every page in and
        zeroes it before the store overwrites it.
        """
        offset, spec = self._place(name)
        if start < 0 or start + data.nbytes > spec.nbytes:
            raise FormatError(
                f"{self.path}: {data.nbytes} bytes at {start} overrun tensor {name!r} "
                f"({spec.nbytes} bytes)"
            )
        fd, pos, view = self._f.fileno(), offset + start, data.cast("B")
        while view:
            done = os.pwrite(fd, view, pos)
            view, pos = view[done:], pos + done

    def copy_at(self, name: str, src: ByteRange) -> bool:
        """Copy raw source bytes into tensor `name`'s place, file to file in the kernel
        (random access; any thread). False when the kernel cannot: the caller copies."""
        offset, spec = self._place(name)
        if src.length != spec.nbytes or not hasattr(os, "copy_file_range"):
            return False
        with open(src.path, "rb") as fin:
            done = _kernel_copy(fin.fileno(), self._f.fileno(), src.offset, offset, src.length)
        return done == src.length  # short: cross-device, unsupported, or a short source

    def placed_through(self, nbytes: int) -> None:
        """The first `nbytes` of tensor data (in file order) are all placed: start writing
        them out (random access)."""
        self._start_writeback(self._data_start + nbytes)

    def _close_random(self) -> None:
        missing = [t.name for t in self._tensors if t.name not in self._touched and t.nbytes]
        if missing:
            raise FormatError(f"{self.path}: closing before tensors {missing[:5]} were written")
        self._array = None
        if self._map is not None:
            self._map.close()  # dirty pages stay in the page cache; the fsync writes them
            self._map = None
        os.fsync(self._f.fileno())
        self._f.close()

    def close(self) -> None:
        if self._places:
            self._close_random()
            return
        if self._current is not None and self._written != self._current.nbytes:
            raise FormatError(f"{self.path}: tensor {self._current.name!r} incomplete at close")
        if self._current is None or self._written == self._current.nbytes:
            rest = [t.name for t in self._expect]
            if rest:
                raise FormatError(f"{self.path}: closing before tensors {rest[:5]} were written")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def abort(self) -> None:
        self._array = None
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a view still held: the GC unmaps it
                self._map.close()
            self._map = None
        self._f.close()


def _kernel_copy(in_fd: int, out_fd: int, in_off: int, out_off: int, length: int) -> int:
    """Copy bytes file to file with copy_file_range; returns how many the kernel copied
    before it stopped (cross-device, unsupported, or the source ended)."""
    done = 0
    while done < length:
        try:
            n = os.copy_file_range(in_fd, out_fd, length - done, in_off + done, out_off + done)
        except OSError:
            n = 0
        if n == 0:
            break
        done += n
    return done


Writer = SafetensorsWriter


def open_reader(path: str) -> SafetensorsReader:
    return SafetensorsReader(path)
