"""Rules files for the command line: JSON (or YAML when PyYAML is installed), never code.

Today a rules file holds rename rules::

    {"rename": [["^module\\\\.", ""], ["layers\\\\.(\\\\d+)", "block_\\\\1"]]}

``rename`` may also be an object ``{pattern: replacement}`` (applied in file order).
"""

from __future__ import annotations

import os
import re
import reprlib
from typing import Any

from weightbridge.errors import DtypeError, PlanError, RuleError
from weightbridge.ops import op_from_json
from weightbridge.planning.planner import Rename
from weightbridge.planning.rules import Transform
from weightbridge.spec import parse_json

# YAML aliases let a few lines name one list thousands of times over (a "billion laughs"); a rules
# file holds a few dozen rules, so one that expands past this many values is refused before
# anything walks or prints it.
MAX_VALUES = 100_000


def _check_size(obj: Any, path: str) -> None:
    """Refuse a parsed file that expands (through YAML aliases) past `MAX_VALUES` values."""
    count, stack = 0, [obj]
    while stack:
        value = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise RuleError(
                f"{path}: rules file expands to more than {MAX_VALUES} values (YAML aliases "
                "repeating or containing themselves?); write the rules out plainly"
            )
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, (list, tuple, set)):
            stack.extend(value)


# Rules files shipped with weightbridge (`weightbridge/rules/NAME.json`), for pairs of
# implementations whose names need more than the matcher can prove (numbering that starts at 1
# on one side, a shortcut named block1_0): `--rules NAME` picks one.
BUNDLED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "rules")


def bundled_rules() -> list[str]:
    """Names of the rules files shipped with weightbridge."""
    try:
        names = os.listdir(BUNDLED_DIR)
    except OSError:
        return []
    return sorted(n.removesuffix(".json") for n in names if n.endswith(".json"))


def resolve_rules_path(path: str | os.PathLike[str]) -> str:
    """A rules file's path: the file itself, else the bundled rules of that name.

    >>> os.path.basename(resolve_rules_path("keras_resnet_to_torchvision"))
    'keras_resnet_to_torchvision.json'
    """
    path = os.fspath(path)
    if os.path.exists(path) or os.sep in path or "/" in path:
        return path
    if path in bundled_rules():
        return os.path.join(BUNDLED_DIR, path + ".json")
    raise RuleError(
        f"{path}: no such rules file, nor rules of that name shipped with weightbridge "
        f"(shipped: {', '.join(bundled_rules()) or 'none'})"
    )


def load_rules_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = resolve_rules_path(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise RuleError(f"{path}: cannot read rules file ({e.strerror})") from e
    except UnicodeDecodeError as e:
        raise RuleError(f"{path}: rules file is not UTF-8 text ({e})") from e
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
            obj = parse_json(text)
    except RuleError:
        raise
    except Exception as e:  # json/yaml parse errors of several types
        raise RuleError(f"{path}: rules file does not parse ({e})") from e
    _check_size(obj, path)
    if not isinstance(obj, dict):
        raise RuleError(
            f'{path}: a rules file must be an object such as {{"rename": [["a", "b"]]}}'
        )
    return obj


def load_transforms(path: str | os.PathLike[str]) -> dict[str, Transform]:
    """Orbax-style rules from a rules file's ``rules`` list, keyed by target regex, in order."""
    where = os.fspath(path)
    raw = load_rules_file(path).get("rules", [])
    if not isinstance(raw, list):
        raise RuleError(f"{where}: 'rules' must be a list of objects")
    out: dict[str, Transform] = {}
    for i, rule in enumerate(raw, 1):
        label = f"{where}: rule #{i}"
        if not isinstance(rule, dict) or not isinstance(rule.get("target"), str):
            raise RuleError(
                f"{label} must be an object with a 'target' regex, found {reprlib.repr(rule)}"
            )
        try:
            re.compile(rule["target"])
        except re.error as e:
            raise RuleError(
                f"{label}: target {rule['target']!r} is not a valid regular expression ({e})"
            ) from e
        unknown = set(rule) - {"target", "source", "ops", "split", "fallback"}
        if unknown:
            raise RuleError(
                f"{label} ({rule['target']!r}): unknown field(s) {sorted(unknown)}; "
                "known: target, source, ops, split, fallback"
            )
        source = rule.get("source")
        if source is not None and not (
            isinstance(source, str)
            or (isinstance(source, list) and all(isinstance(s, str) for s in source))
        ):
            raise RuleError(
                f"{label} ({rule['target']!r}): 'source' must be a string or a list of strings"
            )
        split = rule.get("split")
        if split is not None and not (
            isinstance(split, list)
            and len(split) == 3
            and all(isinstance(x, int) and not isinstance(x, bool) for x in split)
            and 0 <= split[1] < split[2]
        ):
            raise RuleError(
                f"{label} ({rule['target']!r}): 'split' must be [axis, index, parts] with "
                f"0 <= index < parts, found {reprlib.repr(split)}"
            )
        ops_raw = rule.get("ops", [])
        if not isinstance(ops_raw, list):
            raise RuleError(f"{label} ({rule['target']!r}): 'ops' must be a list")
        try:
            ops = tuple(op_from_json(o, where=f"{label} ({rule['target']!r})") for o in ops_raw)
        except PlanError as e:
            raise RuleError(str(e)) from e
        except DtypeError as e:  # a cast to a dtype weightbridge does not know
            raise RuleError(f"{label} ({rule['target']!r}): {e}") from e
        out[rule["target"]] = Transform(
            original_key=source,
            use_fallback=bool(rule.get("fallback", False)),
            ops=ops,
            split=(split[0], split[1], split[2]) if split else None,
        )
    return out


def load_renames(path: str | os.PathLike[str]) -> list[Rename]:
    """Rename rules from a rules file, in order."""
    obj = load_rules_file(path)
    raw = obj.get("rename", [])
    if not isinstance(raw, (list, dict)):
        raise RuleError(
            f"{os.fspath(path)}: 'rename' must be a list of [pattern, replacement] pairs or an "
            f"object {{pattern: replacement}}, found {reprlib.repr(raw)}"
        )
    pairs = list(raw.items()) if isinstance(raw, dict) else raw
    rules = []
    for i, pair in enumerate(pairs):
        if not (
            isinstance(pair, (list, tuple))
            and len(pair) == 2
            and all(isinstance(x, str) for x in pair)
        ):
            raise RuleError(
                f"{os.fspath(path)}: rename rule #{i + 1} must be [pattern, replacement], "
                f"found {reprlib.repr(pair)}"
            )
        try:
            rules.append(Rename(pair[0], pair[1]))
        except RuleError as e:
            raise RuleError(f"{os.fspath(path)}: rename rule #{i + 1}: {e}") from e
    return rules
