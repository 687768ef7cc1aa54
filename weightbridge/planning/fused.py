"""Fused and stacked tensors: split them into virtual parts so one-to-one matching applies.

Some implementations fuse what others keep apart: torch ``nn.MultiheadAttention`` keeps
``in_proj_weight [3E, E]`` where Flax has query/key/value kernels; timm's ViT has one ``qkv``
Linear; Mixtral-style MoE code keeps per-expert weights where others stack them into one
``[experts, ...]`` tensor. When matching one-to-one fails, the matcher retries with such
tensors replaced by *virtual* parts (``q_proj``/``k_proj``/``v_proj``, ``experts.<i>``) whose
specs are what the parts would be. A virtual source part is a slice of its origin; virtual
target parts are joined back into one step (concat for qkv, stack for experts).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from weightbridge.ops import Op, Permute, Reshape, Slice, Stack
from weightbridge.spec import TensorSpec

_QKV_PARTS = ("q", "k", "v")


@dataclass(frozen=True)
class Part:
    """A virtual tensor: part `index` of `origin`, split along `axis` (or unstacked)."""

    origin: str
    index: int
    count: int
    axis: int
    stacked: bool  # experts: the axis disappears; qkv: it is divided into equal parts


def _split_name(name: str) -> tuple[str, str, str] | None:
    """(head, fused component, leaf) of a fused qkv tensor name, else None."""
    m = re.match(r"^(.*?)(in_proj_weight|in_proj_bias)$", name)
    if m:
        leaf = "weight" if m.group(2).endswith("weight") else "bias"
        return m.group(1), "in_proj", leaf
    m = re.match(r"^(.*[./])?(qkv|query_key_value|c_attn|Wqkv|qkv_proj)([./])([^./]+)$", name)
    if m:
        return (m.group(1) or ""), m.group(2), m.group(3) + m.group(4)
    return None


def split_fused(
    specs: Sequence[TensorSpec], out_in: bool
) -> tuple[list[TensorSpec], dict[str, Part]]:
    """Replace fused qkv and stacked-expert tensors by virtual parts; returns (specs, parts)."""
    out: list[TensorSpec] = []
    parts: dict[str, Part] = {}
    for t in specs:
        fused = _split_name(t.name)
        if fused and t.shape and _qkv_axis(t.shape, out_in) is not None:
            head, comp, leaf = fused
            axis = _qkv_axis(t.shape, out_in)
            assert axis is not None
            shape = list(t.shape)
            shape[axis] //= 3
            for i, p in enumerate(_QKV_PARTS):
                vname = f"{head}{p}_proj.{leaf}" if comp == "in_proj" else f"{head}{p}{leaf}"
                out.append(TensorSpec(vname, tuple(shape), t.dtype))
                parts[vname] = Part(t.name, i, 3, axis, stacked=False)
            continue
        experts = _experts_component(t.name)
        if experts is not None and len(t.shape) >= 3 and t.shape[0] > 1:
            end = experts
            for i in range(t.shape[0]):
                vname = f"{t.name[:end]}.{i}{t.name[end:]}"
                out.append(TensorSpec(vname, t.shape[1:], t.dtype))
                parts[vname] = Part(t.name, i, t.shape[0], 0, stacked=True)
            continue
        out.append(t)
    return out, parts


def _qkv_axis(shape: tuple[int, ...], out_in: bool) -> int | None:
    if len(shape) == 1:
        return 0 if shape[0] % 3 == 0 else None
    axis = 0 if out_in else len(shape) - 1
    return axis if shape[axis] % 3 == 0 else None


def _experts_component(name: str) -> int | None:
    """End offset of an ``experts`` component in a name (where a virtual index goes)."""
    m = re.search(r"(^|[./])(experts?)(?=[./]|$)", name)
    return None if m is None else m.end(2)


def source_part_ops(part: Part, shape: tuple[int, ...]) -> tuple[Op, ...]:
    """Ops that cut a virtual source part out of its origin tensor (of shape `shape`)."""
    if part.stacked:
        return (Slice(0, part.index, part.index + 1), Reshape(shape[1:]))
    size = shape[part.axis] // part.count
    return (Slice(part.axis, part.index * size, (part.index + 1) * size),)


def join_ops(
    part: Part, per_part: Sequence[tuple[Op, ...]], part_shape: tuple[int, ...]
) -> tuple[Op, ...] | None:
    """One step's ops that make a fused/stacked target from its parts' sources, or None.

    The parts are stacked on a new leading axis, each part's (identical) ops are applied to
    all of them at once with their axes shifted by one, and for a fused target the stack axis
    is then moved next to the join axis and merged into it: concatenation, whatever layout
    change the parts needed.
    """
    first = per_part[0]
    if any(ops != first for ops in per_part):
        return None
    n = part.count
    ops: list[Op] = [Stack(0)]
    for op in first:
        if isinstance(op, Permute):
            ops.append(Permute((0, *(a + 1 for a in op.axes))))
        elif isinstance(op, Reshape):
            ops.append(Reshape((n, *op.shape)))
        elif isinstance(op, Slice):
            ops.append(
                Slice(
                    op.axis % len(part_shape) + 1 if op.axis < 0 else op.axis + 1, op.start, op.stop
                )
            )
        else:
            return None
    if part.stacked:
        return tuple(ops)
    axis = part.axis
    rank = len(part_shape)
    if axis:
        ops.append(Permute((*range(1, axis + 1), 0, *range(axis + 1, rank + 1))))
    merged = list(part_shape)
    merged[axis] *= n
    ops.append(Reshape(tuple(merged)))
    return tuple(ops)
