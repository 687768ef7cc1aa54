"""`weightbridge convert SRC [SRC ...]`: a batch from the command line, with executors and
partitions, gives the same bytes as one conversion per source."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from weightbridge import api
from weightbridge.io import write_checkpoint


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "weightbridge", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"{cmd} failed:\n{out.stdout}\n{out.stderr}")
    return out


@pytest.fixture
def batch(tmp_path: Path) -> tuple[list[str], str]:
    """Three training steps of one model (PyTorch names) and a Flax-style target spec."""
    rng = np.random.default_rng(0)
    sources = []
    for step in (100, 200, 300):
        tensors = {
            f"layers.{i}.weight": rng.standard_normal((48, 32)).astype(np.float32) for i in range(4)
        } | {f"layers.{i}.bias": rng.standard_normal(48).astype(np.float32) for i in range(4)}
        path = tmp_path / "ckpts" / f"step_{step}.safetensors"
        path.parent.mkdir(exist_ok=True)
        write_checkpoint(str(path), tensors)
        sources.append(str(path))
    like = {f"layers_{i}/kernel": {"shape": [32, 48], "dtype": "F32"} for i in range(4)} | {
        f"layers_{i}/bias": {"shape": [48], "dtype": "F32"} for i in range(4)
    }
    (tmp_path / "mine.json").write_text(json.dumps(like))
    return sources, str(tmp_path / "mine.json")


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    }


@pytest.mark.parametrize("executor", ["threads", "processes:2"])
def test_a_batch_equals_one_conversion_per_source(
    batch: tuple[list[str], str], tmp_path: Path, executor: str
) -> None:
    sources, like = batch
    out = tmp_path / "out"
    common = ["--like", like, "--max-shard-size", "20KB", "-q"]
    printed = run("convert", *sources, *common, "-o", str(out), "--executor", executor).stdout
    assert "converted 3 checkpoint(s) with 1 plan(s)" in printed, printed  # planned once
    for src in sources:
        name = Path(src).name.removesuffix(".safetensors")
        single = tmp_path / "single" / name
        run("convert", src, *common, "-o", str(single))
        assert _files(out / name) == _files(single), name
        assert (out / name / ".weightbridge-plan.json").exists()  # verify can recheck it
        api.verify(src, out / name)


def test_two_partitions_then_the_plain_run(batch: tuple[list[str], str], tmp_path: Path) -> None:
    sources, like = batch
    out = tmp_path / "out"
    common = ["--like", like, "--max-shard-size", "20KB", "-q", "-o", str(out)]
    run("convert", *sources, *common, "--partition", "1/2")
    run("convert", *sources, *common, "--partition", "2/2")
    shards = {p: p.stat().st_mtime_ns for p in out.rglob("model-*.safetensors")}
    assert shards, "the partitions wrote no shard"
    run("convert", *sources, *common)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("model-*.safetensors")} == shards
    for src in sources:
        name = Path(src).name.removesuffix(".safetensors")
        assert (out / name / "model.safetensors.index.json").exists()


def test_a_bad_partition_is_a_clear_error(batch: tuple[list[str], str], tmp_path: Path) -> None:
    sources, like = batch
    bad = run(
        "convert",
        sources[0],
        "--like",
        like,
        "-o",
        str(tmp_path / "o"),
        "--partition",
        "x",
        check=False,
    )
    assert bad.returncode != 0 and "--partition 'x': expected I/N" in bad.stderr
    assert "Traceback" not in bad.stderr
