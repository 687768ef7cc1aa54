"""Many-to-one tensors found automatically, and partial loading, proved by equal outputs."""

from __future__ import annotations

import numpy as np
import pytest

import weightbridge
from weightbridge import api
from weightbridge.io import open_reader, write_checkpoint
from weightbridge.ops import Stack
from weightbridge.spec import CheckpointSpec, TensorSpec


@pytest.mark.torch
@pytest.mark.jax
def test_torch_multihead_attention_into_flax_and_back_without_rules() -> None:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import torch

    e, h = 16, 4
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(e, h, batch_first=True).eval()
    with torch.no_grad():
        for p in mha.parameters():
            p.add_(torch.randn_like(p) * 0.1)

    class Attention(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.MultiHeadDotProductAttention(num_heads=h, qkv_features=e, out_features=e)(
                x, x
            )

    x = np.random.default_rng(0).standard_normal((2, 5, e)).astype(np.float32)
    want = mha(*(torch.from_numpy(x),) * 3, need_weights=False)[0].detach().numpy()
    model = Attention()
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 5, e)))
    variables = weightbridge.adapt(mha.state_dict(), shapes)
    np.testing.assert_allclose(model.apply(variables, x), want, atol=1e-5)
    back = weightbridge.adapt(
        variables, torch.nn.MultiheadAttention(e, h, batch_first=True).state_dict()
    )
    again = torch.nn.MultiheadAttention(e, h, batch_first=True).eval()
    again.load_state_dict(back)
    np.testing.assert_allclose(
        again(*(torch.from_numpy(x),) * 3, need_weights=False)[0].detach().numpy(), want, atol=1e-6
    )


def _attention(x, q, k, v, o, heads):
    def proj(w, b):
        y = x @ w.T + b
        n, t, e = y.shape
        return y.reshape(n, t, heads, e // heads).transpose(0, 2, 1, 3)

    qh, kh, vh = proj(*q), proj(*k), proj(*v)
    att = qh @ kh.transpose(0, 1, 3, 2) / np.sqrt(qh.shape[-1])
    att = np.exp(att - att.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    y = (att @ vh).transpose(0, 2, 1, 3).reshape(x.shape)
    return y @ o[0].T + o[1]


def test_vit_fused_qkv_to_separate_projections_and_back() -> None:
    e, heads = 12, 3
    rng = np.random.default_rng(1)
    fused = {
        "blocks.0.attn.qkv.weight": rng.standard_normal((3 * e, e)).astype(np.float32),
        "blocks.0.attn.qkv.bias": rng.standard_normal(3 * e).astype(np.float32),
        "blocks.0.attn.proj.weight": rng.standard_normal((e, e)).astype(np.float32),
        "blocks.0.attn.proj.bias": rng.standard_normal(e).astype(np.float32),
    }
    separate = {
        f"layers.0.self_attn.{p}_proj.{leaf}": np.zeros(
            (e, e) if leaf == "weight" else e, np.float32
        )
        for p in ("q", "k", "v", "out")
        for leaf in ("weight", "bias")
    }
    # Only the fused qkv (with its bias) shows an orientation; the all-square target shows
    # none, so the matcher refuses until told, and names the hint.
    with pytest.raises(weightbridge.MatchError, match="@transpose"):
        weightbridge.adapt(fused, separate)
    got = weightbridge.adapt(fused, separate, hints=[("@transpose", "no")])
    x = rng.standard_normal((2, 4, e)).astype(np.float32)
    w, b = fused["blocks.0.attn.qkv.weight"], fused["blocks.0.attn.qkv.bias"]
    want = _attention(
        x,
        *[(w[i * e : (i + 1) * e], b[i * e : (i + 1) * e]) for i in range(3)],
        (fused["blocks.0.attn.proj.weight"], fused["blocks.0.attn.proj.bias"]),
        heads,
    )
    p = "layers.0.self_attn."
    mine = _attention(
        x,
        *[(got[f"{p}{n}_proj.weight"], got[f"{p}{n}_proj.bias"]) for n in ("q", "k", "v", "out")],
        heads,
    )
    np.testing.assert_allclose(mine, want, atol=1e-5)
    back = weightbridge.adapt(
        got, {k: np.zeros_like(v) for k, v in fused.items()}, hints=[("@transpose", "no")]
    )
    for k in fused:
        np.testing.assert_array_equal(back[k], fused[k])


def _moe(x, w1s, w2s, router):
    logits = x @ router.T
    top = logits.argmax(-1)
    out = np.zeros_like(x)
    for i, (w1, w2) in enumerate(zip(w1s, w2s, strict=True)):
        sel = top == i
        out[sel] = np.maximum(x[sel] @ w1.T, 0) @ w2.T
    return out


def test_moe_per_expert_to_stacked_streamed_and_back(tmp_path) -> None:
    n, hdim, f = 8, 16, 32
    rng = np.random.default_rng(2)
    per_expert = {
        "model.layers.0.moe.gate.weight": rng.standard_normal((n, hdim)).astype(np.float32)
    }
    for i in range(n):
        per_expert[f"model.layers.0.moe.experts.{i}.w1.weight"] = rng.standard_normal(
            (f, hdim)
        ).astype(np.float32)
        per_expert[f"model.layers.0.moe.experts.{i}.w2.weight"] = rng.standard_normal(
            (hdim, f)
        ).astype(np.float32)
    write_checkpoint(str(tmp_path / "mixtral.safetensors"), per_expert)
    stacked = CheckpointSpec.of(
        [
            TensorSpec("layers_0/moe/router/kernel", (hdim, n), "F32"),
            TensorSpec("layers_0/moe/experts/w1/kernel", (n, hdim, f), "F32"),
            TensorSpec("layers_0/moe/experts/w2/kernel", (n, f, hdim), "F32"),
        ]
    )
    plan = api.plan(str(tmp_path / "mixtral.safetensors"), stacked)
    w1_step = next(s for s in plan.steps if s.target.name.endswith("w1/kernel"))
    assert isinstance(w1_step.ops[0], Stack) and len(w1_step.sources) == n
    api.convert(
        tmp_path / "mixtral.safetensors", tmp_path / "stacked", plan=plan, max_shard_size="4KB"
    )
    assert api.verify(tmp_path / "mixtral.safetensors", tmp_path / "stacked") == 3
    with open_reader(tmp_path / "stacked") as r:
        got = {name: np.array(r.read(name)) for name in r.specs().names}
    x = rng.standard_normal((20, hdim)).astype(np.float32)
    want = _moe(
        x,
        [per_expert[f"model.layers.0.moe.experts.{i}.w1.weight"] for i in range(n)],
        [per_expert[f"model.layers.0.moe.experts.{i}.w2.weight"] for i in range(n)],
        per_expert["model.layers.0.moe.gate.weight"],
    )
    w1, w2 = got["layers_0/moe/experts/w1/kernel"], got["layers_0/moe/experts/w2/kernel"]
    mine = _moe(
        x,
        [w1[i].T for i in range(n)],
        [w2[i].T for i in range(n)],
        got["layers_0/moe/router/kernel"].T,
    )
    np.testing.assert_allclose(mine, want, atol=1e-5)
    # and back: stacked -> per expert, streamed
    back = api.convert(
        tmp_path / "stacked", tmp_path / "back", target=str(tmp_path / "mixtral.safetensors")
    )
    assert back.written
    with open_reader(tmp_path / "back") as r:
        for name, value in per_expert.items():
            np.testing.assert_array_equal(r.read(name), value)


def _classifier(n_classes: int, rng) -> dict[str, np.ndarray]:
    return {
        "module.backbone.conv.weight": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
        "module.backbone.conv.bias": rng.standard_normal(8).astype(np.float32),
        "module.head.weight": rng.standard_normal((n_classes, 8)).astype(np.float32),
        "module.head.bias": rng.standard_normal(n_classes).astype(np.float32),
    }


def test_partial_keeps_the_head_unless_asked_to_slice(capsys) -> None:
    rng = np.random.default_rng(3)
    theirs = _classifier(1000, rng)
    mine = {k.removeprefix("module."): v for k, v in _classifier(10, rng).items()}
    with pytest.raises(weightbridge.MatchError):
        weightbridge.adapt(theirs, mine)
    kept = weightbridge.adapt(theirs, mine, partial=True, verbose=True)
    np.testing.assert_array_equal(
        kept["backbone.conv.weight"], theirs["module.backbone.conv.weight"]
    )
    np.testing.assert_array_equal(kept["head.weight"], mine["head.weight"])
    assert "kept 2 at the target's own values" in capsys.readouterr().err
    sliced = weightbridge.adapt(theirs, mine, partial=True, slice_mismatched=True)
    np.testing.assert_array_equal(sliced["head.weight"], theirs["module.head.weight"][:10])
    np.testing.assert_array_equal(sliced["head.bias"], theirs["module.head.bias"][:10])


def test_partial_streaming_reads_the_targets_own_values(tmp_path) -> None:
    rng = np.random.default_rng(4)
    write_checkpoint(str(tmp_path / "theirs.safetensors"), _classifier(1000, rng))
    mine = {k.removeprefix("module."): v for k, v in _classifier(10, rng).items()}
    write_checkpoint(str(tmp_path / "mine.safetensors"), mine)
    report = api.convert(
        tmp_path / "theirs.safetensors",
        tmp_path / "out",
        target=str(tmp_path / "mine.safetensors"),
        partial=True,
    )
    assert report.written
    with open_reader(tmp_path / "out") as r:
        np.testing.assert_array_equal(r.read("head.weight"), mine["head.weight"])
    assert (
        api.verify(
            tmp_path / "theirs.safetensors",
            tmp_path / "out",
            target=str(tmp_path / "mine.safetensors"),
        )
        == 4
    )


MOE_CONVERT = """
import sys, json
import weightbridge.api as api
from weightbridge.spec import CheckpointSpec
target = CheckpointSpec.from_json(json.load(open(sys.argv[3])))
# Every expert weight is square: nothing in the shapes shows their orientation, so say it.
report = api.convert(
    sys.argv[1], sys.argv[2], target=target, max_shard_size="300MB",
    hints=[("@transpose", "yes")],
)
print(report.summary())
"""


@pytest.mark.slow
def test_moe_experts_stack_streams_under_a_memory_cap(tmp_path) -> None:
    """1 GB of per-expert weights stacked into [experts, ...] tensors under RLIMIT_DATA: anonymous
    memory stays within baseline + the largest group (one stacked tensor) + 256 MB."""
    import json

    from test_memory_bound import BASELINE, MB, run_capped

    n, f, h, layers = 8, 2048, 2048, 4  # 16 MB per expert weight, 128 MB per stacked tensor
    tensors, target = {}, []
    for layer in range(layers):
        for w in ("w1", "w2"):
            for i in range(n):
                tensors[f"layers.{layer}.moe.experts.{i}.{w}.weight"] = np.full(
                    (f, h), i + layer, np.float32
                )
            target.append(TensorSpec(f"layers_{layer}/moe/experts/{w}/kernel", (n, h, f), "F32"))
    src = tmp_path / "moe.safetensors"
    write_checkpoint(str(src), tensors)
    del tensors
    spec_path = tmp_path / "stacked.json"
    spec_path.write_text(json.dumps(CheckpointSpec.of(target).to_json()))
    code, out, _ = run_capped(["-c", BASELINE, str(src)], None)
    assert code == 0, out
    vm_data, baseline = (int(x) for x in out.split())
    group = n * f * h * 4
    cap = vm_data + group + 256 * MB
    code, out, peak = run_capped(
        ["-c", MOE_CONVERT, str(src), str(tmp_path / "out"), str(spec_path)], cap
    )
    assert code == 0, out
    assert peak <= baseline + group + 256 * MB, (peak / MB, baseline / MB)
    assert src.stat().st_size > cap  # the checkpoint does not fit under the cap
    with open_reader(tmp_path / "out") as r:
        got = r.read("layers_3/moe/experts/w2/kernel")
        assert got.shape == (n, h, f) and float(got[5, 0, 0]) == 5 + 3
    assert api.verify(src, tmp_path / "out") == len(target)
