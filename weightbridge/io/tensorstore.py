"""tensorstore: zarr and zarr3 arrays, OCDBT databases and orbax checkpoints, local or in object stores.

Reading. A *location* is a local path or a kvstore URL (``file://``, ``memory://``,
``s3://bucket/prefix``, ``gs://bucket/prefix``). `TensorstoreReader` finds what is there from
metadata alone and opens one tensorstore array per tensor (``ts.open`` reads the array's metadata,
never its chunks), so `specs()` costs a few small reads per tensor:

* an orbax checkpoint (``StandardCheckpointer``, ``PyTreeCheckpointer``): ``_METADATA`` is a JSON
  tree whose keys give the tensor names (joined with ``/``, as `weightbridge.frameworks.jax` names
  pytree leaves); the array of ``("params", "Dense_0", "kernel")`` is stored under the orbax
  *parameter name* ``params.Dense_0.kernel``, as zarr (``use_zarr3: false``, orbax's default) or
  zarr3, either directly in the directory or inside the OCDBT database whose root is
  ``manifest.ocdbt`` (``use_ocdbt``; the per-process ``ocdbt.process_*`` databases are merged into
  that root by orbax when it commits);
* a ``CheckpointManager`` step directory (``<step>/<item>/_METADATA``; one item is read without
  prefix, several as ``<item>/<name>``) or its root (the highest step, or ``step=``);
* zarr / zarr3 arrays anywhere below the location (group paths become ``/``-joined names), or
  inside an OCDBT database at the location.

`read(name)` reads the whole array with tensorstore into a new numpy array (one tensor at a
time; there is no byte range to copy from, so `byte_range` is None). A chunk that is not stored
reads as the array's fill value (the zarr spec's meaning: writers skip such chunks), except in
an orbax checkpoint whose ``_METADATA`` records ``store_array_data_equal_to_fill_value``: orbax
stored every chunk there, so a missing one is an error. Everything read is untrusted (see
SECURITY.md): metadata is checked before tensorstore parses it, and a read is refused before
allocating when the tensor cannot fit in the memory the process can get.

Writing. `TensorstoreDestination` is the `weightbridge.streaming.dest.Destination` for kvstore URLs (and for
local directories that should hold zarr or orbax output). Byte formats (safetensors, npz, h5,
torch) are written to a local temporary file by their usual writer and uploaded with one PUT when
complete: an object-store PUT is all-or-nothing, so the final key either holds the whole shard or
what it held before, and no temporary key or rename is needed (S3 has no rename). tensorstore
uploads a value only whole, from memory, so these shards are capped (MAX_OBJECT_BYTES). The output
formats ``zarr`` and ``orbax`` write one zarr3 array per tensor, chunked along axis 0 so streamed
tiles become whole chunks; their "shards" are groups of arrays that exist only as the journal's
units of work (see `TensorstoreDestination`).
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import json
import math
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from weightbridge import dtypes
from weightbridge.errors import (
    ConversionError,
    DtypeError,
    FormatError,
    SpecError,
    WeightbridgeError,
)
from weightbridge.io._tiles import TileCursor
from weightbridge.io.base import BaseReader, ByteRange
from weightbridge.spec import MAX_NBYTES, MAX_RANK, CheckpointSpec, TensorSpec, parse_json

NAME = "tensorstore"
SUFFIXES = (".zarr", ".ocdbt")

# orbax's files. _METADATA: the pytree (names, value types, zarr version, OCDBT flag).
ORBAX_METADATA = "_METADATA"
# Step-level metadata that CheckpointManager reads (item handlers, timestamps).
ORBAX_CHECKPOINT_METADATA = "_CHECKPOINT_METADATA"
# Where rename is impossible (GCS), orbax marks a finished checkpoint with this file.
ORBAX_COMMIT_SUCCESS = "commit_success.txt"
OCDBT_MANIFEST = "manifest.ocdbt"
# The item name CheckpointManager gives a single unnamed item (``<step>/default/``).
ORBAX_DEFAULT_ITEM = "default"
_COMMIT_TEXT = b"Checkpoint written by weightbridge.\n"
ZARR3_METADATA = "zarr.json"
ZARR2_ARRAY = ".zarray"
ZARR2_GROUP = ".zgroup"
_MARKERS = (ORBAX_METADATA, OCDBT_MANIFEST, ZARR3_METADATA, ZARR2_ARRAY, ZARR2_GROUP)
# orbax value types that are arrays in the checkpoint; others (strings, None) are skipped.
_ORBAX_ARRAY_TYPES = ("jax.Array", "np.ndarray", "scalar")
# The handler orbax records for StandardCheckpointer saves; CheckpointManager reads it back to
# pick the handler when restoring without explicit args.
_ORBAX_STANDARD_HANDLER = (
    "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler"
)

# Rows per chunk are chosen so one chunk holds about this many bytes: large enough that an
# object store spends its time moving data rather than on per-request latency, small enough that
# the one partly filled chunk the writer buffers stays well under the converter's memory budget
# (a few 32 MB tiles).
CHUNK_BYTES = 16 << 20
# Every tensorstore operation waits at most this long. tensorstore retries transient network
# errors itself (and retries a missing S3 bucket forever), so a deadline is what turns a
# misconfigured endpoint into an error instead of a hang. Large shards upload in one PUT.
TIMEOUT_SECONDS = 600.0
# Chunk uploads a shard writer lets run while it takes the next tile. tensorstore holds a copy
# of each block until its upload is done, so this bounds that memory (two 32 MB tiles) while
# keeping an object store's latency off the critical path.
WRITES_IN_FLIGHT = 2
# `prepare` asks the store one cheap question first and waits this long for the answer.
PROBE_TIMEOUT_SECONDS = 30.0
# Suffix of the shard names of the array formats (zarr, orbax): `stream.layout_shards` names
# shards ``model-00001-of-00003.shard``. These names are keys of the journal only: their
# records live under STATE_PREFIX, so the checkpoint's own directory holds nothing but arrays.
SHARD_SUFFIX = ".shard"
# Hidden keys of a destination: shard records, pending shards, upload sizes.
STATE_PREFIX = ".weightbridge/"
# Read when no endpoint= option is given (the CLI and api.convert cannot pass options yet).
ENDPOINT_ENV = "WEIGHTBRIDGE_S3_ENDPOINT"
# Local temporary files of byte-format uploads; the pid lets a rerun remove a killed run's files.
_UPLOAD_PREFIX = "weightbridge-upload-"
# Local directories of downloaded shards (a resume re-checks committed shards through them),
# with the pid too: a run killed while checking would otherwise leave whole shards behind.
_DOWNLOAD_PREFIX = "weightbridge-download-"
# Largest byte-format shard (safetensors, npz, h5, torch) a conversion writes to an object store
# (`TensorstoreDestination.max_object_size`). tensorstore can write a value only whole: its S3
# and GCS drivers send one request, no multipart upload, from a buffer holding the whole object
# (`_Store.write_file` keeps that to one copy, not the 3 that `KvStore.write(bytes)` makes). And
# a shard uploads on the converter's commit thread while the next shard is being filled, whose
# tiles (16 MB each, up to ~10 in flight) already use most of the converter's 256 MB slack.
# 64 MiB per object keeps upload + tiles under it; S3 needs no bigger objects to run at
# speed (and the commit overlaps the next fill anyway). A tensor larger than this still gets a
# shard of its own, costing its size once: within the bound of largest tensor + 256 MB.
MAX_OBJECT_BYTES = 64 << 20
# S3 refuses a single PUT larger than this (tensorstore's S3 driver has no multipart upload).
S3_MAX_PUT_BYTES = 5 << 30

ARRAY_FORMATS = {"zarr": "zarr", "zarr3": "zarr", "orbax": "orbax"}

_URL = re.compile(r"^([a-z][a-z0-9+.-]*)://(.*)$", re.IGNORECASE)
_CONTEXT: Any = None
_CONTEXT_LOCK = threading.Lock()
# Numbers the scratch keys of `_Store.write_file` (itertools.count is atomic under the GIL).
_UPLOADS = itertools.count()


def _ts() -> Any:
    # Imported on first use: detection (which every `open_reader` runs) stays free of its
    # import time.
    import tensorstore

    _return_freed_blocks()
    return tensorstore


# glibc's M_MMAP_THRESHOLD (malloc.h): allocations at least this large get their own mapping,
# which free() returns to the kernel at once.
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 4 << 20
_MALLOC_TUNED = False


def _return_freed_blocks() -> None:
    """Make large freed blocks go back to the kernel (glibc only; once per process).

    tensorstore copies each written block on one of its many threads; glibc keeps a heap per
    thread and, once the first large block was freed, raises its mmap threshold to 32 MB, so
    freed chunk buffers stay in those heaps. Measured on a 512 MB zarr conversion (64 MB
    tensors): peak RssAnon 441 MB by default, 185 MB with a fixed 4 MB threshold
    (tests/test_memory_bound.py holds it to the largest tensor + 256 MB).
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = getattr(libc, "mallopt", None)
        if mallopt is not None:
            mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
    except OSError:  # not glibc (musl has no such knob): memory stays as the allocator keeps it
        pass


def _context() -> Any:
    """One tensorstore context per process.

    ``memory://`` stores live in a context, so a destination and the reader that checks it must
    share one; sharing also shares HTTP connection pools between readers and writers.
    """
    global _CONTEXT
    with _CONTEXT_LOCK:
        if _CONTEXT is None:
            _CONTEXT = _ts().Context()
        return _CONTEXT


def is_url(location: str) -> bool:
    return bool(_URL.match(location))


def kvstore_spec(
    location: str,
    *,
    endpoint: str | None = None,
    aws_region: str | None = None,
    aws_credentials: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The tensorstore kvstore spec of a path or URL; its ``path`` ends in ``/`` (a directory).

    S3 options: `endpoint` (an S3-compatible server; default: ``$WEIGHTBRIDGE_S3_ENDPOINT``, then
    the AWS SDK's ``$AWS_ENDPOINT_URL_S3`` / ``$AWS_ENDPOINT_URL``), `aws_region` (default
    ``$AWS_REGION`` / ``$AWS_DEFAULT_REGION``, or ``us-east-1`` with a custom endpoint) and
    `aws_credentials` (a tensorstore credentials spec; default ``{"type": "environment"}`` when
    ``$AWS_ACCESS_KEY_ID`` is set, else tensorstore's default chain).

    >>> kvstore_spec("s3://bucket/out", endpoint="http://127.0.0.1:9000", aws_region="x")["path"]
    'out/'
    >>> kvstore_spec("memory://scratch")
    {'driver': 'memory', 'path': 'scratch/'}
    """
    m = _URL.match(location)
    if m is None or m.group(1).lower() == "file":
        path = location if m is None else m.group(2)
        return {"driver": "file", "path": _dir(os.path.abspath(path))}
    scheme, rest = m.group(1).lower(), m.group(2)
    if scheme == "memory":
        return {"driver": "memory", "path": _dir(rest.strip("/"))}
    if scheme in ("s3", "gs"):
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise FormatError(f"{location}: no bucket name; write it as {scheme}://bucket/prefix")
        spec: dict[str, Any] = {
            "driver": "s3" if scheme == "s3" else "gcs",
            "bucket": bucket,
            "path": _dir(key.strip("/")),
        }
        if scheme == "s3":
            env = os.environ
            endpoint = endpoint or (
                env.get(ENDPOINT_ENV)
                or env.get("AWS_ENDPOINT_URL_S3")
                or env.get("AWS_ENDPOINT_URL")
            )
            region = aws_region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
            if endpoint:
                spec["endpoint"] = endpoint
                region = region or "us-east-1"  # S3-compatible servers ignore it; SigV4 needs one
            if region:
                spec["aws_region"] = region
            if aws_credentials is None and env.get("AWS_ACCESS_KEY_ID"):
                aws_credentials = {"type": "environment"}
            if aws_credentials is not None:
                spec["aws_credentials"] = aws_credentials
        return spec
    raise FormatError(
        f"{location}: unsupported URL scheme {scheme!r}; use a local path, file://, memory://, "
        "s3://bucket/prefix or gs://bucket/prefix"
    )


def _dir(path: str) -> str:
    return path if not path or path.endswith("/") else path + "/"


def _successor(prefix: str) -> str:
    """The smallest key greater than every key that starts with `prefix` (for key ranges)."""
    raw = prefix.encode()
    while raw and raw[-1] == 0xFF:
        raw = raw[:-1]
    if not raw:
        return ""
    return (raw[:-1] + bytes([raw[-1] + 1])).decode("utf-8", "surrogateescape")


class _Store:
    """A kvstore opened at a directory-like prefix, with deadlines and readable errors."""

    def __init__(
        self, location: str, options: dict[str, Any], error: type[WeightbridgeError]
    ) -> None:
        self.url = location
        self.error = error
        self.timeout = float(options.get("timeout", TIMEOUT_SECONDS))
        spec = options.get("kvstore")
        if spec is None:
            spec = kvstore_spec(
                location,
                endpoint=options.get("endpoint"),
                aws_region=options.get("aws_region"),
                aws_credentials=options.get("aws_credentials"),
            )
        self.spec: dict[str, Any] = dict(spec)
        self.spec["path"] = _dir(str(self.spec.get("path", "")))
        self._kv: Any = None
        self._lock = threading.Lock()

    @property
    def local_dir(self) -> str | None:
        """The directory, when the store is the local filesystem."""
        return str(self.spec["path"]) if self.spec["driver"] == "file" else None

    def spec_at(self, key: str) -> dict[str, Any]:
        return {**self.spec, "path": self.spec["path"] + key}

    def wait(self, future: Any, what: str, timeout: float | None = None) -> Any:
        limit = self.timeout if timeout is None else timeout
        try:
            return future.result(timeout=limit)
        except TimeoutError as e:
            future.cancel()
            raise self.error(
                f"{self.url}: no answer within {limit:.0f} s while {what}; check that the "
                "bucket exists (tensorstore retries a missing bucket until the deadline), the "
                f"endpoint (endpoint= option or ${ENDPOINT_ENV}) and the credentials"
            ) from e
        except (ValueError, OSError) as e:
            raise self.error(f"{self.url}: {what} failed: {e}") from e

    @property
    def kv(self) -> Any:
        with self._lock:
            if self._kv is None:
                self._kv = self.wait(
                    _ts().KvStore.open(self.spec, context=_context()), "opening the store"
                )
            return self._kv

    def read(self, key: str, limit: int | None = None) -> bytes | None:
        """The value at `key` (None if missing); more than `limit` bytes is an error."""
        if limit is not None and self.longer_than(key, limit):
            raise self.error(
                f"{self.url.rstrip('/')}/{key}: larger than {limit} bytes; expected a metadata "
                "file of at most that size, refusing to read it (corrupt or hostile)"
            )
        r = self.wait(self.kv.read(key), f"reading {key}")
        return bytes(r.value) if r.state == "value" else None

    def longer_than(self, key: str, limit: int) -> bool:
        """Whether the value at `key` has more than `limit` bytes: a stat, or one byte read."""
        local = self.local_dir
        if local is not None:
            try:
                return os.stat(os.path.join(local, key)).st_size > limit
            except OSError:
                return False  # missing (or unreadable: the read says so)
        try:
            r = self.wait(self.kv.read(key, byte_range=slice(limit, limit + 1)), f"sizing {key}")
        except WeightbridgeError:  # a range past the end is an error: the value is shorter
            return False
        return bool(r.state == "value" and len(r.value) > 0)

    def exists(self, key: str, timeout: float | None = None) -> bool:
        r = self.wait(self.kv.read(key, byte_range=slice(0, 0)), f"looking for {key}", timeout)
        return bool(r.state == "value")

    def write(self, key: str, data: bytes) -> bytes:
        """Write one value; returns its storage generation."""
        stamp = self.wait(self.kv.write(key, data), f"writing {key} ({len(data)} bytes)")
        return bytes(stamp.generation)

    def write_file(self, key: str, path: str) -> tuple[int, bytes]:
        """Write a local file's content as one value (one PUT); returns (size, generation).

        `KvStore.write` takes only bytes (not a memoryview or an mmap) and its binding copies
        them twice (a std::string, then the absl::Cord that is sent): 3x the file in anonymous
        memory. Instead the file is memory-mapped and written as the single chunk of a
        one-dimensional, uncompressed uint8 zarr v2 array, whose chunk key ``0`` a ``kvstack``
        maps onto `key` (its ``.zarray`` goes to a scratch ``memory://`` key): tensorstore
        copies the mapped pages once, into the buffer it then sends, and the chunk's bytes are
        exactly the file's. Measured: 1x the file, not 3x (tests/test_s3_memory.py).
        """
        size = os.path.getsize(path)
        if size == 0:  # an empty array has no chunk to write
            return 0, self.write(key, b"")
        scratch = f"weightbridge-upload/{os.getpid()}-{next(_UPLOADS)}/"
        spec = {
            "driver": "zarr",
            "kvstore": {
                "driver": "kvstack",
                "layers": [
                    {"base": {"driver": "memory", "path": scratch}},
                    {"base": self.spec_at(key), "exact": "0"},
                ],
            },
            "metadata": {
                "shape": [size],
                "chunks": [size],
                "dtype": "|u1",
                "compressor": None,
                "filters": None,
                "fill_value": None,
                "order": "C",
            },
            "create": True,
            # Never skip the chunk (on S3 a skipped chunk is a DELETE of the key).
            "store_data_equal_to_fill_value": True,
            # Whatever the shared context says, keep nothing cached once the chunk is written.
            "context": {"cache_pool": {"total_bytes_limit": 0}},
        }
        what = f"writing {key} ({size} bytes)"
        try:
            array = self.wait(_ts().open(spec, context=_context()), what)
            source = np.memmap(path, np.uint8, mode="r")  # file pages, not anonymous memory
            futures = array.write(source)
            self.wait(futures.copy, what)
            del source
            self.wait(futures.commit, what)
        finally:
            memory = _ts().KvStore.open({"driver": "memory", "path": scratch}, context=_context())
            self.wait(self.wait(memory, what).delete_range(_ts().KvStore.KeyRange()), what)
        r = self.wait(self.kv.read(key, byte_range=slice(0, 0)), f"checking {key}")
        if r.state != "value":
            raise self.error(f"{self.url}/{key}: missing right after it was written")
        return size, bytes(r.stamp.generation)

    def delete(self, key: str) -> None:
        self.wait(self.kv.write(key, None), f"deleting {key}")

    def delete_prefix(self, prefix: str) -> None:
        rng = _ts().KvStore.KeyRange(inclusive_min=prefix, exclusive_max=_successor(prefix))
        self.wait(self.kv.delete_range(rng), f"deleting {prefix}*")
        local = self.local_dir
        if local is not None and prefix.endswith("/"):
            _remove_empty_dirs(os.path.join(local, prefix))

    def list(self, prefix: str = "", timeout: float | None = None) -> list[str]:
        rng = None
        if prefix:
            rng = _ts().KvStore.KeyRange(inclusive_min=prefix, exclusive_max=_successor(prefix))
        future = self.kv.list(rng) if rng else self.kv.list()
        keys = self.wait(future, f"listing {prefix}*", timeout)
        return sorted(k.decode("utf-8", "surrogateescape") for k in keys)

    def read_json(self, key: str, limit: int | None = None) -> Any:
        raw = self.read(key, limit)
        if raw is None:
            return None
        try:
            # Duplicate keys, nesting deep enough to exhaust the recursion limit and integers
            # too long to convert are all malformed JSON here (ValueError).
            return parse_json(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise self.error(f"{self.url}/{key}: not valid JSON ({e})") from e

    def write_json(self, key: str, obj: Any) -> None:
        self.write(key, _json_bytes(obj))


def _json_bytes(obj: Any) -> bytes:
    # Fixed formatting (as LocalDirectory writes it) so reruns write identical bytes.
    return (json.dumps(obj, indent=1) + "\n").encode("utf-8")


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True, slots=True)
class _ArrayRef:
    """Where one tensor's array is: `base` (a key prefix of the store) holds an OCDBT database
    (`ocdbt`) or plain keys, and the array's own keys start with ``path/`` inside it."""

    name: str
    base: str
    path: str
    driver: str  # "zarr" (zarr v2) or "zarr3"; "" when unknown (try both)
    ocdbt: bool = False
    # A missing chunk is an error, not the fill value: orbax recorded that it stored every
    # chunk (``store_array_data_equal_to_fill_value``), so one that is missing was lost.
    strict: bool = False


def _array_kvstore(store: _Store, ref: _ArrayRef) -> dict[str, Any]:
    if ref.ocdbt:
        return {"driver": "ocdbt", "base": store.spec_at(ref.base), "path": _dir(ref.path)}
    return store.spec_at(ref.base + _dir(ref.path))


# The metadata files the reader parses itself are read at most this far: an orbax _METADATA
# holds about 250 bytes per leaf, so this is some 250k tensors; more is corrupt or hostile.
# (Each array's own .zarray / zarr.json is parsed by tensorstore.)
METADATA_LIMIT = 64 << 20
# A zarr.json read to tell an array from a group.
NODE_METADATA_LIMIT = 16 << 20
# Arrays being opened at once (each open reads that array's metadata): enough to hide an object
# store's latency, few enough that a tree of a million bogus entries fails at its first ones.
OPENS_IN_FLIGHT = 64
# tensorstore appends the whole JSON spec it was opening to its errors; our messages say which
# file and tensor instead.
_TS_SPEC_NOTE = re.compile(r"\s*\[tensorstore_spec='.*$", re.DOTALL)
_STEP = re.compile(r"[0-9]+")
_META_FILES = {"zarr": ZARR2_ARRAY, "zarr3": ZARR3_METADATA}


def _ts_message(e: BaseException) -> str:
    return _TS_SPEC_NOTE.sub("", str(e)) or type(e).__name__


def _path_problem(path: str) -> str | None:
    """Why a key prefix found in metadata or a listing is unsafe to open, or None.

    tensorstore's file driver refuses ``..`` itself, but object-store keys are plain strings
    (and an HTTP client may resolve ``/../`` in a URL), so every prefix is checked here.
    """
    if "\\" in path or "\0" in path:
        return "holds a backslash or NUL character"
    if path.startswith("/"):
        return "is absolute"
    parts = path.rstrip("/").split("/") if path else []
    if any(p in ("", ".", "..") for p in parts):
        return "has an empty, '.' or '..' part"
    return None


def _kind_of(value: Any) -> str:
    """A short description of a JSON value for messages (never the whole value)."""
    if isinstance(value, (dict, list)):
        return f"a {'JSON object' if isinstance(value, dict) else 'list'} of {len(value)} items"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _key_problem(key: str) -> str | None:
    """Why one key of an orbax tree cannot be a tensor-name part, or None."""
    if not key:
        return "is empty"
    if key in (".", ".."):
        return f"is {key!r}"
    if any(c in key for c in "/\\\0"):
        return "holds a path separator ('/' or '\\') or NUL"
    return None


def _memory_available() -> int | None:
    """Bytes this process can still allocate, as far as the system and its limits say.

    The smaller of available RAM plus free swap and what ``RLIMIT_DATA`` / ``RLIMIT_AS`` leave
    (None when none of these can be read, on systems without /proc).
    """
    found: list[int] = []
    fields: dict[str, int] = {}
    for source in ("/proc/meminfo", "/proc/self/status"):
        try:
            with open(source, encoding="ascii", errors="replace") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    value = rest.split()
                    if len(value) == 2 and value[1] == "kB" and value[0].isdigit():
                        fields[key] = int(value[0]) << 10
        except OSError:
            pass
    if "MemAvailable" in fields:
        found.append(fields["MemAvailable"] + fields.get("SwapFree", 0))
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return min(found) if found else None
    for limit, used in ((resource.RLIMIT_DATA, "VmData"), (resource.RLIMIT_AS, "VmSize")):
        soft = resource.getrlimit(limit)[0]
        if soft != resource.RLIM_INFINITY and used in fields:
            found.append(max(0, soft - fields[used]))
    return min(found) if found else None


class TensorstoreReader(BaseReader):
    """Reads zarr / zarr3 / OCDBT arrays and orbax checkpoints at a local path or kvstore URL.

    Args:
        location: a directory, a file inside one (``_METADATA``, ``zarr.json``), or a URL.
        step: for a CheckpointManager root, the step to read (default: the highest).
        options: `kvstore_spec` options (``endpoint``, ``aws_region``, ``aws_credentials``),
            ``timeout`` (seconds per operation) or ``kvstore`` (a full tensorstore spec).

    Attributes:
        layout: what was found (``orbax``, ``orbax-ocdbt``, ``zarr``, ``zarr-ocdbt``, ...).
        skipped: leaves of an orbax tree that are not arrays, with why they were left out.
    """

    def __init__(
        self,
        location: str | os.PathLike[str],
        *,
        step: int | None = None,
        _store: _Store | None = None,
        _refs: Sequence[_ArrayRef] | None = None,
        **options: Any,
    ) -> None:
        self.path = os.fspath(location)
        self._store = _store or _Store(self.path, options, FormatError)
        self.skipped: dict[str, str] = {}
        if _refs is None:
            self.layout, refs = self._discover(step)
        else:
            self.layout, refs = "shard", list(_refs)
        self._check_refs(refs)
        self._refs = {r.name: r for r in refs}
        # Bytes a read needs besides the tensor itself: one decoded chunk and a shard index.
        self._overhead: dict[str, int] = {}
        self._ocdbt: dict[str, Any] = {}  # OCDBT databases by base, for metadata reads
        self._arrays = self._open_all(refs)
        tensors = [self._tensor_spec(ref, self._arrays[ref.name]) for ref in refs]
        try:
            self._spec = CheckpointSpec(tuple(tensors))
        except SpecError as e:  # names are checked unique above; this is a last line
            raise FormatError(f"{self.path}: {e}") from e

    # -- validation ----------------------------------------------------------------------------

    def _describe(self, ref: _ArrayRef) -> str:
        """The array's location for messages: its metadata file, or its key in OCDBT."""
        root = self.path.rstrip("/")
        key = f"{ref.base}{_dir(ref.path)}"
        meta = {"zarr": ZARR2_ARRAY, "zarr3": ZARR3_METADATA}.get(ref.driver, "")
        if ref.ocdbt:
            return f"{root}/{ref.base}{OCDBT_MANIFEST} (array {_dir(ref.path)}{meta})"
        return f"{root}/{key}{meta}"

    def _check_refs(self, refs: Sequence[_ArrayRef]) -> None:
        """Every array stays inside the checkpoint; no two tensors share a name or an array."""
        names: dict[str, _ArrayRef] = {}
        arrays: dict[tuple[str, str, bool], str] = {}
        for ref in refs:
            for what, value in (("location", ref.base), ("array path", ref.path)):
                problem = _path_problem(value)
                if problem is not None:
                    raise FormatError(
                        f"{self._describe(ref)}: tensor {ref.name!r} has {what} {value!r}, which "
                        f"{problem}; expected a relative path inside {self.path}, refusing to "
                        "read outside the checkpoint"
                    )
            if ref.name in names:
                raise FormatError(
                    f"{self._describe(ref)}: two arrays are both tensor {ref.name!r} "
                    f"({names[ref.name].base}{names[ref.name].path} and {ref.base}{ref.path}); "
                    "expected unique names, the metadata is corrupt"
                )
            names[ref.name] = ref
            where = (ref.base, ref.path, ref.ocdbt)
            if where in arrays:
                raise FormatError(
                    f"{self._describe(ref)}: tensors {arrays[where]!r} and {ref.name!r} are both "
                    f"stored as array {ref.base}{ref.path}; expected one array per tensor, the "
                    "metadata is corrupt"
                )
            arrays[where] = ref.name

    def _tensor_spec(self, ref: _ArrayRef, arr: Any) -> TensorSpec:
        """The spec of an opened array; refuses one no reader could return."""
        where = f"{self._describe(ref)}: tensor {ref.name!r}"
        try:
            domain = arr.domain
            bounds = [(int(d.inclusive_min), int(d.exclusive_max), bool(d.finite)) for d in domain]
            numpy_dtype = arr.dtype.numpy_dtype
        except Exception as e:  # tensorstore raises plain ValueError/TypeError here
            raise FormatError(f"{where}: cannot read its shape and dtype ({_ts_message(e)})") from e
        if len(bounds) > MAX_RANK:
            raise FormatError(
                f"{where}: {len(bounds)} dimensions; expected at most {MAX_RANK} (numpy's limit)"
            )
        if any(lo != 0 or not finite for lo, _, finite in bounds):
            raise FormatError(
                f"{where}: its domain is {domain}; expected a finite shape starting at 0 in "
                "every dimension (a dimension this large is unbounded to tensorstore)"
            )
        try:
            code = dtypes.from_numpy(numpy_dtype)
        except (DtypeError, TypeError, ValueError) as e:
            raise FormatError(
                f"{where}: has dtype {arr.dtype.name}, which weightbridge does not convert ({e})"
            ) from e
        try:
            spec = TensorSpec(ref.name, tuple(hi for _, hi, _ in bounds), code)
        except (SpecError, DtypeError) as e:
            raise FormatError(f"{self._describe(ref)}: {e}") from e
        if spec.nbytes > MAX_NBYTES:
            raise FormatError(
                f"{where}: shape {spec.shape} of {code} is {spec.nbytes} bytes; expected at most "
                f"{MAX_NBYTES} (no array can be larger), the metadata is corrupt or hostile"
            )
        self._overhead[ref.name] = self._chunk_overhead(ref, arr, spec, where)
        return spec

    def _chunk_overhead(self, ref: _ArrayRef, arr: Any, spec: TensorSpec, where: str) -> int:
        """Bytes tensorstore allocates besides the output to read: a chunk, a shard index."""
        if not spec.shape:
            return 0
        itemsize = dtypes.itemsize(spec.dtype)
        try:
            layout = arr.chunk_layout
            read = [int(d) for d in layout.read_chunk.shape]
            write = [int(d) for d in layout.write_chunk.shape]
        except Exception as e:
            raise FormatError(f"{where}: cannot read its chunk shape ({_ts_message(e)})") from e
        if len(read) != len(spec.shape) or any(d < 1 for d in read):
            raise FormatError(
                f"{where}: chunk shape {read}; expected {len(spec.shape)} positive extents"
            )
        chunk = math.prod(read) * itemsize
        inner = math.prod(-(-w // r) for w, r in zip(write, read, strict=False)) if write else 1
        # A sharded zarr3 array reads each shard's index: 16 bytes per chunk of the shard.
        index = 16 * inner if write != read else 0
        if chunk > MAX_NBYTES or index > MAX_NBYTES:
            raise FormatError(
                f"{where}: chunk shape {read} (shards of {write}) is {chunk} bytes per chunk; "
                f"expected at most {MAX_NBYTES}, the metadata is corrupt or hostile"
            )
        return chunk + index

    # -- discovery -----------------------------------------------------------------------------

    def _discover(self, step: int | None) -> tuple[str, list[_ArrayRef]]:
        store = self._store
        if store.exists(ORBAX_METADATA):
            return self._orbax_item("")
        if store.exists(OCDBT_MANIFEST):
            return "zarr-ocdbt", self._zarr_in_ocdbt("")
        keys = store.list()
        items = sorted(k[: -len(ORBAX_METADATA) - 1] for k in keys if _depth_match(k, 1))
        if items:  # a CheckpointManager step: <item>/_METADATA
            return self._orbax_items("", items)
        # Top-level directories named by a number (ASCII digits: str.isdigit() also accepts
        # '²', which int() refuses) holding a _METADATA somewhere below.
        steps = sorted(
            {
                int(top)
                for top, _, rest in (k.partition("/") for k in keys)
                if _STEP.fullmatch(top) and f"/{rest}".endswith("/" + ORBAX_METADATA)
            }
        )
        if steps:  # a CheckpointManager root: <step>/<item>/_METADATA or <step>/_METADATA
            chosen = steps[-1] if step is None else step
            if chosen not in steps:
                raise FormatError(f"{self.path}: no checkpoint step {chosen}; steps here: {steps}")
            base = f"{chosen}/"
            if store.exists(base + ORBAX_METADATA):
                return self._orbax_item(base)
            sub = sorted(
                k[len(base) : -len(ORBAX_METADATA) - 1]
                for k in keys
                if k.startswith(base) and _depth_match(k[len(base) :], 1)
            )
            return self._orbax_items(base, sub)
        refs = self._zarr_arrays("", keys, ocdbt=False)
        if not refs:
            raise FormatError(
                f"{self.path}: no orbax checkpoint ({ORBAX_METADATA}), OCDBT database "
                f"({OCDBT_MANIFEST}) or zarr array ({ZARR3_METADATA}, {ZARR2_ARRAY}) here"
            )
        return "zarr", refs

    def _orbax_items(self, base: str, items: list[str]) -> tuple[str, list[_ArrayRef]]:
        refs: list[_ArrayRef] = []
        layout = "orbax"
        for item in items:
            layout, found = self._orbax_item(f"{base}{item}/")
            prefix = f"{item}/" if len(items) > 1 else ""
            refs += [
                _ArrayRef(prefix + r.name, r.base, r.path, r.driver, r.ocdbt, r.strict)
                for r in found
            ]
        return layout, refs

    def _orbax_item(self, base: str) -> tuple[str, list[_ArrayRef]]:
        where = f"{self.path.rstrip('/')}/{base}{ORBAX_METADATA}"
        problem = _path_problem(base)
        if problem is not None:
            raise FormatError(f"{where}: its directory {base!r} {problem}; refusing to read it")
        meta = self._store.read_json(base + ORBAX_METADATA, limit=METADATA_LIMIT)
        tree = meta.get("tree_metadata") if isinstance(meta, dict) else None
        if not isinstance(tree, dict):
            raise FormatError(
                f"{where}: not an orbax pytree metadata file (expected an object with a "
                f"'tree_metadata' object, found {_kind_of(meta)}"
                f"{'' if not isinstance(meta, dict) else ' with ' + _kind_of(tree)}); "
                "checkpoints from orbax before 0.5 (a msgpack 'checkpoint' file) are not supported"
            )
        flags = {}
        for flag in ("use_ocdbt", "use_zarr3", "store_array_data_equal_to_fill_value"):
            value = meta.get(flag)
            if value is not None and not isinstance(value, bool):
                raise FormatError(
                    f"{where}: {flag!r} must be true, false or absent, found {value!r}"
                )
            flags[flag] = value
        ocdbt = flags["use_ocdbt"]
        if ocdbt is None:
            ocdbt = self._store.exists(base + OCDBT_MANIFEST)
        zarr3 = flags["use_zarr3"]
        driver = "" if zarr3 is None else ("zarr3" if zarr3 else "zarr")
        strict = bool(flags["store_array_data_equal_to_fill_value"])
        refs = []
        for key, entry in tree.items():
            name = self._orbax_name(where, key, entry)
            value = entry.get("value_metadata")
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise FormatError(
                    f"{where}: entry {key!r} (tensor {name!r}): value_metadata must be an object, "
                    f"found {_kind_of(value)}"
                )
            vtype, skip = value.get("value_type"), value.get("skip_deserialize", False)
            if not isinstance(skip, bool) or not (vtype is None or isinstance(vtype, str)):
                raise FormatError(
                    f"{where}: entry {key!r} (tensor {name!r}): expected a string value_type and "
                    f"a boolean skip_deserialize, found {vtype!r} and {skip!r}"
                )
            if skip:
                self.skipped[name] = "orbax marked it skip_deserialize"
            elif vtype not in _ORBAX_ARRAY_TYPES:
                self.skipped[name] = f"orbax value type {vtype!r} is not an array"
            else:
                path = name.replace("/", ".")  # orbax's parameter name
                refs.append(_ArrayRef(name, base, path, driver, bool(ocdbt), strict))
        return ("orbax-ocdbt" if ocdbt else "orbax"), refs

    def _orbax_name(self, where: str, key: str, entry: Any) -> str:
        """The tensor name of one tree entry: its keys joined with '/'."""
        keys = entry.get("key_metadata") if isinstance(entry, dict) else None
        if not isinstance(keys, list) or not keys:
            raise FormatError(
                f"{where}: entry {key!r}: expected an object with a non-empty 'key_metadata' "
                f"list, found {_kind_of(entry if keys is None else keys)}"
            )
        parts = []
        for k in keys:
            part = k.get("key") if isinstance(k, dict) else k
            if isinstance(part, int) and not isinstance(part, bool):
                part = str(part)  # a sequence index
            if not isinstance(part, str):
                raise FormatError(
                    f"{where}: entry {key!r}: each key must be a string or an integer (or an "
                    f"object with one under 'key'), found {_kind_of(part)}"
                )
            problem = _key_problem(part)
            if problem is not None:
                raise FormatError(
                    f"{where}: entry {key!r}: key {part!r} {problem}; a key names one level of "
                    "the tree (its array is stored under the keys joined with '.'), refusing a "
                    "key that could point outside the checkpoint"
                )
            parts.append(part)
        return "/".join(parts)

    def _zarr_in_ocdbt(self, base: str) -> list[_ArrayRef]:
        spec = {"driver": "ocdbt", "base": self._store.spec_at(base)}
        where = f"{self.path.rstrip('/')}/{base}{OCDBT_MANIFEST}"
        try:
            kv = self._store.wait(
                _ts().KvStore.open(spec, context=_context()), f"opening the OCDBT database {base}"
            )
            keys = self._store.wait(kv.list(), "listing the OCDBT database")
        except Exception as e:  # the store's FormatError, or tensorstore's own
            cause = e.__cause__ or e if isinstance(e, WeightbridgeError) else e
            raise FormatError(
                f"{where}: expected an OCDBT database whose keys can be listed, but "
                f"{_ts_message(cause)}"
            ) from e
        names = sorted(k.decode("utf-8", "surrogateescape") for k in keys)
        return self._zarr_arrays(base, names, ocdbt=True, kv=kv)

    def _zarr_arrays(
        self, base: str, keys: list[str], *, ocdbt: bool, kv: Any = None
    ) -> list[_ArrayRef]:
        """Arrays among `keys`: every ``.zarray``, and every ``zarr.json`` of node type array.

        `keys` are keys of `kv` (default: the store, where they start with `base`).
        """
        refs: list[_ArrayRef] = []
        for key in keys:
            if key.startswith(STATE_PREFIX):
                continue
            head, _, leaf = key.rpartition("/")
            if leaf == ZARR2_ARRAY:
                refs.append(_ArrayRef(head, base, head, "zarr", ocdbt))
            elif leaf == ZARR3_METADATA:
                refs.append(_ArrayRef(head, base, head, "zarr3", ocdbt))
        if any(r.driver == "zarr3" for r in refs):
            refs = self._only_zarr3_arrays(refs, kv)
        for i, r in enumerate(refs):
            if not r.name:  # the location itself is one array: name it after the directory
                refs[i] = _ArrayRef(self._root_name(), r.base, r.path, r.driver, r.ocdbt)
        return refs

    def _root_name(self) -> str:
        """The name of the array that is the location itself."""
        return os.path.basename(self.path.rstrip("/")) or "array"

    def _only_zarr3_arrays(self, refs: list[_ArrayRef], kv: Any) -> list[_ArrayRef]:
        # zarr.json is both group and array metadata; read them all at once to tell which.
        prefix = "" if kv is not None else None
        kv = kv if kv is not None else self._store.kv
        zarr3 = [r for r in refs if r.driver == "zarr3"]
        if prefix is None and self._store.local_dir is not None:  # a stat each: cheap
            for r in zarr3:
                key = r.base + _dir(r.path) + ZARR3_METADATA
                if self._store.longer_than(key, NODE_METADATA_LIMIT):
                    raise FormatError(
                        f"{self._describe(r)}: larger than {NODE_METADATA_LIMIT} bytes; expected "
                        "zarr metadata of a few KB, refusing to read it (corrupt or hostile)"
                    )
        futures = {
            r.name: kv.read((r.base if prefix is None else prefix) + _dir(r.path) + ZARR3_METADATA)
            for r in zarr3
        }
        keep = []
        for r in refs:
            if r.driver != "zarr3":
                keep.append(r)
                continue
            # (the location itself is one array when its path is empty)
            where = f"{self._describe(r)}: tensor {r.name or self._root_name()!r}"
            raw = bytes(self._wait(futures[r.name], r, "reading its metadata").value)
            try:
                meta = parse_json(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                raise FormatError(f"{where}: not valid JSON ({e})") from e
            if not isinstance(meta, dict):
                raise FormatError(
                    f"{where}: expected a zarr3 metadata object, found {_kind_of(meta)}"
                )
            if meta.get("node_type") == "array":
                keep.append(r)
        return keep

    def _open(self, ref: _ArrayRef, driver: str) -> Any:
        spec: dict[str, Any] = {"driver": driver, "kvstore": _array_kvstore(self._store, ref)}
        if ref.strict:
            spec["fill_missing_data_reads"] = False
        return _ts().open(spec, context=_context(), open=True, read=True)

    def _wait(self, future: Any, ref: _ArrayRef, what: str) -> Any:
        """A tensorstore result, or a FormatError naming the array and the tensor."""
        try:
            return future.result(timeout=self._store.timeout)
        except TimeoutError as e:
            future.cancel()
            raise FormatError(
                f"{self._describe(ref)}: tensor {ref.name!r}: no answer within "
                f"{self._store.timeout:.0f} s while {what}"
            ) from e
        except WeightbridgeError:
            raise
        except Exception as e:  # tensorstore reports bad metadata and data as ValueError & co.
            raise FormatError(
                f"{self._describe(ref)}: tensor {ref.name!r}: {what} failed: {_ts_message(e)}"
            ) from e

    def _open_all(self, refs: Sequence[_ArrayRef]) -> dict[str, Any]:
        """Open every array, a batch at a time, stopping at the first that fails.

        Each array's metadata is read and checked here first: tensorstore's JSON parser
        recurses without a limit, so metadata nested deeply enough crashes the process (SIGSEGV)
        instead of failing; and where orbax did not record the zarr version, the file that
        exists says which it is.
        """
        arrays: dict[str, Any] = {}
        for start in range(0, len(refs), OPENS_IN_FLIGHT):
            batch = self._check_metadata(refs[start : start + OPENS_IN_FLIGHT])
            futures = [(ref, self._open(ref, ref.driver)) for ref in batch]
            try:
                for ref, future in futures:
                    arrays[ref.name] = self._wait(future, ref, f"opening its {ref.driver} array")
            finally:
                for _, future in futures:
                    future.cancel()  # the rest of a failed batch (no-op when done)
        return arrays

    def _metadata_kv(self, ref: _ArrayRef) -> tuple[Any, str]:
        """The kvstore holding the array's keys and the array's key prefix in it."""
        if not ref.ocdbt:
            return self._store.kv, ref.base + _dir(ref.path)
        kv = self._ocdbt.get(ref.base)
        if kv is None:
            spec = {"driver": "ocdbt", "base": self._store.spec_at(ref.base)}
            kv = self._ocdbt[ref.base] = self._wait(
                _ts().KvStore.open(spec, context=_context()), ref, "opening its OCDBT database"
            )
        return kv, _dir(ref.path)

    def _check_metadata(self, batch: Sequence[_ArrayRef]) -> list[_ArrayRef]:
        """Read each array's metadata file and check it is JSON we can hand to tensorstore."""
        reads = []
        for ref in batch:
            kv, prefix = self._metadata_kv(ref)
            names = [_META_FILES[ref.driver]] if ref.driver else [ZARR2_ARRAY, ZARR3_METADATA]
            if not ref.ocdbt and self._store.local_dir is not None:
                for n in names:  # a stat each: refuse a huge file before reading it
                    if self._store.longer_than(prefix + n, NODE_METADATA_LIMIT):
                        raise FormatError(
                            f"{self._describe(ref)}: tensor {ref.name!r}: {n} is larger than "
                            f"{NODE_METADATA_LIMIT} bytes; expected zarr metadata of a few KB"
                        )
            reads.append((ref, [(n, kv.read(prefix + n)) for n in names]))
        checked = []
        for ref, pending in reads:
            found: tuple[str, bytes] | None = None
            for n, future in pending:
                r = self._wait(future, ref, f"reading its {n}")
                if found is None and r.state == "value":
                    found = n, bytes(r.value)
            if found is None:
                raise FormatError(
                    f"{self._describe(ref)}: tensor {ref.name!r}: expected its array metadata "
                    f"({' or '.join(n for n, _ in pending)}), found none"
                )
            name, raw = found
            driver = "zarr" if name == ZARR2_ARRAY else "zarr3"
            ref = _ArrayRef(ref.name, ref.base, ref.path, driver, ref.ocdbt, ref.strict)
            self._refs[ref.name] = ref
            if len(raw) > NODE_METADATA_LIMIT:
                raise FormatError(
                    f"{self._describe(ref)}: tensor {ref.name!r}: {len(raw)} bytes; expected zarr "
                    f"metadata of at most {NODE_METADATA_LIMIT}"
                )
            try:
                meta = parse_json(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                raise FormatError(
                    f"{self._describe(ref)}: tensor {ref.name!r}: not valid JSON ({e})"
                ) from e
            if not isinstance(meta, dict):
                raise FormatError(
                    f"{self._describe(ref)}: tensor {ref.name!r}: expected a JSON object of zarr "
                    f"metadata, found {_kind_of(meta)}"
                )
            checked.append(ref)
        return checked

    # -- Reader protocol -----------------------------------------------------------------------

    def read(self, name: str) -> np.ndarray:
        arr = self._arrays.get(name)
        if arr is None:
            raise self._missing(name)
        ref, spec = self._refs[name], self._spec[name]
        where = f"{self._describe(ref)}: tensor {name!r}"
        need = spec.nbytes + self._overhead.get(name, 0)
        available = _memory_available() if spec.nbytes else None
        if available is not None and need > available:
            raise FormatError(
                f"{where}: shape {spec.shape} of {spec.dtype} needs {need} bytes of memory to read "
                f"({spec.nbytes} for the tensor, the rest to decode a chunk), but this process can "
                f"allocate {available}; the metadata is corrupt or hostile, or the tensor needs a "
                "machine with more memory"
            )
        # Read into an array numpy allocates: a failed allocation is a MemoryError here, where
        # inside tensorstore it would abort the process (std::bad_alloc).
        try:
            out = np.empty(spec.shape, dtype=arr.dtype.numpy_dtype)
        except MemoryError as e:
            raise FormatError(
                f"{where}: cannot allocate {spec.nbytes} bytes for shape {spec.shape} of "
                f"{spec.dtype}; the metadata is corrupt or hostile, or memory is short"
            ) from e
        if out.size:
            target = _ts().array(out, copy=False, write=True)
            self._wait(target.write(arr), ref, "reading its chunks")
        want = dtypes.to_numpy(spec.dtype)
        if out.dtype != want:
            out = out.view(want)
        out.flags.writeable = False
        return out

    def byte_range(self, name: str) -> ByteRange | None:
        return None

    def files(self) -> list[str]:
        """Every local file below the location, so a resume notices a changed source."""
        root = self._store.local_dir
        if root is None or not os.path.isdir(root):
            return []
        found = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            found += [os.path.join(dirpath, f) for f in sorted(filenames)]
        return found

    def close(self) -> None:
        self._arrays = {}


def _depth_match(key: str, depth: int) -> bool:
    """True for ``<d1>/.../<dN>/_METADATA`` with exactly `depth` directories."""
    parts = key.split("/")
    return len(parts) == depth + 1 and parts[-1] == ORBAX_METADATA


def _local_root(path: str) -> str | None:
    """The directory a local path stands for: itself, or the directory of a metadata/chunk file."""
    if os.path.isdir(path):
        return path
    if not os.path.isfile(path):
        return None
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.basename(path) in (*_MARKERS, ORBAX_CHECKPOINT_METADATA):
        return parent
    if any(os.path.exists(os.path.join(parent, m)) for m in (ZARR2_ARRAY, ZARR3_METADATA)):
        return parent  # a lone chunk file the registry picked as "the one file here"
    return None


# How far and how wide detection looks below a directory for zarr or orbax metadata: a
# CheckpointManager root is three levels above its _METADATA; the cap keeps detection of a huge
# unrelated directory cheap.
_DETECT_DEPTH = 3
_DETECT_ENTRIES = 2000


def detect(path: str, head: bytes) -> bool:
    """True when `path` holds (or is inside) zarr arrays, an OCDBT database or an orbax checkpoint."""
    root = _local_root(path)
    if root is None:
        return False
    seen = 0
    for dirpath, dirnames, filenames in os.walk(root):
        if any(m in filenames for m in _MARKERS):
            return True
        seen += len(dirnames) + len(filenames)
        depth = os.path.relpath(dirpath, root).count(os.sep) + (dirpath != root)
        if seen > _DETECT_ENTRIES or depth >= _DETECT_DEPTH:
            dirnames.clear()
        dirnames.sort()
    return False


def open_reader(path: str, **options: Any) -> TensorstoreReader:
    if not is_url(path) or path.lower().startswith("file://"):
        local = path[len("file://") :] if is_url(path) else path
        root = _local_root(local)
        if root is not None:
            return TensorstoreReader(root, **options)
    return TensorstoreReader(path, **options)


# ---------------------------------------------------------------------------------------------
# Writing


class Writer:
    """The ``zarr`` and ``orbax`` output formats, as the format registry sees them.

    They write a directory of arrays, not a file, so they are written only through a
    `TensorstoreDestination`; this class carries their shard-name `suffix` and refuses a file path.
    """

    suffix = SHARD_SUFFIX

    def __init__(
        self, path: str, tensors: Sequence[TensorSpec], metadata: dict[str, str] | None = None
    ) -> None:
        # Under a LocalDirectory `path` is a hidden temporary name; the directory is what to name.
        where = os.path.dirname(path) if ".tmp-" in os.path.basename(path) else path
        raise FormatError(
            f"{where}: the zarr and orbax formats write a directory of arrays, not a file, so they "
            "need a tensorstore destination: an object-store URL (s3://bucket/prefix, gs://, "
            "memory://) or, for a local directory, "
            "weightbridge.io.tensorstore.TensorstoreDestination('/path/to/dir')"
        )

    def write(self, name: str, tile: np.ndarray, row: int) -> None:  # pragma: no cover
        raise NotImplementedError

    def copy_from(self, name: str, src: ByteRange) -> bool:  # pragma: no cover
        return False

    def close(self) -> None:  # pragma: no cover
        raise NotImplementedError

    def abort(self) -> None:  # pragma: no cover
        pass


_RESERVED = frozenset(
    {ORBAX_METADATA, ORBAX_CHECKPOINT_METADATA, ORBAX_COMMIT_SUCCESS, OCDBT_MANIFEST, "_sharding"}
    | {ZARR3_METADATA, "d", "array_metadatas"}
)


def array_path(name: str, format: str) -> str:
    """The key prefix of a tensor's array: the name itself (zarr) or its orbax parameter name.

    >>> array_path("params/Dense_0/kernel", "orbax"), array_path("enc/w", "zarr")
    ('params.Dense_0.kernel', 'enc/w')
    """
    parts = name.split("/")
    bad = [p for p in parts if not p or p in (".", "..") or p.startswith(".")]
    if bad or (parts[0] in _RESERVED):
        raise FormatError(
            f"tensor {name!r} cannot be stored as a {format} array: its path parts must be "
            "non-empty, must not start with '.', and the first must not be one of "
            f"{sorted(_RESERVED)}; rename it in the plan (--rename)"
        )
    return ".".join(parts) if format == "orbax" else name


def _check_paths(paths: dict[str, str], where: str) -> None:
    """Refuse two tensors in one array, or an array inside another (its deletion would take both)."""
    by_path: dict[str, str] = {}
    for name, path in paths.items():
        if path in by_path:
            raise ConversionError(
                f"{where}: tensors {by_path[path]!r} and {name!r} would both be stored as array "
                f"{path!r}; rename one of them in the plan"
            )
        by_path[path] = name
    ordered = sorted(by_path)
    for a, b in itertools.pairwise(ordered):
        if b.startswith(a + "/"):
            raise ConversionError(
                f"{where}: tensor {by_path[b]!r} would be stored inside the array of tensor "
                f"{by_path[a]!r}; zarr arrays cannot nest, rename one of them in the plan"
            )


def chunk_shape(shape: Sequence[int], itemsize: int) -> list[int]:
    """Whole rows along axis 0, about CHUNK_BYTES per chunk (every extent at least 1).

    >>> chunk_shape((100_000, 1024), 4)
    [4096, 1024]
    >>> chunk_shape((), 4)
    []
    """
    if not shape:
        return []
    rest = [max(1, int(d)) for d in shape[1:]]
    row_bytes = max(1, int(np.prod(rest, dtype=np.int64)) * itemsize)
    rows = max(1, min(int(shape[0]), CHUNK_BYTES // row_bytes))
    return [rows, *rest]


def _zarr3_spec(kvstore: dict[str, Any], spec: TensorSpec) -> dict[str, Any]:
    dt = dtypes.to_numpy(spec.dtype)
    # No compression: chunk bytes are the tensor's own bytes, so two runs write identical
    # objects, and numbers that rarely compress (trained weights) cost no CPU.
    codec: dict[str, Any] = {"name": "bytes"}
    if dt.itemsize > 1:
        codec["configuration"] = {"endian": "little"}
    return {
        "driver": "zarr3",
        "kvstore": kvstore,
        "metadata": {
            "shape": list(spec.shape),
            "data_type": _ts().dtype(dt).name,
            "chunk_grid": {
                "name": "regular",
                "configuration": {"chunk_shape": chunk_shape(spec.shape, dt.itemsize)},
            },
            "chunk_key_encoding": {"name": "default"},
            "codecs": [codec],
        },
        # Store every chunk, even one equal to the fill value: orbax refuses a missing chunk
        # (store_array_data_equal_to_fill_value), and on S3 skipping one turns into a DELETE.
        "store_data_equal_to_fill_value": True,
    }


class _ArrayWriter:
    """Writes each tensor of one shard as a zarr3 array, whole chunks at a time.

    Tiles arrive as consecutive whole rows; rows that do not yet fill a chunk wait in a buffer
    (at most one chunk), so every chunk is written exactly once.
    """

    def __init__(
        self, store: _Store, tensors: Sequence[TensorSpec], paths: dict[str, str], where: str
    ) -> None:
        self._store, self._paths, self.where = store, paths, where
        self._cursor = TileCursor(where, tensors, begin=self._begin, end=self._end)
        self._array: Any = None
        self._chunk_rows = 1
        self._flushed = 0
        self._pending: list[np.ndarray] = []
        self._inflight: list[tuple[Any, str]] = []
        self.created: list[str] = []

    def _begin(self, spec: TensorSpec) -> None:
        path = self._paths[spec.name]
        create = _zarr3_spec(self._store.spec_at(_dir(path)), spec)
        self.created.append(path)
        self._array = self._store.wait(
            _ts().open(create, context=_context(), create=True, delete_existing=True),
            f"creating array {path!r}",
        )
        chunk = create["metadata"]["chunk_grid"]["configuration"]["chunk_shape"]
        self._chunk_rows = chunk[0] if chunk else 1
        self._flushed = 0
        self._pending = []

    def _end(self, spec: TensorSpec) -> None:
        self._flush(final=True)
        self._array = None

    def _put(self, start: int, block: np.ndarray) -> None:
        target = self._array if block.ndim == 0 else self._array[start : start + block.shape[0]]
        what = f"writing {self._paths_current()} rows {start}+"
        futures = target.write(block)
        # Once tensorstore has copied the block, the tile can go; its upload continues while
        # the next tile is prepared, with a few uploads in flight at most.
        self._store.wait(futures.copy, what)
        self._inflight.append((futures.commit, what))
        while len(self._inflight) > WRITES_IN_FLIGHT:
            self._drain(1)

    def _drain(self, count: int | None = None) -> None:
        while self._inflight and (count is None or count > 0):
            future, what = self._inflight.pop(0)
            self._store.wait(future, what)
            count = None if count is None else count - 1

    def _paths_current(self) -> str:
        return self.created[-1] if self.created else "?"

    def _flush(self, *, final: bool) -> None:
        if not self._pending:
            return
        rows = sum(p.shape[0] for p in self._pending)
        if rows < self._chunk_rows and not final:
            return
        block = self._pending[0] if len(self._pending) == 1 else np.concatenate(self._pending)
        self._put(self._flushed, block)
        self._flushed += rows
        self._pending = []

    def write(self, name: str, tile: np.ndarray, row: int) -> None:
        _, data = self._cursor.tile(name, tile, row)
        if data.ndim == 0:
            self._put(0, data)
            return
        if self._pending:  # top up the waiting partial chunk first
            need = self._chunk_rows - sum(p.shape[0] for p in self._pending)
            self._pending.append(data[:need])
            data = data[need:]
            self._flush(final=False)
        whole = (data.shape[0] // self._chunk_rows) * self._chunk_rows
        if whole:
            self._put(self._flushed, data[:whole])
            self._flushed += whole
        if data.shape[0] > whole:
            self._pending.append(np.array(data[whole:]))  # own copy: the tile is not ours

    def copy_from(self, name: str, src: ByteRange) -> bool:
        return False  # arrays are written through tensorstore; there is no file to copy into

    def close(self) -> None:
        self._cursor.close()
        self._drain()  # every chunk is stored before the shard's record is written

    def abort(self) -> None:
        for future, _ in self._inflight:
            future.cancel()
        self._array, self._pending, self._inflight = None, [], []


class _ArraySink:
    """One zarr/orbax "shard": a group of arrays, committed by writing its record last."""

    def __init__(
        self,
        dest: TensorstoreDestination,
        name: str,
        format: str,
        tensors: Sequence[TensorSpec],
        metadata: dict[str, str] | None,
    ) -> None:
        self.dest, self.name, self.format = dest, name, ARRAY_FORMATS[format]
        self.tensors, self.metadata = list(tensors), dict(metadata or {})
        where = f"{dest.url}/{name}"
        self.paths = {t.name: dest.item + array_path(t.name, self.format) for t in self.tensors}
        _check_paths(self.paths, where)
        store = dest.store
        # A rewrite must never look committed: drop the old record before touching its arrays,
        # and say which arrays are in flight so a rerun after a crash can remove them.
        store.delete(dest.record_key(name))
        store.write_json(dest.pending_key(name), {"arrays": sorted(self.paths.values())})
        self.writer = _ArrayWriter(store, self.tensors, self.paths, where)

    def commit(self) -> int:
        self.writer.close()
        nbytes = sum(t.nbytes for t in self.tensors)
        record = {
            "format": self.format,
            "nbytes": nbytes,
            "metadata": self.metadata,
            "tensors": [
                {
                    "name": t.name,
                    "shape": list(t.shape),
                    "dtype": t.dtype,
                    "path": self.paths[t.name],
                }
                for t in self.tensors
            ],
        }
        self.dest.store.write_json(self.dest.record_key(self.name), record)
        self.dest.store.delete(self.dest.pending_key(self.name))
        return nbytes

    def abort(self) -> None:
        self.writer.abort()
        try:  # best effort: if this fails too, the pending record lets a rerun clean up
            for path in self.writer.created:
                self.dest.store.delete_prefix(_dir(path))
            self.dest.store.delete(self.dest.pending_key(self.name))
        except WeightbridgeError:
            pass


class _ByteSink:
    """A byte-format shard: written to a local temporary file, uploaded whole by `commit`."""

    def __init__(
        self,
        dest: TensorstoreDestination,
        name: str,
        format: str,
        tensors: Sequence[TensorSpec],
        metadata: dict[str, str] | None,
    ) -> None:
        from weightbridge import io as wio

        self.dest, self.name = dest, name
        self._check_size(sum(t.nbytes for t in tensors))  # before any work on this shard
        fd, self.tmp = tempfile.mkstemp(
            prefix=f"{_UPLOAD_PREFIX}{os.getpid()}-", suffix=f"-{name}", dir=dest.tmpdir
        )
        os.close(fd)
        self.writer = wio.writer_class(format)(self.tmp, list(tensors), metadata)

    def _check_size(self, nbytes: int) -> None:
        if self.dest.store.spec["driver"] == "s3" and nbytes > S3_MAX_PUT_BYTES:
            raise ConversionError(
                f"{self.dest.url}/{self.name}: {nbytes / 2**30:.2f} GiB, more than the "
                f"{S3_MAX_PUT_BYTES / 2**30:.0f} GiB S3 takes in one PUT (tensorstore has no "
                "multipart upload); a single tensor this large needs --format zarr or orbax, "
                "which upload chunk by chunk"
            )

    def commit(self) -> int:
        self.writer.close()
        try:
            # One PUT of the whole shard (tensorstore has no multipart upload): its bytes pass
            # through memory once here, which is why `max_object_size` caps these shards.
            self._check_size(os.path.getsize(self.tmp))
            size, generation = self.dest.store.write_file(self.name, self.tmp)
            self.dest.store.write_json(
                self.dest.size_key(self.name), {"size": size, "generation": generation.hex()}
            )
        finally:
            _remove(self.tmp)
        return size

    def abort(self) -> None:
        self.writer.abort()
        _remove(self.tmp)


class TensorstoreDestination:
    """A conversion's output in a kvstore: an object-store prefix, ``memory://``, or a directory.

    Args:
        url: ``s3://bucket/prefix``, ``gs://bucket/prefix``, ``memory://name``, ``file:///dir``
            or a local directory.
        options: ``endpoint``, ``aws_region``, ``aws_credentials`` (see `kvstore_spec`),
            ``timeout`` (seconds per store operation), ``kvstore`` (a full tensorstore kvstore
            spec instead of the URL), ``tmpdir`` (where byte-format shards are staged),
            ``step`` (orbax only: write step `step` of a ``CheckpointManager`` rooted at `url`,
            i.e. ``<url>/<step>/default/``, with the step's own ``_CHECKPOINT_METADATA``, so
            ``CheckpointManager(url).restore(step)`` needs no args).

    Layout and commits:

    * JSON documents (journal, index, plan) are keys holding the JSON text.
    * A byte-format shard (safetensors, ...) is one key, written once with its full content;
      conversions keep such shards to `max_object_size` (64 MiB, except ``memory://``) so
      their upload fits in bounded memory. Its size and storage generation are kept under
      ``.weightbridge/sizes/`` so a resume learns the size without downloading the shard again.
    * A ``zarr``/``orbax`` shard is a group of arrays: zarr3 arrays at ``<prefix>/<name>``
      (zarr) or at the orbax parameter names ``<prefix>/params.Dense_0.kernel`` (orbax), chunked
      along axis 0 and uncompressed, so their bytes are a function of the plan alone. Its name
      (``model-00001-of-00003.shard``) exists only for the journal: `open_shard` first deletes
      the shard's record and lists its arrays under ``.weightbridge/pending/``; `commit` writes
      the record (the arrays, their specs) under ``.weightbridge/shards/`` and drops the pending
      entry. A shard without a record is not committed, whatever arrays exist;
      `remove_temporaries` deletes the arrays of pending shards. One shard of a terabyte model
      is one unit of work that any process can produce.
    * The checkpoint is made readable as a whole only when the journal is saved complete (the
      journal's last write): the orbax files ``_METADATA``, ``_CHECKPOINT_METADATA`` and
      ``commit_success.txt``, or zarr's group ``zarr.json`` files (the root one last), are
      written then, after every shard, and deleted when a conversion (re)starts, so an
      interrupted conversion never restores as if complete.

    There is no lock: object stores have no advisory locks, and a lock key left by a killed
    process would block its own rerun. Two conversions into one prefix at once are not detected.
    """

    def __init__(self, url: str | os.PathLike[str], **options: Any) -> None:
        self.url = os.fspath(url)
        self.options = dict(options)
        self.store = _Store(self.url, self.options, ConversionError)
        self.tmpdir = str(options.get("tmpdir") or tempfile.gettempdir())
        step = options.get("step")
        if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
            raise ConversionError(f"{self.url}: step must be a non-negative integer, got {step!r}")
        self.step: int | None = step
        # Where an orbax checkpoint goes: the prefix itself, or CheckpointManager's
        # <step>/<item>/ with orbax's default item name.
        self.item = "" if step is None else f"{step}/{ORBAX_DEFAULT_ITEM}/"
        self._unfinalized = False

    # -- keys ----------------------------------------------------------------------------------

    @staticmethod
    def is_array_shard(name: str) -> bool:
        return name.endswith(SHARD_SUFFIX) or name.endswith(SHARD_SUFFIX + ".index.json")

    def _key(self, name: str) -> str:
        return self.record_key(name) if self.is_array_shard(name) else name

    def record_key(self, name: str) -> str:
        return f"{STATE_PREFIX}shards/{name}"

    def pending_key(self, name: str) -> str:
        return f"{STATE_PREFIX}pending/{name}"

    def size_key(self, name: str) -> str:
        return f"{STATE_PREFIX}sizes/{name}"

    # -- Destination protocol ------------------------------------------------------------------

    def prepare(self) -> None:
        local = self.store.local_dir
        if local is not None:
            try:
                os.makedirs(local, exist_ok=True)
            except OSError as e:
                raise ConversionError(
                    f"{self.url}: cannot create the output directory ({e.strerror})"
                ) from e
        from weightbridge.streaming.journal import JOURNAL_NAME

        # One cheap question with a short deadline, so a missing bucket, a wrong endpoint or
        # missing credentials fail here, before any work. A listing, because S3 answers a read
        # in a missing bucket as a missing key.
        self.store.list(JOURNAL_NAME, timeout=min(PROBE_TIMEOUT_SECONDS, self.store.timeout))

    def exists(self, name: str) -> bool:
        return self.store.exists(self._key(name))

    def size(self, name: str) -> int | None:
        if self.is_array_shard(name):
            record = self.store.read_json(self._key(name))
            return int(record["nbytes"]) if isinstance(record, dict) else None
        known = self.store.read_json(self.size_key(name))
        if isinstance(known, dict):
            # Unchanged since we wrote it (same generation): the size we recorded is its size.
            r = self.store.wait(
                self.store.kv.read(
                    name, if_not_equal=bytes.fromhex(known["generation"]), byte_range=slice(0, 0)
                ),
                f"checking {name}",
            )
            if r.state == "unspecified":
                return int(known["size"])
            if r.state == "missing":
                return None
        data = self.store.read(name)
        return None if data is None else len(data)

    def remove(self, name: str) -> None:
        if self.is_array_shard(name):
            self._unfinalize()
            record = self.store.read_json(self._key(name))
            if isinstance(record, dict):
                self.store.delete(self._key(name))
                for t in record.get("tensors", []):
                    self.store.delete_prefix(_dir(str(t["path"])))
            return
        self.store.delete(name)
        self.store.delete(self.size_key(name))

    def remove_temporaries(self) -> None:
        prefix = f"{STATE_PREFIX}pending/"
        for key in self.store.list(prefix):
            name = key[len(prefix) :]
            pending = self.store.read_json(key)
            if not self.store.exists(self.record_key(name)) and isinstance(pending, dict):
                for path in pending.get("arrays", []):
                    self.store.delete_prefix(_dir(str(path)))
            self.store.delete(key)
        # Staged uploads and downloaded copies of killed runs (their process is gone) would
        # only fill the disk.
        for stem in (_UPLOAD_PREFIX, _DOWNLOAD_PREFIX):
            for path in glob.glob(os.path.join(glob.escape(self.tmpdir), stem + "*")):
                pid = os.path.basename(path)[len(stem) :].split("-", 1)[0]
                if pid.isdigit() and not _alive(int(pid)):
                    if os.path.isdir(path) and not os.path.islink(path):
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        _remove(path)

    def read_json(self, name: str) -> Any:
        return self.store.read_json(self._key(name))

    def write_json(self, name: str, obj: Any) -> None:
        from weightbridge.streaming.journal import JOURNAL_NAME

        if name == JOURNAL_NAME and isinstance(obj, dict):
            outputs = [str(n) for n in obj.get("outputs") or []]
            if obj.get("complete"):
                self.finalize(outputs)
            elif any(self.is_array_shard(n) for n in outputs):
                self._unfinalize()
        self.store.write_json(self._key(name), obj)

    def open_shard(
        self, name: str, format: str, tensors: Sequence[TensorSpec], metadata: dict[str, str] | None
    ) -> _ArraySink | _ByteSink:
        if format in ARRAY_FORMATS:
            return _ArraySink(self, name, format, tensors, metadata)
        return _ByteSink(self, name, format, tensors, metadata)

    def max_object_size(self, format: str) -> int | None:
        """The largest shard `format` may have here for the upload to stay in bounded memory.

        None for the array formats (zarr, orbax: written chunk by chunk, whatever the shard
        size) and for ``memory://`` (which keeps every value in this process anyway); for a byte
        format (safetensors, npz, h5, torch) anywhere else, MAX_OBJECT_BYTES: such a shard is
        uploaded as one value that passes through memory whole (see MAX_OBJECT_BYTES).
        `stream.convert` lowers ``max_shard_size`` to this; a larger tensor gets its own shard.
        """
        if format in ARRAY_FORMATS or self.store.spec["driver"] == "memory":
            return None
        return MAX_OBJECT_BYTES

    def open_reader(self, name: str | None = None) -> Any:
        if name is not None and self.is_array_shard(name):
            return self._shard_reader([name])
        if name is not None:
            return self._downloaded([name], name)
        from weightbridge.streaming.journal import JOURNAL_NAME

        journal = self.store.read_json(JOURNAL_NAME)
        outputs = [str(n) for n in (journal or {}).get("outputs") or []]
        shards = [n for n in outputs if self.is_array_shard(n) and not n.endswith(".index.json")]
        if shards:
            return self._shard_reader(shards)
        if outputs:
            index = [n for n in outputs if n.endswith(".index.json")]
            return self._downloaded(outputs, index[0] if index else outputs[0])
        return TensorstoreReader(self.url, _store=self._reader_store())

    def free_space(self) -> int | None:
        local = self.store.local_dir
        if local is None:
            return None  # object stores have no capacity to check
        try:
            return shutil.disk_usage(local).free
        except OSError:
            return None

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """No lock (see the class docstring)."""
        yield

    # -- finishing -----------------------------------------------------------------------------

    def finalize(self, outputs: Sequence[str]) -> None:
        """Write the files that make zarr/orbax output readable as a whole (after every shard).

        Nothing to do for byte formats, whose index is the stream's job.
        """
        names = [n for n in outputs if self.is_array_shard(n) and not n.endswith(".index.json")]
        if not names:
            return
        records = []
        for n in names:
            record = self.store.read_json(self.record_key(n))
            if not isinstance(record, dict):
                raise ConversionError(
                    f"{self.url}: shard {n} has no record, so the conversion is not complete; "
                    "rerun it"
                )
            records.append(record)
        formats = {str(r.get("format")) for r in records}
        if len(formats) != 1:
            raise ConversionError(f"{self.url}: shards of different formats {sorted(formats)}")
        tensors = [t for r in records for t in r["tensors"]]
        _check_paths({t["name"]: t["path"] for t in tensors}, self.url)
        metadata = records[0].get("metadata") or {}
        if formats == {"orbax"}:
            self._finalize_orbax(tensors, metadata)
        elif self.step is not None:
            raise ConversionError(f"{self.url}: step= applies to the orbax format only")
        else:
            self._finalize_zarr(tensors, metadata)
        self._unfinalized = False

    def _finalize_orbax(self, tensors: list[dict[str, Any]], metadata: dict[str, str]) -> None:
        tree: dict[str, Any] = {}
        for t in tensors:
            parts = str(t["name"]).split("/")
            tree[str(tuple(parts))] = {
                "key_metadata": [{"key": p, "key_type": 2} for p in parts],  # 2: a dict key
                "value_metadata": {
                    "value_type": "jax.Array",
                    "skip_deserialize": False,
                    "write_shape": list(t["shape"]),
                },
            }
        _check_tree([str(t["name"]) for t in tensors], self.url)
        item = self.item
        self.store.write_json(
            item + ORBAX_METADATA,
            {
                "tree_metadata": tree,
                "use_ocdbt": False,  # one array per parameter: deterministic keys, per-shard commits
                "use_zarr3": True,
                "store_array_data_equal_to_fill_value": True,
                "custom_metadata": None,
            },
        )
        # No _sharding file: device placement belongs to the restoring program (orbax then
        # restores numpy arrays, or places them as the abstract target it is given says).
        # Timestamps are fixed so a rerun writes the same bytes.
        handlers: Any = _ORBAX_STANDARD_HANDLER
        if item:
            self.store.write(item + ORBAX_COMMIT_SUCCESS, _COMMIT_TEXT)
            handlers = {ORBAX_DEFAULT_ITEM: _ORBAX_STANDARD_HANDLER}
        step_dir = item[: -len(ORBAX_DEFAULT_ITEM) - 1] if item else ""
        self.store.write_json(
            step_dir + ORBAX_CHECKPOINT_METADATA,
            {
                "item_handlers": handlers,
                "metrics": {},
                "performance_metrics": {},
                "init_timestamp_nsecs": 0,
                "commit_timestamp_nsecs": 0,
                "custom_metadata": {"weightbridge": metadata} if metadata else {},
            },
        )
        self.store.write(step_dir + ORBAX_COMMIT_SUCCESS, _COMMIT_TEXT)

    def _finalize_zarr(self, tensors: list[dict[str, Any]], metadata: dict[str, str]) -> None:
        groups: set[str] = set()
        for t in tensors:
            parts = str(t["path"]).split("/")
            groups.update("/".join(parts[:i]) for i in range(1, len(parts)))
        for g in sorted(groups):
            self.store.write_json(f"{g}/{ZARR3_METADATA}", _zarr3_group({}))
        # The root group last: a zarr reader that finds it finds every array.
        attrs = {"weightbridge": metadata} if metadata else {}
        self.store.write_json(ZARR3_METADATA, _zarr3_group(attrs))

    def _unfinalize(self) -> None:
        if self._unfinalized:
            return
        # Reverse order of finalize: the file that says "complete" goes first.
        step_dir = self.item[: -len(ORBAX_DEFAULT_ITEM) - 1] if self.item else ""
        for key in (
            step_dir + ORBAX_COMMIT_SUCCESS,
            step_dir + ORBAX_CHECKPOINT_METADATA,
            self.item + ORBAX_COMMIT_SUCCESS,
            self.item + ORBAX_METADATA,
            ZARR3_METADATA,
        ):
            self.store.delete(key)
        self._unfinalized = True

    # -- reading back --------------------------------------------------------------------------

    def _reader_store(self) -> _Store:
        return _Store(self.url, self.options, FormatError)

    def _shard_reader(self, names: Sequence[str]) -> TensorstoreReader:
        refs = []
        for n in names:
            record = self.store.read_json(self.record_key(n))
            if not isinstance(record, dict):
                raise FormatError(f"{self.url}: shard {n} has no record (not committed)")
            refs += [
                _ArrayRef(str(t["name"]), "", str(t["path"]), "zarr3") for t in record["tensors"]
            ]
        return TensorstoreReader(self.url, _store=self._reader_store(), _refs=refs)

    def _downloaded(self, names: Sequence[str], open_name: str) -> _DownloadedReader:
        from weightbridge import io as wio

        tmp = tempfile.mkdtemp(prefix=f"{_DOWNLOAD_PREFIX}{os.getpid()}-", dir=self.tmpdir)
        try:
            for n in names:
                data = self.store.read(n)
                if data is None:
                    raise FormatError(f"{self.url}: {n} does not exist")
                with open(os.path.join(tmp, n), "wb") as f:
                    f.write(data)
            return _DownloadedReader(wio.open_reader(os.path.join(tmp, open_name)), tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _zarr3_group(attributes: dict[str, Any]) -> dict[str, Any]:
    return {"zarr_format": 3, "node_type": "group", "attributes": attributes}


def _check_tree(names: list[str], where: str) -> None:
    """An orbax tree cannot have a leaf that is also a branch (``a`` and ``a/b``)."""
    leaves = set(names)
    for n in names:
        parts = n.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in leaves:
                raise ConversionError(
                    f"{where}: tensor {n!r} would sit below tensor {'/'.join(parts[:i])!r} in the "
                    "orbax tree; a leaf cannot also be a branch, rename one of them in the plan"
                )


class _DownloadedReader(BaseReader):
    """A reader over local copies of downloaded objects; `close` deletes the copies."""

    def __init__(self, inner: Any, tmpdir: str) -> None:
        self._inner, self._tmp = inner, tmpdir
        self.path = inner.path

    def specs(self) -> CheckpointSpec:
        spec: CheckpointSpec = self._inner.specs()
        return spec

    def read(self, name: str) -> np.ndarray:
        arr: np.ndarray = self._inner.read(name)
        return arr

    def release(self, name: str) -> None:
        self._inner.release(name)

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)


def _remove_empty_dirs(top: str) -> None:
    """Remove `top` and the directories below it that deleting their files left empty."""
    if not os.path.isdir(top):
        return
    for dirpath, _, _ in sorted(os.walk(top), key=lambda e: -len(e[0])):
        try:
            os.rmdir(dirpath)
        except OSError:  # not empty: something else lives there
            pass


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
