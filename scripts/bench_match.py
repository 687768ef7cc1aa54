"""Benchmark: planning time of the automatic matcher, from metadata alone.

Two synthetic model pairs with a known ground truth:

* ``dense-1k``: a LLaMA-like decoder (~1,000 tensors);
* ``moe-20k``: a Mixtral-like decoder with many experts of equal shapes (~20,000 tensors).

The source side has torch-style names in definition order (``model.layers.3.self_attn.q_proj
.weight``, ``...block_sparse_moe.experts.17.w1.weight``, [out, in] kernels); the target side
has Flax-style names sorted as jax gives them (``params/layers_3/attn/query/kernel``,
``params/layers_3/moe/experts_17/w1/kernel``, [in, out] kernels) and one nesting level less
(``layers_3`` at the root, no ``model.layers`` container). Each case is planned in both
directions and the plan is checked against the ground truth: every target gets the right
source, kernels are transposed and nothing else is.

Usage: python scripts/bench_match.py [--repeat N] [--layers-moe L] [--experts E]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from weightbridge import api
from weightbridge.errors import WeightbridgeError
from weightbridge.ops import Op, Permute
from weightbridge.spec import CheckpointSpec, TensorSpec

E, F, V = 8, 16, 32  # model, hidden and vocabulary sizes: planning only reads shapes


@dataclass
class Pair:
    """A source/target tensor pair of the ground truth."""

    torch_name: str
    torch_shape: tuple[int, ...]
    flax_name: str
    kernel: bool  # a dense kernel: [out, in] on the torch side, [in, out] on the Flax side

    @property
    def flax_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.torch_shape)) if self.kernel else self.torch_shape


def _layer(i: int, moe_experts: int) -> list[Pair]:
    t, f = f"model.layers.{i}.", f"params/layers_{i}/"
    out = [
        Pair(t + "input_layernorm.weight", (E,), f + "input_norm/scale", False),
        Pair(t + "self_attn.q_proj.weight", (E, E), f + "attn/query/kernel", True),
        Pair(t + "self_attn.k_proj.weight", (E // 2, E), f + "attn/key/kernel", True),
        Pair(t + "self_attn.v_proj.weight", (E // 2, E), f + "attn/value/kernel", True),
        Pair(t + "self_attn.o_proj.weight", (E, E), f + "attn/out/kernel", True),
        Pair(t + "post_attention_layernorm.weight", (E,), f + "post_attention_norm/scale", False),
    ]
    if moe_experts:
        m = t + "block_sparse_moe."
        out.append(Pair(m + "gate.weight", (moe_experts, E), f + "moe/router/kernel", True))
        for j in range(moe_experts):
            for w, shape in (("w1", (F, E)), ("w2", (E, F)), ("w3", (F, E))):
                out.append(
                    Pair(
                        f"{m}experts.{j}.{w}.weight", shape, f"{f}moe/experts_{j}/{w}/kernel", True
                    )
                )
    else:
        for name, shape in (("gate", (F, E)), ("up", (F, E)), ("down", (E, F))):
            out.append(Pair(f"{t}mlp.{name}_proj.weight", shape, f"{f}mlp/{name}/kernel", True))
    return out


def model(layers: int, moe_experts: int = 0) -> list[Pair]:
    pairs = [Pair("model.embed_tokens.weight", (V, E), "params/embed_tokens/embedding", False)]
    for i in range(layers):
        pairs += _layer(i, moe_experts)
    pairs.append(Pair("model.norm.weight", (E,), "params/final_norm/scale", False))
    pairs.append(Pair("lm_head.weight", (V, E), "params/lm_head/kernel", True))
    return pairs


def specs(pairs: list[Pair]) -> tuple[CheckpointSpec, CheckpointSpec]:
    torch_side = CheckpointSpec.of(TensorSpec(p.torch_name, p.torch_shape, "BF16") for p in pairs)
    flax_side = CheckpointSpec.of(
        sorted((TensorSpec(p.flax_name, p.flax_shape, "BF16") for p in pairs), key=lambda t: t.name)
    )
    return torch_side, flax_side


def check(plan: object, pairs: list[Pair], to_flax: bool) -> str:
    """'ok', or what is wrong with the plan (first few differences)."""
    expected: dict[str, tuple[str, tuple[Op, ...]]] = {}
    for p in pairs:
        ops: tuple[Op, ...] = (Permute((1, 0)),) if p.kernel else ()
        if to_flax:
            expected[p.flax_name] = (p.torch_name, ops)
        else:
            expected[p.torch_name] = (p.flax_name, ops)
    wrong = []
    seen = set()
    for step in plan.steps:  # type: ignore[attr-defined]
        name = step.target.name
        seen.add(name)
        want = expected.get(name)
        got = (step.sources[0] if len(step.sources) == 1 else step.sources, tuple(step.ops))
        if want != got:
            wrong.append(f"{name}: got {got}, want {want}")
    missing = set(expected) - seen
    if not wrong and not missing:
        return "ok"
    lines = [f"WRONG: {len(wrong)} step(s) differ, {len(missing)} target(s) missing"]
    lines += [f"    {w}" for w in wrong[:5]]
    return "\n".join(lines)


def run(name: str, pairs: list[Pair], repeat: int) -> None:
    torch_side, flax_side = specs(pairs)
    for direction, (src, tgt, frm, to) in {
        "torch->flax": (torch_side, flax_side, "pytorch", "flax"),
        "flax->torch": (flax_side, torch_side, "flax", "pytorch"),
    }.items():
        best = float("inf")
        plan = None
        error = ""
        for _ in range(repeat):
            start = time.perf_counter()
            try:
                plan = api.plan(src, tgt, from_framework=frm, to_framework=to)
            except WeightbridgeError as e:
                error = f"ERROR {type(e).__name__}: {str(e).splitlines()[0]}"
                for line in str(e).splitlines()[1:6]:
                    error += f"\n    {line}"
            best = min(best, time.perf_counter() - start)
        verdict = error or check(plan, pairs, direction == "torch->flax")
        print(
            f"{name:<10} {direction:<12} {len(pairs):>7} tensors  {best:8.3f} s  "
            f"{len(pairs) / best:>10,.0f} tensors/s  {verdict}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the best is shown")
    parser.add_argument("--layers-dense", type=int, default=111, help="layers of dense-1k")
    parser.add_argument("--layers-moe", type=int, default=100, help="layers of moe-20k")
    parser.add_argument("--experts", type=int, default=64, help="experts per layer of moe-20k")
    args = parser.parse_args()
    run("dense-1k", model(args.layers_dense), args.repeat)
    run("moe-20k", model(args.layers_moe, args.experts), args.repeat)


if __name__ == "__main__":
    main()
