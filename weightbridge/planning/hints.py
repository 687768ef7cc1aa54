"""Hints: the user's (target substring, source substring) pairings and ``@`` choices; which
nodes a hint names, checking hints against the specs, and the shortest text that names a node.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

from weightbridge.errors import Hint, MatchError
from weightbridge.planning.match_result import Decision
from weightbridge.planning.tree import Node, real_path
from weightbridge.spec import TensorSpec


def hint_hits(sub: str, nodes: Sequence[Node]) -> list[Node]:
    """Nodes a hint substring names; a match ending at a name boundary wins over one inside a
    name (``layer_norm`` names ``.../layer_norm``, not ``.../layer_norm_1``)."""
    hits = [
        n
        for n in nodes
        if sub in real_path(n)
        or any(leaf.spec is not None and sub in leaf.spec.name for leaf in n.leaves())
    ]
    if len(hits) > 1:
        exact = [n for n in hits if real_path(n) == sub]
        if exact:
            return exact
        pattern = re.compile(re.escape(sub) + r"(?=$|[./:])")
        bounded = [n for n in hits if pattern.search(real_path(n))]
        if bounded:
            return bounded
    return hits


# Hints that are choices rather than pairings (target side starts with "@").
FLATTEN_HINT = "@flatten"
# For models that transpose to NCHW before flattening (seed 003's own JModel does), where the
# regrouping would be wrong and nothing in the weights shows it.
NO_FLATTEN_HINT = "@noflatten"
TRANSPOSE_HINT = "@transpose"
CHOICE_HINTS = (FLATTEN_HINT, NO_FLATTEN_HINT, TRANSPOSE_HINT)
ORIENTATIONS: Decision = (((TRANSPOSE_HINT, "yes"),), ((TRANSPOSE_HINT, "no"),))
FLATTENS: Decision = (((FLATTEN_HINT, "nhwc"),), ((FLATTEN_HINT, "nchw"),))


def check_hints(
    hints: Sequence[Hint], sources: Sequence[TensorSpec], targets: Sequence[TensorSpec]
) -> None:
    """A hint that names nothing, or an unknown choice, is an error, never silently ignored."""
    errors: list[str] = []
    for t_sub, s_sub in hints:
        if t_sub.startswith("@"):
            if t_sub not in CHOICE_HINTS:
                errors.append(f"unknown hint {t_sub!r}; the choices are {', '.join(CHOICE_HINTS)}")
            elif t_sub == TRANSPOSE_HINT and s_sub not in ("yes", "no"):
                errors.append(f"hint {t_sub}={s_sub}: say {t_sub}=yes or {t_sub}=no")
            elif (
                t_sub == FLATTEN_HINT
                and s_sub not in ("nhwc", "nchw")
                and not any(s_sub in t.name for t in targets)
            ):
                errors.append(
                    f"hint {t_sub}={s_sub}: no target tensor name contains {s_sub!r}; give "
                    "nhwc, nchw, or part of the name of the dense layer after the flatten"
                )
            continue
        if not any(t_sub in t.name for t in targets):
            errors.append(f"hint {t_sub}={s_sub}: no target tensor name contains {t_sub!r}")
        if not any(s_sub in s.name for s in sources):
            errors.append(f"hint {t_sub}={s_sub}: no source tensor name contains {s_sub!r}")
    if errors:
        raise MatchError(
            "\n".join(errors) + "\nA hint is TARGET_SUBSTRING=SOURCE_SUBSTRING (API: "
            "hints=[('target part', 'source part')]); check the names with `weightbridge inspect`"
        )


def unique_tail(name: str, names: Sequence[str]) -> str:
    """The shortest tail of `name`, on name boundaries, found in no other of `names`."""
    return next((tail for tail in _tails(name) if sum(tail in o for o in names) <= 1), name)


def hint_text(node: Node, group: Sequence[Node]) -> str:
    """The shortest tail of `node.path`, on name boundaries, that names it alone in `group`."""
    path = real_path(node)
    return next((tail for tail in _tails(path) if hint_hits(tail, group) == [node]), path)


def _tails(name: str) -> Iterator[str]:
    """The tails of `name` that start at a name boundary, shortest first."""
    parts = re.split(r"([./])", name)
    for i in range(len(parts) - 1, -1, -2):
        yield "".join(parts[i:])
