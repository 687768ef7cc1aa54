"""The command line: parse arguments, call the API, print results. Nothing else lives here."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence

from weightbridge import __version__, api
from weightbridge.errors import WeightbridgeError
from weightbridge.plan import Plan
from weightbridge.planning.planner import Rename
from weightbridge.spec import CheckpointSpec


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def _table(spec: CheckpointSpec, shard_of: dict[str, str] | None = None) -> str:
    rows = [("name", "shape", "dtype", "size") + (("shard",) if shard_of else ())]
    for t in spec:
        row = (t.name, "x".join(map(str, t.shape)) or "scalar", t.dtype, _human(t.nbytes))
        rows.append(row + ((shard_of.get(t.name, ""),) if shard_of else ()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"{len(spec)} tensors, {_human(spec.nbytes)}")
    return "\n".join(lines)


def _shard_map(path: str) -> dict[str, str] | None:
    from weightbridge.io.sharded import find_index, read_index

    try:
        index = find_index(path)
        return read_index(index)[0] if index is not None else None
    except WeightbridgeError:
        return None


def _load_rules(args: argparse.Namespace) -> list[Rename]:
    rules = [Rename.parse(r) for r in args.rename or []]
    if args.rules:
        from weightbridge.planning.rulesfile import load_renames

        rules = load_renames(args.rules) + rules
    return rules


def _make_plan(args: argparse.Namespace) -> Plan:
    if args.plan:
        return Plan.load(args.plan)
    transforms = None
    if args.rules:
        from weightbridge.planning.rulesfile import load_transforms

        transforms = load_transforms(args.rules)
    return api.plan(
        args.source,
        args.like,
        renames=_load_rules(args),
        rules=transforms,
        partial=args.partial,
        slice_mismatched=args.slice_mismatched,
        from_framework=args.from_framework,
        to_framework=args.to_framework,
        dtype=args.dtype,
        hints=[_hint(h) for h in args.hint or []],
    )


def _hint(text: str) -> tuple[str, str]:
    if "=" not in text:
        from weightbridge.errors import MatchError

        raise MatchError(
            f"--hint {text!r} must look like TARGET_SUBSTRING=SOURCE_SUBSTRING, e.g. reduce=conv1"
        )
    target, source = text.split("=", 1)
    return target, source


def cmd_inspect(args: argparse.Namespace) -> int:
    spec = api.inspect(args.path)
    if args.json:
        print(json.dumps(spec.to_json(), indent=1))
    else:
        print(_table(spec, _shard_map(args.path)))
    return 0


def cmd_spec(args: argparse.Namespace) -> int:
    spec = api.spec_of(args.path)
    if args.output:
        api.save_spec(spec, args.output)
        print(f"wrote the spec of {len(spec)} tensors to {args.output}", file=sys.stderr)
    else:
        print(json.dumps(spec.to_json(), indent=1))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    plan = _make_plan(args)
    print(plan.explain())
    if args.output:
        plan.save(args.output)
        print(
            f"\nplan saved to {args.output} (edit it, then: weightbridge convert ... --plan "
            f"{args.output})",
            file=sys.stderr,
        )
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    plan = _make_plan(args)
    if args.save_plan:
        plan.save(args.save_plan)
    report = api.convert(
        args.source,
        args.output,
        target=args.like,
        plan=plan,
        format=args.format,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        progress=(not args.quiet and sys.stderr.isatty()) or args.progress,
        dest_options=_dest_options(args),
        keep_cache=args.keep_cache,
    )
    print(report.summary())
    layout = [n for n in plan.notes if n.kind == "layout"]
    for note in layout:
        print(f"note: {note}")
    if len(plan.notes) > len(layout) or plan.unused:
        print(plan.summary())
    return 0


def _dest_options(args: argparse.Namespace) -> dict[str, object]:
    options: dict[str, object] = {}
    for key in ("endpoint", "aws_region", "step"):
        value = getattr(args, key, None)
        if value is not None:
            options[key] = value
    return options


def cmd_verify(args: argparse.Namespace) -> int:
    n = api.verify(
        args.source, args.dest, args.plan, format=args.format, dest_options=_dest_options(args)
    )
    print(f"verified {n} tensors in {args.dest}: every one equals the source through the plan")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from weightbridge.demo import run_demo

    workdir = args.dir or tempfile.mkdtemp(prefix="weightbridge-demo-")
    run_demo(workdir, out=sys.stdout)
    return 0


def _remote_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("--endpoint", help="S3-compatible endpoint URL for s3:// destinations")
    s.add_argument("--aws-region", help="region for s3:// destinations")
    s.add_argument(
        "--step",
        type=int,
        help="orbax: write step N of a CheckpointManager directory (<dest>/N/default)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="weightbridge",
        description="Map deep-learning weights between model implementations, streaming "
        "checkpoints far larger than memory.",
    )
    p.add_argument("--version", action="version", version=f"weightbridge {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="list a checkpoint's tensors (headers only)")
    s.add_argument("path")
    s.add_argument("--json", action="store_true", help="print the spec JSON instead of a table")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("spec", help="write the target spec (names, shapes, dtypes) of a checkpoint")
    s.add_argument("path")
    s.add_argument("-o", "--output", help="spec file to write (default: print it)")
    s.set_defaults(func=cmd_spec)

    def planning(s: argparse.ArgumentParser) -> None:
        s.add_argument("source", help="checkpoint to read (theirs)")
        s.add_argument(
            "--like", help="target: a spec JSON file or a checkpoint whose layout to produce"
        )
        s.add_argument(
            "--from",
            dest="from_framework",
            help="source framework: pytorch, flax, haiku, keras, tensorflow (with --to and no "
            "--like: inferred from the names when they leave no doubt)",
        )
        s.add_argument(
            "--to",
            dest="to_framework",
            help="target framework; without --like, renames and transposes by its conventions",
        )
        s.add_argument(
            "--rename",
            action="append",
            metavar="PATTERN=REPLACEMENT",
            help="rename source tensors (regex, \\1 back-references; repeatable)",
        )
        s.add_argument("--rules", help="rules file (JSON or YAML) with renames")
        s.add_argument(
            "--hint",
            action="append",
            metavar="TARGET=SOURCE",
            help="pair tensors the matcher finds ambiguous by unique substrings (repeatable)",
        )
        s.add_argument("--plan", help="use this saved plan instead of planning")
        s.add_argument("--dtype", help="cast floating-point tensors, e.g. bf16")
        s.add_argument(
            "--partial",
            action="store_true",
            help="load what fits; other target tensors keep the target's own values",
        )
        s.add_argument(
            "--slice-mismatched",
            action="store_true",
            help="with --partial: copy the overlapping block of same-named tensors "
            "whose shapes differ (a 1000-class head into 10 classes)",
        )

    s = sub.add_parser(
        "plan", help="show (and save) the plan of a conversion, reading no tensor data"
    )
    planning(s)
    s.add_argument("-o", "--output", help="save the plan JSON here")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("convert", help="stream a checkpoint into a new layout")
    planning(s)
    s.add_argument(
        "-o",
        "--output",
        required=True,
        help="output directory, or an object-store URL such as s3://bucket/prefix",
    )
    s.add_argument(
        "--format",
        default="safetensors",
        help="safetensors (default), npz, h5, torch, msgpack, gguf, zarr, orbax",
    )
    _remote_options(s)
    s.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest output file (default 5GB; byte formats into s3:// or gs:// are capped at "
        "64 MiB, the size uploaded from memory in one PUT)",
    )
    s.add_argument("--save-plan", help="also save the plan JSON here")
    s.add_argument("--overwrite", action="store_true", help="replace another conversion's output")
    s.add_argument(
        "--keep-cache",
        action="store_true",
        help="leave the source in the page cache (by default each source tensor leaves it after "
        "its last use: faster, and spares the cache, unless other jobs read the same source now)",
    )
    s.add_argument("--progress", action="store_true", help="show progress even when not a terminal")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("verify", help="recompute every output tensor from the source and compare")
    s.add_argument("source")
    s.add_argument("dest")
    s.add_argument("--plan", help="plan file (default: the one convert saved in DEST)")
    s.add_argument("--format", help="the output format convert wrote (needed for zarr/orbax)")
    _remote_options(s)
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("demo", help="build a small checkpoint, convert it, verify it")
    s.add_argument("--dir", help="work directory (default: a new temporary one)")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except WeightbridgeError as e:
        print(f"weightbridge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("weightbridge: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
