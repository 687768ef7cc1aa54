"""Inspect, plan, review and edit a plan, then apply it: the plan is a JSON file you own.

1. `weightbridge plan` refuses to guess: two attention projections of the same shape, whose
   names (`query`/`key` against `wq`/`wk`) nothing ties together. It says which hint settles it.
2. With the hint, the plan is saved as JSON. Reviewing it, we edit one step (cast the output
   head to bf16), then `convert --plan` applies it as written and `verify` checks every tensor.
3. The same plan converts every checkpoint with the same specs (the next training step), and is
   refused for a checkpoint whose specs differ.

Run:   python examples/07_review_a_plan.py [WORKDIR]
Needs: pip install weightbridge
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile

import numpy as np

from weightbridge.io import open_reader, write_checkpoint


def weightbridge(*args: str, cwd: str, expect: int = 0) -> str:
    """Run the command line in `cwd`; show the command, its output, and its exit code."""
    print(f"$ weightbridge {shlex.join(args)}")
    proc = subprocess.run(
        [sys.executable, "-m", "weightbridge", *args], capture_output=True, text=True, cwd=cwd
    )
    print((proc.stdout + proc.stderr).rstrip() + f"\n(exit {proc.returncode})\n")
    if proc.returncode != expect:
        raise SystemExit(f"expected exit {expect}, got {proc.returncode}")
    return proc.stdout + proc.stderr


def theirs(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "encoder.query.weight": rng.standard_normal((8, 8)).astype(np.float32),
        "encoder.query.bias": rng.standard_normal(8).astype(np.float32),
        "encoder.key.weight": rng.standard_normal((8, 8)).astype(np.float32),
        "encoder.key.bias": rng.standard_normal(8).astype(np.float32),
        "head.weight": rng.standard_normal((3, 8)).astype(np.float32),
        "head.bias": rng.standard_normal(3).astype(np.float32),
    }


def main(workdir: str) -> None:
    write_checkpoint(os.path.join(workdir, "step1.safetensors"), theirs(1))
    write_checkpoint(os.path.join(workdir, "step2.safetensors"), theirs(2))
    mine = {
        "attn/wq/kernel": [8, 8],
        "attn/wq/bias": [8],
        "attn/wk/kernel": [8, 8],
        "attn/wk/bias": [8],
        "out/kernel": [8, 3],
        "out/bias": [3],
    }
    with open(os.path.join(workdir, "mine.json"), "w") as f:
        json.dump({k: {"shape": s, "dtype": "F32"} for k, s in mine.items()}, f)

    weightbridge("inspect", "step1.safetensors", cwd=workdir)
    refusal = weightbridge(
        "plan", "step1.safetensors", "--like", "mine.json", cwd=workdir, expect=2
    )
    assert "--hint wq=query" in refusal
    weightbridge(
        "plan",
        "step1.safetensors",
        "--like",
        "mine.json",
        "--hint",
        "wq=query",
        "-o",
        "plan.json",
        cwd=workdir,
    )

    # The review: the head goes out in bf16. A step is {target, shape, dtype, sources, ops}.
    path = os.path.join(workdir, "plan.json")
    with open(path) as f:
        plan = json.load(f)
    for step in plan["steps"]:
        if step["target"].startswith("out/"):
            step["dtype"] = "BF16"
            step["ops"].append({"op": "cast", "dtype": "BF16"})
    with open(path, "w") as f:
        json.dump(plan, f, indent=1)

    weightbridge("convert", "step1.safetensors", "--plan", "plan.json", "-o", "out1", cwd=workdir)
    weightbridge("verify", "step1.safetensors", "out1", cwd=workdir)
    weightbridge("convert", "step2.safetensors", "--plan", "plan.json", "-o", "out2", cwd=workdir)
    weightbridge("inspect", "out2", cwd=workdir)

    write_checkpoint(os.path.join(workdir, "other.safetensors"), {"w": np.zeros(4, np.float32)})
    stale = weightbridge(
        "convert", "other.safetensors", "--plan", "plan.json", "-o", "out3", cwd=workdir, expect=2
    )
    assert "fingerprint" in stale

    with open_reader(os.path.join(workdir, "out2")) as out:
        src = theirs(2)
        assert np.array_equal(out.read("attn/wq/kernel"), src["encoder.query.weight"].T)
        assert np.array_equal(out.read("attn/wk/kernel"), src["encoder.key.weight"].T)
        assert out.specs()["out/kernel"].dtype == "BF16"
    print(
        "OK: the reviewed plan was applied as edited to both checkpoints, and refused for another"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(tmp)
