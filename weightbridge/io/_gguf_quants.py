"""GGML tensor types: their block sizes and numpy dequantization kernels for GGUF.

A quantized GGML tensor is a sequence of fixed-size *blocks* along each row (GGUF's first
dimension, ``ne[0]``); a block of `type_size` bytes holds `block_size` elements as small integers
plus one or two float16 scales. Each kernel here turns an ``(n, type_size)`` uint8 array of blocks
into an ``(n, block_size)`` float32 array with the same float32 operations, in the same order, as
ggml's reference `dequantize_row_*` (ggml-quants.c), so results are bit-exact with it and with
gguf-py's `gguf.quants.dequantize` (the tests' oracle).

Types without a kernel here (the IQ1-IQ3 grid types, TQ*, NVFP4, ...) are reported by name.

Q8_0 and Q4_0 can also be quantized (`quantize`), with the float32 operations of gguf-py's
`gguf.quants.quantize` (Q8_0's is ggml's reference, bit for bit), so files we write hold the
same bytes gguf-py would write.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# Elements per super-block of the K-quants (ggml's QK_K).
QK_K = 256

Kernel = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True, slots=True)
class GgmlType:
    """One GGML tensor type: `code` is weightbridge's dtype code for a plain type, `kernel` the
    dequantizer of a quantized one (None for plain types and quantized types we cannot read)."""

    id: int
    name: str
    block_size: int
    type_size: int
    code: str | None = None
    kernel: Kernel | None = None

    @property
    def quantized(self) -> bool:
        return self.code is None


_SHIFT_NIBBLES = np.array([0, 4], dtype=np.uint8)
_SHIFT_CRUMBS = np.array([0, 2, 4, 6], dtype=np.uint8)
_SHIFT_BITS = np.arange(8, dtype=np.uint8)


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 scale at byte `start` of each block, as float32 column (n, 1)."""
    return blocks[:, start : start + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(packed: np.ndarray, run: int) -> np.ndarray:
    """Unpack 4-bit values: each run of `run` bytes gives `run` low nibbles, then `run` high."""
    n = packed.shape[0]
    out = packed.reshape(n, -1, 1, run) >> _SHIFT_NIBBLES.reshape(1, 1, 2, 1)
    return (out & np.uint8(0x0F)).reshape(n, -1)


def _crumbs(packed: np.ndarray, run: int) -> np.ndarray:
    """Unpack 2-bit values: each run of `run` bytes gives its bits 0-1, then 2-3, 4-5, 6-7."""
    n = packed.shape[0]
    out = packed.reshape(n, -1, 1, run) >> _SHIFT_CRUMBS.reshape(1, 1, 4, 1)
    return (out & np.uint8(0x03)).reshape(n, -1)


def _bits(packed: np.ndarray, run: int) -> np.ndarray:
    """Unpack 1-bit values: each run of `run` bytes gives its bit 0 for each byte, then bit 1..."""
    n = packed.shape[0]
    out = packed.reshape(n, -1, 1, run) >> _SHIFT_BITS.reshape(1, 1, 8, 1)
    return (out & np.uint8(0x01)).reshape(n, -1)


def _q8_0(b: np.ndarray) -> np.ndarray:
    out: np.ndarray = b[:, 2:].view(np.int8).astype(np.float32) * _f16(b, 0)
    return out


def _q4_0(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 2:], 16).astype(np.int8) - np.int8(8)
    return _f16(b, 0) * q.astype(np.float32)


def _q4_1(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 4:], 16).astype(np.float32)
    out: np.ndarray = _f16(b, 0) * q + _f16(b, 2)
    return out


def _five_bit(b: np.ndarray, high_at: int) -> np.ndarray:
    """Q5 elements: 4 low bits as nibbles, the fifth from a little-endian 32-bit mask."""
    mask = b[:, high_at : high_at + 4].copy().view("<u4")
    high = ((mask >> np.arange(32, dtype=np.uint32)) & np.uint32(1)).astype(np.uint8)
    out: np.ndarray = _nibbles(b[:, high_at + 4 :], 16) | (high << np.uint8(4))
    return out


def _q5_0(b: np.ndarray) -> np.ndarray:
    q = _five_bit(b, 2).astype(np.int8) - np.int8(16)
    return _f16(b, 0) * q.astype(np.float32)


def _q5_1(b: np.ndarray) -> np.ndarray:
    out: np.ndarray = _f16(b, 0) * _five_bit(b, 4).astype(np.float32) + _f16(b, 2)
    return out


def _q2_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    scales = b[:, :16]
    q = _crumbs(b[:, 16:80], 32).astype(np.float32).reshape(n, 16, 16)
    d, dmin = _f16(b, 80), _f16(b, 82)
    dl = (d * (scales & np.uint8(0x0F)).astype(np.float32)).reshape(n, 16, 1)
    ml = (dmin * (scales >> np.uint8(4)).astype(np.float32)).reshape(n, 16, 1)
    out: np.ndarray = (dl * q - ml).reshape(n, QK_K)
    return out


def _q3_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    hmask, qs, packed = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = _f16(b, 108)
    # 16 six-bit scales: low 4 bits are the nibbles of bytes 0-7 (all low, then all high),
    # high 2 bits the crumbs of bytes 8-11 (bits 0-1 of each, then 2-3, ...).
    low = _nibbles(packed[:, :8], 8)
    high = _crumbs(packed[:, 8:], 4)
    scales = ((low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)).astype(np.float32)
    dl = (d * scales).reshape(n, 16, 1)
    ql = _crumbs(qs, 32).reshape(n, 16, 16)
    # A set mask bit means no offset; a clear one subtracts 4.
    qh = _bits(hmask, 32).reshape(n, 16, 16) ^ np.uint8(1)
    q = (ql.astype(np.int8) - (qh << np.uint8(2)).astype(np.int8)).astype(np.float32)
    out: np.ndarray = (dl * q).reshape(n, QK_K)
    return out


def _k_scale_min(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins of a Q4_K/Q5_K super-block, from its 12 packed bytes."""
    d, m, md = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=1)
    return sc, mn


def _k_apply(b: np.ndarray, q: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b, 0) * sc.astype(np.float32)).reshape(n, 8, 1)
    dm = (_f16(b, 2) * mn.astype(np.float32)).reshape(n, 8, 1)
    out: np.ndarray = (d * q.reshape(n, 8, 32) - dm).reshape(n, QK_K)
    return out


def _q4_k(b: np.ndarray) -> np.ndarray:
    return _k_apply(b, _nibbles(b[:, 16:144], 32).astype(np.float32))


def _q5_k(b: np.ndarray) -> np.ndarray:
    high = _bits(b[:, 16:48], 32)
    q = _nibbles(b[:, 48:176], 32) | (high << np.uint8(4))
    return _k_apply(b, q.astype(np.float32))


def _q6_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    ql = _nibbles(b[:, :128], 64)
    qh = _crumbs(b[:, 128:192], 32)
    scales = b[:, 192:208].view(np.int8).astype(np.float32)
    d = (_f16(b, 208) * scales).reshape(n, 16, 1)
    q = ((ql | (qh << np.uint8(4))).astype(np.int8) - np.int8(32)).astype(np.float32)
    out: np.ndarray = (d * q.reshape(n, 16, 16)).reshape(n, QK_K)
    return out


# The 16 values of a 4-bit code in MXFP4 (e2m1, doubled so they are integers) and in the IQ4
# types (a non-linear grid), as ggml's kvalues_mxfp4 and kvalues_iq4nl.
_E2M1_DOUBLED = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.float32)
_IQ4_GRID = np.array(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32
)


def _e8m0_half(e: np.ndarray) -> np.ndarray:
    """An E8M0 scale (2**(e - 127)) halved, as float32 (halved to undo the doubled values)."""
    e32 = e.astype(np.uint32)
    bits = np.where(e32 < 2, np.uint32(0x00200000) << e32, (e32 - np.uint32(1)) << np.uint32(23))
    out: np.ndarray = bits.astype(np.uint32).view(np.float32)
    return out


def _mxfp4(b: np.ndarray) -> np.ndarray:
    out: np.ndarray = _e8m0_half(b[:, :1]) * _E2M1_DOUBLED[_nibbles(b[:, 1:], 16)]
    return out


def _iq4_nl(b: np.ndarray) -> np.ndarray:
    out: np.ndarray = _f16(b, 0) * _IQ4_GRID[_nibbles(b[:, 2:], 16)]
    return out


def _iq4_xs(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    high = b[:, 2:4].copy().view("<u2")  # bits 2j..2j+1: high bits of sub-block j's scale
    high = ((high >> (2 * np.arange(8, dtype=np.uint16))) & np.uint16(3)).astype(np.uint8)
    low = _nibbles(b[:, 4:8].reshape(n, 4, 1), 1).reshape(n, 8)
    scales = ((low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)).astype(np.float32)
    dl = (_f16(b, 0) * scales).reshape(n, 8, 1)
    q = _IQ4_GRID[_nibbles(b[:, 8:], 16)].reshape(n, 8, 32)
    out: np.ndarray = (dl * q).reshape(n, QK_K)
    return out


TYPES: dict[int, GgmlType] = {
    t.id: t
    for t in (
        GgmlType(0, "F32", 1, 4, "F32"),
        GgmlType(1, "F16", 1, 2, "F16"),
        GgmlType(2, "Q4_0", 32, 18, kernel=_q4_0),
        GgmlType(3, "Q4_1", 32, 20, kernel=_q4_1),
        GgmlType(6, "Q5_0", 32, 22, kernel=_q5_0),
        GgmlType(7, "Q5_1", 32, 24, kernel=_q5_1),
        GgmlType(8, "Q8_0", 32, 34, kernel=_q8_0),
        GgmlType(9, "Q8_1", 32, 40),
        GgmlType(10, "Q2_K", QK_K, 84, kernel=_q2_k),
        GgmlType(11, "Q3_K", QK_K, 110, kernel=_q3_k),
        GgmlType(12, "Q4_K", QK_K, 144, kernel=_q4_k),
        GgmlType(13, "Q5_K", QK_K, 176, kernel=_q5_k),
        GgmlType(14, "Q6_K", QK_K, 210, kernel=_q6_k),
        GgmlType(15, "Q8_K", QK_K, 292),
        GgmlType(16, "IQ2_XXS", QK_K, 66),
        GgmlType(17, "IQ2_XS", QK_K, 74),
        GgmlType(18, "IQ3_XXS", QK_K, 98),
        GgmlType(19, "IQ1_S", QK_K, 50),
        GgmlType(20, "IQ4_NL", 32, 18, kernel=_iq4_nl),
        GgmlType(21, "IQ3_S", QK_K, 110),
        GgmlType(22, "IQ2_S", QK_K, 82),
        GgmlType(23, "IQ4_XS", QK_K, 136, kernel=_iq4_xs),
        GgmlType(24, "I8", 1, 1, "I8"),
        GgmlType(25, "I16", 1, 2, "I16"),
        GgmlType(26, "I32", 1, 4, "I32"),
        GgmlType(27, "I64", 1, 8, "I64"),
        GgmlType(28, "F64", 1, 8, "F64"),
        GgmlType(29, "IQ1_M", QK_K, 56),
        GgmlType(30, "BF16", 1, 2, "BF16"),
        GgmlType(34, "TQ1_0", QK_K, 54),
        GgmlType(35, "TQ2_0", QK_K, 66),
        GgmlType(39, "MXFP4", 32, 17, kernel=_mxfp4),
        GgmlType(40, "NVFP4", 64, 36),
        GgmlType(41, "Q1_0", 128, 18),
    )
}
# GGML type id by name (``"Q8_0"`` -> 8).
BY_NAME: dict[str, GgmlType] = {t.name: t for t in TYPES.values()}


def dequantize(kind: GgmlType, blocks: np.ndarray) -> np.ndarray:
    """Elements of `blocks` (uint8, a whole number of `kind`'s blocks) as flat float32.

    >>> b = np.frombuffer(np.float16(0.5).tobytes() + bytes(range(32)), np.uint8)
    >>> dequantize(BY_NAME["Q8_0"], b)[:4].tolist()
    [0.0, 0.5, 1.0, 1.5]
    """
    if kind.kernel is None:
        raise ValueError(f"GGML type {kind.name} has no dequantizer here")
    return kind.kernel(blocks.reshape(-1, kind.type_size)).reshape(-1)


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """roundf() of C: halves round away from zero. Written as floor of the magnitude plus
    floor of twice the fraction, because ``floor(a + 0.5)`` rounds 0.49999997 up in float32."""
    a = np.abs(x)
    whole = np.floor(a)
    out: np.ndarray = np.sign(x) * (whole + np.floor(2 * (a - whole)))
    return out


def _quantize_q8_0(x: np.ndarray) -> np.ndarray:
    d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = _round_half_away(x * inv).astype(np.int8).view(np.uint8)
    return np.concatenate([d.astype(np.float16).view(np.uint8), q], axis=1)


def _quantize_q4_0(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    peak = np.take_along_axis(x, np.abs(x).argmax(axis=1, keepdims=True), axis=1)
    d = peak / np.float32(-8)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = np.trunc(x * inv + np.float32(8.5)).astype(np.uint8).clip(0, 15).reshape(n, 2, 16)
    packed = q[:, 0, :] | (q[:, 1, :] << np.uint8(4))
    return np.concatenate([d.astype(np.float16).view(np.uint8), packed], axis=1)


# The types `quantize` can produce.
QUANTIZERS: dict[str, Kernel] = {"Q8_0": _quantize_q8_0, "Q4_0": _quantize_q4_0}


def quantize(kind: GgmlType, values: np.ndarray) -> np.ndarray:
    """`values` (float32, a whole number of `kind`'s blocks) as `kind`'s blocks, flat uint8.

    >>> x = np.zeros(32, np.float32); x[:3] = [127, -3.5, 2.5]  # scale 1: halves round away
    >>> q = quantize(BY_NAME["Q8_0"], x)
    >>> q.nbytes, dequantize(BY_NAME["Q8_0"], q)[:3].tolist()
    (34, [127.0, -4.0, 3.0])
    """
    fn = QUANTIZERS.get(kind.name)
    if fn is None:
        raise ValueError(
            f"GGML type {kind.name} cannot be quantized here; {sorted(QUANTIZERS)} can"
        )
    blocks = np.ascontiguousarray(values, dtype=np.float32).reshape(-1, kind.block_size)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN and inf pass through as ggml's do
        return fn(blocks).reshape(-1)
