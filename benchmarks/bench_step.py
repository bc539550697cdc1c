"""One full GRPO step on one GPU, split by phase, and the update phase's model-FLOPs utilisation.

    python benchmarks/bench_step.py [--arch qwen2.5-1.5b] [--prompts 16] [--group 8]
                                    [--prompt-len 256] [--new-tokens 512] [--micro 16] [--runs 4]
                                    [--profile] [--quick] [--out-dir DIR]

Random weights of a real architecture, bf16 compute with fp32 master weights and AdamW (full
fine-tuning), fixed-length completions, random rewards (so that every group has a spread).
Phases: rollout (own sampler), an old/reference log-prob pass (what num_iterations > 1 or beta > 0
add), and the update (micro-batched forward + backward through the chunked log-prob kernel, clip,
optimizer step). The first run compiles kernels; the summary is the median of the later runs
(`--runs`, 4 by default: run-to-run spread of the update is about 1-2%).

Model FLOPs of the update = 6 * (non-embedding params) * tokens + 6 * D * V * completion tokens
+ 6 * L * T^2 * H * Dh per sequence (causal attention, fwd + bwd): recomputation is not counted.
MFU = model FLOPs / time / in-run bf16 matmul rate (and / 989 TFLOP/s, the H100 datasheet).
--profile: one more update under torch.profiler; its GPU kernel time by kind (matmul, attention,
each Triton kernel, ...) and the largest kernels go into the result, with the time the GPU had
no kernel running (the update's wall time minus the kernels', profiler overhead included).
Writes results/step_<device>.json and prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch
from common import (
    DEVICE,
    NullTokenizer,
    add_workload_arguments,
    environment,
    kernel_kind,
    matmul_tflops,
    out_folder,
    peak_bytes,
    positive_int,
    print_table,
    reset_peak,
    step_workload,
    sync,
    write_result,
)

from minigrpo.build import build_sampler, load_policy
from minigrpo.errors import ArgumentParser, run_cli
from minigrpo.optim import build_optimizer, build_scheduler
from minigrpo.sampling.params import SamplingParams
from minigrpo.step import Batch, logprobs_phase, update_phase


def timed(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def profile_update(run_update) -> dict:
    """GPU kernel time of one update by kernel kind, its largest kernels, and the GPU's idle time."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if DEVICE.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        _, wall = timed(run_update)
    kinds: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    names: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in prof.profiler.kineto_results.events():
        if e.device_type() != torch.autograd.DeviceType.CUDA:
            continue
        ms = e.duration_ns() / 1e6
        for table, key in ((kinds, kernel_kind(e.name())), (names, e.name()[:120])):
            table[key][0] += ms
            table[key][1] += 1
    kernels_ms = sum(v[0] for v in kinds.values())
    top = sorted(names.items(), key=lambda kv: -kv[1][0])[:15]
    return {
        "wall_ms": wall * 1e3,
        "kernels_ms": kernels_ms,
        "gpu_idle_ms": wall * 1e3 - kernels_ms,
        "by_kind": {k: {"ms": v[0], "kernels": v[1]} for k, v in sorted(kinds.items(), key=lambda kv: -kv[1][0])},
        "top_kernels": [{"name": k, "ms": v[0], "kernels": v[1]} for k, v in top],
    }


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(ap)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--runs", type=positive_int, default=4, help="steps run; the first is the warm-up")
    ap.add_argument("--profile", action="store_true", help="profile one more update (kernel time by kind)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out-dir", type=out_folder, default=None, help="write the JSON here, not in benchmarks/results")
    args = ap.parse_args()
    if args.quick:
        args.arch, args.prompts, args.group, args.prompt_len, args.new_tokens, args.micro = (
            "smollm2-135m",
            2,
            4,
            16,
            16,
            4,
        )
    env = environment()
    peak = matmul_tflops()
    cfg, params, prompts = step_workload(args, [f"model.gradient_checkpointing={args.checkpointing}"])
    model, _ = load_policy(cfg, DEVICE, torch.bfloat16)  # the architecture with random weights
    optimizer = build_optimizer(model.parameters(), cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, 10)
    sampler = build_sampler(cfg, model, NullTokenizer())
    g = torch.Generator().manual_seed(0)
    sampler.generate([p[:16] for p in prompts[:2]], SamplingParams(n=2, max_new_tokens=40, ignore_stop=True))

    rows = []
    for run in range(max(2, args.runs)):  # the first run includes kernel compilation and allocator warm-up
        reset_peak()
        rollout, t_rollout = timed(lambda: sampler.generate(prompts, params))
        N = rollout.num_sequences
        rewards = torch.rand(N, generator=g)
        adv = (rewards.view(-1, args.group) - rewards.view(-1, args.group).mean(1, keepdim=True)).flatten()
        batch = Batch(rollout=rollout, rewards=rewards, advantages=adv, reward_metrics={}, prompts=[], answers=[])
        _, t_logp = timed(lambda r=rollout: logprobs_phase(model, r, args.micro, 1.0))
        stats, t_update = timed(lambda b=batch: update_phase(cfg, model, optimizer, scheduler, b, None, None))
        rows.append(
            {
                "run": run,
                "rollout_s": t_rollout,
                "logprob_pass_s": t_logp,
                "update_s": t_update,
                "step_s": t_rollout + t_update,
                "peak_gib": peak_bytes() / 2**30,
                "grad_norm": stats["grad_norm"],
            }
        )
        print(rows[-1], flush=True)

    profile = None
    if args.profile:
        profile = profile_update(lambda b=batch: update_phase(cfg, model, optimizer, scheduler, b, None, None))
    a = model.args
    T = args.prompt_len + args.new_tokens
    tokens, completion_tokens = N * T, N * args.new_tokens
    body = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
    flops = 6 * body * tokens + 6 * a.dim * a.vocab_size * completion_tokens
    flops += 6 * a.n_layers * T * T * a.n_heads * a.head_dim * N
    timed_runs = rows[1:]
    final = {k: statistics.median(r[k] for r in timed_runs) for k in ("rollout_s", "update_s")}
    summary = {
        "update_tflops": flops / final["update_s"] / 1e12,
        "update_mfu_vs_inrun": flops / final["update_s"] / 1e12 / peak,
        "update_mfu_vs_989": flops / final["update_s"] / 1e12 / 989,
        "rollout_tok_s": completion_tokens / final["rollout_s"],
        "train_tok_s": tokens / final["update_s"],
        "phase_share": {k: final[k] / (final["rollout_s"] + final["update_s"]) for k in ("rollout_s", "update_s")},
    }
    payload = {
        "environment": env,
        "arch": args.arch,
        "matmul_tflops_inrun": peak,
        "sequences": N,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "micro_batch": args.micro,
        "gradient_checkpointing": args.checkpointing,
        "update_model_flops": flops,
        "runs": rows,
        "summary": summary,
        "update_profile": profile,
    }
    path = write_result("step", payload, out_dir=args.out_dir)
    print(
        f"\n{env['device']}, torch {env['torch']}, {args.arch}, N={N} x {T} tokens, "
        f"matmul {peak:.0f} TFLOP/s -> {path.name}"
    )
    print_table(rows, ["run", "rollout_s", "logprob_pass_s", "update_s", "step_s", "peak_gib"])
    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in summary.items()})
    if profile is not None:
        print(f"\nprofiled update: {profile['wall_ms']:.1f} ms wall, {profile['kernels_ms']:.1f} ms of kernels")
        kinds = [{"kind": k, **v} for k, v in profile["by_kind"].items()]
        print_table([*kinds, {"kind": "(GPU idle)", "ms": profile["gpu_idle_ms"]}], ["kind", "ms", "kernels"])


if __name__ == "__main__":
    run_cli(lambda _: main())  # a bad argument is one `error:` line
