"""Block-scaled FP8 weights in a plan: found from specs, planned as if dequantized, read in pairs.

DeepSeek-V3/R1 checkpoints store each quantized linear weight ``X.weight`` in float8 (e4m3)
beside ``X.weight_scale_inv``: one float32 scale per 128x128 block. With ``dequantize``, the
planner plans against a *view* of the source in which each such weight is already a float
tensor (of the ``dtype`` asked for, bf16 by default) and its scales are gone, so renames,
layouts and the matcher work as for any bf16 checkpoint; then each step that reads such a
weight reads its scales too and starts with a `Dequantize` op. The plan stays a list of steps
over the real source, which a saved plan replays.

Without ``dequantize``, a plan that casts such a weight (to a bf16 target, or with ``--dtype``)
is refused: a cast drops the scales, and every value would be wrong by its block's factor.
Copying the fp8 weights and their scales as they are stays allowed.

Not handled, and refused by name: casting fp8 weights with scales of another layout (per-tensor
or per-channel ``weight_scale``, as compressed-tensors and ModelOpt write), scales whose shape
does not match 128x128 blocks, and scaled weights that a step concatenates or stacks.
"""

from __future__ import annotations

from collections.abc import Sequence

from weightbridge import _blockscale
from weightbridge.errors import PlanError
from weightbridge.ops import Cast, Dequantize, Op
from weightbridge.plan import Note, Plan, Step
from weightbridge.spec import CheckpointSpec, TensorSpec

# A weight's block scales are the tensor of its name plus this suffix (DeepSeek-V3).
SCALE_SUFFIX = "_scale_inv"
# Scales of another layout beside an fp8 weight: compressed-tensors and ModelOpt checkpoints
# keep per-tensor or per-channel scales in ``<weight>_scale``.
OTHER_SUFFIX = "_scale"
FP8 = frozenset({"F8_E4M3", "F8_E5M2"})
_SCALE_DTYPES = frozenset({"F32", "BF16", "F16"})
# What a dequantized weight becomes without --dtype: the dtype DeepSeek's own
# fp8_cast_bf16.py writes, and the one the rest of such a checkpoint is stored in.
DEFAULT_DTYPE = "BF16"
# How many names an error lists before "and N more".
_SHOWN = 5


def scaled_weights(source: CheckpointSpec) -> dict[str, str]:
    """The block-scaled weights of `source`: weight name -> its scales' name.

    A weight qualifies when it is fp8 and a tensor named ``<weight>_scale_inv`` exists; their
    shapes are checked by `check_scaled`, not here.

    >>> spec = CheckpointSpec.of([TensorSpec("w", (256, 128), "F8_E4M3"),
    ...                           TensorSpec("w_scale_inv", (2, 1), "F32")])
    >>> scaled_weights(spec)
    {'w': 'w_scale_inv'}
    """
    return {
        t.name[: -len(SCALE_SUFFIX)]: t.name
        for t in source
        if t.name.endswith(SCALE_SUFFIX)
        and t.name[: -len(SCALE_SUFFIX)] in source
        and source[t.name[: -len(SCALE_SUFFIX)]].dtype in FP8
    }


def other_scaled(source: CheckpointSpec, pairs: dict[str, str]) -> dict[str, str]:
    """fp8 weights with scales of another layout: weight name -> its ``<weight>_scale``.

    compressed-tensors and ModelOpt store per-tensor or per-channel scales there, which are
    not multiplied by blocks; a cast of such a weight is refused like that of a block-scaled
    one, and `dequantize` does not handle it.
    """
    return {
        t.name: t.name + OTHER_SUFFIX
        for t in source
        if t.dtype in FP8 and t.name not in pairs and t.name + OTHER_SUFFIX in source
    }


def check_scaled(source: CheckpointSpec, pairs: dict[str, str], others: dict[str, str]) -> None:
    """Refuse scaled weights this module cannot dequantize, naming each.

    Raises:
        PlanError: a weight that is not 2-D, block scales of the wrong shape or dtype, or
            scales of another layout (`other_scaled`).
    """
    problems = [
        f"{wname} has scales in {sname}, a per-tensor or per-channel layout "
        "(compressed-tensors, ModelOpt); only DeepSeek-style block scales "
        f"(<weight>{SCALE_SUFFIX}) are dequantized"
        for wname, sname in others.items()
    ]
    block = _blockscale.DEFAULT_BLOCK
    for wname, sname in pairs.items():
        w, s = source[wname], source[sname]
        if len(w.shape) != 2:
            problems.append(
                f"{wname} {w.shape}: block scales need a 2-D weight, this one is {len(w.shape)}-D"
            )
            continue
        want = _blockscale.scale_shape(w.shape, block)
        if s.shape != want:
            problems.append(
                f"{sname} {s.shape}: a weight of shape {w.shape} in {block[0]}x{block[1]} blocks "
                f"has scales of shape {want}"
            )
        elif s.dtype not in _SCALE_DTYPES:
            problems.append(f"{sname} is {s.dtype}; block scales are F32 (or BF16/F16)")
    if problems:
        raise PlanError(_listed("cannot dequantize", problems))


def dequantized_view(source: CheckpointSpec, pairs: dict[str, str], dtype: str) -> CheckpointSpec:
    """`source` as the planner should see it: scaled weights as `dtype`, scales gone."""
    scales = set(pairs.values())
    return CheckpointSpec.of(
        (TensorSpec(t.name, t.shape, dtype) if t.name in pairs else t)
        for t in source
        if t.name not in scales
    )


def with_dequantize(plan: Plan, source: CheckpointSpec, pairs: dict[str, str]) -> Plan:
    """The plan made against `dequantized_view`, rewritten to read the real `source` (plus the
    target's own values as ``mine:<name>`` when the plan keeps some).

    Each step that reads a scaled weight reads its scales too, and its ops become
    ``dequantize`` then the structural ops it had, then one cast to the step's dtype (none
    for float32).

    Raises:
        PlanError: a step combines a scaled weight with other sources (concat, stack).
    """
    steps: list[Step] = []
    combined: list[str] = []
    read: set[str] = set()
    for step in plan.steps:
        scaled = [s for s in step.sources if s in pairs]
        if not scaled:
            steps.append(step)
            continue
        if len(step.sources) > 1:
            combined.append(f"{step.target.name} <- {list(step.sources)}")
            continue
        (wname,) = scaled
        read.add(wname)
        ops: list[Op] = [Dequantize(), *(op for op in step.ops if not isinstance(op, Cast))]
        if step.target.dtype != "F32":
            ops.append(Cast(step.target.dtype))
        steps.append(Step(step.target, (wname, pairs[wname]), tuple(ops)))
    if combined:
        raise PlanError(
            _listed(
                "block-scaled weights cannot be dequantized inside a concat or stack yet; "
                "dequantize to a checkpoint first (weightbridge convert SRC OUT --dequantize), "
                "then convert that",
                combined,
            )
        )
    unused = dict(plan.unused)
    for wname, sname in pairs.items():
        if wname not in read:
            unused[sname] = f"scales of {wname}, which is not used"
    return Plan.build(source, steps, unused=unused, notes=plan.notes)


def refuse_scaled_casts(
    plan: Plan, source: CheckpointSpec, pairs: dict[str, str], others: dict[str, str]
) -> None:
    """Refuse a plan that casts a scaled fp8 weight without its scales.

    `pairs` are block-scaled weights left as they are (no ``dequantize``), `others` weights with
    scales of another layout.

    Raises:
        PlanError: naming the weights, their scales, the dtype asked for, and what to do.
    """
    problems = []
    for step in plan.steps:
        for name in step.sources:
            scales = pairs.get(name) or others.get(name)
            if scales is None or step.target.dtype == source[name].dtype:
                continue
            cast = f"{name} ({source[name].dtype} -> {step.target.dtype})"
            if name in pairs:
                problems.append(
                    f"{cast} is block-scaled (scales in {scales}): pass --dequantize "
                    "(dequantize=True) to multiply by the scales first"
                )
            else:
                problems.append(
                    f"{cast} has scales in {scales}, a per-tensor or per-channel layout "
                    "(compressed-tensors, ModelOpt) that --dequantize does not handle"
                )
    if problems:
        raise PlanError(
            _listed(
                "fp8 weights would be cast without their scales, which leaves every value off "
                "by its scale factor",
                problems,
            )
        )


def refuse_float_target(target: CheckpointSpec, pairs: dict[str, str]) -> None:
    """Refuse, before matching, a target with no fp8 tensor for a source with block-scaled ones.

    Such a target can only take the weights cast without their scales (or leave the scales
    unmatched, which the matcher would report without saying why); dequantizing is the fix.

    Raises:
        PlanError: naming a scaled weight, its scales, and ``--dequantize``.
    """
    if any(t.dtype in FP8 for t in target) or not pairs:
        return
    wname, sname = next(iter(pairs.items()))
    raise PlanError(
        f"the source has {len(pairs)} block-scaled FP8 weight(s) (e.g. {wname}, scales in "
        f"{sname}), and the target has no fp8 tensor to hold them as "
        "they are: pass --dequantize (dequantize=True) to multiply them by their scales into "
        "the target's dtypes"
    )


def no_scaled_note() -> Note:
    """The note of a plan asked to dequantize a source without block-scaled weights."""
    return Note(
        "info",
        "--dequantize: the source has no block-scaled weights (an fp8 <name> with "
        f"<name>{SCALE_SUFFIX}); nothing was dequantized",
    )


def _listed(head: str, items: Sequence[str]) -> str:
    shown = "\n  ".join(items[:_SHOWN])
    more = f"\n  ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return f"{head}:\n  {shown}{more}"
