"""Byte-format checkpoints read in place from object stores (``s3://``, ``gs://``, ``https://``).

Every read is a ranged GET through obstore (`weightbridge.io._obstore`); nothing downloads a whole
object. Readers see the same three things they use on local files:

* `RemoteFile`: a seekable, read-only file object for header parsing (zipfile, h5py, pickles,
  the safetensors header). It keeps a few recently fetched windows, so the many small reads a
  parser makes cost few requests; a window grows while the reads run on sequentially (a GGUF
  vocabulary) and starts small again after a seek (the next member's header in a zip).
  ``keep(start, end)`` fetches a range the parser is about to read piecemeal in one request.
* `RemoteBuffer`: the whole object as a sliceable buffer (`len`, ``buf[a:b]``), where a local
  file is memory-mapped for a parser that slices it (GGUF, flax msgpack).
* `RemoteMappedFile`: the counterpart of `weightbridge.io.base.MappedFile`; ``array(offset,
  spec)`` fetches exactly that tensor's bytes (in parallel parts when large), so memory is the
  tensor; ``prefetch`` fetches the next one in the background.

Which store and endpoint: ``remote_options(endpoint=..., aws_region=...)`` sets them for the
sources opened inside it (the API's ``endpoint=`` and the CLI's ``--endpoint`` use it); without
it, the environment decides (`weightbridge.io._obstore.endpoint_from_env`). A reader opened in that
scope keeps its store: each object URL it opened is recorded with its store, size and ETag, so
its tensors can be fetched later from any thread (the converter's workers do not share the
caller's context). Opening an object again (`probe`, which every `open_reader` does) refreshes
the record. Tensor reads send ``If-Match`` with the ETag seen when the header was read, so an
object replaced mid-conversion is an error, not a silent mix of two checkpoints.

Errors: a missing object is a `FormatError`; an unreachable or refusing store a
`StoreUnreachable` naming the URL and the endpoint, within the deadlines of `_obstore`.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from weightbridge import dtypes
from weightbridge.errors import FormatError, WeightbridgeError
from weightbridge.io._obstore import (
    describe_failure,
    is_object_url,
    obstore_module,
    open_store,
    split_url,
)
from weightbridge.io._window import RangeFile
from weightbridge.io.base import MappedFile
from weightbridge.spec import TensorSpec

__all__ = [
    "Listing",
    "RemoteBuffer",
    "RemoteFile",
    "RemoteMappedFile",
    "RemoteOptions",
    "fetch_stats",
    "head_bytes",
    "is_object_url",
    "list_directory",
    "probe",
    "remote_object",
    "remote_options",
]

# The first window of an object, fetched by detection and kept with the object's record: it
# holds the magic bytes and, for most checkpoints, the whole header (a 7B model's safetensors
# shard has ~30 KB of header), so detecting and opening a file costs one ranged GET.
FIRST_BLOCK = 64 << 10
# A parser's small reads fetch at least this much; the window doubles while reads continue
# where the last fetch ended, up to MAX_WINDOW (a request per 8 MiB of a long header). Small,
# because headers scattered through a file (a zip member's, an HDF5 object's, a msgpack
# array's) are a few hundred bytes each, and the rest of a window is tensor data fetched again.
WINDOW = 16 << 10
MAX_WINDOW = 8 << 20
# Recently fetched windows a `RemoteFile` keeps (LRU): enough for h5py's scattered metadata.
CACHE_BYTES = 32 << 20
# Tensor reads larger than this are split into parts fetched concurrently: one stream from an
# object store runs far below its aggregate bandwidth, and a part this size keeps each request
# short (well inside _obstore.REQUEST_TIMEOUT).
PART_BYTES = 16 << 20
PARALLEL_PARTS = 8
# `prefetch` fetches at most this many ranges ahead, each at most PREFETCH_BYTES: a bound on the
# memory held for tensors not yet asked for.
PREFETCH_RANGES = 2
PREFETCH_BYTES = 256 << 20
# What the store said of an object or a prefix counts as fresh for this long: opening a
# checkpoint asks about each object once, not once per step of detection and opening. Longer
# would let a process reopen an object replaced meanwhile from its old header; tensor reads
# send If-Match anyway, so a replaced object is an error, never a mix.
FRESH_SECONDS = 5.0
# First blocks kept at most (the most recently fetched): 16 MiB, a thousand-shard checkpoint
# opened in a long-lived process does not keep 64 MiB of headers.
FIRST_BLOCKS_KEPT = 256


# -- options ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RemoteOptions:
    """Where object URLs are read from: an S3-compatible endpoint and region (None: from the
    environment, see `weightbridge.io._obstore.open_store`)."""

    endpoint: str | None = None
    aws_region: str | None = None


# Outside any `remote_options` block: everything from the environment.
DEFAULT_OPTIONS = RemoteOptions()
_OPTIONS: ContextVar[RemoteOptions] = ContextVar(
    "weightbridge_remote_options", default=DEFAULT_OPTIONS
)


@contextlib.contextmanager
def remote_options(
    *, endpoint: str | None = None, aws_region: str | None = None
) -> Iterator[RemoteOptions]:
    """Read the object URLs opened inside this block from `endpoint` (and `aws_region`).

    An option left None keeps the value of an enclosing block (or the environment's).

    >>> with remote_options(endpoint="http://127.0.0.1:9000") as o:
    ...     o.endpoint
    'http://127.0.0.1:9000'
    """
    outer = _OPTIONS.get()
    options = RemoteOptions(endpoint or outer.endpoint, aws_region or outer.aws_region)
    token = _OPTIONS.set(options)
    try:
        yield options
    finally:
        _OPTIONS.reset(token)


def current_options() -> RemoteOptions:
    return _OPTIONS.get()


@functools.lru_cache(maxsize=64)
def _store(root: str, endpoint: str | None, aws_region: str | None) -> Any:
    # One store per bucket and endpoint: its client pools connections across all reads.
    return open_store(root, endpoint=endpoint, aws_region=aws_region)


def _store_for(url: str, options: RemoteOptions) -> tuple[Any, str]:
    """(store, key) of an object URL."""
    scheme, bucket, key = split_url(url)
    return _store(f"{scheme}://{bucket}", options.endpoint, options.aws_region), key


# -- counting -----------------------------------------------------------------------------------


@dataclass
class _Stats:
    requests: int = 0
    nbytes: int = 0


_stats: dict[str, _Stats] = {}
_stats_lock = threading.Lock()


def _count(url: str, nbytes: int) -> None:
    with _stats_lock:
        s = _stats.setdefault(url, _Stats())
        s.requests += 1
        s.nbytes += nbytes


def fetch_stats() -> dict[str, tuple[int, int]]:
    """Ranged GETs made so far in this process: object URL -> (requests, bytes fetched).

    For tests and benchmarks (how much of an object planning or a conversion fetched).
    """
    with _stats_lock:
        return {url: (s.requests, s.nbytes) for url, s in _stats.items()}


# -- objects ------------------------------------------------------------------------------------


class MissingObject(FormatError):
    """No object at a URL (the bucket or the key does not exist)."""


@dataclass
class _Object:
    """What this process knows of one object: where it is, its size and version."""

    url: str
    store: Any
    key: str
    options: RemoteOptions
    size: int
    etag: str | None
    checked: float  # time.monotonic() of the HEAD
    first: bytes | None = None  # the first min(FIRST_BLOCK, size) bytes, once fetched
    lock: threading.Lock = field(default_factory=threading.Lock)


_objects: dict[str, _Object] = {}
_with_first: OrderedDict[str, None] = OrderedDict()  # objects holding a first block, oldest first
# Recent answers about URLs that are not objects, and listings of prefixes: (when, answer).
_missing: dict[tuple[str, RemoteOptions], float] = {}
_listings: dict[tuple[str, RemoteOptions], tuple[float, Listing]] = {}
_objects_lock = threading.Lock()


def _recent(when: float) -> bool:
    return time.monotonic() - when < FRESH_SECONDS


def _failure(url: str, e: BaseException, options: RemoteOptions) -> WeightbridgeError:
    if isinstance(e, WeightbridgeError):
        return e
    if isinstance(e, FileNotFoundError):
        where = describe_failure(url, e, options.endpoint)
        return MissingObject(str(where))
    if type(e).__name__ == "PreconditionError":
        return FormatError(
            f"{url}: the object changed while weightbridge was reading it (its ETag is no "
            "longer the one its header was read with); rerun once it is no longer being written"
        )
    return describe_failure(url, e, options.endpoint)


def _request_errors() -> tuple[type[BaseException], ...]:
    # obstore raises its own BaseError family, and builtins (FileNotFoundError, PermissionError,
    # TimeoutError, ConnectionError) for some conditions.
    return (obstore_module().exceptions.BaseError, OSError)


def remote_object(url: str, *, fresh: bool = False) -> _Object:
    """The record of the object at `url`: asks the store (HEAD) unless one is known.

    `fresh` asks again even then (a new open of the object). Options set by `remote_options`
    decide the store; a known object keeps the store it was opened with when none are set
    (a worker thread reading a tensor of a reader opened elsewhere).

    Raises:
        MissingObject: no object at `url`.
        StoreUnreachable: the store did not answer or refused the request.
    """
    options = current_options()
    with _objects_lock:
        known = _objects.get(url)
        missing = _missing.get((url, options))
    if (
        known is not None
        and options in (DEFAULT_OPTIONS, known.options)
        and (not fresh or _recent(known.checked))
    ):
        return known
    store, key = _store_for(url, options)
    if not key or key.endswith("/"):
        raise MissingObject(f"{url}: names a directory (a prefix), not an object")
    if missing is not None and _recent(missing):
        raise MissingObject(f"{url}: no such object")
    try:
        meta = obstore_module().head(store, key)
    except _request_errors() as e:
        error = _failure(url, e, options)
        if isinstance(error, MissingObject):
            with _objects_lock:
                _missing[(url, options)] = time.monotonic()
        raise error from e
    etag = meta.get("e_tag")
    record = _Object(url, store, key, options, int(meta["size"]), etag, time.monotonic())
    if known is not None and known.options == options and known.etag == etag and etag:
        record.first = known.first  # the same object as before: its first bytes still hold
    with _objects_lock:
        _objects[url] = record
    return record


def _get(obj: _Object, start: int, end: int) -> Any:
    """Bytes [start, end) of an object, in one ranged GET (a buffer; may be short at the end)."""
    if end <= start:
        return b""
    options: dict[str, Any] = {"range": (start, end)}
    if obj.etag and obj.url.lower().startswith(("s3://", "gs://")):
        options["if_match"] = obj.etag
    try:
        data = obstore_module().get(obj.store, obj.key, options=options).bytes()
    except _request_errors() as e:
        raise _failure(obj.url, e, obj.options) from e
    _count(obj.url, len(data))
    return data


def _short(obj: _Object, start: int, end: int, got: int) -> FormatError:
    return FormatError(
        f"{obj.url}: the object ended early: bytes [{start}, {end}) asked for, {got} came "
        f"(its size was {obj.size} when opened); it was replaced or cut short: copy it again"
    )


def head_bytes(url: str, n: int) -> bytes:
    """The first `n` bytes of an object (fewer if it is shorter), for format detection.

    Fetches FIRST_BLOCK bytes once and keeps them: the reader opened next parses its header
    from them without another request.
    """
    obj = remote_object(url)
    with obj.lock:
        data = obj.first
        if data is None:
            end = min(FIRST_BLOCK, obj.size)
            data = bytes(_get(obj, 0, end))
            if len(data) != end:
                raise _short(obj, 0, end, len(data))
            obj.first = data
        with _objects_lock:
            _with_first[url] = None
            _with_first.move_to_end(url)
            while len(_with_first) > FIRST_BLOCKS_KEPT:
                old = _objects.get(_with_first.popitem(last=False)[0])
                if old is not None:
                    old.first = None
        return data[:n]


@dataclass(frozen=True, slots=True)
class Listing:
    """The entries directly under a directory-like prefix: object names and sub-prefixes."""

    files: tuple[str, ...]
    dirs: tuple[str, ...]


def list_directory(url: str) -> Listing:
    """Object and sub-prefix names directly under `url` (as a directory); empty for HTTP,
    which cannot list."""
    scheme, _, key = split_url(url)
    if scheme.startswith("http"):
        return Listing((), ())
    options = current_options()
    with _objects_lock:
        known = _listings.get((url, options))
    if known is not None and _recent(known[0]):
        return known[1]
    store, _ = _store_for(url, options)
    prefix = key.strip("/")
    try:
        found = obstore_module().list_with_delimiter(store, prefix + "/" if prefix else None)
    except _request_errors() as e:
        raise _failure(url, e, options) from e
    cut = len(prefix) + 1 if prefix else 0
    files = tuple(sorted(o["path"][cut:] for o in found["objects"]))
    dirs = tuple(sorted(p[cut:].rstrip("/") for p in found["common_prefixes"]))
    listing = Listing(tuple(f for f in files if f and "/" not in f), dirs)
    with _objects_lock:
        _listings[(url, options)] = (time.monotonic(), listing)
    return listing


def probe(url: str) -> str | None:
    """What `url` names: ``"file"`` (an object), ``"dir"`` (a prefix with objects under it),
    or None. Asks the store afresh (see `remote_object`)."""
    _, _, key = split_url(url)
    if key and not key.endswith("/"):
        try:
            remote_object(url, fresh=True)
            return "file"
        except MissingObject:
            pass
    listing = list_directory(url)
    return "dir" if listing.files or listing.dirs else None


def join(url: str, name: str) -> str:
    """`name` inside the directory `url`.

    >>> join("s3://b/ckpt/", "model.safetensors"), join("s3://b", "x")
    ('s3://b/ckpt/model.safetensors', 's3://b/x')
    """
    return url.rstrip("/") + "/" + name


def dirname(url: str) -> str:
    """The directory-like prefix holding the object `url`.

    >>> dirname("s3://b/ckpt/model.safetensors.index.json")
    's3://b/ckpt'
    """
    return url.rstrip("/").rsplit("/", 1)[0]


# -- file objects -------------------------------------------------------------------------------


class RemoteFile(RangeFile):
    """A seekable, read-only file object over an object, read by ranged GETs (see the module)."""

    def __init__(self, url: str) -> None:
        self._obj = remote_object(url)
        super().__init__(self._obj.size, url)
        self._windows: OrderedDict[int, bytes] = OrderedDict()  # start -> bytes, LRU order
        self._cached = 0
        self._window = WINDOW
        self._fetch_end = -1

    def keep(self, start: int, end: int) -> None:
        """Fetch bytes [start, end) now, in one request, and keep them for the reads to come
        (a parser about to read scattered headers there: a `torch.save` blob's two ends)."""
        end = min(end, self._obj.size)
        if end <= start:
            return
        data = bytes(_get(self._obj, start, end))
        if len(data) != end - start:
            raise _short(self._obj, start, end, len(data))
        self._keep(start, data)

    def _read_at(self, pos: int, view: memoryview) -> int:
        want = len(view)
        done = 0
        while done < want:
            at = pos + done
            chunk = self._cached_at(at)
            if chunk is None:
                if want - done >= MAX_WINDOW:  # a bulk read: fetched as asked, not kept
                    data = _get(self._obj, at, pos + want)
                    if len(data) != want - done:
                        raise _short(self._obj, at, pos + want, len(data))
                    view[done:want] = memoryview(data)
                    return want
                chunk = self._fill(at, want - done)
            k = min(len(chunk), want - done)
            view[done : done + k] = chunk[:k]
            done += k
        return done

    def _cached_at(self, pos: int) -> memoryview | None:
        """The cached bytes from `pos` to the end of a window holding it, if any."""
        first = self._obj.first
        if first is not None and pos < len(first):
            return memoryview(first)[pos:]
        for start, data in self._windows.items():
            if start <= pos < start + len(data):
                self._windows.move_to_end(start)
                return memoryview(data)[pos - start :]
        return None

    def _fill(self, pos: int, need: int) -> memoryview:
        first = self._obj.first
        sequential = pos == self._fetch_end or (first is not None and pos == len(first))
        self._window = min(2 * self._window, MAX_WINDOW) if sequential else WINDOW
        span = max(need, self._window)
        # After a seek near the end, the window ends there and reaches back: a zip's
        # directory is read backwards from its last bytes in several small reads.
        start = pos if sequential else max(0, min(pos, self._obj.size - span))
        end = min(self._obj.size, start + span)
        data = bytes(_get(self._obj, start, end))
        if len(data) != end - start:
            raise _short(self._obj, start, end, len(data))
        self._fetch_end = end
        self._keep(start, data)
        return memoryview(data)[pos - start :]

    def _keep(self, start: int, data: bytes) -> None:
        self._windows[start] = data
        self._cached += len(data)
        while self._cached > CACHE_BYTES and len(self._windows) > 1:
            _, old = self._windows.popitem(last=False)
            self._cached -= len(old)

    def close(self) -> None:
        self._windows.clear()
        self._cached = 0
        super().close()


class RemoteBuffer:
    """An object as a read-only sliceable buffer (``len(buf)``, ``buf[a:b]`` -> bytes): what a
    memory map is to a parser that slices a local file."""

    def __init__(self, url: str) -> None:
        self._file = RemoteFile(url)

    def __len__(self) -> int:
        return self._file.size

    def __getitem__(self, index: slice | int) -> Any:
        if isinstance(index, int):
            return self[index : index + 1][0] if index >= 0 else self[len(self) + index]
        start, stop, step = index.indices(len(self))
        self._file.seek(start)
        data = self._file.read(max(0, stop - start)) or b""
        return data[::step] if step != 1 else data

    def close(self) -> None:
        self._file.close()


# -- tensors ------------------------------------------------------------------------------------

_pools: dict[str, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool(name: str, workers: int) -> ThreadPoolExecutor:
    # Shared by every reader: parts of large tensors on one pool, prefetches on another (a
    # prefetch waits for its parts, so the two must not share threads).
    with _pools_lock:
        pool = _pools.get(name)
        if pool is None:
            pool = _pools[name] = ThreadPoolExecutor(workers, thread_name_prefix=name)
        return pool


def read_range(obj: _Object, start: int, length: int) -> np.ndarray:
    """Bytes [start, start + length) of an object as a read-only uint8 array (memory: length)."""
    end = start + length
    if end > obj.size:
        raise FormatError(
            f"{obj.url}: file is truncated: bytes through {end} asked for, the object has "
            f"{obj.size}"
        )
    if length <= PART_BYTES:
        data = _get(obj, start, end)
        if len(data) != length:
            raise _short(obj, start, end, len(data))
        return np.frombuffer(data, dtype=np.uint8)
    out = np.empty(length, dtype=np.uint8)

    def part(a: int, b: int) -> None:
        data = _get(obj, a, b)
        if len(data) != b - a:
            raise _short(obj, a, b, len(data))
        out[a - start : b - start] = np.frombuffer(data, dtype=np.uint8)

    pool = _pool("weightbridge-fetch", PARALLEL_PARTS)
    futures = [
        pool.submit(part, a, min(a + PART_BYTES, end)) for a in range(start, end, PART_BYTES)
    ]
    try:
        for f in futures:
            f.result()
    finally:
        for f in futures:
            f.cancel()
    out.flags.writeable = False
    return out


class RemoteMappedFile(MappedFile):
    """What `MappedFile` is for a local file, for an object: ``array`` fetches a tensor's bytes.

    Memory: the tensor asked for (plus up to PREFETCH_RANGES tensors fetched ahead); nothing is
    kept after `array` returns, so `release` only drops a prefetch never used.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._obj = remote_object(path)
        self.size = self._obj.size
        self._mm = None
        self._ahead: dict[tuple[int, int], Future[np.ndarray]] = {}
        self._lock = threading.Lock()

    def array(self, offset: int, spec: TensorSpec) -> np.ndarray:
        dt = dtypes.to_numpy(spec.dtype)
        if spec.numel == 0:
            empty = np.empty(spec.shape, dtype=dt)
            empty.flags.writeable = False
            return empty
        with self._lock:
            ahead = self._ahead.pop((offset, spec.nbytes), None)
        raw = ahead.result() if ahead is not None else read_range(self._obj, offset, spec.nbytes)
        return raw.view(dt).reshape(spec.shape)

    def prefetch(self, offset: int, length: int) -> None:
        if length <= 0 or length > PREFETCH_BYTES or offset + length > self.size:
            return
        with self._lock:
            if (offset, length) in self._ahead or len(self._ahead) >= PREFETCH_RANGES:
                return
            pool = _pool("weightbridge-prefetch", PREFETCH_RANGES)
            self._ahead[(offset, length)] = pool.submit(read_range, self._obj, offset, length)

    def release(self, offset: int, length: int) -> None:
        with self._lock:
            ahead = self._ahead.pop((offset, length), None)
        if ahead is not None:
            ahead.cancel()

    def close(self) -> None:
        with self._lock:
            pending, self._ahead = list(self._ahead.values()), {}
        for f in pending:
            f.cancel()
