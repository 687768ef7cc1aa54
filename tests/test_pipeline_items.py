"""The shard pipeline hands typed items between its stages (`weightbridge.streaming.pipeline`):
transformed tiles, byte copies, placed tiles and releases, in file order."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from weightbridge.io import open_reader, write_checkpoint
from weightbridge.ops import Permute
from weightbridge.plan import Step
from weightbridge.planning.shards import Shard, assign_shards, index_name, parse_size
from weightbridge.spec import TensorSpec
from weightbridge.streaming import pipeline
from weightbridge.streaming.pipeline import ByteCopy, Placed, Release, Tile


def _shard(tmp_path: Path) -> tuple[str, Shard, dict[str, np.ndarray]]:
    arrays = {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.arange(5, dtype=np.float32),
    }
    path = str(tmp_path / "src.safetensors")
    write_checkpoint(path, arrays)
    steps = (
        Step(TensorSpec("kernel", (4, 3), "F32"), ("w",), (Permute((1, 0)),)),
        Step(TensorSpec("bias", (5,), "F32"), ("b",)),
    )
    return path, Shard("model.safetensors", steps), arrays


def test_in_order_items_are_tiles_copies_and_releases(tmp_path: Path) -> None:
    path, shard, arrays = _shard(tmp_path)
    with open_reader(path) as reader, ThreadPoolExecutor(2) as pool:
        items = list(pipeline._produce(reader, shard, pool))
    assert [type(i) for i in items] == [Tile, Release, ByteCopy, Release]
    tile, release, copy, _ = items
    assert isinstance(tile, Tile) and tile.name == "kernel" and tile.row == 0
    np.testing.assert_array_equal(tile.data, arrays["w"].T)
    assert isinstance(release, Release) and release.step is shard.steps[0]
    assert isinstance(copy, ByteCopy) and copy.step is shard.steps[1]
    assert copy.source.length == arrays["b"].nbytes


def test_placing_jobs_yield_placed_items(tmp_path: Path) -> None:
    path, shard, _ = _shard(tmp_path)

    def place_tile(part: np.ndarray, target: TensorSpec, row: int, bits: bool) -> Placed:
        return Placed(0, part.nbytes)

    def place_copy(step: Step, source: object, view: np.ndarray) -> Placed:
        return Placed(1, view.nbytes)

    with open_reader(path) as reader, ThreadPoolExecutor(2) as pool:
        items = list(
            pipeline._produce(reader, shard, pool, tile_job=place_tile, copy_job=place_copy)
        )
    assert items == [Placed(0, 48), Release(shard.steps[0]), Placed(1, 20), Release(shard.steps[1])]


def test_shard_layout_is_a_pure_function_of_the_plan_specs() -> None:
    steps = tuple(Step(TensorSpec(f"t{i}", (10,), "F32"), (f"s{i}",)) for i in range(5))

    class _Plan:  # assign_shards reads only the steps
        def __init__(self) -> None:
            self.steps = steps

    shards = assign_shards(_Plan(), suffix=".npz", max_shard_size="100B")  # type: ignore[arg-type]
    assert [s.name for s in shards] == [
        "model-00001-of-00003.npz",
        "model-00002-of-00003.npz",
        "model-00003-of-00003.npz",
    ]
    assert [len(s.steps) for s in shards] == [2, 2, 1]
    assert index_name(".npz") == "model.npz.index.json"
    assert parse_size("1KiB") == 1024
