"""Rules files shipped with weightbridge (`weightbridge/rules/`), picked by name with
``--rules NAME``, proven by running both models on what they produce."""

from __future__ import annotations

import numpy as np
import pytest

from weightbridge import api
from weightbridge.errors import MatchError, RuleError
from weightbridge.planning.rulesfile import bundled_rules, load_renames, resolve_rules_path
from weightbridge.streaming.transform import compute


def test_a_bundled_name_resolves_and_an_unknown_one_lists_the_shipped() -> None:
    assert "keras_resnet_to_torchvision" in bundled_rules()
    assert resolve_rules_path("keras_resnet_to_torchvision").endswith(
        "rules/keras_resnet_to_torchvision.json"
    )
    with pytest.raises(RuleError, match="shipped: .*keras_resnet_to_torchvision"):
        resolve_rules_path("keras_resnet")


@pytest.mark.keras
@pytest.mark.torch
def test_keras_resnet50_onto_a_torchvision_layout_computes_the_same() -> None:
    """The corpus pair that the matcher refuses (Keras numbers stages and blocks from 1 and
    names the shortcut block1_0: nothing in metadata proves which 1x1 conv is which) converts
    with the shipped rules, and the torch model gives Keras's outputs."""
    from test_corpus import all_cases

    case = next(c for c in all_cases() if c.name == "keras_resnet50_to_torchvision_v1")
    pair = case.build()
    with pytest.raises(MatchError):
        api.plan(pair.theirs, pair.mine)
    plan = api.plan(pair.theirs, pair.mine, renames=load_renames("keras_resnet_to_torchvision"))
    values = {
        s.target.name: compute([np.asarray(pair.theirs[x]) for x in s.sources], s.ops, s.target)
        for s in plan.steps
    }
    # (BatchNorm's num_batches_tracked counters are no weights: nothing in Keras feeds them)
    assert {k for k in pair.mine if not k.endswith("num_batches_tracked")} == set(values)
    want, got = pair.run_theirs(), pair.run_mine(values)
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * scale)
