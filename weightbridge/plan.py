"""The plan: for each target tensor, its source tensor(s) and the ops that make it.

A plan is a value. It is computed from specs alone, validated whole against both sides, saved as
JSON a person can read, edit and diff, and reused for every checkpoint with the same specs (all
steps of a training run). It carries the fingerprints of the source and target specs it was
made for, so a stale plan is refused instead of applied to the wrong checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from weightbridge._files import atomic_write_json
from weightbridge.errors import DtypeError, PlanError, SpecError
from weightbridge.ops import Cast, Dequantize, Op, describe, infer, op_from_json
from weightbridge.spec import CheckpointSpec, TensorSpec, parse_json

PLAN_VERSION = 1

# Buffers that carry no learned weights: dropped from a source, kept at their own value in a
# target (torch refills a missing num_batches_tracked itself). The rule lives with the plan,
# since `Plan.validate` lets a target buffer go without a step; the planner applies it too.
_BUFFERS = re.compile(
    r"(^|[./])(num_batches_tracked|position_ids|attn_mask|relative_position_index)$"
)


def is_buffer(name: str) -> bool:
    """True for buffers such as ``num_batches_tracked`` that a conversion need not carry over."""
    # endswith first: it is C-fast, and rules out almost every name before the regex runs
    return name.endswith(_BUFFER_NAMES) and bool(_BUFFERS.search(name))


_BUFFER_NAMES = ("num_batches_tracked", "position_ids", "attn_mask", "relative_position_index")


@dataclass(frozen=True, slots=True)
class Step:
    """Make `target` from `sources` by applying `ops` in order."""

    target: TensorSpec
    sources: tuple[str, ...]
    ops: tuple[Op, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target.name,
            "shape": list(self.target.shape),
            "dtype": self.target.dtype,
            "sources": list(self.sources),
            "ops": [op.to_json() for op in self.ops],
        }

    @classmethod
    def from_json(cls, obj: Any, *, where: str) -> Step:
        if not isinstance(obj, dict):
            raise PlanError(f"{where}: a step must be an object, found {reprlib.repr(obj)}")
        try:
            target = TensorSpec(str(obj["target"]), tuple(obj["shape"]), str(obj["dtype"]))
            sources = obj["sources"]
            ops = obj.get("ops", [])
        except (KeyError, TypeError, ValueError, DtypeError, SpecError) as e:
            raise PlanError(
                f"{where}: step {reprlib.repr(obj)} lacks or has a bad target/shape/dtype/sources "
                f"({e})"
            ) from e
        if (
            not isinstance(sources, list)
            or not sources
            or not all(isinstance(s, str) for s in sources)
        ):
            raise PlanError(
                f"{where}: step {target.name!r}: sources must be a non-empty list of names"
            )
        if not isinstance(ops, list):
            raise PlanError(f"{where}: step {target.name!r}: ops must be a list")
        where = f"{where}: step {target.name!r}"
        try:
            return cls(target, tuple(sources), tuple(op_from_json(o, where=where) for o in ops))
        except DtypeError as e:  # a cast to a dtype weightbridge does not know
            raise PlanError(f"{where}: {e}") from e


NoteKind = Literal["layout", "sliced", "kept", "buffer", "info", "quantize"]


@dataclass(frozen=True, slots=True)
class Note:
    """A line for people about how the plan was made: the layout inferred, a tensor sliced
    or kept at the target's own value, ...; `kind` says which, so nothing parses the text.

    In a plan file a note is its text, which starts with its kind (``"sliced: ..."``) for
    every kind but ``info``; `Note.of` reads it back.

    >>> Note.of("sliced: fc.weight (10, 4) takes the leading block")
    Note(kind='sliced', text='sliced: fc.weight (10, 4) takes the leading block')
    """

    kind: NoteKind
    text: str

    @classmethod
    def of(cls, text: str) -> Note:
        """The note a plan file's line stands for."""
        head = text.split(":", 1)[0]
        for kind in get_args(NoteKind):
            if head == kind:
                return cls(kind, text)
        if text.startswith("target buffer "):
            return cls("buffer", text)
        return cls("info", text)

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class Plan:
    """Ordered steps (in target order) plus what was left out of the source, and why."""

    steps: tuple[Step, ...]
    source_fingerprint: str
    unused: Mapping[str, str] = field(default_factory=dict)
    notes: tuple[Note, ...] = ()

    @classmethod
    def build(
        cls,
        source: CheckpointSpec,
        steps: Sequence[Step],
        *,
        unused: Mapping[str, str] | None = None,
        notes: Sequence[Note] = (),
    ) -> Plan:
        """Make a plan and validate it against `source` (raises PlanError when it does not fit)."""
        plan = cls(tuple(steps), source.fingerprint(), dict(unused or {}), tuple(notes))
        plan.validate(source)
        return plan

    @property
    def target(self) -> CheckpointSpec:
        return CheckpointSpec(tuple(s.target for s in self.steps))

    @property
    def target_fingerprint(self) -> str:
        return self.target.fingerprint()

    def fingerprint(self) -> str:
        """Hash of everything that decides the output bytes (steps and the source fingerprint)."""
        blob = json.dumps(
            [self.source_fingerprint, [s.to_json() for s in self.steps]], separators=(",", ":")
        ).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def validate(self, source: CheckpointSpec, *, target: CheckpointSpec | None = None) -> None:
        """Check every step against the source specs (and a target spec, when given).

        Raises:
            PlanError: naming each step that does not fit, with expected and found shapes.
        """
        if source.fingerprint() != self.source_fingerprint:
            raise PlanError(
                f"plan was made for a source with fingerprint {self.source_fingerprint}, but this "
                f"source has {source.fingerprint()} (different names, shapes or dtypes); "
                "make a new plan for this checkpoint"
            )
        problems: list[str] = []
        seen: set[str] = set()
        for step in self.steps:
            name = step.target.name
            if name in seen:
                problems.append(f"target {name!r} is made by more than one step")
            seen.add(name)
            missing = [s for s in step.sources if s not in source]
            if missing:
                problems.append(
                    f"step {name!r}: source tensor(s) {missing} not in the source checkpoint"
                )
                continue
            try:
                srcs = [source[s] for s in step.sources]
                dtype = srcs[0].dtype
                if (
                    len(srcs) > 1
                    and any(s.dtype != dtype for s in srcs)
                    and not any(isinstance(o, Cast) for o in step.ops)
                    # a weight and its scales differ in dtype by design
                    and not (step.ops and isinstance(step.ops[0], Dequantize))
                ):
                    problems.append(
                        f"step {name!r}: sources have different dtypes {[s.dtype for s in srcs]}"
                    )
                shape, dtype = infer(
                    step.ops, [s.shape for s in srcs], dtype, where=f"step {name!r}"
                )
            except PlanError as e:
                problems.append(str(e))
                continue
            if shape != step.target.shape or dtype != step.target.dtype:
                problems.append(
                    f"step {name!r}: ops {describe(step.ops) or '(none)'} make {shape} {dtype} from "
                    f"{[(s.name, s.shape) for s in srcs]}, but the target is {step.target.shape} "
                    f"{step.target.dtype}"
                )
        if target is not None:
            mine = {s.target.name: s.target for s in self.steps}
            for t in target:
                if t.name not in mine and not is_buffer(t.name):  # buffers keep their own value
                    problems.append(f"target tensor {t.name!r} {t.shape} has no step in the plan")
                elif t.name in mine and mine[t.name] != t:
                    got = mine[t.name]
                    problems.append(
                        f"target tensor {t.name!r}: plan makes {got.shape} {got.dtype}, "
                        f"target wants {t.shape} {t.dtype}"
                    )
            extra = [n for n in mine if n not in target]
            if extra:
                problems.append(f"plan makes tensors the target does not have: {extra[:5]}")
        if problems:
            shown = "\n  ".join(problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise PlanError(
                f"plan does not fit its checkpoints ({len(problems)} problem(s)):\n  {shown}{more}"
            )

    def explain(self) -> str:
        """A table: target, shape, dtype <- source(s), ops; then unused source tensors."""
        rows = [("target", "shape", "dtype", "source", "ops")]
        for s in self.steps:
            rows.append(
                (
                    s.target.name,
                    "x".join(map(str, s.target.shape)) or "scalar",
                    s.target.dtype,
                    ", ".join(s.sources),
                    describe(s.ops) or "-",
                )
            )
        widths = [min(max(len(r[i]) for r in rows), 60) for i in range(4)]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4]
            for r in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths) + "  ---")
        if self.unused:
            lines.append("")
            lines.append(f"unused source tensors ({len(self.unused)}):")
            lines.extend(f"  {name}: {why}" for name, why in self.unused.items())
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)

    def summary(self) -> str:
        """Counts of what partial loading did: loaded, sliced, kept, unused."""
        kept = sum(1 for s in self.steps if s.sources[0].startswith("mine:"))
        sliced = sum(1 for n in self.notes if n.kind == "sliced")
        loaded = len(self.steps) - kept
        return (
            f"loaded {loaded} tensor(s) ({sliced} sliced), kept {kept} at the target's own "
            f"values, left {len(self.unused)} source tensor(s) unused"
        )

    def to_json(self) -> dict[str, Any]:
        for step in self.steps:
            for op in step.ops:
                if op.kind == "apply":
                    raise PlanError(
                        f"step {step.target.name!r} calls a Python value_fn (rule "
                        f"{getattr(op, 'rule', '?')!r}), which a plan file cannot hold; express it "
                        "with ops (permute, reshape, slice, concat, stack, cast) to save the plan"
                    )
        return {
            "weightbridge_plan": PLAN_VERSION,
            "source_fingerprint": self.source_fingerprint,
            "target_fingerprint": self.target_fingerprint,
            "steps": [s.to_json() for s in self.steps],
            "unused": dict(self.unused),
            "notes": [n.text for n in self.notes],
        }

    @classmethod
    def from_json(cls, obj: Any, *, where: str = "plan") -> Plan:
        if not isinstance(obj, dict) or obj.get("weightbridge_plan") != PLAN_VERSION:
            raise PlanError(
                f"{where}: not a weightbridge plan (expected an object with "
                f'"weightbridge_plan": {PLAN_VERSION})'
            )
        steps = obj.get("steps")
        if not isinstance(steps, list):
            raise PlanError(f"{where}: 'steps' must be a list")
        unused = obj.get("unused") or {}
        notes = obj.get("notes") or []
        if not isinstance(unused, dict) or not isinstance(notes, list):
            raise PlanError(f"{where}: 'unused' must be an object and 'notes' a list")
        return cls(
            tuple(Step.from_json(s, where=where) for s in steps),
            str(obj.get("source_fingerprint", "")),
            {str(k): str(v) for k, v in unused.items()},
            tuple(Note.of(str(n)) for n in notes),
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                obj = parse_json(f.read().decode("utf-8"))
        except FileNotFoundError as e:
            raise PlanError(f"{path}: plan file not found") from e
        except OSError as e:
            raise PlanError(f"{path}: cannot read plan file ({e.strerror or e})") from e
        except ValueError as e:
            raise PlanError(f"{path}: plan file is not valid JSON ({e})") from e
        return cls.from_json(obj, where=path)
