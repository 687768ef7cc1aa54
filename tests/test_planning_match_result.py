"""The matcher answers with a typed value: pairs, notes by kind, and a refusal as data.

The planner takes from it what it needs (the notes that belong in the plan, by kind; the
refusal, which it raises) without reading text back; `plan.py`, a value module, imports no
planning heuristics.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from weightbridge import api
from weightbridge.errors import MatchError
from weightbridge.ops import Permute, Slice
from weightbridge.plan import Plan
from weightbridge.planning.match import Matcher, MatchNote, MatchResult
from weightbridge.planning.planner import make_plan
from weightbridge.spec import CheckpointSpec, TensorSpec


def _t(name: str, *shape: int) -> TensorSpec:
    return TensorSpec(name, shape, "F32")


def test_pairs_and_notes_come_back_typed() -> None:
    found = Matcher("pytorch", "flax")(
        [_t("fc.weight", 4, 3), _t("fc.bias", 4), _t("bn.num_batches_tracked")],
        [_t("fc.kernel", 3, 4), _t("fc.bias", 4)],
    )
    assert isinstance(found, MatchResult) and found.refusal is None
    assert dict((t, (s, ops)) for t, s, ops in found.pairs) == {
        "fc.kernel": (("fc.weight",), (Permute((1, 0)),)),
        "fc.bias": (("fc.bias",), ()),
    }
    assert found.dropped == ("bn.num_batches_tracked",)
    assert all(isinstance(n, MatchNote) and n.kind == "info" for n in found.notes)
    assert found.log()[0].startswith("source layout: pytorch; target layout: flax;")


def _tied() -> tuple[list[TensorSpec], list[TensorSpec]]:
    # Two same-shaped layers whose names tell nothing and whose order is sorted: ambiguous.
    src = [_t("a.weight", 4, 4), _t("b.weight", 4, 4)]
    tgt = [_t("x.weight", 4, 4), _t("y.weight", 4, 4)]
    return src, tgt


def test_a_refusal_is_data_until_the_planner_raises_it() -> None:
    src, tgt = _tied()
    found = Matcher("pytorch", "pytorch")(src, tgt)
    assert found.refusal is not None
    assert found.refusal.message.startswith("refused to guess:")
    assert found.refusal.choices  # the tied pair's two assignments, as hints
    log: list[str] = []
    with pytest.raises(MatchError) as e:
        make_plan(CheckpointSpec.of(src), CheckpointSpec.of(tgt), matcher=Matcher(), log=log)
    assert str(e.value) == found.refusal.message
    assert e.value.choices == found.refusal.choices
    # What the matcher decided before refusing still reaches the caller's log.
    assert log and log[0].startswith("source layout:")


def test_partial_turns_the_refusal_into_a_note() -> None:
    src, tgt = _tied()
    found = Matcher("pytorch", "pytorch", partial=True)(src, tgt)
    assert found.refusal is None
    (partial,) = found.notes_of("partial")
    assert partial.startswith("partial: left unpaired (they keep their own values):\n")


def test_sliced_notes_reach_the_plan_by_kind() -> None:
    src = CheckpointSpec.of([_t("head.weight", 100, 8), _t("head.bias", 100)])
    tgt = CheckpointSpec.of([_t("head.weight", 10, 8), _t("head.bias", 10)])
    log: list[str] = []
    plan = api.plan(src, tgt, partial=True, slice_mismatched=True, log=log)
    sliced = [n for n in plan.notes if n.kind == "sliced"]
    assert len(sliced) == 2 and all(n.text in log and n.text.startswith("sliced:") for n in sliced)
    assert [type(op) for op in plan.steps[0].ops] == [Slice]
    assert plan.summary().startswith("loaded 2 tensor(s) (2 sliced), kept 0")
    # Only the sliced notes go into the plan; the rest of the matcher's notes are log only.
    assert not any(n.text.startswith("source layout:") for n in plan.notes)
    # A saved plan keeps each note's kind.
    assert Plan.from_json(plan.to_json()).notes == plan.notes


def test_a_custom_matcher_may_return_bare_pairs() -> None:
    src = CheckpointSpec.of([_t("a", 4)])
    tgt = CheckpointSpec.of([_t("b", 4)])
    plan = make_plan(src, tgt, matcher=lambda s, t: [("b", ("a",), ())])
    assert [(s.target.name, s.sources) for s in plan.steps] == [("b", ("a",))]


def test_the_plan_value_module_imports_no_planning() -> None:
    tree = ast.parse(Path(api.__file__).with_name("plan.py").read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)] + [
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    ]
    assert not [m for m in imported if m.startswith("weightbridge.planning")]
