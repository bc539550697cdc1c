"""Block checkpointing with offload (models/offload.py) on the cases plain backprop handles by itself.

Each case is compared with torch autograd without checkpointing (CPU, fp32; the recomputation runs
the same ops on the same values, so the gradients are bitwise equal, checked to 1e-6 relative):
a second backward through a retained graph, arguments that need a gradient, a block input changed
in place after the forward (an error, as torch's checkpoint gives), forwards without autograd
(nothing kept), the model families and dtypes, and a backward that fails half way.
"""

from __future__ import annotations

import pytest
import torch
from helpers.tiny import tiny_model
from torch import nn

from minigrpo.lora import LoRACfg, apply_lora
from minigrpo.models import offload
from minigrpo.models.offload import checkpoint_block


class _ArgBlock(nn.Module):
    """y = tanh(lin(x)) * gain + bias: `gain` and `bias` come in as arguments, as masks and angles do."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, gain: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x)) * gain + bias


def _loss(model, ids, *, checkpointing: bool, offload_on: bool) -> torch.Tensor:
    model.train()
    model.gradient_checkpointing, model.activation_offload = checkpointing, offload_on
    torch.manual_seed(11)  # adapter dropout draws the same masks in every mode
    out = model(ids)  # (B, T, V)
    return out.float().pow(2).mean() + out[:, -1].float().logsumexp(-1).mean()


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _worst_rel(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert got.keys() == want.keys() and want
    return max(((got[k] - want[k]).abs().max() / want[k].abs().max().clamp_min(1e-30)).item() for k in want)


def _ids(T: int = 10) -> torch.Tensor:
    return torch.randint(3, 100, (2, T), generator=torch.Generator().manual_seed(0))


def test_a_retained_graph_backpropagates_twice():
    model = tiny_model(seed=1)
    _loss(model, _ids(), checkpointing=False, offload_on=False).backward()
    once = _grads(model)
    loss = _loss(model, _ids(), checkpointing=True, offload_on=True)
    loss.backward(retain_graph=True)
    loss.backward()  # the saved block inputs are still there
    twice = _grads(model)
    assert _worst_rel(twice, {k: 2 * g for k, g in once.items()}) <= 1e-6


def test_arguments_that_need_a_gradient_get_it():
    torch.manual_seed(0)
    blk = _ArgBlock(6)
    x = torch.randn(3, 6, requires_grad=True)
    gain, bias = torch.randn(6, requires_grad=True), torch.randn(6, requires_grad=True)
    want = torch.autograd.grad(blk(x, gain, bias).square().sum(), [x, gain, bias, *blk.parameters()])
    y = checkpoint_block(blk, x, gain, bias, offload=True)
    got = torch.autograd.grad(y.square().sum(), [x, gain, bias, *blk.parameters()], allow_unused=True)
    for name, a, b in zip(["x", "gain", "bias", "weight", "bias of lin"], got, want):
        assert a is not None, f"{name} got no gradient"
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0, msg=name)


def test_a_block_input_changed_in_place_after_the_forward_is_an_error():
    blk = nn.Linear(4, 4)
    x = torch.randn(2, 4, requires_grad=True) * 1.0  # not a leaf: in-place is allowed on it
    y = checkpoint_block(blk, x, offload=True)
    with torch.no_grad():
        x.mul_(2.0)  # the recomputation would read the new values: wrong gradients
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_without_autograd_nothing_is_kept_or_offloaded(monkeypatch):
    kept = []
    monkeypatch.setattr(offload, "_SavedInput", lambda *a: kept.append(a))
    blk = _ArgBlock(4)
    x, gain, bias = torch.randn(2, 4), torch.ones(4), torch.zeros(4)
    want = blk(x, gain, bias)
    with torch.no_grad():
        assert torch.equal(checkpoint_block(blk, x, gain, bias, offload=True), want)
    with torch.inference_mode():
        assert torch.equal(checkpoint_block(blk, x, gain, bias, offload=True), want)
    blk.requires_grad_(False)  # grad mode on, but nothing requires a gradient
    y = checkpoint_block(blk, x, gain, bias, offload=True)
    assert y.grad_fn is None and torch.equal(y, want)
    assert kept == []


def _lora(model):
    apply_lora(model, LoRACfg(r=4, alpha=8, dropout=0.3, targets=["q", "k", "v", "o", "gate", "up", "down"]))
    with torch.no_grad():  # B != 0: the adapters change the output, so their dropout matters
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    return model


VARIANTS = {
    "qwen3-qknorm-tied": lambda: tiny_model(seed=2, model_type="qwen3", head_dim=24, tie_word_embeddings=True),
    "phi3-fused-lora-dropout": lambda: _lora(tiny_model(seed=2, model_type="phi3")),
    "mistral-window-4": lambda: tiny_model(seed=2, model_type="mistral", sliding_window=4),
    "llama-lora-dropout-bf16-base": lambda: _lora(tiny_model(seed=2, dtype=torch.bfloat16)),
    "llama-bf16-packed": lambda: tiny_model(seed=2, dtype=torch.bfloat16),
    "llama-fp16": lambda: tiny_model(seed=2, dtype=torch.float16),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_loss_and_gradients_equal_plain_backprop(variant):
    # 16-bit runs are bitwise too: the recomputation repeats the forward's ops on the same inputs
    model = VARIANTS[variant]()
    if variant.endswith("packed"):
        model.pack_projections()
    for T in (10, 7):  # micro-batches of different lengths in a row
        want_loss = _loss(model, _ids(T), checkpointing=False, offload_on=False)
        want_loss.backward()
        want = _grads(model)
        for offload_on in (False, True):
            loss = _loss(model, _ids(T), checkpointing=True, offload_on=offload_on)
            loss.backward()
            assert loss.item() == want_loss.item()
            assert _worst_rel(_grads(model), want) <= 1e-6, f"T={T} offload={offload_on}"


def test_a_backward_that_fails_half_way_leaves_the_next_step_exact():
    model = tiny_model(seed=3, num_hidden_layers=3)
    _loss(model, _ids(), checkpointing=False, offload_on=False).backward()
    want = _grads(model)
    weight = model.model.layers[1].mlp.down_proj.weight

    def fail(_grad):
        raise RuntimeError("stop here")

    hook = weight.register_hook(fail)
    with pytest.raises(RuntimeError, match="stop here"):
        _loss(model, _ids(), checkpointing=True, offload_on=True).backward()
    hook.remove()
    model.zero_grad(set_to_none=True)
    _loss(model, _ids(), checkpointing=True, offload_on=True).backward()
    assert _worst_rel(_grads(model), want) <= 1e-6


# ------------------------------------------------------------------------------------------------
# CUDA: the inputs wait in pinned host memory


@pytest.mark.gpu
def test_offloaded_inputs_serve_a_retained_graph_and_catch_in_place_changes():
    model = tiny_model(seed=4, num_hidden_layers=3).cuda()
    ids = _ids().cuda()
    _loss(model, ids, checkpointing=False, offload_on=False).backward()
    once = _grads(model)
    loss = _loss(model, ids, checkpointing=True, offload_on=True)
    loss.backward(retain_graph=True)
    loss.backward()  # the host copies are brought back a second time
    assert _worst_rel(_grads(model), {k: 2 * g for k, g in once.items()}) <= 1e-5
    blk = nn.Linear(8, 8).cuda()
    x = torch.randn(2, 8, device="cuda", requires_grad=True) * 1.0
    y = checkpoint_block(blk, x, offload=True)
    with torch.no_grad():
        x.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
