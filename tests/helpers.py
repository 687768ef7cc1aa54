"""Small helpers several test modules share (imported as ``from helpers import ...``)."""

from __future__ import annotations

import contextlib
import email.utils
import http.server
import mmap
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

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


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves the files under `root` with HEAD and ranged GETs, counting the bytes it sends."""

    root = Path()
    # (path, first byte, end) of every body sent; each server gets its own list (`serving_ranges`).
    served: ClassVar[list[tuple[str, int, int]]] = []
    lock: ClassVar[threading.Lock] = threading.Lock()

    def _target(self) -> Path | None:
        path = (self.root / urllib.parse.unquote(self.path.lstrip("/"))).resolve()
        return path if path.is_file() and self.root.resolve() in path.parents else None

    def _common_headers(self, path: Path) -> None:
        stat = path.stat()
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{stat.st_mtime_ns:x}-{stat.st_size:x}"')
        self.send_header("Last-Modified", email.utils.formatdate(stat.st_mtime, usegmt=True))

    def do_HEAD(self) -> None:
        path = self._target()
        if path is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(path.stat().st_size))
        self._common_headers(path)
        self.end_headers()

    def do_GET(self) -> None:
        path = self._target()
        if path is None:
            self.send_error(404)
            return
        size = path.stat().st_size
        first, last = 0, size - 1
        wanted = self.headers.get("Range", "")
        if wanted.startswith("bytes="):
            a, _, b = wanted[len("bytes=") :].partition("-")
            first, last = int(a), min(int(b) if b else last, last)
            if first > last:
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(last - first + 1))
        self._common_headers(path)
        self.end_headers()
        with open(path, "rb") as f:
            f.seek(first)
            data = f.read(last - first + 1)
        # Recorded before it is sent: once a client has the bytes, the count includes them.
        with self.lock:
            self.served.append((self.path, first, first + len(data)))
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serving_ranges(root: Path) -> Iterator[tuple[str, list[tuple[str, int, int]]]]:
    """The range server on 127.0.0.1 for `root`: (base URL, the ranges it served)."""
    served: list[tuple[str, int, int]] = []
    handler = type("Handler", (RangeHandler,), {"root": root, "served": served})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:  # the socket listens from here on: no need to wait for the thread
        yield f"http://127.0.0.1:{server.server_address[1]}", served
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=60)


def served_ranges(served: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    with RangeHandler.lock:
        return list(served)
