"""The memory bound, measured on a real process: a checkpoint larger than the memory cap converts.

The converter runs in a subprocess under ``RLIMIT_DATA``, which caps anonymous memory (heap,
anonymous mmaps, thread stacks) but not read-only file mappings, so the source may be mapped
whole while every byte of transformed data must fit under the cap. The cap is the child's
baseline (Python, numpy and weightbridge imported, nothing read) plus the largest tensor plus
256 MB; the checkpoint is larger than the cap. The child's ``RssAnon`` is also polled from
``/proc`` and held to the same bound.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import textwrap
import time

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from weightbridge import api
from weightbridge.io.sharded import write_index

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and RLIMIT_DATA"),
]

MB = 1 << 20
SLACK = 256 * MB
TENSOR = 64 * MB

# name, shape, dtype: 8 tensors of 64 MB (512 MB). The 2-D `weight`s are transposed by the
# pytorch -> flax layout change; the embedding and the 1-D tensors are copied byte for byte.
TENSORS = [
    ("embed.weight", (16384, 1024), np.float32),
    ("layers.0.fc.weight", (4096, 4096), np.float32),
    ("layers.0.norm.weight", (16 * MB,), np.float32),
    ("layers.1.fc.weight", (8192, 4096), ml_dtypes.bfloat16),
    ("layers.1.fc.bias", (32 * MB,), ml_dtypes.bfloat16),
    ("layers.2.fc.weight", (2048, 8192), np.float32),
    ("layers.3.fc.weight", (4096, 8192), ml_dtypes.bfloat16),
    ("head.weight", (8192, 2048), np.float32),
]

# Run in the child: the same imports as the baseline below, then the conversion.
CONVERT = textwrap.dedent(
    """
    import sys
    import numpy
    import weightbridge.api
    report = weightbridge.api.convert(
        sys.argv[1], sys.argv[2], renames=[r"^layers\\.(\\d+)\\.=layers_\\1/"],
        from_framework="pytorch", to_framework="flax", max_shard_size="200MB",
    )
    print(report.summary())
    """
)


# The baseline: interpreter, numpy and weightbridge imported, and the source's format detected
# (which imports every format module), but no tensor data touched.
def baseline_code(*modules: str) -> str:
    """The baseline child's code, also importing `modules` (what the measured child imports)."""
    imports = "".join(
        f"import {m}\n" for m in ("numpy", "weightbridge.api", "weightbridge.io", *modules)
    )
    return (
        "import sys\n"
        + imports
        + textwrap.dedent(
            """
        weightbridge.io.detect_format(sys.argv[1])
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f)
        print(int(fields["VmData"].split()[0]) * 1024, int(fields["RssAnon"].split()[0]) * 1024)
        """
        )
    )


BASELINE = baseline_code()


def random_array(rng: np.random.Generator, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """Random finite values from random bits (fast): the top exponent bit is cleared."""
    dt = np.dtype(dtype)
    n = int(np.prod(shape))
    if dt.itemsize == 4:
        bits = np.frombuffer(rng.bytes(4 * n), np.uint32) & np.uint32(0xBFFFFFFF)
    else:
        bits = np.frombuffer(rng.bytes(2 * n), np.uint16) & np.uint16(0xBFFF)
    return bits.view(dt).reshape(shape)


def make_checkpoint(path: str) -> int:
    """Two safetensors shards (written by the reference library) and an index; returns bytes."""
    os.makedirs(path)
    rng = np.random.default_rng(0)
    weight_map = {}
    for k, part in enumerate((TENSORS[:4], TENSORS[4:]), 1):
        shard = f"model-{k:05d}-of-00002.safetensors"
        arrays = {name: random_array(rng, shape, dt) for name, shape, dt in part}
        assert all(a.nbytes == TENSOR for a in arrays.values())
        save_file(arrays, os.path.join(path, shard))
        weight_map.update(dict.fromkeys(arrays, shard))
        del arrays
    write_index(os.path.join(path, "model.safetensors.index.json"), weight_map, 8 * TENSOR)
    return 8 * TENSOR


def _status(pid: int) -> dict[str, int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            return {
                k: int(v.split()[0]) * 1024
                for k, _, v in (line.partition(":") for line in f)
                if k in ("RssAnon", "VmData", "VmHWM")
            }
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return {}


def run_capped(args: list[str], cap: int | None, timeout: float = 120) -> tuple[int, str, int]:
    """Run `python -c ...` under RLIMIT_DATA=cap; return (exit code, output, peak RssAnon)."""

    def limit() -> None:
        if cap is not None:
            resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))

    proc = subprocess.Popen(
        [sys.executable, *args],
        preexec_fn=limit,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    peak = 0
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        peak = max(peak, _status(proc.pid).get("RssAnon", 0))
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"{args[:2]} did not finish within {timeout} s")
        time.sleep(0.01)
    out, _ = proc.communicate()
    return proc.returncode, out, peak


def test_rlimit_data_caps_anonymous_memory_but_not_file_maps(tmp_path) -> None:
    """The premise of the memory test, checked on this machine and kernel."""
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(256 * MB)
    code = textwrap.dedent(
        """
        import mmap, sys
        import numpy as np
        with open(sys.argv[1], "rb") as f:
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        a = np.frombuffer(m, np.uint8)
        print("mapped", int(a[:: 4096].sum()), a.nbytes)
        try:
            b = np.ones(int(sys.argv[2]), np.uint8)
            print("allocated")
        except MemoryError:
            print("refused")
        """
    )
    cap = 160 * MB  # less than the file, more than the interpreter with numpy
    code_, out, _ = run_capped(["-c", code, str(big), str(128 * MB)], cap)
    assert code_ == 0, out
    assert f"mapped 0 {256 * MB}" in out and "refused" in out, out
    code_, out, _ = run_capped(["-c", code, str(big), str(8 * MB)], cap)
    assert code_ == 0 and "allocated" in out, out


def test_checkpoint_larger_than_the_cap_converts_within_largest_tensor_plus_256mb(
    tmp_path,
) -> None:
    src, dest = str(tmp_path / "src"), str(tmp_path / "out")
    total = make_checkpoint(src)

    code, out, _ = run_capped(["-c", BASELINE, src], None)
    assert code == 0, out
    base_data, base_anon = map(int, out.split())
    cap = base_data + TENSOR + SLACK
    assert total > cap, "the checkpoint must not fit under the cap, or the test proves nothing"

    code, out, peak = run_capped(["-c", CONVERT, src, dest], cap)
    assert code == 0, f"conversion failed under RLIMIT_DATA={cap / MB:.0f} MB:\n{out}"
    assert peak <= base_anon + TENSOR + SLACK, (
        f"peak RssAnon {peak / MB:.0f} MB > baseline {base_anon / MB:.0f} MB + largest tensor "
        f"{TENSOR / MB:.0f} MB + {SLACK / MB:.0f} MB"
    )

    assert api.verify(src, dest) == len(TENSORS)
    # And through the reference library: transposed where the layout says, bit for bit.
    outputs = sorted(n for n in os.listdir(dest) if n.endswith(".safetensors"))
    assert len(outputs) > 1
    where = {}
    for n in outputs:
        with safe_open(os.path.join(dest, n), "numpy") as f:
            where.update(dict.fromkeys(f.keys(), os.path.join(dest, n)))
    assert sorted(where) == sorted(
        [
            "embed.embedding",
            "layers_0/fc.kernel",
            "layers_0/norm.scale",
            "layers_1/fc.kernel",
            "layers_1/fc.bias",
            "layers_2/fc.kernel",
            "layers_3/fc.kernel",
            "head.kernel",
        ]
    )
    with safe_open(os.path.join(src, "model-00001-of-00002.safetensors"), "numpy") as f:
        weight, embed = f.get_tensor("layers.1.fc.weight"), f.get_tensor("embed.weight")
    with safe_open(where["layers_1/fc.kernel"], "numpy") as f:
        kernel = f.get_tensor("layers_1/fc.kernel")
    with safe_open(where["embed.embedding"], "numpy") as f:
        embedding = f.get_tensor("embed.embedding")
    assert kernel.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(kernel.view(np.uint16), weight.T.view(np.uint16))
    np.testing.assert_array_equal(embedding.view(np.uint32), embed.view(np.uint32))


# Every other format, both ways: the 512 MB checkpoint is converted into the format under the
# cap (transposing, as above), and that output is converted back to safetensors under the cap.
CONVERT_TO = textwrap.dedent(
    """
    import sys
    import numpy
    import weightbridge.api
    kwargs = dict(format=sys.argv[3], max_shard_size="200MB")
    if sys.argv[4] == "flax":
        kwargs.update(renames=[r"^layers\\.(\\d+)\\.=layers_\\1/"], from_framework="pytorch",
                      to_framework="flax")
    report = weightbridge.api.convert(sys.argv[1], sys.argv[2], **kwargs)
    print(report.summary())
    """
)


@pytest.mark.parametrize("format", ["npz", "h5", "torch", "msgpack", "zarr"])
def test_every_format_converts_both_ways_within_the_bound(tmp_path, format: str) -> None:
    src = str(tmp_path / "src")
    make_checkpoint(src)
    code, out, _ = run_capped(["-c", BASELINE, src], None)
    assert code == 0, out
    base_data, base_anon = map(int, out.split())
    cap = base_data + TENSOR + SLACK
    bound = base_anon + TENSOR + SLACK

    there, back = str(tmp_path / format), str(tmp_path / "back")
    for args, what in (
        ([src, there, format, "flax"], f"safetensors -> {format}"),
        ([there, back, "safetensors", "same"], f"{format} -> safetensors"),
    ):
        code, out, peak = run_capped(["-c", CONVERT_TO, *args], cap, timeout=240)
        assert code == 0, f"{what} failed under RLIMIT_DATA={cap / MB:.0f} MB:\n{out}"
        assert peak <= bound, f"{what}: peak RssAnon {peak / MB:.0f} MB > {bound / MB:.0f} MB"
    assert api.verify(src, there, format=format) == len(TENSORS)
    assert api.verify(there, back) == len(TENSORS)
