"""Read-only, seekable file objects over a byte range: the one place their seek rules live.

Parsers that take a file object (zipfile, h5py, pickle) read checkpoints through these:
`RangeFile` is the boilerplate (position, seek, bounds) with one method left to say where the
bytes come from; `Window` gives bytes ``[start, start + length)`` of another file object (a zip
member stored inside a `.keras` archive, a `torch.save` blob inside a DCP `.distcp` file) as a
file of its own. `weightbridge.io._remote.RemoteFile` is a `RangeFile` over an object.

Seeking before the start raises `OSError`, as a real file does: zipfile relies on it to tell a
file shorter than a zip end record from a zip; clamping to 0 would hand it the wrong bytes.
"""

from __future__ import annotations

import io
from typing import IO, Any

__all__ = ["RangeFile", "Window"]


class RangeFile(io.RawIOBase):
    """A read-only, seekable file of `size` bytes; a subclass says where bytes come from
    (`_read_at`).

    >>> w = Window(io.BytesIO(b"0123456789"), 2, 5)
    >>> w.read(), w.seek(-2, io.SEEK_END), w.read(1), w.size
    (b'23456', 3, b'5', 5)
    """

    def __init__(self, size: int, name: str = "") -> None:
        super().__init__()
        self.name = name
        self._size = size
        self._pos = 0

    @property
    def size(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise OSError(f"{self.name}: seek to {base + offset}, before the start")
        self._pos = base + offset
        return self._pos

    def readall(self) -> bytes:
        # One read of the rest (RawIOBase's default reads it in 8 KiB pieces).
        return self.read(max(0, self._size - self._pos)) or b""

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = max(0, min(len(view), self._size - self._pos))
        if want == 0:
            return 0
        got = self._read_at(self._pos, view[:want])
        self._pos += got
        return got

    def _read_at(self, pos: int, view: memoryview) -> int:  # pragma: no cover - abstract
        """Fill `view` with the bytes at `pos` (inside the file); return how many came."""
        raise NotImplementedError


class Window(RangeFile):
    """Bytes ``[start, start + length)`` of the binary file object `file`, as a file.

    Closing the window closes `file` (it is the window's own handle).
    """

    def __init__(self, file: IO[bytes], start: int, length: int, *, name: str = "") -> None:
        super().__init__(length, name)
        self._file = file
        self._start = start

    def _read_at(self, pos: int, view: memoryview) -> int:
        self._file.seek(self._start + pos)
        data = self._file.read(len(view))
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()
