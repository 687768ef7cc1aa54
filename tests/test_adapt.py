"""adapt(): the seed's in-memory call: cache, verbose output, hints, and checkpoint paths."""

from __future__ import annotations

import json

import numpy as np
import pytest

import weightbridge
from weightbridge.errors import MatchError
from weightbridge.io import write_checkpoint


def _pair(seed: int = 0):
    rng = np.random.default_rng(seed)
    theirs = {
        # The seed's example: both sides flattened to one axis of the same size.
        "backbone.0.body.layer3.5.conv1.weight": rng.standard_normal(64).astype(np.float32),
        "backbone.0.body.layer3.5.conv3.weight": rng.standard_normal(64).astype(np.float32),
    }
    mine = {
        "load_prefix": {
            "encode": {
                "stage3": {
                    "block6": {
                        "reduce": {"linear": {"w": np.zeros(64, np.float32)}},
                        "expand": {"linear": {"w": np.zeros(64, np.float32)}},
                    }
                }
            }
        }
    }
    return theirs, mine


def test_ambiguity_errors_with_the_hint_that_fixes_it() -> None:
    theirs, mine = _pair()
    with pytest.raises(MatchError) as info:
        weightbridge.adapt(theirs, mine)
    msg = str(info.value)
    assert "OUT load_prefix/encode/stage3/block6/reduce/linear/w (64,)" in msg
    assert "IN  backbone.0.body.layer3.5.conv1.weight (64,)" in msg
    # Nothing tells reduce/expand from conv1/conv3 (a sorted file's order is no evidence):
    # both choices are named, each checked to resolve the group; the user picks the right one.
    assert "only you can tell which is right" in msg
    assert "--hint reduce/linear=conv1" in msg and "--hint reduce/linear=conv3" in msg
    out = weightbridge.adapt(theirs, mine, hints=[("reduce", "conv1")])
    block = out["load_prefix"]["encode"]["stage3"]["block6"]
    np.testing.assert_array_equal(
        block["reduce"]["linear"]["w"], theirs["backbone.0.body.layer3.5.conv1.weight"].ravel()
    )
    np.testing.assert_array_equal(
        block["expand"]["linear"]["w"], theirs["backbone.0.body.layer3.5.conv3.weight"].ravel()
    )


def test_cache_is_saved_beside_the_caller_and_reused(tmp_path, monkeypatch, capsys) -> None:
    theirs, mine = _pair()
    path = tmp_path / "mapping.json"
    first = weightbridge.adapt(theirs, mine, hints=[("reduce", "conv1")], cache=str(path))
    saved = json.loads(path.read_text())
    assert saved["weightbridge_plan"] == 1 and len(saved["steps"]) == 2
    # Reused: no hints needed the second time, and verbose says so.
    again = weightbridge.adapt(theirs, mine, cache=str(path), verbose=True)
    assert "reused the plan" in capsys.readouterr().err
    block = lambda t: t["load_prefix"]["encode"]["stage3"]["block6"]["reduce"]["linear"]["w"]  # noqa: E731
    np.testing.assert_array_equal(block(first), block(again))
    # A relative cache path lands next to the calling module (this test file).
    rel = "test_adapt_cache.json"
    import pathlib

    here = pathlib.Path(__file__).parent / rel
    try:
        weightbridge.adapt(theirs, mine, hints=[("reduce", "conv1")], cache=rel)
        assert here.exists()
    finally:
        here.unlink(missing_ok=True)


def test_verbose_prints_steps_and_the_mapping_table(capsys) -> None:
    theirs = {"fc.weight": np.ones((3, 2), np.float32), "fc.bias": np.zeros(3, np.float32)}
    mine = {"Dense_0": {"kernel": np.zeros((2, 3), np.float32), "bias": np.zeros(3, np.float32)}}
    weightbridge.adapt(theirs, mine, verbose=True)
    err = capsys.readouterr().err
    assert "source layout: pytorch; target layout: flax" in err
    assert "Dense_0/kernel" in err and "fc.weight" in err and "permute(1,0)" in err


def test_theirs_may_be_a_checkpoint_path(tmp_path) -> None:
    rng = np.random.default_rng(1)
    weights = {
        "fc.weight": rng.standard_normal((3, 2)).astype(np.float32),
        "fc.bias": np.ones(3, np.float32),
    }
    write_checkpoint(str(tmp_path / "theirs.safetensors"), weights)
    mine = {"Dense_0": {"kernel": np.zeros((2, 3), np.float32), "bias": np.zeros(3, np.float32)}}
    out = weightbridge.adapt(str(tmp_path / "theirs.safetensors"), mine)
    np.testing.assert_array_equal(out["Dense_0"]["kernel"], weights["fc.weight"].T)
    assert isinstance(out["Dense_0"]["kernel"], np.ndarray)


@pytest.mark.torch
def test_use_bias_mismatch_is_named() -> None:
    import torch

    theirs = torch.nn.Sequential(torch.nn.Linear(4, 3, bias=True)).state_dict()
    mine = {"Dense_0": {"kernel": np.zeros((4, 3), np.float32)}}
    with pytest.raises(MatchError, match="use_bias differs"):
        weightbridge.adapt(theirs, mine)


@pytest.mark.torch
def test_torch_meta_target_comes_back_as_real_tensors() -> None:
    import torch

    src = torch.nn.Linear(4, 3)
    with torch.device("meta"):
        target = torch.nn.Linear(4, 3)
    out = weightbridge.adapt(src.state_dict(), target.state_dict())
    assert out["weight"].device.type == "cpu" and torch.equal(out["weight"], src.weight.detach())


def test_numbered_sequentials_inside_sequentials_keep_their_levels() -> None:
    # torchvision MobileNetV2 nests conv.0.0 / conv.0.1 (conv, bn) and conv.1.0 / conv.1.1;
    # timm names the same layers conv_pw, bn1, conv_dw, bn2 in one flat block. "0.0" is two
    # levels, not a Keras-style repeated layer name, or the BatchNorms swap silently.
    rng = np.random.default_rng(5)
    theirs: dict[str, np.ndarray] = {}
    for i, conv_shape in ((0, (96, 16, 1, 1)), (1, (96, 1, 3, 3))):
        theirs[f"features.2.conv.{i}.0.weight"] = rng.standard_normal(conv_shape).astype(np.float32)
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            theirs[f"features.2.conv.{i}.1.{leaf}"] = rng.standard_normal(96).astype(np.float32)
    mine = {
        "blocks.1.0.conv_pw.weight": np.zeros((96, 16, 1, 1), np.float32),
        "blocks.1.0.conv_dw.weight": np.zeros((96, 1, 3, 3), np.float32),
    }
    for bn in ("bn1", "bn2"):
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            mine[f"blocks.1.0.{bn}.{leaf}"] = np.zeros(96, np.float32)
    out = weightbridge.adapt(theirs, mine)
    np.testing.assert_array_equal(
        out["blocks.1.0.bn1.weight"], theirs["features.2.conv.0.1.weight"]
    )
    np.testing.assert_array_equal(
        out["blocks.1.0.bn2.running_var"], theirs["features.2.conv.1.1.running_var"]
    )
