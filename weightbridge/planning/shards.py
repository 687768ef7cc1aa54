"""Shard assignment: which output file each target tensor goes to, in order, and their names.

A pure function of the plan's target specs (and a size limit), so every process that converts a
plan assigns the same tensors to the same shards, and a shard is a unit of work by its number.
The file suffix is the caller's (`weightbridge.io.writer_class(format).suffix`): nothing here
imports the format modules.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from weightbridge.errors import ConversionError
from weightbridge.plan import Plan, Step
from weightbridge.spec import TensorSpec

# Hugging Face's default shard limit; a tensor larger than the limit gets a shard of its own.
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}


def parse_size(text: str | int) -> int:
    """Parse a size like ``5GB``, ``500MiB`` or ``1024``.

    >>> parse_size("5GB"), parse_size("2MiB"), parse_size(10)
    (5000000000, 2097152, 10)
    """
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ConversionError(f"cannot read size {text!r}; write it like 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "").lower().rstrip("b")
    return int(float(m.group(1)) * _UNITS[unit])


@dataclass(frozen=True, slots=True)
class Shard:
    """One output file and the steps whose tensors it holds, in file order."""

    name: str
    steps: tuple[Step, ...]

    @property
    def nbytes(self) -> int:
        return sum(s.target.nbytes for s in self.steps)


def assign_shards(
    plan: Plan,
    *,
    suffix: str = ".safetensors",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    stored_nbytes: Callable[[TensorSpec], int] | None = None,
) -> list[Shard]:
    """Split the plan's targets, in order, into shards of at most `max_shard_size` bytes.

    One shard is named ``model<suffix>``; several are ``model-00001-of-00003<suffix>``, ....
    `stored_nbytes` gives the bytes the writer stores for a tensor when they are not its
    spec's (a GGUF writer that quantizes; `weightbridge.io.stored_nbytes_of`): the caller
    passes it, as nothing here knows the formats.

    >>> from weightbridge.plan import Step
    >>> steps = tuple(Step(TensorSpec(n, (10,), "F32"), (n,), ()) for n in "abc")
    >>> plan = Plan(steps, "")
    >>> [len(s.steps) for s in assign_shards(plan, max_shard_size=80)]
    [2, 1]
    >>> [len(s.steps) for s in assign_shards(plan, max_shard_size=80, stored_nbytes=lambda t: 20)]
    [3]
    """
    limit = parse_size(max_shard_size)
    groups: list[list[Step]] = []
    size = 0
    for step in plan.steps:
        n = step.target.nbytes if stored_nbytes is None else stored_nbytes(step.target)
        if not groups or (size + n > limit and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(step)
        size += n
    if not groups:
        groups = [[]]
    if len(groups) == 1:
        return [Shard(f"model{suffix}", tuple(groups[0]))]
    total = len(groups)
    return [
        Shard(f"model-{i:05d}-of-{total:05d}{suffix}", tuple(g)) for i, g in enumerate(groups, 1)
    ]


def index_name(suffix: str) -> str:
    """The name of the index of a sharded output.

    >>> index_name(".safetensors")
    'model.safetensors.index.json'
    """
    return f"model{suffix}.index.json"


def human_size(n: float) -> str:
    """A byte count in decimal units, as `--max-shard-size` takes them.

    >>> human_size(512), human_size(3_500), human_size(2_000_000), human_size(5e12)
    ('512 B', '3.5 KB', '2.0 MB', '5.0 TB')
    """
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"
