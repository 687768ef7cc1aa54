"""Framework layouts: how each framework names parameters and orders their axes.

For each (from, to) pair of frameworks this module answers, for one source tensor: which ops turn
its layout into the target framework's, and what the parameter's last name component becomes.
The decision uses what the parameter *is* (its name, its rank, and when known the target's
shape), not rank alone: an embedding and a dense kernel are both 2-D, and only the dense kernel
is transposed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from weightbridge.errors import PlanError
from weightbridge.ops import Op, Permute

Framework = Literal["pytorch", "flax", "haiku", "tensorflow", "keras", "numpy"]
FRAMEWORKS: tuple[str, ...] = ("pytorch", "flax", "haiku", "tensorflow", "keras", "numpy")
_ALIASES = {"torch": "pytorch", "pt": "pytorch", "tf": "tensorflow", "jax": "flax", "np": "numpy"}

# Families: torch stores Linear [out, in] and conv [O, I, *k]; the others store Dense [in, out]
# and conv [*k, I, O].
_OUT_IN = {"pytorch"}

# Names that mark a 2-D parameter as an embedding table (never transposed).
_EMBEDDING = re.compile(
    r"(embed|embedding|wte|wpe|token_type|position_ids|lookup|vocab)", re.IGNORECASE
)
_NORM = re.compile(r"(norm|bn|ln_|_ln|ln\d|layernorm|batchnorm|groupnorm)", re.IGNORECASE)


def canonical_framework(name: str | None) -> str | None:
    """Normalise a framework name (``torch`` -> ``pytorch``); None stays None."""
    if name is None:
        return None
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in FRAMEWORKS:
        raise PlanError(f"unknown framework {name!r}; choose one of {', '.join(FRAMEWORKS)}")
    return key


@dataclass(frozen=True, slots=True)
class LayoutChange:
    ops: tuple[Op, ...]
    leaf: str  # the new last name component


def convert_param(
    name: str,
    shape: tuple[int, ...],
    src: str,
    dst: str,
    target_shape: tuple[int, ...] | None = None,
) -> LayoutChange:
    """Ops and new leaf name for one parameter moving from framework `src` to `dst`.

    >>> convert_param("fc.weight", (4, 3), "pytorch", "flax")
    LayoutChange(ops=(Permute(axes=(1, 0)),), leaf='kernel')
    >>> convert_param("wte.weight", (50, 8), "pytorch", "flax")
    LayoutChange(ops=(), leaf='embedding')
    """
    leaf = re.split(r"[./]", name)[-1]
    src_out_in, dst_out_in = src in _OUT_IN, dst in _OUT_IN
    is_embedding = bool(_EMBEDDING.search(name))
    rank = len(shape)
    ops: tuple[Op, ...] = ()
    if src_out_in != dst_out_in and rank >= 2 and not is_embedding and leaf in _KERNEL_LEAVES:
        if rank == 2:
            ops = (Permute((1, 0)),)
        elif src_out_in:  # [O, I, *k] -> [*k, I, O]
            ops = (Permute((*range(2, rank), 1, 0)),)
        else:  # [*k, I, O] -> [O, I, *k]
            ops = (Permute((rank - 1, rank - 2, *range(rank - 2))),)
        if target_shape is not None and rank == 2 and shape[0] == shape[1] == target_shape[0]:
            pass  # square: the name says it is a kernel, so it is transposed
        elif (
            target_shape is not None
            and _shape_after(shape, ops) != target_shape
            and shape == target_shape
        ):
            ops = ()  # the target keeps the source layout (e.g. a tied projection)
    return LayoutChange(ops, _rename_leaf(leaf, name, rank, is_embedding, dst))


_KERNEL_LEAVES = {"weight", "kernel", "w"}


def _shape_after(shape: tuple[int, ...], ops: tuple[Op, ...]) -> tuple[int, ...]:
    for op in ops:
        shape = op.out_shape([shape])
    return shape


def _rename_leaf(leaf: str, name: str, rank: int, is_embedding: bool, dst: str) -> str:
    norm = rank == 1 and bool(_NORM.search(name))
    if dst == "pytorch":
        return {
            "kernel": "weight",
            "scale": "weight",
            "gamma": "weight",
            "beta": "bias",
            "embedding": "weight",
            "mean": "running_mean",
            "var": "running_var",
            "moving_mean": "running_mean",
            "moving_variance": "running_var",
            "w": "weight",
            "b": "bias",
            "offset": "bias",
        }.get(leaf, leaf)
    if dst == "flax":
        if leaf in ("weight", "w", "gamma"):
            if is_embedding:
                return "embedding"
            return "scale" if norm or leaf == "gamma" else "kernel"
        return {
            "running_mean": "mean",
            "running_var": "var",
            "moving_mean": "mean",
            "moving_variance": "var",
            "beta": "bias",
            "b": "bias",
            "offset": "bias",
        }.get(leaf, leaf)
    if dst in ("keras", "tensorflow"):
        if leaf in ("weight", "w", "scale"):
            if is_embedding:
                return "embeddings"
            return "gamma" if norm or leaf == "scale" else "kernel"
        return {
            "running_mean": "moving_mean",
            "running_var": "moving_variance",
            "mean": "moving_mean",
            "var": "moving_variance",
            "bias": "beta" if norm else "bias",
            "b": "bias",
            "offset": "beta",
        }.get(leaf, leaf)
    if dst == "haiku":
        if leaf in ("weight", "kernel"):
            if is_embedding:
                return "embeddings"
            return "scale" if norm else "w"
        return {"bias": "offset" if norm else "b", "gamma": "scale", "beta": "offset"}.get(
            leaf, leaf
        )
    return leaf
