"""Evidence from names that breaks a tie between same-shaped candidates: index-like numbers
(``layer.3`` and ``layers_3``) and the words that tell tied siblings apart (``q``/``query``).
"""

from __future__ import annotations

from collections.abc import Sequence

from weightbridge.planning.names import (
    ROLE_WORDS,
    best_by_words,
    common_head,
    distinct_words,
    head_tokens,
    index_like_keys,
    index_order,
    keys_index_like,
    last_tokens,
    own_words_under,
    tokens,
)
from weightbridge.planning.tree import Node


def names_decide(pairs: list[tuple[Node, Node]], ss: list[Node], ts: list[Node]) -> bool:
    """Strong name evidence, which outweighs definition order: within each pair, the words
    that tell a node from its tied siblings are the same on both sides (``query`` and ``q``),
    not merely overlapping (``post_attention_layernorm`` and ``pre_attn_norm`` share "attn")."""
    own_s = dict(zip(map(id, ss), own_words(ss), strict=True))
    own_t = dict(zip(map(id, ts), own_words(ts), strict=True))
    return all(own_s[id(s)] and own_s[id(s)] == own_t[id(t)] for s, t in pairs)


def index_pairs(ss: list[Node], ts: list[Node], use_path: bool) -> list[tuple[Node, Node]] | None:
    """Pair numbered nodes in number order, if the numbers line up: the same on both sides up
    to one constant offset (``layer.0..11`` ~ ``layers_0..11``; Keras ``block1..`` ~ torch
    ``0..``). Numbers that do not (``1, 2, 3`` against ``0, 2, 3``: one side has an extra or
    a missing module) say that something else is going on."""
    order = index_order(
        tuple(n.path if use_path else n.name for n in ss),
        tuple(n.path if use_path else n.name for n in ts),
    )
    return None if order is None else [(ss[i], ts[j]) for i, j in order]


def index_like(nodes: Sequence[Node], *, use_path: bool = False) -> bool:
    """Names (or full paths) that differ only in their numbers (``0``, ``1``; ``Dense_0``...)."""
    if use_path:  # paths are unique to their group: nothing to gain from the cache
        return keys_index_like(tuple(n.path for n in nodes))
    return index_like_keys(tuple(n.name for n in nodes))


def unique_best_assignment(ss: list[Node], ts: list[Node]) -> list[tuple[Node, Node]] | None:
    """Pairs by name, only where the names decide.

    Only the words that tell a node from its tied siblings count (``q`` in ``attn.q``; the
    shared ``encoder.layer.3`` says nothing), and the evidence for a pair is how many of them
    it shares. In rounds, a pair is fixed when each node is the other's unique best among those
    still open and they share a word; fixed pairs leave the table. A last pair left over is
    taken only when every fixed pair was certain (the same distinguishing words on both
    sides). A maximal total over all permutations would let two weak overlaps outvote one
    strong one, and similarity ratios would reward a name for being short: neither is used.
    """
    chosen = best_by_words(tuple(own_words(ss)), tuple(own_words(ts)))
    return None if chosen is None else [(ss[j], ts[i]) for i, j in enumerate(chosen)]


def own_words(nodes: list[Node]) -> list[frozenset[str]]:
    """Each node's name words that its tied siblings do not all share (role words left out)."""
    paths = [n.path for n in nodes]
    head, lasts = common_head(paths)
    if head is None:
        return list(distinct_words(tuple(_path_words(p) for p in paths)))
    # Siblings under one head: a path's tokens are its head's and its last component's, so
    # the answer follows from the head's words and the last components, which are the same
    # for every expert of every layer (cached).
    return list(own_words_under(head_tokens(head), lasts))


def _path_words(path: str) -> frozenset[str]:
    """`tokens` of a path, its last component's by `last_tokens`."""
    if ":0" in path:
        return tokens(path)
    cut = max(path.rfind("."), path.rfind("/"), path.rfind("~"))
    head = tokens(path[:cut]) if cut > 0 else frozenset()
    return head | last_tokens(path[cut + 1 :])


def similarity(s: Node, t: Node) -> float:
    """Word overlap of two nodes' paths (Jaccard), role words left out."""
    a, b = tokens(s.path) - ROLE_WORDS, tokens(t.path) - ROLE_WORDS
    if not a or not b:
        return 0.0
    concepts_a = {w for w in a if w.startswith("@")}
    concepts_b = {w for w in b if w.startswith("@")}
    if concepts_a and concepts_b and not concepts_a & concepts_b:
        return 0.0  # two norms named for different positions, whatever words they share
    return len(a & b) / len(a | b)
