"""Batch throughput with each executor on this machine, and a paper estimate for 1 TB on N machines.

Writes a batch of checkpoints (safetensors, 4 source shards each, transposes on most tensors),
then converts the batch with ``threads`` (this process's pipeline), ``processes:W`` and a
W-worker Dask ``LocalCluster`` (processes, one thread each), each into a fresh directory, and
checks that every run's output equals the threads run's. It also measures what a task costs
beyond its bytes (a batch of tiny shards on Dask), which, with the measured per-worker rate,
gives the estimate. Usage::

    python scripts/bench_scale.py                      # 3 checkpoints x 128 MiB, 2 workers
    python scripts/bench_scale.py --checkpoints 4 --mib 512 --workers 2 --json out.json
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_resume import make_checkpoint, shard_files

from weightbridge.planning.planner import Rename, make_plan
from weightbridge.spec import CheckpointSpec
from weightbridge.streaming.batch import convert_batch

RENAMES = [Rename.parse(r"^layers\.(\d+)\.=layers_\1/")]


def plan_for(spec: CheckpointSpec) -> Any:
    return make_plan(spec, renames=RENAMES, from_framework="pytorch", to_framework="flax")


def drop_cache(root: Path) -> None:
    """Ask the kernel to forget the sources' pages, so every run reads from disk alike."""
    for path in root.rglob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run(name: str, sources: list[Path], dest: Path, shard: int, executor: object) -> dict[str, Any]:
    drop_cache(sources[0].parent)
    t = time.perf_counter()
    report = convert_batch(
        sources, dest, plan_for=plan_for, max_shard_size=shard, executor=executor
    )
    seconds = time.perf_counter() - t
    nbytes = sum(r.bytes_written for r in report.reports.values())
    shards = sum(len(r.written) for r in report.reports.values())
    print(f"{name:>14}: {nbytes / 1e6:8.1f} MB in {seconds:6.2f} s = {nbytes / seconds / 1e6:6.0f} MB/s"
          f" ({shards} shards)", flush=True)  # fmt: skip
    return {"executor": name, "bytes": nbytes, "seconds": seconds, "shards": shards}


def same_outputs(a: Path, b: Path) -> bool:
    for step in sorted(os.listdir(a)):
        for f in shard_files(a / step):
            if not filecmp.cmp(a / step / f, b / step / f, shallow=False):
                return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoints", type=int, default=3)
    ap.add_argument("--mib", type=int, default=128, choices=[8, 32, 128], help="per checkpoint")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard-mib", type=int, default=20)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    scale = {8: 4, 32: 2, 128: 1}[args.mib]
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-scale-"))
    srcs = root / "ckpts"
    srcs.mkdir(parents=True, exist_ok=True)
    sources = []
    for i in range(args.checkpoints):
        path = srcs / f"step_{i + 1}"
        if not path.exists():
            make_checkpoint(path, scale=scale, seed=i)
        sources.append(path)
    tiny = srcs / "tiny"  # 16 tensors of 32 KiB: a task's cost beyond its bytes
    if not tiny.exists():
        make_checkpoint(tiny, scale=16)
    shard = args.shard_mib << 20
    results = []
    try:
        results.append(run("threads", sources, root / "threads", shard, None))
        results.append(
            run(f"processes:{args.workers}", sources, root / "procs", shard, f"processes:{args.workers}")
        )  # fmt: skip
        assert same_outputs(root / "threads", root / "procs"), "processes output differs"
        overhead = None
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            print("      dask: not installed (pip install 'weightbridge[dask]')")
        else:
            with LocalCluster(
                n_workers=args.workers, threads_per_worker=1, processes=True,
                host="127.0.0.1", dashboard_address=None,
            ) as cluster, Client(cluster) as client:  # fmt: skip
                results.append(run(f"dask:{args.workers}w", sources, root / "dask", shard, client))
                assert same_outputs(root / "threads", root / "dask"), "dask output differs"
                # What a task costs beyond its bytes: 16 shards of one 32 KiB tensor each.
                small = run("dask tiny", [tiny], root / "dask-tiny", 1, client)
                overhead = small["seconds"] / small["shards"] * args.workers
        estimate(results, args.workers, overhead)
    finally:
        for d in ("threads", "procs", "dask", "dask-tiny"):
            shutil.rmtree(root / d, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def estimate(results: list[dict[str, Any]], workers: int, overhead: float | None) -> None:
    """1 TB on N machines, from the measured figures (printed with its assumptions)."""
    best = max(r["bytes"] / r["seconds"] for r in results if r["executor"] != "dask tiny")
    per_machine = best  # this machine, disk-bound: what one machine writes
    nic = 1.25e9 / 2  # 10 Gb/s NIC, each byte crosses it twice (read source, write output)
    rate = min(per_machine, nic)
    tb = 1e12
    shard = 5 << 30  # object-store byte-format shards: multipart uploads, --max-shard-size 5GB
    tasks = tb / shard
    task_cost = overhead if overhead is not None else 0.05
    print(f"\nmeasured: best {best / 1e6:.0f} MB/s on this machine ({workers} workers on 2 cores);"
          f" per-task overhead {task_cost * 1e3:.0f} ms")  # fmt: skip
    print(f"1 TB in {tasks:.0f} shards of 5 GiB; per machine min(disk {per_machine / 1e6:.0f} MB/s,"
          f" NIC 10 Gb/s halved = {nic / 1e6:.0f} MB/s)")  # fmt: skip
    for n in (1, 8, 32, 128):
        bytes_s = tb / (n * rate)
        overhead_s = tasks * task_cost / n
        # S3 takes ~3,500 PUT/s per prefix: 16k PUTs never bound it; finalize is one index.
        puts_s = tasks / 3500
        print(f"  N={n:4d}: {(bytes_s + overhead_s) / 60:7.1f} min (bytes {bytes_s / 60:.1f} min, "
              f"task overhead {overhead_s:.0f} s, PUT rate floor {puts_s:.0f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
