"""Execute a plan: lay out the output shards, then stream tensors into them, resumably.

Phase two of two. Nothing here decides anything about tensors: the plan says what each target
tensor is made of, `weightbridge.planning.shards.assign_shards` fixes which file it goes to,
and each shard is one independent unit of work, produced by
`weightbridge.streaming.pipeline.fill_shard` from the plan and the shard alone.

Where shards are produced is the `executor`'s business:

* by default (threads), in this process: sources are memory-mapped, a `Readahead` thread pulls
  them into the page cache in file order, and a shard's commit (fsync, rename, or upload)
  runs on its own thread while the next shard is produced, then the shard's own record (its
  size and checksum) is written;
* with any other executor (processes, a `concurrent.futures.Executor`, a Dask cluster; see
  `weightbridge.streaming.executors`) every remaining shard is a `ShardTask`
  (`weightbridge.streaming.tasks`) that opens the source and the destination itself, commits
  its shard and writes the shard's own record;
* with ``partition=(I, N)`` only a byte-balanced share of the shards is produced (in either
  way), each recorded by its own record, so N parts can write into one destination at once.

Either way the journal (`weightbridge.streaming.journal`) is written at the start and once at
the end, never per shard, so the bookkeeping of N shards is O(N) bytes. The index is written
last, so a directory that has an index (or a single final file) is complete. This module alone
decides when a conversion is complete (`finish_job`): after the last shard and the index it
calls `Destination.finalize` once, then records the conversion complete in the journal.
Rerunning after a crash skips shards recorded in the journal or by their own record after
re-checking them, and produces byte-identical output, because every byte of a shard is a
function of the plan alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from weightbridge import io as wio
from weightbridge._files import is_url
from weightbridge.compare import compare_values
from weightbridge.errors import ConversionError, PlanError, VerifyError, WeightbridgeError
from weightbridge.io._obstore import is_object_url
from weightbridge.io._remote import current_options, remote_object
from weightbridge.io.base import Reader, UnionReader
from weightbridge.plan import Plan
from weightbridge.planning.shards import (
    DEFAULT_MAX_SHARD_SIZE,
    Shard,
    assign_shards,
    human_size,
    index_name,
    parse_size,
)
from weightbridge.streaming.dest import Completed, Destination, destination_for
from weightbridge.streaming.executors import TaskRunner, is_in_process, runner_for
from weightbridge.streaming.journal import Journal
from weightbridge.streaming.pipeline import (
    TRANSFORM_WORKERS,
    commit_shard,
    fill_shard,
    hash_shard,
    source_ranges,
)
from weightbridge.streaming.readahead import Readahead
from weightbridge.streaming.tasks import (
    ShardTask,
    produce_shard,
    read_record,
    record_name,
)
from weightbridge.streaming.tasks import partition as partition_of
from weightbridge.streaming.transform import compute

__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "ConversionReport",
    "convert",
    "parse_size",
    "verify",
]

# Filled shards waiting for their commits (fsync, rename or upload, in order on one thread).
# One fsync of a 1 GB shard took 1.7-2.4 s on the test VM, longer than filling the next one
# (about 1.4 s), so with one in flight the fill waited; with two it waits less (4 GB,
# interleaved: 11.3-13.2 s against 11.7-14.3 s). A crash loses at most these uncommitted
# shards, which a rerun redoes; dirty pages stay within the kernel's own limits.
COMMITS_IN_FLIGHT = 2


@dataclass
class ConversionReport:
    """What `convert` did."""

    dest: str
    shards: list[str]
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_written: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        """One line for people, sizes in the decimal unit that fits (as the progress bar).

        >>> ConversionReport("out", ["a"], ["a"], [], 3_100, 0.02).summary()
        'wrote 1 shard(s), 3.1 KB in 0.02 s (155.0 KB/s) to out'
        """
        rate = f" ({human_size(self.bytes_written / self.seconds)}/s)" if self.seconds else ""
        resumed = f", {len(self.skipped)} already complete (resumed)" if self.skipped else ""
        return (
            f"wrote {len(self.written)} shard(s), {human_size(self.bytes_written)} in "
            f"{self.seconds:.2f} s{rate} to {self.dest}{resumed}"
        )


Source = str | os.PathLike[str] | Reader


def _open_source(source: Source) -> tuple[Reader, bool]:
    """A reader of `source`, and whether it is ours to close."""
    if isinstance(source, (str, os.PathLike)):
        reader: Reader = wio.open_reader(source)
        return reader, True
    return source, False


def _job_id(plan: Plan, shards: list[Shard], format: str, metadata: dict[str, str] | None) -> str:
    layout = [[s.name, [st.target.name for st in s.steps]] for s in shards]
    blob = repr((plan.fingerprint(), format, layout, sorted((metadata or {}).items())))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class _Job:
    """One conversion, prepared: its destination locked and checked, its shards laid out."""

    plan: Plan
    reader: Reader
    target: Destination
    format: str
    metadata: dict[str, str] | None
    limit: int
    shards: list[Shard]
    outputs: list[str]
    job: str
    journal: Journal
    report: ConversionReport
    todo: list[Shard]
    # None: a whole conversion; (I, N): `--partition I/N`, which writes per-shard records only.
    partition: tuple[int, int] | None
    # What the caller named as the destination, for tasks that open it in other processes.
    dest: str | os.PathLike[str] | Destination
    dest_options: dict[str, Any]


def convert(
    plan: Plan,
    source: Source,
    dest: str | os.PathLike[str] | Destination,
    *,
    format: str = "safetensors",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    metadata: dict[str, str] | None = None,
    overwrite: bool = False,
    progress: bool = False,
    dest_options: dict[str, Any] | None = None,
    keep_cache: bool = False,
    executor: object = None,
    retries: int | None = None,
    partition: tuple[int, int] | None = None,
) -> ConversionReport:
    """Stream `source` through `plan` into `dest`, resuming an earlier run.

    Args:
        plan: the plan (validated against the source's specs before anything is written).
        source: a checkpoint path or an open reader.
        dest: output directory, object-store URL (``s3://bucket/prefix``), or a `Destination`.
        format: output format: ``safetensors``, ``npz``, ``h5`` or ``torch``.
        max_shard_size: bytes (or ``"5GB"``) per output file.
        metadata: string metadata for the output header (safetensors ``__metadata__``).
        overwrite: replace the output of a different conversion found in `dest`.
        progress: show a tqdm progress bar by bytes.
        dest_options: for URL destinations: ``endpoint``, ``aws_region``, ``step`` (orbax), ...
        keep_cache: leave the source in the page cache. By default each source tensor is
            dropped from it after its last use (see `readahead`), which is faster and spares
            the cache, unless other processes read the same source at the same time.
        executor: where shards are produced: None or ``"threads"`` (this process's pipeline),
            ``"processes[:N]"``, ``"dask://HOST:PORT"``, ``"dask"``, a
            `concurrent.futures.Executor` or a `dask.distributed.Client` (see `executors`).
            Every shard is then a task that opens the source and the destination itself.
        retries: per-task retries on Dask.
        partition: ``(I, N)``: produce only part I of N (a deterministic, byte-balanced share
            of the shards); N parts may run at once into one `dest`. Writes no index and does
            not finalize: a plain run afterwards finds every shard committed and does that.

    Raises:
        PlanError: the plan does not fit the source.
        ConversionError: the destination holds another conversion, lacks space, or a write failed.
    """
    started = time.perf_counter()
    reader, owned = _open_source(source)
    try:
        with contextlib.ExitStack() as stack:
            job = open_job(
                plan,
                reader,
                dest,
                stack,
                format=format,
                max_shard_size=max_shard_size,
                metadata=metadata,
                overwrite=overwrite,
                dest_options=dest_options,
                partition=partition,
            )
            skipped = set(job.report.skipped)
            done = sum(stored_bytes(job, s) for s in job.shards if s.name in skipped)
            everything = sum(stored_bytes(job, s) for s in job.shards)
            total = everything if partition is None else done + job_bytes(job)
            bar = _progress_bar(total, done, progress)
            try:
                if is_in_process(executor):
                    _produce_here(job, bar.update if bar else None, keep_cache)
                else:
                    runner = runner_for(executor, retries=retries)
                    try:
                        run_tasks(runner, [job], on_bytes=bar.update if bar else None)
                    finally:
                        runner.close()
            finally:
                if bar:
                    bar.close()
            if partition is None:
                finish_job(job)
            job.report.seconds = time.perf_counter() - started
            return job.report
    finally:
        if owned:
            reader.close()


def job_bytes(job: _Job) -> int:
    """Bytes this run of `job` still has to write."""
    return sum(stored_bytes(job, s) for s in job.todo)


def stored_bytes(job: _Job, shard: Shard) -> int:
    """The bytes `shard`'s writer stores: its tensors' own, or what a writer that stores
    others stores (a quantized GGUF: `weightbridge.io.stored_nbytes_of`). The report, the
    progress bar and the free-space check count these."""
    sizes = wio.stored_nbytes_of(job.format, job.metadata)
    return shard.nbytes if sizes is None else sum(sizes(s.target) for s in shard.steps)


def open_job(
    plan: Plan,
    reader: Reader,
    dest: str | os.PathLike[str] | Destination,
    stack: contextlib.ExitStack,
    *,
    format: str,
    max_shard_size: int | str,
    metadata: dict[str, str] | None,
    overwrite: bool,
    dest_options: dict[str, Any] | None,
    partition: tuple[int, int] | None,
    select: Collection[str] | None = None,
) -> _Job:
    """Validate, lay out the shards, lock and prepare the destination, find what is done.

    The lock is held until `stack` closes. With a partition the lock is shared with the other
    parts (and exclusive per part), and only this part's temporaries are cleaned up; the part's
    shards are `select` when given (a batch partitions all its shards at once), else this
    conversion's own share (`weightbridge.streaming.tasks.partition`).
    """
    target = destination_for(dest, format=format, **(dest_options or {}))
    plan.validate(reader.specs())
    suffix = wio.writer_class(format).suffix
    limit = _shard_limit(target, format, max_shard_size)
    sizes = wio.stored_nbytes_of(format, metadata)
    shards = assign_shards(plan, suffix=suffix, max_shard_size=limit, stored_nbytes=sizes)
    outputs = [s.name for s in shards] + ([index_name(suffix)] if len(shards) > 1 else [])
    job = _job_id(plan, shards, format, metadata)
    if partition is None:
        mine = shards
    elif select is not None:
        mine = [s for s in shards if s.name in select]
    else:
        mine = partition_of(shards, *partition)
    target.prepare()
    stack.enter_context(target.lock(None if partition is None else _part_name(partition)))
    journal = _prepare_destination(
        target,
        job,
        outputs,
        _source_state(reader),
        overwrite=overwrite,
        only=None if partition is None else [s.name for s in mine],
    )
    report = ConversionReport(target.url, [s.name for s in shards])
    done = _committed_shards(journal, mine, job)
    todo = [s for s in mine if s.name not in done]
    report.skipped = [s.name for s in mine if s.name in done]
    prepared = _Job(
        plan,
        reader,
        target,
        format,
        metadata,
        limit,
        shards,
        outputs,
        job,
        journal,
        report,
        todo,
        partition,
        dest,
        dict(dest_options or {}),
    )
    _check_space(target, job_bytes(prepared))
    return prepared


def layout(
    plan: Plan,
    dest: str | os.PathLike[str] | Destination,
    *,
    format: str,
    max_shard_size: int | str,
    dest_options: dict[str, Any] | None = None,
    metadata: dict[str, str] | None = None,
) -> list[Shard]:
    """The shards a conversion of `plan` into `dest` writes (what `open_job` lays out)."""
    target = destination_for(dest, format=format, **(dest_options or {}))
    suffix = wio.writer_class(format).suffix
    limit = _shard_limit(target, format, max_shard_size)
    sizes = wio.stored_nbytes_of(format, metadata)
    return assign_shards(plan, suffix=suffix, max_shard_size=limit, stored_nbytes=sizes)


def _part_name(partition: tuple[int, int]) -> str:
    return f"partition-{partition[0]}-of-{partition[1]}"


def _produce_here(job: _Job, on_bytes: Callable[[int], object] | None, keep_cache: bool) -> None:
    """Produce the job's shards in this process: transforms on a thread pool, reads ahead in
    file order, commits on their own thread while the next shard is filled."""
    reader, target, journal, report = job.reader, job.target, job.journal, job.report
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(
            ThreadPoolExecutor(TRANSFORM_WORKERS, thread_name_prefix="weightbridge-transform")
        )
        ahead = stack.enter_context(
            Readahead(source_ranges(reader, job.todo), drop_behind=not keep_cache)
        )
        # Shards commit (fsync and rename, or upload) on their own thread while the next one is
        # produced: an fsync waits for the disk, and the transforms need not wait with it.
        committer = stack.enter_context(
            ThreadPoolExecutor(1, thread_name_prefix="weightbridge-commit")
        )
        pending: list[tuple[Shard, Future[int], str]] = []

        def settle(keep: int = 0) -> None:
            """Record finished commits in file order, waiting until at most `keep` remain."""
            while len(pending) > keep:
                shard, future, digest = pending.pop(0)
                size = future.result()
                # Its own record, no shared file: parts of a partitioned run write at once.
                journal.record(shard.name, size, digest)
                report.written.append(shard.name)
                report.bytes_written += stored_bytes(job, shard)

        try:
            for shard in job.todo:
                sink, digest = fill_shard(
                    reader,
                    shard,
                    target,
                    format=job.format,
                    metadata=job.metadata,
                    on_bytes=on_bytes,
                    pool=pool,
                    readahead=ahead,
                )
                try:
                    settle(COMMITS_IN_FLIGHT - 1)
                except BaseException:
                    sink.abort()
                    raise
                pending.append((shard, committer.submit(commit_shard, sink, target, shard), digest))
            settle()
        except BaseException:
            with contextlib.suppress(BaseException):  # keep the work already done, if it commits
                settle()
            raise


def tasks_of(job: _Job) -> list[ShardTask]:
    """One `ShardTask` per shard the job still has to write."""
    if isinstance(job.reader, UnionReader) or not job.reader.path:
        raise ConversionError(
            f"{job.reader.path or 'the source'}: a conversion that keeps the target's own values "
            "(or reads from an open reader with no path) runs with the threads executor only"
        )
    plan: str | Plan
    try:
        plan = json.dumps(job.plan.to_json())
    except PlanError:  # a Python value_fn: the Plan itself travels (where it pickles)
        plan = job.plan
    dest = job.dest
    where: str | Destination = os.fspath(dest) if isinstance(dest, (str, os.PathLike)) else dest
    if job.target.url.startswith("memory://"):
        raise ConversionError(
            f"{job.target.url}: a memory:// store lives in one process, so other processes "
            "cannot write into it; use the threads executor, or a directory or bucket"
        )
    if isinstance(where, str) and not is_url(where):
        where = os.path.abspath(where)
    index = {s.name: i for i, s in enumerate(job.shards)}
    source = job.reader.path if is_url(job.reader.path) else os.path.abspath(job.reader.path)
    options = current_options()
    read_from = {"endpoint": options.endpoint, "aws_region": options.aws_region}
    return [
        ShardTask(
            plan,
            source,
            where,
            job.format,
            job.limit,
            index[s.name],
            s.name,
            stored_bytes(job, s),
            job.job,
            job.metadata,
            job.dest_options,
            read_from,
        )
        for s in job.todo
    ]


def run_tasks(
    runner: TaskRunner,
    jobs: Sequence[_Job],
    *,
    on_bytes: Callable[[int], object] | None = None,
    on_job_done: Callable[[_Job], object] | None = None,
) -> None:
    """Run every job's remaining shards as tasks on `runner`, biggest first, across jobs.

    Each task commits its shard and writes its record; here the coordinator only notes the
    result (in memory: the journal is written once, by `finish_job`) and calls `on_job_done`
    when a job's last shard is in.
    """
    work: list[tuple[_Job, ShardTask]] = []
    for job in jobs:
        work += [(job, t) for t in tasks_of(job)]
    work.sort(key=lambda w: -w[1].nbytes)  # stable: equal sizes keep shard order
    left = {id(job): len(job.todo) for job in jobs}
    for job in jobs:
        if not job.todo and on_job_done:
            on_job_done(job)
    for i, record in runner.run(produce_shard, [t for _, t in work]):
        job, task = work[i]
        job.journal.shards[record.name] = {"size": record.size, "checksum": record.checksum}
        job.report.written.append(record.name)
        job.report.bytes_written += task.nbytes
        if on_bytes:
            on_bytes(task.nbytes)
        left[id(job)] -= 1
        if left[id(job)] == 0:
            # A worker killed mid-shard left its temporary behind (the retry wrote the shard
            # under another): every shard is in now, so any temporary of one is an orphan.
            job.target.remove_temporaries([s.name for s in job.todo])
            order = {n: k for k, n in enumerate(job.report.shards)}
            job.report.written.sort(key=order.__getitem__)
            if on_job_done:
                on_job_done(job)


def finish_job(job: _Job) -> None:
    """Every shard is committed: write the index, finalize once, record the job complete.

    Decided here and only here. A job whose shards came from other processes (tasks,
    partitions) has their records merged into the journal, written once.
    """
    # In shard order, however the shards were produced, so every run writes the same journal.
    done = job.journal.shards
    job.journal.shards = {s.name: done[s.name] for s in job.shards if s.name in done}
    target, suffix = job.target, wio.writer_class(job.format).suffix
    if len(job.shards) > 1:
        weight_map = {st.target.name: s.name for s in job.shards for st in s.steps}
        target.write_json(
            index_name(suffix),
            {
                "metadata": {"total_size": sum(stored_bytes(job, s) for s in job.shards)},
                "weight_map": weight_map,
            },
        )
    # The destination finalizes (orbax/zarr: its top-level metadata) once, and only then does
    # the journal say so.
    target.finalize(Completed(tuple(job.outputs)))
    job.journal.complete = True
    job.journal.save()


def _shard_limit(target: Destination, format: str, max_shard_size: int | str) -> int:
    """The shard size limit, lowered where the destination cannot take larger objects in
    bounded memory (an object store receives a byte-format shard in one PUT)."""
    limit = parse_size(max_shard_size)
    cap = target.max_object_size(format)
    return min(limit, cap) if cap else limit


def _source_state(reader: Reader) -> list[list[Any]]:
    """Size and modification time of every source file (size and ETag of an object): cheap,
    and enough to see a swap."""
    state: list[list[Any]] = []
    for path in reader.files():
        if is_object_url(path):
            obj = remote_object(path)  # the record its reader made: no request
            state.append([path, obj.size, obj.etag])
            continue
        st = os.stat(path)
        state.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
    return state


def _prepare_destination(
    dest: Destination,
    job: str,
    outputs: list[str],
    source: list[list[Any]],
    *,
    overwrite: bool,
    only: list[str] | None = None,
) -> Journal:
    """Load (or start) the journal of `job` in `dest`, refusing to mix conversions.

    `only`: the shards a partition run writes; other parts may be writing the rest right now,
    so only these are checked for clashes and cleaned of temporaries.
    """
    journal = Journal.load(dest)
    if journal is not None and journal.job == job and journal.source and journal.source != source:
        if not overwrite:
            changed = [s[0] for s in source if s not in journal.source] or [
                "(files added or removed)"
            ]
            raise ConversionError(
                f"{dest.url}: the source changed since the interrupted conversion started "
                f"({changed[0]} differs in size or modification time); resuming would mix two "
                "versions. Pass --overwrite to start over"
            )
        for name in journal.outputs:  # the shard records vouch for the old source's bytes
            dest.remove(record_name(name))
        journal = None
    if journal is not None and journal.job != job:
        if not overwrite:
            raise ConversionError(
                f"{dest.url}: holds the output of a different conversion (job {journal.job}, this "
                f"one is {job}: another plan, format or shard size); pass --overwrite to replace "
                "it, or choose another output directory"
            )
        for name in journal.outputs:
            dest.remove(name)
        journal = None
    if journal is None:
        mine = outputs if only is None else only
        clashes = [
            n
            for n in mine
            if dest.exists(n) and (only is None or read_record(dest, job, n) is None)
        ]
        if clashes and not overwrite:
            raise ConversionError(
                f"{dest.url}: already has {clashes[:3]} from something other than this conversion; "
                "pass --overwrite to replace them, or choose another output directory"
            )
        for n in clashes:
            dest.remove(n)
        journal = Journal(dest, job, {}, False, outputs)
    journal.source = source
    dest.remove_temporaries(only)
    dest.start(outputs)
    journal.complete = False
    journal.save()
    return journal


def _committed_shards(journal: Journal, shards: list[Shard], job: str) -> set[str]:
    """Shards recorded (in the journal, or by their own record from a task or a partition run)
    whose files still exist with the recorded size and hash. Verified records are kept in the
    journal, so the completed journal lists every shard however it was produced.

    A record that carries the destination's stamp of the shard (size, mtime and inode of a
    file; an object's ETag) is trusted when the stamp is unchanged: resuming a conversion
    killed at 90% then reads nothing of what it wrote. Without one, the shard is hashed again.
    """
    done = set()
    recorded = journal.recorded([s.name for s in shards])  # one listing, small reads
    for shard in shards:
        rec = recorded.get(shard.name)
        if rec and rec.get("stamp") and journal.dest.stamp(shard.name) == rec["stamp"]:
            done.add(shard.name)
            journal.shards[shard.name] = {"size": rec["size"], "checksum": rec["checksum"]}
            continue
        if not rec or journal.dest.size(shard.name) != rec.get("size"):
            journal.shards.pop(shard.name, None)
            continue
        try:
            with journal.dest.open_reader(shard.name) as r:
                digest = hash_shard(r, shard)
        except WeightbridgeError:
            digest = ""
        if digest == rec.get("checksum"):
            done.add(shard.name)
            journal.shards[shard.name] = {"size": rec["size"], "checksum": rec["checksum"]}
        else:
            journal.shards.pop(shard.name, None)
    return done


def _check_space(dest: Destination, needed: int) -> None:
    free = dest.free_space()
    if free is None:
        return
    if needed > free:
        raise ConversionError(
            f"{dest.url}: not enough free space: the conversion still has to write {needed / 1e9:.2f} GB "
            f"but the filesystem has {free / 1e9:.2f} GB free; free {(needed - free) / 1e9:.2f} GB "
            "more or choose another output directory (a rerun resumes where this one stops)"
        )


def _part(out: Reader, name: str) -> Reader:
    """The reader of the file holding `name` (an index's shard), else `out` itself."""
    part = getattr(out, "part", None)
    return out if part is None else cast(Reader, part(name))


def _stored_dtype(out: Reader, name: str, dtype: str) -> str:
    """The type `out` stores tensor `name` as: a GGUF's GGML type (``Q8_0``) for a quantized
    one, which its reader gives dequantized as `dtype`; else `dtype`."""
    info = getattr(_part(out, name), "tensor_info", None)
    kind = info(name).kind if info is not None else None
    return kind.name if kind is not None and kind.quantized else dtype


def _stored_bytes(out: Reader, name: str) -> Any:
    """Tensor `name`'s bytes as `out` stores them (a GGUF reader's `stored_bytes`)."""
    part = _part(out, name)
    return getattr(part, "stored_bytes", part.read)(name)


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="B",
        unit_scale=True,
        unit_divisor=1000,  # decimal, as the summary and --max-shard-size
        desc="convert",
        dynamic_ncols=True,
    )


def verify(
    plan: Plan,
    source: Source,
    dest: str | os.PathLike[str] | Destination,
    *,
    dest_options: dict[str, Any] | None = None,
) -> int:
    """Recompute every target tensor from the source through the plan and compare with `dest`.

    Returns the number of tensors checked. Raises VerifyError naming the first tensors that differ.
    """
    from weightbridge.io import gguf

    reader, owned = _open_source(source)
    try:
        plan.validate(reader.specs())
        # A plan made for a quantized GGUF (``--dtype q8_0``): tensors the writer quantizes
        # are expected as the source through the plan, quantized and dequantized again.
        outtype = gguf.outtype_of_plan(plan)
        target = destination_for(dest, **(dest_options or {}))
        with target.open_reader() as out:
            have = out.specs()
            bad = []
            for step in plan.steps:
                name = step.target.name
                if name not in have:
                    bad.append(f"{name}: missing from the output")
                    continue
                got = out.read(name)
                quantized = (
                    outtype is not None and gguf.stored_type(step.target, outtype) == outtype
                )
                kind = outtype if outtype is not None and quantized else step.target.dtype
                found = _stored_dtype(out, name, have[name].dtype)
                if (have[name].shape, found) != (step.target.shape, kind):
                    bad.append(
                        f"{name}: output has {have[name].shape} {found}, plan makes "
                        f"{step.target.shape} {kind}"
                    )
                    continue
                want = compute([reader.read(s) for s in step.sources], step.ops, step.target)
                blocks = None
                if quantized:
                    blocks, want = gguf.requantized(kind, want)
                if got.tobytes() != want.tobytes():
                    how = compare_values(got, want)  # the comparison `diff` makes, untolerant
                    bad.append(
                        f"{name}: values differ from the source {list(step.sources)} through the "
                        + (f"plan, quantized to {kind} and back: " if quantized else "plan: ")
                        + (
                            how.describe("output", "source")
                            if how
                            else "bytes only (signed zeros or NaN payloads)"
                        )
                    )
                elif blocks is not None and not np.array_equal(_stored_bytes(out, name), blocks):
                    bad.append(
                        f"{name}: the stored {kind} blocks differ from the source's through the "
                        "plan, though they dequantize to the same values (a zero or NaN scale)"
                    )
                out.release(name)
                for s in step.sources:
                    reader.release(s)
            if bad:
                raise VerifyError(
                    f"{target.url}: {len(bad)} tensor(s) differ:\n  " + "\n  ".join(bad[:20])
                )
            return len(plan.steps)
    finally:
        if owned:
            reader.close()
