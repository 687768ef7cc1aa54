"""The shipped rules ``llama_hf_to_gguf``: a Hugging Face LLaMA folder into llama.cpp's GGUF.

Oracles are the ecosystem's own: gguf-py's tensor name tables for the names, llama.cpp's q/k
permutation formula (written out here from ``convert_hf_to_gguf.py``'s ``LlamaModel.permute``)
for the bytes, and transformers, which loads a GGUF (reversing that permutation) and must give
the original model's logits.

The GGUF key-values transformers needs (``general.architecture``, ``llama.*``, the tokenizer)
are not tensors: as a user would, the tests write them in a tensor-less GGUF (what
``convert_hf_to_gguf.py --vocab-only`` writes; here with gguf-py's ``GGUFWriter``) and pass it
with ``--gguf-metadata``, so the command line writes the loadable model GGUF directly.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from weightbridge import api
from weightbridge.planning.rulesfile import (
    bundled_rules,
    expand_source_ops,
    load_renames,
    read_hf_config,
    resolve_params,
)

pytestmark = [pytest.mark.torch, pytest.mark.gguf, pytest.mark.transformers]

RULES = "llama_hf_to_gguf"
# Tiny LlamaForCausalLM configurations: grouped-query attention without biases and untied
# output, and the other way round (as many key/value heads as query heads, biases, tied).
# A wide initializer makes attention far from uniform, so a wrong q/k order changes logits.
CONFIGS: dict[str, dict[str, Any]] = {
    "gqa": {"num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False},
    "mha_bias_tied": {
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "tie_word_embeddings": True,
        "attention_bias": True,
        "mlp_bias": True,
    },
}


def _llama(folder: Path, **overrides: Any) -> Any:
    """A random LlamaForCausalLM (2 layers) saved as a Hugging Face folder; the model."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        initializer_range=0.5,
        **overrides,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms start as ones and biases as zeros: a swap would not show
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.normal_(0.0 if name.endswith("bias") else 1.0, 0.3)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "weightbridge", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"weightbridge {' '.join(args)} failed:\n{proc.stderr}")
    return proc


def _gguf_tensors(path: Path) -> dict[str, np.ndarray]:
    import gguf

    return {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}


def _permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``, from its formula (the oracle for our plan's ops)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _with_llama_metadata(tensors: dict[str, np.ndarray], config: Any, path: Path) -> None:
    """A GGUF of `tensors` (unchanged) with the key-values transformers reads for LLaMA and a
    small tokenizer; without tensors, the vocab-only GGUF ``--gguf-metadata`` takes."""
    import gguf

    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny-llama")
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(config.rope_theta)
    w.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    w.add_vocab_size(config.vocab_size)
    # A SentencePiece-style vocabulary, as convert_hf_to_gguf.py --vocab-only writes one.
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>", *(f"t{i}" for i in range(3, config.vocab_size))])
    w.add_token_scores([0.0] * config.vocab_size)
    w.add_token_types([2, 3, 3, *([1] * (config.vocab_size - 3))])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, array in tensors.items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _logits(model: Any, vocab: int) -> np.ndarray:
    import torch

    ids = (torch.arange(24).reshape(2, 12) * 7) % vocab
    with torch.no_grad():
        return np.asarray(model(ids).logits.float().numpy())


def _load_gguf(path: Path, config: Any) -> Any:
    """transformers' model from a GGUF. Its LLaMA key-values have no bias flags (llama.cpp
    sees bias tensors by their presence), so those come from the original config."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent,
        gguf_file=path.name,
        dtype=torch.float32,
        attention_bias=config.attention_bias,
        mlp_bias=config.mlp_bias,
    ).eval()


def test_the_rules_are_shipped_and_take_head_counts_as_hugging_face_reads_them() -> None:
    assert RULES in bundled_rules()
    # a config.json without num_key_value_heads (LLaMA 1/2-7B): as many as query heads
    assert resolve_params(RULES, {}, {"num_attention_heads": 32}, "config.json") == {
        "n_head": 32,
        "n_head_kv": 32,
    }
    # an explicit parameter overrides the config
    config = {"num_attention_heads": 32, "num_key_value_heads": 8}
    assert resolve_params(RULES, {"n_head_kv": "4"}, config, "config.json") == {
        "n_head": 32,
        "n_head_kv": 4,
    }


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_every_name_is_gguf_pys_llama_name_for_its_source(tmp_path: Path, case: str) -> None:
    """(a) Each name the rules produce is in gguf-py's LLaMA tensor table, and is the name
    gguf-py's own HF -> GGUF map (``TensorNameMap``) gives its source tensor."""
    import gguf
    from gguf.constants import MODEL_ARCH, MODEL_TENSORS, TENSOR_NAMES

    folder = tmp_path / "hf"
    model = _llama(folder, **CONFIGS[case])
    n_layers = model.config.num_hidden_layers
    config, config_path = read_hf_config(str(folder))
    expansion = expand_source_ops(
        RULES,
        api.spec_of(str(folder)),
        renames=load_renames(RULES),
        params=resolve_params(RULES, {}, config, config_path),
    )
    table = {
        TENSOR_NAMES[kind].format(bid=b) + suffix
        for kind in MODEL_TENSORS[MODEL_ARCH.LLAMA]
        for b in range(n_layers)
        for suffix in (".weight", ".bias")
    }
    name_map = gguf.get_tensor_name_map(MODEL_ARCH.LLAMA, n_layers)
    hf_names = set(model.state_dict())
    produced = {
        t.name: expansion.transforms[re.escape(t.name)].original_key for t in expansion.target
    }
    assert set(produced.values()) == set(api.spec_of(str(folder)).names)
    assert len(produced) == len(hf_names) - (1 if model.config.tie_word_embeddings else 0)
    for name, source in produced.items():
        assert name in table, f"{source} -> {name}, which gguf-py's LLaMA table lacks"
        assert name_map.get_name(source, try_suffixes=(".weight", ".bias")) == name, source


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_transformers_loads_our_gguf_and_gives_the_same_logits(tmp_path: Path, case: str) -> None:
    """(b) The functional oracle, as a user runs it: a vocab-only GGUF (key-values, no tensors)
    passed with --gguf-metadata, the command line converts (head counts from config.json) to
    the model's GGUF, transformers loads it (undoing llama.cpp's permutation) and gives the
    original model's logits. The permuted tensors also equal llama.cpp's formula bit for bit,
    and a GGUF without the permutation gives other logits (the oracle sees it)."""
    pytest.importorskip("accelerate")  # transformers loads a GGUF only with it
    import gguf

    folder = tmp_path / "hf"
    model = _llama(folder, **CONFIGS[case])
    cfg = model.config
    vocab = tmp_path / "vocab.gguf"
    _with_llama_metadata({}, cfg, vocab)
    out = tmp_path / "out"
    _cli("convert", str(folder), "-o", str(out), "--rules", RULES, "--format", "gguf",
         "--gguf-metadata", str(vocab))  # fmt: skip
    gguf_path = out / "model.gguf"
    ours = _gguf_tensors(gguf_path)
    reader = gguf.GGUFReader(gguf_path)
    copied = gguf.GGUFReader(vocab).fields
    for key in ("general.architecture", "llama.attention.head_count_kv", "tokenizer.ggml.tokens"):
        assert key in reader.fields and key in copied
    assert reader.fields["llama.attention.head_count_kv"].contents() == cfg.num_key_value_heads

    hf = {k: v.numpy() for k, v in model.state_dict().items()}
    for b in range(cfg.num_hidden_layers):
        for suffix in ("weight", "bias") if cfg.attention_bias else ("weight",):
            q = hf[f"model.layers.{b}.self_attn.q_proj.{suffix}"]
            k = hf[f"model.layers.{b}.self_attn.k_proj.{suffix}"]
            want_q = _permute(q, cfg.num_attention_heads, cfg.num_attention_heads)
            want_k = _permute(k, cfg.num_attention_heads, cfg.num_key_value_heads)
            np.testing.assert_array_equal(ours[f"blk.{b}.attn_q.{suffix}"], want_q)
            np.testing.assert_array_equal(ours[f"blk.{b}.attn_k.{suffix}"], want_k)
            assert not np.array_equal(want_q, q)

    want = _logits(model, cfg.vocab_size)
    got = _logits(_load_gguf(gguf_path, cfg), cfg.vocab_size)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)

    # Control: the same names without the permutation (each tensor's plain HF value).
    plain = dict(ours)
    for b in range(cfg.num_hidden_layers):
        plain[f"blk.{b}.attn_q.weight"] = hf[f"model.layers.{b}.self_attn.q_proj.weight"]
        plain[f"blk.{b}.attn_k.weight"] = hf[f"model.layers.{b}.self_attn.k_proj.weight"]
    control = tmp_path / "control" / "model.gguf"
    control.parent.mkdir()
    _with_llama_metadata(plain, cfg, control)
    wrong = _logits(_load_gguf(control, cfg), cfg.vocab_size)
    assert np.abs(wrong - want).max() > 1e-2


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_a_q8_0_gguf_loads_in_transformers_as_gguf_pys_own_quantization(
    tmp_path: Path, case: str
) -> None:
    """``--dtype q8_0 --gguf-metadata``: transformers loads our Q8_0 GGUF and its logits equal
    those of the original model holding gguf-py's quantize -> dequantize of the same tensors
    (F16 for rows that are not whole blocks, F32 for norms and 1-D tensors)."""
    pytest.importorskip("accelerate")
    import gguf
    import torch
    from gguf.constants import MODEL_ARCH

    folder = tmp_path / "hf"
    model = _llama(folder, **CONFIGS[case])
    cfg = model.config
    vocab = tmp_path / "vocab.gguf"
    _with_llama_metadata({}, cfg, vocab)
    out = tmp_path / "out"
    _cli("convert", str(folder), "-o", str(out), "--rules", RULES, "--format", "gguf",
         "--dtype", "q8_0", "--gguf-metadata", str(vocab))  # fmt: skip
    reader = gguf.GGUFReader(out / "model.gguf")
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert sum(t == gguf.GGMLQuantizationType.Q8_0 for t in types.values()) >= 6
    assert gguf.GGMLQuantizationType.F16 in types.values()  # ffn_down: rows of 48

    # The expected model: each HF tensor as gguf-py stores it in the type our file declares
    # (a Q8_0 block lies within a row, so quantizing commutes with the q/k row permutation).
    name_map = gguf.get_tensor_name_map(MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    expected = {}
    for hf_name, tensor in model.state_dict().items():
        w = tensor.numpy()
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name not in types:  # lm_head tied to the embedding
            gguf_name = "token_embd.weight"
        kind = types[gguf_name]
        if kind == gguf.GGMLQuantizationType.Q8_0:
            stored = gguf.quants.dequantize(gguf.quants.quantize(w, kind), kind)
        elif kind == gguf.GGMLQuantizationType.F16:
            stored = w.astype(np.float16).astype(np.float32)
        else:
            assert kind == gguf.GGMLQuantizationType.F32, (gguf_name, kind)
            stored = w
        expected[hf_name] = torch.from_numpy(np.ascontiguousarray(stored, dtype=np.float32))
    changed = sum(not np.array_equal(expected[k].numpy(), v.numpy())
                  for k, v in model.state_dict().items())  # fmt: skip
    assert changed >= 6  # the quantization shows in the oracle
    unquantized = _logits(model, cfg.vocab_size)
    model.load_state_dict(expected)
    want = _logits(model, cfg.vocab_size)
    got = _logits(_load_gguf(out / "model.gguf", cfg), cfg.vocab_size)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert np.abs(got - unquantized).max() > 1e-3  # the oracle sees the quantization


def test_explicit_params_a_saved_plan_replays_and_errors_say_what_to_pass(tmp_path: Path) -> None:
    """A bare safetensors file (no config.json) needs the head counts on the command line; a
    saved plan holds plain ops and replays without them; wrong or missing counts are errors
    that name the parameter or the tensor."""
    folder = tmp_path / "hf"
    _llama(folder, **CONFIGS["gqa"])
    bare = tmp_path / "bare" / "model.safetensors"
    bare.parent.mkdir()
    shutil.copy(folder / "model.safetensors", bare)

    missing = _cli("convert", str(bare), "-o", str(tmp_path / "x"), "--rules", RULES, check=False)
    assert missing.returncode == 2
    assert "parameter 'n_head'" in missing.stderr
    assert "--rules-param n_head=N" in missing.stderr

    # n_head_kv defaults to n_head only when a config.json leaves it out, not without one
    half = _cli("plan", str(bare), "--rules", RULES, "--rules-param", "n_head=4", check=False)
    assert half.returncode == 2 and "--rules-param n_head_kv=N" in half.stderr

    params = ["--rules-param", "n_head=4", "--rules-param", "n_head_kv=2"]
    first = tmp_path / "first"
    plan = tmp_path / "plan.json"
    _cli(
        "convert",
        str(bare),
        "-o",
        str(first),
        "--rules",
        RULES,
        *params,
        "--format",
        "gguf",
        "--save-plan",
        str(plan),
    )
    again = tmp_path / "again"
    _cli("convert", str(bare), "-o", str(again), "--plan", str(plan), "--format", "gguf")
    from_folder = tmp_path / "from_folder"
    _cli("convert", str(folder), "-o", str(from_folder), "--rules", RULES, "--format", "gguf")
    a, b, c = (_gguf_tensors(d / "model.gguf") for d in (first, again, from_folder))
    assert a.keys() == b.keys() == c.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
        np.testing.assert_array_equal(a[name], c[name])

    # an explicit parameter overrides config.json
    shown = _cli("plan", str(folder), "--rules", RULES, "--rules-param", "n_head_kv=4").stdout
    assert "reshape(4,2,2,32)" in shown  # k's 16 rows as 4 heads, not config.json's 2

    unfit = _cli(
        "plan",
        str(bare),
        "--rules",
        RULES,
        "--rules-param",
        "n_head=3",
        "--rules-param",
        "n_head_kv=2",
        check=False,
    )
    assert unfit.returncode == 2
    assert "q_proj.weight" in unfit.stderr and "n_head" in unfit.stderr

    unknown = _cli("plan", str(folder), "--rules", RULES, "--rules-param", "heads=4", check=False)
    assert unknown.returncode == 2
    assert "declares no such parameter" in unknown.stderr and "n_head_kv" in unknown.stderr
