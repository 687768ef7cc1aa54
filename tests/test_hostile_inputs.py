"""Hostile and broken inputs: every reader refuses them with a `WeightbridgeError` naming the file.

Each case below builds one or more files that a reader (or the spec, plan or rules loader) must
refuse: truncated at every byte, lying lengths and offsets, duplicate names, paths that climb
out of the checkpoint, zip bombs, pickles that call code, nesting bombs, unparseable JSON. All
cases run in one child process under ``RLIMIT_DATA`` (512 MB, so a reader that allocates what a
file claims fails instead of swapping) with a timer on every call; the child reports, per file,
which exception ended it, its message and how long it took. A crash or hang of the child is
reported against the file it was reading, and the child restarts with the rest.

A file's outcome passes when the call raised the case's error class (or a subclass), whose
message names a file of the case. Cases marked ``bounded`` may also succeed: what matters there
is that memory and time stay bounded (a deflated stream longer than its entry claims, a dataset
never written).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import resource
import shlex
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from weightbridge.io import write_checkpoint
from weightbridge.io._pickle import ALLOWED
from weightbridge.io._torchzip import PickleBuilder, encode_pickle
from weightbridge.io.torch import TorchReader
from weightbridge.spec import TensorSpec

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="needs RLIMIT_DATA and os.mkfifo"
)

MB = 1 << 20
# The child's memory cap: the interpreter with numpy and h5py imported takes about 100 MB, so a
# reader has some 400 MB; every file here is a few KB, so nothing honest comes near it.
MEMORY_CAP = 512 * MB
# Per call. The slowest honest call here takes milliseconds; a hang is caught long before this.
CALL_TIMEOUT = 20
MARKER = "PWNED"  # what a payload that runs would create in its case's directory

# --------------------------------------------------------------------------------------------
# The child: runs jobs under the memory cap and reports each outcome as one JSON line.

CHILD = textwrap.dedent(
    """
    import importlib, json, resource, signal, sys, time, traceback
    cap = int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    import numpy as np
    from weightbridge.errors import WeightbridgeError

    class Timeout(BaseException):
        pass

    def alarm(*_):
        raise Timeout()

    signal.signal(signal.SIGALRM, alarm)

    def touch(a):
        # Touch the bytes (a mapped page past the end of a file would be SIGBUS), but only
        # a bounded part of a huge view: a view over one value may claim gigabytes.
        if a.nbytes <= 64 << 20:
            a.tobytes()
        elif a.size:
            a[(0,) * a.ndim], a[tuple(d - 1 for d in a.shape)]

    def run(job):
        kind, path = job["kind"], job["path"]
        if kind == "reader":
            module = importlib.import_module(job["module"])
            reader = module.open_reader(path)
        elif kind == "auto":
            reader = importlib.import_module("weightbridge.io").open_reader(path)
        elif kind == "spec":
            importlib.import_module("weightbridge.spec").load_spec_file(path)
            return
        elif kind == "plan":
            importlib.import_module("weightbridge.plan").Plan.load(path)
            return
        elif kind == "allocate":  # proves the cap is live
            bytearray(int(path))
            return
        elif kind == "rules":
            rulesfile = importlib.import_module("weightbridge.planning.rulesfile")
            rulesfile.load_renames(path)
            rulesfile.load_transforms(path)
            return
        try:
            for name in reader.specs().names:
                touch(np.asarray(reader.read(name)))
                reader.byte_range(name)
                reader.release(name)
        finally:
            reader.close()

    jobs = json.load(open(sys.argv[1]))
    for i in range(int(sys.argv[3]), len(jobs)):
        print(json.dumps({"start": i}), flush=True)
        out = {"index": i, "status": "ok"}
        t0 = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, float(sys.argv[4]))
        try:
            run(jobs[i])
        except Timeout:
            out["status"] = "timeout"
        except BaseException as e:
            out.update(
                status="error",
                type=type(e).__name__,
                classes=[c.__name__ for c in type(e).__mro__],
                wb=isinstance(e, WeightbridgeError),
                message=str(e)[:2000],
                trace="" if isinstance(e, WeightbridgeError) else traceback.format_exc()[-3000:],
            )
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        out["seconds"] = time.perf_counter() - t0
        print(json.dumps(out), flush=True)
    """
)


def run_jobs(jobs: list[dict[str, Any]], workdir: Path) -> list[dict[str, Any]]:
    """Run `jobs` in capped child processes; one outcome per job, crashes and hangs included."""
    spec = workdir / "jobs.json"
    spec.write_text(json.dumps(jobs))
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    first = 0
    while first < len(jobs):
        try:
            proc = subprocess.run(
                [sys.executable, "-c", CHILD, str(spec), str(MEMORY_CAP), str(first)]
                + [str(CALL_TIMEOUT)],
                capture_output=True,
                text=True,
                timeout=CALL_TIMEOUT * 3 + 0.02 * (len(jobs) - first) + 30,
                cwd=workdir,
            )
            stdout, stderr, code = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:  # hung where the timer cannot interrupt
            stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
            stderr, code = "child killed after a hang", None
        started = first
        for line in stdout.splitlines():
            msg = json.loads(line)
            if "start" in msg:
                started = msg["start"]
            else:
                results[msg["index"]] = msg
        if all(r is not None for r in results[first:]):
            break
        # The child died (or hung) on job `started`: record it and go on after it.
        status = "timeout" if code is None else f"crash (exit {code})"
        results[started] = {"index": started, "status": status, "trace": stderr[-3000:]}
        first = started + 1
    return [r if r is not None else {"status": "lost"} for r in results]


# --------------------------------------------------------------------------------------------
# Building blocks for hostile files.


class RunsCommand:
    """Unpickling this runs a shell command: what a hostile checkpoint does."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


def touch_marker(d: Path) -> str:
    return f"touch {shlex.quote(str(d / MARKER))}"


def safetensors_bytes(header: Any, data: bytes = b"", raw: bytes | None = None) -> bytes:
    body = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


def one_f32(shape: Any = (1,), offsets: Any = (0, 4), dtype: Any = "F32") -> bytes:
    entry = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
    return safetensors_bytes({"w": entry}, b"\0" * 8)


def npy_bytes(header: str, data: bytes = b"\0" * 16, version: int = 1) -> bytes:
    """An npy file with a header text of our choosing (padded as numpy pads it)."""
    prefix = 10 if version == 1 else 12
    text = header + " " * (-(len(header) + 1 + prefix) % 64) + "\n"
    size = struct.pack("<H", len(text)) if version == 1 else struct.pack("<I", len(text))
    return b"\x93NUMPY" + bytes([version, 0]) + size + text.encode("latin1") + data


def npy_of(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def zip_of(entries: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()


@dataclass
class RawEntry:
    """One zip entry written as given, lies included: sizes, method, CRC, flags."""

    name: str
    data: bytes  # the bytes stored in the archive (already compressed when method != 0)
    method: int = zipfile.ZIP_STORED
    file_size: int | None = None  # claimed uncompressed size (default: len(data))
    crc: int | None = None
    flags: int = 0


def raw_zip(entries: list[RawEntry]) -> bytes:
    """A zip archive whose directory says exactly what `entries` say (zip64 where needed)."""
    out, central = bytearray(), bytearray()
    for e in entries:
        name = e.name.encode()
        size = len(e.data) if e.file_size is None else e.file_size
        crc = zlib.crc32(e.data) if e.crc is None else e.crc
        big = size >= 0xFFFFFFFF or len(e.data) >= 0xFFFFFFFF
        extra = struct.pack("<HHQQ", 1, 16, size, len(e.data)) if big else b""
        sizes = (0xFFFFFFFF, 0xFFFFFFFF) if big else (len(e.data), size)
        offset = len(out)
        out += struct.pack(
            "<4sHHHHHIIIHH", b"PK\x03\x04", 45, e.flags, e.method, 0, 0, crc, *sizes,
            len(name), len(extra),
        ) + name + extra + e.data  # fmt: skip
        central += struct.pack(
            "<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 45, 45, e.flags, e.method, 0, 0, crc,
            *sizes, len(name), len(extra), 0, 0, 0, 0, offset,
        ) + name + extra  # fmt: skip
    start = len(out)
    out += central
    out += struct.pack(
        "<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(central), start, 0
    )
    return bytes(out)


def deflate(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def torch_zip(pickle_bytes: bytes, storages: dict[str, bytes] | None = None) -> bytes:
    entries = {"archive/data.pkl": pickle_bytes, "archive/version": b"3\n"}
    entries.update({f"archive/data/{k}": v for k, v in (storages or {}).items()})
    return zip_of(entries)


def one_tensor_pickle(
    shape: tuple[int, ...],
    stride: tuple[int, ...],
    numel: int,
    storage: str = "FloatStorage",
    legacy: bool = False,
    name: str = "w",
) -> bytes:
    """A state dict {name: tensor} whose storage, shape and strides are ours to choose."""
    p = PickleBuilder()
    p.ordered_dict()
    p.out += b"("
    p.str_(name)
    p.global_("torch._utils", "_rebuild_tensor_v2")
    p.out += b"(("
    p.str_("storage")
    p.global_("torch", storage)
    p.str_("0")
    p.str_("cpu")
    p.int_(numel)
    if legacy:
        p.out += b"N"  # no storage view
    p.out += b"tQ"
    p.int_(0)
    p.tuple_(shape)
    p.tuple_(stride)
    p.out += b"\x89"
    p.ordered_dict()
    p.out += b"tRu"
    return p.stop()


LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_STORAGE = {"F32": "FloatStorage", "I64": "LongStorage", "F16": "HalfStorage"}


def legacy_bytes(
    main: bytes, keys: list[str], data: bytes = b"", magic: Any = LEGACY_MAGIC
) -> bytes:
    """A legacy `torch.save` file: magic, version, sys info, main pickle, keys, storages."""
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {}}
    return (
        pickle.dumps(magic, protocol=2)
        + pickle.dumps(1001, protocol=2)
        + pickle.dumps(sys_info, protocol=2)
        + main
        + pickle.dumps(keys, protocol=2)
        + data
    )


def legacy_checkpoint(arrays: dict[str, np.ndarray]) -> bytes:
    """What ``torch.save(sd, f, _use_new_zipfile_serialization=False)`` writes, built by hand."""
    from weightbridge import dtypes

    p = PickleBuilder()
    p.ordered_dict()
    p.out += b"("
    data = b""
    for i, (name, a) in enumerate(arrays.items()):
        p.str_(name)
        p.global_("torch._utils", "_rebuild_tensor_v2")
        p.out += b"(("
        p.str_("storage")
        p.global_("torch", _LEGACY_STORAGE[dtypes.from_numpy(a.dtype)])
        p.str_(str(i))
        p.str_("cpu")
        p.int_(a.size)
        p.out += b"NtQ"
        p.int_(0)
        p.tuple_(a.shape)
        p.tuple_(tuple(s // a.itemsize for s in a.strides))
        p.out += b"\x89"
        p.ordered_dict()
        p.out += b"tR"
        data += struct.pack("<q", a.size) + a.tobytes()
    p.out += b"u"
    return legacy_bytes(p.stop(), [str(i) for i in range(len(arrays))], data)


BASE_ARRAYS = {
    "a": np.arange(6, dtype=np.float32).reshape(2, 3),
    "b": np.array([-1, 0, 7], dtype=np.int64),
}


def base_file(d: Path, name: str, fmt: str) -> Path:
    """A small valid checkpoint that the truncation cases cut up."""
    path = d / name
    if fmt == "npz-compressed":
        np.savez_compressed(path, **BASE_ARRAYS)
    elif fmt == "npy":
        np.save(path, BASE_ARRAYS["a"])
    elif fmt == "legacy":
        path.write_bytes(legacy_checkpoint(BASE_ARRAYS))
    elif fmt == "h5":
        with h5py.File(path, "w") as f:
            f["layer/a"] = BASE_ARRAYS["a"]
            f.create_dataset("b", data=BASE_ARRAYS["b"], chunks=(2,), compression="gzip")
            f.attrs["note"] = "x"
    else:
        write_checkpoint(str(path), BASE_ARRAYS, format=fmt)
    return path


def cuts(d: Path, src: Path, step: int = 1) -> list[Path]:
    """`src` cut at every `step`-th byte (0 bytes included), one file per cut point."""
    data = src.read_bytes()
    out = []
    for n in range(0, len(data), step):
        p = d / f"cut{n:06d}{src.suffix}"
        p.write_bytes(data[:n])
        out.append(p)
    return out


def write(d: Path, name: str, data: bytes | str) -> Path:
    path = d / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def write_all(d: Path, suffix: str, contents: list[bytes | str]) -> list[Path]:
    return [write(d, f"v{i}{suffix}", c) for i, c in enumerate(contents)]


# --------------------------------------------------------------------------------------------
# The cases.


@dataclass
class Case:
    id: str
    kind: str  # reader | spec | plan | rules
    build: Callable[[Path], list[Path]]
    module: str = ""  # the reader's module, for kind == "reader"
    error: str = ""  # expected class (or a base) of the error; default per kind
    bounded: bool = False  # success is also fine: only memory and time are at stake
    auto: bool = True  # also open through format detection
    marks: list[Any] = field(default_factory=list)


CASES: list[Case] = []
_DEFAULT_ERROR = {"reader": "FormatError", "spec": "SpecError", "plan": "PlanError"}
_DEFAULT_ERROR["rules"] = "RuleError"


def case(kind: str, module: str = "", **kw: Any) -> Callable[[Callable[[Path], Any]], Any]:
    def register(build: Callable[[Path], Any]) -> Callable[[Path], Any]:
        def paths(d: Path) -> list[Path]:
            got = build(d)
            return list(got) if isinstance(got, (list, tuple)) else [got]

        name = build.__name__.removeprefix("_").replace("_", "-")
        mod = f"weightbridge.io.{module}" if module else ""
        CASES.append(Case(f"{module or kind}:{name}", kind, paths, mod, **kw))
        return build

    return register


# -- safetensors ------------------------------------------------------------------------------


@case("reader", "safetensors")
def _truncated_at_every_byte(d: Path) -> list[Path]:
    return cuts(d, base_file(d, "base.safetensors", "safetensors"))


@case("reader", "safetensors")
def _header_length_absurd(d: Path) -> list[Path]:
    body = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    return write_all(
        d,
        ".safetensors",
        [struct.pack("<Q", n) + body + b"\0" * 4 for n in (2**64 - 1, 2**63, 100_000_001, 10**6)],
    )


@case("reader", "safetensors")
def _header_not_json_or_utf8(d: Path) -> list[Path]:
    raws = [b"{not json}", b'{"\xff\xfe": 1}', b"[1, 2]", b'"text"', b"{}" + b"\0" * 6]
    raws += [b'{"w": NaN}', b"\xef\xbb\xbf{}"]
    return write_all(d, ".safetensors", [safetensors_bytes(None, raw=r) for r in raws])


@case("reader", "safetensors")
def _header_nesting_bomb(d: Path) -> Path:
    raw = b'{"w":' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    return write(d, "deep.safetensors", safetensors_bytes(None, raw=raw))


@case("reader", "safetensors")
def _header_integer_too_long(d: Path) -> Path:
    raw = b'{"w":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,4]}}'
    return write(d, "long.safetensors", safetensors_bytes(None, raw=raw, data=b"\0" * 4))


@case("reader", "safetensors")
def _duplicate_names(d: Path) -> Path:
    entry = '{"dtype":"F32","shape":[1],"data_offsets":[%d,%d]}'
    raw = ('{"w":' + entry % (0, 4) + ',"w":' + entry % (4, 8) + "}").encode()
    return write(d, "dup.safetensors", safetensors_bytes(None, raw=raw, data=b"\0" * 8))


@case("reader", "safetensors")
def _overlapping_offsets(d: Path) -> Path:
    e = {"dtype": "F32", "shape": [2]}
    header = {"a": {**e, "data_offsets": [0, 8]}, "b": {**e, "data_offsets": [4, 12]}}
    return write(d, "overlap.safetensors", safetensors_bytes(header, b"\0" * 12))


@case("reader", "safetensors")
def _offsets_out_of_range_or_malformed(d: Path) -> list[Path]:
    bad = [[0, 2**40], [2**63, 2**63 + 4], [4, 0], [-4, 0], [0.0, 4.0], [False, True], [0, 4, 8]]
    bad += [[0], None, "0:4", [2**64, 2**64 + 4]]
    return write_all(d, ".safetensors", [one_f32(offsets=o) for o in bad])


@case("reader", "safetensors")
def _shape_overflows_or_disagrees(d: Path) -> list[Path]:
    shapes = [[2**40, 2**40], [2**62, 2**62, 2**62], [3], [0], [2], [2**64]]
    files = [one_f32(shape=s) for s in shapes]
    files.append(one_f32(shape=[2**31, 2**31], offsets=[0, 2**64]))
    return write_all(d, ".safetensors", files)


@case("reader", "safetensors")
def _shape_negative_or_not_integers(d: Path) -> list[Path]:
    shapes = [[-1], [1, -1], [1.0], [True], ["1"], "1", {"0": 1}, None, [[1]], [1] * 65]
    return write_all(d, ".safetensors", [one_f32(shape=s) for s in shapes])


@case("reader", "safetensors")
def _unknown_dtype(d: Path) -> list[Path]:
    kinds = ["F128", "", None, 5, ["F32"], "object", "F32" * 1000]
    return write_all(d, ".safetensors", [one_f32(dtype=k) for k in kinds])


@case("reader", "safetensors")
def _entries_or_metadata_not_objects(d: Path) -> list[Path]:
    headers: list[Any] = [{"w": [1, 2]}, {"w": "x"}, {"__metadata__": [1]}, {"__metadata__": "s"}]
    return write_all(d, ".safetensors", [safetensors_bytes(h) for h in headers])


# -- sharded index ------------------------------------------------------------------------------


def _sharded(d: Path, index: bytes | str | dict[str, Any], name: str = "model") -> Path:
    """A directory with two valid shards (a: shard1, b: shard2) and the given index."""
    write_checkpoint(str(d / "s1.safetensors"), {"a": BASE_ARRAYS["a"]})
    write_checkpoint(str(d / "s2.safetensors"), {"b": BASE_ARRAYS["b"]})
    if isinstance(index, dict):
        index = json.dumps(index)
    write(d, f"{name}.safetensors.index.json", index)
    return d / f"{name}.safetensors.index.json"


def _sharded_each(d: Path, indexes: list[Any]) -> list[Path]:
    out = []
    for i, index in enumerate(indexes):
        sub = d / f"v{i}"
        sub.mkdir()
        out.append(_sharded(sub, index))
    return out


WM = {"a": "s1.safetensors", "b": "s2.safetensors"}


@case("reader", "sharded")
def _index_not_json_or_utf8(d: Path) -> list[Path]:
    bodies: list[Any] = ["{", b'{"weight_map": {"a": "\xff"}}', "[]", "null", '"x"', "{}"]
    bodies += [{"weight_map": []}, {"weight_map": "s1.safetensors"}, {"metadata": {}}]
    return _sharded_each(d, bodies)


@case("reader", "sharded")
def _index_nesting_bomb_and_long_integer(d: Path) -> list[Path]:
    deep = (
        '{"weight_map": {"a": "s1.safetensors"}, "metadata": ' + "[" * 20_000 + "]" * 20_000 + "}"
    )
    long = '{"weight_map": {"a": "s1.safetensors"}, "metadata": {"total_size": ' + "9" * 5000 + "}}"
    return _sharded_each(d, [deep, long])


@case("reader", "sharded")
def _index_duplicate_names(d: Path) -> Path:
    return _sharded(
        d, '{"weight_map": {"a": "s1.safetensors", "a": "s2.safetensors", "b": "s2.safetensors"}}'
    )


@case("reader", "sharded")
def _index_paths_escape_or_are_not_names(d: Path) -> list[Path]:
    shards: list[Any] = ["../s1.safetensors", "/etc/passwd", "sub/../../s1.safetensors"]
    shards += ["C:/x.safetensors", "C:x", "..\\s1.safetensors", "", None, 5, ["s1.safetensors"]]
    shards += ["s1.safetensors\u0000x", "."]
    return _sharded_each(d, [{"weight_map": {"a": s, "b": "s2.safetensors"}} for s in shards])


@case("reader", "sharded")
def _index_names_itself_or_another_index(d: Path) -> list[Path]:
    selfref = {"weight_map": {"a": "model.safetensors.index.json"}}
    out = _sharded_each(d, [selfref])
    sub = d / "nested"
    sub.mkdir()
    write(sub, "other.safetensors.index.json", json.dumps(selfref))
    out.append(_sharded(sub, {"weight_map": {"a": "other.safetensors.index.json"}}, "model"))
    return out


@case("reader", "sharded")
def _index_and_shards_disagree(d: Path) -> list[Path]:
    bodies = [
        {"weight_map": {**WM, "c": "s1.safetensors"}},  # c is in no shard
        {"weight_map": {"a": "missing.safetensors", "b": "s2.safetensors"}},
        {"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}},  # b is not in s1
        {"weight_map": {"b": "s1.safetensors"}},  # s1 holds a, which the index does not list
    ]
    out = _sharded_each(d, bodies)
    sub = d / "dir-shard"
    sub.mkdir()
    (sub / "shard.safetensors").mkdir()
    out.append(_sharded(sub, {"weight_map": {"a": "shard.safetensors"}}))
    return out


@case("reader", "sharded")
def _shard_truncated(d: Path) -> Path:
    index = _sharded(d, {"weight_map": WM})
    data = (d / "s2.safetensors").read_bytes()
    (d / "s2.safetensors").write_bytes(data[:-3])
    return index


# -- numpy: npy -------------------------------------------------------------------------------


@case("reader", "numpy")
def _npy_truncated_at_every_byte(d: Path) -> list[Path]:
    return cuts(d, base_file(d, "base.npy", "npy"))


@case("reader", "numpy")
def _npy_bad_version_or_header_length(d: Path) -> list[Path]:
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }"
    good = npy_bytes(header)
    files = [good[:6] + b"\x09\x00" + good[8:], good[:6] + b"\x00\x00" + good[8:]]
    files.append(b"\x93NUMPY\x02\x00" + struct.pack("<I", 2**32 - 1) + b"{")
    files.append(b"\x93NUMPY\x03\x00" + struct.pack("<I", 500 * MB) + b"{" * 100)
    files.append(b"\x93NUMPY\x01\x00" + struct.pack("<H", 65535) + b"{")
    return write_all(d, ".npy", files)


@case("reader", "numpy")
def _npy_header_not_a_literal(d: Path) -> list[Path]:
    run = touch_marker(d)
    headers = [
        f"{{'descr': __import__('os').system({run!r}), 'fortran_order': False, 'shape': (4,), }}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (4,), 'x': [i for i in ()]}",
        "['<f4', False, (4,)]",
        "{'descr': '<f4', 'fortran_order': False}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': " + "(" * 5000 + ")" * 5000 + "}",
        "{'descr': '<f4', 'fortran_order': 'yes', 'shape': (4,), }",
    ]
    return write_all(d, ".npy", [npy_bytes(h) for h in headers])


@case("reader", "numpy")
def _npy_unknown_or_unsafe_dtype(d: Path) -> list[Path]:
    descrs = ["'<U4'", "'|O'", "[('a', '<f4')]", "'<c32'", "'<M8[s]'", "'|V3'", "'<f3'", "'xyz'"]
    headers = [f"{{'descr': {x}, 'fortran_order': False, 'shape': (1,), }}" for x in descrs]
    files = [npy_bytes(h) for h in headers]
    files.append(npy_of(np.array([RunsCommand(touch_marker(d))], dtype=object)))
    return write_all(d, ".npy", files)


@case("reader", "numpy")
def _npy_shape_overflows_negative_or_disagrees(d: Path) -> list[Path]:
    shapes = ["(1099511627776, 1099511627776)", "(-1,)", "(100,)", "(" + "1, " * 65 + ")"]
    shapes += ["(2.0,)", "('a',)", "(18446744073709551616,)"]
    headers = [f"{{'descr': '<f4', 'fortran_order': False, 'shape': {s}, }}" for s in shapes]
    return write_all(d, ".npy", [npy_bytes(h) for h in headers])


# -- numpy: npz -------------------------------------------------------------------------------


@case("reader", "numpy")
def _npz_truncated_at_every_byte(d: Path) -> list[Path]:
    return cuts(d, base_file(d, "base.npz", "numpy"), step=3)


@case("reader", "numpy")
def _npz_compressed_truncated_at_every_byte(d: Path) -> list[Path]:
    return cuts(d, base_file(d, "basez.npz", "npz-compressed"), step=3)


@case("reader", "numpy")
def _npz_member_paths_escape(d: Path) -> list[Path]:
    member = npy_of(np.zeros(2, np.float32))
    names = ["../evil.npy", "/abs.npy", "a/../../b.npy", "..\\x.npy", "../notes.txt"]
    return write_all(d, ".npz", [zip_of({n: member}) for n in names])


@case("reader", "numpy")
def _npz_duplicate_members(d: Path) -> Path:
    member = npy_of(np.zeros(2, np.float32))
    entries = [RawEntry("w.npy", member), RawEntry("w.npy", member)]
    return write(d, "dup.npz", raw_zip(entries))


def _bomb_member(shape: tuple[int, ...], stream: bytes, claim: int | None = None) -> bytes:
    header = npy_bytes(f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}", b"")
    size = len(header) + 4 * int(np.prod(shape)) if claim is None else claim
    return raw_zip([RawEntry("w.npy", deflate(header + stream), zipfile.ZIP_DEFLATED, size)])


@case("reader", "numpy")
def _npz_zip_bombs(d: Path) -> list[Path]:
    return write_all(
        d,
        ".npz",
        [
            _bomb_member((2**20, 2**20), b"\0" * 4096),  # claims 4 TB
            _bomb_member((25 * MB,), b"\0" * 4096),  # claims 100 MB from a few KB
            _bomb_member((2**40,), b""),  # claims 4 TB with no data at all
        ],
    )


@case("reader", "numpy", bounded=True)
def _npz_stream_longer_than_its_entry_claims(d: Path) -> Path:
    # 64 MB of zeros deflate to 64 KB; the entry says 16 bytes, so only those are decompressed.
    return write(d, "long.npz", _bomb_member((4,), b"\0" * (64 * MB)))


@case("reader", "numpy")
def _npz_unknown_compression_or_encrypted(d: Path) -> list[Path]:
    member = npy_of(np.zeros(2, np.float32))
    return write_all(
        d,
        ".npz",
        [
            raw_zip([RawEntry("w.npy", member, method=99)]),
            raw_zip([RawEntry("w.npy", member, method=zipfile.ZIP_BZIP2)]),
            raw_zip([RawEntry("w.npy", member, method=zipfile.ZIP_LZMA)]),
            raw_zip([RawEntry("w.npy", member, flags=1)]),
        ],
    )


@case("reader", "numpy")
def _npz_broken_comment_records(d: Path) -> list[Path]:
    member = npy_of(np.zeros(2, np.uint16).view("V2"))
    comments = [
        b"[" * 30_000 + b"]" * 30_000,
        b'{"weightbridge_dtypes": {"w": "nope"}}',
        b'{"weightbridge_dtypes": {"w": 5}}',
        b'{"weightbridge_dtypes": ["w"]}',
        b'{"weightbridge_dtypes": {"w": "F32"}}',
        b'{"weightbridge_dtypes": {"w": "BF16", "w": "F16"}}',
        b'{"weightbridge_dtypes": {"w": "BF16", "x": "BF16"}}',
        b"\xff\xfe",
    ]
    out = []
    for i, comment in enumerate(comments):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("w.npy", member)
            z.comment = comment[:65535]
        out.append(write(d, f"c{i}.npz", buf.getvalue()))
    return out


@case("reader", "numpy")
def _npz_object_array_payload(d: Path) -> Path:
    payload = npy_of(np.array([RunsCommand(touch_marker(d))], dtype=object))
    return write(d, "evil.npz", zip_of({"w.npy": payload}))


@case("reader", "numpy")
def _npz_directory_points_elsewhere(d: Path) -> list[Path]:
    good = zip_of({"w.npy": npy_of(np.zeros(2, np.float32))})
    central = good.index(b"PK\x01\x02")
    files = []
    for offset in (7, 2**31, 0xFFFFFFFE):  # where the entry's local header supposedly starts
        bad = bytearray(good)
        bad[central + 42 : central + 46] = struct.pack("<I", offset)
        files.append(bytes(bad))
    return write_all(d, ".npz", files)


# -- hdf5 ---------------------------------------------------------------------------------------


@case("reader", "hdf5")
def _h5_truncated(d: Path) -> list[Path]:
    return cuts(d, base_file(d, "base.h5", "h5"), step=7)


@case("reader", "hdf5")
def _h5_not_hdf5(d: Path) -> list[Path]:
    sig = b"\x89HDF\r\n\x1a\n"
    return write_all(d, ".h5", [sig, sig + b"\0" * 100, sig + b"\xff" * 4000, b"not hdf5"])


@case("reader", "hdf5")
def _h5_data_in_other_files(d: Path) -> list[Path]:
    secret = write(d, "secret.bin", b"SECRET--" * 4)
    a = d / "external.h5"
    with h5py.File(a, "w") as f:
        f.create_dataset("w", shape=(8,), dtype="f4", external=[(str(secret), 0, 32)])
    src = d / "src.h5"
    with h5py.File(src, "w") as f:
        f["x"] = np.arange(4, dtype="f4")
    b = d / "virtual.h5"
    layout = h5py.VirtualLayout(shape=(4,), dtype="f4")
    layout[:] = h5py.VirtualSource(str(src), "x", shape=(4,))
    with h5py.File(b, "w") as f:
        f.create_virtual_dataset("v", layout)
    return [a, b]


@case("reader", "hdf5", bounded=True)
def _h5_links_to_other_files_are_not_followed(d: Path) -> Path:
    # Keras 2 lists layers by name; an external link there would make HDF5 open a FIFO
    # (blocking forever) or any file it names.
    fifo = d / "fifo.h5"
    os.mkfifo(fifo)
    path = d / "links.h5"
    with h5py.File(path, "w") as f:
        f["dense/kernel"] = np.ones((2, 2), "f4")
        f["evil"] = h5py.ExternalLink(str(fifo), "/")
        f.attrs["layer_names"] = np.array([b"evil", b"dense"])
        f["dense"].attrs["weight_names"] = np.array([b"kernel"])
    return path


@case("reader", "hdf5")
def _h5_shape_overflows(d: Path) -> Path:
    path = d / "huge.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("w", shape=(2**40, 2**40), dtype="f4", chunks=(1, 1))
    return path


@case("reader", "hdf5", bounded=True)
def _h5_never_written_dataset_claims_gigabytes(d: Path) -> Path:
    path = d / "unwritten.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("w", shape=(2**30,), dtype="f4", chunks=(2**16,), fillvalue=1.5)
        f.create_dataset("c", shape=(2**28,), dtype=">f8")  # contiguous, never allocated
    return path


@case("reader", "hdf5")
def _h5_dtype_records_lie(d: Path) -> list[Path]:
    out = []
    for i, (data, attr) in enumerate(
        [
            (np.zeros(2, "V2"), None),
            (np.zeros(2, "u2"), "nope"),
            (np.zeros(2, "u4"), "BF16"),
            (np.zeros(2, "f4"), "BF16"),
            (np.zeros(2, "u2"), 5),
        ]
    ):
        path = d / f"v{i}.h5"
        with h5py.File(path, "w") as f:
            f["w"] = data
            if attr is not None:
                f["w"].attrs["weightbridge_dtype"] = attr
        out.append(path)
    return out


@case("reader", "hdf5")
def _h5_unavailable_filter(d: Path) -> Path:
    path = d / "filter.h5"
    with h5py.File(path, "w") as f:  # a chunk compressed by a filter this HDF5 does not have
        ds = f.create_dataset(
            "w", shape=(4,), dtype="f4", chunks=(4,), compression=32_123, allow_unknown_filter=True
        )
        ds.id.write_direct_chunk((0,), b"not what the filter wrote")
    return path


@case("reader", "hdf5", bounded=True)
def _h5_odd_keras_attributes(d: Path) -> Path:
    path = d / "attrs.h5"
    with h5py.File(path, "w") as f:
        f["model_weights/dense/kernel"] = np.ones(2, "f4")
        f.attrs["layer_names"] = 5
        f["model_weights"].attrs["layer_names"] = np.array([[b"dense"]])
        f["model_weights/dense"].attrs["weight_names"] = b"kernel"
        f.attrs["other"] = np.zeros((2, 2))
    return path


@case("reader", "hdf5")
def _keras_archive_broken(d: Path) -> list[Path]:
    h5 = base_file(d, "inner.h5", "h5").read_bytes()
    return [
        write(d, "v0.keras", raw_zip([RawEntry("model.weights.h5", h5, method=99)])),
        write(d, "v1.keras", raw_zip([RawEntry("model.weights.h5", h5, flags=1)])),
        write(d, "v2.keras", raw_zip([RawEntry("model.weights.h5", h5, file_size=2**40)])),
        write(d, "v3.keras", raw_zip([RawEntry("model.weights.h5", h5[:100])])),
        write(d, "v4.keras", zip_of({"config.json": b"{}"})),
    ]


# -- torch zip -------------------------------------------------------------------------------


@case("reader", "torch")
def _zip_truncated_at_every_byte(d: Path) -> list[Path]:
    return cuts(d, base_file(d, "base.bin", "torch"))


def _payloads(d: Path) -> list[bytes]:
    run = touch_marker(d)
    out = [pickle.dumps({"w": RunsCommand(run)}, protocol=p) for p in (2, 4, 5)]
    for module, name in [("builtins", "eval"), ("builtins", "getattr"), ("subprocess", "Popen")]:
        out.append(b"\x80\x02c%s\n%s\nX%s%s\x85R." % (
            module.encode(), name.encode(), struct.pack("<I", len(run)), run.encode()
        ))  # fmt: skip
    out.append(b"\x80\x02ctorch.serialization\nload\n)R.")
    out.append(b"\x80\x02ccollections\nOrderedDict.fromkeys\n)R.")
    return out


@case("reader", "torch")
def _zip_pickles_call_globals_outside_the_allow_list(d: Path) -> list[Path]:
    return write_all(d, ".bin", [torch_zip(p) for p in _payloads(d)])


@case("reader", "torch")
def _legacy_pickles_call_globals_outside_the_allow_list(d: Path) -> list[Path]:
    return write_all(d, ".pt", [legacy_bytes(p, []) for p in _payloads(d)])


@case("reader", "torch")
def _zip_entry_paths_escape(d: Path) -> list[Path]:
    good = encode_pickle([TensorSpec("w", (1,), "F32")])
    files = [
        zip_of({"archive/data.pkl": good, "archive/data/0": b"\0" * 4, bad: b""})
        for bad in ("../evil", "archive/../../evil", "/etc/evil", "C:/evil", "..\\evil")
    ]
    p = PickleBuilder()
    p.ordered_dict()
    p.out += b"("
    p.str_("w")
    p.tensor("../../etc/passwd", TensorSpec("w", (1,), "F32"))
    p.out += b"u"
    files.append(torch_zip(p.stop(), {"0": b"\0" * 4}))
    return write_all(d, ".bin", files)


@case("reader", "torch")
def _zip_duplicate_entries(d: Path) -> Path:
    pkl = encode_pickle([TensorSpec("w", (1,), "F32")])
    entries = [
        RawEntry("archive/data.pkl", pkl),
        RawEntry("archive/data/0", b"\0" * 4),
        RawEntry("archive/data/0", b"\1" * 4),
    ]
    return write(d, "dup.bin", raw_zip(entries))


@case("reader", "torch")
def _zip_bombs(d: Path) -> list[Path]:
    def storage_bomb(numel: int, stream: bytes, method: int = zipfile.ZIP_DEFLATED) -> bytes:
        pkl = encode_pickle([TensorSpec("w", (numel,), "F32")])
        data = deflate(stream) if method == zipfile.ZIP_DEFLATED else stream
        return raw_zip(
            [RawEntry("archive/data.pkl", pkl), RawEntry("archive/data/0", data, method, 4 * numel)]
        )

    pkl_bomb = raw_zip(
        [RawEntry("archive/data.pkl", deflate(b"\0" * 4096), zipfile.ZIP_DEFLATED, 2**40)]
    )
    pkl_ratio = raw_zip(
        [RawEntry("archive/data.pkl", deflate(b"\0" * 4096), zipfile.ZIP_DEFLATED, 200 * MB)]
    )
    return write_all(
        d,
        ".bin",
        [
            storage_bomb(2**38, b"\0" * 4096),  # a 1 TB storage from 4 KB
            storage_bomb(25 * MB, b"\0" * 4096),  # 100 MB from 4 KB: more than DEFLATE makes
            storage_bomb(25 * MB, b"BZh9" + b"\0" * 100, zipfile.ZIP_BZIP2),
            pkl_bomb,
            pkl_ratio,
        ],
    )


@case("reader", "torch")
def _zip_pickle_allocation_claims(d: Path) -> list[Path]:
    pickles = [
        b"\x80\x02K\x01r\xff\xff\xff\x7f.",  # memo slot 2**31
        b"\x80\x04\x8e" + struct.pack("<Q", 2**40) + b"abc.",  # BINBYTES8 of 1 TB
        b"\x80\x05\x96" + struct.pack("<Q", 300 * MB) + b"abc.",  # BYTEARRAY8 of 300 MB
        b"\x80\x04\x95" + struct.pack("<Q", 2**40) + b"}.",  # a FRAME of 1 TB
        b"\x80\x02X" + struct.pack("<I", 2**32 - 1) + b"abc.",  # BINUNICODE of 4 GB
    ]
    return write_all(d, ".bin", [torch_zip(p) for p in pickles])


@case("reader", "torch")
def _legacy_pickle_allocation_claims(d: Path) -> list[Path]:
    pickles = [
        b"\x80\x04\x8e" + struct.pack("<Q", 2**40) + b"abc.",
        b"\x80\x05\x96" + struct.pack("<Q", 2**40) + b"abc.",
        b"\x80\x04\x95" + struct.pack("<Q", 2**40) + b"}.",
        b"\x80\x04\x95" + struct.pack("<Q", 300 * MB) + b"}.",
        b"\x80\x02T" + struct.pack("<I", 2**31 - 1) + b"abc.",
    ]
    return write_all(d, ".pt", [legacy_bytes(p, []) for p in pickles])


def _laughs(leaf: Any, levels: int = 64) -> Any:
    node = [leaf]
    for _ in range(levels):
        node = [node, node]
    return node


def _deep(levels: int) -> bytes:
    """A pickle of `levels` nested lists, written directly (pickling it would recurse)."""
    return b"\x80\x02" + b"]" * levels + b"a" * (levels - 1) + b"."


@case("reader", "torch", bounded=True)
def _pickle_bombs_without_tensors(d: Path) -> list[Path]:
    return write_all(
        d,
        ".bin",
        [
            torch_zip(pickle.dumps({"x": _laughs(1)}, protocol=2)),  # 2**64 paths to one list
            torch_zip(pickle.dumps({"x": 10**5000}, protocol=2)),  # an int too long to print
            torch_zip(pickle.dumps({10**5000: {"y": 1}}, protocol=2)),
            torch_zip(pickle.dumps({"k" * 100_000: list(range(10_000))}, protocol=2)),
            torch_zip(b"\x80\x02" + b"(" * 100_000 + b"N."),  # marks that never close
        ],
    )


@case("reader", "torch")
def _pickle_nesting_and_reference_bombs(d: Path) -> list[Path]:
    # One tensor reached 2**64 times through shared tuples: t -> (t, t) -> ((t, t), (t, t)) ...
    p = PickleBuilder()
    p.out += b"("  # MARK for the dict
    p.str_("w")
    p.global_("torch._utils", "_rebuild_tensor_v2")
    p.out += b"(("
    p.str_("storage")
    p.global_("torch", "FloatStorage")
    p.str_("0")
    p.str_("cpu")
    p.int_(1)
    p.out += b"tQ"
    p.int_(0)
    p.tuple_((1,))
    p.tuple_((1,))
    p.out += b"\x89"
    p.ordered_dict()
    p.out += b"tR"
    p.out += b"2\x86" * 64  # DUP, TUPLE2: x -> (x, x), 64 times
    p.out += b"d"  # DICT from the mark: {"w": ...}
    laughs_with_tensors = p.stop()
    return write_all(
        d,
        ".bin",
        [
            torch_zip(laughs_with_tensors, {"0": b"\0" * 4}),
            torch_zip(_deep(100_000)),
            torch_zip(b"\x80\x02}X\x01\x00\x00\x00w" + _deep(50_000)[2:-1] + b"s."),
            torch_zip(one_tensor_pickle((1,), (1,), 1, name="k" * 5000), {"0": b"\0" * 4}),
        ],
    )


@case("reader", "torch")
def _legacy_key_list_and_magic_bombs(d: Path) -> list[Path]:
    empty = pickle.dumps({}, protocol=2)
    deep_keys = legacy_bytes(empty, []).removesuffix(pickle.dumps([], protocol=2)) + _deep(5000)
    return write_all(
        d,
        ".pt",
        [
            deep_keys,
            legacy_bytes(empty, [], magic=10**5000),
            legacy_bytes(empty, [], magic=_laughs(1, 20)),
            legacy_bytes(empty, ["k" * 10_000] * 1000),
        ],
    )


@case("reader", "torch")
def _legacy_truncated_at_every_byte(d: Path) -> list[Path]:
    return cuts(d, base_file(d, "base.pt", "legacy"))


@case("reader", "torch")
def _legacy_storage_counts_lie(d: Path) -> list[Path]:
    main = one_tensor_pickle((2,), (1,), 2, legacy=True)
    counts = [-1, 2**62, 1, 2**63 - 1]
    return write_all(
        d,
        ".pt",
        [legacy_bytes(main, ["0"], struct.pack("<q", n) + b"\0" * 8) for n in counts],
    )


@case("reader", "torch")
def _tensor_shapes_overflow_or_disagree(d: Path) -> list[Path]:
    def one(shape: tuple[int, ...], stride: tuple[int, ...], numel: int, nbytes: int) -> bytes:
        return torch_zip(one_tensor_pickle(shape, stride, numel), {"0": b"\0" * nbytes})

    return write_all(
        d,
        ".bin",
        [
            one((2**40, 2**40), (0, 0), 1, 4),  # a zero-stride view of 4 ZB
            one((4,), (1,), 4, 8),  # storage smaller than it says
            one((4,), (1,), 2, 16),  # tensor larger than its storage
            one((2,), (2**62,), 2, 8),  # strides that leave the storage
            one((1,) * 65, (1,) * 65, 1, 4),
            one((2**64,), (1,), 1, 4),  # not an int64
            one((2,), (2**64,), 1, 4),
            one((1,), (1,), 2**64, 4),
            torch_zip(one_tensor_pickle((1,), (1,), 1, "QInt8Storage"), {"0": b"\0"}),
            torch_zip(one_tensor_pickle((1,), (1,), 1, "ComplexDoubleStorage"), {"0": b"\0" * 16}),
        ],
    )


@case("reader", "torch")
def _pickle_sets_state_of_shared_objects(d: Path) -> list[Path]:
    state = pickle.dumps(("torch.FloatStorage", "F64"), protocol=2)[2:-1]
    build = [
        b"\x80\x02ctorch\nFloatStorage\n" + state + b"b0}.",
        b"\x80\x02ctorch\nfloat32\n" + state + b"b0}.",
        b"\x80\x02ctorch\nTensor\n" + pickle.dumps({"name": "x"}, protocol=2)[2:-1] + b"b0}.",
        b"\x80\x02ctorch\nSize\n"
        + pickle.dumps((None, {"__defaults__": ((7,),)}), protocol=2)[2:-1]
        + b"b0}.",
        b"\x80\x02cargparse\nNamespace\n"
        + pickle.dumps((None, {"__init__": 1}), protocol=2)[2:-1]
        + b"b0}.",
    ]
    return write_all(d, ".bin", [torch_zip(p) for p in build])


@case("reader", "torch")
def _not_torch_at_all(d: Path) -> list[Path]:
    return write_all(
        d,
        ".bin",
        [
            b"\x80",
            pickle.dumps([1, 2, 3], protocol=2),
            zip_of({"a/data.pkl": b"", "b/data.pkl": b""}),
            zip_of({"archive/data.pkl": b"\x80\x02}.", "archive/constants.pkl": b""}),
            zip_of({"archive/data.pkl": b"\x80\x02}.", "archive/byteorder": b"middle"}),
            zip_of({"archive/data.pkl": b"\x80\x02}.", "archive/byteorder": b"x" * 100}),
        ],
    )


# -- TensorFlow bundles (reader by another helper: tested, not edited) ----------------------

TF_FIXTURES = Path(__file__).parent / "fixtures" / "tf"


@case("reader", "tfcheckpoint")
def _tf_index_truncated_at_every_byte(d: Path) -> list[Path]:
    data = (TF_FIXTURES / "saver" / "model.ckpt.data-00000-of-00001").read_bytes()
    index = (TF_FIXTURES / "saver" / "model.ckpt.index").read_bytes()
    out = []
    for n in range(0, len(index), 3):
        sub = d / f"cut{n}"
        sub.mkdir()
        write(sub, "model.ckpt.data-00000-of-00001", data)
        out.append(write(sub, "model.ckpt.index", index[:n]))
    return out


@case("reader", "tfcheckpoint")
def _tf_data_truncated_or_missing(d: Path) -> list[Path]:
    data = (TF_FIXTURES / "saver" / "model.ckpt.data-00000-of-00001").read_bytes()
    index = (TF_FIXTURES / "saver" / "model.ckpt.index").read_bytes()
    out = []
    for i, shard in enumerate([data[: len(data) // 2], None]):
        sub = d / f"v{i}"
        sub.mkdir()
        if shard is not None:
            write(sub, "model.ckpt.data-00000-of-00001", shard)
        out.append(write(sub, "model.ckpt.index", index))
    return out


@case("reader", "tfcheckpoint")
def _tf_state_file_escapes(d: Path) -> list[Path]:
    out = []
    for i, named in enumerate(["../../etc/ckpt", "sub/../../x", "missing"]):
        sub = d / f"v{i}"
        sub.mkdir()
        write(sub, "checkpoint", f'model_checkpoint_path: "{named}"\n')
        out.append(sub)
    return out


# -- Flax msgpack (reader by another helper: tested, not edited) -----------------------------


@case("reader", "msgpack")
def _msgpack_truncated_at_every_byte(d: Path) -> list[Path]:
    path = d / "base.msgpack"
    write_checkpoint(str(path), BASE_ARRAYS, format="msgpack")
    return cuts(d, path)


@case("reader", "msgpack")
def _msgpack_nesting_and_length_bombs(d: Path) -> list[Path]:
    return write_all(
        d,
        ".msgpack",
        [
            b"\x81\xa1a" * 50_000 + b"\xc0",  # {"a": {"a": ... }} 50 000 deep
            b"\x81\xa1a\x91" + b"\x91" * 50_000 + b"\xc0",  # lists 50 000 deep
            b"\xdf\xff\xff\xff\xff",  # a map claiming 2**32 - 1 entries
            b"\x81\xa1w\xdd\xff\xff\xff\xff",  # an array claiming 2**32 - 1 items
            b"\x81\xa1w\xc6\xff\xff\xff\xff",  # bytes claiming 4 GB
            b"\x81\xa1w\xc9\xff\xff\xff\xff\x01",  # an ext claiming 4 GB
            b"\x81\xdb\xff\xff\xff\xff\xc0",  # a key claiming 4 GB
        ],
    )


# -- spec, plan and rules files ----------------------------------------------------------------

NOT_JSON: list[bytes | str] = [
    "{",
    b"\xff\xfe{}",
    '{"a": ' + "[" * 20_000 + "]" * 20_000 + "}",
    '{"a": ' + "9" * 5000 + "}",
]


@case("spec")
def _spec_files_that_do_not_parse(d: Path) -> list[Path]:
    bodies: list[bytes | str] = [*NOT_JSON, "[]", '"x"', '{"a": {"shape": [1]}}']
    bodies += ['{"a": {"shape": [-1], "dtype": "F32"}}', '{"a": {"shape": [1], "dtype": "F128"}}']
    bodies += ['{"a": {"shape": [' + "1," * 64 + '1], "dtype": "F32"}}', '{"a": 1, "a": 2}']
    bodies += ['{"a": {"shape": [1], "dtype": "F32"}, "a": {"shape": [2], "dtype": "F32"}}']
    bodies += ['{"__metadata__": [1]}', '{"a": {"shape": "1", "dtype": "F32"}}']
    out = write_all(d, ".json", bodies)
    (d / "dir.json").mkdir()
    return [*out, d / "dir.json", d / "missing.json"]


PLAN = {"weightbridge_plan": 1, "source_fingerprint": "x"}
STEP = {"target": "a", "shape": [2], "dtype": "F32", "sources": ["a"]}


@case("plan")
def _plan_files_that_do_not_parse(d: Path) -> list[Path]:
    bodies: list[Any] = [*NOT_JSON, "[]", {"weightbridge_plan": 2}, {**PLAN, "steps": {}}]
    steps: list[Any] = [
        1,
        {"target": "a"},
        {**STEP, "shape": [-1]},
        {**STEP, "shape": "ab"},
        {**STEP, "shape": [1] * 65},
        {**STEP, "dtype": "F128"},
        {**STEP, "sources": []},
        {**STEP, "sources": "a"},
        {**STEP, "ops": {}},
        {**STEP, "ops": [1]},
        {**STEP, "ops": [{"op": "cast", "dtype": "F128"}]},
        {**STEP, "ops": [{"op": "permute", "axes": "ab"}]},
        {**STEP, "ops": [{"op": "nope"}]},
    ]
    bodies += [{**PLAN, "steps": [s]} for s in steps]
    bodies += [{**PLAN, "steps": [], "unused": [1]}]
    out = write_all(
        d, ".json", [b if isinstance(b, (str, bytes)) else json.dumps(b) for b in bodies]
    )
    (d / "dir.json").mkdir()
    return [*out, d / "dir.json", d / "missing.json"]


def _yaml_laughs(levels: int = 9) -> str:
    lines = ['l0: &l0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    lines.append(f"rename: [*l{levels - 1}]")
    return "\n".join(lines) + "\n"


@case("rules")
def _rules_files_that_do_not_parse(d: Path) -> list[Path]:
    bodies: list[Any] = [*NOT_JSON, "[]", '{"rename": 5}', '{"rename": "ab"}']
    bodies += ['{"rename": [["(", "x"]]}', '{"rename": [["a"]]}', '{"rename": [[1, 2]]}']
    bodies += ['{"rename": [], "rename": []}', '{"rules": 5}', '{"rules": [1]}']
    bodies += ['{"rules": [{"target": "("}]}', '{"rules": [{"target": "a", "bogus": 1}]}']
    bodies += ['{"rules": [{"target": "a", "ops": [{"op": "cast", "dtype": "F128"}]}]}']
    bodies += ['{"rules": [{"target": "a", "ops": [{"op": "nope"}]}]}']
    bodies += ['{"rules": [{"target": "a", "split": [0, 0, 0]}]}']
    bodies += ['{"rules": [{"target": "a", "split": [0, true, 2]}]}']
    bodies += ['{"rules": [{"target": "a", "source": 5}]}']
    out = write_all(d, ".json", bodies)
    yamls = [
        f"rename: !!python/object/apply:os.system [{touch_marker(d)!r}]\n",
        "rename: &a [*a]\n",
        _yaml_laughs(),
        "rename: [" * 5000,
        "- a\n- b\n",
        "rename:\n  - [a\n",
    ]
    out += [write(d, f"y{i}.yaml", y) for i, y in enumerate(yamls)]
    (d / "dir.json").mkdir()
    return [*out, d / "dir.json", d / "missing.json", write(d, "bad.json", b"\xff\xfe")]


# --------------------------------------------------------------------------------------------
# Running them.


@dataclass
class Built:
    case: Case
    dir: Path
    jobs: list[tuple[int, dict[str, Any]]]  # (index into the job list, job)


@pytest.fixture(scope="module")
def outcomes(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[Built, list[dict[str, Any]]]]:
    root = tmp_path_factory.mktemp("hostile")
    jobs: list[dict[str, Any]] = []
    built: dict[str, Built] = {}
    for c in CASES:
        d = root / c.id.replace(":", "-")
        d.mkdir()
        mine = []
        for path in c.build(d):
            for kind in ["reader", "auto"] if c.kind == "reader" and c.auto else [c.kind]:
                mine.append((len(jobs), {"kind": kind, "path": str(path), "module": c.module}))
                jobs.append(mine[-1][1])
        built[c.id] = Built(c, d, mine)
    results = run_jobs(jobs, root)
    return {cid: (b, [results[i] for i, _ in b.jobs]) for cid, b in built.items()}


def _params() -> list[Any]:
    return [pytest.param(c.id, id=c.id, marks=c.marks) for c in CASES]


@pytest.mark.parametrize("case_id", _params())
def test_hostile_input_is_refused_with_a_named_error(case_id: str, outcomes: Any) -> None:
    built, results = outcomes[case_id]
    expected = built.case.error or _DEFAULT_ERROR[built.case.kind]
    problems = []
    for (_, job), out in zip(built.jobs, results, strict=True):
        where = f"{job['kind']} {Path(job['path']).relative_to(built.dir)}"
        if out["status"] == "ok":
            if not built.case.bounded:
                problems.append(f"{where}: read without error")
            continue
        if out["status"] != "error":
            problems.append(f"{where}: {out['status']}\n{out.get('trace', '')}")
            continue
        if not out["wb"]:
            problems.append(f"{where}: {out['type']}: {out['message']}\n{out['trace']}")
            continue
        # Through format detection a broken file may also be one no format recognises.
        wanted = [expected, "UnknownFormatError"] if job["kind"] == "auto" else [expected]
        if not set(wanted) & set(out["classes"]):
            problems.append(f"{where}: {out['type']} instead of {expected}: {out['message']}")
        if str(built.dir) not in out["message"]:
            problems.append(f"{where}: message does not name the file: {out['message']}")
    assert not (built.dir / MARKER).exists(), "a payload ran"
    assert not problems, f"{len(problems)} of {len(results)} files:\n" + "\n".join(problems[:8])


def test_every_case_finishes_quickly(outcomes: Any) -> None:
    slow = [
        (cid, out["seconds"])
        for cid, (_, results) in outcomes.items()
        for out in results
        if out.get("seconds", 0) > 5
    ]
    assert not slow, slow


def test_the_child_really_is_capped(tmp_path: Path) -> None:
    """The cap is live: allocating past it fails in the child (and the host is not capped)."""
    jobs = [{"kind": "allocate", "path": str(n)} for n in (64 * MB, MEMORY_CAP)]
    small, large = run_jobs(jobs, tmp_path)
    assert small["status"] == "ok"
    assert large["status"] == "error" and large["type"] == "MemoryError"
    host = resource.getrlimit(resource.RLIMIT_DATA)[0]
    assert host == resource.RLIM_INFINITY or host > MEMORY_CAP


def test_payloads_are_live(tmp_path: Path) -> None:
    """The marker cases prove something: a plain unpickler does run these payloads."""
    pickle.loads(_payloads(tmp_path)[0])
    assert (tmp_path / MARKER).exists()
    (tmp_path / MARKER).unlink()
    evil = npy_of(np.array([RunsCommand(touch_marker(tmp_path))], dtype=object))
    np.load(io.BytesIO(evil), allow_pickle=True)
    assert (tmp_path / MARKER).exists()


def test_hostile_pickle_cannot_change_how_later_files_read(tmp_path: Path) -> None:
    """BUILD on a shared global (``torch.FloatStorage``) must not poison this process."""
    before = {k: repr(v) for k, v in ALLOWED.items()}
    state = pickle.dumps(("torch.FloatStorage", "F64"), protocol=2)[2:-1]
    evil = write(
        tmp_path, "evil.bin", torch_zip(b"\x80\x02ctorch\nFloatStorage\n" + state + b"b0}.")
    )
    with pytest.raises(Exception, match="sets the state"):
        TorchReader(str(evil))
    sizes = pickle.dumps((None, {"__defaults__": ((7,),)}), protocol=2)[2:-1]
    evil2 = write(tmp_path, "evil2.bin", torch_zip(b"\x80\x02ctorch\nSize\n" + sizes + b"b0}."))
    with pytest.raises(Exception, match="read-only"):
        TorchReader(str(evil2))
    assert {k: repr(v) for k, v in ALLOWED.items()} == before
    good = base_file(tmp_path, "good.bin", "torch")
    with TorchReader(str(good)) as r:
        assert r.specs()["a"].dtype == "F32"
        np.testing.assert_array_equal(r.read("a"), BASE_ARRAYS["a"])


def test_legacy_builder_matches_torch(tmp_path: Path) -> None:
    """The hand-built legacy files the cases cut up are what torch writes and reads."""
    torch = pytest.importorskip("torch")
    path = base_file(tmp_path, "m.pt", "legacy")
    loaded = torch.load(path, weights_only=True)
    for name, want in BASE_ARRAYS.items():
        np.testing.assert_array_equal(loaded[name].numpy(), want)
    with TorchReader(str(path)) as r:
        for name, want in BASE_ARRAYS.items():
            np.testing.assert_array_equal(r.read(name), want)
