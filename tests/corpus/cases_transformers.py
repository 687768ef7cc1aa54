"""transformers PyTorch models -> their Flax twins, from tiny configs (random init only).

Source ("theirs"): the PyTorch model's ``state_dict()`` as numpy, in its order and names,
nothing dropped (tied embeddings appear under every name torch gives them; frozen sinusoidal
position tables that Flax computes instead of storing are left in, for the matcher to leave
unused). Target ("mine"): the Flax model's variables flattened with ``/`` under their
collection (``params/encoder/layer/0/attention/self/query/kernel``; ResNet/RegNet also have
``batch_stats/...``), zeros, in Flax's own order.

Every pair is proven valid before weightbridge is judged: `build` loads the Flax model with
the weights of transformers' own converter (``convert_pytorch_state_dict_to_flax``) and checks
that it computes the torch model's outputs; a pair that fails that check raises (it is not a
pair). `ORACLE[case name]` keeps that converter's flat params (mine's names), for diagnosing a
wrong adapt tensor by tensor.

Needs ``transformers<5`` (v5 dropped the Flax models); the cases were written against 4.57.6.
The torch model is perturbed (`harness.perturb_torch`: LayerNorm/BatchNorm/biases random) so
that norm and bias mix-ups change outputs; frozen tables (``requires_grad=False``) keep their
values, since Flax computes those itself.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from tests.corpus.harness import Case, Pair, perturb_torch

FW = ("torch", "jax", "transformers")
SEQ = 7
VOCAB = 99
# Shared tiny sizes: hidden 32, 2 layers, 4 heads, an odd FFN width (no accidental squares).
BERTISH = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
)
SEQ2SEQ = dict(
    vocab_size=VOCAB,
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=37,
    decoder_ffn_dim=37,
    max_position_embeddings=64,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    decoder_start_token_id=2,
)
T5ISH = dict(
    vocab_size=VOCAB,
    d_model=32,
    d_kv=8,
    d_ff=37,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    decoder_start_token_id=0,
    pad_token_id=0,
)
DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
)

# Oracle params (flat, mine's names) from transformers' converter, filled by each build.
ORACLE: dict[str, dict[str, np.ndarray]] = {}


# --- inputs ---------------------------------------------------------------------------------------


def _ids(seed: int, n: int = SEQ) -> np.ndarray:
    # ids 3..VOCAB-1: no pad/bos/eos, so no model treats a position specially
    return np.random.default_rng(seed).integers(3, VOCAB, (1, n)).astype(np.int64)


def text(**_: Any) -> dict[str, np.ndarray]:
    return {"input_ids": _ids(11)}


def text_with_types(**_: Any) -> dict[str, np.ndarray]:
    # FlaxElectraModel's default token_type_ids are ones (torch's are zeros): pass them
    return {"input_ids": _ids(11), "token_type_ids": np.zeros((1, SEQ), np.int64)}


def seq2seq(**_: Any) -> dict[str, np.ndarray]:
    return {"input_ids": _ids(11), "decoder_input_ids": _ids(12, 5)}


def pixels(size: int = 16, channels: int = 3) -> Callable[..., dict[str, np.ndarray]]:
    def make(**_: Any) -> dict[str, np.ndarray]:
        x = np.random.default_rng(13).standard_normal((1, channels, size, size))
        return {"pixel_values": x.astype(np.float32)}

    return make


def audio(**_: Any) -> dict[str, np.ndarray]:
    x = np.random.default_rng(14).standard_normal((1, 400)).astype(np.float32)
    return {"input_values": x}


def whisper_inputs(**_: Any) -> dict[str, np.ndarray]:
    feats = np.random.default_rng(15).standard_normal((1, 8, 32)).astype(np.float32)
    return {"input_features": feats, "decoder_input_ids": _ids(12, 5)}


def clip_inputs(**_: Any) -> dict[str, np.ndarray]:
    return {**text(), **pixels()()}


# --- the pair builder -----------------------------------------------------------------------------

OUTPUT_FIELDS = (
    "logits_per_image",
    "text_embeds",
    "image_embeds",
    "logits",
    "last_hidden_state",
    "encoder_last_hidden_state",
    "pooler_output",
)


def _outputs(out: Any) -> np.ndarray:
    """The compared outputs, flattened and concatenated (every field the model returns)."""
    parts = []
    for name in OUTPUT_FIELDS:
        value = getattr(out, name, None)
        if value is not None and not isinstance(value, tuple):
            parts.append(np.asarray(value, dtype=np.float64).ravel())
    if not parts:
        raise ValueError(f"no known output field in {type(out).__name__}")
    return np.concatenate(parts)


def _flatten(tree: Any) -> dict[str, np.ndarray]:
    from flax.traverse_util import flatten_dict

    return {"/".join(k): np.asarray(v) for k, v in flatten_dict(tree).items()}


def _collections(flax_params: Any) -> dict[str, Any]:
    """A FlaxPreTrainedModel's params as {collection: tree} (BatchNorm models already are)."""
    if isinstance(flax_params, dict) and "batch_stats" in flax_params:
        return dict(flax_params)
    return {"params": flax_params}


class _ClipCompatNumpy:
    """jax.numpy, but `clip` still takes the ``a_min``/``a_max`` keywords transformers 4.x uses."""

    def __getattr__(self, name: str) -> Any:
        import jax.numpy as jnp

        return getattr(jnp, name)

    @staticmethod
    def clip(x: Any, a_min: Any = None, a_max: Any = None, **kw: Any) -> Any:
        import jax.numpy as jnp

        return jnp.clip(x, kw.pop("min", a_min), kw.pop("max", a_max), **kw)


def _jax_compat() -> None:
    """Newer jax dropped ``jnp.clip(a_max=)``; give the T5 modules a shim, not jax itself."""
    import importlib

    import jax.numpy as jnp

    try:
        jnp.clip(jnp.zeros(1), a_max=0)
    except TypeError:
        for name in ("t5", "longt5"):
            mod = importlib.import_module(f"transformers.models.{name}.modeling_flax_{name}")
            mod.jnp = _ClipCompatNumpy()  # type: ignore[attr-defined]


def hf_pair(
    name: str,
    torch_cls: str,
    flax_cls: str,
    config_cls: str,
    config: dict[str, Any],
    inputs: Callable[..., dict[str, np.ndarray]],
    *,
    rtol: float = 1e-4,
    atol: float = 1e-4,
) -> Pair:
    import jax
    import jax.numpy as jnp
    import torch
    import transformers
    from flax.traverse_util import unflatten_dict

    _jax_compat()
    if not hasattr(transformers, flax_cls):
        raise ImportError(
            f"transformers {transformers.__version__} has no {flax_cls}: the Flax models need "
            "transformers<5 (these cases were written against 4.57.6)"
        )
    from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

    cfg = getattr(transformers, config_cls)(**config)
    torch.manual_seed(0)
    pt = getattr(transformers, torch_cls)(cfg).eval()
    frozen = {n: p.detach().clone() for n, p in pt.named_parameters() if not p.requires_grad}
    perturb_torch(pt, seed=1)
    with torch.no_grad():
        for n, p in pt.named_parameters():
            if n in frozen:
                p.copy_(frozen[n])  # computed tables: Flax computes them unperturbed

    x = inputs()
    with torch.no_grad():
        want = _outputs(pt(**{k: torch.from_numpy(v) for k, v in x.items()}))

    sd = pt.state_dict()
    # Views, not copies: tied tensors (BART's shared/embed_tokens, T5's shared) stay one array
    # in memory, as they are one tensor in the torch model, and adapt plans them once.
    theirs = {k: v.detach().cpu().numpy() for k, v in sd.items()}

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "jax.nn.one_hot input", DeprecationWarning)
        fx = getattr(transformers, flax_cls)(cfg, seed=0)  # runs the model once to init
    mine_tree = _collections(fx.params)
    mine = {k: np.zeros(v.shape, np.float32) for k, v in _flatten(mine_tree).items()}
    has_stats = "batch_stats" in mine_tree

    def run_mine(flat: dict[str, np.ndarray]) -> np.ndarray:
        tree = unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in flat.items()})
        params = tree if has_stats else tree["params"]
        with warnings.catch_warnings():
            # LongT5's Flax code one-hots a float array; jax deprecates that (not our code)
            warnings.filterwarnings("ignore", "jax.nn.one_hot input", DeprecationWarning)
            return _outputs(fx(**{k: jnp.asarray(v) for k, v in x.items()}, params=params))

    # The second oracle: transformers' own converter must make the pair equal.
    converted = convert_pytorch_state_dict_to_flax({k: v.clone() for k, v in sd.items()}, fx)
    oracle_all = _flatten(_collections(jax.tree_util.tree_map(np.asarray, converted)))
    missing = [k for k in mine if k not in oracle_all]
    if missing:
        raise AssertionError(f"{name}: transformers' converter leaves {missing[:3]} unset")
    oracle = {k: oracle_all[k] for k in mine}
    for k, v in oracle.items():
        if v.shape != mine[k].shape:
            raise AssertionError(f"{name}: converter gives {k} {v.shape}, Flax has {mine[k].shape}")
    got = run_mine(oracle)
    scale = max(1.0, float(np.abs(want).max()))
    if not np.allclose(got, want, rtol=rtol, atol=atol * scale):
        diff = float(np.abs(got - want).max())
        raise AssertionError(f"{name}: not a pair (HF-converted Flax differs by {diff:.3g})")
    ORACLE[name] = oracle

    return Pair(
        theirs=theirs,
        mine=mine,
        run_theirs=lambda: want,
        run_mine=run_mine,
        rtol=rtol,
        atol=atol,
    )


def case(
    name: str,
    arch: str,
    config: dict[str, Any],
    inputs: Callable[..., dict[str, np.ndarray]] = text,
    *,
    torch_cls: str | None = None,
    flax_cls: str | None = None,
    config_cls: str | None = None,
    expect: str = "equal",
) -> Case:
    """A Case for transformers' ``<arch>Model`` / ``Flax<arch>Model`` (or the given classes)."""

    @functools.cache
    def build() -> Pair:
        return hf_pair(
            name,
            torch_cls or f"{arch}Model",
            flax_cls or f"Flax{torch_cls or arch + 'Model'}",
            config_cls or f"{arch}Config",
            config,
            inputs,
        )

    return Case(name=name, build=build, expect=expect, framework=FW)  # type: ignore[arg-type]


VISION = dict(
    image_size=16,
    patch_size=4,
    num_channels=3,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
)
CNN = dict(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2])

CASES: list[Case] = [
    # encoders
    case("hf_bert", "Bert", BERTISH),
    case("hf_roberta", "Roberta", {**BERTISH, "pad_token_id": 1}),
    case("hf_xlm_roberta", "XLMRoberta", {**BERTISH, "pad_token_id": 1}),
    case("hf_roberta_prelayernorm", "RobertaPreLayerNorm", {**BERTISH, "pad_token_id": 1}),
    case(
        "hf_distilbert",
        "DistilBert",
        dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=37),
    ),
    case("hf_electra", "Electra", {**BERTISH, "embedding_size": 16}, text_with_types),
    case("hf_albert", "Albert", {**BERTISH, "embedding_size": 16}),
    case("hf_bigbird", "BigBird", {**BERTISH, "attention_type": "original_full"}),
    case("hf_roformer", "RoFormer", BERTISH),
    # decoders
    case(
        "hf_gpt2_lmhead",
        "GPT2",
        dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64),
        torch_cls="GPT2LMHeadModel",
    ),
    case(
        "hf_gpt_neo",
        "GPTNeo",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            attention_types=[[["global", "local"], 1]],
            window_size=4,
            max_position_embeddings=64,
        ),
    ),
    case(
        "hf_gptj",
        "GPTJ",
        dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64),
    ),
    case(
        "hf_opt",
        "OPT",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            ffn_dim=37,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=16,
        ),
    ),
    case(
        "hf_xglm",
        "XGLM",
        dict(
            vocab_size=VOCAB,
            d_model=32,
            num_layers=2,
            attention_heads=4,
            ffn_dim=37,
            max_position_embeddings=64,
        ),
    ),
    case("hf_bloom", "Bloom", dict(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)),
    case("hf_llama", "Llama", {**DECODER, "num_key_value_heads": 2}),
    case("hf_mistral", "Mistral", {**DECODER, "num_key_value_heads": 2, "sliding_window": 64}),
    case(
        "hf_gemma",
        "Gemma",
        {
            **DECODER,
            "num_key_value_heads": 1,
            "head_dim": 8,
            "hidden_activation": "gelu_pytorch_tanh",
        },
    ),
    # encoder-decoders
    case("hf_bart", "Bart", SEQ2SEQ, seq2seq),
    case("hf_mbart", "MBart", SEQ2SEQ, seq2seq),
    case("hf_blenderbot", "Blenderbot", SEQ2SEQ, seq2seq),
    case("hf_blenderbot_small", "BlenderbotSmall", SEQ2SEQ, seq2seq),
    case("hf_pegasus", "Pegasus", SEQ2SEQ, seq2seq),
    case("hf_marian", "Marian", {**SEQ2SEQ, "decoder_start_token_id": 1}, seq2seq),
    # T5 has no biases, square attention and one wi/wo pair: nothing shows whether its 2-D
    # weights are [out, in]; refused with @transpose (mT5's gated wi_0/wi_1 do show it).
    case("hf_t5", "T5", T5ISH, seq2seq, expect="refused"),
    case("hf_mt5", "MT5", {**T5ISH, "feed_forward_proj": "gated-gelu"}, seq2seq),
    # LongT5's local and transient-global relative attention biases have one shape and names
    # that overlap either way: refused, with the hint that pairs them.
    case(
        "hf_longt5",
        "LongT5",
        {
            **T5ISH,
            "encoder_attention_type": "transient-global",
            "local_radius": 2,
            "global_block_size": 2,
        },
        seq2seq,
        expect="refused",
    ),
    case(
        "hf_whisper",
        "Whisper",
        dict(
            vocab_size=VOCAB,
            num_mel_bins=8,
            encoder_layers=2,
            decoder_layers=2,
            d_model=32,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=37,
            decoder_ffn_dim=37,
            max_source_positions=16,
            max_target_positions=32,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
        ),
        whisper_inputs,
    ),
    # audio and vision
    case(
        "hf_wav2vec2",
        "Wav2Vec2",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            conv_dim=(16, 16),
            conv_stride=(4, 2),
            conv_kernel=(8, 3),
            num_conv_pos_embeddings=8,
            num_conv_pos_embedding_groups=4,
            do_stable_layer_norm=True,  # the only variant FlaxWav2Vec2Model implements
            feat_extract_norm="layer",
        ),
        audio,
    ),
    case("hf_vit", "ViT", VISION, pixels()),
    case(
        "hf_beit",
        "Beit",
        {
            **VISION,
            "vocab_size": VOCAB,
            "use_relative_position_bias": True,
            "layer_scale_init_value": 0.1,
        },
        pixels(),
    ),
    case("hf_dinov2", "Dinov2", {**VISION, "mlp_ratio": 2}, pixels()),
    case(
        "hf_clip",
        "CLIP",
        dict(
            text_config=dict(
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=16,
            ),
            vision_config={k: v for k, v in VISION.items() if k != "num_channels"},
            projection_dim=16,
        ),
        clip_inputs,
    ),
    case(
        "hf_clip_vision",
        "CLIPVision",
        {k: v for k, v in VISION.items() if k != "num_channels"},
        pixels(),
    ),
    case("hf_resnet", "ResNet", {**CNN, "layer_type": "bottleneck"}, pixels(32)),
    case("hf_regnet", "RegNet", {**CNN, "groups_width": 4, "layer_type": "y"}, pixels(32)),
]
