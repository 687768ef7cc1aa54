"""`--flatten nhwc|nchw`: the CLI spelling of the flatten-order choice (``@flatten``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from weightbridge.io import write_checkpoint


def run(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "weightbridge", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.fixture
def conv_then_dense(tmp_path: Path) -> tuple[str, str]:
    """A torch conv (8 channels, 4x4 map) flattened into a dense layer, and a Flax-style target."""
    rng = np.random.default_rng(0)
    theirs = {
        "conv.weight": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(8).astype(np.float32),
        "fc.weight": rng.standard_normal((10, 128)).astype(np.float32),
        "fc.bias": rng.standard_normal(10).astype(np.float32),
    }
    write_checkpoint(str(tmp_path / "theirs.safetensors"), theirs)
    like = {
        "Conv_0/kernel": {"shape": [3, 3, 3, 8], "dtype": "F32"},
        "Conv_0/bias": {"shape": [8], "dtype": "F32"},
        "Dense_0/kernel": {"shape": [128, 10], "dtype": "F32"},
        "Dense_0/bias": {"shape": [10], "dtype": "F32"},
    }
    (tmp_path / "mine.json").write_text(json.dumps(like))
    return str(tmp_path / "theirs.safetensors"), str(tmp_path / "mine.json")


def test_refused_without_a_choice_then_flatten_equals_the_hint(
    conv_then_dense: tuple[str, str], tmp_path: Path
) -> None:
    src, like = conv_then_dense
    refused = run("convert", src, "--like", like, "-o", str(tmp_path / "no"), "-q")
    assert refused.returncode != 0 and "@flatten" in refused.stderr, refused.stderr
    for order in ("nhwc", "nchw"):
        a, b = tmp_path / f"flag_{order}", tmp_path / f"hint_{order}"
        flag = run("convert", src, "--like", like, "-o", str(a), "-q", "--flatten", order)
        assert flag.returncode == 0, flag.stderr
        hint = run(
            "convert", src, "--like", like, "-o", str(b), "-q", "--hint", f"@flatten={order}"
        )
        assert hint.returncode == 0, hint.stderr
        assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    nhwc = (tmp_path / "flag_nhwc" / "model.safetensors").read_bytes()
    assert nhwc != (tmp_path / "flag_nchw" / "model.safetensors").read_bytes()


def test_flatten_takes_only_the_two_orders(
    conv_then_dense: tuple[str, str], tmp_path: Path
) -> None:
    src, like = conv_then_dense
    bad = run("convert", src, "--like", like, "-o", str(tmp_path / "o"), "--flatten", "hwc")
    assert bad.returncode == 2 and "invalid choice: 'hwc'" in bad.stderr
