"""Megatron-Core ``torch_dist``: megatron-core writes, we read without torch or megatron.

The checkpoints are written by ``megatron.core.dist_checkpointing.save`` from a tiny GPTModel
(2 layers, hidden 64, SwiGLU, CPU initialisation) in one process, and in two gloo processes on
127.0.0.1 with tensor parallelism 2; a MoE variant (2 experts, SequentialMLP) in one process.
The oracle is mcore itself: ``model.state_dict()`` of the model that saved, and of a fresh
1-rank model into which ``dist_checkpointing.load`` read (and resharded) the 2-rank checkpoint.
Tests that need the files are marked `megatron` (skipped when megatron-core is absent).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
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
from weightbridge.io import megatron

# Each worker imports torch and megatron (several seconds on a loaded 2-core machine) before
# the ranks meet; the timeout only catches a hang.
_SPAWN_TIMEOUT_S = 600
# SwiGLU's linear_fc1 of one layer: (2 * 32768, 64) float32 = 16 MiB; stacked over 2 layers,
# 32 MiB. The memory test reads a layer without ever holding the stacked tensor.
_FFN = 32768
_LAYER_FC1_BYTES = 2 * _FFN * 64 * 4

_WORKER = textwrap.dedent(
    """
    import argparse, os, sys


    def main():
        import torch
        import torch.distributed as dist

        out, mode, tp, experts = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        dist.init_process_group("gloo")
        if not torch.cuda.is_available():
            # megatron-core 0.16's torch_dist save calls CUDA in two places whatever the
            # device (a synchronize after its copy to CPU, and a failure flag made on
            # current_device()); on a CPU-only machine both are made CPU no-ops. The bytes
            # mcore writes do not depend on them.
            torch.cuda.synchronize = lambda *a, **k: None
            torch.cuda.current_device = lambda: "cpu"
        from megatron.core import dist_checkpointing, parallel_state
        from megatron.core.dist_checkpointing.mapping import ShardedTensor
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.models.gpt.gpt_model import GPTModel
        from megatron.core.transformer.transformer_config import TransformerConfig

        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        torch.manual_seed(1234 if mode == "save" else 99)  # CPU init draws from this generator
        moe = {"num_moe_experts": experts, "moe_ffn_hidden_size": 32} if experts else {}
        cfg = TransformerConfig(
            num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=FFN_SIZE,
            gated_linear_unit=not experts, use_cpu_initialization=True,
            params_dtype=torch.float32, pipeline_dtype=torch.float32, **moe,
        )
        spec = get_gpt_layer_local_spec(num_experts=experts or None, moe_grouped_gemm=False)
        model = GPTModel(
            config=cfg, transformer_layer_spec=spec, vocab_size=128, max_sequence_length=32
        )
        ck = os.path.join(out, "ck")
        if mode == "save":
            os.makedirs(ck, exist_ok=True)
            dist.barrier()
            sd = model.sharded_state_dict()
            # What Megatron-LM's training loop adds beside the model: mcore saves what is
            # not sharded to common.pt.
            sd.update(iteration=7, checkpoint_version=3.0, args=argparse.Namespace(lr=0.1))
            dist_checkpointing.save(sd, ck)
        else:  # mcore loads (and reshards) the checkpoint into a fresh 1-rank model
            sd = dist_checkpointing.load(model.sharded_state_dict(), ck)
            assert (sd.pop("iteration"), sd.pop("checkpoint_version")) == (7, 3.0)
            sd.pop("args")
            model.load_state_dict(sd)
        if dist.get_rank() == 0 and tp == 1:
            state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
            # The checkpoint key mcore gives each model tensor, from its own sharded state dict.
            by_ptr = {v.data_ptr(): k for k, v in state.items()}
            keys = {
                by_ptr[sh.data.data_ptr()]: sh.key
                for sh in model.sharded_state_dict().values()
                if isinstance(sh, ShardedTensor) and sh.data.data_ptr() in by_ptr
            }
            torch.save({"state": state, "keys": keys}, os.path.join(out, "expected.pt"))
        dist.barrier()
        dist.destroy_process_group()


    if __name__ == "__main__":
        main()
    """
).replace("FFN_SIZE", str(_FFN))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(
    out: Path, mode: str, tp: int, experts: int, ranks: int
) -> list[subprocess.Popen[bytes]]:
    script = out.parent / "worker.py"
    if not script.exists():
        script.write_text(_WORKER)
    port = _free_port()
    return [
        subprocess.Popen(
            [sys.executable, "-W", "ignore", str(script), str(out), mode, str(tp), str(experts)],
            env={
                **os.environ,
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "RANK": str(rank),
                "WORLD_SIZE": str(ranks),
                "LOCAL_RANK": str(rank),
                "GLOO_SOCKET_IFNAME": "lo",
                "OMP_NUM_THREADS": "1",
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(ranks)
    ]


def _wait(procs: list[subprocess.Popen[bytes]]) -> None:
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


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Checkpoints written by megatron-core: 'tp2' (2 gloo ranks, its expected.pt from mcore's
    load into a 1-rank model) and 'moe' (1 rank, its expected.pt from the saving model)."""
    pytest.importorskip("megatron.core")
    root = tmp_path_factory.mktemp("mcore")
    tp2, moe = root / "tp2", root / "moe"
    tp2.mkdir()
    moe.mkdir()
    tp2_save, moe_save = _spawn(tp2, "save", 2, 0, 2), _spawn(moe, "save", 1, 2, 1)
    _wait(tp2_save)
    _wait(moe_save)
    _wait(_spawn(tp2, "load", 1, 0, 1))
    return {"tp2": tp2, "moe": moe}


def _expected(run: Path) -> tuple[dict[str, Any], dict[str, str]]:
    import torch

    e = torch.load(run / "expected.pt", weights_only=False)  # the test's own file
    return e["state"], e["keys"]


def _same_bits(ours: np.ndarray, theirs: Any) -> None:
    assert tuple(ours.shape) == tuple(theirs.shape)
    assert np.ascontiguousarray(ours).tobytes() == theirs.contiguous().numpy().tobytes()


# The model's (local layer spec's) names as the checkpoint shows them: mcore saves the layer
# norms under Transformer Engine's names, and experts under SequentialMLP's.
_RENAMES = {
    ".input_layernorm.": ".self_attention.linear_qkv.layer_norm_",
    ".pre_mlp_layernorm.": ".mlp.linear_fc1.layer_norm_",
}


def _shown_name(model_name: str) -> str:
    for old, new in _RENAMES.items():
        model_name = model_name.replace(old, new)
    return model_name


@pytest.mark.megatron
@pytest.mark.parametrize("run", ["tp2", "moe"])
def test_reads_equal_megatrons_own_state_dict_bit_for_bit(
    written: dict[str, Path], run: str
) -> None:
    state, keys = _expected(written[run])
    with megatron.open_reader(str(written[run] / "ck")) as r:
        spec = r.specs()
        assert sorted(spec.names) == sorted(_shown_name(k) for k in state)
        for name, t in state.items():
            _same_bits(r.read(_shown_name(name)), t)
        # the stored key of each tensor is mcore's: stacked, without the layer (and expert)
        stored = keys["decoder.layers.1.self_attention.linear_proj.weight"]
        assert stored == "decoder.layers.self_attention.linear_proj.weight"
        stacked = spec.metadata[f"megatron.stacked.{stored}"]
        assert "stacked over 2 layers" in stacked
        assert spec.metadata["megatron.sharded_backend"] == "torch_dist"
    if run == "moe":
        assert (
            keys["decoder.layers.1.mlp.experts.local_experts.1.linear_fc1.weight"]
            == "decoder.layers.mlp.experts.experts.linear_fc1.weight"
        )


@pytest.mark.megatron
def test_tensor_parallel_pieces_and_layers_come_from_their_own_chunks(
    written: dict[str, Path],
) -> None:
    ck = written["tp2"] / "ck"
    assert sorted(p.name for p in ck.glob("*.distcp")) == [
        "__0_0.distcp",
        "__0_1.distcp",
        "__1_0.distcp",
        "__1_1.distcp",
    ]
    with megatron.open_reader(str(ck)) as r:
        # layer 1 of the stacked (2, 2*FFN, 64) SwiGLU fc1, from its own chunks only: mcore
        # saves each rank's gate and up halves where they sit in the 1-rank [gate; up]
        chunks = r.chunks("decoder.layers.1.mlp.linear_fc1.weight")
        half = _FFN // 2
        assert sorted(c.offsets for c in chunks) == [(1, i * half, 0) for i in range(4)]
        assert r.byte_range("decoder.layers.1.mlp.linear_fc1.weight") is None
        # replicated, one layer: one chunk, a zero-copy map and a byte range
        name = "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight"
        assert len(r.chunks(name)) == 1 and is_memory_map(r.read(name))
        br = r.byte_range(name)
        assert br is not None and br.length == 64 * 4
        with open(br.path, "rb") as f:
            f.seek(br.offset)
            assert f.read(br.length) == np.ascontiguousarray(r.read(name)).tobytes()
        # non-tensor entries: TE's _extra_state (None here), listed and not converted
        assert any("_extra_state/shard_" in e.name for e in r.non_tensor_entries())


@pytest.mark.megatron
def test_common_pt_is_listed_not_run_nor_converted(written: dict[str, Path]) -> None:
    with megatron.open_reader(str(written["tp2"] / "ck")) as r:
        meta = r.specs().metadata
    assert meta["megatron.common.iteration"] == "7"
    assert meta["megatron.common.checkpoint_version"] == "3.0"
    assert "contents are not read" in meta["megatron.common.args"]  # an argparse.Namespace
    assert "3 entries" in meta["megatron.common"]


@pytest.mark.megatron
def test_detected_and_converted_from_cli_and_api(written: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    from weightbridge import api
    from weightbridge.cli import main

    ck = written["tp2"] / "ck"
    for p in (ck, ck / "metadata.json", ck / "__1_0.distcp"):
        assert wio.detect_format(str(p)) == "megatron", p
    state, _ = _expected(written["tp2"])
    api.convert(str(ck), str(tmp_path / "api"))
    assert main(["convert", str(ck), "-o", str(tmp_path / "cli")]) == 0
    for out in ("api", "cli"):
        got: dict[str, np.ndarray] = {}
        for f in sorted((tmp_path / out).glob("*.safetensors")):
            got.update(load_file(str(f)))
        assert sorted(got) == sorted(_shown_name(k) for k in state)
        for name, t in state.items():
            _same_bits(got[_shown_name(name)], t)


# What reading a tensor may allocate beyond its own bytes (allocator slack, zip directories and
# pickles of its chunks); the stacked tensor (two layers) would not fit.
_READ_SLACK = 12 << 20

_CAPPED_READ = """
import resource, sys
import numpy as np
from weightbridge.io import megatron
with open("/proc/self/status") as f:
    fields = dict(line.split(":", 1) for line in f)
data = int(fields["VmData"].split()[0]) * 1024
tensor_bytes, slack = int(sys.argv[2]), int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_DATA, (data + tensor_bytes + slack, resource.RLIM_INFINITY))
with megatron.open_reader(sys.argv[1]) as r:
    for name in r.specs().names:
        a = r.read(name)
        print(name, a.shape, float(a.reshape(-1)[-8:].astype(np.float64).sum()))
        del a
        r.release(name)
try:
    two = [np.ones(tensor_bytes, np.uint8) for _ in range(2)]  # the cap bites: two do not fit
    print("cap did not bite")
except MemoryError:
    print("cap bites")
"""


@pytest.mark.megatron
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and RLIMIT_DATA")
def test_reading_stays_within_one_layers_tensor(written: dict[str, Path]) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _CAPPED_READ,
            str(written["tp2"] / "ck"),
            str(_LAYER_FC1_BYTES),
            str(_READ_SLACK),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"decoder.layers.1.mlp.linear_fc1.weight ({2 * _FFN}, 64)" in proc.stdout
    assert "cap bites" in proc.stdout, proc.stdout


# -- conventions refused by name, hostile and damaged inputs -----------------------------------


@pytest.mark.megatron
def test_n_d_flattened_tensors_are_refused_by_name(
    written: dict[str, Path], tmp_path: Path
) -> None:
    """megatron-core < 0.14 recorded N-D flattened optimizer states in ``mcore_data``."""
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(written["moe"] / "ck", ck)
    with open(ck / ".metadata", "rb") as f:
        meta = pickle.load(f)  # torch's own classes: the test trusts the file mcore wrote
    key = "embedding.position_embeddings.weight"
    meta.mcore_data = {key: {"nd_reformulated_orig_global_shape": (64, 32)}}
    with open(ck / ".metadata", "wb") as f:
        pickle.dump(meta, f)
    with megatron.open_reader(str(ck)) as r:
        assert key not in r.specs().names
        assert "N-D flattened" in r.specs().metadata[f"megatron.refused.{key}"]
        with pytest.raises(FormatError, match=rf"tensor '{key}' is not read: .*N-D flattened"):
            r.read(key)


def _config_dir(path: Path, config: Any) -> Path:
    path.mkdir()
    (path / "metadata.json").write_text(json.dumps(config))
    return path


def test_other_backends_are_refused_by_name(tmp_path: Path) -> None:
    ck = _config_dir(tmp_path / "ck", {"sharded_backend": "zarr", "sharded_backend_version": 1})
    assert megatron.detect(str(ck), b"")
    with pytest.raises(FormatError, match=r"metadata\.json: Megatron sharded backend 'zarr' is"):
        megatron.open_reader(str(ck))


@pytest.mark.parametrize("config", [[1, 2], {"backend": "torch_dist"}, "x" * 70000])
def test_a_metadata_json_that_is_not_mcores_is_not_megatron(tmp_path: Path, config: Any) -> None:
    ck = _config_dir(tmp_path / "ck", config)
    assert not megatron.detect(str(ck), b"")
    with pytest.raises(FormatError, match=r"metadata\.json: "):
        megatron.open_reader(str(ck))


class _RunsShell:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("touch pwned",))


@pytest.mark.megatron
def test_a_common_pt_that_runs_code_is_refused_and_nothing_runs(
    written: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    import torch

    monkeypatch.chdir(tmp_path)
    ck = tmp_path / "ck"
    shutil.copytree(written["moe"] / "ck", ck)
    torch.save({"iteration": _RunsShell()}, ck / "common.pt")
    with megatron.open_reader(str(ck)) as r:  # the weights do not depend on common.pt
        note = r.specs().metadata["megatron.common"]
        assert "common.pt not read" in note and "system" in note
        assert r.read("output_layer.weight").shape == (128, 64)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.megatron
def test_read_from_s3_as_from_the_local_directory(written: dict[str, Path], tmp_path: Path) -> None:
    """The directory as an object-store prefix (moto on 127.0.0.1)."""
    from helpers import moto_s3

    from weightbridge import api

    local = written["tp2"] / "ck"
    with moto_s3("megatron-ck", endpoint_env=None, read_timeout=30) as (endpoint, client):
        for f in sorted(local.iterdir()):
            client.upload_file(str(f), "megatron-ck", f"run/ck/{f.name}")
        url = "s3://megatron-ck/run/ck"
        with wio.remote_options(endpoint=endpoint):
            assert wio.detect_format(url) == "megatron"
        assert api.inspect(url, endpoint=endpoint) == api.inspect(str(local))
        api.convert(url, str(tmp_path / "out"), endpoint=endpoint)
    assert api.verify(str(local), str(tmp_path / "out")) == len(api.inspect(str(local)))


@pytest.mark.torch
def test_a_key_named_stacked_whose_chunks_span_layers_is_read_as_stored(tmp_path: Path) -> None:
    """mcore's prepended axes are not in the files: a key named like a stacked one whose one
    chunk holds both layers is not split, and says so."""
    import torch
    import torch.distributed.checkpoint as tdcp

    ck = tmp_path / "ck"
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    with pytest.warns(UserWarning, match="single process"):
        tdcp.save({"decoder.layers.w": w}, checkpoint_id=str(ck))
    (ck / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    assert wio.detect_format(str(ck)) == "megatron"
    with megatron.open_reader(str(ck)) as r:
        assert r.specs().names == ["decoder.layers.w"]
        assert "read as stored" in r.specs().metadata["megatron.stacked.decoder.layers.w"]
        _same_bits(r.read("decoder.layers.w"), w)
        assert r.specs().metadata["megatron.common"] == "no common.pt"


def _save_directory(root: Path, ck: Path, tracker: bytes, iterations: list[str]) -> Path:
    """Megatron-LM's ``--save`` directory around real mcore-written iteration folders: one
    folder per iteration and ``latest_checkpointed_iteration.txt`` naming the newest."""
    root.mkdir()
    for name in iterations:
        shutil.copytree(ck, root / name)
    (root / megatron.TRACKER).write_bytes(tracker)
    return root


@pytest.mark.megatron
@pytest.mark.parametrize(
    ("tracker", "folder"), [(b"100\n", "iter_0000100"), (b"release", "release")]
)
def test_the_save_directory_reads_the_iteration_its_tracker_names(
    written: dict[str, Path], tmp_path: Path, tracker: bytes, folder: str
) -> None:
    from safetensors.numpy import load_file

    from weightbridge.cli import main

    ck = written["tp2"] / "ck"
    root = _save_directory(tmp_path / "ckpt", ck, tracker, ["iter_0000050", folder])
    # the older iteration is damaged: reading it would fail, so the tracker's is what is read
    for f in (root / "iter_0000050").glob("*.distcp"):
        f.write_bytes(b"")
    for p in (root, root / megatron.TRACKER):
        assert wio.detect_format(str(p)) == "megatron", p
    state, _ = _expected(written["tp2"])
    with wio.open_reader(str(root)) as r:
        assert f"reading {folder}" in r.specs().metadata["megatron.iteration"]
        for name, t in state.items():
            _same_bits(r.read(_shown_name(name)), t)
    assert main(["convert", str(root), "-o", str(tmp_path / "out")]) == 0
    got: dict[str, np.ndarray] = {}
    for f in sorted((tmp_path / "out").glob("*.safetensors")):
        got.update(load_file(str(f)))
    assert sorted(got) == sorted(_shown_name(k) for k in state)


@pytest.mark.megatron
@pytest.mark.parametrize(
    ("tracker", "found"),
    [
        (b"latest\n", "found 'latest'"),
        (b"", "found ''"),
        (b"\xff\xfe", "cannot read"),
        (b"1" * 100, "more bytes follow"),
        (b"200", "iter_0000200 is missing"),
    ],
)
def test_a_missing_or_garbled_tracker_is_refused_naming_it(
    written: dict[str, Path], tmp_path: Path, tracker: bytes, found: str
) -> None:
    root = _save_directory(tmp_path / "ckpt", written["tp2"] / "ck", tracker, ["iter_0000100"])
    assert wio.detect_format(str(root)) == "megatron"
    with pytest.raises(FormatError) as e:
        wio.open_reader(str(root))
    assert megatron.TRACKER in str(e.value) and found in str(e.value), e.value


@pytest.mark.megatron
def test_a_tracker_naming_a_legacy_iteration_says_it_is_not_torch_dist(
    written: dict[str, Path], tmp_path: Path
) -> None:
    root = _save_directory(tmp_path / "ckpt", written["tp2"] / "ck", b"7", [])
    (root / "iter_0000007" / "mp_rank_00").mkdir(parents=True)
    with pytest.raises(FormatError, match="has no metadata.json.*legacy"):
        wio.open_reader(str(root))


@pytest.mark.megatron
def test_the_save_directory_from_s3_reads_its_tracked_iteration(
    written: dict[str, Path], tmp_path: Path
) -> None:
    from helpers import moto_s3

    from weightbridge import api

    root = _save_directory(tmp_path / "ckpt", written["tp2"] / "ck", b"100", ["iter_0000100"])
    with moto_s3("megatron-save", endpoint_env=None, read_timeout=30) as (endpoint, client):
        for f in sorted(p for p in root.rglob("*") if p.is_file()):
            client.upload_file(str(f), "megatron-save", f"ckpt/{f.relative_to(root)}")
        url = "s3://megatron-save/ckpt/"
        with wio.remote_options(endpoint=endpoint):
            assert wio.detect_format(url) == "megatron"
        remote = api.inspect(url, endpoint=endpoint)
    assert list(remote) == list(api.inspect(str(root / "iter_0000100")))
    assert "reading iter_0000100" in remote.metadata["megatron.iteration"]
