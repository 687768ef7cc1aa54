"""Compare checkpoints: `diff(a, b)` tensor by tensor, and `compare_values`, which `verify` shares.

`diff` opens both checkpoints with the format readers (any format weightbridge reads, named as
`weightbridge inspect` names them) and streams: one tensor of each side is read (memory-mapped
where the format allows), compared tile by tile, and released before the next, so memory stays
at a few tiles whatever the checkpoints' sizes. It reports tensors only in A, only in B, shape
and dtype mismatches, and values that differ beyond a tolerance, as a `DiffReport` value; the
command line (``weightbridge diff A B``) prints it and exits 0 when the checkpoints are equal.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from weightbridge.spec import CheckpointSpec, TensorSpec

# Elements compared per step: the float64 temporaries of one tile (a few of them) stay at
# 8 MB each, while numpy's per-call overhead is still nothing next to the work of a tile.
TILE_ELEMENTS = 1 << 20


@dataclass(frozen=True, slots=True)
class ValueDiff:
    """How two tensors of the same shape differ: the elements beyond the tolerance, and the
    largest differences among them (infinite where a NaN meets a number, and, relative, where
    B is 0). `index` is where the largest absolute difference is, with both values there
    (complex values by their magnitude).

    >>> d = compare_values(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.5, 3.0]))
    >>> d.count, d.size, d.max_abs, d.index
    (1, 3, 0.5, (1,))
    >>> str(d)
    '1 of 3 elements differ (max abs diff 0.5 at [1]: A 2, B 2.5; max rel diff 0.2)'
    """

    count: int
    size: int
    max_abs: float
    max_rel: float
    index: tuple[int, ...]
    a_value: float
    b_value: float

    def __str__(self) -> str:
        return self.describe()

    def describe(self, a: str = "A", b: str = "B") -> str:
        """One line, calling the two sides `a` and `b`."""
        at = ", ".join(map(str, self.index))
        return (
            f"{self.count} of {self.size} elements differ (max abs diff {self.max_abs:.6g} at "
            f"[{at}]: {a} {self.a_value:.6g}, {b} {self.b_value:.6g}; max rel diff "
            f"{self.max_rel:.6g})"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "size": self.size,
            "max_abs": _json_float(self.max_abs),
            "max_rel": _json_float(self.max_rel),
            "index": list(self.index),
            "a_value": _json_float(self.a_value),
            "b_value": _json_float(self.b_value),
        }


def compare_values(
    a: np.ndarray, b: np.ndarray, *, rtol: float = 0.0, atol: float = 0.0
) -> ValueDiff | None:
    """None when `a` and `b` (same shape) are equal within tolerance, else how they differ.

    Floating-point elements are equal when ``|a - b| <= atol + rtol * |b|`` (B is the
    reference, as in `numpy.isclose`), with NaN equal to NaN; integer and bool elements must be
    equal exactly, whatever the tolerance. Dtypes may differ (values are compared, not bytes).
    The tensors are walked in tiles of `TILE_ELEMENTS`, so memory-mapped inputs are never
    copied whole; tiles whose bytes are identical cost one comparison.

    >>> compare_values(np.float32([1, 2]), np.float32([1, 2.001]), rtol=1e-3) is None
    True
    >>> compare_values(np.int32([1, 2]), np.int32([1, 3]), atol=5).count
    1
    """
    if a.shape != b.shape:
        raise ValueError(f"compare_values needs one shape, found {a.shape} and {b.shape}")
    exact = not (_is_inexact(a) or _is_inexact(b))
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    count, worst, worst_at, max_rel = 0, -1.0, 0, 0.0
    for start in range(0, flat_a.size, TILE_ELEMENTS):
        x = flat_a[start : start + TILE_ELEMENTS]
        y = flat_b[start : start + TILE_ELEMENTS]
        if x.dtype == y.dtype and np.array_equal(x.view(np.uint8), y.view(np.uint8)):
            continue
        if exact:
            # Integers compare as numpy compares them (an I32 and an I64 too); the statistics
            # are floats, for reporting only.
            close = x == y
            xf, yf = x.astype(np.float64), y.astype(np.float64)
        else:
            kind = np.complex128 if np.iscomplexobj(x) or np.iscomplexobj(y) else np.float64
            xf, yf = x.astype(kind), y.astype(kind)
            close = np.isclose(xf, yf, rtol=rtol, atol=atol, equal_nan=True)
        differ = np.flatnonzero(~close)
        if differ.size == 0:
            continue
        count += int(differ.size)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            absdiff = np.abs(xf[differ] - yf[differ])
            absdiff[np.isnan(absdiff)] = np.inf  # a NaN against a number, or inf against -inf
            rel = absdiff / np.abs(yf[differ])
        rel[np.isnan(rel)] = np.inf
        i = int(np.argmax(absdiff))
        if absdiff[i] > worst:
            worst, worst_at = float(absdiff[i]), start + int(differ[i])
        max_rel = max(max_rel, float(rel.max()))
    if count == 0:
        return None
    index = tuple(int(i) for i in np.unravel_index(worst_at, a.shape)) if a.shape else ()
    return ValueDiff(
        count=count,
        size=int(flat_a.size),
        max_abs=worst,
        max_rel=max_rel,
        index=index,
        a_value=_scalar(flat_a[worst_at]),
        b_value=_scalar(flat_b[worst_at]),
    )


def _is_inexact(x: np.ndarray) -> bool:
    """Floating point or complex, ml_dtypes' bf16/fp8 included (numpy gives their dtypes the
    kind "V", not a place under `np.inexact`; no reader returns structured arrays)."""
    return bool(np.issubdtype(x.dtype, np.inexact) or x.dtype.kind == "V")


def _scalar(x: Any) -> float:
    value = complex(x) if np.iscomplexobj(x) else float(x)
    return abs(value) if isinstance(value, complex) else value


def _json_float(x: float) -> float | str:
    """A float for JSON: non-finite ones as the strings "inf", "-inf", "nan" (strict JSON has
    no literal for them)."""
    return x if math.isfinite(x) else str(x)


@dataclass(frozen=True, slots=True)
class TensorDiff:
    """One tensor in both checkpoints that differs: its specs on each side, and how its values
    differ (None when its shapes differ, so values were not compared, or when only its dtype
    differs and the values are equal)."""

    name: str
    a: TensorSpec
    b: TensorSpec
    values: ValueDiff | None

    @property
    def shape_differs(self) -> bool:
        return self.a.shape != self.b.shape

    @property
    def dtype_differs(self) -> bool:
        return self.a.dtype != self.b.dtype

    def __str__(self) -> str:
        parts = []
        if self.shape_differs or self.dtype_differs:
            parts.append(f"A {_spec_text(self.a)}, B {_spec_text(self.b)}")
        if self.values is not None:
            parts.append(str(self.values))
        return f"{self.name}: " + "; ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "a": self.a.to_json(),
            "b": self.b.to_json(),
            "values": None if self.values is None else self.values.to_json(),
        }


def _spec_text(t: TensorSpec) -> str:
    return f"{'x'.join(map(str, t.shape)) or 'scalar'} {t.dtype}"


@dataclass(frozen=True, slots=True)
class DiffReport:
    """What `diff` found: names only in A or only in B, the tensors in both that differ (shape,
    dtype or values), and how many tensors in both are equal.

    >>> r = DiffReport("a", "b", 0.0, 0.0, only_a=("x",), only_b=(), differing=(), same=2)
    >>> r.equal, r.summary()
    (False, 'a and b differ: 2 of 2 tensors in both are equal; 1 only in A (rtol 0, atol 0)')
    """

    a: str
    b: str
    rtol: float
    atol: float
    only_a: tuple[str, ...]
    only_b: tuple[str, ...]
    differing: tuple[TensorDiff, ...]
    same: int

    @property
    def equal(self) -> bool:
        """Whether both checkpoints hold the same names, shapes, dtypes, and values within
        the tolerance."""
        return not (self.only_a or self.only_b or self.differing)

    @property
    def shape_mismatches(self) -> tuple[TensorDiff, ...]:
        return tuple(d for d in self.differing if d.shape_differs)

    @property
    def dtype_mismatches(self) -> tuple[TensorDiff, ...]:
        return tuple(d for d in self.differing if d.dtype_differs and not d.shape_differs)

    @property
    def value_mismatches(self) -> tuple[TensorDiff, ...]:
        return tuple(d for d in self.differing if d.values is not None)

    def summary(self) -> str:
        """One line: equal or not, and the counts."""
        both = self.same + len(self.differing)
        tol = f"(rtol {self.rtol:g}, atol {self.atol:g})"
        if self.equal:
            return f"{self.a} and {self.b} are equal: {both} tensors {tol}"
        counts = [
            f"{n} {what}"
            for n, what in (
                (len(self.shape_mismatches), "with other shapes"),
                (len(self.dtype_mismatches), "with other dtypes"),
                (len(self.value_mismatches), "with other values"),
                (len(self.only_a), "only in A"),
                (len(self.only_b), "only in B"),
            )
            if n
        ]
        return (
            f"{self.a} and {self.b} differ: {self.same} of {both} tensors in both are equal; "
            f"{', '.join(counts)} {tol}"
        )

    def explain(self) -> str:
        """Every difference, one line each, grouped, then the summary."""
        lines: list[str] = []
        for title, names in (("only in A", self.only_a), ("only in B", self.only_b)):
            if names:
                lines.append(f"{title} ({len(names)}):")
                lines += [f"  {n}" for n in names]
        for title, diffs in (
            ("shape mismatches", self.shape_mismatches),
            ("dtype mismatches", self.dtype_mismatches),
            ("value mismatches", tuple(d for d in self.value_mismatches if not d.dtype_differs)),
        ):
            if diffs:
                lines.append(f"{title} ({len(diffs)}):")
                lines += [f"  {d}" for d in diffs]
        lines.append(self.summary())
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "rtol": self.rtol,
            "atol": self.atol,
            "equal": self.equal,
            "same": self.same,
            "only_in_a": list(self.only_a),
            "only_in_b": list(self.only_b),
            "shape_mismatches": [d.to_json() for d in self.shape_mismatches],
            "dtype_mismatches": [d.to_json() for d in self.dtype_mismatches],
            "value_mismatches": [d.to_json() for d in self.value_mismatches],
        }


def diff(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    rtol: float = 0.0,
    atol: float = 0.0,
) -> DiffReport:
    """Compare two checkpoints tensor by tensor, streaming; B is the reference for `rtol`.

    Args:
        a: a checkpoint in any format weightbridge reads (a path, an index file or its folder,
            a Hugging Face folder, a zarr/orbax directory, a URL). Names are compared as the
            readers give them (`weightbridge inspect`), in A's order.
        b: the other checkpoint, the reference for `rtol`.
        rtol: relative tolerance: floating-point tensors are equal where
            ``|a - b| <= atol + rtol * |b|`` (NaN equals NaN); integer and bool tensors must be
            equal exactly. Default: exact.
        atol: absolute tolerance.

    Returns:
        A `DiffReport`; its `equal` says whether names, shapes, dtypes and values all agree.
        Tensors whose dtypes differ but shapes agree have their values compared too.

    Raises:
        FormatError: a checkpoint cannot be read (the message names it).
        ValueError: a negative tolerance.

    >>> import tempfile
    >>> from weightbridge.io import write_checkpoint
    >>> d = tempfile.mkdtemp()
    >>> write_checkpoint(d + "/a.safetensors", {"w": np.float32([1, 2]), "x": np.int8([0])})
    >>> write_checkpoint(d + "/b.npz", {"w": np.float32([1, 2.5])})
    >>> r = diff(d + "/a.safetensors", d + "/b.npz", atol=0.1)
    >>> r.equal, r.only_a, r.differing[0].values.max_abs
    (False, ('x',), 0.5)
    """
    from weightbridge import io as wio

    if not (rtol >= 0 and atol >= 0):
        raise ValueError(f"tolerances must be >= 0, found rtol={rtol}, atol={atol}")
    with wio.open_reader(a) as ra, wio.open_reader(b) as rb:
        spec_a, spec_b = ra.specs(), rb.specs()
        in_b = set(spec_b.names)
        differing: list[TensorDiff] = []
        same = 0
        for ta, tb in _pairs(spec_a, spec_b):
            found = None
            if ta.shape == tb.shape:
                found = compare_values(ra.read(ta.name), rb.read(tb.name), rtol=rtol, atol=atol)
                ra.release(ta.name)
                rb.release(tb.name)
            if found is None and ta == tb:
                same += 1
            else:
                differing.append(TensorDiff(ta.name, ta, tb, found))
        in_a = set(spec_a.names)
        return DiffReport(
            a=os.fspath(a),
            b=os.fspath(b),
            rtol=float(rtol),
            atol=float(atol),
            only_a=tuple(n for n in spec_a.names if n not in in_b),
            only_b=tuple(n for n in spec_b.names if n not in in_a),
            differing=tuple(differing),
            same=same,
        )


def _pairs(
    spec_a: CheckpointSpec, spec_b: CheckpointSpec
) -> Iterator[tuple[TensorSpec, TensorSpec]]:
    """The (A, B) specs of every name in both, in A's order (the order its files hold them)."""
    for ta in spec_a:
        if ta.name in spec_b:
            yield ta, spec_b[ta.name]
