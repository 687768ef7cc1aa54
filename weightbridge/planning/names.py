"""Words in tensor names: tokens with synonyms folded, numbers, and the words that tell tied
siblings apart. Pure functions of strings, cached where every layer asks the same question.
"""

from __future__ import annotations

import functools
import re

SYNONYMS = {
    "query": "q",
    "key": "k",
    "value": "v",
    "output": "o",
    "out": "o",
    "dense": "fc",
    "linear": "fc",
    "lin": "fc",
    "layernorm": "norm",
    "ln": "norm",
    "batchnorm": "norm",
    "bn": "norm",
    "groupnorm": "norm",
    "attention": "attn",
    "selfattention": "attn",
    "self": "attn",
    "ffn": "mlp",
    "feedforward": "mlp",
    "intermediate": "mlp",
    "embeddings": "embed",
    "embedding": "embed",
    "emb": "embed",
    "convolution": "conv",
    "layers": "layer",
    "blocks": "block",
    "stages": "stage",
}


# Whole name components that name a norm's *position* in a pre-norm transformer block, where
# word overlap misleads: LLaMA's ``post_attention_layernorm`` is the norm before the MLP and
# shares "attention" with Flax's ``pre_attn_norm``. Such a component becomes one concept token.
# A concept claimed by two components on one side is no evidence (Gemma 2 has both
# ``post_attention_layernorm`` and ``pre_feedforward_layernorm``), so the matcher refuses there.
_POSITION_CONCEPTS = {
    "@norm_attn": (
        "input_layernorm|input_layer_norm|attention_norm|attn_norm|pre_attn_norm|"
        "pre_attention_norm|pre_attention_layernorm|ln_1|ln1|layernorm_before|norm1|"
        "self_attn_layer_norm|layer_norm1|attn_ln|ln_attn"
    ),
    "@norm_mlp": (
        "post_attention_layernorm|ffn_norm|mlp_norm|pre_mlp_norm|pre_ffn_norm|pre_ffw_norm|"
        "pre_feedforward_layernorm|ln_2|ln2|layernorm_after|norm2|final_layer_norm|"
        "layer_norm2|mlp_ln|ln_mlp"
    ),
}
CONCEPT = {
    phrase: concept for concept, alts in _POSITION_CONCEPTS.items() for phrase in alts.split("|")
}


def tokens(name: str) -> frozenset[str]:
    """Normalised word tokens of a name (digits dropped, synonyms folded).

    >>> sorted(tokens("encoder.layer.0.attention.self.query"))
    ['attn', 'encoder', 'layer', 'q']
    >>> sorted(tokens("layers.0.post_attention_layernorm"))
    ['@norm_mlp', 'attn', 'layer', 'norm', 'post']
    """
    # str.split on one separator is ~3x faster than re.split on three
    parts = name.replace(":0", "").replace("/", ".").replace("~", ".").split(".")
    # Per component, cached: full paths are unique (every expert of every layer has its own)
    # but are made of the same few components.
    return frozenset().union(*map(part_tokens, parts))


@functools.lru_cache(maxsize=1 << 16)
def part_tokens(part: str) -> frozenset[str]:
    """`tokens` of one name component."""
    part = CAMEL.sub(r"\1_\2", part).lower()
    out: set[str] = set()
    concept = CONCEPT.get(part)
    if concept:
        out.add(concept)
    out.update(SYNONYMS.get(w, w) for w in NON_LETTERS.split(part) if w)
    return frozenset(out)


CAMEL = re.compile(r"([a-z])([A-Z])")
NON_LETTERS = re.compile(r"[^a-z]+")


@functools.lru_cache(maxsize=1 << 16)
def natural_key(name: str) -> tuple[object, ...]:
    """Sort key that puts ``layer_2`` before ``layer_10`` (cached: tied groups of every layer
    sort the same short names, ``experts_17``, again and again)."""
    return tuple(int(p) if p.isdigit() else p for p in _DIGIT_RUNS.split(name))


_DIGIT_RUNS = re.compile(r"(\d+)")


@functools.lru_cache(maxsize=1024)
def index_order(
    keys_s: tuple[str, ...], keys_t: tuple[str, ...]
) -> tuple[tuple[int, int], ...] | None:
    """`evidence.index_pairs` on the names alone, as index pairs (cached: every layer's tied groups
    have the same names, ``experts.0`` to ``experts.63`` against ``experts_0`` to ...)."""
    a = sorted(range(len(keys_s)), key=lambda i: natural_key(keys_s[i]))
    b = sorted(range(len(keys_t)), key=lambda j: natural_key(keys_t[j]))
    va = _varying_numbers([keys_s[i] for i in a])
    vb = _varying_numbers([keys_t[j] for j in b])
    if va is None or vb is None:
        return None
    offsets = set()
    for x, y in zip(va, vb, strict=True):
        if len(x) != len(y):
            return None
        offsets.add(tuple(i - j for i, j in zip(x, y, strict=True)))
    return tuple(zip(a, b, strict=True)) if len(offsets) == 1 else None


def _varying_numbers(keys: list[str]) -> list[tuple[int, ...]] | None:
    """Each name's numbers at the positions where they differ across the group."""
    nums = [_numbers(k) for k in keys]
    if len({len(x) for x in nums}) != 1:
        return None
    varying = [i for i in range(len(nums[0])) if len({x[i] for x in nums}) > 1]
    return [tuple(x[i] for i in varying) for x in nums]


def _numbers(name: str) -> tuple[int, ...]:
    """The numbers in a name: `natural_key`'s odd items (cached there)."""
    return natural_key(name)[1::2]  # type: ignore[return-value]


def keys_index_like(keys: tuple[str, ...]) -> bool:
    """`evidence.index_like` on the names alone."""
    if len(set(keys)) != len(keys):  # two nodes both called "1" (conv.0.1, conv.1.1) say nothing
        return False
    if "".join(keys).isascii() and len({k.translate(_NO_DIGITS) for k in keys}) > 1:
        return False  # they differ in more than numbers (a quick test before the regex)
    stems = {_stem(k) for k in keys}
    return len(stems) == 1 and "#" in next(iter(stems))


# Cached: every layer's tied groups have the same names.
index_like_keys = functools.lru_cache(maxsize=1024)(keys_index_like)


@functools.lru_cache(maxsize=1 << 16)
def _stem(name: str) -> str:
    """`name` with each run of digits replaced by ``#`` (cached like `natural_key`)."""
    return _DIGITS.sub("#", name)


_DIGITS = re.compile(r"\d+")
_NO_DIGITS = str.maketrans("", "", "0123456789")


@functools.lru_cache(maxsize=1024)
def best_by_words(
    own_s: tuple[frozenset[str], ...], own_t: tuple[frozenset[str], ...]
) -> tuple[int, ...] | None:
    """`evidence.unique_best_assignment` on the distinguishing words alone: for each target, the index
    of its source (cached: every expert of every layer has the same ``gate`` and ``up``)."""
    score = {
        (i, j): shared_words(own_s[j], own_t[i])
        for i in range(len(own_t))
        for j in range(len(own_s))
    }
    rows, cols = set(range(len(own_t))), set(range(len(own_s)))
    chosen: dict[int, int] = {}
    certain = True
    while rows:
        fixed = []
        for i in rows:
            row = {j: score[i, j] for j in cols}
            best = max(row.values())
            js = [j for j, v in row.items() if v == best]
            if best <= 0 or len(js) != 1:
                continue
            column = [score[k, js[0]] for k in rows]
            if column.count(best) == 1 and max(column) == best:
                fixed.append((i, js[0]))
        if not fixed:
            if len(rows) == 1 and chosen and certain:
                fixed = [(next(iter(rows)), next(iter(cols)))]
            else:
                return None
        for i, j in fixed:
            certain = certain and bool(own_t[i]) and own_t[i] == own_s[j]
            chosen[i] = j
            rows.discard(i)
            cols.discard(j)
    return tuple(chosen[i] for i in range(len(own_t)))


def common_head(paths: list[str]) -> tuple[str | None, tuple[str, ...]]:
    """The head all `paths` share before their last component, and those last components; or
    None when they differ (or a path holds ``:0``, which `tokens` drops before splitting)."""
    head: str | None = None
    lasts = []
    for path in paths:
        cut = max(path.rfind("."), path.rfind("/"), path.rfind("~"))
        if cut < 0 or ":0" in path or (head is not None and path[:cut] != head):
            return None, ()
        head = path[:cut]
        lasts.append(path[cut + 1 :])
    return head, tuple(lasts)


@functools.lru_cache(maxsize=1024)
def own_words_under(
    head_words: frozenset[str], lasts: tuple[str, ...]
) -> tuple[frozenset[str], ...]:
    return distinct_words(tuple(head_words | last_tokens(last) for last in lasts))


@functools.lru_cache(maxsize=1 << 16)
def last_tokens(part: str) -> frozenset[str]:
    """`part_tokens` of a name's last component, where a role word inside a compound one
    (Megatron's ``layer_norm_weight`` beside ``layer_norm_bias``) stays a distinguishing word
    (``%weight``). Role words are left out of the words that tell siblings apart because the
    leaf's role says the same (`layouts.leaf_role`), but a role is only read from a whole
    leaf (``weight``, ``bias``): without this, such siblings had no words to tell them apart.

    >>> sorted(last_tokens("layer_norm_bias")), sorted(last_tokens("bias"))
    (['%bias', 'layer', 'norm'], ['bias'])
    """
    words = part_tokens(part)
    if len(words) < 2:
        return words
    return frozenset(f"%{w}" if w in ROLE_WORDS else w for w in words)


def distinct_words(words: tuple[frozenset[str], ...]) -> tuple[frozenset[str], ...]:
    """`evidence.own_words` from each node's tokens."""
    words = tuple(w - ROLE_WORDS for w in words)
    common = frozenset.intersection(*words) if words else frozenset()
    return tuple(w - common for w in words)


@functools.lru_cache(maxsize=1 << 14)
def head_tokens(head: str) -> frozenset[str]:
    """`tokens` of a path without ``:0``, from its own head's (cached: every expert's head is
    new, but the layer's above it is not)."""
    cut = max(head.rfind("."), head.rfind("/"), head.rfind("~"))
    if cut < 0:
        return part_tokens(head)
    return head_tokens(head[:cut]) | part_tokens(head[cut + 1 :])


def shared_words(a: frozenset[str], b: frozenset[str]) -> int:
    """Distinguishing words two names share; none when they name different norm positions."""
    ca = {w for w in a if w.startswith("@")}
    cb = {w for w in b if w.startswith("@")}
    if ca and cb and not ca & cb:
        return 0
    return len(a & b)


# Words that name a parameter's role, not which module it belongs to.
ROLE_WORDS = frozenset(
    {
        "weight",
        "kernel",
        "bias",
        "w",
        "b",
        "scale",
        "gamma",
        "beta",
        "params",
        "batch",
        "stats",
        "offset",
        "embedding",
        "embed",
    }
)
