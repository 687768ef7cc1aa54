"""Benchmark: planning time of the automatic matcher, from metadata alone.

Three synthetic model pairs with a known ground truth:

* ``dense-1k``: a LLaMA-like decoder (~1,000 tensors);
* ``moe-20k``: a Mixtral-like decoder with many experts of equal shapes (~20,000 tensors,
  experts ``w1``/``w2``/``w3``);
* ``moe-100k``: a DeepSeek-like decoder, 128 layers of 256 experts (~99,000 tensors; DeepSeek-V3
  has ~90,000), experts ``gate_proj``/``up_proj``/``down_proj`` against ``gate``/``up``/``down``,
  so that gate and up (same shape) are told apart by their names.

The source side has torch-style names in definition order (``model.layers.3.self_attn.q_proj
.weight``, ``...block_sparse_moe.experts.17.w1.weight``, [out, in] kernels); the target side
has Flax-style names sorted as jax gives them (``params/layers_3/attn/query/kernel``,
``params/layers_3/moe/experts_17/w1/kernel``, [in, out] kernels) and one nesting level less
(``layers_3`` at the root, no ``model.layers`` container). Each case is planned in both
directions, without hints, and the plan is checked against the ground truth: every target gets
the right source, kernels are transposed and nothing else is. The 2-D orientation must be
decided up front (by shapes): a case that needed both orientations tried says so.

Targets (the issue "Certain or refuse"): moe-20k in <= 1 s and moe-100k in <= 5 s, each
direction; a PASS/FAIL line per case, and exit status 1 on any FAIL or wrong plan. A run slower
than 3x its target is not repeated (it fails either way).

Usage: python scripts/bench_match.py [--repeat N] [--layers-moe L] [--experts E]
           [--layers-100k L] [--experts-100k E] [--skip-100k]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

from weightbridge import api
from weightbridge.errors import WeightbridgeError
from weightbridge.ops import Op, Permute
from weightbridge.spec import CheckpointSpec, TensorSpec

E, F, V = 8, 16, 32  # model, hidden and vocabulary sizes: planning only reads shapes

# Per naming style: the torch MoE block's name, and each expert weight's torch name, Flax name
# and torch shape, in definition order.
_EXPERTS = {
    "mixtral": (
        "block_sparse_moe",
        [("w1", "w1", (F, E)), ("w2", "w2", (E, F)), ("w3", "w3", (F, E))],
    ),
    "deepseek": (
        "mlp",
        [("gate_proj", "gate", (F, E)), ("up_proj", "up", (F, E)), ("down_proj", "down", (E, F))],
    ),
}


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


def _layer(i: int, moe_experts: int, style: str) -> list[Pair]:
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
        block, weights = _EXPERTS[style]
        m = f"{t}{block}."
        out.append(Pair(f"{m}gate.weight", (moe_experts, E), f + "moe/router/kernel", True))
        for j in range(moe_experts):
            for tw, fw, shape in weights:
                out.append(
                    Pair(
                        f"{m}experts.{j}.{tw}.weight",
                        shape,
                        f"{f}moe/experts_{j}/{fw}/kernel",
                        True,
                    )
                )
    else:
        for name, shape in (("gate", (F, E)), ("up", (F, E)), ("down", (E, F))):
            out.append(Pair(f"{t}mlp.{name}_proj.weight", shape, f"{f}mlp/{name}/kernel", True))
    return out


def model(layers: int, moe_experts: int = 0, style: str = "mixtral") -> list[Pair]:
    pairs = [Pair("model.embed_tokens.weight", (V, E), "params/embed_tokens/embedding", False)]
    for i in range(layers):
        pairs += _layer(i, moe_experts, style)
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


def run(name: str, pairs: list[Pair], repeat: int, target: float | None = None) -> bool:
    """Plan both directions; print one line each (and a PASS/FAIL line when there is a
    target). True when every plan is right and within the target."""
    torch_side, flax_side = specs(pairs)
    ok, worst = True, 0.0
    for direction, (src, tgt, frm, to) in {
        "torch->flax": (torch_side, flax_side, "pytorch", "flax"),
        "flax->torch": (flax_side, torch_side, "flax", "pytorch"),
    }.items():
        best = float("inf")
        plan = None
        error = ""
        log: list[str] = []
        for _ in range(repeat):
            log = []
            start = time.perf_counter()
            try:
                plan = api.plan(src, tgt, from_framework=frm, to_framework=to, log=log)
            except WeightbridgeError as e:
                error = f"ERROR {type(e).__name__}: {str(e).splitlines()[0]}"
                for line in str(e).splitlines()[1:6]:
                    error += f"\n    {line}"
            best = min(best, time.perf_counter() - start)
            if target is not None and best > 3 * target:
                break  # far off the target: repeating would not change the verdict
        verdict = error or check(plan, pairs, direction == "torch->flax")
        if any("shapes alone did not decide" in line for line in log):
            verdict += " (2-D orientation undecided by shapes: matched in both orientations)"
        ok = ok and verdict == "ok"
        worst = max(worst, best)
        print(
            f"{name:<10} {direction:<12} {len(pairs):>7} tensors  {best:8.3f} s  "
            f"{len(pairs) / best:>10,.0f} tensors/s  {verdict}",
            flush=True,
        )
    if target is not None:
        passed = ok and worst <= target
        print(
            f"{name:<10} target <= {target:g} s per direction: {'PASS' if passed else 'FAIL'} "
            f"(slowest {worst:.3f} s{'' if ok else ', and a plan is wrong'})",
            flush=True,
        )
        ok = passed
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the best is shown")
    parser.add_argument("--layers-dense", type=int, default=111, help="layers of dense-1k")
    parser.add_argument("--layers-moe", type=int, default=100, help="layers of moe-20k")
    parser.add_argument("--experts", type=int, default=64, help="experts per layer of moe-20k")
    parser.add_argument("--layers-100k", type=int, default=128, help="layers of moe-100k")
    parser.add_argument(
        "--experts-100k", type=int, default=256, help="experts per layer of moe-100k"
    )
    parser.add_argument("--skip-100k", action="store_true", help="leave out moe-100k")
    args = parser.parse_args()
    ok = run("dense-1k", model(args.layers_dense), args.repeat)
    ok &= run("moe-20k", model(args.layers_moe, args.experts), args.repeat, target=1.0)
    if not args.skip_100k:
        pairs = model(args.layers_100k, args.experts_100k, style="deepseek")
        ok &= run("moe-100k", pairs, args.repeat, target=5.0)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
