"""KV-cache decoding equals a full forward, on left-padded batches, for every attention variant;
padded rows run without a mask (rotated) exactly as with one."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny import tiny_model

from minigrpo.models.kv_cache import KVCache, SharedPrefix

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


@pytest.mark.parametrize("variant", ["llama", "mistral-window"])
def test_rotated_rows_equal_masked_attention(variant):
    """Rows with left and right padding run as plain causal attention (rotated, no mask); values and
    gradients on real tokens equal the masked path's (forced by passing position ids)."""
    model = tiny_model(seed=3, **VARIANTS[variant]).train()
    B, T = 4, 12
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :5] = 0  # left padded
    mask[1, 9:] = 0  # right padded
    mask[2, :2], mask[2, 10:] = 0, 0  # both
    ids = torch.randint(3, 128, (B, T)).masked_fill(mask == 0, 0)
    weights = torch.randn(B, T, model.args.dim) * mask[..., None]  # a loss on real tokens only

    def run(**kw):
        model.zero_grad(set_to_none=True)
        hidden = model.hidden(ids, attention_mask=mask, **kw)  # (B, T, D)
        (hidden * weights).sum().backward()
        return hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, plain_grads = run()
    masked, masked_grads = run(position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    real = mask.bool()
    assert (plain[real] - masked[real]).abs().max() < 1e-5
    for name, g in masked_grads.items():
        err = (plain_grads[name] - g).abs().max().item()
        assert err < 1e-5 * max(1.0, g.abs().max().item()), f"{name}: max |diff| {err:.2e}"


@pytest.mark.parametrize("impl", ["ref", "triton"])
@pytest.mark.parametrize("variant", ["llama", "mistral-window"])
def test_shared_prefix_decode_matches_full_forward(variant, impl):
    """Rows that share their prompt's keys/values (SharedPrefix: G rows per prompt, one copy) decode
    what a full forward of each row computes, through the SDPA path and the split-K kernel, also
    after finished rows leave the batch (keep_rows: the group map follows the rows)."""
    model = tiny_model(seed=5, **VARIANTS[variant])
    model.decode_attention_impl = impl
    P, G, Tp, steps = 3, 2, 6, 5
    lengths = torch.tensor([6, 3, 1])
    prompt_mask = (torch.arange(Tp)[None] >= (Tp - lengths)[:, None]).long()  # (P, Tp) left padded
    prompts = torch.randint(3, 128, (P, Tp)).masked_fill(prompt_mask == 0, 0)
    group = torch.arange(P).repeat_interleave(G)  # (N,)
    N = P * G
    ids = torch.cat([prompts[group], torch.randint(3, 128, (N, steps))], dim=1)  # every row its own tokens
    mask = torch.cat([prompt_mask[group], torch.ones(N, steps, dtype=torch.long)], dim=1)  # (N, T)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(ids, attention_mask=mask)  # (N, T, V)
        small = KVCache(model.args, P, Tp, dtype=torch.float32, device="cpu")
        model(prompts, attention_mask=prompt_mask, position_ids=pos[::G, :Tp], kv_cache=small,
              cache_position=torch.arange(Tp))  # fmt: skip
        cache = KVCache(model.args, N, Tp + steps, dtype=torch.float32, device="cpu",
                        prefix=SharedPrefix(small.k, small.v, group, max_rows=2))  # fmt: skip
        assert cache.k.shape[3] == steps and cache.first == Tp  # each row owns only its new slots
        cache.k.normal_(0, 1e3), cache.v.normal_(0, 1e3)  # unwritten slots hold garbage
        rows = torch.arange(N)
        for t in range(Tp, Tp + steps):
            if t == Tp + 2:  # rows 1, 2 and 4 finished: the others move down, groups follow
                rows = torch.tensor([0, 3, 5])
                cache.keep_rows(rows, t, chunk=2)
                assert cache.prefix.group.tolist() == [0, 1, 2] and cache.k.shape[1] == 3
            step = model(ids[rows, t : t + 1], attention_mask=mask[rows, : t + 1], position_ids=pos[rows, t : t + 1],
                         kv_cache=cache, cache_position=torch.tensor([t]))  # fmt: skip
            err = (step[:, 0] - full[rows, t]).abs().max().item()
            assert err < 1e-5, f"{variant} {impl}: step {t}: max |diff| {err:.2e}"


def test_a_compaction_reads_the_prefix_per_row_once_groups_are_mostly_empty():
    # per group while at least half of max_rows remain per prefix row on average, per row after
    args = tiny_model(seed=1).args
    P, G, Tp = 3, 4, 5
    small = KVCache(args, P, Tp, dtype=torch.float32, device="cpu")
    group = torch.arange(P).repeat_interleave(G)  # (12,)
    cache = KVCache(args, P * G, Tp + 4, dtype=torch.float32, device="cpu",
                    prefix=SharedPrefix(small.k, small.v, group, max_rows=G))  # fmt: skip
    assert cache.prefix.rows is not None
    cache.keep_rows(torch.tensor([0, 1, 4, 5, 8, 9]), Tp + 1)  # 6 of 12 rows: half, still per group
    assert cache.prefix.max_rows == G and cache.prefix.rows.count.tolist() == [2, 2, 2]
    cache.keep_rows(torch.tensor([0, 2, 4]), Tp + 2)  # 3 rows: per row
    assert cache.prefix.max_rows is None and cache.prefix.rows is None
    assert cache.prefix.group.tolist() == [0, 1, 2]
