"""Block checkpointing with and without CPU offload: the gradients of plain backprop, exactly.

On CPU the offload path runs our autograd function without copies; on CUDA (gpu marker) it copies
the block inputs to pinned host memory on a side stream, and the peak memory must drop.
"""

from __future__ import annotations

import pytest
import torch
from helpers.tiny import tiny_model
from torch import nn

from minigrpo.models.offload import checkpoint_block


def _grads(model, ids, mask, *, checkpointing: bool, offload: bool) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model.train()
    model.gradient_checkpointing, model.activation_offload = checkpointing, offload
    out = model(ids, attention_mask=mask)  # (B, T, V)
    (out.float().pow(2).mean() + out[:, -1].float().logsumexp(-1).mean()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("frozen_embedding", [False, True])
def test_checkpointed_grads_equal_plain_backprop(frozen_embedding):
    model = tiny_model(seed=1, num_hidden_layers=3)
    if frozen_embedding:  # as under LoRA: the first block's input needs no gradient
        model.model.embed_tokens.weight.requires_grad_(False)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    plain = _grads(model, ids, mask, checkpointing=False, offload=False)
    for offload in (False, True):
        got = _grads(model, ids, mask, checkpointing=True, offload=offload)
        assert got.keys() == plain.keys()
        worst = max((got[k] - plain[k]).abs().max().item() for k in plain)
        assert worst <= 1e-6, f"offload={offload}: max |grad diff| = {worst:.2e}"


class _NoisyBlock(nn.Module):
    """A block with dropout: the recomputation must draw the same mask as the forward."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        return x + scale * self.drop(torch.tanh(self.lin(x)))


def test_recomputation_replays_dropout_and_chains_blocks():
    torch.manual_seed(0)
    blocks = nn.ModuleList(_NoisyBlock(16) for _ in range(3)).train()
    x0 = torch.randn(4, 16, requires_grad=True)

    def run(ckpt: bool) -> tuple[torch.Tensor, list]:
        torch.manual_seed(123)
        x, outs = x0, []
        for blk in blocks:
            x = checkpoint_block(blk, x, 0.7, offload=True) if ckpt else blk(x, 0.7)
            outs.append(x)
        return x, outs

    ref_out, _ = run(False)
    ref = torch.autograd.grad(ref_out.sum(), [x0, *blocks.parameters()])
    out, outs = run(True)
    saved = [o.grad_fn.saved_input for o in outs]
    assert saved[0].prev is None and saved[1].prev() is saved[0] and saved[2].prev() is saved[1]
    got = torch.autograd.grad(out.sum(), [x0, *blocks.parameters()])
    assert torch.equal(out, ref_out)
    for a, b in zip(got, ref):
        assert (a - b).abs().max() <= 1e-6


def test_no_grad_anywhere_passes_through():
    blk = _NoisyBlock(8).eval().requires_grad_(False)
    x = torch.randn(2, 8)
    y = checkpoint_block(blk, x, 1.0, offload=True)
    assert y.grad_fn is None and torch.equal(y, blk(x, 1.0))


# ------------------------------------------------------------------------------------------------
# CUDA: real copies on a side stream


@pytest.mark.gpu
def test_offload_on_cuda_equal_grads():
    model = tiny_model(seed=2, hidden_size=512, intermediate_size=1408, num_hidden_layers=6, vocab_size=512).cuda()
    ids = torch.randint(3, 512, (2, 512), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :100] = 0
    grads_off = _grads(model, ids, mask, checkpointing=True, offload=False)
    grads_on = _grads(model, ids, mask, checkpointing=True, offload=True)
    worst = max((grads_on[k] - grads_off[k]).abs().max().item() for k in grads_off)
    assert worst <= 1e-5, f"max |grad diff| = {worst:.2e}"


@pytest.mark.gpu
def test_offload_on_cuda_lowers_the_peak():
    """Adapter-like training (only the norms train, gradients already allocated): the peak is the
    first block's recomputation, when every block input is still kept, unless it was offloaded."""
    L, B, T, D = 12, 2, 2048, 1024
    model = tiny_model(
        seed=2,
        dtype=torch.bfloat16,
        hidden_size=D,
        intermediate_size=2816,
        num_hidden_layers=L,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=4096,
    ).cuda()
    for name, p in model.named_parameters():
        p.requires_grad_("norm" in name)
    model.train()
    model.gradient_checkpointing = True
    ids = torch.randint(3, 512, (B, T), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :100] = 0

    def peak(offload: bool) -> int:
        model.activation_offload = offload
        for _ in range(2):  # the first run allocates the gradients and the pinned host blocks
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            model(ids, attention_mask=mask).float().logsumexp(-1).mean().backward()
            torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    on, off = peak(True), peak(False)
    boundary = B * T * D * 2  # one block input in bf16
    print(f"peak with offload {on / 2**20:.0f} MiB, without {off / 2**20:.0f} MiB")
    assert off - on > 0.6 * (L - 2) * boundary
