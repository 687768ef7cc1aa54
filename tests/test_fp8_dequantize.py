"""Block-scaled FP8 (DeepSeek-V3/R1 style) dequantized by a conversion, tile by tile.

The source files are written by the reference safetensors library from ml_dtypes float8_e4m3fn
arrays; the oracles are a plain numpy transcription of DeepSeek's reference formula
(``float32(w) * scale`` per 128x128 block, then one rounding to the output dtype) and, where
torch is installed, torch's own float8_e4m3fn conversion. Outputs must be bit-identical.
"""

from __future__ import annotations

import os
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from weightbridge import _blockscale, api
from weightbridge._blockscale import BlockScaledView, dequantize, scale_shape, to_float32
from weightbridge.cli import main
from weightbridge.errors import PlanError
from weightbridge.io import open_reader
from weightbridge.ops import Dequantize, infer, op_from_json
from weightbridge.plan import Plan
from weightbridge.spec import CheckpointSpec, TensorSpec
from weightbridge.streaming import transform

F8 = ml_dtypes.float8_e4m3fn
BF16 = ml_dtypes.bfloat16
BLOCK = 128

# Multiples of 128 and not: partial last blocks along rows, columns and both; a weight
# smaller than one block; a single row and a single column.
SHAPES = {
    "layers.0.mlp.up_proj.weight": (384, 256),
    "layers.0.mlp.down_proj.weight": (300, 200),
    "layers.0.self_attn.q_proj.weight": (129, 513),
    "layers.0.self_attn.o_proj.weight": (5, 7),
    "layers.1.mlp.gate_proj.weight": (1, 300),
    "layers.1.mlp.up_proj.weight": (257, 1),
}


def reference(w: np.ndarray, s: np.ndarray, dtype: type = BF16) -> np.ndarray:
    """DeepSeek's formula written out plainly: expand each scale over its block, multiply."""
    rows, cols = w.shape
    expanded = np.repeat(np.repeat(s.astype(np.float32), BLOCK, axis=0), BLOCK, axis=1)
    return (w.astype(np.float32) * expanded[:rows, :cols]).astype(dtype)


def fp8_weight(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Every finite e4m3fn code (NaN, 0x7f/0xff, left out), uniformly."""
    codes = rng.integers(0, 256, size=shape, dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x7E
    return codes.view(F8)


def deepseek_checkpoint(path: str, seed: int = 0) -> dict[str, np.ndarray]:
    """A DeepSeek-style file: fp8 weights + float32 block scales, and bf16 other tensors."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for name, shape in SHAPES.items():
        tensors[name] = fp8_weight(rng, shape)
        # Scales spanning many binades (as trained ones do), some tiny: products round.
        exps = rng.integers(-20, 4, size=scale_shape(shape, (BLOCK, BLOCK)))
        tensors[name + "_scale_inv"] = (rng.random(exps.shape) + 0.5).astype(np.float32) * (
            2.0 ** exps.astype(np.float32)
        )
    tensors["embed_tokens.weight"] = rng.standard_normal((64, 32)).astype(BF16)
    tensors["layers.0.input_layernorm.weight"] = rng.standard_normal(32).astype(BF16)
    save_file(tensors, path)
    return tensors


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(f"u{a.dtype.itemsize}")


@pytest.fixture
def src(tmp_path) -> tuple[str, dict[str, np.ndarray]]:
    path = str(tmp_path / "model.safetensors")
    return path, deepseek_checkpoint(path)


def assert_dequantized(out: dict[str, np.ndarray], tensors: dict[str, np.ndarray], dtype: type):
    assert not [k for k in out if k.endswith("_scale_inv")]
    for name in SHAPES:
        want = reference(tensors[name], tensors[name + "_scale_inv"], dtype)
        assert out[name].dtype == want.dtype, name
        assert np.array_equal(bits(out[name]), bits(want)), name
    for name in ("embed_tokens.weight", "layers.0.input_layernorm.weight"):
        assert np.array_equal(bits(out[name]), bits(tensors[name].astype(dtype)))


# --- the math ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2])
def test_lookup_table_equals_ml_dtypes_cast_for_every_code(dtype) -> None:
    codes = np.arange(256, dtype=np.uint8)
    # both orders of every pair, odd lengths, and an unaligned start
    pairs = np.stack(np.meshgrid(codes, codes), -1).reshape(-1)
    for a in (pairs, pairs[1:], pairs[1:-2], codes[:1]):
        got, want = to_float32(a.view(dtype)), a.view(dtype).astype(np.float32)
        assert np.array_equal(bits(got), bits(want))


@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_view_rows_equal_the_whole_dequantized_tensor(monkeypatch, chunk_rows) -> None:
    if chunk_rows:  # chunks of 3 rows: their ends fall inside blocks and inside views
        monkeypatch.setattr(_blockscale, "CHUNK_BYTES", chunk_rows * 200 * 4)
    rng = np.random.default_rng(1)
    w = fp8_weight(rng, (300, 200))
    s = rng.random(scale_shape(w.shape, (BLOCK, BLOCK))).astype(np.float32)
    whole = dequantize(w, s, (BLOCK, BLOCK), BF16)
    assert np.array_equal(bits(whole), bits(reference(w, s)))
    view = BlockScaledView(w, s, (BLOCK, BLOCK))
    for start, stop in ((0, 1), (127, 129), (100, 300), (255, 256), (299, 400), (5, 5)):
        part = view[start:stop]
        assert part.shape == whole[start:stop].shape
        assert np.array_equal(bits(part.materialize(BF16)), bits(whole[start:stop]))


# --- the op --------------------------------------------------------------------------------


def test_op_checks_shapes_and_round_trips_as_json() -> None:
    op = Dequantize()
    assert infer([op], [(300, 200), (3, 2)], "F8_E4M3") == ((300, 200), "F32")
    assert op_from_json(op.to_json()) == op == op_from_json({"op": "dequantize"})
    assert op_from_json({"op": "dequantize", "block": [64, 32]}).block == (64, 32)
    with pytest.raises(PlanError, match=r"needs a scale of shape \(3, 2\), found \(2, 2\)"):
        infer([op], [(300, 200), (2, 2)], "F8_E4M3")
    with pytest.raises(PlanError, match="takes two sources"):
        infer([Dequantize()], [(4, 4)], "F8_E4M3")
    with pytest.raises(PlanError, match="need a concat or stack"):
        infer([], [(4, 4), (1, 1)], "F8_E4M3")
    with pytest.raises(PlanError, match="two positive sizes"):
        op_from_json({"op": "dequantize", "block": [0, 128]})
    with pytest.raises(PlanError, match="bad field"):
        op_from_json({"op": "dequantize", "block": 128})


# --- conversions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "np_dtype"), [(None, BF16), ("f32", np.float32), ("f16", np.float16)]
)
def test_convert_dequantizes_bit_exact(src, tmp_path, dtype, np_dtype) -> None:
    path, tensors = src
    report = api.convert(path, str(tmp_path / "out"), dequantize=True, dtype=dtype)
    assert report.summary()
    assert_dequantized(load_file(str(tmp_path / "out" / "model.safetensors")), tensors, np_dtype)
    api.verify(path, str(tmp_path / "out"))


def test_plan_is_reviewable_and_a_saved_plan_replays(src, tmp_path) -> None:
    path, tensors = src
    plan = api.plan(path, dequantize=True)
    name = "layers.0.mlp.down_proj.weight"
    (step,) = [s for s in plan.steps if s.target.name == name]
    assert step.sources == (name, name + "_scale_inv")
    assert step.to_json()["ops"] == [
        {"op": "dequantize", "block": [128, 128]},
        {"op": "cast", "dtype": "BF16"},
    ]
    assert f"{name}_scale_inv  dequantize(128,128) cast(BF16)" in plan.explain()
    assert not plan.unused
    saved = tmp_path / "plan.json"
    plan.save(saved)
    # Replayed without dequantize=: the plan file carries the op.
    api.convert(path, str(tmp_path / "out"), plan=str(saved))
    assert_dequantized(load_file(str(tmp_path / "out" / "model.safetensors")), tensors, BF16)
    assert Plan.load(saved) == plan


@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
def test_many_tiles_per_tensor_at_unaligned_rows(src, tmp_path, monkeypatch, fmt) -> None:
    """Tiles of 7 rows of the widest tensor: boundaries fall inside 128-row blocks, and both
    writer kinds (placing: safetensors; in order: npz) get many tiles per tensor."""
    path, tensors = src
    monkeypatch.setattr(transform, "TILE_BYTES", 7 * 513 * 4)
    out = tmp_path / "out"
    api.convert(path, str(out), dequantize=True, format=fmt)
    with open_reader(str(out)) as reader:
        got = {n: np.array(reader.read(n)) for n in reader.specs().names}
    assert_dequantized(got, tensors, BF16)


def test_with_a_target_and_a_layout_change(src, tmp_path) -> None:
    """Into a bf16 target spec the matcher pairs by name; with --from/--to a transpose follows
    the dequantize (the tensor is then dequantized whole, in bf16, and transposed)."""
    path, tensors = src
    target = CheckpointSpec.of(
        [
            TensorSpec(n, t.shape, "F32" if n.endswith("up_proj.weight") else "BF16")
            for n, t in tensors.items()
            if not n.endswith("_scale_inv")
        ]
    )
    api.convert(path, str(tmp_path / "like"), target=target, dequantize=True)
    out = load_file(str(tmp_path / "like" / "model.safetensors"))
    for name in SHAPES:
        dt = np.float32 if name.endswith("up_proj.weight") else BF16
        want = reference(tensors[name], tensors[name + "_scale_inv"], dt)
        assert np.array_equal(bits(out[name]), bits(want)), name

    plan = api.plan(path, from_framework="pytorch", to_framework="flax", dequantize=True)
    api.convert(path, str(tmp_path / "flax"), plan=plan)
    with open_reader(str(tmp_path / "flax")) as reader:
        for step in plan.steps:
            name = step.sources[0]
            if name in SHAPES:
                want = reference(tensors[name], tensors[name + "_scale_inv"]).T
                assert np.array_equal(bits(np.asarray(reader.read(step.target.name))), bits(want))


# --- refusals ------------------------------------------------------------------------------


def test_casting_scaled_weights_without_dequantize_is_refused(src) -> None:
    path, tensors = src
    with pytest.raises(PlanError, match="--dequantize") as e:
        api.plan(path, dtype="bf16")
    assert "layers.0.mlp.down_proj.weight (F8_E4M3 -> BF16)" in str(e.value)
    assert "layers.0.mlp.down_proj.weight_scale_inv" in str(e.value)
    target = CheckpointSpec.of(
        [TensorSpec(n, t.shape, "BF16") for n, t in tensors.items() if n in SHAPES]
    )
    with pytest.raises(PlanError, match="--dequantize"):
        api.plan(path, target)
    # Kept as they are (fp8 and scales copied), nothing is refused.
    plan = api.plan(path)
    assert {s.target.dtype for s in plan.steps if s.target.name in SHAPES} == {"F8_E4M3"}


def test_cli_refuses_then_dequantizes(src, tmp_path, capsys) -> None:
    path, tensors = src
    out = str(tmp_path / "out")
    code = main(["convert", path, "-o", out, "--dtype", "bf16"])
    err = capsys.readouterr().err
    assert code != 0 and "--dequantize" in err and "block-scaled" in err
    assert main(["convert", path, "-o", out, "--dequantize"]) == 0
    assert_dequantized(load_file(os.path.join(out, "model.safetensors")), tensors, BF16)
    assert main(["plan", path, "--dequantize", "--dtype", "f16"]) == 0
    assert "dequantize(128,128) cast(F16)" in capsys.readouterr().out


def test_unknown_scale_layouts_are_refused_by_name(tmp_path) -> None:
    rng = np.random.default_rng(2)
    w = fp8_weight(rng, (256, 256))
    # Scales of 64x64 blocks: not DeepSeek's 128x128.
    path = str(tmp_path / "blocks64.safetensors")
    save_file({"fc.weight": w, "fc.weight_scale_inv": np.ones((4, 4), np.float32)}, path)
    with pytest.raises(PlanError, match=r"fc.weight_scale_inv \(4, 4\).*\(2, 2\)"):
        api.plan(path, dequantize=True)
    # compressed-tensors / ModelOpt: a per-tensor weight_scale.
    path = str(tmp_path / "per_tensor.safetensors")
    save_file({"fc.weight": w, "fc.weight_scale": np.ones((1,), np.float32)}, path)
    for options in ({"dequantize": True}, {"dtype": "bf16"}):
        with pytest.raises(PlanError, match="in fc.weight_scale, a per-tensor or per-channel"):
            api.plan(path, **options)
    api.plan(path)  # kept as they are: nothing is cast


def test_dequantize_without_scaled_weights_says_so(tmp_path) -> None:
    path = str(tmp_path / "plain.safetensors")
    save_file({"a": np.ones((2, 2), np.float32)}, path)
    plan = api.plan(path, dequantize=True)
    assert any("nothing was dequantized" in str(n) for n in plan.notes)


def test_scaled_weights_inside_a_concat_are_refused(tmp_path) -> None:
    from weightbridge.ops import Concat
    from weightbridge.planning.rules import Transform

    rng = np.random.default_rng(4)
    path = str(tmp_path / "qk.safetensors")
    tensors = {}
    for name in ("q.weight", "k.weight"):
        tensors[name] = fp8_weight(rng, (128, 64))
        tensors[name + "_scale_inv"] = np.ones((1, 1), np.float32)
    save_file(tensors, path)
    target = CheckpointSpec.of([TensorSpec("qk.weight", (256, 64), "BF16")])
    rules = {"qk.weight": Transform(original_key=["q.weight", "k.weight"], ops=[Concat(0)])}
    with pytest.raises(PlanError, match=r"inside a concat or stack.*\n  qk.weight <- "):
        api.plan(path, target, rules=rules, dequantize=True)


# --- oracles and bounds --------------------------------------------------------------------


@pytest.mark.torch
def test_equals_torch_float8_conversion(src, tmp_path) -> None:
    """torch's float8_e4m3fn -> float32 conversion, its float32 multiply and its bf16 rounding
    (DeepSeek's weight_dequant, on CPU) give the same bits."""
    import torch

    path, tensors = src
    api.convert(path, str(tmp_path / "out"), dequantize=True)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, (rows, cols) in SHAPES.items():
        w = torch.from_numpy(tensors[name].view(np.uint8).copy()).view(torch.float8_e4m3fn)
        s = torch.from_numpy(tensors[name + "_scale_inv"])
        s = s.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:rows, :cols]
        want = (w.to(torch.float32) * s).to(torch.bfloat16)
        assert np.array_equal(
            out[name].view(np.uint16), want.view(torch.int16).numpy().view(np.uint16)
        )


MB = 1 << 20

CONVERT = textwrap.dedent(
    """
    import sys
    import weightbridge.api
    import weightbridge.io
    weightbridge.io.detect_format(sys.argv[1])
    with open("/proc/self/status") as f:
        before = dict(line.split(":", 1) for line in f)["RssAnon"].split()[0]
    print(int(before) * 1024, flush=True)
    weightbridge.api.convert(sys.argv[1], sys.argv[2], dequantize=True, format=sys.argv[3])
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")
@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
def test_memory_stays_at_a_few_tiles(tmp_path, fmt) -> None:
    """A 128 MB fp8 weight becomes 256 MB of bf16 (512 MB as float32): the conversion holds
    neither. Its anonymous memory, polled from /proc, stays under 128 MB above the child's own
    baseline: about 10 MB when tiles are dequantized straight into the mapped safetensors
    output, about 70 MB through npz's writer queue of 8 MB tiles."""
    from test_memory_bound import run_capped

    rows, cols = 8192, 16384
    path = str(tmp_path / "big.safetensors")
    rng = np.random.default_rng(3)
    w = np.frombuffer(rng.bytes(rows * cols), np.uint8).reshape(rows, cols) & np.uint8(0x77)
    s = rng.random(scale_shape((rows, cols), (BLOCK, BLOCK))).astype(np.float32)
    save_file({"fc.weight": w.view(F8), "fc.weight_scale_inv": s}, path)
    out = tmp_path / "out"
    code, text, peak = run_capped(["-c", CONVERT, path, str(out), fmt], None, timeout=600)
    assert code == 0, text
    baseline = int(text.split()[0])
    assert peak - baseline < 128 * MB, f"peak {peak / MB:.0f} MB, baseline {baseline / MB:.0f} MB"
    with open_reader(str(out)) as reader:
        got = reader.read("fc.weight")
        last = slice(rows - BLOCK, rows)  # the last block-row, checked against the reference
        assert np.array_equal(
            bits(np.asarray(got[last])), bits(reference(w[last].view(F8), s[-1:]))
        )
        del got


@pytest.mark.torch
def test_adapt_dequantizes_torch_float8_into_a_module(src) -> None:
    """In memory too: a torch state dict holding float8_e4m3fn weights and their block scales
    (as DeepSeek's checkpoints load) goes into bf16 modules, bit for bit the reference; without
    `dequantize`, the cast is refused."""
    import torch

    from weightbridge import adapt

    _, tensors = src
    theirs = {}
    for name, a in tensors.items():
        if a.dtype == F8:
            theirs[name] = torch.from_numpy(bits(a).copy()).view(torch.float8_e4m3fn)
        elif a.dtype == BF16:
            theirs[name] = torch.from_numpy(bits(a).copy()).view(torch.bfloat16)
        else:
            theirs[name] = torch.from_numpy(a.copy())
    mine = {
        name: torch.zeros(a.shape, dtype=torch.bfloat16)
        for name, a in tensors.items()
        if not name.endswith("_scale_inv")
    }
    with pytest.raises(PlanError, match="dequantize"):
        adapt(theirs, mine)
    out = adapt(theirs, mine, dequantize=True)
    for name in SHAPES:
        want = reference(tensors[name], tensors[name + "_scale_inv"])
        assert out[name].dtype == torch.bfloat16
        assert np.array_equal(out[name].view(torch.int16).numpy().view(np.uint16), bits(want))
