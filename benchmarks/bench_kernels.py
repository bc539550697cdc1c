"""Kernel benchmarks on one CUDA GPU: ours vs torch eager, torch.compile and Liger-Kernel.

    python benchmarks/bench_kernels.py [--cases rmsnorm,rope,logprobs,policy_head,decode_attention,decode_gemm]
                                       [--quick] [--out DIR] [--tune]

One process, in this order: the in-run ceilings (D2D copy bandwidth of a 2 GiB bf16 copy, bytes
read + written; bf16 8192^3 matmul rate), then per case and shape, for every provider: a
correctness check against fp64 on fresh random inputs, the median fwd+bwd time from
triton.testing.do_bench (CUDA events, L2 flushed), for the memory-bound kernels also the GPU time
of a CUDA graph replay (host dispatch left out; inputs rotated so that they do not sit in L2), and
the peak extra memory of one fwd+bwd (max_memory_allocated minus what was allocated before,
including the new gradients). Writes results/kernels_<device>.json and prints a table.
Liger-Kernel is optional: without it its rows are skipped. --tune sweeps launch configurations
of our kernels instead (used to pick the defaults in kernels/). The policy_head case (the LM head
fused with the GRPO loss) lives in kernel_policy_head.py, the decode_attention case (a sampler's
decode step: split-K attention with and without a shared prompt vs SDPA) and the decode_gemm case
(the step's skinny matmuls through cuBLAS's paths) in kernel_decode.py; decode_gemm is not in the
default list.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import triton
from common import finite_json, names, out_folder

from minigrpo.errors import ArgumentParser, UserError, run_cli
from minigrpo.kernels import apply_rotary, fused_linear_logprobs, rms_norm

try:
    import liger_kernel
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    from liger_kernel.ops.rope import LigerRopeFunction
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    LIGER = getattr(liger_kernel, "__version__", None) or __import__("importlib.metadata").metadata.version(
        "liger-kernel"
    )
except ImportError:
    LIGER = None

GiB = 2**30
DEV = torch.device("cuda")

# ----------------------------------------------------------------------------------------------
# Timing, memory and error helpers
# ----------------------------------------------------------------------------------------------


def bench_ms(fn: Callable[[], object]) -> float:
    """Median ms of fn via do_bench, with warm-up and repetitions scaled to fn's own duration."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = (time.perf_counter() - t0) * 1e3
    rep = min(max(100.0, 8 * est), 800.0)  # >= 100 ms of repetitions, at least ~5 of the slowest
    return triton.testing.do_bench(fn, warmup=max(25.0, est), rep=rep, return_mode="median")


def graph_ms(fns: list[Callable[[], object]], calls: int = 20, replays: int = 15) -> float:
    """Median GPU ms per call of a CUDA graph holding `calls` calls, cycling through fns (input sets)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            for f in fns:
                f()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return statistics.median(times)


def peak_gib(fn: Callable[[], object]) -> float:
    """Peak memory above what was allocated before one call of fn (its outputs included), GiB."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / GiB


def rel_err(outs, refs) -> tuple[float, float]:
    """Largest ||a - b|| / ||b|| and largest max|a - b| / max|b| over paired tensors."""
    norm, peak = 0.0, 0.0
    for a, b in zip(outs, refs):
        d = a.double() - b.double()
        norm = max(norm, (d.norm() / b.double().norm()).item())
        peak = max(peak, (d.abs().max() / b.double().abs().max()).item())
    return norm, peak


def ceilings() -> dict:
    """In-run denominators: D2D copy GB/s (read + write) and bf16 matmul TFLOP/s."""
    bufs = [torch.randn(GiB, device=DEV, dtype=torch.bfloat16), torch.empty(GiB, device=DEV, dtype=torch.bfloat16)]
    ms = triton.testing.do_bench(lambda: bufs[1].copy_(bufs[0]), warmup=50, rep=300, return_mode="median")
    copy_gbs = 2 * GiB * 2 / ms / 1e6  # 2 GiB read + 2 GiB written
    bufs.clear()
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    mm_ms = triton.testing.do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
    return {"copy_ms": ms, "copy_GBps": copy_gbs, "matmul_ms": mm_ms, "matmul_TFLOPs": 2 * 8192**3 / mm_ms / 1e9}


def compiled(fn):
    """torch.compile(dynamic=False): one specialised graph per shape (the recompile limit is raised)."""
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    return torch.compile(fn, dynamic=False)


def run_provider(row: dict, fwd_bwd, check, graph_sets=None, timing_only=False) -> dict:
    """Fill row with err, ms (two medians), graph ms and peak GiB for one provider; OOM is recorded."""
    try:
        if check is not None and not timing_only:
            row["err"], row["err_max"] = check()
        row["ms"] = bench_ms(fwd_bwd)
        row["ms_repeat"] = bench_ms(fwd_bwd)
        if graph_sets is not None:
            row["graph_ms"] = graph_ms(graph_sets)
        row["peak_GiB"] = peak_gib(fwd_bwd)
    except torch.cuda.OutOfMemoryError:
        row["oom"] = True
        torch.cuda.empty_cache()
    except Exception as exc:  # one broken provider must not end the run
        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
    return row


# ----------------------------------------------------------------------------------------------
# Case 1: RMSNorm fwd+bwd
# ----------------------------------------------------------------------------------------------


def rmsnorm_eager(x, w, eps=1e-6):
    """HF Qwen2RMSNorm: fp32 variance, rsqrt, cast back, then scale."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def bench_rmsnorm(ceil: dict, quick: bool) -> list[dict]:
    shapes = (
        [(16384, 4096), (2048, 1536)] if quick else [(m, h) for m in (2048, 16384, 65536) for h in (1536, 3072, 4096)]
    )
    providers = {
        "eager": rmsnorm_eager,
        "torch.compile": compiled(rmsnorm_eager),
        "ours": lambda x, w: rms_norm(x, w, 1e-6, impl="triton"),
    }
    if LIGER:  # llama casting; writes dx into dy in place (harmless for timing)
        providers["liger"] = lambda x, w: LigerRMSNormFunction.apply(x, w, 1e-6, 0.0, "llama", True)
    return [row for M, H in shapes for row in _rmsnorm_shape(M, H, providers, ceil)]


def _rmsnorm_shape(M: int, H: int, providers: dict, ceil: dict) -> list[dict]:
    nbytes = 10 * M * H + 6 * H + 4 * M
    n_sets = max(1, math.ceil(256e6 / nbytes))  # rotate inputs past the 50 MB L2 in graph timing
    sets = []
    for _ in range(n_sets):
        x = torch.randn(M, H, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        w = (1 + 0.1 * torch.randn(H, device=DEV)).to(torch.bfloat16).requires_grad_()
        sets.append((x, w, torch.randn(M, H, device=DEV, dtype=torch.bfloat16)))
    x, w, dy = sets[0]
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = rmsnorm_eager(x64, w64)
    ref = [y64, *torch.autograd.grad(y64, (x64, w64), dy.double())]

    def step(f, s=0):
        xs, ws, dys = sets[s]
        y = f(xs, ws)
        return torch.autograd.grad(y, (xs, ws), dys)

    def check(f):
        xc, wc = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        y = f(xc, wc)
        return rel_err([y, *torch.autograd.grad(y, (xc, wc), dy.clone())], ref)

    rows = []
    for name, f in providers.items():
        row = {"case": "rmsnorm_fwd_bwd", "shape": [M, H], "provider": name, "bytes": nbytes}
        gsets = [functools.partial(step, f, s) for s in range(n_sets)]
        rows.append(run_provider(row, functools.partial(step, f), functools.partial(check, f), gsets))
        finish(row, ceil, nbytes=nbytes)
    return rows


# ----------------------------------------------------------------------------------------------
# Case 2: RoPE fwd+bwd (q and k)
# ----------------------------------------------------------------------------------------------


def rope_eager(q, k, cos, sin):
    """HF apply_rotary_pos_emb: q, k (B, H, T, D); cos, sin (1, 1, T, D) duplicated halves."""

    def rotate_half(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
        return torch.cat((-x2, x1), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def bench_rope(ceil: dict, quick: bool) -> list[dict]:
    models = {"llama-8b": (32, 8), "qwen2.5-1.5b": (12, 2)}
    shapes = [("llama-8b", 16384)] if quick else [(m, t) for m in models for t in (2048, 16384, 65536)]
    comp = compiled(rope_eager)
    return [row for model, T in shapes for row in _rope_shape(model, T, *models[model], comp, ceil)]


def _rope_shape(model: str, T: int, H: int, HKV: int, comp, ceil: dict) -> list[dict]:
    D = 128
    nbytes = 4 * (H + HKV) * T * D * 2 + 4 * T * D * 2  # q, k read+written fwd and bwd; cos+sin (T, D) bf16 twice
    n_sets = max(1, math.ceil(256e6 / nbytes))
    pos = torch.arange(T, device=DEV, dtype=torch.float64)
    ang = pos[:, None] / 10000.0 ** (torch.arange(0, D, 2, device=DEV, dtype=torch.float64) / D)  # (T, D/2)
    cos_h, sin_h = ang.cos().float()[None], ang.sin().float()[None]  # ours: (1, T, D/2) fp32
    cos64, sin64 = torch.cat([ang, ang], -1).cos()[None], torch.cat([ang, ang], -1).sin()[None]  # (1, T, D)
    cos_f, sin_f = cos64.to(torch.bfloat16), sin64.to(torch.bfloat16)  # HF / Liger: (1, T, D) bf16
    sets = []
    for _ in range(n_sets):  # (B, T, H, D) buffers, as a projection produces them
        q = torch.randn(1, T, H, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, T, HKV, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        sets.append((q, k, torch.randn_like(q), torch.randn_like(k)))
    q, k, gq, gk = sets[0]
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    qo, ko = rope_eager(q64.transpose(1, 2), k64.transpose(1, 2), cos64[:, None], sin64[:, None])  # exact
    ref = [qo.transpose(1, 2), ko.transpose(1, 2)]
    ref += torch.autograd.grad(ref, (q64, k64), (gq.double(), gk.double()))

    def hf(q, k, f):  # (B, T, H, D) in and out; HF-style kernels see (B, H, T, D) views
        qo, ko = f(q.transpose(1, 2), k.transpose(1, 2))
        return qo.transpose(1, 2), ko.transpose(1, 2)

    providers = {
        "eager": lambda q, k: hf(q, k, lambda a, b: rope_eager(a, b, cos_f[:, None], sin_f[:, None])),
        "torch.compile": lambda q, k: hf(q, k, lambda a, b: comp(a, b, cos_f[:, None], sin_f[:, None])),
        "ours": lambda q, k: apply_rotary(q, k, cos_h, sin_h, impl="triton"),
    }
    if LIGER:  # rotates q, k (and in the backward dq, dk) in place: harmless for timing
        providers["liger (in place)"] = lambda q, k: hf(q, k, lambda a, b: LigerRopeFunction.apply(a, b, cos_f, sin_f))

    def step(f, s=0):
        qs, ks, gqs, gks = sets[s]
        qo, ko = f(qs, ks)
        return torch.autograd.grad((qo, ko), (qs, ks), (gqs, gks))

    def check(f):
        qc, kc = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
        qo, ko = f(qc, kc)
        grads = torch.autograd.grad((qo, ko), (qc, kc), (gq.clone(), gk.clone()))
        return rel_err([qo, ko, *grads], ref)

    rows = []
    for name, f in providers.items():
        row = {"case": "rope_fwd_bwd", "shape": [model, T, H, HKV, D], "provider": name, "bytes": nbytes}
        gsets = [functools.partial(step, f, s) for s in range(n_sets)]
        rows.append(run_provider(row, functools.partial(step, f), functools.partial(check, f), gsets))
        finish(row, ceil, nbytes=nbytes)
    return rows


# ----------------------------------------------------------------------------------------------
# Case 3: LM head + log-prob (= -CE with reduction "sum") fwd+bwd
# ----------------------------------------------------------------------------------------------


def logprob_eager(h, w, t):
    """-sum log_softmax(h @ W.T)[t]: the (N, V) logits in bf16, then fp32."""
    logits = h @ w.T
    return -torch.log_softmax(logits.float(), -1).gather(-1, t[:, None]).sum()


def bench_logprobs(ceil: dict, quick: bool) -> list[dict]:
    heads = [(1536, 151936), (3072, 32064), (4096, 128256)]
    shapes = (
        [(4096, 1536, 151936), (16384, 1536, 151936)]
        if quick
        else [(m, d, v) for d, v in heads for m in (4096, 16384, 32768)]
    )
    providers = {
        "eager": logprob_eager,
        "torch.compile": compiled(logprob_eager),
        "ours": lambda h, w, t: -fused_linear_logprobs(h, w, t, impl="triton").sum(),
        "ours (+entropy)": lambda h, w, t: _with_entropy(*fused_linear_logprobs(h, w, t, return_entropy=True)),
    }
    if LIGER:
        providers["liger"] = functools.partial(_liger_flce, LigerFusedLinearCrossEntropyLoss(reduction="sum"))
    rows = []
    for N, D, V in shapes:
        rows += _logprobs_shape(N, D, V, providers, ceil)
        torch.cuda.empty_cache()
    return rows


def _with_entropy(logp, entropy):
    return -logp.sum() - 0.01 * entropy.sum()


def _liger_flce(loss_fn, h, w, t):
    return loss_fn(w, h, t)


def _logprobs_shape(N: int, D: int, V: int, providers: dict, ceil: dict) -> list[dict]:
    h = torch.randn(N, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(V, D, device=DEV) * D**-0.5).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, V, (N,), device=DEV)
    flops = 6 * N * D * V
    ref = None
    if N == 4096 or (N, D) == (16384, 1536):  # fp64 through our chunked torch path (never (N, V))
        h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        loss64 = -fused_linear_logprobs(h64, w64, t, impl="ref").sum()
        ref = [loss64, *torch.autograd.grad(loss64, (h64, w64))]

    def step(f):
        loss = f(h, w, t)
        return (loss, *torch.autograd.grad(loss, (h, w)))

    def check(f):
        return rel_err(step(f), ref)

    rows = []
    for name, f in providers.items():
        if name == "ours (+entropy)" and D != 1536:
            continue
        do_check = ref is not None and name != "ours (+entropy)"
        row = {"case": "lm_head_logprob_fwd_bwd", "shape": [N, D, V], "provider": name, "flops_6MHV": flops}
        rows.append(run_provider(row, functools.partial(step, f), functools.partial(check, f) if do_check else None))
        finish(row, ceil, flops=flops)
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def finish(row: dict, ceil: dict, nbytes: int | None = None, flops: int | None = None) -> None:
    """Add rates and % of the in-run ceilings to row, and print it."""
    if "ms" in row:
        if nbytes is not None:
            row["GBps"] = nbytes / row["ms"] / 1e6
            row["pct_copy_bw"] = 100 * row["GBps"] / ceil["copy_GBps"]
            if "graph_ms" in row:
                row["graph_GBps"] = nbytes / row["graph_ms"] / 1e6
                row["graph_pct_copy_bw"] = 100 * row["graph_GBps"] / ceil["copy_GBps"]
        if flops is not None:
            row["TFLOPs_6MHV"] = flops / row["ms"] / 1e9
            row["pct_matmul"] = 100 * row["TFLOPs_6MHV"] / ceil["matmul_TFLOPs"]
    print(fmt(row), flush=True)


def fmt(r: dict) -> str:
    shape = "x".join(str(s) for s in r["shape"])
    if r.get("oom") or r.get("error"):
        return f"{r['case']:24s} {shape:26s} {r['provider']:16s} {'OOM' if r.get('oom') else r['error']}"
    rate = (
        f"{r['GBps']:7.0f} GB/s {r['pct_copy_bw']:4.0f}%"
        if "GBps" in r
        else f"{r['TFLOPs_6MHV']:5.0f} TF {r['pct_matmul']:4.0f}%"
    )
    graph = f" | graph {r['graph_ms']:.4f} ms {r['graph_pct_copy_bw']:4.0f}%" if "graph_ms" in r else ""
    err = f" err {r['err']:.1e} ({r['err_max']:.1e})" if "err" in r else ""
    return (
        f"{r['case']:24s} {shape:26s} {r['provider']:16s} {r['ms']:8.3f} ms ({r['ms_repeat']:.3f}) {rate}"
        f"{graph} | peak {r['peak_GiB']:.3f} GiB{err}"
    )


def tune(cases: list[str]) -> None:
    """Sweep launch configurations of our kernels at the headline shapes; prints GPU times."""
    from minigrpo.kernels import logprobs as lp_mod
    from minigrpo.kernels import rmsnorm as rms_mod
    from minigrpo.kernels import rope as rope_mod

    bw = ceil_now["copy_GBps"] * 1e6  # bytes per ms
    if "rmsnorm" in cases:
        M, H = 16384, 4096
        x = torch.randn(M, H, device=DEV, dtype=torch.bfloat16)
        w = torch.randn(H, device=DEV, dtype=torch.bfloat16)
        dy = torch.randn_like(x)
        _, _, rstd = rms_mod._rms_norm_fwd(x, w, None, 1e-6)
        ms = graph_ms([lambda: rms_mod._rms_norm_fwd(x, w, None, 1e-6)])
        print(f"tune rms fwd default {rms_mod._fwd_config(H)}: {ms * 1e3:.1f} us ({100 * 4 * M * H / bw / ms:.0f}%)")
        bwd_ms = graph_ms([lambda: rms_mod._rms_norm_bwd(dy, x, w, rstd, None)])
        print(f"tune rms bwd default {rms_mod._bwd_config(H)}: {bwd_ms * 1e3:.1f} us "
              f"({100 * 6 * M * H / bw / bwd_ms:.0f}% of copy)", flush=True)  # fmt: skip
    if "rope" in cases:
        for H, HKV in ((32, 8), (12, 2)):
            T = 16384
            q = torch.randn(1, T, H, 128, device=DEV, dtype=torch.bfloat16)
            k = torch.randn(1, T, HKV, 128, device=DEV, dtype=torch.bfloat16)
            cs = torch.randn(1, T, 64, device=DEV)
            nbytes = 2 * (q.numel() + k.numel()) * 2 + 2 * cs.numel() * 4
            ms = graph_ms([functools.partial(rope_mod._rotary, q, k, cs, cs, False)])
            print(f"tune rope {H}/{HKV} default {rope_mod._config(H, HKV, 64)}: {ms * 1e3:.1f} us "
                  f"({100 * nbytes / bw / ms:.0f}%)")  # fmt: skip
    if "logprobs" in cases:
        tune_logprobs(lp_mod, bw)
    if "policy_head" in cases:
        from kernel_policy_head import tune_policy_head  # beside this script; it imports this module

        tune_policy_head()
    if "decode_attention" in cases:
        from kernel_decode import tune as tune_decode  # beside this script; it imports this module

        tune_decode(bw)


def tune_logprobs(lp_mod, bw: float) -> None:
    """Where the time of one fwd+bwd goes: each matmul and kernel of one tile, timed alone."""
    N, D, V = 16384, 1536, 151936
    h = torch.randn(N, D, device=DEV, dtype=torch.bfloat16)
    w = (torch.randn(V, D, device=DEV) * D**-0.5).to(torch.bfloat16)
    t = torch.randint(0, V, (N,), device=DEV)
    print("fp32-out addmm available:", lp_mod._has_fp32_out_mm(DEV))
    _tile_breakdown(lp_mod, h, w, t, 4096, 8064, bw)
    names = ("_STATS_BLOCK_V", "_STATS_WARPS", "_GRAD_BLOCK_V", "_GRAD_WARPS")
    default = [getattr(lp_mod, n) for n in names]
    for blk in (1024, 2048, 4096):
        for nw in (4, 8):
            for n, v in zip(names, (blk, nw, blk, nw)):
                setattr(lp_mod, n, v)
            a, b = _tile_ops(lp_mod, h, w, t, 4096, 8064)[1:3]
            print(f"tune logprobs BLOCK_V={blk} warps={nw}: stats {100 * a[2] / bw / bench_ms(a[0]):.0f}%, "
                  f"grad {100 * b[2] / bw / bench_ms(b[0]):.0f}% of copy", flush=True)  # fmt: skip
    for n, v in zip(names, default):
        setattr(lp_mod, n, v)
    h.requires_grad_()
    w.requires_grad_()
    for tile in (None, (8192, 4096)):
        f = functools.partial(_logprobs_fwd_bwd, h, w, t, tile)
        print(f"tune logprobs fwd+bwd tile={tile}: {bench_ms(f):.2f} ms, peak {peak_gib(f):.3f} GiB", flush=True)


def _logprobs_fwd_bwd(h, w, t, tile):
    return torch.autograd.grad(fused_linear_logprobs(h, w, t, impl="triton", tile=tile).sum(), (h, w))


def _tile_ops(lp_mod, h, w, t, rows: int, cols: int) -> list[tuple]:
    """(fn, flops, bytes) of each step of one backward tile (the forward is the first two)."""
    D = h.shape[1]
    hb, wv, tb = h[:rows], w[:cols], t[:rows]
    z = torch.empty(rows, cols, device=DEV, dtype=torch.bfloat16)
    f32 = dict(device=DEV, dtype=torch.float32)
    m, s, e, zt = (torch.zeros(rows, **f32) for _ in range(4))
    mx, log_s = torch.full((rows,), 10.0, **f32), torch.zeros(rows, **f32)
    ent, g = torch.ones(rows, **f32), torch.ones(rows, **f32)
    acc, dw = torch.zeros(rows, D, **f32), torch.zeros(cols, D, device=DEV, dtype=torch.bfloat16)
    flops = 2 * rows * cols * D
    return [
        (functools.partial(torch.mm, hb, wv.T, out=z), flops, None, "mm h_b @ W_v.T"),
        (functools.partial(lp_mod._tile_stats_triton, z, tb, 0, 1.0, m, s, e, zt, cols), None, z.nbytes, "stats"),
        (functools.partial(lp_mod._tile_grad_triton, z, tb, 0, 1.0, mx, log_s, ent, g, g), None, 2 * z.nbytes, "grad"),
        (functools.partial(dw.addmm_, z.T, hb), flops, None, "dW += dz.T @ h_b"),
        (functools.partial(lp_mod._add_mm_fp32, acc, z, wv, first=False), flops, None, "dH_b += dz @ W_v fp32"),
    ]


def _tile_breakdown(lp_mod, h, w, t, rows: int, cols: int, bw: float) -> None:
    n_tiles = math.ceil(h.shape[0] / rows) * math.ceil(w.shape[0] / cols)
    total = 0.0
    for i, (fn, fl, nb, name) in enumerate(_tile_ops(lp_mod, h, w, t, rows, cols)):
        ms = bench_ms(fn)
        total += ms * (2 if i == 0 else 1)  # the logits matmul runs in the forward and again in the backward
        rate = f"{fl / ms / 1e9:.0f} TF/s" if fl else f"{nb / ms / 1e6:.0f} GB/s ({100 * nb / bw / ms:.0f}%)"
        print(f"tune logprobs tile ({rows}, {cols}) {name}: {ms * 1e3:.0f} us, {rate}", flush=True)
    print(f"tune logprobs tile ({rows}, {cols}): {n_tiles} tiles x {total:.3f} ms = {n_tiles * total:.1f} ms")


ceil_now: dict = {}


def bench_policy_head(ceil: dict, quick: bool) -> list[dict]:
    from kernel_policy_head import bench_policy_head as run  # beside this script; it imports this module

    return run(ceil, quick)


def bench_decode_attention(ceil: dict, quick: bool) -> list[dict]:
    from kernel_decode import bench_decode_attention as run  # beside this script; it imports this module

    return run(ceil, quick)


def bench_decode_gemm(ceil: dict, quick: bool) -> list[dict]:
    from kernel_decode import bench_decode_gemm as run  # beside this script; it imports this module

    return run(ceil, quick)


CASES = ("rmsnorm", "rope", "logprobs", "policy_head", "decode_attention", "decode_gemm")


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--cases",
        type=names(CASES),
        default="rmsnorm,rope,logprobs,policy_head,decode_attention",
        help=f"comma list of {', '.join(CASES)}",
    )
    ap.add_argument("--quick", action="store_true", help="headline shapes only")
    ap.add_argument("--tune", action="store_true", help="sweep our launch configurations instead")
    ap.add_argument(
        "--out", type=out_folder, default=str(Path(__file__).parent / "results"), help="folder for the JSON"
    )
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise UserError("bench_kernels.py measures Triton kernels on a CUDA GPU, and this machine has none")
    torch.manual_seed(0)
    t0 = time.time()
    ceil = ceilings()
    ceil_now.update(ceil)
    name = torch.cuda.get_device_name()
    print(f"{name}: copy {ceil['copy_GBps']:.0f} GB/s, matmul {ceil['matmul_TFLOPs']:.0f} TFLOP/s", flush=True)
    if args.tune:
        tune(args.cases)
        return
    bench = {
        "rmsnorm": bench_rmsnorm,
        "rope": bench_rope,
        "logprobs": bench_logprobs,
        "policy_head": bench_policy_head,
        "decode_attention": bench_decode_attention,
        "decode_gemm": bench_decode_gemm,
    }
    out = Path(args.out) / f"kernels_{name.replace(' ', '_').lower()}{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "device": name,
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "liger_kernel": LIGER},
        "ceilings": ceil,
        "quick": args.quick,
        "rows": [],
    }
    for case in args.cases:
        result["rows"] += bench[case](ceil, args.quick)
        result["seconds"] = time.time() - t0
        # after every case: a cut-off run keeps its data
        out.write_text(json.dumps(finite_json(result), indent=1, allow_nan=False))
    print(f"\nwrote {out} after {time.time() - t0:.0f} s")


if __name__ == "__main__":
    run_cli(lambda _: main())  # a bad argument is one `error:` line
