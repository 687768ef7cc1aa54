"""Every script in examples/ runs as a user runs it (a subprocess, its own tiny weights) and
ends with the line that says what it proved; scripts that need a framework carry its marker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# script -> (the markers of what it imports, a line its output must contain)
CASES = {
    "01_torch_to_flax_adapt.py": (
        ("torch", "jax"),
        "OK: the Flax model computes what the torch model does",
    ),
    "02_convert_like.py": ((), "OK: the converted model computes what theirs does"),
    "03_partial_load_new_head.py": (
        ("torch",),
        "OK: the backbone computes the pretrained features; the 10-class head is mine",
    ),
    "04_batch_convert.py": ((), "OK: 3 checkpoints converted with one plan and verified"),
    "05_orbax_and_zarr.py": (
        ("jax",),
        "OK: the orbax checkpoint restores into the Flax model, which computes what theirs does",
    ),
    "06_keras_to_torch.py": (
        ("keras", "torch"),
        "OK: the torch model computes what the Keras model does",
    ),
    "07_review_a_plan.py": (
        (),
        "OK: the reviewed plan was applied as edited to both checkpoints, and refused for another",
    ),
    "08_gguf_out.py": (("gguf",), "OK: gguf reads all 8 tensors of model.gguf"),
    "09_llama_torch_to_flax.py": (
        ("torch", "jax", "transformers"),
        "OK: the Flax LLaMA computes the PyTorch LLaMA's logits",
    ),
    "10_torchvision_to_timm.py": (
        ("torch", "torchvision"),
        "OK: timm's resnet18 computes what torchvision's does",
    ),
}

# A hung script fails the test instead of the whole CI run; each takes seconds.
TIMEOUT = 300


def test_every_example_is_run_here() -> None:
    assert sorted(CASES) == sorted(p.name for p in EXAMPLES.glob("*.py"))


def test_the_index_lists_every_example() -> None:
    index = (EXAMPLES / "README.md").read_text()
    missing = [name for name in CASES if f"]({name})" not in index]
    assert not missing, f"examples/README.md does not link {missing}"


@pytest.mark.parametrize(
    "script",
    [
        pytest.param(name, marks=[getattr(pytest.mark, m) for m in marks])
        for name, (marks, _) in CASES.items()
    ],
)
def test_example_runs_and_proves_its_result(script: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    assert CASES[script][1] in proc.stdout, proc.stdout
