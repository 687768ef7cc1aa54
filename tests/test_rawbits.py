"""Steps that only move bits: read as unsigned integers from the file, written with pwrite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zlib

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from weightbridge import api
from weightbridge.errors import FormatError
from weightbridge.io import open_reader
from weightbridge.io.safetensors import SafetensorsWriter
from weightbridge.ops import Cast, Concat, Permute, Reshape, Stack
from weightbridge.plan import Plan, Step
from weightbridge.spec import TensorSpec
from weightbridge.streaming import checksum, pipeline
from weightbridge.streaming.rawbits import RawSources


def _bf16(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32).astype(ml_dtypes.bfloat16)


def test_a_bf16_transpose_converts_without_importing_ml_dtypes(tmp_path) -> None:
    """Transposing bf16 weights needs no bf16 arithmetic, so not ml_dtypes (0.9 s to import
    with ml_dtypes 0.7): the output is still bit for bit the transpose."""
    rng = np.random.default_rng(0)
    tensors = {
        "fc.weight": _bf16(rng, 96, 40),
        "fc.bias": _bf16(rng, 96),
        "emb.weight": _bf16(rng, 50, 8),
    }
    save_file(tensors, str(tmp_path / "src.safetensors"))
    script = textwrap.dedent(
        f"""
        import sys
        from weightbridge import api
        api.convert({str(tmp_path / "src.safetensors")!r}, {str(tmp_path / "out")!r},
                    from_framework="pytorch", to_framework="flax")
        print("ml_dtypes" in sys.modules)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=True
    )
    assert done.stdout.strip() == "False", done.stderr
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    np.testing.assert_array_equal(
        out["fc.kernel"].view(np.uint16), tensors["fc.weight"].T.view(np.uint16)
    )
    np.testing.assert_array_equal(
        out["fc.bias"].view(np.uint16), tensors["fc.bias"].view(np.uint16)
    )


def test_casts_still_convert_values(tmp_path) -> None:
    """A cast is not a move: bf16 -> f32 goes through real bf16 values."""
    rng = np.random.default_rng(1)
    w = _bf16(rng, 24, 16)
    save_file({"fc.weight": w}, str(tmp_path / "src.safetensors"))
    api.convert(
        str(tmp_path / "src.safetensors"),
        str(tmp_path / "out"),
        from_framework="pytorch",
        to_framework="flax",
        dtype="float32",
    )
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    np.testing.assert_array_equal(out["fc.kernel"], w.T.astype(np.float32))


def _reader(tmp_path, **tensors: np.ndarray):
    path = str(tmp_path / "in.safetensors")
    save_file(tensors, path)
    return open_reader(path)


def test_only_moves_of_one_dtype_from_local_ranges_take_the_raw_path(tmp_path) -> None:
    rng = np.random.default_rng(2)
    reader = _reader(
        tmp_path, a=_bf16(rng, 4, 6), b=_bf16(rng, 4, 6), f=np.ones((4, 6), np.float32)
    )
    raw = RawSources(reader, reader.specs())
    moved = Step(TensorSpec("t", (6, 4), "BF16"), ("a",), (Permute((1, 0)),))
    stacked = Step(TensorSpec("s", (2, 4, 6), "BF16"), ("a", "b"), (Stack(0),))
    cast = Step(TensorSpec("c", (4, 6), "F32"), ("a",), (Cast("F32"),))
    mixed = Step(TensorSpec("m", (8, 6), "BF16"), ("a", "f"), (Concat(0),))
    try:
        assert raw.ranges(moved) is not None and raw.ranges(stacked) is not None
        assert raw.ranges(cast) is None and raw.ranges(mixed) is None
        (arr,) = raw.arrays(moved, raw.ranges(moved) or [])
        assert arr.dtype == np.uint16
        np.testing.assert_array_equal(arr, reader.read("a").view(np.uint16))
        raw.release(raw.ranges(moved) or [])
    finally:
        raw.close()
        reader.close()


@pytest.mark.parametrize("chunk", [64, 1 << 20])
def test_chunked_placing_equals_the_whole_transpose(tmp_path, monkeypatch, chunk) -> None:
    """Tiles made a few rows at a time (CHUNK_BYTES) in a reused buffer land where the whole
    transpose would, whatever the chunk size; the shard's CRC is the file's."""
    monkeypatch.setattr(pipeline, "CHUNK_BYTES", chunk)
    rng = np.random.default_rng(3)
    w = rng.standard_normal((37, 29), dtype=np.float32)
    v = rng.standard_normal((3, 5, 7), dtype=np.float32)
    save_file({"w": w, "v": v}, str(tmp_path / "src.safetensors"))
    reader = open_reader(str(tmp_path / "src.safetensors"))
    steps = [
        Step(TensorSpec("wt", (29, 37), "F32"), ("w",), (Permute((1, 0)),)),
        Step(TensorSpec("vr", (7, 15), "F32"), ("v",), (Permute((2, 0, 1)), Reshape((7, 15)))),
    ]
    plan = Plan.build(reader.specs(), steps)
    reader.close()
    api.convert(str(tmp_path / "src.safetensors"), str(tmp_path / "out"), plan=plan)
    path = tmp_path / "out" / "model.safetensors"
    out = load_file(str(path))
    np.testing.assert_array_equal(out["wt"], w.T)
    np.testing.assert_array_equal(out["vr"], v.transpose(2, 0, 1).reshape(7, 15))
    record = json.loads(
        next((tmp_path / "out" / ".weightbridge" / "committed").iterdir()).read_text()
    )
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little") + 8
    assert record["checksum"] == f"crc32:{zlib.crc32(data[header:]):08x}:{len(data) - header}"


def test_the_fast_crc_is_zlibs_crc() -> None:
    rng = np.random.default_rng(4)
    for n in (0, 1, 7, 4096, 1 << 20):
        data = rng.bytes(n)
        assert checksum.crc32(data) == zlib.crc32(data)
        assert checksum.crc32(data, 0xDEADBEEF) == zlib.crc32(data, 0xDEADBEEF)


def test_write_at_refuses_bytes_outside_the_tensor(tmp_path) -> None:
    writer = SafetensorsWriter(str(tmp_path / "x.safetensors"), [TensorSpec("a", (4,), "F32")])
    try:
        writer.write_at("a", 8, memoryview(np.zeros(2, np.float32)).cast("B"))
        with pytest.raises(FormatError, match="overrun tensor 'a'"):
            writer.write_at("a", 12, memoryview(np.zeros(2, np.float32)).cast("B"))
    finally:
        writer.abort()
    assert os.path.exists(tmp_path / "x.safetensors")  # abort leaves removal to the sink
