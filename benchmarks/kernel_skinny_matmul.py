"""The decode linear case of bench_kernels.py (`--cases skinny_matmul`, `--tune`).

A decode step's linear layers for Qwen2.5-1.5B (q/o, k/v, gate/up, down and, for scale, q|k|v and
gate|up as one matrix) at M = 8 and 64 rows, bf16 with the layer's bias where it has one.
Forward only (sampling). Providers:
    ours      kernels/skinny_matmul.py: the K-split grid and its deterministic reduction
    cublas    F.linear (what the sampler runs otherwise)
Times are CUDA-graph replays of 20 calls cycling through weight sets larger than the 50 MB L2 (a
decode step reads each weight once, from memory), so GB/s = (weight + bias + x + y) bytes / time,
against the in-run copy bandwidth. Correctness: relative error against fp64. The tune mode sweeps
(BLOCK_N, BLOCK_K, columns of K per split) at the same shapes.
"""

from __future__ import annotations

import functools
import math

import bench_kernels as bk
import torch
import torch.nn.functional as F

from minigrpo.kernels import skinny_linear
from minigrpo.kernels import skinny_matmul as sm

D, F_MLP, KV = 1536, 8960, 256  # Qwen2.5-1.5B: model dim, MLP width, k/v width
SHAPES = {  # name -> (N, K, bias)
    "q": (D, D, True),
    "k": (KV, D, True),
    "o": (D, D, False),
    "gate": (F_MLP, D, False),
    "down": (D, F_MLP, False),
    "qkv": (D + 2 * KV, D, True),
    "gate_up": (2 * F_MLP, D, False),
}


def _sets(M: int, N: int, K: int, bias: bool) -> list[tuple]:
    """Input sets (x, W, b) whose weights together exceed the L2, so each call reads W from memory."""
    n_sets = max(2, math.ceil(200e6 / (2 * N * K)))
    out = []
    for _ in range(n_sets):
        x = torch.randn(M, K, device=bk.DEV, dtype=torch.bfloat16)
        w = (torch.randn(N, K, device=bk.DEV) / K**0.5).to(torch.bfloat16)
        b = torch.randn(N, device=bk.DEV, dtype=torch.bfloat16) if bias else None
        out.append((x, w, b))
    return out


def _check(f, inputs: tuple, spec: torch.Tensor) -> tuple[float, float]:
    return bk.rel_err([f(*inputs)], [spec])


def bench_skinny_matmul(ceil: dict, quick: bool) -> list[dict]:
    rows = []
    names = ("q", "gate", "down") if quick else tuple(SHAPES)
    providers = {"ours": functools.partial(skinny_linear, impl="triton"), "cublas": F.linear}
    for M in (8, 64):
        for name in names:
            N, K, bias = SHAPES[name]
            sets = _sets(M, N, K, bias)
            x, w, b = sets[0]
            spec = F.linear(x.double(), w.double(), None if b is None else b.double())
            nbytes = 2 * (N * K + M * K + M * N + (N if bias else 0))
            for prov, f in providers.items():
                row = {"case": f"decode_linear_{name}", "shape": [M, N, K], "provider": prov, "bytes": nbytes}
                calls = [functools.partial(f, *s) for s in sets]
                check = functools.partial(_check, f, sets[0], spec)
                bk.run_provider(row, calls[0], check, calls)
                bk.finish(row, ceil, nbytes=nbytes)
                rows.append(row)
            if "graph_ms" in rows[-1] and "graph_ms" in rows[-2]:
                rows[-2]["speedup_vs_cublas"] = rows[-1]["graph_ms"] / rows[-2]["graph_ms"]
                print(f"  {name} M={M}: ours {rows[-2]['speedup_vs_cublas']:.2f}x cuBLAS", flush=True)
    return rows


def tune(bw_bytes_per_ms: float) -> None:
    """GPU ms and % of the copy bandwidth of every launch configuration at each shape, M = 64."""
    for name, (N, K, bias) in SHAPES.items():
        sets = _sets(64, N, K, bias)
        nbytes = 2 * N * K
        base = bk.graph_ms([functools.partial(F.linear, *s) for s in sets])
        print(f"{name} N={N} K={K}: cuBLAS {base:.4f} ms ({100 * nbytes / base / bw_bytes_per_ms:.0f}%)")
        for block_n in (32, 64, 128):
            for block_k in (64, 128, 256):
                for tiles in (1, 2, 3, 4, 6, 8, 12):
                    k_split = tiles * block_k
                    if k_split > K:
                        continue
                    config = dict(k_split=k_split, block_n=block_n, block_k=block_k)
                    launch = functools.partial(sm._skinny_linear_triton, **config)
                    try:
                        ms = bk.graph_ms([functools.partial(launch, *s) for s in sets])
                    except Exception as exc:  # e.g. out of shared memory: skip the configuration
                        print(f"  n{block_n} k{block_k} split {k_split}: {type(exc).__name__}")
                        continue
                    pct = 100 * nbytes / ms / bw_bytes_per_ms
                    print(f"  n{block_n} k{block_k} split {k_split}: {ms:.4f} ms ({pct:.0f}%, {base / ms:.2f}x)")
