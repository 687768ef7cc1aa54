"""`weightbridge demo`: a small PyTorch-style checkpoint streamed into a Flax-style layout.

It builds "theirs" (a sharded safetensors MLP with PyTorch names and [out, in] weights) and
"mine" (a target spec with Flax names and [in, out] kernels), converts, verifies, and checks
with numpy that both compute the same outputs.
"""

from __future__ import annotations

import os
from typing import TextIO

import numpy as np

from weightbridge import api
from weightbridge.io import write_checkpoint
from weightbridge.io.sharded import write_index
from weightbridge.spec import CheckpointSpec, TensorSpec, save_spec_file

SIZES = [(64, 32), (128, 64), (10, 128)]  # (out, in) per torch Linear


def build_theirs(path: str, seed: int = 0) -> dict[str, np.ndarray]:
    """A 2-shard safetensors checkpoint of a torch MLP; returns its tensors."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for i, (o, n) in enumerate(SIZES):
        tensors[f"layers.{i}.weight"] = rng.standard_normal((o, n)).astype(np.float32)
        tensors[f"layers.{i}.bias"] = rng.standard_normal(o).astype(np.float32)
    os.makedirs(path, exist_ok=True)
    names = list(tensors)
    half = len(names) // 2
    shards = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    for shard, keys in shards.items():
        write_checkpoint(os.path.join(path, shard), {k: tensors[k] for k in keys})
    write_index(
        os.path.join(path, "model.safetensors.index.json"),
        {k: s for s, keys in shards.items() for k in keys},
        sum(t.nbytes for t in tensors.values()),
    )
    return tensors


def mine_spec() -> CheckpointSpec:
    specs = []
    for i, (o, n) in enumerate(SIZES):
        specs.append(TensorSpec(f"Dense_{i}.kernel", (n, o), "F32"))
        specs.append(TensorSpec(f"Dense_{i}.bias", (o,), "F32"))
    return CheckpointSpec.of(specs)


def mlp_torch(t: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    for i in range(len(SIZES)):
        x = x @ t[f"layers.{i}.weight"].T + t[f"layers.{i}.bias"]
        x = np.maximum(x, 0) if i < len(SIZES) - 1 else x
    return x


def mlp_flax(p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    for i in range(len(SIZES)):
        x = x @ p[f"Dense_{i}.kernel"] + p[f"Dense_{i}.bias"]
        x = np.maximum(x, 0) if i < len(SIZES) - 1 else x
    return x


def run_demo(workdir: str, out: TextIO) -> None:
    theirs_dir, spec_path, dest = (
        os.path.join(workdir, n) for n in ("theirs", "mine.json", "converted")
    )
    theirs = build_theirs(theirs_dir)
    save_spec_file(mine_spec(), spec_path)
    print(f"theirs: {theirs_dir} (PyTorch names, 2 safetensors shards)", file=out)
    print(f"mine:   {spec_path} (Flax names and layouts)\n", file=out)
    plan = api.plan(
        theirs_dir,
        spec_path,
        renames=[r"layers\.(\d+)=Dense_\1"],
        from_framework="pytorch",
        to_framework="flax",
    )
    print(plan.explain(), "\n", file=out)
    report = api.convert(
        theirs_dir, dest, plan=plan, target=spec_path, max_shard_size="20KB", overwrite=True
    )
    print(report.summary(), file=out)
    n = api.verify(theirs_dir, dest)
    print(f"verified {n} tensors against the source", file=out)
    from weightbridge.io import open_reader

    with open_reader(dest) as r:
        mine = {name: np.array(r.read(name), np.float64) for name in r.specs().names}
    # Float64 arithmetic on the (exactly copied) float32 weights: the two implementations sum
    # in different orders, and float32 rounding of that would differ by BLAS kernel and CPU.
    x = np.random.default_rng(1).standard_normal((4, SIZES[0][1]))
    ref = {k: np.asarray(v, np.float64) for k, v in theirs.items()}
    diff = float(np.abs(mlp_torch(ref, x) - mlp_flax(mine, x)).max())
    print(f"same outputs from both implementations: max |difference| = {diff:.2e}", file=out)
    if diff > 1e-9:
        raise AssertionError(f"demo outputs differ by {diff}")
    print(f"\nfiles in {dest}: {sorted(os.listdir(dest))}", file=out)
