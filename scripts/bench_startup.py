"""Start-up time of the command line: the median wall time of N fresh processes per command.

    python scripts/bench_startup.py [--runs 15] [--why]

Measures `weightbridge --version`, `--help` and `inspect` of a small safetensors file (each a new
`python -m weightbridge` process, as a user's shell starts it), next to a bare `python -c pass`,
and prints each median and the target it should meet (issue #16: 0.3 s, 0.3 s, 0.5 s). `--why`
adds the slowest imports of `inspect` (`python -X importtime`), the usual culprit.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

# What a user should wait at most (seconds), from issue #16.
TARGETS = {"--version": 0.3, "--help": 0.3, "inspect": 0.5}


def median_seconds(command: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def slowest_imports(command: list[str], top: int = 8) -> list[tuple[float, str]]:
    """(cumulative seconds, module) of the `top` slowest imports of `command`."""
    err = subprocess.run(
        [sys.executable, "-X", "importtime", *command[1:]],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=True,
    ).stderr
    rows = []
    for line in err.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]) / 1e6, parts[2].strip()))
    return sorted(rows, reverse=True)[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=15, help="processes per command (median)")
    parser.add_argument("--why", action="store_true", help="show the slowest imports of inspect")
    args = parser.parse_args()

    import numpy as np

    from weightbridge.io import write_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.safetensors")
        write_checkpoint(
            path, {f"layer.{i}.weight": np.zeros((4, 4), np.float32) for i in range(8)}
        )
        wb = [sys.executable, "-m", "weightbridge"]
        commands = {
            "python -c pass": ([sys.executable, "-c", "pass"], None),
            "--version": ([*wb, "--version"], TARGETS["--version"]),
            "--help": ([*wb, "--help"], TARGETS["--help"]),
            "inspect": ([*wb, "inspect", path], TARGETS["inspect"]),
        }
        print(f"median of {args.runs} runs (load average {os.getloadavg()[0]:.1f})")
        for name, (command, target) in commands.items():
            seconds = median_seconds(command, args.runs)
            verdict = "" if target is None else f"  target {target:.1f} s: "
            verdict += "" if target is None else ("ok" if seconds <= target else "SLOW")
            print(f"  {name:<16} {seconds:6.3f} s{verdict}")
        if args.why:
            print("slowest imports of inspect (cumulative):")
            for seconds, module in slowest_imports(commands["inspect"][0]):
                print(f"  {seconds:6.3f} s  {module}")


if __name__ == "__main__":
    main()
