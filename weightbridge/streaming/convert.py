"""Execute a plan: lay out the output shards, then stream tensors into them, resumably.

Phase two of two. Nothing here decides anything about tensors: the plan says what each target
tensor is made of, `weightbridge.planning.shards.assign_shards` fixes which file it goes to,
and each shard is one independent unit of work, produced by
`weightbridge.streaming.pipeline.fill_shard` from the plan and the shard alone:

* sources are memory-mapped, and a `Readahead` thread pulls them into the page cache in file
  order, ahead of the transforms, with large sequential reads;
* a shard is written under a temporary name; its commit (fsync, rename, then the journal's
  record of its size and checksum) runs on its own thread while the next shard is produced;
  the index is written last, so a directory that has an index (or a single final file) is
  complete.

This module alone decides when a conversion is complete: after the last shard and the index
it calls `Destination.finalize` once, then records the conversion complete in the journal.
Rerunning after a crash skips recorded shards after re-checking them and produces
byte-identical output, because every byte of a shard is a function of the plan alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from weightbridge import io as wio
from weightbridge.errors import ConversionError, VerifyError, WeightbridgeError
from weightbridge.io.base import Reader
from weightbridge.plan import Plan
from weightbridge.planning.shards import (
    DEFAULT_MAX_SHARD_SIZE,
    Shard,
    assign_shards,
    index_name,
    parse_size,
)
from weightbridge.streaming.dest import Completed, Destination, destination_for
from weightbridge.streaming.journal import Journal
from weightbridge.streaming.pipeline import (
    TRANSFORM_WORKERS,
    commit_shard,
    fill_shard,
    hash_shard,
    source_ranges,
)
from weightbridge.streaming.readahead import Readahead
from weightbridge.streaming.transform import compute

__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "ConversionReport",
    "convert",
    "parse_size",
    "verify",
]

# Filled shards waiting for their commits (fsync, rename, journal, in order on one thread).
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
        rate = self.bytes_written / self.seconds / 1e6 if self.seconds else 0.0
        resumed = f", {len(self.skipped)} already complete (resumed)" if self.skipped else ""
        return (
            f"wrote {len(self.written)} shard(s), {self.bytes_written / 1e6:.1f} MB in "
            f"{self.seconds:.2f} s ({rate:.0f} MB/s) to {self.dest}{resumed}"
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

    Raises:
        PlanError: the plan does not fit the source.
        ConversionError: the destination holds another conversion, lacks space, or a write failed.
    """
    started = time.perf_counter()
    target = destination_for(dest, format=format, **(dest_options or {}))
    reader, owned = _open_source(source)
    stack = contextlib.ExitStack()
    try:
        plan.validate(reader.specs())
        suffix = wio.writer_class(format).suffix
        shards = assign_shards(
            plan, suffix=suffix, max_shard_size=_shard_limit(target, format, max_shard_size)
        )
        outputs = [s.name for s in shards] + ([index_name(suffix)] if len(shards) > 1 else [])
        job = _job_id(plan, shards, format, metadata)
        target.prepare()
        stack.enter_context(target.lock())
        pool = stack.enter_context(
            ThreadPoolExecutor(TRANSFORM_WORKERS, thread_name_prefix="weightbridge-transform")
        )
        journal = _prepare_destination(
            target, job, outputs, _source_state(reader), overwrite=overwrite
        )
        report = ConversionReport(target.url, [s.name for s in shards])
        done = _committed_shards(journal, shards)
        todo = [s for s in shards if s.name not in done]
        _check_space(target, sum(s.nbytes for s in todo))
        bar = _progress_bar(
            plan.target.nbytes, sum(s.nbytes for s in shards if s.name in done), progress
        )
        ahead = stack.enter_context(
            Readahead(source_ranges(reader, todo), drop_behind=not keep_cache)
        )
        # Shards commit (fsync, rename, journal) on their own thread while the next one is
        # produced: an fsync waits for the disk, and the transforms need not wait with it.
        committer = stack.enter_context(
            ThreadPoolExecutor(1, thread_name_prefix="weightbridge-commit")
        )
        pending: list[tuple[Shard, Future[int], str]] = []

        def settle(keep: int = 0) -> None:
            """Record finished commits in file order, waiting until at most `keep` remain."""
            while len(pending) > keep:
                shard, future, digest = pending.pop(0)
                journal.record(shard.name, future.result(), digest)
                report.written.append(shard.name)
                report.bytes_written += shard.nbytes

        try:
            for shard in shards:
                if shard.name in done:
                    report.skipped.append(shard.name)
                    continue
                sink, digest = fill_shard(
                    reader,
                    shard,
                    target,
                    format=format,
                    metadata=metadata,
                    on_bytes=bar.update if bar else None,
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
        finally:
            if bar:
                bar.close()
        if len(shards) > 1:
            weight_map = {st.target.name: s.name for s in shards for st in s.steps}
            target.write_json(
                index_name(suffix),
                {"metadata": {"total_size": plan.target.nbytes}, "weight_map": weight_map},
            )
        # Complete: decided here and only here. The destination finalizes (orbax/zarr: its
        # top-level metadata) once, and only then does the journal say so.
        target.finalize(Completed(tuple(outputs)))
        journal.complete = True
        journal.save()
        report.seconds = time.perf_counter() - started
        return report
    finally:
        stack.close()
        if owned:
            reader.close()


def _shard_limit(target: Destination, format: str, max_shard_size: int | str) -> int:
    """The shard size limit, lowered where the destination cannot take larger objects in
    bounded memory (an object store receives a byte-format shard in one PUT)."""
    limit = parse_size(max_shard_size)
    cap = target.max_object_size(format)
    return min(limit, cap) if cap else limit


def _source_state(reader: Reader) -> list[list[Any]]:
    """Size and modification time of every source file: cheap, and enough to see a swap."""
    state = []
    for path in reader.files():
        st = os.stat(path)
        state.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
    return state


def _prepare_destination(
    dest: Destination, job: str, outputs: list[str], source: list[list[Any]], *, overwrite: bool
) -> Journal:
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
        clashes = [n for n in outputs if dest.exists(n)]
        if clashes and not overwrite:
            raise ConversionError(
                f"{dest.url}: already has {clashes[:3]} from something other than this conversion; "
                "pass --overwrite to replace them, or choose another output directory"
            )
        for n in clashes:
            dest.remove(n)
        journal = Journal(dest, job, {}, False, outputs)
    journal.source = source
    dest.remove_temporaries()
    dest.start(outputs)
    journal.complete = False
    journal.save()
    return journal


def _committed_shards(journal: Journal, shards: list[Shard]) -> set[str]:
    """Shards the journal records whose files still exist with the recorded size and hash."""
    done = set()
    for shard in shards:
        rec = journal.shards.get(shard.name)
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


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
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
    reader, owned = _open_source(source)
    try:
        plan.validate(reader.specs())
        with destination_for(dest, **(dest_options or {})).open_reader() as out:
            have = out.specs()
            bad = []
            for step in plan.steps:
                name = step.target.name
                if name not in have:
                    bad.append(f"{name}: missing from the output")
                    continue
                got = out.read(name)
                if have[name] != step.target:
                    bad.append(
                        f"{name}: output has {have[name].shape} {have[name].dtype}, plan makes "
                        f"{step.target.shape} {step.target.dtype}"
                    )
                    continue
                want = compute([reader.read(s) for s in step.sources], step.ops, step.target)
                if got.tobytes() != want.tobytes():
                    bad.append(
                        f"{name}: values differ from the source {list(step.sources)} through the plan"
                    )
                out.release(name)
                for s in step.sources:
                    reader.release(s)
            if bad:
                raise VerifyError(
                    f"{dest}: {len(bad)} tensor(s) differ:\n  " + "\n  ".join(bad[:20])
                )
            return len(plan.steps)
    finally:
        if owned:
            reader.close()
