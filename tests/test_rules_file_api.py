"""Rules files from Python (``api.plan/convert(rules_file=, rules_params=)``), the same as the
command line's ``--rules``/``--rules-param``; rules without a target are refused, not ignored.

The oracle for the LLaMA q/k permutation is llama.cpp's formula (``LlamaModel.permute`` in
``convert_hf_to_gguf.py``), written out in numpy; gguf-py's reader reads the GGUF back.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from weightbridge import api
from weightbridge.errors import PlanError, RuleError
from weightbridge.io import write_checkpoint
from weightbridge.plan import Plan
from weightbridge.planning.planner import make_plan
from weightbridge.planning.rules import Transform
from weightbridge.spec import CheckpointSpec, TensorSpec

RULES = "llama_hf_to_gguf"
N_HEAD, N_HEAD_KV, HIDDEN = 4, 2, 16


def _llama_like(path: Path) -> dict[str, np.ndarray]:
    """A one-layer LLaMA-named safetensors file (numpy only: the rules see names and shapes)."""
    rng = np.random.default_rng(0)
    kv = HIDDEN // N_HEAD * N_HEAD_KV
    shapes = {
        "model.embed_tokens.weight": (8, HIDDEN),
        "model.layers.0.input_layernorm.weight": (HIDDEN,),
        "model.layers.0.self_attn.q_proj.weight": (HIDDEN, HIDDEN),
        "model.layers.0.self_attn.k_proj.weight": (kv, HIDDEN),
        "model.layers.0.self_attn.v_proj.weight": (kv, HIDDEN),
        "model.layers.0.self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        "model.norm.weight": (HIDDEN,),
    }
    arrays = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_checkpoint(str(path), arrays)
    return arrays


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` (k uses the key/value heads)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _targets(plan: Plan) -> list[str]:
    return [s.target.name for s in plan.steps]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "weightbridge", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_shipped_rules_file_with_parameters_from_python(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    import gguf

    src = tmp_path / "bare" / "model.safetensors"
    arrays = _llama_like(src)
    params = {"n_head": N_HEAD, "n_head_kv": N_HEAD_KV}
    plan = api.plan(str(src), rules_file=RULES, rules_params=params)
    assert "blk.0.attn_q.weight" in _targets(plan)
    # the same plan as the command line's (ints and "NAME=N" text are the same parameters)
    shown = _cli("plan", str(src), "--rules", RULES, "--rules-param", "n_head=4",
                 "--rules-param", "n_head_kv=2")  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert plan.explain().strip() in shown.stdout

    out = tmp_path / "out"
    api.convert(str(src), str(out), rules_file=RULES, rules_params=params, format="gguf")
    got = {t.name: np.array(t.data) for t in gguf.GGUFReader(out / "model.gguf").tensors}
    q = arrays["model.layers.0.self_attn.q_proj.weight"]
    k = arrays["model.layers.0.self_attn.k_proj.weight"]
    np.testing.assert_array_equal(got["blk.0.attn_q.weight"], _permute(q, N_HEAD))
    np.testing.assert_array_equal(got["blk.0.attn_k.weight"], _permute(k, N_HEAD_KV))
    np.testing.assert_array_equal(got["token_embd.weight"], arrays["model.embed_tokens.weight"])


def test_convert_reads_the_parameters_from_the_source_folders_config(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    folder = tmp_path / "hf"
    _llama_like(folder / "model.safetensors")
    config = {"num_attention_heads": N_HEAD, "num_key_value_heads": N_HEAD_KV}
    (folder / "config.json").write_text(json.dumps(config))
    bare = tmp_path / "bare" / "model.safetensors"
    _llama_like(bare)
    want = api.plan(str(bare), rules_file=RULES, rules_params={"n_head": 4, "n_head_kv": 2})
    assert api.plan(str(folder), rules_file=RULES).steps == want.steps
    report = api.convert(str(folder), str(tmp_path / "out"), rules_file=RULES, format="gguf")
    assert report.shards == ["model.gguf"]
    # a given parameter overrides config.json
    other = api.plan(str(folder), rules_file=RULES, rules_params={"n_head_kv": 4})
    assert other.steps != want.steps


def test_missing_unknown_and_stray_parameters_say_what_to_pass(tmp_path: Path) -> None:
    src = tmp_path / "bare" / "model.safetensors"
    _llama_like(src)
    with pytest.raises(RuleError, match=r"parameter 'n_head'.*rules_params=\{'n_head': N\}"):
        api.plan(str(src), rules_file=RULES)
    with pytest.raises(RuleError, match="declares no such parameter"):
        api.plan(str(src), rules_file=RULES, rules_params={"heads": 4})
    with pytest.raises(RuleError, match="expected a whole number"):
        api.plan(str(src), rules_file=RULES, rules_params={"n_head": 4.0, "n_head_kv": 2})  # type: ignore[dict-item]
    with pytest.raises(PlanError, match="rules_file="):
        api.plan(str(src), rules_params={"n_head": 4})
    # a batch cannot take source ops (each source's shapes and config differ)
    with pytest.raises(RuleError, match="one source at a time"):
        api.convert([str(src)], str(tmp_path / "batch"), rules_file=RULES,
                    rules_params={"n_head": 4, "n_head_kv": 2})  # fmt: skip


SRC = CheckpointSpec.of([TensorSpec("head.weight", (3, 4), "F32")])
TGT = CheckpointSpec.of([TensorSpec("head.kernel", (3, 4), "F32")])


def test_rules_without_a_target_are_refused_not_ignored(tmp_path: Path) -> None:
    rules = {r"head\.kernel": Transform(original_key="head.weight")}
    with pytest.raises(PlanError, match=r"target 'head.*without a target.*--like"):
        make_plan(SRC, rules=rules)
    assert _targets(make_plan(SRC, TGT, rules=rules)) == ["head.kernel"]
    assert _targets(make_plan(SRC, rules={})) == ["head.weight"]  # no rules: no target

    # a rules file with a 'rules' list (and no source ops) on the command line, without --like
    src = tmp_path / "m.safetensors"
    write_checkpoint(str(src), {"head.weight": np.ones((3, 4), np.float32)})
    path = tmp_path / "rules.json"
    path.write_text(json.dumps({"rules": [{"target": "head\\.kernel", "source": "head.weight"}]}))
    proc = _cli("plan", str(src), "--rules", str(path))
    assert proc.returncode == 2
    assert "without a target" in proc.stderr and "--like" in proc.stderr
    with pytest.raises(PlanError, match="without a target"):
        api.plan(str(src), rules_file=str(path))
    spec = tmp_path / "target.json"
    api.save_spec({"head.kernel": np.zeros((3, 4), np.float32)}, spec)
    plan = api.plan(str(src), str(spec), rules_file=str(path))
    assert plan.steps[0].sources == ("head.weight",)
