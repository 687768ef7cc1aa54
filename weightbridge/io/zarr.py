"""The ``tensorstore`` format: zarr and zarr3 arrays, OCDBT databases and orbax checkpoints,
local or in object stores.

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

Writing. `weightbridge.io._zarr3.ArrayWriter` writes each tensor of a shard as one zarr3 array,
chunked along axis 0 so streamed tiles become whole chunks. The ``zarr`` and ``orbax`` output
formats are directories of arrays, not files, so they are written only through the object-store
destination (`weightbridge.streaming.dest.object_store.TensorstoreDestination`), which also
writes their top-level metadata once a conversion is complete; this module's registry `Writer`
only refuses a file path. The format's registry name stays ``tensorstore``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from weightbridge import dtypes
from weightbridge._files import is_url
from weightbridge.errors import (
    DtypeError,
    FormatError,
    SpecError,
    WeightbridgeError,
)
from weightbridge.io._kvstore import Store, as_dir, ts_context, ts_module
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
ZARR3_METADATA = "zarr.json"
ZARR2_ARRAY = ".zarray"
ZARR2_GROUP = ".zgroup"
_MARKERS = (ORBAX_METADATA, OCDBT_MANIFEST, ZARR3_METADATA, ZARR2_ARRAY, ZARR2_GROUP)
# orbax value types that are arrays in the checkpoint; others (strings, None) are skipped.
_ORBAX_ARRAY_TYPES = ("jax.Array", "np.ndarray", "scalar")

# Suffix of the shard names of the array formats (zarr, orbax): shards are named
# ``model-00001-of-00003.shard`` (`weightbridge.planning.shards.assign_shards`). These names are
# keys of the journal only: their records live under STATE_PREFIX, so the checkpoint's own
# directory holds nothing but arrays.
SHARD_SUFFIX = ".shard"
# Hidden keys of a destination: shard records, pending shards, upload sizes.
STATE_PREFIX = ".weightbridge/"


# Reading


@dataclass(frozen=True, slots=True)
class ArrayRef:
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


def _array_kvstore(store: Store, ref: ArrayRef) -> dict[str, Any]:
    if ref.ocdbt:
        return {"driver": "ocdbt", "base": store.spec_at(ref.base), "path": as_dir(ref.path)}
    return store.spec_at(ref.base + as_dir(ref.path))


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
        _store: Store | None = None,
        _refs: Sequence[ArrayRef] | None = None,
        **options: Any,
    ) -> None:
        self.path = os.fspath(location)
        self._store = _store or Store(self.path, options, FormatError)
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

    def _describe(self, ref: ArrayRef) -> str:
        """The array's location for messages: its metadata file, or its key in OCDBT."""
        root = self.path.rstrip("/")
        key = f"{ref.base}{as_dir(ref.path)}"
        meta = {"zarr": ZARR2_ARRAY, "zarr3": ZARR3_METADATA}.get(ref.driver, "")
        if ref.ocdbt:
            return f"{root}/{ref.base}{OCDBT_MANIFEST} (array {as_dir(ref.path)}{meta})"
        return f"{root}/{key}{meta}"

    def _check_refs(self, refs: Sequence[ArrayRef]) -> None:
        """Every array stays inside the checkpoint; no two tensors share a name or an array."""
        names: dict[str, ArrayRef] = {}
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

    def _tensor_spec(self, ref: ArrayRef, arr: Any) -> TensorSpec:
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

    def _chunk_overhead(self, ref: ArrayRef, arr: Any, spec: TensorSpec, where: str) -> int:
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

    def _discover(self, step: int | None) -> tuple[str, list[ArrayRef]]:
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

    def _orbax_items(self, base: str, items: list[str]) -> tuple[str, list[ArrayRef]]:
        refs: list[ArrayRef] = []
        layout = "orbax"
        for item in items:
            layout, found = self._orbax_item(f"{base}{item}/")
            prefix = f"{item}/" if len(items) > 1 else ""
            refs += [
                ArrayRef(prefix + r.name, r.base, r.path, r.driver, r.ocdbt, r.strict)
                for r in found
            ]
        return layout, refs

    def _orbax_item(self, base: str) -> tuple[str, list[ArrayRef]]:
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
                refs.append(ArrayRef(name, base, path, driver, bool(ocdbt), strict))
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

    def _zarr_in_ocdbt(self, base: str) -> list[ArrayRef]:
        spec = {"driver": "ocdbt", "base": self._store.spec_at(base)}
        where = f"{self.path.rstrip('/')}/{base}{OCDBT_MANIFEST}"
        try:
            kv = self._store.wait(
                ts_module().KvStore.open(spec, context=ts_context()),
                f"opening the OCDBT database {base}",
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
    ) -> list[ArrayRef]:
        """Arrays among `keys`: every ``.zarray``, and every ``zarr.json`` of node type array.

        `keys` are keys of `kv` (default: the store, where they start with `base`).
        """
        refs: list[ArrayRef] = []
        for key in keys:
            if key.startswith(STATE_PREFIX):
                continue
            head, _, leaf = key.rpartition("/")
            if leaf == ZARR2_ARRAY:
                refs.append(ArrayRef(head, base, head, "zarr", ocdbt))
            elif leaf == ZARR3_METADATA:
                refs.append(ArrayRef(head, base, head, "zarr3", ocdbt))
        if any(r.driver == "zarr3" for r in refs):
            refs = self._only_zarr3_arrays(refs, kv)
        for i, r in enumerate(refs):
            if not r.name:  # the location itself is one array: name it after the directory
                refs[i] = ArrayRef(self._root_name(), r.base, r.path, r.driver, r.ocdbt)
        return refs

    def _root_name(self) -> str:
        """The name of the array that is the location itself."""
        return os.path.basename(self.path.rstrip("/")) or "array"

    def _only_zarr3_arrays(self, refs: list[ArrayRef], kv: Any) -> list[ArrayRef]:
        # zarr.json is both group and array metadata; read them all at once to tell which.
        prefix = "" if kv is not None else None
        kv = kv if kv is not None else self._store.kv
        zarr3 = [r for r in refs if r.driver == "zarr3"]
        if prefix is None and self._store.local_dir is not None:  # a stat each: cheap
            for r in zarr3:
                key = r.base + as_dir(r.path) + ZARR3_METADATA
                if self._store.longer_than(key, NODE_METADATA_LIMIT):
                    raise FormatError(
                        f"{self._describe(r)}: larger than {NODE_METADATA_LIMIT} bytes; expected "
                        "zarr metadata of a few KB, refusing to read it (corrupt or hostile)"
                    )
        futures = {
            r.name: kv.read(
                (r.base if prefix is None else prefix) + as_dir(r.path) + ZARR3_METADATA
            )
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

    def _open(self, ref: ArrayRef, driver: str) -> Any:
        spec: dict[str, Any] = {"driver": driver, "kvstore": _array_kvstore(self._store, ref)}
        if ref.strict:
            spec["fill_missing_data_reads"] = False
        return ts_module().open(spec, context=ts_context(), open=True, read=True)

    def _wait(self, future: Any, ref: ArrayRef, what: str) -> Any:
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

    def _open_all(self, refs: Sequence[ArrayRef]) -> dict[str, Any]:
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

    def _metadata_kv(self, ref: ArrayRef) -> tuple[Any, str]:
        """The kvstore holding the array's keys and the array's key prefix in it."""
        if not ref.ocdbt:
            return self._store.kv, ref.base + as_dir(ref.path)
        kv = self._ocdbt.get(ref.base)
        if kv is None:
            spec = {"driver": "ocdbt", "base": self._store.spec_at(ref.base)}
            kv = self._ocdbt[ref.base] = self._wait(
                ts_module().KvStore.open(spec, context=ts_context()),
                ref,
                "opening its OCDBT database",
            )
        return kv, as_dir(ref.path)

    def _check_metadata(self, batch: Sequence[ArrayRef]) -> list[ArrayRef]:
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
            ref = ArrayRef(ref.name, ref.base, ref.path, driver, ref.ocdbt, ref.strict)
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
            target = ts_module().array(out, copy=False, write=True)
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
            "weightbridge.streaming.dest.TensorstoreDestination('/path/to/dir')"
        )

    def write(self, name: str, tile: np.ndarray, row: int) -> None:  # pragma: no cover
        raise NotImplementedError

    def copy_from(self, name: str, src: ByteRange) -> bool:  # pragma: no cover
        return False

    def close(self) -> None:  # pragma: no cover
        raise NotImplementedError

    def abort(self) -> None:  # pragma: no cover
        pass
