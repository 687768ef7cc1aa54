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
from weightbridge.errors import DtypeError, SpecError


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
        items = sorted((t.name, list(t.shape), t.dtype) for t in self.tensors)
        blob = json.dumps(items, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

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
        return cls(tuple(tensors), {str(k): str(v) for k, v in metadata.items()})


def load_spec_file(path: str | os.PathLike[str]) -> CheckpointSpec:
    """Read a target spec file (JSON, a safetensors header without offsets)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError as e:
        raise SpecError(f"{path}: spec file not found") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpecError(
            f"{path}: spec file is not valid JSON ({e}); expected an object like "
            '{"layer.weight": {"shape": [4, 8], "dtype": "F32"}}'
        ) from e
    return CheckpointSpec.from_json(obj, source=path)


def save_spec_file(spec: CheckpointSpec, path: str | os.PathLike[str]) -> None:
    """Write a spec as pretty JSON, one tensor per line-group, atomically."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(spec.to_json(), f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
