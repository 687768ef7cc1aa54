"""Writing GGUF from a conversion: ``--dtype q8_0``/``q4_0``, ``--gguf-metadata``, split sets.

Real files and gguf-py (`gguf`, the package llama.cpp ships) as the oracle: quantized tensors
hold the bytes `gguf.quants.quantize` makes, key-values copied from a GGUF that `gguf.GGUFWriter`
wrote keep their types and values, and a split set equals, byte for byte, the one
`GGUFWriter(split_max_size=...)` writes from the same tensors and key-values.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from weightbridge import api, cli, dtypes
from weightbridge import io as wio
from weightbridge.errors import FormatError, SpecError, VerifyError
from weightbridge.io import gguf as gg
from weightbridge.plan import Plan
from weightbridge.spec import TensorSpec

gguf = pytest.importorskip("gguf")
G = gguf.GGMLQuantizationType

# GGUF names, as `--rules llama_hf_to_gguf` makes them, one of each kind llama.cpp's
# `--outtype q8_0` treats differently: name -> (shape, dtype, the GGML type it gets).
LLAMA = {
    "token_embd.weight": ((96, 64), np.float32, "Q"),
    "blk.0.attn_norm.weight": ((64,), ml_dtypes.bfloat16, "F32"),  # 1-D: F32
    "blk.0.attn_q.weight": ((64, 64), ml_dtypes.bfloat16, "Q"),
    "blk.0.attn_q.bias": ((64,), np.float16, "F32"),  # 1-D
    "blk.0.ffn_gate_inp.weight": ((8, 64), np.float32, "F32"),  # a MoE router: always F32
    "blk.0.ffn_up.weight": ((48, 40), np.float16, "F16"),  # rows of 40: not whole blocks
    "blk.0.ffn_down.weight": ((40, 96), np.float16, "Q"),
    "blk.0.attn_k_norm.weight": ((2, 64), np.float32, "F32"),  # a norm, even 2-D
    "rope_freqs.idx": ((64, 32), np.float32, "F32"),  # not a .weight
    "positions": ((4, 32), np.int32, "I32"),  # integers stay as they are
}


def _llama(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, (shape, dtype, _) in LLAMA.items():
        if np.dtype(dtype).kind == "i":
            arrays[name] = rng.integers(-9, 9, shape).astype(dtype)
        else:
            a = rng.standard_normal(shape).astype(np.float32) * 3
            a.reshape(-1)[::17] = 0.0  # zeros and an all-zero block: scale 0
            if a.size >= 64:
                a.reshape(-1)[:32] = 0.0
            arrays[name] = a.astype(dtype)
    save_file(arrays, str(path))
    return arrays


def _vocab_only(path: Path, *, alignment: int | None = None, split: bool = False) -> None:
    """A GGUF with key-values and no tensors, as ``convert_hf_to_gguf.py --vocab-only`` writes."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(1)
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_head_count(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_file_type(1)  # MOSTLY_F16: what the vocab-only run was asked for
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>", "\u2581a", "\u00e9t\u00e9"])
    w.add_token_scores([0.0, 0.0, 0.0, -1.25, -2.5])
    w.add_token_types([2, 3, 3, 1, 1])
    w.add_bos_token_id(1)
    w.add_add_bos_token(True)
    w.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    if split:  # a stale layout key: ours must win
        w.add_uint16("split.count", 7)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()


def _fields(path: str | Path) -> dict[str, Any]:
    """Key-values of a GGUF as gguf-py reads them: key -> (value types, raw value bytes)."""
    r = gguf.GGUFReader(str(path))
    return {
        k: (f.types, [bytes(f.parts[i]) for i in f.data])
        for k, f in r.fields.items()
        if not k.startswith("GGUF.")
    }


def _tensors(path: str | Path) -> dict[str, Any]:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("qname", ["Q8_0", "Q4_0"])
def test_quantized_as_llama_cpp_and_bit_exact_with_gguf_py(tmp_path: Path, qname: str) -> None:
    src = _llama(tmp_path / "src.safetensors")
    out = tmp_path / "out"
    report = api.convert(
        str(tmp_path / "src.safetensors"), str(out), format="gguf", dtype=qname.lower()
    )
    assert report.shards == ["model.gguf"]
    theirs = _tensors(out / "model.gguf")
    assert sorted(theirs) == sorted(src)
    for name, (shape, _, kind) in LLAMA.items():
        t, a = theirs[name], src[name]
        want_type = qname if kind == "Q" else kind
        assert t.tensor_type.name == want_type, name
        assert tuple(int(d) for d in reversed(t.shape.tolist())) == shape
        raw = np.asarray(t.data).tobytes()
        if kind == "Q":  # the bytes gguf-py's quantize makes from the float32 values
            assert raw == gguf.quants.quantize(a.astype(np.float32), G[qname]).tobytes(), name
        else:
            assert raw == a.astype(dtypes.to_numpy(want_type)).tobytes(), name
    # Our reader gives gguf-py's quantize -> dequantize, bit for bit.
    with wio.open_reader(str(out)) as r:
        for name, (_, _, kind) in LLAMA.items():
            if kind == "Q":
                q = gguf.quants.quantize(src[name].astype(np.float32), G[qname])
                want = gguf.quants.dequantize(q, G[qname])
                assert r.read(name).tobytes() == want.astype(np.float32).tobytes(), name
    ftype = _fields(out / "model.gguf")["general.file_type"]
    assert ftype == ([gguf.GGUFValueType.UINT32], [np.uint32(gg._FILE_TYPES[qname]).tobytes()])
    # The plan says what was quantized and what was not.
    note = [
        n for n in Plan.load(str(out / ".weightbridge-plan.json")).notes if n.kind == "quantize"
    ]
    assert len(note) == 1
    assert f"3 tensor(s) quantized to {qname}" in note[0].text
    assert "1 in F16 (rows not whole blocks of 32" in note[0].text
    assert "blk.0.ffn_up.weight" in note[0].text


def test_the_rule_names_the_same_tensors_as_gguf_py_tables() -> None:
    """The F32-always names are gguf-py's own tensor names (a renamed table shows here)."""
    T = gguf.MODEL_TENSOR
    for key in (T.FFN_GATE_INP, T.POS_EMBD, T.TOKEN_TYPES, T.SSM_CONV1D, T.TIME_MIX_FIRST):
        name = gguf.TENSOR_NAMES[key].format(bid=3) + ".weight"
        assert gg.stored_type(TensorSpec(name, (64, 64), "BF16"), "Q8_0") == "F32", name
    for key in (T.TOKEN_EMBD, T.OUTPUT, T.ATTN_Q, T.FFN_DOWN, T.ATTN_OUT):
        name = gguf.TENSOR_NAMES[key].format(bid=3) + ".weight"
        assert gg.stored_type(TensorSpec(name, (64, 64), "BF16"), "Q8_0") == "Q8_0", name


def test_a_quantized_type_with_another_format_is_a_clear_error(tmp_path: Path) -> None:
    _llama(tmp_path / "src.safetensors")
    with pytest.raises(SpecError, match=r"dtype 'q8_0' .* output format is 'safetensors': add"):
        api.convert(str(tmp_path / "src.safetensors"), str(tmp_path / "o"), dtype="q8_0")
    with pytest.raises(SpecError, match="gguf_metadata .* format is 'npz'"):
        api.convert(
            str(tmp_path / "src.safetensors"),
            str(tmp_path / "o"),
            format="npz",
            gguf_metadata=str(tmp_path / "src.safetensors"),
        )
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_key_values_are_copied_and_our_layout_keys_win(tmp_path: Path) -> None:
    _llama(tmp_path / "src.safetensors")
    _vocab_only(tmp_path / "vocab.gguf", alignment=64, split=True)
    out = tmp_path / "out"
    api.convert(
        str(tmp_path / "src.safetensors"),
        str(out),
        format="gguf",
        gguf_metadata=str(tmp_path / "vocab.gguf"),
    )
    theirs, ours = _fields(tmp_path / "vocab.gguf"), _fields(out / "model.gguf")
    for key, value in theirs.items():
        if key in ("general.alignment", "split.count"):
            assert key not in ours, key  # the layout is ours: default alignment, one file
        else:
            assert ours[key] == value, key
    assert all(t.data_offset % 32 == 0 for t in _tensors(out / "model.gguf").values())
    with gg.open_reader(str(out / "model.gguf")) as r:
        tokens = r.key_values()["tokenizer.ggml.tokens"]
        assert tokens.value == ["<unk>", "<s>", "</s>", "\u2581a", "\u00e9t\u00e9"]
        assert tokens.item_type == "STRING"


@pytest.mark.parametrize("kind", ["missing", "not gguf"])
def test_a_bad_metadata_file_is_a_clear_error_naming_it(tmp_path: Path, kind: str) -> None:
    _llama(tmp_path / "src.safetensors")
    bad = tmp_path / "vocab.gguf"
    if kind == "not gguf":
        bad.write_bytes(b"PK\x03\x04 not a gguf at all")
    message = "no such GGUF file" if kind == "missing" else "not a GGUF file"
    with pytest.raises(FormatError, match=f"--gguf-metadata: {bad}: {message}"):
        api.convert(
            str(tmp_path / "src.safetensors"), str(tmp_path / "o"), format="gguf", gguf_metadata=bad
        )
    assert not (tmp_path / "o").exists()


def _f32_model(path: Path) -> dict[str, np.ndarray]:
    """Ten F32 tensors of 4-16 KB: a few llama.cpp splits at a 20 KB limit."""
    rng = np.random.default_rng(5)
    arrays = {
        f"blk.{i}.ffn_up.weight": rng.standard_normal((8 * (i % 4 + 1), 128)) for i in range(10)
    }
    arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    save_file(arrays, str(path))
    return arrays


@pytest.mark.parametrize("dtype", [None, "q8_0"])
def test_split_set_equals_gguf_py_split_writer_byte_for_byte(
    tmp_path: Path, dtype: str | None
) -> None:
    """Q8_0 too: splits are sized by the bytes stored (the quantized tensors), as gguf-py's
    ``split_max_size`` counts them, so they fill the limit rather than about half of it."""
    src = _f32_model(tmp_path / "src.safetensors")
    _vocab_only(tmp_path / "vocab.gguf")
    out = tmp_path / "out"
    report = api.convert(
        str(tmp_path / "src.safetensors"),
        str(out),
        format="gguf",
        dtype=dtype,
        max_shard_size=20_000,
        gguf_metadata=str(tmp_path / "vocab.gguf"),
    )
    n = len(report.shards)
    assert n >= 3 if dtype is None else n == 2  # 160 KB of F32, 42.5 KB of Q8_0
    # The index's total_size is the tensor bytes stored, as gguf-py reads the files.
    index = json.loads((out / "model.gguf.index.json").read_text())
    stored = sum(_stored_sizes(out / name) for name in report.shards)
    assert index["metadata"]["total_size"] == stored == report.bytes_written
    assert report.shards == [f"model-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    # gguf-py writes the same tensors, in the same order, with the same key-values.
    with wio.open_reader(str(out)) as r:
        order = [t.name for t in r.specs()]
    ref = tmp_path / "ref"
    ref.mkdir()
    w = gguf.GGUFWriter(str(ref / "model.gguf"), arch=None, split_max_size=20_000)  # type: ignore[arg-type]
    with gg.open_reader(str(tmp_path / "vocab.gguf")) as v:
        for kv in v.key_values().values():
            if dtype is not None and kv.key == "general.file_type":  # ours: MOSTLY_Q8_0
                kv = gg.KeyValue(kv.key, kv.type, int(gguf.LlamaFileType.MOSTLY_Q8_0))
            _add_field(w, kv)
    for name in order:
        if dtype is None:
            w.add_tensor(name, src[name])
        else:
            w.add_tensor(name, gguf.quants.quantize(src[name], G.Q8_0), raw_dtype=G.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for name in report.shards:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    # Each split as gguf-py reads it: split keys everywhere, other key-values in the first only.
    for i, name in enumerate(report.shards):
        fields = _fields(out / name)
        assert fields["split.no"] == ([gguf.GGUFValueType.UINT16], [np.uint16(i).tobytes()])
        assert fields["split.count"] == ([gguf.GGUFValueType.UINT16], [np.uint16(n).tobytes()])
        assert fields["split.tensors.count"] == (
            [gguf.GGUFValueType.INT32],
            [np.int32(len(src)).tobytes()],
        )
        assert ("tokenizer.ggml.tokens" in fields) == (i == 0)
        assert len(fields) == (3 if i else 3 + len(_fields(tmp_path / "vocab.gguf")))


def _add_field(w: Any, kv: gg.KeyValue) -> None:
    """Add one of our key-values to a gguf-py writer, with its type."""
    vt = gguf.GGUFValueType
    if kv.type == "ARRAY":
        w.add_key_value(kv.key, kv.value, vt.ARRAY, sub_type=vt[kv.item_type])
    else:
        w.add_key_value(kv.key, kv.value, vt[kv.type])


@pytest.mark.parametrize("given", ["first", "folder"])
def test_a_split_set_reads_whole_from_its_first_file_or_folder(tmp_path: Path, given: str) -> None:
    """gguf-py's split set (no index beside it): detected as GGUF and read whole."""
    src = _f32_model(tmp_path / "src.safetensors")
    ref = tmp_path / "ref"
    ref.mkdir()
    w = gguf.GGUFWriter(str(ref / "tiny.gguf"), "llama", split_max_size=20_000)
    for name, a in src.items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    files = sorted(os.listdir(ref))
    assert len(files) >= 3 and files[0].startswith("tiny-00001-of-")
    path = str(ref / files[0]) if given == "first" else str(ref)
    assert wio.detect_format(path) == "gguf"
    with wio.open_reader(path) as r:
        assert [t.name for t in r.specs()] == list(src)
        assert r.specs().metadata["general.architecture"] == "llama"
        for name, a in src.items():
            assert r.read(name).tobytes() == a.tobytes(), name
        assert len(r.files()) == len(files)
    # ... and converts, as one checkpoint, to one file.
    api.convert(path, str(tmp_path / "one"), format="gguf")
    with wio.open_reader(str(tmp_path / "one" / "model.gguf")) as r:
        assert [t.name for t in r.specs()] == list(src)


def test_a_split_set_missing_a_file_is_refused_by_name(tmp_path: Path) -> None:
    _f32_model(tmp_path / "src.safetensors")
    out = tmp_path / "out"
    report = api.convert(
        str(tmp_path / "src.safetensors"), str(out), format="gguf", max_shard_size=20_000
    )
    os.remove(out / report.shards[1])
    with pytest.raises(FormatError, match=f"{report.shards[1]}: missing"):
        gg.open_reader(str(out / report.shards[0]))


@pytest.mark.parametrize("dtype", [None, "q8_0"])
def test_split_set_resumes_byte_identical_and_is_complete_only_at_the_end(
    tmp_path: Path, dtype: str | None
) -> None:
    _llama(tmp_path / "src.safetensors")
    _vocab_only(tmp_path / "vocab.gguf")
    options: dict[str, Any] = {
        "format": "gguf",
        "dtype": dtype,
        "max_shard_size": 12_000,
        "gguf_metadata": str(tmp_path / "vocab.gguf"),
    }
    src = str(tmp_path / "src.safetensors")
    whole = api.convert(src, str(tmp_path / "whole"), **options)
    assert len(whole.shards) >= 3
    # Half the shards, as one part of a partitioned run (or a run killed half way): no index.
    out = tmp_path / "out"
    part = api.convert(src, str(out), partition=(1, 2), **options)
    assert 0 < len(part.written) < len(whole.shards)
    assert not (out / "model.gguf.index.json").exists()
    # A plain run finishes it: the committed shards are kept, the rest written, then the index.
    rest = api.convert(src, str(out), **options)
    assert sorted(rest.skipped) == sorted(part.written)
    assert sorted(rest.written + rest.skipped) == sorted(whole.shards)
    for name in [*whole.shards, "model.gguf.index.json"]:
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    # A damaged split is found and written again.
    damaged = out / whole.shards[-1]
    data = bytearray(damaged.read_bytes())
    data[-40] ^= 0xFF
    damaged.write_bytes(bytes(data))
    again = api.convert(src, str(out), **options)
    assert whole.shards[-1] in again.written
    for name in [*whole.shards, "model.gguf.index.json"]:
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert again.written == [whole.shards[-1]]
    assert api.convert(src, str(out), **options).written == []  # finished: nothing to do
    # The journal's checksum is of the bytes stored (Q8_0 blocks, not the tensors before
    # quantization): shards whose stamps changed (touched, copied) are re-checked by reading
    # them back, and kept.
    for name in whole.shards:
        os.utime(out / name, ns=(1_000_000_000, 1_000_000_000))
    rerun = api.convert(src, str(out), **options)
    assert rerun.written == [] and sorted(rerun.skipped) == sorted(whole.shards)
    # ... and one damaged in a tensor's data (a Q8_0 tensor's, with q8_0) is written again.
    victim, offset = next(
        (name, int(t.data_offset))
        for name in whole.shards
        for t in gguf.GGUFReader(str(out / name)).tensors
        if dtype is None or t.tensor_type == G.Q8_0
    )
    data = bytearray((out / victim).read_bytes())
    data[offset + 5] ^= 0xFF
    (out / victim).write_bytes(bytes(data))
    os.utime(out / victim, ns=(1_000_000_000, 1_000_000_000))
    assert api.convert(src, str(out), **options).written == [victim]
    for name in [*whole.shards, "model.gguf.index.json"]:
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_cli_quantizes_copies_key_values_and_splits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _llama(tmp_path / "src.safetensors")
    _vocab_only(tmp_path / "vocab.gguf")
    out = tmp_path / "out"
    code = cli.main(
        [
            "convert",
            str(tmp_path / "src.safetensors"),
            "-o",
            str(out),
            "--format",
            "gguf",
            "--dtype",
            "q8_0",
            "--gguf-metadata",
            str(tmp_path / "vocab.gguf"),
            "--max-shard-size",
            "12KB",
            "-q",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "note: quantize: GGUF Q8_0: 3 tensor(s) quantized to Q8_0" in printed
    first = sorted(p for p in os.listdir(out) if p.endswith(".gguf"))[0]
    assert _fields(out / first)["general.architecture"][1] == [b"llama"]
    with wio.open_reader(str(out / first)) as r:
        assert len(r.specs().tensors) == len(LLAMA)


def test_cli_refuses_q8_0_for_safetensors(tmp_path: Path) -> None:
    _llama(tmp_path / "src.safetensors")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "weightbridge",
            "convert",
            str(tmp_path / "src.safetensors"),
            "-o",
            str(tmp_path / "o"),
            "--dtype",
            "q8_0",
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "--dtype q8_0" in proc.stderr and "--format gguf" in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists()


# -- the memory bound -------------------------------------------------------------------------

MB = 1 << 20


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and RLIMIT_DATA")
def test_quantizing_splits_stay_within_largest_tensor_plus_256mb(tmp_path: Path) -> None:
    """512 MB of BF16 quantized to Q8_0 into splits under RLIMIT_DATA = baseline + 64 MB + 256 MB."""
    from test_memory_bound import BASELINE, random_array, run_capped

    rng = np.random.default_rng(0)
    names = [f"blk.{i}.ffn_up.weight" for i in range(8)]
    src = tmp_path / "src"
    src.mkdir()
    for k in range(2):  # two files of 4 x 64 MB
        part = {
            n: random_array(rng, (8192, 4096), ml_dtypes.bfloat16) for n in names[4 * k : 4 * k + 4]
        }
        save_file(part, str(src / f"part{k}.safetensors"))
        del part
    code, out, _ = run_capped(["-c", BASELINE, str(src / "part0.safetensors")], None)
    assert code == 0, out
    base_data, base_anon = map(int, out.split())
    tensor = 64 * MB
    cap, bound = base_data + tensor + 256 * MB, base_anon + tensor + 256 * MB
    child = textwrap.dedent(
        """
        import sys
        import numpy
        import weightbridge.api
        for k in range(2):
            r = weightbridge.api.convert(f"{sys.argv[1]}/part{k}.safetensors", f"{sys.argv[2]}/{k}",
                                         format="gguf", dtype="q8_0", max_shard_size="80MB")
            print(r.summary())
        """
    )
    code, out, peak = run_capped(["-c", child, str(src), str(tmp_path / "out")], cap, timeout=600)
    assert code == 0, f"failed under RLIMIT_DATA={cap / MB:.0f} MB:\n{out}"
    assert peak <= bound, f"peak RssAnon {peak / MB:.0f} MB > {bound / MB:.0f} MB"
    print(f"peak RssAnon {peak / MB:.0f} MB (bound {bound / MB:.0f} MB)")
    first = tmp_path / "out" / "0" / "model-00001-of-00002.gguf"
    with gg.open_reader(str(first)) as r:  # the split set, from its first file
        assert sorted(t.name for t in r.specs()) == names[:4]
        assert {r.tensor_info(n).kind.name for n in names[:4]} == {"Q8_0"}
    shutil.rmtree(tmp_path)  # 1 GB: not kept for pytest's last three runs


def test_a_folder_with_two_split_sets_asks_for_one(tmp_path: Path) -> None:
    src = _f32_model(tmp_path / "src.safetensors")
    folder = tmp_path / "sets"
    folder.mkdir()
    for stem in ("a", "b"):
        w = gguf.GGUFWriter(str(folder / f"{stem}.gguf"), "llama", split_max_size=20_000)
        for name, a in src.items():
            w.add_tensor(name, a)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    assert wio.detect_format(str(folder)) == "gguf"
    with pytest.raises(FormatError, match="several GGUF split sets .* pass the first file"):
        wio.open_reader(str(folder))


def test_the_writer_refuses_a_split_name_without_the_tensor_count(tmp_path: Path) -> None:
    spec = [TensorSpec("w", (2, 32), "F32")]
    with pytest.raises(FormatError, match="file 2 of a 3-file GGUF split set needs the number"):
        gg.GgufWriter(str(tmp_path / "model-00002-of-00003.gguf"), spec)
    w = gg.GgufWriter(str(tmp_path / "x.gguf"), spec, split=gg.Split(1, 3, 7))
    w.write("w", np.ones((2, 32), np.float32), 0)
    w.close()
    fields = _fields(tmp_path / "x.gguf")
    assert fields["split.no"][1] == [np.uint16(1).tobytes()]
    assert fields["split.tensors.count"][1] == [np.int32(7).tobytes()]


def _stored_sizes(path: Path) -> int:
    """The bytes of tensor data a GGUF file holds, as gguf-py reads its header."""
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)


@pytest.mark.parametrize(("qname", "split"), [("Q8_0", False), ("Q4_0", False), ("Q8_0", True)])
def test_verify_checks_quantized_tensors_exactly_and_finds_a_flipped_byte(
    tmp_path: Path, qname: str, split: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    _llama(tmp_path / "src.safetensors")
    src, out = str(tmp_path / "src.safetensors"), tmp_path / "out"
    options: dict[str, Any] = {"max_shard_size": 12_000} if split else {}
    report = api.convert(src, str(out), format="gguf", dtype=qname.lower(), **options)
    assert (len(report.shards) > 1) == split
    assert api.verify(src, str(out)) == len(LLAMA)
    assert cli.main(["verify", src, str(out)]) == 0
    assert f"verified {len(LLAMA)} tensors" in capsys.readouterr().out
    # One byte of a quantized tensor's blocks flipped: that tensor, and only it, is reported.
    victim, where = next(
        (out / name, t)
        for name in report.shards
        for t in gguf.GGUFReader(str(out / name)).tensors
        if t.name == "blk.0.attn_q.weight"
    )
    assert where.tensor_type == G[qname]
    pristine = victim.read_bytes()
    data = bytearray(pristine)
    data[int(where.data_offset) + where.n_bytes - 3] ^= 0x10  # a quant of the last block
    victim.write_bytes(bytes(data))
    with pytest.raises(VerifyError) as e:
        api.verify(src, str(out))
    text = str(e.value)
    assert "1 tensor(s) differ" in text, text
    assert "blk.0.attn_q.weight: values differ from the source ['blk.0.attn_q.weight'] " in text
    assert f"quantized to {qname} and back: 1 of 4096 elements differ" in text, text
    assert cli.main(["verify", src, str(out)]) == 2
    assert "blk.0.attn_q.weight" in capsys.readouterr().err
    victim.write_bytes(pristine)
    assert api.verify(src, str(out)) == len(LLAMA)


def test_verify_reports_q8_0_blocks_that_dequantize_the_same_and_a_wrong_type(
    tmp_path: Path,
) -> None:
    """A Q8_0 block whose scale is 0 dequantizes to zeros whatever its quants: the stored
    blocks are compared too. A tensor stored in another type than the plan's rule gives it
    is reported by its GGML type."""
    _llama(tmp_path / "src.safetensors")
    src, out = str(tmp_path / "src.safetensors"), tmp_path / "out"
    api.convert(src, str(out), format="gguf", dtype="q8_0")
    tensors = _tensors(out / "model.gguf")
    embd = tensors["token_embd.weight"]  # its first block is all zeros: scale 0
    assert embd.tensor_type == G.Q8_0
    data = bytearray((out / "model.gguf").read_bytes())
    assert data[int(embd.data_offset) : int(embd.data_offset) + 34] == bytes(34)
    data[int(embd.data_offset) + 2] ^= 0x01  # quant 0 -> 1, times scale 0: +0.0 still
    (out / "model.gguf").write_bytes(bytes(data))
    with pytest.raises(VerifyError, match=r"token_embd\.weight: the stored Q8_0 blocks differ"):
        api.verify(src, str(out))
    # The same output checked against a plan that quantizes to Q4_0: every quantized tensor
    # is the wrong type, named as stored.
    plan = Plan.load(str(out / ".weightbridge-plan.json"))
    q4 = gg.with_outtype(plan, "Q4_0")
    with pytest.raises(VerifyError, match=r"3 tensor\(s\) differ") as e:
        api.verify(src, str(out), plan=q4)
    assert "blk.0.attn_q.weight: output has (64, 64) Q8_0, plan makes (64, 64) Q4_0" in str(e.value)


@pytest.mark.parametrize("executor", [None, "processes:1"])
def test_bytes_written_and_the_progress_bar_count_the_bytes_stored(
    tmp_path: Path, executor: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    """Quantized to Q8_0 a tensor takes 34/64 of its BF16 bytes: the report, the progress bar
    and the free-space check (`convert.job_bytes`) count what is written, not the tensors
    before quantization."""
    _llama(tmp_path / "src.safetensors")
    src, out = str(tmp_path / "src.safetensors"), tmp_path / "out"
    plan = api.plan(src, dtype="q8_0")
    report = api.convert(
        src,
        str(out),
        plan=plan,
        format="gguf",
        dtype="q8_0",
        max_shard_size=12_000,
        progress=True,
        executor=executor,
    )
    stored = sum(_stored_sizes(out / name) for name in report.shards)
    assert report.bytes_written == stored < plan.target.nbytes
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()
    last = [line for line in bar if line.startswith("convert: 100%")][-1]
    total = f"{stored / 1000:.1f}k"
    assert f"{total}/{total}" in last, last
    # A rerun that resumes counts only the shard it rewrites.
    os.remove(out / report.shards[0])
    again = api.convert(
        src, str(out), plan=plan, format="gguf", dtype="q8_0", max_shard_size=12_000
    )
    assert again.written == [report.shards[0]]
    assert again.bytes_written == _stored_sizes(out / report.shards[0])
