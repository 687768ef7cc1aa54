"""Explicit rules (orbax style), rules files, and their errors; orbax itself is the oracle."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from weightbridge.errors import PlanError, RuleError
from weightbridge.ops import Concat, Permute
from weightbridge.planning.planner import make_plan
from weightbridge.planning.rules import Transform, apply_transformations
from weightbridge.planning.rulesfile import load_transforms
from weightbridge.spec import CheckpointSpec, TensorSpec

# The examples of the orbax transform_utils guide (seed 002): (original, transformations, new).
A = np.array([1, 2, 3, 4])
C = np.array([5, 6, 7, 8])
GUIDE = {
    "rename": (
        {"a": 1, "b": 2},
        {"a2": dict(original_key="a"), "b2": dict(original_key="b")},
        {"a2": ..., "b2": ...},
    ),
    "regex": (
        {"a1": 1, "b5": 2},
        {r"([a-z])_([0-9])": dict(original_key=r"\1\2")},
        {"a_1": ..., "b_5": ...},
    ),
    "nested": (
        {"a": 1, "dense_1": {"kernel": 2, "bias": 3}, "dense_2": {"kernel": 4, "bias": 5}},
        {
            r"([a-z]+)_NEW": dict(original_key=r"\1"),
            r"([a-z]+)_([0-9])_NEW/([a-z]+)_1": dict(original_key=r"\1_\2/\3"),
        },
        {
            "a_NEW": ...,
            "dense_1_NEW": {"kernel_1": ..., "bias_1": ...},
            "dense_2_NEW": {"kernel_1": ..., "bias_1": ...},
        },
    ),
    "value_fn": (
        {"a": 1, "b": 2},
        {
            "a": dict(value_fn=lambda v: v * 2),
            "b2": dict(value_fn=lambda v: v * 3, original_key="b"),
        },
        {"a": ..., "b2": ...},
    ),
    "value_fn_regex": (
        {"a1": 1, "a2": 2, "b": 3},
        {
            r"a([0-9]?)\*2": dict(value_fn=lambda v: v * 2, original_key=r"a\1"),
            r"b([0-9]?)\*3": dict(value_fn=lambda v: v * 3, original_key=r"b\1"),
        },
        {"a1*2": ..., "a2*2": ..., "b*3": ...},
    ),
    "flatten": (
        {"a": 1, "dense_1": {"kernel": 2, "bias": 3}, "dense_2": {"kernel": 4, "bias": 5}},
        {
            r"([a-z]+)": dict(original_key=r"\1"),
            r"([a-z]+)_([0-9])_([a-z]+)": dict(original_key=r"\1_\2/\3"),
        },
        {
            "a": ...,
            "dense_1_kernel": ...,
            "dense_1_bias": ...,
            "dense_2_kernel": ...,
            "dense_2_bias": ...,
        },
    ),
    "multi_value": (
        {"a": A, "b": {"c": C}},
        {
            "a": dict(multi_value_fn=lambda _, kv: kv["a"][-1]),
            "b": {"c": dict(multi_value_fn=lambda _, kv: kv["a"] + kv["b"]["c"])},
        },
        {"a": ..., "b": {"c": ...}},
    ),
    "average": (
        {"a": {"a_1": 1, "a_2": 2}, "b": {"b_1": 3, "b_2": 4, "b_3": 5}},
        {r"([a-z]+)": dict(multi_value_fn=lambda k, kv: sum(kv[k].values()) / len(kv[k]))},
        {"a": ..., "b": ...},
    ),
    "fallback": (
        {"Dense_0": {"kernel": 1}, "Dense_1": {"kernel": 2}},
        {
            r"(.*)Dense_0(.*)": dict(use_fallback=True),
            r"(.*)Dense_1(.*)": dict(original_key=r"\1Dense_0\2"),
            r"(.*)Dense_2(.*)": dict(original_key=r"\1Dense_1\2"),
        },
        {
            "Dense_0": {"kernel": 10},
            "Dense_1": {"kernel": 11},
            "Dense_2": {"kernel": 12},
            "Dense_3": {"kernel": 13},
        },
    ),
    "named_groups": (
        {"dense_1": {"kernel": 2, "bias": 3}},
        {
            r"(?P<layer>[a-z]+)_(?P<num>[0-9])_(?P<weight>[a-z]+)": dict(
                original_key=r"\g<layer>_\g<num>/\g<weight>"
            )
        },
        {"dense_1_kernel": ..., "dense_1_bias": ...},
    ),
}
EXPECTED = {
    "rename": {"a2": 1, "b2": 2},
    "regex": {"a_1": 1, "b_5": 2},
    "nested": {
        "a_NEW": 1,
        "dense_1_NEW": {"kernel_1": 2, "bias_1": 3},
        "dense_2_NEW": {"kernel_1": 4, "bias_1": 5},
    },
    "value_fn": {"a": 2, "b2": 6},
    "value_fn_regex": {"a1*2": 2, "a2*2": 4, "b*3": 9},
    "flatten": {
        "a": 1,
        "dense_1_kernel": 2,
        "dense_1_bias": 3,
        "dense_2_kernel": 4,
        "dense_2_bias": 5,
    },
    "multi_value": {"a": 4, "b": {"c": A + C}},
    "average": {"a": 1.5, "b": 4.0},
    "fallback": {
        "Dense_0": {"kernel": 10},
        "Dense_1": {"kernel": 1},
        "Dense_2": {"kernel": 2},
        "Dense_3": {"kernel": 13},
    },
    "named_groups": {"dense_1_kernel": 2, "dense_1_bias": 3},
}


def _transforms(spec, cls):
    return {
        k: _transforms(v, cls) if isinstance(v, dict) and not _is_leaf(v) else cls(**v)
        for k, v in spec.items()
    }


def _is_leaf(d: dict) -> bool:
    return bool(set(d) & {"original_key", "value_fn", "multi_value_fn", "use_fallback"})


def _same(a, b) -> None:
    if isinstance(b, dict):
        assert isinstance(a, dict) and a.keys() == b.keys()
        for k in b:
            _same(a[k], b[k])
    else:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("example", list(GUIDE))
def test_orbax_guide_examples_give_the_guides_results(example: str) -> None:
    original, rules, new = GUIDE[example]
    _same(apply_transformations(original, _transforms(rules, Transform), new), EXPECTED[example])


@pytest.mark.skipif(
    importlib.util.find_spec("orbax") is None, reason="orbax-checkpoint not installed"
)
@pytest.mark.parametrize("example", list(GUIDE))
def test_orbax_itself_agrees(example: str) -> None:
    import orbax.checkpoint as ocp

    original, rules, new = GUIDE[example]
    theirs = ocp.apply_transformations(original, _transforms(rules, ocp.Transform), new)
    ours = apply_transformations(original, _transforms(rules, Transform), new)
    _same(ours, theirs)


SRC = CheckpointSpec.of(
    [
        TensorSpec("blocks.0.attn.qkv.weight", (12, 4), "F32"),
        TensorSpec("blocks.0.attn.qkv.bias", (12,), "F32"),
        TensorSpec("head.weight", (10, 4), "F32"),
    ]
)
TGT = CheckpointSpec.of(
    [
        TensorSpec(f"blocks.0.attn.{p}.{leaf}", shape, "F32")
        for p in "qkv"
        for leaf, shape in (("weight", (4, 4)), ("bias", (4,)))
    ]
    + [TensorSpec("head.kernel", (4, 10), "F32")]
)


def test_split_rules_plan_slices_from_metadata() -> None:
    rules = {
        rf"blocks\.(\d+)\.attn\.{p}\.(weight|bias)": Transform(
            original_key=r"blocks.\1.attn.qkv.\2", split=(0, i, 3)
        )
        for i, p in enumerate("qkv")
    }
    rules[r"head\.kernel"] = Transform(original_key="head.weight", ops=[Permute((1, 0))])
    plan = make_plan(SRC, TGT, rules=rules)
    by = {s.target.name: s for s in plan.steps}
    assert by["blocks.0.attn.k.weight"].ops[0].to_json() == {
        "op": "slice",
        "axis": 0,
        "start": 4,
        "stop": 8,
    }
    assert by["head.kernel"].ops == (Permute((1, 0)),)


def test_concat_rule_fuses() -> None:
    plan = make_plan(
        TGT,
        CheckpointSpec.of([TensorSpec("qkv", (12, 4), "F32")]),
        rules={
            "qkv": Transform(
                original_key=[f"blocks.0.attn.{p}.weight" for p in "qkv"], ops=[Concat(0)]
            )
        },
    )
    assert plan.steps[0].sources == tuple(f"blocks.0.attn.{p}.weight" for p in "qkv")


def test_rule_that_matches_nothing_is_named() -> None:
    with pytest.raises(RuleError, match=r"rule 'nothing\\\.here' matches no target tensor"):
        make_plan(SRC, TGT, rules={r"nothing\.here": Transform(original_key="head.weight")})


def test_rule_whose_op_does_not_fit_is_named() -> None:
    rules = {r"head\.kernel": Transform(original_key="head.weight", ops=[Permute((1, 0, 2))])}
    with pytest.raises(RuleError, match=r"rule 'head\\\.kernel': permute \[1, 0, 2\] does not fit"):
        make_plan(SRC, TGT, rules=rules)


def test_rule_naming_a_missing_source_is_named() -> None:
    with pytest.raises(RuleError, match="maps target 'head.kernel' to source 'nope'"):
        make_plan(SRC, TGT, rules={r"head\.kernel": Transform(original_key="nope")})


def test_value_fn_plan_runs_but_cannot_be_saved(tmp_path) -> None:
    plan = make_plan(
        SRC,
        TGT,
        partial=True,
        rules={r"head\.kernel": Transform(original_key="head.weight", value_fn=lambda v: v.T * 2)},
    )
    with pytest.raises(PlanError, match="value_fn"):
        plan.save(tmp_path / "p.json")


def test_rules_file_parses_and_errors_name_the_rule(tmp_path) -> None:
    good = tmp_path / "rules.json"
    good.write_text(
        json.dumps(
            {
                "rules": [
                    {
                        "target": r"blocks\.0\.attn\.q\.weight",
                        "source": "blocks.0.attn.qkv.weight",
                        "split": [0, 0, 3],
                    },
                    {
                        "target": r"head\.kernel",
                        "source": "head.weight",
                        "ops": [{"op": "permute", "axes": [1, 0]}],
                    },
                ]
            }
        )
    )
    transforms = load_transforms(good)
    assert transforms[r"head\.kernel"].ops == (Permute((1, 0)),)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(RuleError, match="bad.json: rules file does not parse"):
        load_transforms(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"rules": [{"target": "x", "ops": [{"op": "rotate"}]}]}))
    with pytest.raises(RuleError, match=r"rule #1 \('x'\).*unknown op 'rotate'"):
        load_transforms(wrong)
    code = tmp_path / "code.json"
    code.write_text(json.dumps({"rules": [{"target": "x", "value_fn": "os.system('x')"}]}))
    with pytest.raises(RuleError, match="unknown field"):
        load_transforms(code)
