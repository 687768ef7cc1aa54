"""Object stores through obstore: ranged reads of byte-format sources and multipart uploads.

tensorstore (`weightbridge.io._kvstore`) stays the client for zarr/orbax; it has no multipart
upload and does not report an object's size, which byte formats need (a zip's directory sits at
its end). obstore (Rust's `object_store`, one ~5 MB wheel) does both; it is the optional extra
``weightbridge[cloud]`` and is imported only when a URL needs it.

Configuration follows the tensorstore side, so one ``--endpoint`` means the same thing on both:
endpoint = the argument, else ``$WEIGHTBRIDGE_S3_ENDPOINT``, ``$AWS_ENDPOINT_URL_S3``,
``$AWS_ENDPOINT_URL``; region = the argument, else ``$AWS_REGION`` / ``$AWS_DEFAULT_REGION``, else
``us-east-1``. Every request has a deadline and few retries, so an unreachable store ends in a
named error (`StoreUnreachable`) within ~a minute instead of a hang.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from typing import Any

from weightbridge.errors import FormatError, WeightbridgeError
from weightbridge.io._kvstore import ENDPOINT_ENV

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
        return store_mod.GCSStore(bucket, client_options=client, retry_config=retry)
    if scheme == "http":
        client["allow_http"] = True
    return store_mod.HTTPStore.from_url(
        f"{scheme}://{bucket}", client_options=client, retry_config=retry
    )


def describe_failure(url: str, e: BaseException, endpoint: str | None = None) -> WeightbridgeError:
    """A named error for a failed request: which object, which endpoint, and what to check."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    where = f" at {endpoint_from_env(endpoint)}" if url.lower().startswith("s3://") else ""
    if isinstance(e, FileNotFoundError) or "NotFound" in type(e).__name__:
        return FormatError(f"{url}: no such object{where}; check the bucket and key")
    return StoreUnreachable(
        f"{url}: the object store{where} did not answer ({text}); check --endpoint (or "
        f"${ENDPOINT_ENV}), the network and the credentials (AWS_ACCESS_KEY_ID, ...)"
    )
