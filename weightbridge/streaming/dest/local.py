"""A local directory as a `Destination`, and `destination_for`, which picks the destination
of a path or URL.

A shard is written under a hidden temporary name through `open_shard`; `commit` makes it
visible under its final name atomically (fsync, rename, fsync of the directory), `abort`
removes the temporary file. The protocols are in `weightbridge.streaming.dest.base`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
from collections.abc import Iterator, Sequence
from typing import Any

from weightbridge import io as wio
from weightbridge._files import atomic_write_json, fsync_dir, is_remote_url, temporary_name
from weightbridge.errors import ConversionError
from weightbridge.io.base import Reader, ShardWriter
from weightbridge.spec import TensorSpec
from weightbridge.streaming.dest.base import ARRAY_FORMATS, Completed, Destination

LOCK_NAME = ".weightbridge.lock"
# Where per-shard records go (`weightbridge.streaming.tasks.RECORD_PREFIX`, a relative path).
RECORDS_DIR = ".weightbridge/committed"


def destination_for(
    dest: str | os.PathLike[str] | Destination, *, format: str | None = None, **options: Any
) -> Destination:
    """Where output goes: a tensorstore destination for URLs (``s3://bucket/x``) and for the
    array formats (zarr, orbax) even on local paths; a local directory otherwise."""
    if not isinstance(dest, (str, os.PathLike)):
        return dest
    text = os.fspath(dest)
    if is_remote_url(text) or format in ARRAY_FORMATS:
        from weightbridge.streaming.dest.object_store import TensorstoreDestination

        return TensorstoreDestination(text, **options)
    return LocalDirectory(text.removeprefix("file://"))


class _LocalSink:
    def __init__(
        self,
        directory: LocalDirectory,
        name: str,
        writer_cls: type[ShardWriter],
        tensors: Sequence[TensorSpec],
        metadata: dict[str, str] | None,
    ) -> None:
        self.directory, self.name = directory, name
        self.tmp = temporary_name(os.path.join(directory.url, name))
        self.writer = writer_cls(self.tmp, list(tensors), metadata)

    def commit(self) -> int:
        self.writer.close()  # flushes and fsyncs
        size = os.path.getsize(self.tmp)
        os.replace(self.tmp, os.path.join(self.directory.url, self.name))
        fsync_dir(self.directory.url)
        return size

    def abort(self) -> None:
        self.writer.abort()
        _remove(self.tmp)


class LocalDirectory:
    """A directory on a local filesystem: temp names, fsync and rename for atomic commits."""

    def __init__(self, path: str) -> None:
        self.url = path

    def prepare(self) -> None:
        try:
            os.makedirs(self.url, exist_ok=True)
        except OSError as e:
            raise ConversionError(
                f"{self.url}: cannot create the output directory ({e.strerror})"
            ) from e
        if not os.access(self.url, os.W_OK):
            raise ConversionError(
                f"{self.url}: output directory is not writable; choose another -o"
            )

    def _path(self, name: str) -> str:
        return os.path.join(self.url, name)

    def exists(self, name: str) -> bool:
        return os.path.exists(self._path(name))

    def size(self, name: str) -> int | None:
        path = self._path(name)
        return os.path.getsize(path) if os.path.isfile(path) else None

    def stamp(self, name: str) -> str | None:
        try:
            st = os.stat(self._path(name))
        except OSError:
            return None
        return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"

    def remove(self, name: str) -> None:
        _remove(self._path(name))

    def remove_temporaries(self, names: Sequence[str] | None = None) -> None:
        # Leftovers of a killed run are never reused: their content is unknown. Shard records
        # (`weightbridge.streaming.tasks`) sit in a subdirectory, with temporaries of their own.
        for folder in ("", RECORDS_DIR):
            try:
                entries = os.listdir(self._path(folder))
            except FileNotFoundError:
                continue
            for entry in entries:
                if not (entry.startswith(".") and ".tmp-" in entry):
                    continue
                base = entry[1:].split(".tmp-", 1)[0]
                if folder:
                    base = base.removesuffix(".json")
                if names is None or base in names:
                    _remove(os.path.join(self._path(folder), entry))

    def read_json(self, name: str) -> Any:
        try:
            with open(self._path(name), encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConversionError(
                f"{self._path(name)}: not valid JSON ({e}); it was edited or damaged. Delete it "
                "(the conversion then starts over) or pass --overwrite"
            ) from e

    def names(self, prefix: str) -> list[str]:
        folder, start = os.path.split(prefix)
        try:
            entries = os.listdir(self._path(folder))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(
            os.path.join(folder, e)
            for e in entries
            if e.startswith(start) and not (e.startswith(".") and ".tmp-" in e)
        )

    def write_json(self, name: str, obj: Any) -> None:
        # Its temporary name starts with a dot and holds ".tmp-", like the shards', so
        # remove_temporaries finds it after a kill.
        path = self._path(name)
        if os.path.dirname(name):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_json(path, obj)

    def open_shard(
        self, name: str, format: str, tensors: Sequence[TensorSpec], metadata: dict[str, str] | None
    ) -> _LocalSink:
        return _LocalSink(self, name, wio.writer_class(format), tensors, metadata)

    def open_reader(self, name: str | None = None) -> Reader:
        reader: Reader = wio.open_reader(self._path(name) if name else self.url)
        return reader

    def free_space(self) -> int | None:
        try:
            return shutil.disk_usage(self.url).free
        except OSError:
            return None

    def max_object_size(self, format: str) -> int | None:
        return None  # a file is written tile by tile, whatever its size

    def start(self, outputs: Sequence[str]) -> None:
        pass  # the index (written last) is what makes a directory complete

    def finalize(self, completed: Completed) -> None:
        pass  # the same: nothing beyond the shards and the index

    @contextlib.contextmanager
    def lock(self, part: str | None = None) -> Iterator[None]:
        """Hold a lock on the directory for one conversion: exclusive, or, for one `part` of a
        partitioned conversion, shared on the directory and exclusive on the part (so parts
        run together, but not with a whole run, nor twice).

        An `flock` belongs to the open file: the kernel drops it when the process exits, however
        it exits, so a crashed run never leaves the directory locked.
        """
        with contextlib.ExitStack() as stack:
            if part is None:
                stack.enter_context(self._flock(LOCK_NAME, fcntl.LOCK_EX))
            else:
                stack.enter_context(self._flock(LOCK_NAME, fcntl.LOCK_SH))
                stack.enter_context(self._flock(f".weightbridge-{part}.lock", fcntl.LOCK_EX))
            yield

    @contextlib.contextmanager
    def _flock(self, name: str, mode: int) -> Iterator[None]:
        fd = os.open(self._path(name), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = (
                    os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
                )
                raise ConversionError(
                    f"{self.url}: another conversion is writing here ({holder}); wait for it to "
                    "finish or stop it, or choose another output directory"
                ) from None
            if mode == fcntl.LOCK_EX:  # a shared holder leaves the text to the others
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the flock


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
