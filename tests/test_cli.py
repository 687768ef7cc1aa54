"""The command line, run as a user runs it: a subprocess, real files, exit codes and messages."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from weightbridge.io import write_checkpoint


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "weightbridge", *args], capture_output=True, text=True
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr}")
    return proc


def test_demo_converts_verifies_and_compares_outputs(tmp_path) -> None:
    out = run("demo", "--dir", str(tmp_path)).stdout
    assert "verified 6 tensors" in out
    diff = float(out.split("max |difference| = ")[1].split()[0])
    assert diff <= 1e-9  # float64 sums in two orders; a mispaired weight would differ by ~1
    assert (tmp_path / "converted" / "model.safetensors.index.json").exists()


def test_inspect_spec_plan_convert_verify(tmp_path) -> None:
    rng = np.random.default_rng(0)
    src = tmp_path / "theirs.safetensors"
    write_checkpoint(
        str(src),
        {
            "module.fc.weight": rng.standard_normal((6, 4)).astype(np.float32),
            "module.fc.bias": np.zeros(6, np.float32),
        },
    )
    table = run("inspect", str(src)).stdout
    assert "module.fc.weight  6x4    F32" in table and "2 tensors" in table
    mine = {
        "fc": {},
        "fc.kernel": {"shape": [4, 6], "dtype": "F32"},
        "fc.bias": {"shape": [6], "dtype": "F32"},
    }
    del mine["fc"]
    (tmp_path / "mine.json").write_text(json.dumps(mine))
    spec = json.loads(run("spec", str(src)).stdout)
    assert spec["module.fc.weight"] == {"shape": [6, 4], "dtype": "F32"}
    common = [
        str(src),
        "--like",
        str(tmp_path / "mine.json"),
        "--rename",
        r"^module\.=",
        "--from",
        "pytorch",
        "--to",
        "flax",
    ]
    shown = run("plan", *common, "-o", str(tmp_path / "plan.json")).stdout
    assert "fc.kernel" in shown and "permute(1,0)" in shown
    done = run(
        "convert", str(src), "--plan", str(tmp_path / "plan.json"), "-o", str(tmp_path / "out")
    ).stdout
    assert "wrote 1 shard(s)" in done
    assert "verified 2 tensors" in run("verify", str(src), str(tmp_path / "out")).stdout
    again = run("convert", *common, "-o", str(tmp_path / "out")).stdout
    assert "1 already complete (resumed)" in again


def test_errors_are_one_line_messages_with_exit_code_2(tmp_path) -> None:
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    proc = run("inspect", str(bad), check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("weightbridge: error: ") and "Traceback" not in proc.stderr
    assert str(bad) in proc.stderr
    (tmp_path / "mine.json").write_text("{oops")
    write_checkpoint(str(tmp_path / "ok.safetensors"), {"a": np.zeros(2, np.float32)})
    proc = run(
        "convert",
        str(tmp_path / "ok.safetensors"),
        "--like",
        str(tmp_path / "mine.json"),
        "-o",
        str(tmp_path / "o"),
        check=False,
    )
    assert proc.returncode == 2 and "mine.json: spec file is not valid JSON" in proc.stderr
