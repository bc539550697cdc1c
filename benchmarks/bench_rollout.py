"""Rollout throughput: the own KV-cache sampler vs transformers (eager and compiled) and vLLM, against
the decode bound, on one GPU, same model, prompts and lengths.

    python benchmarks/bench_rollout.py [--arch qwen2.5-1.5b] [--cases 8x8,64x8,64x8-longtail,long-prompt]
                                       [--providers ours,hf-compiled,vllm] [--gpu-memory-utilization 0.5]
                                       [--prompt-len 256] [--new-tokens 1024]
                                       [--vllm-seeded] [--tag NAME] [--out-dir DIR] [--quick]

Random bf16 weights of a real architecture (no download), random prompts, temperature 1. Providers:
  ours         KVCacheSampler (CUDA graphs)
  ours-per-row the same, its decode attention reading each prompt's keys once per row, not per group
  hf           transformers `generate`, eager, dynamic KV cache (slow: 2-4 minutes for all cases)
  hf-compiled  transformers `generate` with its static KV cache, which `generate` compiles itself
               (transformers' recommended path: cache_implementation="static" + its CompileConfig,
               torch.compile mode "reduce-overhead", i.e. CUDA graphs)
  vllm         the repo's VLLMSampler: an in-process vLLM engine, the same weights pushed by `sync`
Cases (P x G = P prompts x G completions each, prompt length, new tokens):
  8x8, 64x8      256-token prompts, 1024 new tokens, every row runs to the limit (stops ignored)
  64x8-longtail  as 64x8, but row i stops after L_i tokens (its last token is EOS), L_i drawn up front
                 from a lognormal (median 15% of the limit, sigma 1), clipped to [2, limit], the longest
                 row set to the limit: most rows stop early, a few run to the limit
  long-prompt    8x8 with 2048-token prompts and 256 new tokens (prefill matters)
  PxG            any other P x G: fixed lengths as 8x8 (--prompt-len / --new-tokens change Tp / Tc of
                 every case but long-prompt)
How the long tail is enforced, identically in effect for every provider: ours and hf see the EOS
logit forced (+1e4 at position L_i - 1, -inf elsewhere: no row stops by chance) and stop on EOS as
in training; vLLM gets per-request max_tokens = L_i (ignore_eos). Every provider must produce
exactly sum(L_i) tokens (checked, `tokens_ok`). tok/s = generated tokens / wall time of the whole
call (prefill, decode, host work; the own sampler captures its CUDA graphs in every call, so that
is included: its detail records how many and their host seconds, `graph_captures`, `capture_s`).
Every provider first runs a warm-up call (ours: the timed call itself, whose KV-length buckets and
compactions each compile their own kernel variants, as a training run's first step does;
hf-compiled: the same shapes, compiling and recording its graphs; vLLM: its own warm-up).
Bounds: decode bound per step = (weight bytes + live KV bytes) / in-run copy bandwidth, where a row
holding token s of its completion counts Tp + s + 0.5 KV slots and a finished row none (for fixed
lengths: N * (Tp + Tc/2), as before); prefill bound = 2 * params * P * Tp FLOPs / in-run bf16 matmul
rate (attention FLOPs ignored). `pct` = tok/s vs tokens / (prefill + decode bound); for ours also
`decode_pct` = decode-phase tok/s vs the decode bound alone (the figure earlier results quote), and
`decode_pct_shared` vs the bound of a decoder that reads each prompt's KV once per step for its
whole group, as the own sampler stores it (SharedPrefix): the ceiling of that layout, lower bytes.
Writes results/rollout[_TAG]_<device>.json (rewritten after every measurement) and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import re
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from common import (
    DEVICE,
    NullTokenizer,
    copy_bandwidth_gbs,
    environment,
    matmul_tflops,
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

FORCED_EOS = 2  # the stop token of the long-tail case (prompts draw ids >= 100)
PROVIDERS = ("ours", "ours-per-row", "hf", "hf-compiled", "vllm")


@dataclass
class Case:
    """One workload: P prompts x G completions, prompt length Tp, at most Tc new tokens; `lengths`
    (N,) are the per-row completion lengths (all Tc unless long-tailed)."""

    name: str
    P: int
    G: int
    Tp: int
    Tc: int
    longtail: bool = False

    @property
    def N(self) -> int:
        return self.P * self.G

    def prompts(self, vocab: int, seed: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(100, vocab - 100, (self.P, self.Tp), generator=g).tolist()

    def lengths(self, seed: int) -> list[int]:
        if not self.longtail:
            return [self.Tc] * self.N
        g = torch.Generator().manual_seed(1000 + seed)
        median = max(2.0, 0.15 * self.Tc)
        raw = torch.exp(math.log(median) + torch.randn(self.N, generator=g))  # lognormal, sigma 1
        lengths = raw.round().clamp(2, self.Tc).long()
        lengths[int(lengths.argmax())] = self.Tc  # the tail reaches the limit
        return lengths.tolist()


def make_cases(names: list[str], quick: bool, prompt_len: int | None, new_tokens: int | None) -> list[Case]:
    """The named cases; any other PxG is P prompts x G completions of the fixed-length shape.
    prompt_len / new_tokens (if given) replace Tp / Tc of every case but long-prompt."""
    Tp, Tc = (16, 12) if quick else (256, 1024)
    Tp, Tc = prompt_len or Tp, new_tokens or Tc
    if quick:  # CPU smoke sizes
        table = {
            "8x8": Case("8x8", 2, 2, Tp, Tc),
            "64x8": Case("64x8", 2, 4, Tp, Tc),
            "64x8-longtail": Case("64x8-longtail", 2, 4, Tp, Tc, longtail=True),
            "long-prompt": Case("long-prompt", 2, 2, 64, 6),
        }
    else:
        table = {
            "8x8": Case("8x8", 8, 8, Tp, Tc),
            "64x8": Case("64x8", 64, 8, Tp, Tc),
            "64x8-longtail": Case("64x8-longtail", 64, 8, Tp, Tc, longtail=True),
            "long-prompt": Case("long-prompt", 8, 8, 2048, 256),
        }
    out = []
    for name in names:
        if name in table:
            out.append(table[name])
        elif re.fullmatch(r"\d+x\d+", name) and min(int(x) for x in name.split("x")) >= 1:
            P, G = (int(x) for x in name.split("x"))
            out.append(Case(name, P, G, Tp, Tc))
        else:
            raise ValueError(f"unknown case {name!r}; known: {', '.join(table)} or any PxG")
    return out


# ------------------------------------------------------------------------------------------------
# bounds


def kv_bytes_per_token(cfg: dict, dtype_bytes: int = 2) -> int:
    heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * heads * head_dim * dtype_bytes


def decode_bound_s(
    lengths: list[int], Tp: int, weight_bytes: int, kv_token: int, bandwidth_gbs: float, group: int | None = None
) -> float:
    """Seconds of an ideal decoder: every step reads the weights once plus the KV of the live rows
    (a row drawing token s holds Tp + s + 0.5 slots on average over the step; finished rows none).
    group: rows i*group .. (i+1)*group - 1 share their prompt's Tp slots, read once a step while
    any of them is live (the own sampler's layout) - the bound of a decoder that shares them."""
    steps = max(lengths)
    live = torch.tensor(lengths)
    total_bytes = 0.0
    for s in range(steps):
        alive = live > s
        if group is None:
            total_bytes += weight_bytes + float(alive.sum()) * (Tp + s + 0.5) * kv_token
        else:
            prompts = float(alive.view(-1, group).any(-1).sum())
            total_bytes += weight_bytes + (prompts * Tp + float(alive.sum()) * (s + 0.5)) * kv_token
    return total_bytes / (bandwidth_gbs * 1e9)


# ------------------------------------------------------------------------------------------------
# forcing the long tail's EOS


class ForcedStops:
    """Per-row stop positions as a logit edit: row i's token L_i - 1 is EOS (logit +1e4) and EOS is
    impossible elsewhere (-inf). The own sampler's `logits_processor` (device tensors only, so it
    runs inside its CUDA graphs, whichever rows are still in its batch)."""

    def __init__(self, lengths: list[int], device: torch.device) -> None:
        self.last = torch.tensor(lengths, device=device) - 1  # (N,) index of each row's EOS

    def edit(self, logits: torch.Tensor, rows: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """logits (n, V) of rows (n,) drawing completion token `step` (1,) -> edited in place."""
        force = self.last[rows] == step  # (n,)
        logits[:, FORCED_EOS] = torch.where(force, 1e4, float("-inf")).to(logits.dtype)
        return logits


def count_until_eos(completions: torch.Tensor) -> int:
    """Tokens of (N, T) completions up to and including each row's first FORCED_EOS (all if none)."""
    is_eos = completions == FORCED_EOS
    hit = is_eos.any(-1)
    first = is_eos.int().argmax(-1) + 1
    return int(torch.where(hit, first, completions.shape[1]).sum())


# ------------------------------------------------------------------------------------------------
# providers: each is built once and runs every case


class Ours:
    timed = "KVCacheSampler.generate (prefill, CUDA-graph capture and decode, rollout assembly)"

    def __init__(self, model, prefix_per_group: bool = True) -> None:
        self.model = model
        self.sampler = KVCacheSampler(model, NullTokenizer(), prefix_per_group=prefix_per_group)

    def run(self, case: Case, prompts, lengths) -> dict:
        stop = dict(stop_ids=(FORCED_EOS,)) if case.longtail else dict(ignore_stop=True)
        params = SamplingParams(n=case.G, temperature=1.0, max_new_tokens=case.Tc, **stop)
        stops = ForcedStops(lengths, DEVICE) if case.longtail else None
        self.sampler.logits_processor = None if stops is None else stops.edit
        try:
            # warm-up: the same call. Triton compiles a kernel variant per KV-length bucket and batch
            # size met (split counts), once per process as in training; the timed call still
            # captures its CUDA graphs, as every training step does
            self.sampler.generate(prompts, params)
            base = reset_peak()
            sync()
            t0 = time.perf_counter()
            out = self.sampler.generate(prompts, params)
            sync()
            seconds = time.perf_counter() - t0
        finally:
            self.sampler.logits_processor = None
        return {
            "seconds": seconds,
            "prefill_s": out.stats["prefill_s"],
            "decode_s": out.stats["decode_s"],
            "decode_steps": out.stats["decode_steps"],
            "compactions": out.stats["compactions"],
            "graph_captures": out.stats["graph_captures"],
            "capture_s": out.stats["capture_s"],
            "tokens": int(out.completion_mask.sum()),
            "peak_extra_gib": (peak_bytes() - base) / 2**30,
        }

    def close(self) -> None:
        pass


class HF:
    """transformers' generate on the same architecture (its own random init), eager or compiled."""

    def __init__(self, cfg: dict, dtype: torch.dtype, compiled: bool) -> None:
        import transformers

        self.compiled = compiled
        self.timed = (
            "model.generate with cache_implementation='static' (auto-compiled forward; warm-up of the same "
            "shapes first)"
            if compiled
            else "model.generate, eager, dynamic cache"
        )
        config = transformers.AutoConfig.for_model(**cfg)
        with torch.device(DEVICE):
            self.model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        self.model.eval()
        self.version = transformers.__version__

    def _generate(self, ids: torch.Tensor, case: Case, processors, stop_after: int | None):
        import transformers

        kwargs = dict(
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            num_return_sequences=case.G,
            pad_token_id=0,
            max_new_tokens=case.Tc,
        )
        if case.longtail:
            kwargs.update(eos_token_id=FORCED_EOS, logits_processor=transformers.LogitsProcessorList(processors))
        else:
            kwargs.update(min_new_tokens=case.Tc)
        if self.compiled:
            kwargs.update(cache_implementation="static")
        if stop_after is not None:  # warm-up: the same shapes (static cache size), stopped early
            kwargs["stopping_criteria"] = transformers.StoppingCriteriaList([_StopAfter(ids.shape[1] + stop_after)])
        return self.model.generate(ids, **kwargs)

    @torch.no_grad()
    def run(self, case: Case, prompts, lengths) -> dict:
        ids = torch.tensor(prompts, device=DEVICE)
        processors = [_HFForcedStops(lengths, ids.shape[1])] if case.longtail else []
        warm_steps = 4 if DEVICE.type == "cpu" else 16
        self._generate(ids, case, processors, stop_after=warm_steps)
        base = reset_peak()
        sync()
        t0 = time.perf_counter()
        out = self._generate(ids, case, processors, stop_after=None)
        sync()
        seconds = time.perf_counter() - t0
        completions = out[:, ids.shape[1] :]
        tokens = count_until_eos(completions) if case.longtail else completions.numel()
        detail = {"seconds": seconds, "tokens": int(tokens), "peak_extra_gib": (peak_bytes() - base) / 2**30}
        if self.compiled:
            detail["forward_compiled"] = getattr(self.model, "_compiled_call", None) is not None
        return detail

    def close(self) -> None:
        del self.model
        if self.compiled:  # drop the compiled graphs and their CUDA-graph memory pool
            torch._dynamo.reset()


class _StopAfter:
    """A transformers stopping criterion: every row done once the sequences reach `length` tokens."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = input_ids.shape[1] >= self.length
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class _HFForcedStops:
    """ForcedStops as a transformers logits processor (the position is the sequence length - Tp)."""

    def __init__(self, lengths: list[int], Tp: int) -> None:
        self.stops = ForcedStops(lengths, DEVICE)
        self.Tp = Tp

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = torch.tensor(input_ids.shape[1] - self.Tp, device=scores.device)
        return self.stops.edit(scores, torch.arange(scores.shape[0], device=scores.device), step)


class VLLM:
    def __init__(self, model, cases: list[Case], gpu_memory_utilization: float, seeded: bool) -> None:
        from minigrpo.sampling.vllm_sampler import VLLMSampler

        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        import vllm

        self.version = vllm.__version__
        self.seeded = seeded
        self.timed = (
            "VLLMSampler.generate (fixed lengths) / llm.generate with per-request max_tokens = L_i and the "
            "reading of tokens and log-probs (long tail); the prefix cache is reset before each call"
        )
        t0 = time.perf_counter()
        self.sampler = VLLMSampler(
            model,
            NullTokenizer(),
            max_model_len=max(c.Tp + c.Tc for c in cases),
            max_num_seqs=max(c.N for c in cases),
            gpu_memory_utilization=gpu_memory_utilization,
            seed=0,
        )
        self.startup_s = time.perf_counter() - t0
        self.sync_stats = dict(self.sampler.last_sync)

    def run(self, case: Case, prompts, lengths) -> dict:
        sampler = self.sampler
        key = (0, 1) if self.seeded else None
        sampler.generate([p[:16] for p in prompts[:2]], SamplingParams(n=2, max_new_tokens=8, ignore_stop=True))
        sampler.llm.reset_prefix_cache()  # nothing cached from earlier calls (the G copies of a prompt may share)
        sync()
        t0 = time.perf_counter()
        if case.longtail:
            tokens = self._generate_lengths(prompts, case.G, lengths, key)
        else:
            params = SamplingParams(n=case.G, temperature=1.0, max_new_tokens=case.Tc, ignore_stop=True)
            tokens = int(sampler.generate(prompts, params, key=key).completion_mask.sum())
        sync()
        return {"seconds": time.perf_counter() - t0, "tokens": tokens}

    def _generate_lengths(self, prompts, G: int, lengths: list[int], key) -> int:
        """What VLLMSampler.generate sends, with row i's max_tokens = L_i -> tokens generated."""
        from vllm import SamplingParams as VParams

        from minigrpo.sampling.base import row_seed

        requests = [{"prompt_token_ids": prompts[i // G]} for i in range(len(lengths))]
        vparams = [
            VParams(
                n=1,
                temperature=1.0,
                max_tokens=length,
                ignore_eos=True,
                logprobs=0,
                detokenize=False,
                seed=None if key is None else row_seed(key, i),
            )
            for i, length in enumerate(lengths)
        ]
        outputs = self.sampler.llm.generate(requests, vparams, use_tqdm=False)
        tokens = 0
        for out in outputs:
            c = out.outputs[0]
            logp = [c.logprobs[j][t].logprob for j, t in enumerate(c.token_ids)]
            tokens += len(logp)
        return tokens

    def close(self) -> None:
        self.sampler.close()
        del self.sampler


def build_provider(name: str, model, cfg: dict, dtype: torch.dtype, cases: list[Case], args):
    if name in ("ours", "ours-per-row"):
        return Ours(model, prefix_per_group=name == "ours")
    if name in ("hf", "hf-compiled"):
        return HF(cfg, dtype, compiled=name == "hf-compiled")
    if name == "vllm":
        return VLLM(model, cases, args.gpu_memory_utilization, args.vllm_seeded)
    raise ValueError(f"unknown provider {name!r}; known: {', '.join(PROVIDERS)}")


def free_memory() -> None:
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="qwen2.5-1.5b")
    ap.add_argument("--cases", default="8x8,64x8,64x8-longtail,long-prompt")
    ap.add_argument("--providers", default="ours,hf-compiled,vllm", help=f"any of {','.join(PROVIDERS)}")
    ap.add_argument("--prompt-len", type=int, default=None, help="Tp of every case but long-prompt (default 256)")
    ap.add_argument("--new-tokens", type=int, default=None, help="Tc of every case but long-prompt (default 1024)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5, help="vLLM's share of the GPU")
    ap.add_argument("--vllm-seeded", action="store_true", help="seed every vLLM request as training does")
    ap.add_argument("--tag", default="", help="result file rollout_<tag>_<device>.json")
    ap.add_argument("--out-dir", default=None, help="write the JSON here instead of benchmarks/results")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run), smollm2-135m")
    args = ap.parse_args()
    providers = [p for p in args.providers.split(",") if p]
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        ap.error(f"--providers: unknown {', '.join(unknown)} (known: {', '.join(PROVIDERS)})")
    providers = [p for p in PROVIDERS if p in providers]  # vLLM last: its engine is never fully torn down
    if args.quick:
        args.arch = "smollm2-135m"
    if (args.prompt_len is not None and args.prompt_len < 1) or (args.new_tokens is not None and args.new_tokens < 2):
        ap.error("--prompt-len must be >= 1 and --new-tokens >= 2")
    try:
        cases = make_cases([c for c in args.cases.split(",") if c], args.quick, args.prompt_len, args.new_tokens)
    except ValueError as e:
        ap.error(f"--cases: {e}")
    env = environment()
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32  # vLLM's CPU backend: fp32
    cfg = preset_config(args.arch)
    bandwidth = copy_bandwidth_gbs()
    matmul = matmul_tflops()
    model = build_random(cfg, dtype=dtype, device=DEVICE, seed=0).eval()
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_token = kv_bytes_per_token(cfg, dtype.itemsize)

    rows: dict[str, dict] = {}
    inputs = {}
    for i, case in enumerate(cases):
        lengths = case.lengths(i)
        inputs[case.name] = (case.prompts(cfg["vocab_size"], seed=i), lengths)
        tokens = sum(lengths)
        dec_s = decode_bound_s(lengths, case.Tp, weight_bytes, kv_token, bandwidth)
        shared_s = decode_bound_s(lengths, case.Tp, weight_bytes, kv_token, bandwidth, group=case.G)
        pre_s = 2 * params * case.P * case.Tp / (matmul * 1e12)
        ordered = sorted(lengths)
        rows[case.name] = {
            "case": case.name,
            "prompts": case.P,
            "group": case.G,
            "sequences": case.N,
            "prompt_len": case.Tp,
            "max_new_tokens": case.Tc,
            "tokens": tokens,
            "lengths": None if not case.longtail else lengths,
            "length_stats": {
                "mean": tokens / case.N,
                "median": ordered[case.N // 2],
                "p90": ordered[int(0.9 * (case.N - 1))],
                "at_limit": sum(x == case.Tc for x in lengths),
            },
            "decode_bound_s": dec_s,
            "prefill_bound_s": pre_s,
            "decode_bound_tok_s": tokens / dec_s,
            "shared_decode_bound_s": shared_s,
            "shared_decode_bound_tok_s": tokens / shared_s,
            "bound_tok_s": tokens / (pre_s + dec_s),
        }
    payload = {
        "environment": env,
        "arch": args.arch,
        "dtype": str(dtype).removeprefix("torch."),
        "params": params,
        "weights_gb": weight_bytes / 1e9,
        "copy_gbs": bandwidth,
        "matmul_tflops": matmul,
        "providers": providers,
        "how": __doc__,
        "provider_info": {},
        "rows": list(rows.values()),
    }

    def save() -> Path:
        name = f"rollout_{args.tag}" if args.tag else "rollout"
        return write_result(name, payload, out_dir=args.out_dir)

    for name in providers:
        free_memory()
        try:
            provider = build_provider(name, model, cfg, dtype, cases, args)
        except Exception as e:  # record and go on: one failure must not lose the other rows
            message = f"{type(e).__name__}: {e}"
            print(f"{name} failed to start: {message}", flush=True)
            payload["provider_info"][name] = {"error": message, "traceback": traceback.format_exc()}
            save()
            continue
        info = {"timed": provider.timed}
        for attr in ("version", "startup_s", "sync_stats", "seeded"):
            if hasattr(provider, attr):
                info[attr] = getattr(provider, attr)
        payload["provider_info"][name] = info
        for case in cases:
            row = rows[case.name]
            prompts, lengths = inputs[case.name]
            try:
                r = provider.run(case, prompts, lengths)
            except Exception as e:
                message = f"{type(e).__name__}: {e}"
                print(f"{name} {case.name} failed: {message}", flush=True)
                row[f"{name}_error"] = message
                save()
                continue
            r["tokens_ok"] = r["tokens"] == row["tokens"]
            tok_s = r["tokens"] / r["seconds"]
            row[f"{name}_tok_s"] = tok_s
            row[f"{name}_pct"] = 100 * tok_s / row["bound_tok_s"]
            if "decode_s" in r:
                row[f"{name}_decode_pct"] = 100 * (r["tokens"] / r["decode_s"]) / row["decode_bound_tok_s"]
                shared_bound = row["shared_decode_bound_tok_s"]
                row[f"{name}_decode_pct_shared"] = 100 * (r["tokens"] / r["decode_s"]) / shared_bound
                row[f"{name}_ms_step"] = r["decode_s"] / max(r["decode_steps"], 1) * 1e3
            row[f"{name}_detail"] = r
            if "ours_tok_s" in row and "vllm_tok_s" in row:
                row["ours/vllm"] = row["ours_tok_s"] / row["vllm_tok_s"]
            flag = "" if r["tokens_ok"] else f"  TOKENS {r['tokens']} != {row['tokens']}"
            print(f"{name:12s} {case.name:14s} {tok_s:12,.0f} tok/s  {row[f'{name}_pct']:5.1f}% of bound{flag}")
            save()
        provider.close()
        del provider
    path = save()
    head = f"{env['device']}, torch {env['torch']}, {args.arch} {payload['dtype']}"
    print(f"\n{head}, copy {bandwidth:.0f} GB/s, matmul {matmul:.1f} TFLOP/s -> {path}")
    cols = ["case", "sequences", "tokens", "bound_tok_s", "ours_decode_pct", "ours_decode_pct_shared", "ours_ms_step"]
    for p in providers:
        cols += [f"{p}_tok_s", f"{p}_pct"]
    print_table(list(rows.values()), [*cols, "ours/vllm"])
    errors = {p: i["error"] for p, i in payload["provider_info"].items() if "error" in i}
    errors.update({f"{r['case']} {k[:-6]}": v for r in rows.values() for k, v in r.items() if k.endswith("_error")})
    for where, message in errors.items():
        print(f"failed: {where}: {message}")


if __name__ == "__main__":
    run_cli(lambda _: main())  # a bad argument is one `error:` line
