"""numpy `.npy`/`.npz`: what numpy writes, what only we write, and every way a file can be wrong."""

from __future__ import annotations

import doctest
import io
import json
import zipfile

import ml_dtypes
import numpy as np
import pytest
from numpy.lib import format as npy_format

import weightbridge.io.numpy as npio
from weightbridge.errors import FormatError
from weightbridge.io import detect_format, open_reader, write_checkpoint
from weightbridge.spec import TensorSpec


def npy_bytes(arr: np.ndarray, **header: object) -> bytes:
    """An .npy image of `arr`, with header fields overridden to build broken files."""
    f = io.BytesIO()
    d = {**npy_format.header_data_from_array_1_0(arr), **header}
    npy_format.write_array_header_1_0(f, d)
    order = "F" if d["fortran_order"] else "C"
    f.write(arr.tobytes(order=order))
    return f.getvalue()


def zip_of(path, members: dict[str, bytes], *, compress: int = zipfile.ZIP_STORED, comment=b""):
    with zipfile.ZipFile(path, "w", compress) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        zf.comment = comment
    return path


def test_module_docstring_examples() -> None:
    for module in (npio, __import__("weightbridge.io._tiles", fromlist=["_"])):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0


def test_npy_is_one_tensor_named_by_its_stem_and_mapped(tmp_path) -> None:
    want = np.arange(24, dtype=np.int16).reshape(4, 6)
    np.save(tmp_path / "layer.0.weight.npy", want)
    path = tmp_path / "layer.0.weight.npy"
    assert detect_format(path) == "numpy"
    with open_reader(path) as r:
        assert r.specs().names == ["layer.0.weight"]
        got = r.read("layer.0.weight")
        np.testing.assert_array_equal(got, want)
        assert not got.flags.owndata and not got.flags.writeable
        brange = r.byte_range("layer.0.weight")
        assert brange is not None and brange.offset == 128 and brange.length == want.nbytes
        with pytest.raises(FormatError, match="no tensor named 'nope'"):
            r.read("nope")


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_fortran_order_and_big_endian_read_as_their_logical_values(tmp_path, save) -> None:
    logical = np.arange(2 * 3 * 4, dtype=np.float64).reshape(2, 3, 4)
    arrays = {
        "fortran": np.asfortranarray(logical),
        "big": logical.astype(">f4"),
        "big_complex": (logical[0] + 1j * logical[1]).astype(">c8"),
        "fortran_row": np.asfortranarray(logical[0, 0]),
    }
    save(tmp_path / "a.npz", **arrays)
    with open_reader(tmp_path / "a.npz") as r:
        spec = r.specs()
        assert [spec[n].dtype for n in arrays] == ["F64", "F32", "C64", "F64"]
        for name, want in arrays.items():
            got = r.read(name)
            assert got.dtype.isnative and not got.flags.writeable
            np.testing.assert_array_equal(got, want)
        stored = save is np.savez
        assert r.byte_range("fortran") is None  # column-major bytes are not C-order bytes
        assert r.byte_range("big") is None  # big-endian bytes are not little-endian bytes
        assert (r.byte_range("fortran_row") is not None) == stored  # 1-d: the same bytes
        if stored:
            assert not r.read("fortran").flags.owndata  # a transposed view of the map


def test_compressed_members_are_copies_of_exactly_their_size(tmp_path) -> None:
    want = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    np.savez_compressed(tmp_path / "c.npz", w=want)
    with open_reader(tmp_path / "c.npz") as r:
        got = r.read("w")
        np.testing.assert_array_equal(got, want)
        assert not got.flags.writeable and r.byte_range("w") is None
        r.release("w")


def test_we_write_void_bytes_numpy_can_load_and_record_the_dtype_in_the_comment(tmp_path) -> None:
    arrays = {
        "w": np.array([[1.5, -2.0]], dtype=ml_dtypes.bfloat16),
        "f8": np.array([0.5, 1.0], dtype=ml_dtypes.float8_e5m2),
        "b": np.array([1.0, 2.0], dtype=np.float32),
    }
    path = str(tmp_path / "m.npz")
    write_checkpoint(path, arrays, metadata={"format": "pt"})
    with zipfile.ZipFile(path) as zf:
        assert zf.comment == (
            b'{"weightbridge_dtypes":{"w":"BF16","f8":"F8_E5M2"},'
            b'"weightbridge_metadata":{"format":"pt"}}'
        )
        assert [i.compress_type for i in zf.infolist()] == [zipfile.ZIP_STORED] * 3
    with np.load(path) as z:
        assert z.files == ["w", "f8", "b"]
        assert z["w"].dtype == np.dtype("V2") and z["f8"].dtype == np.dtype("V1")
        assert z["w"].view(ml_dtypes.bfloat16).tolist() == arrays["w"].tolist()
        assert z["f8"].tobytes() == arrays["f8"].tobytes()
    with open_reader(path) as r:
        for name, want in arrays.items():
            got = r.read(name)
            assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
            brange = r.byte_range(name)
            assert brange is not None and brange.offset % npio.ALIGN == 0  # aligned maps


def test_output_is_reproducible(tmp_path) -> None:
    arrays = {"a": np.arange(5, dtype=np.int64), "s": np.array(2.5)}
    write_checkpoint(str(tmp_path / "1.npz"), arrays)
    write_checkpoint(str(tmp_path / "2.npz"), arrays)
    assert (tmp_path / "1.npz").read_bytes() == (tmp_path / "2.npz").read_bytes()


def test_void_arrays_without_a_record_are_refused_with_the_fix(tmp_path) -> None:
    np.savez(tmp_path / "bf.npz", emb=np.zeros((2, 2), ml_dtypes.bfloat16))
    with pytest.raises(FormatError) as info:
        open_reader(tmp_path / "bf.npz")
    msg = str(info.value)
    assert str(tmp_path / "bf.npz") in msg and "tensor 'emb'" in msg
    assert "raw 2-byte values" in msg and "write_checkpoint" in msg
    np.save(tmp_path / "bf.npy", np.zeros(2, ml_dtypes.bfloat16))
    with pytest.raises(FormatError, match="tensor 'bf': dtype .V2 is raw 2-byte values"):
        open_reader(tmp_path / "bf.npy")


def test_a_comment_that_is_not_ours_is_ignored(tmp_path) -> None:
    path = zip_of(tmp_path / "c.npz", {"a.npy": npy_bytes(np.ones(2))}, comment=b"made by hand")
    with open_reader(path) as r:
        assert r.specs().names == ["a"] and dict(r.specs().metadata) == {}


@pytest.mark.parametrize(
    "members,comment,message",
    [
        # The comment names a tensor whose member is gone.
        (
            {"a.npy": npy_bytes(np.ones(2, np.float32))},
            {"weightbridge_dtypes": {"gone": "BF16"}},
            r"records dtypes of tensors it does not hold: \['gone'\].*expected member 'gone.npy'",
        ),
        # A record whose width disagrees with the stored values.
        (
            {"a.npy": npy_bytes(np.zeros(2, "V1"))},
            {"weightbridge_dtypes": {"a": "BF16"}},
            r"tensor 'a': archive comment records dtype BF16 \(2 bytes per element\), but the "
            r"array holds 1-byte values",
        ),
        # A record for an array that has a real dtype of its own.
        (
            {"a.npy": npy_bytes(np.zeros(2, np.uint16))},
            {"weightbridge_dtypes": {"a": "BF16"}},
            r"records dtype 'BF16', but the array is U16",
        ),
        (
            {"a.npy": npy_bytes(np.zeros(2, "V2"))},
            {"weightbridge_dtypes": {"a": "Q7"}},
            r"tensor 'a': archive comment records dtype 'Q7': unknown dtype",
        ),
        (
            {"a.npy": npy_bytes(np.zeros(2))},
            {"weightbridge_dtypes": ["a"]},
            r"archive comment 'weightbridge_dtypes' must map names to strings",
        ),
    ],
)
def test_broken_records_are_refused(tmp_path, members, comment, message) -> None:
    path = zip_of(tmp_path / "r.npz", members, comment=json.dumps(comment).encode())
    with pytest.raises(FormatError, match=message) as info:
        open_reader(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("compress", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
@pytest.mark.parametrize(
    "member,message",
    [
        (b"\x93NUMPY\x01\x00\x10\x00{'descr': '<f4'", "not a valid npy header"),
        (b"NOTNUMPY" + b"\0" * 100, "not a valid npy header"),
        (npy_bytes(np.ones(4, np.float32), shape=(8,)), r"declares 144 bytes, but its npy header"),
        (npy_bytes(np.ones(4, np.float32), descr="<U3"), "numpy dtype <U3 has no weightbridge"),
        (npy_bytes(np.zeros(2, [("x", "<f4"), ("y", "<i4")])), "structured dtype"),
        (npy_bytes(np.ones(2), descr="|O"), "weightbridge never unpickles"),
    ],
)
def test_broken_members_name_the_file_and_tensor(tmp_path, compress, member, message) -> None:
    path = zip_of(
        tmp_path / "b.npz", {"ok.npy": npy_bytes(np.ones(2)), "t.npy": member}, compress=compress
    )
    with pytest.raises(FormatError, match=message) as info:
        open_reader(path)
    assert f"{path}: tensor 't'" in str(info.value)


def test_object_arrays_saved_with_pickle_are_never_unpickled(tmp_path) -> None:
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(FormatError, match=r"tensor 'o': holds Python objects .* never unpickles"):
        open_reader(tmp_path / "o.npy")


def test_truncated_npy_says_how_far_the_data_should_go(tmp_path) -> None:
    data = npy_bytes(np.ones((10, 10), np.float32))
    (tmp_path / "t.npy").write_bytes(data[:-1])
    with pytest.raises(
        FormatError,
        match=r"file is truncated: header declares data through byte 528 .* file is 527 bytes",
    ):
        open_reader(tmp_path / "t.npy")
    (tmp_path / "h.npy").write_bytes(data[:40])
    with pytest.raises(FormatError, match="not a valid npy header"):
        open_reader(tmp_path / "h.npy")


def test_corrupt_compressed_data_is_a_format_error_at_read(tmp_path) -> None:
    path = tmp_path / "c.npz"
    np.savez_compressed(path, w=np.arange(4000, dtype=np.float32))
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("w.npy")
    mid = info.header_offset + 30 + len("w.npy") + info.compress_size // 2
    raw[mid : mid + 8] = b"\xff" * 8
    path.write_bytes(bytes(raw))
    with open_reader(path) as r, pytest.raises(FormatError, match=r"tensor 'w': member 'w.npy'"):
        r.read("w")


def test_members_that_are_not_arrays_are_listed_as_skipped(tmp_path) -> None:
    path = zip_of(
        tmp_path / "m.npz", {"a.npy": npy_bytes(np.ones(2)), "README.txt": b"hello", "sub/": b""}
    )
    with open_reader(path) as r:
        assert r.specs().names == ["a"]
        assert r.skipped == {"README.txt": "not an .npy member", "sub/": "not an .npy member"}


def test_detect_claims_npz_but_not_other_zips(tmp_path) -> None:
    def head(path) -> bytes:
        with open(path, "rb") as f:
            return f.read(64)

    np.savez(tmp_path / "a.npz", x=np.ones(1))
    torch_like = zip_of(
        tmp_path / "m.bin", {"archive/data.pkl": b"\x80\x02}q\x00.", "archive/data/0": b"\0" * 8}
    )
    later = zip_of(tmp_path / "late.npz", {"notes.txt": b"x", "w.npy": npy_bytes(np.ones(2))})
    renamed = zip_of(tmp_path / "w.zip", {"w.npy": npy_bytes(np.ones(2))})
    np.savez(tmp_path / "empty.npz")
    long_name = "a" * 100
    named = zip_of(tmp_path / "long.zip", {f"{long_name}.npy": npy_bytes(np.ones(2))})
    assert npio.detect(str(tmp_path / "a.npz"), head(tmp_path / "a.npz"))
    assert not npio.detect(str(torch_like), head(torch_like))
    assert npio.detect(str(later), head(later))
    assert npio.detect(str(renamed), head(renamed))
    assert npio.detect(str(named), head(named))  # name longer than the head: read from the file
    assert npio.detect(str(tmp_path / "empty.npz"), head(tmp_path / "empty.npz"))
    with open_reader(tmp_path / "empty.npz") as r:
        assert len(r.specs()) == 0


def write_tiles(path, specs, tiles) -> npio.NpzWriter:
    w = npio.NpzWriter(str(path), specs)
    for name, tile, row in tiles:
        w.write(name, tile, row)
    return w


@pytest.mark.parametrize(
    "tiles,message",
    [
        ([("a", np.zeros((2, 3), np.float32), 1)], r"tile starts at row 1, but the 0 rows"),
        ([("a", np.zeros((2, 4), np.float32), 0)], r"a tile must have shape \(rows, 3\)"),
        ([("a", np.zeros((5, 3), np.float32), 0)], r"runs past its 4 rows"),
        ([("a", np.zeros((2, 3), np.float64), 0)], r"declared F32, but a tile of dtype float64"),
        (
            [("a", np.zeros((2, 3), np.float32), 0), ("s", np.zeros(()), 0)],
            r"while 'a' has 2 of its 4 rows",
        ),
        ([("zz", np.zeros(1), 0)], r"'zz' was not declared"),
        (
            [("a", np.zeros((4, 3), np.float32), 0), ("s", np.zeros((2,)), 0)],
            r"0-d: it takes one tile",
        ),
        (
            [
                ("a", np.zeros((4, 3), np.float32), 0),
                ("s", np.zeros(()), 0),
                ("a", np.zeros((1, 3), np.float32), 0),
            ],
            r"'a' was already written in full",
        ),
    ],
)
def test_writer_refuses_bad_tiles(tmp_path, tiles, message) -> None:
    specs = [TensorSpec("a", (4, 3), "F32"), TensorSpec("s", (), "F64")]
    w = npio.NpzWriter(str(tmp_path / "w.npz"), specs)
    with pytest.raises(FormatError, match=message):
        for name, tile, row in tiles:
            w.write(name, tile, row)
    w.abort()


def test_writer_takes_other_byte_orders_0d_as_one_element_and_skips_empty_tensors(tmp_path) -> None:
    specs = [
        TensorSpec("e", (0, 2), "F32"),
        TensorSpec("a", (3,), "I32"),
        TensorSpec("s", (), "F64"),
        TensorSpec("z", (2, 0), "BF16"),
    ]
    w = write_tiles(
        tmp_path / "w.npz",
        specs,
        [("a", np.arange(3, dtype=">i4"), 0), ("s", np.array([2.5]), 0)],
    )
    w.close()
    with np.load(tmp_path / "w.npz") as z:
        assert z.files == ["e", "a", "s", "z"]
        assert z["a"].tolist() == [0, 1, 2] and z["s"].shape == () and z["s"] == 2.5
        assert z["e"].shape == (0, 2) and z["z"].shape == (2, 0)


def test_writer_refuses_duplicates_and_an_oversized_comment(tmp_path) -> None:
    with pytest.raises(FormatError, match="contains a NUL character"):
        npio.NpzWriter(str(tmp_path / "n.npz"), [TensorSpec("a\0b", (1,), "F32")])
    with pytest.raises(FormatError, match="'a' is declared twice"):
        npio.NpzWriter(str(tmp_path / "d.npz"), [TensorSpec("a", (1,), "F32")] * 2)
    many = [TensorSpec(f"layer.{i}.weight", (1,), "BF16") for i in range(4000)]
    with pytest.raises(FormatError, match="more than the 65535 a zip comment holds"):
        npio.NpzWriter(str(tmp_path / "big.npz"), many)
    assert not (tmp_path / "big.npz").exists()  # refused before creating anything


def test_abort_leaves_nothing_open(tmp_path) -> None:
    w = npio.NpzWriter(str(tmp_path / "a.npz"), [TensorSpec("a", (4,), "F32")])
    w.write("a", np.zeros(2, np.float32), 0)
    w.abort()
    w.abort()  # idempotent
    (tmp_path / "a.npz").unlink()
