"""Where tensorstore data lives: kvstore URLs and specs, the shared context, and `Store`, a
kvstore at a directory-like prefix with deadlines and readable errors.

Shared by the zarr format module (`weightbridge.io.zarr`) and the object-store destination
(`weightbridge.streaming.dest.object_store`). tensorstore is imported on first use, and that
first use also tunes glibc's allocator for it (`_return_freed_blocks`).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import sys
import threading
from typing import Any

import numpy as np

from weightbridge.errors import FormatError, WeightbridgeError
from weightbridge.spec import parse_json

# Every tensorstore operation waits at most this long. tensorstore retries transient network
# errors itself (and retries a missing S3 bucket forever), so a deadline is what turns a
# misconfigured endpoint into an error instead of a hang. Large shards upload in one PUT.
TIMEOUT_SECONDS = 600.0
# Read when no endpoint is given (--endpoint on the command line, endpoint= in Python).
ENDPOINT_ENV = "WEIGHTBRIDGE_S3_ENDPOINT"

# Google's client libraries' variable naming a GCS emulator (``host:port`` or a URL): the
# endpoint of ``gs://`` URLs when none is given (--endpoint, endpoint=).
GCS_EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
# tensorstore's gcs driver takes its server only from this variable (its spec has no endpoint
# member), and, without credentials, a bearer token only from the next one.
_TS_GCS_URL_ENV = "TENSORSTORE_GCS_HTTP_URL"
_TS_GCS_TOKEN_ENV = "GOOGLE_AUTH_TOKEN_FOR_TESTING"
# Where Google credentials come from besides the metadata server (obstore's and tensorstore's).
_GOOGLE_CREDENTIAL_ENVS = (
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_SERVICE_ACCOUNT",
    "GOOGLE_SERVICE_ACCOUNT_PATH",
    "GOOGLE_SERVICE_ACCOUNT_KEY",
    "GOOGLE_BEARER_TOKEN",
)
# The token sent to a GCS endpoint that takes anonymous requests (an emulator, see
# `gcs_anonymous`): emulators accept any.
GCS_ANONYMOUS_TOKEN = "anonymous"

# Splits a URL into scheme and the rest (`weightbridge._files.is_url` says whether it is one).
_URL = re.compile(r"^([a-z][a-z0-9+.-]*)://(.*)$", re.IGNORECASE)
_CONTEXT: Any = None
_CONTEXT_LOCK = threading.Lock()
# Numbers the scratch keys of `Store.write_file` (itertools.count is atomic under the GIL).
_UPLOADS = itertools.count()


def ts_module() -> Any:
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


def ts_context() -> Any:
    """One tensorstore context per process.

    ``memory://`` stores live in a context, so a destination and the reader that checks it must
    share one; sharing also shares HTTP connection pools between readers and writers.
    """
    global _CONTEXT
    with _CONTEXT_LOCK:
        if _CONTEXT is None:
            _CONTEXT = ts_module().Context()
        return _CONTEXT


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

    GCS: `endpoint` (a GCS emulator or proxy; default ``$STORAGE_EMULATOR_HOST``, see
    `gcs_endpoint`) is set process-wide, as tensorstore takes it (`_point_tensorstore_at_gcs`);
    without Google credentials, requests there are anonymous (`gcs_anonymous`).

    >>> kvstore_spec("s3://bucket/out", endpoint="http://127.0.0.1:9000", aws_region="x")["path"]
    'out/'
    >>> kvstore_spec("memory://scratch")
    {'driver': 'memory', 'path': 'scratch/'}
    """
    m = _URL.match(location)
    if m is None or m.group(1).lower() == "file":
        path = location if m is None else m.group(2)
        return {"driver": "file", "path": as_dir(os.path.abspath(path))}
    scheme, rest = m.group(1).lower(), m.group(2)
    if scheme == "memory":
        return {"driver": "memory", "path": as_dir(rest.strip("/"))}
    if scheme in ("s3", "gs"):
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise FormatError(f"{location}: no bucket name; write it as {scheme}://bucket/prefix")
        spec: dict[str, Any] = {
            "driver": "s3" if scheme == "s3" else "gcs",
            "bucket": bucket,
            "path": as_dir(key.strip("/")),
        }
        if scheme == "gs":
            server = gcs_endpoint(endpoint)
            if server is not None:
                _point_tensorstore_at_gcs(server, location)
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


def gcs_endpoint(endpoint: str | None = None) -> str | None:
    """The server of ``gs://`` URLs: `endpoint`, else ``$STORAGE_EMULATOR_HOST``, as a URL;
    None for Google's own.

    >>> gcs_endpoint("127.0.0.1:4443"), gcs_endpoint("https://gcs.example/")
    ('http://127.0.0.1:4443', 'https://gcs.example')
    """
    raw = endpoint or os.environ.get(GCS_EMULATOR_ENV) or None
    if raw is None:
        return None
    return (raw if "://" in raw else "http://" + raw).rstrip("/")


def gcs_anonymous() -> bool:
    """Whether requests to a custom GCS endpoint go without Google credentials (as Google's
    clients do with ``$STORAGE_EMULATOR_HOST``): none is configured in the environment or by
    ``gcloud auth application-default login``."""
    if any(os.environ.get(name) for name in _GOOGLE_CREDENTIAL_ENVS):
        return False
    adc = os.path.join("~", ".config", "gcloud", "application_default_credentials.json")
    return not os.path.exists(os.path.expanduser(adc))


def _point_tensorstore_at_gcs(endpoint: str, location: str) -> None:
    """Make tensorstore's gcs driver talk to `endpoint`, through the process environment (the
    only way it takes one), with a dummy token where `gcs_anonymous`.

    Raises:
        FormatError: tensorstore already talks to another GCS endpoint in this process.
    """
    env = os.environ
    current = env.get(_TS_GCS_URL_ENV)
    if current and current.rstrip("/") != endpoint:
        raise FormatError(
            f"{location}: tensorstore reaches one GCS endpoint per process, and this one uses "
            f"{current} (${_TS_GCS_URL_ENV}), not {endpoint}; convert from one GCS endpoint "
            "per process (or unset the variable)"
        )
    env[_TS_GCS_URL_ENV] = endpoint
    if gcs_anonymous():
        env.setdefault(_TS_GCS_TOKEN_ENV, GCS_ANONYMOUS_TOKEN)


def as_dir(path: str) -> str:
    return path if not path or path.endswith("/") else path + "/"


def _successor(prefix: str) -> str:
    """The smallest key greater than every key that starts with `prefix` (for key ranges)."""
    raw = prefix.encode()
    while raw and raw[-1] == 0xFF:
        raw = raw[:-1]
    if not raw:
        return ""
    return (raw[:-1] + bytes([raw[-1] + 1])).decode("utf-8", "surrogateescape")


class Store:
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
        self.spec["path"] = as_dir(str(self.spec.get("path", "")))
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
                f"endpoint (--endpoint on the command line, endpoint= in Python, or "
                f"${ENDPOINT_ENV}) and the credentials"
            ) from e
        except (ValueError, OSError) as e:
            raise self.error(f"{self.url}: {what} failed: {e}") from e

    @property
    def kv(self) -> Any:
        with self._lock:
            if self._kv is None:
                self._kv = self.wait(
                    ts_module().KvStore.open(self.spec, context=ts_context()), "opening the store"
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
            array = self.wait(ts_module().open(spec, context=ts_context()), what)
            source = np.memmap(path, np.uint8, mode="r")  # file pages, not anonymous memory
            futures = array.write(source)
            self.wait(futures.copy, what)
            del source
            self.wait(futures.commit, what)
        finally:
            memory = ts_module().KvStore.open(
                {"driver": "memory", "path": scratch}, context=ts_context()
            )
            self.wait(self.wait(memory, what).delete_range(ts_module().KvStore.KeyRange()), what)
        r = self.wait(self.kv.read(key, byte_range=slice(0, 0)), f"checking {key}")
        if r.state != "value":
            raise self.error(f"{self.url}/{key}: missing right after it was written")
        return size, bytes(r.stamp.generation)

    def delete(self, key: str) -> None:
        self.wait(self.kv.write(key, None), f"deleting {key}")

    def delete_prefix(self, prefix: str) -> None:
        rng = ts_module().KvStore.KeyRange(inclusive_min=prefix, exclusive_max=_successor(prefix))
        self.wait(self.kv.delete_range(rng), f"deleting {prefix}*")
        local = self.local_dir
        if local is not None and prefix.endswith("/"):
            remove_empty_dirs(os.path.join(local, prefix))

    def list(self, prefix: str = "", timeout: float | None = None) -> list[str]:
        rng = None
        if prefix:
            rng = ts_module().KvStore.KeyRange(
                inclusive_min=prefix, exclusive_max=_successor(prefix)
            )
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
        self.write(key, json_bytes(obj))


def json_bytes(obj: Any) -> bytes:
    # Fixed formatting (as LocalDirectory writes it) so reruns write identical bytes.
    return (json.dumps(obj, indent=1) + "\n").encode("utf-8")


def remove_empty_dirs(top: str) -> None:
    """Remove `top` and the directories below it that deleting their files left empty."""
    if not os.path.isdir(top):
        return
    for dirpath, _, _ in sorted(os.walk(top), key=lambda e: -len(e[0])):
        try:
            os.rmdir(dirpath)
        except OSError:  # not empty: something else lives there
            pass
