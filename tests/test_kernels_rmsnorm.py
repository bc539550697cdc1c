"""RMSNorm kernel vs an fp64 reference: forward and backward, fused residual, odd and strided shapes.

Budget: err(kernel) <= 2 * err(plain torch in the same dtype) + FLOOR[dtype], where err is
||out - ref|| / ||ref|| against the spec evaluated in fp64. Without CUDA the Triton kernels run
under the interpreter (TRITON_INTERPRET=1, read at launch).
"""

import pytest
import torch
from helpers.kernel_checks import DEVICES, FLOOR, rel_err

from minigrpo.kernels import rms_norm, rms_norm_ref


def _run(x, w, r, gy, gh, impl):
    """Forward + backward of rms_norm on leaf copies; returns outputs then grads (x, w[, r])."""
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    r = r.detach().clone().requires_grad_() if r is not None else None
    if impl == "fp64":
        h = (x + r) if r is not None else x
        y = rms_norm_ref(h, w, 1e-6)
        outs = (y, h) if r is not None else (y,)
    else:
        out = rms_norm(x, w, 1e-6, residual=r, impl=impl)
        outs = out if r is not None else (out,)
    loss = (outs[0].double() * gy).sum() + ((outs[1].double() * gh).sum() if r is not None else 0)
    loss.backward()
    grads = (x.grad, w.grad) + ((r.grad,) if r is not None else ())
    return [o.detach() for o in outs] + list(grads)


def _check(shape, D, dtype, device, residual, make_x=None):
    x64 = torch.randn(*shape, D, dtype=torch.float64, device=device) * 2 + 0.5
    w64 = 1 + 0.1 * torch.randn(D, dtype=torch.float64, device=device)
    r64 = torch.randn(*shape, D, dtype=torch.float64, device=device) if residual else None
    layout = make_x or (lambda u: u)
    gy = layout(torch.randn(*shape, D, dtype=torch.float64, device=device))
    gh = layout(torch.randn(*shape, D, dtype=torch.float64, device=device))
    low = lambda t: None if t is None else layout(t.to(dtype))
    # the fp64 reference starts from the rounded inputs, so only the op's own error counts
    x, w, r = low(x64), w64.to(dtype), low(r64)
    ref = _run(x.double(), w.double(), None if r is None else r.double(), gy, gh, "fp64")
    got = _run(x, w, r, gy, gh, "triton")
    plain = _run(x, w, r, gy, gh, "ref")
    names = ["y", "h", "dx", "dw", "dr"] if residual else ["y", "dx", "dw"]
    for name, g, p, rf in zip(names, got, plain, ref):
        assert g.dtype == p.dtype and g.shape == p.shape, name
        e_k, e_p = rel_err(g, rf), rel_err(p, rf)
        assert e_k <= 2 * e_p + FLOOR[dtype], f"{name}: kernel {e_k:.2e} vs torch {e_p:.2e}"
    return got


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("shape", "D"), [((1,), 576), ((7,), 896), ((3, 5), 1536), ((37,), 100)])
def test_rms_norm_matches_fp64(shape, D, dtype, device):
    _check(shape, D, dtype, device, residual=False)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("shape", "D"), [((7,), 896), ((2, 9), 576)])
def test_rms_norm_fused_residual(shape, D, dtype, device):
    *_, dx, _dw, dr = _check(shape, D, dtype, device, residual=True)
    torch.testing.assert_close(dx, dr, rtol=0, atol=0)  # both grads are d(loss)/dh


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_fused_residual_is_the_add_then_the_norm_bit_for_bit(dtype, device):
    """The model leaves a block's last residual add to the next block's norm: the fused kernel must
    give the bits of a torch add followed by the plain kernel (the sum rounded to the rows' dtype)."""
    x, r = (torch.randn(5, 896, device=device).mul(4).to(dtype) for _ in range(2))
    w = torch.randn(896, device=device, dtype=torch.float32)  # an fp32 gain, as in bf16 training
    y, h = rms_norm(x, w, 1e-6, residual=r, out_dtype=dtype, impl="triton")
    assert torch.equal(h, r + x) and h.dtype == dtype
    assert torch.equal(y, rms_norm(r + x, w, 1e-6, out_dtype=dtype, impl="triton"))


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_rms_norm_strided_inputs(device):
    dev = device
    # a row-strided view (slice of wider rows) and a transposed batch that reshape must copy
    _check((6,), 576, torch.bfloat16, dev, residual=True, make_x=lambda t: torch.cat([t, t], -1)[..., :576])
    _check((4, 3), 896, torch.float32, dev, residual=False, make_x=lambda t: t.transpose(0, 1))


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_rms_norm_weight_grad_is_deterministic(device):
    dev = device
    x = torch.randn(300, 576, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(576, device=dev, dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(300, 576, device=dev, dtype=torch.bfloat16)
    grads = [torch.autograd.grad(rms_norm(x, w, impl="triton"), (x, w), gy) for _ in range(2)]
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_rms_norm_auto_is_ref_on_cpu():
    x, w, r = torch.randn(5, 64), torch.randn(64), torch.randn(5, 64)
    assert torch.equal(rms_norm(x, w, impl="auto"), rms_norm(x, w, impl="ref"))
    y_a, h_a = rms_norm(x, w, residual=r, impl="auto")
    y_r, h_r = rms_norm(x, w, residual=r, impl="ref")
    assert torch.equal(y_a, y_r) and torch.equal(h_a, h_r)


@pytest.mark.gpu
def test_rms_norm_large_cuda():
    dev = torch.device("cuda")
    _check((4096,), 4096, torch.bfloat16, dev, residual=True)
    _check((2048,), 1536, torch.bfloat16, dev, residual=False)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_rms_norm_keeps_hf_cast_order(device):
    # normalise in fp32, round to bf16, then scale: the bf16 output then equals HF's almost bitwise
    # (scaling the unrounded fp32 value instead changes about a quarter of the elements)
    dev = device
    x = torch.randn(64, 896, device=dev).bfloat16()
    w = (1 + 0.1 * torch.randn(896, device=dev)).bfloat16()
    same = rms_norm(x, w, impl="triton") == rms_norm_ref(x, w, 1e-6)
    assert same.float().mean().item() > 0.99


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("residual", [False, True])
def test_fp32_gain_over_bf16_rows(device, residual):
    # the bf16 model's mixed layout: fp32 gains, bf16 rows and output (out_dtype), the scale in fp32,
    # rounded once; a gain change far below bf16's resolution (1e-4 of 2^-8) still moves outputs,
    # and the gain's gradient comes back in fp32 equal to the reference's
    x = torch.randn(64, 576, device=device).bfloat16()
    r = torch.randn(64, 576, device=device).bfloat16() if residual else None
    w = (1 + 0.1 * torch.randn(576, device=device)).requires_grad_()
    for impl in ("triton", "ref"):
        out = rms_norm(x, w, 1e-6, residual=r, out_dtype=torch.bfloat16, impl=impl)
        y = out[0] if residual else out
        assert y.dtype == torch.bfloat16
        h = (x + r).float() if residual else x.float()  # the residual sum is rounded to bf16 first
        n = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16().float()
        assert torch.equal(y, (w.detach() * n).bfloat16())  # one rounding of the fp32 product
        moved = rms_norm(x, w.detach() * (1 + 1e-4), 1e-6, residual=r, out_dtype=torch.bfloat16, impl=impl)
        assert ((moved[0] if residual else moved) != y).float().mean() > 0.005
        (g,) = torch.autograd.grad(y.float().pow(2).sum(), w)
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, (2 * y.float() * n).sum(0), rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_rms_norm_strided_weight(device):
    # the weight as every other entry of a wider buffer: the kernels read it with unit stride
    x64 = torch.randn(5, 64, device=device, dtype=torch.float64)
    buf64 = torch.randn(128, device=device, dtype=torch.float64)
    gy = torch.randn(5, 64, device=device, dtype=torch.float64)
    outs = {}
    for impl, dtype in (("triton", torch.float32), ("fp64", torch.float64)):
        x, buf = x64.to(dtype).requires_grad_(), buf64.to(dtype).requires_grad_()
        w = buf[::2]  # (64,) stride 2
        y = rms_norm(x, w, 1e-6, impl="triton") if impl == "triton" else rms_norm_ref(x, w, 1e-6)
        (y.double() * gy).sum().backward()
        outs[impl] = (y.detach(), x.grad, buf.grad)
    for name, g, rf in zip(["y", "dx", "dw"], outs["triton"], outs["fp64"]):
        assert rel_err(g, rf) <= FLOOR[torch.float32], f"{name}: {rel_err(g, rf):.2e}"


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_rms_norm_residual_of_a_wider_dtype_is_added_as_torch_adds(device):
    # bf16 rows plus an fp32 residual: torch's x + residual is fp32, and so is what gets normalised
    x = torch.randn(4, 96, device=device, dtype=torch.bfloat16)
    r = torch.randn(4, 96, device=device, dtype=torch.float32)
    w = torch.randn(96, device=device, dtype=torch.bfloat16)
    y, h = rms_norm(x, w, residual=r, impl="triton")
    y_ref, h_ref = rms_norm(x, w, residual=r, impl="ref")
    assert (y.dtype, h.dtype) == (y_ref.dtype, h_ref.dtype) == (torch.float32, torch.float32)
    assert torch.equal(h, h_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_rms_norm_fp64_keeps_fp64_precision(device):
    # the kernels compute in fp32: fp64 inputs take the reference even with impl="triton"
    x = torch.randn(3, 100, device=device, dtype=torch.float64, requires_grad=True)
    w = torch.randn(100, device=device, dtype=torch.float64)
    y = rms_norm(x, w, impl="triton")
    torch.testing.assert_close(y, rms_norm_ref(x, w, 1e-6), rtol=1e-13, atol=1e-13)


def test_rms_norm_refuses_mismatched_shapes():
    x = torch.randn(3, 8)
    for impl in ("triton", "ref"):
        with pytest.raises(ValueError, match=r"weight \(7,\) does not match x \(\.\.\., 8\)"):
            rms_norm(x, torch.ones(7), impl=impl)
        with pytest.raises(ValueError, match=r"residual \(1, 8\) does not match x \(3, 8\)"):
            rms_norm(x, torch.ones(8), residual=torch.randn(1, 8), impl=impl)
