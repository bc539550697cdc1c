"""Packed projections (models/packed.py): q, k, v (gate, up) weights back to back in one buffer.

Packing moves storage only: the same Parameters, values and gradients. A packed set runs as one
GEMM over a view of the buffer: by default in 16-bit models, forced here in fp32 (`join`) to hold
it to the unpacked math: the same logits within 1e-6 and, in training, the same gradients within
1e-6, accumulated into the separate parameters. fp32 models keep the separate calls by default. A
set that stops being packed (re-allocated by .to(), wrapped by LoRA) falls back by itself, and the
sampler packs its model.
"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers.kernel_checks import need_interpreter
from helpers.tiny import tiny_model, tiny_tokenizer

from minigrpo.lora import LoRACfg, apply_lora
from minigrpo.models import transformer
from minigrpo.models.packed import joined_linear, joined_rows, pack_rows, packed_linear
from minigrpo.sampling.kv_sampler import KVCacheSampler
from minigrpo.sampling.params import SamplingParams

VARIANTS = {
    "llama": {},
    "qwen2-bias": dict(model_type="qwen2"),  # q/k/v biases: packed too
    "qwen3-qknorm": dict(model_type="qwen3", head_dim=24),
    "phi3-fused": dict(model_type="phi3"),  # qkv_proj / gate_up_proj already one matrix: nothing to pack
}


def _calls(model) -> dict[str, int]:
    """Counts the forward calls of every q_proj and gate_proj (hooks)."""
    count = {"q_proj": 0, "gate_proj": 0}
    for name, module in model.named_modules():
        short = name.rsplit(".", 1)[-1]
        if short in count:
            module.register_forward_hook(lambda *_, s=short: count.__setitem__(s, count[s] + 1))
    return count


@pytest.fixture
def joined(monkeypatch):
    """The model's packed sets run joined whatever their dtype (the default joins 16-bit ones)."""
    monkeypatch.setattr(transformer, "packed_linear", functools.partial(packed_linear, join=True))
    monkeypatch.setattr(transformer, "joined_linear", functools.partial(joined_linear, join=True))


@pytest.mark.parametrize("variant", VARIANTS)
def test_packing_keeps_values_and_inference_runs_one_gemm_per_set(variant, joined):
    model = tiny_model(seed=3, **VARIANTS[variant])
    ids = torch.randint(3, 100, (2, 9))
    with torch.no_grad():
        before = model(ids)
    params = dict(model.named_parameters())
    values = {k: p.detach().clone() for k, p in params.items()}
    assert model.pack_projections()
    assert dict(model.named_parameters()) == params  # the same Parameter objects
    assert all(torch.equal(p, values[k]) and p.requires_grad for k, p in params.items())
    calls = _calls(model)
    with torch.no_grad():
        after = model(ids)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    fused = variant == "phi3-fused"
    assert calls == ({"q_proj": 0, "gate_proj": 0})  # packed sets (or fused matrices) never call the parts
    attn = model.model.layers[1].self_attn
    if not fused:
        w, b = joined_rows(attn.qkv_linears())
        assert w.data_ptr() == attn.q_proj.weight.data_ptr()
        assert torch.equal(w, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        assert (b is None) == (attn.q_proj.bias is None)


def test_joined_rows_is_a_view_of_the_packed_storage():
    layers = [torch.nn.Linear(8, n) for n in (6, 4, 4)]
    assert joined_rows(layers) is None  # three separate allocations
    assert pack_rows(layers)
    w, b = joined_rows(layers)
    assert w.shape == (14, 8) and b.shape == (14,) and w.data_ptr() == layers[0].weight.data_ptr()
    with torch.no_grad():
        layers[1].weight.add_(1.0)  # an in-place update of one part (an optimizer step) shows in the view
    assert torch.equal(w[6:10], layers[1].weight)
    assert joined_rows(list(reversed(layers))) is None  # order matters
    assert not pack_rows([torch.nn.Linear(8, 4), torch.nn.Linear(7, 4)])  # different input sizes


@pytest.mark.parametrize("swiglu_impl", ["auto", "triton"])
@pytest.mark.parametrize("variant", ["llama", "qwen2-bias", "phi3-fused"])
def test_training_through_the_joined_gemm_gives_the_unpacked_gradients(variant, swiglu_impl, joined, monkeypatch):
    # two backward passes (gradients accumulate into the parts), then an optimizer step: the
    # parameters stay packed and equal to the unpacked model's. swiglu_impl "triton": the MLP's
    # kernel (interpreted), which takes the joined [gate | up] whole (swiglu_halves)
    if swiglu_impl == "triton":
        need_interpreter()
        monkeypatch.setattr(transformer, "swiglu", functools.partial(transformer.swiglu, impl="triton"))
        monkeypatch.setattr(transformer, "swiglu_halves", functools.partial(transformer.swiglu_halves, impl="triton"))
    plain, packed = tiny_model(seed=4, **VARIANTS[variant]), tiny_model(seed=4, **VARIANTS[variant])
    packed.pack_projections()
    calls = _calls(packed)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (plain, packed)]  # linear in the gradients
    for _ in range(2):
        ids = torch.randint(3, 100, (2, 9))
        for m in (plain, packed):
            m(ids).float().logsumexp(-1).mean().backward()
    assert calls == {"q_proj": 0, "gate_proj": 0}  # the joined GEMM (or fused matrix) ran, forward and backward
    for (name, a), b in zip(plain.named_parameters(), packed.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-6, msg=name)
    for opt in opts:
        opt.step()
    attn = packed.model.layers[0].self_attn
    if variant != "phi3-fused":
        w, _ = joined_rows(attn.qkv_linears())
        assert torch.equal(w, torch.cat([p.weight for p in attn.qkv_linears()]))
    for (name, a), b in zip(plain.named_parameters(), packed.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)


def test_a_set_that_stops_being_packed_falls_back(joined):
    model = tiny_model(seed=5)
    ids = torch.randint(3, 100, (2, 9))
    model.pack_projections()
    model.to(torch.float64)  # every parameter re-allocated on its own
    attn = model.model.layers[0].self_attn
    assert joined_rows(attn.qkv_linears()) is None
    calls = _calls(model)
    with torch.no_grad():
        model(ids)
    assert calls["q_proj"] == 2 and calls["gate_proj"] == 2  # the separate calls, one per layer
    apply_lora(model, LoRACfg(r=2, alpha=4, targets=["q", "v"]))
    assert not model.pack_projections()  # q and v are LoRA-wrapped: that set stays as it is
    assert joined_rows(model.model.layers[0].mlp.gate_up_linears()) is not None  # gate, up were packed


def test_the_sampler_packs_its_model_and_draws_the_same_tokens(joined):
    prompts = [[5, 6, 7], [8, 9]]
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=6, ignore_stop=True)
    plain, packed = tiny_model(seed=6, model_type="qwen2"), tiny_model(seed=6, model_type="qwen2")
    plain.pack_projections = lambda: False  # this one stays unpacked: the separate calls
    a = KVCacheSampler(plain, tiny_tokenizer(), cuda_graphs=False).generate(prompts, params, key=(1,))
    b = KVCacheSampler(packed, tiny_tokenizer(), cuda_graphs=False).generate(prompts, params, key=(1,))
    assert joined_rows(plain.model.layers[0].self_attn.qkv_linears()) is None
    assert joined_rows(packed.model.layers[0].self_attn.qkv_linears()) is not None  # generate packed it
    assert torch.equal(a.completion_ids, b.completion_ids)
    torch.testing.assert_close(a.sampler_logp, b.sampler_logp, rtol=0, atol=1e-5)


def test_by_default_16_bit_sets_join_and_fp32_ones_keep_the_separate_calls():
    ids = torch.randint(3, 100, (2, 9))
    for dtype, parts in ((torch.float32, 2), (torch.bfloat16, 0)):  # calls per projection: one per layer, or none
        model = tiny_model(seed=7, dtype=dtype)
        model.pack_projections()
        calls = _calls(model)
        model(ids).float().mean().backward()  # training
        with torch.no_grad():
            model(ids)  # inference
        assert calls == {"q_proj": 2 * parts, "gate_proj": 2 * parts}, dtype


def test_frozen_packed_parts_keep_no_input_and_run_no_weight_gradient_gemm():
    # a LoRA run's untargeted projections (here all of them) are frozen plain linears, packed for the
    # sampler: in training they cost what nn.Linear's do (no (sum N_i, D) GEMM, x not kept), and
    # the input gradient equals the unpacked model's
    from torch.utils._python_dispatch import TorchDispatchMode

    class Shapes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                self.shapes.append(tuple(out.shape))
            return out

    layers = [torch.nn.Linear(8, n) for n in (6, 4, 4)]
    x = torch.randn(5, 8, requires_grad=True)
    want = torch.autograd.grad(torch.cat([m(x) for m in layers], -1).square().sum(), x)[0]
    for m in layers:
        m.requires_grad_(False)
    assert pack_rows(layers)
    y = joined_linear(x, layers, join=True)  # (5, 14)
    assert y.grad_fn.saved_tensors[0] is None  # x is not kept for a weight gradient
    with Shapes() as mode:
        got = torch.autograd.grad(y.square().sum(), x)[0]
    assert (14, 8) not in mode.shapes, mode.shapes
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    layers[1].weight.requires_grad_(True)  # one part trains: its gradient alone comes back
    y = joined_linear(x, layers, join=True)
    y.square().sum().backward()
    assert layers[0].weight.grad is None and layers[1].weight.grad.shape == (4, 8) and layers[1].bias.grad is None


def test_a_joined_set_trains_under_autocast_as_the_separate_layers_do():
    # fp32 activations into 16-bit packed weights under autocast: the GEMMs run in bf16 forward and
    # backward, the gradients come back in each input's dtype. The parts' gradients equal the separate
    # layers' (1e-6); x's is one bf16 GEMM over all parts, rounded once, where the separate layers
    # round each part's share and add them in fp32: equal within bf16 rounding (2^-7 relative)
    torch.manual_seed(0)
    plain = [torch.nn.Linear(8, n).bfloat16() for n in (6, 4)]
    packed = [torch.nn.Linear(8, n).bfloat16() for n in (6, 4)]
    for a, b in zip(plain, packed):
        b.load_state_dict(a.state_dict())
    assert pack_rows(packed)
    x = torch.randn(3, 8)
    grads = []
    for layers, join in ((plain, False), (packed, True)):
        inp = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = torch.cat(packed_linear(inp, layers, join=join), -1)  # (3, 10) bf16
        y.float().square().sum().backward()
        grads.append([inp.grad, *(p.grad for m in layers for p in m.parameters())])
    for i, (a, b) in enumerate(zip(*grads)):
        assert a.dtype == b.dtype
        tol = 2**-7 if i == 0 else 1e-6
        torch.testing.assert_close(b.float(), a.float(), rtol=tol, atol=tol * a.abs().max().item())
