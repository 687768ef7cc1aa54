"""adapt() on inputs as people pass them: wrapped checkpoints, Flax NNX state, tied tensors."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import pytest

import weightbridge
from weightbridge.errors import MatchError, SpecError

V, D, H = 11, 6, 8  # vocabulary, width, hidden: all different, so shapes say which is which


def _mlp_pair(seed: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """A torch-named source and a flax-named target of the same two-layer MLP (numpy)."""
    rng = np.random.default_rng(seed)
    theirs = {
        "fc1.weight": rng.standard_normal((H, D)).astype(np.float32),
        "fc1.bias": rng.standard_normal(H).astype(np.float32),
        "fc2.weight": rng.standard_normal((3, H)).astype(np.float32),
        "fc2.bias": rng.standard_normal(3).astype(np.float32),
    }
    mine = {
        "Dense_0": {"kernel": np.zeros((D, H), np.float32), "bias": np.zeros(H, np.float32)},
        "Dense_1": {"kernel": np.zeros((H, 3), np.float32), "bias": np.zeros(3, np.float32)},
    }
    return theirs, mine


def _check_mlp(out: Any, theirs: dict[str, Any]) -> None:
    np.testing.assert_array_equal(out["Dense_0"]["kernel"], np.asarray(theirs["fc1.weight"]).T)
    np.testing.assert_array_equal(out["Dense_0"]["bias"], np.asarray(theirs["fc1.bias"]))
    np.testing.assert_array_equal(out["Dense_1"]["kernel"], np.asarray(theirs["fc2.weight"]).T)


# --- 1. Wrapped checkpoints ---------------------------------------------------------------


def _torch_mlp() -> Any:
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        OrderedDict(fc1=torch.nn.Linear(D, H), act=torch.nn.Tanh(), fc2=torch.nn.Linear(H, 3))
    )


def _trained_optimizer_state(model: Any) -> Any:
    import torch

    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(2, D)).sum().backward()
    opt.step()  # now it holds exp_avg tensors with the weights' shapes
    return opt.state_dict()


@pytest.mark.torch
@pytest.mark.parametrize(
    "key", ["model", "state_dict", "module", "model_state_dict", "ema", "model_ema"]
)
def test_a_wrapped_torch_checkpoint_is_unwrapped(key: str, capsys: Any) -> None:
    model = _torch_mlp()
    theirs = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    checkpoint = {
        "epoch": 3,
        key: model.state_dict(),
        "optimizer": _trained_optimizer_state(model),
        "arch": "mlp",
        "best_acc": np.float64(0.5),
        "note": None,
    }
    _, mine = _mlp_pair()
    out = weightbridge.adapt(checkpoint, mine, verbose=True)
    _check_mlp(out, theirs)
    err = capsys.readouterr().err
    assert f"theirs: using the weights under {key!r}" in err
    assert "optimizer" in err  # said to be left aside


@pytest.mark.torch
def test_the_one_weight_entry_beside_metadata_is_unwrapped_whatever_its_name() -> None:
    model = _torch_mlp()
    theirs = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    _, mine = _mlp_pair()
    out = weightbridge.adapt({"my_net_v2": model.state_dict(), "step": 100, "tag": "x"}, mine)
    _check_mlp(out, theirs)
    # A whole pickled module under the wrapper key works too.
    out = weightbridge.adapt({"model": model, "epoch": 1}, mine)
    _check_mlp(out, theirs)


@pytest.mark.torch
def test_torch_tensors_nested_under_params_are_flattened() -> None:
    # Before: AttributeError: 'collections.OrderedDict' object has no attribute 'dtype'.
    model = _torch_mlp()
    theirs = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    _, mine = _mlp_pair()
    out = weightbridge.adapt({"params": model.state_dict(), "step": 7}, mine)
    _check_mlp(out, theirs)


@pytest.mark.torch
def test_nested_torch_mappings_without_a_wrapper_keep_their_levels() -> None:
    import torch

    torch.manual_seed(1)
    enc, dec = torch.nn.Linear(D, H), torch.nn.Linear(H, D)
    theirs = {"encoder": enc.state_dict(), "decoder": dec.state_dict(), "epoch": 2}
    mine = {
        "encoder": OrderedDict(weight=torch.zeros(H, D), bias=torch.zeros(H)),
        "decoder": OrderedDict(weight=torch.zeros(D, H), bias=torch.zeros(D)),
        "epoch": 0,
    }
    out = weightbridge.adapt(theirs, mine)
    assert out["epoch"] == 0 and isinstance(out["encoder"], OrderedDict)
    assert torch.equal(out["encoder"]["weight"], enc.weight.detach())
    assert torch.equal(out["decoder"]["bias"], dec.bias.detach())


@pytest.mark.torch
def test_a_wrapped_target_comes_back_wrapped_with_its_metadata(capsys: Any) -> None:
    source = _torch_mlp()
    target = _torch_mlp()
    for p in target.parameters():
        p.data.zero_()
    mine = {"model": target.state_dict(), "epoch": 0, "optimizer": {"state": {}}}
    out = weightbridge.adapt(source.state_dict(), mine, verbose=True)
    assert "mine: using the weights under 'model'" in capsys.readouterr().err
    assert out["epoch"] == 0 and out["optimizer"] == {"state": {}}
    assert isinstance(out["model"], OrderedDict)
    assert hasattr(out["model"], "_metadata")  # load_state_dict's module versions survive
    target.load_state_dict(out["model"])
    for a, b in zip(target.parameters(), source.parameters(), strict=True):
        assert a.data.equal(b.data)


@pytest.mark.torch
def test_two_sets_of_weights_are_refused_by_name() -> None:
    model = _torch_mlp()
    _, mine = _mlp_pair()
    with pytest.raises(SpecError, match=r"several sets of weights \('model', 'ema'\)"):
        weightbridge.adapt({"model": model.state_dict(), "ema": model.state_dict()}, mine)


def test_optimizer_state_beside_flax_params_is_left_out(capsys: Any) -> None:
    theirs, mine = _mlp_pair()
    params = {
        "Dense_0": {"kernel": theirs["fc1.weight"].T, "bias": theirs["fc1.bias"]},
        "Dense_1": {"kernel": theirs["fc2.weight"].T, "bias": theirs["fc2.bias"]},
    }
    moments = {k: {n: np.ones_like(a) for n, a in v.items()} for k, v in params.items()}
    checkpoint = {"params": params, "opt_state": {"mu": moments, "nu": moments}, "step": 3}
    out = weightbridge.adapt(checkpoint, mine, verbose=True)
    _check_mlp(out, theirs)
    assert "theirs: left out training state: opt_state" in capsys.readouterr().err


def test_leaves_that_are_not_arrays_are_skipped_with_a_note(capsys: Any) -> None:
    theirs, mine = _mlp_pair()
    theirs_with_junk = {**theirs, "epoch": 3, "name": "mlp", "none": None, "tags": ["a", "b"]}
    mine_with_junk = {**mine, "version": "1.0"}
    out = weightbridge.adapt(theirs_with_junk, mine_with_junk, verbose=True)
    _check_mlp(out, theirs)
    assert out["version"] == "1.0"
    err = capsys.readouterr().err
    assert "theirs: skipped 4 leaves that are not weights: epoch (int), name (str)" in err
    assert "mine: skipped 1 leaves that are not weights: version (str)" in err


def test_a_leaf_whose_dtype_cannot_be_read_is_named_with_what_to_pass() -> None:
    theirs, mine = _mlp_pair()
    theirs = {"model": {"fc1": {"weight": np.array(["a", "b"])}}, "epoch": 1}
    with pytest.raises(SpecError) as info:
        weightbridge.adapt(theirs, mine)
    msg = str(info.value)
    assert "'fc1/weight'" in msg and "numpy.ndarray" in msg and "<U1" in msg
    assert "np.asarray(x, np.float32)" in msg


def test_something_that_is_no_structure_is_refused_clearly() -> None:
    _, mine = _mlp_pair()
    with pytest.raises(SpecError, match="cannot adapt from an object of type int"):
        weightbridge.adapt(3, mine)


# --- 2. Flax NNX ----------------------------------------------------------------------------


def _torch_block() -> Any:
    import torch

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = torch.nn.Linear(D, H)
            self.norm = torch.nn.LayerNorm(H)
            self.fc2 = torch.nn.Linear(H, 3)

        def forward(self, x: Any) -> Any:
            return self.fc2(torch.tanh(self.norm(self.fc1(x))))

    torch.manual_seed(2)
    return Block()


def _nnx_block(seed: int = 0) -> Any:
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.fc1 = nnx.Linear(D, H, rngs=rngs)
            self.norm = nnx.LayerNorm(H, epsilon=1e-5, rngs=rngs)
            self.fc2 = nnx.Linear(H, 3, rngs=rngs)
            self.drop = nnx.Dropout(0.0, rngs=rngs)  # keeps RNG state: not weights

        def __call__(self, x: Any) -> Any:
            return self.fc2(self.drop(nnx.tanh(self.norm(self.fc1(x)))))

    return Block(nnx.Rngs(seed))


def _x() -> np.ndarray:
    return np.random.default_rng(3).standard_normal((4, D)).astype(np.float32)


@pytest.mark.torch
@pytest.mark.jax
def test_nnx_state_target_from_a_torch_model_computes_the_same(capsys: Any) -> None:
    import jax.numpy as jnp
    import torch
    from flax import nnx

    src, model = _torch_block(), _nnx_block()
    state = nnx.state(model)
    out = weightbridge.adapt(src, state, verbose=True)
    err = capsys.readouterr().err
    assert "fc1/kernel" in err and "/value" not in err  # names carry no trailing .value
    assert "drop/rngs/key (nnx RngKey, random-number state)" in err
    assert type(out) is type(state)
    assert isinstance(out["fc1"]["kernel"], nnx.Param)
    nnx.update(model, out)
    want = src(torch.from_numpy(_x())).detach().numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(_x()))), want, rtol=1e-5, atol=1e-6)


@pytest.mark.torch
@pytest.mark.jax
def test_nnx_abstract_state_and_param_split_and_module_targets() -> None:
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    src = _torch_block()
    want = src(torch.from_numpy(_x())).detach().numpy()
    # Abstract (nnx.eval_shape): ShapeDtypeStruct leaves come back as arrays.
    abstract = nnx.state(nnx.eval_shape(lambda: _nnx_block(1)))
    out = weightbridge.adapt(src.state_dict(), abstract)
    assert isinstance(out["fc2"]["bias"].get_value(), jax.Array)
    # The Param half of nnx.split, wrapped in a training checkpoint as the source.
    model = _nnx_block(2)
    parts: Any = nnx.split(model, nnx.Param, ...)
    graphdef, params, rest = parts[0], parts[1], parts[2]
    out = weightbridge.adapt({"model": src.state_dict(), "epoch": 1}, params)
    merged = nnx.merge(graphdef, out, rest)
    np.testing.assert_allclose(np.asarray(merged(jnp.asarray(_x()))), want, rtol=1e-5, atol=1e-6)
    # An nnx module itself: its state comes back, as a torch module gives its state dict.
    model = _nnx_block(3)
    nnx.update(model, weightbridge.adapt(src, model))
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(_x()))), want, rtol=1e-5, atol=1e-6)


@pytest.mark.torch
@pytest.mark.jax
def test_nnx_state_source_into_a_torch_model() -> None:
    import jax.numpy as jnp
    import torch
    from flax import nnx

    model = _nnx_block(4)
    target = _torch_block()
    target.load_state_dict(weightbridge.adapt(nnx.state(model), target))
    got = target(torch.from_numpy(_x())).detach().numpy()
    np.testing.assert_allclose(got, np.asarray(model(jnp.asarray(_x()))), rtol=1e-5, atol=1e-6)


@pytest.mark.jax
def test_spec_of_an_nnx_state_has_plain_names() -> None:
    from flax import nnx

    from weightbridge.api import spec_of

    names = spec_of(nnx.state(_nnx_block())).names
    assert "fc1/kernel" in names and not any("value" in n or "rngs" in n for n in names)


# --- 3. Tied tensors -------------------------------------------------------------------------


def _tied_lm(tie: bool = True, seed: int = 0) -> Any:
    """Embedding, two dense layers and an lm_head that is the embedding (GPT-2/T5 style)."""
    import torch

    class LM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(V, D)
            self.fc1 = torch.nn.Linear(D, H)
            self.fc2 = torch.nn.Linear(H, D)
            self.lm_head = torch.nn.Linear(D, V, bias=False)
            if tie:
                self.lm_head.weight = self.embed.weight

        def forward(self, ids: Any) -> Any:
            return self.lm_head(self.fc2(torch.tanh(self.fc1(self.embed(ids)))))

    torch.manual_seed(seed)
    return LM()


def _t5_like() -> Any:
    """shared = encoder.embed_tokens = decoder.embed_tokens = lm_head, one Parameter."""
    import torch

    class T5ish(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = torch.nn.Embedding(V, D)
            self.encoder = torch.nn.ModuleDict(
                {"embed_tokens": self.shared, "wi": torch.nn.Linear(D, H)}
            )
            self.decoder = torch.nn.ModuleDict(
                {"embed_tokens": self.shared, "wo": torch.nn.Linear(H, D)}
            )
            self.lm_head = torch.nn.Linear(D, V, bias=False)
            self.lm_head.weight = self.shared.weight

        def forward(self, ids: Any) -> Any:
            h = self.encoder["wi"](self.encoder["embed_tokens"](ids))
            h = self.decoder["wo"](torch.tanh(h))
            return self.lm_head(h)

    return T5ish()


_IDS = [[1, 4, 9, 0], [10, 2, 2, 7]]


@pytest.mark.torch
def test_a_tied_lm_head_loads_into_a_target_with_one_embedding(capsys: Any) -> None:
    import torch

    src = _tied_lm()
    mine = {
        "embed": {"embedding": np.zeros((V, D), np.float32)},
        "Dense_0": {"kernel": np.zeros((D, H), np.float32), "bias": np.zeros(H, np.float32)},
        "Dense_1": {"kernel": np.zeros((H, D), np.float32), "bias": np.zeros(D, np.float32)},
    }
    out = weightbridge.adapt(src.state_dict(), mine, verbose=True)
    assert "theirs: embed.weight, lm_head.weight are one tensor in memory (tied)" in (
        capsys.readouterr().err
    )
    # The flax-like model: the head is the embedding, transposed (Embed.attend).
    emb = out["embed"]["embedding"]
    h = np.tanh(emb[np.array(_IDS)] @ out["Dense_0"]["kernel"] + out["Dense_0"]["bias"])
    logits = (h @ out["Dense_1"]["kernel"] + out["Dense_1"]["bias"]) @ emb.T
    want = src(torch.tensor(_IDS)).detach().numpy()
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.torch
@pytest.mark.parametrize("meta", [False, True])
def test_tied_into_tied_fills_every_alias_and_stays_tied(meta: bool, capsys: Any) -> None:
    import torch

    src = _tied_lm()
    if meta:
        with torch.device("meta"):
            target = _t5_like()  # no memory: the ties are found on the module
    else:
        target = _t5_like()
    out = weightbridge.adapt(src.state_dict(), target, verbose=True)
    err = capsys.readouterr().err
    assert (
        "mine: shared.weight, encoder.embed_tokens.weight, decoder.embed_tokens.weight, "
        "lm_head.weight are one tensor in memory (tied); planned once, as shared.weight"
    ) in err
    tied = ["shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"]
    for name in [*tied, "lm_head.weight"]:
        assert out[name] is out["shared.weight"]  # one tensor, still tied
        assert torch.equal(out[name], src.embed.weight.detach())
    fresh = _t5_like()
    fresh.load_state_dict(out)
    assert fresh.lm_head.weight is fresh.shared.weight
    want = src(torch.tensor(_IDS))
    torch.testing.assert_close(fresh(torch.tensor(_IDS)), want)


@pytest.mark.torch
def test_a_tied_source_still_fills_an_untied_target(tmp_path: Any, capsys: Any) -> None:
    import torch

    src = _tied_lm()
    target = _tied_lm(tie=False, seed=1)
    cache = tmp_path / "plan.json"
    out = weightbridge.adapt(src.state_dict(), target, cache=str(cache))
    assert torch.equal(out["lm_head.weight"], src.embed.weight.detach())
    assert torch.equal(out["embed.weight"], src.embed.weight.detach())
    # The plan (made with each tied name as its own source) is found in the cache again.
    again = weightbridge.adapt(src.state_dict(), target, cache=str(cache), verbose=True)
    assert "reused the plan" in capsys.readouterr().err
    assert torch.equal(again["lm_head.weight"], out["lm_head.weight"])


def test_numpy_arrays_sharing_memory_are_one_tensor_views_are_not() -> None:
    from weightbridge.adapt import _ties

    emb = np.arange(12.0).reshape(4, 3)
    flat = {
        "embed": emb,
        "head": emb,  # the same array
        "view": emb.view(),  # another object over the same elements: the same tensor
        "transposed": emb.T,  # same memory, other strides: another tensor
        "rows": emb[1:],  # same memory, other offset: another tensor
        "copy": emb.copy(),
    }
    assert _ties(flat, [], allow_identity=False) == {"embed": ["head", "view"]}
    theirs, mine = _mlp_pair()
    theirs["fc2.weight_alias"] = theirs["fc2.weight"]
    out = weightbridge.adapt(theirs, mine)
    _check_mlp(out, theirs)


@pytest.mark.torch
def test_storage_sharing_counts_only_exact_aliases() -> None:
    import torch

    from weightbridge.adapt import _ties

    w = torch.randn(4, 3)
    flat = {"a": w, "b": w.detach(), "c": w[1:], "d": w.t(), "e": w.view(4, 3), "f": w.clone()}
    assert _ties(flat, [], allow_identity=False) == {"a": ["b", "e"]}


@pytest.mark.torch
def test_tied_tensors_that_still_do_not_pair_are_refused_clearly() -> None:
    src = _tied_lm()
    mine = {
        "embed": {"embedding": np.zeros((V, D), np.float32)},
        "Dense_0": {"kernel": np.zeros((D, H), np.float32), "bias": np.zeros(H, np.float32)},
        "Dense_1": {"kernel": np.zeros((H, D), np.float32), "bias": np.zeros(D, np.float32)},
        "pos_embed": {"embedding": np.zeros((5, D), np.float32)},  # the source has none
    }
    with pytest.raises(MatchError) as info:
        weightbridge.adapt(src.state_dict(), mine)
    msg = str(info.value)
    assert "pos_embed/embedding" in msg
    assert "embed.weight, lm_head.weight are one tensor in memory (tied)" in msg
    assert "each tied source name as its own tensor failed too" in msg
