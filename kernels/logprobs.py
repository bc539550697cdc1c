"""Fused LM head + log-softmax gather: per-token log-probs (and entropy) without (N, V) logits.

    fused_linear_logprobs(hidden (N, D), weight (V, D), targets (N,), *, temperature=1.0,
                          return_entropy=False, ignore_index=-100, impl="auto")
        -> logp (N,) fp32, or (logp, entropy) with return_entropy

Math, per row n:  z = h_n @ W.T (rounded to the matmul dtype, as torch does), a = fp32(z) / T,
lse = logsumexp(a), logp = a[target] - lse, entropy = lse - sum_v softmax(a)_v a_v. Rows whose
target is `ignore_index` get logp = 0 and entropy = 0 and pass no gradient. Targets must otherwise
lie in [0, V). Both outputs are differentiable w.r.t. hidden and weight; with upstream gradients g
(of logp) and ge (of entropy), the gradient w.r.t. the logits is
    dz_v = (g (onehot_v - p_v) - ge p_v (a_v - lse + entropy)) / T,   (p_v a_v and its term: 0 where p_v = 0)
with 1 - p_target formed as -expm1(logp_target) (a near-certain token keeps its tiny gradient).

Chunking: the logits are only ever held as one tile of (rows, cols) tokens x vocab columns, in the
matmul dtype (about 64 MiB in bf16 on CUDA). The forward streams the tiles through an online
logsumexp: per row, a running max m of the raw logits, s = sum exp(d) and e = sum exp(d) d with
d = (z - m) / T = a - max a, merged across vocab chunks; it saves m, log s and entropy (N,) fp32
only. The max is kept in raw logits so that d is exactly 0 at the max for any T (z / T - m would be
contracted into one FMA on the GPU and leave the rounding residue of z / T there, ~1e-6 at |a| ~ 30).
The backward recomputes each tile (8NDV FLOPs in all instead of 6NDV: the price of O(tile) memory,
since an upstream gradient is only known after the forward; kernels/policy_head.py is the 6NDV
path for losses elementwise in logp, GRPO's token-level loss among them), turns it into dz in
place, and then
    dW[vc] (+)= dz.T @ h_b     cuBLAS, accumulated in W.dtype once per token block of `rows` rows
    dH_b    += dz @ W[vc]       accumulated in fp32 over the vocab chunks (a (rows, D) buffer)
so dW is rounded ceil(N / rows) times (once for N <= 4096 on CUDA) and dH once. The choice of a
W.dtype dW accumulator: an fp32 one would add V·D·4 bytes (0.87 GiB for Qwen2.5-1.5B's head) to
the memory budget; with bf16 and N = 16384 (4 roundings) the largest relative error over logp, dH
and dW was 2.1e-3 on an H100, against 1.7e-3 for plain torch in bf16 (fp64 reference).
Peak extra memory of fwd+bwd: dW + dH + one tile + a (rows, D) fp32 buffer (0.57 GiB for N=16384,
D=1536, V=151936 in bf16); time there is 52.8 ms on an H100 (benchmarks/README.md).

impl="triton": the tile math (online statistics, dz) runs in two Triton kernels between cuBLAS
matmuls. impl="ref": the same chunked loop with the tile math in torch (fp32) - the CPU path. The
unchunked spec `linear_logprobs_ref` (materialises (N, V) fp32) is for tests only.
"""

from __future__ import annotations

import functools

import torch

from ._triton import cdiv, jit, resolve_impl, tl

_NEG = float("-inf")  # running max before any column was seen: below every logit, however far down
_SHIFT_MIN = -1.0e30  # (m_old - m_new) / T is clamped here: finite, so 0 * shift stays 0, never NaN
_MAX_TEMPERATURE = 1e37  # as the sampler's: 1 / T must be a normal fp32 number, the kernels scale by it
_MIN_TEMPERATURE = 1e-30  # as the sampler's: below it z / T overflows fp32 (and 1 / T itself below ~2.9e-39: NaN)
_TOKEN_BLOCK = 4096  # rows of a logits tile: dW is rounded once per such block
_TILE_ELEMS = {"cuda": 32 * 2**20, "cpu": 4 * 2**20}  # elements of one logits tile

# ----------------------------------------------------------------------------------------------
# 1. Reference (the spec) and the tile math of the chunked torch path
# ----------------------------------------------------------------------------------------------


def linear_logprobs_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int | None = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec, unchunked: (logp, entropy), each (N,) fp32 (fp64 for fp64 inputs).

    Materialises (N, V) fp32 logits: for tests only.
    """
    logits = _acc(hidden @ weight.T) / temperature  # (N, V) fp32
    logp_all = torch.log_softmax(logits, dim=-1)
    valid = counted(targets, ignore_index)
    logp = logp_all.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    p_all = logp_all.exp()  # (N, V); p log p -> 0 as p -> 0: a -inf logit adds 0 (and no NaN gradient)
    entropy = -(p_all * torch.where(p_all > 0, logp_all, 0.0)).sum(-1)
    return torch.where(valid, logp, 0.0), torch.where(valid, entropy, 0.0)


def counted(targets: torch.Tensor, ignore_index: int | None) -> torch.Tensor:
    """(...) bool: the targets that are not ignore_index (all of them when it is None)."""
    return targets != ignore_index if ignore_index is not None else torch.ones_like(targets, dtype=torch.bool)


def _acc(x: torch.Tensor) -> torch.Tensor:
    """x in its accumulation dtype: fp32, or fp64 for fp64 (so that fp64 runs are references)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _tile_stats_ref(z, tgt, v0, inv_t, m, s, e, zt) -> None:
    """Merge tile z (r, c) = logits of columns [v0, v0 + c) into the running row stats (in place).

    m and zt are raw logits (the row's max, the target's), not divided by T: a - max(a) is formed
    as (z - m) / T, exactly 0 at the max (see _finish_rows)."""
    zf = _acc(z)  # (r, c) fp32
    m_new = torch.maximum(m, zf.amax(1))
    m_sub = torch.where(m_new == _NEG, 0.0, m_new)  # (r,) no finite logit yet (a chunk of -inf): 0, no NaN
    d = (zf - m_sub[:, None]) * inv_t  # (r, c) fp32: a - max a
    d.clamp_(min=_SHIFT_MIN)  # p = 0 all the same, and p d = 0 (the limit of p log p), never 0 * -inf
    p = torch.exp(d)
    shift = _shift(m, m_sub, inv_t)  # (r,) old max - new max, in units of a
    alpha = torch.exp(shift)
    if e is not None:
        e.copy_(alpha * (e + s * shift) + (p * d).sum(1))
    s.copy_(alpha * s + p.sum(1))
    m.copy_(m_new)
    local = tgt - v0
    hit = (local >= 0) & (local < z.shape[1])
    zt[hit] = zf[hit, local[hit]]


def _shift(m_old: torch.Tensor, m_new: torch.Tensor, inv_t: float) -> torch.Tensor:
    """(m_old - m_new) / T, kept finite: a row's first max is _NEG = -inf, and 0 * -inf is NaN;
    exp(_SHIFT_MIN) is 0 all the same (1 / T > 0: head_path refuses the rest). m_new: -inf read as 0."""
    return ((m_old - m_new) * inv_t).clamp(min=_SHIFT_MIN)


def _tile_grad_ref(z, tgt, v0, inv_t, m, log_s, ent, g, ge) -> None:
    """Overwrite logits tile z (r, c) with dz (see the module docstring); g, ge are 0 on ignored rows.

    m, log_s (r,): the row's max raw logit and log sum exp(a - max a); log p = (z - m) / T - log_s
    (see _finish_rows). At most two fp32 tiles live at once (log p, then p - onehot beside it).
    """
    logp = _acc(z) - m[:, None]  # (r, c) fp32: z - m
    logp.mul_(inv_t).sub_(log_s[:, None])  # log p
    local = tgt - v0
    rows = torch.nonzero((local >= 0) & (local < z.shape[1])).squeeze(1)
    cols = local[rows]
    at_target = torch.expm1(logp[rows, cols])  # (k,) p - 1 at the target: exact for p_target near 1
    dz = logp.exp()  # (r, c) p
    if ge is not None:  # ge p (log p + entropy), in logp's memory; p log p -> 0 as p -> 0 (a -inf logit)
        logp.clamp_(min=_SHIFT_MIN).add_(ent[:, None]).mul_(dz).mul_(ge[:, None])
    dz[rows, cols] = at_target  # p - onehot(target)
    dz.mul_(-g[:, None])
    if ge is not None:
        dz.sub_(logp)
    z.copy_(dz.mul_(inv_t))


# ----------------------------------------------------------------------------------------------
# 2. Triton kernels (the tile math; the matmuls around them are cuBLAS)
# ----------------------------------------------------------------------------------------------


@jit
def _logprobs_stats_kernel(
    z_ptr,  # (r, c) logits tile, row stride stride_z_row
    tgt_ptr,  # (r,) int64 targets of the tile's rows
    m_ptr,  # (r,) fp32 running max of the raw logits z
    s_ptr,  # (r,) fp32 running sum exp(d), d = (z - m) / T = a - max a
    e_ptr,  # (r,) fp32 running sum exp(d) d (HAS_ENTROPY)
    zt_ptr,  # (r,) fp32 target's raw logit z[target], written by the tile that holds it
    n_cols,
    v0,
    stride_z_row,
    inv_t,
    HAS_ENTROPY: tl.constexpr,
    NUM_BLOCKS: tl.constexpr,  # cdiv(widest tile, BLOCK_V): a compile-time trip count
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    z_row = z_ptr + row.to(tl.int64) * stride_z_row
    m = tl.full([], float("-inf"), tl.float32)  # = _NEG: no column seen yet
    s = tl.zeros([], tl.float32)
    e = tl.zeros([], tl.float32)
    for blk in range(NUM_BLOCKS):
        cols = blk * BLOCK_V + tl.arange(0, BLOCK_V)
        ok = cols < n_cols
        z = tl.load(z_row + cols, mask=ok, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # no finite logit yet: 0 (-inf - -inf is NaN)
        # (z - m) / T, not z / T - m: the compiler contracts the latter into one FMA, whose a - m at
        # the max is the rounding residue of z / T (~1e-6 at |a| ~ 30) instead of 0
        d = (z - m_sub) * inv_t
        p = tl.exp(d)  # 0 on masked columns and -inf logits
        shift = tl.maximum((m - m_sub) * inv_t, -1.0e30)  # finite: see _shift (1 / T > 0: head_path)
        alpha = tl.exp(shift)
        if HAS_ENTROPY:  # p d -> 0 as p -> 0: d = -inf (a -inf logit, or (z - m) / T overflowing) adds 0
            e = alpha * (e + s * shift) + tl.sum(tl.where(p > 0.0, p * d, 0.0), axis=0)
        s = alpha * s + tl.sum(p, axis=0)
        m = m_new
    # merge into the statistics of the earlier vocab chunks
    m_old = tl.load(m_ptr + row)
    s_old = tl.load(s_ptr + row)
    m_all = tl.maximum(m_old, m)
    m_all_sub = tl.where(m_all == float("-inf"), 0.0, m_all)  # both -inf (no finite logit yet): 0
    shift_old = tl.maximum((m_old - m_all_sub) * inv_t, -1.0e30)  # m_old = -inf at first: -1e30
    shift_new = tl.maximum((m - m_all_sub) * inv_t, -1.0e30)
    w_old = tl.exp(shift_old)
    w_new = tl.exp(shift_new)
    tl.store(s_ptr + row, w_old * s_old + w_new * s)
    tl.store(m_ptr + row, m_all)
    if HAS_ENTROPY:
        e_old = tl.load(e_ptr + row)
        tl.store(e_ptr + row, w_old * (e_old + s_old * shift_old) + w_new * (e + s * shift_new))
    local = tl.load(tgt_ptr + row) - v0
    hit = (local >= 0) & (local < n_cols)
    z_t = tl.load(z_row + local, mask=hit, other=0.0).to(tl.float32)
    tl.store(zt_ptr + row, z_t, mask=hit)


@jit
def _logprobs_grad_kernel(
    z_ptr,  # (r, c) logits tile, overwritten with dz
    tgt_ptr,  # (r,) int64 targets
    m_ptr,  # (r,) fp32 max of the raw logits z over the row
    log_s_ptr,  # (r,) fp32 log sum exp((z - m) / T): logsumexp = m / T + log_s, kept apart (see _finish_rows)
    ent_ptr,  # (r,) fp32 entropy (read if HAS_ENT_GRAD)
    g_ptr,  # (r,) fp32 upstream gradient of logp, 0 on ignored rows
    ge_ptr,  # (r,) fp32 upstream gradient of the entropy, 0 on ignored rows (HAS_ENT_GRAD)
    n_cols,
    v0,
    stride_z_row,
    inv_t,
    HAS_ENT_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = cols < n_cols
    ptrs = z_ptr + row.to(tl.int64) * stride_z_row + cols
    z = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    logp = (z - tl.load(m_ptr + row)) * inv_t - tl.load(log_s_ptr + row)  # (z - m) / T: see the stats kernel
    g = tl.load(g_ptr + row)
    p = tl.exp(logp)
    is_tgt = cols == (tl.load(tgt_ptr + row) - v0)
    # p - onehot(target); at the target expm1(logp), by its series near 0: 1 - p_target is tiny for
    # a near-certain token, and 1 - exp(logp) would keep only its leading bits (exp is ~1 ulp off)
    em1 = tl.where(logp > -0.03125, logp * (1.0 + logp * (0.5 + logp * (1.0 / 6.0 + logp / 24.0))), p - 1.0)
    dz = -g * tl.where(is_tgt, em1, p)
    if HAS_ENT_GRAD:
        ge = tl.load(ge_ptr + row)
        # p (log p + H) -> 0 as p -> 0: a -inf logit (log p = -inf) adds 0, not 0 * -inf = NaN
        dz -= ge * tl.where(p > 0.0, p * (logp + tl.load(ent_ptr + row)), 0.0)
    tl.store(ptrs, (dz * inv_t).to(z_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------
# 3. Launchers and the chunked forward / backward (shared by both paths)
# ----------------------------------------------------------------------------------------------

# Measured on an H100 (tiles of 4096 x 8064 bf16): the stats kernel reaches 54% of copy bandwidth
# at 4096 columns x 4 warps (a row's serial online merge bounds it; 45% at 2048 x 8, and a
# per-lane variant without reductions in the loop was no better), the grad kernel 86%.
_STATS_BLOCK_V, _STATS_WARPS = 4096, 4
_GRAD_BLOCK_V, _GRAD_WARPS = 2048, 8


def _tile_stats_triton(z, tgt, v0, inv_t, m, s, e, zt, max_cols: int) -> None:
    rows, cols = z.shape
    _logprobs_stats_kernel[(rows,)](
        z, tgt, m, s, e if e is not None else s, zt, cols, v0, z.stride(0), inv_t,
        HAS_ENTROPY=e is not None, NUM_BLOCKS=cdiv(max_cols, _STATS_BLOCK_V), BLOCK_V=_STATS_BLOCK_V,
        num_warps=_STATS_WARPS,
    )  # fmt: skip


def _tile_grad_triton(z, tgt, v0, inv_t, m, log_s, ent, g, ge) -> None:
    rows, cols = z.shape
    _logprobs_grad_kernel[(rows, cdiv(cols, _GRAD_BLOCK_V))](
        z, tgt, m, log_s, ent, g, ge if ge is not None else g, cols, v0, z.stride(0), inv_t,
        HAS_ENT_GRAD=ge is not None, BLOCK_V=_GRAD_BLOCK_V, num_warps=_GRAD_WARPS,
    )  # fmt: skip


def plan_chunks(N: int, V: int, device: torch.device, tile: tuple[int, int] | None = None) -> tuple[int, int]:
    """(rows, cols) of the one logits tile the kernel holds for N tokens and a vocabulary of V.

    rows: up to _TOKEN_BLOCK tokens; cols: V split into equal chunks, a multiple of 128, sized so a
    tile holds about _TILE_ELEMS[device type] elements. tile=(rows, cols) forces the shape (tests).
    Public because the memory pre-flight (minigrpo/memory_parts.py) counts the tile's bytes.
    """
    if tile is not None:
        return max(1, min(tile[0], N)), max(1, min(tile[1], V))
    rows = max(1, min(N, _TOKEN_BLOCK))
    budget = _TILE_ELEMS["cuda" if device.type == "cuda" else "cpu"]
    cols = min(V, max(256, budget // rows))
    cols = min(V, -(-cdiv(V, cdiv(V, cols)) // 128) * 128)  # equal chunks, a multiple of 128
    return rows, cols


def _tiles(N: int, V: int, rows: int, cols: int):
    for n0 in range(0, N, rows):
        for v0 in range(0, V, cols):
            yield n0, min(n0 + rows, N), v0, min(v0 + cols, V)


@functools.cache
def _has_fp32_out_mm(device: torch.device) -> bool:
    """Whether this torch/device can add a half-precision matmul into an fp32 buffer (CUDA only)."""
    if device.type != "cuda":
        return False
    try:
        a = torch.randn(32, 64, device=device, dtype=torch.bfloat16)
        b = torch.randn(64, 16, device=device, dtype=torch.bfloat16)
        acc = torch.ones(32, 16, device=device)
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        return bool(torch.allclose(acc, 1 + a.float() @ b.float(), atol=1e-3, rtol=1e-3))
    except Exception:  # an op this torch build lacks: fall back to a rounded partial product
        return False


def _add_mm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """acc (fp32) (+)= a @ b, for a, b in any float dtype."""
    if a.dtype == acc.dtype:
        torch.mm(a, b, out=acc) if first else acc.addmm_(a, b)
    elif _has_fp32_out_mm(a.device):
        torch.addmm(acc, a, b, beta=0 if first else 1, out_dtype=torch.float32, out=acc)
    elif first:
        acc.copy_(a @ b)
    else:
        acc += a @ b  # the product is rounded to a.dtype once per vocab chunk, then summed in fp32


def _forward(h, w, tgt, inv_t, ignore_index, want_entropy, impl, tile):
    """Chunked forward. h (N, D), w (V, D), tgt (N,) int64 -> logp, entropy (or None), m, log_s: (N,) fp32."""
    N, V = h.shape[0], w.shape[0]
    rows, cols = plan_chunks(N, V, h.device, tile)
    f32 = dict(dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
    m, s, zt = torch.full((N,), _NEG, **f32), torch.zeros(N, **f32), torch.zeros(N, **f32)
    e = torch.zeros(N, **f32) if want_entropy else None
    buf = torch.empty(rows * cols, dtype=h.dtype, device=h.device)  # the one logits tile
    for n0, n1, v0, v1 in _tiles(N, V, rows, cols):
        z = torch.mm(h[n0:n1], w[v0:v1].T, out=buf[: (n1 - n0) * (v1 - v0)].view(n1 - n0, v1 - v0))
        sl = slice(n0, n1)
        e_b = e[sl] if e is not None else None
        if impl == "triton":
            _tile_stats_triton(z, tgt[sl], v0, inv_t, m[sl], s[sl], e_b, zt[sl], cols)
        else:
            _tile_stats_ref(z, tgt[sl], v0, inv_t, m[sl], s[sl], e_b, zt[sl])
    logp, log_s = _finish_rows(m, s, zt, inv_t)
    valid = counted(tgt, ignore_index)
    logp = torch.where(valid, logp, 0.0)
    entropy = torch.where(valid, log_s - e / s, 0.0) if e is not None else None
    return logp, entropy, m, log_s


def _finish_rows(m: torch.Tensor, s: torch.Tensor, zt: torch.Tensor, inv_t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp, log s), each (r,), from a row's max raw logit m, s = sum exp((z - m) / T) and the
    target's raw logit zt.

    logp is rounded as torch's log_softmax rounds it, (zt - m) / T - log s, never through the
    logsumexp m / T + log s: for a near-certain target (zt = m, s = 1 + tiny) with |m| ~ 30 in fp32,
    m + log s rounds log s away (an ulp of 30 is 1.9e-6), so logp would come out 0 or -1.9e-6
    instead of -tiny, and the gradient's 1 - p_target (tiny) would be off by as much. Hence the grad
    kernels also take m and log s apart, not their sum. And the max is kept in raw logits so that
    zt - m is exactly 0 at the max for any T (z / T - m / T would round twice).
    """
    log_s = torch.log(s)
    return (zt - m) * inv_t - log_s, log_s


def _backward(h, w, tgt, m, log_s, ent, g, ge, inv_t, need_dh, need_dw, impl, tile):
    """Chunked backward (recomputes the logits). g, ge: (N,) fp32, 0 on ignored rows; ge may be None."""
    N, D = h.shape
    V = w.shape[0]
    rows, cols = plan_chunks(N, V, h.device, tile)
    dh = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_dh else None
    dw = (torch.empty if N else torch.zeros)(w.shape, dtype=w.dtype, device=w.device) if need_dw else None
    acc_dtype = torch.promote_types(h.dtype, torch.float32)
    acc = torch.empty((rows, D), dtype=acc_dtype, device=h.device) if need_dh else None  # dH_b
    buf = torch.empty(rows * cols, dtype=h.dtype, device=h.device)
    for n0, n1, v0, v1 in _tiles(N, V, rows, cols):
        hb, wv, sl = h[n0:n1], w[v0:v1], slice(n0, n1)
        z = torch.mm(hb, wv.T, out=buf[: (n1 - n0) * (v1 - v0)].view(n1 - n0, v1 - v0))  # (r, c)
        ge_b = ge[sl] if ge is not None else None
        if impl == "triton":
            _tile_grad_triton(z, tgt[sl], v0, inv_t, m[sl], log_s[sl], ent[sl], g[sl], ge_b)
        else:
            _tile_grad_ref(z, tgt[sl], v0, inv_t, m[sl], log_s[sl], ent[sl], g[sl], ge_b)
        if dw is not None:  # dz is now in z
            torch.mm(z.T, hb, out=dw[v0:v1]) if n0 == 0 else dw[v0:v1].addmm_(z.T, hb)
        if dh is not None:
            _add_mm_fp32(acc[: n1 - n0], z, wv, first=v0 == 0)
            if v1 == V:
                dh[sl] = acc[: n1 - n0]
    return dh, dw


# ----------------------------------------------------------------------------------------------
# 4. Autograd
# ----------------------------------------------------------------------------------------------


class LinearLogprobsFunction(torch.autograd.Function):
    """(h (N, D), W (V, D), targets (N,)) -> (logp (N,) fp32, entropy (N,) fp32 or empty)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, ignore_index, want_entropy, impl, tile):
        inv_t = 1.0 / temperature
        logp, entropy, m, log_s = _forward(hidden, weight, targets, inv_t, ignore_index, want_entropy, impl, tile)
        if entropy is None:
            entropy = logp.new_zeros(0)
            ctx.mark_non_differentiable(entropy)
        ctx.save_for_backward(hidden, weight, targets, m, log_s, entropy)
        ctx.config = (inv_t, ignore_index, impl, tile)
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets, m, log_s, entropy = ctx.saved_tensors
        inv_t, ignore_index, impl, tile = ctx.config
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (g_logp is None and g_ent is None) or not (need_dh or need_dw):
            return (None,) * 8
        valid = counted(targets, ignore_index)
        g = torch.where(valid, g_logp.to(m.dtype), 0.0) if g_logp is not None else torch.zeros_like(m)
        ge = torch.where(valid, g_ent.to(m.dtype), 0.0) if g_ent is not None and entropy.numel() else None
        dh, dw = _backward(hidden, weight, targets, m, log_s, entropy, g, ge, inv_t, need_dh, need_dw, impl, tile)
        return dh, dw, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# 5. Public function
# ----------------------------------------------------------------------------------------------


def check_targets(targets: torch.Tensor, V: int, ignore_index: int | None = None) -> None:
    """Fail clearly on a target outside [0, V) that is not ignore_index: the kernels would find no
    target column and return -logsumexp (a plausible, wrong log-prob) for it. On CUDA the check is
    asynchronous (torch._assert_async: no host synchronisation; a device-side assert if it fails)."""
    bad = (targets < 0) | (targets >= V)  # (...) bool
    if ignore_index is not None:
        bad &= targets != ignore_index
    either = f" or equal ignore_index={ignore_index}" if ignore_index is not None else ""
    msg = f"targets must lie in [0, {V}) (the vocabulary of weight){either}"
    if targets.is_cuda:
        torch._assert_async(~bad.any(), msg)
    elif bool(bad.any()):
        raise ValueError(f"{msg}; got {int(targets[bad][0])}")


def head_path(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    impl: str,
    ignore_index: int | None = None,
) -> str:
    """Check an LM-head call's inputs (hidden (..., D), weight (V, D), targets (...)) and resolve impl
    to "triton" or "ref"; fp64 inputs take the reference (the kernels compute in fp32)."""
    D = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != D:
        raise ValueError(f"weight {tuple(weight.shape)} must be (V, {D}) for hidden {tuple(hidden.shape)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} must be hidden's {tuple(hidden.shape)} without its last dim")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight {weight.dtype} and hidden {hidden.dtype} must have one dtype")
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer token ids, got {targets.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if not 1.0 / temperature >= 1.0 / _MAX_TEMPERATURE:  # kernels scale by 1 / T (inf: 0 * -inf; > ~8.5e37: subnormal)
        raise ValueError(f"temperature must be at most {_MAX_TEMPERATURE:g} (1 / T a normal fp32), got {temperature}")
    if temperature < _MIN_TEMPERATURE:
        raise ValueError(f"temperature must be at least {_MIN_TEMPERATURE:g} (z / T a finite fp32), got {temperature}")
    check_targets(targets, weight.shape[0], ignore_index)
    path = resolve_impl(impl, hidden, weight)
    if hidden.dtype == torch.float64 and path == "triton":
        if impl == "triton":
            raise ValueError("impl='triton' computes in fp32; use impl='ref' for fp64 inputs")
        path = "ref"
    return path


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int | None = -100,
    impl: str = "auto",
    tile: tuple[int, int] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log_softmax(hidden @ weight.T / temperature)[targets] in fp32, never holding (N, V) logits.

    Args:
        hidden: (..., D) activations before the LM head (any float dtype; the matmul runs in it).
        weight: (V, D) LM-head weight, same dtype as hidden.
        targets: (...) token ids in [0, V), or ignore_index (logp = entropy = 0, no gradient);
            ignore_index=None ignores none.
        temperature: logits are divided by it (sampling temperature).
        return_entropy: also return the per-token entropy of softmax(logits / T), differentiable.
        impl: "auto" (Triton on CUDA, the chunked torch path elsewhere), "triton" or "ref".
        tile: (rows, vocab columns) of the logits tile; None picks one (about 64 MiB on CUDA).
    Returns:
        logp (...) fp32, or (logp, entropy), both (...) fp32.
    """
    D = hidden.shape[-1]
    path = head_path(hidden, weight, targets, temperature, impl, ignore_index)
    h2 = hidden.reshape(-1, D)  # (N, D)
    tgt = targets.reshape(-1).to(torch.int64).contiguous()  # (N,)
    logp, entropy = LinearLogprobsFunction.apply(
        h2, weight, tgt, float(temperature), ignore_index, return_entropy, path, tile
    )
    logp = logp.view(targets.shape)
    return (logp, entropy.view(targets.shape)) if return_entropy else logp
