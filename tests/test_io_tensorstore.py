"""tensorstore format module: zarr / zarr3 / OCDBT / orbax reading, and writing through a kvstore.

Reference libraries are the oracles: tensorstore writes the zarr arrays we read, orbax writes the
checkpoints we read and restores the ones we write. The cloud tests run moto's S3 server on
127.0.0.1 (the bucket is created first with boto3: tensorstore retries a missing bucket until its
deadline), convert into it, kill a conversion with SIGKILL and resume it.

Tests needing orbax/jax or moto/boto3 skip when those are absent (CI installs
``orbax-checkpoint jax flax 'moto[server]' boto3``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from helpers import moto_s3

import weightbridge.io._kvstore as wkv
import weightbridge.io._zarr3 as wz3
from weightbridge import api
from weightbridge.errors import ConversionError, FormatError
from weightbridge.io import detect_format, open_reader, write_checkpoint, writer_class
from weightbridge.io._kvstore import kvstore_spec
from weightbridge.io.zarr import TensorstoreReader
from weightbridge.spec import TensorSpec
from weightbridge.streaming.dest.object_store import TensorstoreDestination

ts = pytest.importorskip("tensorstore")

BUCKET = "weightbridge-test"
# Every wait in these tests is bounded: tensorstore operations, the child process, polling.
OP_TIMEOUT = 20.0
CHILD_TIMEOUT = 60.0


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "encoder/layer_0/kernel": rng.standard_normal((37, 16)).astype(np.float32),
        "encoder/layer_0/bias": rng.standard_normal(16).astype(ml_dtypes.bfloat16),
        "embed/table": rng.integers(-9, 9, (11, 3, 2)).astype(np.int32),
        "head/scale": np.array(1.25, np.float16),
        "mask": np.array([True, False, True]),
    }


def _flat(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for k, v in tree.items():
        name = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flat(v, name))
        else:
            out[name] = np.asarray(v)
    return out


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for name, v in flat.items():
        node = root
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return root


def _assert_same(got: np.ndarray, want: np.ndarray, name: str = "") -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype, name
    assert got.shape == want.shape, name
    assert got.tobytes() == want.tobytes(), name


def _assert_reader_has(reader: Any, want: dict[str, np.ndarray]) -> None:
    specs = reader.specs()
    assert sorted(specs.names) == sorted(want)
    for name, a in want.items():
        _assert_same(reader.read(name), a, name)


# ------------------------------------------------------------------------------------------------
# Reading what tensorstore writes


def _ts_write(root: str, name: str, a: np.ndarray, driver: str, kvstore: Any = None) -> None:
    kv = kvstore or {"driver": "file", "path": f"{root}/{name}/"}
    spec: dict[str, Any] = {"driver": driver, "kvstore": kv}
    chunks = [max(1, min(d, 5)) for d in a.shape]
    t = ts.open(
        spec,
        create=True,
        dtype=ts.dtype(a.dtype),
        shape=list(a.shape),
        chunk_layout=ts.ChunkLayout(chunk_shape=chunks) if a.ndim else None,
    ).result(timeout=OP_TIMEOUT)
    t.write(a).result(timeout=OP_TIMEOUT)


@pytest.mark.parametrize("driver", ["zarr", "zarr3"])
def test_reads_zarr_arrays_written_by_tensorstore(tmp_path: Any, driver: str) -> None:
    want = _arrays()
    for name, a in want.items():
        _ts_write(str(tmp_path), name, a, driver)
    with TensorstoreReader(str(tmp_path)) as r:
        assert r.layout == "zarr"
        _assert_reader_has(r, want)
        assert r.byte_range("mask") is None
        assert (
            str(tmp_path / "mask" / ("zarr.json" if driver == "zarr3" else ".zarray")) in r.files()
        )
    assert detect_format(tmp_path) == "tensorstore"
    with open_reader(tmp_path) as r:
        _assert_reader_has(r, want)


def test_reads_one_array_directory_through_the_registry(tmp_path: Any) -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    _ts_write(str(tmp_path), "w", a, "zarr3")
    # The registry stands a directory with one file for that file (here zarr.json).
    with open_reader(tmp_path / "w") as r:
        _assert_reader_has(r, {"w": a})


def test_reads_zarr3_arrays_inside_ocdbt(tmp_path: Any) -> None:
    want = _arrays()
    base = {"driver": "file", "path": f"{tmp_path}/"}
    for name, a in want.items():
        _ts_write("", name, a, "zarr3", {"driver": "ocdbt", "base": base, "path": f"{name}/"})
    # A group node too (zarr-python writes them): it is not an array.
    kv = ts.KvStore.open({"driver": "ocdbt", "base": base}).result(timeout=OP_TIMEOUT)
    group = {"zarr_format": 3, "node_type": "group", "attributes": {}}
    kv.write("encoder/zarr.json", json.dumps(group)).result(timeout=OP_TIMEOUT)
    assert (tmp_path / "manifest.ocdbt").exists()
    with TensorstoreReader(f"file://{tmp_path}") as r:
        assert r.layout == "zarr-ocdbt"
        _assert_reader_has(r, want)


def test_reads_from_memory_url() -> None:
    ctx = wkv.ts_context()
    a = np.arange(10, dtype=np.int64)
    t = ts.open(
        {"driver": "zarr3", "kvstore": "memory://readtest/a/b/"},
        create=True,
        dtype=ts.int64,
        shape=[10],
        context=ctx,
    ).result(timeout=OP_TIMEOUT)
    t.write(a).result(timeout=OP_TIMEOUT)
    with TensorstoreReader("memory://readtest") as r:
        _assert_reader_has(r, {"a/b": a})


def test_errors_name_the_location(tmp_path: Any) -> None:
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(FormatError, match="no orbax checkpoint"):
        TensorstoreReader(str(tmp_path))
    (tmp_path / "_METADATA").write_text("{}")
    with pytest.raises(FormatError, match="tree_metadata"):
        TensorstoreReader(str(tmp_path))
    with pytest.raises(FormatError, match="unsupported URL scheme 'http'"):
        TensorstoreReader("http://example.com/x")


# ------------------------------------------------------------------------------------------------
# Reading what orbax writes


@pytest.fixture(scope="module")
def ocp() -> Any:
    pytest.importorskip("jax")
    return pytest.importorskip("orbax.checkpoint")


def _flax_params() -> dict[str, Any]:
    """A Flax model's params (a real Flax init), one leaf cast to bf16, plus a list branch."""
    jax = pytest.importorskip("jax")
    nn = pytest.importorskip("flax.linen")
    import jax.numpy as jnp

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            x = nn.Embed(13, 8)(x)
            x = nn.Dense(6)(x)
            return nn.LayerNorm()(x)

    params = MLP().init(jax.random.PRNGKey(0), jnp.zeros((2,), jnp.int32))
    params = jax.tree.map(lambda a: a, params)
    params["params"]["Dense_0"]["kernel"] = params["params"]["Dense_0"]["kernel"].astype(
        jnp.bfloat16
    )
    params["stats"] = [jnp.arange(4, dtype=jnp.int32), jnp.ones((2, 2), jnp.float16)]
    return dict(params)


def _leaves(tree: Any) -> dict[str, np.ndarray]:
    import jax

    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        out["/".join(keys)] = np.asarray(leaf)
    return out


@pytest.mark.jax
def test_reads_standard_checkpointer_output(tmp_path: Any, ocp: Any) -> None:
    params = _flax_params()
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "ckpt", params)
    ckpt.wait_until_finished()
    want = _leaves(params)
    assert want["params/Dense_0/kernel"].dtype == ml_dtypes.bfloat16
    assert (tmp_path / "ckpt" / "manifest.ocdbt").exists()  # the default: OCDBT
    with open_reader(tmp_path / "ckpt") as r:
        assert r.layout == "orbax-ocdbt"
        _assert_reader_has(r, want)
    with open_reader(tmp_path / "ckpt" / "_METADATA") as r:
        assert sorted(r.specs().names) == sorted(want)


@pytest.mark.jax
@pytest.mark.parametrize("use_ocdbt", [True, False])
@pytest.mark.parametrize("use_zarr3", [True, False])
def test_reads_pytree_checkpointer_variants(
    tmp_path: Any, ocp: Any, use_ocdbt: bool, use_zarr3: bool
) -> None:
    params = _flax_params()
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt, use_zarr3=use_zarr3)
    ocp.Checkpointer(handler).save(tmp_path / "c", args=ocp.args.PyTreeSave(params))
    with TensorstoreReader(tmp_path / "c") as r:
        assert r.layout == ("orbax-ocdbt" if use_ocdbt else "orbax")
        _assert_reader_has(r, _leaves(params))


@pytest.mark.jax
def test_reads_checkpoint_manager_root_and_step(tmp_path: Any, ocp: Any) -> None:
    import jax.numpy as jnp

    mgr = ocp.CheckpointManager(tmp_path / "run")
    for step in (1, 4):
        mgr.save(step, args=ocp.args.StandardSave({"w": jnp.full((3,), step, jnp.float32)}))
    mgr.wait_until_finished()
    mgr.close()
    with open_reader(tmp_path / "run") as r:  # the root: the highest step
        _assert_same(r.read("w"), np.full((3,), 4, np.float32))
    with TensorstoreReader(tmp_path / "run", step=1) as r:
        _assert_same(r.read("w"), np.full((3,), 1, np.float32))
    with open_reader(tmp_path / "run" / "4") as r:  # a step directory with its item
        assert list(r.specs().names) == ["w"]
    with pytest.raises(FormatError, match="no checkpoint step 2"):
        TensorstoreReader(tmp_path / "run", step=2)


# ------------------------------------------------------------------------------------------------
# Writing zarr / orbax


def _source(tmp_path: Any, arrays: dict[str, np.ndarray] | None = None) -> str:
    path = str(tmp_path / "src.safetensors")
    write_checkpoint(path, arrays if arrays is not None else _arrays())
    return path


@pytest.mark.jax
def test_convert_to_orbax_restores_with_orbax(tmp_path: Any, ocp: Any) -> None:
    import jax

    want = _arrays()
    src = _source(tmp_path, want)
    out = str(tmp_path / "out")
    report = api.convert(src, TensorstoreDestination(out), format="orbax", max_shard_size=400)
    assert len(report.written) > 1
    restored = ocp.StandardCheckpointer().restore(out)
    got = _flat(restored)
    assert sorted(got) == sorted(want)
    for name, a in want.items():
        _assert_same(got[name], a, name)
    # With an abstract target orbax places jax arrays where the target says.
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    target = _nest(
        {k: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu) for k, a in want.items()}
    )
    placed = ocp.StandardCheckpointer().restore(out, target)
    assert isinstance(placed["encoder"]["layer_0"]["kernel"], jax.Array)
    assert api.verify(src, TensorstoreDestination(out)) == len(want)
    # Our own reader reads it back, through the registry too.
    with open_reader(out) as r:
        assert r.layout == "orbax"
        _assert_reader_has(r, want)


@pytest.mark.jax
def test_convert_to_orbax_checkpoint_manager_step(tmp_path: Any, ocp: Any) -> None:
    want = _arrays()
    src = _source(tmp_path, want)
    api.convert(src, TensorstoreDestination(tmp_path / "run", step=7), format="orbax")
    mgr = ocp.CheckpointManager(tmp_path / "run")
    assert mgr.all_steps() == [7]
    got = _flat(mgr.restore(7))  # no args: the step's _CHECKPOINT_METADATA names the handler
    for name, a in want.items():
        _assert_same(got[name], a, name)
    mgr.close()


def test_convert_to_zarr_local(tmp_path: Any) -> None:
    want = _arrays()
    src = _source(tmp_path, want)
    out = tmp_path / "out"
    api.convert(src, TensorstoreDestination(out), format="zarr", max_shard_size=300)
    root = json.loads((out / "zarr.json").read_text())
    assert root["node_type"] == "group"
    # tensorstore itself opens each array; chunks are uncompressed rows along axis 0.
    for name, a in want.items():
        t = ts.open({"driver": "zarr3", "kvstore": f"file://{out}/{name}/"}).result(
            timeout=OP_TIMEOUT
        )
        _assert_same(t.read().result(timeout=OP_TIMEOUT), a, name)
    meta = json.loads((out / "encoder/layer_0/kernel/zarr.json").read_text())
    assert meta["codecs"] == [{"configuration": {"endian": "little"}, "name": "bytes"}]
    assert not list(out.glob("*.shard"))  # shard records are hidden state, not checkpoint files
    assert api.verify(src, TensorstoreDestination(out)) == len(want)


@pytest.mark.parametrize("format", ["zarr", "orbax"])
def test_array_formats_keep_every_dtype_and_shape(tmp_path: Any, format: str) -> None:
    want = {
        "a/empty": np.zeros((0, 4), np.float32),
        "a/f8": np.arange(6).astype(ml_dtypes.float8_e5m2),
        "a/f8e4": np.arange(6).astype(ml_dtypes.float8_e4m3fn),
        "a/c64": (np.arange(3) + 1j).astype(np.complex64),
        "a/u16": np.arange(5, dtype=np.uint16),
        "b": np.array(7, np.int64),
    }
    out = tmp_path / "o"
    api.convert(_source(tmp_path, want), TensorstoreDestination(out), format=format)
    with TensorstoreReader(out) as r:
        _assert_reader_has(r, want)


def test_chunks_are_written_whole_from_ragged_tiles(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(wz3, "CHUNK_BYTES", 4 * 8 * 4)  # 4 rows of 8 float32 per chunk
    dest = TensorstoreDestination(tmp_path / "o")
    dest.prepare()
    a = np.arange(23 * 8, dtype=np.float32).reshape(23, 8)
    spec = TensorSpec("w", a.shape, "F32")
    puts: list[tuple[int, int]] = []
    real_put = wz3.ArrayWriter._put

    def spy(self: Any, start: int, block: np.ndarray) -> None:
        puts.append((start, block.shape[0]))
        real_put(self, start, block)

    monkeypatch.setattr(wz3.ArrayWriter, "_put", spy)
    sink = dest.open_shard("model.shard", "zarr", [spec], None)
    for r0, n in [(0, 3), (3, 3), (6, 9), (15, 1), (16, 7)]:
        sink.writer.write("w", a[r0 : r0 + n], r0)
    assert sink.commit() == a.nbytes
    # Every write starts on a chunk boundary; only the last chunk is short.
    assert all(start % 4 == 0 for start, _ in puts)
    assert sum(n for _, n in puts) == 23
    t = ts.open({"driver": "zarr3", "kvstore": f"file://{tmp_path}/o/w/"}).result(
        timeout=OP_TIMEOUT
    )
    assert t.chunk_layout.read_chunk.shape == (4, 8)
    _assert_same(t.read().result(timeout=OP_TIMEOUT), a)


def test_uncommitted_shard_is_invisible_and_cleaned_up(tmp_path: Any) -> None:
    out = tmp_path / "o"
    dest = TensorstoreDestination(out)
    dest.prepare()
    specs = [TensorSpec("a", (4,), "F32"), TensorSpec("b", (2,), "F32")]
    sink = dest.open_shard("model.shard", "orbax", specs, None)
    sink.writer.write("a", np.ones(4, np.float32), 0)
    # Killed here: no record, so not committed; a rerun's remove_temporaries deletes the arrays.
    assert not dest.exists("model.shard") and dest.size("model.shard") is None
    assert (out / "a" / "zarr.json").exists()
    TensorstoreDestination(out).remove_temporaries()
    assert not (out / "a").exists()
    assert not (out / "_METADATA").exists()


def test_orbax_metadata_only_when_complete(tmp_path: Any) -> None:
    src = _source(tmp_path)
    out = tmp_path / "o"
    api.convert(src, TensorstoreDestination(out), format="orbax", max_shard_size=300)
    assert (out / "_METADATA").exists() and (out / "_CHECKPOINT_METADATA").exists()
    first = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # A conversion (re)starting here removes the files that say "complete" first.
    journal = json.loads((out / ".weightbridge-journal.json").read_text())
    TensorstoreDestination(out).start(journal["outputs"])
    assert not (out / "_METADATA").exists() and not (out / "commit_success.txt").exists()
    assert not (out / "_CHECKPOINT_METADATA").exists()
    # Converting again yields the same bytes.
    api.convert(src, TensorstoreDestination(out), format="orbax", max_shard_size=300)
    again = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert again == first


def test_refuses_names_that_cannot_be_arrays(tmp_path: Any) -> None:
    dest = TensorstoreDestination(tmp_path / "o")
    dest.prepare()
    with pytest.raises(ConversionError, match="inside the array of tensor 'a'"):
        dest.open_shard(
            "m.shard", "zarr", [TensorSpec("a", (1,), "F32"), TensorSpec("a/b", (1,), "F32")], None
        )
    with pytest.raises(FormatError, match="must not start with"):
        dest.open_shard("m.shard", "zarr", [TensorSpec("x/../y", (1,), "F32")], None)
    with pytest.raises(ConversionError, match="both be stored as array 'a.b'"):
        dest.open_shard(
            "m.shard",
            "orbax",
            [TensorSpec("a/b", (1,), "F32"), TensorSpec("a.b", (1,), "F32")],
            None,
        )


def test_registered_writer_refuses_a_file_path(tmp_path: Any) -> None:
    assert writer_class("orbax").suffix == ".shard"  # type: ignore[attr-defined]
    with pytest.raises(FormatError, match="TensorstoreDestination"):
        writer_class("zarr")(str(tmp_path / "x"), [TensorSpec("a", (1,), "F32")], None)


@pytest.mark.parametrize("format", ["safetensors", "zarr"])
def test_memory_destination_round_trip(tmp_path: Any, format: str) -> None:
    want = _arrays()
    src = _source(tmp_path, want)
    url = f"memory://conv-{format}"
    report = api.convert(src, url, format=format, max_shard_size=300)
    assert len(report.written) > 1
    assert api.verify(src, url) == len(want)
    with TensorstoreDestination(url).open_reader() as r:
        _assert_reader_has(r, want)
    again = api.convert(src, url, format=format, max_shard_size=300)
    assert again.written == [] and len(again.skipped) == len(report.written)


def test_kvstore_spec_from_urls(monkeypatch: Any, tmp_path: Any) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.setenv(wkv.ENDPOINT_ENV, "http://127.0.0.1:9")
    assert kvstore_spec("s3://bkt/a/b") == {
        "driver": "s3",
        "bucket": "bkt",
        "path": "a/b/",
        "endpoint": "http://127.0.0.1:9",
        "aws_region": "us-east-1",
    }
    assert kvstore_spec("gs://bkt/x/")["driver"] == "gcs"
    assert kvstore_spec(f"file://{tmp_path}") == {"driver": "file", "path": f"{tmp_path}/"}
    assert kvstore_spec(str(tmp_path))["path"] == f"{tmp_path}/"
    with pytest.raises(FormatError, match="no bucket name"):
        kvstore_spec("s3:///x")


# ------------------------------------------------------------------------------------------------
# S3 (moto's server on 127.0.0.1)


@pytest.fixture(scope="module")
def s3() -> Any:
    pytest.importorskip("moto.server")
    pytest.importorskip("boto3")
    with moto_s3(BUCKET, endpoint_env=wkv.ENDPOINT_ENV, read_timeout=10) as server:
        yield server


def _objects(client: Any, prefix: str) -> dict[str, bytes]:
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix=prefix + "/"
    ):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            out[key[len(prefix) + 1 :]] = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    return out


def _journal_shards(client: Any, prefix: str) -> int:
    """Shards committed and recorded: each has its own record (the journal is written at the
    start and the end of a conversion only)."""
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/.weightbridge/committed/")
    return int(listed.get("KeyCount", 0))


def _s3_dest(endpoint: str, prefix: str) -> TensorstoreDestination:
    return TensorstoreDestination(f"s3://{BUCKET}/{prefix}", endpoint=endpoint, timeout=OP_TIMEOUT)


def test_s3_convert_safetensors_and_read_back(tmp_path: Any, s3: Any) -> None:
    endpoint, client = s3
    want = _arrays()
    src = _source(tmp_path, want)
    dest = _s3_dest(endpoint, "st")
    report = api.convert(src, dest, format="safetensors", max_shard_size=300)
    objects = _objects(client, "st")
    assert "model.safetensors.index.json" in objects
    assert all(n in objects for n in report.shards)
    # The uploaded shards are byte-identical to a local conversion.
    api.convert(src, tmp_path / "local", max_shard_size=300)
    for n in report.shards:
        assert objects[n] == (tmp_path / "local" / n).read_bytes()
    assert api.verify(src, dest) == len(want)
    assert dest.size(report.shards[0]) == len(objects[report.shards[0]])


@pytest.mark.jax
def test_s3_orbax_output_restores(tmp_path: Any, s3: Any, ocp: Any) -> None:
    endpoint, client = s3
    want = _arrays()
    src = _source(tmp_path, want)
    api.convert(src, _s3_dest(endpoint, "ox"), format="orbax", max_shard_size=300)
    with TensorstoreReader(f"s3://{BUCKET}/ox", endpoint=endpoint, timeout=OP_TIMEOUT) as r:
        assert r.layout == "orbax"
        _assert_reader_has(r, want)
    # orbax 0.12 reads only local paths and gs:// (its tensorstore specs use the file driver
    # and etils.epath needs s3fs for s3://), so restore a byte-for-byte copy of the objects.
    local = tmp_path / "copy"
    for key, data in _objects(client, "ox").items():
        (local / key).parent.mkdir(parents=True, exist_ok=True)
        (local / key).write_bytes(data)
    got = _flat(ocp.StandardCheckpointer().restore(local))
    for name, a in want.items():
        _assert_same(got[name], a, name)


def test_s3_missing_bucket_fails_within_the_deadline(tmp_path: Any, s3: Any) -> None:
    endpoint, _ = s3
    dest = TensorstoreDestination("s3://no-such-bucket-here/x", endpoint=endpoint, timeout=2)
    started = time.monotonic()
    with pytest.raises(ConversionError, match="no-such-bucket-here.*NoSuchBucket"):
        dest.prepare()
    assert time.monotonic() - started < 15


_CHILD = textwrap.dedent(
    """
    import sys, time
    import weightbridge.io._zarr3 as wz3
    import weightbridge.streaming.dest.object_store as wos
    from weightbridge import api

    # Slow each upload down so the parent can kill this process between shards and mid-shard.
    put, commit = wz3.ArrayWriter._put, wos._ByteSink.commit
    def slow_put(self, start, block):
        time.sleep(0.04)
        put(self, start, block)
    def slow_commit(self):
        time.sleep(0.15)
        return commit(self)
    wz3.ArrayWriter._put, wos._ByteSink.commit = slow_put, slow_commit
    api.convert(sys.argv[1], sys.argv[2], format=sys.argv[3], max_shard_size=int(sys.argv[4]))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("format", ["orbax", "safetensors"])
def test_s3_kill_and_resume_is_byte_identical(tmp_path: Any, s3: Any, format: str) -> None:
    endpoint, client = s3
    rng = np.random.default_rng(3)
    arrays = {f"layers/{i}/w": rng.standard_normal((64, 128)).astype(np.float32) for i in range(16)}
    src = _source(tmp_path, arrays)
    shard_bytes = 3 * 64 * 128 * 4  # three tensors per shard: six shards
    api.convert(
        src, _s3_dest(endpoint, f"clean-{format}"), format=format, max_shard_size=shard_bytes
    )
    clean = _objects(client, f"clean-{format}")

    prefix = f"killed-{format}"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, src, f"s3://{BUCKET}/{prefix}", format, str(shard_bytes)],
        env=os.environ.copy(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + CHILD_TIMEOUT
        while time.monotonic() < deadline and child.poll() is None:
            if _journal_shards(client, prefix) >= 1:  # a shard is committed and recorded
                break
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        _, err = child.communicate(timeout=CHILD_TIMEOUT)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=CHILD_TIMEOUT)
    assert child.returncode == -signal.SIGKILL, err.decode()[-2000:]
    partial = _objects(client, prefix)
    assert "_METADATA" not in partial and "model.safetensors.index.json" not in partial
    assert json.loads(partial[".weightbridge-journal.json"])["complete"] is False

    report = api.convert(src, _s3_dest(endpoint, prefix), format=format, max_shard_size=shard_bytes)
    assert report.skipped and report.written  # resumed: some shards kept, the rest written
    resumed = _objects(client, prefix)
    assert sorted(resumed) == sorted(clean)
    for key in clean:
        assert resumed[key] == clean[key], key


def test_docstring_examples() -> None:
    import doctest

    for module in (wkv, wz3):
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.attempted > 0 and result.failed == 0, module.__name__
