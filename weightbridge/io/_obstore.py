"""Object stores through obstore: ranged reads of byte-format sources and multipart uploads.

tensorstore (`weightbridge.io._kvstore`) stays the client for zarr/orbax; it has no multipart
upload and does not report an object's size, which byte formats need (a zip's directory sits at
its end). obstore (Rust's `object_store`, one ~5 MB wheel) does both; it is the optional extra
``weightbridge[cloud]`` and is imported only when a URL needs it.

Configuration follows the tensorstore side, so one ``--endpoint`` means the same thing on both:
endpoint = the argument, else ``$WEIGHTBRIDGE_S3_ENDPOINT``, ``$AWS_ENDPOINT_URL_S3``,
``$AWS_ENDPOINT_URL``; region = the argument, else ``$AWS_REGION`` / ``$AWS_DEFAULT_REGION``, else
``us-east-1``. For ``gs://``: endpoint = the argument, else ``$STORAGE_EMULATOR_HOST`` (Google's
convention for emulators), with a dummy token there without Google credentials (`gcs_anonymous`).
Every request has a deadline and few retries, so an unreachable store ends in a
named error (`StoreUnreachable`) within ~a minute instead of a hang.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection
from datetime import timedelta
from typing import Any

from weightbridge.errors import FormatError, WeightbridgeError
from weightbridge.io._kvstore import (
    ENDPOINT_ENV,
    GCS_ANONYMOUS_TOKEN,
    GCS_EMULATOR_ENV,
    gcs_anonymous,
    gcs_endpoint,
)

# Per request: connecting must succeed within CONNECT, a whole request within REQUEST; a failed
# request is retried at most RETRIES times within RETRY_WINDOW. Large transfers are split into
# parts (multipart upload, ranged reads), so no single request needs long.
CONNECT_TIMEOUT = timedelta(seconds=10)
REQUEST_TIMEOUT = timedelta(seconds=300)
RETRIES = 3
RETRY_WINDOW = timedelta(seconds=60)

_URL = re.compile(r"^(s3|gs|https?)://([^/]*)/?(.*)$", re.IGNORECASE)


class StoreUnreachable(WeightbridgeError):
    """An object store did not answer (refused, timed out, unknown host) or refused access."""


def obstore_module() -> Any:
    try:
        import obstore
    except ImportError as e:  # pragma: no cover - depends on the install
        raise WeightbridgeError(
            "reading byte formats from (or writing them to) an object store needs obstore: "
            "pip install 'weightbridge[cloud]'"
        ) from e
    return obstore


def endpoint_from_env(endpoint: str | None = None) -> str | None:
    env = os.environ
    return (
        endpoint
        or env.get(ENDPOINT_ENV)
        or env.get("AWS_ENDPOINT_URL_S3")
        or env.get("AWS_ENDPOINT_URL")
        or None
    )


def is_object_url(location: str) -> bool:
    """Whether `location` is an object URL obstore reads in place (s3, gs, http, https).

    >>> is_object_url("s3://b/m.safetensors"), is_object_url("memory://x"), is_object_url("m.bin")
    (True, False, False)
    """
    m = _URL.match(location)
    return m is not None and bool(m.group(2))


def split_url(url: str) -> tuple[str, str, str]:
    """(scheme, bucket or host, key) of an object URL.

    >>> split_url("s3://bucket/dir/model.safetensors")
    ('s3', 'bucket', 'dir/model.safetensors')
    >>> split_url("https://example.org/files/m.bin")
    ('https', 'example.org', 'files/m.bin')
    """
    m = _URL.match(url)
    if m is None or not m.group(2):
        raise FormatError(
            f"{url}: not an object URL weightbridge can read in place; write it as "
            "s3://bucket/key, gs://bucket/key or https://host/path"
        )
    return m.group(1).lower(), m.group(2), m.group(3)


def open_store(url: str, *, endpoint: str | None = None, aws_region: str | None = None) -> Any:
    """The obstore store holding `url`'s bucket (S3, GCS) or host (HTTP), with deadlines.

    Keys passed to the store's operations are then the URL's key part (see `split_url`).
    """
    scheme, bucket, _ = split_url(url)
    store_mod = obstore_module().store
    client: dict[str, Any] = {
        "connect_timeout": CONNECT_TIMEOUT,
        "timeout": REQUEST_TIMEOUT,
    }
    retry: dict[str, Any] = {"max_retries": RETRIES, "retry_timeout": RETRY_WINDOW}
    if scheme == "s3":
        endpoint = endpoint_from_env(endpoint)
        env = os.environ
        region = aws_region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        config: dict[str, Any] = {"region": region or "us-east-1"}
        if endpoint:
            config["endpoint"] = endpoint
            # S3-compatible servers (moto, MinIO) address buckets by path, not by host name.
            config["virtual_hosted_style_request"] = False
            if endpoint.lower().startswith("http://"):
                client["allow_http"] = True
        return store_mod.S3Store(bucket, config=config, client_options=client, retry_config=retry)
    if scheme == "gs":
        gcs: dict[str, Any] = {}
        server = gcs_endpoint(endpoint)
        if server is not None:
            gcs["base_url"] = server
            if server.lower().startswith("http://"):
                client["allow_http"] = True
            if gcs_anonymous():
                # An emulator: any token. (obstore 0.12's skip_signature still fetches a
                # token from the metadata server for uploads.)
                gcs["bearer_token"] = GCS_ANONYMOUS_TOKEN
        return store_mod.GCSStore(bucket, config=gcs, client_options=client, retry_config=retry)
    if scheme == "http":
        client["allow_http"] = True
    return store_mod.HTTPStore.from_url(
        f"{scheme}://{bucket}", client_options=client, retry_config=retry
    )


def _is_missing(e: BaseException) -> bool:
    return isinstance(e, FileNotFoundError) or "NotFound" in type(e).__name__


def describe_failure(url: str, e: BaseException, endpoint: str | None = None) -> WeightbridgeError:
    """A named error for a failed request: which object, which endpoint, and what to check."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    where, variable, credentials = "", ENDPOINT_ENV, "AWS_ACCESS_KEY_ID, ..."
    if url.lower().startswith("s3://"):
        where = f" at {endpoint_from_env(endpoint) or 'AWS (no --endpoint given)'}"
    elif url.lower().startswith("gs://"):
        where = f" at {gcs_endpoint(endpoint) or 'Google (no --endpoint given)'}"
        variable, credentials = GCS_EMULATOR_ENV, "GOOGLE_APPLICATION_CREDENTIALS, ..."
    if _is_missing(e):
        return FormatError(f"{url}: no such object{where}; check the bucket and key")
    return StoreUnreachable(
        f"{url}: the object store{where} did not answer ({text}); check --endpoint (or "
        f"${variable}), the network and the credentials ({credentials})"
    )


# -- multipart uploads (byte-format shards written into s3://, gs://) --------------------------

# Part size of a multipart upload, and parts in flight at once. Parts are slices of a memory map
# of the staged shard, handed to obstore without a copy (measured: RssAnon stays flat while a
# 256 MB file uploads), so neither number costs anonymous memory: they trade requests per GB
# (S3 bills per request; 16 MiB parts are 64 per GB) against parallelism on one connection
# pool. An object smaller than one part is sent in one PUT.
PART_BYTES = 16 << 20
UPLOAD_CONCURRENCY = 8
# S3 takes at most this many parts per upload, each at least 5 MiB (but the last); so a part
# grows with the object (`part_size`) to reach S3's 5 TiB object limit.
MAX_PARTS = 10_000
MIN_PART_BYTES = 5 << 20


def obstore_available() -> bool:
    """Whether obstore can be imported (the ``weightbridge[cloud]`` extra)."""
    try:
        import obstore  # noqa: F401
    except ImportError:
        return False
    return True


def part_size(nbytes: int, part: int | None = None) -> int:
    """The part size of an upload of `nbytes`: `part` (default `PART_BYTES`, at least 5 MiB),
    raised to a whole MiB where `MAX_PARTS` parts would not hold the object.

    >>> part_size(5 << 30) == PART_BYTES, part_size(1 << 40) >> 20
    (True, 105)
    """
    want = max(MIN_PART_BYTES, PART_BYTES if part is None else part)
    least = -(-nbytes // MAX_PARTS)
    return max(want, -(-least // (1 << 20)) << 20)


def _send_part(writer: Any, part: memoryview) -> None:
    # One part of `upload_file`: obstore keeps a reference to the mapped bytes until the part
    # is sent (no copy) and blocks while UPLOAD_CONCURRENCY parts are in flight.
    writer.write(part)


def _from_obstore(e: BaseException) -> bool:
    """Whether `e` is obstore's report of a failed request (not a local error, not ours)."""
    return type(e).__module__.startswith("obstore")


def upload_file(
    store: Any,
    key: str,
    path: str,
    *,
    url: str,
    endpoint: str | None = None,
    part: int | None = None,
) -> int:
    """Upload a local file to `key`: one PUT if it is smaller than a part, else a multipart
    upload of `part_size` parts. Returns the size.

    The object appears only when the upload completes (S3 and GCS show a multipart upload's
    object only after its completion request), so a process killed mid-upload leaves no object
    that looks complete, only an open upload (`abort_uploads` removes those). Any failure here
    aborts the upload.

    Raises:
        StoreUnreachable: the store failed or did not answer (`describe_failure`).
    """
    import mmap

    obstore = obstore_module()
    size = os.path.getsize(path)
    step = part_size(size, part)
    writer = obstore.open_writer(store, key, buffer_size=step, max_concurrency=UPLOAD_CONCURRENCY)
    try:
        if size:
            with open(path, "rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            view = memoryview(mapped)
            try:
                for offset in range(0, size, step):
                    _send_part(writer, view[offset : offset + step])
                writer.close()  # the remaining parts, then the completion request
            finally:
                view.release()
                try:
                    mapped.close()
                except BufferError:  # obstore still holds a part: the map goes with it
                    pass
        else:
            writer.close()
    except BaseException as e:
        try:
            writer.__exit__(type(e), e, e.__traceback__)  # aborts a multipart upload
        except Exception:  # already closed (a failed completion): `abort_uploads` on a rerun
            pass
        if _from_obstore(e):
            raise describe_failure(f"{url.rstrip('/')}/{key}", e, endpoint) from e
        raise
    return size


def abort_uploads(
    url: str,
    prefix: str,
    keys: Collection[str] | None,
    *,
    endpoint: str | None = None,
    aws_region: str | None = None,
) -> int | None:
    """Abort the open multipart uploads (of killed processes) of `keys` in `url`'s bucket, or,
    `keys` None, of every key directly under `prefix`. Returns how many, or None if they
    cannot be listed here.

    obstore (0.12) cannot list or abort uploads it did not start itself, so this uses boto3's
    ListMultipartUploads / AbortMultipartUpload when boto3 is installed, on S3 only. Without
    it, an upload of a killed process stays until the bucket's lifecycle rule
    (``AbortIncompleteMultipartUpload``) removes it; a rerun uploads the object again either
    way. Best effort: a failure to list or abort is not an error (nothing that looks complete
    depends on it).
    """
    scheme, bucket, _ = split_url(url)
    if scheme != "s3":
        return None
    try:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return None
    env = os.environ
    region = aws_region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
    try:
        client = boto3.client(
            "s3",
            endpoint_url=endpoint_from_env(endpoint),
            region_name=region,
            config=Config(
                connect_timeout=CONNECT_TIMEOUT.total_seconds(),
                read_timeout=60,
                retries={"max_attempts": RETRIES},
            ),
        )
        wanted = None if keys is None else set(keys)
        aborted = 0
        pages = client.get_paginator("list_multipart_uploads").paginate(
            Bucket=bucket, Prefix=prefix
        )
        for page in pages:
            for upload in page.get("Uploads", []):
                key = str(upload["Key"])
                mine = key in wanted if wanted is not None else "/" not in key[len(prefix) :]
                if mine:
                    client.abort_multipart_upload(
                        Bucket=bucket, Key=key, UploadId=upload["UploadId"]
                    )
                    aborted += 1
        return aborted
    except (BotoCoreError, ClientError):
        return None


# Chunks of a download written to a local file: large enough for few Python round trips,
# small beside the memory bound.
DOWNLOAD_CHUNK_BYTES = 8 << 20


def download_file(store: Any, key: str, path: str, *, url: str, endpoint: str | None = None) -> int:
    """Stream the object `key` into the local file `path`, a chunk at a time; its size.

    Raises:
        FormatError: no such object.
        StoreUnreachable: the store failed or did not answer.
    """
    obstore = obstore_module()
    size = 0
    try:
        result = obstore.get(store, key)
        with open(path, "wb") as f:
            for chunk in result.stream(min_chunk_size=DOWNLOAD_CHUNK_BYTES):
                f.write(chunk)
                size += len(chunk)
    except Exception as e:
        if _from_obstore(e):
            raise describe_failure(f"{url.rstrip('/')}/{key}", e, endpoint) from e
        raise
    return size


def _head(store: Any, key: str, *, url: str, endpoint: str | None) -> dict[str, Any] | None:
    """The object `key`'s metadata (one HEAD request), None if there is none."""
    obstore = obstore_module()
    try:
        return dict(obstore.head(store, key))
    except Exception as e:
        if _is_missing(e):
            return None
        if _from_obstore(e):
            raise describe_failure(f"{url.rstrip('/')}/{key}", e, endpoint) from e
        raise


def object_etag(store: Any, key: str, *, url: str, endpoint: str | None = None) -> str | None:
    """The ETag of the object `key` with its size (one HEAD request), None if there is none."""
    head = _head(store, key, url=url, endpoint=endpoint)
    etag = head.get("e_tag") if head else None
    return f"{head['size']}:{etag}" if head and etag else None


def object_size(store: Any, key: str, *, url: str, endpoint: str | None = None) -> int | None:
    """The size of the object `key` (one HEAD request), None if there is none."""
    head = _head(store, key, url=url, endpoint=endpoint)
    return None if head is None else int(head["size"])
