"""Rules files for the command line: JSON (or YAML when PyYAML is installed), never code.

Today a rules file holds rename rules::

    {"rename": [["^module\\\\.", ""], ["layers\\\\.(\\\\d+)", "block_\\\\1"]]}

``rename`` may also be an object ``{pattern: replacement}`` (applied in file order).
"""

from __future__ import annotations

import json
import os
from typing import Any

from weightbridge.errors import RuleError
from weightbridge.planner import Rename


def load_rules_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise RuleError(f"{path}: cannot read rules file ({e.strerror})") from e
    try:
        if path.endswith((".yaml", ".yml")):
            try:
                import yaml
            except ImportError as e:
                raise RuleError(
                    f"{path}: YAML rules need PyYAML (pip install pyyaml), or use JSON"
                ) from e
            obj = yaml.safe_load(text)
        else:
            obj = json.loads(text)
    except RuleError:
        raise
    except Exception as e:  # json/yaml parse errors of several types
        raise RuleError(f"{path}: rules file does not parse ({e})") from e
    if not isinstance(obj, dict):
        raise RuleError(
            f'{path}: a rules file must be an object such as {{"rename": [["a", "b"]]}}'
        )
    return obj


def load_renames(path: str | os.PathLike[str]) -> list[Rename]:
    """Rename rules from a rules file, in order."""
    obj = load_rules_file(path)
    raw = obj.get("rename", [])
    pairs = list(raw.items()) if isinstance(raw, dict) else raw
    rules = []
    for i, pair in enumerate(pairs):
        if not (
            isinstance(pair, (list, tuple))
            and len(pair) == 2
            and all(isinstance(x, str) for x in pair)
        ):
            raise RuleError(
                f"{os.fspath(path)}: rename rule #{i + 1} must be [pattern, replacement], found {pair!r}"
            )
        try:
            rules.append(Rename(pair[0], pair[1]))
        except RuleError as e:
            raise RuleError(f"{os.fspath(path)}: rename rule #{i + 1}: {e}") from e
    return rules
