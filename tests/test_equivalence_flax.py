"""PyTorch modules <-> equivalent Flax linen modules: the adapted weights compute the same outputs.

Every case is a pair of models written the way each framework writes them (torch: NCHW,
``Linear`` [out, in], ``Conv`` [O, I, *k]; Flax: NHWC, ``Dense`` [in, out], ``Conv`` [*k, I, O],
auto-named ``Dense_0``; parameter trees arrive sorted, as ``jax.eval_shape`` gives them). Both
directions are run: torch state dict -> the variables ``jax.eval_shape(model.init, ...)``
describes, and Flax variables -> the torch state dict. Weights are random (every tensor
distinct), and the check is the forward pass of both real frameworks, not the tensors.
"""

from __future__ import annotations

import glob
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
nn = pytest.importorskip("flax.linen")
from torch_random import randomize_torch  # noqa: E402 (after the skips)

jnp = jax.numpy
tnn = torch.nn

import weightbridge  # noqa: E402
from weightbridge import api  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.jax]

RTOL, ATOL = 1e-4, 1e-5


# --- helpers -------------------------------------------------------------------------------


def randomize_flax(variables: Any, seed: int = 0) -> Any:
    """Random arrays shaped like every leaf of a Flax variables tree (``var`` leaves positive)."""
    rng = np.random.default_rng(seed)

    def fill(path: Any, leaf: Any) -> Any:
        last = str(getattr(path[-1], "key", path[-1]))
        if last == "var":
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32))
        return jnp.asarray((rng.standard_normal(leaf.shape) * 0.5).astype(np.float32))

    return jax.tree_util.tree_map_with_path(fill, variables)


def assert_all_distinct(arrays: list[np.ndarray]) -> None:
    """No two tensors of a model hold the same values (so a swapped pair cannot go unnoticed)."""
    seen: dict[tuple[tuple[int, ...], bytes], int] = {}
    for i, a in enumerate(arrays):
        key = (a.shape, np.ascontiguousarray(a).tobytes())
        assert key not in seen, f"tensors {seen[key]} and {i} are equal"
        seen[key] = i


def channels_first(x: np.ndarray) -> np.ndarray:
    return np.moveaxis(x, -1, 1)


def channels_last(x: np.ndarray) -> np.ndarray:
    return np.moveaxis(x, 1, -1)


@dataclass(frozen=True)
class Case:
    name: str
    torch_model: Callable[[], Any]
    flax_model: Callable[[], Any]
    make_input: Callable[[np.random.Generator], np.ndarray]  # in Flax's layout
    channels_last_io: bool = False  # torch takes/gives channels-first
    # What metadata cannot show and the matcher refuses to guess (see test_certain_or_refuse):
    # the flatten order of a dense layer after a conv stack, the orientation of square kernels.
    hints: tuple[tuple[str, str], ...] = ()

    def torch_forward(self, model: Any, x: np.ndarray) -> np.ndarray:
        xt = channels_first(x) if self.channels_last_io else x
        with torch.no_grad():
            y = model(torch.from_numpy(np.ascontiguousarray(xt))).numpy()
        return channels_last(y) if self.channels_last_io else y


def _floats(*shape: int) -> Callable[[np.random.Generator], np.ndarray]:
    return lambda rng: rng.standard_normal(shape).astype(np.float32)


# --- the model pairs -----------------------------------------------------------------------


class TorchMLP(tnn.Module):
    """Five Linear layers, two of them the same shape with a bias, one without a bias."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = tnn.Linear(6, 8)
        self.fc2 = tnn.Linear(8, 8)
        self.fc3 = tnn.Linear(8, 8)
        self.fc4 = tnn.Linear(8, 8, bias=False)
        self.fc5 = tnn.Linear(8, 5)

    def forward(self, x: Any) -> Any:
        for fc in (self.fc1, self.fc2, self.fc3, self.fc4):
            x = torch.relu(fc(x))
        return self.fc5(x)


class FlaxMLP(nn.Module):
    @nn.compact
    def __call__(self, x: Any) -> Any:
        x = nn.relu(nn.Dense(8)(x))
        x = nn.relu(nn.Dense(8)(x))
        x = nn.relu(nn.Dense(8)(x))
        x = nn.relu(nn.Dense(8, use_bias=False)(x))
        return nn.Dense(5)(x)


_CONV = {1: tnn.Conv1d, 2: tnn.Conv2d, 3: tnn.Conv3d}
_KERNEL = {1: (3,), 2: (3, 2), 3: (3, 2, 2)}  # non-square: a swapped kH/kW shows
_SPATIAL = {1: (9,), 2: (7, 6), 3: (6, 5, 4)}


class TorchConvNd(tnn.Module):
    def __init__(self, dims: int) -> None:
        super().__init__()
        k = _KERNEL[dims]
        self.conv_a = _CONV[dims](3, 4, k, padding=tuple(d // 2 for d in k))
        self.conv_b = _CONV[dims](4, 5, 2, stride=2)

    def forward(self, x: Any) -> Any:
        return self.conv_b(torch.relu(self.conv_a(x)))


class FlaxConvNd(nn.Module):
    dims: int

    @nn.compact
    def __call__(self, x: Any) -> Any:
        k = _KERNEL[self.dims]
        x = nn.relu(nn.Conv(4, k, padding=[(d // 2, d // 2) for d in k])(x))
        return nn.Conv(5, (2,) * self.dims, strides=2, padding="VALID")(x)


class TorchGrouped(tnn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = tnn.Conv2d(4, 6, 3, groups=2)

    def forward(self, x: Any) -> Any:
        return self.conv(x)


class FlaxGrouped(nn.Module):
    @nn.compact
    def __call__(self, x: Any) -> Any:
        return nn.Conv(6, (3, 3), feature_group_count=2, padding="VALID")(x)


class TorchDepthwise(tnn.Module):
    """MobileNet-style: depthwise conv with depth multiplier 2, then a pointwise conv."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = tnn.Conv2d(3, 6, 3, groups=3, padding=1)
        self.pw = tnn.Conv2d(6, 4, 1)

    def forward(self, x: Any) -> Any:
        return self.pw(torch.relu(self.dw(x)))


class FlaxDepthwise(nn.Module):
    @nn.compact
    def __call__(self, x: Any) -> Any:
        x = nn.relu(nn.Conv(6, (3, 3), feature_group_count=3, padding=1)(x))
        return nn.Conv(4, (1, 1))(x)


class TorchConvTranspose(tnn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.up = tnn.ConvTranspose2d(
            cin, cout, (3, 2), stride=2, padding=(1, 0), output_padding=(1, 0)
        )

    def forward(self, x: Any) -> Any:
        return self.up(x)


class FlaxConvTranspose(nn.Module):
    """torch padding p, output_padding q, kernel k <-> Flax padding (k - 1 - p, k - 1 - p + q)."""

    cout: int

    @nn.compact
    def __call__(self, x: Any) -> Any:
        return nn.ConvTranspose(
            self.cout, (3, 2), strides=(2, 2), padding=((1, 2), (1, 1)), transpose_kernel=True
        )(x)


class TorchEmbed(tnn.Module):
    """Token embedding (named without 'embed') followed by an output projection."""

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.tok = tnn.Embedding(vocab, dim)
        self.head = tnn.Linear(dim, vocab)

    def forward(self, ids: Any) -> Any:
        return self.head(torch.tanh(self.tok(ids.long())))


class FlaxEmbed(nn.Module):
    vocab: int
    dim: int

    @nn.compact
    def __call__(self, ids: Any) -> Any:
        h = jnp.tanh(nn.Embed(self.vocab, self.dim)(ids))
        return nn.Dense(self.vocab)(h)


def _tokens(vocab: int) -> Callable[[np.random.Generator], np.ndarray]:
    return lambda rng: rng.integers(0, vocab, (2, 7)).astype(np.int32)


class TorchLayerNorm(tnn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = tnn.Linear(6, 8)
        self.norm = tnn.LayerNorm(8)

    def forward(self, x: Any) -> Any:
        return self.norm(self.proj(x))


class FlaxLayerNorm(nn.Module):
    @nn.compact
    def __call__(self, x: Any) -> Any:
        return nn.LayerNorm(epsilon=1e-5)(nn.Dense(8)(x))


class TorchBatchNorm(tnn.Module):
    """ResNet-style: conv without bias + BatchNorm, twice, same channel count."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = tnn.Conv2d(3, 4, 3, bias=False)
        self.bn1 = tnn.BatchNorm2d(4)
        self.conv2 = tnn.Conv2d(4, 4, 3, bias=False)
        self.bn2 = tnn.BatchNorm2d(4)

    def forward(self, x: Any) -> Any:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(x))


class FlaxBatchNorm(nn.Module):
    @nn.compact
    def __call__(self, x: Any) -> Any:
        x = nn.Conv(4, (3, 3), padding="VALID", use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=1e-5)(x))
        x = nn.Conv(4, (3, 3), padding="VALID", use_bias=False)(x)
        return nn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=1e-5)(x)


class TorchGroupNorm(tnn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = tnn.Conv2d(3, 8, 3)
        self.gn = tnn.GroupNorm(2, 8)

    def forward(self, x: Any) -> Any:
        return self.gn(self.conv(x))


class FlaxGroupNorm(nn.Module):
    @nn.compact
    def __call__(self, x: Any) -> Any:
        return nn.GroupNorm(num_groups=2, epsilon=1e-5)(nn.Conv(8, (3, 3), padding="VALID")(x))


class TorchConvFlattenDense(tnn.Module):
    """Seed 003's TModel: conv, flatten in NCHW order, then dense layer(s)."""

    def __init__(self, fan_in: int, hidden: int | None) -> None:
        super().__init__()
        self.conv = tnn.Conv2d(3, 4, 2)
        self.fc = tnn.Linear(fan_in, hidden or 2)
        self.fc2 = tnn.Linear(hidden, 2) if hidden else None

    def forward(self, x: Any) -> Any:
        x = self.conv(x)
        x = self.fc(x.reshape(x.shape[0], -1))
        return self.fc2(torch.relu(x)) if self.fc2 is not None else x


class FlaxConvFlattenDense(nn.Module):
    """The natural Flax model: flattens NHWC directly (no transpose before the reshape)."""

    hidden: int | None

    @nn.compact
    def __call__(self, x: Any) -> Any:
        x = nn.Conv(4, (2, 2), padding="VALID")(x)
        x = nn.Dense(self.hidden or 2)(x.reshape(x.shape[0], -1))
        return nn.Dense(2)(nn.relu(x)) if self.hidden else x


def _attention(q: Any, k: Any, v: Any, heads: int, xp: Any) -> Any:
    """Scaled dot-product attention over [N, T, E] tensors; xp is torch or jax.numpy."""
    n, t, e = q.shape

    def split(z: Any) -> Any:
        return z.reshape(n, t, heads, e // heads).transpose(1, 2)

    if xp is torch:
        qh, kh, vh = split(q), split(k), split(v)
        att = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(e // heads), dim=-1)
        return (att @ vh).transpose(1, 2).reshape(n, t, e)
    qh, kh, vh = (z.reshape(n, t, heads, e // heads).transpose(0, 2, 1, 3) for z in (q, k, v))
    att = jax.nn.softmax(qh @ kh.transpose(0, 1, 3, 2) / math.sqrt(e // heads), axis=-1)
    return (att @ vh).transpose(0, 2, 1, 3).reshape(n, t, e)


E, HEADS = 16, 4


class TorchAttn(tnn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (tnn.Linear(E, E) for _ in range(4))

    def forward(self, x: Any) -> Any:
        return self.o(_attention(self.q(x), self.k(x), self.v(x), HEADS, torch))


class TorchBlock(tnn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1 = tnn.LayerNorm(E)
        self.attn = TorchAttn()
        self.ln2 = tnn.LayerNorm(E)
        self.mlp = tnn.Sequential(tnn.Linear(E, 4 * E), tnn.GELU(), tnn.Linear(4 * E, E))

    def forward(self, x: Any) -> Any:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TorchTransformer(tnn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = tnn.ModuleList([TorchBlock(), TorchBlock()])
        self.norm = tnn.LayerNorm(E)

    def forward(self, x: Any) -> Any:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class FlaxSelfAttention(nn.Module):
    @nn.compact
    def __call__(self, x: Any) -> Any:
        q, k, v = (nn.Dense(E, name=n)(x) for n in ("query", "key", "value"))
        return nn.Dense(E, name="out")(_attention(q, k, v, HEADS, jnp))


class FlaxMlpBlock(nn.Module):
    @nn.compact
    def __call__(self, x: Any) -> Any:
        h = nn.gelu(nn.Dense(4 * E)(x), approximate=False)  # Dense_0: [E, 4E]
        return nn.Dense(E)(h)  # Dense_1: [4E, E]


class FlaxBlock(nn.Module):
    @nn.compact
    def __call__(self, x: Any) -> Any:
        x = x + FlaxSelfAttention(name="attention")(nn.LayerNorm(epsilon=1e-5)(x))
        return x + FlaxMlpBlock()(nn.LayerNorm(epsilon=1e-5)(x))


class FlaxTransformer(nn.Module):
    @nn.compact
    def __call__(self, x: Any) -> Any:
        for _ in range(2):
            x = FlaxBlock()(x)
        return nn.LayerNorm(epsilon=1e-5, name="encoder_norm")(x)


class TorchSeparateProjections(tnn.Module):
    """HF-style separate q/k/v/out Linear layers (each [E, E])."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (tnn.Linear(E, E) for _ in range(4))

    def forward(self, x: Any) -> Any:
        y = _attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), HEADS, torch)
        return self.out_proj(y)


class FlaxMHDPA(nn.Module):
    """Flax's own attention: DenseGeneral kernels [E, heads, dim] and [heads, dim, E]."""

    @nn.compact
    def __call__(self, x: Any) -> Any:
        return nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=E, out_features=E)(
            x, x
        )


CASES = [
    Case("dense", TorchMLP, FlaxMLP, _floats(3, 6)),
    *(
        Case(
            f"conv{d}d",
            lambda d=d: TorchConvNd(d),
            lambda d=d: FlaxConvNd(d),
            _floats(2, *_SPATIAL[d], 3),
            True,
        )
        for d in (1, 2, 3)
    ),
    Case("grouped_conv", TorchGrouped, FlaxGrouped, _floats(2, 7, 6, 4), True),
    Case("depthwise_x2", TorchDepthwise, FlaxDepthwise, _floats(2, 7, 6, 3), True),
    *(
        Case(
            f"conv_transpose_{cin}to{cout}",
            lambda cin=cin, cout=cout: TorchConvTranspose(cin, cout),
            lambda cout=cout: FlaxConvTranspose(cout),
            _floats(2, 5, 6, cin),
            True,
        )
        for cin, cout in ((3, 4), (4, 4))
    ),
    Case("embed", lambda: TorchEmbed(12, 8), lambda: FlaxEmbed(12, 8), _tokens(12)),
    Case(
        "embed_square",
        lambda: TorchEmbed(8, 8),
        lambda: FlaxEmbed(8, 8),
        _tokens(8),
        hints=(("@transpose", "yes"),),  # every 2-D weight is square: nothing shows [out, in]
    ),
    Case("layernorm", TorchLayerNorm, FlaxLayerNorm, _floats(3, 6)),
    Case("batchnorm", TorchBatchNorm, FlaxBatchNorm, _floats(2, 8, 7, 3), True),
    Case("groupnorm", TorchGroupNorm, FlaxGroupNorm, _floats(2, 7, 6, 3), True),
    # conv -> flatten -> dense (seed 003): 6x6 input, a 2x2 valid conv -> 5x5x4 = 100 features.
    Case(
        "conv_flatten_dense",
        lambda: TorchConvFlattenDense(100, None),
        lambda: FlaxConvFlattenDense(None),
        _floats(2, 6, 6, 3),
        True,
        hints=(("@flatten", "nhwc"),),  # FlaxConvFlattenDense flattens NHWC directly
    ),
    Case(
        "conv_flatten_mlp_head",
        lambda: TorchConvFlattenDense(100, 16),
        lambda: FlaxConvFlattenDense(16),
        _floats(2, 6, 6, 3),
        True,
        hints=(("@flatten", "nhwc"),),  # FlaxConvFlattenDense flattens NHWC directly
    ),
    Case(
        "conv_flatten_dense_nonsquare",
        lambda: TorchConvFlattenDense(120, None),
        lambda: FlaxConvFlattenDense(None),
        _floats(2, 6, 7, 3),
        True,
        hints=(("@flatten", "nhwc"),),  # FlaxConvFlattenDense flattens NHWC directly
    ),
    Case("transformer", TorchTransformer, FlaxTransformer, _floats(2, 5, E)),
    Case(
        "mhdpa_dense_general",
        TorchSeparateProjections,
        FlaxMHDPA,
        _floats(2, 5, E),
        hints=(("@transpose", "yes"),),  # four square [E, E] projections: no orientation shown
    ),
]

IDS = [c.name for c in CASES]


# --- the tests -----------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_torch_to_flax(case: Case) -> None:
    rng = np.random.default_rng(1)
    x = case.make_input(rng)
    tmodel = randomize_torch(case.torch_model())
    assert_all_distinct([v.numpy() for v in tmodel.state_dict().values() if v.ndim])
    fmodel = case.flax_model()
    shapes = jax.eval_shape(fmodel.init, jax.random.key(0), x)
    variables = weightbridge.adapt(
        tmodel.state_dict(), shapes, in_format="pytorch", out_format="flax", hints=case.hints
    )
    np.testing.assert_allclose(
        np.asarray(fmodel.apply(variables, x)),
        case.torch_forward(tmodel, x),
        rtol=RTOL,
        atol=ATOL,
    )


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_flax_to_torch(case: Case) -> None:
    rng = np.random.default_rng(2)
    x = case.make_input(rng)
    fmodel = case.flax_model()
    # Random values straight into the tree eval_shape describes (an eager init is slow and
    # would be overwritten anyway).
    variables = randomize_flax(jax.eval_shape(fmodel.init, jax.random.key(0), x), seed=3)
    assert_all_distinct([np.asarray(v) for v in jax.tree_util.tree_leaves(variables)])
    tmodel = case.torch_model().eval()
    state = weightbridge.adapt(
        variables, tmodel.state_dict(), in_format="flax", out_format="pytorch", hints=case.hints
    )
    tmodel.load_state_dict(state)
    np.testing.assert_allclose(
        case.torch_forward(tmodel, x),
        np.asarray(fmodel.apply(variables, x)),
        rtol=RTOL,
        atol=ATOL,
    )


@pytest.mark.parametrize("name", ["batchnorm", "dense", "transformer"])
def test_frameworks_guessed_from_names(name: str) -> None:
    """No in_format/out_format: torch and Flax layouts are told apart by parameter names."""
    case = next(c for c in CASES if c.name == name)
    rng = np.random.default_rng(4)
    x = case.make_input(rng)
    tmodel = randomize_torch(case.torch_model(), seed=5)
    fmodel = case.flax_model()
    variables = weightbridge.adapt(
        tmodel.state_dict(), jax.eval_shape(fmodel.init, jax.random.key(0), x), hints=case.hints
    )
    want = case.torch_forward(tmodel, x)
    np.testing.assert_allclose(np.asarray(fmodel.apply(variables, x)), want, rtol=RTOL, atol=ATOL)
    fresh = case.torch_model().eval()
    fresh.load_state_dict(weightbridge.adapt(variables, fresh.state_dict(), hints=case.hints))
    np.testing.assert_allclose(case.torch_forward(fresh, x), want, rtol=RTOL, atol=ATOL)


def _unflatten(flat: dict[str, np.ndarray]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for name, value in flat.items():
        node = root
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(value)
    return root


@pytest.mark.parametrize("name", ["batchnorm", "conv_flatten_dense", "transformer"])
def test_streaming_torch_safetensors_to_flax(tmp_path: Any, name: str) -> None:
    """safetensors file -> api.convert(target=spec of jax.eval_shape) -> Flax variables."""
    from safetensors.numpy import load_file
    from safetensors.torch import save_file

    case = next(c for c in CASES if c.name == name)
    x = case.make_input(np.random.default_rng(6))
    tmodel = randomize_torch(case.torch_model(), seed=7)
    src = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in tmodel.state_dict().items()}, str(src))
    fmodel = case.flax_model()
    spec = api.spec_of(jax.eval_shape(fmodel.init, jax.random.key(0), x))
    assert all("/" in n for n in spec.names)
    report = api.convert(
        src,
        tmp_path / "out",
        target=spec,
        from_framework="pytorch",
        to_framework="flax",
        hints=case.hints,
    )
    assert report is not None
    flat: dict[str, np.ndarray] = {}
    for shard in sorted(glob.glob(str(tmp_path / "out" / "*.safetensors"))):
        flat.update(load_file(shard))
    assert sorted(flat) == sorted(spec.names)
    variables = _unflatten(flat)
    np.testing.assert_allclose(
        np.asarray(fmodel.apply(variables, x)),
        case.torch_forward(tmodel, x),
        rtol=RTOL,
        atol=ATOL,
    )
    assert api.verify(src, tmp_path / "out") == len(spec)


@pytest.mark.parametrize(
    "name", [c.name for c in CASES if c.hints], ids=[c.name for c in CASES if c.hints]
)
def test_check_decides_what_the_hints_said(name: str) -> None:
    """Every case that needs a hint (flatten order, square kernels) is decided instead by
    running both models: adapt(..., check=(their_apply, my_apply, x)) with no hint."""
    case = next(c for c in CASES if c.name == name)
    x = case.make_input(np.random.default_rng(8))
    tmodel = randomize_torch(case.torch_model(), seed=9)
    fmodel = case.flax_model()
    shapes = jax.eval_shape(fmodel.init, jax.random.key(0), x)
    with pytest.raises(weightbridge.MatchError):
        weightbridge.adapt(tmodel.state_dict(), shapes)

    def their_apply(state: Any, x: np.ndarray) -> np.ndarray:
        return case.torch_forward(tmodel, x)  # `state` is tmodel's own state dict

    def my_apply(variables: Any, x: np.ndarray) -> np.ndarray:
        return np.asarray(fmodel.apply(variables, x))

    variables = weightbridge.adapt(tmodel.state_dict(), shapes, check=(their_apply, my_apply, x))
    np.testing.assert_allclose(
        my_apply(variables, x), case.torch_forward(tmodel, x), rtol=RTOL, atol=ATOL
    )
