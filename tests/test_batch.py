"""Batch conversions: one output per source, one plan per distinct specs, resumable as a whole,
on threads, on processes and on a real Dask cluster (a ``dask scheduler`` and two nanny-supervised
``dask worker`` processes on 127.0.0.1, started and stopped here), one of whose workers is
SIGKILLed while it writes a shard. Every output must equal, byte for byte, a plain conversion
of its source alone.
"""

from __future__ import annotations

import contextlib
import filecmp
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from test_io_tensorstore import BUCKET, _objects, s3  # noqa: F401  (s3: the moto S3 fixture)
from test_resume import INDEX, N_SHARDS, make_checkpoint, options, shard_files

from weightbridge import api
from weightbridge.errors import ConversionError
from weightbridge.plan import Plan
from weightbridge.planning.planner import Rename, make_plan
from weightbridge.spec import CheckpointSpec
from weightbridge.streaming import convert as stream
from weightbridge.streaming.batch import convert_batch
from weightbridge.streaming.journal import JOURNAL_NAME

SCALE = 4
SIZE = int(options(SCALE)["max_shard_size"])  # type: ignore[call-overload]
STEPS = ("step_1", "step_2", "step_3")


def plan_for(spec: CheckpointSpec) -> Plan:
    return make_plan(
        spec,
        renames=[Rename.parse(r) for r in options()["renames"]],  # type: ignore[attr-defined]
        from_framework="pytorch",
        to_framework="flax",
    )


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("batch") / "ckpts"
    root.mkdir()
    for seed, name in enumerate(STEPS):
        make_checkpoint(root / name, scale=SCALE, seed=seed)
    return root


@pytest.fixture(scope="module")
def singles(ckpts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Each checkpoint converted alone, the plain way."""
    out = tmp_path_factory.mktemp("batch") / "singles"
    for name in STEPS:
        src = ckpts / name
        plan = plan_for(_specs(src))
        stream.convert(plan, str(src), out / name, max_shard_size=SIZE)
    return out


def _specs(src: Path) -> CheckpointSpec:
    from weightbridge import io as wio

    with wio.open_reader(str(src)) as r:
        spec: CheckpointSpec = r.specs()
        return spec


def assert_batch_identical(want: Path, got: Path) -> None:
    assert sorted(p.name for p in got.iterdir() if not p.name.startswith(".")) == list(STEPS)
    for name in STEPS:
        w, g = want / name, got / name
        assert shard_files(g) == shard_files(w) and len(shard_files(g)) == N_SHARDS
        for f in [*shard_files(w), INDEX]:
            assert filecmp.cmp(w / f, g / f, shallow=False), f"{name}/{f} differs"
        jw, jg = (json.loads((d / JOURNAL_NAME).read_text()) for d in (w, g))
        assert jg["complete"] is True and (jg["job"], jg["shards"]) == (jw["job"], jw["shards"])
        assert not [n for n in os.listdir(g) if ".tmp" in n]


def _batch(ckpts: Path, dest: Path, **kwargs: object) -> object:
    calls: list[str] = []

    def counting(spec: CheckpointSpec) -> Plan:
        calls.append(spec.fingerprint())
        return plan_for(spec)

    report = convert_batch(
        [ckpts / n for n in STEPS], dest, plan_for=counting, max_shard_size=SIZE, **kwargs
    )  # type: ignore[arg-type]
    assert calls == [calls[0]]  # one plan for three checkpoints with the same specs
    return report


def test_a_batch_on_threads_equals_single_conversions_and_reruns_as_a_no_op(
    ckpts: Path, singles: Path, tmp_path: Path
) -> None:
    report = _batch(ckpts, tmp_path / "out", progress=True)
    assert report.planned == 1  # type: ignore[attr-defined]
    assert_batch_identical(singles, tmp_path / "out")
    again = _batch(ckpts, tmp_path / "out")
    assert all(r.written == [] for r in again.reports.values())  # type: ignore[attr-defined]


def test_a_batch_on_processes_equals_single_conversions(
    ckpts: Path, singles: Path, tmp_path: Path
) -> None:
    _batch(ckpts, tmp_path / "out", executor="processes:2")
    assert_batch_identical(singles, tmp_path / "out")


def test_sources_with_different_specs_get_their_own_plan(ckpts: Path, tmp_path: Path) -> None:
    other = make_checkpoint(tmp_path / "small", scale=8)
    made: list[str] = []

    def counting(spec: CheckpointSpec) -> Plan:
        made.append(spec.fingerprint())
        return plan_for(spec)

    report = convert_batch(
        [ckpts / "step_1", other, ckpts / "step_2"], tmp_path / "out", plan_for=counting
    )
    assert report.planned == 2 and len(set(made)) == 2
    assert sorted(report.reports) == ["small", "step_1", "step_2"]
    assert api.verify(other, tmp_path / "out" / "small", plan=report.plans["small"]) == 16


def test_two_sources_with_one_base_name_are_refused(ckpts: Path, tmp_path: Path) -> None:
    twin = tmp_path / "elsewhere" / "step_1"
    twin.parent.mkdir()
    twin.symlink_to(ckpts / "step_1")
    with pytest.raises(ConversionError, match="different base names"):
        convert_batch([ckpts / "step_1", twin], tmp_path / "out", plan_for=plan_for)


BATCH = (
    "import json, sys\n"
    "sys.path.insert(0, sys.argv[3])\n"
    "from test_batch import STEPS, SIZE, plan_for\n"
    "from weightbridge.streaming.batch import convert_batch\n"
    "root, dest = sys.argv[1:3]\n"
    "convert_batch([f'{root}/{n}' for n in STEPS], dest, plan_for=plan_for, max_shard_size=SIZE)\n"
)


def test_a_killed_batch_resumes_as_a_whole(ckpts: Path, singles: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", BATCH, str(ckpts), str(dest), str(Path(__file__).parent)],
        stderr=subprocess.PIPE,
    )
    # Kill once the second checkpoint has a committed shard: the first is complete, the
    # second half done, the third untouched.
    deadline = time.monotonic() + 120
    while proc.poll() is None and not (
        (dest / "step_2").is_dir() and len(shard_files(dest / "step_2")) >= 2
    ):
        assert time.monotonic() < deadline, "the batch made no progress"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode in (-signal.SIGKILL, 0), err.decode()
    report = _batch(ckpts, dest)
    written = {n: len(r.written) for n, r in report.reports.items()}  # type: ignore[attr-defined]
    assert written["step_1"] == 0 and written["step_3"] == N_SHARDS
    assert_batch_identical(singles, dest)


# -- a real Dask cluster -------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[str]:
    """A scheduler and two nanny-supervised workers (one thread each), as separate processes."""
    dask = str(Path(sys.executable).parent / "dask")
    address = f"tcp://127.0.0.1:{_free_port()}"
    logs = tmp_path / "dask-logs"
    logs.mkdir()
    stack = contextlib.ExitStack()

    def log(name: str) -> IO[bytes]:
        return stack.enter_context(open(logs / name, "wb"))

    procs = [
        subprocess.Popen(
            [dask, "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
             "--no-dashboard"],
            stdout=subprocess.DEVNULL, stderr=log("scheduler.log"),
        )
    ]  # fmt: skip
    for i in range(2):
        procs.append(
            subprocess.Popen(
                [dask, "worker", address, "--nthreads", "1", "--no-dashboard",
                 "--host", "127.0.0.1", "--name", f"w{i}", "--death-timeout", "60",
                 "--local-directory", str(tmp_path / f"w{i}")],
                stdout=subprocess.DEVNULL, stderr=log(f"worker{i}.log"),
            )
        )  # fmt: skip
    try:
        yield address
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        stack.close()


def _client(address: str, workers: int) -> object:
    from distributed import Client

    client = Client(address, timeout=60)
    client.wait_for_workers(workers, timeout=120)
    return client


@pytest.mark.dask
def test_a_batch_on_a_dask_cluster_equals_single_conversions(
    ckpts: Path, singles: Path, tmp_path: Path, cluster: str
) -> None:
    _batch(ckpts, tmp_path / "out", executor=f"dask://{cluster.removeprefix('tcp://')}")
    assert_batch_identical(singles, tmp_path / "out")


@pytest.mark.dask
def test_a_dask_worker_killed_mid_shard_is_retried_and_the_output_is_identical(
    ckpts: Path, singles: Path, tmp_path: Path, cluster: str
) -> None:
    import threading

    client = _client(cluster, 2)
    dest = tmp_path / "out"
    workers = set(client.run(os.getpid).values())  # type: ignore[attr-defined]
    killed: list[int] = []
    stop = threading.Event()

    def kill_a_writer() -> None:
        # A shard's temporary name carries its writer's pid: kill the worker writing one.
        while not stop.is_set() and not killed:
            for d in dest.glob("step_*"):
                for name in os.listdir(d) if d.is_dir() else []:
                    pid = name.split(".tmp-")[1].split("-")[0] if ".tmp-" in name else ""
                    if pid.isdigit() and int(pid) in workers:
                        os.kill(int(pid), signal.SIGKILL)
                        killed.append(int(pid))
                        return
            time.sleep(0.001)

    killer = threading.Thread(target=kill_a_writer)
    killer.start()
    try:
        _batch(ckpts, dest, executor=client, retries=3)
    finally:
        stop.set()
        killer.join()
        client.close()  # type: ignore[attr-defined]
    assert killed, "no worker was caught writing a shard"
    assert_batch_identical(singles, dest)


def test_a_batch_in_two_partitions_then_the_plain_run_moves_no_data(
    ckpts: Path, singles: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "out"
    parts = [_batch(ckpts, dest, partition=(i, 2), executor="processes:2") for i in (1, 2)]
    written = [
        {(n, s) for n, r in p.reports.items() for s in r.written}  # type: ignore[attr-defined]
        for p in parts
    ]
    assert not written[0] & written[1]
    assert len(written[0] | written[1]) == len(STEPS) * N_SHARDS
    assert abs(len(written[0]) - len(written[1])) <= 2  # balanced over the whole batch
    assert not any((dest / n / INDEX).exists() for n in STEPS)
    final = _batch(ckpts, dest)
    assert all(r.written == [] for r in final.reports.values())  # type: ignore[attr-defined]
    assert_batch_identical(singles, dest)


@pytest.mark.dask
def test_a_batch_on_a_dask_cluster_into_s3_equals_single_conversions(
    ckpts: Path,
    singles: Path,
    s3: Any,  # noqa: F811  (before `cluster`: its workers inherit the S3 settings)
    cluster: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    endpoint, client = s3
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", cluster)  # --executor dask
    _batch(ckpts, f"s3://{BUCKET}/batch", executor="dask", dest_options={"endpoint": endpoint})  # type: ignore[arg-type]
    for name in STEPS:
        objects = _objects(client, f"batch/{name}")
        for f in [*shard_files(singles / name), INDEX]:
            assert objects[f] == (singles / name / f).read_bytes(), f"{name}/{f} differs"
        assert json.loads(objects[JOURNAL_NAME])["complete"] is True
