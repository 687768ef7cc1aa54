"""Every format passes the same suite: round trips, reference libraries, maps, truncation.

A format joins by adding one `FormatCase` to `CASES`: how to save and load with its reference
library, which dtypes that library handles, and whether `read` can return memory maps. Every
format with a writer is here; the reference-library tests skip when that library is absent.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import h5py
import ml_dtypes
import numpy as np
import pytest
from helpers import is_memory_map
from safetensors.numpy import load_file, save_file

from weightbridge import dtypes
from weightbridge.errors import FormatError
from weightbridge.io import detect_format, open_reader, writer_class
from weightbridge.spec import TensorSpec

# Dtypes plain numpy has; bfloat16 and fp8 come from ml_dtypes and most libraries lack them.
NATIVE = tuple(c for c in dtypes.CODES if c not in ("BF16", "F8_E4M3", "F8_E5M2"))

Arrays = dict[str, np.ndarray]


def _st_save(path: str, arrays: Arrays) -> None:
    save_file(arrays, path)


def _np_save(path: str, arrays: Arrays) -> None:
    np.savez(path, **arrays)


def _np_load(path: str) -> Arrays:
    with np.load(path, allow_pickle=False) as z:
        return {name: z[name] for name in z.files}


def _h5_save(path: str, arrays: Arrays) -> None:
    with h5py.File(path, "w") as f:
        for name, a in arrays.items():
            f.create_dataset(name, data=a)


def _h5_load(path: str) -> Arrays:
    out: Arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda name, obj: (
                out.__setitem__(name, np.asarray(obj[()]))
                if isinstance(obj, h5py.Dataset)
                else None
            )
        )
    return out


def _torch_save(path: str, arrays: Arrays) -> None:
    import torch

    torch.save({k: torch.from_numpy(a.copy()) for k, a in arrays.items()}, path)


def _torch_load(path: str) -> Arrays:
    import torch

    return {k: t.numpy() for k, t in torch.load(path, weights_only=True).items()}


def _flax_save(path: str, arrays: Arrays) -> None:
    from flax import serialization

    from weightbridge._tree import unflatten

    with open(path, "wb") as f:
        f.write(serialization.msgpack_serialize(unflatten(arrays)))


def _flax_load(path: str) -> Arrays:
    from flax import serialization

    from weightbridge._tree import flatten

    with open(path, "rb") as f:
        return {
            k: np.asarray(v) for k, v in flatten(serialization.msgpack_restore(f.read())).items()
        }


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@dataclass(frozen=True)
class FormatCase:
    """What the conformance suite needs to know about one format."""

    format: str  # output format name for `writer_class`
    registry: str  # what `detect_format` answers for its files
    suffix: str
    save: Callable[[str, Arrays], None]  # the reference library's writer
    load: Callable[[str], Arrays]  # the reference library's reader
    saves: tuple[str, ...]  # dtypes the reference writes so that we can read them back
    loads: tuple[str, ...]  # dtypes of ours the reference reads (compared as raw bytes)
    maps: bool = True  # `read` returns memory maps of the file
    metadata: bool = True  # the file keeps string metadata (a torch state dict has no place)
    reference: str = ""  # the module the reference library needs ("" when always installed)


CASES = [
    FormatCase(
        "safetensors",
        "safetensors",
        ".safetensors",
        _st_save,
        load_file,
        saves=NATIVE + ("BF16",),
        loads=NATIVE + ("BF16",),
    ),
    FormatCase("npz", "numpy", ".npz", _np_save, _np_load, saves=NATIVE, loads=dtypes.CODES),
    FormatCase("h5", "hdf5", ".h5", _h5_save, _h5_load, saves=NATIVE, loads=dtypes.CODES),
    FormatCase(
        "torch",
        "torch",
        ".bin",
        _torch_save,
        _torch_load,
        saves=NATIVE,
        loads=NATIVE,
        metadata=False,
        reference="torch",
    ),
    FormatCase(
        "msgpack",
        "msgpack",
        ".msgpack",
        _flax_save,
        _flax_load,
        saves=NATIVE,
        loads=NATIVE,
        reference="flax",
    ),
]


@pytest.fixture(params=CASES, ids=[c.format for c in CASES])
def case(request: pytest.FixtureRequest) -> FormatCase:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def reference(case: FormatCase) -> FormatCase:
    """`case`, for a test that needs its reference library: skipped when that is absent."""
    if case.reference and not _installed(case.reference):
        pytest.skip(f"{case.reference} is not installed")
    return case


def random_array(code: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random bits of `code` (NaN payloads included), so bit-exactness is really tested."""
    dt = dtypes.to_numpy(code)
    n = int(np.prod(shape))
    if code == "BOOL":
        return rng.integers(0, 2, shape).astype(bool)
    return np.frombuffer(rng.bytes(n * dt.itemsize), dtype=dt).reshape(shape).copy()


def sample(codes: tuple[str, ...] = dtypes.CODES, seed: int = 0) -> Arrays:
    """One 7x3 tensor per dtype plus the awkward cases, under names with dots and slashes."""
    rng = np.random.default_rng(seed)
    out = {
        f"blocks.{i}/{code.lower()}.weight": random_array(code, (7, 3), rng)
        for i, code in enumerate(codes)
    }
    out["step"] = np.array(12, dtype=np.int64)
    out["scale"] = random_array(codes[-1], (), rng)
    out["empty.bias"] = np.zeros((0,), dtype=np.float32)
    out["head/no_cols"] = np.zeros((3, 0), dtype=dtypes.to_numpy(codes[0]))
    out["head/vector.bias"] = random_array("F32", (5,), rng)
    return out


def write_tiled(
    case: FormatCase, path: str, arrays: Arrays, meta: dict[str, str] | None = None, rows: int = 2
) -> None:
    specs = [TensorSpec(k, a.shape, dtypes.from_numpy(a.dtype)) for k, a in arrays.items()]
    w = writer_class(case.format)(path, specs, meta)
    try:
        for name, a in arrays.items():
            if a.ndim == 0 or a.size == 0:
                w.write(name, a, 0)
                continue
            for r in range(0, a.shape[0], rows):
                w.write(name, a[r : r + rows], r)
        w.close()
    except BaseException:
        w.abort()
        raise


def assert_same(got: np.ndarray, want: np.ndarray, name: str) -> None:
    assert got.shape == want.shape, name
    assert got.tobytes() == want.tobytes(), name


def test_round_trip_every_dtype_bit_exact(case: FormatCase, tmp_path) -> None:
    arrays = sample()
    path = str(tmp_path / f"m{case.suffix}")
    meta = {"format": "pt", "note": "ünïcode ✓"}
    write_tiled(case, path, arrays, meta)
    assert detect_format(path) == case.registry
    with open_reader(path) as r:
        spec = r.specs()
        assert spec.names == list(arrays)
        assert dict(spec.metadata) == (meta if case.metadata else {})
        for name, want in arrays.items():
            assert spec[name].dtype == dtypes.from_numpy(want.dtype)
            got = r.read(name)
            assert got.dtype == want.dtype, name
            assert_same(got, want, name)


def test_reference_library_reads_what_we_write(reference: FormatCase, tmp_path) -> None:
    case = reference
    arrays = sample(case.loads)
    path = str(tmp_path / f"m{case.suffix}")
    write_tiled(case, path, arrays, rows=3)
    back = case.load(path)
    assert set(back) == set(arrays)
    for name, want in arrays.items():
        assert_same(back[name], want, name)


def test_we_read_what_the_reference_library_writes(reference: FormatCase, tmp_path) -> None:
    case = reference
    arrays = sample(case.saves, seed=1)
    path = str(tmp_path / f"ref{case.suffix}")
    case.save(path, arrays)
    assert detect_format(path) == case.registry
    with open_reader(path) as r:
        assert set(r.specs().names) == set(arrays)
        for name, want in arrays.items():
            got = r.read(name)
            assert got.dtype == want.dtype, name
            assert_same(got, want, name)


def test_read_returns_read_only_memory_maps(case: FormatCase, tmp_path) -> None:
    arrays = sample()
    path = str(tmp_path / f"m{case.suffix}")
    write_tiled(case, path, arrays)
    with open_reader(path) as r:
        for name, want in arrays.items():
            got = r.read(name)
            # Zero-size arrays hold nothing to protect (MappedFile hands out writable empties).
            assert not got.flags.writeable or not got.size, name
            if want.size and case.maps:
                assert not got.flags.owndata and is_memory_map(got), name
                brange = r.byte_range(name)
                assert brange is not None and brange.length == want.nbytes
                with open(brange.path, "rb") as f:
                    f.seek(brange.offset)
                    assert f.read(brange.length) == want.tobytes(), name
            r.release(name)


@pytest.mark.parametrize("keep", [0.5, -1, 20])
def test_truncated_file_is_a_format_error_naming_it(
    case: FormatCase, tmp_path, keep: float
) -> None:
    arrays = sample(("F32", "BF16"))
    full = str(tmp_path / f"full{case.suffix}")
    write_tiled(case, full, arrays)
    with open(full, "rb") as f:
        data = f.read()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    path = str(tmp_path / f"cut{case.suffix}")
    with open(path, "wb") as f:
        f.write(data[:cut])
    with pytest.raises(FormatError) as info, open_reader(path, format=case.registry) as r:
        for name in r.specs().names:
            r.read(name)
    assert path in str(info.value)


def test_writer_refuses_to_close_incomplete(case: FormatCase, tmp_path) -> None:
    a = np.arange(12, dtype=np.float32).reshape(4, 3)
    specs = [TensorSpec("a", a.shape, "F32"), TensorSpec("b", (2,), "BF16")]
    w = writer_class(case.format)(str(tmp_path / f"half{case.suffix}"), specs)
    w.write("a", a[:2], 0)
    with pytest.raises(FormatError, match="'a'"):
        w.close()
    w.abort()
    w = writer_class(case.format)(str(tmp_path / f"missing{case.suffix}"), specs)
    w.write("a", a, 0)
    with pytest.raises(FormatError, match="'b'"):
        w.close()
    w.abort()


def test_writer_refuses_tensors_out_of_declared_order(case: FormatCase, tmp_path) -> None:
    specs = [TensorSpec("a", (2,), "F32"), TensorSpec("b", (2,), "F32")]
    w = writer_class(case.format)(str(tmp_path / f"order{case.suffix}"), specs)
    with pytest.raises(FormatError, match="expected tensor 'a'"):
        w.write("b", np.zeros(2, np.float32), 0)
    w.abort()


def test_bf16_reads_back_as_bfloat16(case: FormatCase, tmp_path) -> None:
    """Whatever a format stores bfloat16 as, it reads back as ml_dtypes.bfloat16."""
    arrays = {"w": np.linspace(-2, 2, 6, dtype=np.float32).astype(ml_dtypes.bfloat16)}
    path = str(tmp_path / f"bf{case.suffix}")
    write_tiled(case, path, arrays)
    with open_reader(path) as r:
        assert r.specs()["w"].dtype == "BF16"
        got = r.read("w")
        assert got.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(got.astype(np.float32), arrays["w"].astype(np.float32))
