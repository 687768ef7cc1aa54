"""A Hugging Face style safetensors checkpoint -> a GGUF file with llama.cpp's tensor names.

`--rename PATTERN=REPLACEMENT` (regex, repeatable) maps the names; `--format gguf` writes
F32/F16/BF16 tensors as they are. llama.cpp's own Python package (`gguf`) reads the result,
and `weightbridge diff` compares it with the expected tensors in another format.

Run:   python examples/08_gguf_out.py [WORKDIR]
Needs: pip install weightbridge gguf
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tempfile

import gguf
import numpy as np

import weightbridge
from weightbridge.io import write_checkpoint

RENAMES = [
    r"^model\.embed_tokens\.weight$=token_embd.weight",
    r"^model\.layers\.(\d+)\.self_attn\.q_proj\.=blk.\1.attn_q.",
    r"^model\.layers\.(\d+)\.mlp\.down_proj\.=blk.\1.ffn_down.",
    r"^model\.layers\.(\d+)\.input_layernorm\.=blk.\1.attn_norm.",
    r"^model\.norm\.=output_norm.",
]


def theirs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    t = {"model.embed_tokens.weight": rng.standard_normal((32, 16)).astype(np.float16)}
    for i in range(2):
        t[f"model.layers.{i}.input_layernorm.weight"] = np.ones(16, np.float32)
        t[f"model.layers.{i}.self_attn.q_proj.weight"] = rng.standard_normal((16, 16)).astype(
            np.float16
        )
        t[f"model.layers.{i}.mlp.down_proj.weight"] = rng.standard_normal((16, 24)).astype(
            np.float16
        )
    t["model.norm.weight"] = np.ones(16, np.float32)
    return t


def renamed(name: str) -> str:
    for rule in RENAMES:
        pattern, replacement = rule.split("=", 1)
        name = re.sub(pattern, replacement, name)
    return name


def main(workdir: str) -> None:
    src = os.path.join(workdir, "model.safetensors")
    tensors = theirs()
    write_checkpoint(src, tensors)

    args = ["convert", "model.safetensors", "-o", "gguf", "--format", "gguf"]
    args += [a for rule in RENAMES for a in ("--rename", rule)]
    print("$ weightbridge " + shlex.join(args))
    proc = subprocess.run(
        [sys.executable, "-m", "weightbridge", *args], capture_output=True, text=True, cwd=workdir
    )
    print(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"convert failed with exit code {proc.returncode}")
    out = os.path.join(workdir, "gguf", "model.gguf")

    # llama.cpp's reader: every tensor, under its new name, with the source's values.
    read = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(out).tensors}
    for name, value in tensors.items():
        got = read[renamed(name)]
        assert got.shape == value.shape and got.dtype == value.dtype, (name, got.shape, got.dtype)
        assert np.array_equal(got, value), name
        print(f"  {renamed(name):24} {value.dtype}  {tuple(got.shape)}  equal")

    expected = os.path.join(workdir, "expected.npz")
    write_checkpoint(expected, {renamed(k): v for k, v in tensors.items()})
    report = weightbridge.diff(out, expected)
    print(report.summary())
    assert report.equal
    print(f"OK: gguf reads all {len(read)} tensors of model.gguf as the source holds them")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(tmp)
