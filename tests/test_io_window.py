"""`weightbridge.io._window`: a byte range of a file as a file, with a real file's seek rules."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from weightbridge.io._window import Window


def test_a_window_reads_its_range_and_seeks_like_a_file(tmp_path: Path) -> None:
    path = tmp_path / "bytes"
    path.write_bytes(bytes(range(100)))
    real = open(path, "rb")  # noqa: SIM115 - the window owns and closes it
    with Window(real, 10, 20, name=str(path)) as w:
        assert w.read(5) == bytes(range(10, 15))
        assert w.seek(-3, io.SEEK_END) == 17 and w.read() == bytes(range(27, 30))
        assert w.read(1) == b"" and w.tell() == 20  # the range's end is the window's end
        w.seek(100)
        assert w.read(4) == b""
        with pytest.raises(OSError, match="before the start"):  # as a real file does
            w.seek(-21, io.SEEK_END)
        assert w.tell() == 100  # a refused seek leaves the position alone
    assert real.closed


def test_a_zip_inside_a_file_is_read_through_a_window(tmp_path: Path) -> None:
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as zf:
        zf.writestr("data.pkl", b"payload")
    blob = inner.getvalue()
    path = tmp_path / "blobs"
    path.write_bytes(b"x" * 37 + blob + b"y" * 11)
    with Window(open(path, "rb"), 37, len(blob)) as w, zipfile.ZipFile(w) as zf:
        assert zf.read("data.pkl") == b"payload"
    # A window shorter than a zip's end record is no zip (zipfile needs the refused seek).
    with Window(open(path, "rb"), 0, 10) as w, pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(w)
