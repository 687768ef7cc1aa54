"""The shard index: written and read in one module (`weightbridge.io.sharded`)."""

from __future__ import annotations

import doctest
import json
import os

import pytest

from weightbridge.errors import FormatError
from weightbridge.io import sharded


def test_docstring_examples() -> None:
    result = doctest.testmod(sharded)
    assert result.attempted > 0 and result.failed == 0


def test_write_index_then_read_index_round_trip(tmp_path) -> None:
    path = str(tmp_path / "model.safetensors.index.json")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    sharded.write_index(path, weight_map, 48, {"format": "pt"})
    with open(path, encoding="utf-8") as f:
        text = f.read()
    # Hugging Face's layout, byte for byte: indent 2, a final newline.
    obj = {"metadata": {"total_size": 48, "format": "pt"}, "weight_map": weight_map}
    assert text == json.dumps(obj, indent=2) + "\n"
    assert os.listdir(tmp_path) == [os.path.basename(path)]
    assert sharded.read_index(path) == (weight_map, {"total_size": "48", "format": "pt"})


@pytest.mark.parametrize(
    "body,message",
    [
        ('{"weight_map": {"a": "../x.safetensors"}}', "outside the checkpoint directory"),
        ('{"weight_map": {"a": "other.index.json"}}', "as a shard, but it is an index file"),
        ('{"weight_map": []}', "'weight_map' object"),
        ("{not json", "not valid JSON"),
    ],
)
def test_read_index_refuses_what_no_honest_index_holds(tmp_path, body: str, message: str) -> None:
    path = tmp_path / "model.safetensors.index.json"
    path.write_text(body)
    with pytest.raises(FormatError, match=message):
        sharded.read_index(str(path))
