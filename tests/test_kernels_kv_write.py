"""Fused decode rotary + KV-cache write (kernels/kv_write.py) vs its reference vs apply_rotary + index_copy_.

All three do the same fp32 math with one rounding, so q and every cache element must be bitwise
equal (rtol = atol = 0), fp32 and bf16. Inputs are views of one fused qkv projection; caches are a
layer of an (L, B, Hkv, S_max, Dh) tensor, also of a row-sliced one (`cache.k[:, :n]`, as the
sampler's compaction leaves it), filled with random values: comparing the whole underlying tensor
checks the slot was written and that nothing else changed.
"""

from __future__ import annotations

import pytest
import torch
from helpers.kernel_checks import DEVICES
from helpers.tiny import tiny_model

from minigrpo.kernels import apply_rotary, rotary_into_cache, rotary_into_cache_ref
from minigrpo.models import transformer
from minigrpo.models.kv_cache import KVCache


def _angles(B, R, device, offset=5):
    """cos, sin (B, 1, R/2) fp32 at per-row positions offset + 3b (left-padded rows are behind)."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, R, 2, dtype=torch.float64, device=device) / R))
    pos = offset + 3.0 * torch.arange(B, dtype=torch.float64, device=device)
    ang = pos[:, None, None] * inv_freq  # (B, 1, R/2)
    return ang.cos().float(), ang.sin().float()


def _qkv(B, H, HKV, Dh, dtype, device):
    """q (B, 1, H, Dh), k, v (B, 1, Hkv, Dh): views of one fused projection (strided)."""
    qkv = torch.randn(B, 1, (H + 2 * HKV) * Dh, dtype=torch.float64, device=device).to(dtype)
    q = qkv[..., : H * Dh].view(B, 1, H, Dh)
    k = qkv[..., H * Dh : (H + HKV) * Dh].view(B, 1, HKV, Dh)
    v = qkv[..., (H + HKV) * Dh :].view(B, 1, HKV, Dh)
    return q, k, v


def _caches(L, B_all, HKV, S, Dh, dtype, device, slot_major=False):
    """k, v (L, B_all, Hkv, S, Dh) full of random values (what must survive outside the slot);
    slot_major: stored as (L, B_all, S, Hkv, Dh), so a layer's (B, Hkv, S, Dh) view is not contiguous."""
    shape = (L, B_all, S, HKV, Dh) if slot_major else (L, B_all, HKV, S, Dh)
    k = torch.randn(shape, dtype=torch.float64, device=device).to(dtype)
    v = torch.randn(shape, dtype=torch.float64, device=device).to(dtype)
    return (k.transpose(2, 3), v.transpose(2, 3)) if slot_major else (k, v)


def _run(impl, q, k, v, cos, sin, k_all, v_all, B, layer, slot):
    """Write into layer `layer` of the row-sliced caches k_all[:, :B] (copies); return (q_rot, k_all, v_all)."""
    k_all, v_all = k_all.clone(), v_all.clone()  # (clone keeps the strides)
    kc, vc = k_all[:, :B][layer], v_all[:, :B][layer]  # (B, Hkv, S, Dh) strided views
    if impl == "unfused":  # the model's other paths: apply_rotary, then KVCache.update's index_copy_
        qr, kr = apply_rotary(q, k, cos, sin, impl="triton")
        kc.index_copy_(2, slot, kr.transpose(1, 2))
        vc.index_copy_(2, slot, v.transpose(1, 2))
    elif impl == "ref":
        qr = rotary_into_cache_ref(q, k, v, cos, sin, kc, vc, slot)
    else:
        qr = rotary_into_cache(q, k, v, cos, sin, kc, vc, slot, impl=impl)
    return qr, k_all, v_all


SHAPES = [  # (B, B_all, H, HKV, Dh, R, S_max, slot_major): B_all > B is a row-sliced cache
    (3, 3, 14, 2, 64, 64, 9, False),  # Qwen2.5-0.5B heads, GQA 7
    (2, 5, 4, 4, 32, 16, 6, False),  # MHA, partial rotary (16 pass-through channels), rows sliced
    (3, 4, 3, 1, 24, 16, 5, False),  # odd heads, Dh 24 (padded blocks), partial rotary
    (2, 3, 6, 2, 24, 16, 5, True),  # GQA 3, partial rotary, a non-contiguous cache (slot-major storage)
]


def same(got: torch.Tensor, want: torch.Tensor, compiled_vs_torch: bool) -> bool:
    """Bitwise, except a compiled Triton kernel against torch math on the GPU: ptxas may contract
    x1*cos - x2*sin into an FMA, a one-ulp difference before the rounding to the output dtype."""
    if not compiled_vs_torch:
        return torch.equal(got, want)
    tol = 2e-7 if got.dtype == torch.float32 else 2**-7
    return bool(((got.double() - want.double()).abs() <= tol * (1 + want.double().abs())).all())


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_write_is_bitwise_apply_rotary_and_index_copy(shape, dtype, device):
    B, B_all, H, HKV, Dh, R, S, slot_major = shape
    L, layer = 3, 1
    q, k, v = _qkv(B, H, HKV, Dh, dtype, device)
    cos, sin = _angles(B, R, device)
    k_all, v_all = _caches(L, B_all, HKV, S, Dh, dtype, device, slot_major)
    assert k_all.clone()[:, :B][layer].is_contiguous() != slot_major
    for s in (0, S // 2, S - 1):
        slot = torch.tensor([s], device=device)
        expected = _run("unfused", q, k, v, cos, sin, k_all, v_all, B, layer, slot)
        for impl in ("triton", "ref"):
            got = _run(impl, q, k, v, cos, sin, k_all, v_all, B, layer, slot)
            assert got[0].shape == (B, 1, H, Dh) and got[0].dtype == dtype and got[0].is_contiguous()
            for name, g, e in zip(["q", "k cache", "v cache"], got, expected):
                ok = same(g, e, compiled_vs_torch=impl == "ref" and device.type == "cuda")
                assert ok, f"{impl} slot {s}: {name} max |diff| {(g.double() - e.double()).abs().max()}"
        # the slot did change (and only there, by the equality above): rotated k and the raw v
        _, k_new, v_new = expected
        assert torch.equal(v_new[layer, :B, :, s], v[:, 0])
        assert not torch.equal(k_new[layer, :B, :, s, :R], k[:, 0, :, :R])
        assert torch.equal(k_new[layer, :B, :, s, R:], k[:, 0, :, R:])  # pass-through channels
        assert torch.equal(k_new[layer, B:], k_all[layer, B:]) and torch.equal(k_new[:layer], k_all[:layer])


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_contiguous_inputs_broadcast_angles_and_grad_fallback(device):
    B, H, HKV, Dh, S = 2, 4, 2, 16, 7
    q, k, v = (t.contiguous() for t in _qkv(B, H, HKV, Dh, torch.float32, device))
    cos, sin = _angles(1, Dh, device)  # (1, 1, R/2): shared by the batch
    k_all, v_all = _caches(1, B, HKV, S, Dh, torch.float32, device)
    slot = torch.tensor([3], device=device)
    expected = _run("ref", q, k, v, cos.expand(B, 1, -1), sin.expand(B, 1, -1), k_all, v_all, B, 0, slot)
    got = _run("triton", q, k, v, cos, sin, k_all, v_all, B, 0, slot)
    for g, e in zip(got, expected):
        assert same(g, e, compiled_vs_torch=device.type == "cuda")
    # with grad enabled and an input requiring it, the reference runs (the kernel is inference only)
    qg = q.clone().requires_grad_()
    out = _run("triton", qg, k, v, cos, sin, k_all, v_all, B, 0, slot)
    assert out[0].requires_grad and torch.equal(out[0].detach(), expected[0]) and torch.equal(out[1], expected[1])


def test_auto_is_ref_on_cpu(monkeypatch):
    q, k, v = _qkv(2, 2, 1, 16, torch.float32, torch.device("cpu"))
    cos, sin = _angles(2, 16, torch.device("cpu"))
    k_all, v_all = _caches(1, 2, 1, 4, 16, torch.float32, torch.device("cpu"))
    slot = torch.tensor([2])
    from minigrpo.kernels import kv_write

    def no_kernel(*args):
        raise AssertionError("auto ran the Triton path on the CPU")

    monkeypatch.setattr(kv_write, "_rotary_into_cache_triton", no_kernel)
    got = _run("auto", q, k, v, cos, sin, k_all, v_all, 2, 0, slot)
    for g, e in zip(got, _run("ref", q, k, v, cos, sin, k_all, v_all, 2, 0, slot)):
        assert torch.equal(g, e)


@pytest.mark.parametrize("variant", ["llama", "phi3-partial"])
def test_model_decode_step_uses_fused_write(variant, monkeypatch):
    """A forced-kernel decode step calls the fused write once per layer; the cache then matches the SDPA
    path's (apply_rotary + KVCache.update): layer 0 bitwise, the step's slot of later layers within
    1e-5 (their inputs went through the split-K kernel), every other slot untouched; logits within 1e-5."""
    kw = dict(model_type="phi3", num_key_value_heads=4, partial_rotary_factor=0.5) if variant != "llama" else {}
    model = tiny_model(seed=3, **kw)
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("impl"))
        return rotary_into_cache(*args, **kwargs)

    monkeypatch.setattr(transformer, "rotary_into_cache", spy)
    B, Tp = 2, 4
    ids = torch.randint(3, 128, (B, Tp + 1))
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)

    def step(impl):
        model.decode_attention_impl = impl
        cache = KVCache(model.args, B, Tp + 3, dtype=torch.float32, device="cpu")
        cache.k.normal_(), cache.v.normal_()  # slots past the step hold garbage that must stay
        model(ids[:, :Tp], attention_mask=mask[:, :Tp], position_ids=pos[:, :Tp], kv_cache=cache,
              cache_position=torch.arange(Tp))  # fmt: skip
        logits = model(ids[:, Tp:], attention_mask=mask, position_ids=pos[:, Tp:], kv_cache=cache,
                       cache_position=torch.tensor([Tp]))  # fmt: skip
        return logits, cache

    with torch.no_grad():
        torch.manual_seed(7)
        sdpa_logits, sdpa_cache = step("ref")
        assert not calls
        torch.manual_seed(7)
        kernel_logits, kernel_cache = step("triton")
        torch.manual_seed(7)
        garbage = KVCache(model.args, B, Tp + 3, dtype=torch.float32, device="cpu")
        before = {"k": garbage.k.normal_(), "v": garbage.v.normal_()}  # the caches before any write
    assert calls == ["triton"] * model.args.n_layers
    for name, got, ref in [("k", kernel_cache.k, sdpa_cache.k), ("v", kernel_cache.v, sdpa_cache.v)]:
        # layer 0 reads the same inputs on both paths: bitwise; later layers' inputs went through the
        # split-K kernel vs SDPA (summation order), so their new slot agrees to 1e-5; all else is untouched
        assert torch.equal(got[0], ref[0]), f"{name}: layer 0 differs"
        assert torch.equal(got[..., :Tp, :], ref[..., :Tp, :]) and torch.equal(
            got[..., Tp + 1 :, :], ref[..., Tp + 1 :, :]
        )
        err = (got[:, :, :, Tp] - ref[:, :, :, Tp]).abs().max().item()
        assert err < 1e-5, f"{name} at the step's slot: max |diff| {err:.2e}"
        assert not torch.equal(got[:, :, :, Tp], before[name][:, :, :, Tp])  # the slot was written
    err = (kernel_logits - sdpa_logits).abs().max().item()
    assert err < 1e-5, f"{variant}: kernel vs SDPA logits: max |diff| {err:.2e}"


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_first_slot_offset_writes_column_slot_minus_first(impl, device):
    # a cache that starts at slot `first` (a shared prefix holds the slots before) is written at
    # column slot - first: bitwise what a whole cache gets at `slot`
    B, H, HKV, Dh, S, first = 2, 4, 2, 16, 9, 4
    q, k, v = _qkv(B, H, HKV, Dh, torch.float32, device)
    cos, sin = _angles(B, Dh, device)
    k_all, v_all = _caches(1, B, HKV, S, Dh, torch.float32, device)
    slot = torch.tensor([6], device=device)
    want_q, want_k, want_v = _run(impl, q, k, v, cos, sin, k_all, v_all, B, 0, slot)
    k_tail, v_tail = k_all[0, :, :, first:].clone(), v_all[0, :, :, first:].clone()  # (B, Hkv, S - first, Dh)
    got_q = rotary_into_cache(q, k, v, cos, sin, k_tail, v_tail, slot, first=first, impl=impl)
    assert torch.equal(got_q, want_q)
    assert torch.equal(k_tail, want_k[0, :, :, first:]) and torch.equal(v_tail, want_v[0, :, :, first:])


@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_bad_shapes_and_dtypes_are_value_errors_naming_them(impl):
    # one-line ValueErrors on both paths, before any launch (asserts vanished under python -O, and
    # the kernel then wrote rows, heads or channels outside the caches)
    device = torch.device("cpu")
    B, H, HKV, Dh, S = 2, 4, 2, 16, 7
    q, k, v = _qkv(B, H, HKV, Dh, torch.float32, device)
    cos, sin = _angles(B, Dh, device)
    kc, vc = _caches(1, B, HKV, S, Dh, torch.float32, device)
    kc, vc = kc[0], vc[0]
    slot = torch.tensor([3])
    bad = [
        ((q, k, v, cos, sin, kc[:, :1], vc[:, :1], slot), r"k_cache \(2, 1, 7, 16\), v_cache \(2, 1, 7, 16\) must"),
        ((q, k, v, cos, sin, kc, vc[..., :8], slot), r"must both be \(2, 2, S_max, 16\)"),
        ((q, k, v[:, :, :1], cos, sin, kc, vc, slot), r"v \(2, 1, 1, 16\) must be"),
        ((q.expand(B, 2, H, Dh), k, v, cos, sin, kc, vc, slot), r"q \(2, 2, 4, 16\)"),
        ((q, k, v, cos[..., :4], sin, kc, vc, slot), r"cos \(2, 1, 4\), sin \(2, 1, 8\) must be"),
        ((q, k, v, torch.cat([cos, cos], -1), torch.cat([sin, sin], -1), kc, vc, slot), "rotary dim 32 > head dim 16"),
        ((q, k, v, cos, sin, kc, vc, torch.tensor([3, 4])), "slot must be one integer index"),
    ]
    for args, message in bad:
        with pytest.raises(ValueError, match=message):
            rotary_into_cache(*args, impl=impl)
    if impl == "triton":
        with pytest.raises(ValueError, match="must share one dtype"):
            rotary_into_cache(q, k, v, cos, sin, kc.double(), vc.double(), slot, impl=impl)
