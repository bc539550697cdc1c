"""vLLM weight sync and rollout speed: how long a sync takes, what it costs in memory, how fast vLLM samples.

    python benchmarks/bench_sync.py [--sizes 10m,50m,150m] [--dtype float32] [--rollout 8x8]
                                    [--prompt-len 64] [--new-tokens 128] [--reps 3] [--quick]

Needs vLLM (on the CPU: `bash .ci/install_vllm.sh`, then run with .venv/vllm/bin/python). For each
model size (random Llama weights; `--sizes` also takes architecture presets such as qwen2.5-1.5b)
one in-process `VLLMSampler` is built, then every sync variant pushes the same weights `--reps` times:
  stream     the whole model streamed through one `reload_weights` call (bucket_mb=None)
  bucket512  buckets of whole layers, >= 512 MB per call (the default)
  layer      one layer per call (bucket_mb=0)
  tensor     one tensor per call: time only, it is NOT a correct sync (a call holding q alone
             leaves k/v of the fused qkv parameter unset; the weights are re-synced after it)
  verify     the check after a sync (fingerprints + log-prob probe), timed alone
Memory: peak extra resident memory during the sync (CPU: VmHWM reset through /proc/self/clear_refs
before each variant; GPU: peak allocated bytes). Rollout: the same prompts (P x G, random ids,
fixed-length completions, temperature 1) sampled by vLLM and by the own sampler, tokens/s.
Writes results/sync_<device>.json and prints a table.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from common import DEVICE, NullTokenizer, environment, peak_bytes, print_table, reset_peak, sync, write_result

from minigrpo.errors import ArgumentParser, run_cli
from minigrpo.models.loading import build_random
from minigrpo.models.presets import preset_config
from minigrpo.sampling.kv_sampler import KVCacheSampler
from minigrpo.sampling.params import SamplingParams
from minigrpo.sampling.vllm_sampler import VLLMSampler
from minigrpo.sampling.vllm_sync import policy_weights_for_sync, worker_load


def llama(vocab: int, dim: int, layers: int, heads: int, ffn: int) -> dict:
    return dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        hidden_act="silu",
        vocab_size=vocab,
        hidden_size=dim,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        initializer_range=0.02,
    )


SIZES = {  # head_dim 64 throughout (a size the CPU attention backend supports)
    "10m": llama(8192, 256, 6, 4, 768),
    "50m": llama(16384, 512, 10, 8, 1536),
    "150m": llama(32000, 768, 12, 12, 2304),
}
VARIANTS = {"stream": None, "bucket512": 512.0, "layer": 0.0}


# ------------------------------------------------------------------------------------------------
# memory


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def mem_start() -> int:
    """Reset the peak counter; returns the current usage in bytes (GPU: allocated, CPU: RSS)."""
    if DEVICE.type == "cuda":
        return reset_peak()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    return _rss_kib("VmRSS") * 1024


def mem_peak_extra(base: int) -> int:
    return (peak_bytes() if DEVICE.type == "cuda" else _rss_kib("VmHWM") * 1024) - base


# ------------------------------------------------------------------------------------------------
# measurements


def time_sync(sampler: VLLMSampler, model, bucket_mb: float | None, reps: int) -> dict:
    sampler.bucket_bytes = None if bucket_mb is None else int(bucket_mb * 2**20)
    sampler.verify_sync = False  # timed separately
    sampler.sync(model)  # warm-up
    times, calls, extra = [], 0.0, 0
    for _ in range(reps):
        base = mem_start()
        sync()
        t0 = time.perf_counter()
        sampler.sync(model)
        stats = sampler.last_sync
        sync()
        times.append(time.perf_counter() - t0)
        extra = max(extra, mem_peak_extra(base))
        calls = stats["sync_calls"]
    return {"sync_s": min(times), "calls": calls, "peak_extra_mb": extra / 2**20}


def time_per_tensor(sampler: VLLMSampler, model, reps: int) -> dict:
    times, calls, extra = [], 0, 0
    for _ in range(reps):
        base = mem_start()
        sync()
        t0 = time.perf_counter()
        calls = 0
        for name, t in policy_weights_for_sync(model):
            sampler.llm.collective_rpc(worker_load, args=([(name, t)],))
            calls += 1
        sampler.llm.reset_prefix_cache()
        sync()
        times.append(time.perf_counter() - t0)
        extra = max(extra, mem_peak_extra(base))
    sampler.bucket_bytes = None
    sampler.sync(model)  # put correct weights back
    return {"sync_s": min(times), "calls": float(calls), "peak_extra_mb": extra / 2**20}


def time_verify(sampler: VLLMSampler, model, reps: int) -> dict:
    sampler.verify_sync = True
    sampler.sync(model)
    times, out = [], {}
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        out = sampler.verify(model)
        sync()
        times.append(time.perf_counter() - t0)
    return {"verify_s": min(times), **out}


def time_rollout(generate, prompts, params: SamplingParams) -> dict:
    generate(prompts[:2], SamplingParams(n=2, max_new_tokens=8, ignore_stop=True))  # warm-up
    sync()
    t0 = time.perf_counter()
    r = generate(prompts, params)
    sync()
    seconds = time.perf_counter() - t0
    tokens = int(r.completion_mask.sum())
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}


def bench_size(name: str, cfg: dict, dtype: torch.dtype, args) -> tuple[dict, list[dict]]:
    model = build_random(cfg, dtype=dtype, device=DEVICE, seed=0).eval()
    n_params = sum(p.numel() for p in model.parameters())
    P, G = (int(x) for x in args.rollout.split("x"))
    max_len = args.prompt_len + args.new_tokens
    t0 = time.perf_counter()
    sampler = VLLMSampler(model, NullTokenizer(), max_model_len=max_len, max_num_seqs=max(P * G, 8), seed=0)
    startup = time.perf_counter() - t0
    info = {
        "size": name,
        "params_m": n_params / 1e6,
        "weights_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
        "startup_s": startup,
    }
    rows = []
    for variant, bucket in VARIANTS.items():
        rows.append({**info, "variant": variant, **time_sync(sampler, model, bucket, args.reps)})
    rows.append({**info, "variant": "tensor", **time_per_tensor(sampler, model, args.reps)})
    verify = time_verify(sampler, model, args.reps)
    rows.append({**info, "variant": "verify", "sync_s": verify["verify_s"], **verify})

    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, cfg["vocab_size"], (P, args.prompt_len), generator=gen).tolist()
    params = SamplingParams(n=G, temperature=1.0, max_new_tokens=args.new_tokens, ignore_stop=True)
    rollout = {
        "size": name,
        "rollout": args.rollout,
        "vllm": time_rollout(sampler.generate, prompts, params),
        "own": time_rollout(KVCacheSampler(model, NullTokenizer()).generate, prompts, params),
    }
    sampler.close()
    del sampler, model
    return rollout, rows


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10m,50m,150m")
    parser.add_argument("--dtype", default=None, help="default: float32 on the CPU, bfloat16 on GPU")
    parser.add_argument("--rollout", default="8x8", help="P x G: prompts x completions per prompt")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="10m only, short rollouts (writes sync_quick_*.json)")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.new_tokens, args.reps = "10m", 32, 2
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    dtype = getattr(torch, args.dtype or ("bfloat16" if DEVICE.type == "cuda" else "float32"))
    env = environment()
    import vllm

    env["vllm"] = vllm.__version__
    sync_rows, rollouts = [], []
    for name in args.sizes.split(","):
        cfg = SIZES[name] if name in SIZES else preset_config(name)
        rollout, rows = bench_size(name, cfg, dtype, args)
        sync_rows += rows
        rollouts.append(rollout)
        print(f"{name}: done", flush=True)
    print()
    print_table(
        sync_rows,
        [
            "size",
            "params_m",
            "weights_mb",
            "startup_s",
            "variant",
            "calls",
            "sync_s",
            "peak_extra_mb",
            "probe_diff_max",
        ],
    )
    print()
    table = [
        {
            "size": r["size"],
            "rollout": r["rollout"],
            "tokens": r["vllm"]["tokens"],
            "vllm_tok_s": r["vllm"]["tokens_per_s"],
            "own_tok_s": r["own"]["tokens_per_s"],
            "vllm/own": r["vllm"]["tokens_per_s"] / r["own"]["tokens_per_s"],
        }
        for r in rollouts
    ]
    print_table(table, ["size", "rollout", "tokens", "vllm_tok_s", "own_tok_s", "vllm/own"])
    payload = {
        "environment": env,
        "dtype": str(dtype).removeprefix("torch."),
        "args": vars(args),
        "sync": sync_rows,
        "rollout": rollouts,
    }
    print(f"\nwrote {write_result('sync_quick' if args.quick else 'sync', payload)}")


if __name__ == "__main__":
    run_cli(lambda _: main())  # a bad argument is one `error:` line
