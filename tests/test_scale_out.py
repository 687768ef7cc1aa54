"""Shards as tasks: other executors and static partitions give the same bytes as threads.

Real processes and real files: a `ProcessPoolExecutor` produces every shard in other processes;
two ``partition`` runs write into one directory at the same time (started together, each in its
own process), and the plain run afterwards writes no shard, only the index. Every output is
compared byte for byte with a plain threaded conversion.
"""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from test_io_tensorstore import BUCKET, _objects, s3  # noqa: F401  (s3: the moto S3 fixture)
from test_resume import INDEX, N_SHARDS, make_checkpoint, options, shard_files

from weightbridge import api
from weightbridge.errors import ConversionError
from weightbridge.plan import Plan
from weightbridge.planning.shards import Shard, assign_shards
from weightbridge.streaming import convert as stream
from weightbridge.streaming.journal import JOURNAL_NAME
from weightbridge.streaming.tasks import partition, record_name

SCALE = 4  # 8 MiB of tensors: 8 output shards of ~1 MiB


def _plan(src: Path) -> Plan:
    opts = {k: v for k, v in options(SCALE).items() if k != "max_shard_size"}
    return api.plan(str(src), **opts)


def assert_identical(want: Path, got: Path) -> None:
    assert shard_files(got) == shard_files(want)
    assert len(shard_files(got)) == N_SHARDS
    for name in [*shard_files(want), INDEX]:
        assert filecmp.cmp(want / name, got / name, shallow=False), f"{name} differs"
    jw = json.loads((want / JOURNAL_NAME).read_text())
    jg = json.loads((got / JOURNAL_NAME).read_text())
    assert jg["complete"] is True
    assert (jg["job"], jg["shards"], jg["outputs"]) == (jw["job"], jw["shards"], jw["outputs"])
    assert not [n for n in os.listdir(got) if ".tmp" in n]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("scale") / "src", scale=SCALE)


@pytest.fixture(scope="module")
def reference(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("scale") / "ref"
    stream.convert(
        _plan(source), str(source), dest, max_shard_size=options(SCALE)["max_shard_size"]
    )
    return dest


def _convert(src: Path, dest: Path, **kwargs: object) -> stream.ConversionReport:
    size = options(SCALE)["max_shard_size"]
    return stream.convert(_plan(src), str(src), dest, max_shard_size=size, **kwargs)  # type: ignore[arg-type]


def test_processes_executor_is_byte_identical_to_threads(
    source: Path, reference: Path, tmp_path: Path
) -> None:
    report = _convert(source, tmp_path / "out", executor="processes:2")
    assert sorted(report.written) == shard_files(reference) and report.skipped == []
    assert report.written == report.shards  # reported in shard order, whatever finished first
    assert_identical(reference, tmp_path / "out")
    # Each shard's own record, written by the process that committed it.
    rec = json.loads((tmp_path / "out" / record_name(report.shards[0])).read_text())
    assert rec["job"] == json.loads((reference / JOURNAL_NAME).read_text())["job"]


def test_any_futures_executor_and_a_resume_across_executors(
    source: Path, reference: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "out"
    with ThreadPoolExecutor(3) as pool:
        _convert(source, dest, executor=pool, partition=(1, 3))
    # A threads run resumes what the tasks committed: it writes only the rest.
    report = _convert(source, dest)
    assert len(report.skipped) == len(partition(_shards(source), 1, 3))
    assert len(report.written) + len(report.skipped) == N_SHARDS
    assert_identical(reference, dest)


def _shards(source: Path) -> list[Shard]:
    return assign_shards(_plan(source), max_shard_size=options(SCALE)["max_shard_size"])  # type: ignore[arg-type]


# A child that runs one partition, after waiting for a file to appear, so the parts start together.
PART = (
    "import json, os, sys, time\n"
    "from weightbridge import api\n"
    "from weightbridge.streaming import convert as stream\n"
    "go, src, dest, part, opts = sys.argv[1:6]\n"
    "opts = json.loads(opts); size = opts.pop('max_shard_size')\n"
    "plan = api.plan(src, **opts)\n"
    "while not os.path.exists(go):\n"
    "    time.sleep(0.001)\n"
    "i, n = map(int, part.split('/'))\n"
    "r = stream.convert(plan, src, dest, max_shard_size=size, partition=(i, n))\n"
    "print(json.dumps(r.written))\n"
)


def test_two_partitions_at_once_then_the_plain_run_writes_only_the_index(
    source: Path, reference: Path, tmp_path: Path
) -> None:
    dest, go = tmp_path / "out", tmp_path / "go"
    opts = json.dumps(options(SCALE))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PART, str(go), str(source), str(dest), f"{i}/2", opts],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in (1, 2)
    ]
    go.touch()
    written = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
        written.append(json.loads(out))
    assert sorted(written[0] + written[1]) == shard_files(reference)
    assert not set(written[0]) & set(written[1])
    assert not (dest / INDEX).exists()  # a part never writes the index
    before = {n: os.stat(dest / n).st_mtime_ns for n in shard_files(dest)}
    report = _convert(source, dest)
    assert report.written == [] and sorted(report.skipped) == shard_files(reference)
    assert {n: os.stat(dest / n).st_mtime_ns for n in shard_files(dest)} == before
    assert_identical(reference, dest)


def test_partitions_are_deterministic_and_balanced_by_bytes(source: Path) -> None:
    shards = _shards(source)
    parts = [partition(shards, i, 3) for i in (1, 2, 3)]
    assert sorted(s.name for p in parts for s in p) == sorted(s.name for s in shards)
    loads = [sum(s.nbytes for s in p) for p in parts]
    assert max(loads) - min(loads) <= max(s.nbytes for s in shards)
    assert parts == [partition(shards, i, 3) for i in (1, 2, 3)]
    with pytest.raises(ConversionError, match="1 <= I <= N"):
        partition(shards, 0, 2)


def test_a_part_is_refused_while_a_whole_run_holds_the_directory(
    source: Path, tmp_path: Path
) -> None:
    from weightbridge.streaming.dest import LocalDirectory

    dest = LocalDirectory(str(tmp_path / "out"))
    dest.prepare()
    with dest.lock(), pytest.raises(ConversionError, match="another conversion"):
        _convert(source, tmp_path / "out", partition=(1, 2))
    with dest.lock("partition-1-of-2"):
        with pytest.raises(ConversionError, match="another conversion"):
            _convert(source, tmp_path / "out", partition=(1, 2))
        with pytest.raises(ConversionError, match="another conversion"):
            _convert(source, tmp_path / "out")


def test_unknown_executors_are_refused_with_the_forms_that_work(
    source: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConversionError, match="processes:N"):
        _convert(source, tmp_path / "out", executor="gpu")
    with pytest.raises(ConversionError, match="positive"):
        _convert(source, tmp_path / "out", executor="processes:0")


@pytest.mark.parametrize("format", ["safetensors", "zarr"])
def test_processes_into_s3_upload_the_same_objects_as_threads(
    source: Path,
    tmp_path: Path,
    s3: Any,  # noqa: F811
    format: str,
) -> None:
    """Each worker process opens the store itself and uploads its own shards."""
    endpoint, client = s3
    size = options(SCALE)["max_shard_size"]
    outputs = {}
    for executor in (None, "processes:2"):
        prefix = f"scale-{format}-{executor or 'threads'}".replace(":", "-")
        report = stream.convert(
            _plan(source),
            str(source),
            f"s3://{BUCKET}/{prefix}",
            format=format,
            max_shard_size=size,  # type: ignore[arg-type]
            dest_options={"endpoint": endpoint},
            executor=executor,
        )
        assert len(report.written) == len(report.shards) > 1
        objects = _objects(client, prefix)
        journal = json.loads(objects.pop(JOURNAL_NAME))
        assert journal["complete"] is True
        # Every shard has its own record, whoever committed it (the journal is not rewritten).
        records = {k for k in objects if k.startswith(".weightbridge/committed/")}
        assert len(records) == len(report.shards)
        outputs[executor] = ({k: v for k, v in objects.items() if k not in records}, journal)
    (want, jw), (got, jg) = outputs[None], outputs["processes:2"]
    assert sorted(got) == sorted(want)
    assert all(got[k] == want[k] for k in want), [k for k in want if got[k] != want[k]]
    assert (jg["job"], jg["shards"]) == (jw["job"], jw["shards"])


def test_out_of_process_executors_refuse_a_memory_store(source: Path) -> None:
    with pytest.raises(ConversionError, match="memory://"):
        _convert(source, "memory://scale-out", format="zarr", executor="processes:2")  # type: ignore[arg-type]


# A child that converts with a process pool; the test kills its whole process group.
POOLED = (
    "import json, sys\n"
    "from weightbridge import api\n"
    "from weightbridge.streaming import convert as stream\n"
    "src, dest, opts = sys.argv[1:4]\n"
    "opts = json.loads(opts); size = opts.pop('max_shard_size')\n"
    "stream.convert(api.plan(src, **opts), src, dest, max_shard_size=size, executor='processes:2')\n"
)


def test_a_killed_client_and_its_workers_then_a_rerun_resumes_from_the_records(
    source: Path, reference: Path, tmp_path: Path
) -> None:
    import signal
    import time

    dest = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", POOLED, str(source), str(dest), json.dumps(options(SCALE))],
        stderr=subprocess.PIPE,
        start_new_session=True,  # its pool workers too: the whole machine "dies"
    )
    records = dest / ".weightbridge" / "committed"

    def recorded() -> int:  # a committed shard counts once its record is written (atomically)
        return (
            len([n for n in os.listdir(records) if n.endswith(".json") and not n.startswith(".")])
            if records.is_dir()
            else 0
        )

    deadline = time.monotonic() + 120
    while proc.poll() is None and recorded() < 2:
        assert time.monotonic() < deadline, "the conversion made no progress"
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode in (-signal.SIGKILL, 0), err.decode()
    report = _convert(source, dest)  # a shard renamed but not yet recorded is written again
    assert len(report.skipped) >= 2 or proc.returncode == 0
    assert len(report.written) + len(report.skipped) == N_SHARDS
    assert_identical(reference, dest)


def test_records_of_a_changed_source_are_not_trusted_after_overwrite(
    source: Path, tmp_path: Path
) -> None:
    import shutil

    src = tmp_path / "src"
    shutil.copytree(source, src)
    _convert(src, tmp_path / "out", executor="processes:2")
    first = sorted(shard_files(src))[0]
    with open(src / first, "r+b") as f:  # new values, same size: only the bytes tell
        f.seek(-4096, os.SEEK_END)
        f.write(bytes(4096))
    with pytest.raises(ConversionError, match="source changed"):
        _convert(src, tmp_path / "out", executor="processes:2")
    report = _convert(src, tmp_path / "out", executor="processes:2", overwrite=True)
    assert report.skipped == []
    _convert(src, tmp_path / "fresh")
    assert_identical(tmp_path / "fresh", tmp_path / "out")
