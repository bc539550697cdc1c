"""SwiGLU kernel vs an fp64 reference: forward and backward, odd widths, one row, fused gate_up halves
(as two chunks, and whole through swiglu_halves).

Budget: err(kernel) <= 2 * err(plain torch in the same dtype) + FLOOR[dtype], where err is
||out - ref|| / ||ref|| against the spec evaluated in fp64 on the same (rounded) inputs. Without
CUDA the Triton kernels run under the interpreter (TRITON_INTERPRET=1, read at launch).
"""

import pytest
import torch
import torch.nn.functional as F
from helpers.kernel_checks import DEVICES, FLOOR, rel_err

from minigrpo.kernels import swiglu, swiglu_halves, swiglu_ref


def _inputs(shape, width, dtype, device):
    """gate_up (*shape, 2 * width) in dtype: gates spread over the sigmoid's curve and its tails."""
    gate = torch.randn(*shape, width, dtype=torch.float64, device=device) * 3
    up = torch.randn(*shape, width, dtype=torch.float64, device=device)
    return torch.cat([gate, up], -1).to(dtype)


def _run(gate_up, gy, impl, fused):
    """y and d(gate_up) (as one (..., 2F) tensor) of swiglu on the two halves of gate_up.

    fused: gate and up are strided views (chunks) of one leaf, as in the Phi-3 MLP; otherwise
    they are two separate contiguous leaves."""
    if fused:
        leaf = gate_up.detach().clone().requires_grad_()
        gate, up = leaf.chunk(2, dim=-1)
        leaves = (leaf,)
    else:
        leaves = tuple(h.contiguous().requires_grad_() for h in gate_up.detach().clone().chunk(2, dim=-1))
        gate, up = leaves
    y = swiglu_ref(gate, up) if impl == "fp64" else swiglu(gate, up, impl=impl)
    (y.double() * gy).sum().backward()
    grad = leaves[0].grad if fused else torch.cat([leaves[0].grad, leaves[1].grad], -1)
    return y.detach(), grad


def _check(shape, width, dtype, device, fused):
    """Kernel vs fp64 spec within budget; returns the kernel's (y, d(gate_up))."""
    gate_up = _inputs(shape, width, dtype, device)
    gy = torch.randn(*shape, width, dtype=torch.float64, device=device)
    ref = _run(gate_up.double(), gy, "fp64", fused)
    got = _run(gate_up, gy, "triton", fused)
    plain = _run(gate_up, gy, "ref", fused)
    assert got[0].is_contiguous() and got[0].shape == (*shape, width)
    for name, g, p, rf in zip(["y", "dgate_up"], got, plain, ref):
        assert g.dtype == p.dtype == dtype and g.shape == p.shape, name
        e_k, e_p = rel_err(g, rf), rel_err(p, rf)
        assert e_k <= 2 * e_p + FLOOR[dtype], f"{name}: kernel {e_k:.2e} vs torch {e_p:.2e}"
    # gate's and up's halves of the gradient each within budget (one could hide behind the other)
    for name, sl in [("dgate", slice(0, width)), ("dup", slice(width, 2 * width))]:
        e_k, e_p = rel_err(got[1][..., sl], ref[1][..., sl]), rel_err(plain[1][..., sl], ref[1][..., sl])
        assert e_k <= 2 * e_p + FLOOR[dtype], f"{name}: kernel {e_k:.2e} vs torch {e_p:.2e}"
    return got


SHAPES = [  # (row shape, F)
    ((1,), 64),  # one row
    ((7,), 100),  # F not a power of two
    ((3, 5), 576),
    ((2, 9), 1400),  # F wider than one column tile (1024)
]


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("shape", "width"), SHAPES)
def test_swiglu_matches_fp64(shape, width, dtype, device):
    _check(shape, width, dtype, device, fused=False)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("shape", "width"), [((1,), 64), ((4, 3), 100), ((11,), 1400)])
def test_swiglu_fused_gate_up_halves(shape, width, dtype, device):
    # gate and up as halves of one (rows, 2F) tensor (row stride 2F): within budget, and the same
    # bits, forward and backward, as on separate contiguous tensors
    torch.manual_seed(1)
    fused = _check(shape, width, dtype, device, fused=True)
    torch.manual_seed(1)
    separate = _check(shape, width, dtype, device, fused=False)
    assert torch.equal(fused[0], separate[0]) and torch.equal(fused[1], separate[1])


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("shape", "width"), [((1,), 64), ((4, 3), 100), ((11,), 1400)])
def test_swiglu_halves_is_swiglu_on_the_chunks_with_one_gradient(shape, width, dtype, device):
    # the same bits as swiglu on gate_up.chunk(2, -1), forward and backward, for both paths; on the
    # kernel's, the gradient of gate_up comes straight from the kernel (no split/chunk node to join it)
    gate_up = _inputs(shape, width, dtype, device)
    gy = torch.randn(*shape, width, dtype=torch.float64, device=device)
    for impl in ("triton", "ref"):
        want_y, want_grad = _run(gate_up, gy, impl, fused=True)
        leaf = gate_up.detach().clone().requires_grad_()
        y = swiglu_halves(leaf, impl=impl)
        (y.double() * gy).sum().backward()
        assert y.is_contiguous() and torch.equal(y, want_y) and torch.equal(leaf.grad, want_grad), impl
        if impl == "triton":  # y's graph back to the leaf: views (free) and the kernel, nothing else
            chain, node = [], y.grad_fn
            while node is not None:
                chain.append(type(node).__name__)
                node = node.next_functions[0][0] if node.next_functions else None
            assert [c for c in chain if c != "ViewBackward0"] == ["SwiGLUHalvesFunctionBackward", "AccumulateGrad"]


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_swiglu_saturated_gates(device):
    # exp(-g) overflows fp32 for g < -88: silu -> -0 and its derivative -> 0, never NaN. rtol 1e-5
    # allows the GPU's approximate exp; atol 1e-30 allows denormal results flushed to zero
    g = torch.tensor([[-1e4, -100.0, -89.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 89.0, 100.0, 1e4]], device=device)
    gate, up = g.clone().requires_grad_(), torch.full_like(g, 2.0).requires_grad_()
    y = swiglu(gate, up, impl="triton")
    dgate, dup = torch.autograd.grad(y, (gate, up), torch.ones_like(y))
    gate64, up64 = g.double().requires_grad_(), up.detach().double().requires_grad_()
    y64 = swiglu_ref(gate64, up64)
    dgate64, dup64 = torch.autograd.grad(y64, (gate64, up64), torch.ones_like(y64))
    for name, got, want in [("y", y, y64), ("dgate", dgate, dgate64), ("dup", dup, dup64)]:
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-30, msg=name)


def test_swiglu_budget_catches_a_wrong_derivative():
    # the budget has teeth: dgate missing the g * s * (1 - s) term of d silu / dg (a plausible slip)
    # is far outside it, in both dtypes, while a correct one-rounding result is inside
    for dtype in (torch.float32, torch.bfloat16):
        gate_up = _inputs((8,), 256, dtype, "cpu")
        gy = torch.randn(8, 256, dtype=torch.float64)
        ref = _run(gate_up.double(), gy, "fp64", fused=False)[1][..., :256]
        plain = _run(gate_up, gy, "ref", fused=False)[1][..., :256]
        g, u = (h.float() for h in gate_up.chunk(2, -1))
        wrong = (gy.float() * u * torch.sigmoid(g)).to(dtype)
        right = (gy.float() * u * torch.sigmoid(g) * (1 + g * (1 - torch.sigmoid(g)))).to(dtype)
        budget = 2 * rel_err(plain, ref) + FLOOR[dtype]
        assert rel_err(wrong, ref) > 10 * budget
        assert rel_err(right, ref) <= budget


def test_swiglu_auto_is_ref_on_cpu_and_ref_is_the_old_mlp_math():
    gate, up = torch.randn(3, 5, 96), torch.randn(3, 5, 96)
    assert torch.equal(swiglu(gate, up), swiglu_ref(gate, up))
    assert torch.equal(swiglu_ref(gate, up), F.silu(gate) * up)  # fp32: bitwise what the MLP computed
    # bf16: one rounding instead of two (F.silu rounds, then the product): at most one bf16 ulp apart
    gb, ub = gate.bfloat16(), up.bfloat16()
    one, two = swiglu_ref(gb, ub).float(), (F.silu(gb) * ub).float()
    assert ((one - two).abs() <= 2**-7 * two.abs()).all()
    # the reference path is differentiable by ordinary autograd
    gate.requires_grad_()
    (d,) = torch.autograd.grad(swiglu(gate, up).sum(), gate)
    s = torch.sigmoid(gate.detach())
    torch.testing.assert_close(d, up * s * (1 + gate.detach() * (1 - s)), rtol=1e-5, atol=1e-6)


def test_swiglu_refuses_mismatched_shapes():
    for impl in ("triton", "ref"):
        with pytest.raises(ValueError, match=r"gate \(2, 3\) and up \(2, 4\) must have one shape"):
            swiglu(torch.randn(2, 3), torch.randn(2, 4), impl=impl)
        with pytest.raises(ValueError, match=r"gate_up's last dim must be even, got \(2, 3\)"):
            swiglu_halves(torch.randn(2, 3), impl=impl)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("width", [1, 3, 1001])
def test_swiglu_tiny_and_odd_widths_and_empty_rows(width, device):
    for shape in ((1,), (0, 2)):
        gate_up = _inputs(shape, width, torch.float32, device)
        y = swiglu_halves(gate_up, impl="triton")
        assert y.shape == (*shape, width)
        if y.numel():
            want = swiglu_ref(*gate_up.double().chunk(2, -1))
            assert rel_err(y, want) <= FLOOR[torch.float32]


@pytest.mark.gpu
def test_swiglu_large_cuda():
    dev = torch.device("cuda")
    _check((4096,), 8960, torch.bfloat16, dev, fused=True)
    _check((64,), 4864, torch.bfloat16, dev, fused=False)
    gate_up = _inputs((4096,), 8960, torch.bfloat16, dev)
    gy = torch.randn(4096, 8960, dtype=torch.float64, device=dev)
    want = _run(gate_up, gy, "triton", fused=True)
    leaf = gate_up.detach().clone().requires_grad_()
    y = swiglu_halves(leaf)
    (y.double() * gy).sum().backward()
    assert torch.equal(y, want[0]) and torch.equal(leaf.grad, want[1])
