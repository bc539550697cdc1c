"""The decode-step case of bench_kernels.py: `--cases decode_attention` (and `--tune`).

Qwen2.5-1.5B shapes (12 query heads, 2 kv heads of 128), bf16, forward only (a sampler's decode
step). Times are CUDA-graph replays of 20 calls cycling through input sets larger than the 50 MB L2,
so that each call reads its cache from memory as a decode step does; GB/s = bytes read and written
/ time, against the in-run copy bandwidth. Correctness: relative error against fp64.

decode_attention: one layer's attention of M rows over kv_len cache slots, 8 rows per prompt.
    ours            kernels/flash_decode.py, each row's whole cache its own
    ours (shared)   the same with the prompt's Tp slots in a shared prefix (the sampler's layout):
                    fewer bytes, so GB/s counts the bytes such a decoder must read
    ours (per group) the shared layout with the prefix part computed once per group of rows
                    (kernels/prefix_attention.py), the sampler's default: beside the own part on a
                    second stream when the own slots take several splits
    ours (per group, one stream) the same with the prefix part always launched first
    sdpa            torch SDPA with the model's 4-D mask and the G query heads of a kv head folded
                    into query rows (the model's path where the kernel does not run)

decode_gemm: the decode step's matmuls alone, M rows (64: 8x8, 512: 64x8) against each weight of
a Qwen2.5-1.5B layer (q+k+v and gate+up packed, as the sampler runs them) and the LM head; weights
cycled past L2, as a step reads them. GB/s counts the weight bytes (the bound of a skinny GEMM),
graph_TFLOPs the arithmetic.
    cublas          F.linear(x, W), W (N, K): the model's call
    cublas (KxN)    x @ W_t with the weight stored transposed, (K, N)
    cublaslt        F.linear with torch's cuBLASLt backend

The tune mode sweeps the kernel's launch configurations (split and tile sizes, warps, tiles in
flight) at the same shapes and prints GPU times.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math

import bench_kernels as bk
import torch
import torch.nn.functional as F

from minigrpo.kernels import decode_attention
from minigrpo.kernels import flash_decode as fd
from minigrpo.kernels.prefix_attention import prefix_rows
from minigrpo.models.transformer import attention_mask_4d

H, HKV, DH = 12, 2, 128  # Qwen2.5-1.5B
ATTENTION_SHAPES = [(64, 256, 768), (512, 256, 768), (64, 2048, 2304)]  # (rows, Tp, kv_len); 8 rows a prompt
GROUP = 8
TILES = (1, 2, 3, 4, 6, 8, 12)  # tiles per split swept by --tune


def _check(f, inputs: tuple, spec: torch.Tensor) -> tuple[float, float]:
    return bk.rel_err([f(*inputs)], [spec])


def _compare(rows: list[dict], ours: str, base: str, label: str) -> None:
    """Record and print base's graph time / ours' for the last rows of one shape."""
    by = {r["provider"]: r for r in rows}
    if "graph_ms" in by.get(ours, {}) and "graph_ms" in by.get(base, {}):
        by[ours][f"speedup_vs_{base}"] = by[base]["graph_ms"] / by[ours]["graph_ms"]
        print(f"  {label}: {ours} {by[ours][f'speedup_vs_{base}']:.2f}x {base}", flush=True)


# ----------------------------------------------------------------------------------------------
# decode_attention
# ----------------------------------------------------------------------------------------------


def _attention_sets(M: int, Tp: int, kv_len: int) -> list[dict]:
    """Input sets of one layer: q, full caches (M, Hkv, kv_len, Dh), the same split into a shared
    prefix (M / GROUP prompts) and the rows' own slots, a left-padded key mask, the slot."""
    P = M // GROUP
    full_bytes = 2 * M * HKV * kv_len * DH * 2
    out = []
    for _ in range(max(2, math.ceil(200e6 / full_bytes))):
        k_prefix = torch.randn(P, HKV, Tp, DH, device=bk.DEV, dtype=torch.bfloat16)
        v_prefix = torch.randn_like(k_prefix)
        k_own = torch.randn(M, HKV, kv_len - Tp, DH, device=bk.DEV, dtype=torch.bfloat16)
        v_own = torch.randn_like(k_own)
        group = torch.arange(P, device=bk.DEV).repeat_interleave(GROUP)
        key_mask = torch.ones(M, kv_len, dtype=torch.long, device=bk.DEV)
        key_mask[:, : Tp // 8] = 0  # some prompt padding
        out.append(
            dict(
                q=torch.randn(M, H, DH, device=bk.DEV, dtype=torch.bfloat16),
                k=torch.cat([k_prefix[group], k_own], dim=2),
                v=torch.cat([v_prefix[group], v_own], dim=2),
                own=(k_own, v_own),
                prefix=(k_prefix, v_prefix, group),
                rows=prefix_rows(group, P, GROUP),
                key_mask=key_mask,
                slot=torch.tensor([kv_len - 1], device=bk.DEV),
            )
        )
    return out


def _sdpa(s: dict, kv_len: int) -> torch.Tensor:
    M = s["q"].shape[0]
    mask = attention_mask_4d(s["key_mask"], s["slot"], kv_len, None, M)  # (M, 1, 1, S)
    out = F.scaled_dot_product_attention(s["q"].view(M, HKV, H // HKV, DH), s["k"], s["v"], attn_mask=mask)
    return out.reshape(M, H, DH)


def _ours(s: dict, kv_len: int, shared: bool = False, per_group: bool = False, **launch) -> torch.Tensor:
    k, v = s["own"] if shared or per_group else (s["k"], s["v"])
    prefix = s["prefix"] if shared or per_group else None
    rows = s["rows"] if per_group else None
    if launch:
        return fd._decode_attention_triton(
            s["q"], k, v, s["key_mask"], s["slot"], kv_len, None, DH**-0.5, prefix, rows, **launch
        )
    return decode_attention(s["q"], k, v, s["key_mask"], s["slot"], kv_len, prefix=prefix, rows=rows, impl="triton")


def bench_decode_attention(ceil: dict, quick: bool) -> list[dict]:
    rows = []
    for M, Tp, kv_len in ATTENTION_SHAPES[:2] if quick else ATTENTION_SHAPES:
        sets = _attention_sets(M, Tp, kv_len)
        s0 = sets[0]
        spec = fd.decode_attention_ref(
            s0["q"].double(), s0["k"].double(), s0["v"].double(), s0["key_mask"], s0["slot"], kv_len
        )
        kv_slot = 2 * HKV * DH * 2  # bytes of one slot of one row (k and v)
        full = M * kv_len * kv_slot + 2 * M * H * DH * 2
        shared = (M // GROUP * Tp + M * (kv_len - Tp)) * kv_slot + 2 * M * H * DH * 2
        providers = {
            "ours": (functools.partial(_ours, kv_len=kv_len), full),
            "ours (shared)": (functools.partial(_ours, kv_len=kv_len, shared=True), shared),
            "ours (per group)": (functools.partial(_ours, kv_len=kv_len, per_group=True), shared),
            "ours (per group, one stream)": (
                functools.partial(_ours, kv_len=kv_len, per_group=True, concurrent=False),
                shared,
            ),
            "sdpa": (functools.partial(_sdpa, kv_len=kv_len), full),
        }
        shape_rows = []
        for prov, (f, nbytes) in providers.items():
            row = {"case": "decode_attention", "shape": [M, Tp, kv_len], "provider": prov, "bytes": nbytes}
            calls = [functools.partial(f, s) for s in sets]
            bk.run_provider(row, calls[0], functools.partial(_check, f, (s0,), spec), calls)
            bk.finish(row, ceil, nbytes=nbytes)
            shape_rows.append(row)
        _compare(shape_rows, "ours", "sdpa", f"M={M} kv_len={kv_len}")
        _compare(shape_rows, "ours (shared)", "ours", f"M={M} kv_len={kv_len}")
        _compare(shape_rows, "ours (per group)", "ours (shared)", f"M={M} kv_len={kv_len}")
        _compare(shape_rows, "ours (per group)", "ours (per group, one stream)", f"M={M} kv_len={kv_len}")
        rows += shape_rows
    return rows


# ----------------------------------------------------------------------------------------------
# decode_gemm
# ----------------------------------------------------------------------------------------------

GEMM_SHAPES = {"qkv": (2048, 1536), "o": (1536, 1536), "gate_up": (17920, 1536), "down": (1536, 8960),
               "lm_head": (151936, 1536)}  # (N, K) of Qwen2.5-1.5B's weights  # fmt: skip


@contextlib.contextmanager
def _blas(library: str):
    previous = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(library)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(previous)


def _linear_lt(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    with _blas("cublaslt"):
        return F.linear(x, w)


def bench_decode_gemm(ceil: dict, quick: bool) -> list[dict]:
    rows = []
    for M in (64, 512):
        for name, (N, K) in list(GEMM_SHAPES.items())[: 2 if quick else None]:
            n_sets = max(2, math.ceil(200e6 / (N * K * 2)))
            weights = [torch.randn(N, K, device=bk.DEV, dtype=torch.bfloat16) / K**0.5 for _ in range(n_sets)]
            x = torch.randn(M, K, device=bk.DEV, dtype=torch.bfloat16)
            spec = x.double() @ weights[0].double().T
            providers = {
                "cublas": (F.linear, weights),
                "cublas (KxN)": (torch.matmul, [w.T.contiguous() for w in weights]),
                "cublaslt": (_linear_lt, weights),
            }
            shape_rows = []
            for prov, (f, ws) in providers.items():
                row = {"case": "decode_gemm", "shape": [M, N, K], "provider": prov, "weight": name}
                calls = [functools.partial(f, x, w) for w in ws]
                bk.run_provider(row, calls[0], functools.partial(_check, f, (x, ws[0]), spec), calls)
                if "graph_ms" in row:
                    row["graph_TFLOPs"] = 2 * M * N * K / row["graph_ms"] / 1e9
                bk.finish(row, ceil, nbytes=N * K * 2)
                shape_rows.append(row)
            _compare(shape_rows, "cublas (KxN)", "cublas", f"M={M} {name}")
            _compare(shape_rows, "cublaslt", "cublas", f"M={M} {name}")
            rows += shape_rows
            del weights, providers
    return rows


# ----------------------------------------------------------------------------------------------
# tune
# ----------------------------------------------------------------------------------------------


def tune(bw_bytes_per_ms: float) -> None:
    """GPU ms and % of copy bandwidth of the attention's launch configurations at each shape (slots
    per split, slots per tile, warps, tiles in flight)."""
    for M, Tp, kv_len in ATTENTION_SHAPES:
        sets = _attention_sets(M, Tp, kv_len)
        nbytes = (M // GROUP * Tp + M * (kv_len - Tp)) * 2 * HKV * DH * 2
        default = bk.graph_ms([functools.partial(_ours, s, kv_len, True) for s in sets])
        print(f"attention M={M} Tp={Tp} kv_len={kv_len} shared: default {default:.4f} ms "
              f"({100 * nbytes / default / bw_bytes_per_ms:.0f}%)")  # fmt: skip
        run = functools.partial(_tune_attention_call, kv_len=kv_len)
        for block_s, tiles, warps, stages in itertools.product((32, 64), TILES, (4, 8), (1, 2, 3)):
            split = block_s * tiles
            if split * fd._MAX_SPLITS >= kv_len and split <= kv_len:
                config = dict(split=split, block_s=block_s, num_warps=warps, loop_stages=stages)
                _tune_one(run, [(s,) for s in sets], config, nbytes, default, bw_bytes_per_ms)
        tune_per_group(sets, Tp, kv_len, nbytes, bw_bytes_per_ms)


def tune_per_group(sets: list[dict], Tp: int, kv_len: int, nbytes: int, bw_bytes_per_ms: float) -> None:
    """The cascade's split sizes: slots per prefix split x slots per own split (one own split: the
    split kernel merges the prefix's records, no combine launch; more: the prefix part runs beside
    the own part on a second stream, or before it)."""
    default = bk.graph_ms([functools.partial(_ours, s, kv_len, per_group=True) for s in sets])
    print(f"  per group: default {default:.4f} ms ({100 * nbytes / default / bw_bytes_per_ms:.0f}%)")
    own_tiles = math.ceil((kv_len - Tp) / fd._BLOCK_S)
    run = functools.partial(_ours, kv_len=kv_len, per_group=True)
    prefix_splits = sorted({t * fd._BLOCK_S for t in (1, 2, 4, math.ceil(Tp / fd._BLOCK_S))})
    own_splits = sorted({math.ceil(own_tiles / n) * fd._BLOCK_S for n in (1, 2, 4, 8)}, reverse=True)
    for prefix_split, split in itertools.product(prefix_splits, own_splits):
        for concurrent in (True, False) if split < own_tiles * fd._BLOCK_S else (False,):
            config = dict(prefix_split=prefix_split, split=split, concurrent=concurrent)
            _tune_one(run, [(s,) for s in sets], config, nbytes, default, bw_bytes_per_ms)
    tune_prefix_launch(sets, kv_len, nbytes, default, bw_bytes_per_ms)


def tune_prefix_launch(sets: list[dict], kv_len: int, nbytes: int, default: float, bw_bytes_per_ms: float) -> None:
    """The prefix kernel's launch at the default split sizes: tiles in flight x warps x rows of one
    program's query tile (rows x padded heads <= 128)."""
    g_pad = 1 << (H // HKV - 1).bit_length()
    run = functools.partial(_ours, kv_len=kv_len, per_group=True)
    for stages, warps, rows in itertools.product((1, 2, 3, 4), (2, 4, 8), (1, 2, 4, 8, 16)):
        if rows <= GROUP and rows * g_pad <= 128:
            config = dict(prefix_launch=dict(loop_stages=stages, num_warps=warps, rows_per_prog=rows))
            _tune_one(run, [(s,) for s in sets], config, nbytes, default, bw_bytes_per_ms)


def _tune_attention_call(s: dict, kv_len: int, **launch) -> torch.Tensor:
    return _ours(s, kv_len, True, **launch)


def _tune_one(fn, sets: list[tuple], config: dict, nbytes: int, base_ms: float, bw_bytes_per_ms: float) -> None:
    try:
        ms = bk.graph_ms([functools.partial(fn, *s, **config) for s in sets])
    except Exception as exc:  # e.g. out of shared memory: skip the configuration
        print(f"  {config}: {type(exc).__name__}")
        return
    print(f"  {config}: {ms:.4f} ms ({100 * nbytes / ms / bw_bytes_per_ms:.0f}%, {base_ms / ms:.2f}x)", flush=True)
