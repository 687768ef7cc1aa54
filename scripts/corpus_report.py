"""Run the corpus (tests/corpus) against the current matcher and print what happened.

    python scripts/corpus_report.py            # every case x variant
    python scripts/corpus_report.py -j 2       # in 2 processes
    python scripts/corpus_report.py -k resnet  # cases whose name contains "resnet"
    python scripts/corpus_report.py --explain vision/vit/timm_to_torchvision opaque

Prints the counts (pairs / equal / refused / wrong / crash) overall and per variant, then every
wrong, crash and refused case with a one-line reason; a wrong case also names the mispaired
tensors (compared with the plain variant's pairing), and a refusal that suggests hints says
whether following them converts the case. Exits 1 when anything is wrong or crashed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
import warnings
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

OUTCOMES = ("equal", "refused", "wrong", "crash")


def load_cases() -> list[Any]:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from tests.test_corpus import all_cases

    return all_cases()


def _available(case: Any) -> bool:
    import importlib.util

    modules = {"torch": "torch", "jax": "flax", "keras": "keras", "torchvision": "torchvision"}
    return all(importlib.util.find_spec(modules.get(f, f)) is not None for f in case.framework)


def _one_line(msg: str) -> str:
    lines = [ln.strip() for ln in msg.strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    if lines[0].startswith("Traceback") or "Traceback" in msg:
        return lines[-1][:200]
    text = lines[0]
    if len(lines) > 1 and text.startswith("MatchError: refused to guess"):
        text += " / " + lines[1]
    return text[:300]


def run_one(args: tuple[str, tuple[str, ...], bool]) -> list[dict[str, Any]]:
    """All variants of one case (built once), in a worker process."""
    name, variants, check_hints = args
    warnings.simplefilter("ignore")
    from tests.corpus.harness import diagnose, refusal_hints, run_case, run_with_suggested_hints

    try:
        import torch

        torch.set_num_threads(1)  # workers share the cores; threads would only contend
    except ImportError:
        pass
    case = next(c for c in load_cases() if c.name == name)
    rows: list[dict[str, Any]] = []
    t0 = time.time()
    try:
        pair = case.build()
    except Exception as e:
        return [
            dict(case=name, variant=v, outcome="crash", reason=f"build failed: {e!r}", secs=0.0)
            for v in variants
        ]
    for variant in variants:
        t = time.time()
        outcome, msg = run_case(pair, variant)
        row = dict(case=name, variant=variant, outcome=outcome, reason=_one_line(msg))
        if variant == "plain" and outcome != case.expect:
            row["unexpected"] = f"expected {case.expect}"
        if outcome == "wrong":
            row["reason"] += "; " + diagnose(pair, variant)
        if outcome == "refused" and check_hints and refusal_hints(msg):
            final, final_msg, hints = run_with_suggested_hints(pair, variant)
            row["hints"] = f"with hints={hints}: {final}" + (
                "" if final == "equal" else f" ({_one_line(final_msg)})"
            )
            row["hints_ok"] = final == "equal"
        row["secs"] = time.time() - t
        rows.append(row)
    rows[0]["build_secs"] = time.time() - t0 - sum(r["secs"] for r in rows)
    return rows


def table(rows: list[dict[str, Any]], variants: tuple[str, ...]) -> str:
    head = f"{'variant':<16} {'pairs':>5} " + " ".join(f"{o:>7}" for o in OUTCOMES)
    lines = [head, "-" * len(head)]
    for label, sel in [("ALL", rows)] + [
        (v, [r for r in rows if r["variant"] == v]) for v in variants
    ]:
        counts = [sum(r["outcome"] == o for r in sel) for o in OUTCOMES]
        lines.append(f"{label:<16} {len(sel):>5} " + " ".join(f"{c:>7}" for c in counts))
    return "\n".join(lines)


def explain(name: str, variant: str) -> None:
    import weightbridge
    from tests.corpus.harness import apply_variant, diagnose, run_case
    from weightbridge.api import plan

    case = next(c for c in load_cases() if c.name == name)
    pair = case.build()
    outcome, msg = run_case(pair, variant)
    print(f"{name} [{variant}]: {outcome}\n{msg}\n")
    theirs, mine, _ = apply_variant(pair, variant)
    kw = {k: v for k, v in pair.adapt_kwargs.items() if k in ("hints",)}
    log: list[str] = []
    try:
        p = plan(
            theirs,
            mine,
            from_framework=pair.adapt_kwargs.get("in_format"),
            to_framework=pair.adapt_kwargs.get("out_format"),
            log=log,
            **kw,
        )
        print("\n".join(log))
        print(p.explain())
    except weightbridge.WeightbridgeError as e:
        print("\n".join(log))
        print(f"plan refused: {e}")
    if outcome == "wrong":
        print("\ndiagnosis:", diagnose(pair, variant))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("-j", "--jobs", type=int, default=1, help="worker processes (default 1)")
    ap.add_argument("-k", "--filter", default="", help="only cases whose name contains this")
    ap.add_argument("--variants", default="", help="comma-separated variants (default: all)")
    ap.add_argument("--no-hints", action="store_true", help="do not follow suggested hints")
    ap.add_argument("--explain", nargs=2, metavar=("CASE", "VARIANT"), help="show one plan")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    if args.explain:
        explain(*args.explain)
        return 0
    from tests.corpus.harness import VARIANTS

    variants = tuple(v for v in args.variants.split(",") if v) or VARIANTS
    cases = [c for c in load_cases() if args.filter in c.name]
    skipped = [c.name for c in cases if not _available(c)]
    cases = [c for c in cases if _available(c)]
    tasks = [(c.name, variants, not args.no_hints) for c in cases]
    t0 = time.time()
    rows: list[dict[str, Any]] = []
    if args.jobs > 1:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(args.jobs) as pool:
            for done in pool.imap_unordered(run_one, tasks):
                rows.extend(done)
                print(f"  {done[0]['case']}: {[r['outcome'] for r in done]}", file=sys.stderr)
    else:
        for task in tasks:
            done = run_one(task)
            rows.extend(done)
            print(f"  {done[0]['case']}: {[r['outcome'] for r in done]}", file=sys.stderr)
    order = {c.name: i for i, c in enumerate(cases)}
    rows.sort(key=lambda r: (order[r["case"]], variants.index(r["variant"])))
    print(f"corpus: {len(cases)} cases x {len(variants)} variants in {time.time() - t0:.0f}s")
    if skipped:
        print(f"skipped {len(skipped)} case(s) whose frameworks are not installed")
    print()
    print(table(rows, variants))
    for kind in ("wrong", "crash", "refused"):
        sel = [r for r in rows if r["outcome"] == kind]
        if not sel:
            continue
        print(f"\n{kind.upper()} ({len(sel)}):")
        for r in sel:
            extra = f" [{r['unexpected']}]" if "unexpected" in r else ""
            print(f"  {r['case']} [{r['variant']}]{extra}: {r['reason']}")
            if "hints" in r:
                print(f"      {r['hints']}")
    unexpected = [r for r in rows if "unexpected" in r and r["outcome"] in ("equal", "refused")]
    if unexpected:
        print(f"\nPLAIN NOT AS EXPECTED ({len(unexpected)}):")
        for r in unexpected:
            print(f"  {r['case']}: {r['outcome']} [{r['unexpected']}]")
    bad_hints = [r for r in rows if r.get("hints_ok") is False]
    if bad_hints:
        print(f"\nREFUSALS WHOSE SUGGESTED HINTS DO NOT CONVERT ({len(bad_hints)}):")
        for r in bad_hints:
            print(f"  {r['case']} [{r['variant']}]: {r['hints']}")
    slow = sorted(rows, key=lambda r: -r.get("secs", 0))[:3]
    print(
        "\nslowest runs: "
        + ", ".join(f"{r['case']} [{r['variant']}] {r['secs']:.1f}s" for r in slow)
    )
    failed = any(r["outcome"] in ("wrong", "crash") for r in rows) or bad_hints or unexpected
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
