"""The shared file helpers (`weightbridge._files`): one behaviour each, pinned here."""

from __future__ import annotations

import doctest
import json
import os
import struct

import pytest

from weightbridge import _files


def test_docstring_examples() -> None:
    result = doctest.testmod(_files)
    assert result.attempted > 0 and result.failed == 0


def test_atomic_write_json_replaces_the_file_and_leaves_no_temporary(tmp_path) -> None:
    path = tmp_path / "a.json"
    path.write_text("old")
    _files.atomic_write_json(path, {"b": [1, 2]}, indent=2)
    assert path.read_text() == json.dumps({"b": [1, 2]}, indent=2) + "\n"
    assert os.listdir(tmp_path) == ["a.json"]


def test_atomic_write_json_keeps_the_old_file_when_encoding_fails(tmp_path) -> None:
    path = tmp_path / "a.json"
    path.write_text("old")
    with pytest.raises(TypeError):
        _files.atomic_write_json(path, {"x": object()})
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.json"]


def test_atomic_write_json_syncs_the_file_and_its_directory(tmp_path, monkeypatch) -> None:
    synced: list[bool] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.path.isdir(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    _files.atomic_write_json(tmp_path / "a.json", [])
    assert synced == [False, True]  # the file, then the directory holding the rename


def test_temporary_names_are_hidden_and_found_by_cleanup(tmp_path) -> None:
    name = os.path.basename(_files.temporary_name(str(tmp_path / "model.json")))
    assert name.startswith(".model.json.tmp-") and ".tmp-" in name


@pytest.mark.parametrize("start", range(0, 130))
def test_zip_align_extra_aligns_and_matches_the_writers_it_replaced(start: int) -> None:
    extra = _files.zip_align_extra(start, 0x4257)
    assert (start + len(extra)) % _files.ZIP_ALIGN == 0
    # The npz writer's padding before the shared helper.
    pad = -start % 64
    if pad == 0:
        old_npz = b""
    else:
        pad += 64 if pad < 4 else 0
        old_npz = struct.pack("<HH", 0x4257, pad - 4) + bytes(pad - 4)
    assert extra == old_npz
    # The torch writer's, which counts its field's 4-byte header in and always writes one.
    body = -(start + 4) % 64
    old_torch = struct.pack("<HH", 0x4246, body) + b"Z" * body
    assert _files.zip_align_extra(start, 0x4246, fill=b"Z", always=True) == old_torch


def test_pwrite_all_writes_every_byte(tmp_path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        _files.pwrite_all(fd, b"abc", 2)
        _files.pwrite_all(fd, memoryview(b"XY"), 0)
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"XYabc"


@pytest.mark.parametrize(
    "location,url,remote",
    [
        ("s3://bucket/prefix", True, True),
        ("gs://bucket", True, True),
        ("memory://x", True, True),
        ("file:///tmp/x", True, False),
        ("/tmp/model.safetensors", False, False),
        ("relative/dir", False, False),
        ("dir/with://inside", False, False),
        ("C:/windows/path", False, False),
    ],
)
def test_url_detection(location: str, url: bool, remote: bool) -> None:
    assert _files.is_url(location) is url
    assert _files.is_remote_url(location) is remote
