"""PyTorch model -> the same model in Flax, in memory, with `weightbridge.adapt`.

`adapt(theirs, mine)` takes their weights (here a torch state dict) and the shape of yours (here
`jax.eval_shape` of a Flax `init`: no memory is allocated) and returns your variables filled
with their values: names paired, Linear [out, in] -> Dense [in, out], Conv OIHW -> HWIO.

Run:   python examples/01_torch_to_flax_adapt.py
Needs: pip install 'weightbridge[jax]' torch
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

import weightbridge


class TorchNet(torch.nn.Module):
    """A small CNN as torch writes it: NCHW input, Conv2d, global pooling, Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, kernel_size=3)
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return self.fc2(torch.relu(self.fc1(x)))


class FlaxNet(nn.Module):
    """The same network as Flax writes it: NHWC input, auto-named Conv_0, Dense_0, Dense_1."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(8, (3, 3), padding="VALID")(x)).mean(axis=(1, 2))
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(10)(x)


def main() -> None:
    torch.manual_seed(0)
    torch_model = TorchNet().eval()
    x = np.random.default_rng(0).standard_normal((2, 12, 12, 3)).astype(np.float32)  # NHWC

    # Mine: only shapes and dtypes (jax.ShapeDtypeStruct leaves), never initialised.
    abstract = jax.eval_shape(FlaxNet().init, jax.random.PRNGKey(0), jnp.asarray(x))
    variables = weightbridge.adapt(torch_model.state_dict(), abstract)

    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        print(f"  {name:28} {tuple(leaf.shape)}")

    with torch.no_grad():
        want = torch_model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    got = np.asarray(FlaxNet().apply(variables, jnp.asarray(x)))
    diff = float(np.abs(got - want).max())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    print(f"OK: the Flax model computes what the torch model does (max |difference| {diff:.1e})")


if __name__ == "__main__":
    main()
