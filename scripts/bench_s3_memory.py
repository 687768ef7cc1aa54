"""Peak anonymous memory of a conversion into an S3 object store (moto's server on 127.0.0.1).

Builds the llama-like bf16 checkpoint of ``bench_stream.py`` (default ~1 GB; the largest tensor
is the 131 MB embedding), starts moto's S3 server in this process on 127.0.0.1, and runs
``weightbridge convert SRC -o s3://bucket/run --endpoint ...`` (pytorch -> flax names, so the
2-D weights are transposed) in a child process whose ``RssAnon`` is polled from
``/proc/<pid>/status`` (``bench_stream.run_polled``). Prints the time, MB/s, the peak RssAnon,
the child's baseline (interpreter and weightbridge imported) and the bound baseline + largest
tensor + 256 MB; then reads the result back through weightbridge and checks every tensor
(``weightbridge verify``). Nothing here asserts on timings.

Byte-format shards go by multipart upload through obstore (``weightbridge[cloud]``); the script
prints how many objects were written and in how many parts (from their ETags), and the rate of
a bare upload of one shard-sized file (``_obstore.upload_file``, in a child process) to tell
moto's speed from the converter's. ``--tensorstore`` hides obstore from the converter: shards
then go by tensorstore's single PUT, capped at 64 MiB.

    python scripts/bench_s3_memory.py --size 1GB --max-shard-size 256MB
    python scripts/bench_s3_memory.py --size 1GB --tensorstore  # without obstore: 64 MiB shards
    python scripts/bench_s3_memory.py --size 1GB --before   # as before the 64 MiB cap
    python scripts/bench_s3_memory.py --size 1GB --format npz

Measured on the 2-core test VM, 982 MB checkpoint (largest tensor 131 MB), moto in the bench
process and the converter in a child. moto is the bottleneck: it runs in Python, keeps every
part in memory and joins them on completion, so the bare upload is no faster than the
conversion; the figures say nothing of real S3's speed.

    --max-shard-size 256MB  4 objects of 234-252 MB, 14-16 parts each: 17.8-21.4 s
                            (46-55 MB/s), peak RssAnon 59 MB (baseline 29 MB, bound 410 MB);
                            bare upload of one 252 MB file 68-78 MB/s
    --max-shard-size 5GB    1 object of 982 MB, 59 parts: 30.8 s (32 MB/s), peak RssAnon 59 MB;
                            bare upload of the 982 MB file 38 MB/s
    --tensorstore           16 objects of 23-131 MB, one PUT each: 17.0 s (58 MB/s),
                            peak RssAnon 157 MB
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_stream import RENAMES, make_checkpoint, run_polled

from weightbridge.planning.shards import parse_size

BUCKET = "weightbridge-bench"
MEMORY_SLACK = 256 << 20
MB = 1 << 20

# What the converter child imports before touching data: its baseline anonymous memory.
# --before: the converter as it was before the object-store cap, for comparison on the same
# machine: no max_object_size, and each shard read into bytes and passed to KvStore.write.
BEFORE = (
    "import sys\n"
    "import weightbridge.cli, weightbridge.io._kvstore as wkv\n"
    "import weightbridge.streaming.dest.object_store as wos\n"
    "wos.TensorstoreDestination.max_object_size = lambda self, format: None\n"
    "def write_file(self, key, path):\n"
    "    with open(path, 'rb') as f:\n"
    "        data = f.read()\n"
    "    return len(data), self.write(key, data)\n"
    "wkv.Store.write_file = write_file\n"
    "sys.exit(weightbridge.cli.main(sys.argv[1:]))\n"
)

# --tensorstore: the converter without obstore (as if the cloud extra were not installed).
NO_OBSTORE = (
    "import sys\n"
    "sys.modules['obstore'] = None\n"
    "import weightbridge.cli\n"
    "sys.exit(weightbridge.cli.main(sys.argv[1:]))\n"
)

# A bare multipart upload of one local file: moto's own rate, without the converter.
UPLOAD = (
    "import sys, time\n"
    "from weightbridge.io import _obstore\n"
    "store = _obstore.open_store(sys.argv[1], endpoint=sys.argv[2])\n"
    "started = time.perf_counter()\n"
    "size = _obstore.upload_file(store, sys.argv[3], sys.argv[4], url=sys.argv[1])\n"
    "print(size, time.perf_counter() - started)\n"
)

BASELINE = (
    "import weightbridge.api, weightbridge.cli, weightbridge.io, weightbridge.io.zarr\n"
    "import weightbridge.streaming.dest.object_store\n"
    "import tensorstore\n"
    "with open('/proc/self/status') as f:\n"
    "    fields = dict(line.split(':', 1) for line in f)\n"
    "print(int(fields['RssAnon'].split()[0]) * 1024)\n"
)


def start_moto() -> tuple[object, str]:
    """moto's S3 server on 127.0.0.1 (a free port) with an empty bucket; (server, endpoint)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # moto does not check signatures: a plain PUT creates the bucket (tensorstore would retry
    # a missing bucket until its deadline).
    with urllib.request.urlopen(
        urllib.request.Request(f"{endpoint}/{BUCKET}", method="PUT"), timeout=30
    ) as r:
        r.read()
    return server, endpoint


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1GB", help="checkpoint size, e.g. 1GB or 512MB")
    ap.add_argument("--max-shard-size", default="5GB", help="passed to convert (default 5GB)")
    ap.add_argument("--format", default="safetensors", help="output format (default safetensors)")
    ap.add_argument("--dir", help="work directory (default: a new one under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--no-verify", action="store_true", help="skip reading the result back")
    ap.add_argument(
        "--tensorstore",
        action="store_true",
        help="hide obstore from the converter: tensorstore's single PUT, 64 MiB shards",
    )
    ap.add_argument(
        "--before",
        action="store_true",
        help="run the converter as before the object-store cap (no cap, one bytes PUT)",
    )
    args = ap.parse_args(argv)

    work = args.dir or tempfile.mkdtemp(prefix="wb-bench-s3-", dir="/tmp")
    os.makedirs(work, exist_ok=True)
    for key, value in (
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ):
        os.environ.setdefault(key, value)
    server, endpoint = start_moto()
    try:
        return bench(work, endpoint, args)
    finally:
        server.stop()  # type: ignore[attr-defined]
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")


def bench(work: str, endpoint: str, args: argparse.Namespace) -> int:
    src = os.path.join(work, "src")
    t0 = time.perf_counter()
    specs = make_checkpoint(src, parse_size(args.size))
    total = sum(t.nbytes for t in specs)
    largest = max(t.nbytes for t in specs)
    print(
        f"checkpoint: {len(specs)} bf16 tensors, {total / 1e6:.0f} MB, largest tensor "
        f"{largest / 1e6:.0f} MB (made in {time.perf_counter() - t0:.1f} s)"
    )
    out = subprocess.run(
        [sys.executable, "-c", BASELINE], check=True, capture_output=True, text=True
    )
    baseline = int(out.stdout.split()[-1])

    dest = f"s3://{BUCKET}/run"
    entry = ["-m", "weightbridge"]
    if args.before or args.tensorstore:
        entry = ["-c", BEFORE if args.before else NO_OBSTORE]
    cmd = [sys.executable, *entry, "convert", src, "-o", dest]
    cmd += ["--endpoint", endpoint, "--from", "pytorch", "--to", "flax", "-q"]
    cmd += ["--format", args.format, "--max-shard-size", args.max_shard_size]
    for r in RENAMES:
        cmd += ["--rename", r]
    run = run_polled(cmd)
    bound = baseline + largest + MEMORY_SLACK
    print(
        f"endpoint {endpoint}, format {args.format}, --max-shard-size {args.max_shard_size}"
        + (" (--before: no cap, one bytes PUT per shard)" if args.before else "")
        + (" (--tensorstore: no obstore, one PUT per shard)" if args.tensorstore else "")
    )
    print(f"{'seconds':>8} {'MB/s':>7} {'peak RssAnon MB':>16} {'baseline MB':>12} {'bound MB':>9}")
    print(
        f"{run.seconds:>8.2f} {total / run.seconds / 1e6:>7.0f} {run.peak_rss_anon / MB:>16.0f} "
        f"{baseline / MB:>12.0f} {bound / MB:>9.0f}"
    )
    print(
        f"peak RssAnon above baseline: {(run.peak_rss_anon - baseline) / MB:.0f} MB; bound "
        f"(largest tensor + 256 MB): {(largest + MEMORY_SLACK) / MB:.0f} MB -> "
        f"{'PASS' if run.peak_rss_anon <= bound else 'FAIL'}"
    )
    objects = _objects(endpoint)
    shards = {k: v for k, v in objects.items() if not k.startswith(".") and "/" not in k}
    shards = {k: v for k, v in shards.items() if not k.endswith(".json")}
    if shards:
        parts = [v[1] for v in shards.values()]
        print(
            f"{len(shards)} shard objects, {min(v[0] for v in shards.values()) / 1e6:.0f}-"
            f"{max(v[0] for v in shards.values()) / 1e6:.0f} MB, "
            + (
                f"multipart: {min(parts)}-{max(parts)} parts each"
                if all(parts)
                else f"{parts.count(0)} by single PUT"
            )
        )
        upload_rate(work, endpoint, max(v[0] for v in shards.values()))
    if not args.no_verify:
        t0 = time.perf_counter()
        check = [sys.executable, "-m", "weightbridge", "verify", src, dest]
        check += ["--endpoint", endpoint]
        if args.format in ("zarr", "orbax"):
            check += ["--format", args.format]
        subprocess.run(check, check=True, stdout=subprocess.DEVNULL)
        print(
            f"read back: every tensor equals the source through the plan "
            f"({time.perf_counter() - t0:.1f} s)"
        )
    return 0


def _objects(endpoint: str) -> dict[str, tuple[int, int]]:
    """(size, parts) of every object under s3://BUCKET/run/ (parts 0: a single PUT)."""
    import re
    from xml.etree import ElementTree

    url = f"{endpoint}/{BUCKET}?list-type=2&prefix=run/"
    with urllib.request.urlopen(url, timeout=30) as r:  # moto does not check signatures
        root = ElementTree.fromstring(r.read())
    ns = {"s": root.tag.split("}")[0].strip("{")} if root.tag.startswith("{") else {}
    out = {}
    for item in root.findall("s:Contents" if ns else "Contents", ns):
        key = item.findtext("s:Key" if ns else "Key", "", ns)[len("run/") :]
        etag = item.findtext("s:ETag" if ns else "ETag", "", ns)
        size = int(item.findtext("s:Size" if ns else "Size", "0", ns))
        m = re.search(r"-(\d+)", etag)
        out[key] = (size, int(m.group(1)) if m else 0)
    return out


def upload_rate(work: str, endpoint: str, size: int) -> None:
    """Time a bare multipart upload of a `size`-byte file (no conversion) in a child process."""
    path = os.path.join(work, "upload.bin")
    with open(path, "wb") as f:
        for _ in range(0, size, 64 * MB):
            f.write(os.urandom(min(64 * MB, size - f.tell())))
    try:
        out = subprocess.run(
            [sys.executable, "-c", UPLOAD, f"s3://{BUCKET}", endpoint, "upload/bin", path],
            check=True,
            capture_output=True,
            text=True,
        )
        nbytes, seconds = out.stdout.split()
        print(
            f"bare upload of one {int(nbytes) / 1e6:.0f} MB file (obstore multipart, no "
            f"conversion): {float(seconds):.2f} s, {int(nbytes) / float(seconds) / 1e6:.0f} MB/s"
        )
    finally:
        os.remove(path)


if __name__ == "__main__":
    sys.exit(main())
