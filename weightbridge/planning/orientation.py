"""Orientation of 2-D weights: whether the source's [out, in] or [in, out] kernels are
transposed into the target. A property of the whole checkpoint, proved by biases and by
non-square shapes, never decided per tensor.
"""

from __future__ import annotations

from collections import Counter

from weightbridge.planning.hints import TRANSPOSE_HINT
from weightbridge.planning.tree import Node, all_internal


def side_orientation(tree: Node, family: str) -> tuple[str | None, str]:
    """How one side stores 2-D kernels, from modules whose bias proves it: a Linear's bias has
    its output size. Returns ("out_in" | "in_out" | "mixed" | None, evidence)."""
    votes: dict[str, list[str]] = {"out_in": [], "in_out": []}
    for node in all_internal(tree):
        if len(node.children) < 2:
            continue  # no room for a weight and a bias
        leaves = [(c, c.spec) for c in node.children.values() if c.spec is not None]
        mats = [
            (c, spec)
            for c, spec in leaves
            if c.role == "matrix" and len(spec.shape) == 2 and not c.embedding
        ]
        biases = [spec for c, spec in leaves if c.role == "bias" and len(spec.shape) == 1]
        if len(mats) != 1 or len(biases) != 1:
            continue
        (a, b), n = mats[0][1].shape, biases[0].shape[0]
        if a != b and n in (a, b):
            votes["out_in" if n == a else "in_out"].append(mats[0][0].path)
    if votes["out_in"] and votes["in_out"]:
        return "mixed", (
            f"{votes['out_in'][0]} is stored [out, in] but {votes['in_out'][0]} [in, out] "
            "(by their biases)"
        )
    for k, v in votes.items():
        if v:
            return (
                k,
                f"{len(v)} biased 2-D weight(s) such as {v[0]} are stored {k.replace('_', ', ')}",
            )
    if family != "pytorch" and family != "numpy":
        # Flax, Haiku, Keras and TF store every Dense kernel [in, out]; only torch-named
        # checkpoints come both ways (nn.Linear vs GPT-2's Conv1D and ports from JAX).
        return "in_out", f"{family} stores Dense kernels [in, out]"
    return None, ""


def decide_transpose(
    src_tree: Node, tgt_tree: Node, fam: tuple[str, str]
) -> tuple[bool | None, str, str]:
    """Whether the source's 2-D kernels are transposed into the target: a property of the whole
    checkpoint, never of one tensor. Returns (decision or None, evidence, conflict message).

    Evidence: each side's orientation proven by biases (`side_orientation`), and the
    non-square kernel shapes, which fit the target's either as they are or transposed.
    Evidence that disagrees is a conflict; no evidence is None (the caller then tries both).
    """
    o_s, why_s = side_orientation(src_tree, fam[0])
    o_t, why_t = side_orientation(tgt_tree, fam[1])
    for o, why, side in ((o_s, why_s, "source"), (o_t, why_t, "target")):
        if o == "mixed":
            return (
                None,
                "",
                (
                    f"the {side} stores some 2-D weights [out, in] and others [in, out]: {why}; "
                    "convert it with a rules file, or pair the two kinds in separate conversions"
                ),
            )
    by_bias = (o_s != o_t) if o_s and o_t else None

    def shapes(tree: Node) -> Counter[tuple[int, ...]]:
        return Counter(
            n.spec.shape
            for n in tree.leaves()
            if n.spec is not None
            and n.role == "matrix"
            and len(n.spec.shape) == 2
            and n.spec.shape[0] != n.spec.shape[1]
            and not n.embedding
        )

    s_shapes, t_shapes = shapes(src_tree), shapes(tgt_tree)
    kept = sum((s_shapes & t_shapes).values())
    flipped = sum((Counter({k[::-1]: v for k, v in s_shapes.items()}) & t_shapes).values())
    by_shape = None if kept == flipped else flipped > kept
    shape_why = f"{max(kept, flipped)} non-square 2-D weight(s) fit the target only that way"
    if by_bias is not None and by_shape is not None and by_bias != by_shape:
        return (
            None,
            "",
            (
                f"conflicting evidence about 2-D weight orientation: biases say "
                f"{'transpose' if by_bias else 'keep'} ({why_s}; {why_t}), but the non-square "
                f"shapes fit the target only {'transposed' if by_shape else 'as they are'}; pass "
                f"hints=[('{TRANSPOSE_HINT}', 'yes' or 'no')] once you know which is right"
            ),
        )
    if by_bias is not None:
        return by_bias, f"{why_s}; {why_t}", ""
    if by_shape is not None:
        return by_shape, shape_why, ""
    return None, "", ""
