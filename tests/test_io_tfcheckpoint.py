"""TensorFlow checkpoints: bytes TensorFlow wrote (fixtures, or live when installed) and broken ones.

The fixtures under ``tests/fixtures/tf/`` were written by TensorFlow (``scripts/make_tf_fixtures.py``),
with what ``tf.train.load_checkpoint`` reads back stored beside them, so the reader is held to
TensorFlow's own answer bit for bit even where TensorFlow is not installed. Broken bundles are
built by hand with a small SSTable writer below.
"""

from __future__ import annotations

import doctest
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
from helpers import is_memory_map

import weightbridge.io as wio
import weightbridge.io.tfcheckpoint as tfc
from weightbridge import dtypes
from weightbridge.errors import FormatError
from weightbridge.spec import TensorSpec

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "tf")
# fixture name -> the prefix inside its directory
PREFIXES = {"keras": "ckpt-1", "saver": "model.ckpt", "sharded": "ckpt"}


@pytest.fixture
def registered() -> None:
    """The format is in the registry."""
    assert tfc.NAME in wio.FORMATS


def copy_fixture(name: str, tmp_path) -> str:
    """A private copy of a fixture directory (tests that break files must not break the repo's)."""
    dest = str(tmp_path / name)
    shutil.copytree(os.path.join(FIXTURES, name), dest)
    return dest


def oracle(name: str) -> tuple[dict[str, dict[str, object]], dict[str, bytes]]:
    with open(os.path.join(FIXTURES, name + ".json"), encoding="utf-8") as f:
        spec = json.load(f)
    with np.load(os.path.join(FIXTURES, name + ".npz")) as z:
        raw = {k: z[k].tobytes() for k in z.files}
    return spec, raw


# --- a minimal SSTable / tensor bundle writer, to build inputs TensorFlow would never write ----


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def fvarint(field: int, value: int) -> bytes:
    return varint(field << 3) + varint(value)


def fbytes(field: int, value: bytes) -> bytes:
    return varint(field << 3 | 2) + varint(len(value)) + value


def header_proto(num_shards: int = 1, endianness: int = 0, min_consumer: int = 0) -> bytes:
    version = fvarint(1, 1) + (fvarint(2, min_consumer) if min_consumer else b"")
    return fvarint(1, num_shards) + fvarint(2, endianness) + fbytes(3, version)


def entry_proto(
    dtype: int, shape: tuple[int, ...], *, shard: int = 0, offset: int = 0, size: int, slices=0
) -> bytes:
    dims = b"".join(fbytes(2, fvarint(1, d)) for d in shape)
    out = fvarint(1, dtype) + fbytes(2, dims) + fvarint(3, shard) + fvarint(4, offset)
    out += fvarint(5, size) + varint(6 << 3 | 5) + struct.pack("<I", 0)
    return out + b"".join(fbytes(7, b"") for _ in range(slices))


def block(entries: list[tuple[bytes, bytes]], restart_every: int = 2) -> bytes:
    """A table block with prefix-compressed keys, as LevelDB writes it."""
    out, restarts, last = bytearray(), [], b""
    for i, (key, value) in enumerate(entries):
        shared = 0
        if i % restart_every:
            while shared < min(len(key), len(last)) and key[shared] == last[shared]:
                shared += 1
        else:
            restarts.append(len(out))
        out += varint(shared) + varint(len(key) - shared) + varint(len(value))
        out += key[shared:] + value
        last = key
    restarts = restarts or [0]
    return (
        bytes(out)
        + b"".join(struct.pack("<I", r) for r in restarts)
        + struct.pack("<I", len(restarts))
    )


def table(entries: list[tuple[bytes, bytes]], per_block: int = 3, compression: int = 0) -> bytes:
    """A whole SSTable: data blocks, an empty metaindex block, an index block, the footer."""
    out = bytearray()

    def put(contents: bytes) -> bytes:
        handle = varint(len(out)) + varint(len(contents))
        trailer = bytes([compression])
        out.extend(contents + trailer + struct.pack("<I", tfc.masked_crc32c(contents + trailer)))
        return handle

    index = []
    for i in range(0, len(entries), per_block):
        chunk = entries[i : i + per_block]
        index.append((chunk[-1][0], put(block(chunk))))
    meta = put(block([]))
    idx = put(block(index, restart_every=1))
    footer = (meta + idx).ljust(40, b"\0") + struct.pack("<Q", tfc.TABLE_MAGIC)
    return bytes(out) + footer


def write_bundle(
    prefix: str,
    tensors: dict[str, tuple[int, tuple[int, ...], bytes]],
    *,
    header: bytes | None = None,
    extra: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
    compression: int = 0,
) -> None:
    """A one-shard bundle of `name -> (TF dtype enum, shape, raw bytes)`."""
    data, entries = bytearray(), []
    for name, (dtype, shape, raw) in tensors.items():
        entries.append((name.encode(), entry_proto(dtype, shape, offset=len(data), size=len(raw))))
        data += raw
    entries = sorted(entries + list(extra))
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    with open(prefix + ".index", "wb") as f:
        f.write(table([(b"", header or header_proto())] + entries, compression=compression))
    with open(prefix + ".data-00000-of-00001", "wb") as f:
        f.write(data)


# --- what TensorFlow wrote ------------------------------------------------------------------


def test_module_docstring_examples() -> None:
    result = doctest.testmod(tfc)
    assert result.attempted > 0 and result.failed == 0


def test_dtype_table_names_only_weightbridge_codes() -> None:
    assert set(tfc.TF_DTYPES.values()) <= set(dtypes.CODES)
    assert not set(tfc.TF_DTYPES) & set(tfc._TF_DTYPE_NAMES)


@pytest.mark.parametrize("name", sorted(PREFIXES))
def test_fixture_reads_bit_exact_as_tensorflow_does(name: str) -> None:
    want_spec, want_raw = oracle(name)
    with tfc.open_reader(os.path.join(FIXTURES, name)) as r:
        spec = r.specs()
        assert sorted(spec.names) == sorted(want_spec)
        for t in spec:
            want = want_spec[t.name]
            assert t == TensorSpec(t.name, tuple(want["shape"]), want["dtype"])  # type: ignore[arg-type]
            assert r.tf_keys[t.name] == want["tf_key"]
            got = r.read(t.name)
            assert got.dtype == dtypes.to_numpy(t.dtype) and got.shape == t.shape
            assert got.tobytes() == want_raw[t.name], t.name
            assert not got.flags.writeable and is_memory_map(got), t.name
            brange = r.byte_range(t.name)
            assert brange is not None and brange.length == t.nbytes
            with open(brange.path, "rb") as f:
                f.seek(brange.offset)
                assert f.read(brange.length) == want_raw[t.name]
            r.release(t.name)


def test_keras_checkpoint_names_drop_the_variable_value_suffix() -> None:
    with tfc.open_reader(os.path.join(FIXTURES, "keras")) as r:
        names = r.specs().names
        assert "save_counter" in names
        assert not [n for n in names if ".ATTRIBUTES" in n]
        assert r.specs()["save_counter"].shape == ()
        assert {r.specs()[n].dtype for n in names} == {"I64", "BF16", "F16"}
        # The object graph is metadata: left out, and said so.
        assert list(r.skipped) == [tfc.OBJECT_GRAPH_KEY]


def test_saver_checkpoint_keeps_plain_names_and_follows_an_absolute_state_path() -> None:
    # TF1's Saver wrote the absolute path of a directory that does not exist here; the state file
    # is read by base name beside itself.
    with open(os.path.join(FIXTURES, "saver", "checkpoint"), encoding="utf-8") as f:
        assert '"/' in f.read()
    with tfc.open_reader(os.path.join(FIXTURES, "saver")) as r:
        assert r.prefix == os.path.join(FIXTURES, "saver", "model.ckpt")
        assert "dense/kernel" in r.specs().names and r.skipped == {}


def test_sharded_checkpoint_spreads_over_data_files_in_file_order() -> None:
    with tfc.open_reader(os.path.join(FIXTURES, "sharded")) as r:
        paths = [r.byte_range(n).path for n in r.specs().names]  # type: ignore[union-attr]
        assert len(set(paths)) == 3
        assert paths == sorted(paths)  # spec order = shard order = disk order


def test_every_path_form_names_the_same_checkpoint(registered: None) -> None:
    d = os.path.join(FIXTURES, "keras")
    prefix = os.path.join(d, "ckpt-1")
    for path in (d, prefix, prefix + ".index", prefix + ".data-00000-of-00001"):
        assert tfc.detect(path, b""), path
        assert tfc.find_prefix(path) == prefix, path
    for path in (d, prefix + ".index", prefix + ".data-00000-of-00001"):
        assert wio.detect_format(path) == "tfcheckpoint", path
        with wio.open_reader(path) as r:
            assert r.path == prefix + ".index"
    # A directory without a state file but with one checkpoint in it is that checkpoint.
    assert wio.detect_format(os.path.join(FIXTURES, "sharded")) == "tfcheckpoint"


def test_not_a_tf_checkpoint_is_not_detected(tmp_path) -> None:
    (tmp_path / "notes.index").write_bytes(b"x" * 100)
    assert not tfc.detect(str(tmp_path / "notes.index"), b"x" * 64)
    assert not tfc.detect(str(tmp_path), b"")
    assert not tfc.detect(str(tmp_path / "nothing"), b"")
    # Orbax and flax name files "checkpoint" too; only TensorFlow's state file counts.
    (tmp_path / "checkpoint").write_bytes(b"\x81\xa6params\x80")
    assert not tfc.detect(str(tmp_path), b"")
    with pytest.raises(FormatError, match="not a TensorFlow checkpoint"):
        tfc.open_reader(str(tmp_path / "nothing"))


def test_import_does_not_load_tensorflow() -> None:
    code = "import sys, weightbridge.io.tfcheckpoint; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- directories and state files ------------------------------------------------------------


def test_directory_with_several_checkpoints_and_no_state_file_is_refused(tmp_path) -> None:
    for p in ("a", "b"):
        write_bundle(str(tmp_path / p), {"w": (1, (1,), b"\0" * 4)})
    assert tfc.detect(str(tmp_path), b"")
    with pytest.raises(FormatError, match=r"several TensorFlow checkpoints \['a', 'b'\]"):
        tfc.open_reader(str(tmp_path))


def test_state_file_decides_between_checkpoints(tmp_path) -> None:
    for p, v in (("ckpt-1", 1.0), ("ckpt-2", 2.0)):
        write_bundle(str(tmp_path / p), {"w": (1, (1,), np.float32(v).tobytes())})
    (tmp_path / "checkpoint").write_text(
        'model_checkpoint_path: "ckpt-2"\nall_model_checkpoint_paths: "ckpt-1"\n'
    )
    with tfc.open_reader(str(tmp_path)) as r:
        assert r.read("w")[0] == 2.0


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ('model_checkpoint_path: "../elsewhere/ckpt"', "outside the checkpoint directory"),
        ('model_checkpoint_path: "ckpt-9"', r"ckpt-9\.index does not exist"),
        ("all_model_checkpoint_paths: 'x'", "no model_checkpoint_path line"),
    ],
)
def test_bad_state_file_is_a_format_error(tmp_path, line: str, match: str) -> None:
    write_bundle(str(tmp_path / "ckpt-1"), {"w": (1, (1,), b"\0" * 4)})
    (tmp_path / "checkpoint").write_text(line + "\n")
    with pytest.raises(FormatError, match=match):
        tfc.open_reader(str(tmp_path))


# --- hand-built bundles: what the format allows, and what we refuse --------------------------


def test_hand_built_bundle_over_several_blocks_with_awkward_tensors(tmp_path) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "layer/kernel": rng.standard_normal((3, 5)).astype(np.float32),
        "layer/bias": np.arange(5, dtype=np.float16),
        "layer/scale": np.array(3, dtype=np.int8),  # 1 byte: the next tensor is misaligned
        "layer/steps": np.array([1, 2], dtype=np.int64),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "flags": np.array([True, False]),
        "z/w": np.frombuffer(rng.bytes(8), dtype=dtypes.to_numpy("BF16")).reshape(2, 2),
    }
    enum = {v: k for k, v in tfc.TF_DTYPES.items()}
    prefix = str(tmp_path / "model")
    write_bundle(
        prefix,
        {
            k + tfc.VARIABLE_SUFFIX: (enum[dtypes.from_numpy(a.dtype)], a.shape, a.tobytes())
            for k, a in arrays.items()
        },
    )
    with tfc.open_reader(prefix) as r:
        assert sorted(r.specs().names) == sorted(arrays)
        for name, want in arrays.items():
            got = r.read(name)
            assert got.dtype == want.dtype and got.shape == want.shape
            assert got.tobytes() == want.tobytes(), name


@pytest.mark.parametrize(
    ("dtype", "tf_name"), [(7, "DT_STRING"), (20, "DT_RESOURCE"), (18, "DT_COMPLEX128")]
)
def test_unsupported_dtype_is_refused_naming_the_tensor(tmp_path, dtype: int, tf_name: str) -> None:
    prefix = str(tmp_path / "m")
    write_bundle(prefix, {"ok": (1, (1,), b"\0" * 4), "vocab/table": (dtype, (2,), b"\0" * 16)})
    with pytest.raises(FormatError, match=f"tensor 'vocab/table' has dtype {tf_name}") as info:
        tfc.open_reader(prefix)
    assert prefix + ".index" in str(info.value)


def test_partitioned_variable_is_refused_naming_it(tmp_path) -> None:
    prefix = str(tmp_path / "m")
    extra = [(b"emb", entry_proto(1, (4, 2), size=0, slices=2))]
    write_bundle(prefix, {}, extra=extra)
    with pytest.raises(FormatError, match="tensor 'emb' is a partitioned variable saved as 2"):
        tfc.open_reader(prefix)


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (header_proto(endianness=1), "big-endian"),
        (header_proto(min_consumer=7), "version >= 7"),
        (header_proto(num_shards=0), "declares 0 data shards"),
    ],
)
def test_bad_header_is_refused(tmp_path, header: bytes, match: str) -> None:
    prefix = str(tmp_path / "m")
    write_bundle(prefix, {"w": (1, (1,), b"\0" * 4)}, header=header)
    with pytest.raises(FormatError, match=match):
        tfc.open_reader(prefix)


def test_snappy_block_is_refused_with_the_fix(tmp_path) -> None:
    prefix = str(tmp_path / "m")
    write_bundle(prefix, {"w": (1, (1,), b"\0" * 4)}, compression=1)
    with pytest.raises(FormatError, match="snappy-compressed.*Re-save"):
        tfc.open_reader(prefix)


def test_entry_size_that_disagrees_with_shape_is_refused(tmp_path) -> None:
    prefix = str(tmp_path / "m")
    write_bundle(prefix, {}, extra=[(b"w", entry_proto(1, (3,), size=8))])
    with open(prefix + ".data-00000-of-00001", "wb") as f:
        f.write(b"\0" * 12)
    with pytest.raises(FormatError, match=r"tensor 'w': shape \(3,\) of F32 needs 12 bytes.*8"):
        tfc.open_reader(prefix)


def test_entry_in_a_shard_the_header_does_not_declare_is_refused(tmp_path) -> None:
    prefix = str(tmp_path / "m")
    write_bundle(prefix, {}, extra=[(b"w", entry_proto(1, (1,), shard=3, size=4))])
    with pytest.raises(FormatError, match="tensor 'w' is in data shard 3.*declares 1"):
        tfc.open_reader(prefix)


# --- broken copies of what TensorFlow wrote -------------------------------------------------


@pytest.mark.parametrize("keep", [0.5, 0.9, -1, 20, 0])
def test_truncated_index_is_a_format_error_naming_it(tmp_path, keep: float) -> None:
    d = copy_fixture("keras", tmp_path)
    index = os.path.join(d, "ckpt-1.index")
    with open(index, "rb") as f:
        data = f.read()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    with open(index, "wb") as f:
        f.write(data[:cut])
    with pytest.raises(FormatError) as info:
        tfc.open_reader(d)
    assert index in str(info.value)
    assert "truncated" in str(info.value) or "magic" in str(info.value)


def test_bad_magic_is_a_format_error(tmp_path) -> None:
    d = copy_fixture("keras", tmp_path)
    index = os.path.join(d, "ckpt-1.index")
    with open(index, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\0")
    with pytest.raises(
        FormatError, match=r"ckpt-1\.index: not a TensorFlow checkpoint index.*magic"
    ):
        tfc.open_reader(index)
    assert not tfc.detect(index, b"")


def test_flipped_byte_in_a_block_fails_its_checksum(tmp_path) -> None:
    d = copy_fixture("saver", tmp_path)
    index = os.path.join(d, "model.ckpt.index")
    with open(index, "r+b") as f:
        data = bytearray(f.read())
        pos = data.index(b"dense")
        data[pos] ^= 0x20
        f.seek(0)
        f.write(data)
    with pytest.raises(FormatError, match="data block 0 at byte 0 fails its checksum"):
        tfc.open_reader(d)


def test_entry_pointing_past_the_data_file_names_file_and_tensor(tmp_path) -> None:
    d = copy_fixture("saver", tmp_path)
    data = os.path.join(d, "model.ckpt.data-00000-of-00001")
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) - 1)
    with pytest.raises(FormatError) as info:
        tfc.open_reader(d)
    msg = str(info.value)
    assert msg.startswith(data + ": file is truncated: tensor 'pixels' needs bytes")


def test_missing_data_shard_names_file_and_tensor(tmp_path) -> None:
    d = copy_fixture("sharded", tmp_path)
    shard = os.path.join(d, "ckpt.data-00001-of-00003")
    os.remove(shard)
    with pytest.raises(FormatError) as info:
        tfc.open_reader(d)
    msg = str(info.value)
    assert msg.startswith(shard + ": data shard 1 of 3 is missing (tensor 'module/")
    assert "copy every 'ckpt.data-*' file" in msg


def test_unknown_name_is_a_format_error_with_suggestions() -> None:
    with (
        tfc.open_reader(os.path.join(FIXTURES, "saver")) as r,
        pytest.raises(FormatError, match="no tensor named 'dense/kernl'"),
    ):
        r.read("dense/kernl")


# --- live TensorFlow (skipped where it is not installed) ------------------------------------


@pytest.mark.tensorflow
def test_every_dtype_tensorflow_saves_reads_bit_exact(tmp_path) -> None:
    import tensorflow as tf

    rng = np.random.default_rng(7)
    arrays: dict[str, np.ndarray] = {}
    for i, code in enumerate(sorted(set(tfc.TF_DTYPES.values()))):
        dt = dtypes.to_numpy(code)
        shape = (3, 2) if i % 2 else (5,)
        if code == "BOOL":
            arrays[f"v{i}/{code}"] = rng.integers(0, 2, shape).astype(bool)
        else:  # random bits: NaN payloads and all, so the comparison is of bytes
            arrays[f"v{i}/{code}"] = np.frombuffer(
                rng.bytes(int(np.prod(shape)) * dt.itemsize), dtype=dt
            ).reshape(shape)
    arrays["scalar"] = np.array(-3, dtype=np.int64)
    arrays["empty"] = np.zeros((0, 3), dtype=np.float32)
    prefix = str(tmp_path / "raw")
    names = list(arrays)
    enum = {v: k for k, v in tfc.TF_DTYPES.items()}
    tensors = []
    for name in names:
        a = arrays[name]
        t = tf.constant(a)  # TF takes bfloat16 and fp8 from ml_dtypes arrays as they are
        assert t.dtype == tf.dtypes.as_dtype(enum[dtypes.from_numpy(a.dtype)]), name
        tensors.append(t)
    tf.raw_ops.SaveV2(
        prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names), tensors=tensors
    )
    reference = tf.train.load_checkpoint(prefix)
    with tfc.open_reader(prefix) as r:
        assert sorted(r.specs().names) == sorted(names)
        for name in names:
            want = np.asarray(reference.get_tensor(name))
            got = r.read(name)
            assert got.shape == want.shape, name
            assert got.tobytes() == want.tobytes() == arrays[name].tobytes(), name


@pytest.mark.tensorflow
def test_checkpoint_manager_directory_reads_like_tensorflow(tmp_path) -> None:
    import keras
    import tensorflow as tf

    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, dtype="bfloat16"), keras.layers.Dense(2)]
    )
    ckpt = tf.train.Checkpoint(model=model, step=tf.Variable(5, dtype=tf.int64))
    manager = tf.train.CheckpointManager(ckpt, str(tmp_path), max_to_keep=3)
    manager.save()
    model.layers[0].kernel.assign(model.layers[0].kernel * 2)
    latest = manager.save()
    reference = tf.train.load_checkpoint(latest)
    with tfc.open_reader(str(tmp_path)) as r:
        assert r.prefix == latest
        keys = {k for k in reference.get_variable_to_dtype_map() if k != tfc.OBJECT_GRAPH_KEY}
        assert set(r.tf_keys.values()) == keys
        for name, key in r.tf_keys.items():
            assert r.read(name).tobytes() == np.asarray(reference.get_tensor(key)).tobytes()


@pytest.mark.tensorflow
def test_string_variable_saved_by_tensorflow_is_refused_naming_it(tmp_path) -> None:
    import tensorflow as tf

    prefix = str(tmp_path / "s")
    tf.raw_ops.SaveV2(
        prefix=prefix,
        tensor_names=["w", "vocab"],
        shape_and_slices=["", ""],
        tensors=[tf.zeros((2,)), tf.constant(["a", "b"])],
    )
    with pytest.raises(FormatError, match="tensor 'vocab' has dtype DT_STRING"):
        tfc.open_reader(prefix)


@pytest.mark.tensorflow
def test_partitioned_variable_saved_by_tensorflow_is_refused_naming_it(tmp_path) -> None:
    import tensorflow as tf

    prefix = str(tmp_path / "p")
    tf.raw_ops.SaveV2(
        prefix=prefix,
        tensor_names=["emb", "emb"],
        shape_and_slices=["4 2 0,2:-", "4 2 2,2:-"],
        tensors=[tf.zeros((2, 2)), tf.ones((2, 2))],
    )
    with pytest.raises(FormatError, match="tensor 'emb' is a partitioned variable"):
        tfc.open_reader(prefix)
