"""The Python API: inspect, plan, convert, verify and diff checkpoints.

Sources and targets may be given as a checkpoint path, a target spec JSON file, a
`CheckpointSpec`, a dict of arrays, or (when that framework is installed and already imported)
a torch module/state dict or a jax pytree. Only specs are taken from targets.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from weightbridge import io as wio
from weightbridge._files import atomic_write_json
from weightbridge.compare import DiffReport as DiffReport
from weightbridge.compare import diff as diff
from weightbridge.errors import FormatError, PlanError, SpecError
from weightbridge.plan import Plan
from weightbridge.spec import CheckpointSpec, TensorSpec, load_spec_file
from weightbridge.streaming.convert import DEFAULT_MAX_SHARD_SIZE, ConversionReport
from weightbridge.streaming.convert import convert as _stream_convert
from weightbridge.streaming.convert import verify as _stream_verify
from weightbridge.streaming.dest import Destination, destination_for

if TYPE_CHECKING:
    from weightbridge.planning.planner import Matcher, Rename
    from weightbridge.streaming.batch import BatchReport

# The prefix of the target's own tensors in a partial plan (`weightbridge.planning.planner.MINE`,
# spelled here so that inspecting a checkpoint does not import the planner; a test checks both).
MINE = "mine:"

PLAN_FILE = ".weightbridge-plan.json"

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _object_store_options(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run `fn` with its ``endpoint=`` and ``aws_region=`` applying to every object URL it reads
    (sources, targets), through `weightbridge.io.remote_options`."""

    @functools.wraps(fn)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        endpoint, region = kwargs.get("endpoint"), kwargs.get("aws_region")
        with wio.remote_options(
            endpoint=endpoint if isinstance(endpoint, str) else None,
            aws_region=region if isinstance(region, str) else None,
        ):
            return fn(*args, **kwargs)

    return run


def _dest_options_with(
    dest_options: dict[str, Any] | None, endpoint: str | None, aws_region: str | None
) -> dict[str, Any] | None:
    """`dest_options`, with the sources' `endpoint` and `aws_region` where it sets none.

    >>> _dest_options_with({"step": 3}, "http://127.0.0.1:9000", None)
    {'endpoint': 'http://127.0.0.1:9000', 'step': 3}
    """
    given = {"endpoint": endpoint, "aws_region": aws_region}
    if not any(given.values()):
        return dest_options
    return {**{k: v for k, v in given.items() if v}, **(dest_options or {})}


def spec_of(obj: Any) -> CheckpointSpec:
    """Specs of anything weightbridge accepts as a source or a target (never reads tensor data)."""
    if isinstance(obj, CheckpointSpec):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        path = os.fspath(obj)
        if path.endswith(".json") and not path.endswith(".index.json") and os.path.isfile(path):
            return load_spec_file(path)
        with wio.open_reader(path) as r:
            spec: CheckpointSpec = r.specs()
            return spec
    from weightbridge.frameworks import framework_of

    fw = framework_of(obj)
    if fw == "torch":
        from weightbridge.frameworks.torch import spec_from_torch

        return spec_from_torch(obj)
    if fw == "jax":
        from weightbridge.frameworks.jax import spec_from_pytree

        return spec_from_pytree(obj)
    if isinstance(obj, Mapping):
        from weightbridge._tree import flatten

        return CheckpointSpec.of(_leaf_spec(k, v) for k, v in flatten(obj).items())
    raise SpecError(
        f"cannot take specs from a {type(obj).__name__}; pass a checkpoint path, a spec JSON "
        "file, a dict of arrays, a torch module/state dict or a jax pytree"
    )


def _leaf_spec(name: str, leaf: Any) -> TensorSpec:
    import numpy as np

    from weightbridge import dtypes

    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
        return TensorSpec(name, tuple(leaf.shape), dtypes.from_numpy(np.dtype(leaf.dtype)))
    raise SpecError(f"leaf {name!r} is a {type(leaf).__name__}, not an array or shape/dtype struct")


@_object_store_options
def inspect(
    path: str | os.PathLike[str], *, endpoint: str | None = None, aws_region: str | None = None
) -> CheckpointSpec:
    """Specs of a checkpoint, from its headers alone.

    `path` may be an object URL (``s3://bucket/ckpt/``, ``gs://``, ``https://``): only its
    headers are fetched, by ranged reads. `endpoint` (an S3-compatible server) and
    `aws_region` apply to every object URL read (default: from the environment).

    >>> import tempfile, numpy as np
    >>> from weightbridge.io import write_checkpoint
    >>> p = tempfile.mkdtemp() + "/m.safetensors"
    >>> write_checkpoint(p, {"w": np.zeros((2, 3), np.float32)})
    >>> inspect(p)["w"]
    TensorSpec(name='w', shape=(2, 3), dtype='F32')
    """
    return spec_of(path)


@_object_store_options
def plan(
    source: Any,
    target: Any = None,
    *,
    renames: Sequence[Rename | str] = (),
    rules: Mapping[str, Any] | None = None,
    rules_file: str | os.PathLike[str] | None = None,
    rules_params: Mapping[str, str | int] | None = None,
    from_framework: str | None = None,
    to_framework: str | None = None,
    dtype: str | None = None,
    hints: Sequence[tuple[str, str]] = (),
    partial: bool = False,
    slice_mismatched: bool = False,
    matcher: Matcher | None = None,
    log: list[str] | None = None,
    check: tuple[Any, Any, Any] | None = None,
    endpoint: str | None = None,
    aws_region: str | None = None,
    dequantize: bool = False,
) -> Plan:
    """Plan a conversion from specs alone (no tensor data is read). See `planner.make_plan`.

    With a target, explicit `rules` (``{target_regex: Transform}``) run first; tensors they and
    the renames leave are paired by the automatic matcher (`weightbridge.planning.match`), which
    `hints` (target substring, source substring) steer. `partial` loads what fits and keeps
    the target's own values elsewhere; `slice_mismatched` also copies the overlapping block of
    same-named tensors whose shapes differ (a 1000-class head into 10 classes). `log`, when
    given, receives the matcher's notes: what it decided, and why (and which weight file was
    read from a Hugging Face folder). `dtype` casts floating-point tensors; with a target it
    replaces the target's float dtypes (integer and bool tensors keep theirs). `endpoint` and
    `aws_region` apply to a source or target given as an object URL (see `inspect`).
    `dequantize` turns block-scaled FP8 weights (DeepSeek-V3's ``X.weight`` with
    ``X.weight_scale_inv``) into `dtype` (bf16 by default) tensors and drops the scales.

    `rules_file` is a rules file (JSON/YAML path) or the name of one shipped with weightbridge
    (``"llama_hf_to_gguf"``, see `weightbridge.planning.rulesfile`): its renames run before
    `renames`, its rules before `rules`. When it gives ops on source tensors (``source_ops``),
    `rules_params` are the numbers they need (``{"n_head": 32}``; else they are read from the
    source folder's ``config.json``), and without a `target` the target is what its renames
    and ops make of the source. `rules` without a target (and without such a file) are refused.

    `check=(their_apply, my_apply, inputs)` decides by running both models what metadata
    cannot (as in `adapt`): `source` must then hold weights (a dict of arrays, a module, a
    checkpoint path) and `target` the model's own tree; the hints execution chose are added,
    and `log` says which decisions were made that way.
    """
    from weightbridge.planning.match import Matcher as AutoMatcher

    outtype = _gguf_outtype(dtype)
    if outtype is not None:  # q8_0: no cast; the GGUF writer quantizes (`gguf.with_outtype`)
        dtype = None
    if rules_file is not None:
        from weightbridge.planning.rulesfile import planning_of

        config, config_path = _hf_config(source)
        given = planning_of(
            rules_file,
            spec_of(source),
            renames=_rules(renames),
            rules=rules,
            params=rules_params,
            target=None if target is None else spec_of(target),
            config=config,
            config_path=config_path,
        )
        renames, rules = given.renames, given.rules or None
        if target is None:
            target = given.target
    elif rules_params:
        raise PlanError(
            "rules_params (--rules-param) are the numbers a rules file needs: pass the rules "
            "file too (rules_file=NAME_OR_PATH, --rules)"
        )
    if check is not None:
        from weightbridge.adapt import hints_by_execution

        if target is None:
            raise PlanError("check= needs a target: the model whose outputs are compared")
        hints, lines = hints_by_execution(
            source,
            target,
            check,
            tuple(hints),
            partial=partial,
            slice_mismatched=slice_mismatched,
            rules=rules,
        )
        if log is not None:
            log += lines  # "decided by execution (N combination(s) run): ..."
    from weightbridge.planning.planner import make_plan

    if log is not None:
        log += weights_notes(source, target)
    if matcher is None and target is not None:
        matcher = AutoMatcher(
            from_framework,
            to_framework,
            tuple(hints),
            partial=partial,
            slice_mismatched=slice_mismatched,
        )
    made = make_plan(
        spec_of(source),
        None if target is None else spec_of(target),
        renames=_rules(renames),
        rules=rules,
        from_framework=from_framework,
        to_framework=to_framework,
        dtype=dtype,
        matcher=matcher,
        partial=partial,
        log=log,
        dequantize=dequantize,
    )
    if outtype is None:
        return made
    from weightbridge.io.gguf import with_outtype

    return with_outtype(made, outtype)


def _hf_config(source: Any) -> tuple[dict[str, Any] | None, str | None]:
    """A source folder's ``config.json`` (for a rules file's parameters) and its path, or
    (None, None) for a source that is not a local folder."""
    if not isinstance(source, (str, os.PathLike)):
        return None, None
    from weightbridge.planning.rulesfile import read_hf_config

    return read_hf_config(os.fspath(source))


def _gguf_outtype(dtype: str | None) -> str | None:
    """The GGUF quantization `dtype` names (``q8_0`` -> ``Q8_0``), else None."""
    from weightbridge.io.gguf import outtype_of

    return outtype_of(dtype)


def _gguf_options(
    format: str, dtype: str | None, gguf_metadata: str | os.PathLike[str] | None
) -> dict[str, str] | None:
    """The GGUF writer's options (`weightbridge.io.gguf.OPTION_OUTTYPE`, ...) for `convert`,
    checked before anything is written; None when there are none.

    Raises:
        SpecError: a GGUF quantization or `gguf_metadata` with another output format.
        FormatError: `gguf_metadata` is missing or not a GGUF file.
    """
    from weightbridge.io import gguf

    outtype = gguf.outtype_of(dtype)
    if format != "gguf" and (outtype is not None or gguf_metadata is not None):
        what = (
            f"dtype {dtype!r} (--dtype {dtype})" if outtype else "gguf_metadata (--gguf-metadata)"
        )
        raise SpecError(
            f"{what} is for GGUF output, and the output format is {format!r}: add format='gguf' "
            "(--format gguf)"
            + (", or cast to a float dtype such as bf16 for other formats" if outtype else "")
        )
    options: dict[str, str] = {}
    if outtype is not None:
        options[gguf.OPTION_OUTTYPE] = outtype
    if gguf_metadata is not None:
        path = os.path.abspath(os.fspath(gguf_metadata))  # workers may run elsewhere
        try:
            gguf.key_values_of(path)
        except FormatError as e:
            raise FormatError(f"--gguf-metadata: {e}") from e
        options[gguf.OPTION_KEY_VALUES] = path
    return options or None


_plan = plan  # `convert` has an argument called plan


def weights_notes(*objs: Any) -> list[str]:
    """Which weight file is read from each Hugging Face folder among `objs` (one line each;
    none for a folder whose only files are its weights)."""
    from weightbridge.io.hf_folder import choose_weights

    notes = []
    for obj in objs:
        if isinstance(obj, (str, os.PathLike)) and os.path.isdir(obj):
            choice = choose_weights(os.fspath(obj))
            if choice is not None and (choice.others or choice.extra):
                notes.append(choice.describe())
    return notes


def _rules(renames: Sequence[Rename | str]) -> list[Rename]:
    from weightbridge.planning.planner import Rename

    return [r if isinstance(r, Rename) else Rename.parse(r) for r in renames]


@overload
def convert(
    source: str | os.PathLike[str],
    dest: str | os.PathLike[str] | Destination,
    **options: Any,
) -> ConversionReport: ...


@overload
def convert(
    source: Sequence[str | os.PathLike[str]],
    dest: str | os.PathLike[str] | Destination,
    **options: Any,
) -> BatchReport: ...


@_object_store_options
def convert(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    dest: str | os.PathLike[str] | Destination,
    *,
    target: Any = None,
    plan: Plan | str | os.PathLike[str] | None = None,
    format: str = "safetensors",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    progress: bool = False,
    dest_options: dict[str, Any] | None = None,
    keep_cache: bool = False,
    executor: object = None,
    retries: int | None = None,
    partition: tuple[int, int] | None = None,
    endpoint: str | None = None,
    aws_region: str | None = None,
    gguf_metadata: str | os.PathLike[str] | None = None,
    **planning: Any,
) -> ConversionReport | BatchReport:
    """Plan (unless a plan is given) and stream `source` into the directory `dest`.

    `planning` takes the keyword arguments of `plan` (renames, rules, from_framework, hints,
    partial, dtype, ...). The plan is saved in `dest` as ``.weightbridge-plan.json`` so `verify`
    can recheck it. When the plan keeps some of the target's own values (partial loading),
    `target` must be a checkpoint with data, which is read for them. `dest` may be an
    object-store URL (``s3://bucket/prefix``; `dest_options` takes ``endpoint``, ``aws_region``,
    ``step``). `keep_cache` leaves the source in the page cache (by default each source tensor
    leaves it after its last use).

    A list of sources is a batch: `dest` is then a directory with one output per source, named
    after its base name (``ckpts/step_1000`` -> ``dest/step_1000/``); sources with the same specs
    share one plan; a rerun resumes the whole batch; a `BatchReport` is returned.

    `executor` runs the output shards as tasks: None or ``"threads"`` (this process),
    ``"processes"``/``"processes:N"``, a `concurrent.futures.Executor`, a
    `dask.distributed.Client`, ``"dask://HOST:PORT"`` or ``"dask"`` (``$DASK_SCHEDULER_ADDRESS``;
    needs ``pip install 'weightbridge[dask]'``); `retries` is per task (Dask). `partition=(I, N)`
    converts only the I-th of N byte-balanced shares of the shards, so N runs (SLURM/Kubernetes
    array jobs) can write into one `dest` at once; a plain run afterwards writes the indexes.

    The source may be an object URL (``s3://bucket/ckpt/``): its headers are fetched for
    planning, then each tensor's byte range once. `endpoint` and `aws_region` apply to it (and
    to `dest` where `dest_options` sets none). With other executors, each worker reads its own
    tensors' byte ranges from the same endpoint.

    GGUF output (``format="gguf"``): ``dtype="q8_0"`` (or ``"q4_0"``) quantizes the tensors
    llama.cpp's ``--outtype q8_0`` quantizes and keeps 1-D tensors and norms in F32 (the plan
    says which); `gguf_metadata` names a GGUF whose key-values (architecture, tokenizer, ...)
    are copied into the output; several shards are a llama.cpp split set
    (``model-00001-of-00003.gguf``, ``split.*`` keys, key-values in the first file).
    """
    dest_options = _dest_options_with(dest_options, endpoint, aws_region)
    writer_options = _gguf_options(format, planning.get("dtype"), gguf_metadata)
    if not isinstance(source, (str, os.PathLike)):
        return _convert_batch(
            list(source),
            dest,
            target=target,
            plan=plan,
            format=format,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            progress=progress,
            dest_options=dest_options,
            keep_cache=keep_cache,
            executor=executor,
            retries=retries,
            partition=partition,
            planning=planning,
            metadata=writer_options,
        )
    source = os.fspath(source)
    with wio.open_reader(source) as reader:
        if plan is None:
            the_plan = _plan(reader.specs(), target, **_with_config_params(planning, source))
        else:
            the_plan = plan if isinstance(plan, Plan) else Plan.load(plan)
            if target is not None:
                the_plan.validate(
                    _union_spec(reader, the_plan, target),
                    target=target_spec_with_dtype(target, planning.get("dtype")),
                )
        if format == "gguf":
            from weightbridge.io import gguf

            outtype = _gguf_outtype(planning.get("dtype"))
            if outtype is not None:  # a given plan too (idempotent)
                the_plan = gguf.with_outtype(the_plan, outtype)
            # A split set's files say how many tensors the set holds.
            writer_options = {
                **(writer_options or {}),
                gguf.OPTION_TENSORS: str(len(the_plan.steps)),
            }
        with _with_target_values(reader, the_plan, target) as full:
            report = _stream_convert(
                the_plan,
                full,
                dest,
                format=format,
                max_shard_size=max_shard_size,
                overwrite=overwrite,
                progress=progress,
                dest_options=dest_options,
                keep_cache=keep_cache,
                executor=executor,
                retries=retries,
                partition=partition,
                metadata=writer_options,
            )
    _save_plan(the_plan, dest, format, dest_options)
    return report


def _with_config_params(planning: dict[str, Any], source: str) -> dict[str, Any]:
    """`planning` with its rules file's parameters resolved against the `source` folder's
    ``config.json``, for a `plan` that is given the source's specs, not its path."""
    rules_file = planning.get("rules_file")
    if rules_file is None:
        return planning
    from weightbridge.planning.rulesfile import has_source_ops, resolve_params

    if not has_source_ops(rules_file):
        return planning
    config, config_path = _hf_config(source)
    params = resolve_params(rules_file, planning.get("rules_params") or {}, config, config_path)
    return {**planning, "rules_params": params}


def _save_plan(
    plan: Plan,
    dest: str | os.PathLike[str] | Destination,
    format: str,
    dest_options: dict[str, Any] | None,
) -> None:
    """Save `plan` in its output for `verify` (a plan with Python `apply` ops cannot be saved)."""
    if all(op.kind != "apply" for s in plan.steps for op in s.ops):
        out = destination_for(dest, format=format, **(dest_options or {}))
        out.write_json(PLAN_FILE, plan.to_json())


def _convert_batch(
    sources: list[str | os.PathLike[str]],
    dest: str | os.PathLike[str] | Destination,
    *,
    target: Any,
    plan: Plan | str | os.PathLike[str] | None,
    dest_options: dict[str, Any] | None,
    format: str,
    planning: dict[str, Any],
    **options: Any,
) -> BatchReport:
    """`convert` for a list of sources (see there): one plan per distinct specs."""
    from weightbridge.streaming.batch import convert_batch

    if not isinstance(dest, (str, os.PathLike)):
        raise SpecError("a batch's dest must be a directory path or an object-store URL")
    rules_file = planning.get("rules_file")
    if plan is None and rules_file is not None:
        from weightbridge.errors import RuleError
        from weightbridge.planning.rulesfile import has_source_ops

        if has_source_ops(rules_file) or planning.get("rules_params"):
            raise RuleError(
                f"rules file {os.fspath(rules_file)} (--rules): its ops depend on each source's "
                "shapes and parameters; convert one source at a time"
            )

    def plan_for(specs: CheckpointSpec) -> Plan:
        if plan is None:
            return _plan(specs, target, **planning)
        p = plan if isinstance(plan, Plan) else Plan.load(plan)
        p.validate(specs)
        return p

    def checked_plan_for(specs: CheckpointSpec) -> Plan:
        p = plan_for(specs)
        if keeps_target_values(p):
            raise PlanError(
                "a batch cannot keep the target's own values (partial loading): convert those "
                "checkpoints one at a time with target="
            )
        return p

    report = convert_batch(
        sources,
        dest,
        plan_for=checked_plan_for,
        format=format,
        dest_options=dest_options,
        **options,
    )
    for name, p in report.plans.items():
        _save_plan(p, f"{os.fspath(dest).rstrip('/')}/{name}", format, dest_options)
    return report


def keeps_target_values(plan: Plan) -> bool:
    """Whether `plan` keeps some of the target's own values (partial loading), so that
    `convert` and `verify` need the target checkpoint (``target=``, ``--like``) to read them."""
    return any(s.startswith(MINE) for step in plan.steps for s in step.sources)


_needs_target_values = keeps_target_values


def target_spec_with_dtype(target: Any, dtype: str | None) -> CheckpointSpec:
    """The specs a plan made with `dtype` produces for `target`: `dtype` replaces the target's
    floating-point dtypes; integer and bool tensors keep theirs (the rule of ``--dtype``).

    >>> t = CheckpointSpec.of([TensorSpec("w", (2,), "F32"), TensorSpec("n", (), "I64")])
    >>> [s.dtype for s in target_spec_with_dtype(t, "bf16")]
    ['BF16', 'I64']
    """
    from weightbridge import dtypes
    from weightbridge.planning.planner import _FLOATS

    spec = spec_of(target)
    if dtype is None or _gguf_outtype(dtype) is not None:  # q8_0 casts nothing in the plan
        return spec
    cast_to = dtypes.canonical(dtype)
    return CheckpointSpec.of(
        TensorSpec(t.name, t.shape, cast_to) if t.dtype in _FLOATS else t for t in spec
    )


def _union_spec(reader: Any, plan: Plan, target: Any) -> CheckpointSpec:
    if not _needs_target_values(plan):
        spec: CheckpointSpec = reader.specs()
        return spec
    tspec = spec_of(target)
    return CheckpointSpec.of(
        [*reader.specs(), *(TensorSpec(MINE + t.name, t.shape, t.dtype) for t in tspec)]
    )


@contextlib.contextmanager
def _with_target_values(reader: Any, plan: Plan, target: Any) -> Iterator[Any]:
    if not _needs_target_values(plan):
        yield reader
        return
    if not isinstance(target, (str, os.PathLike)) or os.fspath(target).endswith(".json"):
        kept = [s.target.name for s in plan.steps if s.sources[0].startswith(MINE)]
        given = (
            "no target was given"
            if target is None
            else f"the target given is {_what(target)}, which holds no values"
        )
        raise SpecError(
            f"the plan keeps the target's own values for {len(kept)} tensor(s) (e.g. {kept[0]!r}) "
            f"and {given}: pass the target checkpoint with data they come from (command line: "
            "--like model.safetensors; Python: target='model.safetensors', to both convert and "
            "verify)"
        )
    from weightbridge.io.base import UnionReader

    with wio.open_reader(target) as mine:
        yield UnionReader({MINE: mine, "": reader})


def _what(target: Any) -> str:
    if isinstance(target, (str, os.PathLike)):
        return f"the spec file {os.fspath(target)!r}"
    return f"a {type(target).__name__}"


@_object_store_options
def verify(
    source: str | os.PathLike[str],
    dest: str | os.PathLike[str] | Destination,
    *,
    plan: Plan | str | os.PathLike[str] | None = None,
    target: Any = None,
    format: str | None = None,
    dest_options: dict[str, Any] | None = None,
    endpoint: str | None = None,
    aws_region: str | None = None,
) -> int:
    """Recompute every output tensor from the source and compare; returns how many were checked.

    `plan` defaults to the one `convert` saved in `dest`. When it keeps some of the target's own
    values (partial loading), pass the same `target` checkpoint `convert` was given: they are
    compared too (``weightbridge verify SRC DEST --like TARGET``). `endpoint` and `aws_region`
    apply to object URLs, as in `convert`.
    """
    dest_options = _dest_options_with(dest_options, endpoint, aws_region)
    if plan is None:
        out = destination_for(dest, format=format, **(dest_options or {}))
        saved = out.read_json(PLAN_FILE)
        if saved is None:
            raise PlanError(f"{out.url}: has no {PLAN_FILE}; pass the plan (--plan FILE)")
        the_plan = Plan.from_json(saved, where=f"{out.url}/{PLAN_FILE}")
    else:
        the_plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    with (
        wio.open_reader(os.fspath(source)) as reader,
        _with_target_values(reader, the_plan, target) as full,
    ):
        return _stream_verify(
            the_plan, full, destination_for(dest, format=format, **(dest_options or {}))
        )


def save_spec(obj: Any, path: str | os.PathLike[str]) -> CheckpointSpec:
    """Write the target spec file of anything `spec_of` accepts (atomically)."""
    spec = spec_of(obj)
    atomic_write_json(path, spec.to_json())
    return spec
