"""Flax msgpack: flax reads what we write byte for byte, we read what flax writes, and broken files.

flax is the oracle (tests marked `jax`); the rest runs on numpy alone, building odd files with the
module's own msgpack encoders.
"""

from __future__ import annotations

import doctest
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from helpers import is_memory_map

import weightbridge.io as wio
import weightbridge.io.msgpack as mp
from weightbridge import dtypes
from weightbridge.errors import FormatError
from weightbridge.spec import TensorSpec

Arrays = dict[str, np.ndarray]


@pytest.fixture
def registered() -> None:
    """The format is in the registry, for reading and writing."""
    assert wio.FORMATS[mp.NAME].output_names == ("msgpack", "flax")


def random_array(code: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random bits (NaN payloads included), so the comparisons really are of bytes."""
    dt = dtypes.to_numpy(code)
    if code == "BOOL":
        return rng.integers(0, 2, shape).astype(bool)
    return np.frombuffer(rng.bytes(int(np.prod(shape)) * dt.itemsize), dtype=dt).reshape(shape)


def sample(seed: int = 0) -> Arrays:
    """Every dtype, nested three deep, plus a 0-d, an empty and a zero-column tensor."""
    rng = np.random.default_rng(seed)
    out = {
        f"params/block_{i}/{code.lower()}": random_array(code, (5, 3), rng)
        for i, code in enumerate(dtypes.CODES)
    }
    out["params/head/kernel"] = random_array("BF16", (4, 2), rng)
    out["params/head/bias"] = random_array("F32", (2,), rng)
    out["step"] = np.array(12, dtype=np.int64)
    out["empty"] = np.zeros((0,), dtype=np.float32)
    out["stats/no_cols"] = np.zeros((3, 0), dtype=np.float16)
    return out


def specs_of(arrays: Arrays) -> list[TensorSpec]:
    return [TensorSpec(k, a.shape, dtypes.from_numpy(a.dtype)) for k, a in arrays.items()]


def write(path: str, arrays: Arrays, meta: dict[str, str] | None = None, rows: int = 2) -> bytes:
    """Write through the streaming writer in tiles of `rows` rows; return the file's bytes."""
    w = mp.MsgpackWriter(path, specs_of(arrays), meta)
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
    with open(path, "rb") as f:
        return f.read()


def nested(arrays: Arrays) -> dict[str, object]:
    """The nested dict flax would be given for these names."""
    root: dict[str, object] = {}
    for name, a in arrays.items():
        *parents, leaf = name.split("/")
        node = root
        for p in parents:
            node = node.setdefault(p, {})  # type: ignore[assignment]
        node[leaf] = a  # type: ignore[index]
    return root


def leaf(shape: tuple[int, ...], dtype_name: str, raw: bytes) -> bytes:
    """A flax array leaf with an arbitrary dtype name, to build files flax would not write."""
    record = mp.pack_array_header(3) + mp.pack_array_header(len(shape))
    record += b"".join(mp.pack_uint(d) for d in shape) + mp.pack_str(dtype_name)
    record += mp.pack_bin_header(len(raw)) + raw
    return mp.pack_ext_header(len(record), mp.EXT_NDARRAY) + record


def one_map(**items: bytes) -> bytes:
    return mp.pack_map_header(len(items)) + b"".join(mp.pack_str(k) + v for k, v in items.items())


# --- without flax ----------------------------------------------------------------------------


def test_module_docstring_examples() -> None:
    result = doctest.testmod(mp)
    assert result.attempted > 0 and result.failed == 0


def test_round_trip_every_dtype_bit_exact_as_memory_maps(tmp_path) -> None:
    arrays = sample()
    path = str(tmp_path / "m.msgpack")
    meta = {"format": "flax", "note": "ünïcode ✓"}
    write(path, arrays, meta)
    with mp.open_reader(path) as r:
        spec = r.specs()
        assert spec.names == list(arrays) and dict(spec.metadata) == meta
        assert r.skipped == {}
        for name, want in arrays.items():
            got = r.read(name)
            assert got.dtype == want.dtype and got.shape == want.shape, name
            assert got.tobytes() == want.tobytes(), name
            assert not got.flags.writeable or not got.size, name
            if want.size:
                assert is_memory_map(got), name
                brange = r.byte_range(name)
                assert brange is not None and brange.length == want.nbytes
                with open(path, "rb") as f:
                    f.seek(brange.offset)
                    assert f.read(brange.length) == want.tobytes()
            r.release(name)


def test_bytes_do_not_depend_on_tile_size(tmp_path) -> None:
    arrays = sample(seed=3)
    one = write(str(tmp_path / "a.msgpack"), arrays, rows=1)
    three = write(str(tmp_path / "b.msgpack"), arrays, rows=3)
    assert one == three


def test_interleaved_names_are_grouped_and_still_stream(tmp_path) -> None:
    """Names sharing a prefix need not be declared together: each tile goes to its place."""
    rng = np.random.default_rng(1)
    arrays = {n: random_array("F32", (3, 2), rng) for n in ("a/x", "b/y", "a/z", "b/w/v")}
    path = str(tmp_path / "m.msgpack")
    write(path, arrays, rows=1)
    with mp.open_reader(path) as r:
        assert r.specs().names == ["a/x", "a/z", "b/y", "b/w/v"]  # file order: grouped
        for name, want in arrays.items():
            assert r.read(name).tobytes() == want.tobytes()


def test_chunked_arrays_round_trip_with_tiles_across_chunk_edges(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(mp, "MAX_CHUNK_BYTES", 40)  # 10 float32 per chunk
    a = np.arange(77, dtype=np.float32).reshape(11, 7)
    small = np.arange(3, dtype=np.int8)
    path = str(tmp_path / "m.msgpack")
    data = write(path, {"big": a, "small": small}, rows=3)
    assert mp.CHUNKED_KEY.encode() in data
    with mp.open_reader(path) as r:
        got = r.read("big")
        assert got.shape == (11, 7) and got.tobytes() == a.tobytes()
        assert not got.flags.writeable
        assert r.byte_range("big") is None  # its bytes are not one run
        assert r.read("small").tobytes() == small.tobytes()


@pytest.mark.parametrize(
    ("names", "match"),
    [
        (["a", "a/b"], "tensor 'a' is also a map holding 'a/b'"),
        (["a/b", "a"], "tensor 'a' is also a map"),
        (["a//b"], "may not start or end with '/' or hold '//'"),
        (["/a"], "may not start"),
        (["a/"], "may not start"),
    ],
)
def test_writer_refuses_names_msgpack_cannot_nest(tmp_path, names: list[str], match: str) -> None:
    specs = [TensorSpec(n, (1,), "F32") for n in names]
    path = str(tmp_path / "m.msgpack")
    with pytest.raises(FormatError, match=match) as info:
        mp.MsgpackWriter(path, specs)
    assert str(info.value).startswith(path)


def test_writer_refuses_a_tensor_where_metadata_goes(tmp_path) -> None:
    specs = [TensorSpec("__metadata__/x", (1,), "F32")]
    with pytest.raises(FormatError, match="where the metadata goes"):
        mp.MsgpackWriter(str(tmp_path / "m.msgpack"), specs, {"a": "b"})
    mp.MsgpackWriter(str(tmp_path / "ok.msgpack"), specs).abort()  # fine without metadata


def test_writer_refuses_incomplete_and_out_of_order(tmp_path) -> None:
    specs = [TensorSpec("a", (4,), "F32"), TensorSpec("b", (2,), "BF16")]
    w = mp.MsgpackWriter(str(tmp_path / "m.msgpack"), specs)
    with pytest.raises(FormatError, match="expected tensor 'a'"):
        w.write("b", np.zeros(2, ml_dtypes.bfloat16), 0)
    w.write("a", np.zeros(2, np.float32), 0)
    with pytest.raises(FormatError, match="'a' \\(2 of 4 rows\\)"):
        w.close()
    w.abort()
    with pytest.raises(FormatError, match="after close"):
        w.write("a", np.zeros(2, np.float32), 2)


def test_every_truncation_is_a_format_error_naming_the_file(tmp_path) -> None:
    arrays = {"p/w": np.arange(6, dtype=np.float32).reshape(2, 3), "p/b": np.ones(2, np.float16)}
    data = write(str(tmp_path / "full.msgpack"), arrays, {"k": "v"})
    path = str(tmp_path / "cut.msgpack")
    for cut in range(len(data)):
        with open(path, "wb") as f:
            f.write(data[:cut])
        with pytest.raises(FormatError) as info:
            mp.open_reader(path)
        assert str(info.value).startswith(path), cut
    data = write(str(tmp_path / "full.msgpack"), arrays)
    with open(path, "wb") as f:
        f.write(data[:-3])
    with pytest.raises(
        FormatError,
        match=r"file is truncated: an array record of \d+ bytes at 'p/b' needs bytes through \d+",
    ):
        mp.open_reader(path)


def test_corrupt_bytes_give_format_errors_or_valid_files_never_crashes(tmp_path) -> None:
    arrays = {"p/w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(3, np.int8)}
    data = write(str(tmp_path / "full.msgpack"), arrays, {"k": "v"})
    path = str(tmp_path / "bad.msgpack")
    for pos in range(len(data)):
        for flip in (0x01, 0x80, 0xFF):
            bad = bytearray(data)
            bad[pos] ^= flip
            with open(path, "wb") as f:
                f.write(bad)
            try:
                with mp.open_reader(path) as r:
                    for name in r.specs().names:
                        r.read(name)
            except FormatError:
                pass


def test_trailing_bytes_are_refused(tmp_path) -> None:
    path = str(tmp_path / "m.msgpack")
    data = write(path, {"w": np.ones(2, np.float32)})
    with open(path, "wb") as f:
        f.write(data + b"\x00")
    with pytest.raises(FormatError, match="1 bytes follow the msgpack object"):
        mp.open_reader(path)


def test_unsupported_dtype_is_refused_naming_tensor_and_dtype(tmp_path) -> None:
    path = tmp_path / "m.msgpack"
    path.write_bytes(one_map(params=one_map(w=leaf((1,), "complex128", b"\0" * 16))))
    with pytest.raises(FormatError, match="tensor 'params/w' has dtype 'complex128'"):
        mp.open_reader(str(path))


def test_record_whose_bytes_disagree_with_its_shape_is_refused(tmp_path) -> None:
    path = tmp_path / "m.msgpack"
    path.write_bytes(one_map(w=leaf((3,), "float32", b"\0" * 8)))
    with pytest.raises(FormatError, match=r"tensor 'w': shape \(3,\) of F32 needs 12 bytes.*8"):
        mp.open_reader(str(path))


def test_non_tensor_leaves_become_metadata_or_are_skipped(tmp_path) -> None:
    path = tmp_path / "m.msgpack"
    path.write_bytes(
        one_map(
            w=leaf((2,), "float32", b"\0" * 8),
            epoch=mp.pack_uint(3),
            name=mp.pack_str("run-1"),
            nothing=b"\xc0",
            blob=mp.pack_bin_header(2) + b"ab",
            opt=mp.pack_map_header(0),
        )
    )
    with mp.open_reader(str(path)) as r:
        assert r.specs().names == ["w"]
        assert dict(r.specs().metadata) == {"epoch": "3", "name": "run-1"}
        assert r.skipped == {
            "nothing": "nil",
            "blob": "byte string of 2 bytes",
            "opt": "an empty map",
        }


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (leaf((1,), "float32", b"\0" * 4), "top level is an array, not a map"),
        (mp.pack_uint(7), "top level is int"),
        (b"\xc1", "0xc1 never starts a msgpack value"),
        (b"\x82\xa1a\x01\xa1a\x02", "'a': key appears twice"),
        (b"\x81\xc3\x01", "map key True is not a string"),
        (b"\x81\xa1a" + b"\x91" * 200 + b"\x01", "nest over 100 deep"),
        (b"\xdf\xff\xff\xff\xff", "a map of 4294967295 items"),
        (b"", "file is empty"),
        (b"\x82\xa3a/b\x01\xa1a\x81\xa1b\x02", "'a/b' names two values"),
        (
            b"\x82\xa1x" + leaf((1,), "int8", b"\x01") + b"\xa1x\x01",
            "'x': key appears twice",
        ),
    ],
)
def test_malformed_structures_are_refused(tmp_path, data: bytes, match: str) -> None:
    path = tmp_path / "m.msgpack"
    path.write_bytes(data)
    with pytest.raises(FormatError, match=match):
        mp.open_reader(str(path))


def test_detect_knows_state_dicts_from_other_formats(tmp_path) -> None:
    good = write(str(tmp_path / "m.msgpack"), {"params/w": np.ones(2, np.float32)})
    assert mp.detect("anything.bin", good[:64])
    assert mp.detect("e.msgpack", b"\x80") and not mp.detect("e.bin", b"\x80")
    for head in (
        b"\x88\x00\x00\x00\x00\x00\x00\x00{",  # a safetensors header length of 0x88
        b"\x88\xa0\x00\x00\x00\x00\x00\x00{",  # ... and of 0xa088
        b"\x89HDF\r\n\x1a\n",
        b"\x93NUMPY",
        b"PK\x03\x04",
        b"\x81\xa3\x00\x01\x02",  # a key that is not text
    ):
        assert not mp.detect("x.msgpack", head), head


def test_registry_detects_opens_and_writes(tmp_path, registered) -> None:
    arrays = {"params/w": np.arange(4, dtype=np.float32)}
    path = str(tmp_path / "m.msgpack")
    wio.write_checkpoint(path, arrays, format="msgpack")
    assert wio.detect_format(path) == "msgpack"
    assert wio.writer_class("msgpack").suffix == ".msgpack"  # type: ignore[attr-defined]
    with wio.open_reader(path) as r:
        np.testing.assert_array_equal(r.read("params/w"), arrays["params/w"])


def test_import_loads_neither_msgpack_nor_flax() -> None:
    code = (
        "import sys, weightbridge.io.msgpack; "
        "print(sorted(m for m in ('msgpack', 'flax', 'jax') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- flax as the oracle ----------------------------------------------------------------------


@pytest.mark.jax
def test_bytes_are_identical_to_flax_to_bytes(tmp_path) -> None:
    import jax.numpy as jnp
    from flax import serialization

    arrays = sample()
    arrays["params/head/kernel"] = np.asarray(jnp.linspace(-2, 2, 8, dtype=jnp.bfloat16))
    data = write(str(tmp_path / "m.msgpack"), arrays, rows=2)
    assert data == serialization.to_bytes(nested(arrays))


@pytest.mark.jax
def test_flax_restores_what_we_write(tmp_path) -> None:
    import jax.numpy as jnp
    from flax import serialization

    arrays = sample(seed=5)
    arrays["params/head/kernel"] = np.asarray(jnp.ones((2, 3), jnp.bfloat16) * 1.5)
    path = str(tmp_path / "m.msgpack")
    data = write(path, arrays, {"source": "test"})
    back = serialization.msgpack_restore(data)
    assert back.pop("__metadata__") == {"source": "test"}
    assert back.keys() == nested(arrays).keys()
    for name, want in arrays.items():
        node = back
        for part in name.split("/"):
            node = node[part]
        assert node.dtype == want.dtype and node.shape == want.shape, name
        assert node.tobytes() == want.tobytes(), name
    # `from_bytes` restores into a target without the metadata key.
    target = nested({k: np.zeros_like(v) for k, v in arrays.items()})
    restored = serialization.from_bytes(target, data)
    assert restored["params"]["head"]["kernel"].dtype == jnp.bfloat16  # type: ignore[index]


@pytest.mark.jax
def test_we_read_what_flax_writes(tmp_path) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as onp
    from flax import serialization

    state = {
        "params": {
            "Dense_0": {"kernel": jnp.ones((3, 4), jnp.bfloat16), "bias": jnp.arange(4.0)},
            "Embed_0": {"embedding": jax.random.normal(jax.random.key(0), (6, 2), jnp.float16)},
        },
        "batch_stats": {"mean": onp.zeros(3, onp.float32)},
        "step": onp.int32(9),  # a numpy scalar: flax's ext type 3
        "lr": 0.5,  # a Python scalar: metadata
        "opt_state": {},
        "history": [onp.ones(2, onp.float64), None],
    }
    path = tmp_path / "flax.msgpack"
    path.write_bytes(serialization.to_bytes(state))
    assert mp.detect(str(path), path.read_bytes()[:64])
    with mp.open_reader(str(path)) as r:
        spec = r.specs()
        assert spec.names == [
            "params/Dense_0/kernel",
            "params/Dense_0/bias",
            "params/Embed_0/embedding",
            "batch_stats/mean",
            "step",
            "history/0",
        ]
        assert spec["params/Dense_0/kernel"].dtype == "BF16" and spec["step"].shape == ()
        assert dict(spec.metadata) == {"lr": "0.5"}
        assert r.skipped == {"opt_state": "an empty map", "history/1": "nil"}
        want = serialization.msgpack_restore(path.read_bytes())
        for name in spec.names:
            node = want
            for part in name.split("/"):
                node = node[part]
            got, want_leaf = r.read(name), np.asarray(node)
            assert got.dtype == want_leaf.dtype and got.tobytes() == want_leaf.tobytes(), name
            assert is_memory_map(got), name


@pytest.mark.jax
def test_chunked_arrays_match_flax_both_ways(tmp_path, monkeypatch) -> None:
    from flax import serialization

    monkeypatch.setattr(serialization, "MAX_CHUNK_SIZE", 64)
    monkeypatch.setattr(mp, "MAX_CHUNK_BYTES", 64)
    rng = np.random.default_rng(2)
    arrays = {
        "params/emb": random_array("BF16", (9, 7), rng),  # 126 bytes: two chunks of 32
        "params/w": random_array("F32", (4, 4), rng),  # 64 bytes: at the limit, not chunked
        "params/b": random_array("F64", (3, 3), rng),  # 72 bytes: 8 + 1 elements
    }
    theirs = serialization.to_bytes(nested(arrays))
    ours = write(str(tmp_path / "m.msgpack"), arrays, rows=2)
    assert ours == theirs
    path = tmp_path / "flax.msgpack"
    path.write_bytes(theirs)
    with mp.open_reader(str(path)) as r:
        for name, want in arrays.items():
            assert r.read(name).tobytes() == want.tobytes(), name
        assert r.byte_range("params/w") is not None and r.byte_range("params/emb") is None


@pytest.mark.jax
def test_linen_model_params_round_trip_through_flax(tmp_path) -> None:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from flax import serialization

    model = nn.Sequential([nn.Dense(4, param_dtype=jnp.bfloat16), nn.Dense(2)])
    variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
    path = tmp_path / "model.msgpack"
    path.write_bytes(serialization.to_bytes(variables))
    out = str(tmp_path / "copy.msgpack")
    with mp.open_reader(str(path)) as r:
        assert "params/layers_0/kernel" in r.specs().names
        assert r.specs()["params/layers_0/kernel"].dtype == "BF16"
        w = mp.MsgpackWriter(out, list(r.specs()))
        for t in r.specs():
            w.write(t.name, r.read(t.name), 0)
        w.close()
    with open(out, "rb") as f:
        copy = f.read()
    assert copy == path.read_bytes()
    restored = serialization.from_bytes(variables, copy)
    assert jax.tree_util.tree_all(
        jax.tree_util.tree_map(lambda a, b: bool((a == b).all()), restored, variables)
    )
