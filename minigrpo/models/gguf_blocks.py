"""GGUF block formats: the stored bytes of ggml's quantized types, decoded to float32.

    out = BLOCK_DEQUANTIZERS["Q4_K"](blocks)   # (n_blocks, 144) uint8 -> (n_blocks, 256) float32

Each block of `values per block` consecutive values of a row holds f16 scale fields and packed
integers q; the formulas are ggml's (ggml-quants.c), evaluated in its order so that the float32
results are the same to the bit (a product is rounded before an offset is added or subtracted).
"low nibbles of bytes 0..15, then high nibbles" style packings are unpacked by `_fields`.
"""

from __future__ import annotations

import numpy as np


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The f16 field at byte `at` of every block, as float32 (n, 1)."""
    return np.ascontiguousarray(blocks[:, at : at + 2]).view("<f2").astype(np.float32)


def _fields(packed: np.ndarray, width: int, bits: int) -> np.ndarray:
    """Unpack `bits`-wide fields: each run of `width` bytes gives its lowest fields first (one per byte),
    then the next `bits` of every byte, and so on. (n, k * width) uint8 -> (n, k * width * 8 / bits) uint8."""
    shifts = np.arange(0, 8, bits, dtype=np.uint8).reshape(1, 1, -1, 1)
    n = packed.shape[0]
    return ((packed.reshape(n, -1, 1, width) >> shifts) & np.uint8((1 << bits) - 1)).reshape(n, -1)


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes of eight 6-bit scales and mins: sub-blocks 0-3 in the low 6 bits of bytes
    0-3 (scales) and 4-7 (mins); 4-7 have their low 4 bits in bytes 8-11 (scale low nibble, min high
    nibble) and their top 2 bits in the top bits of bytes 0-3 / 4-7. (n, 12) -> two (n, 8) float32."""
    s, m, low = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([s & 63, (low & 15) | ((s >> 2) & 48)], axis=1)
    mins = np.concatenate([m & 63, (low >> 4) | ((m >> 2) & 48)], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _q4_0(b: np.ndarray) -> np.ndarray:  # d f16 | 16 bytes: values 0-15 low nibbles, 16-31 high
    return _f16(b, 0) * (_fields(b[:, 2:], 16, 4).astype(np.float32) - 8)


def _q4_1(b: np.ndarray) -> np.ndarray:  # d f16 | m f16 | 16 bytes of nibbles; x = d q + m
    return _f16(b, 0) * _fields(b[:, 4:], 16, 4).astype(np.float32) + _f16(b, 2)


def _five_bits(b: np.ndarray, high_at: int) -> np.ndarray:
    """Q5_0/Q5_1 q in 0..31: a u32 of fifth bits (bit j for value j) then 16 bytes of nibbles."""
    high = np.unpackbits(b[:, high_at : high_at + 4], axis=1, bitorder="little")  # (n, 32)
    return (_fields(b[:, high_at + 4 :], 16, 4) | (high << 4)).astype(np.float32)


def _q5_0(b: np.ndarray) -> np.ndarray:  # d f16 | qh u32 | 16 bytes of nibbles; x = d (q - 16)
    return _f16(b, 0) * (_five_bits(b, 2) - 16)


def _q5_1(b: np.ndarray) -> np.ndarray:  # d f16 | m f16 | qh u32 | 16 bytes of nibbles; x = d q + m
    return _f16(b, 0) * _five_bits(b, 4) + _f16(b, 2)


def _q8_0(b: np.ndarray) -> np.ndarray:  # d f16 | 32 int8
    return _f16(b, 0) * np.ascontiguousarray(b[:, 2:]).view(np.int8).astype(np.float32)


def _q2_k(b: np.ndarray) -> np.ndarray:
    """16 bytes of (scale low nibble, min high nibble) per 16 values | 64 bytes of 2-bit q (per half of
    128 values: 32 bytes, lowest bits first) | d f16 | dmin f16; x = d scale q - dmin min."""
    n, sc = b.shape[0], b[:, :16]
    dl = (_f16(b, 80) * (sc & 15).astype(np.float32))[..., None]  # (n, 16, 1)
    ml = (_f16(b, 82) * (sc >> 4).astype(np.float32))[..., None]
    return (dl * _fields(b[:, 16:80], 32, 2).reshape(n, 16, 16).astype(np.float32) - ml).reshape(n, -1)


def _q3_k(b: np.ndarray) -> np.ndarray:
    """32 bytes of high bits (bit k of byte l: value 32k + l) | 64 bytes of 2-bit low q | 12 bytes of
    sixteen 6-bit scales (low nibbles in bytes 0-7, top 2 bits in 8-11) | d f16.
    x = d (scale - 32) (low - 4 (1 - high))."""
    n, sc = b.shape[0], b[:, 96:108]
    scales = (_fields(sc[:, :8], 8, 4) | (_fields(sc[:, 8:], 4, 2) << 4)).astype(np.float32) - 32  # (n, 16)
    dl = (_f16(b, 108) * scales)[..., None]  # (n, 16, 1)
    q = _fields(b[:, 32:96], 32, 2).astype(np.int8) - 4 * (1 - _fields(b[:, :32], 32, 1).astype(np.int8))
    return (dl * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, -1)


def _q4_k(b: np.ndarray) -> np.ndarray:
    """d f16 | dmin f16 | 12 bytes of scales/mins | 128 bytes: per 64 values 32 bytes, low nibbles for
    the first 32; x = d scale q - dmin min per sub-block of 32."""
    n, (scales, mins) = b.shape[0], _k_scales(b[:, 4:16])
    q = _fields(b[:, 16:], 32, 4).reshape(n, 8, 32).astype(np.float32)
    return ((_f16(b, 0) * scales)[..., None] * q - (_f16(b, 2) * mins)[..., None]).reshape(n, -1)


def _q5_k(b: np.ndarray) -> np.ndarray:
    """Q4_K with a fifth bit: d | dmin | scales | 32 bytes of high bits (bit k of byte l: value 32k + l)
    | 128 bytes of nibbles."""
    n, (scales, mins) = b.shape[0], _k_scales(b[:, 4:16])
    q = (_fields(b[:, 48:], 32, 4) | (_fields(b[:, 16:48], 32, 1) << 4)).reshape(n, 8, 32).astype(np.float32)
    return ((_f16(b, 0) * scales)[..., None] * q - (_f16(b, 2) * mins)[..., None]).reshape(n, -1)


def _q6_k(b: np.ndarray) -> np.ndarray:
    """128 bytes of low nibbles (per 128 values 64 bytes) | 64 bytes of 2-bit high parts (per 128 values
    32 bytes) | 16 int8 scales (one per 16 values) | d f16; x = d scale (q - 32)."""
    n = b.shape[0]
    q = (_fields(b[:, :128], 64, 4) | (_fields(b[:, 128:192], 32, 2) << 4)).astype(np.float32) - 32  # (n, 256)
    dl = (_f16(b, 208) * np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32))[..., None]
    return (dl * q.reshape(n, 16, 16)).reshape(n, -1)


BLOCK_DEQUANTIZERS = {
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}  # fmt: skip
