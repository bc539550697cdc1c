"""KV-cache decoding equals a full forward, on left-padded batches, for every attention variant."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny import tiny_model

from minigrpo.models.transformer import KVCache

VARIANTS = {
    "llama": {},
    "qwen3-qknorm": dict(model_type="qwen3", head_dim=24),
    "mistral-window": dict(model_type="mistral", sliding_window=4),
    "phi3-fused-partial": dict(model_type="phi3", partial_rotary_factor=0.5),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_decode_matches_full_forward(variant):
    model = tiny_model(seed=1, **VARIANTS[variant])
    B, Tp, steps = 3, 7, 6
    lengths = torch.tensor([7, 4, 2])
    prompt_mask = (torch.arange(Tp)[None] >= (Tp - lengths)[:, None]).long()  # (B, Tp) left padded
    ids = torch.randint(3, 128, (B, Tp + steps))
    ids[:, :Tp] = ids[:, :Tp].masked_fill(prompt_mask == 0, 0)
    mask = torch.cat([prompt_mask, torch.ones(B, steps, dtype=torch.long)], dim=1)  # (B, T)
    with torch.no_grad():
        full = model(ids, attention_mask=mask)  # (B, T, V)
        cache = KVCache(model.args, B, Tp + steps, dtype=torch.float32, device="cpu")
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
        prefill = model(
            ids[:, :Tp],
            attention_mask=mask[:, :Tp],
            position_ids=pos[:, :Tp],
            kv_cache=cache,
            cache_position=torch.arange(Tp),
        )
        real = prompt_mask.bool()
        assert (prefill[real] - full[:, :Tp][real]).abs().max() < 1e-5
        for t in range(Tp, Tp + steps):
            step = model(
                ids[:, t : t + 1],
                attention_mask=mask[:, : t + 1],
                position_ids=pos[:, t : t + 1],
                kv_cache=cache,
                cache_position=torch.tensor([t]),
            )
            err = (step[:, 0] - full[:, t]).abs().max().item()
            assert err < 1e-5, f"{variant}: step {t}: max |diff| {err:.2e}"


def test_padded_row_equals_row_alone():
    """A left-padded row computes exactly what the same tokens give without padding."""
    model = tiny_model(seed=2)
    ids = torch.randint(3, 128, (1, 5))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        alone = model(ids)
        both = model(torch.cat([padded, torch.randint(3, 128, (1, 8))]), attention_mask=torch.cat([mask, mask * 0 + 1]))
    assert (both[0, 3:] - alone[0]).abs().max() < 1e-5
    assert torch.isfinite(both).all()
