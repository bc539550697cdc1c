"""Q4_K / Q6_K blocks of rows whose values are tiny (|w| ~ 1e-5 .. 1e-7, as in the embedding rows of
tokens a model never saw), read back by the `gguf` package's dequantizer.

The super-block scale `d` is an fp16; rounded to nearest it flushes to zero under fp16's smallest
subnormal (6e-8), and every value of the block would read back as 0 (relative error 1). The format
can hold these rows: d = 6e-8 times an int8 / 6-bit sub-block scale.

Bounds (relative RMS error, measured on these rows, seed fixed): Q6_K at 1e-5 0.020 -> 0.03 (Q5_0 of
the same rows: 0.045); at 1e-7 both types 0.17 -> 0.25, the step of d = 6e-8 (a uniform rounding error
of 6e-8 / sqrt(12) against values of 1e-7); normal rows unchanged (Q4_K 0.071, Q6_K 0.016)."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")  # the writer's and the reference dequantizer's package (absent on bare GPU images)
QT, dequantize = gguf.GGMLQuantizationType, gguf.quants.dequantize

from minigrpo.models import kquants  # noqa: E402  (needs the gguf package)


def rel_err(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sqrt(((y - x) ** 2).mean() / (x**2).mean()))


def rows(scale: float) -> np.ndarray:
    return (np.random.default_rng(0).standard_normal((16, 512)) * scale).astype(np.float32)


QUANTIZERS = {"Q4_K": (kquants.quantize_q4_k, QT.Q4_K), "Q6_K": (kquants.quantize_q6_k, QT.Q6_K)}


@pytest.mark.parametrize(
    ("qtype", "scale", "bound"),
    [
        ("Q6_K", 1e-5, 0.03),
        ("Q6_K", 1e-7, 0.25),
        ("Q4_K", 1e-7, 0.25),
        ("Q4_K", 1e-5, 0.08),
        ("Q4_K", 0.02, 0.075),
        ("Q6_K", 0.02, 0.018),
    ],
)
def test_tiny_rows_keep_their_values(qtype, scale, bound):
    quantize, gguf_type = QUANTIZERS[qtype]
    x = rows(scale)
    back = dequantize(quantize(x), gguf_type)
    err = rel_err(x, back)
    assert err < bound, (qtype, scale, err)
    assert np.count_nonzero(back) > 0.5 * back.size  # not flushed to zero
