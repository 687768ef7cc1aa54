"""Every saved step of a training run, converted in one call with one plan.

Checkpoints with the same specs share one plan (made once, from headers), each source gets its
own output directory named after it (`ckpts/step_100` -> `out/step_100/`), and a rerun resumes
the whole batch. On the command line:
`weightbridge convert ckpts/step_100 ckpts/step_200 ckpts/step_300 --like mine.json -o out/`.
Afterwards `weightbridge diff` compares two outputs tensor by tensor.

Run:   python examples/04_batch_convert.py [WORKDIR]
Needs: pip install weightbridge
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import numpy as np

import weightbridge
import weightbridge.api as wb
from weightbridge.io import open_reader, write_checkpoint

SIZES = [(32, 16), (8, 32)]  # (out, in) of each torch Linear
STEPS = (100, 200, 300)


def main(workdir: str) -> None:
    rng = np.random.default_rng(0)
    weights = {}
    for i, (o, n) in enumerate(SIZES):
        weights[f"layers.{i}.weight"] = rng.standard_normal((o, n)).astype(np.float32)
        weights[f"layers.{i}.bias"] = rng.standard_normal(o).astype(np.float32)
    sources = []
    for step in STEPS:  # each step a little further along, as a torch `pytorch_model.bin`
        weights = {
            k: v - 0.01 * rng.standard_normal(v.shape).astype(v.dtype) for k, v in weights.items()
        }
        folder = os.path.join(workdir, "ckpts", f"step_{step}")
        os.makedirs(folder)
        write_checkpoint(os.path.join(folder, "pytorch_model.bin"), weights, format="torch")
        sources.append(folder)

    mine = {}
    for i, (o, n) in enumerate(SIZES):
        mine[f"Dense_{i}/kernel"] = {"shape": [n, o], "dtype": "BF16"}  # Flax layout, in bf16
        mine[f"Dense_{i}/bias"] = {"shape": [o], "dtype": "BF16"}
    spec = os.path.join(workdir, "mine.json")
    with open(spec, "w") as f:
        json.dump(mine, f)

    out = os.path.join(workdir, "out")
    report = wb.convert(sources, out, target=spec)
    print(report.summary())

    for step, src in zip(STEPS, sources, strict=True):
        dest = os.path.join(out, f"step_{step}")
        n = wb.verify(src, dest)
        with open_reader(src) as theirs, open_reader(dest) as converted:
            kernel = converted.read("Dense_1/kernel").astype(np.float32)
            expected = theirs.read("layers.1.weight").T.astype(kernel.dtype)
            assert converted.specs()["Dense_1/kernel"].dtype == "BF16"
            np.testing.assert_allclose(kernel, expected, rtol=1e-2)  # bf16 rounding
        print(f"step {step}: {n} tensors verified in {dest}")

    changed = weightbridge.diff(os.path.join(out, "step_100"), os.path.join(out, "step_300"))
    print(changed.explain())
    assert not changed.equal and len(changed.value_mismatches) == 4
    print(f"OK: {len(STEPS)} checkpoints converted with one plan and verified")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(tmp)
