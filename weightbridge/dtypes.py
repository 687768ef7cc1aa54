"""One table of dtypes for every format: canonical codes, numpy dtypes and the aliases users type.

The canonical code is the one safetensors uses (``F32``, ``BF16``, ...), because the target spec
file is a safetensors header without offsets. numpy is the only array type that crosses module
boundaries; bf16 and fp8 come from ``ml_dtypes``.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from weightbridge.errors import DtypeError

# code -> numpy dtype (native little-endian; every format we write is little-endian).
_NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "C64": np.dtype(np.complex64),
}

# The dtypes numpy lacks, from ml_dtypes: code -> (ml_dtypes name, itemsize). Imported on first
# use only: `import ml_dtypes` costs most of a second, and listing a checkpoint needs no arrays.
_ML: dict[str, tuple[str, int]] = {
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}

_ALIASES: dict[str, str] = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "uint16": "U16",
    "int16": "I16",
    "uint32": "U32",
    "int32": "I32",
    "uint64": "U64",
    "int64": "I64",
    "float16": "F16",
    "fp16": "F16",
    "half": "F16",
    "f16": "F16",
    "bfloat16": "BF16",
    "bf16": "BF16",
    "float32": "F32",
    "fp32": "F32",
    "float": "F32",
    "f32": "F32",
    "float64": "F64",
    "fp64": "F64",
    "double": "F64",
    "f64": "F64",
    "float8_e4m3fn": "F8_E4M3",
    "f8_e4m3": "F8_E4M3",
    "fp8": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "f8_e5m2": "F8_E5M2",
    "complex64": "C64",
}

CODES: tuple[str, ...] = (
    *("BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "F16", "BF16", "F32"),
    *("F64", "F8_E4M3", "F8_E5M2", "C64"),
)


def canonical(name: str) -> str:
    """Return the canonical code for a dtype name or alias.

    >>> canonical("bfloat16"), canonical("F32"), canonical("torch.float16")
    ('BF16', 'F32', 'F16')
    """
    if not isinstance(name, str):
        raise DtypeError(f"dtype must be a string such as 'F32' or 'bfloat16', found {name!r}")
    key = name.strip()
    if key in _NUMPY or key in _ML:
        return key
    low = key.lower()
    for prefix in ("torch.", "jnp.", "np.", "numpy.", "tf."):
        if low.startswith(prefix):
            low = low[len(prefix) :]
    if low.upper() in _NUMPY or low.upper() in _ML:
        return low.upper()
    if low in _ALIASES:
        return _ALIASES[low]
    known = ", ".join(CODES)
    raise DtypeError(
        f"unknown dtype {name!r}; known dtypes are {known} (or numpy names like 'float32')"
    )


def to_numpy(code: str) -> np.dtype[Any]:
    """Return the numpy dtype for a canonical code or alias.

    >>> to_numpy("BF16").name
    'bfloat16'
    """
    code = canonical(code)
    if code in _ML:
        import ml_dtypes

        dt: np.dtype[Any] = np.dtype(getattr(ml_dtypes, _ML[code][0]))
        return dt
    return _NUMPY[code]


def from_numpy(dtype: Any) -> str:
    """Return the canonical code of a numpy dtype (byte order ignored).

    >>> from_numpy(np.dtype("<f4"))
    'F32'
    """
    dt = np.dtype(dtype)
    if dt.byteorder not in ("=", "|", "<") and dt.itemsize > 1:
        dt = dt.newbyteorder("<")
    for code, candidate in _NUMPY.items():
        if candidate == dt:
            return code
    if "ml_dtypes" in sys.modules:  # without it no array can have one of its dtypes
        for code in _ML:
            if to_numpy(code) == dt:
                return code
    raise DtypeError(f"numpy dtype {dt} has no weightbridge code; supported: {', '.join(CODES)}")


def itemsize(code: str) -> int:
    """Bytes per element of a dtype code.

    >>> itemsize("BF16")
    2
    """
    code = canonical(code)
    return _ML[code][1] if code in _ML else int(_NUMPY[code].itemsize)
