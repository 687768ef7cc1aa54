"""GGUF: the `gguf` package (gguf-py, llama.cpp's own) writes, we read, bit for bit.

Oracle tests need `gguf` (``pip install gguf``) and are skipped without it; hostile headers are
built byte by byte here and need nothing.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from helpers import is_memory_map

import weightbridge.io as wio
from weightbridge import dtypes
from weightbridge.errors import DtypeError, FormatError
from weightbridge.io import _gguf_quants as quants
from weightbridge.io import gguf as gg
from weightbridge.spec import TensorSpec

# Quantized types gguf-py can write from floats (the others are written as raw random blocks).
QUANTIZABLE = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
KERNELS = sorted(t.name for t in quants.TYPES.values() if t.kernel is not None)


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """The format is in the registry for this test (the lead adds the permanent row)."""
    if gg.NAME not in wio.FORMATS:
        monkeypatch.setattr(wio, "FORMATS", dict(wio.FORMATS))
        wio.register_format(gg.NAME, "weightbridge.io.gguf")


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal shapes and bytes (so NaN payloads compare too)."""
    return (
        a.shape == b.shape
        and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()
    )


def _write_with_gguf(path: Path, alignment: int | None = None) -> dict[str, Any]:
    """A GGUF written by gguf-py: plain and quantized tensors, key-values of every kind."""
    gguf = pytest.importorskip("gguf")
    G = gguf.GGMLQuantizationType
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_uint32("llama.block_count", 2)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_bool("test.flag", True)
    w.add_string("tokenizer.chat_template", "{% for m in messages %}" * 40)
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(100)])
    w.add_array("tokenizer.ggml.scores", [float(i) / 4 for i in range(100)])
    a = rng.standard_normal((6, 64)).astype(np.float32)
    tensors: dict[str, Any] = {
        "f32": a,
        "f16": a.astype(np.float16),
        "bf16": a.astype(ml_dtypes.bfloat16),
        "vec": rng.standard_normal(33).astype(np.float32),
        "cube": rng.standard_normal((2, 3, 5)).astype(np.float32),
        "ids": np.arange(12, dtype=np.int32).reshape(3, 4),
    }
    for name, arr in tensors.items():
        if arr.dtype == ml_dtypes.bfloat16:  # gguf-py takes bf16 as raw bytes
            raw = arr.view(np.uint8).reshape(arr.shape[0], -1)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=G.BF16)
        else:
            w.add_tensor(name, arr)
    for qname in QUANTIZABLE:
        q = gguf.quants.quantize(a, G[qname])
        w.add_tensor(qname.lower(), q, raw_shape=q.shape, raw_dtype=G[qname])
    for qname in KERNELS:  # every type we dequantize, as random blocks (NaN scales included)
        kind = quants.BY_NAME[qname]
        raw = rng.integers(0, 256, (4, 2 * kind.type_size), dtype=np.uint8)
        w.add_tensor(f"raw_{qname.lower()}", raw, raw_shape=raw.shape, raw_dtype=G[qname])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def test_every_tensor_reads_as_gguf_py_dequantizes_it(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    _write_with_gguf(tmp_path / "m.gguf")
    theirs = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    with gg.open_reader(str(tmp_path / "m.gguf")) as r:
        assert r.specs().names == [t.name for t in theirs.tensors]
        for t in theirs.tensors:
            ours = r.read(t.name)
            kind = quants.TYPES[int(t.tensor_type)]
            assert ours.shape == tuple(reversed(t.shape.tolist())), t.name
            if kind.code in (None, "F32", "F16", "BF16"):
                with np.errstate(all="ignore"):  # random blocks have NaN and inf scales
                    want = gguf.quants.dequantize(t.data, t.tensor_type)
                assert ours.dtype == np.float32 or kind.code is not None, t.name
                # plain types come back in their own dtype, equal to gguf-py's values
                assert _same_bits(ours.astype(np.float32), want), t.name
            else:  # integers: gguf-py's reader maps them as they are
                assert _same_bits(ours, np.asarray(t.data)), t.name
            assert not ours.flags.writeable


def test_plain_types_are_memory_maps_with_byte_ranges(tmp_path: Path) -> None:
    tensors = _write_with_gguf(tmp_path / "m.gguf")
    with gg.open_reader(str(tmp_path / "m.gguf")) as r:
        spec = r.specs()
        assert [spec[n].dtype for n in ("f32", "f16", "bf16", "ids")] == [
            "F32",
            "F16",
            "BF16",
            "I32",
        ]
        for name, arr in tensors.items():
            got = r.read(name)
            assert is_memory_map(got) and _same_bits(got, arr), name
            br = r.byte_range(name)
            assert br is not None and br.length == arr.nbytes and br.offset % 32 == 0
            with open(br.path, "rb") as f:
                f.seek(br.offset)
                assert f.read(br.length) == arr.tobytes()
        assert r.byte_range("q8_0") is None
        assert r.tensor_info("q8_0").kind.name == "Q8_0" and r.tensor_info("cube").ne == (5, 3, 2)


@pytest.mark.parametrize("dtype", ["F16", "BF16", "bf16"])
def test_dtype_option_chooses_the_dequantized_dtype(tmp_path: Path, dtype: str) -> None:
    gguf = pytest.importorskip("gguf")
    _write_with_gguf(tmp_path / "m.gguf")
    theirs = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    np_dtype = np.float16 if dtype == "F16" else ml_dtypes.bfloat16
    with gg.open_reader(str(tmp_path / "m.gguf"), dtype=dtype) as r:
        assert r.specs()["q4_0"].dtype == dtype.upper()
        assert r.specs()["f32"].dtype == "F32"  # plain types keep theirs
        t = theirs["q4_0"]
        want = gguf.quants.dequantize(t.data, t.tensor_type).astype(np_dtype)
        assert _same_bits(r.read("q4_0"), want)
    with pytest.raises(FormatError, match="cannot dequantize to 'int8'"):
        gg.open_reader(str(tmp_path / "m.gguf"), dtype="int8")


def test_dequantization_is_tiled_by_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(1)
    a = rng.standard_normal((37, 256)).astype(np.float32)
    w = gguf.GGUFWriter(str(tmp_path / "big.gguf"), "llama")
    q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("w", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    calls: list[int] = []
    real = quants.dequantize

    def spy(kind: quants.GgmlType, blocks: np.ndarray) -> np.ndarray:
        calls.append(blocks.size)
        return real(kind, blocks)

    monkeypatch.setattr(gg, "dequantize", spy)
    monkeypatch.setattr(gg, "_TILE_ELEMENTS", 5 * 256)  # 5 rows a tile
    with gg.open_reader(str(tmp_path / "big.gguf")) as r:
        got = r.read("w")
    assert len(calls) == 8 and max(calls) == 5 * 34 * 8  # 37 rows: 7 tiles of 5, one of 2
    assert _same_bits(got, gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0))


def test_key_values_are_kept_whole_and_shown_short(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    _write_with_gguf(tmp_path / "m.gguf", alignment=64)
    fields = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields
    with gg.open_reader(str(tmp_path / "m.gguf")) as r:
        kv = r.key_values()
        assert list(kv) == [k for k in fields if not k.startswith("GGUF.")]
        assert kv["general.alignment"] == gg.KeyValue("general.alignment", "UINT32", 64)
        assert kv["llama.block_count"].value == 2
        assert kv["tokenizer.ggml.tokens"].value == [f"tok{i}" for i in range(100)]
        assert kv["tokenizer.ggml.tokens"].item_type == "STRING"
        assert kv["tokenizer.ggml.scores"].value[:3] == [0.0, 0.25, 0.5]
        assert kv["test.flag"].value is True
        meta = r.specs().metadata
        assert meta["general.architecture"] == "llama"
        assert meta["test.flag"] == "true"
        assert meta["tokenizer.ggml.tokens"].endswith("...] (100 x STRING)")
        assert meta["tokenizer.chat_template"].endswith("(920 chars)")
        assert "Q8_0" in meta["gguf.dequantized"]
        assert r.byte_range("f32") is not None and r.byte_range("f32").offset % 64 == 0  # type: ignore[union-attr]


def test_detected_by_magic_and_converted_to_safetensors(tmp_path: Path, registered: None) -> None:
    pytest.importorskip("gguf")
    from safetensors.numpy import load_file

    from weightbridge import api

    _write_with_gguf(tmp_path / "m.gguf")
    odd = tmp_path / "model.bin"  # the magic decides, not the suffix
    odd.write_bytes((tmp_path / "m.gguf").read_bytes())
    assert wio.detect_format(str(odd)) == "gguf"
    assert wio.detect_format(str(tmp_path / "m.gguf")) == "gguf"
    api.convert(str(tmp_path / "m.gguf"), str(tmp_path / "out"))
    got: dict[str, np.ndarray] = {}
    for f in sorted((tmp_path / "out").glob("*.safetensors")):
        got.update(load_file(str(f)))
    with gg.open_reader(str(tmp_path / "m.gguf")) as r:
        assert sorted(got) == sorted(r.specs().names)
        for name in got:
            assert _same_bits(got[name], r.read(name)), name
        assert got["q8_0"].dtype == np.float32


# -- hand-built headers ------------------------------------------------------------------------


def _s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _header(
    tensors: list[tuple[str, tuple[int, ...], int, int]],
    kvs: bytes = b"",
    n_kv: int = 0,
    version: int = 3,
    n_tensors: int | None = None,
) -> bytes:
    out = b"GGUF" + struct.pack(
        "<IQQ", version, len(tensors) if n_tensors is None else n_tensors, n_kv
    )
    out += kvs
    for name, ne, type_id, offset in tensors:
        out += _s(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne)
        out += struct.pack("<IQ", type_id, offset)
    return out + b"\0" * (-len(out) % 32)


def _file(tmp_path: Path, data: bytes) -> str:
    path = tmp_path / "x.gguf"
    path.write_bytes(data)
    return str(path)


def test_a_hand_built_file_reads(tmp_path: Path) -> None:
    data = _header([("a", (3, 2), 0, 0), ("b", (4,), 1, 32)]) + np.arange(6, dtype="<f4").tobytes()
    data += b"\0" * 8 + np.arange(4, dtype="<f2").tobytes()
    with gg.open_reader(_file(tmp_path, data)) as r:
        assert r.read("a").tolist() == [[0, 1, 2], [3, 4, 5]]
        assert r.read("b").tolist() == [0, 1, 2, 3]
    assert gg.detect("x.gguf", data[:64]) and not gg.detect("x.gguf", b"GGML")


_GOOD = _header([("w", (32, 2), 8, 0)]) + bytes(68)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"GGU", "truncated: the magic at byte 0 needs 4 bytes, the file has 3"),
        (b"GGUF\x03\x00", "truncated: the version"),
        (_header([], version=1), "GGUF version 1 is not read"),
        (_header([], version=3 << 24), "big-endian GGUF"),
        (_header([], n_tensors=1 << 60), r"declares 1152921504606846976 tensors, which cannot fit"),
        (_header([], n_kv=1 << 40), "declares 1099511627776 key-values"),
        (_header([], kvs=_s("k")[:8], n_kv=1), "declares 1 key-values, which cannot fit in the 8"),
        (
            _header([], kvs=struct.pack("<Q", 1 << 62) + b"abcd" * 4, n_kv=1),
            r"truncated: the key of key-value 0 at byte 32 needs 4611686018427387904 bytes",
        ),
        (_header([], kvs=_s("k") + struct.pack("<I", 13) + bytes(8), n_kv=1), "value type 13"),
        (
            _header([], kvs=_s("k") + struct.pack("<IIQ", 9, 4, 1 << 50) + bytes(8), n_kv=1),
            "declares 1125899906842624 items in key-value 'k'",
        ),
        (
            _header([], kvs=_s("k") + struct.pack("<IIQ", 9, 8, 1 << 23) + bytes(8 << 23), n_kv=1),
            r"key-value 'k' brings the header's array items to 8388608, over the 4194304",
        ),
        (
            _header([], kvs=(_s("k") + struct.pack("<IB", 0, 1)) * 2, n_kv=2),
            "key 'k' appears twice",
        ),
        (
            _header([], kvs=_s("general.alignment") + struct.pack("<II", 4, 48), n_kv=1),
            "general.alignment must be a UINT32 power of two, found UINT32 48",
        ),
        (_header([("w", (32, 2), 99, 0)]) + bytes(68), r"tensor 'w' has GGML type id 99"),
        (_header([("w", (1,) * 9, 0, 0)]), r"tensor 'w' has 9 dimensions"),
        (_header([("w", (30, 2), 8, 0)]) + bytes(68), r"tensor 'w': rows of 30 elements"),
        (_GOOD[:-1], r"tensor 'w': file is truncated .* \[96, 164\), the file has 163 bytes"),
        (_header([("w", (32, 2), 8, 1 << 40)]) + bytes(68), r"tensor 'w': file is truncated"),
        (
            _header([("w", (32, 2), 8, 4)]) + bytes(72),
            r"tensor 'w': data offset 4 is not a multiple",
        ),
        (_header([("w", (1 << 62, 1 << 62), 0, 0)]), r"tensor 'w': dimensions .* are absurd"),
        (
            _header([("a", (16,), 0, 0), ("b", (16,), 0, 32)]) + bytes(128),
            r"tensor 'b' at byte 128 overlaps tensor 'a', which ends at 160",
        ),
        (
            _header([("a", (8,), 0, 0), ("a", (8,), 0, 32)]) + bytes(64),
            "tensor 'a' is declared twice",
        ),
        (_header([("@@@", (8,), 0, 0)]).replace(b"@@@", b"\xff\xfe\xfd"), "is not UTF-8"),
    ],
)
def test_hostile_headers_are_clear_format_errors(tmp_path: Path, data: bytes, message: str) -> None:
    path = _file(tmp_path, data)
    with pytest.raises(FormatError, match=message) as e:
        gg.open_reader(path)
    assert str(e.value).startswith(path)


def test_a_type_without_a_dequantizer_is_refused_by_name_on_read(tmp_path: Path) -> None:
    iq = quants.BY_NAME["IQ2_XXS"]
    path = _file(tmp_path, _header([("w", (256,), iq.id, 0)]) + bytes(iq.type_size))
    with gg.open_reader(path) as r:
        assert r.specs()["w"].shape == (256,)  # listed with its shape
        with pytest.raises(DtypeError, match=r"tensor 'w' is IQ2_XXS, which weightbridge cannot"):
            r.read("w")


def test_kernel_table_matches_gguf_py() -> None:
    gguf = pytest.importorskip("gguf")
    for t in quants.TYPES.values():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t.id)] == (t.block_size, t.type_size)
        assert gguf.GGMLQuantizationType(t.id).name == t.name


# What a read may allocate beyond the output tensor: a few tiles of kernel temporaries (4 MB
# each) plus allocator slack. gguf-py's whole-tensor dequantize needs several output sizes more.
_READ_SLACK = 24 << 20

_CAPPED_READ = """
import resource, sys
import numpy as np
from weightbridge.io import gguf
with open("/proc/self/status") as f:
    fields = dict(line.split(":", 1) for line in f)
data = int(fields["VmData"].split()[0]) * 1024
out_bytes, slack = int(sys.argv[2]), int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_DATA, (data + out_bytes + slack, resource.RLIM_INFINITY))
with gguf.open_reader(sys.argv[1]) as r:
    a = r.read("w")
    print("read", a.shape, a.dtype, float(a[-1, -8:].sum()))
try:
    np.ones(2 * out_bytes, np.uint8)  # the cap bites: twice the output does not fit
    print("cap did not bite")
except MemoryError:
    print("cap bites")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and RLIMIT_DATA")
def test_dequantizing_stays_within_the_output_plus_a_few_tiles(tmp_path: Path) -> None:
    rows, cols = 2048, 4096  # a Q8_0 tensor of 8.9 MB, read as 32 MB of float32
    kind = quants.BY_NAME["Q8_0"]
    rng = np.random.default_rng(0)
    blocks = rng.integers(-127, 128, (rows * cols // 32, 34), dtype=np.int8).view(np.uint8)
    blocks[:, :2] = np.full((len(blocks), 1), np.float16(0.01)).view(np.uint8)
    path = _file(tmp_path, _header([("w", (cols, rows), kind.id, 0)]) + blocks.tobytes())
    out_bytes = rows * cols * 4
    proc = subprocess.run(
        [sys.executable, "-c", _CAPPED_READ, path, str(out_bytes), str(_READ_SLACK)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "read (2048, 4096) float32" in proc.stdout and "cap bites" in proc.stdout, proc.stdout


# -- writing -----------------------------------------------------------------------------------


@pytest.fixture
def writable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The format is in the registry for writing too (the lead adds the permanent row)."""
    monkeypatch.setattr(wio, "FORMATS", dict(wio.FORMATS))
    wio.register_format(
        gg.NAME, "weightbridge.io.gguf", output_names=("gguf",), write_suffixes=(".gguf",)
    )


def _sample(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "tok_embd.weight": rng.standard_normal((10, 8)).astype(np.float32),
        "blk.0.attn_q.weight": rng.standard_normal((8, 8)).astype(np.float16),
        "blk.0.ffn_up.weight": rng.standard_normal((16, 8)).astype(ml_dtypes.bfloat16),
        "blk.0.attn_norm.weight": rng.standard_normal(8).astype(np.float32),
        "cube": rng.standard_normal((2, 3, 4, 5)).astype(np.float64),
        "positions": np.arange(7, dtype=np.int64),
        "scale": np.array(0.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }


def test_what_we_write_gguf_py_reads_equal_to_the_source(tmp_path: Path, writable: None) -> None:
    gguf = pytest.importorskip("gguf")
    arrays = _sample(np.random.default_rng(3))
    path = str(tmp_path / "out.gguf")
    wio.write_checkpoint(path, arrays, metadata={"general.architecture": "llama"})
    theirs = gguf.GGUFReader(path)
    assert [t.name for t in theirs.tensors] == list(arrays)
    for t in theirs.tensors:
        src = arrays[t.name]
        assert tuple(reversed(t.shape.tolist())) == src.shape or src.ndim == 0, t.name
        assert np.asarray(t.data).tobytes() == src.tobytes(), t.name
        assert t.data_offset % 32 == 0
    arch = theirs.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "llama"
    with gg.open_reader(path) as r:  # and we read it back, bit for bit
        for name, src in arrays.items():
            assert _same_bits(r.read(name), src), name


def test_key_values_copied_from_a_gguf_keep_their_types(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    _write_with_gguf(tmp_path / "src.gguf", alignment=64)
    with gg.open_reader(str(tmp_path / "src.gguf")) as r:
        kvs = list(r.key_values().values())
    arrays = _sample(np.random.default_rng(4))
    specs = [TensorSpec(k, a.shape, dtypes.from_numpy(a.dtype)) for k, a in arrays.items()]
    w = gg.GgufWriter(str(tmp_path / "out.gguf"), specs, key_values=kvs)
    for k, a in arrays.items():
        w.write(k, a, 0)
    w.close()
    fields = gguf.GGUFReader(str(tmp_path / "out.gguf")).fields
    with gg.open_reader(str(tmp_path / "out.gguf")) as back:
        assert list(back.key_values().values()) == kvs
        assert back.byte_range("cube").offset % 64 == 0  # type: ignore[union-attr]
    assert fields["tokenizer.ggml.tokens"].types == [
        gguf.GGUFValueType.ARRAY,
        gguf.GGUFValueType.STRING,
    ]


def test_convert_safetensors_to_gguf(tmp_path: Path, writable: None) -> None:
    gguf = pytest.importorskip("gguf")
    from safetensors.numpy import save_file

    from weightbridge import api

    arrays = {
        k: v for k, v in _sample(np.random.default_rng(5)).items() if v.dtype != ml_dtypes.bfloat16
    }
    save_file(arrays, str(tmp_path / "m.safetensors"))
    api.convert(str(tmp_path / "m.safetensors"), str(tmp_path / "out"), format="gguf")
    (out,) = sorted((tmp_path / "out").glob("*.gguf"))
    got = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(out)).tensors}
    assert sorted(got) == sorted(arrays)
    for name, src in arrays.items():
        assert got[name].tobytes() == src.tobytes(), name


@pytest.mark.parametrize(
    "spec, message",
    [
        (("w", (2,), "U8"), "GGUF has no type for U8"),
        (("w", (1, 1, 1, 1, 1), "F32"), "has 5 dimensions; GGUF tensors have at most 4"),
    ],
)
def test_writer_refuses_what_gguf_cannot_hold(
    tmp_path: Path, spec: tuple[Any, ...], message: str
) -> None:
    with pytest.raises(FormatError, match=message):
        gg.GgufWriter(str(tmp_path / "x.gguf"), [TensorSpec(*spec)])


def test_writer_refuses_to_close_with_missing_rows(tmp_path: Path) -> None:
    w = gg.GgufWriter(str(tmp_path / "x.gguf"), [TensorSpec("w", (4, 2), "F32")])
    w.write("w", np.zeros((3, 2), np.float32), 0)
    with pytest.raises(FormatError, match=r"'w' \(3 of 4 rows\)"):
        w.close()
    w.abort()


@pytest.mark.parametrize("qname", sorted(quants.QUANTIZERS))
def test_quantize_is_bit_exact_with_gguf_py(qname: str) -> None:
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(6)
    halves = (rng.integers(-40, 40, (16, 64)) / 2).astype(np.float32)  # ties to round
    edges = np.array([0.49999997, 0.5, -0.5, 1.5, -2.5, 127, -127, 3e38, -3e38, 1e-40], np.float32)
    for a in (
        rng.standard_normal((32, 128)).astype(np.float32),
        np.zeros((2, 64), np.float32),
        halves,
        np.resize(edges, (4, 64)),
        (rng.standard_normal((8, 64)) * 1e-30).astype(np.float32),
    ):
        with np.errstate(all="ignore"):
            want = gguf.quants.quantize(a, gguf.GGMLQuantizationType[qname])
        assert quants.quantize(quants.BY_NAME[qname], a).tobytes() == want.tobytes()


@pytest.mark.parametrize("qname", sorted(quants.QUANTIZERS))
def test_writer_quantizes_tile_by_tile_as_gguf_py_does(tmp_path: Path, qname: str) -> None:
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(7)
    w_src = rng.standard_normal((9, 64)).astype(np.float32)
    h_src = rng.standard_normal((4, 32)).astype(np.float16)
    norm = rng.standard_normal(64).astype(np.float32)
    specs = [
        TensorSpec("w", w_src.shape, "F32"),
        TensorSpec("h", h_src.shape, "F16"),
        TensorSpec("norm", norm.shape, "F32"),
    ]
    path = str(tmp_path / "q.gguf")
    w = gg.GgufWriter(path, specs, quantize={"w": qname, "h": qname.lower()})
    for r in range(0, 9, 2):
        w.write("w", w_src[r : r + 2], r)
    w.write("h", h_src, 0)
    w.write("norm", norm, 0)
    w.close()
    theirs = {t.name: t for t in gguf.GGUFReader(path).tensors}
    G = gguf.GGMLQuantizationType
    assert theirs["w"].tensor_type == G[qname] and theirs["norm"].tensor_type == G.F32
    assert np.asarray(theirs["w"].data).tobytes() == gguf.quants.quantize(w_src, G[qname]).tobytes()
    h32 = h_src.astype(np.float32)
    assert np.asarray(theirs["h"].data).tobytes() == gguf.quants.quantize(h32, G[qname]).tobytes()
    with gg.open_reader(path) as r:  # and reads back as gguf-py's quantize -> dequantize
        want = gguf.quants.dequantize(gguf.quants.quantize(w_src, G[qname]), G[qname])
        assert _same_bits(r.read("w"), want)


@pytest.mark.parametrize(
    "spec, qname, message",
    [
        (("w", (2, 30), "F32"), "Q8_0", "rows of 30 elements are not whole Q8_0 blocks"),
        (("w", (2, 32), "I32"), "Q8_0", "only float tensors are quantized"),
        (
            ("w", (2, 32), "F32"),
            "Q4_K",
            r"cannot quantize to 'Q4_K'; choose one of \['Q4_0', 'Q8_0'\]",
        ),
    ],
)
def test_writer_refuses_quantizing_what_it_cannot(
    tmp_path: Path, spec: tuple[Any, ...], qname: str, message: str
) -> None:
    with pytest.raises(FormatError, match=message):
        gg.GgufWriter(str(tmp_path / "x.gguf"), [TensorSpec(*spec)], quantize={"w": qname})
