"""Keras 3 models -> PyTorch and Flax twins that compute the same function.

Source ("theirs"): ``{variable.path: numpy}`` of a live Keras 3 model, in ``model.weights``
order (``Conv1/kernel``, ``bn_Conv1/gamma``, ``bn_Conv1/moving_mean``, ...). Targets: a torch
state dict as numpy (torch's names, ``num_batches_tracked`` included) or Flax variables
flattened with ``/`` (``params/Conv_0/kernel``, ``batch_stats/BatchNorm_0/mean``). Inputs are
NHWC for Keras and Flax, NCHW for torch (the input is transposed, never the weights).

The twins:

- keras.applications MobileNetV2 (alpha 0.35), MobileNetV3Small, DenseNet121 and ResNet50
  against torchvision's models, changed only where Keras computes differently: TF "same"
  padding (asymmetric for stride 2: Keras pads bottom/right, torch both sides), BatchNorm
  epsilon, ResNet50's conv biases and its stride on the first 1x1 conv (v1, not v1.5).
  DenseNet121 needs no change (zero vs -inf padding before the max pool agree after a ReLU).
- MobileNetV2 (alpha 0.35) as a Flax linen module (Flax's "SAME" is TF's).
- Small functional models of the layers Keras applications are made of: Conv2D,
  DepthwiseConv2D (depth_multiplier 2), SeparableConv2D, BatchNormalization, Dense after
  GlobalAveragePooling, Dense after Flatten.

Every pair is proven in `build` with a hand mapping (layer by layer, in definition order, with
the layout change each layer type needs); `ORACLE[case name]` keeps those target values.

Dense after Flatten into torch is expected to be refused: Keras flattens (H, W, C), torch
(C, H, W), so the Dense kernel's rows must be permuted by a spatial shape that no tensor's
metadata records. Into Flax (also (H, W, C)) it is a plain copy.
"""

from __future__ import annotations

import os

# Before anything imports keras (a process that imported it already keeps its backend; the
# cases run on any backend).
os.environ.setdefault("KERAS_BACKEND", "jax")

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from tests.corpus.harness import Case, Pair

TORCH = ("keras", "jax", "torch")  # jax: the Keras backend these cases set
TORCHVISION = ("keras", "jax", "torch", "torchvision")
FLAX = ("keras", "jax")
NUM_CLASSES = 10

# Oracle target values (flat, mine's names) from the hand mapping, filled by each build.
ORACLE: dict[str, dict[str, np.ndarray]] = {}


# --- keras side ---------------------------------------------------------------------------------


def _keras() -> Any:
    import keras

    return keras


def perturb_keras(model: Any, seed: int) -> Any:
    """Every variable moved from its init (BatchNorm statistics and affines random, biases
    random, kernels noised by a tenth of their spread), so all tensors are distinct."""
    keras = _keras()
    rng = np.random.default_rng(seed)
    for w in model.weights:
        leaf = w.path.rsplit("/", 1)[-1]
        value = np.asarray(keras.ops.convert_to_numpy(w.value), np.float64)
        if leaf in ("gamma", "moving_variance"):
            value = rng.uniform(0.5, 1.5, value.shape)
        elif leaf in ("beta", "bias", "moving_mean"):
            value = rng.standard_normal(value.shape) * 0.1
        else:
            value = value + rng.standard_normal(value.shape) * 0.1 * max(float(value.std()), 0.02)
        w.assign(value.astype(np.float32))
    return model


def keras_flat(model: Any) -> dict[str, np.ndarray]:
    keras = _keras()
    flat = {w.path: np.asarray(keras.ops.convert_to_numpy(w.value)) for w in model.weights}
    assert len(flat) == len(model.weights), "duplicate Keras variable paths"
    return flat


def keras_leaves(model: Any) -> list[tuple[str, str, str]]:
    """(path, layer class, variable name) of every variable, in ``model.weights`` order."""
    out = []
    for layer in model.layers:
        for w in layer.weights:
            out.append((w.path, type(layer).__name__, w.path.rsplit("/", 1)[-1]))
    assert [p for p, _, _ in out] == [w.path for w in model.weights], "layer order != weights"
    return out


def run_keras(model: Any, x: np.ndarray) -> np.ndarray:
    keras = _keras()
    return np.asarray(keras.ops.convert_to_numpy(model(x, training=False)), np.float64)


# --- hand mappings (the proof that a pair is a pair) ----------------------------------------------


def _to_torch(cls: str, leaf: str, a: np.ndarray, shape: tuple[int, ...], flat_hwc: Any) -> Any:
    if (cls == "DepthwiseConv2D" and leaf == "kernel") or leaf == "depthwise_kernel":
        kh, kw, c, m = a.shape  # output channel c*m + j on both sides
        return a.reshape(kh, kw, c * m).transpose(2, 0, 1)[:, None]
    if a.ndim == 4 and len(shape) == 4:
        return a.transpose(3, 2, 0, 1)
    if a.ndim == 4 and len(shape) == 2:  # a 1x1 Conv2D head as a torch Linear
        return a.reshape(a.shape[2], a.shape[3]).T
    if a.ndim == 2 and flat_hwc is not None:  # Dense after Flatten: rows (h, w, c) -> (c, h, w)
        h, w, c = flat_hwc
        return a.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1).T
    if a.ndim == 2:
        return a.T
    return a


TORCH_LEAF = {
    "kernel": "weight",
    "bias": "bias",
    "gamma": "weight",
    "beta": "bias",
    "moving_mean": "running_mean",
    "moving_variance": "running_var",
}


def hand_map_torch(
    model: Any,
    theirs: dict[str, np.ndarray],
    mine: dict[str, np.ndarray],
    flatten_hwc: dict[str, tuple[int, int, int]] | None = None,
    module_of: Callable[[str], str] | None = None,
) -> dict[str, np.ndarray]:
    """Keras variables into the torch state dict: zipped in order, or, with `module_of`
    (Keras layer name -> torch module path), by name. ``num_batches_tracked`` is not a Keras
    variable: it keeps its value."""
    leaves = keras_leaves(model)
    if module_of is None:
        targets = [k for k in mine if not k.endswith("num_batches_tracked")]
    else:
        targets = [f"{module_of(p.rsplit('/', 1)[0])}.{TORCH_LEAF[leaf]}" for p, _, leaf in leaves]
    assert len(leaves) == len(targets), f"{len(leaves)} Keras variables, {len(targets)} torch"
    assert len(set(targets)) == len(targets)
    out = {k: v for k, v in mine.items() if k.endswith("num_batches_tracked")}
    for (path, cls, leaf), t in zip(leaves, targets, strict=True):
        layer = path.rsplit("/", 1)[0]
        v = _to_torch(cls, leaf, theirs[path], mine[t].shape, (flatten_hwc or {}).get(layer))
        assert v.shape == mine[t].shape, f"{path} {theirs[path].shape} -> {t} {mine[t].shape}"
        out[t] = np.ascontiguousarray(v, dtype=mine[t].dtype)
    assert set(out) == set(mine), f"unset: {sorted(set(mine) - set(out))[:3]}"
    return out


def flax_call_order(module: Any, x: Any) -> list[str]:
    """Paths of a Flax module's submodules in the order they are first called."""
    import flax.linen as nn
    import jax

    order: list[str] = []

    def record(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
        path = "/".join(context.module.path)
        if context.method_name == "__call__" and path not in order:
            order.append(path)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
    return order


_FLAX_LEAF_RANK = {"kernel": 0, "scale": 0, "bias": 1, "mean": 2, "var": 3}


def hand_map_flax(
    model: Any, theirs: dict[str, np.ndarray], mine: dict[str, np.ndarray], order: list[str]
) -> dict[str, np.ndarray]:
    """Keras variables zipped with Flax's, module by module in call order (scale, bias, mean,
    var: Keras' gamma, beta, moving_mean, moving_variance)."""
    by_module: dict[str, list[str]] = {}
    for k in mine:
        module, _, leaf = k.split("/", 1)[1].rpartition("/")
        by_module.setdefault(module, []).append(k)
    targets = [
        k
        for m in order
        for k in sorted(by_module.get(m, []), key=lambda k: _FLAX_LEAF_RANK[k.rsplit("/", 1)[1]])
    ]
    leaves = keras_leaves(model)
    assert len(leaves) == len(targets), f"{len(leaves)} Keras variables, {len(targets)} Flax"
    out = {}
    for (path, cls, leaf), t in zip(leaves, targets, strict=True):
        a = theirs[path]
        if (cls == "DepthwiseConv2D" and leaf == "kernel") or leaf == "depthwise_kernel":
            kh, kw, c, m = a.shape  # Flax: feature_group_count=c, kernel (kh, kw, 1, c*m)
            a = a.reshape(kh, kw, 1, c * m)
        assert a.shape == mine[t].shape, f"{path} {a.shape} -> {t} {mine[t].shape}"
        out[t] = np.ascontiguousarray(a, dtype=mine[t].dtype)
    assert set(out) == set(mine), f"unset: {sorted(set(mine) - set(out))[:3]}"
    return out


def _check(name: str, want: np.ndarray, got: np.ndarray, rtol: float, atol: float) -> None:
    scale = max(1.0, float(np.abs(want).max()))
    if want.shape != got.shape or not np.allclose(got, want, rtol=rtol, atol=atol * scale):
        diff = float(np.abs(got - want).max()) if want.shape == got.shape else float("nan")
        raise AssertionError(f"{name}: not a pair (hand-mapped twin differs by {diff:.3g})")


# --- torch side ---------------------------------------------------------------------------------


def tf_same(conv: Any) -> Any:
    """Make a torch Conv2d pad like TF/Keras "same" (extra row/column at the bottom/right) --
    which for stride 2 is also Keras' ``ZeroPadding2D(correct_pad(...))`` + "valid"."""
    import torch.nn.functional as F

    (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
    conv.padding = (0, 0)

    def pad(_module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        h, w = x.shape[-2:]
        ph = max((-(-h // sh) - 1) * sh + kh - h, 0)
        pw = max((-(-w // sw) - 1) * sw + kw - w, 0)
        return (F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)),)

    conv.register_forward_pre_hook(pad)
    return conv


def torch_pair(
    name: str,
    make_keras: Callable[[], Any],
    make_torch: Callable[[], Any],
    x_shape: tuple[int, ...],
    *,
    flatten_hwc: dict[str, tuple[int, int, int]] | None = None,
    module_of: Callable[[str], str] | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-4,
) -> Pair:
    import torch

    keras = _keras()
    keras.utils.set_random_seed(0)
    km = perturb_keras(make_keras(), seed=1)
    x = np.random.default_rng(2).standard_normal(x_shape).astype(np.float32)  # NHWC
    want = run_keras(km, x)
    theirs = keras_flat(km)

    torch.manual_seed(0)
    tm = make_torch().eval()
    base = {k: v.detach().clone() for k, v in tm.state_dict().items()}
    mine = {k: np.zeros(tuple(v.shape), v.numpy().dtype) for k, v in base.items()}
    x_nchw = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

    def run_mine(flat: dict[str, np.ndarray]) -> np.ndarray:
        sd = {
            k: torch.from_numpy(np.ascontiguousarray(v)).to(base[k].dtype) for k, v in flat.items()
        }
        tm.load_state_dict({**base, **sd}, strict=True)
        with torch.no_grad():
            return tm(x_nchw).numpy().astype(np.float64)

    oracle = hand_map_torch(km, theirs, mine, flatten_hwc, module_of)
    _check(name, want, run_mine(oracle), rtol, atol)
    ORACLE[name] = oracle
    return Pair(theirs, mine, lambda: want, run_mine, rtol=rtol, atol=atol)


def flax_pair(
    name: str,
    make_keras: Callable[[], Any],
    make_flax: Callable[[], Any],
    x_shape: tuple[int, ...],
    *,
    rtol: float = 1e-4,
    atol: float = 1e-4,
) -> Pair:
    import jax
    import jax.numpy as jnp
    from flax.traverse_util import flatten_dict, unflatten_dict

    keras = _keras()
    keras.utils.set_random_seed(0)
    km = perturb_keras(make_keras(), seed=1)
    x = np.random.default_rng(2).standard_normal(x_shape).astype(np.float32)
    want = run_keras(km, x)
    theirs = keras_flat(km)

    fm = make_flax()
    shapes = jax.eval_shape(fm.init, jax.random.PRNGKey(0), jnp.asarray(x))
    mine = {
        "/".join(k): np.zeros(v.shape, np.dtype(v.dtype)) for k, v in flatten_dict(shapes).items()
    }
    apply = jax.jit(fm.apply)

    def run_mine(flat: dict[str, np.ndarray]) -> np.ndarray:
        tree = unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in flat.items()})
        return np.asarray(apply(tree, jnp.asarray(x)), np.float64)

    oracle = hand_map_flax(km, theirs, mine, flax_call_order(fm, jnp.asarray(x)))
    _check(name, want, run_mine(oracle), rtol, atol)
    ORACLE[name] = oracle
    return Pair(theirs, mine, lambda: want, run_mine, rtol=rtol, atol=atol)


# --- keras.applications and their torchvision twins -------------------------------------------------


def keras_mobilenet_v2() -> Any:
    return _keras().applications.MobileNetV2(
        input_shape=(32, 32, 3),
        alpha=0.35,
        weights=None,
        classes=NUM_CLASSES,
        classifier_activation=None,
    )


def torch_mobilenet_v2() -> Any:
    import torch.nn as nn
    import torchvision

    m = torchvision.models.mobilenet_v2(weights=None, width_mult=0.35, num_classes=NUM_CLASSES)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.eps = 1e-3  # Keras' BatchNormalization default
        if isinstance(mod, nn.Conv2d) and mod.stride != (1, 1):
            tf_same(mod)
    return m


def keras_mobilenet_v3_small() -> Any:
    return _keras().applications.MobileNetV3Small(
        input_shape=(32, 32, 3),
        alpha=1.0,
        weights=None,
        classes=NUM_CLASSES,
        classifier_activation=None,
        include_preprocessing=False,
    )


def torch_mobilenet_v3_small() -> Any:
    import torch.nn as nn
    import torchvision

    m = torchvision.models.mobilenet_v3_small(weights=None, num_classes=NUM_CLASSES)
    for mod in m.modules():  # BatchNorm eps is already Keras' 1e-3
        if isinstance(mod, nn.Conv2d) and mod.stride != (1, 1):
            tf_same(mod)
    return m


def keras_densenet121() -> Any:
    return _keras().applications.DenseNet121(
        input_shape=(32, 32, 3), weights=None, classes=NUM_CLASSES, classifier_activation=None
    )


def torch_densenet121() -> Any:
    import torchvision

    return torchvision.models.densenet121(weights=None, num_classes=NUM_CLASSES)


def keras_resnet50() -> Any:
    return _keras().applications.ResNet50(
        input_shape=(32, 32, 3), weights=None, classes=NUM_CLASSES, classifier_activation=None
    )


def torch_resnet50_keras_style() -> Any:
    """torchvision's ResNet50 computing what Keras' does: every conv has a bias, a block's
    stride is on its first 1x1 conv (ResNet v1, not torchvision's v1.5), BatchNorm eps
    1.001e-5. Names stay torchvision's (``layer1.0.conv1.bias`` is new)."""
    import torch
    import torch.nn as nn
    import torchvision

    m = torchvision.models.resnet50(weights=None, num_classes=NUM_CLASSES)
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d) and mod.bias is None:
            mod.bias = nn.Parameter(torch.zeros(mod.out_channels))
        if isinstance(mod, nn.BatchNorm2d):
            mod.eps = 1.001e-5
        if isinstance(mod, torchvision.models.resnet.Bottleneck):
            mod.conv1.stride, mod.conv2.stride = mod.conv2.stride, (1, 1)
    return m


def resnet_module_of(layer: str) -> str:
    """Keras ResNet50 layer name -> torchvision module (``conv3_block2_1_bn`` -> ``layer2.1.bn1``)."""
    if layer == "predictions":
        return "fc"
    if layer.startswith("conv1_"):
        return {"conv1_conv": "conv1", "conv1_bn": "bn1"}[layer]
    stage, block, idx, kind = layer.split("_")
    prefix = f"layer{int(stage[4:]) - 1}.{int(block[5:]) - 1}"
    if idx == "0":
        return f"{prefix}.downsample.{0 if kind == 'conv' else 1}"
    return f"{prefix}.{kind}{idx}"


# --- Flax twin of keras.applications.MobileNetV2 --------------------------------------------------


def flax_mobilenet_v2() -> Any:
    import flax.linen as nn
    import jax

    def bn() -> Any:
        return nn.BatchNorm(use_running_average=True, epsilon=1e-3, momentum=0.999)

    class InvertedResidual(nn.Module):
        expansion: int
        filters: int
        stride: int

        @nn.compact
        def __call__(self, x: Any) -> Any:
            c = x.shape[-1]
            h = x
            if self.expansion != 1:
                h = jax.nn.relu6(bn()(nn.Conv(c * self.expansion, (1, 1), use_bias=False)(h)))
            d = h.shape[-1]
            h = nn.Conv(
                d, (3, 3), self.stride, padding="SAME", feature_group_count=d, use_bias=False
            )(h)
            h = jax.nn.relu6(bn()(h))
            h = bn()(nn.Conv(self.filters, (1, 1), use_bias=False)(h))
            return x + h if self.stride == 1 and c == self.filters else h

    # keras.applications.MobileNetV2(alpha=0.35): _make_divisible(int(filters * alpha), 8)
    blocks = [(1, 8, 1), (6, 8, 2), (6, 8, 1), (6, 16, 2), (6, 16, 1), (6, 16, 1)]
    blocks += [(6, 24, 2), (6, 24, 1), (6, 24, 1), (6, 24, 1)]
    blocks += [(6, 32, 1)] * 3 + [(6, 56, 2), (6, 56, 1), (6, 56, 1), (6, 112, 1)]

    class MobileNetV2(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            x = nn.Conv(16, (3, 3), 2, padding="SAME", use_bias=False)(x)
            x = jax.nn.relu6(bn()(x))
            for e, f, s in blocks:
                x = InvertedResidual(e, f, s)(x)
            x = jax.nn.relu6(bn()(nn.Conv(1280, (1, 1), use_bias=False)(x)))
            return nn.Dense(NUM_CLASSES)(x.mean(axis=(1, 2)))

    return MobileNetV2()


# --- small functional models of the same layers -----------------------------------------------------

EPS = 1e-3  # Keras' BatchNormalization default


def keras_convnet() -> Any:
    """Conv2D, DepthwiseConv2D (multiplier 2), SeparableConv2D, BatchNormalization, Dense."""
    keras = _keras()
    L = keras.layers
    x = inp = keras.Input((12, 12, 3))
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="stem_conv")(x)
    x = L.ReLU()(L.BatchNormalization(epsilon=EPS, name="stem_bn")(x))
    x = L.DepthwiseConv2D(3, strides=2, depth_multiplier=2, padding="same", name="dw")(x)
    x = L.ReLU()(L.BatchNormalization(epsilon=EPS, name="dw_bn")(x))
    x = L.SeparableConv2D(24, 3, padding="same", name="sep")(x)
    x = L.ReLU()(L.BatchNormalization(epsilon=EPS, name="sep_bn")(x))
    x = L.Conv2D(16, 1, activation="relu", name="pointwise")(x)
    x = L.GlobalAveragePooling2D()(x)
    x = L.Dense(24, activation="relu", name="fc1")(x)
    return keras.Model(inp, L.Dense(NUM_CLASSES, name="logits")(x))


def torch_convnet() -> Any:
    import torch
    import torch.nn as nn

    class ConvBN(nn.Sequential):
        def __init__(self, conv: nn.Module, c: int) -> None:
            super().__init__(conv, nn.BatchNorm2d(c, eps=EPS), nn.ReLU())

    class SeparableConv(nn.Module):
        def __init__(self, cin: int, cout: int) -> None:
            super().__init__()
            self.depthwise = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
            self.pointwise = nn.Conv2d(cin, cout, 1)

        def forward(self, x: Any) -> Any:
            return self.pointwise(self.depthwise(x))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = ConvBN(nn.Conv2d(3, 8, 3, padding=1, bias=False), 8)
            self.dw = ConvBN(tf_same(nn.Conv2d(8, 16, 3, stride=2, groups=8)), 16)
            self.sep = ConvBN(SeparableConv(16, 24), 24)
            self.pointwise = nn.Conv2d(24, 16, 1)
            self.head = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, NUM_CLASSES))

        def forward(self, x: Any) -> Any:
            x = torch.relu(self.pointwise(self.sep(self.dw(self.stem(x)))))
            return self.head(x.mean((2, 3)))

    return Net()


def flax_convnet() -> Any:
    import flax.linen as nn
    import jax

    class ConvNet(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            def bn_relu(h: Any) -> Any:
                return jax.nn.relu(nn.BatchNorm(use_running_average=True, epsilon=EPS)(h))

            x = bn_relu(nn.Conv(8, (3, 3), padding="SAME", use_bias=False)(x))
            x = bn_relu(nn.Conv(16, (3, 3), 2, padding="SAME", feature_group_count=8)(x))
            x = nn.Conv(16, (3, 3), padding="SAME", feature_group_count=16, use_bias=False)(x)
            x = bn_relu(nn.Conv(24, (1, 1))(x))
            x = jax.nn.relu(nn.Conv(16, (1, 1))(x))
            x = jax.nn.relu(nn.Dense(24)(x.mean(axis=(1, 2))))
            return nn.Dense(NUM_CLASSES)(x)

    return ConvNet()


FLAT_HWC = (3, 3, 6)  # the feature map a Dense after Flatten sees


def keras_flatten_dense() -> Any:
    keras = _keras()
    L = keras.layers
    x = inp = keras.Input((7, 7, 3))
    x = L.Conv2D(6, 3, strides=2, activation="relu", name="conv")(x)  # 3x3x6
    x = L.Flatten()(x)
    return keras.Model(inp, L.Dense(NUM_CLASSES, name="fc")(x))


def torch_flatten_dense() -> Any:
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),  # (C, H, W) order: the Dense kernel's rows must be permuted
        nn.Linear(int(np.prod(FLAT_HWC)), NUM_CLASSES),
    )


def flax_flatten_dense() -> Any:
    import flax.linen as nn
    import jax

    class FlattenDense(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            x = jax.nn.relu(nn.Conv(6, (3, 3), 2, padding="VALID")(x))
            return nn.Dense(NUM_CLASSES)(x.reshape(x.shape[0], -1))  # (H, W, C), as Keras

    return FlattenDense()


# --- the cases -------------------------------------------------------------------------------------


def _case(
    name: str,
    make: Callable[[], Pair],
    framework: tuple[str, ...],
    expect: str = "equal",
    hints_lead_to_equal: bool = True,
) -> Case:
    return Case(
        name,
        functools.cache(make),
        expect,  # type: ignore[arg-type]
        framework,
        hints_lead_to_equal,
    )


IMG = (2, 32, 32, 3)

CASES: list[Case] = [
    _case(
        "keras_mobilenet_v2_to_torchvision",
        lambda: torch_pair(
            "keras_mobilenet_v2_to_torchvision", keras_mobilenet_v2, torch_mobilenet_v2, IMG
        ),
        TORCHVISION,
    ),
    _case(
        "keras_mobilenet_v3_small_to_torchvision",
        lambda: torch_pair(
            "keras_mobilenet_v3_small_to_torchvision",
            keras_mobilenet_v3_small,
            torch_mobilenet_v3_small,
            IMG,
        ),
        TORCHVISION,
    ),
    _case(
        "keras_densenet121_to_torchvision",
        lambda: torch_pair(
            "keras_densenet121_to_torchvision", keras_densenet121, torch_densenet121, IMG
        ),
        TORCHVISION,
    ),
    _case(
        "keras_resnet50_to_torchvision_v1",
        lambda: torch_pair(
            "keras_resnet50_to_torchvision_v1",
            keras_resnet50,
            torch_resnet50_keras_style,
            IMG,
            module_of=resnet_module_of,
        ),
        TORCHVISION,
        # Stage 1's shortcut and third conv have one shape, names share nothing, and Keras builds
        # the shortcut between the convs where torchvision defines it last: refused. The two
        # definition orders are seen to disagree, so no hint is guessed from them (they used
        # to pair the third conv with the shortcut); the refusal says to use a rules file.
        expect="refused",
    ),
    _case(
        "keras_mobilenet_v2_to_flax",
        lambda: flax_pair("keras_mobilenet_v2_to_flax", keras_mobilenet_v2, flax_mobilenet_v2, IMG),
        FLAX,
        # Same-shaped BatchNorms named block_N_expand_BN vs BatchNorm_0, and Flax's sorted names
        # keep no order: refused.
        expect="refused",
    ),
    _case(
        "keras_convnet_to_torch",
        lambda: torch_pair("keras_convnet_to_torch", keras_convnet, torch_convnet, (2, 12, 12, 3)),
        TORCH,
    ),
    _case(
        "keras_convnet_to_flax",
        lambda: flax_pair("keras_convnet_to_flax", keras_convnet, flax_convnet, (2, 12, 12, 3)),
        FLAX,
    ),
    _case(
        "keras_flatten_dense_to_torch",
        lambda: torch_pair(
            "keras_flatten_dense_to_torch",
            keras_flatten_dense,
            torch_flatten_dense,
            (2, 7, 7, 3),
            flatten_hwc={"fc": FLAT_HWC},
        ),
        TORCH,
        expect="refused",
    ),
    _case(
        "keras_flatten_dense_to_flax",
        lambda: flax_pair(
            "keras_flatten_dense_to_flax", keras_flatten_dense, flax_flatten_dense, (2, 7, 7, 3)
        ),
        FLAX,
    ),
]
