"""The corpus: real architecture pairs, each converted by `weightbridge.adapt` and checked by
running both models (see tests/corpus/harness.py).

``test_corpus`` asserts the outcome of every case x variant: the plain variant must give what the
case expects, and the adversarial ones (shuffled names, opaque names, decoy siblings) may only be
"equal" or "refused", never "wrong" or a crash. ``test_corpus_refusal_hints`` checks that a
refusal which suggests hints (``hints=[('a', 'b')]``) is right: given them, the case converts.
``test_corpus_oracle`` checks the oracle itself where a case knows the right pairing: that
pairing gives "equal", and swapping two same-shaped tensors of it is noticed.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.corpus.harness import (  # noqa: E402 (needs the repo root on sys.path)
    VARIANTS,
    Case,
    Pair,
    check_reference,
    refusal_hints,
    run_case,
    run_with_suggested_hints,
)

CASE_MODULES = (
    "cases_vision",
    "cases_transformers",
    "cases_keras",
    "cases_peers",
    "cases_convnext_ref",
)


def all_cases() -> list[Case]:
    """Every case of the corpus modules that exist (a module that exists but fails to import is
    an error, not a skip)."""
    cases: list[Case] = []
    for mod in CASE_MODULES:
        full = f"tests.corpus.{mod}"
        try:
            module = importlib.import_module(full)
        except ModuleNotFoundError as e:
            if e.name == full:
                continue
            raise
        cases.extend(module.CASES)
    names = [c.name for c in cases]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"corpus case names must be unique; repeated: {dupes}")
    return cases


CASES = all_cases()


def _params() -> list[Any]:
    # Case-major order, so that the variants of a case run one after the other on one build.
    return [
        pytest.param(
            case,
            variant,
            marks=[getattr(pytest.mark, f) for f in case.framework],
            id=f"{case.name}-{variant}",
        )
        for case in CASES
        for variant in VARIANTS
    ]


_built: dict[str, Pair] = {}  # the last built pair only: models are built once per case
_outcomes: dict[tuple[str, str], tuple[str, str]] = {}
_oracle: dict[str, tuple[bool, str]] = {}  # checked on each build: cheap, saves a rebuild


def _pair(case: Case) -> Pair:
    if case.name not in _built:
        _built.clear()
        pair = _built[case.name] = case.build()
        if pair.reference is not None:
            _oracle[case.name] = check_reference(pair)
    return _built[case.name]


def _outcome(case: Case, variant: str) -> tuple[str, str]:
    key = (case.name, variant)
    if key not in _outcomes:
        _outcomes[key] = run_case(_pair(case), variant)
    return _outcomes[key]


@pytest.mark.parametrize(("case", "variant"), _params())
def test_corpus(case: Case, variant: str) -> None:
    outcome, msg = _outcome(case, variant)
    if variant == "plain":
        assert outcome == case.expect, (
            f"{case.name} [{variant}]: {outcome}, expected {case.expect}\n{msg}"
        )
    else:
        assert outcome in ("equal", "refused"), f"{case.name} [{variant}]: {outcome}\n{msg}"


@pytest.mark.parametrize(("case", "variant"), [p for p in _params() if p.values[1] == "plain"])
def test_corpus_refusal_hints(case: Case, variant: str) -> None:
    """A refusal of a real pair names hints that convert it. (Under the adversarial variants a
    suggested hint is a conditional guess, "if X is Y", that the user must confirm: opaque names
    leave nothing to guess from, so only "never wrong" is asserted there.)"""
    outcome, msg = _outcome(case, variant)
    if outcome != "refused" or not refusal_hints(msg):
        return  # nothing to check: only refusals that name hints promise something
    if not case.hints_lead_to_equal:
        pytest.xfail(f"{case.name}: its refusal's hints are known not to lead to equal")
    final, final_msg, hints = run_with_suggested_hints(_pair(case), variant)
    assert final == "equal", (
        f"{case.name} [{variant}]: refused suggesting hints; with hints={hints} the outcome is "
        f"{final}\nfirst refusal:\n{msg}\nthen:\n{final_msg}"
    )


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, marks=[getattr(pytest.mark, f) for f in c.framework], id=c.name)
        for c in CASES
    ],
)
def test_corpus_oracle(case: Case) -> None:
    if case.name not in _oracle:
        _pair(case)
    if case.name not in _oracle:
        return  # this case does not state the right pairing
    ok, detail = _oracle[case.name]
    assert ok, f"{case.name}: {detail}"
