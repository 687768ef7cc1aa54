"""Rules files for the command line: JSON (or YAML when PyYAML is installed), never code.

Today a rules file holds rename rules::

    {"rename": [["^module\\\\.", ""], ["layers\\\\.(\\\\d+)", "block_\\\\1"]]}

``rename`` may also be an object ``{pattern: replacement}`` (applied in file order).

A rules file may also give ops to apply to source tensors (``source_ops``: a source regex, full
match, first match wins) and declare the numbers those ops need and the shapes do not tell
(``params``: LLaMA's head counts). In a source op, any number may be written as a parameter's
name or as ``"shape[i]"`` (the source tensor's axis i), and a reshape may hold one ``-1``;
`expand_source_ops` turns them into plain ops for each tensor, so a plan shows (and a saved
plan replays) them without the parameters. A parameter comes from ``--rules-param NAME=N``,
else from its ``config`` key in the source folder's ``config.json`` (a Hugging Face folder),
else from its ``default`` (a number or another parameter's name; for a parameter with a
``config`` key, only when a ``config.json`` was read and lacks that key)::

    {"params": {"n_head": {"config": "num_attention_heads"}},
     "rename": [["^model\\\\.layers\\\\.(\\\\d+)\\\\.self_attn\\\\.q_proj\\\\.", "blk.\\\\1.attn_q."]],
     "source_ops": [{"source": "model\\\\.layers\\\\.\\\\d+\\\\.self_attn\\\\.q_proj\\\\.weight",
                     "ops": [{"op": "reshape", "shape": ["n_head", 2, -1, "shape[1]"]},
                             {"op": "permute", "axes": [0, 2, 1, 3]},
                             {"op": "reshape", "shape": ["shape[0]", "shape[1]"]}]}]}
"""

from __future__ import annotations

import math
import os
import re
import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from weightbridge.errors import DtypeError, PlanError, RuleError
from weightbridge.ops import Op, infer, op_from_json
from weightbridge.planning.planner import Rename
from weightbridge.planning.rules import Transform
from weightbridge.spec import CheckpointSpec, TensorSpec, parse_json

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
        _check_regex(rule["target"], f"{label}: target")
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


# --- parameters and source ops (rules that need numbers the shapes do not tell) -------------


def _check_regex(pattern: str, what: str) -> None:
    """Refuse a rules file's regex that does not compile, naming where it is."""
    try:
        re.compile(pattern)
    except re.error as e:
        raise RuleError(f"{what} {pattern!r} is not a valid regular expression ({e})") from e


_SHAPE_REF = re.compile(r"shape\[(-?\d+)\]")


@dataclass(frozen=True, slots=True)
class Param:
    """A number a rules file needs: given, read from ``config.json``, or its default."""

    name: str
    config: str | None = None  # the key of a Hugging Face config.json that holds it
    default: int | str | None = None  # a number, or another parameter's name
    help: str = ""


@dataclass(frozen=True, slots=True)
class SourceOps:
    """Ops for each source tensor whose name fully matches `pattern` (still templates)."""

    pattern: str
    ops: tuple[Any, ...]
    label: str


@dataclass(frozen=True, slots=True)
class Expansion:
    """What a rules file's source ops give for one source checkpoint.

    `transforms` are exact-name rules (target name -> source name and plain ops); `target` is
    the checkpoint the renames and source ops produce, for a conversion without ``--like``.
    """

    transforms: dict[str, Transform]
    target: CheckpointSpec


def load_params(path: str | os.PathLike[str]) -> dict[str, Param]:
    """The parameters a rules file declares (``params``), by name."""
    where = os.fspath(path)
    raw = load_rules_file(path).get("params", {})
    if not isinstance(raw, dict):
        raise RuleError(f"{where}: 'params' must be an object {{name: {{...}}}}")
    out: dict[str, Param] = {}
    for name, decl in raw.items():
        if not isinstance(decl, dict) or set(decl) - {"config", "default", "help"}:
            raise RuleError(
                f"{where}: parameter {name!r} must be an object with fields among config, "
                f"default, help; found {reprlib.repr(decl)}"
            )
        default = decl.get("default")
        if default is not None and not (
            (isinstance(default, int) and not isinstance(default, bool))
            or (isinstance(default, str) and default in raw and default != name)
        ):
            raise RuleError(
                f"{where}: parameter {name!r}: default must be a whole number or another "
                f"parameter's name (one of {sorted(raw)}), found {default!r}"
            )
        config = decl.get("config")
        if config is not None and not isinstance(config, str):
            raise RuleError(f"{where}: parameter {name!r}: config must be a key name")
        out[name] = Param(name, config, default, str(decl.get("help", "")))
    return out


def load_source_ops(path: str | os.PathLike[str]) -> list[SourceOps]:
    """The ``source_ops`` entries of a rules file, in order (regexes checked, ops still templates)."""
    where = os.fspath(path)
    raw = load_rules_file(path).get("source_ops", [])
    if not isinstance(raw, list):
        raise RuleError(f"{where}: 'source_ops' must be a list of objects")
    out = []
    for i, entry in enumerate(raw, 1):
        label = f"{where}: source_ops #{i}"
        if (
            not isinstance(entry, dict)
            or set(entry) != {"source", "ops"}
            or not isinstance(entry["source"], str)
            or not isinstance(entry["ops"], list)
            or not all(isinstance(o, dict) for o in entry["ops"])
        ):
            raise RuleError(
                f'{label} must be an object {{"source": REGEX, "ops": [...]}}, found '
                f"{reprlib.repr(entry)}"
            )
        _check_regex(entry["source"], f"{label}: source")
        out.append(SourceOps(entry["source"], tuple(entry["ops"]), label))
    return out


def has_source_ops(path: str | os.PathLike[str]) -> bool:
    """True when a rules file gives source ops or declares parameters (see `expand_source_ops`)."""
    obj = load_rules_file(path)
    return bool(obj.get("source_ops") or obj.get("params"))


def read_hf_config(folder: str) -> tuple[dict[str, Any] | None, str | None]:
    """A Hugging Face folder's ``config.json`` (parsed) and its path; (None, None) without one."""
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder) or not os.path.isfile(path):
        return None, None
    try:
        with open(path, encoding="utf-8") as f:
            obj = parse_json(f.read())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise RuleError(f"{path}: cannot read the model's config ({e})") from e
    return (obj if isinstance(obj, dict) else None), path


def resolve_params(
    path: str | os.PathLike[str],
    given: Mapping[str, str | int],
    config: Mapping[str, Any] | None = None,
    config_path: str | None = None,
) -> dict[str, int]:
    """Each declared parameter's value: `given` (``--rules-param``), else `config`, else default.

    Raises:
        RuleError: a given name the file does not declare, a value that is not a whole number,
            or a parameter nothing gives (the message says how to give it).
    """
    where = os.fspath(path)
    declared = load_params(path)
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise RuleError(
            f"{where}: --rules-param {unknown[0]}: the rules file declares no such parameter "
            f"(it declares: {', '.join(sorted(declared)) or 'none'})"
        )
    values: dict[str, int] = {}
    for name, text in given.items():
        try:
            if isinstance(text, bool) or not isinstance(text, (str, int)):
                raise ValueError(text)
            values[name] = int(text)
        except ValueError:
            raise RuleError(
                f"--rules-param {name}={text!r}: expected a whole number, e.g. {name}=32"
            ) from None
    for name, p in declared.items():
        if name in values or p.config is None or config is None or p.config not in config:
            continue
        value = config[p.config]
        if not isinstance(value, int) or isinstance(value, bool):
            raise RuleError(
                f"{config_path}: {p.config} is {value!r}, but parameter {name!r} of {where} "
                f"needs a whole number; pass --rules-param {name}=N"
            )
        values[name] = value
    for _ in declared:  # defaults may name another parameter (n_head_kv: n_head)
        for name, p in declared.items():
            # A default stands for a key config.json leaves out (as Hugging Face reads it),
            # not for a config.json that is not there: then the user says.
            if name in values or p.default is None or (p.config is not None and config is None):
                continue
            if isinstance(p.default, int):
                values[name] = p.default
            elif p.default in values:
                values[name] = values[p.default]
    for name, p in declared.items():
        if name not in values:
            about = f" ({p.help})" if p.help else ""
            how = f"pass --rules-param {name}=N (Python: rules_params={{{name!r}: N}})"
            if p.config is not None:
                how += f", or convert from a Hugging Face folder whose config.json has {p.config!r}"
                if config_path is not None:
                    how += f" ({config_path} has none)"
            raise RuleError(f"{where}: the rules need parameter {name!r}{about}: {how}")
    return values


def _fill(value: Any, names: Mapping[str, int], shape: tuple[int, ...], label: str) -> Any:
    """An op template's field with parameter names and ``shape[i]`` replaced by numbers."""
    if isinstance(value, list):
        return [_fill(v, names, shape, label) for v in value]
    if not isinstance(value, str):
        return value
    if value in names:
        return names[value]
    ref = _SHAPE_REF.fullmatch(value)
    if ref is not None:
        axis = int(ref.group(1))
        if not -len(shape) <= axis < len(shape):
            raise RuleError(f"{label}: {value!r} does not exist in shape {shape}")
        return shape[axis]
    raise RuleError(
        f"{label}: {value!r} is neither a parameter ({', '.join(sorted(names)) or 'none'}) "
        "nor shape[i]"
    )


def _shown(names: Mapping[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in names.items()) or "none"


def _resolve_op(
    template: Mapping[str, Any],
    names: Mapping[str, int],
    source: tuple[int, ...],
    shape: tuple[int, ...],
    label: str,
) -> Op:
    """One plain op from a template: ``shape[i]`` is the `source` tensor's axis i, and a
    reshape's -1 takes what the op's input (of `shape`) leaves."""
    obj = {
        k: v if k in ("op", "dtype") else _fill(v, names, source, label)
        for k, v in template.items()
    }
    if obj.get("op") == "reshape" and isinstance(obj.get("shape"), list):
        dims = obj["shape"]
        if dims.count(-1) > 1:
            raise RuleError(f"{label}: a reshape may hold one -1, found {dims}")
        if -1 in dims:
            known = math.prod(d for d in dims if d != -1)
            total = math.prod(shape)
            if known <= 0 or total % known:
                raise RuleError(
                    f"{label}: reshape {template.get('shape')} = {dims} does not fit shape "
                    f"{shape} ({total} elements are not a multiple of {known}); check the "
                    f"parameters ({_shown(names)})"
                )
            obj["shape"] = [total // known if d == -1 else d for d in dims]
    try:
        return op_from_json(obj, where=label)
    except PlanError as e:
        raise RuleError(str(e)) from e
    except DtypeError as e:
        raise RuleError(f"{label}: {e}") from e


def expand_source_ops(
    path: str | os.PathLike[str],
    source: CheckpointSpec,
    *,
    renames: Sequence[Rename] = (),
    params: Mapping[str, int] | None = None,
    whole: bool = True,
) -> Expansion:
    """A rules file's source ops as exact-name rules for `source`, with plain ops.

    Each source tensor keeps the name `renames` give it (an empty name drops it); the first
    ``source_ops`` entry whose regex fully matches its *source* name gives its ops, with
    parameters and ``shape[i]`` filled in from `params` and the tensor's shape. `whole`: make
    a rule for every tensor (for a conversion whose target is `Expansion.target`), not only
    for those with ops.

    Raises:
        RuleError: ops that do not fit a tensor (the message names it), or two tensors renamed
            to one name.

    >>> import json, tempfile
    >>> from weightbridge.spec import TensorSpec
    >>> with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
    ...     json.dump({"params": {"h": {}}, "source_ops": [{"source": "q", "ops": [
    ...         {"op": "reshape", "shape": ["h", -1, "shape[1]"]}]}]}, f)
    >>> x = expand_source_ops(f.name, CheckpointSpec.of([TensorSpec("q", (8, 3), "F32")]),
    ...                       params={"h": 2})
    >>> x.transforms["q"].ops
    (Reshape(shape=(2, 4, 3)),)
    >>> os.unlink(f.name)
    """
    names = dict(params or {})
    entries = [(e, re.compile(e.pattern)) for e in load_source_ops(path)]
    transforms: dict[str, Transform] = {}
    out: list[TensorSpec] = []
    by_name: dict[str, str] = {}
    for t in source:
        name = t.name
        for rule in renames:
            name = rule.apply(name)
        if not name:
            continue
        if name in by_name:
            raise RuleError(
                f"{os.fspath(path)}: source tensors {by_name[name]!r} and {t.name!r} both "
                f"become {name!r}; fix the rename rules so each name comes from one source"
            )
        by_name[name] = t.name
        ops: list[Op] = []
        for entry, regex in entries:
            if regex.fullmatch(t.name):
                shape = t.shape
                for i, template in enumerate(entry.ops, 1):
                    label = f"{entry.label} op #{i} on {t.name!r} {shape}"
                    op = _resolve_op(template, names, t.shape, shape, label)
                    try:
                        shape, _ = infer([op], [shape], t.dtype, where=label)
                    except PlanError as e:
                        raise RuleError(f"{e}; check the parameters ({_shown(names)})") from e
                    ops.append(op)
                break
        shape, dtype = infer(ops, [t.shape], t.dtype, where=f"tensor {t.name!r}")
        out.append(TensorSpec(name, shape, dtype))
        if ops or whole:
            # exact names: the key is a regex, the source a template (backslashes doubled)
            transforms[re.escape(name)] = Transform(
                original_key=t.name.replace("\\", "\\\\"), ops=tuple(ops)
            )
    return Expansion(transforms, CheckpointSpec.of(out))


@dataclass(frozen=True, slots=True)
class RulesFilePlanning:
    """What a rules file gives `make_plan`: its renames (before the caller's), its rules (the
    expanded source ops', the file's own ``rules``, then the caller's) and the target (the
    caller's, else, for a file with source ops, what its renames and ops make of the source)."""

    renames: list[Rename]
    rules: dict[str, Any]
    target: CheckpointSpec | None


def planning_of(
    path: str | os.PathLike[str],
    source: CheckpointSpec,
    *,
    renames: Sequence[Rename] = (),
    rules: Mapping[str, Any] | None = None,
    params: Mapping[str, str | int] | None = None,
    target: CheckpointSpec | None = None,
    config: Mapping[str, Any] | None = None,
    config_path: str | None = None,
) -> RulesFilePlanning:
    """A rules file (a path, or the name of a shipped one) applied to `source` for `make_plan`.

    `params` are the numbers its source ops need (``--rules-param``), else they come from
    `config` (the source folder's ``config.json``, see `read_hf_config`), else from defaults.

    Raises:
        RuleError: a bad rules file, parameter or op (the message says which and what to pass).
    """
    all_renames = [*load_renames(path), *renames]
    own: dict[str, Any] = dict(load_transforms(path))
    if not params and not has_source_ops(path):
        return RulesFilePlanning(all_renames, {**own, **(rules or {})}, target)
    values = resolve_params(path, params or {}, config, config_path)
    expansion = expand_source_ops(
        path, source, renames=all_renames, params=values, whole=target is None
    )
    return RulesFilePlanning(
        all_renames,
        {**expansion.transforms, **own, **(rules or {})},
        expansion.target if target is None else target,
    )
