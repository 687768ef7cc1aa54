"""Block-scaled FP8 -> bf16 (``weightbridge convert --dequantize``): time and peak memory.

Builds a DeepSeek-V3-shaped checkpoint of ``--size`` bytes of fp8 weights (one attention block
with its MLA projections, 576 rows of ``kv_a_proj_with_mqa`` included, then 2048x7168 /
7168x2048 experts until the size is reached), each with its float32 ``weight_scale_inv`` (one
scale per 128x128 block), and bf16 norms, in safetensors shards of 1 GB. Then runs, each in a
child whose ``RssAnon`` is polled from ``/proc`` every 20 ms:

* ``weightbridge convert SRC -o OUT --dequantize`` (bf16, the default);
* with ``--naive``, what DeepSeek's ``fp8_cast_bf16.py`` does on a CPU: each shard loaded whole
  with ``safetensors.torch.load_file``, every weight dequantized whole
  (``w.float() * scale.repeat_interleave(128, 0).repeat_interleave(128, 1)``), the shard saved
  whole.

Prints wall time, fp8 MB/s read, and peak RssAnon for each, and checks that both outputs are
equal tensor by tensor (bit for bit). Nothing here asserts on timings.

    python scripts/bench_dequantize.py --size 1GB --naive

Measured on the 2-core test VM (shared with other jobs, so times vary), 1.0 GB of fp8 in one
shard (63 weights), 2.0 GB of bf16 written:

    weightbridge --dequantize  8.0 s, 128 MB/s fp8 in (272 MB/s bf16 out), peak RssAnon 31 MB
    whole tensors (torch)      24.9 s, 41 MB/s fp8 in, peak RssAnon 3.4 GB
    outputs equal bit for bit: 63 tensors
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

from weightbridge.planning.shards import human_size, parse_size

BLOCK = 128
POLL_SECONDS = 0.02
HIDDEN = 7168
# One MLA attention block of DeepSeek-V3 (out, in); the experts fill the rest.
ATTENTION = {
    "self_attn.q_a_proj.weight": (1536, HIDDEN),
    "self_attn.q_b_proj.weight": (24576, 1536),
    "self_attn.kv_a_proj_with_mqa.weight": (576, HIDDEN),
    "self_attn.kv_b_proj.weight": (32768, 512),
    "self_attn.o_proj.weight": (HIDDEN, 16384),
}
EXPERT = {
    "gate_proj.weight": (2048, HIDDEN),
    "up_proj.weight": (2048, HIDDEN),
    "down_proj.weight": (HIDDEN, 2048),
}

NAIVE = r"""
import json, os, sys
import torch
from safetensors.torch import load_file, save_file

src, dest = sys.argv[1:3]
os.makedirs(dest, exist_ok=True)
weight_map = {}
for shard in sorted(f for f in os.listdir(src) if f.endswith(".safetensors")):
    tensors = load_file(os.path.join(src, shard))
    out = {}
    for name, t in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        scale = tensors.get(name + "_scale_inv")
        if scale is None:
            out[name] = t
            continue
        rows, cols = t.shape
        s = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]
        out[name] = (t.to(torch.float32) * s).to(torch.bfloat16)
    save_file(out, os.path.join(dest, shard))
    weight_map.update(dict.fromkeys(out, shard))
    del tensors, out
with open(os.path.join(dest, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
"""


def build(path: str, size: int) -> int:
    """Write the checkpoint (shards of up to 1 GB of fp8, with an index); return fp8 bytes."""
    from safetensors.numpy import save_file

    from weightbridge.io.sharded import write_index

    os.makedirs(path)
    rng = np.random.default_rng(0)
    shapes = {f"layers.0.{k}": v for k, v in ATTENTION.items()}
    total = sum(r * c for r, c in shapes.values())
    e = 0
    while total < size:
        for k, (r, c) in EXPERT.items():
            shapes[f"layers.0.mlp.experts.{e}.{k}"] = (r, c)
            total += r * c
        e += 1
    shard, part, nbytes, weight_map = 1, {}, 0, {}

    def flush() -> None:
        nonlocal shard, part, nbytes
        name = f"model-{shard:05d}.safetensors"
        save_file(part, os.path.join(path, name))
        weight_map.update(dict.fromkeys(part, name))
        shard, part, nbytes = shard + 1, {}, 0

    for name, (r, c) in shapes.items():
        codes = np.frombuffer(rng.bytes(r * c), np.uint8).reshape(r, c) & np.uint8(0xF7)
        part[name] = codes.view(ml_dtypes.float8_e4m3fn)
        sr, sc = -(-r // BLOCK), -(-c // BLOCK)
        part[name + "_scale_inv"] = (rng.random((sr, sc)) * 1e-3).astype(np.float32)
        nbytes += r * c
        if nbytes >= 1 << 30:
            flush()
    part["layers.0.input_layernorm.weight"] = np.ones(HIDDEN, ml_dtypes.bfloat16)
    flush()
    write_index(os.path.join(path, "model.safetensors.index.json"), weight_map, total)
    return total


def run_polled(cmd: list[str]) -> tuple[float, int]:
    """Run `cmd`, polling its RssAnon; then `sync`. Returns (wall seconds, peak RssAnon)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peak = 0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
        except (FileNotFoundError, ProcessLookupError):
            pass
        time.sleep(POLL_SECONDS)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)[:200]}: failed with exit code {proc.returncode}")
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - started, peak


def same(a: str, b: str) -> int:
    """Compare two outputs tensor by tensor, bit for bit; return how many tensors."""
    from weightbridge.io import open_reader

    with open_reader(a) as ra, open_reader(b) as rb:
        names = ra.specs().names
        assert sorted(names) == sorted(rb.specs().names), "different tensor names"
        for n in names:
            x, y = np.asarray(ra.read(n)), np.asarray(rb.read(n))
            assert x.dtype == y.dtype and x.shape == y.shape, n
            assert np.array_equal(x.view(np.uint16), y.view(np.uint16)), n
            ra.release(n)
            rb.release(n)
    return len(names)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="1GB", help="fp8 bytes of weights (default 1GB)")
    p.add_argument("--naive", action="store_true", help="also run the whole-tensor torch way")
    p.add_argument("--dir", help="work directory (default: a temporary one, removed)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as work:
        src = os.path.join(work, "src")
        total = build(src, parse_size(args.size))
        print(f"checkpoint: {human_size(total)} of fp8 weights in {src}")
        out = os.path.join(work, "out")
        cmd = [sys.executable, "-m", "weightbridge", "convert", src, "-o", out, "--dequantize"]
        seconds, peak = run_polled([*cmd, "--quiet"])
        print(
            f"weightbridge --dequantize: {seconds:.1f} s, {total / seconds / 1e6:.0f} MB/s fp8 "
            f"in, peak RssAnon {human_size(peak)}"
        )
        if args.naive:
            naive = os.path.join(work, "naive")
            seconds, peak = run_polled([sys.executable, "-c", NAIVE, src, naive])
            print(
                f"whole tensors (torch): {seconds:.1f} s, {total / seconds / 1e6:.0f} MB/s fp8 "
                f"in, peak RssAnon {human_size(peak)}"
            )
            print(f"outputs equal bit for bit: {same(out, naive)} tensors")


if __name__ == "__main__":
    main()
