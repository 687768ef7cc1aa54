"""A module's own tensor left over beside a same-shaped tensor of a module inside it.

The structure alone prefers the inner module (its signature is exact), but nothing in names
or order says which one the target means: the matcher must refuse, never load either with
``partial=True``, and name hints that pick each one.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_certain_or_refuse import offered_choices

import weightbridge
from weightbridge.errors import MatchError


def _pair() -> tuple[dict[str, np.ndarray], dict[str, dict[str, dict[str, np.ndarray]]]]:
    rng = np.random.default_rng(0)

    def r(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    theirs = {
        "conv1.weight": r(8, 3, 3, 3),
        "conv1.bias": r(8),
        "conv1.extra_copy.weight": r(8, 3, 3, 3),
        "conv1.extra_copy.bias": r(8),
        "fc.weight": r(10, 8),
        "fc.bias": r(10),
    }
    zeros = {
        "0": {"weight": np.zeros((8, 3, 3, 3), np.float32), "bias": np.zeros(8, np.float32)},
        "1": {"weight": np.zeros((10, 8), np.float32), "bias": np.zeros(10, np.float32)},
    }
    return theirs, {"layers": zeros}


def test_refused_with_both_candidates_named() -> None:
    theirs, mine = _pair()
    with pytest.raises(MatchError) as e:
        weightbridge.adapt(theirs, mine)
    text = str(e.value)
    assert "ambiguous" in text and "conv1.extra_copy.weight" in text and "conv1.weight" in text
    # No evidence tells them apart: no pairing is suggested, both are offered as the choice.
    assert "hints=[" not in text
    assert "only you can tell which is right" in text
    assert "--hint weight=conv1.weight" in text and "--hint weight=extra_copy.weight" in text


def test_partial_keeps_the_contested_targets_at_their_own_values() -> None:
    theirs, mine = _pair()
    out = weightbridge.adapt(theirs, mine, partial=True)
    assert not np.asarray(out["layers"]["0"]["weight"]).any()  # neither candidate was loaded
    assert not np.asarray(out["layers"]["0"]["bias"]).any()
    np.testing.assert_array_equal(out["layers"]["1"]["weight"], theirs["fc.weight"])


@pytest.mark.parametrize("module", ["conv1", "conv1.extra_copy"])
def test_hints_pick_either_candidate(module: str) -> None:
    theirs, mine = _pair()
    hints = [("0/weight", f"{module}.weight"), ("0/bias", f"{module}.bias")]
    out = weightbridge.adapt(theirs, mine, hints=hints, partial=module != "conv1")
    np.testing.assert_array_equal(out["layers"]["0"]["weight"], theirs[f"{module}.weight"])
    np.testing.assert_array_equal(out["layers"]["0"]["bias"], theirs[f"{module}.bias"])


@pytest.mark.parametrize("pick", [0, 1])
def test_each_offered_choice_loads_that_candidate(pick: int) -> None:
    theirs, mine = _pair()
    with pytest.raises(MatchError) as e:
        weightbridge.adapt(theirs, mine)
    choices = offered_choices(str(e.value))
    assert [len(c) for c in choices] == [2, 2], str(e.value)
    picked = [c[pick] for c in choices]  # the same candidate module for weight and bias
    src = picked[0][1].rsplit(".", 1)[0]
    src = "conv1.extra_copy" if src == "extra_copy" else src
    # (conv1's own tensors left over from a module that was used: partial says that is meant)
    out = weightbridge.adapt(theirs, mine, hints=picked, partial=src != "conv1")
    np.testing.assert_array_equal(out["layers"]["0"]["weight"], theirs[f"{src}.weight"])
    np.testing.assert_array_equal(out["layers"]["0"]["bias"], theirs[f"{src}.bias"])
