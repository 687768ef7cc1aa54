"""Small helpers several test modules share (imported as ``from helpers import ...``)."""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from weightbridge.io._kvstore import ENDPOINT_ENV


def is_memory_map(arr: np.ndarray) -> bool:
    """Whether `arr` is a view of a memory-mapped file (not a copy in anonymous memory).

    Follows the chain of bases: views, memoryviews, and the holder `as_strided` puts between
    an array and the one it was built on.
    """
    base: object = arr
    while True:
        if isinstance(base, memoryview):
            base = base.obj
            continue
        nxt = getattr(base, "base", None)
        if nxt is None:
            return isinstance(base, mmap.mmap)
        base = nxt


@contextlib.contextmanager
def moto_s3(
    bucket: str, *, endpoint_env: str | None, read_timeout: float
) -> Iterator[tuple[str, Any]]:
    """moto's S3 server on 127.0.0.1 with `bucket` created and test credentials in the
    environment: yields (endpoint, a boto3 client). The endpoint is put in the environment
    variable `endpoint_env`; with None, every endpoint variable is cleared, so the code under
    test reaches the server only through what it is given (--endpoint, endpoint=)."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("AWS_ACCESS_KEY_ID", "testing")
            mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
            if endpoint_env is not None:
                mp.setenv(endpoint_env, endpoint)
            else:
                for name in (ENDPOINT_ENV, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
                    mp.delenv(name, raising=False)
            client = boto3.client(
                "s3",
                endpoint_url=endpoint,
                region_name="us-east-1",
                config=boto3.session.Config(connect_timeout=5, read_timeout=read_timeout),
            )
            client.create_bucket(Bucket=bucket)  # first: tensorstore retries a missing bucket
            yield endpoint, client
    finally:
        server.stop()
