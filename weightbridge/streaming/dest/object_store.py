"""The object-store destination: a conversion's output in a kvstore (``s3://``, ``gs://``,
``memory://``, or a local directory that should hold zarr or orbax output).

Byte formats (safetensors, npz, h5, torch) are written to a local temporary file by their usual
writer and uploaded when complete (upload staging), on the converter's commit thread while the
next shard is filled. Into ``s3://`` and ``gs://`` the upload is a multipart upload through
obstore (`weightbridge.io._obstore.upload_file`), whose parts are slices of a memory map of the
staged file: no shard size limit, and no anonymous memory for it. An upload is all-or-nothing
(a multipart upload's object appears only when it completes), so the final key either holds the
whole shard or what it held before, and no temporary key or rename is needed (S3 has no
rename). Without obstore (or with a custom tensorstore ``kvstore`` spec) tensorstore uploads
the shard, which it can do only whole, from memory, so such shards are capped
(MAX_OBJECT_BYTES). The output formats ``zarr`` and
``orbax`` write one zarr3 array per tensor (`weightbridge.io.zarr.ArrayWriter`); their "shards"
are groups of arrays that exist only as the journal's units of work, and `finalize` writes the
top-level metadata (orbax's ``_METADATA`` and commit files, zarr's group nodes) that makes them
readable as a whole. A rerun removes what a killed run left (orphan cleanup: pending arrays,
staged uploads and downloads of dead processes, and open multipart uploads where they can be
listed: `weightbridge.io._obstore.abort_uploads`).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from weightbridge.errors import ConversionError, FormatError, WeightbridgeError
from weightbridge.io import _obstore
from weightbridge.io._kvstore import Store, as_dir
from weightbridge.io._zarr3 import ArrayWriter, array_path, check_paths, zarr3_group
from weightbridge.io.base import BaseReader, Reader, ShardWriter
from weightbridge.io.zarr import (
    ORBAX_CHECKPOINT_METADATA,
    ORBAX_COMMIT_SUCCESS,
    ORBAX_METADATA,
    SHARD_SUFFIX,
    STATE_PREFIX,
    ZARR3_METADATA,
    ArrayRef,
    TensorstoreReader,
)
from weightbridge.spec import CheckpointSpec, TensorSpec
from weightbridge.streaming.dest.base import ARRAY_FORMATS, Completed
from weightbridge.streaming.journal import JOURNAL_NAME

# The item name CheckpointManager gives a single unnamed item (``<step>/default/``).
ORBAX_DEFAULT_ITEM = "default"
_COMMIT_TEXT = b"Checkpoint written by weightbridge.\n"
# The handler orbax records for StandardCheckpointer saves; CheckpointManager reads it back to
# pick the handler when restoring without explicit args.
_ORBAX_STANDARD_HANDLER = (
    "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler"
)
# `prepare` asks the store one cheap question first and waits this long for the answer.
PROBE_TIMEOUT_SECONDS = 30.0
# Local temporary files of byte-format uploads; the pid lets a rerun remove a killed run's files.
_UPLOAD_PREFIX = "weightbridge-upload-"
# Local directories of downloaded shards (a resume re-checks committed shards through them),
# with the pid too: a run killed while checking would otherwise leave whole shards behind.
_DOWNLOAD_PREFIX = "weightbridge-download-"
# Largest byte-format shard (safetensors, npz, h5, torch) a conversion writes to an object store
# when tensorstore uploads it (without obstore; `TensorstoreDestination.max_object_size`).
# tensorstore can write a value only whole: its S3
# and GCS drivers send one request, no multipart upload, from a buffer holding the whole object
# (`Store.write_file` keeps that to one copy, not the 3 that `KvStore.write(bytes)` makes). And
# a shard uploads on the converter's commit thread while the next shard is being filled, whose
# tiles (16 MB each, up to ~10 in flight) already use most of the converter's 256 MB slack.
# 64 MiB per object keeps upload + tiles under it; S3 needs no bigger objects to run at
# speed (and the commit overlaps the next fill anyway). A tensor larger than this still gets a
# shard of its own, costing its size once: within the bound of largest tensor + 256 MB.
MAX_OBJECT_BYTES = 64 << 20
# S3 refuses a single PUT larger than this (tensorstore's S3 driver has no multipart upload;
# obstore's multipart uploads have no such limit).
S3_MAX_PUT_BYTES = 5 << 30


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
        check_paths(self.paths, where)
        store = dest.store
        # A rewrite must never look committed: drop the old record before touching its arrays,
        # and say which arrays are in flight so a rerun after a crash can remove them.
        store.delete(dest.record_key(name))
        store.write_json(dest.pending_key(name), {"arrays": sorted(self.paths.values())})
        self.arrays = ArrayWriter(store, self.tensors, self.paths, where)
        self.writer: ShardWriter = self.arrays

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
            for path in self.arrays.created:
                self.dest.store.delete_prefix(as_dir(path))
            self.dest.store.delete(self.dest.pending_key(self.name))
        except WeightbridgeError:
            pass


class _ByteSink:
    """A byte-format shard: written to a local temporary file, uploaded by `commit` (multipart
    through obstore, or one tensorstore PUT)."""

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
        nbytes = sum(t.nbytes for t in tensors)
        self._check_size(nbytes)  # before any work on this shard
        _check_staging_space(dest.tmpdir, nbytes, f"{dest.url}/{name}")
        fd, self.tmp = tempfile.mkstemp(
            prefix=f"{_UPLOAD_PREFIX}{os.getpid()}-", suffix=f"-{name}", dir=dest.tmpdir
        )
        os.close(fd)
        self.writer = wio.writer_class(format)(self.tmp, list(tensors), metadata)

    def _check_size(self, nbytes: int) -> None:
        if (
            not self.dest.multipart
            and self.dest.store.spec["driver"] == "s3"
            and nbytes > S3_MAX_PUT_BYTES
        ):
            raise ConversionError(
                f"{self.dest.url}/{self.name}: {nbytes / 2**30:.2f} GiB, more than the "
                f"{S3_MAX_PUT_BYTES / 2**30:.0f} GiB S3 takes in one PUT (tensorstore has no "
                "multipart upload); a single tensor this large needs --format zarr or orbax, "
                "which upload chunk by chunk"
            )

    def commit(self) -> int:
        self.writer.close()
        if self.dest.multipart:
            try:
                return _obstore.upload_file(
                    self.dest.objects,
                    self.dest.object_key(self.name),
                    self.tmp,
                    url=self.dest.bucket_url,
                    endpoint=self.dest.options.get("endpoint"),
                )
            finally:
                _remove(self.tmp)
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
    * A byte-format shard (safetensors, ...) is one key, written once with its full content.
      Into ``s3://`` and ``gs://`` with obstore installed (`multipart`), by a multipart upload
      of any size; a resume learns its size with one HEAD request. Otherwise tensorstore
      uploads it from memory, so conversions keep such shards to `max_object_size` (64 MiB,
      except ``memory://``), and its size and storage generation are kept under
      ``.weightbridge/sizes/`` so a resume learns the size without downloading the shard.
    * A ``zarr``/``orbax`` shard is a group of arrays: zarr3 arrays at ``<prefix>/<name>``
      (zarr) or at the orbax parameter names ``<prefix>/params.Dense_0.kernel`` (orbax), chunked
      along axis 0 and uncompressed, so their bytes are a function of the plan alone. Its name
      (``model-00001-of-00003.shard``) exists only for the journal: `open_shard` first deletes
      the shard's record and lists its arrays under ``.weightbridge/pending/``; `commit` writes
      the record (the arrays, their specs) under ``.weightbridge/shards/`` and drops the pending
      entry. A shard without a record is not committed, whatever arrays exist;
      `remove_temporaries` deletes the arrays of pending shards. One shard of a terabyte model
      is one unit of work that any process can produce.
    * The checkpoint is made readable as a whole only by `finalize`, which the converter calls
      once, after every shard and before it records the conversion complete: the orbax files
      ``_METADATA``, ``_CHECKPOINT_METADATA`` and ``commit_success.txt``, or zarr's group
      ``zarr.json`` files (the root one last), are written then, and deleted by `start` when a
      conversion (re)starts, so an interrupted conversion never restores as if complete.

    There is no lock: object stores have no advisory locks, and a lock key left by a killed
    process would block its own rerun. Two conversions into one prefix at once are not detected.
    """

    def __init__(self, url: str | os.PathLike[str], **options: Any) -> None:
        self.url = os.fspath(url)
        self.options = dict(options)
        self.store = Store(self.url, self.options, ConversionError)
        self.tmpdir = str(options.get("tmpdir") or tempfile.gettempdir())
        step = options.get("step")
        if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
            raise ConversionError(f"{self.url}: step must be a non-negative integer, got {step!r}")
        self.step: int | None = step
        # Byte-format shards go through obstore (multipart uploads, streamed downloads) where
        # it is installed and the store is S3 or GCS named by its URL; credentials other than
        # the environment's are a tensorstore spec obstore cannot take.
        driver = self.store.spec["driver"]
        credentials = options.get("aws_credentials")
        self.multipart = (
            driver in ("s3", "gcs")
            and options.get("kvstore") is None
            and (credentials is None or credentials == {"type": "environment"})
            and _obstore.obstore_available()
        )
        # The bucket as an obstore URL; object keys are the kvstore's prefix + a name.
        self.bucket_url = (
            f"{'s3' if driver == 's3' else 'gs'}://{self.store.spec.get('bucket', '')}"
        )
        self._objects: Any = None
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

    def object_key(self, name: str) -> str:
        """`name`'s key in the bucket (for obstore, which is opened at the bucket)."""
        return str(self.store.spec["path"]) + name

    @property
    def objects(self) -> Any:
        """The obstore store of the bucket (made on first use: byte formats only)."""
        if self._objects is None:
            self._objects = _obstore.open_store(
                self.bucket_url,
                endpoint=self.options.get("endpoint"),
                aws_region=self.options.get("aws_region"),
            )
        return self._objects

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

        # One cheap question with a short deadline, so a missing bucket, a wrong endpoint or
        # missing credentials fail here, before any work. A listing, because S3 answers a read
        # in a missing bucket as a missing key.
        self.store.list(JOURNAL_NAME, timeout=min(PROBE_TIMEOUT_SECONDS, self.store.timeout))

    def exists(self, name: str) -> bool:
        return self.store.exists(self._key(name))

    def stamp(self, name: str) -> str | None:
        # The ETag of an uploaded object (obstore); array shards and single PUTs through
        # tensorstore have none here, so they are read again on resume.
        if self.is_array_shard(name) or not self.multipart:
            return None
        return _obstore.object_etag(
            self.objects,
            self.object_key(name),
            url=self.bucket_url,
            endpoint=self.options.get("endpoint"),
        )

    def size(self, name: str) -> int | None:
        if self.is_array_shard(name):
            record = self.store.read_json(self._key(name))
            return int(record["nbytes"]) if isinstance(record, dict) else None
        if self.multipart:
            return _obstore.object_size(
                self.objects,
                self.object_key(name),
                url=self.bucket_url,
                endpoint=self.options.get("endpoint"),
            )
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
                    self.store.delete_prefix(as_dir(str(t["path"])))
            return
        self.store.delete(name)
        self.store.delete(self.size_key(name))

    def remove_temporaries(self, names: Sequence[str] | None = None) -> None:
        prefix = f"{STATE_PREFIX}pending/"
        for key in self.store.list(prefix):
            name = key[len(prefix) :]
            if names is not None and name not in names:
                continue  # another part of a partitioned conversion may be writing it
            pending = self.store.read_json(key)
            if not self.store.exists(self.record_key(name)) and isinstance(pending, dict):
                for path in pending.get("arrays", []):
                    self.store.delete_prefix(as_dir(str(path)))
            self.store.delete(key)
        if self.multipart:
            # Multipart uploads of killed processes: invisible, but billed until aborted.
            _obstore.abort_uploads(
                self.bucket_url,
                str(self.store.spec["path"]),
                None if names is None else [self.object_key(n) for n in names],
                endpoint=self.options.get("endpoint"),
                aws_region=self.options.get("aws_region"),
            )
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
        self.store.write_json(self._key(name), obj)

    def names(self, prefix: str) -> list[str]:
        return self.store.list(prefix)  # what we write under a name holds no temporaries

    def open_shard(
        self, name: str, format: str, tensors: Sequence[TensorSpec], metadata: dict[str, str] | None
    ) -> _ArraySink | _ByteSink:
        if format in ARRAY_FORMATS:
            return _ArraySink(self, name, format, tensors, metadata)
        return _ByteSink(self, name, format, tensors, metadata)

    def max_object_size(self, format: str) -> int | None:
        """The largest shard `format` may have here for the upload to stay in bounded memory.

        None for the array formats (zarr, orbax: written chunk by chunk, whatever the shard
        size), for ``memory://`` (which keeps every value in this process anyway) and where
        byte formats go by multipart upload (`multipart`: streamed from the staged file); for
        a byte format (safetensors, npz, h5, torch) anywhere else, MAX_OBJECT_BYTES: such a
        shard is uploaded as one value that passes through memory whole (see MAX_OBJECT_BYTES).
        `weightbridge.streaming.convert` lowers ``max_shard_size`` to this; a larger tensor
        gets its own shard.
        """
        if format in ARRAY_FORMATS or self.store.spec["driver"] == "memory" or self.multipart:
            return None
        return MAX_OBJECT_BYTES

    def open_reader(self, name: str | None = None) -> Reader:
        if name is not None and self.is_array_shard(name):
            return self._shard_reader([name])
        if name is not None:
            return self._downloaded([name], name)

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
    def lock(self, part: str | None = None) -> Iterator[None]:
        """No lock (see the class docstring)."""
        yield

    # -- finishing -----------------------------------------------------------------------------

    def start(self, outputs: Sequence[str]) -> None:
        """A conversion (re)starts: delete the files that say the zarr/orbax output is complete."""
        if any(self.is_array_shard(n) for n in outputs):
            self._unfinalize()

    def finalize(self, completed: Completed) -> None:
        """Write the files that make zarr/orbax output readable as a whole (after every shard).

        Nothing to do for byte formats, whose index is the converter's job.
        """
        names = [
            n for n in completed.outputs if self.is_array_shard(n) and not n.endswith(".index.json")
        ]
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
        check_paths({t["name"]: t["path"] for t in tensors}, self.url)
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
            self.store.write_json(f"{g}/{ZARR3_METADATA}", zarr3_group({}))
        # The root group last: a zarr reader that finds it finds every array.
        attrs = {"weightbridge": metadata} if metadata else {}
        self.store.write_json(ZARR3_METADATA, zarr3_group(attrs))

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

    def _reader_store(self) -> Store:
        return Store(self.url, self.options, FormatError)

    def _shard_reader(self, names: Sequence[str]) -> TensorstoreReader:
        refs = []
        for n in names:
            record = self.store.read_json(self.record_key(n))
            if not isinstance(record, dict):
                raise FormatError(f"{self.url}: shard {n} has no record (not committed)")
            refs += [
                ArrayRef(str(t["name"]), "", str(t["path"]), "zarr3") for t in record["tensors"]
            ]
        return TensorstoreReader(self.url, _store=self._reader_store(), _refs=refs)

    def _downloaded(self, names: Sequence[str], open_name: str) -> _DownloadedReader:
        from weightbridge import io as wio

        tmp = tempfile.mkdtemp(prefix=f"{_DOWNLOAD_PREFIX}{os.getpid()}-", dir=self.tmpdir)
        try:
            for n in names:
                if self.multipart:  # streamed: a shard of any size in bounded memory
                    _obstore.download_file(
                        self.objects,
                        self.object_key(n),
                        os.path.join(tmp, n),
                        url=self.bucket_url,
                        endpoint=self.options.get("endpoint"),
                    )
                    continue
                data = self.store.read(n)
                if data is None:
                    raise FormatError(f"{self.url}: {n} does not exist")
                with open(os.path.join(tmp, n), "wb") as f:
                    f.write(data)
            return _DownloadedReader(wio.open_reader(os.path.join(tmp, open_name)), tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


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

    def __init__(self, inner: Reader, tmpdir: str) -> None:
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


def _check_staging_space(tmpdir: str, nbytes: int, where: str) -> None:
    """Refuse to stage a shard where it cannot fit, before writing any of it."""
    try:
        free = shutil.disk_usage(tmpdir).free
    except OSError:  # cannot tell: the write itself reports a full disk
        return
    if nbytes > free:
        raise ConversionError(
            f"{where}: this shard ({nbytes / 1e9:.2f} GB) is staged in {tmpdir} before its "
            f"upload, which has {free / 1e9:.2f} GB free; point TMPDIR (or dest_options="
            "{'tmpdir': ...}) at a larger disk, or pass a smaller --max-shard-size"
        )


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
