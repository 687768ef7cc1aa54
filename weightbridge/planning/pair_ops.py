"""Ops for paired tensors, from the layout rules: each pair's ops, fused parts joined back into
their tensors, the regroup of the dense layer after a flatten, and (when asked) leftovers
filled with the leading block of a larger same-named source.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence

from weightbridge.errors import Hint
from weightbridge.ops import Op, Slice
from weightbridge.planning.fused import Part, join_ops, source_part_ops
from weightbridge.planning.hints import FLATTEN_HINT, FLATTENS, NO_FLATTEN_HINT
from weightbridge.planning.layouts import fit_ops, is_embedding, layout_permutation
from weightbridge.planning.match_result import MatchNote, Refusal
from weightbridge.planning.names import natural_key, tokens
from weightbridge.planning.pairing import Outcome, TreePairing
from weightbridge.planning.tree import Node


def plan_pairs(
    outcome: Outcome,
    fam: tuple[str, str],
    transpose2d: bool,
    orders: tuple[bool, bool],
    hints: Sequence[Hint],
    notes: list[MatchNote],
    sparts: dict[str, Part],
    tparts: dict[str, Part],
) -> None:
    """Ops for every pair, from the layout rules; fused parts joined back into their tensors."""
    src_family, tgt_family = fam
    result = outcome.result
    flatten = _flatten_pair(result.pairs, src_family, tgt_family, orders, hints, notes)
    if isinstance(flatten, Refusal):
        outcome.problems.append(flatten.message)
        outcome.choices += flatten.choices
        return
    origin_shape = {}
    groups: dict[str, dict[int, tuple[str, tuple[Op, ...]]]] = defaultdict(dict)
    # fit_ops reads names only to tell embeddings (of matrices); with that flag, its answer is
    # a function of shapes, shared by every pair alike (every expert of every layer).
    fitted: dict[tuple[object, ...], tuple[Op, ...] | None] = {}
    for s, t in result.pairs:
        assert s.spec is not None and t.spec is not None
        channels = flatten[1] if flatten and flatten[0] is s else None
        embedding = s.role == "matrix" and (
            s.embedding or (t.embedding if t.role == "matrix" else is_embedding(t.path))
        )
        key = (s.spec.shape, t.spec.shape, s.role, embedding, channels)
        if key in fitted:
            ops = fitted[key]
        else:
            ops = fitted[key] = fit_ops(
                s.spec,
                t.spec,
                s.role,
                src_family,
                tgt_family,
                transpose2d=transpose2d,
                flatten_channels=channels,
                embedding=embedding,
            )
        if ops is None:
            outcome.problems.append(
                f"paired {s.spec.name} {s.spec.shape} with {t.spec.name} {t.spec.shape} "
                "by structure, but no layout rule turns one into the other"
            )
            continue
        sname = s.spec.name
        if sname in sparts:
            part = sparts[sname]
            whole = _origin_shape(part, s.spec.shape)
            ops = (*source_part_ops(part, whole), *ops)
            sname = part.origin
        if t.spec.name in tparts:
            tp = tparts[t.spec.name]
            groups[tp.origin][tp.index] = (sname, ops)
            origin_shape[tp.origin] = tp
        else:
            outcome.pairs.append((t.spec.name, (sname,), ops))
    for origin, members in groups.items():
        tp = origin_shape[origin]
        if len(members) != tp.count:
            outcome.problems.append(
                f"{origin}: only {len(members)} of its {tp.count} parts found sources"
            )
            continue
        ordered = [members[i] for i in range(tp.count)]
        part_shape = next(
            t.spec.shape
            for _, t in result.pairs
            if t.spec and t.spec.name in tparts and tparts[t.spec.name].origin == origin
        )
        joined = join_ops(tp, [ops for _, ops in ordered], part_shape)
        if joined is None:
            outcome.problems.append(
                f"{origin}: its parts need different layout changes; join them with a rule"
            )
            continue
        outcome.pairs.append((origin, tuple(name for name, _ in ordered), joined))
        how = "stacked" if tp.stacked else "concatenated"
        notes.append(MatchNote("info", f"{origin}: {how} from {tp.count} parts"))


def _origin_shape(part: Part, shape: tuple[int, ...]) -> tuple[int, ...]:
    if part.stacked:
        return (part.count, *shape)
    whole = list(shape)
    whole[part.axis] *= part.count
    return tuple(whole)


def slice_leftovers(
    result: TreePairing,
    src_family: str,
    tgt_family: str,
    notes: list[MatchNote],
    prefixes: tuple[frozenset[str], frozenset[str]] = (frozenset(), frozenset()),
) -> list[tuple[str, tuple[str, ...], tuple[Op, ...]]]:
    """Pair leftovers that share a name and role but not a shape, copying the overlapping block.

    Only targets no larger than their source on every axis are filled (a 1000-class head into a
    10-class one); a larger target keeps its own values.
    """
    out: list[tuple[str, tuple[str, ...], tuple[Op, ...]]] = []
    by_key: dict[object, list[Node]] = defaultdict(list)
    for s in result.unpaired_sources:
        by_key[(s.role, tokens(s.path) - prefixes[0])].append(s)
    still: list[Node] = []
    for t in result.unpaired_targets:
        cands = by_key.get((t.role, tokens(t.path) - prefixes[1]), [])
        if len(cands) != 1 or cands[0].spec is None or t.spec is None:
            still.append(t)
            continue
        s = cands[0]
        assert s.spec is not None
        perm = (
            layout_permutation(len(s.spec.shape), src_family, tgt_family)
            if s.role == "matrix"
            else ()
        )
        shape = s.spec.shape
        for op in perm:
            shape = op.out_shape([shape])
        if len(shape) != len(t.spec.shape) or any(
            tdim > sdim for tdim, sdim in zip(t.spec.shape, shape, strict=True)
        ):
            still.append(t)
            continue
        slices = tuple(Slice(ax, 0, d) for ax, d in enumerate(t.spec.shape) if d != shape[ax])
        out.append((t.spec.name, (s.spec.name,), (*perm, *slices)))
        cands.remove(s)
        result.unpaired_sources.remove(s)
        notes.append(
            MatchNote(
                "sliced",
                f"sliced: {t.spec.name} {t.spec.shape} takes the leading block of "
                f"{s.spec.name} {s.spec.shape}",
            )
        )
    result.unpaired_targets = still
    return out


def _flatten_pair(
    pairs: list[tuple[Node, Node]],
    src_family: str,
    tgt_family: str,
    orders: tuple[bool, bool],
    hints: Sequence[Hint],
    notes: list[MatchNote],
) -> tuple[Node, int] | Refusal | None:
    """The dense layer right after a conv stack whose input is a flattened feature map, if any.

    torch flattens NCHW; a Flax/Keras model flattens NHWC directly, or transposes to NCHW first
    (seed 003's own example does). Which one cannot be read from weights, so the regroup is
    never guessed: it needs positive evidence of a flatten (the dense layer's fan-in is the last
    conv's C channels times H*W > 1, and no per-channel tensor of that fan-in sits between them,
    which would mean global pooling) and then an explicit choice: ``("@flatten", "nhwc")``
    regroups, ``("@flatten", "nchw")`` or ``("@noflatten", "")`` does not; ``("@flatten",
    "<target name part>")`` also names the dense layer when order does not tell.

    Returns:
        The source leaf of that dense layer and the conv stack's channels; None when nothing
        is to be regrouped; a `Refusal` when a flatten is evidenced and no choice was made, or
        several dense layers could follow it and nothing says which.
    """
    if (src_family == "pytorch") == (tgt_family == "pytorch"):
        return None
    choices = [h[1] for h in hints if h[0] == FLATTEN_HINT]
    if any(h[0] == NO_FLATTEN_HINT for h in hints) or "nchw" in choices:
        return None
    named = [c for c in choices if c not in ("nhwc", "nchw")]
    torch_side = src_family == "pytorch"
    convs = [(s, t) for s, t in pairs if s.role == "matrix" and s.spec and len(s.spec.shape) == 4]
    if not convs:
        return None
    src_ordered, tgt_ordered = orders

    def key(pair: tuple[Node, Node]) -> tuple[object, ...]:
        if src_ordered:
            return (pair[0].order,)
        if tgt_ordered:
            return (pair[1].order,)
        return natural_key(pair[1].path)

    last_s, last_t = max(convs, key=key)
    # The torch side's [O, I/g, kh, kw] always gives the output channels (a Keras depthwise
    # kernel [kh, kw, C, M] would not: its outputs are C*M).
    torch_kernel = last_s.spec if torch_side else last_t.spec
    assert torch_kernel is not None
    channels = torch_kernel.shape[0]

    def fan_in(n: Node) -> int:
        assert n.spec is not None
        return n.spec.shape[1] if torch_side else n.spec.shape[0]

    dense = [
        (s, t)
        for s, t in pairs
        if s.role == "matrix"
        and s.spec
        and len(s.spec.shape) == 2
        and t.spec
        and len(t.spec.shape) == 2
        and not s.embedding
    ]
    hinted = [p for p in dense for h in named if h in p[1].path]
    chosen: tuple[Node, Node] | None
    if hinted:
        chosen = hinted[0]
    elif src_ordered or tgt_ordered:
        last = max(key(c) for c in convs)
        after = sorted((p for p in dense if key(p) > last), key=key)
        chosen = after[0] if after else None
    else:
        fits = _flatten_candidates(pairs, dense, channels, fan_in, notes)
        if len(fits) > 1:
            names = [t.path for _, t in fits]
            return Refusal(
                f"the conv stack ends in {channels} channels, and {len(fits)} dense layers "
                f"({', '.join(names[:4])}) take a multiple of that many inputs that no other "
                "layer produces, so any of them may follow a flatten; neither side keeps "
                "definition order to tell which. Name it with hints=[('@flatten', '<part of its "
                "target name>')] (CLI: --hint @flatten=NAME), or say there is none with "
                "('@flatten', 'nchw')"
            )
        chosen = fits[0] if fits else None
    if chosen is None:
        return None
    n_in = fan_in(chosen[0])
    if n_in % channels or n_in // channels < 2:
        return None
    if not hinted and (src_ordered or tgt_ordered):
        # A per-channel tensor with the dense layer's fan-in between the last conv and it (a
        # final BatchNorm: DenseNet's norm5) shows the features are pooled channels, not a
        # flattened map whose size merely divides by the last conv's channels.
        lo, hi = max(key(c) for c in convs), key(chosen)
        pooled = [
            p
            for p in pairs
            if lo < key(p) < hi and p[0].spec is not None and p[0].spec.shape == (n_in,)
        ]
        if pooled:
            notes.append(
                MatchNote(
                    "info",
                    f"{chosen[1].path}: follows pooled features ({pooled[0][0].path} has its "
                    f"{n_in} channels), not a flatten; no regroup",
                )
            )
            return None
    if not hinted and "nhwc" not in choices:
        return Refusal(
            f"{chosen[1].path} takes {n_in} = {channels} channels x {n_in // channels} "
            "positions from the conv stack through a flatten. Whether the "
            f"{'target' if torch_side else 'source'} model flattens its NHWC feature map directly "
            "or transposes it to NCHW first cannot be read from the weights. Say which: "
            "hints=[('@flatten', 'nhwc')] (flattens NHWC directly: its input axis is regrouped) "
            "or hints=[('@flatten', 'nchw')] (transposes first: no regroup); CLI: --hint "
            "@flatten=nhwc or --hint @flatten=nchw",
            (FLATTENS,),
        )
    notes.append(
        MatchNote(
            "info",
            f"{chosen[1].path}: follows a conv stack through a flatten; regrouping its input "
            f"from {'NCHW' if torch_side else 'NHWC'} to {'NHWC' if torch_side else 'NCHW'} "
            f"order ({channels} channels)",
        )
    )
    return chosen[0], channels


def _flatten_candidates(
    pairs: list[tuple[Node, Node]],
    dense: list[tuple[Node, Node]],
    channels: int,
    fan_in: Callable[[Node], int],
    notes: list[MatchNote],
) -> list[tuple[Node, Node]]:
    """Dense layers that may follow a flatten of a `channels`-channel map, without order.

    A fan-in of k x channels (k > 1) is only a factor until the structure supports it: a
    flattened map's size is produced by no layer, so a dense layer whose fan-in is some other
    tensor's width (a ViT's second MLP dense takes the first one's 64 = 32 x 2 outputs) is fed
    by that layer. Such a one stays a candidate only when k is a square (an H x H map), where a
    model of equal widths could still flatten into it; otherwise it is a factor coincidence.
    """
    widths: dict[int, list[Node]] = defaultdict(list)
    for s, _ in pairs:
        if s.spec is not None and len(s.spec.shape) in (1, 2):
            for d in set(s.spec.shape):
                widths[d].append(s)
    out = []
    for p in dense:
        n_in = fan_in(p[0])
        if n_in % channels or n_in // channels < 2:
            continue
        k = n_in // channels
        fed_by = [n for n in widths.get(n_in, []) if n is not p[0]]
        if fed_by and math.isqrt(k) ** 2 != k:
            notes.append(
                MatchNote(
                    "info",
                    f"{p[1].path}: its {n_in} inputs are {fed_by[0].path}'s width, not a "
                    f"flattened map ({channels} channels x {k}); no regroup",
                )
            )
            continue
        out.append(p)
    return out
