"""One output shard as one task: a picklable value any process can run, and its record.

`ShardTask` names everything a process needs to produce one shard on its own: the plan (as
JSON text, so a worker on another machine parses it), where the source is, where the output
goes, the format, the shard size limit and the shard's number. `produce_shard` runs it:
it lays the shards out again from the plan (`assign_shards` is deterministic), writes shard
number `index` under a temporary name, commits it atomically, and then writes the shard's
*record* (``.weightbridge/committed/<name>.json``: job, size, checksum). Records are one small
file per shard, written by whoever committed the shard, so many writers never contend, and a
rerun (or the coordinator) learns which shards are done by reading them.

`partition` picks a deterministic, byte-balanced subset of shards for ``--partition I/N``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from weightbridge import io as wio
from weightbridge.errors import ConversionError
from weightbridge.io._remote import remote_options
from weightbridge.io.zarr import STATE_PREFIX
from weightbridge.plan import Plan
from weightbridge.planning.shards import Shard, assign_shards
from weightbridge.streaming.dest.base import Destination
from weightbridge.streaming.dest.local import destination_for
from weightbridge.streaming.pipeline import commit_shard, fill_shard

# Where per-shard records live (beside the object store's own ``.weightbridge/shards/``, which
# holds zarr/orbax shard contents, not completion records).
RECORD_PREFIX = f"{STATE_PREFIX}committed/"


@dataclass(frozen=True, slots=True)
class ShardRecord:
    """A committed shard: its name, size in bytes and content checksum (see `checksum`)."""

    name: str
    size: int
    checksum: str
    # The destination's stamp of the committed shard (`Destination.stamp`), None if it has none.
    stamp: str | None = None


@dataclass(frozen=True)
class ShardTask:
    """Everything one process needs to produce output shard number `index` alone.

    `plan` is the plan's JSON text (or the `Plan` itself when it holds a Python function and
    has no JSON form; such a task runs only where the function pickles). `dest` is a path or
    URL (or a picklable `Destination`), opened with `dest_options` in the worker.
    """

    plan: str | Plan
    source: str
    dest: str | Destination
    format: str
    max_shard_size: int
    index: int
    name: str
    nbytes: int
    job: str
    metadata: dict[str, str] | None = None
    dest_options: dict[str, Any] = field(default_factory=dict)
    # Where an object-URL source is read from (``endpoint``, ``aws_region``): the options the
    # conversion ran with, which a worker process does not inherit (`io._remote.remote_options`).
    source_options: dict[str, str | None] = field(default_factory=dict)


def record_name(shard: str) -> str:
    """The destination-relative name of a shard's record."""
    return f"{RECORD_PREFIX}{shard}.json"


def write_record(dest: Destination, job: str, record: ShardRecord) -> None:
    obj: dict[str, Any] = {"job": job, "size": record.size, "checksum": record.checksum}
    if record.stamp is not None:
        obj["stamp"] = record.stamp
    dest.write_json(record_name(record.name), obj)


def read_record(dest: Destination, job: str, shard: str) -> dict[str, Any] | None:
    """The record of `shard` written for conversion `job`, as ``{"size", "checksum"}``."""
    try:
        obj = dest.read_json(record_name(shard))
    except ConversionError:  # a damaged record vouches for nothing: the shard is redone
        return None
    if not isinstance(obj, dict) or obj.get("job") != job:
        return None
    return {"size": obj.get("size"), "checksum": obj.get("checksum"), "stamp": obj.get("stamp")}


def _shards(task: ShardTask) -> tuple[Plan, list[Shard]]:
    if isinstance(task.plan, Plan):
        return task.plan, assign_shards(
            task.plan,
            suffix=wio.writer_class(task.format).suffix,
            max_shard_size=task.max_shard_size,
            stored_nbytes=wio.stored_nbytes_of(task.format, task.metadata),
        )
    metadata = tuple(sorted((task.metadata or {}).items()))
    return _parsed(task.plan, task.format, task.max_shard_size, metadata)


@functools.lru_cache(maxsize=8)
def _parsed(
    plan_json: str, format: str, max_shard_size: int, metadata: tuple[tuple[str, str], ...]
) -> tuple[Plan, list[Shard]]:
    # A worker runs many tasks of one plan: parse it and lay out its shards once.
    plan = Plan.from_json(json.loads(plan_json))
    shards = assign_shards(
        plan,
        suffix=wio.writer_class(format).suffix,
        max_shard_size=max_shard_size,
        stored_nbytes=wio.stored_nbytes_of(format, dict(metadata)),
    )
    return plan, shards


def produce_shard(task: ShardTask) -> ShardRecord:
    """Produce, commit and record one output shard; byte-identical wherever it runs.

    The shard is written under a temporary name and renamed (or uploaded whole), so a process
    killed mid-task leaves nothing under the final name; a retry simply writes it again.
    """
    plan, shards = _shards(task)
    shard = shards[task.index]
    if shard.name != task.name:
        raise ConversionError(
            f"{task.name}: this worker lays the plan out differently (shard {task.index} is "
            f"{shard.name}); run the same weightbridge version everywhere"
        )
    target = destination_for(task.dest, format=task.format, **task.dest_options)
    with remote_options(**task.source_options), wio.open_reader(task.source) as reader:
        plan.validate(reader.specs())
        sink, digest = fill_shard(reader, shard, target, format=task.format, metadata=task.metadata)
        size = commit_shard(sink, target, shard)
    record = ShardRecord(shard.name, size, digest, target.stamp(shard.name))
    write_record(target, task.job, record)
    return record


def partition(shards: Sequence[Shard], part: int, parts: int) -> list[Shard]:
    """Part `part` (1 to `parts`) of `shards`: deterministic and balanced by bytes.

    Shards go, biggest first (ties: the earlier shard), to the part with the fewest bytes so
    far (ties: the fewest shards, then the lower part), so every run of ``--partition I/N``
    picks the same subset.

    >>> from weightbridge.planning.shards import Shard
    >>> [s.name for s in partition([Shard("a", ()), Shard("b", ())], 2, 2)]
    ['b']
    """
    picked = set(partition_indices([s.nbytes for s in shards], part, parts))
    return [s for i, s in enumerate(shards) if i in picked]


def partition_indices(sizes: Sequence[int], part: int, parts: int) -> list[int]:
    """The positions in `sizes` that part `part` of `parts` takes (see `partition`).

    >>> partition_indices([5, 1, 4, 2], 1, 2), partition_indices([5, 1, 4, 2], 2, 2)
    ([0, 1], [2, 3])
    """
    if not (isinstance(parts, int) and isinstance(part, int) and 1 <= part <= parts):
        raise ConversionError(
            f"partition {part}/{parts}: write it as I/N with 1 <= I <= N (e.g. 1/4 ... 4/4)"
        )
    loads, counts = [0] * parts, [0] * parts
    mine: list[int] = []
    for i, size in sorted(enumerate(sizes), key=lambda p: (-p[1], p[0])):
        k = min(range(parts), key=lambda j: (loads[j], counts[j], j))
        loads[k] += size
        counts[k] += 1
        if k == part - 1:
            mine.append(i)
    return sorted(mine)
