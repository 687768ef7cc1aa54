"""Specs, dtypes, ops and plans: pure functions tested without files."""

from __future__ import annotations

import json
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weightbridge import dtypes
from weightbridge.errors import DtypeError, PlanError, SpecError
from weightbridge.ops import Cast, Concat, Permute, Reshape, Slice, Stack, infer, op_from_json
from weightbridge.plan import Plan, Step
from weightbridge.planning.planner import Rename, make_plan
from weightbridge.spec import CheckpointSpec, TensorSpec, load_spec_file
from weightbridge.streaming.transform import blocked_copy, compute


def test_core_import_pulls_in_no_framework() -> None:
    code = (
        "import sys, weightbridge, weightbridge.api, weightbridge.cli, weightbridge.streaming.convert;"
        "import weightbridge.io as w; [w._module(n) for n in ('safetensors', 'sharded')];"
        "print(sorted(m for m in ('torch', 'jax', 'flax', 'tensorflow', 'keras') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "alias,code",
    [
        ("bfloat16", "BF16"),
        ("torch.float16", "F16"),
        ("F32", "F32"),
        ("float8_e4m3fn", "F8_E4M3"),
        ("int64", "I64"),
    ],
)
def test_dtype_aliases(alias: str, code: str) -> None:
    assert dtypes.canonical(alias) == code
    assert dtypes.from_numpy(dtypes.to_numpy(code)) == code


def test_unknown_dtype_names_the_known_ones() -> None:
    with pytest.raises(DtypeError, match="unknown dtype 'F7'.*BF16"):
        dtypes.canonical("F7")


def test_spec_json_round_trip_and_fingerprint() -> None:
    spec = CheckpointSpec.of(
        [TensorSpec("a", (2, 3), "F32"), TensorSpec("b", (), "bf16")], {"format": "pt"}
    )
    again = CheckpointSpec.from_json(json.loads(json.dumps(spec.to_json())))
    assert again == spec
    reordered = CheckpointSpec.of(reversed(spec.tensors))
    assert reordered.fingerprint() == spec.fingerprint()
    other = CheckpointSpec.of([TensorSpec("a", (3, 2), "F32"), TensorSpec("b", (), "BF16")])
    assert other.fingerprint() != spec.fingerprint()


@pytest.mark.parametrize(
    "text,message",
    [
        ("[1, 2]", "must be a JSON object"),
        ('{"a": {"shape": [2]}}', "tensor 'a' must be"),
        ('{"a": {"shape": [-1], "dtype": "F32"}}', "non-negative integers"),
        ('{"a": {"shape": [2], "dtype": "Q9"}}', "unknown dtype 'Q9'"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_spec_files_name_the_file_and_problem(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "mine.json"
    path.write_text(text)
    with pytest.raises(SpecError, match=message) as info:
        load_spec_file(path)
    assert str(path) in str(info.value)


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(SpecError, match="duplicate tensor name 'a'"):
        CheckpointSpec.of([TensorSpec("a", (1,), "F32"), TensorSpec("a", (2,), "F32")])


OPS = [Permute((2, 0, 1)), Reshape((6, 4)), Slice(1, 1, 3), Concat(0), Stack(1), Cast("BF16")]


@pytest.mark.parametrize("op", OPS, ids=lambda o: o.kind)
def test_ops_json_round_trip(op) -> None:
    assert op_from_json(json.loads(json.dumps(op.to_json()))) == op


def test_unknown_op_is_named() -> None:
    with pytest.raises(PlanError, match="unknown op 'twist'"):
        op_from_json({"op": "twist"})


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=4), st.randoms(use_true_random=False))
def test_predicted_shape_equals_produced_shape_and_inverse_permute(dims, rnd) -> None:
    shape = tuple(dims)
    axes = list(range(len(shape)))
    rnd.shuffle(axes)
    # values below 256 are exact in bf16, so the round trip through it is lossless
    a = (np.arange(int(np.prod(shape))) % 251).astype(np.float32).reshape(shape)
    ops = [Permute(tuple(axes)), Reshape((a.size,)), Cast("BF16")]
    out_shape, out_dtype = infer(ops, [shape], "F32")
    target = TensorSpec("t", out_shape, out_dtype)
    produced = compute([a], ops, target)
    assert produced.shape == out_shape and produced.dtype == ml_dtypes.bfloat16
    inverse = tuple(int(i) for i in np.argsort(axes))
    back = compute(
        [produced.reshape(a.transpose(axes).shape)],
        [Permute(inverse), Cast("F32")],
        TensorSpec("b", shape, "F32"),
    )
    np.testing.assert_array_equal(back, a)


@pytest.mark.parametrize(
    "shape,axes",
    [((300, 517), (1, 0)), ((7, 300, 260), (2, 0, 1)), ((3, 3, 200, 300), (2, 3, 1, 0))],
)
def test_blocked_copy_equals_numpy(shape, axes) -> None:
    a = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    want = np.ascontiguousarray(a.transpose(axes))
    got = np.empty_like(want)
    blocked_copy(got, a.transpose(axes))
    np.testing.assert_array_equal(got, want)
    as_bf16 = np.empty(want.shape, ml_dtypes.bfloat16)
    blocked_copy(as_bf16, a.transpose(axes))
    np.testing.assert_array_equal(as_bf16, want.astype(ml_dtypes.bfloat16))


def test_multi_source_ops() -> None:
    q, k = np.ones((2, 3), np.float32), np.zeros((2, 3), np.float32)
    fused = compute([q, k], [Concat(0)], TensorSpec("qk", (4, 3), "F32"))
    np.testing.assert_array_equal(fused, np.concatenate([q, k]))
    part = compute([fused], [Slice(0, 2, 4)], TensorSpec("k", (2, 3), "F32"))
    np.testing.assert_array_equal(part, k)
    stacked = compute([q, k], [Stack(0)], TensorSpec("s", (2, 2, 3), "F32"))
    assert stacked.shape == (2, 2, 3)
    with pytest.raises(PlanError, match="need a concat or stack"):
        infer([], [(2, 3), (2, 3)], "F32")


SRC = CheckpointSpec.of(
    [
        TensorSpec("module.layers.0.fc.weight", (8, 4), "F32"),
        TensorSpec("module.layers.0.fc.bias", (8,), "F32"),
        TensorSpec("module.embed.weight", (100, 4), "F32"),
        TensorSpec("module.conv.weight", (16, 3, 5, 5), "F32"),
        TensorSpec("module.bn.num_batches_tracked", (), "I64"),
    ]
)


def test_plan_with_renames_and_layouts() -> None:
    plan = make_plan(
        SRC,
        renames=[
            Rename(r"^module\.", ""),
            Rename(r"layers\.(\d+)\.", r"block\1/"),
            Rename(r".*num_batches_tracked", ""),
        ],
        from_framework="pytorch",
        to_framework="flax",
        dtype="bf16",
    )
    by_name = {s.target.name: s for s in plan.steps}
    assert by_name["block0/fc.kernel"].target == TensorSpec("block0/fc.kernel", (4, 8), "BF16")
    assert by_name["block0/fc.kernel"].ops == (Permute((1, 0)), Cast("BF16"))
    assert by_name["embed.embedding"].ops == (Cast("BF16"),)  # embeddings are never transposed
    assert by_name["conv.kernel"].target.shape == (5, 5, 3, 16)  # OIHW -> HWIO
    assert plan.unused == {"module.bn.num_batches_tracked": "dropped by rule"}


def test_plan_reshapes_to_the_target_and_refuses_what_does_not_fit() -> None:
    src = CheckpointSpec.of([TensorSpec("grn.beta", (1, 1, 1, 8), "F32")])
    tgt = CheckpointSpec.of([TensorSpec("grn.bias", (8,), "F32")])
    plan = make_plan(src, tgt, renames=[Rename("beta", "bias")])
    assert plan.steps[0].ops == (Reshape((8,)),)
    bad = CheckpointSpec.of([TensorSpec("grn.bias", (9,), "F32")])
    with pytest.raises(PlanError, match="do not hold the same number of elements"):
        make_plan(src, bad, renames=[Rename("beta", "bias")])


def test_unpaired_error_lists_both_sides() -> None:
    tgt = CheckpointSpec.of([TensorSpec("encoder.dense.kernel", (4, 8), "F32")])
    src = CheckpointSpec.of([TensorSpec("enc.fc.weight", (8, 4), "F32")])
    with pytest.raises(PlanError) as info:
        make_plan(src, tgt, from_framework="pytorch", to_framework="flax")
    msg = str(info.value)
    assert "OUT encoder.dense.kernel (4, 8)" in msg and "IN  enc.fc.weight (8, 4)" in msg
    assert "--rename" in msg


def test_plan_json_round_trip_and_stale_plan_refused(tmp_path) -> None:
    plan = make_plan(
        SRC, renames=[Rename(r"^module\.", "")], from_framework="pytorch", to_framework="flax"
    )
    path = tmp_path / "plan.json"
    plan.save(path)
    again = Plan.load(path)
    assert again == plan and again.fingerprint() == plan.fingerprint()
    assert "conv.kernel" in plan.explain()
    changed = CheckpointSpec.of([*SRC.tensors[:-1], TensorSpec("extra", (1,), "F32")])
    with pytest.raises(PlanError, match="fingerprint"):
        again.validate(changed)


def test_edited_plan_that_does_not_fit_is_refused(tmp_path) -> None:
    plan = make_plan(SRC)
    obj = plan.to_json()
    obj["steps"][0]["ops"] = [{"op": "permute", "axes": [0, 1, 2]}]
    with pytest.raises(PlanError, match="permute \\[0, 1, 2\\] does not fit"):
        Plan.from_json(obj).validate(SRC)


def test_step_sources_must_exist() -> None:
    with pytest.raises(PlanError, match="not in the source checkpoint"):
        Plan.build(SRC, [Step(TensorSpec("x", (1,), "F32"), ("nope",))])
