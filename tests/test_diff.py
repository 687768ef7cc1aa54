"""`weightbridge diff A B` and `weightbridge.diff`: two checkpoints compared tensor by tensor,
on real files in several formats, through the API and the command line (exit codes, output)."""

from __future__ import annotations

import json
import os
import shutil
import sys

import ml_dtypes
import numpy as np
import pytest
from test_cli import run

import weightbridge
from weightbridge import api
from weightbridge.compare import TILE_ELEMENTS, compare_values
from weightbridge.errors import FormatError, VerifyError
from weightbridge.io import write_checkpoint
from weightbridge.io.sharded import write_index


def tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "embed/weight": rng.standard_normal((16, 8)).astype(np.float32),
        "fc/kernel": rng.standard_normal((8, 4)).astype(np.float32),
        "fc/bias": rng.standard_normal(4).astype(np.float32),
        "step": np.array(7, np.int64),
    }


def write(path, arrays: dict[str, np.ndarray], format: str | None = None) -> str:
    write_checkpoint(str(path), arrays, format=format)
    return str(path)


# -- equal checkpoints, in different formats -------------------------------------------------


@pytest.mark.parametrize("other", ["b.npz", "b.h5", "b.msgpack", "b.bin"])
def test_the_same_tensors_in_another_format_are_equal(tmp_path, other: str) -> None:
    a = write(tmp_path / "a.safetensors", tensors())
    b = write(tmp_path / other, tensors())
    report = weightbridge.diff(a, b)
    assert report.equal and report.same == 4
    assert report.only_a == report.only_b == report.differing == ()
    assert report.summary() == f"{a} and {b} are equal: 4 tensors (rtol 0, atol 0)"
    proc = run("diff", a, b)
    assert proc.returncode == 0 and "are equal: 4 tensors" in proc.stdout


def test_a_sharded_checkpoint_and_its_single_file_are_equal(tmp_path) -> None:
    t = tensors()
    folder = tmp_path / "sharded"
    folder.mkdir()
    names = list(t)
    for k, part in enumerate((names[:2], names[2:]), 1):
        write(folder / f"model-{k:05d}-of-00002.safetensors", {n: t[n] for n in part})
    weight_map = {n: f"model-{1 if n in names[:2] else 2:05d}-of-00002.safetensors" for n in t}
    write_index(str(folder / "model.safetensors.index.json"), weight_map, 1000)
    assert api.diff(str(folder), write(tmp_path / "one.safetensors", t)).equal


# -- differences -------------------------------------------------------------------------------


def test_missing_extra_shape_dtype_and_values_are_each_reported(tmp_path) -> None:
    t = tensors()
    a = write(tmp_path / "a.safetensors", {**t, "only_a": np.zeros(3, np.float32)})
    changed = dict(t)
    changed["embed/weight"] = t["embed/weight"].copy()
    changed["embed/weight"][3, 5] += 0.5
    changed["fc/kernel"] = t["fc/kernel"].T.copy()  # (4, 8): another shape
    changed["fc/bias"] = t["fc/bias"].astype(np.float16)  # another dtype
    changed["only_b"] = np.ones(2, np.int32)
    b = write(tmp_path / "b.npz", changed)

    r = api.diff(a, b)
    assert not r.equal
    assert r.only_a == ("only_a",) and r.only_b == ("only_b",)
    assert r.same == 1  # step
    assert [d.name for d in r.shape_mismatches] == ["fc/kernel"]
    assert r.shape_mismatches[0].values is None  # other shapes: values not compared
    assert [d.name for d in r.dtype_mismatches] == ["fc/bias"]
    [values] = [d for d in r.value_mismatches if d.name == "embed/weight"]
    v = values.values
    assert v is not None and (v.count, v.size, v.index) == (1, 128, (3, 5))
    assert v.max_abs == pytest.approx(0.5, rel=1e-6)
    assert v.a_value == pytest.approx(float(t["embed/weight"][3, 5]))
    # F32 against its own F16 rounding: values differ (exactly compared) beside the dtype.
    [bias] = r.dtype_mismatches
    assert bias.values is not None and bias.values.max_abs < 1e-2

    text = r.explain()
    assert "only in A (1):\n  only_a" in text and "only in B (1):\n  only_b" in text
    assert "fc/kernel: A 8x4 F32, B 4x8 F32" in text
    assert "fc/bias: A 4 F32, B 4 F16; " in text
    assert "embed/weight: 1 of 128 elements differ (max abs diff 0.5 at [3, 5]" in text
    assert text.endswith(
        "differ: 1 of 4 tensors in both are equal; 1 with other shapes, 1 with other dtypes, "
        "2 with other values, 1 only in A, 1 only in B (rtol 0, atol 0)"
    )

    proc = run("diff", a, b, check=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.strip() == text
    report = json.loads(run("diff", a, b, "--json", check=False).stdout)
    assert report["equal"] is False and report["same"] == 1
    assert report["only_in_a"] == ["only_a"] and report["only_in_b"] == ["only_b"]
    assert report["shape_mismatches"][0]["b"] == {"shape": [4, 8], "dtype": "F32"}
    assert report["dtype_mismatches"][0]["name"] == "fc/bias"
    embed = next(d for d in report["value_mismatches"] if d["name"] == "embed/weight")
    assert embed["values"]["count"] == 1 and embed["values"]["index"] == [3, 5]


def test_tolerances_decide_equality_and_the_exit_code(tmp_path) -> None:
    t = tensors()
    a = write(tmp_path / "a.safetensors", t)
    nudged = {k: (v * np.float32(1 + 1e-5) if v.dtype == np.float32 else v) for k, v in t.items()}
    b = write(tmp_path / "b.safetensors", nudged)
    assert not api.diff(a, b).equal
    assert api.diff(a, b, rtol=1e-4).equal
    largest = max(float(np.abs(v).max()) for k, v in t.items() if v.dtype == np.float32)
    assert api.diff(a, b, atol=largest * 1e-4).equal
    assert run("diff", a, b, check=False).returncode == 1
    assert run("diff", a, b, "--rtol", "1e-4").returncode == 0
    assert run("diff", a, b, "--atol", "1").returncode == 0


def test_integers_are_compared_exactly_whatever_the_tolerance(tmp_path) -> None:
    a = write(tmp_path / "a.safetensors", {"ids": np.arange(5, dtype=np.int64)})
    b = write(tmp_path / "b.safetensors", {"ids": np.arange(5, dtype=np.int64) + [0, 0, 1, 0, 0]})
    r = api.diff(a, b, atol=10, rtol=10)
    assert not r.equal
    v = r.differing[0].values
    assert v is not None and (v.count, v.index, v.max_abs) == (1, (2,), 1.0)


def test_bf16_values_nan_and_inf(tmp_path) -> None:
    x = np.array([1.0, np.nan, np.inf, 2.0, 0.0], ml_dtypes.bfloat16)
    a = write(tmp_path / "a.safetensors", {"x": x})
    assert api.diff(a, write(tmp_path / "same.safetensors", {"x": x.copy()})).equal
    y = x.copy()
    y[3] = 2.5  # nearest bf16 values apart
    y[4] = np.nan  # a NaN against a number: infinitely different
    r = api.diff(a, write(tmp_path / "b.safetensors", {"x": y}), atol=0.6)
    v = r.differing[0].values
    assert v is not None and v.count == 1 and v.index == (4,) and v.max_abs == float("inf")
    report = json.loads(
        run("diff", a, str(tmp_path / "b.safetensors"), "--json", check=False).stdout
    )
    assert report["value_mismatches"][0]["values"]["max_abs"] == "inf"  # strict JSON


def test_the_largest_difference_is_found_across_tiles() -> None:
    n = 2 * TILE_ELEMENTS + 100
    a = np.zeros((n // 4, 8), np.float32)[:, :4]  # not contiguous: compared all the same
    b = a.copy()
    b[1, 0] = 1.0  # first tile
    b[-1, 3] = -3.0  # last tile: the largest
    v = compare_values(a, b)
    assert v is not None and v.count == 2 and v.index == (n // 4 - 1, 3) and v.max_abs == 3.0
    assert v.max_rel == 1.0  # |0 - 1| / |1| and |0 - (-3)| / |-3|
    assert compare_values(a, b, atol=3.0) is None


def test_relative_difference_is_taken_against_b() -> None:
    v = compare_values(np.float64([2.0]), np.float64([1.0]))
    assert v is not None and v.max_rel == 1.0
    v = compare_values(np.float64([1.0]), np.float64([0.0]))
    assert v is not None and v.max_rel == float("inf")


# -- errors and the command line ------------------------------------------------------------------


def test_an_unreadable_checkpoint_is_a_named_error(tmp_path) -> None:
    a = write(tmp_path / "a.safetensors", tensors())
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(FormatError, match="bad.safetensors"):
        api.diff(a, str(bad))
    proc = run("diff", a, str(bad), check=False)
    assert proc.returncode == 2 and "bad.safetensors" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run("diff", a, str(tmp_path / "missing.safetensors"), check=False)
    assert proc.returncode == 2 and "missing.safetensors" in proc.stderr


def test_a_negative_or_non_numeric_tolerance_is_a_usage_error(tmp_path) -> None:
    a = write(tmp_path / "a.safetensors", tensors())
    for bad in ("-1", "abc"):
        proc = run("diff", a, a, "--rtol", bad, check=False)
        assert proc.returncode == 2 and "is not a number >= 0" in proc.stderr
    with pytest.raises(ValueError, match="tolerances must be >= 0"):
        api.diff(a, a, atol=-1)


def test_a_hugging_face_folder_says_which_weights_it_compared(tmp_path) -> None:
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    write(folder / "model.safetensors", tensors())
    write(folder / "flax_model.msgpack", tensors())
    proc = run("diff", str(folder), write(tmp_path / "a.npz", tensors()))
    assert "are equal" in proc.stdout and "model.safetensors" in proc.stderr


def test_verify_describes_how_values_differ_with_the_shared_comparison(tmp_path) -> None:
    src = write(tmp_path / "src.safetensors", tensors())
    out = tmp_path / "out"
    api.convert(src, out)
    data = dict(np.load(write(tmp_path / "x.npz", tensors())))
    data["fc/kernel"] = data["fc/kernel"].copy()
    data["fc/kernel"][2, 1] = 100.0
    os.remove(out / "model.safetensors")
    write(out / "model.safetensors", data)
    with pytest.raises(
        VerifyError, match=r"1 of 32 elements differ \(max abs diff .* at \[2, 1\]"
    ) as e:
        api.verify(src, out)
    assert str(e.value).startswith(f"{out}: 1 tensor(s) differ")  # the path, not an object repr
    # diff, after a conversion: the output equals its source but for that element.
    r = api.diff(str(out), src)
    assert [d.name for d in r.value_mismatches] == ["fc/kernel"]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and RLIMIT_DATA")
def test_diff_streams_within_a_few_tiles_of_memory(tmp_path) -> None:
    """Two 192 MB checkpoints are compared under a cap of 48 MB of anonymous memory above the
    interpreter's own: less than one of their 64 MB tensors, so no tensor is ever copied whole."""
    from test_memory_bound import MB, baseline_code, random_array, run_capped

    rng = np.random.default_rng(1)
    a = tmp_path / "a.safetensors"
    write(a, {f"t{i}": random_array(rng, (16 * MB,), np.float32) for i in range(3)})
    b = tmp_path / "b.safetensors"
    shutil.copy(a, b)
    with open(b, "r+b") as f:  # flip a bit in the last bytes of t2's data (the file's end)
        f.seek(-2, os.SEEK_END)
        byte = f.read(1)
        f.seek(-2, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x01]))
    code, out, _ = run_capped(["-c", baseline_code("weightbridge.compare"), str(a)], None)
    assert code == 0, out
    base_data, base_anon = map(int, out.split())
    cap = base_data + 48 * MB
    script = (
        "import sys, weightbridge.compare as c\n"
        "r = c.diff(sys.argv[1], sys.argv[2])\n"
        "print(r.summary()); print(r.value_mismatches[0])\n"
    )
    code, out, peak = run_capped(["-c", script, str(a), str(b)], cap)
    assert code == 0, f"diff failed under RLIMIT_DATA={cap / MB:.0f} MB:\n{out}"
    assert "2 of 3 tensors in both are equal; 1 with other values" in out
    assert "t2: 1 of 16777216 elements differ" in out
    assert peak <= base_anon + 48 * MB, f"peak RssAnon {peak / MB:.0f} MB"
