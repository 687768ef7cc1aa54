"""DeepSpeed ZeRO checkpoints: DeepSpeed writes them, we read the consolidated fp32 weights.

The oracle is DeepSpeed itself. A child process starts two gloo ranks on 127.0.0.1 on the CPU,
trains a tiny model (a tied embedding/head, a frozen layer, float and integer buffers) for two
steps under ZeRO stages 1, 2 and 3, in fp32 and bf16, and saves each with
``engine.save_checkpoint``; it also saves what DeepSpeed's own ``zero_to_fp32``
(``get_fp32_state_dict_from_zero_checkpoint``) makes of each checkpoint. Our reader, which
imports neither torch nor DeepSpeed, must give the same names, in the same order, with the same
bits. Hostile and damaged checkpoints are built from the real ones.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from helpers import is_memory_map
from safetensors.numpy import load_file

import weightbridge.io as wio
from weightbridge import api
from weightbridge.cli import main
from weightbridge.errors import FormatError
from weightbridge.io import zero
from weightbridge.io.base import zip_member_data_start
from weightbridge.io.torch import TorchReader

pytestmark = pytest.mark.deepspeed

# (name, ZeRO stage, bf16): what the child writes, each in its own directory.
CONFIGS = [("s1_fp32", 1, False), ("s2_bf16", 2, True), ("s3_fp32", 3, False), ("s3_bf16", 3, True)]
# Two ranks each import torch and DeepSpeed (and DeepSpeed may compile its shared-memory
# communication op once) on a loaded 2-core machine; the timeout only catches a hang.
_TIMEOUT_S = 900

WRITE = textwrap.dedent(
    """
    import json, os, socket, sys
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    import torch.multiprocessing as mp

    CONFIGS = json.loads(sys.argv[2])

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(11, 6)
            self.fc1 = torch.nn.Linear(6, 13)
            self.norm = torch.nn.LayerNorm(13)
            self.register_buffer("shift", torch.linspace(0, 1, 13))
            self.register_buffer("count", torch.arange(3))
            self.frozen = torch.nn.Linear(13, 5)
            self.frozen.requires_grad_(False)
            self.fc2 = torch.nn.Linear(5, 6)
            self.head = torch.nn.Linear(6, 11, bias=False)
            self.head.weight = self.embed.weight  # tied: DeepSpeed lists it in shared_params

        def forward(self, ids):
            h = self.fc1(self.embed(ids))
            h = self.norm(h) + self.shift.to(h.dtype)
            h = self.frozen(h.to(self.frozen.weight.dtype))
            h = self.fc2(h.to(self.fc2.weight.dtype))
            return self.head(h.to(self.head.weight.dtype))

    def run(rank, world, port, out):
        import deepspeed
        if os.environ.get("ZERO_BIG"):  # one 64 MB weight, for the memory bound
            global Net
            Net = lambda: torch.nn.Sequential(torch.nn.Linear(4096, 4096), torch.nn.Linear(4096, 11))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        # No LOCAL_SIZE: DeepSpeed's shared-memory all-reduce (used when it equals the world
        # size) spin-waits on flags between the ranks; one CI run under load aborted in it.
        # Without it the ranks all-reduce through gloo: the checkpoints are the same.
        deepspeed.init_distributed(dist_backend="gloo")
        for name, stage, bf16 in CONFIGS:
            torch.manual_seed(0)
            model = Net()
            config = {
                "train_batch_size": 4 * world,
                # Parameters under 50 elements stay whole on every rank (DeepSpeed's default
                # threshold, 1e5, would keep this whole tiny model so), the others partitioned:
                # a ZeRO-3 module's state_dict() then mixes whole and placeholder tensors.
                "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 50},
                "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
                "bf16": {"enabled": bf16},
            }
            params = [p for p in model.parameters() if p.requires_grad]
            engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=config)
            for step in range(2):
                torch.manual_seed(step)
                x = torch.randint(0, 11, (4,))
                if os.environ.get("ZERO_BIG"):
                    x = torch.randn(4, 4096, dtype=torch.bfloat16 if bf16 else torch.float32)
                engine.backward(engine(x).float().sum())
                engine.step()
            engine.save_checkpoint(os.path.join(out, name))
            if rank == 0:
                # What save_pretrained (Trainer._save) writes of a model's state_dict() when
                # nothing gathers the ZeRO-3 partitions: each parameter an empty placeholder,
                # each buffer whole; the tied head dropped as save_pretrained drops tied keys.
                from safetensors.torch import save_file
                state = {k: v for k, v in engine.module.state_dict().items() if k != "head.weight"}
                save_file(state, os.path.join(out, name + ".trainer.safetensors"),
                          metadata={"format": "pt"})
            torch.distributed.barrier()

    if __name__ == "__main__":
        out = sys.argv[1]
        with socket.socket() as s:  # a free port on 127.0.0.1 for the two ranks to meet
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(run, args=(2, port, out), nprocs=2)
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        from safetensors.torch import save_file
        for name, _, _ in CONFIGS:
            state = get_fp32_state_dict_from_zero_checkpoint(os.path.join(out, name))
            # safetensors keeps no aliases: each tied tensor is saved as its own copy
            save_file({k: v.contiguous().clone() for k, v in state.items()},
                      os.path.join(out, name + ".expected.safetensors"))
            with open(os.path.join(out, name + ".order.json"), "w") as f:
                json.dump(list(state), f)
    """
)


def write(out: Path, configs: list[tuple[str, int, bool]], **env: str) -> Path:
    """Run the DeepSpeed child (WRITE) writing `configs` into `out`."""
    pytest.importorskip("deepspeed")
    script = out / "write.py"
    script.write_text(WRITE)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore", **env}
    done = subprocess.run(
        [sys.executable, str(script), str(out), json.dumps(configs)],
        capture_output=True,
        text=True,
        timeout=_TIMEOUT_S,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four real ZeRO checkpoints (see CONFIGS) and zero_to_fp32's output for each."""
    return write(tmp_path_factory.mktemp("zero"), CONFIGS)


def expected(checkpoints: Path, name: str) -> tuple[list[str], dict[str, np.ndarray]]:
    order = json.loads((checkpoints / f"{name}.order.json").read_text())
    return order, load_file(str(checkpoints / f"{name}.expected.safetensors"))


def same_bits(got: np.ndarray, want: np.ndarray, name: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (name, got.dtype, want.dtype)
    assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(want).tobytes(), name


@pytest.mark.parametrize("config", [c[0] for c in CONFIGS])
def test_reads_what_zero_to_fp32_makes_bit_for_bit(checkpoints: Path, config: str) -> None:
    order, want = expected(checkpoints, config)
    with wio.open_reader(checkpoints / config) as reader:
        assert isinstance(reader, zero.ZeroReader)
        assert reader.specs().names == order
        for name in order:
            same_bits(np.asarray(reader.read(name)), want[name], name)
            reader.release(name)
        meta = reader.specs().metadata
        stage = next(str(s) for n, s, _ in CONFIGS if n == config)
        assert meta["zero.stage"] == stage and meta["zero.world_size"] == "2"
    # bf16 training keeps fp32 master weights; frozen parameters stay as trained (bf16)
    dtypes = {t.name: t.dtype for t in wio.open_reader(checkpoints / config).specs()}
    assert dtypes["fc1.weight"] == "F32" and dtypes["count"] == "I64"
    if config == "s1_fp32":
        # DeepSpeed records no frozen parameters here, so zero_to_fp32 leaves them out; the
        # reader does too, and says so.
        assert "frozen.weight" not in dtypes
        note = wio.open_reader(checkpoints / config).specs().metadata["zero.not_consolidated"]
        assert "frozen.weight" in note
    else:
        assert dtypes["frozen.weight"] == ("BF16" if config.endswith("bf16") else "F32")


def test_detected_from_the_run_directory_or_the_tag(checkpoints: Path) -> None:
    run = checkpoints / "s2_bf16"
    tag = (run / "latest").read_text().strip()
    assert wio.detect_format(run) == "zero"
    assert wio.detect_format(run / tag) == "zero"
    with wio.open_reader(run / tag) as reader:
        assert reader.specs().metadata["zero.tag"] == tag
    assert not zero.detect(str(run / tag / "mp_rank_00_model_states.pt"), b"")


def test_parameters_inside_one_partition_are_maps(checkpoints: Path) -> None:
    """Stages 1-2: a parameter inside one rank's partition is a view of the mapped file."""
    with wio.open_reader(checkpoints / "s1_fp32") as reader:
        names = reader.specs().names
        ranged = [n for n in names if reader.byte_range(n) is not None]
        # 66 + 78 + ... elements over partitions of 110 and 109: one parameter straddles them
        assert "embed.weight" in ranged and len(ranged) == len(names) - 1
        for n in ranged:
            assert is_memory_map(np.asarray(reader.read(n)))


@pytest.mark.parametrize("config", ["s2_bf16", "s3_fp32"])
def test_optimizer_moments_are_never_read(checkpoints: Path, tmp_path: Path, config) -> None:
    """Every storage of the optimizer files but the fp32 master weights is overwritten with
    garbage: the weights still read bit for bit, and no moment is among the tensors."""
    order, want = expected(checkpoints, config)
    tag = _copy(checkpoints, config, tmp_path)
    key = (
        "single_partition_of_fp32_groups" if config.startswith(("s1", "s2")) else "fp32_flat_groups"
    )
    spoiled = 0
    for path in tag.glob("*_optim_states.pt"):
        state = TorchReader(str(path), extra_globals=zero.ZERO_GLOBALS).pickled
        keep = {t.storage.key for t in state["optimizer_state_dict"][key]}
        with zipfile.ZipFile(path) as zf, open(path, "r+b") as f:
            for info in zf.infolist():
                storage = info.filename.rsplit("/data/", 1)
                if len(storage) == 2 and storage[1] not in keep:
                    f.seek(data_start(f, info))
                    f.write(b"\xff" * info.file_size)
                    spoiled += 1
    assert spoiled >= 4  # exp_avg and exp_avg_sq of each rank at least
    with wio.open_reader(tag) as reader:
        assert reader.specs().names == order
        assert not [n for n in order if "exp_avg" in n or "optimizer" in n]
        for name in order:
            same_bits(np.asarray(reader.read(name)), want[name], name)


@pytest.mark.parametrize("config", ["s2_bf16", "s3_bf16"])
def test_converts_with_the_api_and_the_cli(checkpoints: Path, tmp_path: Path, config) -> None:
    order, want = expected(checkpoints, config)
    api.convert(checkpoints / config, tmp_path / "api")
    got = load_file(str(tmp_path / "api" / "model.safetensors"))
    assert sorted(got) == sorted(order)
    for name in order:
        same_bits(got[name], want[name], name)
    assert (
        main(["convert", str(checkpoints / config), "-o", str(tmp_path / "cli"), "--dtype", "bf16"])
        == 0
    )
    got = load_file(str(tmp_path / "cli" / "model.safetensors"))
    same_bits(got["fc1.weight"], want["fc1.weight"].astype(ml_dtypes.bfloat16), "fc1.weight")
    assert got["count"].dtype == np.int64


# --- hostile and damaged checkpoints ---------------------------------------------------------


def _copy(checkpoints: Path, config: str, tmp_path: Path) -> Path:
    run = tmp_path / config
    shutil.copytree(checkpoints / config, run)
    return run / (run / "latest").read_text().strip()


def data_start(f, info: zipfile.ZipInfo) -> int:
    return zip_member_data_start(f, info, "test")


class _Runs:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # what a hostile pickle does: call os.system on load
        return (os.system, (f"touch {self.path}",))


def test_an_optimizer_pickle_that_runs_code_is_refused_and_nothing_runs(
    checkpoints: Path, tmp_path: Path
) -> None:
    tag = _copy(checkpoints, "s2_bf16", tmp_path)
    marker = tmp_path / "ran"
    victim = next(tag.glob("*rank_1*_optim_states.pt"))
    with zipfile.ZipFile(victim) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    pkl = next(n for n in members if n.endswith("/data.pkl"))
    members[pkl] = pickle.dumps({"optimizer_state_dict": _Runs(str(marker))}, protocol=2)
    with zipfile.ZipFile(victim, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    with pytest.raises(FormatError, match=r"refusing to load global (posix|os)\.system"):
        wio.open_reader(tag)
    assert not marker.exists()


def test_a_missing_rank_is_refused_naming_both_counts(checkpoints: Path, tmp_path: Path) -> None:
    tag = _copy(checkpoints, "s3_fp32", tmp_path)
    next(tag.glob("*rank_1*_optim_states.pt")).unlink()
    with pytest.raises(FormatError, match=r"saved by 2 ranks, but 1 \*_optim_states.pt"):
        wio.open_reader(tag)


def test_model_parallel_checkpoints_are_refused(checkpoints: Path, tmp_path: Path) -> None:
    tag = _copy(checkpoints, "s1_fp32", tmp_path)
    shutil.copy(tag / "mp_rank_00_model_states.pt", tag / "mp_rank_01_model_states.pt")
    with pytest.raises(FormatError, match="model- or pipeline-parallel"):
        wio.open_reader(tag)


def test_truncated_optimizer_file_is_refused_naming_it(checkpoints: Path, tmp_path: Path) -> None:
    tag = _copy(checkpoints, "s2_bf16", tmp_path)
    victim = next(tag.glob("*rank_0*_optim_states.pt"))
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match=victim.name):
        wio.open_reader(tag)


def test_a_tag_that_leaves_the_directory_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / "latest").write_text("../elsewhere")
    assert not zero.detect(str(tmp_path), b"")
    with pytest.raises(FormatError, match="not a DeepSpeed ZeRO checkpoint"):
        zero.open_reader(str(tmp_path))


# --- the memory bound ------------------------------------------------------------------------

MB = 1 << 20
CONVERT = textwrap.dedent(
    """
    import sys
    import weightbridge.api, weightbridge.io
    weightbridge.io.detect_format(sys.argv[1])
    with open("/proc/self/status") as f:
        print(int(dict(line.split(":", 1) for line in f)["RssAnon"].split()[0]) * 1024, flush=True)
    weightbridge.api.convert(sys.argv[1], sys.argv[2])
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")
def test_converting_stays_within_the_largest_tensor(tmp_path: Path) -> None:
    """Stage 3 splits every parameter over both ranks, so each is assembled: the conversion's
    anonymous memory, polled from /proc, stays under the largest tensor (64 MB) plus 128 MB
    above the child's baseline, although the optimizer files hold 3x the weights."""
    from test_memory_bound import run_capped

    out = write(tmp_path, [("big", 3, False)], ZERO_BIG="1")
    order, want = expected(out, "big")
    code, text, peak = run_capped(["-c", CONVERT, str(out / "big"), str(tmp_path / "o")], None)
    assert code == 0, text
    baseline = int(text.split()[0])
    assert peak - baseline < 64 * MB + 128 * MB, (
        f"peak {peak / MB:.0f} MB, base {baseline / MB:.0f}"
    )
    got = load_file(str(tmp_path / "o" / "model.safetensors"))
    for name in order:
        same_bits(got[name], want[name], name)


# --- Hugging Face Trainer checkpoint folders --------------------------------------------------


def _trainer_folder(checkpoints: Path, config: str, tmp_path: Path, weights: Path) -> Path:
    """A Trainer ``checkpoint-N/`` folder: DeepSpeed's run (``latest``, ``global_stepN/``,
    ``zero_to_fp32.py``) with the weights file and config beside it."""
    folder = tmp_path / "checkpoint-2"
    shutil.copytree(checkpoints / config, folder)
    shutil.copyfile(weights, folder / "model.safetensors")
    (folder / "config.json").write_text("{}")
    return folder


@pytest.mark.parametrize("config", ["s3_fp32", "s3_bf16"])
def test_a_trainer_folder_with_placeholder_weights_reads_the_zero_run(
    checkpoints: Path, tmp_path: Path, config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = checkpoints / f"{config}.trainer.safetensors"
    hollow = load_file(str(saved))
    assert hollow["fc1.weight"].size == 0 and hollow["shift"].size == 13  # what DeepSpeed left
    folder = _trainer_folder(checkpoints, config, tmp_path, saved)
    assert (folder / "zero_to_fp32.py").is_file()
    tag = (folder / "latest").read_text().strip()
    assert wio.weights_path(str(folder)) == str(folder / tag)
    assert wio.detect_format(folder) == "zero"
    order, want = expected(checkpoints, config)
    notes = api.weights_notes(folder)
    assert len(notes) == 1 and f"reading the ZeRO run {tag}" in notes[0], notes
    # embed, fc1 and frozen weights were partitioned; the small ones and buffers stayed whole
    assert "3 empty placeholder tensors of 11" in notes[0], notes
    assert "'embed.weight' has 0 elements" in notes[0], notes
    assert main(["inspect", str(folder)]) == 0
    assert f"reading the ZeRO run {tag}" in capsys.readouterr().err
    assert main(["convert", str(folder), "-o", str(tmp_path / "cli")]) == 0
    assert "stage3_gather_16bit_weights_on_model_save" in capsys.readouterr().err
    got = load_file(str(tmp_path / "cli" / "model.safetensors"))
    assert sorted(got) == sorted(order)
    for name in order:
        same_bits(got[name], want[name], name)
    # the hollow file itself is still read when named
    assert wio.detect_format(folder / "model.safetensors") == "safetensors"


def test_a_trainer_folder_with_complete_weights_keeps_them_and_names_the_run(
    checkpoints: Path, tmp_path: Path
) -> None:
    # complete weights, as with stage3_gather_16bit_weights_on_model_save (or ZeRO 1-2)
    folder = _trainer_folder(
        checkpoints, "s3_fp32", tmp_path, checkpoints / "s3_fp32.expected.safetensors"
    )
    tag = (folder / "latest").read_text().strip()
    assert wio.weights_path(str(folder)) == str(folder / "model.safetensors")
    (note,) = api.weights_notes(folder)
    assert "reading model.safetensors" in note, note
    assert f"the DeepSpeed ZeRO run {tag}" in note and str(folder / tag) in note, note
    assert wio.detect_format(folder / tag) == "zero"  # the way the note offers


def test_a_trainer_folder_whose_weights_file_has_no_tensors_reads_the_zero_run(
    checkpoints: Path, tmp_path: Path
) -> None:
    from safetensors.numpy import save_file

    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty), metadata={"format": "pt"})  # Trainer._save(state_dict={})
    folder = _trainer_folder(checkpoints, "s2_bf16", tmp_path, empty)
    (note,) = api.weights_notes(folder)
    assert "model.safetensors holds no tensors" in note, note
    assert wio.detect_format(folder) == "zero"


def test_a_trainer_folder_in_s3_with_placeholder_weights_reads_the_zero_run(
    checkpoints: Path, tmp_path: Path
) -> None:
    pytest.importorskip("moto.server")
    from helpers import moto_s3

    folder = _trainer_folder(
        checkpoints, "s3_fp32", tmp_path, checkpoints / "s3_fp32.trainer.safetensors"
    )
    tag = (folder / "latest").read_text().strip()
    order, want = expected(checkpoints, "s3_fp32")
    with moto_s3("trainer", endpoint_env=None, read_timeout=30) as (endpoint, client):
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            client.upload_file(str(f), "trainer", f"checkpoint-2/{f.relative_to(folder)}")
        url = "s3://trainer/checkpoint-2/"
        with wio.remote_options(endpoint=endpoint):
            assert wio.weights_path(url) == f"s3://trainer/checkpoint-2/{tag}"
            assert wio.detect_format(url) == "zero"
        api.convert(url, tmp_path / "out", endpoint=endpoint)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(got) == sorted(order)
    for name in order:
        same_bits(got[name], want[name], name)
