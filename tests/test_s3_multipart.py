"""Byte-format shards of any size into S3 by multipart upload, and linear resume bookkeeping.

Against moto's S3 server on 127.0.0.1 (the `s3` fixture of `test_io_tensorstore`):

* a shard larger than the memory bound itself (largest tensor + 256 MB) is uploaded by a
  multipart upload of many parts while the converter runs under ``RLIMIT_DATA`` = its baseline +
  the largest tensor + 256 MB; the objects equal a local conversion's files byte for byte;
* a converter SIGKILLed in the middle of an upload (its part hook kills it once parts are on the
  server) leaves an open upload and no object that looks complete; the rerun aborts the open
  upload and the result equals an uninterrupted run object for object;
* an upload that fails in-process is aborted at once;
* the bookkeeping (journal, per-shard records, index) uploaded for N shards grows linearly in
  N: the journal is written twice per conversion, each shard's record once (a versioned bucket
  keeps every PUT, so the sizes of all versions are the bytes uploaded).
"""

from __future__ import annotations

import filecmp
import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file
from test_io_tensorstore import BUCKET, _objects, s3  # noqa: F401  (s3 is the moto fixture)
from test_memory_bound import MB, SLACK, baseline_code, random_array, run_capped

import weightbridge.io._obstore as wob
from weightbridge import api
from weightbridge.errors import ConversionError
from weightbridge.streaming.dest.object_store import TensorstoreDestination
from weightbridge.streaming.journal import JOURNAL_NAME

pytest.importorskip("obstore")
pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="needs /proc, RLIMIT_DATA and SIGKILL"
)

CHILD_TIMEOUT = 300.0
RENAME = r"^layers\.(\d+)\.=layers_\1/"


def _uploads(client: Any, prefix: str) -> list[dict[str, Any]]:
    """The open (not completed, not aborted) multipart uploads under `prefix`."""
    listed = client.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix + "/")
    return list(listed.get("Uploads", []))


def _download(client: Any, prefix: str, name: str, where: Path) -> Path:
    path = where / name
    client.download_file(BUCKET, f"{prefix}/{name}", str(path))
    return path


# -- a shard larger than the memory bound, under RLIMIT_DATA --------------------------------------

# 20 bf16 weights of 16 MB (transposed by the pytorch -> flax layout change) and their norms:
# 320 MB. One shard of up to 300 MB holds 18 of them (288 MB), more than the bound's 16 MB
# largest tensor + 256 MB: if a shard passed through memory whole, RLIMIT_DATA would stop it.
WEIGHT = (2048, 4096)
LARGEST = 16 * MB
N_WEIGHTS = 20
SHARD = 300 * 10**6
PART = 8 * MB

CONVERT = textwrap.dedent(
    """
    import sys
    import weightbridge.io._obstore as wob
    wob.PART_BYTES = int(sys.argv[5])
    import weightbridge.api
    report = weightbridge.api.convert(
        sys.argv[1], sys.argv[2], renames=[sys.argv[3]], from_framework="pytorch",
        to_framework="flax", max_shard_size=int(sys.argv[4]), dest_options={"timeout": 120},
    )
    print(report.summary())
    """
)
BASELINE = baseline_code(
    "obstore", "tensorstore", "weightbridge.io.zarr", "weightbridge.streaming.dest.object_store"
)


def _big_checkpoint(path: Path) -> None:
    rng = np.random.default_rng(7)
    arrays = {}
    for i in range(N_WEIGHTS):
        arrays[f"layers.{i}.fc.weight"] = random_array(rng, WEIGHT, ml_dtypes.bfloat16)
        arrays[f"layers.{i}.norm.weight"] = random_array(rng, (WEIGHT[0],), np.float32)
    save_file(arrays, str(path))


@pytest.mark.slow
def test_shards_larger_than_the_bound_upload_by_multipart_within_it(
    tmp_path: Path,
    s3: Any,  # noqa: F811
) -> None:
    _, client = s3
    src = tmp_path / "src.safetensors"
    _big_checkpoint(src)
    code, out, _ = run_capped(["-c", BASELINE, str(src)], None)
    assert code == 0, out
    base_data, base_anon = map(int, out.split())
    cap = base_data + LARGEST + SLACK
    assert SHARD > LARGEST + SLACK, "a shard must not fit in the bound"

    prefix = "multipart-big"
    args = [str(src), f"s3://{BUCKET}/{prefix}", RENAME, str(SHARD), str(PART)]
    code, out, peak = run_capped(["-c", CONVERT, *args], cap, timeout=CHILD_TIMEOUT)
    print(
        f"baseline {base_anon / MB:.0f} MB, peak RssAnon {peak / MB:.0f} MB, bound "
        f"{(base_anon + LARGEST + SLACK) / MB:.0f} MB, RLIMIT_DATA {cap / MB:.0f} MB: {out.strip()}"
    )
    assert code == 0, f"conversion failed under RLIMIT_DATA={cap / MB:.0f} MB:\n{out}"
    assert peak <= base_anon + LARGEST + SLACK, (
        f"peak RssAnon {peak / MB:.0f} MB > baseline {base_anon / MB:.0f} MB + largest tensor "
        f"{LARGEST / MB:.0f} MB + {SLACK / MB:.0f} MB"
    )

    # The same bytes as a local conversion; each shard one object, uploaded in parts of PART.
    local = tmp_path / "local"
    report = api.convert(
        src,
        local,
        renames=[RENAME],
        from_framework="pytorch",
        to_framework="flax",
        max_shard_size=SHARD,
    )
    assert len(report.shards) == 2
    got = tmp_path / "got"
    got.mkdir()
    for name in [*report.shards, "model.safetensors.index.json"]:
        assert filecmp.cmp(_download(client, prefix, name, got), local / name, shallow=False), name
    first = report.shards[0]
    size = (local / first).stat().st_size
    assert size > LARGEST + SLACK
    etag = client.head_object(Bucket=BUCKET, Key=f"{prefix}/{first}")["ETag"].strip('"')
    assert etag.endswith(f"-{-(-size // PART)}"), etag  # a multipart upload of that many parts
    assert _uploads(client, prefix) == []


# -- killed in the middle of an upload --------------------------------------------------------------

# 8 float32 tensors of 8 MB; three to a 24 MB shard (shards of 24, 24 and 16 MB), uploaded in
# 5 MiB parts, one at a time, so a part handed on means the one before it is on the server.
SMALL = (1024, 2048)
SMALL_SHARD = 3 * 8 * MB
SMALL_PART = 5 * MB
PARTS_PER_SHARD = -(-SMALL_SHARD // SMALL_PART)  # 5

KILLABLE = textwrap.dedent(
    """
    import os, signal, sys
    import weightbridge.io._obstore as wob
    wob.PART_BYTES, wob.UPLOAD_CONCURRENCY = int(sys.argv[4]), 1
    kill_after, sent = int(sys.argv[5]), 0
    send = wob._send_part

    def counted(writer, part):
        # With one part in flight, handing on part k waits until part k-1 is uploaded.
        global sent
        send(writer, part)
        sent += 1
        if sent == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    wob._send_part = counted
    from weightbridge import api
    report = api.convert(sys.argv[1], sys.argv[2], max_shard_size=int(sys.argv[3]))
    print(len(report.written), len(report.skipped))
    """
)


def _run_killable(src: Path, prefix: str, kill_after: int) -> subprocess.CompletedProcess[str]:
    args = [str(src), f"s3://{BUCKET}/{prefix}", str(SMALL_SHARD), str(SMALL_PART)]
    return subprocess.run(
        [sys.executable, "-c", KILLABLE, *args, str(kill_after)],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
    )


def _small_checkpoint(path: Path) -> None:
    rng = np.random.default_rng(8)
    save_file(
        {f"layers/{i}/w": rng.standard_normal(SMALL, dtype=np.float32) for i in range(8)},
        str(path),
    )


@pytest.mark.slow
def test_killed_mid_upload_then_rerun_is_object_for_object_identical(
    tmp_path: Path,
    s3: Any,  # noqa: F811
) -> None:
    _, client = s3
    src = tmp_path / "src.safetensors"
    _small_checkpoint(src)
    clean = _run_killable(src, "mp-clean", 0)
    assert clean.returncode == 0, clean.stderr
    want = _objects(client, "mp-clean")
    shards = sorted(n for n in want if n.endswith(".safetensors"))
    assert len(shards) == 3

    prefix = "mp-killed"
    # Killed as it hands on part 3 of the last shard: its parts 1 and 2 are on the server, and
    # the first shard is recorded (its record is written before the last shard's upload starts;
    # the second's may or may not be).
    killed = _run_killable(src, prefix, 2 * PARTS_PER_SHARD + 3)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (upload,) = _uploads(client, prefix)
    assert upload["Key"] == f"{prefix}/{shards[2]}"
    parts = client.list_parts(Bucket=BUCKET, Key=upload["Key"], UploadId=upload["UploadId"])
    assert len(parts.get("Parts", [])) >= 2
    partial = _objects(client, prefix)
    assert shards[2] not in partial and "model.safetensors.index.json" not in partial
    assert json.loads(partial[JOURNAL_NAME])["complete"] is False

    rerun = _run_killable(src, prefix, 0)
    assert rerun.returncode == 0, rerun.stderr
    written, skipped = map(int, rerun.stdout.split())
    assert skipped >= 1 and written + skipped == 3  # resumed: the first shard is kept
    got = _objects(client, prefix)
    assert sorted(got) == sorted(want)
    assert [k for k in want if got[k] != want[k]] == []
    assert _uploads(client, prefix) == []  # the killed run's upload was aborted


def test_a_failed_upload_is_aborted_and_leaves_no_object(
    tmp_path: Path,
    s3: Any,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, client = s3
    src = tmp_path / "src.safetensors"
    _small_checkpoint(src)
    monkeypatch.setattr(wob, "PART_BYTES", SMALL_PART)
    send, sent = wob._send_part, []

    def fails_from_the_third_part_on(writer: Any, part: memoryview) -> None:
        sent.append(part.nbytes)
        if len(sent) >= 3:  # the first shard's upload is under way; later ones fail at once
            raise OSError(5, "Input/output error")
        send(writer, part)

    monkeypatch.setattr(wob, "_send_part", fails_from_the_third_part_on)
    prefix = "mp-failed"
    with pytest.raises(ConversionError, match=r"writing failed.*a rerun resumes"):
        api.convert(src, f"s3://{BUCKET}/{prefix}", max_shard_size=SMALL_SHARD)
    assert _uploads(client, prefix) == []
    assert [k for k in _objects(client, prefix) if k.endswith(".safetensors")] == []


def test_without_boto3_open_uploads_cannot_be_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # as if not installed
    assert wob.abort_uploads("s3://bucket/x", "x/", None, endpoint="http://127.0.0.1:1") is None
    assert wob.abort_uploads("gs://bucket/x", "x/", None) is None  # S3 only


def test_multipart_destinations_take_byte_shards_of_any_size() -> None:
    dest = TensorstoreDestination("s3://bucket/x", endpoint="http://127.0.0.1:1")
    assert dest.multipart
    assert dest.max_object_size("safetensors") is None
    assert TensorstoreDestination("gs://bucket/x").max_object_size("npz") is None
    assert dest.object_key("model.safetensors") == "x/model.safetensors"
    # A tensorstore kvstore spec of its own keeps the tensorstore upload and its cap.
    spec = {"driver": "s3", "bucket": "bucket", "path": "x/", "endpoint": "http://127.0.0.1:1"}
    assert not TensorstoreDestination("s3://bucket/x", kvstore=spec).multipart


def test_part_size_keeps_within_the_s3_part_count() -> None:
    assert wob.part_size(0) == wob.PART_BYTES
    assert wob.part_size(100, 1) == wob.MIN_PART_BYTES
    for size in (5 << 30, 80 << 30, 5 << 40):
        part = wob.part_size(size)
        assert -(-size // part) <= wob.MAX_PARTS and part % MB == 0


# -- bookkeeping bytes: linear in the number of shards ----------------------------------------------

VERSIONED = "weightbridge-versioned"


def _bookkeeping_bytes(client: Any, prefix: str) -> tuple[int, int]:
    """(bytes of every version of every non-shard object under `prefix`, journal versions)."""
    total, journals = 0, 0
    pages = client.get_paginator("list_object_versions").paginate(
        Bucket=VERSIONED, Prefix=prefix + "/"
    )
    for page in pages:
        for v in page.get("Versions", []):
            if not v["Key"].endswith(".safetensors"):
                total += v["Size"]
            journals += v["Key"].endswith(JOURNAL_NAME)
    return total, journals


def test_bookkeeping_uploads_grow_linearly_with_the_shard_count(
    tmp_path: Path,
    s3: Any,  # noqa: F811
) -> None:
    _, client = s3
    client.create_bucket(Bucket=VERSIONED)
    client.put_bucket_versioning(Bucket=VERSIONED, VersioningConfiguration={"Status": "Enabled"})
    per_shard = {}
    for n in (8, 32):
        src = tmp_path / f"src{n}.safetensors"
        rng = np.random.default_rng(n)
        save_file(
            {f"layers/{i}/w": rng.standard_normal(64, dtype=np.float32) for i in range(n)}, str(src)
        )
        report = api.convert(src, f"s3://{VERSIONED}/linear-{n}", max_shard_size=256)
        assert len(report.shards) == n
        total, journals = _bookkeeping_bytes(client, f"linear-{n}")
        assert journals == 2, "the journal is written at the start and at the end only"
        per_shard[n] = total / n
    # Rewriting the journal after each shard made this grow with n (quadratic in all).
    assert per_shard[32] <= 1.25 * per_shard[8], per_shard


def test_a_shard_that_cannot_be_staged_is_refused_before_any_write(
    tmp_path: Path,
    s3: Any,  # noqa: F811
) -> None:
    """Byte shards are staged in TMPDIR before their upload: one larger than its free space is
    refused up front, naming the directory and what to do, with nothing left behind."""
    import shutil

    from weightbridge.spec import TensorSpec

    dest = TensorstoreDestination(f"s3://{BUCKET}/staging", tmpdir=str(tmp_path))
    too_big = 2 * shutil.disk_usage(tmp_path).free
    with pytest.raises(ConversionError, match=r"staged in .* GB free; point TMPDIR"):
        dest.open_shard(
            "model.safetensors", "safetensors", [TensorSpec("w", (too_big,), "U8")], None
        )
    assert list(tmp_path.iterdir()) == []
