"""Specs: the name, shape and dtype of tensors, without their data.

A `TensorSpec` describes one tensor; a `CheckpointSpec` describes all of a model's tensors in
order. Both are frozen values with a JSON form. The JSON form of a `CheckpointSpec` is a
safetensors header without offsets, which is also the *target spec file* users hand to
``weightbridge convert --like``::

    {"embed.weight": {"shape": [32000, 4096], "dtype": "BF16"}, ...}
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from weightbridge import dtypes
from weightbridge._files import atomic_write_json
from weightbridge.errors import DtypeError, SpecError

# numpy arrays have at most 64 dimensions (NPY_MAXDIMS); a spec with more describes a tensor no
# reader could return, so it is refused where it is made instead of failing at the first read.
MAX_RANK = 64
# numpy indexes bytes with a signed 64-bit integer; no array (not even a strided view) can be
# larger, so a file claiming more is corrupt or hostile.
MAX_NBYTES = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Name, shape and dtype (canonical code) of one tensor.

    >>> TensorSpec("w", (2, 3), "F32").nbytes
    24
    """

    name: str
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "dtype", dtypes.canonical(self.dtype))
        if any(d < 0 for d in self.shape):
            raise SpecError(f"tensor {self.name!r}: negative dimension in shape {self.shape}")
        if len(self.shape) > MAX_RANK:
            raise SpecError(
                f"tensor {self.name!r}: {len(self.shape)} dimensions; numpy arrays have at most "
                f"{MAX_RANK}"
            )

    def renamed(self, name: str) -> TensorSpec:
        """This spec under another name (its shape and dtype were checked already: not again,
        which matters when a plan renames a hundred thousand of them).

        >>> TensorSpec("a", (2,), "F32").renamed("b")
        TensorSpec(name='b', shape=(2,), dtype='F32')
        """
        spec = object.__new__(TensorSpec)
        object.__setattr__(spec, "name", name)
        object.__setattr__(spec, "shape", self.shape)
        object.__setattr__(spec, "dtype", self.dtype)
        return spec

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtypes.itemsize(self.dtype)

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True, slots=True)
class CheckpointSpec:
    """All tensors of a checkpoint, in order, plus free-form string metadata.

    >>> spec = CheckpointSpec.from_json({"a": {"shape": [2], "dtype": "float32"}})
    >>> spec["a"], len(spec)
    (TensorSpec(name='a', shape=(2,), dtype='F32'), 1)
    """

    tensors: tuple[TensorSpec, ...]
    metadata: Mapping[str, str] = field(default_factory=dict)
    _index: dict[str, TensorSpec] = field(init=False, repr=False, compare=False)
    # The spec is frozen, so its fingerprint is computed once (a plan checks it more than once).
    _fingerprint: str | None = field(init=False, default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tensors", tuple(self.tensors))
        index: dict[str, TensorSpec] = {}
        for t in self.tensors:
            if t.name in index:
                raise SpecError(f"duplicate tensor name {t.name!r} in checkpoint spec")
            index[t.name] = t
        object.__setattr__(self, "_index", index)

    @classmethod
    def of(
        cls, tensors: Iterable[TensorSpec], metadata: Mapping[str, str] | None = None
    ) -> CheckpointSpec:
        return cls(tuple(tensors), dict(metadata or {}))

    def __getitem__(self, name: str) -> TensorSpec:
        return self._index[name]

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __iter__(self) -> Iterator[TensorSpec]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def fingerprint(self) -> str:
        """A short hash of names, shapes and dtypes (order-independent; metadata ignored).

        Two checkpoints with the same fingerprint can be converted with the same plan.
        """
        found: str | None = getattr(self, "_fingerprint", None)  # unset when unpickled from old
        if found is None:
            items = sorted((t.name, list(t.shape), t.dtype) for t in self.tensors)
            blob = json.dumps(items, separators=(",", ":")).encode()
            found = hashlib.sha256(blob).hexdigest()[:16]
            object.__setattr__(self, "_fingerprint", found)
        return found

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.metadata:
            out["__metadata__"] = dict(self.metadata)
        for t in self.tensors:
            out[t.name] = t.to_json()
        return out

    @classmethod
    def from_json(cls, obj: Any, *, source: str = "<spec>") -> CheckpointSpec:
        """Parse the JSON form; errors name `source` (a file path, usually)."""
        if not isinstance(obj, dict):
            raise SpecError(
                f"{source}: a spec must be a JSON object mapping tensor names to "
                f'{{"shape": [...], "dtype": "..."}}, found {type(obj).__name__}'
            )
        metadata = obj.get("__metadata__") or {}
        if not isinstance(metadata, dict):
            raise SpecError(f"{source}: __metadata__ must be an object of strings")
        tensors = []
        for name, entry in obj.items():
            if name == "__metadata__":
                continue
            if not isinstance(entry, dict) or "shape" not in entry or "dtype" not in entry:
                raise SpecError(
                    f'{source}: tensor {name!r} must be {{"shape": [...], "dtype": "..."}}, '
                    f"found {entry!r}"
                )
            shape = entry["shape"]
            if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
            ):
                raise SpecError(
                    f"{source}: tensor {name!r} shape must be a list of non-negative integers, "
                    f"found {shape!r}"
                )
            try:
                tensors.append(TensorSpec(name, tuple(shape), entry["dtype"]))
            except DtypeError as e:
                raise SpecError(f"{source}: tensor {name!r}: {e}") from e
            except SpecError as e:  # it names the tensor already
                raise SpecError(f"{source}: {e}") from e
        return cls(tuple(tensors), {str(k): str(v) for k, v in metadata.items()})


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return obj


def parse_json(text: str | bytes) -> Any:
    """`json.loads` for untrusted files: every failure is a `ValueError`, duplicate keys included.

    A repeated key would otherwise silently keep its last value (two headers for one tensor);
    nesting deep enough to exhaust the recursion limit, and integers too long to convert, are
    reported like any other malformed JSON.

    >>> parse_json('{"a": 1, "a": 2}')
    Traceback (most recent call last):
    ...
    ValueError: duplicate key 'a'
    """
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except RecursionError as e:
        raise ValueError("nested too deeply") from e


def load_spec_file(path: str | os.PathLike[str]) -> CheckpointSpec:
    """Read a target spec file (JSON, a safetensors header without offsets)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            obj = parse_json(f.read().decode("utf-8"))
    except FileNotFoundError as e:
        raise SpecError(f"{path}: spec file not found") from e
    except OSError as e:
        raise SpecError(f"{path}: cannot read spec file ({e.strerror or e})") from e
    except ValueError as e:
        raise SpecError(
            f"{path}: spec file is not valid JSON ({e}); expected an object like "
            '{"layer.weight": {"shape": [4, 8], "dtype": "F32"}}'
        ) from e
    return CheckpointSpec.from_json(obj, source=path)


def save_spec_file(spec: CheckpointSpec, path: str | os.PathLike[str]) -> None:
    """Write a spec as pretty JSON, one tensor per line-group, atomically."""
    atomic_write_json(path, spec.to_json())
