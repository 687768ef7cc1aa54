"""Hostile and broken inputs for the tensorstore reader: orbax, zarr, zarr3 and OCDBT.

Like `test_hostile_inputs` (whose capped child this file reuses): every case builds checkpoints
that `weightbridge.io.zarr` (the tensorstore format) must refuse, and each is opened, and every
tensor read, in a child process under ``RLIMIT_DATA`` (512 MB) with a timer on every call, both
with the reader and through format detection. A case passes when each opening ends in a
`FormatError` whose message names the offending file (or directory) and the tensor, and says
what was expected and found. A reader that allocates what a file claims fails in the child
(tensorstore aborts the process on a failed allocation), which shows up as a crash of that job.

Missing chunks: in a plain zarr array a missing chunk *is* its fill value (the zarr spec;
tensorstore and zarr-python skip chunks equal to it), so it reads as the fill value, which
`test_missing_chunks_of_a_zarr_array_read_as_its_fill_value` pins down. An orbax checkpoint whose
``_METADATA`` records ``store_array_data_equal_to_fill_value`` stored every chunk, so there a
missing chunk was lost and is refused (a hostile case below).

The second half fuzzes the metadata the reader parses (orbax ``_METADATA``, ``.zarray``,
``zarr.json``, the OCDBT manifest) with hypothesis, with a fixed budget and seed, in capped
children (this file run as a script): a generated or mutated file reads cleanly or fails with a
`WeightbridgeError`, never another exception, a crash or a hang.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
# The fuzzing children (one per CPU), and the per-example check they share: open both ways
# under a timeout, read every tensor, end in success or a WeightbridgeError.
from test_fuzz_readers import _alarm, check_file, start_fuzzing
from test_hostile_inputs import MEMORY_CAP, run_jobs  # the capped child and its driver
from test_io_tensorstore import BUCKET, s3  # noqa: F401  (s3: the moto S3 fixture)
from test_io_tfcheckpoint import write_bundle  # a hand-built TF tensor bundle

import weightbridge.io.zarr as wts
from weightbridge.errors import FormatError
from weightbridge.io import msgpack as wmsgpack
from weightbridge.io import open_reader

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs RLIMIT_DATA")
ts = pytest.importorskip("tensorstore")

MODULE = "weightbridge.io.zarr"
OP_TIMEOUT = 20.0
# The slowest honest job here takes about a second on an idle machine; this bound only catches
# a hang or a blow-up (reading 100 000 absent arrays one by one), sized for a loaded 2-core
# machine where the 100 000-entry case was seen at 5.4 s.
SLOW = 30.0

# --------------------------------------------------------------------------------------------
# Building checkpoints.

W = np.arange(12, dtype=np.float32).reshape(3, 4)
ZARRAY = {
    "zarr_format": 2,
    "shape": [3, 4],
    "chunks": [2, 4],
    "dtype": "<f4",
    "compressor": None,
    "fill_value": 0,
    "order": "C",
    "filters": None,
}
ZARR3 = {
    "zarr_format": 3,
    "node_type": "array",
    "shape": [3, 4],
    "data_type": "float32",
    "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [2, 4]}},
    "chunk_key_encoding": {"name": "default"},
    "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
    "fill_value": 0,
}


def ts_array(kvstore: Any, a: np.ndarray, driver: str, **meta: Any) -> None:
    """`a` written by tensorstore as a zarr (v2) or zarr3 array, two rows per chunk."""
    chunks = [min(2, d) or 1 for d in a.shape[:1]] + [max(1, d) for d in a.shape[1:]]
    spec: dict[str, Any] = {"driver": driver, "kvstore": kvstore}
    if meta:
        spec["metadata"] = meta
    t = ts.open(
        spec,
        create=True,
        dtype=ts.dtype(a.dtype),
        shape=list(a.shape),
        chunk_layout=None
        if not a.ndim or "chunk_grid" in meta
        else ts.ChunkLayout(chunk_shape=chunks),
    ).result(timeout=OP_TIMEOUT)
    t.write(a).result(timeout=OP_TIMEOUT)


def zarr_dir(d: Path, driver: str = "zarr", **meta: Any) -> Path:
    """A directory with one array ``w`` (W) written by tensorstore."""
    d.mkdir(parents=True)
    ts_array(f"file://{d}/w/", W, driver, **meta)
    return d


def tree_entry(*keys: Any, value_type: Any = "jax.Array", **value: Any) -> dict[str, Any]:
    return {
        "key_metadata": [{"key": k, "key_type": 2} for k in keys],
        "value_metadata": {"value_type": value_type, "skip_deserialize": False, **value},
    }


def orbax_dir(
    d: Path,
    meta: Any = None,
    *,
    raw: bytes | str | None = None,
    arrays: dict[str, np.ndarray] | None = None,
    driver: str = "zarr",
) -> Path:
    """An orbax checkpoint as orbax writes it without OCDBT: ``_METADATA`` and one array per
    parameter (``params.w``); `meta` or `raw` replace the metadata."""
    d.mkdir(parents=True)
    arrays = {"params/w": W} if arrays is None else arrays
    for name, a in arrays.items():
        ts_array(f"file://{d}/{name.replace('/', '.')}/", a, driver)
    if meta is None:
        tree = {str(tuple(n.split("/"))): tree_entry(*n.split("/")) for n in arrays}
        meta = {"tree_metadata": tree, "use_ocdbt": False, "use_zarr3": driver == "zarr3"}
    text = json.dumps(meta) if raw is None else raw
    (d / "_METADATA").write_bytes(text.encode() if isinstance(text, str) else text)
    (d / "_CHECKPOINT_METADATA").write_text('{"item_handlers": null}')
    return d


def ocdbt_dir(d: Path) -> Path:
    """zarr3 arrays ``w`` and ``b/c`` inside an OCDBT database (the layout orbax writes)."""
    d.mkdir(parents=True)
    base = {"driver": "file", "path": f"{d}/"}
    arrays: dict[str, np.ndarray] = {"w": W, "b/c": np.arange(5, dtype=np.int64)}
    for name, a in arrays.items():
        ts_array({"driver": "ocdbt", "base": base, "path": f"{name}/"}, a, "zarr3")
    return d


def chunk_files(array_dir: Path) -> list[Path]:
    """The chunk files of a zarr or zarr3 array (not its metadata)."""
    names = {".zarray", ".zattrs", "zarr.json"}
    return sorted(p for p in array_dir.rglob("*") if p.is_file() and p.name not in names)


def sparse(path: Path, size: int) -> Path:
    """A file of `size` zero bytes that takes no disk space."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def msgpack_file(path: Path, shape: tuple[int, ...]) -> Path:
    """A flax msgpack file holding one float32 tensor ``w`` of `shape` (rank unchecked)."""
    n = 4 * int(np.prod(shape))
    data = wmsgpack.array_head(shape, "F32", n) + b"\0" * n
    path.write_bytes(wmsgpack.pack_map_header(1) + wmsgpack.pack_str("w") + data)
    return path


# --------------------------------------------------------------------------------------------
# The cases.


@dataclass
class Hostile:
    """One checkpoint to refuse: its message must name each of `names` and match `match`."""

    root: Path
    names: tuple[str, ...]
    match: str
    module: str = MODULE


@dataclass
class Case:
    id: str
    build: Callable[[Path], list[Hostile]]


CASES: list[Case] = []


def case(fn: Callable[[Path], list[Hostile]]) -> Callable[[Path], list[Hostile]]:
    CASES.append(Case(fn.__name__.strip("_"), fn))
    return fn


def each(d: Path, variants: list[Any], build: Callable[[Path, Any], Hostile]) -> list[Hostile]:
    return [build(d / f"v{i}", v) for i, v in enumerate(variants)]


NOT_JSON: list[bytes | str] = [
    "",
    "{",
    b"\xff\xfe{}",
    b'{"tree_metadata": {"\xff": 1}}',
    '{"tree_metadata": {}, "tree_metadata": {}}',  # a duplicate key
    '{"tree_metadata": ' + "9" * 5000 + "}",  # an integer too long to convert
]
BAD_JSON = "not valid JSON|expected"

# -- orbax _METADATA ---------------------------------------------------------------------------


@case
def _orbax_metadata_not_json_or_not_utf8(d: Path) -> list[Hostile]:
    def build(root: Path, raw: Any) -> Hostile:
        orbax_dir(root, raw=raw)
        return Hostile(root, (f"{root}/_METADATA",), BAD_JSON)

    return each(d, NOT_JSON, build)


@case
def _orbax_metadata_nesting_bombs(d: Path) -> list[Hostile]:
    deep_value = '{"a": ' * 20_000 + "1" + "}" * 20_000
    bodies = [
        '{"tree_metadata": ' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"tree_metadata": {"k": {"key_metadata": [{"key": "w"}], "value_metadata": '
        + deep_value
        + "}}}",
    ]

    def build(root: Path, raw: str) -> Hostile:
        orbax_dir(root, raw=raw)
        return Hostile(root, (f"{root}/_METADATA",), "nested too deeply")

    return each(d, bodies, build)


@case
def _orbax_metadata_too_large(d: Path) -> list[Hostile]:
    root = orbax_dir(d / "big")
    sparse(root / "_METADATA", wts.METADATA_LIMIT + 1)
    return [Hostile(root, (f"{root}/_METADATA",), "larger than")]


def _entry(**value_metadata: Any) -> dict[str, Any]:
    return {"key_metadata": [{"key": "params"}, {"key": "w"}], "value_metadata": value_metadata}


WRONG_TYPES: list[Any] = [
    [],
    "x",
    {"tree_metadata": []},
    {"tree_metadata": "x"},
    {"tree_metadata": None},
    {"tree_metadata": {"k": 5}},
    {"tree_metadata": {"k": {"key_metadata": "params"}}},
    {"tree_metadata": {"k": {"key_metadata": []}}},
    {"tree_metadata": {"k": {"key_metadata": [{"key": None}]}}},
    {"tree_metadata": {"k": {"key_metadata": [{"key": ["params"]}]}}},
    {"tree_metadata": {"k": {"key_metadata": [{"key": True}]}}},
    {"tree_metadata": {"k": {"key_metadata": [1.5]}}},
    {"tree_metadata": {"k": {"key_metadata": [{"key": "w"}], "value_metadata": "jax.Array"}}},
    {"tree_metadata": {"k": _entry(value_type=5)}},
    {"tree_metadata": {"k": _entry(value_type="jax.Array", skip_deserialize="no")}},
    {"tree_metadata": {"k": _entry(value_type="jax.Array")}, "use_ocdbt": "yes"},
    {"tree_metadata": {"k": _entry(value_type="jax.Array")}, "use_zarr3": 1},
    {
        "tree_metadata": {"k": _entry(value_type="jax.Array")},
        "store_array_data_equal_to_fill_value": "true",
    },
]


@case
def _orbax_metadata_of_the_wrong_types(d: Path) -> list[Hostile]:
    def build(root: Path, meta: Any) -> Hostile:
        orbax_dir(root, meta)
        return Hostile(root, (f"{root}/_METADATA",), "expected|must be")

    return each(d, WRONG_TYPES, build)


ESCAPING_KEYS = ["..", ".", "", "/etc/passwd", "../outside", "a/../../outside", "..\\outside"]
ESCAPING_KEYS += ["a\0b"]


@case
def _orbax_tree_keys_that_escape_the_checkpoint(d: Path) -> list[Hostile]:
    # An array beside each checkpoint, where a key that is followed would lead.
    def build(sub: Path, key: str) -> Hostile:
        sub.mkdir(parents=True)
        ts_array(f"file://{sub}/outside/", W, "zarr")
        root = sub / "ckpt"
        meta = {"tree_metadata": {"k": tree_entry(key)}, "use_zarr3": False}
        orbax_dir(root, meta)
        return Hostile(root, (f"{root}/_METADATA", repr(key)), "refusing")

    return each(d, ESCAPING_KEYS, build)


@case
def _orbax_tree_names_two_tensors_alike(d: Path) -> list[Hostile]:
    same_name = {"a": tree_entry("params", "w"), "b": tree_entry("params", "w")}
    same_array = {"a": tree_entry("params", "w"), "b": tree_entry("params.w")}
    roots = []
    for i, (tree, match) in enumerate(
        [(same_name, "both tensor 'params/w'"), (same_array, "both stored as array params.w")]
    ):
        root = orbax_dir(d / f"v{i}", {"tree_metadata": tree, "use_zarr3": False})
        roots.append(Hostile(root, (str(root), "params"), match))
    return roots


@case
def _orbax_tree_with_a_huge_number_of_entries(d: Path) -> list[Hostile]:
    # 100 000 arrays that are not there: the first few fail, the rest are never opened.
    tree = {f"t{i}": tree_entry(f"t{i}") for i in range(100_000)}
    root = orbax_dir(d / "absent", {"tree_metadata": tree, "use_zarr3": False}, arrays={})
    return [Hostile(root, (f"{root}/t0/.zarray", "'t0'"), "found none")]


@case
def _orbax_missing_chunk_when_every_chunk_was_stored(d: Path) -> list[Hostile]:
    out = []
    for driver in ("zarr", "zarr3"):
        root = orbax_dir(d / driver, driver=driver)
        meta = json.loads((root / "_METADATA").read_text())
        meta["store_array_data_equal_to_fill_value"] = True
        (root / "_METADATA").write_text(json.dumps(meta))
        chunk_files(root / "params.w")[-1].unlink()
        meta_file = ".zarray" if driver == "zarr" else "zarr.json"
        out.append(Hostile(root, (f"{root}/params.w/{meta_file}", "'params/w'"), "is missing"))
    return out


@case
def _orbax_array_that_is_neither_zarr_nor_zarr3(d: Path) -> list[Hostile]:
    root = orbax_dir(d / "c", {"tree_metadata": {"k": tree_entry("params", "w")}}, arrays={})
    (root / "params.w").mkdir()
    (root / "params.w" / "0.0").write_bytes(b"\0" * 48)
    return [Hostile(root, (f"{root}/params.w/", "'params/w'"), "found none")]


@case
def _orbax_with_a_broken_ocdbt_manifest(d: Path) -> list[Hostile]:
    root = orbax_dir(d / "c", arrays={})
    meta = {"tree_metadata": {"k": tree_entry("params", "w")}, "use_ocdbt": True}
    (root / "_METADATA").write_text(json.dumps(meta))
    (root / "manifest.ocdbt").write_bytes(b"\x00garbage" * 8)
    return [Hostile(root, (f"{root}/manifest.ocdbt", "'params/w'"), "found none|failed")]


# -- zarr v2 .zarray ---------------------------------------------------------------------------


def _zarray(d: Path, meta: Any) -> Path:
    (d / "w").mkdir(parents=True)
    text = meta if isinstance(meta, (str, bytes)) else json.dumps(meta)
    (d / "w" / ".zarray").write_bytes(text.encode() if isinstance(text, str) else text)
    return d


def _zarray_hostile(match: str) -> Callable[[Path, Any], Hostile]:
    def build(root: Path, meta: Any) -> Hostile:
        _zarray(root, meta)
        return Hostile(root, (f"{root}/w/.zarray", "'w'"), match)

    return build


@case
def _zarray_not_json(d: Path) -> list[Hostile]:
    bodies = [*NOT_JSON[:3], "[" * 100_000 + "]" * 100_000, '{"shape": [' + "9" * 5000 + "]}"]
    return each(d, bodies, _zarray_hostile(BAD_JSON + "|nested too deeply"))


# Metadata that claims more than any machine has, or than a numpy array can be: refused from
# the metadata, before any allocation (or, for claims a machine could hold, before reading).
HUGE = "expected at most|finite shape|needs \\d+ bytes of memory"


@case
def _zarray_claims_huge_sizes(d: Path) -> list[Hostile]:
    variants = [
        {**ZARRAY, "shape": [2**62], "chunks": [1]},  # 2**62 elements: unbounded to tensorstore
        {**ZARRAY, "shape": [2**40, 2**40], "chunks": [1, 1]},  # bytes overflow int64
        {**ZARRAY, "shape": [2**31] * 4, "chunks": [1] * 4},
        {**ZARRAY, "shape": [2**36], "chunks": [2**20]},  # 256 GB, no chunk stored
        {**ZARRAY, "shape": [2**20, 2**20], "chunks": [1, 2**20], "dtype": "|u1"},  # 1 TB
        {**ZARRAY, "shape": [1], "chunks": [2**40]},  # one chunk of 4 TB for one number
    ]
    return each(d, variants, _zarray_hostile(HUGE))


@case
def _zarray_fields_that_are_wrong(d: Path) -> list[Hostile]:
    variants: list[Any] = [
        [1, 2],
        {**ZARRAY, "shape": [-4, 4]},
        {**ZARRAY, "shape": [1] * 65, "chunks": [1] * 65},  # rank > 64
        {**ZARRAY, "shape": [1] * 33, "chunks": [1] * 33},  # rank > tensorstore's 32
        {**ZARRAY, "chunks": [0, 4]},
        {**ZARRAY, "chunks": [2]},
        {**ZARRAY, "shape": "4"},
        {**ZARRAY, "shape": [4.5, 4]},
        {**ZARRAY, "dtype": "<q9"},
        {**ZARRAY, "dtype": "|O"},
        {**ZARRAY, "dtype": "<U4"},
        {**ZARRAY, "compressor": {"id": "no-such-codec"}},
        {**ZARRAY, "filters": [{"id": "delta", "dtype": "<f4"}]},
        {**ZARRAY, "fill_value": "abc"},
        {**ZARRAY, "fill_value": [1, 2]},
        {**ZARRAY, "order": "Q"},
        {**ZARRAY, "zarr_format": 7},
        {**ZARRAY, "dimension_separator": "x"},
    ]
    return each(d, variants, _zarray_hostile("failed|expected"))


def _cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@case
def _zarr_chunks_truncated_or_corrupt(d: Path) -> list[Hostile]:
    out = []

    def hostile(root: Path) -> Hostile:
        return Hostile(root, (f"{root}/w/", "'w'"), "reading its chunks failed")

    root = zarr_dir(d / "raw-cut", compressor=None)  # uncompressed: a short chunk
    _cut(chunk_files(root / "w")[0])
    out.append(hostile(root))
    root = zarr_dir(d / "zstd-cut", compressor={"id": "zstd", "level": 1})
    _cut(chunk_files(root / "w")[0])
    out.append(hostile(root))
    root = zarr_dir(d / "zstd-garbage", compressor={"id": "zstd", "level": 1})
    chunk_files(root / "w")[0].write_bytes(b"\x28\xb5\x2f\xfd" + b"\xff" * 60)
    out.append(hostile(root))
    # A chunk that decompresses to 64 MB where the chunk holds 32 bytes.
    import zlib

    root = zarr_dir(d / "zlib-bomb", compressor={"id": "zlib", "level": 1})
    chunk_files(root / "w")[0].write_bytes(zlib.compress(b"\0" * (64 << 20), 9))
    out.append(hostile(root))
    root = zarr_dir(d / "zarr3-cut", driver="zarr3")
    _cut(chunk_files(root / "w")[0])
    out.append(hostile(root))
    root = zarr_dir(
        d / "zarr3-crc",
        driver="zarr3",
        codecs=[{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
    )
    first = chunk_files(root / "w")[0]
    first.write_bytes(b"\1" + first.read_bytes()[1:])
    out.append(hostile(root))
    return out


# -- zarr3 zarr.json ---------------------------------------------------------------------------


def _zarr3(root: Path, meta: Any) -> Path:
    (root / "w").mkdir(parents=True)
    text = meta if isinstance(meta, (str, bytes)) else json.dumps(meta)
    (root / "w" / "zarr.json").write_bytes(text.encode() if isinstance(text, str) else text)
    return root


def _zarr3_hostile(match: str) -> Callable[[Path, Any], Hostile]:
    def build(root: Path, meta: Any) -> Hostile:
        _zarr3(root, meta)
        return Hostile(root, (f"{root}/w/zarr.json", "'w'"), match)

    return build


def _grid(*chunk: int) -> dict[str, Any]:
    return {"name": "regular", "configuration": {"chunk_shape": list(chunk)}}


@case
def _zarr3_json_not_json(d: Path) -> list[Hostile]:
    bodies = [*NOT_JSON[:3], "[" * 100_000 + "]" * 100_000, '{"a": ' + "9" * 5000 + "}", "[]"]
    out = each(d, bodies, _zarr3_hostile(BAD_JSON))
    root = _zarr3(d / "big", "{}")
    sparse(root / "w" / "zarr.json", wts.NODE_METADATA_LIMIT + 1)
    out.append(Hostile(root, (f"{root}/w/zarr.json",), "larger than"))
    return out


def _sharded(shard: int, inner: int) -> dict[str, Any]:
    bytes_codec = {"name": "bytes", "configuration": {"endian": "little"}}
    return {
        **ZARR3,
        "shape": [shard],
        "chunk_grid": _grid(shard),
        "codecs": [
            {
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": [inner],
                    "codecs": [bytes_codec],
                    "index_codecs": [bytes_codec, {"name": "crc32c"}],
                },
            }
        ],
    }


@case
def _zarr3_claims_huge_sizes(d: Path) -> list[Hostile]:
    variants = [
        {**ZARR3, "shape": [2**62], "chunk_grid": _grid(1)},
        {**ZARR3, "shape": [2**40, 2**40], "chunk_grid": _grid(1, 1)},
        {**ZARR3, "shape": [2**36], "chunk_grid": _grid(2**20)},
        {**ZARR3, "shape": [1], "chunk_grid": _grid(2**40)},
        _sharded(2**29, 1),  # a shard index of 2**29 entries: 8 GB to read 2 GB
    ]
    return each(d, variants, _zarr3_hostile(HUGE))


@case
def _zarr3_fields_that_are_wrong(d: Path) -> list[Hostile]:
    variants: list[Any] = [
        {**ZARR3, "shape": [-1, 4]},
        {**ZARR3, "shape": [1] * 65, "chunk_grid": _grid(*[1] * 65)},
        {**ZARR3, "chunk_grid": _grid(0, 4)},
        {**ZARR3, "chunk_grid": _grid(2)},
        {**ZARR3, "chunk_grid": {"name": "irregular"}},
        {**ZARR3, "data_type": "float1024"},
        {**ZARR3, "data_type": "string", "fill_value": "", "codecs": [{"name": "vlen-utf8"}]},
        {**ZARR3, "codecs": [{"name": "no-such-codec"}]},
        {**ZARR3, "codecs": []},
        {**ZARR3, "fill_value": "abc"},
        {**ZARR3, "fill_value": [1, 2]},
        {**ZARR3, "chunk_key_encoding": {"name": "default", "configuration": {"separator": "x"}}},
        {**ZARR3, "zarr_format": 2},
    ]
    return each(d, variants, _zarr3_hostile("failed"))


@case
def _zarr3_shard_index_corrupt(d: Path) -> list[Hostile]:
    meta = _sharded(4, 1)
    root = d / "c"
    root.mkdir(parents=True)
    ts_array(f"file://{root}/w/", np.arange(4, dtype=np.float32), "zarr3", **{
        k: meta[k] for k in ("chunk_grid", "codecs")
    })  # fmt: skip
    shard = chunk_files(root / "w")[0]
    data = bytearray(shard.read_bytes())
    data[-20:-4] = b"\xff" * 16  # the last index entry: offset and length of 2**64 - 1
    shard.write_bytes(bytes(data))
    return [Hostile(root, (f"{root}/w/", "'w'"), "reading its chunks failed")]


# -- OCDBT -------------------------------------------------------------------------------------


@case
def _ocdbt_manifest_truncated_at_every_byte(d: Path) -> list[Hostile]:
    base = ocdbt_dir(d / "base")
    manifest = (base / "manifest.ocdbt").read_bytes()
    out = []
    for n in range(0, len(manifest), 2):
        root = d / f"cut{n:04d}"
        shutil.copytree(base, root)
        (root / "manifest.ocdbt").write_bytes(manifest[:n])
        out.append(Hostile(root, (f"{root}/manifest.ocdbt",), "expected an OCDBT database"))
    return out


@case
def _ocdbt_manifest_garbage(d: Path) -> list[Hostile]:
    rng = np.random.default_rng(0)
    bodies = [b"\0" * 64, b"\xff" * 4096, rng.bytes(300), b"OCDBT" * 100]

    def build(root: Path, body: bytes) -> Hostile:
        ocdbt_dir(root)
        (root / "manifest.ocdbt").write_bytes(body)
        return Hostile(root, (f"{root}/manifest.ocdbt",), "expected an OCDBT database")

    return each(d, bodies, build)


@case
def _ocdbt_data_files_truncated(d: Path) -> list[Hostile]:
    base = ocdbt_dir(d / "base")
    out = []
    # Every data file a read needs; a file only an older version of the tree used is not.
    for i, data in enumerate(sorted((base / "d").iterdir())):
        root = d / f"v{i}"
        shutil.copytree(base, root)
        _cut(root / "d" / data.name, 0.4)
        try:
            with wts.TensorstoreReader(root) as r:
                for name in r.specs().names:
                    r.read(name)
            shutil.rmtree(root)  # not needed by this version of the database
            continue
        except FormatError:
            pass
        out.append(Hostile(root, (f"{root}/manifest.ocdbt",), "failed|expected"))
    assert out, "no data file of the database is needed to read it"
    return out


# -- msgpack and TensorFlow: a rank no numpy array can have --------------------------------------


@case
def _msgpack_tensor_of_rank_65(d: Path) -> list[Hostile]:
    d.mkdir()
    path = msgpack_file(d / "m.msgpack", (1,) * 65)
    mod = "weightbridge.io.msgpack"
    return [Hostile(path, (str(path), "'w'"), "65 dimensions; numpy arrays have at most 64", mod)]


@case
def _tfcheckpoint_tensor_of_rank_65(d: Path) -> list[Hostile]:
    write_bundle(str(d / "model.ckpt"), {"w": (1, (1,) * 65, b"\0" * 4)})  # 1: DT_FLOAT
    path = d / "model.ckpt.index"
    mod = "weightbridge.io.tfcheckpoint"
    return [Hostile(path, (str(path), "'w'"), "65 dimensions; numpy arrays have at most 64", mod)]


# --------------------------------------------------------------------------------------------
# Running the cases in the capped child.


@pytest.fixture(scope="module")
def outcomes(
    tmp_path_factory: pytest.TempPathFactory,
    fuzzing: dict[str, Any],  # started first: its children run while these cases are built
) -> dict[str, list[tuple[Any, ...]]]:
    root = tmp_path_factory.mktemp("hostile-ts")
    jobs: list[dict[str, Any]] = []
    built: dict[str, list[tuple[Hostile, dict[str, Any]]]] = {}
    for c in CASES:
        built[c.id] = []
        for h in c.build(root / c.id):
            for kind in ("reader", "auto"):
                job = {"kind": kind, "path": str(h.root), "module": h.module}
                jobs.append(job)
                built[c.id].append((h, job))
    results = iter(run_jobs(jobs, root))
    return {cid: [(h, job, next(results)) for h, job in items] for cid, items in built.items()}


@pytest.mark.parametrize("case_id", [c.id for c in CASES])
def test_hostile_checkpoint_is_refused_with_a_named_error(
    case_id: str, outcomes: dict[str, Any]
) -> None:
    import re

    problems = []
    for h, job, out in outcomes[case_id]:
        where = f"{job['kind']} {h.root}"
        if out["status"] != "error":
            problems.append(f"{where}: {out['status']}\n{out.get('trace', '')}")
            continue
        if not out["wb"] or "FormatError" not in out["classes"]:
            problems.append(f"{where}: {out['type']}: {out['message']}\n{out['trace']}")
            continue
        missing = [n for n in h.names if n not in out["message"]]
        if missing:
            problems.append(f"{where}: message does not name {missing}: {out['message']}")
        if not re.search(h.match, out["message"]):
            problems.append(f"{where}: message does not match {h.match!r}: {out['message']}")
        if out["seconds"] > SLOW:
            problems.append(f"{where}: took {out['seconds']:.1f} s")
    n = len(outcomes[case_id])
    assert not problems, f"{len(problems)} of {n} jobs:\n" + "\n".join(problems[:6])


# --------------------------------------------------------------------------------------------
# Behaviour pinned down in this process.


def test_missing_chunks_of_a_zarr_array_read_as_its_fill_value(tmp_path: Path) -> None:
    """zarr semantics, documented: a chunk that is not stored holds the array's fill value."""
    for driver in ("zarr", "zarr3"):
        dtype = {"dtype": "<f4"} if driver == "zarr" else {"data_type": "float32"}
        root = zarr_dir(tmp_path / driver, driver=driver, fill_value=7, **dtype)
        chunks = chunk_files(root / "w")
        assert len(chunks) == 2  # rows 0-1 and row 2
        chunks[-1].unlink()
        with wts.TensorstoreReader(root) as r:
            got = r.read("w")
        want = W.copy()
        want[2:] = 7
        np.testing.assert_array_equal(got, want)


def test_orbax_missing_chunk_reads_as_fill_value_unless_orbax_stored_every_chunk(
    tmp_path: Path,
) -> None:
    root = orbax_dir(tmp_path / "c")
    chunk_files(root / "params.w")[-1].unlink()
    with wts.TensorstoreReader(root) as r:  # no store_array_data_equal_to_fill_value: orbax's
        assert r.read("params/w")[2].tolist() == [0, 0, 0, 0]  # own restore fills it too
    meta = json.loads((root / "_METADATA").read_text())
    (root / "_METADATA").write_text(
        json.dumps({**meta, "store_array_data_equal_to_fill_value": True})
    )
    missing = r"params\.w/\.zarray: tensor 'params/w'.*missing"
    with wts.TensorstoreReader(root) as r, pytest.raises(FormatError, match=missing):
        r.read("params/w")


def test_files_the_reader_does_not_read_may_hold_anything(tmp_path: Path) -> None:
    """``_CHECKPOINT_METADATA`` and ``_sharding`` are orbax's, not ours: junk there is ignored."""
    root = orbax_dir(tmp_path / "c")
    (root / "_CHECKPOINT_METADATA").write_bytes(b"\xff\xfe not json " + b"[" * 10_000)
    (root / "_sharding").write_bytes(b"{" * 10_000)
    for opened in (root, root / "_CHECKPOINT_METADATA", root / "_METADATA"):
        with open_reader(opened) as r:
            np.testing.assert_array_equal(r.read("params/w"), W)


def test_orbax_integer_keys_are_sequence_indexes(tmp_path: Path) -> None:
    tree = {"k": {"key_metadata": [{"key": "stats"}, {"key": 0}], "value_metadata": {}}}
    tree["k"]["value_metadata"] = {"value_type": "np.ndarray"}
    root = orbax_dir(tmp_path / "c", {"tree_metadata": tree}, arrays={"stats/0": W})
    with wts.TensorstoreReader(root) as r:
        np.testing.assert_array_equal(r.read("stats/0"), W)


def test_directories_named_like_steps_but_not_numbers_are_not_steps(tmp_path: Path) -> None:
    """'²'.isdigit() is True and int('²') fails; 'run/default/_METADATA' is no step either.

    Both used to end in a raw ValueError; such a directory is read as the zarr arrays in it.
    """
    for i, top in enumerate(["\u00b2", "run", "1.5"]):
        root = tmp_path / f"v{i}"
        orbax_dir(root / top / "default")
        r = wts.TensorstoreReader(root)
        with r:
            assert r.layout == "zarr"
            np.testing.assert_array_equal(r.read(f"{top}/default/params.w"), W)


def test_a_read_is_refused_before_allocating_more_than_memory_allows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = zarr_dir(tmp_path / "z")
    with wts.TensorstoreReader(root) as r:
        monkeypatch.setattr(wts, "_memory_available", lambda: W.nbytes - 1)
        with pytest.raises(FormatError, match=r"w/\.zarray: tensor 'w': shape \(3, 4\) of F32 "):
            r.read("w")
        monkeypatch.setattr(wts, "_memory_available", lambda: None)
        np.testing.assert_array_equal(r.read("w"), W)


def test_memory_available_sees_rlimit_data(tmp_path: Path) -> None:
    code = (
        "import resource; from weightbridge.io.zarr import _memory_available as m; "
        "before = m(); resource.setrlimit(resource.RLIMIT_DATA, (1 << 30, 1 << 30)); "
        "print(before, m())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after = (int(x) for x in out.stdout.split())
    assert 0 < after < 1 << 30 and after <= before


def test_keys_that_climb_out_of_an_s3_prefix_are_refused(s3: Any) -> None:  # noqa: F811
    """Object-store keys are plain strings: ``ckpt/../secret/`` is a key the S3 driver sends as
    is, and the HTTP layer resolves ``..``, so the reader would read outside its prefix.

    Before the check, a tree key ``../secret`` at ``s3://bucket/ckpt`` read the array at
    ``s3://bucket/secret``.
    """
    endpoint, client = s3
    kv = {"driver": "s3", "bucket": BUCKET, "path": "hostile/secret/", "endpoint": endpoint}
    ts_array({**kv, "aws_region": "us-east-1"}, W, "zarr")
    meta = {"tree_metadata": {"k": tree_entry("../secret")}, "use_zarr3": False}
    client.put_object(Bucket=BUCKET, Key="hostile/ckpt/_METADATA", Body=json.dumps(meta).encode())
    with pytest.raises(FormatError, match=r"hostile/ckpt/_METADATA: entry 'k': key '\.\./secret'"):
        wts.TensorstoreReader(f"s3://{BUCKET}/hostile/ckpt", endpoint=endpoint, timeout=OP_TIMEOUT)
    # A listing that names a key with '..' in it (a plain zarr array found by listing).
    for key in (".zarray", "0.0"):
        body = client.get_object(Bucket=BUCKET, Key=f"hostile/secret/{key}")["Body"].read()
        client.put_object(Bucket=BUCKET, Key=f"hostile/listed/x/../../secret/{key}", Body=body)
    with pytest.raises(FormatError, match=r"has array path 'x/\.\./\.\./secret', which has"):
        wts.TensorstoreReader(
            f"s3://{BUCKET}/hostile/listed", endpoint=endpoint, timeout=OP_TIMEOUT
        )


# --------------------------------------------------------------------------------------------
# Fuzzing the metadata (the child side runs under the memory cap; see `main`).

# Examples per target: each opens a checkpoint twice (reader, detection) in a few ms.
# A longer campaign: WEIGHTBRIDGE_FUZZ_EXAMPLES=5000 pytest tests/test_hostile_tensorstore.py
EXAMPLES = int(os.environ.get("WEIGHTBRIDGE_FUZZ_EXAMPLES", "50"))
FUZZ_SEED = os.environ.get("WEIGHTBRIDGE_FUZZ_SEED")  # unset: hypothesis's derandomized seed
FUZZ_TARGETS = ["orbax-metadata", "zarray", "zarr3-json", "ocdbt-manifest"]


def _json_strategy() -> Any:
    from hypothesis import strategies as st

    words = st.sampled_from(
        ["tree_metadata", "key_metadata", "key", "key_type", "value_metadata", "value_type"]
        + ["skip_deserialize", "use_ocdbt", "use_zarr3", "store_array_data_equal_to_fill_value"]
        + ["jax.Array", "np.ndarray", "scalar", "params", "w", "params.w", "..", "/", ""]
        + ["shape", "chunks", "dtype", "<f4", "|u1", "compressor", "fill_value", "order", "C"]
        + ["zarr_format", "filters", "node_type", "array", "data_type", "float32", "codecs"]
        + ["chunk_grid", "chunk_key_encoding", "name", "configuration", "chunk_shape", "bytes"]
    )
    numbers = st.sampled_from([0, 1, 2, 3, 4, -1, 2**31, 2**40, 2**62, 2**63, 2**64, 1.5])
    leaves = st.one_of(st.none(), st.booleans(), numbers, st.integers(-5, 5), words)
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(words, inner, max_size=5),
        max_leaves=24,
    )


def _mutations() -> Any:
    from hypothesis import strategies as st

    pos = st.integers(min_value=0, max_value=4096)
    return st.lists(
        st.one_of(
            st.tuples(st.just("set"), pos, st.integers(0, 255)),
            st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=8)),
            st.tuples(st.just("delete"), pos, st.integers(1, 32)),
            st.tuples(st.just("truncate"), pos),
        ),
        min_size=1,
        max_size=4,
    )


def _mutate(data: bytes, mutations: list[tuple[Any, ...]]) -> bytes:
    out = bytearray(data)
    for m in mutations:
        kind, pos = m[0], m[1] % (len(out) + 1)
        if kind == "set" and pos < len(out):
            out[pos] = m[2]
        elif kind == "insert":
            out[pos:pos] = m[2]
        elif kind == "delete":
            del out[pos : pos + m[2]]
        elif kind == "truncate":
            del out[pos:]
    return bytes(out)


def _set_field(meta: dict[str, Any], field: str, value: Any) -> dict[str, Any]:
    """`meta` with one field replaced, at the top or inside the one tree entry."""
    out: dict[str, Any] = json.loads(json.dumps(meta))
    if field.startswith("entry."):
        entry = next(iter(out["tree_metadata"].values()))
        entry[field[len("entry.") :]] = value
    elif field.startswith("value."):
        entry = next(iter(out["tree_metadata"].values()))
        entry["value_metadata"][field[len("value.") :]] = value
    else:
        out[field] = value
    return out


def fuzz(target: str, work: Path) -> None:
    from hypothesis import HealthCheck, given, seed, settings
    from hypothesis import strategies as st

    fixed = settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=FUZZ_SEED is None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )

    def config(test: Callable[..., None]) -> Callable[..., None]:
        return fixed(test) if FUZZ_SEED is None else seed(int(FUZZ_SEED))(fixed(test))

    signal.signal(signal.SIGALRM, _alarm)
    counter = iter(range(10**9))
    if target == "orbax-metadata":
        base = orbax_dir(work / "base")
        meta_file = "_METADATA"
    elif target == "zarray":
        base = zarr_dir(work / "base")
        meta_file = "w/.zarray"
    elif target == "zarr3-json":
        base = zarr_dir(work / "base", driver="zarr3")
        meta_file = "w/zarr.json"
    else:
        base = ocdbt_dir(work / "base")
        meta_file = "manifest.ocdbt"
    original = (base / meta_file).read_bytes()

    def fresh(content: bytes) -> Path:
        # A new directory each time: nothing is cached between examples.
        root = work / f"x{next(counter)}"
        shutil.copytree(base, root)
        (root / meta_file).write_bytes(content)
        return root

    def check(content: bytes) -> None:
        root = fresh(content)
        try:
            check_file(root, "zarr")
        finally:
            shutil.rmtree(root)

    @config
    @given(_mutations())
    def mutated(mutations: list[tuple[Any, ...]]) -> None:
        check(_mutate(original, mutations))

    mutated()
    if target == "ocdbt-manifest":
        return

    @config
    @given(_json_strategy())
    def whole(value: Any) -> None:
        check(json.dumps(value).encode())

    whole()

    meta = json.loads(original)
    fields = list(meta)
    if target == "orbax-metadata":
        fields += ["entry.key_metadata", "entry.value_metadata"]
        fields += ["value.value_type", "value.skip_deserialize"]

    @config
    @given(st.sampled_from(fields), _json_strategy())
    def one_field(field: str, value: Any) -> None:
        check(json.dumps(_set_field(meta, field, value)).encode())

    one_field()


def main() -> None:
    target, work = sys.argv[1], Path(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_DATA, (MEMORY_CAP, MEMORY_CAP))
    fuzz(target, work)


@pytest.fixture(scope="module")
def fuzzing(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return start_fuzzing(__file__, list(FUZZ_TARGETS), tmp_path_factory.mktemp("fuzz-ts"))


@pytest.mark.parametrize("target", FUZZ_TARGETS)
def test_fuzzed_metadata_reads_or_fails_with_a_named_error(target: str, fuzzing: Any) -> None:
    work, future = fuzzing[target]
    proc = future.result()
    assert proc.returncode == 0, (
        f"fuzzing {target} failed (exit {proc.returncode}); files are left in {work}:\n"
        f"{proc.stderr[-6000:]}"
    )


if __name__ == "__main__":
    main()
