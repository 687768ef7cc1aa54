"""`--from F --to G` without a target: each parameter's role from its own module and siblings.

Certain or refuse: what the flags decide is checked against real frameworks (a torch model
converted into a Flax model, a Keras 3 ``.weights.h5`` converted into a torch model, both
computing the same outputs); what they cannot decide must be an error naming the tensor.
"""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import weightbridge.planning.layout_flags as layout_flags
from weightbridge.cli import main
from weightbridge.errors import PlanError
from weightbridge.io import open_reader, write_checkpoint
from weightbridge.ops import Permute, Reshape
from weightbridge.planning.layout_flags import convert_params, infer_framework
from weightbridge.planning.planner import Rename, make_plan
from weightbridge.spec import CheckpointSpec, TensorSpec


def specs(items: dict[str, tuple[int, ...]]) -> CheckpointSpec:
    return CheckpointSpec.of([TensorSpec(n, s, "F32") for n, s in items.items()])


def plan_of(items: dict[str, tuple[int, ...]], src: str | None, dst: str | None, **kw: Any):
    return make_plan(specs(items), from_framework=src, to_framework=dst, **kw)


def steps(plan) -> dict[str, tuple[str, tuple]]:
    """target name -> (source name, ops)"""
    return {s.target.name: (s.sources[0], s.ops) for s in plan.steps}


def test_docstring_examples() -> None:
    result = doctest.testmod(layout_flags, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


BERT_LIKE = {
    "embeddings.word_embeddings.weight": (30, 8),
    "embeddings.position_embeddings.weight": (16, 8),
    "embeddings.LayerNorm.weight": (8,),
    "embeddings.LayerNorm.bias": (8,),
    "encoder.dense.weight": (4, 8),
    "encoder.dense.bias": (4,),
    "features.0.weight": (16, 3, 3, 3),
    "features.1.weight": (16,),
    "features.1.bias": (16,),
    "features.1.running_mean": (16,),
    "features.1.running_var": (16,),
    "patch_embedding.weight": (8, 12),  # a Linear (it has a bias) despite its name
    "patch_embedding.bias": (8,),
    "lm_head.weight": (30, 8),  # a Linear without a bias
}


def test_torch_roles_come_from_the_module_and_its_siblings() -> None:
    got = steps(plan_of(BERT_LIKE, "pytorch", "flax"))
    # The norm under "embeddings" is a LayerNorm scale, not an embedding table.
    assert got["embeddings.LayerNorm.scale"] == ("embeddings.LayerNorm.weight", ())
    assert got["embeddings.LayerNorm.bias"] == ("embeddings.LayerNorm.bias", ())
    assert got["embeddings.word_embeddings.embedding"][1] == ()
    assert got["embeddings.position_embeddings.embedding"][1] == ()
    # A BatchNorm named "features.1" (neither "bn" nor "norm") is still a BatchNorm.
    assert got["features.1.scale"] == ("features.1.weight", ())
    assert got["features.1.mean"] == ("features.1.running_mean", ())
    assert got["features.1.var"] == ("features.1.running_var", ())
    assert got["features.0.kernel"][1] == (Permute((2, 3, 1, 0)),)
    assert got["encoder.dense.kernel"][1] == (Permute((1, 0)),)
    assert got["patch_embedding.kernel"][1] == (Permute((1, 0)),)
    assert got["lm_head.kernel"][1] == (Permute((1, 0)),)
    keras = steps(plan_of(BERT_LIKE, "pytorch", "keras"))
    assert {"embeddings.LayerNorm.gamma", "embeddings.LayerNorm.beta"} <= set(keras)
    assert {"features.1.gamma", "features.1.beta", "features.1.moving_mean"} <= set(keras)
    assert "encoder.dense.bias" in keras and "embeddings.word_embeddings.embeddings" in keras


def test_to_without_from_infers_the_source_and_says_so(tmp_path: Path, capsys) -> None:
    plan = plan_of(BERT_LIKE, None, "flax")
    assert steps(plan) == steps(plan_of(BERT_LIKE, "pytorch", "flax"))
    assert any("--from pytorch inferred" in n.text for n in plan.notes)
    rng = np.random.default_rng(0)
    src = tmp_path / "m.safetensors"
    write_checkpoint(str(src), {"fc.weight": rng.standard_normal((3, 2)).astype(np.float32)})
    assert main(["convert", str(src), "-o", str(tmp_path / "out"), "--to", "flax", "-q"]) == 0
    out = capsys.readouterr().out
    assert "--from pytorch inferred from the parameter names" in out
    with open_reader(tmp_path / "out") as r:
        assert r.specs().names == ["fc.kernel"]


def test_to_without_from_refuses_when_the_names_do_not_tell(tmp_path: Path, capsys) -> None:
    with pytest.raises(PlanError, match="--to pytorch needs --from"):
        plan_of({"a": (3, 4), "c": (4,)}, None, "pytorch")
    # kernel/bias fit both flax and keras, which convert alike: no need to ask.
    plan = plan_of({"Dense_0/kernel": (3, 4), "Dense_0/bias": (4,)}, None, "pytorch")
    assert steps(plan)["Dense_0/weight"] == ("Dense_0/kernel", (Permute((1, 0)),))
    assert any("flax and keras" in n.text for n in plan.notes)
    # Half torch, half Keras names: no clear winner.
    mixed = {"a.weight": (2, 2), "b.gamma": (2,), "c.beta": (2,)}
    assert infer_framework(list(mixed)).framework is None
    with pytest.raises(PlanError, match="needs --from"):
        plan_of(mixed, None, "flax")
    src = tmp_path / "m.safetensors"
    write_checkpoint(str(src), {"x": np.zeros((2, 3), np.float32)})
    code = main(["convert", str(src), "-o", str(tmp_path / "out"), "--to", "flax"])
    assert code == 2 and "needs --from" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_from_without_to_and_numpy_are_refused() -> None:
    with pytest.raises(PlanError, match="without --to changes nothing"):
        plan_of(BERT_LIKE, "pytorch", None)
    with pytest.raises(PlanError, match="numpy has no layout convention"):
        plan_of(BERT_LIKE, "pytorch", "numpy")
    # Neither flag: a plain copy, as before.
    assert all(ops == () for _, ops in steps(plan_of(BERT_LIKE, None, None)).values())


def test_undecidable_tensors_are_refused_by_name() -> None:
    items = {
        **BERT_LIKE,
        "cls_token": (1, 1, 8),
        "attn.in_proj_weight": (24, 8),
        "embeddings.0.weight": (10, 4),  # an Embedding in a ModuleList, or a Linear?
    }
    with pytest.raises(PlanError) as info:
        plan_of(items, "pytorch", "flax")
    msg = str(info.value)
    assert "cannot decide 3 tensor(s)" in msg
    for name in ("cls_token (1, 1, 8)", "attn.in_proj_weight (24, 8)", "embeddings.0.weight"):
        assert name in msg
    assert "--like" in msg and "--rules" in msg
    # Dropping them by rule is the documented way out.
    drop = Rename(r"^(cls_token|attn\..*|embeddings\.0\..*)$", "")
    plan = plan_of(items, "pytorch", "flax", renames=[drop])
    assert len(plan.unused) == 3
    # 1-D and scalar leaves of no known role have no axis order to get wrong: copied.
    kept = steps(plan_of({"ls.gamma": (8,), "step": ()}, "pytorch", "flax"))
    assert kept == {"ls.gamma": ("ls.gamma", ()), "step": ("step", ())}
    # Buffers are copied as they are.
    assert steps(plan_of({"emb.position_ids": (1, 16)}, "pytorch", "flax")) == {
        "emb.position_ids": ("emb.position_ids", ())
    }


def test_wrong_from_says_what_the_names_look_like() -> None:
    with pytest.raises(PlanError, match="look like flax's"):
        plan_of({"Dense_0/kernel": (3, 4), "Embed_0/embedding": (9, 3)}, "pytorch", "keras")


def test_keras3_vars_get_their_roles_from_the_layer_class() -> None:
    items = {
        "layers/dense/vars/0": (3, 6),
        "layers/dense/vars/1": (6,),
        "layers/conv2d_1/vars/0": (3, 3, 2, 4),
        "layers/conv2d_1/vars/1": (4,),
        "layers/depthwise_conv2d/vars/0": (3, 3, 4, 2),
        "layers/depthwise_conv2d/vars/1": (8,),
        "layers/batch_normalization/vars/0": (8,),
        "layers/batch_normalization/vars/1": (8,),
        "layers/batch_normalization/vars/2": (8,),
        "layers/batch_normalization/vars/3": (8,),
        "layers/embedding/vars/0": (20, 6),
        "layers/dense_1/vars/0": (6, 5),
    }
    got = steps(plan_of(items, "keras", "pytorch"))
    assert got["layers/dense/weight"][1] == (Permute((1, 0)),)
    assert got["layers/dense/bias"] == ("layers/dense/vars/1", ())
    assert got["layers/dense_1/weight"][1] == (Permute((1, 0)),)
    assert got["layers/conv2d_1/weight"][1] == (Permute((3, 2, 0, 1)),)
    assert got["layers/depthwise_conv2d/weight"][1] == (
        Reshape((3, 3, 1, 8)),
        Permute((3, 2, 0, 1)),
    )
    names = [
        f"layers/batch_normalization/{x}" for x in ("weight", "bias", "running_mean", "running_var")
    ]
    assert [got[n][0][-1] for n in names] == ["0", "1", "2", "3"]
    assert got["layers/embedding/weight"] == ("layers/embedding/vars/0", ())
    flax = steps(plan_of(items, "keras", "flax"))
    assert flax["layers/depthwise_conv2d/kernel"][1] == (Reshape((3, 3, 1, 8)),)
    assert flax["layers/dense/kernel"][1] == ()
    assert "layers/batch_normalization/mean" in flax
    # Inferred: vars/N names are Keras 3's.
    assert steps(plan_of(items, None, "pytorch")) == got


@pytest.mark.parametrize(
    ("items", "message"),
    [
        # BatchNormalization(center=False) or (scale=False): which one is missing?
        ({f"layers/batch_normalization/vars/{i}": (8,) for i in range(3)}, "gamma or beta"),
        ({"layers/layer_normalization/vars/0": (8,)}, "gamma or beta"),
        ({"layers/einsum_dense/vars/0": (8, 2, 4)}, "not one whose variables the flags know"),
        ({"layers/mha/query_dense/vars/0": (8, 2, 4)}, "query_dense"),
        ({"layers/dense/vars/0": (8, 2, 4)}, "expected a 2-D kernel"),
        ({"layers/dense/vars/0": (8, 4), "layers/dense/vars/1": (8,)}, "does not fit the kernel"),
    ],
)
def test_keras3_layers_the_flags_cannot_read_are_refused(items, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        plan_of(items, "keras", "pytorch")


def test_keras2_and_flax_names() -> None:
    keras2 = {
        "model_weights/dense/dense/kernel:0": (4, 2),
        "model_weights/dense/dense/bias:0": (2,),
        "model_weights/bn/bn/gamma:0": (4,),
        "model_weights/bn/bn/moving_variance:0": (4,),
        "model_weights/sep/sep/depthwise_kernel:0": (3, 3, 4, 1),
        "model_weights/sep/sep/pointwise_kernel:0": (1, 1, 4, 6),
        "model_weights/sep/sep/bias:0": (6,),
    }
    got = steps(plan_of(keras2, None, "pytorch"))
    assert got["model_weights/dense/dense/weight"][1] == (Permute((1, 0)),)
    assert "model_weights/bn/bn/weight" in got and "model_weights/bn/bn/running_var" in got
    assert got["model_weights/sep/sep/depthwise/weight"][1][0] == Reshape((3, 3, 1, 4))
    assert got["model_weights/sep/sep/pointwise/weight"][1] == (Permute((3, 2, 0, 1)),)
    assert "model_weights/sep/sep/pointwise/bias" in got
    flax = {
        "params/Conv_0/kernel": (3, 4, 8),  # a Conv1D: the module says so
        "params/BatchNorm_0/scale": (8,),
        "params/BatchNorm_0/bias": (8,),
        "batch_stats/BatchNorm_0/mean": (8,),
        "params/Embed_0/embedding": (10, 8),
    }
    got = steps(plan_of(flax, "flax", "keras"))
    assert got["params/BatchNorm_0/beta"] == ("params/BatchNorm_0/bias", ())
    assert "batch_stats/BatchNorm_0/moving_mean" in got
    torch = steps(plan_of(flax, "flax", "pytorch"))
    assert torch["params/Conv_0/weight"][1] == (Permute((2, 1, 0)),)
    assert torch["params/Embed_0/weight"][1] == ()
    # A rank-3 kernel that may be a DenseGeneral's [in, heads, dim], and a transposed conv.
    with pytest.raises(PlanError, match="DenseGeneral"):
        plan_of({"params/attn/query/kernel": (8, 2, 4)}, "flax", "pytorch")
    with pytest.raises(PlanError, match="transpose_kernel"):
        plan_of({"up.weight": (4, 8, 2, 2), "up_deconv.weight": (4, 8, 2, 2)}, "pytorch", "flax")


TORCH_TO_FLAX = {"from_framework": "pytorch", "to_framework": "flax"}


def test_with_a_target_undecided_tensors_go_to_the_matcher_not_an_error() -> None:
    src = specs({"cls_token": (1, 1, 8), "fc.weight": (4, 8), "fc.bias": (4,)})
    tgt = specs({"cls_token": (1, 1, 8), "fc.kernel": (8, 4), "fc.bias": (4,)})
    plan = make_plan(src, tgt, **TORCH_TO_FLAX)
    assert steps(plan)["cls_token"] == ("cls_token", ())
    assert steps(plan)["fc.kernel"] == ("fc.weight", (Permute((1, 0)),))
    # A target that holds the kernel in the source's own orientation contradicts the flags:
    # not paired by name (the matcher, absent here, would have to decide).
    odd = specs({"fc.kernel": (4, 8), "fc.bias": (4,)})
    with pytest.raises(PlanError, match="OUT fc.kernel"):
        make_plan(specs({"fc.weight": (4, 8), "fc.bias": (4,)}), odd, **TORCH_TO_FLAX)


def test_a_reshape_that_would_regroup_elements_is_refused() -> None:
    src = specs({"x": (4, 8)})
    with pytest.raises(PlanError, match="grouped along other axes"):
        make_plan(src, specs({"x": (8, 4)}))
    assert make_plan(src, specs({"x": (4, 2, 4)})).steps[0].ops == (Reshape((4, 2, 4)),)
    assert make_plan(src, specs({"x": (32,)})).steps[0].ops == (Reshape((32,)),)


def test_convert_params_without_a_target_lists_every_problem() -> None:
    params = [(f"p{i}", (2, 2)) for i in range(25)]
    with pytest.raises(PlanError, match="and 5 more"):
        convert_params(params, "pytorch", "flax")
    lenient = convert_params(params, "pytorch", "flax", {}, strict=False)
    assert all(c.problem and c.name == c.source and c.ops == () for c in lenient.changes)


# --- functional: real frameworks compute the same outputs from the converted weights ------------

VOCAB, DIM = 20, 6


@pytest.mark.torch
@pytest.mark.jax
def test_torch_model_into_flax_model_gives_equal_outputs(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    jax = pytest.importorskip("jax")
    import flax.linen as nn
    from torch_random import randomize_torch

    tnn = torch.nn

    class Embeddings(tnn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.word_embeddings = tnn.Embedding(VOCAB, DIM)
            self.LayerNorm = tnn.LayerNorm(DIM)

    class TorchNet(tnn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embeddings = Embeddings()
            self.features = tnn.Sequential(tnn.Conv2d(3, 8, 3), tnn.BatchNorm2d(8), tnn.ReLU())
            self.head = tnn.Linear(8 + DIM, 5)

        def forward(self, img: Any, ids: Any) -> Any:
            h = self.features(img).mean((2, 3))
            e = self.embeddings.LayerNorm(self.embeddings.word_embeddings(ids)).mean(1)
            return self.head(torch.cat([h, e], -1))

    class FlaxEmbeddings(nn.Module):
        @nn.compact
        def __call__(self, ids: Any) -> Any:
            e = nn.Embed(VOCAB, DIM, name="word_embeddings")(ids)
            return nn.LayerNorm(epsilon=1e-5, name="LayerNorm")(e)

    class Features(nn.Module):
        @nn.compact
        def __call__(self, img: Any) -> Any:
            h = nn.Conv(8, (3, 3), padding="VALID", name="0")(img)
            h = nn.BatchNorm(use_running_average=True, epsilon=1e-5, name="1")(h)
            return nn.relu(h)

    class FlaxNet(nn.Module):
        @nn.compact
        def __call__(self, img: Any, ids: Any) -> Any:
            h = Features(name="features")(img).mean((1, 2))
            e = FlaxEmbeddings(name="embeddings")(ids).mean(1)
            return nn.Dense(5, name="head")(jax.numpy.concatenate([h, e], -1))

    model = randomize_torch(TorchNet(), seed=3)
    src = tmp_path / "torch.safetensors"
    write_checkpoint(str(src), {k: v.numpy() for k, v in model.state_dict().items()})
    out = tmp_path / "flax"
    assert main(["convert", str(src), "-o", str(out), "--to", "flax", "-q"]) == 0
    variables: dict[str, Any] = {"params": {}, "batch_stats": {}}
    with open_reader(out) as r:
        names = r.specs().names
        for name in names:
            *path, leaf = name.split(".")
            if leaf == "num_batches_tracked":
                continue
            tree = variables["batch_stats" if leaf in ("mean", "var") else "params"]
            for p in path:
                tree = tree.setdefault(p, {})
            tree[leaf] = np.array(r.read(name))
    assert "embeddings.LayerNorm.scale" in names and "features.1.scale" in names
    rng = np.random.default_rng(4)
    img = rng.standard_normal((2, 3, 9, 8)).astype(np.float32)
    ids = rng.integers(0, VOCAB, (2, 7))
    with torch.no_grad():
        want = model(torch.from_numpy(img), torch.from_numpy(ids)).numpy()
    got = FlaxNet().apply(variables, img.transpose(0, 2, 3, 1), ids)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


KERAS_CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    import keras

    L = keras.layers
    img = keras.Input((9, 8, 3))
    ids = keras.Input((7,), dtype="int32")
    h = L.Conv2D(4, 3, activation="relu")(img)
    h = L.DepthwiseConv2D(3, depth_multiplier=2)(h)
    h = L.BatchNormalization(epsilon=1e-3)(h)
    h = L.SeparableConv2D(6, 3)(h)
    h = L.Conv2DTranspose(5, 2, strides=2)(h)
    h = L.GlobalAveragePooling2D()(h)
    h = L.Dense(6)(h)
    e = L.GlobalAveragePooling1D()(L.Embedding(20, 6)(ids))
    h = L.LayerNormalization(epsilon=1e-3)(L.Add()([h, e]))
    model = keras.Model([img, ids], L.Dense(4)(h))
    rng = np.random.default_rng(0)
    for w in model.weights:
        v = rng.standard_normal(tuple(w.shape)).astype("float32") * 0.5
        w.assign(np.abs(v) + 0.5 if "variance" in w.path else v)
    model.save_weights(sys.argv[1] + "/model.weights.h5")
    x = rng.standard_normal((2, 9, 8, 3)).astype("float32")
    t = rng.integers(0, 20, (2, 7)).astype("int32")
    y = np.asarray(model([x, t], training=False))
    np.savez(sys.argv[1] + "/io.npz", x=x, t=t, y=y)
    """
)


@pytest.mark.keras
@pytest.mark.torch
@pytest.mark.parametrize("from_flag", [["--from", "keras"], []], ids=["from-keras", "inferred"])
def test_keras3_weights_h5_into_torch_model_gives_equal_outputs(
    tmp_path: Path, from_flag: list[str]
) -> None:
    torch = pytest.importorskip("torch")
    tnn = torch.nn
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    proc = subprocess.run(
        [sys.executable, "-c", KERAS_CHILD, str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    class Separable(tnn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.depthwise = tnn.Conv2d(8, 8, 3, groups=8, bias=False)
            self.pointwise = tnn.Conv2d(8, 6, 1)

    class TorchNet(tnn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv2d = tnn.Conv2d(3, 4, 3)
            self.depthwise_conv2d = tnn.Conv2d(4, 8, 3, groups=4)
            self.batch_normalization = tnn.BatchNorm2d(8, eps=1e-3)
            self.separable_conv2d = Separable()
            self.conv2d_transpose = tnn.ConvTranspose2d(6, 5, 2, stride=2)
            self.dense = tnn.Linear(5, 6)
            self.embedding = tnn.Embedding(20, 6)
            self.layer_normalization = tnn.LayerNorm(6, eps=1e-3)
            self.dense_1 = tnn.Linear(6, 4)

        def forward(self, img: Any, ids: Any) -> Any:
            h = self.depthwise_conv2d(torch.relu(self.conv2d(img)))
            h = self.separable_conv2d.depthwise(self.batch_normalization(h))
            h = self.conv2d_transpose(self.separable_conv2d.pointwise(h))
            h = self.dense(h.mean((2, 3))) + self.embedding(ids).mean(1)
            return self.dense_1(self.layer_normalization(h))

    out = tmp_path / "torch"
    args = ["convert", str(tmp_path / "model.weights.h5"), "-o", str(out), "-q"]
    args += [*from_flag, "--to", "pytorch", "--rename", "^layers/=", "--rename", "/=."]
    assert main(args) == 0
    with open_reader(out) as r:
        state = {n: torch.from_numpy(np.array(r.read(n))) for n in r.specs().names}
    model = TorchNet().eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert unexpected == [] and set(missing) <= {"batch_normalization.num_batches_tracked"}
    io = np.load(tmp_path / "io.npz")
    with torch.no_grad():
        got = model(
            torch.from_numpy(io["x"].transpose(0, 3, 1, 2)), torch.from_numpy(io["t"]).long()
        )
    np.testing.assert_allclose(got.numpy(), io["y"], rtol=1e-4, atol=1e-5)
    saved = json.loads((out / ".weightbridge-plan.json").read_text())
    assert len(saved["steps"]) == len(state)
