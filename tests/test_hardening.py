"""Crash-safety guards: concurrent runs, changed sources, full disks, unwritable destinations."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from weightbridge import api
from weightbridge.errors import ConversionError
from weightbridge.io import write_checkpoint
from weightbridge.streaming.dest import LocalDirectory


def _source(tmp_path, n: int = 6, rows: int = 256):
    rng = np.random.default_rng(0)
    tensors = {
        f"layers.{i}.weight": rng.standard_normal((rows, 64)).astype(np.float32) for i in range(n)
    }
    path = tmp_path / "src.safetensors"
    write_checkpoint(str(path), tensors)
    return path, tensors


def test_second_conversion_into_a_locked_destination_is_refused(tmp_path) -> None:
    src, _ = _source(tmp_path)
    out = LocalDirectory(str(tmp_path / "out"))
    out.prepare()
    with (
        out.lock(),
        pytest.raises(ConversionError, match="another conversion is writing here \\(pid"),
    ):
        api.convert(src, tmp_path / "out")
    assert api.convert(src, tmp_path / "out").written  # the lock is free again


def test_a_killed_holder_leaves_no_stuck_lock(tmp_path) -> None:
    (tmp_path / "out").mkdir()
    code = textwrap.dedent(f"""
        import os, signal
        from weightbridge.streaming.dest import LocalDirectory
        d = LocalDirectory({str(tmp_path / "out")!r})
        with d.lock():
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code])
    assert proc.returncode == -9
    src, _ = _source(tmp_path)
    assert api.convert(src, tmp_path / "out").written


def test_resume_refuses_a_changed_source(tmp_path) -> None:
    src, tensors = _source(tmp_path)
    api.convert(src, tmp_path / "out", max_shard_size="100KB")
    tensors["layers.0.weight"] = tensors["layers.0.weight"] + 1  # same specs, new values
    os.remove(src)
    write_checkpoint(str(src), tensors)
    with pytest.raises(ConversionError, match="source changed since the interrupted conversion"):
        api.convert(src, tmp_path / "out", max_shard_size="100KB")
    assert api.convert(src, tmp_path / "out", max_shard_size="100KB", overwrite=True).written
    assert api.verify(src, tmp_path / "out") == len(tensors)


def test_full_disk_stops_with_a_clear_error_and_resumes(tmp_path) -> None:
    src, tensors = _source(tmp_path)
    tensors["layers.2.weight"] = np.ones((1024, 64), np.float32)  # 256 KB: its own shard
    os.remove(src)
    write_checkpoint(str(src), tensors)
    out = tmp_path / "out"
    # RLIMIT_FSIZE makes writing past 150 KB in one file fail with EFBIG (SIGXFSZ ignored): the
    # second shard hits it as it would hit a full disk.
    code = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))
        from weightbridge.cli import main
        sys.exit(main(["convert", {str(src)!r}, "-o", {str(out)!r}, "--max-shard-size", "140KB", "-q"]))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "out of space writing model-00002-of-00004.safetensors" in proc.stderr
    assert "rerun the same command" in proc.stderr
    names = os.listdir(out)
    assert "model.safetensors.index.json" not in names  # nothing looks complete
    assert not [n for n in names if ".tmp-" in n]
    report = api.convert(src, out, max_shard_size="140KB")
    assert report.skipped == ["model-00001-of-00004.safetensors"]
    assert api.verify(src, out) == len(tensors)


def test_unusable_destination_is_reported_before_any_work(tmp_path) -> None:
    src, _ = _source(tmp_path)
    (tmp_path / "taken").write_text("a file, not a directory")
    with pytest.raises(ConversionError, match="cannot create the output directory"):
        api.convert(src, tmp_path / "taken" / "out")


def test_not_enough_space_is_reported_up_front(tmp_path, monkeypatch) -> None:
    src, _ = _source(tmp_path)
    monkeypatch.setattr(LocalDirectory, "free_space", lambda self: 1000)
    with pytest.raises(ConversionError, match=r"not enough free space: .* still has to write"):
        api.convert(src, tmp_path / "out")
