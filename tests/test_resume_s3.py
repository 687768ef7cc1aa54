"""Crash harness for object-store output: ``weightbridge convert -o s3://...`` SIGKILLed anywhere.

The command line runs as a real process against moto's S3 server on 127.0.0.1 (the fixture of
`test_io_tensorstore`) and is killed with SIGKILL at seeded random points, chosen three ways: a
random delay after the run's start (which also lands while a rerun checks the shards it keeps)
or after its first write, or the moment a random number of new objects (or new versions of
objects) has appeared under the prefix; plus a little jitter, so kills land before, between
and in the middle of uploads, record writes, journal updates and the final metadata. Some
trials kill the rerun too. Every trial then reruns the same command to completion, and every
object under the prefix must equal, byte for byte, the objects of one uninterrupted run:
shards, index, journal, plan, records, orbax metadata; and nothing may be left in the
temporary directory (staged uploads, downloaded copies).

The seed is printed in every assertion message; rerun one with
``WEIGHTBRIDGE_CRASH_SEED=<seed> pytest tests/test_resume_s3.py``.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_io_tensorstore import BUCKET, _objects, s3  # noqa: F401  (s3 is the moto fixture)

from weightbridge.io import write_checkpoint

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs SIGKILL"),
]

# moto keeps one S3 per process, shared by every server: the prefixes here are this file's own.
SEED = int(os.environ.get("WEIGHTBRIDGE_CRASH_SEED", "20240611"))
ROWS, COLS, TENSORS = 64, 128, 16  # 32 KiB float32 tensors
PER_SHARD = 2  # tensors per shard: 8 shards
# Real kills per format (trials go on until this many kills landed before the process ended).
KILLS = {"safetensors": 8, "orbax": 4}
CHILD_TIMEOUT = 60.0
POLL = 0.015  # seconds between listings while watching objects appear


def _source(d: Path) -> Path:
    rng = np.random.default_rng(11)
    arrays = {
        f"layers/{i}/w": rng.standard_normal((ROWS, COLS)).astype(np.float32)
        for i in range(TENSORS)
    }
    path = d / "src.safetensors"
    write_checkpoint(str(path), arrays)
    return path


def _command(src: Path, prefix: str, endpoint: str, format: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "weightbridge",
        "convert",
        str(src),
        "-o",
        f"s3://{BUCKET}/{prefix}",
        "--endpoint",
        endpoint,
        "--format",
        format,
        "--max-shard-size",
        str(PER_SHARD * ROWS * COLS * 4),
        "-q",
    ]


def _versions(client: Any, prefix: str) -> set[tuple[str, str, int]]:
    """(key, etag, size) of every object under the prefix: a rewrite with new bytes is new."""
    out = set()
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix=prefix + "/"
    ):
        for obj in page.get("Contents", []):
            out.add((obj["Key"], obj["ETag"], obj["Size"]))
    return out


@dataclass
class Harness:
    client: Any
    endpoint: str
    src: Path
    format: str
    env: dict[str, str]
    rng: random.Random
    span: float = 1.0  # seconds from the clean run's first write to its end
    total: float = 1.0  # seconds the clean run took, from its start
    versions: int = 1  # object versions the clean run wrote
    log: list[str] = field(default_factory=list)

    def start(self, prefix: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            _command(self.src, prefix, self.endpoint, self.format),
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def finish(self, proc: subprocess.Popen[bytes], what: str) -> None:
        _, err = proc.communicate(timeout=CHILD_TIMEOUT)
        assert proc.returncode == 0, self.say(f"{what} exited {proc.returncode}: {err.decode()}")

    def wait_for(
        self, proc: subprocess.Popen[bytes], prefix: str, before: set[Any], n: int
    ) -> None:
        """Until `n` object versions not in `before` exist under `prefix` (or `proc` ends)."""
        deadline = time.monotonic() + CHILD_TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            if len(_versions(self.client, prefix) - before) >= n:
                return
            time.sleep(POLL)

    def clean(self, prefix: str) -> dict[str, bytes]:
        """One uninterrupted run; learns how long it writes and how many object versions."""
        started = time.monotonic()
        proc = self.start(prefix)
        self.wait_for(proc, prefix, set(), 1)
        first = time.monotonic()
        self.finish(proc, "the uninterrupted run")
        self.span = max(0.05, time.monotonic() - first)
        self.total = time.monotonic() - started
        self.versions = len(_versions(self.client, prefix))
        return _objects(self.client, prefix)

    def kill_somewhere(self, prefix: str) -> bool:
        """Start a run and SIGKILL it at a random point; False if it finished first."""
        before = _versions(self.client, prefix)
        proc = self.start(prefix)
        strategy = self.rng.random()
        if strategy < 0.25:  # a random delay from its start: also while a rerun checks shards
            delay = self.rng.uniform(0.0, self.total)
            how = f"{delay:.3f} s after its start"
            time.sleep(delay)
        elif strategy < 0.6:  # a random delay after its first write
            delay = self.rng.uniform(0.0, self.span)
            how = f"{delay:.3f} s after its first write"
            self.wait_for(proc, prefix, before, 1)
            time.sleep(delay)
        else:
            want = self.rng.randint(1, self.versions)
            how = f"once {want} new object versions appeared"
            self.wait_for(proc, prefix, before, want)
        jitter = self.rng.uniform(0.0, 0.03)
        time.sleep(jitter)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=CHILD_TIMEOUT)
        if proc.returncode == 0:  # it finished before the kill
            self.log.append(f"{prefix}: no kill ({how} + {jitter:.3f} s: already done)")
            return False
        assert proc.returncode == -signal.SIGKILL, self.say(
            f"{prefix}: exited {proc.returncode} before the kill: {err.decode()}"
        )
        self.log.append(f"{prefix}: SIGKILL {how} + {jitter:.3f} s")
        return True

    def say(self, message: str) -> str:
        return f"seed {SEED} ({self.format}): {message}\n" + "\n".join(self.log[-40:])


@pytest.mark.parametrize("format", ["safetensors", "orbax"])
def test_s3_killed_anywhere_resumes_byte_identical(
    tmp_path: Path,
    s3: Any,  # noqa: F811
    format: str,
) -> None:
    endpoint, client = s3
    tmpdir = tmp_path / "tmp"  # where the children stage uploads
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    rng = random.Random(f"{SEED}-{format}")
    h = Harness(client, endpoint, _source(tmp_path), format, env, rng)
    clean = h.clean(f"resume-clean-{format}")
    assert any(k.startswith("model") or k.startswith("layers") for k in clean), h.say("no output")

    kills, trial, deadline = 0, 0, time.monotonic() + 120
    while kills < KILLS[format]:
        assert time.monotonic() < deadline, h.say(f"only {kills} kills landed in time")
        prefix = f"resume-killed-{format}-{trial}"
        # Kill the first run, sometimes its rerun too; then run to completion.
        for _ in range(h.rng.choice([1, 1, 2])):
            kills += h.kill_somewhere(prefix)
        h.finish(h.start(prefix), f"the rerun of {prefix}")
        h.log.append(f"{prefix}: rerun completed")
        got = _objects(client, prefix)
        missing, extra = sorted(set(clean) - set(got)), sorted(set(got) - set(clean))
        assert not missing and not extra, h.say(f"{prefix}: missing {missing}, extra {extra}")
        differ = [k for k in clean if got[k] != clean[k]]
        assert not differ, h.say(f"{prefix}: objects differ from the uninterrupted run: {differ}")
        leftovers = sorted(p.name for p in tmpdir.iterdir())
        assert not leftovers, h.say(f"{prefix}: temporary files left behind: {leftovers}")
        trial += 1
    assert kills >= KILLS[format], h.say(f"{kills} kills")
    print(
        h.say(f"{kills} kills in {trial} trials, writing for {h.span:.2f} s, {h.versions} versions")
    )


def test_a_resume_from_an_object_source_that_changed_is_refused(
    tmp_path: Path,
    s3: Any,  # noqa: F811
) -> None:
    """An object source is stamped by size and ETag: replaced between an interrupted run and
    its resume (same size, new bytes), the resume refuses to mix the two versions."""
    from weightbridge import api

    _, client = s3
    rng = np.random.default_rng(0)
    tensors = {f"w{i}": rng.standard_normal((64, 64), dtype=np.float32) for i in range(4)}
    local = tmp_path / "src.safetensors"
    write_checkpoint(str(local), tensors)
    client.upload_file(str(local), BUCKET, "changing/src.safetensors")
    url, out = f"s3://{BUCKET}/changing/src.safetensors", tmp_path / "out"
    first = api.convert(url, out, max_shard_size=40_000, partition=(1, 2))  # half the shards
    assert first.written and len(first.written) < 4
    tensors["w0"] = tensors["w0"] + 1  # same shapes, so the same size: only the ETag tells
    write_checkpoint(str(local), tensors)
    client.upload_file(str(local), BUCKET, "changing/src.safetensors")
    # A new process, as a resume is: this one remembers the object for a few seconds.
    cmd = [sys.executable, "-m", "weightbridge", "convert", url, "-o", str(out), "-q"]
    cmd += ["--max-shard-size", "40000"]
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0
    assert "source changed" in refused.stderr and "--overwrite" in refused.stderr
    subprocess.run([*cmd, "--overwrite"], capture_output=True, text=True, timeout=600, check=True)
    from safetensors.numpy import load_file

    got = {}
    for f in sorted(out.glob("*.safetensors")):
        got.update(load_file(str(f)))
    np.testing.assert_array_equal(got["w0"], tensors["w0"])
