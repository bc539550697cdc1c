"""Q4_K and Q6_K ("k-quants") quantization in numpy, and llama.cpp's q4_k_m choice of type per tensor.

    data = quantize_q4_k(w)              # w (rows, cols) float, cols % 256 == 0 -> uint8 (rows, cols / 256 * 144)
    w2 = dequantize_q4_k(data)           # (rows, cols) float32, what llama.cpp computes with
    qtype = q4_k_m_type("blk.3.ffn_down.weight", (4096, 11008), n_layers=32, has_output=True)

The `gguf` package quantizes to F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 but not to the k-quants; this module
writes the same bytes layout as ggml (block structs of ggml-common.h), which `gguf.quants.dequantize`
reads back. Both formats work on super-blocks of 256 consecutive values of a row:

* Q4_K (144 bytes, 4.5 bits per weight): fp16 `d`, fp16 `dmin`, 12 bytes of packed 6-bit scales and
  mins for 8 sub-blocks of 32 values, then 128 bytes of 4-bit values. A value is
  `d * scale[j] * q - dmin * min[j]` with q in 0..15 (the sub-block's offset is never above 0).
  Sub-blocks 2c and 2c+1 share 32 bytes: low nibbles hold sub-block 2c, high nibbles 2c+1.
  Scales/mins of sub-blocks 0-3 sit in the low 6 bits of bytes 0-3 / 4-7; those of sub-blocks 4-7
  keep their low 4 bits in bytes 8-11 (scale low nibble, min high nibble) and their top 2 bits in
  the top 2 bits of bytes 0-3 (scales) / 4-7 (mins).
* Q6_K (210 bytes, 6.56 bits per weight): 128 bytes of low 4 bits, 64 bytes of high 2 bits, 16 int8
  scales (one per 16 values), fp16 `d`. A value is `d * scale[j] * (q - 32)` with q in 0..63.
  Each half of 128 values uses 64 low-bit bytes and 32 high-bit bytes: value l + 32k (k = 0..3,
  l = 0..31) takes byte l (k even) or l + 32 (k odd) of the low bits, low nibble for k < 2, high
  nibble otherwise, and bits 2k, 2k+1 of high-bit byte l.

Choosing the scales (not the naive max/15): each sub-block tries a small grid of candidate step
sizes around (max - min) / 15 (Q4_K) or max|x| / 32 (Q6_K, either sign), rounds, refits scale (and
offset) by least squares for those integers, and keeps the candidate of least squared error. The
per-sub-block scales are then quantized to 6 bits (Q4_K) / int8 (Q6_K) against the super-block's
fp16 `d` (rounded up, so that tiny rows keep a non-zero `d` and no scale clips; a sub-block with any
spread keeps a step of at least `d`), and the values are rounded once more with the scales stored.

The q4_k_m mix (`q4_k_m_type`, following llama.cpp's rule for LLAMA_FTYPE_MOSTLY_Q4_K_M):
* the output head, or the token embedding when the head is tied to it: Q6_K;
* `attn_v` and `ffn_down` of layer i: Q6_K when `use_more_bits(i, n_layers)` (the first eighth of the
  layers, the last eighth, and every third layer in between), else Q4_K;
* fused `attn_qkv` (Phi-3): llama.cpp uses Q5_K there; this module has no Q5_K and uses Q6_K
  (more bits, never fewer);
* every other 2-d weight: Q4_K; 1-d tensors (norms, biases): F32.
A row length that is not a multiple of 256 cannot hold k-quant blocks: Q4_K falls back to Q5_0 and
Q6_K to Q8_0 (as llama.cpp does), and to F16 when it is not a multiple of 32 either.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QT

from .gguf_blocks import BLOCK_DEQUANTIZERS

QK_K = 256  # values per super-block
Q4_K_BYTES = 144
Q6_K_BYTES = 210
_ROWS_PER_CHUNK = 1 << 14  # super-blocks quantized at once (bounds the temporaries to a few MB)


# ----------------------------------------------------------------------------------------------
# the super-block scales


def _fp16_at_least(x: np.ndarray) -> np.ndarray:
    """x (nb,) >= 0 float32 -> the fp16 values nearest above (or equal to) it: the super-block's `d`.

    Rounded to nearest, `d` may fall below x and clip the largest sub-block scale (63 / 127 steps of
    `d`), or flush to zero when x is under fp16's smallest subnormal (6e-8: Q6_K rows of |w| ~ 1e-5),
    which would store every value of the block as 0. Rounded up, the sub-block scales always fit."""
    x = np.asarray(x, np.float32)
    d = x.astype(np.float16)  # (nb,)
    low = d.astype(np.float32) < x
    return np.where(low, np.nextafter(d, np.float16(np.inf)), d).astype(np.float16)


# ----------------------------------------------------------------------------------------------
# Q4_K


def _fit_affine(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of x (N, n): scale a >= 0 and offset b <= 0 with x ~ a * q + b, q in 0..nmax.

    Tries step counts nmax - 1 .. nmax + 1 across the row's range [min(x, 0), max(x)], refits (a, b)
    by least squares for each rounding, keeps the fit of least squared error.
    """
    lo = np.minimum(x.min(axis=1, keepdims=True), 0.0)  # (N, 1)
    span = x.max(axis=1, keepdims=True) - lo
    n = x.shape[1]
    best_err = np.full((x.shape[0], 1), np.inf, np.float32)
    best_a, best_b = span / nmax, lo
    safe_span = np.where(span > 0, span, 1.0)
    for steps in nmax + np.linspace(-1.0, 1.0, 21):
        q = np.clip(np.rint((x - lo) * (steps / safe_span)), 0, nmax)  # (N, n)
        sq, sx = q.sum(1, keepdims=True), x.sum(1, keepdims=True)
        sqq, sqx = (q * q).sum(1, keepdims=True), (q * x).sum(1, keepdims=True)
        det = n * sqq - sq * sq
        ok = det > 0
        # every value on one level q (a narrow all-positive row): no line through them; keep b = lo and
        # fit a alone, else the row would dequantize to lo (0) whatever its values
        a_alone = (sqx - lo * sq) / np.where(sqq > 0, sqq, 1.0)
        a = np.where(ok, (n * sqx - sq * sx) / np.where(ok, det, 1.0), a_alone)
        b = np.where(ok, (sx - a * sq) / n, lo)
        # the format stores the offset as -dmin * min with min >= 0: clamp b to 0 and refit a alone
        pos = b > 0
        a = np.where(pos, sqx / np.where(sqq > 0, sqq, 1.0), a)
        b = np.where(pos, 0.0, b)
        a = np.maximum(a, 0.0)
        err = ((a * q + b - x) ** 2).sum(1, keepdims=True)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_a, best_b = np.where(better, a, best_a), np.where(better, b, best_b)
    return best_a[:, 0], best_b[:, 0]


def _quantize_q4_k_blocks(x: np.ndarray) -> np.ndarray:
    """x (nb, 256) float32 -> (nb, 144) uint8."""
    nb = x.shape[0]
    sub = x.reshape(nb * 8, 32)
    a, b = _fit_affine(sub, 15)
    scales, mins = a.reshape(nb, 8), (-b).reshape(nb, 8)  # (nb, 8), both >= 0
    d = _fp16_at_least(scales.max(1) / 63)  # (nb,)
    dmin = _fp16_at_least(mins.max(1) / 63)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    # a sub-block of any spread keeps a step of at least d: its levels still hold -offset (q = 0), so each
    # value rounds to one at least as near as with no step at all
    sc = np.clip(np.rint(scales / np.where(d32 > 0, d32, 1.0)), scales > 0, 63).astype(np.uint8)  # (nb, 8)
    mn = np.clip(np.rint(mins / np.where(dmin32 > 0, dmin32, 1.0)), 0, 63).astype(np.uint8)
    step = (d32 * sc)[:, :, None]  # (nb, 8, 1) the stored scale of each sub-block
    offset = (dmin32 * mn)[:, :, None]
    xs = x.reshape(nb, 8, 32)
    q = np.where(step > 0, np.rint((xs + offset) / np.where(step > 0, step, 1.0)), 0)
    q = np.clip(q, 0, 15).astype(np.uint8)  # (nb, 8, 32)

    packed = np.empty((nb, 12), np.uint8)
    packed[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = (mn[:, 0:4] & 63) | ((mn[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:8] & 15) | ((mn[:, 4:8] & 15) << 4)
    qs = (q[:, 0::2, :] | (q[:, 1::2, :] << 4)).reshape(nb, 128)
    return np.concatenate([d.reshape(nb, 1).view(np.uint8), dmin.reshape(nb, 1).view(np.uint8), packed, qs], axis=1)


# ----------------------------------------------------------------------------------------------
# Q6_K


def _fit_symmetric(x: np.ndarray) -> np.ndarray:
    """Per row of x (N, n): scale s (either sign) with x ~ s * q, q in -32..31, least squared error."""
    idx = np.abs(x).argmax(axis=1)
    peak = np.take_along_axis(x, idx[:, None], axis=1)  # (N, 1) the signed largest value
    best_err = np.full_like(peak, np.inf)
    best_s = -peak / 32
    safe_peak = np.where(peak != 0, peak, 1.0)
    # the peak on level -32 (negative scale for a positive peak) or on +31, and a few steps inside
    for levels in [-(32 - k / 4) for k in range(0, 25)] + [31 - k / 4 for k in range(0, 21)]:
        q = np.clip(np.rint(x * (levels / safe_peak)), -32, 31)
        sqq, sqx = (q * q).sum(1, keepdims=True), (q * x).sum(1, keepdims=True)
        s = sqx / np.where(sqq > 0, sqq, 1.0)
        err = ((s * q - x) ** 2).sum(1, keepdims=True)
        better = err < best_err
        best_err, best_s = np.where(better, err, best_err), np.where(better, s, best_s)
    return best_s[:, 0]


def _quantize_q6_k_blocks(x: np.ndarray) -> np.ndarray:
    """x (nb, 256) float32 -> (nb, 210) uint8."""
    nb = x.shape[0]
    s = _fit_symmetric(x.reshape(nb * 16, 16)).reshape(nb, 16)
    d = _fp16_at_least(np.abs(s).max(1) / 127)  # (nb,)
    d32 = d.astype(np.float32)[:, None]
    sc = np.clip(np.rint(s / np.where(d32 > 0, d32, 1.0)), -128, 127)  # (nb, 16)
    sc = np.where((sc == 0) & (s != 0), np.sign(s), sc).astype(np.int8)  # a step of d, not none (as Q4_K)
    step = (d32 * sc)[:, :, None]  # (nb, 16, 1)
    xs = x.reshape(nb, 16, 16)
    q = np.where(step != 0, np.rint(xs / np.where(step != 0, step, 1.0)), 0)
    u = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(nb, 2, 4, 32)  # [half, k, l]

    ql = np.empty((nb, 2, 64), np.uint8)
    ql[:, :, :32] = (u[:, :, 0] & 15) | ((u[:, :, 2] & 15) << 4)
    ql[:, :, 32:] = (u[:, :, 1] & 15) | ((u[:, :, 3] & 15) << 4)
    qh = (u[:, :, 0] >> 4) | ((u[:, :, 1] >> 4) << 2) | ((u[:, :, 2] >> 4) << 4) | ((u[:, :, 3] >> 4) << 6)
    return np.concatenate(
        [ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8), d.reshape(nb, 1).view(np.uint8)], axis=1
    )


# ----------------------------------------------------------------------------------------------
# whole tensors


def _rowwise(x: np.ndarray, fn, block_bytes: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 0 or x.shape[-1] % QK_K:
        raise ValueError(f"k-quants need rows of a multiple of {QK_K} values, got shape {x.shape}")
    flat = x.reshape(-1, QK_K)
    out = np.empty((flat.shape[0], block_bytes), np.uint8)
    for start in range(0, flat.shape[0], _ROWS_PER_CHUNK):
        out[start : start + _ROWS_PER_CHUNK] = fn(flat[start : start + _ROWS_PER_CHUNK])
    return out.reshape(*x.shape[:-1], x.shape[-1] // QK_K * block_bytes)


def _blockwise(data: np.ndarray, fn, block_bytes: int) -> np.ndarray:
    data = np.asarray(data, dtype=np.uint8)
    if data.shape[-1] % block_bytes:
        raise ValueError(f"rows of {data.shape[-1]} bytes are not whole blocks of {block_bytes}")
    out = fn(data.reshape(-1, block_bytes))
    return out.reshape(*data.shape[:-1], data.shape[-1] // block_bytes * QK_K)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """(..., cols) float -> (..., cols / 256 * 144) uint8 in ggml's block_q4_K layout."""
    return _rowwise(x, _quantize_q4_k_blocks, Q4_K_BYTES)


def dequantize_q4_k(data: np.ndarray) -> np.ndarray:
    """(..., nbytes) uint8 of block_q4_K -> (..., nbytes / 144 * 256) float32."""
    return _blockwise(data, BLOCK_DEQUANTIZERS["Q4_K"], Q4_K_BYTES)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """(..., cols) float -> (..., cols / 256 * 210) uint8 in ggml's block_q6_K layout."""
    return _rowwise(x, _quantize_q6_k_blocks, Q6_K_BYTES)


def dequantize_q6_k(data: np.ndarray) -> np.ndarray:
    """(..., nbytes) uint8 of block_q6_K -> (..., nbytes / 210 * 256) float32."""
    return _blockwise(data, BLOCK_DEQUANTIZERS["Q6_K"], Q6_K_BYTES)


# ----------------------------------------------------------------------------------------------
# the q4_k_m mix


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of the layers that keep more bits: the first and last eighth, and every
    third layer in between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def fallback_type(qtype: QT, cols: int) -> QT:
    """`qtype`, or what llama.cpp uses instead when a row of `cols` values cannot hold its blocks."""
    from gguf.constants import GGML_QUANT_SIZES

    block = GGML_QUANT_SIZES[qtype][0]
    if cols % block == 0:
        return qtype
    if qtype in (QT.Q4_K, QT.Q6_K) and cols % 32 == 0:
        return QT.Q5_0 if qtype == QT.Q4_K else QT.Q8_0
    return QT.F16


def q4_k_m_type(name: str, shape: tuple[int, ...], *, n_layers: int, has_output: bool) -> QT:
    """The storage type of one GGUF tensor (`blk.3.attn_v.weight`, shape (rows, cols)) in a q4_k_m file."""
    if len(shape) < 2:
        return QT.F32
    parts = name.split(".")
    kind = parts[2] if parts[0] == "blk" and len(parts) == 4 else parts[0]
    is_head = name == "output.weight" or (not has_output and name == "token_embd.weight")
    more_bits = kind in ("attn_v", "ffn_down") and use_more_bits(int(parts[1]), n_layers)
    qtype = QT.Q6_K if is_head or kind == "attn_qkv" or more_bits else QT.Q4_K
    return fallback_type(qtype, shape[-1])


__all__ = [
    "QK_K",
    "dequantize_q4_k",
    "dequantize_q6_k",
    "fallback_type",
    "q4_k_m_type",
    "quantize_q4_k",
    "quantize_q6_k",
    "use_more_bits",
]
