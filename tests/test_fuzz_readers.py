"""Fuzzing every reader: a mutated checkpoint reads cleanly or fails with a `WeightbridgeError`.

hypothesis mutates small valid files (flips, overwrites and inserts bytes, deletes runs, plants
boundary integers, truncates) with a fixed budget and a fixed seed, and for each mutant opens
it with its format's reader and through format detection, then reads every tensor. Any other
exception, a hang, or an array whose shape or dtype differs from its spec is a bug. The JSON
inputs (spec, plan and rules files, sharded indexes) are also generated whole, as arbitrary
JSON values.

Each target runs in a child process under ``RLIMIT_DATA`` (this file, run as a script), so a
mutant that makes a reader allocate what it claims fails there instead of exhausting the host,
and a crash takes down only the child. The child leaves the falsifying file in its work
directory; copy it under ``tests/fixtures/hostile/<reader>/`` (named ``*-ok.*`` if it is valid
and should read), where `test_regression_corpus_replays_cleanly` replays every file on every run.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_hostile_inputs import (  # a sibling test module, for its builders and child
    BASE_ARRAYS,
    MEMORY_CAP,
    base_file,
    run_jobs,
    torch_zip,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs RLIMIT_DATA")

CORPUS = Path(__file__).parent / "fixtures" / "hostile"
TF_FIXTURES = Path(__file__).parent / "fixtures" / "tf"
# Examples per target: enough to reach every header field of these small files several times
# over, few enough that all targets together take well under a minute. A longer campaign:
# WEIGHTBRIDGE_FUZZ_EXAMPLES=20000 WEIGHTBRIDGE_FUZZ_SEED=7 pytest tests/test_fuzz_readers.py
EXAMPLES = int(os.environ.get("WEIGHTBRIDGE_FUZZ_EXAMPLES", "300"))
SEED = os.environ.get("WEIGHTBRIDGE_FUZZ_SEED")  # unset: hypothesis's fixed derandomized seed
# Per example: reading a mutant of a few KB takes milliseconds.
EXAMPLE_TIMEOUT = 10
# Boundary values planted as 4- or 8-byte little-endian integers: where lengths and offsets
# overflow, go negative or claim the whole address space.
INTERESTING = [0, 1, 7, 0x7F, 0x80, 0xFF, 0xFFFF, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1, 2**63]
INTERESTING += [2**64 - 1, 2**40]

# target -> (reader module, file name of the mutant)
TARGETS: dict[str, tuple[str, str]] = {
    "safetensors": ("safetensors", "m.safetensors"),
    "npy": ("numpy", "m.npy"),
    "npz": ("numpy", "m.npz"),
    "npz-compressed": ("numpy", "m.npz"),
    "npz-ours": ("numpy", "m.npz"),
    "torch-zip": ("torch", "m.bin"),
    "torch-legacy": ("torch", "m.pt"),
    "torch-pickle": ("torch", "m.bin"),  # data.pkl mutated, then zipped with a matching CRC
    "sharded": ("sharded", "model.safetensors.index.json"),
    "hdf5": ("hdf5", "m.h5"),
    "tfcheckpoint": ("tfcheckpoint", "model.ckpt.index"),
    "msgpack": ("msgpack", "m.msgpack"),
}


# --------------------------------------------------------------------------------------------
# The child side: hypothesis properties, run by `main` under the memory cap.


class _Timeout(BaseException):
    pass


def _alarm(*_: Any) -> None:
    raise _Timeout()


def _base(target: str, work: Path) -> bytes:
    """The valid file this target mutates (shards and data files go beside it in `work`)."""
    from weightbridge.io import write_checkpoint

    seed = work / "seed"
    seed.mkdir(exist_ok=True)
    if target == "sharded":
        write_checkpoint(str(work / "s1.safetensors"), {"a": BASE_ARRAYS["a"]})
        write_checkpoint(str(work / "s2.safetensors"), {"b": BASE_ARRAYS["b"]})
        index = {"metadata": {"total_size": 48}, "weight_map": {"a": "s1.safetensors"}}
        index["weight_map"]["b"] = "s2.safetensors"
        return json.dumps(index).encode()
    if target == "torch-pickle":
        from weightbridge.io._torchzip import encode_pickle
        from weightbridge.spec import TensorSpec

        specs = [TensorSpec("a", (2, 3), "F32"), TensorSpec("h", (4,), "BF16")]
        return encode_pickle([*specs, TensorSpec("u", (3,), "U16")])
    if target == "tfcheckpoint":
        data = (TF_FIXTURES / "saver" / "model.ckpt.data-00000-of-00001").read_bytes()
        (work / "model.ckpt.data-00000-of-00001").write_bytes(data)
        return (TF_FIXTURES / "saver" / "model.ckpt.index").read_bytes()
    if target == "msgpack":
        write_checkpoint(str(seed / "m.msgpack"), BASE_ARRAYS, format="msgpack")
        return (seed / "m.msgpack").read_bytes()
    fmt = {
        "safetensors": ("m.safetensors", "safetensors"),
        "npy": ("m.npy", "npy"),
        "npz": ("m.npz", "numpy"),
        "npz-compressed": ("m.npz", "npz-compressed"),
        "torch-zip": ("m.bin", "torch"),
        "torch-legacy": ("m.pt", "legacy"),
        "hdf5": ("m.h5", "h5"),
    }
    if target == "npz-ours":
        import ml_dtypes
        import numpy as np

        arrays = {**BASE_ARRAYS, "h": np.arange(4).astype(ml_dtypes.bfloat16)}
        write_checkpoint(str(seed / "o.npz"), arrays, metadata={"k": "v"})
        return (seed / "o.npz").read_bytes()
    name, kind = fmt[target]
    return base_file(seed, name, kind).read_bytes()


def mutate(data: bytes, mutations: list[tuple[Any, ...]]) -> bytes:
    out = bytearray(data)
    for m in mutations:
        kind, pos = m[0], m[1] % (len(out) + 1)
        if kind == "flip" and pos < len(out):
            out[pos] ^= 1 << m[2]
        elif kind == "set" and pos < len(out):
            out[pos] = m[2]
        elif kind == "insert":
            out[pos:pos] = m[2]
        elif kind == "delete":
            del out[pos : pos + m[2]]
        elif kind == "int":
            width, value = m[2], m[3] % (1 << (8 * m[2]))
            out[pos : pos + width] = value.to_bytes(width, "little")
        elif kind == "truncate":
            del out[pos:]
    return bytes(out)


def _read_all(reader: Any) -> None:
    """Open, then read every tensor; an array must match its spec."""
    import numpy as np

    from weightbridge import dtypes

    try:
        for spec in reader.specs():
            arr = np.asarray(reader.read(spec.name))
            assert arr.shape == spec.shape, (spec, arr.shape)
            assert arr.dtype == dtypes.to_numpy(spec.dtype), (spec, arr.dtype)
            if arr.nbytes <= 64 << 20:  # touch every mapped page (a page past EOF is SIGBUS)
                arr.tobytes()
            reader.byte_range(spec.name)
            reader.release(spec.name)
    finally:
        reader.close()


def check_file(path: Path, module: str) -> None:
    """The property: both ways of opening `path` end in success or a WeightbridgeError."""
    import importlib

    from weightbridge.errors import WeightbridgeError
    from weightbridge.io import open_reader

    for opener in (importlib.import_module(f"weightbridge.io.{module}").open_reader, open_reader):
        signal.setitimer(signal.ITIMER_REAL, EXAMPLE_TIMEOUT)
        try:
            _read_all(opener(str(path)))
        except WeightbridgeError:
            pass
        except _Timeout:
            raise AssertionError(f"{opener.__module__}.open_reader hung on {path}") from None
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)


def _json_values() -> Any:
    from hypothesis import strategies as st

    names = st.sampled_from(
        ["a", "b", "w", "__metadata__", "weight_map", "metadata", "shape", "dtype", "rename"]
        + ["rules", "target", "source", "ops", "op", "steps", "sources", "weightbridge_plan"]
        + ["s1.safetensors", "../s1.safetensors", "/etc/passwd", "model.safetensors.index.json"]
    )
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True),
        names,
        st.text(max_size=8),
    )
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(names, inner, max_size=5),
        max_leaves=20,
    )


def fuzz(target: str, work: Path) -> None:
    """Run the hypothesis property for `target`; raises with the falsifying example."""
    from hypothesis import HealthCheck, given, seed, settings
    from hypothesis import strategies as st

    pos = st.integers(min_value=0, max_value=2**20)
    mutation = st.one_of(
        st.tuples(st.just("flip"), pos, st.integers(0, 7)),
        st.tuples(st.just("set"), pos, st.integers(0, 255)),
        st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("delete"), pos, st.integers(1, 64)),
        st.tuples(st.just("int"), pos, st.sampled_from([4, 8]), st.sampled_from(INTERESTING)),
        st.tuples(st.just("truncate"), pos),
    )
    fixed = settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=SEED is None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )

    def config(test: Callable[..., None]) -> Callable[..., None]:
        return fixed(test) if SEED is None else seed(int(SEED))(fixed(test))

    signal.signal(signal.SIGALRM, _alarm)

    if target == "json":
        files: list[tuple[str, Callable[[str], Any]]] = []
        from weightbridge.errors import WeightbridgeError
        from weightbridge.plan import Plan
        from weightbridge.planning.rulesfile import load_renames, load_transforms
        from weightbridge.spec import load_spec_file

        files = [
            ("spec.json", load_spec_file),
            ("plan.json", Plan.load),
            ("rules.json", load_renames),
            ("rules.json", load_transforms),
        ]

        @config
        @given(_json_values(), st.sampled_from(range(len(files))))
        def json_property(value: Any, which: int) -> None:
            name, load = files[which]
            path = work / name
            path.write_text(json.dumps(value))
            try:
                load(str(path))
            except WeightbridgeError:
                pass

        json_property()
        return

    module, name = TARGETS[target]
    base = _base(target, work)
    path = work / name

    def wrap(data: bytes) -> bytes:
        if target != "torch-pickle":
            return data
        # A mutated pickle inside a valid zip: mutating the zip would mostly break its CRC.
        storages = {"0": b"\1" * 24, "1": b"\2" * 8, "2": b"\3" * 6}
        return torch_zip(data, storages)

    @config
    @given(st.lists(mutation, min_size=1, max_size=4))
    def property(mutations: list[tuple[Any, ...]]) -> None:
        path.write_bytes(wrap(mutate(base, mutations)))
        check_file(path, module)

    property()
    if target == "sharded":  # whole indexes, not just mutated ones

        @config
        @given(_json_values())
        def index_property(value: Any) -> None:
            path.write_text(json.dumps({"weight_map": value} if isinstance(value, dict) else value))
            check_file(path, module)

        index_property()


def main() -> None:
    target, work = sys.argv[1], Path(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_DATA, (MEMORY_CAP, MEMORY_CAP))
    fuzz(target, work)


# --------------------------------------------------------------------------------------------
# The pytest side.


ALL_TARGETS = [*TARGETS, "json"]


def _run_target(script: str, target: str, work: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, script, target, str(work)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )


def start_fuzzing(script: str, targets: list[str], root: Path) -> dict[str, Any]:
    """Run `python script TARGET WORKDIR` for every target, all at once (one per CPU): each
    is one process, so they overlap. Returns {target: (its work dir, future of the run)}."""
    pool = ThreadPoolExecutor(max_workers=min(len(targets), os.cpu_count() or 2))
    runs = {}
    for target in targets:
        (root / target).mkdir()
        runs[target] = (root / target, pool.submit(_run_target, script, target, root / target))
    pool.shutdown(wait=False)
    return runs


@pytest.fixture(scope="module")
def fuzzing(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return start_fuzzing(__file__, ALL_TARGETS, tmp_path_factory.mktemp("fuzz"))


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_mutated_files_read_or_fail_with_a_named_error(target: str, fuzzing: Any) -> None:
    work, future = fuzzing[target]
    proc = future.result()
    assert proc.returncode == 0, (
        f"fuzzing {target} failed (exit {proc.returncode}); the falsifying file is left in "
        f"{work}:\n{proc.stderr[-6000:]}"
    )


def _corpus() -> list[Path]:
    if not CORPUS.is_dir():
        return []
    return [p for p in sorted(CORPUS.rglob("*")) if p.is_file() and p.parent != CORPUS]


def _corpus_jobs(path: Path) -> list[dict[str, Any]]:
    kind = path.relative_to(CORPUS).parts[0]  # the reader (or loader) the file once crashed
    if kind in ("spec", "plan", "rules"):
        return [{"kind": kind, "path": str(path)}]
    module = f"weightbridge.io.{kind}"
    return [
        {"kind": "reader", "path": str(path), "module": module},
        {"kind": "auto", "path": str(path)},
    ]


@pytest.fixture(scope="module")
def replayed(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, list[Any]]:
    """Every corpus file through its reader and format detection, in one capped child."""
    jobs = [(path, job) for path in _corpus() for job in _corpus_jobs(path)]
    results = run_jobs([job for _, job in jobs], tmp_path_factory.mktemp("corpus"))
    out: dict[Path, list[Any]] = {}
    for (path, job), result in zip(jobs, results, strict=True):
        out.setdefault(path, []).append((job, result))
    return out


@pytest.mark.parametrize("path", _corpus(), ids=lambda p: str(p.relative_to(CORPUS)))
def test_regression_corpus_replays_cleanly(path: Path, replayed: dict[Path, Any]) -> None:
    """Every file that once crashed or hung a reader now fails with a WeightbridgeError.

    Files named ``*-ok.*`` are valid (if odd) and may read; the rest must be refused.
    """
    for job, out in replayed[path]:
        allowed = ("ok", "error") if path.stem.endswith("-ok") else ("error",)
        assert out["status"] in allowed, (job, out)
        if out["status"] == "error":
            assert out["wb"], f"{job}: {out['type']}: {out['message']}\n{out['trace']}"
            assert str(path) in out["message"], out["message"]
        assert out["seconds"] < 5, (job, out["seconds"])


if __name__ == "__main__":
    main()
