"""Certain or refuse: each silently wrong conversion seen in the field, now equal or refused.

Every test here reproduces one observation from the "certain or refuse" report with plain
numpy weights (the values prove the pairing and the ops: a copy, a transpose or a permutation
of known data), and where the matcher now refuses, applies the hint its message names.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import weightbridge
from weightbridge import api
from weightbridge.errors import MatchError
from weightbridge.spec import CheckpointSpec, TensorSpec

RNG = np.random.default_rng(0)


def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def zeros_like(d: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]]) -> dict:
    return {k: np.zeros(s, np.float32) for k, s in shapes.items()}


def suggested_hints(message: str) -> list[tuple[str, str]]:
    """Every ``hints=[...]`` the refusal prints (checked ones end with "(checked")."""
    out: list[tuple[str, str]] = []
    for found in re.findall(r"hints=(\[\(.*?\)\])", message):
        out += eval(found)  # the message prints a Python list of string pairs
    return out


def offered_choices(message: str) -> list[list[tuple[str, str]]]:
    """Each group's choices that a refusal lists where nothing points either way ("only you can
    tell which is right"), as (target, source) hints, one list per group."""
    return [
        re.findall(r"--hint (\S+)=(\S+)", line)
        for line in message.splitlines()
        if "only you can tell which is right" in line
    ]


# --- 1. weights stored [in, out] under PyTorch names -------------------------------------------


def test_in_out_weight_under_torch_names_into_a_dense_is_copied_not_scrambled() -> None:
    theirs = {"c_fc.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}
    got = weightbridge.adapt(theirs, {"linear": {"w": np.zeros((2, 3), np.float32)}})
    np.testing.assert_array_equal(got["linear"]["w"], theirs["c_fc.weight"])


def _gpt2_conv1d(e: int = 8) -> dict[str, np.ndarray]:
    return {
        "h.0.attn.c_attn.weight": rand(e, 3 * e),
        "h.0.attn.c_attn.bias": rand(3 * e),
        "h.0.attn.c_proj.weight": rand(e, e),
        "h.0.attn.c_proj.bias": rand(e),
        "h.0.mlp.c_fc.weight": rand(e, 4 * e),
        "h.0.mlp.c_fc.bias": rand(4 * e),
        "h.0.mlp.c_proj.weight": rand(4 * e, e),
        "h.0.mlp.c_proj.bias": rand(e),
    }


def test_gpt2_conv1d_into_linear_with_the_same_names_transposes_every_kernel() -> None:
    """Same names, nn.Linear layout: every 2-D weight is transposed, the square one too."""
    theirs = _gpt2_conv1d()
    mine = {k: np.zeros(v.shape[::-1], np.float32) for k, v in theirs.items()}
    got = weightbridge.adapt(theirs, mine)
    for k, v in theirs.items():
        np.testing.assert_array_equal(got[k], v.T if v.ndim == 2 else v, err_msg=k)


def test_gpt2_conv1d_into_renamed_linear_transposes_every_kernel() -> None:
    theirs = _gpt2_conv1d()
    names = {
        "h.0.attn.c_attn": "blocks.0.attn.qkv",
        "h.0.attn.c_proj": "blocks.0.attn.proj",
        "h.0.mlp.c_fc": "blocks.0.mlp.fc1",
        "h.0.mlp.c_proj": "blocks.0.mlp.fc2",
    }
    mine = {}
    for k, v in theirs.items():
        module, leaf = k.rsplit(".", 1)
        mine[f"{names[module]}.{leaf}"] = np.zeros(v.shape[::-1], np.float32)
    got = weightbridge.adapt(theirs, mine)
    for k, v in theirs.items():
        module, leaf = k.rsplit(".", 1)
        np.testing.assert_array_equal(got[f"{names[module]}.{leaf}"], v.T if v.ndim == 2 else v)


def test_gpt2_conv1d_into_flax_dense_keeps_every_kernel() -> None:
    theirs = _gpt2_conv1d()
    mine = {
        "params/h_0/attn/c_attn/kernel": np.zeros((8, 24), np.float32),
        "params/h_0/attn/c_attn/bias": np.zeros(24, np.float32),
        "params/h_0/attn/c_proj/kernel": np.zeros((8, 8), np.float32),
        "params/h_0/attn/c_proj/bias": np.zeros(8, np.float32),
        "params/h_0/mlp/c_fc/kernel": np.zeros((8, 32), np.float32),
        "params/h_0/mlp/c_fc/bias": np.zeros(32, np.float32),
        "params/h_0/mlp/c_proj/kernel": np.zeros((32, 8), np.float32),
        "params/h_0/mlp/c_proj/bias": np.zeros(8, np.float32),
    }
    got = weightbridge.adapt(theirs, mine)
    np.testing.assert_array_equal(
        got["params/h_0/attn/c_proj/kernel"], theirs["h.0.attn.c_proj.weight"]
    )
    np.testing.assert_array_equal(got["params/h_0/mlp/c_fc/kernel"], theirs["h.0.mlp.c_fc.weight"])


def test_orientation_with_no_evidence_is_refused_and_the_hint_works() -> None:
    """Only square kernels and no biases: nothing shows [out, in] from [in, out]."""
    theirs = {"a.weight": rand(4, 4), "b.weight": rand(4, 4)}
    mine = {"Dense_0": {"kernel": np.zeros((4, 4), np.float32)}}
    mine["Dense_1"] = {"kernel": np.zeros((4, 4), np.float32)}
    with pytest.raises(MatchError, match="@transpose") as e:
        weightbridge.adapt(theirs, mine)
    assert "[out, in]" in str(e.value)
    with pytest.raises(MatchError, match="@transpose', 'yes'"):
        weightbridge.adapt(theirs, mine, hints=[("Dense_0", "a.")])
    got = weightbridge.adapt(theirs, mine, hints=[("@transpose", "yes"), ("Dense_0", "a.")])
    np.testing.assert_array_equal(got["Dense_0"]["kernel"], theirs["a.weight"].T)


# --- 2. same-shaped tensors across stages (ConvNeXt-V2 GRN) ------------------------------------


def test_convnext_v2_grn_params_stay_in_their_stage() -> None:
    """Stage 0's GRN gamma/beta (1, 1, 1, 4*d0) have the size of stage 1's norms (d1 = 4*d0)."""
    d0, d1 = 8, 32
    theirs: dict[str, np.ndarray] = {}
    mine_shapes: dict[str, tuple[int, ...]] = {}
    link: dict[str, str] = {}
    for i, d in enumerate((d0, d1)):
        src = f"stages.{i}.0."
        dst = f"stages.{i}.blocks.0."
        for s_name, t_name, shape, t_shape in (
            ("dwconv.weight", "conv_dw.weight", (d, 1, 7, 7), None),
            ("dwconv.bias", "conv_dw.bias", (d,), None),
            ("norm.weight", "norm.weight", (d,), None),
            ("norm.bias", "norm.bias", (d,), None),
            ("pwconv1.weight", "mlp.fc1.weight", (4 * d, d), None),
            ("pwconv1.bias", "mlp.fc1.bias", (4 * d,), None),
            ("grn.gamma", "mlp.grn.weight", (1, 1, 1, 4 * d), (4 * d,)),
            ("grn.beta", "mlp.grn.bias", (1, 1, 1, 4 * d), (4 * d,)),
            ("pwconv2.weight", "mlp.fc2.weight", (d, 4 * d), None),
            ("pwconv2.bias", "mlp.fc2.bias", (d,), None),
        ):
            theirs[src + s_name] = rand(*shape)
            mine_shapes[dst + t_name] = t_shape or shape
            link[dst + t_name] = src + s_name
        if i == 0:
            theirs["downsample_layers.1.0.weight"] = rand(d0)
            theirs["downsample_layers.1.0.bias"] = rand(d0)
            theirs["downsample_layers.1.1.weight"] = rand(d1, d0, 2, 2)
            theirs["downsample_layers.1.1.bias"] = rand(d1)
            for a, b in (("0.weight", "norm.weight"), ("0.bias", "norm.bias")):
                mine_shapes[f"stages.1.downsample.{b}"] = (d0,)
                link[f"stages.1.downsample.{b}"] = f"downsample_layers.1.{a}"
            for a, b, s in (
                ("1.weight", "conv.weight", (d1, d0, 2, 2)),
                ("1.bias", "conv.bias", (d1,)),
            ):
                mine_shapes[f"stages.1.downsample.{b}"] = s
                link[f"stages.1.downsample.{b}"] = f"downsample_layers.1.{a}"
    try:
        got = weightbridge.adapt(theirs, zeros_like(theirs, mine_shapes))
    except MatchError:
        return  # refusing is allowed; pairing GRN with another stage's norm is not
    for t, s in link.items():
        np.testing.assert_array_equal(got[t], theirs[s].reshape(mine_shapes[t]), err_msg=t)


# --- 3. Keras depthwise kernels into torch -----------------------------------------------------


@pytest.mark.parametrize("multiplier", [1, 2])
def test_keras_depthwise_kernel_into_torch(multiplier: int) -> None:
    c, m = 6, multiplier
    theirs = {
        "block/depthwise/depthwise_kernel": rand(3, 3, c, m),
        "block/depthwise/bias": rand(c * m),
    }
    mine = {
        "block.conv_dw.weight": np.zeros((c * m, 1, 3, 3), np.float32),
        "block.conv_dw.bias": np.zeros(c * m, np.float32),
    }
    got = weightbridge.adapt(theirs, mine, in_format="keras", out_format="pytorch")
    k = theirs["block/depthwise/depthwise_kernel"]
    want = k.reshape(3, 3, c * m).transpose(2, 0, 1)[:, None]  # channel c*M + m
    np.testing.assert_array_equal(got["block.conv_dw.weight"], want)


# --- 4. a classifier after global pooling is not "dense after flatten" -------------------------


def _densenet_like(with_final_norm: bool) -> tuple[dict, dict]:
    """Keras-ordered source: the last conv has 32 channels, which divides the 1024 features
    that a concatenation (not the last conv) feeds the classifier through global pooling."""
    theirs = {
        "conv0/kernel": rand(3, 3, 3, 992),
        "conv1/kernel": rand(3, 3, 992, 32),
    }
    mine = {
        "features.conv0.weight": np.zeros((992, 3, 3, 3), np.float32),
        "features.conv1.weight": np.zeros((32, 992, 3, 3), np.float32),
    }
    if with_final_norm:
        for leaf, t_leaf in (
            ("gamma", "weight"),
            ("beta", "bias"),
            ("moving_mean", "running_mean"),
            ("moving_variance", "running_var"),
        ):
            theirs[f"bn5/{leaf}"] = rand(1024)
            mine[f"features.norm5.{t_leaf}"] = np.zeros(1024, np.float32)
    theirs["predictions/kernel"] = rand(1024, 10)
    theirs["predictions/bias"] = rand(10)
    mine["classifier.weight"] = np.zeros((10, 1024), np.float32)
    mine["classifier.bias"] = np.zeros(10, np.float32)
    return theirs, mine


def test_classifier_after_global_pooling_is_not_regrouped() -> None:
    theirs, mine = _densenet_like(with_final_norm=True)
    got = weightbridge.adapt(theirs, mine, in_format="keras", out_format="pytorch")
    np.testing.assert_array_equal(got["classifier.weight"], theirs["predictions/kernel"].T)


def test_flatten_order_is_never_guessed() -> None:
    """No pooled-channel evidence: 1024 = 32 x 32 may be a flattened 32-channel map, and
    whether the Keras model flattened NHWC cannot be read from weights."""
    theirs, mine = _densenet_like(with_final_norm=False)
    with pytest.raises(MatchError, match="@flatten=nhwc") as e:
        weightbridge.adapt(theirs, mine, in_format="keras", out_format="pytorch")
    assert "nchw" in str(e.value)
    kept = weightbridge.adapt(
        theirs, mine, in_format="keras", out_format="pytorch", hints=[("@flatten", "nchw")]
    )
    np.testing.assert_array_equal(kept["classifier.weight"], theirs["predictions/kernel"].T)
    regrouped = weightbridge.adapt(
        theirs, mine, in_format="keras", out_format="pytorch", hints=[("@flatten", "nhwc")]
    )
    # NHWC flatten index (h*W + w)*C + c  ->  NCHW index c*HW + (h*W + w)
    k = theirs["predictions/kernel"].reshape(32, 32, 10)  # [hw, c, out]
    want = k.transpose(2, 1, 0).reshape(10, 1024)
    np.testing.assert_array_equal(regrouped["classifier.weight"], want)


def _patch_embed_then_mlp() -> tuple[dict, dict]:
    """Sorted names (no order): a 32-channel conv, then dense layers 32 -> 64 -> 32, as in a
    ViT. 64 = 32 x 2 is a factor of the conv's channels, but fc2's 64 inputs are fc1's
    outputs, not a flattened map."""
    theirs = {
        "a_conv.weight": rand(32, 3, 8, 8),
        "a_conv.bias": rand(32),
        "b_fc1.weight": rand(64, 32),
        "b_fc1.bias": rand(64),
        "c_fc2.weight": rand(32, 64),
        "c_fc2.bias": rand(32),
    }
    mine = {
        "a_conv": {"kernel": np.zeros((8, 8, 3, 32), np.float32), "bias": np.zeros(32)},
        "b_fc1": {"kernel": np.zeros((32, 64), np.float32), "bias": np.zeros(64)},
        "c_fc2": {"kernel": np.zeros((64, 32), np.float32), "bias": np.zeros(32)},
    }
    return theirs, mine


def test_a_factor_of_the_conv_channels_is_not_a_flatten() -> None:
    theirs, mine = _patch_embed_then_mlp()
    got = weightbridge.adapt(theirs, mine, in_format="pytorch", out_format="flax")
    np.testing.assert_array_equal(got["c_fc2"]["kernel"], theirs["c_fc2.weight"].T)


def test_a_flatten_without_order_is_still_asked_for() -> None:
    """The same model with fc1 taking an 8 x 8 map of the 32 channels (2048 inputs, which no
    other layer produces): a flatten, whose order must be chosen."""
    theirs, mine = _patch_embed_then_mlp()
    theirs["b_fc1.weight"] = rand(64, 32 * 64)
    mine["b_fc1"]["kernel"] = np.zeros((32 * 64, 64), np.float32)
    with pytest.raises(MatchError, match="@flatten=nhwc"):
        weightbridge.adapt(theirs, mine, in_format="pytorch", out_format="flax")


# --- 5. name similarity must not beat structure: LLaMA norms into Flax names ------------------


def _llama(e: int = 8, f: int = 24, layers: int = 2) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {"model.embed_tokens.weight": rand(50, e)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, shape in (
            ("self_attn.q_proj.weight", (e, e)),
            ("self_attn.k_proj.weight", (e, e)),
            ("self_attn.v_proj.weight", (e, e)),
            ("self_attn.o_proj.weight", (e, e)),
            ("mlp.gate_proj.weight", (f, e)),
            ("mlp.up_proj.weight", (f, e)),
            ("mlp.down_proj.weight", (e, f)),
            ("input_layernorm.weight", (e,)),
            ("post_attention_layernorm.weight", (e,)),
        ):
            out[p + name] = rand(*shape)
    out["model.norm.weight"] = rand(e)
    return out


_FLAX_OF = {
    "self_attn.q_proj.weight": "attn/q/kernel",
    "self_attn.k_proj.weight": "attn/k/kernel",
    "self_attn.v_proj.weight": "attn/v/kernel",
    "self_attn.o_proj.weight": "attn/o/kernel",
    "mlp.gate_proj.weight": "mlp/gate/kernel",
    "mlp.up_proj.weight": "mlp/up/kernel",
    "mlp.down_proj.weight": "mlp/down/kernel",
    "input_layernorm.weight": "pre_attn_norm/scale",
    "post_attention_layernorm.weight": "pre_mlp_norm/scale",
}


def _flax_llama(theirs: dict[str, np.ndarray]) -> tuple[dict, dict[str, str]]:
    mine: dict[str, np.ndarray] = {}
    link: dict[str, str] = {}
    for k, v in theirs.items():
        if k == "model.embed_tokens.weight":
            t = "params/embed/embedding"
        elif k == "model.norm.weight":
            t = "params/final_norm/scale"
        else:
            i, rest = re.match(r"model\.layers\.(\d+)\.(.*)", k).groups()  # type: ignore[union-attr]
            t = f"params/layers_{i}/{_FLAX_OF[rest]}"
        mine[t] = np.zeros(v.shape[::-1] if v.ndim == 2 and "embed" not in k else v.shape)
        link[t] = k
    return dict(sorted(mine.items())), link


def test_llama_norms_into_flax_names_are_not_swapped() -> None:
    theirs = _llama()
    mine, link = _flax_llama(theirs)
    try:
        got = weightbridge.adapt(theirs, mine)
    except MatchError:
        pytest.fail("refused, but the position words pair these norms")
    for t, s in link.items():
        want = theirs[s].T if theirs[s].ndim == 2 and "embed" not in s else theirs[s]
        np.testing.assert_array_equal(got[t], want, err_msg=t)


@pytest.mark.parametrize("names", [("norm_a", "norm_b"), ("norm_b", "norm_a")])
def test_norms_named_by_nothing_are_refused_not_swapped(names: tuple[str, str]) -> None:
    """Opaque norm names and a sorted target: nothing tells the two norms apart (``b`` reads
    as a bias word and ``norm_b`` is shorter: ratios of word overlap would pick one)."""
    theirs = _llama(layers=1)
    mine, _ = _flax_llama(theirs)
    mine = {
        k.replace("pre_attn_norm", names[0]).replace("pre_mlp_norm", names[1]): v
        for k, v in mine.items()
    }
    with pytest.raises(MatchError) as e:
        weightbridge.adapt(theirs, dict(sorted(mine.items())))
    message = str(e.value)
    # No pairing is suggested (word overlap favours neither on its own); both choices are
    # listed, each checked, and either one gives a plan.
    assert "ambiguous" in message and not suggested_hints(message), message
    choices = [hint for group in offered_choices(message) for hint in group]
    assert len(choices) == 2, message
    for choice in choices:
        got = weightbridge.adapt(theirs, dict(sorted(mine.items())), hints=[choice])
        assert set(got) == set(mine)


# --- 6. refusals that help ---------------------------------------------------------------------


def _two_tied_blocks(names: tuple[str, str], target: tuple[str, str]) -> tuple[dict, dict]:
    theirs = {f"enc.{n}.weight": rand(4) for n in names} | {"enc.fc.weight": rand(3, 5)}
    mine = {"gpt2/block0/fc/kernel": np.zeros((5, 3), np.float32)}
    mine |= {f"gpt2/block0/{n}/scale": np.zeros(4, np.float32) for n in target}
    return theirs, mine  # sorted target names: its order says nothing


def test_a_hint_at_a_name_boundary_picks_that_name_not_a_longer_one() -> None:
    theirs, mine = _two_tied_blocks(("ln_x", "ln_y"), ("layer_norm", "layer_norm_1"))
    with pytest.raises(MatchError):
        weightbridge.adapt(theirs, mine)
    got = weightbridge.adapt(theirs, mine, hints=[("gpt2/block0/layer_norm", "ln_y")])
    np.testing.assert_array_equal(got["gpt2/block0/layer_norm/scale"], theirs["enc.ln_y.weight"])
    np.testing.assert_array_equal(got["gpt2/block0/layer_norm_1/scale"], theirs["enc.ln_x.weight"])


def test_a_hint_that_names_nothing_is_an_error_naming_it() -> None:
    theirs, mine = _two_tied_blocks(("ln_x", "ln_y"), ("layer_norm", "layer_norm_1"))
    with pytest.raises(MatchError, match="no source tensor name contains 'ln_z'"):
        weightbridge.adapt(theirs, mine, hints=[("layer_norm_1", "ln_z")])
    with pytest.raises(MatchError, match="unknown hint '@flaten'"):
        weightbridge.adapt(theirs, mine, hints=[("@flaten", "nhwc")])


def test_every_ambiguity_is_listed_in_one_round_with_hints_that_work() -> None:
    """Two nested levels of ties (blocks, and the convs inside each block): one refusal names
    both, and applying every suggested hint gives a plan."""
    theirs: dict[str, np.ndarray] = {}
    mine: dict[str, np.ndarray] = {}
    for b in ("first", "second"):
        for c in ("conv_a", "conv_b"):
            theirs[f"{b}.{c}.weight"] = rand(4, 4, 3, 3)
    for b in ("x", "y"):
        for c in ("p", "q"):
            mine[f"{b}/{c}/kernel"] = np.zeros((3, 3, 4, 4), np.float32)
    with pytest.raises(MatchError) as e:
        weightbridge.adapt(theirs, dict(sorted(mine.items())))
    message = str(e.value)
    assert message.count("ambiguous (") >= 2, message
    # Nothing (names, order, numbers) tells the blocks or the convs apart: no pairing is
    # suggested; every group's choices are listed, and picking one per group gives a plan.
    assert not suggested_hints(message), message
    choices = offered_choices(message)
    assert len(choices) >= 2 and all(len(c) == 2 for c in choices), message
    hints = list(dict.fromkeys(c[0] for c in choices))
    plan = api.plan(
        CheckpointSpec.of(TensorSpec(k, v.shape, "F32") for k, v in theirs.items()),
        CheckpointSpec.of(TensorSpec(k, v.shape, "F32") for k, v in sorted(mine.items())),
        hints=hints,
    )
    assert len(plan.steps) == 4


def test_summary_comes_first_in_a_refusal() -> None:
    theirs, mine = _two_tied_blocks(("ln_x", "ln_y"), ("layer_norm", "layer_norm_1"))
    with pytest.raises(MatchError) as e:
        weightbridge.adapt(theirs, mine)
    first = str(e.value).splitlines()[0]
    assert re.search(r"\d+ tensor\(s\) paired, 1 ambiguous group", first), first


# --- decided by execution (check=) ------------------------------------------------------------


def _their_model(w: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    h = np.tanh(x * w["blk.input_layernorm.weight"]) @ w["blk.attn.weight"].T
    return np.tanh(h * w["blk.post_attention_layernorm.weight"]) @ w["blk.mlp.weight"].T


def _my_model(w: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Flax-style names: kernels [in, out]; ``norm_b`` is applied first, ``norm_a`` second."""
    h = np.tanh(x * w["blk/norm_b/scale"]) @ w["blk/attn/kernel"]
    return np.tanh(h * w["blk/norm_a/scale"]) @ w["blk/mlp/kernel"]


def test_check_decides_by_execution_what_metadata_cannot() -> None:
    """Opaque norm names and only square kernels without biases: metadata leaves both the
    norms and the orientation open. Running both models decides, and says so."""
    theirs = {
        "blk.input_layernorm.weight": rand(4),
        "blk.attn.weight": rand(4, 4),
        "blk.post_attention_layernorm.weight": rand(4),
        "blk.mlp.weight": rand(4, 4),
    }
    mine = {
        k: np.zeros(s, np.float32)
        for k, s in sorted(
            {
                "blk/norm_a/scale": (4,),
                "blk/norm_b/scale": (4,),
                "blk/attn/kernel": (4, 4),
                "blk/mlp/kernel": (4, 4),
            }.items()
        )
    }
    with pytest.raises(MatchError):
        weightbridge.adapt(theirs, mine)
    x = rand(3, 4)
    got = weightbridge.adapt(theirs, mine, check=(_their_model, _my_model, x))
    np.testing.assert_allclose(_my_model(got, x), _their_model(theirs, x), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["blk/norm_b/scale"], theirs["blk.input_layernorm.weight"])
    np.testing.assert_array_equal(got["blk/attn/kernel"], theirs["blk.attn.weight"].T)


def test_plan_with_check_records_what_execution_decided() -> None:
    """api.plan(check=...) gives a plan (reviewable, saved) for what only execution settles."""
    theirs = {
        "blk.input_layernorm.weight": rand(4),
        "blk.attn.weight": rand(4, 4),
        "blk.post_attention_layernorm.weight": rand(4),
        "blk.mlp.weight": rand(4, 4),
    }
    shapes = {"blk/norm_a/scale": (4,), "blk/norm_b/scale": (4,)}
    shapes |= {"blk/attn/kernel": (4, 4), "blk/mlp/kernel": (4, 4)}
    mine = {k: np.zeros(s, np.float32) for k, s in sorted(shapes.items())}
    with pytest.raises(MatchError):
        api.plan(theirs, mine)
    log: list[str] = []
    plan = api.plan(theirs, mine, check=(_their_model, _my_model, rand(3, 4)), log=log)
    by_target = {s.target.name: s for s in plan.steps}
    assert by_target["blk/norm_b/scale"].sources == ("blk.input_layernorm.weight",)
    assert by_target["blk/norm_a/scale"].sources == ("blk.post_attention_layernorm.weight",)
    assert any(line.startswith("decided by execution") for line in log), log


def test_check_refuses_when_no_choice_reproduces_the_source() -> None:
    theirs = {"blk.a.weight": rand(4, 4), "blk.b.weight": rand(4, 4)}
    mine = {"blk/x/kernel": np.zeros((4, 4), np.float32), "blk/y/kernel": np.zeros((4, 4))}
    x = rand(2, 4)
    with pytest.raises(MatchError, match="none of the"):
        weightbridge.adapt(
            theirs,
            mine,
            check=(
                lambda w, x: x @ w["blk.a.weight"] @ w["blk.b.weight"],
                lambda w, x: np.sin(
                    x @ w["blk/x/kernel"] @ w["blk/y/kernel"]
                ),  # not the same model
                x,
            ),
        )


def test_tied_copies_in_a_file_are_named_with_the_hint_that_picks_one() -> None:
    """A file stores T5's tied ``shared``/``encoder.embed_tokens``/``decoder.embed_tokens`` as
    three equal tensors; the Flax target has one table. Values are not read while planning, so
    the refusal names the candidates and a checked hint; with it, the table is filled."""
    emb = rand(50, 8)
    theirs = {
        "shared.weight": emb.copy(),
        "encoder.embed_tokens.weight": emb.copy(),
        "decoder.embed_tokens.weight": emb.copy(),
        "encoder.block.0.w.weight": rand(16, 8),
    }
    mine = {
        "params/shared/embedding": np.zeros((50, 8), np.float32),
        "params/encoder/block_0/w/kernel": np.zeros((8, 16), np.float32),
    }
    with pytest.raises(MatchError, match="maybe tied copies") as e:
        weightbridge.adapt(theirs, mine)
    hints = suggested_hints(str(e.value))
    assert hints == [("embedding", "shared.weight")]
    got = weightbridge.adapt(theirs, mine, hints=hints)
    np.testing.assert_array_equal(got["params/shared/embedding"], emb)
