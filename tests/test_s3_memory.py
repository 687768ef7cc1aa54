"""The memory bound holds for byte-format output to an object store (moto's S3 on 127.0.0.1)
when tensorstore uploads it: without obstore (the ``cloud`` extra; these tests hide it), which
uploads shards of any size by multipart upload (tests/test_s3_multipart.py).

tensorstore uploads a value only whole, from memory (one PUT, no multipart upload), so a
safetensors shard passes through memory when it is committed to S3. The destination caps such
shards (`TensorstoreDestination.max_object_size`, 64 MiB) and uploads each with one copy of its
bytes (`weightbridge.io._kvstore.Store.write_file`). Proven as `test_memory_bound` proves the
local bound: the converter runs in a subprocess under ``RLIMIT_DATA`` = its baseline + the
largest tensor + 256 MB, on a checkpoint several times larger than both the shard cap and that
limit, with one tensor larger than the cap (a shard of its own), and its polled ``RssAnon`` is
held to the same bound. Before the cap, the default 5 GB shard limit made this one shard,
uploaded from 3 copies in memory. The objects are then read back and compared bit for bit.
"""

from __future__ import annotations

import os
import sys
import textwrap
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

# The helpers of the local memory test and the moto fixture of the tensorstore tests.
from test_io_tensorstore import BUCKET, s3  # noqa: F401  (s3 is a fixture)
from test_memory_bound import MB, SLACK, baseline_code, random_array, run_capped

import weightbridge.io._obstore as wob
import weightbridge.streaming.dest.object_store as wts
from weightbridge import api
from weightbridge.errors import ConversionError
from weightbridge.io.sharded import write_index
from weightbridge.streaming.dest.object_store import MAX_OBJECT_BYTES, TensorstoreDestination

# name, shape, dtype: 576 MB in all. The embedding (96 MB, copied byte for byte) is larger than
# the shard cap; the 16 MB and 32 MB 2-D weights are transposed by the pytorch -> flax layout
# change and grouped into shards of at most the cap.
BIG = ("embed.weight", (24576, 1024), np.float32)
TENSORS = [BIG]
for i in range(10):
    TENSORS.append((f"layers.{i}.fc.weight", (2048, 4096), ml_dtypes.bfloat16))
    TENSORS.append((f"layers.{i}.mlp.weight", (4096, 2048), np.float32))
    TENSORS.append((f"layers.{i}.norm.weight", (4096,), np.float32))
LARGEST = 96 * MB
TOTAL = sum(int(np.prod(s)) * np.dtype(d).itemsize for _, s, d in TENSORS)

RENAMES = [r"^layers\.(\d+)\.=layers_\1/"]

CONVERT = textwrap.dedent(
    """
    import sys
    sys.modules["obstore"] = None  # as if not installed: tensorstore uploads the shards
    import numpy
    import weightbridge.api
    report = weightbridge.api.convert(
        sys.argv[1], sys.argv[2], renames=[sys.argv[3]], from_framework="pytorch",
        to_framework="flax", dest_options={"endpoint": sys.argv[4], "timeout": 120},
    )
    print(report.summary())
    """
)

# The child's baseline: interpreter, numpy, weightbridge and tensorstore imported, the source's
# format detected; no tensor data touched and no store opened.
BASELINE = baseline_code(
    "tensorstore", "weightbridge.io.zarr", "weightbridge.streaming.dest.object_store"
)


def make_checkpoint(path: str) -> dict[str, np.ndarray]:
    """Two safetensors shards (written by the reference library) and an index; the arrays."""
    os.makedirs(path)
    rng = np.random.default_rng(5)
    arrays = {name: random_array(rng, shape, dt) for name, shape, dt in TENSORS}
    weight_map = {}
    names = list(arrays)
    for k, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :]), 1):
        shard = f"model-{k:05d}-of-00002.safetensors"
        save_file({n: arrays[n] for n in part}, os.path.join(path, shard))
        weight_map.update(dict.fromkeys(part, shard))
    write_index(os.path.join(path, "model.safetensors.index.json"), weight_map, TOTAL)
    return arrays


def _download(client: Any, prefix: str, where: str) -> dict[str, int]:
    """The objects directly under `prefix` (the shards into `where`); their sizes."""
    sizes = {}
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix=prefix + "/"
    ):
        for obj in page.get("Contents", []):
            name = obj["Key"][len(prefix) + 1 :]
            if "/" in name:  # weightbridge's own records (.weightbridge/sizes/...)
                continue
            sizes[name] = obj["Size"]
            if name.endswith(".safetensors"):
                client.download_file(BUCKET, obj["Key"], os.path.join(where, name))
    return sizes


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and RLIMIT_DATA")
def test_s3_conversion_stays_within_largest_tensor_plus_256mb(tmp_path: Any, s3: Any) -> None:  # noqa: F811
    endpoint, client = s3
    src = str(tmp_path / "src")
    arrays = make_checkpoint(src)
    assert max(a.nbytes for a in arrays.values()) == LARGEST > MAX_OBJECT_BYTES
    assert TOTAL > 8 * MAX_OBJECT_BYTES, "several times the shard cap"

    code, out, _ = run_capped(["-c", BASELINE, src], None)
    assert code == 0, out
    base_data, base_anon = map(int, out.split())
    cap = base_data + LARGEST + SLACK
    assert TOTAL > LARGEST + SLACK, "the checkpoint must not fit under the cap"

    dest = f"s3://{BUCKET}/bounded"
    code, out, peak = run_capped(["-c", CONVERT, src, dest, RENAMES[0], endpoint], cap, timeout=600)
    print(
        f"baseline {base_anon / MB:.0f} MB, peak RssAnon {peak / MB:.0f} MB, bound "
        f"{(base_anon + LARGEST + SLACK) / MB:.0f} MB, RLIMIT_DATA {cap / MB:.0f} MB"
    )
    assert code == 0, f"conversion failed under RLIMIT_DATA={cap / MB:.0f} MB:\n{out}"
    assert peak <= base_anon + LARGEST + SLACK, (
        f"peak RssAnon {peak / MB:.0f} MB > baseline {base_anon / MB:.0f} MB + largest tensor "
        f"{LARGEST / MB:.0f} MB + {SLACK / MB:.0f} MB"
    )

    # The layout: every shard within the cap except the one holding the big tensor alone.
    local = tmp_path / "objects"
    local.mkdir()
    sizes = _download(client, "bounded", str(local))
    shards = sorted(n for n in sizes if n.endswith(".safetensors"))
    assert "model.safetensors.index.json" in sizes
    assert len(shards) >= TOTAL // MAX_OBJECT_BYTES
    where: dict[str, str] = {}
    for n in shards:
        with safe_open(str(local / n), "numpy") as f:
            keys = list(f.keys())
        where.update(dict.fromkeys(keys, n))
        if keys == ["embed.embedding"]:
            assert sizes[n] > MAX_OBJECT_BYTES
        else:
            assert sizes[n] <= MAX_OBJECT_BYTES + 4096, (n, sizes[n], keys)  # + the header

    # Bit for bit, through the reference library: transposed where the layout says.
    assert len(where) == len(TENSORS)
    for name, a in arrays.items():
        if name == BIG[0]:
            target = "embed.embedding"
        else:  # layers.3.fc.weight -> layers_3/fc.kernel, layers.3.norm.weight -> .../norm.scale
            i, kind = name.split(".")[1:3]
            target = f"layers_{i}/{kind}.{'scale' if kind == 'norm' else 'kernel'}"
        with safe_open(str(local / where[target]), "numpy") as f:
            got = f.get_tensor(target)
        want = a if a.ndim == 1 or name == BIG[0] else a.T
        assert got.dtype == want.dtype and got.shape == want.shape, target
        bits = np.uint16 if want.dtype.itemsize == 2 else np.uint32
        np.testing.assert_array_equal(got.view(bits), want.view(bits), err_msg=target)

    # And through weightbridge's own reader of the destination.
    assert api.verify(src, TensorstoreDestination(dest, endpoint=endpoint)) == len(TENSORS)


def test_max_object_size_caps_byte_formats_in_object_stores_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(wob, "obstore_available", lambda: False)
    s3_dest = TensorstoreDestination("s3://bucket/x", endpoint="http://127.0.0.1:1")
    for fmt in ("safetensors", "npz", "h5", "torch"):
        assert s3_dest.max_object_size(fmt) == MAX_OBJECT_BYTES
        assert TensorstoreDestination("gs://bucket/x").max_object_size(fmt) == MAX_OBJECT_BYTES
        assert TensorstoreDestination("memory://x").max_object_size(fmt) is None
    for fmt in ("zarr", "zarr3", "orbax"):
        assert s3_dest.max_object_size(fmt) is None


def test_s3_shard_over_the_single_put_limit_is_refused_before_it_is_written(
    tmp_path: Any,
    s3: Any,  # noqa: F811
    monkeypatch: Any,
) -> None:
    endpoint, client = s3
    src = str(tmp_path / "w.safetensors")
    save_file({"w": np.ones((64, 64), np.float32)}, src)
    monkeypatch.setattr(wts, "S3_MAX_PUT_BYTES", 1000)
    monkeypatch.setattr(wob, "obstore_available", lambda: False)
    with pytest.raises(ConversionError, match=r"one PUT.*--format zarr or orbax"):
        api.convert(src, TensorstoreDestination(f"s3://{BUCKET}/toolarge", endpoint=endpoint))
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix="toolarge/model")
    assert listed.get("KeyCount", 0) == 0
