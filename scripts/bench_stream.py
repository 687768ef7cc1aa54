"""Benchmark the streaming converter against `cp` and a naive load/transpose/save.

Builds a synthetic llama-like bf16 checkpoint (Hugging Face names, ~1 GB safetensors shards and
``model.safetensors.index.json``), then runs interleaved rounds (``--pairs``, default 3), each
in its own process, for two conditions (``--cache``): the source evicted from the page cache
before each run (``drop_caches`` when permitted, else ``posix_fadvise(DONTNEED)``; the script
says which), and the source already cached:

* ``cp`` of the shard files (+ ``sync``): the disk's own speed, the target to match;
* ``weightbridge convert`` to Flax-like names, every 2-D non-embedding weight transposed
  (the converter fsyncs each shard; a ``sync`` follows for parity with ``cp``);
* with ``--ab VAR=VALUE``, weightbridge again with that environment variable set (an A/B of an
  experimental switch, in the same rounds);
* once, cold, the naive way: ``safetensors.numpy.load_file`` per shard,
  ``np.ascontiguousarray(w.T)``, ``save_file``, ``sync``.

Per run: wall time (with the ``sync``), the child's user and system time (``os.wait4``), MB/s
and the ratio to the same round's ``cp``; then the medians. While each runs,
``/proc/<pid>/status`` is polled every 20 ms for ``RssAnon`` (anonymous memory: what a memory
bound is about; mapped file pages are reclaimable page cache). Prints figures only; nothing
here asserts on timings. Targets: ours at least 0.9x the speed of ``cp`` (median of the paired
ratios), and its peak ``RssAnon`` at most the largest tensor + 256 MB.

    python scripts/bench_stream.py --size 2GB --pairs 3
    python scripts/bench_stream.py --size 4GB --dir /data/bench --keep --cache cold
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from weightbridge import api, dtypes
from weightbridge.io import writer_class
from weightbridge.io.sharded import write_index
from weightbridge.planning.shards import parse_size
from weightbridge.spec import TensorSpec
from weightbridge.streaming.transform import kernel_available

HIDDEN = 2048
INTERMEDIATE = 5632
VOCAB = 32000
SHARD_BYTES = 10**9
MEMORY_SLACK = 256 * 10**6
POLL_SECONDS = 0.02
# A method's command line and its environment (None: this process's own).
Command = tuple[list[str], dict[str, str] | None]

# HF llama names -> Flax-like names; the pytorch->flax layout then turns `weight` into
# `kernel` (transposed), `scale` (norms) or `embedding` (never transposed).
RENAMES = [r"^model\.layers\.(\d+)\.=layers_\1/", r"^model\.=", r"\.=/"]


# --------------------------------------------------------------------------- checkpoint


def llama_specs(total_bytes: int) -> list[TensorSpec]:
    """Specs of a llama-like checkpoint of about `total_bytes` (at least one layer)."""
    h, i = HIDDEN, INTERMEDIATE
    per_layer = (4 * h * h + 3 * h * i + 2 * h) * 2
    fixed = (2 * VOCAB * h + h) * 2
    layers = max(1, round((total_bytes - fixed) / per_layer))
    specs = [TensorSpec("model.embed_tokens.weight", (VOCAB, h), "BF16")]
    for n in range(layers):
        p = f"model.layers.{n}."
        specs += [TensorSpec(f"{p}self_attn.{x}_proj.weight", (h, h), "BF16") for x in "qkvo"]
        specs += [
            TensorSpec(f"{p}mlp.gate_proj.weight", (i, h), "BF16"),
            TensorSpec(f"{p}mlp.up_proj.weight", (i, h), "BF16"),
            TensorSpec(f"{p}mlp.down_proj.weight", (h, i), "BF16"),
            TensorSpec(f"{p}input_layernorm.weight", (h,), "BF16"),
            TensorSpec(f"{p}post_attention_layernorm.weight", (h,), "BF16"),
        ]
    specs += [
        TensorSpec("model.norm.weight", (h,), "BF16"),
        TensorSpec("lm_head.weight", (VOCAB, h), "BF16"),
    ]
    return specs


def random_bf16(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random finite bf16 values (|x| < 2), made from random bits: fast and never NaN/inf."""
    n = int(np.prod(shape))
    bits = np.frombuffer(rng.bytes(2 * n), dtype=np.uint16).copy()
    bits &= 0xBFFF  # clear the top exponent bit: exponent <= 127, so finite
    return bits.view(dtypes.to_numpy("BF16")).reshape(shape)


def make_checkpoint(src: str, total_bytes: int, seed: int = 0) -> list[TensorSpec]:
    """Write the checkpoint shard by shard, one tensor in memory at a time."""
    os.makedirs(src, exist_ok=True)
    specs = llama_specs(total_bytes)
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for t in specs:
        if groups[-1] and size + t.nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    rng = np.random.default_rng(seed)
    writer = writer_class("safetensors")
    weight_map = {}
    for k, group in enumerate(groups, 1):
        name = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        w = writer(os.path.join(src, name), group, {"format": "pt"})
        for t in group:
            w.write(t.name, random_bf16(rng, t.shape), 0)
        w.close()
        weight_map.update(dict.fromkeys((t.name for t in group), name))
    write_index(
        os.path.join(src, "model.safetensors.index.json"),
        weight_map,
        sum(t.nbytes for t in specs),
    )
    return specs


# --------------------------------------------------------------------------- measuring


def drop_caches() -> bool:
    """Try the global page-cache drop (needs privileges a container usually lacks)."""
    subprocess.run(["sync"], check=True)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def evict(paths: list[str]) -> None:
    """Push files out of the page cache (clean pages; works without privileges)."""
    subprocess.run(["sync"], check=True)
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_bytes(paths: list[str]) -> int | None:
    """Bytes of `paths` resident in the page cache (util-linux `fincore`), or None."""
    if not shutil.which("fincore"):
        return None
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", *paths],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        return None
    return sum(int(x) for x in out.stdout.split())


def _status(pid: int) -> dict[str, int]:
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "VmHWM"):
                    fields[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return fields


@dataclass
class Run:
    seconds: float
    user_seconds: float
    sys_seconds: float
    peak_rss_anon: int
    vm_hwm: int

    @property
    def cpu_seconds(self) -> float:
        return self.user_seconds + self.sys_seconds


def run_polled(cmd: list[str], env: dict[str, str] | None = None) -> Run:
    """Run `cmd`, polling its RssAnon/VmHWM every 20 ms; then `sync`. Wall time covers both.

    User and system time are the child's own (`os.wait4`), the `sync` excluded: unlike wall
    time they hardly change when other processes share the machine.
    """
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    peak, hwm = 0, 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        s = _status(proc.pid)
        peak = max(peak, s.get("RssAnon", 0))
        hwm = max(hwm, s.get("VmHWM", 0))
        time.sleep(POLL_SECONDS)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)[:200]}: failed with exit code {proc.returncode}")
    subprocess.run(["sync"], check=True)
    seconds = time.perf_counter() - started
    return Run(seconds, usage.ru_utime, usage.ru_stime, peak, hwm)


NAIVE = r"""
import json, os, sys
import ml_dtypes  # registers bfloat16 with numpy, which safetensors.numpy needs
import numpy as np
from safetensors.numpy import load_file, save_file

src, dest, mapping_file = sys.argv[1:4]
with open(mapping_file) as f:
    mapping = json.load(f)  # source name -> [target name, transpose?]
with open(os.path.join(src, "model.safetensors.index.json")) as f:
    index = json.load(f)
weight_map = {}
for shard in sorted(set(index["weight_map"].values())):
    tensors = load_file(os.path.join(src, shard))
    out = {}
    for name, w in tensors.items():
        target, transpose = mapping[name]
        out[target] = np.ascontiguousarray(w.T) if transpose else w
        weight_map[target] = shard
    save_file(out, os.path.join(dest, shard))
    del tensors, out
with open(os.path.join(dest, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": index["metadata"], "weight_map": weight_map}, f)
"""


# --------------------------------------------------------------------------- checking


def check_sample(src: str, dest: str, pairs: list[tuple[str, str, bool]], k: int) -> int:
    """Compare a sample of output tensors bit for bit with the source (transposed where planned),
    reading both through the `safetensors` package as the oracle."""
    from safetensors import safe_open

    def where(path: str) -> dict[str, str]:
        index = os.path.join(path, "model.safetensors.index.json")
        if not os.path.exists(index):  # one shard: no index
            single = os.path.join(path, "model.safetensors")
            with safe_open(single, "numpy") as f:
                return dict.fromkeys(f.keys(), single)
        with open(index) as f:
            return {n: os.path.join(path, s) for n, s in json.load(f)["weight_map"].items()}

    src_at, dest_at = where(src), where(dest)
    rng = random.Random(1)
    always = [p for p in pairs if not p[0].startswith("model.layers.")]  # embed, norm, lm_head
    rest = [p for p in pairs if p not in always]
    sample = always + rng.sample(rest, min(k, len(rest)))
    for s_name, t_name, transpose in sample:
        with safe_open(src_at[s_name], "numpy") as f:
            a = f.get_tensor(s_name)
        with safe_open(dest_at[t_name], "numpy") as f:
            b = f.get_tensor(t_name)
        want = a.T if transpose else a
        if b.shape != want.shape or b.dtype != want.dtype:
            raise SystemExit(f"{t_name}: {b.shape} {b.dtype}, expected {want.shape} {want.dtype}")
        if not np.array_equal(b.view(np.uint16), want.view(np.uint16)):
            raise SystemExit(f"{t_name}: values differ from {s_name}{'.T' if transpose else ''}")
    return len(sample)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="2GB", help="checkpoint size, e.g. 2GB or 512MB")
    ap.add_argument("--dir", help="work directory (default: a new one under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--skip-naive", action="store_true", help="skip the naive load/save method")
    ap.add_argument(
        "--pairs", type=int, default=3, help="interleaved cp/weightbridge pairs per condition"
    )
    ap.add_argument(
        "--cache",
        choices=("cold", "warm", "both"),
        default="both",
        help="source evicted from the page cache before each run, already cached, or both",
    )
    ap.add_argument(
        "--ab",
        metavar="VAR=VALUE",
        help="also run weightbridge with this environment variable set, in every round",
    )
    args = ap.parse_args(argv)

    work = args.dir or tempfile.mkdtemp(prefix="wb-bench-", dir="/tmp")
    os.makedirs(work, exist_ok=True)
    conditions = ["cold", "warm"] if args.cache == "both" else [args.cache]
    try:
        return bench(
            work, parse_size(args.size), args.skip_naive, max(1, args.pairs), conditions, args.ab
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")


def warm_up(paths: list[str]) -> None:
    """Read the files once so that they sit in the page cache."""
    for p in paths:
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass


def bench(
    work: str,
    size: int,
    skip_naive: bool,
    pairs_n: int,
    conditions: list[str],
    ab: str | None,
) -> int:
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        "transposes: "
        + ("compiled kernel" if kernel_available() else "numpy blocked copy (kernel not built)")
    )
    src = os.path.join(work, "src")
    t0 = time.perf_counter()
    specs = make_checkpoint(src, size)
    total = sum(t.nbytes for t in specs)
    # The files the index names (a reused --dir may hold others, which cp must not copy).
    with open(os.path.join(src, "model.safetensors.index.json")) as f:
        shards = sorted({os.path.join(src, n) for n in json.load(f)["weight_map"].values()})
    files = [*shards, os.path.join(src, "model.safetensors.index.json")]
    largest = max(t.nbytes for t in specs)
    bound = largest + MEMORY_SLACK
    print(
        f"checkpoint: {len(specs)} bf16 tensors, {total / 1e9:.2f} GB in {len(shards)} shards "
        f"(made in {time.perf_counter() - t0:.1f} s) at {src}"
    )
    plan = api.plan(src, renames=RENAMES, from_framework="pytorch", to_framework="flax")
    pairs = [(s.sources[0], s.target.name, bool(s.ops)) for s in plan.steps]
    transposed = sum(1 for p in pairs if p[2])
    print(f"plan: {len(pairs)} tensors, {transposed} transposed (2-D non-embedding weights)")
    dropped = drop_caches()
    print(
        "cold page cache: "
        + (
            "sync; echo 3 > /proc/sys/vm/drop_caches, then"
            if dropped
            else "global drop not permitted, so"
        )
        + " sync + posix_fadvise(DONTNEED) on the source files before each run; every output"
        " is fsynced and deleted after its run (its pages go with it)"
    )

    def cold() -> None:
        if dropped:
            drop_caches()
        evict(files)
        left = cached_bytes(files)
        if left is not None and left > 0.01 * total:
            print(f"  warning: {left / 1e6:.0f} MB of the source still cached")

    def warm() -> None:
        subprocess.run(["sync"], check=True)
        warm_up(files)

    mapping = os.path.join(work, "mapping.json")
    with open(mapping, "w") as f:
        json.dump({s: [t, tr] for s, t, tr in pairs}, f)
    ours = [sys.executable, "-m", "weightbridge", "convert", src, "--from", "pytorch", "--to"]
    ours += ["flax", "-q", "--max-shard-size", str(SHARD_BYTES)]
    for r in RENAMES:
        ours += ["--rename", r]
    methods: dict[str, Callable[[str], Command]] = {
        "cp + sync": lambda out: (["cp", *files, out], None),
        "weightbridge": lambda out: ([*ours, "-o", out], None),
    }
    if ab:
        var, _, value = ab.partition("=")
        env = {**os.environ, var: value}
        methods[f"wb {ab}"] = lambda out: ([*ours, "-o", out], env)
    checked: set[str] = set()

    def one(name: str, make: Callable[[str], Command], prepare: Callable[[], None]) -> Run:
        out = os.path.join(work, "out")
        shutil.rmtree(out, ignore_errors=True)  # left by an interrupted run in a reused --dir
        os.makedirs(out)
        prepare()
        cmd, env = make(out)
        run = run_polled(cmd, env)
        if name != "cp + sync" and name not in checked:
            n = check_sample(src, out, pairs, 12)
            checked.add(name)
            print(f"{name}: {n} sampled tensors bit-identical to the source (.T)")
        shutil.rmtree(out)
        return run

    verdict = True
    peak = 0
    for cond in conditions:
        prepare = cold if cond == "cold" else warm
        runs: dict[str, list[Run]] = {name: [] for name in methods}
        print(f"\n== {cond} source: {pairs_n} interleaved rounds ({', '.join(methods)})")
        header = (
            f"{'pair':>4} {'method':<34} {'wall s':>7} {'user s':>7} {'sys s':>7} {'MB/s':>6} "
            f"{'wb/cp':>6}"
        )
        print(header)
        print("-" * len(header))
        for k in range(pairs_n):
            for name, make in methods.items():
                run = one(name, make, prepare)
                runs[name].append(run)
                peak = max(peak, run.peak_rss_anon) if name != "cp + sync" else peak
                base = runs["cp + sync"][k].seconds
                ratio = f"{run.seconds / base:6.2f}" if name != "cp + sync" else ""
                print(
                    f"{k + 1:>4} {name:<34} {run.seconds:>7.2f} {run.user_seconds:>7.2f} "
                    f"{run.sys_seconds:>7.2f} {total / run.seconds / 1e6:>6.0f} {ratio}"
                )
        print("median:")
        for name, rs in runs.items():
            med = statistics.median(r.seconds for r in rs)
            line = (
                f"     {name:<34} {med:>7.2f} "
                f"{statistics.median(r.user_seconds for r in rs):>7.2f} "
                f"{statistics.median(r.sys_seconds for r in rs):>7.2f} {total / med / 1e6:>6.0f}"
            )
            if name != "cp + sync":
                ratios = [r.seconds / c.seconds for r, c in zip(rs, runs["cp + sync"], strict=True)]
                speed = 1 / statistics.median(ratios)
                line += f" {statistics.median(ratios):6.2f}  -> {speed:.2f}x cp's speed"
                if name == "weightbridge":
                    verdict &= speed >= 0.9
            print(line)

    if not skip_naive:
        naive = one(
            "naive load/.T/save",
            lambda out: ([sys.executable, "-c", NAIVE, src, out, mapping], None),
            cold,
        )
        print(
            f"\nnaive load/.T/save (cold, once): {naive.seconds:.2f} s wall, "
            f"{naive.user_seconds:.2f} user, {naive.sys_seconds:.2f} sys, "
            f"peak RssAnon {naive.peak_rss_anon / 1e6:.0f} MB"
        )
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        f"largest tensor: {largest / 1e6:.0f} MB; memory bound (largest + 256 MB): "
        f"{bound / 1e6:.0f} MB"
    )
    print(
        "speed  target weightbridge >= 0.9x cp (median of paired ratios, every condition) -> "
        + ("PASS" if verdict else "FAIL")
    )
    print(
        f"memory target peak RssAnon <= bound: {peak / 1e6:.0f} MB "
        f"-> {'PASS' if peak <= bound else 'FAIL'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
