"""Byte-format sources read in place from an object store (moto's S3 server on 127.0.0.1).

Each format is written locally (by weightbridge's writers or the reference libraries), uploaded
with boto3, then inspected, planned, converted and verified from ``s3://`` with an explicit
endpoint (never ``$WEIGHTBRIDGE_S3_ENDPOINT``): the output must be byte-identical to converting
the local file, planning must fetch only headers, and a conversion about each tensor's bytes
once (`weightbridge.io._remote.fetch_stats` counts every ranged GET). An unreachable endpoint
must end in a named error, never a hang (the generous timeouts only catch hangs).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from helpers import moto_s3, serving_ranges
from test_io_dcp import two_rank_checkpoint  # noqa: F401  (a fixture: DCP saved by two ranks)
from test_io_tfcheckpoint import write_bundle

from weightbridge import api
from weightbridge.errors import FormatError, UnknownFormatError
from weightbridge.io import _remote, dcp, detect_format, open_reader, write_checkpoint
from weightbridge.io._kvstore import ENDPOINT_ENV
from weightbridge.io._obstore import StoreUnreachable

pytest.importorskip("moto.server")
pytest.importorskip("boto3")
pytest.importorskip("obstore")

BUCKET = "wb-remote-sources"
# Only catches hangs: every request has its own deadline well inside it.
CHILD_TIMEOUT = 180


@pytest.fixture(scope="module")
def s3() -> Iterator[tuple[str, Any]]:
    # No endpoint in the environment: --endpoint / endpoint= must do it alone.
    with moto_s3(BUCKET, endpoint_env=None, read_timeout=30) as server:
        yield server


def _arrays() -> dict[str, np.ndarray]:
    """Tensors of 0.5-2 MiB (and one tiny), so that headers are a small part of every file."""
    rng = np.random.default_rng(11)
    return {
        "embed.weight": rng.standard_normal((1024, 512)).astype(np.float32),
        "layer.0.attn.weight": rng.standard_normal((512, 512)).astype(np.float32),
        "layer.0.attn.bias": rng.standard_normal(512).astype(np.float32),
        "layer.0.mlp.weight": rng.standard_normal((1024, 512)).astype(ml_dtypes.bfloat16),
        "layer.1.mlp.weight": rng.standard_normal((512, 512)).astype(np.float16),
        "head.weight": rng.integers(-100, 100, (256, 512)).astype(np.int32),
    }


def _upload(client: Any, local: Path, prefix: str) -> str:
    """Upload a file or a directory's files under `prefix`; returns the s3:// URL."""
    if local.is_file():
        client.upload_file(str(local), BUCKET, prefix)
    else:
        for f in sorted(local.rglob("*")):
            if f.is_file():
                client.upload_file(str(f), BUCKET, f"{prefix}/{f.relative_to(local).as_posix()}")
    return f"s3://{BUCKET}/{prefix}"


def _fetched(prefix: str) -> tuple[int, int]:
    """(requests, bytes) of ranged GETs so far for objects under `prefix`."""
    stats = _remote.fetch_stats()
    found = [v for url, v in stats.items() if url.startswith(prefix)]
    return sum(r for r, _ in found), sum(b for _, b in found)


def _stored_bytes(client: Any, prefix: str) -> int:
    key = prefix[len(f"s3://{BUCKET}/") :]
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=key)
    return sum(o["Size"] for page in pages for o in page.get("Contents", []))


def _outputs(out: Path) -> dict[str, bytes]:
    """The converted files of an output directory (weights and index, not plan or journal)."""
    return {
        p.name: p.read_bytes()
        for p in sorted(out.iterdir())
        if p.is_file() and not p.name.startswith(".")
    }


# -- writers: one checkpoint per format, written by weightbridge or the reference library -------


def _write_safetensors(d: Path, arrays: dict[str, np.ndarray]) -> Path:
    from safetensors.numpy import save_file

    path = d / "model.safetensors"
    save_file(arrays, str(path))
    return path


def _write_sharded(d: Path, arrays: dict[str, np.ndarray]) -> Path:
    single = d / "single" / "model.safetensors"
    single.parent.mkdir()
    write_checkpoint(str(single), arrays)
    out = d / "sharded"
    api.convert(str(single), str(out), max_shard_size="1500KB")
    assert (out / "model.safetensors.index.json").exists()
    assert len(list(out.glob("*.safetensors"))) > 2
    return out


def _write_hf_folder(d: Path, arrays: dict[str, np.ndarray]) -> Path:
    folder = d / "hf"
    folder.mkdir()
    write_checkpoint(str(folder / "model.safetensors"), arrays)
    (folder / "config.json").write_text('{"model_type": "toy"}')
    (folder / "tokenizer.json").write_text("{}")
    return folder


def _write_torch_own(d: Path, arrays: dict[str, np.ndarray]) -> Path:
    path = d / "pytorch_model.bin"
    write_checkpoint(str(path), arrays)  # weightbridge's torch.save-compatible writer
    return path


def _write_npz(d: Path, arrays: dict[str, np.ndarray]) -> Path:
    path = d / "weights.npz"
    np.savez(path, **{k: v for k, v in arrays.items() if v.dtype != ml_dtypes.bfloat16})
    return path


def _write_npz_own(d: Path, arrays: dict[str, np.ndarray]) -> Path:
    path = d / "weights.npz"
    write_checkpoint(str(path), arrays)  # records bf16 in the archive comment
    return path


def _write_npy(d: Path, arrays: dict[str, np.ndarray]) -> Path:
    path = d / "embed.npy"
    np.save(path, arrays["embed.weight"])
    return path


def _write_h5py(d: Path, arrays: dict[str, np.ndarray]) -> Path:
    import h5py

    path = d / "tf_model.h5"
    with h5py.File(path, "w") as f:
        for name, a in arrays.items():
            if a.dtype != ml_dtypes.bfloat16:
                f.create_dataset(name.replace(".", "/"), data=a)
        f.create_dataset("chunked/kernel", data=arrays["embed.weight"], chunks=(64, 64))
    return path


def _write_h5_own(d: Path, arrays: dict[str, np.ndarray]) -> Path:
    path = d / "weights.h5"
    write_checkpoint(str(path), arrays)
    return path


def _write_keras(d: Path, arrays: dict[str, np.ndarray]) -> Path:
    """A Keras 3 archive: config beside ``model.weights.h5``, stored uncompressed."""
    weights = d / "model.weights.h5"
    write_checkpoint(str(weights), arrays)
    path = d / "model.keras"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("config.json", '{"class_name": "Sequential"}')
        zf.write(weights, "model.weights.h5")
    weights.unlink()
    return path


def _write_gguf(d: Path, arrays: dict[str, np.ndarray]) -> Path:
    path = d / "model.gguf"
    write_checkpoint(str(path), arrays)
    return path


def _write_msgpack(d: Path, arrays: dict[str, np.ndarray]) -> Path:
    path = d / "flax_model.msgpack"
    write_checkpoint(str(path), arrays)
    return path


WRITERS = {
    "safetensors": _write_safetensors,
    "sharded": _write_sharded,
    "hf-folder": _write_hf_folder,
    "torch": _write_torch_own,
    "npz": _write_npz,
    "npz-weightbridge": _write_npz_own,
    "npy": _write_npy,
    "h5py": _write_h5py,
    "h5-weightbridge": _write_h5_own,
    "keras": _write_keras,
    "gguf": _write_gguf,
    "msgpack": _write_msgpack,
}


def _roundtrip(
    s3: tuple[str, Any], tmp_path: Path, local: Path, prefix: str
) -> dict[str, tuple[int, int]]:
    """Inspect, plan, convert and verify `local` from S3; compare with the local conversion
    and count the bytes fetched in each phase. Returns what the conversion fetched: object
    URL -> (requests, bytes)."""
    endpoint, client = s3
    url = _upload(client, local, prefix)
    stored = _stored_bytes(client, url)

    _, before = _fetched(url)
    remote_spec = api.inspect(url, endpoint=endpoint)
    plan = api.plan(url, endpoint=endpoint)
    _, after = _fetched(url)
    assert remote_spec == api.inspect(str(local))
    assert plan.to_json() == api.plan(str(local)).to_json()
    planning = after - before
    # Headers only: the first window of each object, and a small window at each header
    # scattered through a file (a zip member's, an HDF5 dataset's), never the tensors.
    objects = max(1, len(list(local.rglob("*"))) if local.is_dir() else 1)
    headers = objects * _remote.FIRST_BLOCK + 2 * len(remote_spec) * _remote.WINDOW
    # (+128 KiB: zipfile reads the last 64 KiB of an archive with a comment, as the npz of
    # weightbridge has.)
    assert planning <= headers + (128 << 10), (planning, stored)
    assert planning < stored / 10, (planning, stored)

    out_local, out_remote = tmp_path / "out-local", tmp_path / "out-remote"
    api.convert(str(local), str(out_local))
    _, before = _fetched(url)
    stats_before = _remote.fetch_stats()
    api.convert(url, str(out_remote), endpoint=endpoint)
    _, after = _fetched(url)
    converting = {
        u: (n - stats_before.get(u, (0, 0))[0], b - stats_before.get(u, (0, 0))[1])
        for u, (n, b) in _remote.fetch_stats().items()
        if u.startswith(url)
    }
    assert _outputs(out_remote) == _outputs(out_local)
    tensors = remote_spec.nbytes
    # Each tensor's bytes once, plus headers: not the whole file several times.
    assert tensors <= after - before <= tensors + headers + (256 << 10), (after - before, tensors)

    assert api.verify(url, str(out_remote), endpoint=endpoint) == len(remote_spec)
    return converting


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_format_from_s3(s3: tuple[str, Any], tmp_path: Path, kind: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    local = WRITERS[kind](src, _arrays())
    _roundtrip(s3, tmp_path, local, f"formats/{kind}/{local.name}")


@pytest.mark.torch
def test_torch_save_from_s3(s3: tuple[str, Any], tmp_path: Path) -> None:
    import torch

    arrays = {k: v for k, v in _arrays().items() if v.dtype != ml_dtypes.bfloat16}
    state = {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}
    state["tied.weight"] = state["embed.weight"]  # shares a storage: read once per tensor
    state["bf16.weight"] = torch.randn(256, 128).to(torch.bfloat16)
    local = tmp_path / "pytorch_model.bin"
    torch.save(state, local)
    _roundtrip(s3, tmp_path, local, "formats/torch.save/pytorch_model.bin")


# -- distributed checkpoints: DCP directories and DeepSpeed ZeRO runs, read as prefixes ---------


def _write_dcp(local: Path) -> Path:
    """A `torch.distributed.checkpoint.save` of one process: MiB tensors, a view, a non-tensor."""
    import torch
    import torch.distributed.checkpoint as tdcp

    arrays = {k: v for k, v in _arrays().items() if v.dtype != ml_dtypes.bfloat16}
    model: dict[str, Any] = {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}
    g = torch.Generator().manual_seed(3)
    model["bf16.weight"] = torch.randn(512, 256, generator=g).to(torch.bfloat16)
    model["rows.weight"] = torch.randn(1024, 256, generator=g)[100:700]  # a view of a storage
    with pytest.warns(UserWarning, match="single process"):
        tdcp.save({"model": model, "step": 7}, checkpoint_id=str(local))
    return local


@pytest.mark.torch
def test_dcp_from_s3(s3: tuple[str, Any], tmp_path: Path) -> None:
    """A `torch.distributed.checkpoint.save` directory: `.metadata` fetched whole for the
    specs, each chunk's `torch.save` blob parsed from its two ends, then its tensor's bytes."""
    local = _write_dcp(tmp_path / "src" / "ck")
    converting = _roundtrip(s3, tmp_path, local, "formats/dcp/ck")
    url = f"s3://{BUCKET}/formats/dcp/ck"
    assert converting[f"{url}/.metadata"] == (1, (local / ".metadata").stat().st_size)  # whole
    blobs = sum(b for u, (_, b) in converting.items() if u.endswith(".distcp"))
    spec = api.inspect(str(local))
    # Each tensor's bytes, and its blob's two ends (the zip headers and pickle around them).
    assert spec.nbytes <= blobs <= spec.nbytes + len(spec) * 2 * dcp._BLOB_END_BYTES


@pytest.mark.torch
def test_dcp_two_ranks_from_s3(
    s3: tuple[str, Any],
    tmp_path: Path,
    two_rank_checkpoint: Path,  # noqa: F811  (the fixture imported from test_io_dcp)
) -> None:
    """Tensors sharded over two ranks' `.distcp` files are assembled from both objects."""
    endpoint, client = s3
    local = two_rank_checkpoint / "ck"
    url = _upload(client, local, "formats/dcp2/ck")
    with _remote.remote_options(endpoint=endpoint):
        assert detect_format(url) == "dcp"
        with open_reader(url) as reader:
            chunks = reader.chunks("layers.0.uneven")
            assert {c.file for c in chunks} == {f"{url}/__0_0.distcp", f"{url}/__1_0.distcp"}
            assert reader.files() == [f"{url}/.metadata", *sorted(c.file for c in chunks)]
    assert api.inspect(url, endpoint=endpoint) == api.inspect(str(local))
    api.convert(str(local), str(tmp_path / "out-local"))
    api.convert(url, str(tmp_path / "out-remote"), endpoint=endpoint)
    assert _outputs(tmp_path / "out-remote") == _outputs(tmp_path / "out-local")
    assert api.verify(url, str(tmp_path / "out-remote"), endpoint=endpoint) > 0

    # One rank's file left behind: the reader names it before reading anything.
    for name in (".metadata", "__0_0.distcp"):
        client.upload_file(str(local / name), BUCKET, f"formats/dcp2-partial/ck/{name}")
    partial = f"s3://{BUCKET}/formats/dcp2-partial/ck"
    with pytest.raises(FormatError, match=r"__1_0\.distcp: cannot read it .*\.metadata places"):
        api.inspect(partial, endpoint=endpoint)


# DeepSpeed writes two ZeRO runs of a model big enough that headers are a small part of each
# file: two gloo ranks on the CPU, one AdamW step, then `save_checkpoint`. Odd widths make
# parameters straddle the ranks' partitions (stage 2) and pad them (stage 3).
_ZERO_WRITE = textwrap.dedent(
    """
    import os, socket, sys
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    import torch.multiprocessing as mp

    def run(rank, world, port, out):
        import deepspeed
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        # No LOCAL_SIZE: DeepSpeed's shared-memory all-reduce (used when it equals the world
        # size) spin-waits on flags between the ranks; one CI run under load aborted in it.
        # Without it the ranks all-reduce through gloo: the checkpoints are the same.
        deepspeed.init_distributed(dist_backend="gloo")
        for name, stage, bf16 in (("s2_bf16", 2, True), ("s3_fp32", 3, False)):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(512, 1001), torch.nn.Linear(1001, 511))
            config = {
                "train_batch_size": 2 * world,
                "zero_optimization": {"stage": stage},
                "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
                "bf16": {"enabled": bf16},
            }
            engine, *_ = deepspeed.initialize(
                model=model, model_parameters=list(model.parameters()), config=config
            )
            x = torch.randn(2, 512, dtype=torch.bfloat16 if bf16 else torch.float32)
            engine.backward(engine(x).float().sum())
            engine.step()
            engine.save_checkpoint(os.path.join(out, name))
            torch.distributed.barrier()

    if __name__ == "__main__":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(run, args=(2, port, sys.argv[1]), nprocs=2)
    """
)
# Two ranks import torch and DeepSpeed on a loaded 2-core machine; only catches a hang.
_ZERO_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("zero-remote")
    script = out / "write.py"
    script.write_text(_ZERO_WRITE)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, str(script), str(out)],
        capture_output=True,
        text=True,
        timeout=_ZERO_TIMEOUT_S,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return out


@pytest.mark.deepspeed
@pytest.mark.parametrize("run", ["s2_bf16", "s3_fp32"])
def test_zero_from_s3(s3: tuple[str, Any], tmp_path: Path, zero_runs: Path, run: str) -> None:
    """A DeepSpeed run directory as a prefix: `latest` and the listing find the tag, the
    pickles give the specs, and converting fetches of each rank's optimizer states only the
    fp32 ranges of the parameters, never the optimizer's moments beside them."""
    local = zero_runs / run
    converting = _roundtrip(s3, tmp_path, local, f"formats/zero/{run}")
    optim = sorted(local.rglob("*_optim_states.pt"))
    stored = sum(p.stat().st_size for p in optim)
    fetched = sum(b for u, (_, b) in converting.items() if u.endswith("_optim_states.pt"))
    weights = api.inspect(str(local)).nbytes  # fp32 master weights, from these files
    headers = len(optim) * (_remote.FIRST_BLOCK + 4 * _remote.WINDOW)
    assert weights <= fetched <= weights + headers, (fetched, weights, stored)
    assert fetched < stored / 2, (fetched, stored)  # AdamW's two moments: 2/3 of the bytes


# -- TensorFlow checkpoints: an `.index` table and its `.data-*` shards under a prefix ----------

TF_FIXTURES = Path(__file__).parent / "fixtures" / "tf"


@pytest.mark.parametrize("fixture", ["keras", "saver", "sharded"])
def test_tf_checkpoint_written_by_tensorflow_from_s3(
    s3: tuple[str, Any], tmp_path: Path, fixture: str
) -> None:
    """What TensorFlow wrote (a `checkpoint` state file, three data shards), read as a prefix."""
    endpoint, client = s3
    local = TF_FIXTURES / fixture
    url = _upload(client, local, f"formats/tf-{fixture}")
    with _remote.remote_options(endpoint=endpoint):
        assert detect_format(url) == "tfcheckpoint"
        with open_reader(url) as reader:  # what a resume checks: the index and every shard
            bundle = [f"{url}/{p.name}" for p in local.iterdir() if p.name != "checkpoint"]
            assert sorted(reader.files()) == sorted(bundle)
    assert api.inspect(url, endpoint=endpoint) == api.inspect(str(local))
    api.convert(str(local), str(tmp_path / "out-local"))
    api.convert(url, str(tmp_path / "out-remote"), endpoint=endpoint)
    assert _outputs(tmp_path / "out-remote") == _outputs(tmp_path / "out-local")
    assert api.verify(url, str(tmp_path / "out-remote"), endpoint=endpoint) > 0


def test_tf_checkpoint_from_s3(s3: tuple[str, Any], tmp_path: Path) -> None:
    """A bundle of MiB tensors: the `.index` fetched whole for planning, each tensor's range of
    the data shard once for the conversion."""
    tf_dtypes = {"float32": 1, "int32": 3, "bfloat16": 14, "float16": 19}  # TF's DataType enum
    tensors = {
        name: (tf_dtypes[a.dtype.name], a.shape, a.tobytes()) for name, a in _arrays().items()
    }
    local = tmp_path / "src" / "tf"
    write_bundle(str(local / "ckpt-1"), tensors)
    _roundtrip(s3, tmp_path, local, "formats/tf/ckpt")


def test_zarr_still_read_through_tensorstore(s3: tuple[str, Any], tmp_path: Path) -> None:
    """zarr/orbax prefixes go to tensorstore as before, now with the same endpoint option."""
    pytest.importorskip("tensorstore")
    endpoint, client = s3
    single = _write_safetensors(tmp_path, _arrays())
    api.convert(str(single), str(tmp_path / "zarr"), format="zarr")
    url = _upload(client, tmp_path / "zarr", "zarr/ckpt")
    with _remote.remote_options(endpoint=endpoint):
        assert detect_format(url) == "tensorstore"
    assert api.inspect(url, endpoint=endpoint) == api.inspect(str(tmp_path / "zarr"))


def test_tensor_reads_parts_prefetch_and_a_replaced_object(
    s3: tuple[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large tensors come in parallel parts, prefetched ones are not fetched twice, and an
    object replaced after its header was read is an error, not a mix of two checkpoints."""
    endpoint, client = s3
    arrays = _arrays()
    local = _write_safetensors(tmp_path, arrays)
    url = _upload(client, local, "reads/model.safetensors")
    monkeypatch.setattr(_remote, "PART_BYTES", 256 << 10)  # the 2 MiB tensor: 8 parts
    with _remote.remote_options(endpoint=endpoint), open_reader(url) as reader:
        requests, before = _fetched(url)
        np.testing.assert_array_equal(reader.read("embed.weight"), arrays["embed.weight"])
        got_requests, after = _fetched(url)
        assert (got_requests - requests, after - before) == (8, arrays["embed.weight"].nbytes)

        reader.prefetch("layer.0.attn.weight")
        np.testing.assert_array_equal(
            reader.read("layer.0.attn.weight"), arrays["layer.0.attn.weight"]
        )
        _, after_prefetch = _fetched(url)
        assert after_prefetch - after == arrays["layer.0.attn.weight"].nbytes

        client.put_object(
            Bucket=BUCKET, Key="reads/model.safetensors", Body=local.read_bytes()[::-1]
        )
        with pytest.raises(FormatError, match="changed while weightbridge was reading it"):
            reader.read("head.weight")


def test_sharded_index_names_missing_shard(s3: tuple[str, Any], tmp_path: Path) -> None:
    endpoint, client = s3
    local = _write_sharded(tmp_path, _arrays())
    shards = sorted(local.glob("*.safetensors"))
    shards[-1].unlink()
    url = _upload(client, local, "broken/sharded")
    with pytest.raises(FormatError, match="does not exist"):
        api.inspect(url, endpoint=endpoint)


def test_missing_object_and_prefix(s3: tuple[str, Any]) -> None:
    endpoint, _ = s3
    with pytest.raises(UnknownFormatError, match="no such object"):
        api.inspect(f"s3://{BUCKET}/nothing/here.safetensors", endpoint=endpoint)


@contextlib.contextmanager
def _serving(root: Path) -> Iterator[str]:
    """A static file server on 127.0.0.1 that answers HEAD and ranged GETs, as a CDN or the Hub
    does (`helpers.serving_ranges`); yields its base URL."""
    with serving_ranges(root) as (base, _):
        yield base


def test_https_source(tmp_path: Path) -> None:
    """A file served over http(s) is read by ranged GETs too: no listing, no credentials."""
    local = _write_safetensors(tmp_path, _arrays())
    with _serving(tmp_path) as base:
        url = f"{base}/model.safetensors"
        assert detect_format(url) == "safetensors"
        _, before = _fetched(url)
        assert api.inspect(url) == api.inspect(str(local))
        _, after = _fetched(url)
        assert after - before < local.stat().st_size / 10
        api.convert(url, str(tmp_path / "out"))
        assert api.verify(str(local), str(tmp_path / "out")) == len(_arrays())


def test_https_tf_checkpoint_by_its_index(tmp_path: Path) -> None:
    """Over plain HTTP nothing can be listed, but a TF checkpoint's `.index` names its data
    shards: the three shards TensorFlow wrote are found beside it."""
    local = TF_FIXTURES / "sharded"
    with _serving(local) as base:
        url = f"{base}/ckpt.index"
        assert detect_format(url) == "tfcheckpoint"
        assert api.inspect(url) == api.inspect(str(local))
        api.convert(url, str(tmp_path / "out"))
        assert api.verify(str(local), str(tmp_path / "out")) == len(api.inspect(str(local)))


@pytest.mark.torch
def test_https_dcp_by_its_metadata(tmp_path: Path) -> None:
    """Over plain HTTP, a DCP checkpoint is named by its `.metadata`, which names its files."""
    local = _write_dcp(tmp_path / "ck")
    with _serving(local) as base:
        url = f"{base}/.metadata"
        assert detect_format(url) == "dcp"
        assert api.inspect(url) == api.inspect(str(local))
        api.convert(url, str(tmp_path / "out"))
        assert api.verify(str(local), str(tmp_path / "out")) == len(api.inspect(str(local)))


def test_cli_inspect_plan_convert_verify(s3: tuple[str, Any], tmp_path: Path) -> None:
    """The command line, in a child process: --endpoint reaches the sources of every command."""
    endpoint, client = s3
    local = _write_sharded(tmp_path, _arrays())
    url = _upload(client, local, "cli/ckpt")
    env = {k: v for k, v in os.environ.items() if k not in (ENDPOINT_ENV, "AWS_ENDPOINT_URL")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "weightbridge", *args, "--endpoint", endpoint],
            capture_output=True,
            text=True,
            env=env,
            timeout=CHILD_TIMEOUT,
        )

    shown = run("inspect", url, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == api.inspect(str(local)).to_json()
    planned = run("plan", url, "--to", "flax", "-o", str(tmp_path / "plan.json"))
    assert planned.returncode == 0, planned.stderr
    out = tmp_path / "out"
    converted = run("convert", url, "-o", str(out), "--plan", str(tmp_path / "plan.json"))
    assert converted.returncode == 0, converted.stderr
    verified = run("verify", url, str(out))
    assert verified.returncode == 0, verified.stderr
    assert "verified" in verified.stdout
    # And into the same object store (the destination takes --endpoint as before).
    to_s3 = run("convert", url, "-o", f"s3://{BUCKET}/cli/out", "--max-shard-size", "1MB")
    assert to_s3.returncode == 0, to_s3.stderr


def _closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    sock.close()
    return port


def test_unreachable_endpoint_is_a_named_error(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(StoreUnreachable, match=r"127\.0\.0\.1.*did not answer"):
        api.inspect(f"s3://{BUCKET}/ckpt/model.safetensors", endpoint=endpoint)


def test_cli_unreachable_endpoint_ends(tmp_path: Path) -> None:
    """The command that used to hang: convert s3://... --endpoint <nothing there>."""
    env = {
        **{k: v for k, v in os.environ.items() if k != ENDPOINT_ENV},
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "weightbridge",
            "convert",
            f"s3://{BUCKET}/ckpt",
            "-o",
            str(tmp_path / "out"),
            "--endpoint",
            endpoint,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=CHILD_TIMEOUT,
    )
    assert done.returncode == 2, done.stderr
    assert "did not answer" in done.stderr and endpoint in done.stderr, done.stderr


def test_processes_executor_reads_the_source_with_the_runs_endpoint(
    s3: tuple[str, Any], tmp_path: Path
) -> None:
    """Worker processes read an s3:// source themselves, from the endpoint the conversion was
    given (endpoint=, not the environment: the fixture clears it), byte-identical to threads."""
    endpoint, client = s3
    url = _upload(client, _write_sharded(tmp_path, _arrays()), "procs/ckpt")
    threads, procs = tmp_path / "threads", tmp_path / "procs"
    api.convert(url, str(threads), endpoint=endpoint, max_shard_size="1MB")
    api.convert(url, str(procs), endpoint=endpoint, max_shard_size="1MB", executor="processes:2")
    assert _outputs(procs) == _outputs(threads)
    assert len([p for p in _outputs(threads) if p.endswith(".safetensors")]) > 1
