"""The automatic matcher on specs alone (no framework): ambiguity, hints, renames, nesting, scale.

Each case states the pairing a person would make by reading both sides' names and shapes, and
checks the plan makes exactly that pairing (or refuses with a message that says why).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable

import numpy as np
import pytest

import weightbridge
from weightbridge import api
from weightbridge.errors import MatchError
from weightbridge.plan import Plan
from weightbridge.spec import CheckpointSpec, TensorSpec

Shape = tuple[int, ...]


def spec(items: Iterable[tuple[str, Shape]]) -> CheckpointSpec:
    return CheckpointSpec.of(TensorSpec(name, shape, "F32") for name, shape in items)


def sources_of(plan: Plan) -> dict[str, str]:
    """{target name: its single source name} for every step of a plan."""
    out = {}
    for step in plan.steps:
        assert len(step.sources) == 1, step
        out[step.target.name] = step.sources[0]
    return out


def arrays(items: Iterable[tuple[str, Shape]], seed: int = 0) -> dict[str, np.ndarray]:
    """Random, pairwise-distinct float32 arrays (a swap can never go unnoticed)."""
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in items}


# --- the README's example: tied shapes that no name or order separates ------------------------

SEED_TARGET = sorted(  # jax/haiku pytrees arrive sorted by name
    [
        ("load_prefix/encode/stage3/block6/reduce/linear/w", (262144,)),
        ("load_prefix/encode/stage3/block6/reduce/batchnorm/scale", (256,)),
        ("load_prefix/encode/stage3/block6/expand/linear/w", (262144,)),
        ("load_prefix/encode/stage3/block6/expand/batchnorm/scale", (1024,)),
    ]
)
SEED_SOURCE = [
    ("backbone.0.body.layer3.5.conv1.weight", (262144,)),
    ("backbone.0.body.layer3.5.bn1.weight", (256,)),
    ("backbone.0.body.layer3.5.conv3.weight", (262144,)),
    ("backbone.0.body.layer3.5.bn3.weight", (1024,)),
]


def _assert_lists_the_conflict(message: str) -> None:
    for name, _ in SEED_TARGET:
        if name.endswith("/w"):
            assert re.search(rf"OUT\s+{re.escape(name)}\s+\(262144,\)", message), message
    for name, _ in SEED_SOURCE:
        if "conv" in name:
            assert re.search(rf"IN\s+{re.escape(name)}\s+\(262144,\)", message), message
    assert "hint" in message.lower(), message


def test_seed_ambiguity_is_refused_with_both_sides_and_a_hint() -> None:
    with pytest.raises(MatchError) as e:
        api.plan(spec(SEED_SOURCE), spec(SEED_TARGET))
    _assert_lists_the_conflict(str(e.value))


def test_seed_ambiguity_refused_by_adapt_too() -> None:
    theirs = arrays(SEED_SOURCE)
    mine = {name: np.zeros(shape, np.float32) for name, shape in SEED_TARGET}
    with pytest.raises(MatchError) as e:
        weightbridge.adapt(theirs, mine)
    _assert_lists_the_conflict(str(e.value))


def test_seed_ambiguity_resolved_by_hint() -> None:
    expected = {
        "load_prefix/encode/stage3/block6/reduce/linear/w": "backbone.0.body.layer3.5.conv1.weight",
        "load_prefix/encode/stage3/block6/expand/linear/w": "backbone.0.body.layer3.5.conv3.weight",
        "load_prefix/encode/stage3/block6/reduce/batchnorm/scale": "backbone.0.body.layer3.5.bn1.weight",
        "load_prefix/encode/stage3/block6/expand/batchnorm/scale": "backbone.0.body.layer3.5.bn3.weight",
    }
    plan = api.plan(spec(SEED_SOURCE), spec(SEED_TARGET), hints=[("reduce", "conv1")])
    assert sources_of(plan) == expected
    theirs = arrays(SEED_SOURCE)
    mine = {name: np.zeros(shape, np.float32) for name, shape in SEED_TARGET}
    got = weightbridge.adapt(theirs, mine, hints=[("reduce", "conv1")])
    for target, source in expected.items():
        np.testing.assert_array_equal(got[target], theirs[source])


def test_the_other_hint_gives_the_other_pairing() -> None:
    plan = api.plan(spec(SEED_SOURCE), spec(SEED_TARGET), hints=[("reduce", "conv3")])
    got = sources_of(plan)
    assert got["load_prefix/encode/stage3/block6/reduce/linear/w"].endswith("conv3.weight")
    assert got["load_prefix/encode/stage3/block6/expand/linear/w"].endswith("conv1.weight")


# --- renames the matcher must see through ----------------------------------------------------


def test_module_prefix_from_data_parallel() -> None:
    base = [
        ("features.0.weight", (16, 3, 3, 3)),
        ("features.0.bias", (16,)),
        ("features.2.weight", (32, 16, 3, 3)),
        ("features.2.bias", (32,)),
        ("classifier.weight", (10, 32)),
        ("classifier.bias", (10,)),
    ]
    plan = api.plan(spec((f"module.{n}", s) for n, s in base), spec(base))
    assert sources_of(plan) == {n: f"module.{n}" for n, _ in base}
    back = api.plan(spec(base), spec((f"module.{n}", s) for n, s in base))
    assert sources_of(back) == {f"module.{n}": n for n, _ in base}


def _torch_transformer(
    layers: int, e: int = 8, container: str = "blocks"
) -> list[tuple[str, Shape]]:
    out: list[tuple[str, Shape]] = []
    for i in range(layers):
        p = f"{container}.{i}."
        out += [(p + "norm1.weight", (e,)), (p + "norm1.bias", (e,))]
        for n in ("q", "k", "v", "o"):
            out += [(f"{p}attn.{n}.weight", (e, e)), (f"{p}attn.{n}.bias", (e,))]
        out += [(p + "norm2.weight", (e,)), (p + "norm2.bias", (e,))]
        out += [(p + "mlp.fc1.weight", (4 * e, e)), (p + "mlp.fc1.bias", (4 * e,))]
        out += [(p + "mlp.fc2.weight", (e, 4 * e)), (p + "mlp.fc2.bias", (e,))]
    return out + [("norm.weight", (e,)), ("norm.bias", (e,))]


def _flax_transformer(
    layers: int, e: int = 8, prefix: str = "", block: str = "Block_"
) -> tuple[list[tuple[str, Shape]], dict[str, str]]:
    """Flax names for `_torch_transformer` (container ``blocks``), sorted as jax gives them;
    and the true pairing."""
    items: list[tuple[str, Shape]] = []
    truth: dict[str, str] = {}

    def add(name: str, shape: Shape, source: str) -> None:
        items.append((name, shape))
        truth[name] = source

    for i in range(layers):
        p, s = f"{prefix}{block}{i}/", f"blocks.{i}."
        for j, n in ((0, "norm1"), (1, "norm2")):
            add(f"{p}LayerNorm_{j}/scale", (e,), f"{s}{n}.weight")
            add(f"{p}LayerNorm_{j}/bias", (e,), f"{s}{n}.bias")
        for n, m in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o")):
            add(f"{p}attention/{n}/kernel", (e, e), f"{s}attn.{m}.weight")
            add(f"{p}attention/{n}/bias", (e,), f"{s}attn.{m}.bias")
        add(f"{p}MlpBlock_0/Dense_0/kernel", (e, 4 * e), f"{s}mlp.fc1.weight")
        add(f"{p}MlpBlock_0/Dense_0/bias", (4 * e,), f"{s}mlp.fc1.bias")
        add(f"{p}MlpBlock_0/Dense_1/kernel", (4 * e, e), f"{s}mlp.fc2.weight")
        add(f"{p}MlpBlock_0/Dense_1/bias", (e,), f"{s}mlp.fc2.bias")
    add(f"{prefix}encoder_norm/scale", (e,), "norm.weight")
    add(f"{prefix}encoder_norm/bias", (e,), "norm.bias")
    return sorted(items), truth


def test_different_nesting_depth_module_list_vs_flat_blocks() -> None:
    """torch ``blocks.{i}`` (a ModuleList level) vs Flax ``Block_{i}`` at the root."""
    target, truth = _flax_transformer(3)
    plan = api.plan(
        spec(_torch_transformer(3)), spec(target), from_framework="pytorch", to_framework="flax"
    )
    assert sources_of(plan) == truth


def test_different_nesting_depth_extra_wrappers_on_the_target() -> None:
    """``params/model/encoder/Block_{i}`` vs ``blocks.{i}``: wrapper levels with one child each."""
    target, truth = _flax_transformer(2, prefix="params/model/encoder/")
    torch_side = [(f"model.{n}", s) for n, s in _torch_transformer(2)]
    truth = {t: f"model.{s}" for t, s in truth.items()}
    plan = api.plan(spec(torch_side), spec(target), from_framework="pytorch", to_framework="flax")
    assert sources_of(plan) == truth


def test_flat_keras_style_names_vs_nested_torch_names() -> None:
    """Keras applications name layers ``stage1_block2_conv``; torch nests ``stages.1.blocks.2.conv``."""
    source, target, truth = [], [], {}
    for st in range(2):
        for b in range(3):
            for layer, shape in (("conv", (3, 3, 8, 8)), ("bn", (8,))):
                leaf_t = "kernel" if layer == "conv" else "gamma"
                t_name = f"stage{st}_block{b}_{layer}/{leaf_t}"
                s_name = f"stages.{st}.blocks.{b}.{layer}.weight"
                s_shape = (8, 8, 3, 3) if layer == "conv" else shape
                source.append((s_name, s_shape))
                target.append((t_name, shape))
                truth[t_name] = s_name
    plan = api.plan(spec(source), spec(target), from_framework="pytorch", to_framework="keras")
    assert sources_of(plan) == truth


def test_reordered_definitions() -> None:
    """Modules defined in a different order on each side; names and shapes still decide."""
    source = [
        ("head.weight", (10, 64)),
        ("head.bias", (10,)),
        ("attn.value.weight", (64, 64)),
        ("attn.key.weight", (64, 64)),
        ("attn.query.weight", (64, 64)),
        ("stem.weight", (64, 3, 4, 4)),
        ("stem.bias", (64,)),
    ]
    target = [
        ("patchify/kernel", (4, 4, 3, 64)),
        ("patchify/bias", (64,)),
        ("attention/q/kernel", (64, 64)),
        ("attention/k/kernel", (64, 64)),
        ("attention/v/kernel", (64, 64)),
        ("classifier/kernel", (64, 10)),
        ("classifier/bias", (10,)),
    ]
    plan = api.plan(spec(source), spec(target), from_framework="pytorch", to_framework="flax")
    assert sources_of(plan) == {
        "patchify/kernel": "stem.weight",
        "patchify/bias": "stem.bias",
        "attention/q/kernel": "attn.query.weight",
        "attention/k/kernel": "attn.key.weight",
        "attention/v/kernel": "attn.value.weight",
        "classifier/kernel": "head.weight",
        "classifier/bias": "head.bias",
    }


# --- use_bias --------------------------------------------------------------------------------

_CONV_NET = [
    ("conv1.weight", (16, 3, 3, 3)),
    ("conv1.bias", (16,)),
    ("conv2.weight", (32, 16, 3, 3)),
    ("conv2.bias", (32,)),
    ("fc.weight", (10, 32)),
    ("fc.bias", (10,)),
]


def _flax_conv_net(use_bias: bool) -> list[tuple[str, Shape]]:
    out: list[tuple[str, Shape]] = [
        ("params/Conv_0/kernel", (3, 3, 3, 16)),
        ("params/Conv_1/kernel", (3, 3, 16, 32)),
        ("params/Dense_0/kernel", (32, 10)),
        ("params/Dense_0/bias", (10,)),
    ]
    if use_bias:
        out += [("params/Conv_0/bias", (16,)), ("params/Conv_1/bias", (32,))]
    return sorted(out)


def test_use_bias_mismatch_target_has_biases_the_source_lacks() -> None:
    source = [(n, s) for n, s in _CONV_NET if not n.startswith("conv") or n.endswith("weight")]
    with pytest.raises(MatchError, match="use_bias"):
        api.plan(
            spec(source), spec(_flax_conv_net(True)), from_framework="pytorch", to_framework="flax"
        )


def test_use_bias_mismatch_source_has_biases_the_target_lacks() -> None:
    """Dropping a conv's bias silently would change what the model computes."""
    with pytest.raises(MatchError, match="use_bias"):
        api.plan(
            spec(_CONV_NET),
            spec(_flax_conv_net(False)),
            from_framework="pytorch",
            to_framework="flax",
        )


def test_use_bias_matching_sides_plan_cleanly() -> None:
    plan = api.plan(
        spec(_CONV_NET), spec(_flax_conv_net(True)), from_framework="pytorch", to_framework="flax"
    )
    assert sources_of(plan)["params/Conv_1/bias"] == "conv2.bias"
    assert sources_of(plan)["params/Dense_0/kernel"] == "fc.weight"


# --- different shapes for the same values ----------------------------------------------------


@pytest.mark.parametrize(
    "source_shape,target_shape",
    [((8, 8), (64,)), ((64,), (1, 8, 8)), ((1, 8, 8), (8, 8)), ((64,), (8, 8))],
)
def test_same_parameter_in_another_shape(source_shape: Shape, target_shape: Shape) -> None:
    """The README: (8, 8) vs (64,) vs (1, 8, 8), in the same layout (a plain reshape)."""
    source = [
        ("encoder.rel_pos.table", source_shape),
        ("encoder.proj.weight", (8, 16)),
        ("encoder.proj.bias", (8,)),
    ]
    target = [
        ("encoder.relative_position.table", target_shape),
        ("encoder.projection.weight", (8, 16)),
        ("encoder.projection.bias", (8,)),
    ]
    theirs = arrays(source)
    got = weightbridge.adapt(theirs, {n: np.zeros(s, np.float32) for n, s in target})
    np.testing.assert_array_equal(
        got["encoder.relative_position.table"],
        theirs["encoder.rel_pos.table"].reshape(target_shape),
    )
    np.testing.assert_array_equal(got["encoder.projection.weight"], theirs["encoder.proj.weight"])


def test_convnext_grn_reshape_from_the_readme() -> None:
    """ConvNeXt-V2 GRN: the original's ``grn.gamma``/``grn.beta`` are (1, 1, 1, C); timm's
    ``mlp.grn.weight``/``bias`` are (C,) (the README's ``v.reshape(v.shape[-1])``)."""
    c = 16
    source = [
        ("stages.0.0.dwconv.weight", (c, 1, 7, 7)),
        ("stages.0.0.dwconv.bias", (c,)),
        ("stages.0.0.pwconv1.weight", (4 * c, c)),
        ("stages.0.0.pwconv1.bias", (4 * c,)),
        ("stages.0.0.grn.gamma", (1, 1, 1, 4 * c)),
        ("stages.0.0.grn.beta", (1, 1, 1, 4 * c)),
        ("stages.0.0.pwconv2.weight", (c, 4 * c)),
        ("stages.0.0.pwconv2.bias", (c,)),
    ]
    target = [
        ("stages.0.blocks.0.conv_dw.weight", (c, 1, 7, 7)),
        ("stages.0.blocks.0.conv_dw.bias", (c,)),
        ("stages.0.blocks.0.mlp.fc1.weight", (4 * c, c)),
        ("stages.0.blocks.0.mlp.fc1.bias", (4 * c,)),
        ("stages.0.blocks.0.mlp.grn.weight", (4 * c,)),
        ("stages.0.blocks.0.mlp.grn.bias", (4 * c,)),
        ("stages.0.blocks.0.mlp.fc2.weight", (c, 4 * c)),
        ("stages.0.blocks.0.mlp.fc2.bias", (c,)),
    ]
    theirs = arrays(source)
    got = weightbridge.adapt(theirs, {n: np.zeros(s, np.float32) for n, s in target})
    np.testing.assert_array_equal(
        got["stages.0.blocks.0.mlp.grn.weight"], theirs["stages.0.0.grn.gamma"].reshape(-1)
    )
    np.testing.assert_array_equal(
        got["stages.0.blocks.0.mlp.grn.bias"], theirs["stages.0.0.grn.beta"].reshape(-1)
    )
    np.testing.assert_array_equal(
        got["stages.0.blocks.0.mlp.fc1.weight"], theirs["stages.0.0.pwconv1.weight"]
    )


def test_vit_pos_embed_parameter_vs_position_embedding_table() -> None:
    """timm ViT ``pos_embed`` (1, N, D) is HF's ``position_embeddings.weight`` (N, D)."""
    source = [
        ("embeddings.patch_embeddings.projection.weight", (32, 3, 4, 4)),
        ("embeddings.patch_embeddings.projection.bias", (32,)),
        ("embeddings.position_embeddings.weight", (17, 32)),
        ("embeddings.cls_token", (1, 1, 32)),
    ]
    target = [
        ("cls_token", (1, 1, 32)),
        ("pos_embed", (1, 17, 32)),
        ("patch_embed.proj.weight", (32, 3, 4, 4)),
        ("patch_embed.proj.bias", (32,)),
    ]
    plan = api.plan(spec(source), spec(target))
    assert sources_of(plan)["pos_embed"] == "embeddings.position_embeddings.weight"
    assert sources_of(plan)["cls_token"] == "embeddings.cls_token"


# --- buffers ---------------------------------------------------------------------------------


def test_buffers_are_dropped_not_matched() -> None:
    source = [
        ("conv.weight", (8, 3, 3, 3)),
        ("bn.weight", (8,)),
        ("bn.bias", (8,)),
        ("bn.running_mean", (8,)),
        ("bn.running_var", (8,)),
        ("bn.num_batches_tracked", ()),
        ("attn.relative_position_index", (16, 16)),
        ("embeddings.position_ids", (1, 16)),
        ("embeddings.word_embeddings.weight", (100, 8)),
    ]
    target = sorted(
        [
            ("params/Conv_0/kernel", (3, 3, 3, 8)),
            ("params/BatchNorm_0/scale", (8,)),
            ("params/BatchNorm_0/bias", (8,)),
            ("batch_stats/BatchNorm_0/mean", (8,)),
            ("batch_stats/BatchNorm_0/var", (8,)),
            ("params/Embed_0/embedding", (100, 8)),
        ]
    )
    plan = api.plan(spec(source), spec(target), from_framework="pytorch", to_framework="flax")
    assert sources_of(plan) == {
        "params/Conv_0/kernel": "conv.weight",
        "params/BatchNorm_0/scale": "bn.weight",
        "params/BatchNorm_0/bias": "bn.bias",
        "batch_stats/BatchNorm_0/mean": "bn.running_mean",
        "batch_stats/BatchNorm_0/var": "bn.running_var",
        "params/Embed_0/embedding": "embeddings.word_embeddings.weight",
    }
    for buffer in (
        "bn.num_batches_tracked",
        "attn.relative_position_index",
        "embeddings.position_ids",
    ):
        assert buffer in plan.unused, plan.unused


def test_target_buffers_keep_their_own_value() -> None:
    """Flax -> torch: the target's num_batches_tracked has no source and is not an error."""
    source = sorted(
        [
            ("params/BatchNorm_0/scale", (8,)),
            ("params/BatchNorm_0/bias", (8,)),
            ("batch_stats/BatchNorm_0/mean", (8,)),
            ("batch_stats/BatchNorm_0/var", (8,)),
        ]
    )
    target = [
        ("bn.weight", (8,)),
        ("bn.bias", (8,)),
        ("bn.running_mean", (8,)),
        ("bn.running_var", (8,)),
        ("bn.num_batches_tracked", ()),
    ]
    theirs = arrays(source)
    mine = {n: np.zeros(s, np.float32) for n, s in target}
    mine["bn.num_batches_tracked"] = np.array(7, np.int64)
    got = weightbridge.adapt(theirs, mine, in_format="flax", out_format="pytorch")
    np.testing.assert_array_equal(got["bn.running_var"], theirs["batch_stats/BatchNorm_0/var"])
    np.testing.assert_array_equal(got["bn.weight"], theirs["params/BatchNorm_0/scale"])
    assert int(got["bn.num_batches_tracked"]) == 7


# --- orientation -----------------------------------------------------------------------------


def test_up_and_down_projections_told_apart_by_orientation() -> None:
    """LLaMA-style MLP without biases: up [F, E] and down [E, F] hold as many elements and
    their names share nothing with the other side's; only the orientation tells them apart."""
    source = [
        ("model.layers.0.mlp.up_proj.weight", (32, 8)),
        ("model.layers.0.mlp.down_proj.weight", (8, 32)),
    ]
    flax = sorted([("layers_0/mlp/wi/kernel", (8, 32)), ("layers_0/mlp/wo/kernel", (32, 8))])
    # Shapes alone fit either way (a GPT-2 Conv1D stores [in, out] under torch names), and the
    # sorted Flax names keep no order: refused, with the hint that decides.
    with pytest.raises(MatchError, match="@transpose"):
        api.plan(spec(source), spec(flax), from_framework="pytorch", to_framework="flax")
    plan = api.plan(
        spec(source),
        spec(flax),
        from_framework="pytorch",
        to_framework="flax",
        hints=[("@transpose", "yes")],
    )
    assert sources_of(plan) == {
        "layers_0/mlp/wi/kernel": "model.layers.0.mlp.up_proj.weight",
        "layers_0/mlp/wo/kernel": "model.layers.0.mlp.down_proj.weight",
    }
    # Both sides in definition order: only one orientation pairs the kernels in that order.
    torch_renamed = [("blocks.0.ffn.w_in.weight", (32, 8)), ("blocks.0.ffn.proj.weight", (8, 32))]
    plan = api.plan(spec(source), spec(torch_renamed))
    assert sources_of(plan) == {
        "blocks.0.ffn.w_in.weight": "model.layers.0.mlp.up_proj.weight",
        "blocks.0.ffn.proj.weight": "model.layers.0.mlp.down_proj.weight",
    }
    # Sorted names (w1 < w2) may or may not be definition order: nothing decides, so refused.
    sorted_names = [("blocks.0.ffn.w1.weight", (32, 8)), ("blocks.0.ffn.w2.weight", (8, 32))]
    with pytest.raises(MatchError, match="@transpose=no"):
        api.plan(spec(source), spec(sorted_names))


# --- scale -----------------------------------------------------------------------------------


def test_ten_thousand_tensors_renamed_and_transposed_in_reasonable_time() -> None:
    """625 transformer layers (16 tensors each): torch names in definition order against
    sorted Flax names with transposed kernels, one level of nesting less on the Flax side."""
    layers = 625
    source = _torch_transformer(layers, e=8, container="layers")[:-2]  # no final norm
    target, truth = _flax_transformer(layers, e=8, prefix="params/", block="layers_")
    del truth["params/encoder_norm/scale"], truth["params/encoder_norm/bias"]
    target = [(n, s) for n, s in target if n in truth]
    truth = {t: s.replace("blocks.", "layers.", 1) for t, s in truth.items()}
    assert len(source) == len(target) == 10_000
    start = time.perf_counter()
    plan = api.plan(spec(source), spec(target), from_framework="pytorch", to_framework="flax")
    elapsed = time.perf_counter() - start
    assert sources_of(plan) == truth
    assert elapsed < 20, f"planning 10k tensors took {elapsed:.1f} s"


def test_siblings_told_apart_by_a_role_word_inside_their_name_pair_by_it() -> None:
    """Megatron's ``layer_norm_weight`` and ``layer_norm_bias`` (same shape, no ``.weight``
    leaf to read a role from) were refused even against themselves; the role word inside a
    compound name is evidence. Shuffled order changes nothing; words that differ still refuse."""
    import random

    from weightbridge.spec import CheckpointSpec, TensorSpec

    names = [
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
        "decoder.layers.self_attention.linear_qkv.layer_norm_bias",
        "decoder.layers.mlp.linear_fc1.layer_norm_weight",
        "decoder.layers.mlp.linear_fc1.layer_norm_bias",
        "decoder.final_layernorm.weight",
        "decoder.final_layernorm.bias",
    ]
    specs = [TensorSpec(n, (2, 64), "F32") for n in names]
    shuffled = list(specs)
    random.Random(0).shuffle(shuffled)
    plan = api.plan(CheckpointSpec.of(shuffled), CheckpointSpec.of(specs))
    assert {s.target.name: s.sources for s in plan.steps} == {n: (n,) for n in names}
    short = {"layer_norm_weight": "ln_w", "layer_norm_bias": "ln_b"}
    opaque = []
    for spec in specs:
        name = spec.name
        for long, abbrev in short.items():
            name = name.replace(long, abbrev)
        opaque.append(TensorSpec(name, spec.shape, "F32"))
    with pytest.raises(MatchError):
        api.plan(CheckpointSpec.of(opaque), CheckpointSpec.of(specs))
