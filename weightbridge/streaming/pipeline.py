"""Produce one output shard: read each source tensor, transform it tile by tile, write it.

`fill_shard` writes every tensor of one shard into a new sink and returns it uncommitted, with
the checksum of its tensor bytes; `commit_shard` makes it visible. Between the two:

* `_produce` walks the shard's steps in file order and yields typed items: a `Tile`
  (transformed on a small thread pool, a window of tiles in flight across tensor boundaries),
  a `ByteCopy` (a tensor that needs no op but a reshape: the kernel can copy it file to file),
  a `Placed` (a tile or copy a worker already put in the output) and a `Release` (a step's
  items are all out: unmap its sources);
* where the writer can place a tile anywhere (a `PlacingWriter`: safetensors, whose header
  fixes every offset) the workers transform straight into the mapped output file
  (`_fill_at_random`); other writers take tiles in file order from a writer thread through a
  bounded queue (`_fill_in_order`). Anonymous memory stays at a few tiles (plus one tensor
  when an op cannot be a view).

Depends only on the reader's data and the shard, so any process can produce any shard.
"""

from __future__ import annotations

import contextlib
import errno
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from weightbridge import dtypes
from weightbridge.errors import ConversionError
from weightbridge.io.base import ByteRange, PlacingWriter, Reader, ShardWriter
from weightbridge.ops import Reshape
from weightbridge.plan import Step
from weightbridge.planning.shards import Shard
from weightbridge.spec import TensorSpec
from weightbridge.streaming import transform
from weightbridge.streaming.checksum import Checksum, crc32
from weightbridge.streaming.dest.base import Destination, ShardSink
from weightbridge.streaming.rawbits import RawSources
from weightbridge.streaming.readahead import Readahead
from weightbridge.streaming.transform import Rows, blocked_copy, source_view, tiles

# Tiles waiting for the writer thread. With 32 MB tiles and two transform workers this keeps
# at most ~6 tiles (~200 MB) in flight: the memory budget, with room to keep the disk busy.
QUEUE_TILES = 2
TRANSFORM_WORKERS = 2
# Jobs submitted ahead for a placing writer: its jobs hold no buffers (their sources are mapped
# views, their output goes straight to the file), so a deep window costs no memory and keeps
# both workers busy past a long job (a 130 MB embedding copy).
PLACING_IN_FLIGHT = 8 * TRANSFORM_WORKERS
# A placing writer's tiles are made this many bytes at a time in a per-thread buffer (`place_tile`).
CHUNK_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class Tile:
    """Rows `row`... of target tensor `name`, transformed, for the writer to write in order."""

    name: str
    row: int
    data: np.ndarray


@dataclass(frozen=True, slots=True)
class ByteCopy:
    """A target tensor whose bytes are its source's (`view`, at `source` in a file): copied file
    to file where the writer can, else written from `view`."""

    step: Step
    source: ByteRange
    view: np.ndarray


@dataclass(frozen=True, slots=True)
class Placed:
    """A tile or tensor a worker already put in the output: its CRC-32 and size, for the
    shard's checksum."""

    crc: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class Release:
    """Every item of `step` has been handed on: its sources can be unmapped."""

    step: Step


Item = Tile | ByteCopy | Placed | Release


def _is_byte_copy(step: Step, source: TensorSpec) -> bool:
    return (
        len(step.sources) == 1
        and all(isinstance(op, Reshape) for op in step.ops)
        and source.dtype == step.target.dtype
    )


def write_shard(
    reader: Reader,
    shard: Shard,
    dest: Destination,
    *,
    format: str,
    metadata: dict[str, str] | None = None,
    on_bytes: Callable[[int], object] | None = None,
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
    reader: Reader,
    shard: Shard,
    dest: Destination,
    *,
    format: str,
    metadata: dict[str, str] | None = None,
    on_bytes: Callable[[int], object] | None = None,
    pool: ThreadPoolExecutor | None = None,
    readahead: Readahead | None = None,
) -> tuple[ShardSink, str]:
    """Write every tensor of one shard into a new sink; return it, uncommitted, with the
    checksum of its tensor bytes. On failure the sink is aborted (nothing is left behind).

    Writers that can place a tile anywhere (`PlacingWriter`: safetensors) are filled by the
    transform workers directly; the others take tiles in file order from a writer thread.
    """
    sink = dest.open_shard(shard.name, format, [s.target for s in shard.steps], metadata)
    own_pool = pool is None
    workers = pool or ThreadPoolExecutor(
        TRANSFORM_WORKERS, thread_name_prefix="weightbridge-transform"
    )
    writer = sink.writer
    try:
        if isinstance(writer, PlacingWriter):
            digest = _fill_at_random(reader, shard, writer, workers, on_bytes, readahead)
        else:
            digest = _fill_in_order(reader, shard, writer, workers, on_bytes, readahead)
    except BaseException as e:
        sink.abort()
        mapped = write_error(e, dest, shard)
        if mapped is e:
            raise
        raise mapped from e
    finally:
        if own_pool:
            workers.shutdown(wait=True)
    return sink, digest


def _fill_at_random(
    reader: Reader,
    shard: Shard,
    writer: PlacingWriter,
    pool: ThreadPoolExecutor,
    on_bytes: Callable[[int], object] | None,
    readahead: Readahead | None,
) -> str:
    """Each worker transforms its tile straight into the writer's mapped file and returns the
    tile's CRC; the CRCs are joined here in file order. No writer thread, no tile buffers."""

    buffers = threading.local()

    def place_tile(part: Rows, target: TensorSpec, row: int, bits: bool) -> Placed:
        # A tile is made in chunks of rows in a small per-thread buffer that stays in the CPU
        # cache, checksummed there, and handed to the kernel with pwrite (`write_at`).
        dtype = part.dtype if bits else dtypes.to_numpy(target.dtype)
        if part.ndim == 0 or part.size == 0:
            tile = np.empty(part.shape, dtype=dtype)
            blocked_copy(tile, part)
            writer.write_at(target.name, 0, tile.reshape(-1).data)
            return Placed(_crc(tile), tile.nbytes)
        row_bytes = (part.size // part.shape[0]) * dtype.itemsize
        rows = max(1, CHUNK_BYTES // row_bytes)
        buf = getattr(buffers, "buf", None)
        if buf is None or buf.nbytes < rows * row_bytes:
            buf = buffers.buf = np.empty(max(CHUNK_BYTES, rows * row_bytes), dtype=np.uint8)
        crc, start = 0, row * row_bytes
        for r0 in range(0, part.shape[0], rows):
            chunk = part[r0 : r0 + rows]
            out = buf[: chunk.shape[0] * row_bytes].view(dtype).reshape(chunk.shape)
            blocked_copy(out, chunk)
            data = out.reshape(-1).view(np.uint8).data
            crc = crc32(data, crc)
            writer.write_at(target.name, start, data)
            start += out.nbytes
        return Placed(crc, part.shape[0] * row_bytes)

    def place_copy(step: Step, brange: ByteRange, view: np.ndarray) -> Placed:
        if not writer.copy_at(step.target.name, brange):
            out = writer.target_array(step.target.name)
            if out.size:
                blocked_copy(out, view.reshape(out.shape))
        return Placed(_crc(view), step.target.nbytes)

    checksum = Checksum()
    raw = RawSources(reader, reader.specs())
    items = _produce(
        reader,
        shard,
        pool,
        prefetch=readahead is None,
        tile_job=place_tile,
        copy_job=place_copy,
        raw=raw,
        in_flight=PLACING_IN_FLIGHT,
    )
    try:
        _place_all(reader, shard, writer, items, checksum, on_bytes, readahead, raw)
    finally:
        raw.close()
    return checksum.hexdigest()


def _place_all(
    reader: Reader,
    shard: Shard,
    writer: PlacingWriter,
    items: Iterator[Item],
    checksum: Checksum,
    on_bytes: Callable[[int], object] | None,
    readahead: Readahead | None,
    raw: RawSources,
) -> None:
    for item in items:
        if isinstance(item, Release):
            # Unmap first: the read-ahead's drop-behind cannot evict pages still mapped here.
            raw.release(step_ranges(reader, item.step))
            _release(reader, item.step, readahead)
        elif isinstance(item, Placed):
            checksum.combine(item.crc, item.nbytes)
            writer.placed_through(checksum.size)  # items arrive in file order
            if on_bytes:
                on_bytes(item.nbytes)
        else:  # pragma: no cover - both jobs place what they produce
            raise TypeError(f"{shard.name}: unexpected {type(item).__name__} for a placing writer")


def _release(reader: Reader, step: Step, readahead: Readahead | None) -> None:
    """A step's tiles are all written: unmap its sources and let the read-ahead move on."""
    for name in step.sources:
        reader.release(name)
    if readahead is not None:
        readahead.consumed(step_ranges(reader, step))


def _crc(a: np.ndarray) -> int:
    h = Checksum()
    hash_array(h, a)
    return h.crc


def hash_array(h: Checksum, a: np.ndarray) -> None:
    """Feed an array's bytes, in C order, to a checksum."""
    if a.size:
        h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)


def hash_shard(reader: Reader, shard: Shard) -> str:
    """The checksum `fill_shard` returns, recomputed by reading the shard back through `reader`
    (the bytes stored where its writer stores others than the tensor's: a quantized GGUF)."""
    h = Checksum()
    read = getattr(reader, "stored_bytes", reader.read)
    for step in shard.steps:
        hash_array(h, read(step.target.name))
        reader.release(step.target.name)
    return h.hexdigest()


def _fill_in_order(
    reader: Reader,
    shard: Shard,
    writer: ShardWriter,
    pool: ThreadPoolExecutor,
    on_bytes: Callable[[int], object] | None,
    readahead: Readahead | None,
) -> str:
    """Tiles go through a bounded queue to a writer thread, which writes them in file order."""
    hasher = Checksum()
    items: queue.Queue[Item | None] = queue.Queue(maxsize=QUEUE_TILES)
    # The checksum runs on its own thread, beside the writes: on the writer thread it was a
    # third of that thread's time, and the writer is the pipeline's narrowest stage.
    sums: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=QUEUE_TILES)
    failure: list[BaseException] = []

    def checksum() -> None:
        while (array := sums.get()) is not None:
            hash_array(hasher, array)

    def consume() -> None:
        try:
            while (item := items.get()) is not None:
                if isinstance(item, Tile):
                    stored = writer.write(item.name, item.data, item.row)
                    sums.put(item.data if stored is None else stored)
                    if on_bytes:  # the bytes stored, as the bar's total (`convert.stored_bytes`)
                        on_bytes(item.data.nbytes if stored is None else stored.nbytes)
                elif isinstance(item, ByteCopy):
                    target = item.step.target
                    stored = None
                    stored_nbytes = 0
                    if not writer.copy_from(target.name, item.source):
                        for row, tile in tiles(item.view.reshape(target.shape), target):
                            stored = writer.write(target.name, tile, row)
                            if stored is not None:  # other bytes than the tile's (quantized)
                                sums.put(stored)
                                stored_nbytes += stored.nbytes
                    if stored is None:
                        sums.put(item.view)
                    if on_bytes:
                        on_bytes(target.nbytes if stored is None else stored_nbytes)
                elif isinstance(item, Release):
                    _release(reader, item.step, readahead)
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
        mapped = write_error(e, dest, shard)
        if mapped is e:
            raise
        raise mapped from e


def write_error(e: BaseException, dest: Destination, shard: Shard) -> BaseException:
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


def source_ranges(reader: Reader, shards: list[Shard]) -> list[ByteRange]:
    """The source byte ranges the shards read, in the order the converter reads them."""
    return [r for shard in shards for step in shard.steps for r in step_ranges(reader, step)]


def step_ranges(reader: Reader, step: Step) -> list[ByteRange]:
    ranges = (reader.byte_range(s) for s in step.sources)
    return [r for r in ranges if r is not None and r.length > 0]


# In flight in `_produce`: a transform on the pool, or an item that needs no worker.
_Pending = Future[Tile | Placed] | Future[Placed] | ByteCopy | Release


def _produce(
    reader: Reader,
    shard: Shard,
    pool: ThreadPoolExecutor,
    *,
    prefetch: bool = True,
    tile_job: Callable[[Rows, TensorSpec, int, bool], Tile | Placed] | None = None,
    copy_job: Callable[[Step, ByteRange, np.ndarray], Placed] | None = None,
    raw: RawSources | None = None,
    in_flight: int = 2 * TRANSFORM_WORKERS,
) -> Iterator[Item]:
    """Items for one shard, in order: tiles (transformed on `pool`), byte copies, releases.

    A window of up to `in_flight` jobs stays submitted across tensor boundaries, so every
    worker stays busy even when every tensor is a single tile or one job runs long; items leave
    in submission order. A step whose source view may be a copy (several sources, a reshape of
    a permuted view, a whole-tensor dequantize) first lets the window drain, so at most one
    such copy is held at a time (the memory bound is the largest tensor).
    """
    specs = reader.specs()
    window: deque[_Pending] = deque()
    limit = in_flight
    jobs = 0  # futures in the window
    make_tile = tile_job or _one_tile

    def ready() -> Iterator[Item]:
        nonlocal jobs
        while window and (jobs > limit or not isinstance(window[0], Future)):
            head = window.popleft()
            if isinstance(head, Future):
                jobs -= 1
                yield head.result()
            else:
                yield head

    def submit(job: Callable[..., Tile | Placed], *args: object) -> None:
        nonlocal jobs
        window.append(pool.submit(job, *args))
        jobs += 1

    try:
        # Without a Readahead thread, ask the reader to read the next tensor while we transform.
        if prefetch and shard.steps:
            for s in shard.steps[0].sources:
                reader.prefetch(s)
        for i, step in enumerate(shard.steps):
            if prefetch and i + 1 < len(shard.steps):
                for s in shard.steps[i + 1].sources:
                    reader.prefetch(s)
            if transform.may_copy(step.ops, len(step.sources)):
                limit, saved = 0, limit
                yield from ready()
                limit = saved
            ranges = raw.ranges(step) if raw is not None else None
            if raw is not None and ranges is not None:  # moves bits only: see rawbits.py
                arrays = raw.arrays(step, ranges)
            else:
                arrays = [reader.read(s) for s in step.sources]
            brange: ByteRange | None = None
            if _is_byte_copy(step, specs[step.sources[0]]):
                brange = reader.byte_range(step.sources[0])
            if brange is not None and copy_job is not None:
                submit(copy_job, step, brange, arrays[0])
            elif brange is not None:
                window.append(ByteCopy(step, brange, arrays[0]))
            else:
                view = source_view(arrays, step.ops)
                if view.shape != step.target.shape:
                    view = view.reshape(step.target.shape)
                for row, part in _tile_slices(view, step.target):
                    submit(make_tile, part, step.target, row, bool(ranges))
                    del part  # only the future holds the slice, so the group dies with its tiles
                    yield from ready()
                del view
            del arrays
            window.append(Release(step))
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


def _tile_slices(view: Rows, target: TensorSpec) -> Iterator[tuple[int, Rows]]:
    if view.ndim == 0 or view.size == 0:
        yield 0, view
        return
    # Sized by the wider of the two dtypes: a bf16 -> f32 cast allocates f32 tiles. Read at
    # call time: tests shrink TILE_BYTES.
    itemsize = max(view.dtype.itemsize, dtypes.itemsize(target.dtype))
    row_bytes = max(1, (view.size // view.shape[0]) * itemsize)
    # As many tiles as TILE_BYTES asks for, of equal rows: a 23 MB weight is two 11.5 MB
    # tiles, not 16 + 7 MB, so the two workers finish together.
    count = -(-view.shape[0] * row_bytes // transform.TILE_BYTES)
    rows = max(1, -(-view.shape[0] // count))
    for r0 in range(0, view.shape[0], rows):
        yield r0, view[r0 : r0 + rows]


def _one_tile(part: Rows, target: TensorSpec, row: int, bits: bool) -> Tile:
    ((_, tile),) = tiles(
        part, TensorSpec(target.name, part.shape, target.dtype), tile_bytes=1 << 62
    )
    return Tile(target.name, row, tile)
