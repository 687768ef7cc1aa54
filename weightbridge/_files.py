"""Small file helpers every writer shares, each written once with one behaviour.

* `atomic_write_json`: a JSON file that is either absent, the old one, or the whole new one,
  and survives a power cut once the call returns (temp file, fsync, rename, fsync directory).
* `fsync_dir`: make a rename inside a directory durable.
* `pwrite_all`: `os.pwrite` until every byte is written.
* `zip_align_extra`: padding that puts a zip member's data on a `ZIP_ALIGN` boundary.
* `is_url` / `is_remote_url`: tell an object-store location from a local path.
"""

from __future__ import annotations

import json
import os
import re
import struct
import threading
from typing import Any

# Zip members' data starts on a 64-byte boundary, as torch.save does: numpy can then map any
# dtype in place (64 covers every itemsize and a cache line).
ZIP_ALIGN = 64

# Size of a zip extra field's own header: its 2-byte id and 2-byte length.
_EXTRA_HEADER = 4

# "scheme://rest", as RFC 3986 spells a scheme.
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)


def fsync_dir(path: str) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_name(path: str) -> str:
    """A hidden name beside `path`, unique to this process and thread.

    The leading dot and ``.tmp-`` are what a destination's cleanup looks for after a kill.
    """
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.tmp-{os.getpid()}-{threading.get_ident()}")


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int = 1) -> None:
    """Write `obj` as JSON (ending in a newline) to `path`, atomically and durably.

    Writes a temporary file in the same directory, fsyncs it, renames it over `path` and fsyncs
    the directory, so a reader sees the old file or the complete new one, never a mix.

    Args:
        path: the file to write.
        obj: anything `json.dump` takes.
        indent: the JSON indentation.

    Example:
        >>> import os, pathlib, tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     atomic_write_json(os.path.join(d, "a.json"), {"x": 1})
        ...     print(pathlib.Path(d, "a.json").read_text(), os.listdir(d))
        {
         "x": 1
        }
         ['a.json']
    """
    path = os.fspath(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    """Write all of `data` at `offset` (one `pwrite` may write less: over 2 GiB on Linux)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def zip_align_extra(
    start: int, extra_id: int, *, fill: bytes = b"\0", always: bool = False
) -> bytes:
    """A zip extra field that moves a member's data from file offset `start` to `ZIP_ALIGN`.

    Args:
        start: where the member's data would start with no extra field of ours.
        extra_id: the field's 2-byte id (readers skip ids they do not know).
        fill: the byte the padding is made of.
        always: return a field even when `start` is already aligned (a whole `ZIP_ALIGN` of
            it), for callers whose header arithmetic counts the field in.

    Example:
        >>> len(zip_align_extra(62, 0x4257)), len(zip_align_extra(64, 0x4257))
        (66, 0)
    """
    pad = -start % ZIP_ALIGN
    if pad == 0 and not always:
        return b""
    if pad < _EXTRA_HEADER:  # a field is at least its own header
        pad += ZIP_ALIGN
    body = pad - _EXTRA_HEADER
    return struct.pack("<HH", extra_id, body) + fill * body


def is_url(location: str) -> bool:
    """Whether `location` is a URL (``scheme://...``, ``file://`` included), not a plain path.

    >>> is_url("s3://bucket/x"), is_url("file:///tmp/x"), is_url("/tmp/a://b")
    (True, True, False)
    """
    return bool(_URL.match(location))


def is_remote_url(location: str) -> bool:
    """Whether `location` names an object store or memory (a URL other than ``file://``).

    >>> is_remote_url("memory://x"), is_remote_url("file:///tmp/x"), is_remote_url("model.bin")
    (True, False, False)
    """
    return is_url(location) and not location.startswith("file://")
