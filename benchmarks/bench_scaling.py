"""GRPO step time and throughput on 1 and N GPUs (data parallel under torchrun): scaling efficiency.

    python benchmarks/bench_scaling.py [--gpus 1,2] [--arch qwen2.5-1.5b] [--prompts 16] [--group 8]
                                       [--prompt-len 256] [--new-tokens 512] [--micro 16] [--quick]

The parent process launches `torch.distributed.run --nproc_per_node W` on this file for each W;
every rank runs what minigrpo.train runs per step on its share of the prompts: the rollout (own
sampler, gathered FSDP weights, counter-based noise), random rewards with group advantages over the
global batch, and the update (FSDP2 full fine-tuning: fp32 shards, bf16 compute, fp32 gradient
reduce-scatter; one process: bf16 weights with fp32 master weights). By default the global batch
is the same for every W (strong scaling: the ideal W-rank step takes 1/W of the 1-rank time); with
--weak every rank keeps --prompts prompts (weak scaling: the ideal step time stays constant).

    efficiency(W) = throughput(W) / (W * throughput(1)),   throughput = training tokens / step time

Random weights of a real architecture, fixed-length completions (ignore_stop). Each W runs
`--steps` steps; the first is warm-up (kernel compilation, CUDA graph capture) and the median of
the rest is reported. Writes results/scaling_<device>.json and prints a table. On a machine
without CUDA it runs on the CPU with gloo (a smoke run only: --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import (
    DEVICE,
    NullTokenizer,
    add_workload_arguments,
    environment,
    positive_int,
    positive_ints,
    print_table,
    step_workload,
    write_result,
)

from minigrpo import grpo
from minigrpo.build import build_sampler, load_policy
from minigrpo.distributed import close_world, full_weights, init_world, shard_model, shard_range
from minigrpo.errors import ArgumentParser, run_cli
from minigrpo.optim import build_optimizer, build_scheduler
from minigrpo.sampling.rollout import Rollout
from minigrpo.step import Batch, update_phase


def worker(args: argparse.Namespace) -> None:
    """One rank of a W-rank run: build, shard, time `args.steps` GRPO steps; rank 0 writes args.out."""
    world = init_world(DEVICE)
    dev = world.device
    torch.manual_seed(0)
    compute = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg, params, prompts = step_workload(args)
    sharded = world.distributed
    model, _ = load_policy(cfg, dev, torch.float32 if sharded else compute)  # random weights of args.arch
    if sharded:
        shard_model(model, world, compute_dtype=compute)
    optimizer = build_optimizer(model.parameters(), cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, 100)
    sampler = build_sampler(cfg, model, NullTokenizer())
    lo, hi = shard_range(args.prompts, world.rank, world.size)
    G = args.group

    def clock() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        world.barrier()
        return time.perf_counter()

    rows = []
    for step in range(args.steps):
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = clock()
        with full_weights(model):
            rollout: Rollout = sampler.generate(prompts[lo:hi], params, key=(0, step, 0), row_ids=range(lo * G, hi * G))
        t1 = clock()
        rewards = torch.rand(args.prompts * G, generator=torch.Generator().manual_seed(step))  # global, (N,)
        adv = grpo.group_advantages(rewards, G)[lo * G : hi * G]
        batch = Batch(
            rollout=rollout, rewards=rewards[lo * G : hi * G], advantages=adv, reward_metrics={}, prompts=[], answers=[]
        )
        stats = update_phase(cfg, model, optimizer, scheduler, batch, None, None, world=world)
        t2 = clock()
        peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0.0
        rows.append(
            {"rollout_s": t1 - t0, "update_s": t2 - t1, "step_s": t2 - t0, "peak_gib": max(world.all_gather(peak))}
        )
        if world.main:
            print(f"W={world.size} step {step}: {rows[-1]} grad_norm {stats['grad_norm']:.3f}", flush=True)
    if world.main:
        Path(args.out).write_text(json.dumps(rows))
    close_world(world)


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--gpus", type=positive_ints, default=None, help="comma-separated world sizes (default: 1 and every GPU)"
    )
    add_workload_arguments(ap)
    ap.add_argument("--steps", type=positive_int, default=4)
    ap.add_argument("--weak", action="store_true", help="--prompts per rank (weak scaling) instead of in all")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run, CPU or GPU)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.arch, args.prompts, args.group, args.prompt_len, args.new_tokens, args.micro, args.steps = (
            "smollm2-135m",
            4,
            2,
            16,
            8,
            4,
            2,
        )
    if args.worker:
        return worker(args)

    sizes = args.gpus if args.gpus else sorted({1, max(torch.cuda.device_count(), 2)})
    env = environment()
    env["gpus"] = torch.cuda.device_count()
    shape = ("arch", "group", "prompt_len", "new_tokens", "micro", "steps")
    passed = [x for k in shape for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
    prompts = {w: args.prompts * w if args.weak else args.prompts for w in sizes}
    runs = {}
    for w in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rows.json"
            launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={w}"]
            cmd = [
                sys.executable,
                *launcher,
                __file__,
                "--worker",
                "--out",
                str(out),
                "--prompts",
                str(prompts[w]),
                *passed,
            ]
            env_vars = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")}
            subprocess.run(cmd, check=True, env=env_vars)
            runs[w] = json.loads(out.read_text())

    table = []
    for w, rows in runs.items():
        timed = rows[1:] or rows
        med = {k: statistics.median(r[k] for r in timed) for k in ("rollout_s", "update_s", "step_s")}
        sequences = prompts[w] * args.group
        table.append(
            {
                "gpus": w,
                "prompts": prompts[w],
                **med,
                "tokens_per_s": sequences * (args.prompt_len + args.new_tokens) / med["step_s"],
                "completion_tok_per_s": sequences * args.new_tokens / med["rollout_s"],
                "peak_gib": max(r["peak_gib"] for r in rows),
            }
        )
    one = next((row for row in table if row["gpus"] == 1), None)
    for row in table:
        row["efficiency"] = row["tokens_per_s"] / (row["gpus"] * one["tokens_per_s"]) if one else None
    payload = {
        "environment": env,
        "arch": args.arch,
        "scaling": "weak" if args.weak else "strong",
        "batch": {"prompts": prompts, "group": args.group, "prompt_len": args.prompt_len},
        "new_tokens": args.new_tokens,
        "micro_batch": args.micro,
        "strategy": "fsdp2 (W > 1), bf16 + fp32 masters (W = 1)",
        "runs": runs,
        "summary": table,
    }
    path = write_result("scaling_weak" if args.weak else "scaling", payload)
    print(f"\n{env['device']} x{env['gpus']}, torch {env['torch']}, {args.arch} -> {path.name}")
    print_table(
        table,
        [
            "gpus",
            "prompts",
            "rollout_s",
            "update_s",
            "step_s",
            "tokens_per_s",
            "completion_tok_per_s",
            "peak_gib",
            "efficiency",
        ],
    )


if __name__ == "__main__":
    run_cli(lambda _: main())  # a bad argument is one `error:` line
