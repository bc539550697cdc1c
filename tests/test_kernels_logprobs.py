"""Fused LM-head log-probs / entropy / cross-entropy vs fp64, and proof that (N, V) never exists.

Budget: err(kernel) <= 2 * err(plain torch in the same dtype) + FLOOR[dtype], err = relative norm
against the spec evaluated in fp64 on the same rounded inputs; "plain torch" is the unchunked
`log_softmax((h @ W.T).float() / T)`. Both chunked paths are held to it: "triton" (the kernels,
under the interpreter without CUDA) and "ref" (the chunked torch path used on CPU).
"""

import functools
import importlib

import pytest
import torch
from helpers.allocations import LargestOutput
from helpers.kernel_checks import (
    DEVICES,
    FLOOR,
    near_certain_logits,
    near_certain_tolerance,
    need_interpreter,
    rel_err,
)

from minigrpo.kernels import (
    fused_linear_cross_entropy,
    fused_linear_logprobs,
    fused_linear_token_loss,
    linear_cross_entropy_ref,
    linear_logprobs_ref,
)

logprobs_module = importlib.import_module("minigrpo.kernels.logprobs")
IGNORE = -100


def _inputs(N, D, V, dtype, device, n_ignored=0):
    """hidden (N, D) row-strided, weight (V, D), targets (N,) hitting both vocab ends."""
    h = torch.randn(N, D + 8, dtype=torch.float64, device=device).to(dtype)[:, :D]
    w = (torch.randn(V, D, dtype=torch.float64, device=device) * D**-0.5 * 3).to(dtype)
    tgt = torch.randint(0, V, (N,), device=device)
    tgt[: min(N, 2)] = torch.tensor([0, V - 1][: min(N, 2)], device=device)
    tgt[torch.randperm(N, device=device)[:n_ignored]] = IGNORE
    return h, w, tgt


def _fwd_bwd(fn, h, w, g, ge):
    """Run fn(h, w) -> (logp, entropy | None) on leaf copies; backward with grads g, ge (fp64)."""
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    logp, ent = fn(h, w)
    loss = (logp.double() * g).sum() + ((ent.double() * ge).sum() if ent is not None else 0)
    loss.backward()
    return [t.detach() for t in (logp, ent, h.grad, w.grad) if t is not None]


def _check_budget(names, got, plain, ref, dtype):
    for name, a, p, r in zip(names, got, plain, ref):
        assert a.shape == p.shape, name
        e_k, e_p = rel_err(a, r), rel_err(p, r)
        assert e_k <= 2 * e_p + FLOOR[dtype], f"{name}: kernel {e_k:.2e} vs torch {e_p:.2e}"


CASES = [  # (N, D, V, temperature, tile, entropy, ignored rows)
    (1, 576, 1003, 1.0, None, False, 0),
    (7, 896, 1003, 0.7, (4, 256), True, 2),  # 2 token blocks x 4 vocab chunks (last one narrow)
    (37, 64, 1003, 1.3, (16, 384), True, 5),
    (37, 1536, 2053, 1.0, None, True, 3),
]


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("impl", ["triton", "ref"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_logprobs_matches_fp64(case, dtype, impl, device, monkeypatch):
    dev = device
    # narrow kernel blocks: the online max/sum/entropy loop inside a program runs several times
    monkeypatch.setattr(logprobs_module, "_STATS_BLOCK_V", 128)
    monkeypatch.setattr(logprobs_module, "_GRAD_BLOCK_V", 128)
    N, D, V, T, tile, entropy, n_ignored = case
    h, w, tgt = _inputs(N, D, V, dtype, dev, n_ignored)
    g = torch.randn(N, dtype=torch.float64, device=dev)
    ge = torch.randn(N, dtype=torch.float64, device=dev)

    def spec(a, b):
        logp, ent = linear_logprobs_ref(a, b, tgt, T, IGNORE)
        return logp, (ent if entropy else None)

    def fused(a, b):
        out = fused_linear_logprobs(
            a, b, tgt, temperature=T, return_entropy=entropy, ignore_index=IGNORE, impl=impl, tile=tile
        )
        return out if entropy else (out, None)

    ref = _fwd_bwd(spec, h.double(), w.double(), g, ge)
    got = _fwd_bwd(fused, h, w, g, ge)
    plain = _fwd_bwd(spec, h, w, g, ge)
    names = ["logp", "entropy", "dh", "dw"] if entropy else ["logp", "dh", "dw"]
    _check_budget(names, got, plain, ref, dtype)
    assert got[0].dtype == torch.float32
    ignored = tgt == IGNORE
    if n_ignored:  # no logp, no entropy, no gradient on ignored rows
        assert torch.all(got[0][ignored] == 0) and torch.all(got[-2][ignored] == 0)
        if entropy:
            assert torch.all(got[1][ignored] == 0)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_entropy_alone_drives_the_gradient(impl, device):
    # only the entropy is used: the logp gradient arrives as None
    dev = device
    h, w, tgt = _inputs(9, 48, 301, torch.float32, dev, n_ignored=1)
    ge = torch.randn(9, dtype=torch.float64, device=dev)
    zero = torch.zeros(9, dtype=torch.float64, device=dev)
    fused = lambda a, b: (
        zero.float(),
        fused_linear_logprobs(a, b, tgt, temperature=0.8, return_entropy=True, impl=impl, tile=(4, 128))[1],
    )
    spec = lambda a, b: (zero, linear_logprobs_ref(a, b, tgt, 0.8)[1])
    got = _fwd_bwd(fused, h, w, zero, ge)
    ref = _fwd_bwd(spec, h.double(), w.double(), zero, ge)
    for name, a, r in zip(["entropy", "dh", "dw"], got[1:], ref[1:]):
        assert rel_err(a, r) < 1e-5, name


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_frozen_weight_and_no_grad(impl, device):
    dev = device
    h, w, tgt = _inputs(11, 40, 517, torch.float32, dev)
    h.requires_grad_()
    logp = fused_linear_logprobs(h, w, tgt, impl=impl, tile=(8, 200))  # w frozen, as under LoRA
    (dh,) = torch.autograd.grad(logp.sum(), h)
    h64 = h.detach().double().requires_grad_()
    (dh_ref,) = torch.autograd.grad(linear_logprobs_ref(h64, w.double(), tgt)[0].sum(), h64)
    torch.testing.assert_close(dh.double(), dh_ref, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        again = fused_linear_logprobs(h, w, tgt, impl=impl, tile=(8, 200))
    assert torch.equal(again, logp.detach())


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("impl", ["triton", "ref"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_fp64(reduction, impl, device):
    dev = device
    h, w, tgt = _inputs(13, 96, 1003, torch.bfloat16, dev, n_ignored=3)
    g = torch.randn(13 if reduction == "none" else (), dtype=torch.float64, device=dev)
    spec = lambda a, b: (linear_cross_entropy_ref(a, b, tgt, IGNORE, reduction), None)
    fused = lambda a, b: (
        fused_linear_cross_entropy(a, b, tgt, ignore_index=IGNORE, reduction=reduction, impl=impl, tile=(8, 300)),
        None,
    )
    ref = _fwd_bwd(spec, h.double(), w.double(), g, None)
    got = _fwd_bwd(fused, h, w, g, None)
    plain = _fwd_bwd(spec, h, w, g, None)
    _check_budget(["loss", "dh", "dw"], got, plain, ref, torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_no_active_tokens(impl, device):
    # a micro-batch whose completion mask selects nothing: empty outputs, zero weight gradient
    h = torch.randn(0, 32, device=device, requires_grad=True)
    w = torch.randn(101, 32, device=device, requires_grad=True)
    logp, ent = fused_linear_logprobs(
        h, w, torch.zeros(0, dtype=torch.long, device=device), return_entropy=True, impl=impl
    )
    (logp.sum() + ent.sum()).backward()
    assert logp.shape == ent.shape == (0,) and h.grad.shape == (0, 32)
    assert torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("impl", ["triton", "ref"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_near_certain_targets_keep_their_tiny_logp(temperature, impl, device):
    # fp32 logits offset by +-30..45 with the target the max by >= 10.5: logp = -tiny (1e-7..3e-5).
    # Rounded as zt - (m + log s), log s is lost next to m (an ulp of 30 is 1.9e-6) and logp is off
    # by up to ~1e-6; torch's log_softmax rounds (zt - m) - log s and keeps it to ~6e-8.
    N, V = 24, 257
    x, tgt = near_certain_logits(N, V, device=device)  # (N, V) fp32, (N,)
    x = x * temperature  # the same margins after tempering
    tgt[5] = IGNORE
    eye = torch.eye(V, device=device)  # the head: logits = x @ I.T = x exactly
    ref_all = (x.double() / temperature).log_softmax(-1)  # (N, V) fp64
    valid = tgt != IGNORE
    ref = torch.where(valid, ref_all.gather(1, tgt.clamp(min=0)[:, None]).squeeze(1), 0.0)
    ref_ent = torch.where(valid, -(ref_all.exp() * ref_all).sum(-1), 0.0)
    logp, ent = fused_linear_logprobs(
        x, eye, tgt, temperature=temperature, return_entropy=True, impl=impl, tile=(16, 128)
    )
    assert torch.all((logp.double() - ref).abs() <= near_certain_tolerance(ref)), (logp.double() - ref).abs().max()
    assert torch.all((ent.double() - ref_ent).abs() <= near_certain_tolerance(ref_ent))
    if temperature == 1.0:  # cross-entropy is -logp: the same near-zero losses
        ce = fused_linear_cross_entropy(x, eye, tgt, ignore_index=IGNORE, reduction="none", impl=impl, tile=(16, 128))
        assert torch.all((ce.double() + ref).abs() <= near_certain_tolerance(ref)), (ce.double() + ref).abs().max()


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("impl", ["triton", "ref"])
@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_near_certain_targets_keep_their_gradient(temperature, impl, device):
    # d logp / d a_target = 1 - p_target = tiny: made from exp(a - (m + log s)) with m + log s rounded
    # (an ulp of 30 is 1.9e-6), it was off by ~1e-6, a 12% relative error on dH against 0.6% for
    # torch in fp32; from (a - m) - log s it stays at torch's level.
    N, V = 24, 257
    x, tgt = near_certain_logits(N, V, device=device)  # (N, V) fp32 logits of a head I: h = x
    x = x * temperature  # the same margins after tempering
    eye = torch.eye(V, device=device)
    g = torch.randn(N, dtype=torch.float64, device=device)
    spec = lambda a, b: (linear_logprobs_ref(a, b, tgt, temperature)[0], None)
    fused = lambda a, b: (fused_linear_logprobs(a, b, tgt, temperature=temperature, impl=impl, tile=(8, 96)), None)
    ref = _fwd_bwd(spec, x.double(), eye.double(), g, None)
    got = _fwd_bwd(fused, x, eye, g, None)
    plain = _fwd_bwd(spec, x, eye, g, None)
    _check_budget(["logp", "dh", "dw"], got, plain, ref, torch.float32)


@pytest.mark.parametrize("impl", ["triton", "ref"])
@pytest.mark.parametrize("bad", [7, -1])
def test_out_of_range_targets_fail_clearly(bad, impl):
    # a target outside [0, V) that is not ignore_index found no column: logp came out -logsumexp
    if impl == "triton":
        need_interpreter()
    h, w = torch.randn(3, 4), torch.randn(5, 4)
    tgt = torch.tensor([0, bad, IGNORE])
    with pytest.raises(ValueError, match=rf"targets must lie in \[0, 5\).*got {bad}"):
        fused_linear_logprobs(h, w, tgt, impl=impl)
    with pytest.raises(ValueError, match="targets must lie in"):
        fused_linear_cross_entropy(h, w, tgt, impl=impl)
    with pytest.raises(ValueError, match="targets must lie in"):  # no ignore_index in the policy head
        fused_linear_token_loss(h, w, torch.tensor([0, 1, IGNORE]), lambda lp, a, b: lp, impl=impl)


@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_mismatched_inputs_fail_clearly(impl):
    h, w, tgt = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 4])
    cases = [
        ((h, torch.randn(5, 6), tgt), {}, r"weight \(5, 6\) must be \(V, 4\) for hidden \(3, 4\)"),
        ((h, w, tgt[:2]), {}, r"targets \(2,\) must be hidden's \(3, 4\) without its last dim"),
        ((h, w.bfloat16(), tgt), {}, r"weight torch.bfloat16 and hidden torch.float32 must have one dtype"),
        ((h, w, tgt.float() + 0.5), {}, r"targets must be integer token ids, got torch.float32"),
        ((h, w, tgt), {"temperature": 0.0}, r"temperature must be positive, got 0.0"),
        ((h, w, tgt), {"temperature": float("nan")}, r"temperature must be positive, got nan"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            fused_linear_logprobs(*args, **kwargs, impl=impl)
    with pytest.raises(ValueError, match=r"hidden must be \(N, D\), got \(1, 3, 4\)"):
        fused_linear_token_loss(h[None], w, tgt[None], lambda lp, a, b: lp, impl=impl)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize(("V", "D"), [(1, 3), (7, 1), (1001, 100)])
def test_tiny_and_odd_vocabularies_with_the_first_and_last_targets(V, D, device):
    # one tile narrower than the vocabulary (1001 = 3 x 256 + 233 columns), targets 0 and V - 1
    h = torch.randn(4, D, dtype=torch.float64, device=device)
    w = torch.randn(V, D, dtype=torch.float64, device=device) / D**0.5
    tgt = torch.tensor([0, V - 1, 0, V - 1], device=device)
    g = torch.randn(4, dtype=torch.float64, device=device)
    outs = {}
    for impl, dtype in (("triton", torch.float32), ("fp64", torch.float64)):
        hh, ww = h.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
        if impl == "fp64":
            logp, ent = linear_logprobs_ref(hh, ww, tgt, 0.7)
        else:
            opts = dict(temperature=0.7, return_entropy=True, tile=(3, 256))
            logp, ent = fused_linear_logprobs(hh, ww, tgt, **opts, impl=impl)
        ((logp.double() * g).sum() + (ent.double() * g).sum()).backward()
        outs[impl] = (logp.detach(), ent.detach(), hh.grad, ww.grad)
    for name, got, want in zip(["logp", "entropy", "dh", "dw"], outs["triton"], outs["fp64"]):
        assert (got.double() - want).abs().max() <= 1e-5, name


def test_logprobs_auto_is_ref_on_cpu():
    h, w, tgt = _inputs(6, 32, 211, torch.float32, torch.device("cpu"), n_ignored=1)
    a = fused_linear_logprobs(h, w, tgt, temperature=0.9, return_entropy=True, impl="auto")
    b = fused_linear_logprobs(h, w, tgt, temperature=0.9, return_entropy=True, impl="ref")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _largest_during_fwd_bwd(fn, h, w):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    with LargestOutput() as rec:
        logp, ent = fn(h, w)
        (logp.sum() + ent.sum()).backward()
    return rec


@pytest.mark.parametrize(
    ("impl", "N", "V", "tile"),
    [("triton", 256, 1003, (32, 256)), ("ref", 256, 1003, (32, 256)), ("ref", 8192, 4096, None)],
)
def test_never_allocates_full_logits(impl, N, V, tile):
    if impl == "triton":
        need_interpreter()
    # N >> D so that no legitimate tensor (h, W, their grads) comes near the N * V fp32 logits
    h, w, tgt = _inputs(N, 16, V, torch.float32, torch.device("cpu"), n_ignored=3)
    fused = lambda a, b: fused_linear_logprobs(a, b, tgt, return_entropy=True, impl=impl, tile=tile)
    rec = _largest_during_fwd_bwd(fused, h, w)
    logits_bytes = N * V * 4
    assert rec.nbytes <= logits_bytes // 8, f"{rec.op} made {rec.nbytes} B; (N, V) fp32 is {logits_bytes} B"
    # the recorder does see the plain implementation's (N, V) logits
    plain = _largest_during_fwd_bwd(lambda a, b: linear_logprobs_ref(a, b, tgt), h, w)
    assert plain.nbytes >= logits_bytes


@pytest.mark.gpu
def test_logprobs_realistic_cuda():
    # Phi-3.5 head in bf16 across two token blocks, checked against the chunked path in fp64
    dev = torch.device("cuda")
    N, D, V = 4096 + 37, 3072, 32064
    h, w, tgt = _inputs(N, D, V, torch.bfloat16, dev, n_ignored=100)
    g = torch.randn(N, dtype=torch.float64, device=dev)
    ge = torch.randn(N, dtype=torch.float64, device=dev)
    ref_path = functools.partial(fused_linear_logprobs, targets=tgt, temperature=0.9, return_entropy=True, impl="ref")
    ref = _fwd_bwd(ref_path, h.double(), w.double(), g, ge)
    got = _fwd_bwd(functools.partial(ref_path, impl="triton"), h, w, g, ge)
    plain = _fwd_bwd(lambda a, b: linear_logprobs_ref(a, b, tgt, 0.9), h, w, g, ge)
    _check_budget(["logp", "entropy", "dh", "dw"], got, plain, ref, torch.bfloat16)


@pytest.mark.gpu
def test_logprobs_peak_memory_cuda():
    # Qwen2.5-1.5B head: the extra memory of fwd + bwd is the grads plus one tile and a (rows, D) fp32
    dev = torch.device("cuda")
    N, D, V = 8192, 1536, 151936
    h, w, tgt = _inputs(N, D, V, torch.bfloat16, dev)
    h = h.contiguous().requires_grad_()
    w.requires_grad_()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fused_linear_logprobs(h, w, tgt, return_entropy=True)[0].sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grads = (N + V) * D * 2
    assert extra <= grads + 96 * 2**20, f"extra {extra / 2**30:.3f} GiB, grads {grads / 2**30:.3f} GiB"
