"""Execute a plan: lay out the output shards, then stream tensors into them, resumably.

Phase two of two. Nothing here decides anything: the plan says what each target tensor is made
of, `layout_shards` fixes which file it goes to and where, and then each shard is one
independent unit of work, produced by `fill_shard` from the plan and the shard alone:

* sources are memory-mapped, and a `Readahead` thread pulls them into the page cache in file
  order, ahead of the transforms, with large sequential reads;
* each tensor is transformed tile by tile on a small thread pool, a window of tiles in flight
  across tensor boundaries. Where the writer can place a tile anywhere (safetensors: the header
  fixes every offset) each worker transposes straight into the mapped output file; other
  writers take tiles in file order from a writer thread through a bounded queue. Anonymous
  memory stays at a few tiles (plus one tensor when an op cannot be a view);
* a tensor that needs no op other than a reshape is copied file to file by the kernel;
* a shard is written under a temporary name; its commit (fsync, rename, then the journal's
  record of its size and checksum) runs on its own thread while the next shard is produced;
  the index is written last, so a directory that has an index (or a single final file) is
  complete.

Rerunning after a crash skips recorded shards after re-checking them and produces byte-identical
output, because every byte of a shard is a function of the plan alone.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from weightbridge import dtypes
from weightbridge import io as wio
from weightbridge.errors import ConversionError, VerifyError, WeightbridgeError
from weightbridge.io.base import ByteRange
from weightbridge.ops import Reshape
from weightbridge.plan import Plan, Step
from weightbridge.spec import TensorSpec
from weightbridge.streaming.checksum import Checksum
from weightbridge.streaming.dest import Destination, ShardSink, destination_for
from weightbridge.streaming.journal import Journal
from weightbridge.streaming.readahead import Readahead
from weightbridge.streaming.transform import blocked_copy, compute, source_view, tiles

# Hugging Face's default shard limit; a tensor larger than the limit gets a shard of its own.
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
# Tiles waiting for the writer thread. With 32 MB tiles and two transform workers this keeps
# at most ~6 tiles (~200 MB) in flight: the memory budget, with room to keep the disk busy.
QUEUE_TILES = 2
TRANSFORM_WORKERS = 2
# Filled shards waiting for their commits (fsync, rename, journal, in order on one thread).
# One fsync of a 1 GB shard took 1.7-2.4 s on the test VM, longer than filling the next one
# (about 1.4 s), so with one in flight the fill waited; with two it waits less (4 GB,
# interleaved: 11.3-13.2 s against 11.7-14.3 s). A crash loses at most these uncommitted
# shards, which a rerun redoes; dirty pages stay within the kernel's own limits.
COMMITS_IN_FLIGHT = 2

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}


def parse_size(text: str | int) -> int:
    """Parse a size like ``5GB``, ``500MiB`` or ``1024``.

    >>> parse_size("5GB"), parse_size("2MiB"), parse_size(10)
    (5000000000, 2097152, 10)
    """
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ConversionError(f"cannot read size {text!r}; write it like 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "").lower().rstrip("b")
    return int(float(m.group(1)) * _UNITS[unit])


@dataclass(frozen=True, slots=True)
class Shard:
    """One output file and the steps whose tensors it holds, in file order."""

    name: str
    steps: tuple[Step, ...]

    @property
    def nbytes(self) -> int:
        return sum(s.target.nbytes for s in self.steps)


def layout_shards(
    plan: Plan, *, format: str = "safetensors", max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
) -> list[Shard]:
    """Split the plan's targets, in order, into shards of at most `max_shard_size` bytes."""
    limit = parse_size(max_shard_size)
    suffix = wio.writer_class(format).suffix  # type: ignore[attr-defined]
    groups: list[list[Step]] = []
    size = 0
    for step in plan.steps:
        n = step.target.nbytes
        if not groups or (size + n > limit and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(step)
        size += n
    if not groups:
        groups = [[]]
    if len(groups) == 1:
        return [Shard(f"model{suffix}", tuple(groups[0]))]
    total = len(groups)
    return [
        Shard(f"model-{i:05d}-of-{total:05d}{suffix}", tuple(g)) for i, g in enumerate(groups, 1)
    ]


def index_name(format: str) -> str:
    suffix = wio.writer_class(format).suffix  # type: ignore[attr-defined]
    return f"model{suffix}.index.json"


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


def _open_source(source: Any) -> tuple[Any, bool]:
    if isinstance(source, (str, os.PathLike)):
        return wio.open_reader(source), True
    return source, False


def _job_id(plan: Plan, shards: list[Shard], format: str, metadata: dict[str, str] | None) -> str:
    layout = [[s.name, [st.target.name for st in s.steps]] for s in shards]
    blob = repr((plan.fingerprint(), format, layout, sorted((metadata or {}).items())))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def convert(
    plan: Plan,
    source: Any,
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
        shards = layout_shards(
            plan, format=format, max_shard_size=_shard_limit(target, format, max_shard_size)
        )
        outputs = [s.name for s in shards] + ([index_name(format)] if len(shards) > 1 else [])
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
            Readahead(_source_ranges(reader, todo), drop_behind=not keep_cache)
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
                index_name(format),
                {"metadata": {"total_size": plan.target.nbytes}, "weight_map": weight_map},
            )
        if hasattr(target, "finalize"):  # orbax/zarr: top-level metadata, after every shard
            target.finalize(outputs)
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
    cap = getattr(target, "max_object_size", None)
    cap = cap(format) if callable(cap) else None
    return min(limit, cap) if cap else limit


def _source_state(reader: Any) -> list[list[Any]]:
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


def hash_shard(reader: Any, shard: Shard) -> str:
    """The checksum `write_shard` records, recomputed by reading the shard back through our reader."""
    h = Checksum()
    for step in shard.steps:
        _hash_array(h, reader.read(step.target.name))
        reader.release(step.target.name)
    return h.hexdigest()


def _hash_array(h: Any, a: np.ndarray) -> None:
    if a.size:
        h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)


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


def _is_byte_copy(step: Step, source: TensorSpec) -> bool:
    return (
        len(step.sources) == 1
        and all(isinstance(op, Reshape) for op in step.ops)
        and source.dtype == step.target.dtype
    )


def write_shard(
    reader: Any,
    shard: Shard,
    dest: Destination,
    *,
    format: str,
    metadata: dict[str, str] | None = None,
    on_bytes: Callable[[int], Any] | None = None,
    pool: ThreadPoolExecutor | None = None,
) -> tuple[int, str]:
    """Produce one output shard (atomically) and return (file size, content checksum).

    Depends only on the reader's data and the shard, so any process can produce any shard.
    `pool` runs the transforms (one is made for this shard when not given).
    """
    sink, digest = fill_shard(
        reader, shard, dest, format=format, metadata=metadata, on_bytes=on_bytes, pool=pool
    )
    return commit_shard(sink, dest, shard), digest


def fill_shard(
    reader: Any,
    shard: Shard,
    dest: Destination,
    *,
    format: str,
    metadata: dict[str, str] | None = None,
    on_bytes: Callable[[int], Any] | None = None,
    pool: ThreadPoolExecutor | None = None,
    readahead: Readahead | None = None,
) -> tuple[ShardSink, str]:
    """Write every tensor of one shard into a new sink; return it, uncommitted, with the
    checksum of its tensor bytes. On failure the sink is aborted (nothing is left behind).

    Writers that can place a tile anywhere (`target_array`: safetensors) are filled by the
    transform workers directly; the others take tiles in file order from a writer thread.
    """
    sink = dest.open_shard(shard.name, format, [s.target for s in shard.steps], metadata)
    own_pool = pool is None
    workers = pool or ThreadPoolExecutor(
        TRANSFORM_WORKERS, thread_name_prefix="weightbridge-transform"
    )
    fill = _fill_at_random if hasattr(sink.writer, "target_array") else _fill_in_order
    try:
        digest = fill(reader, shard, sink.writer, workers, on_bytes, readahead)
    except BaseException as e:
        sink.abort()
        mapped = _write_error(e, dest, shard)
        if mapped is e:
            raise
        raise mapped from e
    finally:
        if own_pool:
            workers.shutdown(wait=True)
    return sink, digest


def _fill_at_random(
    reader: Any,
    shard: Shard,
    writer: Any,
    pool: ThreadPoolExecutor,
    on_bytes: Callable[[int], Any] | None,
    readahead: Readahead | None,
) -> str:
    """Each worker transforms its tile straight into the writer's mapped file and returns the
    tile's CRC; the CRCs are joined here in file order. No writer thread, no tile buffers."""

    def place_tile(part: np.ndarray, target: TensorSpec, row: int) -> tuple[int, int]:
        out = writer.target_array(target.name)
        dst = out[row : row + part.shape[0]] if out.ndim else out
        if dst.size:
            blocked_copy(dst, part)
        return _crc(dst), dst.nbytes

    def place_copy(step: Step, brange: ByteRange, view: np.ndarray) -> tuple[int, int]:
        if not writer.copy_at(step.target.name, brange):
            out = writer.target_array(step.target.name)
            if out.size:
                blocked_copy(out, view.reshape(out.shape))
        return _crc(view), step.target.nbytes

    checksum = Checksum()
    items = _produce(
        reader,
        shard,
        pool,
        prefetch=readahead is None,
        tile_job=place_tile,
        copy_job=place_copy,
    )
    for item in items:
        if item[0] == "release":
            _release(reader, item[1], readahead)
        else:
            crc, size = item[2]
            checksum.combine(crc, size)
            if on_bytes:
                on_bytes(size)
    return checksum.hexdigest()


def _release(reader: Any, step: Step, readahead: Readahead | None) -> None:
    """A step's tiles are all written: unmap its sources and let the read-ahead move on."""
    for name in step.sources:
        reader.release(name)
    if readahead is not None:
        readahead.consumed(_step_ranges(reader, step))


def _crc(a: np.ndarray) -> int:
    h = Checksum()
    _hash_array(h, a)
    return h.crc


def _fill_in_order(
    reader: Any,
    shard: Shard,
    writer: Any,
    pool: ThreadPoolExecutor,
    on_bytes: Callable[[int], Any] | None,
    readahead: Readahead | None,
) -> str:
    """Tiles go through a bounded queue to a writer thread, which writes them in file order."""
    hasher = Checksum()
    items: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_TILES)
    # The checksum runs on its own thread, beside the writes: on the writer thread it was a
    # third of that thread's time, and the writer is the pipeline's narrowest stage.
    sums: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_TILES)
    failure: list[BaseException] = []

    def checksum() -> None:
        while (array := sums.get()) is not None:
            _hash_array(hasher, array)

    def consume() -> None:
        try:
            while (item := items.get()) is not None:
                kind = item[0]
                if kind == "tile":
                    _, name, (row, tile) = item
                    writer.write(name, tile, row)
                    sums.put(tile)
                    if on_bytes:
                        on_bytes(tile.nbytes)
                elif kind == "copy":
                    _, step, brange, view = item
                    if not writer.copy_from(step.target.name, brange):
                        for row, tile in tiles(view.reshape(step.target.shape), step.target):
                            writer.write(step.target.name, tile, row)
                    sums.put(view)
                    if on_bytes:
                        on_bytes(step.target.nbytes)
                elif kind == "release":
                    _release(reader, item[1], readahead)
        except BaseException as e:  # handed to the producer, which re-raises it
            failure.append(e)
            while items.get() is not None:  # unblock the producer
                pass

    thread = threading.Thread(target=consume, name=f"weightbridge-writer-{shard.name}", daemon=True)
    summer = threading.Thread(
        target=checksum, name=f"weightbridge-checksum-{shard.name}", daemon=True
    )
    thread.start()
    summer.start()
    try:
        for item in _produce(reader, shard, pool, prefetch=readahead is None):
            if failure:
                break
            items.put(item)
    finally:
        items.put(None)
        thread.join()
        sums.put(None)
        summer.join()
    if failure:
        raise failure[0]
    return hasher.hexdigest()


def commit_shard(sink: ShardSink, dest: Destination, shard: Shard) -> int:
    """Make a filled shard visible under its final name (local: fsync + rename); its size."""
    try:
        return sink.commit()
    except BaseException as e:
        sink.abort()
        mapped = _write_error(e, dest, shard)
        if mapped is e:
            raise
        raise mapped from e


def _write_error(e: BaseException, dest: Destination, shard: Shard) -> BaseException:
    """The error to report for a failed shard write: out of space and I/O errors named."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return ConversionError(
            f"{dest.url}: out of space writing {shard.name} ({e.strerror}); this shard needs "
            f"{shard.nbytes / 1e6:.1f} MB. Free space and rerun the same command: committed "
            "shards are kept and the conversion resumes with this one"
        )
    if isinstance(e, OSError):
        return ConversionError(
            f"{dest.url}/{shard.name}: writing failed ({e.strerror or e}); a rerun resumes"
        )
    return e


def _source_ranges(reader: Any, shards: list[Shard]) -> list[ByteRange]:
    """The source byte ranges the shards read, in the order the converter reads them."""
    return [r for shard in shards for step in shard.steps for r in _step_ranges(reader, step)]


def _step_ranges(reader: Any, step: Step) -> list[ByteRange]:
    ranges = (reader.byte_range(s) for s in step.sources)
    return [r for r in ranges if r is not None and r.length > 0]


def _produce(
    reader: Any,
    shard: Shard,
    pool: ThreadPoolExecutor,
    *,
    prefetch: bool = True,
    tile_job: Callable[[np.ndarray, TensorSpec, int], Any] | None = None,
    copy_job: Callable[[Step, ByteRange, np.ndarray], Any] | None = None,
) -> Iterator[tuple[Any, ...]]:
    """Queue items for one shard, in order: tiles (transformed on `pool`), byte copies, releases.

    A window of transforms stays in flight across tensor boundaries, so both workers stay busy
    even when every tensor is a single tile; items leave in submission order.
    """
    specs = reader.specs()
    window: deque[Any] = deque()
    limit = 2 * TRANSFORM_WORKERS

    def ready() -> Iterator[tuple[Any, ...]]:
        while window and (len(window) > limit or not isinstance(window[0], Future)):
            head = window.popleft()
            if isinstance(head, Future):
                yield (head.kind, head.name, head.result())  # type: ignore[attr-defined]
            else:
                yield head

    try:
        # Without a Readahead thread, ask the reader to read the next tensor while we transform.
        advise = getattr(reader, "prefetch", None) if prefetch else None
        if advise and shard.steps:
            for s in shard.steps[0].sources:
                advise(s)
        for i, step in enumerate(shard.steps):
            if advise and i + 1 < len(shard.steps):
                for s in shard.steps[i + 1].sources:
                    advise(s)
            if len(step.sources) > 1:
                # Concat/stack materialise the whole group: let the previous group's tiles finish
                # first, so at most one group is held (the memory bound is the largest group).
                limit, saved = 0, limit
                yield from ready()
                limit = saved
            arrays = [reader.read(s) for s in step.sources]
            brange: ByteRange | None = None
            if _is_byte_copy(step, specs[step.sources[0]]):
                brange = reader.byte_range(step.sources[0])
            if brange is not None and copy_job is not None:
                fut = pool.submit(copy_job, step, brange, arrays[0])
                fut.kind, fut.name = "copied", step.target.name  # type: ignore[attr-defined]
                window.append(fut)
            elif brange is not None:
                window.append(("copy", step, brange, arrays[0]))
            else:
                view = source_view(arrays, step.ops)
                if view.shape != step.target.shape:
                    view = view.reshape(step.target.shape)
                for row, part in _tile_slices(view, step.target):
                    fut = pool.submit(tile_job or _one_tile, part, step.target, row)
                    fut.kind, fut.name = "tile", step.target.name  # type: ignore[attr-defined]
                    window.append(fut)
                    del part  # only the future holds the slice, so the group dies with its tiles
                    yield from ready()
                del view
            del arrays
            window.append(("release", step))
            yield from ready()
        limit = 0
        yield from ready()
    finally:
        # Abandoned (an error): the workers may still be writing into the shard; let them
        # finish before the caller aborts it.
        for head in window:
            if isinstance(head, Future) and not head.cancel():
                with contextlib.suppress(BaseException):
                    head.result()


def _tile_slices(view: np.ndarray, target: TensorSpec) -> Iterator[tuple[int, np.ndarray]]:
    if view.ndim == 0 or view.size == 0:
        yield 0, view
        return
    from weightbridge.streaming.transform import TILE_BYTES

    # Sized by the wider of the two dtypes: a bf16 -> f32 cast allocates f32 tiles.
    itemsize = max(view.dtype.itemsize, dtypes.itemsize(target.dtype))
    row_bytes = max(1, (view.size // view.shape[0]) * itemsize)
    rows = max(1, TILE_BYTES // row_bytes)
    for r0 in range(0, view.shape[0], rows):
        yield r0, view[r0 : r0 + rows]


def _one_tile(part: np.ndarray, target: TensorSpec, row: int) -> tuple[int, np.ndarray]:
    ((_, tile),) = tiles(
        part, TensorSpec(target.name, part.shape, target.dtype), tile_bytes=1 << 62
    )
    return row, tile


def verify(
    plan: Plan,
    source: Any,
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
