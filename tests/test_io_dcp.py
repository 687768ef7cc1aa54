"""PyTorch Distributed Checkpoint: torch.distributed.checkpoint writes, we read without torch.

The oracle is torch itself: checkpoints saved by `torch.distributed.checkpoint.save` from one
process and from two gloo processes holding DTensors (tests marked `torch`); our reads must equal
the full state dict bit for bit. Hostile `.metadata` pickles and damaged `.distcp` files are
built from real checkpoints.
"""

from __future__ import annotations

import io
import os
import pickle
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import is_memory_map

import weightbridge.io as wio
from weightbridge.errors import FormatError
from weightbridge.io import dcp

# Each worker process imports torch (a few seconds on a loaded 2-core machine) before the two
# meet; the timeout only catches a hang.
_SPAWN_TIMEOUT_S = 300


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """The format is in the registry for this test (the lead adds the permanent row)."""
    if dcp.NAME not in wio.FORMATS:
        if hasattr(wio, "register_format"):
            wio.register_format(dcp.NAME, "weightbridge.io.dcp")
            monkeypatch.setattr(wio, "FORMATS", dict(wio.FORMATS))
        else:  # pragma: no cover - older registry
            monkeypatch.setitem(wio.FORMATS, dcp.NAME, "weightbridge.io.dcp")


def _raw(t: Any) -> np.ndarray:
    """A torch tensor's bytes as numpy (any dtype, bf16 included), for bit-exact comparison."""
    import torch

    flat = t.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().copy() if flat.numel() else np.zeros(0, np.uint8)


def _same_bits(ours: np.ndarray, theirs: Any) -> None:
    assert tuple(ours.shape) == tuple(theirs.shape)
    assert np.ascontiguousarray(ours).reshape(-1).view(np.uint8).tobytes() == _raw(theirs).tobytes()


def _save_one_process(path: Path) -> dict[str, Any]:
    import torch
    import torch.distributed.checkpoint as tdcp

    g = torch.Generator().manual_seed(0)
    sd: dict[str, Any] = {
        "model": {
            "w": torch.randn(5, 3, generator=g),
            "bf": torch.randn(4, 6, generator=g).to(torch.bfloat16),
            "half": torch.randn(7, generator=g).to(torch.float16),
            "ids": torch.arange(10, dtype=torch.int64),
            "mask": torch.tensor([True, False, True]),
            "scalar": torch.tensor(3.5),
            "view": torch.randn(6, 4, generator=g)[2:4],  # a slice: its own chunk
            "empty": torch.zeros(0, 3),
        },
        "step": 7,
        "name": "run-1",
        "blob": io.BytesIO(b"opaque bytes"),
    }
    with pytest.warns(UserWarning, match="single process"):
        tdcp.save(sd, checkpoint_id=str(path))
    return sd


@pytest.mark.torch
def test_one_process_checkpoint_reads_bit_for_bit(tmp_path: Path) -> None:
    sd = _save_one_process(tmp_path / "ck")
    with dcp.open_reader(str(tmp_path / "ck")) as r:
        spec = r.specs()
        assert spec.names == [f"model.{k}" for k in sd["model"]]
        assert spec["model.bf"].dtype == "BF16" and spec["model.scalar"].shape == ()
        for k, t in sd["model"].items():
            arr = r.read(f"model.{k}")
            _same_bits(arr, t)
            assert not arr.flags.writeable
        # one chunk: a zero-copy map, and a byte range the converter can copy file to file
        assert is_memory_map(r.read("model.w"))
        br = r.byte_range("model.w")
        assert br is not None and br.length == 60
        with open(br.path, "rb") as f:
            f.seek(br.offset)
            assert f.read(br.length) == _raw(sd["model"]["w"]).tobytes()
        assert [e.name for e in r.non_tensor_entries()] == ["step", "name", "blob"]
        assert "not converted" in spec.metadata["dcp.non_tensor.step"]
        assert spec.metadata["dcp.version"]


@pytest.mark.torch
def test_detected_as_a_directory_a_distcp_file_or_its_metadata(
    tmp_path: Path, registered: None
) -> None:
    _save_one_process(tmp_path / "ck")
    ck = tmp_path / "ck"
    # A one-process checkpoint's only visible file is __0_0.distcp: the registry hands detection
    # that file, and the reader reads its directory.
    assert wio.detect_format(str(ck)) == "dcp"
    assert wio.detect_format(str(ck / "__0_0.distcp")) == "dcp"
    with wio.open_reader(str(ck)) as r:
        assert r.path == str(ck) and "model.w" in r.specs().names
    assert not dcp.detect(str(tmp_path), b"")


_WORKER = textwrap.dedent(
    """
    import os, sys
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,))
    g = torch.Generator().manual_seed(1234)  # the same full tensors on both ranks
    full = {
        "layers.0.w": torch.randn(8, 6, generator=g),
        "layers.0.uneven": torch.randn(5, 3, generator=g),  # rows 3 + 2
        "layers.0.bf16": torch.randn(6, 4, generator=g).to(torch.bfloat16),
        "layers.0.cols": torch.randn(3, 8, generator=g),  # sharded on dim 1
        "layers.0.norm": torch.randn(6, generator=g),  # replicated
        "plain": torch.arange(12, dtype=torch.int32).reshape(3, 4),  # a plain tensor
        "temp": torch.tensor(0.25),  # a 0-d tensor
        "big": torch.randn(2048, 4096, generator=g),  # 32 MB in two chunks: the memory test
    }
    sd = {
        "layers.0.w": distribute_tensor(full["layers.0.w"], mesh, [Shard(0)]),
        "layers.0.uneven": distribute_tensor(full["layers.0.uneven"], mesh, [Shard(0)]),
        "layers.0.bf16": distribute_tensor(full["layers.0.bf16"], mesh, [Shard(0)]),
        "layers.0.cols": distribute_tensor(full["layers.0.cols"], mesh, [Shard(1)]),
        "layers.0.norm": distribute_tensor(full["layers.0.norm"], mesh, [Replicate()]),
        "plain": full["plain"],
        "temp": full["temp"],
        "big": distribute_tensor(full["big"], mesh, [Shard(0)]),
        "step": 42,
        "tag": "two ranks",
    }
    dcp.save(sd, checkpoint_id=os.path.join(out, "ck"))
    if rank == 0:
        torch.save(full, os.path.join(out, "expected.pt"))
    dist.barrier()
    dist.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def two_rank_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("dcp2")
    script = out / "worker.py"
    script.write_text(_WORKER)
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "GLOO_SOCKET_IFNAME": "lo",
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), str(out)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=_SPAWN_TIMEOUT_S)[0].decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    return out


@pytest.mark.torch
def test_two_gloo_ranks_with_dtensors_read_as_the_full_state_dict(
    two_rank_checkpoint: Path,
) -> None:
    import torch

    full = torch.load(two_rank_checkpoint / "expected.pt", weights_only=True)
    ck = two_rank_checkpoint / "ck"
    assert sorted(p.name for p in ck.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    with dcp.open_reader(str(ck)) as r:
        assert sorted(r.specs().names) == sorted(full)
        assert sorted(e.name for e in r.non_tensor_entries()) == ["step", "tag"]
        for name, t in full.items():
            _same_bits(r.read(name), t)
        # sharded on dim 0 over two ranks: one chunk in each file
        chunks = r.chunks("layers.0.uneven")
        assert [(c.offsets, c.sizes) for c in chunks] == [((0, 0), (3, 3)), ((3, 0), (2, 3))]
        assert {os.path.basename(c.file) for c in chunks} == {"__0_0.distcp", "__1_0.distcp"}
        assert r.byte_range("layers.0.uneven") is None  # spread over two files
        assert len(r.chunks("layers.0.norm")) == 1  # replicated: saved once
        assert is_memory_map(r.read("layers.0.norm"))


@pytest.mark.torch
def test_two_rank_checkpoint_converts_to_safetensors(
    two_rank_checkpoint: Path, tmp_path: Path, registered: None
) -> None:
    import torch
    from safetensors.numpy import load_file

    from weightbridge import api

    full = torch.load(two_rank_checkpoint / "expected.pt", weights_only=True)
    api.convert(str(two_rank_checkpoint / "ck"), str(tmp_path / "out"))
    got: dict[str, np.ndarray] = {}
    for f in sorted((tmp_path / "out").glob("*.safetensors")):
        got.update(load_file(str(f)))
    assert sorted(got) == sorted(full)  # non-tensor entries skipped
    for name, t in full.items():
        _same_bits(got[name], t)


# -- hostile and damaged inputs ----------------------------------------------------------------


class _RunsShell:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("touch pwned",))


def _fake_metadata_checkpoint(path: Path, payload: bytes) -> Path:
    path.mkdir()
    (path / ".metadata").write_bytes(payload)
    (path / "__0_0.distcp").write_bytes(b"")
    return path


def test_metadata_that_calls_os_system_is_refused_and_nothing_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    ck = _fake_metadata_checkpoint(tmp_path / "ck", pickle.dumps({"x": _RunsShell()}))
    with pytest.raises(
        FormatError, match=r"\.metadata: refusing to load global (posix|os)\.system"
    ):
        dcp.open_reader(str(ck))
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"", "corrupt or truncated"),
        (b"\x80\x04K\x07.", "not a DCP Metadata object"),
        (pickle.dumps([1, 2, 3]), "not a DCP Metadata object"),
        (b"\x80\x02}r\xff\xff\xff\x7f.", "memo slot 2147483647 .* corrupt or hostile"),
        (pickle.dumps({"a": 1})[:-3], "corrupt or truncated"),
    ],
)
def test_metadata_that_is_not_dcp_metadata_is_refused(
    tmp_path: Path, payload: bytes, message: str
) -> None:
    ck = _fake_metadata_checkpoint(tmp_path / "ck", payload)
    with pytest.raises(FormatError, match=message):
        dcp.open_reader(str(ck))


@pytest.mark.torch
def test_truncated_distcp_is_refused_naming_the_file(tmp_path: Path) -> None:
    _save_one_process(tmp_path / "ck")
    data = tmp_path / "ck" / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(FormatError, match=r"__0_0\.distcp: file is truncated: .*\.metadata places"):
        dcp.open_reader(str(tmp_path / "ck"))


@pytest.mark.torch
def test_missing_distcp_is_refused_naming_the_file(tmp_path: Path) -> None:
    _save_one_process(tmp_path / "ck")
    (tmp_path / "ck" / "__0_0.distcp").unlink()
    with pytest.raises(FormatError, match=r"__0_0\.distcp: cannot read it"):
        dcp.open_reader(str(tmp_path / "ck"))


@pytest.mark.torch
def test_garbage_inside_a_chunk_is_a_clear_error(tmp_path: Path) -> None:
    _save_one_process(tmp_path / "ck")
    with dcp.open_reader(str(tmp_path / "ck")) as r:
        c = r.chunks("model.w")[0]
    data = tmp_path / "ck" / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[c.offset : c.offset + c.length] = b"\0" * c.length
    data.write_bytes(bytes(raw))
    with (
        dcp.open_reader(str(tmp_path / "ck")) as r,
        pytest.raises(
            FormatError, match=r"__0_0\.distcp: tensor 'model\.w' .*not a torch\.save zip"
        ),
    ):
        r.read("model.w")


@pytest.mark.torch
def test_metadata_with_a_path_outside_the_checkpoint_is_refused(tmp_path: Path) -> None:
    _save_one_process(tmp_path / "ck")
    meta = tmp_path / "ck" / ".metadata"
    meta.write_bytes(meta.read_bytes().replace(b"__0_0.distcp", b"../../a.dist"))
    with pytest.raises(FormatError, match="outside the checkpoint directory"):
        dcp.open_reader(str(tmp_path / "ck"))


@pytest.mark.torch
def test_megatron_mcore_data_is_parsed_and_noted(tmp_path: Path) -> None:
    """Megatron's torch_dist pickles an extra ``mcore_data`` dict on the Metadata object."""
    _save_one_process(tmp_path / "ck")
    meta_path = tmp_path / "ck" / ".metadata"
    with open(meta_path, "rb") as f:
        meta = pickle.load(f)  # torch's own classes: the test trusts the file it just wrote
    meta.mcore_data = {"model.w": {"nd_reformulated_orig_global_shape": (3, 5)}}
    with open(meta_path, "wb") as f:
        pickle.dump(meta, f)
    with dcp.open_reader(str(tmp_path / "ck")) as r:
        note = r.specs().metadata["dcp.mcore.model.w"]
        assert "stored as (5, 3), original global shape (3, 5)" in note
        assert r.read("model.w").shape == (5, 3)


@pytest.mark.torch
@pytest.mark.parametrize(
    "sizes, message",
    [
        ((4, 3), r"'model\.w' of shape \(5, 3\): its 1 chunks do not tile it exactly"),
        ((6, 3), "lies outside it"),
    ],
)
def test_chunks_that_do_not_tile_their_tensor_are_refused(
    tmp_path: Path, sizes: tuple[int, ...], message: str
) -> None:
    import torch

    _save_one_process(tmp_path / "ck")
    meta_path = tmp_path / "ck" / ".metadata"
    with open(meta_path, "rb") as f:
        meta = pickle.load(f)  # torch's own classes: the test trusts the file it just wrote
    meta.state_dict_metadata["model.w"].chunks[0].sizes = torch.Size(sizes)
    with open(meta_path, "wb") as f:
        pickle.dump(meta, f)
    with pytest.raises(FormatError, match=message):
        dcp.open_reader(str(tmp_path / "ck"))


# What reading a tensor may allocate beyond its own bytes (allocator slack, the zip directory
# and pickle of each chunk); a second copy of the 32 MB tensor would not fit.
_READ_SLACK = 16 << 20

_CAPPED_READ = """
import resource, sys
import numpy as np
from weightbridge.io import dcp
with open("/proc/self/status") as f:
    fields = dict(line.split(":", 1) for line in f)
data = int(fields["VmData"].split()[0]) * 1024
tensor_bytes, slack = int(sys.argv[2]), int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_DATA, (data + tensor_bytes + slack, resource.RLIM_INFINITY))
with dcp.open_reader(sys.argv[1]) as r:
    for name in r.specs().names:
        a = r.read(name)
        print(name, a.shape, float(a.reshape(-1)[-8:].astype(np.float64).sum()))
        del a
try:
    two = [np.ones(tensor_bytes, np.uint8) for _ in range(2)]  # the cap bites: two do not fit
    print("cap did not bite")
except MemoryError:
    print("cap bites")
"""


@pytest.mark.torch
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and RLIMIT_DATA")
def test_reading_stays_within_the_largest_tensor(two_rank_checkpoint: Path) -> None:
    big = 2048 * 4096 * 4
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _CAPPED_READ,
            str(two_rank_checkpoint / "ck"),
            str(big),
            str(_READ_SLACK),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "big (2048, 4096)" in proc.stdout and "cap bites" in proc.stdout, proc.stdout
