"""A conversion is complete when the converter says so, once: `Destination.finalize` runs exactly
once per finished conversion (after every shard and the index, before the journal records it
complete) and never for one that failed. Spy destinations count the calls, for a local
directory and for tensorstore destinations (``memory://`` and a local zarr directory)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from weightbridge import api
from weightbridge.errors import ConversionError
from weightbridge.io import write_checkpoint
from weightbridge.streaming import convert as stream
from weightbridge.streaming.dest import Completed, LocalDirectory
from weightbridge.streaming.journal import JOURNAL_NAME, Journal


def _source(tmp_path: Path) -> str:
    rng = np.random.default_rng(3)
    arrays = {f"layer{i}/w": rng.standard_normal((8, 16)).astype(np.float32) for i in range(4)}
    path = str(tmp_path / "src.safetensors")
    write_checkpoint(path, arrays)
    return path


class _Spy:
    """Records, in order, the converter's calls that decide completion."""

    calls: list[str]
    completed: list[Completed]

    def _spy_init(self) -> None:
        self.calls, self.completed = [], []

    def start(self, outputs: Sequence[str]) -> None:
        self.calls.append("start")
        super().start(outputs)  # type: ignore[misc]

    def finalize(self, completed: Completed) -> None:
        self.calls.append("finalize")
        self.completed.append(completed)
        # The journal does not say "complete" before the destination is finalized.
        journal = self.read_json(JOURNAL_NAME)  # type: ignore[attr-defined]
        assert journal is not None and journal["complete"] is False
        super().finalize(completed)  # type: ignore[misc]


class SpyDirectory(_Spy, LocalDirectory):
    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._spy_init()


def _spy_tensorstore(url: str) -> Any:
    pytest.importorskip("tensorstore")
    from weightbridge.streaming.dest.object_store import TensorstoreDestination

    class SpyTensorstore(_Spy, TensorstoreDestination):
        def __init__(self, url: str) -> None:
            super().__init__(url)
            self._spy_init()

    return SpyTensorstore(url)


def _destinations(tmp_path: Path) -> list[tuple[str, Any, str]]:
    """(id, a fresh destination factory, format) for every kind of destination."""
    return [
        ("local", lambda: SpyDirectory(str(tmp_path / "local")), "safetensors"),
        ("memory-zarr", lambda: _spy_tensorstore(f"memory://{uuid.uuid4().hex}"), "zarr"),
        ("local-zarr", lambda: _spy_tensorstore(str(tmp_path / "zarr")), "zarr"),
    ]


@pytest.mark.parametrize("kind", ["local", "memory-zarr", "local-zarr"])
def test_finalize_runs_once_per_conversion(tmp_path: Path, kind: str) -> None:
    src = _source(tmp_path)
    make, fmt = {k: (m, f) for k, m, f in _destinations(tmp_path)}[kind]
    dest = make()
    report = api.convert(src, dest, format=fmt, max_shard_size=1100)  # two tensors a shard
    assert len(report.shards) == 2
    assert dest.calls == ["start", "finalize"]
    (completed,) = dest.completed
    assert completed.outputs[:2] == tuple(report.shards)
    journal = dest.read_json(JOURNAL_NAME)
    assert journal["complete"] is True and list(completed.outputs) == journal["outputs"]

    # A rerun of the same conversion (nothing left to write) is a conversion too: once again.
    again = make() if kind != "memory-zarr" else dest
    again.calls.clear()
    again.completed.clear()
    rerun = api.convert(src, again, format=fmt, max_shard_size=1100)
    assert rerun.skipped == report.shards
    assert again.calls == ["start", "finalize"]


@pytest.mark.parametrize("kind", ["local", "memory-zarr", "local-zarr"])
def test_a_failed_conversion_is_never_finalized(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _source(tmp_path)
    make, fmt = {k: (m, f) for k, m, f in _destinations(tmp_path)}[kind]
    dest = make()
    real_commit = stream.commit_shard
    commits: list[str] = []

    def second_commit_fails(sink: Any, target: Any, shard: Any) -> int:
        commits.append(shard.name)
        if len(commits) == 2:
            sink.abort()
            raise ConversionError(f"{shard.name}: failed on purpose")
        return real_commit(sink, target, shard)

    monkeypatch.setattr(stream, "commit_shard", second_commit_fails)
    with pytest.raises(ConversionError, match="failed on purpose"):
        api.convert(src, dest, format=fmt, max_shard_size=1100)
    assert dest.calls == ["start"]
    assert dest.completed == []
    journal = dest.read_json(JOURNAL_NAME)
    # One shard committed and recorded (by its own record: the journal is written at the start
    # and the end only).
    recorded = Journal.load(dest).recorded(journal["outputs"])  # type: ignore[union-attr]
    assert journal["complete"] is False and len(recorded) == 1
    if kind == "local-zarr":  # nothing says "complete" on disk either
        assert not (tmp_path / "zarr" / "zarr.json").exists()


def test_the_journal_is_not_read_back_to_decide_completion(tmp_path: Path) -> None:
    """Writing a journal that says "complete" finalizes nothing: only the converter does."""
    pytest.importorskip("tensorstore")
    from weightbridge.streaming.dest.object_store import TensorstoreDestination

    dest = _spy_tensorstore(str(tmp_path / "zarr"))
    dest.prepare()
    journal = {"version": 2, "job": "x", "complete": True, "outputs": ["model.shard"]}
    dest.write_json(JOURNAL_NAME, journal)
    assert dest.calls == []
    assert json.loads((tmp_path / "zarr" / JOURNAL_NAME).read_text()) == journal
    assert isinstance(dest, TensorstoreDestination)
