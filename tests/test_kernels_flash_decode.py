"""Split-K decode attention (kernels/flash_decode.py) vs its reference vs the model's SDPA path.

fp32: kernel, reference and SDPA with `attention_mask_4d` agree within atol 1e-5. bf16: the error
budget of helpers/kernel_checks.py, err(kernel) <= 2 * err(SDPA in bf16) + 1e-3, both against the
reference evaluated in fp64 on the same rounded inputs. Caches are strided views (one layer of an
(L, B, Hkv, S_max, Dh) tensor) whose future and pad slots hold large garbage, which must not leak.
Through the model: decoding with the kernel forced (interpreter) equals the SDPA path and a full
forward, and the own sampler draws the same tokens and log-probs with it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.kernel_checks import DEVICES, FLOOR, rel_err
from helpers.tiny import tiny_model

from minigrpo.kernels import decode_attention, decode_attention_ref
from minigrpo.kernels.decode_ref import attended_slots, window_start
from minigrpo.kernels.flash_decode import _decode_attention_triton, split_size
from minigrpo.kernels.prefix_attention import prefix_rows, rows_per_program
from minigrpo.models import transformer
from minigrpo.models.kv_cache import KVCache
from minigrpo.models.transformer import attention_mask_4d
from minigrpo.sampling.kv_sampler import KVCacheSampler
from minigrpo.sampling.params import SamplingParams

GARBAGE = 1.0e3  # scale of the values in slots that must never be attended


def _inputs(B, H, HKV, Dh, S, slot, dtype, device, n_layers=3, layer=1):
    """q (B, H, Dh); k, v: layer `layer` of (L, B, Hkv, S, Dh) caches (strided views); key_mask
    (B, S) long, left padded by 0, 3, 6, ... slots; pad and future slots filled with garbage."""
    q = torch.randn(B, H, Dh, dtype=torch.float64, device=device).to(dtype)
    k_all = torch.randn(n_layers, B, HKV, S, Dh, dtype=torch.float64, device=device).to(dtype)
    v_all = torch.randn(n_layers, B, HKV, S, Dh, dtype=torch.float64, device=device).to(dtype)
    pads = (3 * torch.arange(B, device=device)).clamp(max=slot)  # row b: its first 3b slots are padding
    key_mask = (torch.arange(S, device=device)[None, :] >= pads[:, None]).long()  # (B, S)
    k, v = k_all[layer], v_all[layer]  # (B, Hkv, S, Dh) views
    _fill_garbage(k, v, key_mask, slot)
    return q, k, v, key_mask


def _fill_garbage(k, v, key_mask, slot):
    """Overwrite pad slots (other than `slot`) and slots past `slot` with large random values."""
    j = torch.arange(k.shape[2], device=k.device)
    unused = ((key_mask == 0) & (j != slot)[None, :]) | (j > slot)[None, :]  # (B, S)
    sel = unused[:, None, :, None].expand_as(k)
    k[sel] = (GARBAGE * torch.randn(int(sel.sum()), device=k.device)).to(k.dtype)
    v[sel] = (GARBAGE * torch.randn(int(sel.sum()), device=k.device)).to(k.dtype)


def _sdpa(q, k, v, key_mask, slot, kv_len, window):
    """The model's path: SDPA over slots [0, kv_len) with the 4-D mask, G query rows per kv head."""
    B, H, Dh = q.shape
    HKV = k.shape[1]
    mask = attention_mask_4d(key_mask[:, :kv_len], slot, kv_len, window, B)  # (B, 1, 1, S)
    qg = q.reshape(B, HKV, H // HKV, Dh)
    out = F.scaled_dot_product_attention(qg, k[:, :, :kv_len], v[:, :, :kv_len], attn_mask=mask)
    return out.reshape(B, H, Dh)


CASES = [  # (B, H, HKV, Dh, S_max, kv_len, slot, window, split, block_s); split None: the default
    (3, 2, 2, 64, 48, 40, 25, None, None, 16),  # G = 1, kv_len not a multiple of anything
    (2, 4, 2, 96, 100, 90, 70, None, 32, 16),  # G = 2, Dh 96 (padded to 128), 3 splits
    (3, 6, 1, 64, 160, 150, 149, None, None, 64),  # G = 6, default split: 3 splits of one tile
    (2, 7, 1, 96, 140, 130, 100, 40, 48, 16),  # G = 7 (not a power of 2), window inside split 2
    (2, 4, 1, 64, 200, 200, 10, None, 64, 16),  # splits wholly past the slot: empty records
    (2, 4, 2, 64, 70, 70, 69, 9, None, 64),  # one split (written directly), window
]


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-H{}-Hkv{}-Dh{}-S{}-kv{}-slot{}-w{}-split{}-blk{}".format(*c))
def test_kernel_matches_reference_and_sdpa(case, dtype, device):
    B, H, HKV, Dh, S, kv_len, slot_i, window, split, block_s = case
    q, k, v, key_mask = _inputs(B, H, HKV, Dh, S, slot_i, dtype, device)
    slot = torch.tensor([slot_i], device=device)
    scale = Dh**-0.5
    got = _decode_attention_triton(q, k, v, key_mask, slot, kv_len, window, scale, split=split, block_s=block_s)
    assert got.shape == (B, H, Dh) and got.dtype == dtype
    assert torch.isfinite(got).all()
    spec = decode_attention_ref(q.double(), k.double(), v.double(), key_mask, slot, kv_len, window)  # fp64
    sdpa = _sdpa(q, k, v, key_mask, slot, kv_len, window)
    if dtype == torch.float32:
        ref = decode_attention_ref(q, k, v, key_mask, slot, kv_len, window)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(got, sdpa, rtol=0, atol=1e-5)
        torch.testing.assert_close(ref, sdpa, rtol=0, atol=1e-5)
    else:
        e_k, e_p = rel_err(got, spec), rel_err(sdpa, spec)
        assert e_k <= 2 * e_p + FLOOR[dtype], f"kernel {e_k:.2e} vs SDPA in bf16 {e_p:.2e}"
    # the garbage in pad and future slots does not leak: new garbage, bitwise the same output
    _fill_garbage(k, v, key_mask, slot_i)
    again = _decode_attention_triton(q, k, v, key_mask, slot, kv_len, window, scale, split=split, block_s=block_s)
    assert torch.equal(got, again)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_every_split_size_gives_the_same_result(device):
    # one split (direct write), splits of one and of several tiles, empty trailing splits
    B, H, HKV, Dh, S, kv_len, slot_i = 2, 4, 2, 64, 96, 96, 57
    q, k, v, key_mask = _inputs(B, H, HKV, Dh, S, slot_i, torch.float32, device)
    slot = torch.tensor([slot_i], device=device)
    ref = decode_attention_ref(q, k, v, key_mask, slot, kv_len)
    for split in (16, 32, 48, 96):
        got = _decode_attention_triton(q, k, v, key_mask, slot, kv_len, None, Dh**-0.5, split=split, block_s=16)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5, msg=f"split {split}")


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_public_function_bool_mask_scale_and_own_pad_slot(device):
    # a bool key mask, an explicit scale, and a row whose every key (its own slot too) is padding:
    # that row attends its own slot only, so its output is v[slot] of its kv head
    B, H, HKV, Dh, S, kv_len, slot_i = 3, 6, 2, 64, 80, 75, 60
    q, k, v, key_mask = _inputs(B, H, HKV, Dh, S, slot_i, torch.float32, device)
    key_mask[2] = 0
    _fill_garbage(k, v, key_mask, slot_i)
    slot = torch.tensor([slot_i], device=device)
    got = decode_attention(q, k, v, key_mask.bool(), slot, kv_len, scale=0.3, impl="triton")
    ref = decode_attention_ref(q, k, v, key_mask, slot, kv_len, scale=0.3)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    own = v[2, :, slot_i].repeat_interleave(H // HKV, dim=0)  # (H, Dh)
    torch.testing.assert_close(got[2], own, rtol=0, atol=1e-6)
    assert (got[0] - own).abs().max() > 0.1  # other rows do mix several slots


def test_auto_is_ref_on_cpu_and_split_sizes():
    q, k, v, key_mask = _inputs(2, 4, 2, 32, 20, 9, torch.float32, torch.device("cpu"))
    slot = torch.tensor([9])
    auto = decode_attention(q, k, v, key_mask, slot, 20, window=4, impl="auto")
    assert torch.equal(auto, decode_attention_ref(q, k, v, key_mask, slot, 20, 4))
    for B, HKV, kv_len in [(64, 2, 800), (512, 2, 800), (1, 1, 32768), (8, 8, 100), (4, 2, 1)]:
        split = split_size(B, HKV, kv_len)
        splits = -(-kv_len // split)
        assert split % 64 == 0 and 1 <= splits <= 64, (B, HKV, kv_len, split)
        assert splits == 64 or B * HKV * splits >= 4 * 132 or split == 64, (B, HKV, kv_len, split)
    assert split_size(64, 2, 800) == 192  # 5 splits x 128 (row, kv head) pairs = 640 programs
    assert split_size(512, 2, 800) == 832  # enough rows: one split, no combine step


def _split_prefix(k, v, key_mask, Tp, group, P):
    """Cut full caches (B, Hkv, S, Dh) into a shared prefix (P, Hkv, Tp, Dh), whose row p is the
    first Tp slots of a row of group p, and the rows' own slots [Tp, S); every row of a group is
    given its prefix row's first Tp slots (and mask), so the full caches still say what is attended."""
    first_row = [int((group == p).nonzero()[0]) for p in range(P)]
    k_prefix, v_prefix = k[first_row, :, :Tp].clone(), v[first_row, :, :Tp].clone()
    k[:, :, :Tp], v[:, :, :Tp] = k_prefix[group], v_prefix[group]
    key_mask[:, :Tp] = key_mask[first_row, :Tp][group]
    return (k_prefix, v_prefix, group), k[:, :, Tp:], v[:, :, Tp:]


PREFIX_CASES = [  # (B, H, HKV, Dh, S, kv_len, slot, window, Tp, split, block_s, group)
    (4, 4, 2, 64, 100, 90, 70, None, 37, 32, 16, [0, 0, 1, 1]),  # Tp inside a tile and a split
    (5, 6, 1, 64, 80, 80, 60, None, 32, None, 16, [2, 0, 1, 0, 2]),  # rows out of group order (compacted)
    (3, 7, 1, 96, 120, 110, 100, 40, 50, 48, 16, [1, 1, 0]),  # window crossing the prefix end
    (3, 4, 2, 64, 60, 60, 20, None, 33, None, 16, [0, 1, 2]),  # slot inside the prefix's end tile
    (2, 4, 2, 64, 70, 70, 69, 9, 40, None, 64, [0, 0]),  # one split, the window past the prefix
]


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", PREFIX_CASES, ids=lambda c: f"B{c[0]}-Tp{c[8]}-slot{c[6]}-w{c[7]}")
def test_shared_prefix_is_the_same_attention(case, dtype, device):
    # rows reading their first Tp slots from a shared prefix get bitwise what they get from a full
    # cache holding the same values (the kernel loads the same numbers in the same order), and the
    # reference agrees
    B, H, HKV, Dh, S, kv_len, slot_i, window, Tp, split, block_s, group = case
    q, k, v, key_mask = _inputs(B, H, HKV, Dh, S, slot_i, dtype, device)
    group = torch.tensor(group, device=device)
    prefix, k_own, v_own = _split_prefix(k, v, key_mask, Tp, group, int(group.max()) + 1)
    _fill_garbage(k, v, key_mask, slot_i)  # garbage in the full caches' unused slots ...
    k_own[:], v_own[:] = k[:, :, Tp:], v[:, :, Tp:]  # ... and the same in the own caches
    slot, scale = torch.tensor([slot_i], device=device), Dh**-0.5
    plain = _decode_attention_triton(q, k, v, key_mask, slot, kv_len, window, scale, split=split, block_s=block_s)
    shared = _decode_attention_triton(
        q, k_own, v_own, key_mask, slot, kv_len, window, scale, prefix, split=split, block_s=block_s
    )
    assert torch.equal(shared, plain)
    ref = decode_attention_ref(q, k_own, v_own, key_mask, slot, kv_len, window, prefix=prefix)
    torch.testing.assert_close(ref, decode_attention_ref(q, k, v, key_mask, slot, kv_len, window), rtol=0, atol=0)
    if dtype == torch.float32:
        torch.testing.assert_close(shared, ref, rtol=0, atol=1e-5)
    public = decode_attention(q, k_own, v_own, key_mask, slot, kv_len, window=window, prefix=prefix, impl="triton")
    assert torch.equal(public, decode_attention(q, k, v, key_mask, slot, kv_len, window=window, impl="triton"))


CASCADE_CASES = [  # (B, H, HKV, Dh, S, kv_len, slot, window, Tp, max_rows, group)
    (8, 4, 2, 64, 100, 90, 70, None, 37, 4, [0, 0, 0, 0, 1, 1, 1, 1]),  # two full groups, G = 2
    (5, 6, 1, 64, 80, 80, 60, None, 32, 3, [2, 0, 1, 0, 2]),  # rows out of order, G = 6 padded to 8
    (6, 8, 2, 32, 120, 110, 100, 40, 50, 4, [1, 1, 1, 0, 0, 2]),  # a window crossing the prefix end
    (3, 4, 2, 64, 60, 60, 20, None, 33, 2, [0, 0, 2]),  # slot inside the prefix; prefix row 1 has no rows
    (40, 8, 1, 32, 70, 70, 69, 9, 40, 40, [0] * 40),  # 40 rows x 8 heads: 3 programs of 16 rows
    (4, 2, 2, 32, 50, 48, 47, None, 48, 4, [0, 0, 0, 0]),  # no own slots past the prefix (kv_len = Tp)
]


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASCADE_CASES, ids=lambda c: f"B{c[0]}-G{c[1] // c[2]}-Tp{c[8]}-rows{c[9]}")
@pytest.mark.parametrize("launch", ["auto", "own-one-split", "one-split-each", "prefix-row-a-program"])
def test_prefix_once_per_group_is_the_same_attention(case, launch, dtype, device):
    # the cascade (prefix part per group, own part per row, then combined) against the reference
    # (fp32: 1e-5) and against the per-row kernel on the same inputs (bf16: the kernel error budget);
    # rows of one group may differ in their key mask (here: the own pad of each row is different).
    # With the own slots in one split the split kernel merges the prefix's records itself (one or
    # several of them) and writes out: no combine step. The prefix kernel's launch may cut a group
    # into programs of one row each.
    B, H, HKV, Dh, S, kv_len, slot_i, window, Tp, max_rows, group = case

    def whole(n):  # slots of one split of 16-slot tiles covering n slots
        return 16 * max(1, -(-n // 16))

    overrides = {
        "auto": {},
        "own-one-split": dict(block_s=16, split=whole(kv_len - Tp), prefix_split=16),
        "one-split-each": dict(block_s=16, split=whole(kv_len - Tp), prefix_split=whole(Tp)),
        "prefix-row-a-program": dict(prefix_launch=dict(loop_stages=1, num_warps=2, rows_per_prog=1)),
    }[launch]
    q, k, v, key_mask = _inputs(B, H, HKV, Dh, S, slot_i, dtype, device)
    group = torch.tensor(group, device=device)
    P = int(group.max()) + 1
    used, dense = torch.unique(group, return_inverse=True)  # prefix rows with no rows hold garbage
    (kp, vp, _), k_own, v_own = _split_prefix(k, v, key_mask, Tp, dense, len(used))
    k_prefix = (GARBAGE * torch.randn(P, *kp.shape[1:], device=device)).to(dtype)
    v_prefix = (GARBAGE * torch.randn(P, *kp.shape[1:], device=device)).to(dtype)
    k_prefix[used], v_prefix[used] = kp, vp
    prefix = (k_prefix, v_prefix, group)
    key_mask[:, : Tp // 3] *= (torch.rand(B, Tp // 3, device=device) < 0.7).long()  # rows differ in the prefix
    slot, scale = torch.tensor([slot_i], device=device), Dh**-0.5
    rows = prefix_rows(group, P, max_rows)
    cascade = _decode_attention_triton(
        q, k_own, v_own, key_mask, slot, kv_len, window, scale, prefix, rows, **overrides
    )
    per_row = _decode_attention_triton(q, k_own, v_own, key_mask, slot, kv_len, window, scale, prefix)
    ref64 = decode_attention_ref(q.double(), k_own.double(), v_own.double(), key_mask, slot, kv_len, window,
                                 prefix=tuple(t.double() if t.is_floating_point() else t for t in prefix))  # fmt: skip
    if dtype == torch.float32:
        torch.testing.assert_close(cascade.double(), ref64, rtol=0, atol=1e-5)
    else:
        assert rel_err(cascade, ref64) <= 2 * rel_err(per_row, ref64) + FLOOR[dtype]
    if launch == "auto":
        public = decode_attention(
            q, k_own, v_own, key_mask, slot, kv_len, window=window, prefix=prefix, rows=rows, impl="triton"
        )
        assert torch.equal(public, cascade)


def test_prefix_rows_lists_each_groups_rows():
    group = torch.tensor([2, 0, 1, 0, 2, 2])
    rows = prefix_rows(group, 4, 3)
    assert rows.count.tolist() == [2, 1, 3, 0] and rows.start.tolist() == [0, 2, 3, 6]
    assert rows.order.tolist() == [1, 3, 2, 0, 4, 5]  # stable: ascending within a group
    assert rows_per_program(8, 6) == 8 and rows_per_program(40, 8) == 16 and rows_per_program(3, 1) == 4


def test_shared_prefix_shapes_are_checked():
    q, k, v, key_mask = _inputs(2, 4, 2, 32, 20, 9, torch.float32, torch.device("cpu"))
    prefix = (k[:1, :, :8], v[:1, :, :8], torch.zeros(2, dtype=torch.long))
    slot = torch.tensor([9])
    with pytest.raises(ValueError, match="ends inside"):
        decode_attention(q, k, v, key_mask, slot, 6, prefix=prefix)
    with pytest.raises(ValueError, match="group"):
        decode_attention(q, k, v, key_mask, slot, 12, prefix=(prefix[0], prefix[1], torch.zeros(3, dtype=torch.long)))
    with pytest.raises(ValueError, match="cache slots 8 \\+ 20"):
        decode_attention(q, k, v, key_mask, slot, 29, prefix=prefix)


# ----------------------------------------------------------------------------------------------
# The sliding window counts real tokens (key_mask 1), not slots
# ----------------------------------------------------------------------------------------------

WINDOW_SLOT, WINDOW_S = 40, 52  # the query's slot; cache slots (the last ones are the future)
WINDOW_LAYOUTS = {  # row -> its pad slots [lo, hi) up to the slot
    "no-pads": [],
    "left-pads": [(0, 7)],
    "interior-pads": [(12, 22)],  # a turn cache: history, pads, the new turn's block
    "left-and-interior": [(0, 3), (20, 30), (33, 35)],
}


def _window_mask(B_layouts, device):
    """(B, WINDOW_S) long key mask, one row per layout (slots past the query are real: the future)."""
    key_mask = torch.ones(len(B_layouts), WINDOW_S, dtype=torch.long, device=device)
    for b, name in enumerate(B_layouts):
        for lo, hi in WINDOW_LAYOUTS[name]:
            key_mask[b, lo:hi] = 0
    return key_mask


def _row_alone(q, k, v, key_mask, slot_i, window):
    """Each row attended with its pads removed (a plain row of only its real tokens), (B, H, Dh)."""
    outs = []
    for b in range(q.shape[0]):
        keep = (key_mask[b, : slot_i + 1] != 0).nonzero().flatten()  # the row's real slots up to the query
        n = len(keep)
        kb, vb = k[b : b + 1, :, keep], v[b : b + 1, :, keep]  # (1, Hkv, n, Dh)
        ones = torch.ones(1, n, dtype=torch.long, device=q.device)
        slot = torch.tensor([n - 1], device=q.device)
        outs.append(decode_attention_ref(q[b : b + 1], kb, vb, ones, slot, n, window))
    return torch.cat(outs)


# real keys up to the query per layout: 41, 34, 31, 26; windows below, at and above them
@pytest.mark.parametrize("window", [1, 8, 26, 31, 41, 100])
def test_window_counts_real_tokens_as_the_row_alone(window):
    # a row with pads inside attends exactly the last `window` real keys, as the row alone would
    # (and as the trainer's attention_mask_4d says): pads do not push real keys out of the window.
    # Counted in slots, the pads inside a row pushed real keys out (max |diff| 1.03 at window 26).
    device = torch.device("cpu")
    layouts = list(WINDOW_LAYOUTS)
    B, H, HKV, Dh = len(layouts), 4, 2, 32
    q, k, v, _ = _inputs(B, H, HKV, Dh, WINDOW_S, WINDOW_SLOT, torch.float32, device)
    k.normal_(), v.normal_()  # no garbage left from _inputs' own pads
    key_mask = _window_mask(layouts, device)
    _fill_garbage(k, v, key_mask, WINDOW_SLOT)
    slot = torch.tensor([WINDOW_SLOT])
    alone = _row_alone(q, k, v, key_mask, WINDOW_SLOT, window)
    ref = decode_attention_ref(q, k, v, key_mask, slot, WINDOW_S, window)
    torch.testing.assert_close(ref, alone, rtol=0, atol=1e-6)
    torch.testing.assert_close(_sdpa(q, k, v, key_mask, slot, WINDOW_S, window), alone, rtol=0, atol=1e-5)
    for split in (16, 32, 64):  # four splits (one wholly in the future), two, one (written directly)
        got = _decode_attention_triton(q, k, v, key_mask, slot, WINDOW_S, window, Dh**-0.5, split=split, block_s=16)
        torch.testing.assert_close(got, alone, rtol=0, atol=1e-5, msg=f"split {split}")


def test_window_attends_what_the_trainers_mask_attends():
    # the reference's rule is attention_mask_4d's for random masks, slots and windows, a pad query too
    gen = torch.Generator().manual_seed(3)
    for trial in range(40):
        S = int(torch.randint(1, 40, (1,), generator=gen))
        slot_i = int(torch.randint(0, S, (1,), generator=gen))
        window = int(torch.randint(1, 12, (1,), generator=gen))
        key_mask = (torch.rand(5, S, generator=gen) < 0.6).long()
        slot = torch.tensor([slot_i])
        trainer = attention_mask_4d(key_mask, slot, S, window, 5)[:, 0, 0]  # (B, S)
        assert torch.equal(attended_slots(key_mask, slot, S, window), trainer), (trial, S, slot_i, window)
        start = window_start(key_mask, slot, S, window)  # (B,) the kernels' form of the same window
        j = torch.arange(S)
        by_start = ((j <= slot_i) & (key_mask != 0) & (j >= start[:, None])) | (j == slot_i)
        assert start.dtype == torch.int32 and torch.equal(by_start, trainer), (trial, S, slot_i, window)


@pytest.mark.parametrize("window", [3, 17, 100])
@pytest.mark.parametrize("launch", ["per-row", "per-group", "per-group-one-split"])
def test_window_counts_real_tokens_over_a_shared_prefix(window, launch):
    # rows of a group share their prefix's keys but not their masks: pads inside the prefix and the
    # own slots differ per row, so each row's window starts elsewhere (read per row by the prefix kernel)
    device = torch.device("cpu")
    B, H, HKV, Dh, S, kv_len, slot_i, Tp = 6, 4, 2, 32, 72, 70, 60, 30
    q, k, v, key_mask = _inputs(B, H, HKV, Dh, S, slot_i, torch.float32, device)
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    prefix, k_own, v_own = _split_prefix(k, v, key_mask, Tp, group, 2)
    gen = torch.Generator().manual_seed(5)
    key_mask = key_mask * (torch.rand(B, S, generator=gen) < 0.6).long()  # pads inside every row, per row
    key_mask[:, slot_i] = 1  # the query is a real token
    _fill_garbage(k, v, key_mask, slot_i)
    k_own[:], v_own[:] = k[:, :, Tp:], v[:, :, Tp:]
    slot = torch.tensor([slot_i])
    alone = _row_alone(q, k, v, key_mask, slot_i, window)
    ref = decode_attention_ref(q, k_own, v_own, key_mask, slot, kv_len, window, prefix=prefix)
    torch.testing.assert_close(ref, alone, rtol=0, atol=1e-6)
    rows = None if launch == "per-row" else prefix_rows(group, 2, 3)
    one = dict(block_s=16, split=48, prefix_split=32) if launch == "per-group-one-split" else dict(block_s=16)
    got = _decode_attention_triton(q, k_own, v_own, key_mask, slot, kv_len, window, Dh**-0.5, prefix, rows, **one)
    torch.testing.assert_close(got, alone, rtol=0, atol=1e-5)


def test_bad_inputs_are_named():
    q, k, v, key_mask = _inputs(2, 4, 2, 32, 20, 9, torch.float32, torch.device("cpu"))
    slot = torch.tensor([9])
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        decode_attention(q, k, v, key_mask, slot, 20, window=0, impl="triton")
    with pytest.raises(ValueError, match="key_mask \\(2, 12\\) must be \\(2, >= kv_len 20\\)"):
        decode_attention(q, k, v, key_mask[:, :12], slot, 20, impl="triton")
    with pytest.raises(ValueError, match="slot must be one integer index"):
        decode_attention(q, k, v, key_mask, torch.tensor([9, 10]), 20, impl="triton")
    with pytest.raises(ValueError, match="3 query heads are not a multiple of 2 kv heads"):
        decode_attention(q[:, :3], k, v, key_mask, slot, 20, impl="triton")
    with pytest.raises(ValueError, match="rows were given without a prefix"):
        decode_attention(q, k, v, key_mask, slot, 20, rows=prefix_rows(torch.zeros(2, dtype=torch.long), 1, 2))
    with pytest.raises(ValueError, match="must share one dtype"):
        decode_attention(q, k.double(), v.double(), key_mask, slot, 20, impl="triton")
    with pytest.raises(ValueError, match="split 24 is not a multiple of block_s 16"):
        _decode_attention_triton(q, k, v, key_mask, slot, 20, None, 0.5, split=24, block_s=16)


# ----------------------------------------------------------------------------------------------
# Through the model
# ----------------------------------------------------------------------------------------------

VARIANTS = {
    "llama": {},  # G = 2, Dh 16
    "qwen3-qknorm": dict(model_type="qwen3", head_dim=24),  # Dh 24: padded channels
    "mistral-window": dict(model_type="mistral", sliding_window=4),
    "phi3-mha": dict(model_type="phi3", num_key_value_heads=4, partial_rotary_factor=0.5),  # G = 1
}


@pytest.fixture
def count_kernel_calls(monkeypatch):
    """The keyword arguments of the model's calls of decode_attention (so a test knows the kernel
    path ran, and how)."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return decode_attention(*args, **kwargs)

    monkeypatch.setattr(transformer, "decode_attention", spy)
    return calls


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_model_decode_with_kernel_equals_sdpa_and_full_forward(variant, count_kernel_calls):
    model = tiny_model(seed=1, **VARIANTS[variant])
    B, Tp, steps = 3, 7, 5
    lengths = torch.tensor([7, 4, 2])
    prompt_mask = (torch.arange(Tp)[None] >= (Tp - lengths)[:, None]).long()  # (B, Tp) left padded
    ids = torch.randint(3, 128, (B, Tp + steps)).masked_fill(
        torch.cat([prompt_mask, torch.ones(B, steps, dtype=torch.long)], 1) == 0, 0
    )
    mask = torch.cat([prompt_mask, torch.ones(B, steps, dtype=torch.long)], dim=1)  # (B, T)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)

    def decode(impl):
        model.decode_attention_impl = impl
        cache = KVCache(model.args, B, Tp + steps + 3, dtype=torch.float32, device="cpu")
        cache.k.normal_(0, GARBAGE)  # unwritten slots hold garbage
        cache.v.normal_(0, GARBAGE)
        kw = dict(kv_cache=cache, attention_mask=mask[:, :Tp], position_ids=pos[:, :Tp])
        model(ids[:, :Tp], cache_position=torch.arange(Tp), **kw)
        outs = []
        for t in range(Tp, Tp + steps):
            kv_len = t + 3 if t + 3 <= Tp + steps else t + 1  # some steps look past their slot
            key_mask = torch.cat([mask, torch.ones(B, 3, dtype=torch.long)], 1)[:, :kv_len]
            step = model(
                ids[:, t : t + 1],
                attention_mask=key_mask,
                position_ids=pos[:, t : t + 1],
                kv_cache=cache,
                cache_position=torch.tensor([t]),
            )
            outs.append(step[:, 0])
        return torch.stack(outs, 1)  # (B, steps, V)

    with torch.no_grad():
        full = model(ids, attention_mask=mask)[:, Tp:]  # (B, steps, V)
        sdpa = decode("ref")
        assert not count_kernel_calls
        kernel = decode("triton")
    err = (kernel - sdpa).abs().max().item()
    assert err < 1e-5, f"{variant}: kernel vs SDPA: max |diff| {err:.2e}"
    err = (kernel - full).abs().max().item()
    assert err < 1e-5, f"{variant}: kernel vs full forward: max |diff| {err:.2e}"
    assert len(count_kernel_calls) == steps * model.args.n_layers
    assert [kw["window"] for kw in count_kernel_calls[: model.args.n_layers]] == list(model.args.layer_windows)


def test_model_decode_with_kernel_over_pads_inside_rows_equals_full_forward(count_kernel_calls):
    # a sliding-window model decoding rows with pads inside (a turn cache's layout: history, pads,
    # the new turn): the kernel attends as the SDPA path and a full forward of the same rows do
    model = tiny_model(seed=2, model_type="mistral", sliding_window=4)
    real = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0, 1, 0, 1]])
    B, Tp, steps = 3, real.shape[1], 4
    mask = torch.cat([real, torch.ones(B, steps, dtype=torch.long)], 1)  # (B, T)
    ids = torch.randint(3, 128, (B, Tp + steps), generator=torch.Generator().manual_seed(0)).masked_fill(mask == 0, 0)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T) positions count each row's own tokens

    def decode(impl):
        model.decode_attention_impl = impl
        cache = KVCache(model.args, B, Tp + steps, dtype=torch.float32, device="cpu")
        cache.k.normal_(0, GARBAGE)
        cache.v.normal_(0, GARBAGE)
        kw = dict(kv_cache=cache, cache_position=torch.arange(Tp))
        model(ids[:, :Tp], attention_mask=real, position_ids=pos[:, :Tp], **kw)
        outs = [
            model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=pos[:, t : t + 1], kv_cache=cache,
                  cache_position=torch.tensor([t]))[:, 0]
            for t in range(Tp, Tp + steps)
        ]  # fmt: skip
        return torch.stack(outs, 1)  # (B, steps, V)

    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos)[:, Tp:]  # (B, steps, V)
        sdpa = decode("ref")
        kernel = decode("triton")
    assert len(count_kernel_calls) == steps * model.args.n_layers
    torch.testing.assert_close(sdpa, full, rtol=0, atol=1e-5)
    torch.testing.assert_close(kernel, full, rtol=0, atol=1e-5)


class CharTokenizer:
    """Token i <-> one printable character; 0 is padding, 1 and 2 are special (bos, eos)."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(33 + i % 90) for i in ids if not (skip_special_tokens and i in (0, 1, 2)))


@pytest.mark.parametrize("per_group", [True, False], ids=["prefix-per-group", "prefix-per-row"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampler_with_kernel_draws_the_same_tokens(temperature, per_group, count_kernel_calls):
    model = tiny_model(seed=4)
    prompts = [[1, 5, 9, 13, 17, 21, 25], [1, 40, 41], [1, 77, 78, 79, 80]]
    params = SamplingParams(n=2, temperature=temperature, max_new_tokens=8, ignore_stop=True)
    plain = KVCacheSampler(model, CharTokenizer()).generate(prompts, params, key=(1, 2, 3))
    assert not count_kernel_calls
    model.decode_attention_impl = "triton"
    sampler = KVCacheSampler(model, CharTokenizer(), prefix_per_group=per_group)
    kernel = sampler.generate(prompts, params, key=(1, 2, 3))
    assert len(count_kernel_calls) == 7 * model.args.n_layers  # every decode step, every layer
    assert all((kw["rows"] is not None) == per_group for kw in count_kernel_calls)  # the prefix per group or row
    assert torch.equal(kernel.completion_ids, plain.completion_ids)
    torch.testing.assert_close(kernel.sampler_logp, plain.sampler_logp, rtol=0, atol=1e-5)


FAMILY_CASES = [  # (H, HKV, Dh, Tp, per_group): the families' head sizes and GQA ratios, tiny head counts
    (9, 3, 64, None, False),  # SmolLM2: G = 3
    (4, 1, 96, 1, True),  # Phi-3-mini's Dh 96 (not a power of two); a one-slot shared prefix, per group
    (8, 2, 80, 0, False),  # Dh 80; an empty shared prefix
    (4, 4, 256, 1, False),  # Dh 256, MHA; a one-slot prefix read per row
    (8, 2, 40, 0, True),  # Dh 40; an empty prefix with rows (no cascade: nothing to share)
]


@pytest.mark.parametrize("case", FAMILY_CASES, ids=lambda c: f"H{c[0]}-Hkv{c[1]}-Dh{c[2]}-Tp{c[3]}-rows{c[4]}")
def test_family_head_sizes_and_short_prefixes(case):
    # fp64 reference within 1e-5 (fp32); last split 1 slot long (kv_len 49 = 3 x 16 + 1), and a
    # row whose every key but the first and its own slot is padding
    H, HKV, Dh, Tp, per_group = case
    device = torch.device("cpu")
    B, S, kv_len = 3, 60, 49
    q, k, v, key_mask = _inputs(B, H, HKV, Dh, S, kv_len - 1, torch.float32, device)
    key_mask[2] = 0
    key_mask[2, 0] = 1
    slot = torch.tensor([kv_len - 1])
    prefix = rows = None
    if Tp is not None:
        group = torch.tensor([0, 0, 1])
        prefix, k, v = _split_prefix(k, v, key_mask, Tp, group, 2)
        rows = prefix_rows(group, 2, 2) if per_group else None
    got = _decode_attention_triton(q, k, v, key_mask, slot, kv_len, None, Dh**-0.5, prefix, rows, split=16, block_s=16)
    as64 = None if prefix is None else tuple(t.double() if t.is_floating_point() else t for t in prefix)
    ref = decode_attention_ref(q.double(), k.double(), v.double(), key_mask, slot, kv_len, prefix=as64)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5)
