"""The Python API: inspect, plan, convert and verify checkpoints.

Sources and targets may be given as a checkpoint path, a target spec JSON file, a
`CheckpointSpec`, a dict of arrays, or (when that framework is installed and already imported)
a torch module/state dict or a jax pytree. Only specs are taken from targets.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from weightbridge import dtypes
from weightbridge import io as wio
from weightbridge._tree import flatten
from weightbridge.errors import PlanError, SpecError
from weightbridge.io._files import atomic_write_json
from weightbridge.io.base import UnionReader
from weightbridge.plan import Plan
from weightbridge.planning.match import Matcher as AutoMatcher
from weightbridge.planning.planner import MINE, Matcher, Rename, make_plan
from weightbridge.spec import CheckpointSpec, TensorSpec, load_spec_file
from weightbridge.streaming.convert import DEFAULT_MAX_SHARD_SIZE, ConversionReport
from weightbridge.streaming.convert import convert as _stream_convert
from weightbridge.streaming.convert import verify as _stream_verify
from weightbridge.streaming.dest import Destination, destination_for

PLAN_FILE = ".weightbridge-plan.json"


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
        return CheckpointSpec.of(_leaf_spec(k, v) for k, v in flatten(obj).items())
    raise SpecError(
        f"cannot take specs from a {type(obj).__name__}; pass a checkpoint path, a spec JSON "
        "file, a dict of arrays, a torch module/state dict or a jax pytree"
    )


def _leaf_spec(name: str, leaf: Any) -> TensorSpec:
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
        return TensorSpec(name, tuple(leaf.shape), dtypes.from_numpy(np.dtype(leaf.dtype)))
    raise SpecError(f"leaf {name!r} is a {type(leaf).__name__}, not an array or shape/dtype struct")


def inspect(path: str | os.PathLike[str]) -> CheckpointSpec:
    """Specs of a checkpoint, from its headers alone.

    >>> import tempfile, numpy as np
    >>> from weightbridge.io import write_checkpoint
    >>> p = tempfile.mkdtemp() + "/m.safetensors"
    >>> write_checkpoint(p, {"w": np.zeros((2, 3), np.float32)})
    >>> inspect(p)["w"]
    TensorSpec(name='w', shape=(2, 3), dtype='F32')
    """
    return spec_of(path)


def plan(
    source: Any,
    target: Any = None,
    *,
    renames: Sequence[Rename | str] = (),
    rules: Mapping[str, Any] | None = None,
    from_framework: str | None = None,
    to_framework: str | None = None,
    dtype: str | None = None,
    hints: Sequence[tuple[str, str]] = (),
    partial: bool = False,
    slice_mismatched: bool = False,
    matcher: Matcher | None = None,
    log: list[str] | None = None,
) -> Plan:
    """Plan a conversion from specs alone (no tensor data is read). See `planner.make_plan`.

    With a target, explicit `rules` (``{target_regex: Transform}``) run first; tensors they and
    the renames leave are paired by the automatic matcher (`weightbridge.planning.match`), which
    `hints` (target substring, source substring) steer. `partial` loads what fits and keeps
    the target's own values elsewhere; `slice_mismatched` also copies the overlapping block of
    same-named tensors whose shapes differ (a 1000-class head into 10 classes). `log`, when
    given, receives the matcher's notes: what it decided, and why.
    """
    if matcher is None and target is not None:
        matcher = AutoMatcher(
            from_framework,
            to_framework,
            tuple(hints),
            partial=partial,
            slice_mismatched=slice_mismatched,
        )
    return make_plan(
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
    )


_plan = plan  # `convert` has an argument called plan


def _rules(renames: Sequence[Rename | str]) -> list[Rename]:
    return [r if isinstance(r, Rename) else Rename.parse(r) for r in renames]


def convert(
    source: str | os.PathLike[str],
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
    **planning: Any,
) -> ConversionReport:
    """Plan (unless a plan is given) and stream `source` into the directory `dest`.

    `planning` takes the keyword arguments of `plan` (renames, rules, from_framework, hints,
    partial, ...). The plan is saved in `dest` as ``.weightbridge-plan.json`` so `verify` can
    recheck it. When the plan keeps some of the target's own values (partial loading), `target`
    must be a checkpoint with data, which is read for them. `dest` may be an object-store URL
    (``s3://bucket/prefix``; `dest_options` takes ``endpoint``, ``aws_region``, ``step``).
    `keep_cache` leaves the source in the page cache (by default each source tensor leaves it
    after its last use).
    """
    source = os.fspath(source)
    with wio.open_reader(source) as reader:
        if plan is None:
            the_plan = _plan(reader.specs(), target, **planning)
        else:
            the_plan = plan if isinstance(plan, Plan) else Plan.load(plan)
            if target is not None:
                the_plan.validate(_union_spec(reader, the_plan, target), target=spec_of(target))
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
            )
    if all(op.kind != "apply" for s in the_plan.steps for op in s.ops):
        out = destination_for(dest, format=format, **(dest_options or {}))
        out.write_json(PLAN_FILE, the_plan.to_json())
    return report


def _needs_target_values(plan: Plan) -> bool:
    return any(s.startswith(MINE) for step in plan.steps for s in step.sources)


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
        raise SpecError(
            f"the plan keeps the target's own values for {len(kept)} tensor(s) (e.g. {kept[0]!r}), "
            "so the target must be a checkpoint with data (--like model.safetensors), not a spec"
        )
    with wio.open_reader(target) as mine:
        yield UnionReader({MINE: mine, "": reader})


def verify(
    source: str | os.PathLike[str],
    dest: str | os.PathLike[str] | Destination,
    plan: Plan | str | os.PathLike[str] | None = None,
    target: Any = None,
    *,
    format: str | None = None,
    dest_options: dict[str, Any] | None = None,
) -> int:
    """Recompute every output tensor from the source and compare; returns how many were checked."""
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
