"""One draw per row from logits: tempered softmax + two-stage exponential race + log-prob, fused.

    sample_race(logits (N, V), temperature, row_keys (N,) int64, position (1,) int64, *, impl="auto")
        -> tokens (N,) int64, logp (N,) fp32

Semantics (minigrpo/sampling/params.py explains them; this file holds the code): x = fp32(logits) / T,
logp = log_softmax(x) over the full vocabulary. Drawing is the exponential race argmax_v p_v / E_v,
E_v = -log(u_v), run in two stages: the blocks of RACE_BLOCK = 256 entries race with their masses
P_b, then the tokens of the winning block race with their own p_v. u is counter-based noise,

    u = (h + 1/2) / 2^32,  h = mix32(pos ^ mix32(counter ^ SALT_TOKEN)),
    pos = mix32(mix32(t ^ SALT_POS) ^ row_key),

with counter = the token id, or the block index | BLOCK_BIT in the block stage, and mix32 the
lowbias32 mixer. Temperature 0 is greedy: the first argmax, with logp at temperature 1.

Triton path: two launches, no host synchronisation (CUDA-graph capturable: the position t is read
from its device tensor inside the kernels), and the logits are read once, in their own dtype
(plus the winning block's 256 entries).
  1. grid (N, C), C = cdiv(V, chunk): each program loads one chunk of a row as a (chunk / 256, 256)
     tile and writes a record: m = max x, s = sum exp(x - m), and the chunk's race winner, i.e. the
     block with the highest score_b = log(sum_b exp(x - m)) - log(E_b) = log(P_b) - log(E_b) + const
     (the chunk's common m and lse do not move its argmax: the winner is that of P_b / E_b), with
     its score relative to the chunk's max - or, greedy, the chunk's first argmax.
  2. grid (N,): merges the C records (lse = M + log sum s_c exp(m_c - M), winning block = the
     highest score_c + (m_c - M), the first on ties), reloads the winning block's 256 logits and
     races them with score_v = (x_v - M) - log(E_v); logp = (x_token - M) - log S, as torch's
     log_softmax rounds it.
  The maxima m and M are kept in raw logits and every x - m is formed as (z - m) / T: exactly 0 at
  the max for any temperature (on the GPU z / T - m would fuse into one FMA and leave a residue).
  So the scores of the likely blocks and tokens stay O(1) next to their noise even at T = 1e-30,
  where x = z / T ~ 1e31 added to the noise would round it away (the first of tied maxima won).
The noise (u, E, the scores) is fp64: in fp32, u would round to 1 for h near 2^32 (E = 0).
Against the reference only rounding differs, so tokens can differ only on near-ties of the race.

Integer hashing: the torch reference runs in int64 on values below 2^32 with 16-bit partial
products (no overflow on any device); the kernels use uint32, whose multiply wraps mod 2^32.
Both give the same bits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._triton import cdiv, jit, next_power_of_2, resolve_impl, tl

MASK32 = 0xFFFFFFFF
RACE_BLOCK = 256  # vocabulary entries per block of the two-stage race
SALT_POS = 0x2545F491  # distinguishes the position input from the token input
SALT_TOKEN = 0x6C8E9CF5
BLOCK_BIT = 1 << 31  # block counters have bit 31 set; token ids stay below it
# vocabulary entries per program of the first launch; on CUDA, 512 rows of a 151,936-entry
# vocabulary make 512 x 38 programs of 8 KiB (bf16) each
_CHUNK = {"cuda": 4096, "cpu": 1024}
# temperatures whose inverse is a normal fp32 number (the kernels multiply by it): outside, 1 / T is
# inf, or 0 (then a masked logit gives -inf * 0 = NaN and a lane past V can win), and T itself
# above fp32's max is inf in the reference's logits / T (-inf / inf = NaN: masked tokens drawn)
_TEMPERATURE_RANGE = (1 / torch.finfo(torch.float32).max, 1 / torch.finfo(torch.float32).tiny)

# ----------------------------------------------------------------------------------------------
# 1. Reference (the spec; also the CPU fallback)
# ----------------------------------------------------------------------------------------------


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2^32 for int64 x in [0, 2^32): 16-bit partial products stay below 2^49 (no overflow)."""
    lo = (x & 0xFFFF) * c  # < 2^48
    hi = ((x >> 16) * c) & 0xFFFF  # the part of (x_hi * c) that survives the shift by 16
    return (lo + (hi << 16)) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding 32-bit words: a bijection of [0, 2^32) with full avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def race_uniforms(row_keys: torch.Tensor, position: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """u in (0, 1) fp64 of rows (N,) for counters `index` (K,) or (N, K) int64 at position t -> (N, K)."""
    pos = mix32(mix32((position & MASK32) ^ SALT_POS) ^ (row_keys & MASK32))  # (N,) keys' low 32 bits, as the kernels
    x = mix32(pos[:, None] ^ mix32(index ^ SALT_TOKEN))  # (N, K)
    return (x.to(torch.float64) + 0.5) * 2.0**-32


def race_ref(probs: torch.Tensor, row_keys: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """argmax_v p_v / E_v in two stages (blocks, then the tokens of the winning block): (N, V) -> (N,)."""
    N, V = probs.shape
    assert row_keys.shape == (N,), f"{row_keys.shape[0]} row keys for {N} rows"
    K = min(RACE_BLOCK, V)  # a small vocabulary is one block (the same draws as padding it)
    nb = math.ceil(V / K)
    blocks = F.pad(probs, (0, nb * K - V)).view(N, nb, K)  # (N, nb, K), padding has p = 0
    block_ids = torch.arange(nb, device=probs.device) | BLOCK_BIT  # (nb,)
    E_blocks = -race_uniforms(row_keys, position, block_ids).log()  # (N, nb) fp64
    b = (blocks.sum(-1).double() / E_blocks).argmax(-1)  # (N,)
    inner = blocks.gather(1, b[:, None, None].expand(N, 1, K)).squeeze(1)  # (N, K)
    token_ids = b[:, None] * K + torch.arange(K, device=probs.device)  # (N, K)
    j = (inner.double() / -race_uniforms(row_keys, position, token_ids).log()).argmax(-1)  # (N,)
    return b * K + j


def sample_race_ref(
    logits: torch.Tensor, temperature: float, row_keys: torch.Tensor, position: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec: (tokens (N,) int64, logp (N,) fp32), materialising (N, V) fp32 tensors."""
    if temperature == 0:  # greedy: the first argmax, log-prob at temperature 1
        tokens = logits.argmax(-1)  # (N,)
        logp = logits.float().log_softmax(-1)  # (N, V)
    else:
        logp = (logits.float() / temperature).log_softmax(-1)  # (N, V)
        tokens = race_ref(logp.exp(), row_keys, position)  # (N,)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# 2. Triton kernels (mix32 is written out inline: a kernel may not call another jitted function)
# ----------------------------------------------------------------------------------------------


@jit
def _race_chunk_kernel(
    logits_ptr,  # (N, V) any float dtype, unit stride along V
    keys_ptr,  # (N,) int64 row keys (32-bit words)
    pos_ptr,  # (1,) int64 position t
    m_ptr,  # (N, C) fp32 out: max of the raw logits z over the chunk (x = z / T)
    s_ptr,  # (N, C) fp32 out: sum exp((z - m) / T) = sum exp(x - max x) over the chunk
    score_ptr,  # (N, C) fp64 out: the best block score, relative to the chunk's max (sampling only)
    idx_ptr,  # (N, C) int32 out: the winning block (sampling) or the first argmax token (greedy)
    V,
    C,
    stride_row,
    inv_t,  # 1 / temperature (1 for greedy)
    GREEDY: tl.constexpr,
    NB: tl.constexpr,  # race blocks per chunk
    BLOCK: tl.constexpr,  # race block size (256)
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    blocks = chunk * NB + tl.arange(0, NB)  # (NB,) global block ids
    cols = blocks[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # (NB, BLOCK) token ids
    ok = cols < V
    ptrs = logits_ptr + row.to(tl.int64) * stride_row + cols
    z = tl.load(ptrs, mask=ok, other=float("-inf")).to(tl.float32)  # (NB, BLOCK) raw logits
    m = tl.max(tl.max(z, axis=1), axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # an all -inf chunk: e = 0 rather than NaN
    # (z - m) / T rather than z / T - m / T: z * (1/T) - m would be contracted into one FMA, which
    # leaves the rounding residue of z / T at the max instead of 0 (the log-prob of a near-certain
    # token then is off by it, ~1e-6 at |x| ~ 30)
    p_blocks = tl.sum(tl.exp((z - m_safe) * inv_t), axis=1)  # (NB,) block masses P_b / exp(max x); 0 past V
    rec = row * C + chunk
    tl.store(m_ptr + rec, m)
    tl.store(s_ptr + rec, tl.sum(p_blocks, axis=0))
    if GREEDY:
        first = tl.min(tl.min(tl.where(z == m, cols, 2147483647), axis=1), axis=0)
        tl.store(idx_ptr + rec, first)
    else:
        # pos = mix32(mix32(t ^ SALT_POS) ^ row_key)
        h = tl.load(pos_ptr).to(tl.uint32) ^ 0x2545F491
        h = h ^ (h >> 16)
        h = h * 0x7FEB352D
        h = h ^ (h >> 15)
        h = h * 0x846CA68B
        h = h ^ (h >> 16)
        h = h ^ tl.load(keys_ptr + row).to(tl.uint32)
        h = h ^ (h >> 16)
        h = h * 0x7FEB352D
        h = h ^ (h >> 15)
        h = h * 0x846CA68B
        pos = h ^ (h >> 16)
        # the blocks' noise: mix32(pos ^ mix32(counter ^ SALT_TOKEN)), counter = block | BLOCK_BIT
        g = (blocks.to(tl.uint32) | 0x80000000) ^ 0x6C8E9CF5  # (NB,)
        g = g ^ (g >> 16)
        g = g * 0x7FEB352D
        g = g ^ (g >> 15)
        g = g * 0x846CA68B
        g = g ^ (g >> 16)
        g = g ^ pos
        g = g ^ (g >> 16)
        g = g * 0x7FEB352D
        g = g ^ (g >> 15)
        g = g * 0x846CA68B
        g = g ^ (g >> 16)
        u = (g.to(tl.float64) + 0.5) * 2.3283064365386963e-10  # (h + 1/2) / 2^32, in (0, 1)
        score = tl.log(p_blocks.to(tl.float64)) - tl.log(-tl.log(u))  # (NB,) log(P_b) - x_max - log(E_b)
        best = tl.argmax(score, axis=0)  # the first on ties; an empty block scores -inf
        tl.store(score_ptr + rec, tl.max(score, axis=0))
        tl.store(idx_ptr + rec, chunk * NB + best)


@jit
def _race_combine_kernel(
    logits_ptr,  # (N, V) as above
    keys_ptr,  # (N,) int64
    pos_ptr,  # (1,) int64
    m_ptr,  # (N, C) the records of the first launch
    s_ptr,
    score_ptr,
    idx_ptr,
    tokens_ptr,  # (N,) int64 out
    logp_ptr,  # (N,) fp32 out
    V,
    C,
    stride_row,
    inv_t,
    GREEDY: tl.constexpr,
    BLOCK_C: tl.constexpr,  # next power of two >= C
    BLOCK: tl.constexpr,  # race block size (256)
):
    row = tl.program_id(0)
    chunks = tl.arange(0, BLOCK_C)
    ok_c = chunks < C
    m = tl.load(m_ptr + row * C + chunks, mask=ok_c, other=float("-inf"))  # (BLOCK_C,)
    s = tl.load(s_ptr + row * C + chunks, mask=ok_c, other=0.0)
    m_all = tl.max(m, axis=0)  # raw logits
    log_s = tl.log(tl.sum(s * tl.exp((m - m_all) * inv_t), axis=0))  # lse = m_all / T + log_s
    if GREEDY:
        token = tl.load(idx_ptr + row * C + tl.argmax(m, axis=0))  # first chunk holding the max
        logp = -log_s  # x_token = m_all
    else:
        score = tl.load(score_ptr + row * C + chunks, mask=ok_c, other=float("-inf"))  # (BLOCK_C,) fp64
        # each chunk's score moved from its own max to the row's: (m_c - M) / T, 0 for the max's chunks
        shift = tl.where(m > float("-inf"), (m.to(tl.float64) - m_all.to(tl.float64)) * inv_t, float("-inf"))
        block = tl.load(idx_ptr + row * C + tl.argmax(score + shift, axis=0))  # the race's winning block
        lanes = tl.arange(0, BLOCK)
        cols = block * BLOCK + lanes  # (BLOCK,) token ids
        ok = cols < V
        ptrs = logits_ptr + row.to(tl.int64) * stride_row + cols
        z = tl.load(ptrs, mask=ok, other=float("-inf")).to(tl.float32)  # (BLOCK,) raw logits
        m_ref = tl.where(m_all == float("-inf"), 0.0, m_all).to(tl.float64)  # an all -inf row: no NaN
        x = (z.to(tl.float64) - m_ref) * inv_t  # (BLOCK,) fp64 x_v - M: 0 at the max, -inf past V
        # pos = mix32(mix32(t ^ SALT_POS) ^ row_key)
        h = tl.load(pos_ptr).to(tl.uint32) ^ 0x2545F491
        h = h ^ (h >> 16)
        h = h * 0x7FEB352D
        h = h ^ (h >> 15)
        h = h * 0x846CA68B
        h = h ^ (h >> 16)
        h = h ^ tl.load(keys_ptr + row).to(tl.uint32)
        h = h ^ (h >> 16)
        h = h * 0x7FEB352D
        h = h ^ (h >> 15)
        h = h * 0x846CA68B
        pos = h ^ (h >> 16)
        # the tokens' noise: mix32(pos ^ mix32(token ^ SALT_TOKEN))
        g = cols.to(tl.uint32) ^ 0x6C8E9CF5  # (BLOCK,)
        g = g ^ (g >> 16)
        g = g * 0x7FEB352D
        g = g ^ (g >> 15)
        g = g * 0x846CA68B
        g = g ^ (g >> 16)
        g = g ^ pos
        g = g ^ (g >> 16)
        g = g * 0x7FEB352D
        g = g ^ (g >> 15)
        g = g * 0x846CA68B
        g = g ^ (g >> 16)
        u = (g.to(tl.float64) + 0.5) * 2.3283064365386963e-10
        score_v = x - tl.log(-tl.log(u))  # (BLOCK,), -inf past V
        j = tl.argmax(score_v, axis=0)
        token = block * BLOCK + j
        z_token = tl.max(tl.where(lanes == j, z, float("-inf")), axis=0)
        logp = (z_token - m_all) * inv_t - log_s
    tl.store(tokens_ptr + row, token.to(tl.int64))
    tl.store(logp_ptr + row, logp)


# ----------------------------------------------------------------------------------------------
# 3. Public function
# ----------------------------------------------------------------------------------------------


def _check_inputs(logits, temperature, row_keys, position, chunk) -> None:
    """Refuse what no path can draw from, with the bad value named (an empty vocabulary would leave
    the kernels' records unwritten: a crash, not a token)."""
    if logits.dim() != 2:
        raise ValueError(f"sample_race: logits must be (N, V), got {tuple(logits.shape)}")
    N, V = logits.shape
    if V == 0:
        raise ValueError(f"sample_race: logits {tuple(logits.shape)} have an empty vocabulary")
    if row_keys.shape != (N,):
        raise ValueError(f"sample_race: {tuple(row_keys.shape)} row keys for {N} rows")
    if position.numel() != 1:
        raise ValueError(f"sample_race: position must be (1,), got {tuple(position.shape)}")
    if not temperature >= 0:
        raise ValueError(f"sample_race: temperature must be >= 0, got {temperature}")
    if temperature > 0 and not _TEMPERATURE_RANGE[0] <= temperature <= _TEMPERATURE_RANGE[1]:
        low, high = _TEMPERATURE_RANGE
        raise ValueError(f"sample_race: temperature must be 0 or in [{low:.3g}, {high:.3g}], got {temperature}")
    if chunk is not None and (chunk < RACE_BLOCK or chunk & (chunk - 1)):
        raise ValueError(f"sample_race: chunk must be a power of two >= {RACE_BLOCK}, got {chunk}")


def sample_race(
    logits: torch.Tensor,
    temperature: float,
    row_keys: torch.Tensor,
    position: torch.Tensor,
    *,
    impl: str = "auto",
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row by the two-stage exponential race; see the module docstring.

    Args:
        logits: (N, V) any float dtype (bf16 on the GPU: read as is), unit stride along V.
        temperature: > 0, or 0 for greedy (the first argmax, logp at temperature 1).
        row_keys: (N,) int64 32-bit row keys (RaceNoise.row_keys).
        position: (1,) int64 device tensor t, the index of the token being drawn.
        impl: "auto" (Triton on CUDA, the reference elsewhere), "triton" or "ref".
        chunk: vocabulary entries per program of the first launch (a power of two >= 256).
    Returns:
        tokens (N,) int64, logp (N,) fp32 = log_softmax(logits / T)[token].
    """
    _check_inputs(logits, temperature, row_keys, position, chunk)
    temperature = float(temperature)  # a numpy.float32 is no Triton argument, a Fraction divides no tensor
    N, V = logits.shape
    if resolve_impl(impl, logits, row_keys, position) == "ref" or N == 0:
        return sample_race_ref(logits, temperature, row_keys, position)
    chunk = chunk or _CHUNK["cuda" if logits.is_cuda else "cpu"]
    chunk = min(chunk, max(RACE_BLOCK, next_power_of_2(V)))  # no chunk wider than the vocabulary needs
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    keys = row_keys.to(torch.int64).contiguous()
    pos = position.reshape(1).to(torch.int64)
    greedy = temperature == 0
    inv_t = 1.0 if greedy else 1.0 / temperature
    C = cdiv(V, chunk)
    dev = logits.device
    records = (  # (N, C) each: m, s, best score, block / token index
        torch.empty(N, C, dtype=torch.float32, device=dev),
        torch.empty(N, C, dtype=torch.float32, device=dev),
        torch.empty(N, C, dtype=torch.float64, device=dev),
        torch.empty(N, C, dtype=torch.int32, device=dev),
    )
    args = (V, C, logits.stride(0), inv_t)
    nb = chunk // RACE_BLOCK
    warps = 8 if chunk >= 4096 else 4
    _race_chunk_kernel[(N, C)](
        logits, keys, pos, *records, *args, GREEDY=greedy, NB=nb, BLOCK=RACE_BLOCK, num_warps=warps
    )
    tokens = torch.empty(N, dtype=torch.int64, device=dev)
    logp = torch.empty(N, dtype=torch.float32, device=dev)
    block_c = next_power_of_2(C)
    _race_combine_kernel[(N,)](
        logits, keys, pos, *records, tokens, logp, *args, GREEDY=greedy, BLOCK_C=block_c, BLOCK=RACE_BLOCK, num_warps=2
    )
    return tokens, logp
