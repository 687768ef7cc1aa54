"""safetensors reading/writing, sharded indexes, and the streaming converter on real files."""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from weightbridge import api
from weightbridge.errors import (
    ConversionError,
    FormatError,
    PlanError,
    UnknownFormatError,
    VerifyError,
)
from weightbridge.io import open_reader, write_checkpoint
from weightbridge.io.safetensors import encode_header
from weightbridge.io.sharded import write_index
from weightbridge.planning.planner import Rename, make_plan
from weightbridge.planning.shards import assign_shards
from weightbridge.spec import TensorSpec
from weightbridge.streaming.convert import convert, verify


def torch_like(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    t: dict[str, np.ndarray] = {
        "embed.weight": rng.standard_normal((50, 16)).astype(ml_dtypes.bfloat16)
    }
    for i in range(3):
        t[f"layers.{i}.attn.weight"] = rng.standard_normal((48, 16)).astype(ml_dtypes.bfloat16)
        t[f"layers.{i}.norm.weight"] = rng.standard_normal(16).astype(ml_dtypes.bfloat16)
        t[f"layers.{i}.conv.weight"] = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    t["step"] = np.array(7, dtype=np.int64)
    return t


def write_sharded(path, tensors: dict[str, np.ndarray], per_shard: int = 4) -> None:
    os.makedirs(path, exist_ok=True)
    names = list(tensors)
    groups = [names[i : i + per_shard] for i in range(0, len(names), per_shard)]
    weight_map = {}
    for i, group in enumerate(groups, 1):
        shard = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: tensors[k] for k in group}, os.path.join(path, shard))
        weight_map.update(dict.fromkeys(group, shard))
    write_index(
        os.path.join(path, "model.safetensors.index.json"),
        weight_map,
        sum(v.nbytes for v in tensors.values()),
    )


def test_reads_what_safetensors_writes_as_zero_copy_maps(tmp_path) -> None:
    tensors = torch_like()
    save_file(tensors, tmp_path / "m.safetensors")
    with open_reader(tmp_path / "m.safetensors") as r:
        assert set(r.specs().names) == set(tensors)
        for name, want in tensors.items():
            got = r.read(name)
            assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
            if got.size:
                assert not got.flags.owndata and not got.flags.writeable


def test_safetensors_reads_what_we_write_and_header_bytes_are_pinned(tmp_path) -> None:
    tensors = torch_like()
    write_checkpoint(str(tmp_path / "m.safetensors"), tensors, metadata={"format": "pt"})
    back = load_file(tmp_path / "m.safetensors")
    for name, want in tensors.items():
        assert back[name].tobytes() == want.tobytes()
    header = encode_header(
        [TensorSpec("a", (2,), "F32"), TensorSpec("b", (), "BF16")], {"format": "pt"}
    )
    body = (
        b'{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
        b'"b":{"dtype":"BF16","shape":[],"data_offsets":[8,10]}}'
    )
    body += b" " * (-len(body) % 8)
    assert header == struct.pack("<Q", len(body)) + body


def _raw(tmp_path, header: dict | bytes, data: bytes = b"", length: int | None = None):
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)
    return path


@pytest.mark.parametrize(
    "case,message",
    [
        ("short", "file is truncated: a safetensors file starts with an 8-byte header length"),
        ("absurd", "header length .* is absurd"),
        ("beyond", "header declares .* header bytes, file is"),
        ("notjson", "not valid UTF-8 JSON"),
        ("overlap", "overlap tensor"),
        ("outofrange", "file is truncated: header declares data through byte"),
        ("dtype", "unknown dtype 'Q7'"),
        ("sizes", "needs 16 bytes, but data_offsets"),
    ],
)
def test_broken_safetensors_get_named_errors(tmp_path, case: str, message: str) -> None:
    a = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
    if case == "short":
        path = tmp_path / "bad.safetensors"
        path.write_bytes(b"\x01\x02")
    elif case == "absurd":
        path = _raw(tmp_path, b"{}", length=1 << 60)
    elif case == "beyond":
        path = _raw(tmp_path, b"{}", length=4096)
    elif case == "notjson":
        path = _raw(tmp_path, b"{\xff\xfe not json")
    elif case == "overlap":
        path = _raw(tmp_path, {"a": a, "b": {**a, "data_offsets": [8, 24]}}, b"\0" * 24)
    elif case == "outofrange":
        path = _raw(tmp_path, {"a": a}, b"\0" * 10)
    elif case == "dtype":
        path = _raw(tmp_path, {"a": {**a, "dtype": "Q7"}}, b"\0" * 16)
    else:
        path = _raw(tmp_path, {"a": {**a, "data_offsets": [0, 12]}}, b"\0" * 16)
    with pytest.raises(FormatError, match=message) as info:
        open_reader(path, format="safetensors")
    assert str(path) in str(info.value)


def test_index_naming_missing_or_escaping_shards_is_refused(tmp_path) -> None:
    write_sharded(tmp_path / "ok", torch_like())
    index = json.loads((tmp_path / "ok" / "model.safetensors.index.json").read_text())
    for bad_path, message in [
        ("../../etc/passwd", "outside the checkpoint directory"),
        ("/abs.safetensors", "outside the checkpoint directory"),
        ("gone.safetensors", "does not exist"),
    ]:
        index["weight_map"]["embed.weight"] = bad_path
        (tmp_path / "ok" / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(FormatError, match=message):
            open_reader(tmp_path / "ok")


def test_unknown_format_lists_known_ones(tmp_path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"hello world, not a checkpoint")
    with pytest.raises(UnknownFormatError, match="known formats: .*safetensors"):
        open_reader(path)


def make_flax_plan(src):
    with open_reader(src) as r:
        return make_plan(
            r.specs(),
            renames=[Rename(r"layers\.(\d+)\.", r"layers_\1/"), Rename(r"^step$", "")],
            from_framework="pytorch",
            to_framework="flax",
        )


def test_sharded_in_sharded_out_is_correct_and_independent_of_shard_size(tmp_path) -> None:
    tensors = torch_like()
    write_sharded(tmp_path / "src", tensors)
    plan = make_flax_plan(tmp_path / "src")
    assert plan.unused == {"step": "dropped by rule"}
    small = convert(plan, str(tmp_path / "src"), tmp_path / "small", max_shard_size=3000)
    assert len(small.shards) > 2
    index = json.loads((tmp_path / "small" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == plan.target.nbytes
    assert set(index["weight_map"]) == set(plan.target.names)
    convert(plan, str(tmp_path / "src"), tmp_path / "one")
    assert os.listdir(tmp_path / "one").count("model.safetensors") == 1
    merged = {}
    for shard in set(index["weight_map"].values()):
        merged.update(load_file(tmp_path / "small" / shard))
    one = load_file(tmp_path / "one" / "model.safetensors")
    assert merged.keys() == one.keys()
    for name in one:
        assert merged[name].tobytes() == one[name].tobytes()
    np.testing.assert_array_equal(one["layers_1/attn.kernel"], tensors["layers.1.attn.weight"].T)
    np.testing.assert_array_equal(
        one["layers_2/conv.kernel"], tensors["layers.2.conv.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(one["embed.embedding"], tensors["embed.weight"])
    assert verify(plan, str(tmp_path / "src"), tmp_path / "small") == len(plan.steps)


def test_a_tensor_larger_than_the_shard_limit_gets_its_own_shard(tmp_path) -> None:
    write_sharded(tmp_path / "src", torch_like())
    plan = make_flax_plan(tmp_path / "src")
    shards = assign_shards(plan, max_shard_size=1000)
    big = [s for s in shards if s.nbytes > 1000]
    assert big and all(len(s.steps) == 1 for s in big)


def test_tiny_tiles_give_the_same_bytes(tmp_path, monkeypatch) -> None:
    import weightbridge.streaming.transform as transform

    write_sharded(tmp_path / "src", torch_like())
    plan = make_flax_plan(tmp_path / "src")
    convert(plan, str(tmp_path / "src"), tmp_path / "a")
    monkeypatch.setattr(transform, "TILE_BYTES", 40)
    monkeypatch.setattr(transform, "BLOCK", 3)
    convert(plan, str(tmp_path / "src"), tmp_path / "b")
    assert (tmp_path / "a/model.safetensors").read_bytes() == (
        tmp_path / "b/model.safetensors"
    ).read_bytes()


def test_dtype_cast_to_bf16(tmp_path) -> None:
    write_checkpoint(
        str(tmp_path / "f.safetensors"),
        {"w": np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4)},
    )
    report = api.convert(tmp_path / "f.safetensors", tmp_path / "out", dtype="bf16")
    assert report.written == ["model.safetensors"]
    got = load_file(tmp_path / "out" / "model.safetensors")["w"]
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(
        got, np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4).astype(ml_dtypes.bfloat16)
    )


def test_destination_of_another_conversion_is_refused_unless_overwrite(tmp_path) -> None:
    write_sharded(tmp_path / "src", torch_like())
    plan = make_flax_plan(tmp_path / "src")
    convert(plan, str(tmp_path / "src"), tmp_path / "out")
    other = make_plan(open_reader(tmp_path / "src").specs())
    with pytest.raises(ConversionError, match="different conversion.*--overwrite"):
        convert(other, str(tmp_path / "src"), tmp_path / "out")
    convert(other, str(tmp_path / "src"), tmp_path / "out", overwrite=True)
    assert verify(other, str(tmp_path / "src"), tmp_path / "out") == len(other.steps)


def test_plan_for_another_checkpoint_is_refused_before_writing(tmp_path) -> None:
    write_sharded(tmp_path / "src", torch_like())
    plan = make_flax_plan(tmp_path / "src")
    write_sharded(tmp_path / "other", torch_like() | {"extra": np.zeros(3, np.float32)})
    with pytest.raises(PlanError, match="fingerprint"):
        convert(plan, str(tmp_path / "other"), tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any(
        f.endswith(".safetensors") for f in os.listdir(tmp_path / "out")
    )


def test_verify_detects_a_changed_output(tmp_path) -> None:
    write_sharded(tmp_path / "src", torch_like())
    plan = make_flax_plan(tmp_path / "src")
    convert(plan, str(tmp_path / "src"), tmp_path / "out")
    path = tmp_path / "out" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(VerifyError, match="values differ"):
        verify(plan, str(tmp_path / "src"), tmp_path / "out")


def test_rename_only_conversion_copies_bytes_in_the_kernel(tmp_path) -> None:
    tensors = {f"t{i}": np.arange(1000, dtype=np.float32) + i for i in range(4)}
    write_checkpoint(str(tmp_path / "s.safetensors"), tensors)
    api.convert(tmp_path / "s.safetensors", tmp_path / "out", renames=[r"t(\d)=tensor_\1"])
    back = load_file(tmp_path / "out" / "model.safetensors")
    assert all(back[f"tensor_{i}"].tobytes() == tensors[f"t{i}"].tobytes() for i in range(4))
