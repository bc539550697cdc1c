"""RoPE kernel vs an fp64 reference: q and k in one launch, partial rotary, per-row positions.

Budget: err(kernel) <= 2 * err(plain torch in the same dtype) + FLOOR[dtype], with err the
relative norm against the spec evaluated in fp64 on the same (rounded) inputs.
"""

import pytest
import torch
from helpers.kernel_checks import DEVICES, FLOOR, rel_err

from minigrpo.kernels import apply_rotary, rotary_ref


def _angles(B, T, R, device, left_pad=True):
    """cos, sin (B, T, R/2) fp32 of HF-style inverse frequencies at per-row positions."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, R, 2, dtype=torch.float64, device=device) / R))
    pos = torch.arange(T, dtype=torch.float64, device=device).expand(B, T)
    if left_pad:  # row b starts b * 3 tokens late: its positions are shifted, padding clamped to 0
        pos = (pos - 3 * torch.arange(B, device=device)[:, None]).clamp(min=0)
    ang = pos[..., None] * inv_freq  # (B, T, R/2)
    return ang.cos().float(), ang.sin().float()


def _qk(B, T, H, HKV, Dh, dtype, device):
    """q, k as views of one fused projection output (strided, as the model produces them)."""
    qkv = torch.randn(B, T, (H + 2 * HKV) * Dh, dtype=torch.float64, device=device).to(dtype)
    q = qkv[..., : H * Dh].view(B, T, H, Dh)
    k = qkv[..., H * Dh : (H + HKV) * Dh].view(B, T, HKV, Dh)
    return q, k


def _fwd_bwd(q, k, cos, sin, gq, gk, impl):
    q, k = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    if impl == "fp64":
        qo, ko = rotary_ref(q, cos.double(), sin.double()), rotary_ref(k, cos.double(), sin.double())
    else:
        qo, ko = apply_rotary(q, k, cos, sin, impl=impl)
    ((qo.double() * gq).sum() + (ko.double() * gk).sum()).backward()
    return qo.detach(), ko.detach(), q.grad, k.grad


SHAPES = [  # (B, T, H, HKV, Dh, R)
    (2, 7, 14, 2, 64, 64),  # Qwen2.5-0.5B heads
    (1, 37, 4, 2, 128, 128),
    (3, 5, 3, 1, 96, 32),  # odd head count, partial rotary (Dh - R pass-through channels)
    (1, 1, 12, 2, 128, 96),
]


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_rotary_matches_fp64(shape, dtype, device):
    dev = device
    B, T, H, HKV, Dh, R = shape
    q, k = _qk(B, T, H, HKV, Dh, dtype, dev)
    cos, sin = _angles(B, T, R, dev)
    gq = torch.randn(B, T, H, Dh, dtype=torch.float64, device=dev)
    gk = torch.randn(B, T, HKV, Dh, dtype=torch.float64, device=dev).transpose(1, 2).contiguous().transpose(1, 2)
    ref = _fwd_bwd(q.double(), k.double(), cos, sin, gq, gk, "fp64")
    got = _fwd_bwd(q, k, cos, sin, gq, gk, "triton")
    plain = _fwd_bwd(q, k, cos, sin, gq, gk, "ref")
    for name, g, p, rf in zip(["q", "k", "dq", "dk"], got, plain, ref):
        assert g.shape == p.shape and g.dtype == p.dtype, name
        e_k, e_p = rel_err(g, rf), rel_err(p, rf)
        assert e_k <= 2 * e_p + FLOOR[dtype], f"{name}: kernel {e_k:.2e} vs torch {e_p:.2e}"
    if Dh > R:  # pass-through channels are copied exactly, forward and backward
        assert torch.equal(got[0][..., R:], q[..., R:]) and torch.equal(got[3][..., R:], plain[3][..., R:])


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_rotary_backward_is_inverse_rotation(device):
    # rotating by theta and then applying the backward (rotation by -theta) gives the input back
    dev = device
    q, k = (t.detach().requires_grad_() for t in _qk(2, 6, 4, 2, 64, torch.float32, dev))
    cos, sin = _angles(2, 6, 64, dev)
    qo, ko = apply_rotary(q, k, cos, sin, impl="triton")
    q_back, k_back = torch.autograd.grad((qo, ko), (q, k), (qo.detach(), ko.detach()))
    assert (qo - q).abs().max() > 0.1  # the rotation did move q
    torch.testing.assert_close(q_back, q.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_back, k.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_rotary_broadcast_batch_angles(device):
    dev = device
    q, k = _qk(3, 5, 2, 1, 32, torch.float32, dev)
    cos, sin = _angles(1, 5, 32, dev, left_pad=False)  # (1, T, R/2), shared by the batch
    qo, ko = apply_rotary(q, k, cos, sin, impl="triton")
    qr, kr = apply_rotary(q, k, cos.expand(3, 5, 16), sin.expand(3, 5, 16), impl="ref")
    torch.testing.assert_close(qo, qr, rtol=0, atol=1e-6)
    torch.testing.assert_close(ko, kr, rtol=0, atol=1e-6)


def test_rotary_auto_is_ref_on_cpu():
    q, k = _qk(2, 4, 2, 1, 16, torch.float32, torch.device("cpu"))
    cos, sin = _angles(2, 4, 16, torch.device("cpu"))
    for a, b in zip(apply_rotary(q, k, cos, sin, impl="auto"), apply_rotary(q, k, cos, sin, impl="ref")):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_rotary_large_cuda():
    dev = torch.device("cuda")
    B, T, H, HKV, Dh = 1, 2048, 32, 8, 128
    q, k = _qk(B, T, H, HKV, Dh, torch.bfloat16, dev)
    cos, sin = _angles(B, T, Dh, dev)
    gq = torch.randn(B, T, H, Dh, dtype=torch.float64, device=dev)
    gk = torch.randn(B, T, HKV, Dh, dtype=torch.float64, device=dev)
    ref = _fwd_bwd(q.double(), k.double(), cos, sin, gq, gk, "fp64")
    got = _fwd_bwd(q, k, cos, sin, gq, gk, "triton")
    plain = _fwd_bwd(q, k, cos, sin, gq, gk, "ref")
    for g, p, rf in zip(got, plain, ref):
        assert rel_err(g, rf) <= 2 * rel_err(p, rf) + FLOOR[torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_rotary_fp64_keeps_fp64_precision(device):
    # the kernel computes in fp32: fp64 inputs take the reference even with impl="triton"
    q, k = _qk(2, 3, 4, 2, 80, torch.float64, device)
    cos, sin = (a.double() for a in _angles(2, 3, 80, device))
    qo, ko = apply_rotary(q, k, cos, sin, impl="triton")
    torch.testing.assert_close(qo, rotary_ref(q, cos, sin), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(ko, rotary_ref(k, cos, sin), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("Dh", [8, 24, 112])
def test_rotary_odd_head_dims_single_token_and_empty_batch(Dh, device):
    for B, T in ((1, 1), (0, 3)):
        q, k = _qk(B, T, 3, 1, Dh, torch.float32, device)
        cos, sin = _angles(max(B, 1), T, Dh, device)
        cos, sin = cos[:B], sin[:B]
        gq, gk = (torch.randn(B, T, h, Dh, dtype=torch.float64, device=device) for h in (3, 1))
        got, ref = _fwd_bwd(q, k, cos, sin, gq, gk, "triton"), _fwd_bwd(q, k, cos, sin, gq, gk, "fp64")
        for name, g, rf in zip(["q", "k", "dq", "dk"], got, ref):
            assert g.shape == rf.shape and (g.numel() == 0 or rel_err(g, rf) <= FLOOR[torch.float32]), name


def test_rotary_refuses_mismatched_shapes():
    q, k, cos = torch.randn(1, 2, 2, 8), torch.randn(1, 2, 1, 8), torch.ones(1, 2, 4)
    for impl in ("triton", "ref"):
        with pytest.raises(ValueError, match=r"q \(1, 2, 2, 8\), k \(1, 2, 1, 6\) must be"):
            apply_rotary(q, k[..., :6], cos, cos, impl=impl)
        with pytest.raises(ValueError, match=r"q \(2, 2, 8\), k \(1, 2, 1, 8\) must be"):
            apply_rotary(q[0], k, cos, cos, impl=impl)
        with pytest.raises(ValueError, match=r"cos \(1, 3, 4\), sin \(1, 3, 4\) must be \(1 or 1, 2, R/2\)"):
            apply_rotary(q, k, torch.ones(1, 3, 4), torch.ones(1, 3, 4), impl=impl)
        with pytest.raises(ValueError, match=r"rotary dim 10 > head dim 8"):
            apply_rotary(q, k, torch.ones(1, 2, 5), torch.ones(1, 2, 5), impl=impl)
