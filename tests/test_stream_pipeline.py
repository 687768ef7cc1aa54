"""The pieces of the streaming pipeline: tile CRCs joined in order, the random-access writer,
the read-ahead thread, and commits that overlap the next shard."""

from __future__ import annotations

import errno
import json
import os
import random
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given, settings
from hypothesis import strategies as st

from weightbridge import api, dtypes
from weightbridge.errors import ConversionError, FormatError
from weightbridge.io import write_checkpoint
from weightbridge.io.base import ByteRange
from weightbridge.io.safetensors import SafetensorsWriter
from weightbridge.spec import TensorSpec
from weightbridge.streaming import convert as stream
from weightbridge.streaming import pipeline
from weightbridge.streaming.checksum import Checksum, crc32_combine
from weightbridge.streaming.readahead import Readahead


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_joined_crcs_equal_the_crc_of_the_whole(blocks: list[bytes]) -> None:
    joined = Checksum()
    for b in blocks:
        joined.combine(zlib.crc32(b), len(b))
    whole = Checksum()
    whole.update(b"".join(blocks))
    assert joined.hexdigest() == whole.hexdigest()


def test_crc32_combine_across_large_lengths() -> None:
    a, b = os.urandom(1 << 20), os.urandom(3 << 20)
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "a": rng.standard_normal((37, 5)).astype(np.float32),
        "empty": np.zeros((0, 4), np.float32),
        "b": rng.integers(0, 1 << 15, (300, 17)).astype(np.int16),
        "scalar": np.array(3.5, np.float64),
        "c": rng.standard_normal(1001).astype(np.float16),
    }


def test_random_access_writer_matches_in_order_bytes(tmp_path) -> None:
    tensors = _tensors()
    specs = [TensorSpec(n, a.shape, dtypes.from_numpy(a.dtype)) for n, a in tensors.items()]
    meta = {"format": "pt"}
    ordered = SafetensorsWriter(str(tmp_path / "ordered.safetensors"), specs, meta)
    for n, a in tensors.items():
        ordered.write(n, a, 0)
    ordered.close()

    shuffled = SafetensorsWriter(str(tmp_path / "random.safetensors"), specs, meta)
    jobs = [(n, r) for n, a in tensors.items() for r in range(max(1, a.shape[0] if a.ndim else 1))]
    random.Random(1).shuffle(jobs)

    def place(job: tuple[str, int]) -> None:
        name, row = job
        out = shuffled.target_array(name)
        if out.ndim == 0:
            out[...] = tensors[name]
        elif out.shape[0]:
            out[row] = tensors[name][row]

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(place, jobs))
    shuffled.close()
    assert (tmp_path / "random.safetensors").read_bytes() == (
        tmp_path / "ordered.safetensors"
    ).read_bytes()
    loaded = safetensors.numpy.load_file(str(tmp_path / "random.safetensors"))
    for n, a in tensors.items():
        np.testing.assert_array_equal(loaded[n], a)


def test_random_access_writer_refuses_to_close_incomplete(tmp_path) -> None:
    specs = [TensorSpec("a", (4,), "F32"), TensorSpec("b", (4,), "F32")]
    w = SafetensorsWriter(str(tmp_path / "x.safetensors"), specs)
    w.target_array("a")[:] = 1
    with pytest.raises(FormatError, match=r"closing before tensors \['b'\]"):
        w.close()
    w.abort()


def test_random_access_and_in_order_writes_do_not_mix(tmp_path) -> None:
    specs = [TensorSpec("a", (4,), "F32"), TensorSpec("b", (4,), "F32")]
    w = SafetensorsWriter(str(tmp_path / "x.safetensors"), specs)
    w.write("a", np.ones(4, np.float32), 0)
    with pytest.raises(FormatError, match="random access after in-order writes"):
        w.target_array("b")
    w.abort()
    w = SafetensorsWriter(str(tmp_path / "y.safetensors"), specs)
    w.target_array("a")
    with pytest.raises(FormatError, match="in-order write of 'b' after random access"):
        w.write("b", np.ones(4, np.float32), 0)
    w.abort()


def test_copy_at_places_raw_bytes(tmp_path) -> None:
    src = tmp_path / "raw.bin"
    payload = np.arange(64, dtype=np.float32)
    src.write_bytes(b"x" * 13 + payload.tobytes())
    specs = [TensorSpec("first", (3,), "F32"), TensorSpec("p", (64,), "F32")]
    w = SafetensorsWriter(str(tmp_path / "o.safetensors"), specs)
    assert w.copy_at("p", ByteRange(str(src), 13, payload.nbytes))
    w.target_array("first")[:] = [1, 2, 3]
    w.close()
    got = safetensors.numpy.load_file(str(tmp_path / "o.safetensors"))
    np.testing.assert_array_equal(got["p"], payload)
    np.testing.assert_array_equal(got["first"], [1, 2, 3])


def test_readahead_stays_within_its_budget_and_stops(tmp_path) -> None:
    f = tmp_path / "data.bin"
    f.write_bytes(os.urandom(4 << 20))
    ranges = [ByteRange(str(f), i << 20, 1 << 20) for i in range(4)]
    ahead = Readahead(ranges, budget=1 << 20)
    time.sleep(0.2)
    # One chunk within the budget, then it waits for consumption: still alive.
    assert ahead._thread.is_alive()
    for r in ranges:
        ahead.consumed([r])
    ahead.settle()
    ahead.close()
    assert not ahead._thread.is_alive()
    # Closing a waiting thread returns at once.
    waiting = Readahead(ranges, budget=1)
    started = time.perf_counter()
    waiting.close()
    assert time.perf_counter() - started < 2


@pytest.fixture
def dropped(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    """Every fadvise(DONTNEED) from now on, as (real path, offset, length); advice still given."""
    calls: list[tuple[str, int, int]] = []
    real = os.posix_fadvise

    def record(fd: int, offset: int, length: int, advice: int) -> None:
        if advice == os.POSIX_FADV_DONTNEED:
            calls.append((os.readlink(f"/proc/self/fd/{fd}"), offset, length))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", record)
    return calls


def test_readahead_drops_a_range_after_its_last_use(tmp_path, dropped) -> None:
    f = tmp_path / "data.bin"
    f.write_bytes(os.urandom(3 << 20))
    a, b, c = (ByteRange(str(f), i << 20, 1 << 20) for i in range(3))
    path = os.path.realpath(f)
    # `b` is used twice (a fused tensor split into two steps): cached until its second use.
    with Readahead([a, b, b, c]) as ahead:
        ahead.consumed([a, b])
        ahead.settle()
        assert dropped == [(path, a.offset, a.length)]
        ahead.consumed([b])
        ahead.settle()
        assert dropped == [(path, a.offset, a.length), (path, b.offset, b.length)]
        ahead.consumed([c])
    assert dropped[-1] == (path, c.offset, c.length)  # dropped by close, if not before
    dropped.clear()
    with Readahead([a], drop_behind=False) as ahead:
        ahead.consumed([a])
    assert dropped == []


def test_readahead_ignores_what_it_cannot_read(tmp_path) -> None:
    ranges = [ByteRange(str(tmp_path / "missing.bin"), 0, 100)]
    with Readahead(ranges) as ahead:
        ahead._thread.join(60)  # a missing file ends the thread (a bound for a hang only)
        assert not ahead._thread.is_alive()
    short = tmp_path / "short.bin"
    short.write_bytes(b"1234")
    with Readahead([ByteRange(str(short), 0, 1 << 20)]) as ahead:
        ahead.consumed([ByteRange(str(short), 0, 1 << 20)])
        ahead.settle()
    assert not ahead._thread.is_alive()


def _source(tmp_path) -> tuple[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    tensors = {
        f"layers.{i}.weight": rng.standard_normal((64, 48)).astype(np.float32) for i in range(6)
    }
    src = str(tmp_path / "src.safetensors")
    write_checkpoint(src, tensors)
    return src, tensors


def test_commits_overlap_the_next_shard_and_keep_file_order(tmp_path, monkeypatch) -> None:
    """A slow commit does not stop the next shard from being produced, and the journal records
    every shard once its commit is done."""
    src, tensors = _source(tmp_path)
    events: list[str] = []
    lock = threading.Lock()
    real_commit, real_fill = stream.commit_shard, stream.fill_shard

    def slow_commit(sink, dest, shard):  # type: ignore[no-untyped-def]
        with lock:
            events.append(f"commit-start {shard.name}")
        time.sleep(0.3)
        size = real_commit(sink, dest, shard)
        with lock:
            events.append(f"commit-end {shard.name}")
        return size

    def fill(*args, **kwargs):  # type: ignore[no-untyped-def]
        with lock:
            events.append(f"fill {args[1].name}")
        return real_fill(*args, **kwargs)

    monkeypatch.setattr(stream, "commit_shard", slow_commit)
    monkeypatch.setattr(stream, "fill_shard", fill)
    out = tmp_path / "out"
    report = api.convert(src, out, max_shard_size="13KB")
    assert len(report.written) == 6
    first, second = report.shards[0], report.shards[1]
    assert events.index(f"fill {second}") < events.index(f"commit-end {first}")
    journal = json.loads((out / ".weightbridge-journal.json").read_text())
    assert sorted(journal["shards"]) == sorted(report.shards) and journal["complete"]
    assert api.verify(src, out) == len(tensors)


def test_a_failed_commit_keeps_the_shards_before_it(tmp_path, monkeypatch) -> None:
    src, tensors = _source(tmp_path)
    real_commit = stream.commit_shard
    calls = []

    def failing(sink, dest, shard):  # type: ignore[no-untyped-def]
        calls.append(shard.name)
        if len(calls) == 3:
            sink.abort()
            raise pipeline.write_error(
                OSError(errno.ENOSPC, "No space left on device"), dest, shard
            )
        return real_commit(sink, dest, shard)

    monkeypatch.setattr(stream, "commit_shard", failing)
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="out of space writing model-00003-of-00006"):
        api.convert(src, out, max_shard_size="13KB")
    names = os.listdir(out)
    assert "model.safetensors.index.json" not in names
    assert not [n for n in names if ".tmp" in n]
    # The shards before the failure are kept; so is a later one whose commit was already
    # under way (COMMITS_IN_FLIGHT) and succeeded. The failed one is redone.
    committed = [c for c in calls if c != calls[2]]
    assert calls[:2] == committed[:2] and len(committed) <= 1 + stream.COMMITS_IN_FLIGHT
    monkeypatch.setattr(stream, "commit_shard", real_commit)
    report = api.convert(src, out, max_shard_size="13KB")
    assert report.skipped == committed
    assert calls[2] in report.written
    assert api.verify(src, out) == len(tensors)


def test_convert_drops_the_source_from_the_cache_unless_told_to_keep_it(tmp_path, dropped) -> None:
    from weightbridge.cli import main

    src, tensors = _source(tmp_path)
    source = os.path.realpath(src)
    assert main(["convert", src, "-o", str(tmp_path / "dropped"), "-q"]) == 0
    paths = [p for p, _, _ in dropped]
    assert paths.count(source) == len(tensors)  # each tensor after its use
    dropped.clear()
    assert main(["convert", src, "-o", str(tmp_path / "kept"), "-q", "--keep-cache"]) == 0
    assert source not in [p for p, _, _ in dropped]
    assert api.verify(src, tmp_path / "kept") == len(tensors)
