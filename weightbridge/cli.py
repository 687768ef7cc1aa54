"""The command line: parse arguments, call the API, print results. Nothing else lives here.

Start-up is kept short (`weightbridge --version` and `--help` import neither numpy nor the
planning and streaming machinery): the API and everything it needs are imported inside the
commands that use them. `scripts/bench_startup.py` measures it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from weightbridge import __version__
from weightbridge.errors import WeightbridgeError

if TYPE_CHECKING:
    from weightbridge.plan import Plan
    from weightbridge.planning.planner import Rename
    from weightbridge.spec import CheckpointSpec

# The formats `--format` writes, as `--help` lists them (`weightbridge.io.FORMATS` has them and
# their aliases; typed here so that `--help` imports no format module; a test checks both agree).
OUTPUT_FORMATS = ("safetensors", "npz", "h5", "torch", "msgpack", "gguf", "zarr", "orbax")

_PATH_HELP = (
    "a checkpoint file, an *.index.json or its folder, a Hugging Face model folder (the weights "
    "beside config.json are found: model.safetensors[.index.json] first), a zarr/orbax, "
    "TensorFlow or DCP directory, or a URL (s3://, gs://)"
)
DTYPE_HELP = (
    "cast floating-point tensors to this dtype, e.g. bf16. With --like it overrides the "
    "target's float dtypes (F16/BF16/F32/F64/F8); integer and bool tensors keep theirs. "
    "With --format gguf, q8_0 or q4_0 quantize what llama.cpp's --outtype q8_0 quantizes "
    "(1-D tensors and norms stay F32)"
)


def _say_which_weights(*paths: str | None) -> None:
    """Name the weight file read from each Hugging Face folder among `paths`, on stderr."""
    from weightbridge import api

    for note in api.weights_notes(*paths):
        print(f"weightbridge: {note}", file=sys.stderr)


def _table(spec: CheckpointSpec, shard_of: dict[str, str] | None = None) -> str:
    from weightbridge.planning.shards import human_size

    rows = [("name", "shape", "dtype", "size") + (("shard",) if shard_of else ())]
    for t in spec:
        row = (t.name, "x".join(map(str, t.shape)) or "scalar", t.dtype, human_size(t.nbytes))
        rows.append(row + ((shard_of.get(t.name, ""),) if shard_of else ()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"{len(spec)} tensors, {human_size(spec.nbytes)}")
    return "\n".join(lines)


def _shard_map(path: str) -> dict[str, str] | None:
    from weightbridge.io import weights_path
    from weightbridge.io.sharded import find_index, read_index

    try:
        index = find_index(weights_path(path))
        return read_index(index)[0] if index is not None else None
    except WeightbridgeError:
        return None


def _load_rules(args: argparse.Namespace) -> list[Rename]:
    """``--rename`` rules (a ``--rules`` file's renames are applied by the API, before them)."""
    from weightbridge.planning.planner import Rename

    return [Rename.parse(r) for r in args.rename or []]


def _make_plan(args: argparse.Namespace) -> Plan:
    from weightbridge import api
    from weightbridge.plan import Plan

    _say_which_weights(args.source, args.like)
    if args.plan:
        return Plan.load(args.plan)
    return api.plan(
        args.source,
        args.like,
        renames=_load_rules(args),
        rules_file=args.rules,
        rules_params=_rules_params(args),
        partial=args.partial,
        slice_mismatched=args.slice_mismatched,
        from_framework=args.from_framework,
        to_framework=args.to_framework,
        dtype=args.dtype,
        hints=_hints(args),
        dequantize=args.dequantize,
    )


def _rules_params(args: argparse.Namespace) -> dict[str, str] | None:
    """``--rules-param NAME=VALUE`` pairs (the API checks names and numbers)."""
    given = {}
    for text in args.rules_param or []:
        name, sep, value = text.partition("=")
        if not sep:
            from weightbridge.errors import RuleError

            raise RuleError(f"--rules-param {text!r} must look like NAME=VALUE, e.g. n_head=32")
        given[name.strip()] = value.strip()
    return given or None


def _hints(args: argparse.Namespace) -> list[tuple[str, str]]:
    """``--hint`` pairs, and ``--flatten`` as the choice hint it stands for."""
    hints = [_hint(h) for h in args.hint or []]
    if args.flatten:
        hints.append(("@flatten", args.flatten))
    return hints


def _hint(text: str) -> tuple[str, str]:
    if "=" not in text:
        from weightbridge.errors import MatchError

        raise MatchError(
            f"--hint {text!r} must look like TARGET_SUBSTRING=SOURCE_SUBSTRING, e.g. reduce=conv1"
        )
    target, source = text.split("=", 1)
    return target, source


def cmd_inspect(args: argparse.Namespace) -> int:
    from weightbridge import api

    _say_which_weights(args.path)
    spec = api.inspect(args.path)
    if args.json:
        print(json.dumps(spec.to_json(), indent=1))
    else:
        print(_table(spec, _shard_map(args.path)))
    return 0


def cmd_spec(args: argparse.Namespace) -> int:
    from weightbridge import api

    _say_which_weights(args.path)
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
    from weightbridge import api

    endpoint_note = _endpoint_note(args)
    if endpoint_note:
        print(endpoint_note, file=sys.stderr)
    scale = {
        "executor": args.executor,
        "retries": args.retries,
        "partition": _partition(args.partition),
    }
    if len(args.source) > 1:
        return _convert_batch(args, scale)
    args.source = args.source[0]
    plan = _make_plan(args)
    if args.save_plan:
        plan.save(args.save_plan)
    # A plan made here was made for --like; it is checked against it again only when it came
    # from a file (--plan), or read when it keeps some of the target's own values (--partial).
    # (Checking a --dtype plan again would compare it with the spec's own float dtypes.)
    needs_target = args.plan is not None or api.keeps_target_values(plan)
    report = api.convert(
        args.source,
        args.output,
        target=args.like if needs_target else None,
        plan=plan,
        format=args.format,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        progress=(not args.quiet and sys.stderr.isatty()) or args.progress,
        dest_options=_dest_options(args),
        keep_cache=args.keep_cache,
        **scale,
        # Unused by convert while a plan is given; meant for its check of the plan against
        # --like, which should see the target's float dtypes as --dtype makes them (and for
        # --dtype q8_0, the GGUF writer's quantization).
        dtype=args.dtype,
        gguf_metadata=args.gguf_metadata,
    )
    print(report.summary())
    layout = [n for n in plan.notes if n.kind in ("layout", "quantize")]
    for note in layout:
        print(f"note: {note}")
    if len(plan.notes) > len(layout) or plan.unused:
        print(plan.summary())
    return 0


def _convert_batch(args: argparse.Namespace, scale: dict[str, Any]) -> int:
    """`convert` with several sources: one output per source under -o, one plan per specs."""
    from weightbridge import api

    _say_which_weights(*args.source, args.like)
    planning: dict[str, Any] = {}
    if not args.plan:
        planning = {
            "renames": _load_rules(args),
            "rules_file": args.rules,
            "rules_params": _rules_params(args),
            "partial": args.partial,
            "slice_mismatched": args.slice_mismatched,
            "from_framework": args.from_framework,
            "to_framework": args.to_framework,
            "dtype": args.dtype,
            "hints": _hints(args),
            "dequantize": args.dequantize,
        }
    report = api.convert(
        args.source,
        args.output,
        target=args.like,
        plan=args.plan,
        format=args.format,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        progress=(not args.quiet and sys.stderr.isatty()) or args.progress,
        dest_options=_dest_options(args),
        keep_cache=args.keep_cache,
        gguf_metadata=args.gguf_metadata,
        **scale,
        **planning,
    )
    print(report.summary())
    return 0


def _partition(text: str | None) -> tuple[int, int] | None:
    """``--partition I/N`` as ``(I, N)`` (the library checks the range)."""
    if text is None:
        return None
    i, sep, n = text.partition("/")
    if not sep or not i.strip().isdigit() or not n.strip().isdigit():
        from weightbridge.errors import SpecError

        raise SpecError(f"--partition {text!r}: expected I/N with whole numbers, e.g. 1/4")
    return int(i), int(n)


def _endpoint_note(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> str | None:
    """For an s3:// output with no endpoint given: say that AWS is asked, and how to choose
    another server, before the first request (which waits for its deadline on a wrong one)."""
    from weightbridge.io._kvstore import ENDPOINT_ENV

    dest = str(getattr(args, "output", None) or getattr(args, "dest", ""))
    if not dest.startswith("s3://") or args.endpoint or env.get(ENDPOINT_ENV):
        return None
    return (
        f"weightbridge: {dest}: no --endpoint (or ${ENDPOINT_ENV}): asking AWS S3; for MinIO or "
        "another S3-compatible server pass --endpoint URL"
    )


def _dest_options(args: argparse.Namespace) -> dict[str, object]:
    options: dict[str, object] = {}
    for key in ("endpoint", "aws_region", "step"):
        value = getattr(args, key, None)
        if value is not None:
            options[key] = value
    return options


def cmd_verify(args: argparse.Namespace) -> int:
    from weightbridge import api

    _say_which_weights(args.source, args.like)
    endpoint_note = _endpoint_note(args)
    if endpoint_note:
        print(endpoint_note, file=sys.stderr)
    n = api.verify(
        args.source,
        args.dest,
        plan=args.plan,
        target=args.like,
        format=args.format,
        dest_options=_dest_options(args),
    )
    print(f"verified {n} tensors in {args.dest}: every one equals the source through the plan")
    return 0


def _tolerance(text: str) -> float:
    """A tolerance: a number >= 0 (argparse turns the error into a usage message)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number >= 0, e.g. 1e-5")
    return value


def cmd_diff(args: argparse.Namespace) -> int:
    from weightbridge import api

    _say_which_weights(args.a, args.b)
    report = api.diff(args.a, args.b, rtol=args.rtol, atol=args.atol)
    print(json.dumps(report.to_json(), indent=1) if args.json else report.explain())
    return 0 if report.equal else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from weightbridge.demo import run_demo

    if args.dir:
        run_demo(args.dir, out=sys.stdout)
        return 0
    import tempfile

    with tempfile.TemporaryDirectory(prefix="weightbridge-demo-") as workdir:
        run_demo(workdir, out=sys.stdout)
    print("(a temporary directory, removed now: pass --dir DIR to keep the files)")
    return 0


def _source_options(s: argparse.ArgumentParser) -> None:
    """--endpoint and --aws-region: where s3:// URLs are read (sources, targets) and written."""
    s.add_argument(
        "--endpoint",
        help="endpoint URL for every s3:// and gs:// path of the command, sources and "
        "destinations (default: $WEIGHTBRIDGE_S3_ENDPOINT for s3://, else AWS; "
        "$STORAGE_EMULATOR_HOST for gs://, else Google; gs:// without Google credentials is an "
        "emulator, read anonymously)",
    )
    s.add_argument("--aws-region", help="region for s3:// paths")


def _remote_options(s: argparse.ArgumentParser) -> None:
    _source_options(s)
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
    s.add_argument("path", help=_PATH_HELP)
    s.add_argument("--json", action="store_true", help="print the spec JSON instead of a table")
    _source_options(s)
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("spec", help="write the target spec (names, shapes, dtypes) of a checkpoint")
    s.add_argument("path", help=_PATH_HELP)
    s.add_argument("-o", "--output", help="spec file to write (default: print it)")
    _source_options(s)
    s.set_defaults(func=cmd_spec)

    def planning(s: argparse.ArgumentParser, many: bool = False) -> None:
        if many:
            s.add_argument(
                "source",
                nargs="+",
                help="checkpoint(s) to read (theirs): " + _PATH_HELP + "; with several (a "
                "batch), -o is a directory with one output per source, named after its base name",
            )
        else:
            s.add_argument("source", help="checkpoint to read (theirs): " + _PATH_HELP)
        s.add_argument(
            "--like",
            help="target: a spec JSON file or a checkpoint (file or folder, as for the source) "
            "whose names, shapes and dtypes to produce",
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
        s.add_argument(
            "--rules",
            help="rules file (JSON or YAML) with renames and transforms, or the name of one "
            "shipped with weightbridge (keras_resnet_to_torchvision, llama_hf_to_gguf)",
        )
        s.add_argument(
            "--rules-param",
            action="append",
            metavar="NAME=VALUE",
            help="a number the rules file needs (repeatable), e.g. n_head=32 n_head_kv=8 for "
            "llama_hf_to_gguf; by default read from the source folder's config.json",
        )
        s.add_argument(
            "--hint",
            action="append",
            metavar="TARGET=SOURCE",
            help="pair tensors the matcher finds ambiguous by unique substrings (repeatable)",
        )
        s.add_argument(
            "--flatten",
            choices=("nhwc", "nchw"),
            help="how the target flattens a conv's output into its first dense layer: nhwc "
            "(Flax/Keras, channels last) or nchw (transposes to channels first, as torch does); "
            "the same as --hint @flatten=nhwc|nchw, asked for when the matcher cannot tell",
        )
        s.add_argument("--plan", help="use this saved plan instead of planning")
        s.add_argument("--dtype", help=DTYPE_HELP)
        s.add_argument(
            "--dequantize",
            action="store_true",
            help="turn block-scaled FP8 weights (DeepSeek-V3/R1: X.weight in float8 with "
            "X.weight_scale_inv, one scale per 128x128 block) into --dtype (default bf16) "
            "tensors, dropping the scales",
        )
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
    _source_options(s)
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("convert", help="stream a checkpoint (or a batch) into a new layout")
    planning(s, many=True)
    s.add_argument(
        "--executor",
        default="threads",
        help="where output shards are made: threads (default, this process), processes[:N], "
        "dask://HOST:PORT, or dask ($DASK_SCHEDULER_ADDRESS; pip install 'weightbridge[dask]')",
    )
    s.add_argument(
        "--retries",
        type=int,
        help="retries per shard task when a worker fails or dies (processes, dask; default 3)",
    )
    s.add_argument(
        "--partition",
        metavar="I/N",
        help="convert only the I-th of N byte-balanced shares of the shards (N runs may write "
        "into one output at once, e.g. a SLURM array); a plain run afterwards writes the indexes",
    )
    s.add_argument(
        "-o",
        "--output",
        required=True,
        help="output directory, or an object-store URL such as s3://bucket/prefix",
    )
    s.add_argument(
        "--format",
        default="safetensors",
        help=f"output format: {', '.join(OUTPUT_FORMATS)} (default: safetensors)",
    )
    _remote_options(s)
    s.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest output file (default 5GB; byte formats into s3:// or gs:// are capped at "
        "64 MiB, the size uploaded from memory in one PUT)",
    )
    s.add_argument(
        "--gguf-metadata",
        metavar="FILE",
        help="with --format gguf: copy every key-value (architecture, hyperparameters, tokenizer) "
        "of this GGUF, e.g. one from llama.cpp's convert_hf_to_gguf.py --vocab-only",
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
    s.add_argument("source", help="the checkpoint convert read: " + _PATH_HELP)
    s.add_argument("dest", help="the output of convert: a directory or an object-store URL")
    s.add_argument("--plan", help="plan file (default: the one convert saved in DEST)")
    s.add_argument(
        "--like",
        help="the target checkpoint convert was given; needed when the plan keeps some of its "
        "own values (--partial)",
    )
    s.add_argument(
        "--format",
        help="the output format convert wrote (default: detected from DEST's files)",
    )
    _remote_options(s)
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser(
        "diff",
        help="compare two checkpoints tensor by tensor (names, shapes, dtypes, values); "
        "exit 0 when equal, 1 when not",
        description="Compare two checkpoints tensor by tensor, streaming (one tensor of each at "
        "a time): names only in A or only in B, shape and dtype mismatches, and values that "
        "differ beyond the tolerance. Floats are equal where |a - b| <= atol + rtol * |b| (NaN "
        "equals NaN); integers and bools exactly. Exit 0 when equal, 1 when not, 2 on an error.",
    )
    s.add_argument("a", help="checkpoint A: " + _PATH_HELP)
    s.add_argument("b", help="checkpoint B (the reference for --rtol), as for A")
    s.add_argument(
        "--rtol", type=_tolerance, default=0.0, help="relative tolerance, of |b| (default 0: exact)"
    )
    s.add_argument("--atol", type=_tolerance, default=0.0, help="absolute tolerance (default 0)")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    _source_options(s)
    s.set_defaults(func=cmd_diff)

    s = sub.add_parser("demo", help="build a small checkpoint, convert it, verify it")
    s.add_argument(
        "--dir", help="work directory, kept (default: a temporary one, removed at the end)"
    )
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (2: an error, 130: interrupted)."""
    # Conversions do no linear algebra, but OpenBLAS's idle threads spin beside the transpose
    # and checksum threads on every core: one thread measured 8% faster (scripts/bench_stream.py
    # pairs). Set before numpy is first imported; a value the user set is kept.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        args = build_parser().parse_args(argv)
        code: int = _run(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except WeightbridgeError as e:
        print(f"weightbridge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = "; rerun the same command to resume" if _is_convert(argv) else ""
        print(f"weightbridge: interrupted{resume}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`inspect --json | head`): end quietly with the status a Unix
        # tool killed by SIGPIPE has. Python would flush stdout again at exit and complain.
        _quiet_stdout()
        return 128 + signal.SIGPIPE


def _run(args: argparse.Namespace) -> int:
    """Run the command, its --endpoint/--aws-region applying to every object URL it reads."""
    endpoint, region = getattr(args, "endpoint", None), getattr(args, "aws_region", None)
    if not (endpoint or region):
        result: int = args.func(args)
        return result
    from weightbridge.io import remote_options

    with remote_options(endpoint=endpoint, aws_region=region):
        result = args.func(args)
    return result


def _is_convert(argv: Sequence[str] | None) -> bool:
    return "convert" in (sys.argv[1:] if argv is None else argv)


def _quiet_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
