"""A PyTorch-named safetensors checkpoint -> an orbax checkpoint a Flax model restores, and
-> zarr arrays, both written through tensorstore (the same code writes to s3:// and gs://).

The target is your Flax model's abstract variables (`jax.eval_shape`: shapes only). The orbax
output is restored by orbax itself and run; the zarr output is opened by tensorstore itself.
On the command line: `weightbridge convert theirs.safetensors --like mine.json -o ckpt/
--format orbax` (add `--step N` for a CheckpointManager layout, `-o s3://bucket/run
--endpoint URL` for an object store).

Run:   python examples/05_orbax_and_zarr.py [WORKDIR]
Needs: pip install 'weightbridge[jax]'
"""

from __future__ import annotations

import os
import sys
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

import weightbridge
import weightbridge.api as wb
from weightbridge.io import write_checkpoint


class FlaxMLP(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.gelu(nn.Dense(64)(x))
        x = nn.LayerNorm()(x)
        return nn.Dense(5)(x)


def theirs(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The same network with torch's names and [out, in] weights."""
    return {
        "fc1.weight": rng.standard_normal((64, 12)).astype(np.float32) * 0.3,
        "fc1.bias": rng.standard_normal(64).astype(np.float32),
        "norm.weight": 1 + rng.standard_normal(64).astype(np.float32) * 0.1,
        "norm.bias": rng.standard_normal(64).astype(np.float32) * 0.1,
        "fc2.weight": rng.standard_normal((5, 64)).astype(np.float32) * 0.3,
        "fc2.bias": rng.standard_normal(5).astype(np.float32),
    }


def forward_theirs(t: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    h = np.asarray(jax.nn.gelu(x @ t["fc1.weight"].T + t["fc1.bias"]))
    mean, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    h = (h - mean) / np.sqrt(var + 1e-6) * t["norm.weight"] + t["norm.bias"]
    return h @ t["fc2.weight"].T + t["fc2.bias"]


def main(workdir: str) -> None:
    rng = np.random.default_rng(0)
    tensors = theirs(rng)
    src = os.path.join(workdir, "theirs.safetensors")
    write_checkpoint(src, tensors)
    x = rng.standard_normal((3, 12)).astype(np.float32)
    abstract = jax.eval_shape(FlaxMLP().init, jax.random.PRNGKey(0), jnp.asarray(x))

    # 1. orbax: restored by orbax's own StandardCheckpointer, then run by Flax.
    ckpt = os.path.join(workdir, "orbax_ckpt")
    print(wb.convert(src, ckpt, target=abstract, format="orbax").summary())
    restored = ocp.StandardCheckpointer().restore(ckpt)
    got = np.asarray(FlaxMLP().apply(restored, jnp.asarray(x)))
    want = forward_theirs(tensors, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    print(f"orbax restore + Flax apply: max |difference| {np.abs(got - want).max():.1e}")

    # 2. zarr (v3): one array per tensor, opened here by tensorstore itself.
    zarr = os.path.join(workdir, "zarr_out")
    print(wb.convert(src, zarr, target=abstract, format="zarr").summary())
    kernel = ts.open({"driver": "zarr3", "kvstore": f"file://{zarr}/params/Dense_0/kernel/"})
    got_kernel = kernel.result().read().result()
    np.testing.assert_array_equal(got_kernel, tensors["fc1.weight"].T)
    print(f"tensorstore reads params/Dense_0/kernel {got_kernel.shape} from {zarr}")

    # Both outputs hold the same tensors: weightbridge reads orbax and zarr too.
    report = weightbridge.diff(ckpt, zarr)
    print(report.summary())
    assert report.equal
    print("OK: the orbax checkpoint restores into the Flax model, which computes what theirs does")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(tmp)
