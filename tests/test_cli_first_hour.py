"""A newcomer's first hour (issue #16): Hugging Face folders, `--dtype` with a target, verifying
partial conversions, and the command line's manners (help, pipes, Ctrl-C, units, start-up)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from test_cli import run

from weightbridge import api
from weightbridge.cli import OUTPUT_FORMATS, build_parser
from weightbridge.io import FORMATS, open_reader, write_checkpoint
from weightbridge.io.hf_folder import WEIGHT_FILES, choose_weights
from weightbridge.io.sharded import write_index
from weightbridge.streaming.convert import ConversionReport


def hf_folder(path, *weights: str) -> None:
    """A folder as `save_pretrained` leaves it; each weight file holds one tensor named after it."""
    path.mkdir()
    (path / "config.json").write_text('{"model_type": "bert"}')
    (path / "tokenizer.json").write_text("{}")
    for name in weights:
        tensor = {name.split(".")[0].replace("-", "_"): np.ones(2, np.float32)}
        if name.endswith(".index.json"):
            shard = name.removesuffix(".index.json").replace(".", "-00001-of-00001.")
            write_checkpoint(str(path / shard), tensor, format=_format_of(shard))
            write_index(str(path / name), dict.fromkeys(tensor, shard), 8)
        else:
            write_checkpoint(str(path / name), tensor, format=_format_of(name))


def _format_of(name: str) -> str:
    return {"safetensors": "safetensors", "bin": "torch", "h5": "h5", "msgpack": "msgpack"}[
        name.rsplit(".", 1)[1]
    ]


# -- 1. Hugging Face folders ----------------------------------------------------------------


@pytest.mark.parametrize(
    "weights,chosen",
    [
        (("model.safetensors", "pytorch_model.bin", "tf_model.h5"), "model.safetensors"),
        (("model.safetensors.index.json", "model.safetensors"), "model.safetensors.index.json"),
        (
            ("pytorch_model.bin.index.json", "model.safetensors.index.json"),
            "model.safetensors.index.json",
        ),
        (("pytorch_model.bin.index.json", "tf_model.h5"), "pytorch_model.bin.index.json"),
        (("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack"), "pytorch_model.bin"),
        (("tf_model.h5", "flax_model.msgpack"), "tf_model.h5"),
        (("flax_model.msgpack",), "flax_model.msgpack"),
    ],
)
def test_a_hugging_face_folder_reads_its_preferred_weights(tmp_path, weights, chosen) -> None:
    folder = tmp_path / "bert"
    hf_folder(folder, *weights)
    choice = choose_weights(str(folder))
    assert choice is not None and choice.chosen == chosen
    assert set(choice.others) == set(weights) - {chosen}
    with open_reader(folder) as r:
        (name,) = r.specs().names
    assert name == chosen.split(".")[0]


def test_inspect_a_hugging_face_folder_says_which_file_it_read(tmp_path) -> None:
    folder = tmp_path / "bert"
    hf_folder(folder, "model.safetensors", "pytorch_model.bin", "tf_model.h5")
    proc = run("inspect", str(folder))
    assert "model  2" in proc.stdout and "1 tensors" in proc.stdout
    assert proc.stderr == (
        f"weightbridge: {folder}: a Hugging Face folder; reading model.safetensors (also there: "
        "pytorch_model.bin, tf_model.h5; pass a file to choose another)\n"
    )


def test_a_hugging_face_folder_as_like_and_in_the_plan_log(tmp_path) -> None:
    folder = tmp_path / "mine"
    hf_folder(folder, "model.safetensors", "flax_model.msgpack")
    write_checkpoint(str(tmp_path / "theirs.safetensors"), {"model": np.ones(2, np.float32)})
    proc = run("plan", str(tmp_path / "theirs.safetensors"), "--like", str(folder))
    assert "model" in proc.stdout and "reading model.safetensors" in proc.stderr
    log: list[str] = []
    api.plan(str(tmp_path / "theirs.safetensors"), str(folder), log=log)
    assert any("reading model.safetensors (also there: flax_model.msgpack" in n for n in log)


def test_a_folder_without_weights_says_what_was_looked_for(tmp_path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    proc = run("inspect", str(folder), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no checkpoint weightbridge recognises" in proc.stderr
    assert all(name in proc.stderr for name in WEIGHT_FILES)
    assert "found config.json, tokenizer.json" in proc.stderr
    assert "Point at the weights file itself" in proc.stderr


def test_a_folder_of_only_weights_is_read_without_a_note(tmp_path) -> None:
    folder = tmp_path / "plain"
    folder.mkdir()
    write_checkpoint(str(folder / "model.safetensors"), {"w": np.ones(2, np.float32)})
    assert run("inspect", str(folder)).stderr == ""


# -- 2. --dtype with a target spec ----------------------------------------------------------


def test_the_readmes_dtype_example_works_on_the_demos_files(tmp_path) -> None:
    run("demo", "--dir", str(tmp_path))
    out = tmp_path / "out"
    args = ["--like", str(tmp_path / "mine.json"), "-o", str(out), "--max-shard-size", "2GB"]
    run("convert", str(tmp_path / "theirs"), *args, "--dtype", "bf16")
    spec = json.loads(run("inspect", str(out), "--json").stdout)
    assert {v["dtype"] for v in spec.values()} == {"BF16"}
    assert "verified 6 tensors" in run("verify", str(tmp_path / "theirs"), str(out)).stdout


def test_dtype_overrides_float_dtypes_only(tmp_path) -> None:
    write_checkpoint(
        str(tmp_path / "theirs.safetensors"),
        {"w": np.ones((2, 3), np.float32), "steps": np.arange(3, dtype=np.int64)},
    )
    mine = {"w": {"shape": [2, 3], "dtype": "F32"}, "steps": {"shape": [3], "dtype": "I64"}}
    (tmp_path / "mine.json").write_text(json.dumps(mine))
    out = tmp_path / "out"
    run("convert", str(tmp_path / "theirs.safetensors"), "--like", str(tmp_path / "mine.json"),
        "-o", str(out), "--dtype", "f16")  # fmt: skip
    spec = json.loads(run("inspect", str(out), "--json").stdout)
    assert (spec["w"]["dtype"], spec["steps"]["dtype"]) == ("F16", "I64")
    helped = run("convert", "--help").stdout
    assert "overrides the target's float dtypes" in " ".join(helped.split())


# -- 3. verify a partial conversion --------------------------------------------------------


def test_verify_a_partial_conversion_with_like(tmp_path) -> None:
    rng = np.random.default_rng(0)
    theirs = {"body.weight": rng.standard_normal((4, 4)).astype(np.float32)}
    mine = {**theirs, "head.weight": rng.standard_normal((3, 4)).astype(np.float32)}
    write_checkpoint(str(tmp_path / "theirs.safetensors"), theirs)
    write_checkpoint(str(tmp_path / "mine.safetensors"), mine)
    src, like, out = (str(tmp_path / n) for n in ("theirs.safetensors", "mine.safetensors", "o"))
    run("convert", src, "--like", like, "--partial", "-o", out)
    proc = run("verify", src, out, check=False)
    assert proc.returncode == 2
    assert "no target was given" in proc.stderr and "--like model.safetensors" in proc.stderr
    assert "target=" in proc.stderr
    assert "verified 2 tensors" in run("verify", src, out, "--like", like).stdout


def test_the_apis_prefix_of_kept_target_values_is_the_planners() -> None:
    from weightbridge.planning.planner import MINE

    assert api.MINE == MINE


# -- 4. manners ----------------------------------------------------------------------------


def test_help_texts() -> None:
    convert = " ".join(run("convert", "--help").stdout.split())
    assert all(f in convert for f in ("msgpack", "gguf", "zarr", "orbax"))
    verify = " ".join(run("verify", "--help").stdout.split())
    assert "needed for zarr" not in verify and "--like" in verify
    for command in ("inspect", "spec"):
        shown = " ".join(run(command, "--help").stdout.split())
        assert "Hugging Face model folder" in shown


@pytest.mark.parametrize("format", ["zarr", "orbax"])
def test_verify_finds_zarr_and_orbax_output_without_format(tmp_path, format) -> None:
    pytest.importorskip("tensorstore")
    write_checkpoint(str(tmp_path / "theirs.safetensors"), {"w": np.ones((2, 3), np.float32)})
    src, out = str(tmp_path / "theirs.safetensors"), str(tmp_path / "out")
    run("convert", src, "-o", out, "--format", format, "-q")
    assert "verified 1 tensors" in run("verify", src, out).stdout


def test_the_listed_output_formats_are_the_registrys() -> None:
    names = {alias for row in FORMATS.values() for alias in row.output_names}
    assert set(OUTPUT_FORMATS) <= names


def test_a_closed_pipe_ends_quietly_like_unix_tools(tmp_path) -> None:
    many = {f"layer.{i}.weight": np.zeros(1, np.float32) for i in range(3000)}
    write_checkpoint(str(tmp_path / "big.safetensors"), many)
    command = [sys.executable, "-m", "weightbridge", "inspect", "--json"]
    with subprocess.Popen(
        [*command, str(tmp_path / "big.safetensors")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.read(100)
        proc.stdout.close()  # `| head -c 100`
        err = proc.stderr.read().decode()
        assert proc.wait() == 128 + signal.SIGPIPE
    assert err == ""


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path) -> None:
    code = (
        "import sys, weightbridge.api as api, weightbridge.cli as cli\n"
        "def interrupted(path):\n"
        "    raise KeyboardInterrupt\n"
        "api.inspect = interrupted\n"
        "sys.exit(cli.main(['inspect', 'x.safetensors']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (proc.returncode, proc.stderr) == (130, "weightbridge: interrupted\n")


def test_ctrl_c_while_the_command_line_is_imported() -> None:
    code = (
        "import runpy, sys\n"
        "class Interrupt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'weightbridge.cli':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "runpy.run_module('weightbridge', run_name='__main__')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (proc.returncode, proc.stderr) == (130, "weightbridge: interrupted\n")


def test_summary_sizes_fit_small_conversions() -> None:
    report = ConversionReport("out", ["a"], ["a"], [], bytes_written=23_400, seconds=0.02)
    assert report.summary() == "wrote 1 shard(s), 23.4 KB in 0.02 s (1.2 MB/s) to out"


def test_demo_prints_sensible_sizes_and_cleans_up(tmp_path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "weightbridge", "demo"],
        capture_output=True,
        text=True,
        env={**os.environ, "TMPDIR": str(scratch)},
        check=True,
    )
    assert "0.0 MB" not in proc.stdout and " KB in " in proc.stdout
    assert list(scratch.iterdir()) == []


def test_an_s3_output_without_endpoint_names_the_option() -> None:
    parser = build_parser()
    args = parser.parse_args(["convert", "x", "-o", "s3://bucket/x"])
    from weightbridge.cli import _endpoint_note

    note = _endpoint_note(args, env={})
    assert note is not None and "--endpoint" in note
    assert _endpoint_note(args, env={"WEIGHTBRIDGE_S3_ENDPOINT": "http://h:9000"}) is None
    local = parser.parse_args(["convert", "x", "-o", "out"])
    assert _endpoint_note(local, env={}) is None


# -- 5. start-up ---------------------------------------------------------------------------


def test_the_command_line_imports_nothing_heavy_until_a_command_needs_it(tmp_path) -> None:
    write_checkpoint(str(tmp_path / "m.safetensors"), {"w": np.ones(2, np.float32)})
    heavy = ("tensorstore", "h5py", "torch", "jax", "tqdm")
    code = (
        "import sys, weightbridge.cli as cli\n"
        f"heavy = {heavy!r}\n"
        "print(sorted(m for m in (*heavy, 'numpy', 'weightbridge.planning') if m in sys.modules))\n"
        "cli.main(['inspect', sys.argv[1]])\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "m.safetensors")],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = proc.stdout.splitlines()
    assert lines[0] == "[]" and lines[-1] == "[]"
