"""HDF5: generic files, Keras 2 and Keras 3 layouts built by hand with h5py, and our writer."""

from __future__ import annotations

import doctest
import json
import zipfile

import h5py
import ml_dtypes
import numpy as np
import pytest

import weightbridge.io.hdf5 as h5io
from weightbridge.errors import FormatError
from weightbridge.io import detect_format, open_reader, write_checkpoint
from weightbridge.spec import TensorSpec


def test_module_docstring_examples() -> None:
    result = doctest.testmod(h5io)
    assert result.attempted > 0 and result.failed == 0


def keras2(path) -> dict[str, np.ndarray]:
    """A Keras 2 `model.save('m.h5')` layout: layer and weight order live in attributes."""
    rng = np.random.default_rng(0)
    layers = {
        "conv": {"kernel:0": (3, 3, 1, 4), "bias:0": (4,)},
        "bn": {"gamma:0": (4,), "beta:0": (4,), "moving_mean:0": (4,)},
        "dense": {"kernel:0": (4, 2), "bias:0": (2,)},
    }
    want = {}
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = b"2.13.1"
        f.attrs["backend"] = b"tensorflow"
        f.attrs["model_config"] = json.dumps({"class_name": "Sequential"}).encode()
        mw = f.create_group("model_weights")
        mw.attrs["layer_names"] = np.array([n.encode() for n in layers])
        mw.attrs["backend"] = b"tensorflow"
        for layer, weights in layers.items():
            g = mw.create_group(layer)
            g.attrs["weight_names"] = np.array([f"{layer}/{w}".encode() for w in weights])
            for w, shape in weights.items():
                data = rng.standard_normal(shape).astype(np.float32)
                g.create_dataset(f"{layer}/{w}", data=data)
                want[f"model_weights/{layer}/{layer}/{w}"] = data
        opt = f.create_group("optimizer_weights")
        opt.attrs["weight_names"] = np.array([b"Adam/iter:0"])
        opt.create_dataset("Adam/iter:0", data=np.int64(7))
        want["optimizer_weights/Adam/iter:0"] = np.array(7, dtype=np.int64)
    return want


def keras3(path) -> dict[str, np.ndarray]:
    """A Keras 3 `.weights.h5` layout: numbered vars under each layer's path."""
    rng = np.random.default_rng(1)
    want = {}
    with h5py.File(path, "w") as f:
        f.create_group("vars")  # the model's own (empty) variable group
        for layer in ("dense", "dense_1", "dense_2", "dense_10"):
            for i in range(12 if layer == "dense" else 2):
                data = rng.standard_normal((3, i + 1)).astype(np.float32)
                f.create_dataset(f"layers/{layer}/vars/{i}", data=data)
                want[f"layers/{layer}/vars/{i}"] = data
    return want


def test_keras2_names_follow_layer_and_weight_names_attributes(tmp_path) -> None:
    want = keras2(tmp_path / "model.h5")
    assert detect_format(tmp_path / "model.h5") == "hdf5"
    with open_reader(tmp_path / "model.h5") as r:
        spec = r.specs()
        assert spec.names == list(want)  # definition order, not HDF5's alphabetical order
        assert spec.metadata["keras_version"] == "2.13.1"
        assert json.loads(spec.metadata["model_config"]) == {"class_name": "Sequential"}
        for name, data in want.items():
            got = r.read(name)
            np.testing.assert_array_equal(got, data)
            assert not got.flags.writeable
            if data.size > 1:
                assert not got.flags.owndata  # contiguous: a map, not a copy


def test_keras3_vars_sort_naturally(tmp_path) -> None:
    want = keras3(tmp_path / "model.weights.h5")
    assert detect_format(tmp_path / "model.weights.h5") == "hdf5"
    with open_reader(tmp_path / "model.weights.h5") as r:
        names = r.specs().names
        assert names == sorted(want, key=h5io._natural)
        assert names.index("layers/dense/vars/2") < names.index("layers/dense/vars/10")
        assert names.index("layers/dense_2/vars/0") < names.index("layers/dense_10/vars/0")
        for name, data in want.items():
            np.testing.assert_array_equal(r.read(name), data)


@pytest.mark.parametrize("compress", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_keras_archive_is_read_in_place(tmp_path, compress: int) -> None:
    want = keras3(tmp_path / "model.weights.h5")
    archive = tmp_path / "model.keras"
    with zipfile.ZipFile(archive, "w", compress) as zf:
        zf.writestr("metadata.json", json.dumps({"keras_version": "3.3.3"}))
        zf.writestr("config.json", json.dumps({"class_name": "Sequential"}))
        zf.write(tmp_path / "model.weights.h5", "model.weights.h5")
    assert detect_format(archive) == "hdf5"
    with open_reader(archive) as r:
        assert set(r.specs().names) == set(want)
        for name, data in want.items():
            got = r.read(name)
            np.testing.assert_array_equal(got, data)
            brange = r.byte_range(name)
            if compress == zipfile.ZIP_STORED:
                assert not got.flags.owndata and brange is not None
                with open(archive, "rb") as f:
                    f.seek(brange.offset)
                    assert f.read(brange.length) == data.tobytes()
            else:
                assert brange is None


def test_a_zip_without_weights_is_not_a_keras_archive(tmp_path) -> None:
    path = tmp_path / "other.keras"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("config.json", "{}")
    with open(path, "rb") as f:
        assert not h5io.detect(str(path), f.read(64))
    with pytest.raises(FormatError, match=r"not a Keras archive: it has no 'model.weights.h5'"):
        open_reader(path, format="hdf5")


def test_layouts_h5py_cannot_map_are_read_as_copies(tmp_path) -> None:
    path = tmp_path / "mixed.h5"
    data = np.arange(60, dtype=np.float32).reshape(6, 10)
    with h5py.File(path, "w") as f:
        f.create_dataset("chunked", data=data, chunks=(2, 5), compression="gzip")
        f.create_dataset("big_endian", data=data.astype(">f8"))
        f.create_dataset("never_written", shape=(3,), dtype=np.int32)
        f.create_dataset("flag", data=np.array([True, False]))
        f.create_dataset("z", data=np.array([1 + 2j], np.complex64))
        f.create_dataset("words", data=np.array([b"a", b"bc"]))
        f.create_dataset("nothing", data=h5py.Empty("f4"))
        f["soft"] = h5py.SoftLink("/chunked")
        # 12 significant bits at bit offset 2 of each int16: h5py converts, raw bytes differ.
        narrow = h5py.h5t.STD_I16LE.copy()
        narrow.set_precision(12)
        narrow.set_offset(2)
        ds = h5py.Dataset(h5py.h5d.create(f.id, b"narrow", narrow, h5py.h5s.create_simple((3,))))
        ds[...] = np.array([1, -2, 300], np.int16)
    with open_reader(path) as r:
        spec = r.specs()
        assert spec.names == ["big_endian", "chunked", "flag", "narrow", "never_written", "z"]
        assert spec["big_endian"].dtype == "F64" and spec["flag"].dtype == "BOOL"
        assert r.skipped == {
            "nothing": "empty dataspace (no shape)",
            "words": "not numeric (dtype |S2)",
        }
        for name in ("chunked", "big_endian"):
            got = r.read(name)
            np.testing.assert_array_equal(got, data)
            assert got.dtype.isnative and not got.flags.writeable
            assert r.byte_range(name) is None
        assert r.read("narrow").tolist() == [1, -2, 300] and r.byte_range("narrow") is None
        assert r.read("never_written").tolist() == [0, 0, 0]
        assert r.read("flag").tolist() == [True, False]
        assert r.read("z").tolist() == [1 + 2j]
        assert r.byte_range("flag") is not None


def test_a_user_block_turns_mapping_off(tmp_path) -> None:
    path = tmp_path / "ub.h5"
    with h5py.File(path, "w", userblock_size=512) as f:
        f.create_dataset("w", data=np.arange(4.0))
    with open(path, "rb") as f:
        assert not h5io.detect(str(path), f.read(64))  # the signature is at 512, not 0
    with open_reader(path, format="hdf5") as r:
        np.testing.assert_array_equal(r.read("w"), np.arange(4.0))
        assert r.byte_range("w") is None


def test_opaque_bf16_from_h5py_needs_the_attribute(tmp_path) -> None:
    path = tmp_path / "bf.h5"
    want = np.array([1.5, -3.0], dtype=ml_dtypes.bfloat16)
    with h5py.File(path, "w") as f:
        f.create_dataset("emb", data=want)  # h5py stores it as opaque 2-byte values
    with pytest.raises(FormatError) as info:
        open_reader(path)
    msg = str(info.value)
    assert f"{path}: tensor 'emb': dtype |V2 is opaque 2-byte values" in msg
    assert "attrs['weightbridge_dtype'] = 'BF16'" in msg
    with h5py.File(path, "a") as f:
        f["emb"].attrs["weightbridge_dtype"] = "BF16"
    with open_reader(path) as r:
        got = r.read("emb")
        assert got.dtype == ml_dtypes.bfloat16 and got.tobytes() == want.tobytes()


@pytest.mark.parametrize(
    "data,attr,message",
    [
        (np.zeros(2, np.float32), "BF16", "says BF16, but the dataset holds float32"),
        (np.zeros(2, np.uint8), "BF16", "says BF16, but the dataset holds uint8"),
        (np.zeros(2, np.uint16), "Q7", "attribute weightbridge_dtype='Q7': unknown dtype"),
    ],
)
def test_a_wrong_dtype_attribute_is_refused(tmp_path, data, attr, message) -> None:
    path = tmp_path / "a.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("w", data=data).attrs["weightbridge_dtype"] = attr
    with pytest.raises(FormatError, match=message) as info:
        open_reader(path)
    assert f"{path}: tensor 'w'" in str(info.value)


def test_writer_declares_contiguous_datasets_in_order_with_metadata(tmp_path) -> None:
    arrays = {
        "encoder/layer.0/kernel:0": np.arange(12, dtype=np.float32).reshape(3, 4),
        "encoder/layer.0/bias:0": np.arange(4, dtype=ml_dtypes.bfloat16),
        "decoder/scale": np.array(0.5, dtype=ml_dtypes.float8_e4m3fn),
        "step": np.array(3, dtype=np.int64),
    }
    path = str(tmp_path / "w.h5")
    write_checkpoint(path, arrays, format="h5", metadata={"source": "test"})
    with h5py.File(path, "r") as f:
        assert f.attrs["source"] == "test"
        for name, want in arrays.items():
            ds = f[name]
            assert ds.chunks is None and ds.compression is None
            assert ds.id.get_create_plist().get_layout() == h5py.h5d.CONTIGUOUS
            assert ds[()].tobytes() == want.tobytes()
        assert f["encoder/layer.0/bias:0"].dtype == np.uint16
        assert f["encoder/layer.0/bias:0"].attrs["weightbridge_dtype"] == "BF16"
        assert f["decoder/scale"].attrs["weightbridge_dtype"] == "F8_E4M3"
    with open_reader(path) as r:
        assert r.specs().names == list(arrays)


@pytest.mark.parametrize(
    "names,message",
    [
        (["/abs"], "cannot be an HDF5 path"),
        (["a//b"], "cannot be an HDF5 path"),
        (["a/./b"], "cannot be an HDF5 path"),
        (["a/"], "cannot be an HDF5 path"),
        (["a\0b"], "cannot be an HDF5 path"),
        (["a/b", "a"], r"tensor 'a' would also have to be the HDF5 group holding 'a/b'"),
        (["x", "x"], "declared twice"),
    ],
)
def test_writer_refuses_names_that_would_not_read_back(tmp_path, names, message) -> None:
    path = tmp_path / "n.h5"
    with pytest.raises(FormatError, match=message):
        h5io.HDF5Writer(str(path), [TensorSpec(n, (1,), "F32") for n in names])
    assert not path.exists()  # refused before creating anything


def test_writer_checks_tiles_and_completeness(tmp_path) -> None:
    specs = [TensorSpec("a", (4, 2), "F32"), TensorSpec("b", (0,), "F32")]
    w = h5io.HDF5Writer(str(tmp_path / "t.h5"), specs)
    w.write("a", np.zeros((2, 2), np.float32), 0)
    with pytest.raises(FormatError, match="tile starts at row 3, but the 2 rows"):
        w.write("a", np.zeros((1, 2), np.float32), 3)
    with pytest.raises(FormatError, match=r"'a' \(2 of 4 rows\)"):
        w.close()
    w.abort()
    w.abort()
    w = h5io.HDF5Writer(str(tmp_path / "t.h5"), specs)
    w.write("a", np.ones((4, 2), np.float32), 0)
    w.close()  # 'b' has no bytes: it needs no tile
    with open_reader(tmp_path / "t.h5") as r:
        assert r.read("a").tolist() == [[1.0, 1.0]] * 4 and r.read("b").shape == (0,)


def test_truncated_or_foreign_files_are_format_errors(tmp_path) -> None:
    path = tmp_path / "full.h5"
    write_checkpoint(str(path), {"w": np.arange(1000.0)}, format="h5")
    data = path.read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match=r"cut.h5: HDF5 cannot open it .*truncated"):
        open_reader(tmp_path / "cut.h5", format="hdf5")
    (tmp_path / "text.h5").write_bytes(b"hello, not hdf5")
    with pytest.raises(FormatError, match=r"text.h5: HDF5 cannot open it"):
        open_reader(tmp_path / "text.h5", format="hdf5")
    with pytest.raises(FormatError, match="file not found"):
        open_reader(tmp_path / "gone.h5", format="hdf5")


def test_truncated_keras_archives_are_format_errors(tmp_path) -> None:
    keras3(tmp_path / "model.weights.h5")
    weights = (tmp_path / "model.weights.h5").read_bytes()
    cut_member = tmp_path / "member.keras"
    with zipfile.ZipFile(cut_member, "w") as zf:
        zf.writestr("model.weights.h5", weights[: len(weights) // 2])
    with pytest.raises(FormatError, match=r"member.keras: HDF5 cannot open it .*truncated"):
        open_reader(cut_member)
    cut_archive = tmp_path / "archive.keras"
    whole = tmp_path / "whole.keras"
    with zipfile.ZipFile(whole, "w") as zf:
        zf.writestr("model.weights.h5", weights)
    cut_archive.write_bytes(whole.read_bytes()[:-40])
    with pytest.raises(FormatError, match=r"archive.keras: HDF5 cannot open it"):
        open_reader(cut_archive, format="hdf5")
