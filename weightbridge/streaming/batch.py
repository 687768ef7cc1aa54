"""Convert many checkpoints as one batch: one output per source, one plan per distinct spec.

`convert_batch` converts every source into ``DEST/<base name>/`` (``ckpts/step_1000`` ->
``DEST/step_1000/``). Sources with the same specs (every saved step of one training run) share
one plan, made once by `plan_for`. With the default executor the checkpoints are converted one
after another by this process's pipeline; with any other executor every shard of every
checkpoint is one task, biggest first across the whole batch, and each checkpoint is finished
(index, finalize) as soon as its last shard is in. One progress bar counts bytes, shards and
checkpoints. A rerun resumes the whole batch: each output resumes like a single conversion.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from weightbridge import io as wio
from weightbridge._files import is_url
from weightbridge.errors import ConversionError
from weightbridge.io.base import Reader
from weightbridge.plan import Plan
from weightbridge.planning.shards import DEFAULT_MAX_SHARD_SIZE, human_size
from weightbridge.spec import CheckpointSpec
from weightbridge.streaming.convert import (
    ConversionReport,
    _Job,
    _produce_here,
    finish_job,
    job_bytes,
    layout,
    open_job,
    run_tasks,
)
from weightbridge.streaming.executors import is_in_process, runner_for
from weightbridge.streaming.tasks import partition_indices

__all__ = ["BatchReport", "convert_batch", "output_name"]


@dataclass
class BatchReport:
    """What `convert_batch` did: one report and one plan per output (keyed by output name)."""

    dest: str
    reports: dict[str, ConversionReport] = field(default_factory=dict)
    plans: dict[str, Plan] = field(default_factory=dict)
    planned: int = 0  # plans made (distinct specs among the sources)
    seconds: float = 0.0

    def summary(self) -> str:
        written = sum(len(r.written) for r in self.reports.values())
        skipped = sum(len(r.skipped) for r in self.reports.values())
        nbytes = sum(r.bytes_written for r in self.reports.values())
        rate = f" ({human_size(nbytes / self.seconds)}/s)" if self.seconds else ""
        resumed = f", {skipped} already complete (resumed)" if skipped else ""
        return (
            f"converted {len(self.reports)} checkpoint(s) with {self.planned} plan(s): wrote "
            f"{written} shard(s), {human_size(nbytes)} in {self.seconds:.2f} s{rate} "
            f"to {self.dest}{resumed}"
        )


def output_name(source: str | os.PathLike[str]) -> str:
    """The output's name for `source`: its base name, without the suffix of a single file
    (anything but a directory).

    >>> output_name("ckpts/step_1000/"), output_name("runs/model.safetensors")
    ('step_1000', 'model')
    """
    text = os.fspath(source).rstrip("/")
    base = text.rsplit("/", 1)[-1]
    if not is_url(text) and not os.path.isdir(text):
        base = os.path.splitext(base)[0]
    return base


def _join(dest: str, name: str) -> str:
    return f"{dest.rstrip('/')}/{name}" if is_url(dest) else os.path.join(dest, name)


def convert_batch(
    sources: Sequence[str | os.PathLike[str]],
    dest: str | os.PathLike[str],
    *,
    plan_for: Callable[[CheckpointSpec], Plan],
    executor: object = None,
    retries: int | None = None,
    partition: tuple[int, int] | None = None,
    format: str = "safetensors",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    metadata: dict[str, str] | None = None,
    overwrite: bool = False,
    progress: bool = False,
    dest_options: dict[str, Any] | None = None,
    keep_cache: bool = False,
) -> BatchReport:
    """Convert every checkpoint in `sources` into its own output under `dest`, resumably.

    Args:
        sources: checkpoint paths; their base names must differ.
        dest: the directory (or object-store prefix) that receives one output per source.
        plan_for: makes the plan for a source's specs; called once per distinct specs.
        executor, retries, partition: as for `weightbridge.streaming.convert.convert`; a
            partition is a byte-balanced share of the whole batch's shards.
        format, max_shard_size, metadata, overwrite, progress, dest_options, keep_cache: as for
            `weightbridge.streaming.convert.convert`, for every output.

    Raises:
        ConversionError: two sources with one base name, or any conversion's error.
        PlanError: a plan does not fit its source.

    Example:
        >>> import os, tempfile, numpy as np
        >>> from weightbridge import io as wio
        >>> from weightbridge.plan import Plan
        >>> from weightbridge.planning.planner import make_plan
        >>> d = tempfile.mkdtemp()
        >>> for step in (1, 2):
        ...     wio.write_checkpoint(f"{d}/step_{step}.safetensors", {"w": np.ones((2, 3), "f4")})
        >>> r = convert_batch([f"{d}/step_1.safetensors", f"{d}/step_2.safetensors"], f"{d}/out",
        ...                   plan_for=lambda spec: make_plan(spec, spec))
        >>> sorted(os.listdir(f"{d}/out")), r.planned
        (['step_1', 'step_2'], 1)
    """
    started = time.perf_counter()
    dest_text = os.fspath(dest)
    names = [output_name(s) for s in sources]
    seen: dict[str, str] = {}
    for src, name in zip(sources, names, strict=True):
        if name in seen:
            raise ConversionError(
                f"{os.fspath(src)} and {seen[name]} would both be written to "
                f"{_join(dest_text, name)}; give the sources different base names"
            )
        seen[name] = os.fspath(src)
    report = BatchReport(dest_text)
    with contextlib.ExitStack() as stack:
        readers: list[Reader] = [stack.enter_context(wio.open_reader(s)) for s in sources]
        by_specs: dict[str, Plan] = {}
        for name, reader in zip(names, readers, strict=True):
            specs = reader.specs()
            key = specs.fingerprint()
            if key not in by_specs:
                by_specs[key] = plan_for(specs)
            report.plans[name] = by_specs[key]
        report.planned = len(by_specs)
        selects = _partition_batch(
            [report.plans[n] for n in names],
            [_join(dest_text, n) for n in names],
            partition,
            format=format,
            max_shard_size=max_shard_size,
            dest_options=dest_options,
            metadata=metadata,
        )

        def open_one(i: int, stack: contextlib.ExitStack) -> _Job:
            job = open_job(
                report.plans[names[i]],
                readers[i],
                _join(dest_text, names[i]),
                stack,
                format=format,
                max_shard_size=max_shard_size,
                metadata=metadata,
                overwrite=overwrite,
                dest_options=dest_options,
                partition=partition,
                select=selects[i],
            )
            report.reports[names[i]] = job.report
            return job

        bar = _BatchBar(len(sources), progress)
        try:
            if is_in_process(executor):
                # One checkpoint at a time: the pipeline already keeps this machine busy, and
                # one open conversion holds one lock and one read-ahead.
                for i in range(len(sources)):
                    with contextlib.ExitStack() as one:
                        job = open_one(i, one)
                        bar.add(job)
                        _produce_here(job, bar.update, keep_cache)
                        _finish(job, bar)
            else:
                jobs = [open_one(i, stack) for i in range(len(sources))]
                for job in jobs:
                    bar.add(job)
                runner = runner_for(executor, retries=retries)
                try:
                    run_tasks(
                        runner, jobs, on_bytes=bar.update, on_job_done=lambda j: _finish(j, bar)
                    )
                finally:
                    runner.close()
        finally:
            bar.close()
    report.seconds = time.perf_counter() - started
    return report


def _partition_batch(
    plans: Sequence[Plan],
    dests: Sequence[str],
    partition: tuple[int, int] | None,
    *,
    format: str,
    max_shard_size: int | str,
    dest_options: dict[str, Any] | None,
    metadata: dict[str, str] | None = None,
) -> list[set[str] | None]:
    """For ``partition=(I, N)``: the shard names of each output that part I takes, balanced by
    bytes over the whole batch (a batch of single-shard checkpoints still splits N ways)."""
    if partition is None:
        return [None] * len(plans)
    layouts = [
        layout(
            p,
            d,
            format=format,
            max_shard_size=max_shard_size,
            dest_options=dest_options,
            metadata=metadata,
        )
        for p, d in zip(plans, dests, strict=True)
    ]
    flat = [(i, s) for i, shards in enumerate(layouts) for s in shards]
    picked = partition_indices([s.nbytes for _, s in flat], *partition)
    selects: list[set[str]] = [set() for _ in plans]
    for k in picked:
        i, shard = flat[k]
        selects[i].add(shard.name)
    return [*selects]


def _finish(job: _Job, bar: _BatchBar) -> None:
    if job.partition is None:
        finish_job(job)
    bar.checkpoint_done(job)


class _BatchBar:
    """One tqdm bar for the batch: bytes, with shards and checkpoints done beside it."""

    def __init__(self, checkpoints: int, enabled: bool) -> None:
        self.checkpoints, self.done, self.shards, self.shards_done = checkpoints, 0, 0, 0
        self.bar: Any = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=0, unit="B", unit_scale=True, unit_divisor=1024, desc="batch",
                dynamic_ncols=True,
            )  # fmt: skip

    def add(self, job: _Job) -> None:
        """Count a conversion in: its bytes to write, and what it already has."""
        self.shards += len(job.todo) + len(job.report.skipped)
        self.shards_done += len(job.report.skipped)
        if self.bar is not None:
            self.bar.total += job_bytes(job)
            self._postfix()

    def update(self, nbytes: int) -> None:
        if self.bar is not None:
            self.bar.update(nbytes)

    def checkpoint_done(self, job: _Job) -> None:
        self.done += 1
        self.shards_done += len(job.todo)
        self._postfix()

    def _postfix(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(
                f"shards {self.shards_done}/{self.shards}, "
                f"checkpoints {self.done}/{self.checkpoints}"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
