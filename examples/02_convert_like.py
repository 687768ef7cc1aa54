"""A safetensors checkpoint -> another model's names and layouts, on the command line.

"Theirs" is a checkpoint with PyTorch (Hugging Face style) names and [out, in] weights; "mine"
is a spec JSON of the model you wrote (here Flax-style names, [in, out] kernels). `weightbridge
plan` shows the mapping from headers alone, `convert --like` streams it, `verify` recomputes
every output tensor from the source, and a numpy forward pass shows both compute the same.

Run:   python examples/02_convert_like.py [WORKDIR]
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
from safetensors.numpy import load_file, save_file

VOCAB, DIM, HIDDEN, CLASSES, LAYERS = 50, 16, 32, 3, 2


def theirs_tensors() -> dict[str, np.ndarray]:
    """A tiny PyTorch-named model: embedding, norm, two feed-forward blocks, a classifier."""
    rng = np.random.default_rng(0)

    def r(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    t = {
        "embeddings.word_embeddings.weight": r(VOCAB, DIM),
        "embeddings.LayerNorm.weight": 1 + r(DIM),
        "embeddings.LayerNorm.bias": r(DIM),
    }
    for i in range(LAYERS):
        t[f"encoder.layer.{i}.intermediate.dense.weight"] = r(HIDDEN, DIM)
        t[f"encoder.layer.{i}.intermediate.dense.bias"] = r(HIDDEN)
        t[f"encoder.layer.{i}.output.dense.weight"] = r(DIM, HIDDEN)
        t[f"encoder.layer.{i}.output.dense.bias"] = r(DIM)
    t["classifier.weight"] = r(CLASSES, DIM)
    t["classifier.bias"] = r(CLASSES)
    return t


def mine_spec() -> dict[str, dict[str, object]]:
    """The target spec file: {name: {"shape": [...], "dtype": "F32"}} (`weightbridge spec
    mine.safetensors -o mine.json` writes one from a checkpoint of your model)."""
    shapes = {
        "embed/embedding": (VOCAB, DIM),
        "embed_norm/scale": (DIM,),
        "embed_norm/bias": (DIM,),
        **{
            f"blocks_{i}/{name}": shape
            for i in range(LAYERS)
            for name, shape in (
                ("up/kernel", (DIM, HIDDEN)),
                ("up/bias", (HIDDEN,)),
                ("down/kernel", (HIDDEN, DIM)),
                ("down/bias", (DIM,)),
            )
        },
        "head/kernel": (DIM, CLASSES),
        "head/bias": (CLASSES,),
    }
    return {name: {"shape": list(shape), "dtype": "F32"} for name, shape in shapes.items()}


def layer_norm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * scale + bias


def forward_theirs(t: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    x = t["embeddings.word_embeddings.weight"][ids]
    x = layer_norm(x, t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"])
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        h = np.maximum(
            x @ t[p + "intermediate.dense.weight"].T + t[p + "intermediate.dense.bias"], 0
        )
        x = x + h @ t[p + "output.dense.weight"].T + t[p + "output.dense.bias"]
    return x.mean(1) @ t["classifier.weight"].T + t["classifier.bias"]


def forward_mine(p: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    x = layer_norm(p["embed/embedding"][ids], p["embed_norm/scale"], p["embed_norm/bias"])
    for i in range(LAYERS):
        b = f"blocks_{i}/"
        h = np.maximum(x @ p[b + "up/kernel"] + p[b + "up/bias"], 0)
        x = x + h @ p[b + "down/kernel"] + p[b + "down/bias"]
    return x.mean(1) @ p["head/kernel"] + p["head/bias"]


def weightbridge(*args: str, cwd: str) -> str:
    """Run the command line in `cwd` as a user would; show the command and its output."""
    print(f"$ weightbridge {shlex.join(args)}")
    proc = subprocess.run(
        [sys.executable, "-m", "weightbridge", *args], capture_output=True, text=True, cwd=cwd
    )
    print(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"weightbridge {args[0]} failed with exit code {proc.returncode}")
    return proc.stdout


def main(workdir: str) -> None:
    save_file(theirs_tensors(), os.path.join(workdir, "theirs.safetensors"))
    with open(os.path.join(workdir, "mine.json"), "w") as f:
        json.dump(mine_spec(), f, indent=1)

    weightbridge("inspect", "theirs.safetensors", cwd=workdir)
    weightbridge(
        "plan", "theirs.safetensors", "--like", "mine.json", "-o", "plan.json", cwd=workdir
    )
    weightbridge("convert", "theirs.safetensors", "--like", "mine.json", "-o", "out", cwd=workdir)
    weightbridge("verify", "theirs.safetensors", "out", cwd=workdir)

    ids = np.random.default_rng(1).integers(0, VOCAB, (4, 7))
    want = forward_theirs(load_file(os.path.join(workdir, "theirs.safetensors")), ids)
    got = forward_mine(load_file(os.path.join(workdir, "out", "model.safetensors")), ids)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    diff = float(np.abs(got - want).max())
    print(f"OK: the converted model computes what theirs does (max |difference| {diff:.1e})")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(tmp)
