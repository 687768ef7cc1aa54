"""A Hugging Face LLaMA saved by PyTorch -> the Flax LLaMA of transformers, from files, streamed.

`save_pretrained` writes a model folder (config.json, model.safetensors). weightbridge reads the
folder's weights file, takes the names and shapes to produce from the Flax model's parameters
(no values), plans the mapping (q/k/v/o, gate/up/down, the two norms of every layer, kernels
transposed to [in, out]), streams it into a safetensors file, and verifies every tensor against
the source through the plan. The Flax model then gives the PyTorch model's logits.

Run:   python examples/09_llama_torch_to_flax.py [WORKDIR]
Needs: pip install 'weightbridge[jax]' torch 'transformers<5'   (v5 has no Flax classes)
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np
import torch
import transformers
from flax.traverse_util import unflatten_dict
from safetensors.numpy import load_file

import weightbridge.api as wb

CONFIG = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def main(workdir: str) -> None:
    config = transformers.LlamaConfig(**CONFIG)
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(config).eval()
    folder = os.path.join(workdir, "llama-torch")
    theirs.save_pretrained(folder)  # a model folder, as on the Hub
    print("saved:", sorted(os.listdir(folder)))

    mine = transformers.FlaxLlamaForCausalLM(config, seed=0)
    plan = wb.plan(folder, mine.params)  # the target: names and shapes of the Flax params
    print(plan.explain(), "\n")
    out = os.path.join(workdir, "llama-flax")
    print(wb.convert(folder, out, plan=plan).summary())
    print("verified:", wb.verify(folder, out, plan=plan), "tensors equal to the source")

    flat = load_file(os.path.join(out, "model.safetensors"))
    params = unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})

    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        want = theirs(torch.from_numpy(ids)).logits.numpy()
    got = np.asarray(mine(ids, params=params).logits)
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * scale)
    diff = float(np.abs(got - want).max())
    print(f"OK: the Flax LLaMA computes the PyTorch LLaMA's logits (max |difference| {diff:.1e})")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(tmp)
