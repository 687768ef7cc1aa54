"""A Keras 3 model <-> the equivalent PyTorch model: adapted weights compute the same outputs.

The pair covers Dense, Conv2D, DepthwiseConv2D with ``depth_multiplier=2`` (Keras kernel
[kH, kW, C, M] against torch's [C*M, 1, kH, kW], output channel c*M + m on both sides),
BatchNormalization (gamma/beta/moving_mean/moving_variance), Embedding and
LayerNormalization. Keras runs on its torch backend unless KERAS_BACKEND says otherwise.

Keras weights come from the live model (``{w.path: w.numpy()}``) and from a real Keras 3
``model.save_weights("....weights.h5")`` file read by weightbridge's HDF5 reader, whose tensors
are named ``layers/<class>/vars/<i>`` (the class, not the layer's name; no "kernel"/"gamma").
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")

torch = pytest.importorskip("torch")
keras = pytest.importorskip("keras")
from torch_random import randomize_torch  # noqa: E402 (after the skips)

import weightbridge  # noqa: E402

pytestmark = [
    pytest.mark.keras,
    pytest.mark.torch,
    # Keras 3 variables' __array__ predates numpy 2's copy keyword; not weightbridge's code.
    pytest.mark.filterwarnings(
        "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
    ),
]

RTOL, ATOL = 1e-4, 1e-5
VOCAB, DIM, TOKENS = 20, 6, 7
EPS = 1e-3  # Keras' default epsilon for both BatchNormalization and LayerNormalization


def keras_model() -> Any:
    layers = keras.layers
    img = keras.Input((9, 8, 3), name="image")
    ids = keras.Input((TOKENS,), dtype="int32", name="ids")
    h = layers.Conv2D(4, 3, activation="relu", name="stem_conv")(img)
    h = layers.DepthwiseConv2D(3, depth_multiplier=2, name="block1_dwconv")(h)
    h = layers.BatchNormalization(epsilon=EPS, name="block1_bn")(h)
    h = layers.Activation("relu")(h)
    h = layers.GlobalAveragePooling2D()(h)
    h = layers.Dense(DIM, name="head_dense")(h)
    e = layers.Embedding(VOCAB, DIM, name="token_embedding")(ids)
    e = layers.GlobalAveragePooling1D()(e)
    h = layers.Add()([h, e])
    h = layers.LayerNormalization(epsilon=EPS, name="head_norm")(h)
    out = layers.Dense(5, name="logits")(h)
    return keras.Model([img, ids], out)


class TorchModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.dw = torch.nn.Conv2d(4, 8, 3, groups=4)  # depth multiplier 2
        self.bn = torch.nn.BatchNorm2d(8, eps=EPS)
        self.fc1 = torch.nn.Linear(8, DIM)
        self.emb = torch.nn.Embedding(VOCAB, DIM)
        self.norm = torch.nn.LayerNorm(DIM, eps=EPS)
        self.fc2 = torch.nn.Linear(DIM, 5)

    def forward(self, img: Any, ids: Any) -> Any:
        h = torch.relu(self.bn(self.dw(torch.relu(self.conv(img)))))
        h = self.fc1(h.mean((2, 3))) + self.emb(ids.long()).mean(1)
        return self.fc2(self.norm(h))


def inputs(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((2, 9, 8, 3)).astype(np.float32)
    ids = rng.integers(0, VOCAB, (2, TOKENS)).astype(np.int32)
    return img, ids


def run_keras(model: Any, img: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(model([img, ids], training=False)))


def run_torch(model: Any, img: np.ndarray, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.from_numpy(np.moveaxis(img, -1, 1).copy()), torch.from_numpy(ids))
    return np.asarray(out.numpy())


def randomize_keras(model: Any, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for w in model.weights:
        if w.path.endswith("moving_variance"):
            value = rng.uniform(0.5, 1.5, w.shape)
        else:
            value = rng.standard_normal(w.shape) * 0.5
        w.assign(value.astype(np.float32))


def keras_weights(model: Any) -> dict[str, np.ndarray]:
    """What a user holding a live Keras 3 model has: {``layer/var``: array}."""
    return {w.path: np.asarray(w.numpy()) for w in model.weights}


def test_keras_weight_names_are_what_the_matcher_sees() -> None:
    """Guards the premise of the tests below: Keras 3's own variable paths."""
    assert sorted(keras_weights(keras_model())) == sorted(
        [
            "stem_conv/kernel",
            "stem_conv/bias",
            "block1_dwconv/kernel",
            "block1_dwconv/bias",
            "block1_bn/gamma",
            "block1_bn/beta",
            "block1_bn/moving_mean",
            "block1_bn/moving_variance",
            "head_dense/kernel",
            "head_dense/bias",
            "token_embedding/embeddings",
            "head_norm/gamma",
            "head_norm/beta",
            "logits/kernel",
            "logits/bias",
        ]
    )
    assert keras_weights(keras_model())["block1_dwconv/kernel"].shape == (3, 3, 4, 2)


def test_keras_to_torch_in_memory() -> None:
    model = keras_model()
    randomize_keras(model, seed=0)
    img, ids = inputs(1)
    want = run_keras(model, img, ids)
    tmodel = TorchModel().eval()
    state = weightbridge.adapt(
        keras_weights(model), tmodel.state_dict(), in_format="keras", out_format="pytorch"
    )
    tmodel.load_state_dict(state)
    np.testing.assert_allclose(run_torch(tmodel, img, ids), want, rtol=RTOL, atol=ATOL)


def test_torch_to_keras_in_memory() -> None:
    tmodel = randomize_torch(TorchModel(), seed=2)
    img, ids = inputs(3)
    want = run_torch(tmodel, img, ids)
    model = keras_model()
    new = weightbridge.adapt(
        tmodel.state_dict(), keras_weights(model), in_format="pytorch", out_format="keras"
    )
    for w in model.weights:
        w.assign(new[w.path])
    np.testing.assert_allclose(run_keras(model, img, ids), want, rtol=RTOL, atol=ATOL)


def test_keras_to_torch_formats_guessed() -> None:
    """gamma/moving_mean/kernel on one side, weight/running_mean on the other: no formats given."""
    model = keras_model()
    randomize_keras(model, seed=4)
    img, ids = inputs(5)
    tmodel = TorchModel().eval()
    tmodel.load_state_dict(weightbridge.adapt(keras_weights(model), tmodel.state_dict()))
    np.testing.assert_allclose(
        run_torch(tmodel, img, ids), run_keras(model, img, ids), rtol=RTOL, atol=ATOL
    )


def test_keras_weights_h5_file_to_torch(tmp_path: Any) -> None:
    """A real Keras 3 ``.weights.h5`` (``layers/depthwise_conv2d/vars/0``...) read from disk."""
    model = keras_model()
    randomize_keras(model, seed=6)
    path = tmp_path / "model.weights.h5"
    model.save_weights(str(path))
    img, ids = inputs(7)
    tmodel = TorchModel().eval()
    state = weightbridge.adapt(
        str(path), tmodel.state_dict(), in_format="keras", out_format="pytorch"
    )
    tmodel.load_state_dict(state)
    np.testing.assert_allclose(
        run_torch(tmodel, img, ids), run_keras(model, img, ids), rtol=RTOL, atol=ATOL
    )
