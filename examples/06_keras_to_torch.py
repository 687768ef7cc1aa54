"""A Keras 3 `.weights.h5` file -> the same model in PyTorch, streamed from the file.

`model.save_weights("model.weights.h5")` names tensors by layer class and variable number
(`layers/conv2d/vars/0`), with Keras' layouts (conv kernels HWIO, Dense [in, out], BatchNorm
gamma/beta/moving_mean/moving_variance). The target is the torch module itself: only its names
and shapes are taken. The output is a safetensors file that `load_state_dict` takes.

Run:   python examples/06_keras_to_torch.py [WORKDIR]
Needs: pip install 'weightbridge[keras]' torch   (Keras runs on its torch backend here)
"""

from __future__ import annotations

import os
import sys
import tempfile

os.environ.setdefault("KERAS_BACKEND", "torch")  # before Keras is imported

import keras
import numpy as np
import torch
from safetensors.torch import load_file

import weightbridge.api as wb


def keras_model() -> keras.Model:
    inputs = keras.Input((10, 10, 3))
    h = keras.layers.Conv2D(8, 3, activation="relu")(inputs)
    h = keras.layers.BatchNormalization(epsilon=1e-3)(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dense(16, activation="relu")(h)
    return keras.Model(inputs, keras.layers.Dense(4)(h))


class TorchModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.bn = torch.nn.BatchNorm2d(8, eps=1e-3)
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # NCHW
        h = self.bn(torch.relu(self.conv(x))).mean(dim=(2, 3))
        return self.fc2(torch.relu(self.fc1(h)))


def main(workdir: str) -> None:
    keras.utils.set_random_seed(0)
    model = keras_model()
    rng = np.random.default_rng(0)
    for w in model.weights:  # trained-looking values, the BatchNorm statistics included
        low = 0.5 if w.path.endswith("moving_variance") else -0.5
        w.assign(rng.uniform(low, low + 1.0, w.shape).astype(np.float32))
    weights = os.path.join(workdir, "model.weights.h5")
    model.save_weights(weights)

    tmodel = TorchModel().eval()
    out = os.path.join(workdir, "torch_out")
    plan = wb.plan(weights, tmodel)
    print(plan.explain(), "\n")
    print(wb.convert(weights, out, plan=plan).summary())
    # (BatchNorm's step counter has no Keras counterpart: torch's loader fills it in.)
    tmodel.load_state_dict(load_file(os.path.join(out, "model.safetensors")))

    x = rng.standard_normal((2, 10, 10, 3)).astype(np.float32)  # NHWC for Keras
    want = keras.ops.convert_to_numpy(model(x, training=False))
    with torch.no_grad():
        got = tmodel(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    diff = float(np.abs(got - want).max())
    print(f"OK: the torch model computes what the Keras model does (max |difference| {diff:.1e})")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(tmp)
