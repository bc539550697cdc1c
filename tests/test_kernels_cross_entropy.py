"""Fused LM-head cross-entropy (kernels/cross_entropy.py) and its torch spec, at the dtypes and edges
the log-prob tests leave out: the spec in fp64 (it is the reference the budget is measured against),
ignore_index=None, fp16 inputs, one token, a vocabulary that is no multiple of the chunk.

Budget as in the other kernel tests: err(kernel) <= 2 err(plain torch in the same dtype) + FLOOR,
err = ||out - fp64|| / ||fp64|| over the loss, dH and dW.
"""

from __future__ import annotations

import pytest
import torch
from helpers.kernel_checks import DEVICES, rel_err

from minigrpo.kernels import fused_linear_cross_entropy, linear_cross_entropy_ref

IGNORE = -100
FLOOR = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-3}


def _inputs(N, D, V, dtype, device="cpu", n_ignored=0):
    h = torch.randn(N, D, dtype=torch.float64, device=device).to(dtype)
    w = (torch.randn(V, D, dtype=torch.float64, device=device) * D**-0.5 * 3).to(dtype)
    tgt = torch.randint(0, V, (N,), device=device)
    tgt[0] = V - 1
    tgt[1 : 1 + n_ignored] = IGNORE
    return h, w, tgt


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_the_spec_keeps_fp64_inputs_in_fp64(reduction):
    # the spec rounded fp64 logits to fp32, so an "fp64 reference" was only fp32 (relative error ~1e-7)
    h, w, tgt = _inputs(9, 64, 301, torch.float64, n_ignored=2)
    got = linear_cross_entropy_ref(h, w, tgt, IGNORE, reduction)
    want = torch.nn.functional.cross_entropy(h @ w.T, tgt, ignore_index=IGNORE, reduction=reduction)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
    h32, w32 = h.float(), w.float()  # fp32 inputs stay fp32 (logits rounded as torch rounds them)
    assert linear_cross_entropy_ref(h32, w32, tgt, IGNORE, reduction).dtype == torch.float32


def test_the_spec_takes_ignore_index_none():
    # the fused function takes ignore_index=None (no target ignored); its spec raised a TypeError
    h, w, tgt = _inputs(6, 16, 41, torch.float64)
    got = linear_cross_entropy_ref(h, w, tgt, None, "none")
    want = -torch.log_softmax(h @ w.T, -1).gather(1, tgt[:, None]).squeeze(1)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
    fused = fused_linear_cross_entropy(h.float(), w.float(), tgt, ignore_index=None, reduction="none")
    torch.testing.assert_close(fused.double(), want, rtol=1e-5, atol=1e-6)


def _fwd_bwd(fn, h, w, g):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = fn(h, w)
    (loss.double() * g).sum().backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("impl", ["triton", "ref"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("N", "reduction"), [(1, "mean"), (7, "none"), (7, "sum")])
def test_fused_cross_entropy_matches_fp64(N, reduction, dtype, impl, device):
    h, w, tgt = _inputs(N, 48, 333, dtype, device, n_ignored=2 if N > 3 else 0)  # V = 333: chunks 128, 128, 77
    g = torch.randn(N if reduction == "none" else (), dtype=torch.float64, device=device)
    spec = lambda a, b: linear_cross_entropy_ref(a, b, tgt, IGNORE, reduction)
    fused = lambda a, b: fused_linear_cross_entropy(a, b, tgt, reduction=reduction, impl=impl, tile=(4, 128))
    ref, plain, got = _fwd_bwd(spec, h.double(), w.double(), g), _fwd_bwd(spec, h, w, g), _fwd_bwd(fused, h, w, g)
    assert got[0].dtype == torch.float32
    for name, a, p, r in zip(["loss", "dh", "dw"], got, plain, ref):
        e_k, e_p = rel_err(a, r), rel_err(p, r)
        assert e_k <= 2 * e_p + FLOOR[dtype], f"{name}: kernel {e_k:.2e} vs torch {e_p:.2e}"
    if reduction == "none" and N > 3:
        assert torch.all(got[0][1:3] == 0) and torch.all(got[1][1:3] == 0)  # ignored rows: no loss, no gradient
