"""Rollout throughput: our KV-cache sampler vs transformers' `generate`, against the decode bound.

    python benchmarks/bench_rollout.py [--arch qwen2.5-1.5b] [--cases 8x8,64x8] [--new-tokens 1024]
                                       [--prompt-len 256] [--providers ours,hf] [--quick]

Random weights of a real architecture (no download), bf16, random prompts, fixed-length
completions (`ignore_stop`), temperature 1. A case PxG samples G completions for each of P
prompts. Decode bound per step = (weight bytes + mean live KV bytes) / in-run copy bandwidth, and
tokens/s bound = N / that. transformers runs the same architecture with its own random init.
Writes results/rollout_<device>.json and prints a table.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import (
    DEVICE,
    NullTokenizer,
    copy_bandwidth_gbs,
    environment,
    peak_bytes,
    print_table,
    reset_peak,
    sync,
    write_result,
)

from minigrpo.errors import ArgumentParser, run_cli
from minigrpo.models.loading import build_random
from minigrpo.models.presets import preset_config
from minigrpo.sampling.kv_sampler import KVCacheSampler
from minigrpo.sampling.params import SamplingParams


def kv_bytes_per_token(cfg: dict, dtype_bytes: int = 2) -> int:
    heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * heads * head_dim * dtype_bytes


def run_ours(model, prompts, G: int, new_tokens: int) -> dict:
    sampler = KVCacheSampler(model, NullTokenizer())
    params = SamplingParams(n=G, temperature=1.0, max_new_tokens=new_tokens, ignore_stop=True)
    sampler.generate([p[:16] for p in prompts[:2]], SamplingParams(n=2, max_new_tokens=40, ignore_stop=True))  # warm-up
    base = reset_peak()
    t0 = time.perf_counter()
    out = sampler.generate(prompts, params)
    sync()
    total = time.perf_counter() - t0
    return {
        "seconds": total,
        "prefill_s": out.stats["prefill_s"],
        "decode_s": out.stats["decode_s"],
        "tokens": int(out.completion_mask.sum()),
        "peak_extra_gib": (peak_bytes() - base) / 2**30,
    }


def run_hf(cfg: dict, prompts, G: int, new_tokens: int) -> dict:
    import transformers

    config = transformers.AutoConfig.for_model(**cfg)
    with torch.device(DEVICE):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.eval()
    ids = torch.tensor(prompts, device=DEVICE)
    kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=G, pad_token_id=0)
    model.generate(ids[:2, :16], max_new_tokens=8, min_new_tokens=8, **kwargs)  # warm-up
    sync()
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    sync()
    seconds = time.perf_counter() - t0
    del model
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
    return {"seconds": seconds, "tokens": int((out.shape[1] - ids.shape[1]) * out.shape[0])}


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="qwen2.5-1.5b")
    ap.add_argument("--cases", default="8x8,64x8")
    ap.add_argument("--new-tokens", type=int, default=1024)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--providers", default="ours,hf")
    ap.add_argument("--quick", action="store_true", help="a small smoke run")
    args = ap.parse_args()
    if args.quick:
        args.arch, args.cases, args.new_tokens, args.prompt_len = "smollm2-135m", "2x4", 16, 16
    env = environment()
    cfg = preset_config(args.arch)
    bandwidth = copy_bandwidth_gbs()
    model = build_random(cfg, dtype=torch.bfloat16, device=DEVICE)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_token = kv_bytes_per_token(cfg)
    rows = []
    for case in args.cases.split(","):
        P, G = (int(x) for x in case.split("x"))
        N = P * G
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(100, cfg["vocab_size"] - 100, (P, args.prompt_len), generator=g).tolist()
        mean_live = args.prompt_len + args.new_tokens / 2
        step_bound_s = (weight_bytes + N * mean_live * kv_token) / (bandwidth * 1e9)
        bound = N / step_bound_s
        row = {"case": case, "sequences": N, "bound_tok_s": bound, "step_bound_ms": step_bound_s * 1e3}
        for provider in args.providers.split(","):
            try:
                r = (
                    run_ours(model, prompts, G, args.new_tokens)
                    if provider == "ours"
                    else run_hf(cfg, prompts, G, args.new_tokens)
                )
            except Exception as e:  # report and go on: one failure must not lose the other rows
                print(f"{provider} {case} failed: {type(e).__name__}: {e}")
                continue
            decode_s = r.get("decode_s", r["seconds"])
            row[f"{provider}_tok_s"] = r["tokens"] / r["seconds"]
            row[f"{provider}_ms_step"] = decode_s / args.new_tokens * 1e3
            row[f"{provider}_pct_bound"] = 100 * (r["tokens"] / decode_s) / bound
            row[f"{provider}_detail"] = r
        if "ours_tok_s" in row and "hf_tok_s" in row:
            row["speedup_vs_hf"] = row["ours_tok_s"] / row["hf_tok_s"]
        rows.append(row)
        print(row, flush=True)
    payload = {
        "environment": env,
        "arch": args.arch,
        "weights_gb": weight_bytes / 1e9,
        "copy_gbs": bandwidth,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "rows": rows,
    }
    path = write_result("rollout", payload)
    print(f"\n{env['device']}, torch {env['torch']}, {args.arch} bf16, copy {bandwidth:.0f} GB/s -> {path.name}")
    cols = ["case", "sequences", "bound_tok_s", "ours_tok_s", "ours_pct_bound", "ours_ms_step", "hf_tok_s"]
    print_table(rows, [*cols, "speedup_vs_hf"])


if __name__ == "__main__":
    run_cli(lambda _: main())  # a bad argument is one `error:` line
