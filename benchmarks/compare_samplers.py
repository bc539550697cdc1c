"""The same GRPO run twice in one process, once with the own sampler and once with vLLM: do both learn alike?

    python benchmarks/compare_samplers.py [--config configs/smollm2_arith_gpu.yaml] [--steps 100]
                                          [--samplers own,vllm] [--is-correction token_truncate]
                                          [--set key=value ...] [--tag NAME] [--out-dir DIR]

Both runs use the same config and seed; they differ only in `sampler.kind` and `run.name` (outputs
go to a temporary folder, deleted afterwards; no checkpoints are written). `--is-correction` sets
grpo.is_correction for BOTH runs (default token_truncate: what `sampler.kind: vllm` picks by
itself), so the two configs stay equal and both report the sampler/trainer log-prob mismatch
(mismatch/*: computed only when the old log-probs are); `auto` leaves the config's value (vLLM then
turns it on and the own run has none). `--set` applies after these, to both runs. Between the runs
every reference is dropped and the CUDA cache emptied (memory before and after each run recorded).
Writes results/compare_samplers[_TAG]_<device>.json (per-step reward, completion length, seconds per
step and its phases, and every mismatch/* and sync/* statistic) and a PNG of the reward curves next to it.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch
from common import (
    DEVICE,
    RESULTS,
    device_slug,
    environment,
    fraction,
    gpu_memory,
    out_folder,
    positive_int,
    print_table,
    write_result,
)

from minigrpo.config import load_config
from minigrpo.errors import ArgumentParser, UserError, run_cli
from minigrpo.train import train

ROOT = Path(__file__).resolve().parents[1]
SERIES = ("reward", "completion_len_mean", "truncated_frac", "tokens_per_s", "mem/peak_gb")  # kept per step
PREFIXES = ("time/", "mismatch/", "sync/", "reward/")
IS_CORRECTIONS = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")  # grpo.is_correction


def sampler_overrides(kind: str, args, output_dir: Path) -> list[str]:
    """The overrides of the run with sampler.kind=kind: the script's, then the user's --set."""
    overrides = [
        f"sampler.kind={kind}",
        f"run.output_dir={output_dir}",
        f"run.name=compare_{kind}",
        "checkpoint.every=0",
        "checkpoint.save_final=false",
        "log.progress=false",
        "log.plots=false",
    ]
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.is_correction != "auto":
        overrides.append(f"grpo.is_correction={'null' if args.is_correction == 'none' else args.is_correction}")
    if args.gpu_memory_utilization is not None:
        overrides.append(f"sampler.gpu_memory_utilization={args.gpu_memory_utilization}")
    return [*overrides, *args.set]


def check_configs(config: str, kinds: list[str], args) -> None:
    """Every run's config loads and its device exists, before any run starts: a mistake shared by both
    runs (a bad --set, run.device=cuda on a machine without one) is one error line, not two failed runs."""
    from minigrpo.build import pick_device

    for kind in kinds:
        try:
            pick_device(load_config(config, sampler_overrides(kind, args, Path(tempfile.gettempdir()))).run.device)
        except UserError as e:
            raise UserError(f"sampler.kind={kind} ({config}): {e}") from None


def run_one(config: str | None, kind: str, args, output_dir: Path) -> dict:
    """One training run with sampler.kind=kind -> its per-step series, timings and memory."""
    overrides = sampler_overrides(kind, args, output_dir)
    cfg = load_config(config, overrides)
    before = gpu_memory()
    t0 = time.perf_counter()
    history = train(cfg)
    seconds = time.perf_counter() - t0
    del cfg
    free_device_memory()
    after = gpu_memory()
    keys = sorted({k for h in history for k in h if k in SERIES or k.startswith(PREFIXES)})
    series = {k: [h.get(k) for h in history] for k in keys}
    step_s = series.get("time/step") or [0.0]
    return {
        "kind": kind,
        "overrides": overrides,
        "steps": [h["step"] for h in history],
        "seconds_total": seconds,
        "seconds_per_step_median": statistics.median(step_s),
        "seconds_per_step_mean": sum(step_s) / len(step_s),
        "memory_before": before,
        "memory_after": after,
        "series": series,
    }


def free_device_memory() -> None:
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def window_mean(xs: list, lo: int, hi: int | None) -> float | None:
    vals = [x for x in xs[lo:hi] if x is not None]
    return sum(vals) / len(vals) if vals else None


def summary(run: dict) -> dict:
    s = run["series"]
    reward = s.get("reward", [])
    n = max(1, min(10, len(reward) // 2))
    row = {
        "sampler": run["kind"],
        "steps": len(run["steps"]),
        "reward_first": window_mean(reward, 0, n),
        "reward_last": window_mean(reward, -n, None),
        "s_per_step": run["seconds_per_step_median"],
        "rollout_s": _median(s.get("time/rollout")),
        "sync_s": _median(s.get("time/sync")),
        "len_first": window_mean(s.get("completion_len_mean", []), 0, n),
        "len_last": window_mean(s.get("completion_len_mean", []), -n, None),
    }
    for key in ("mismatch/logp_diff_mean", "mismatch/logp_diff_max", "sync/sync_s", "sync/verify_s"):
        row[key] = _median(s.get(key))
    return row


def _median(xs) -> float | None:
    vals = [x for x in xs or [] if x is not None]
    return statistics.median(vals) if vals else None


def plot(runs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        reward = run["series"].get("reward", [])
        ax.plot(run["steps"], reward, label=f"sampler.kind={run['kind']}", alpha=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "smollm2_arith_gpu.yaml"))
    ap.add_argument(
        "--steps", type=positive_int, default=None, help="train.steps for both runs (default: the config's)"
    )
    ap.add_argument("--samplers", default="own,vllm")
    ap.add_argument(
        "--is-correction",
        choices=("auto", "none", *IS_CORRECTIONS),
        default="token_truncate",
        help="grpo.is_correction for both runs (none: off; auto: the config's, which vLLM turns on)",
    )
    ap.add_argument("--gpu-memory-utilization", type=fraction, default=None, help="sampler.gpu_memory_utilization")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for both runs")
    ap.add_argument("--tag", default="", help="result file compare_samplers_<tag>_<device>.json")
    ap.add_argument(
        "--out-dir", type=out_folder, default=None, help="write the JSON and PNG here instead of benchmarks/results"
    )
    args = ap.parse_args()
    kinds = [k for k in args.samplers.split(",") if k]
    if not kinds or any(k not in ("own", "vllm") for k in kinds):
        ap.error(f"--samplers: a list of own, vllm; got {args.samplers!r}")
    check_configs(args.config, kinds, args)
    env = environment()
    try:
        import vllm

        env["vllm"] = vllm.__version__
    except ImportError:
        env["vllm"] = None
    name = f"compare_samplers_{args.tag}" if args.tag else "compare_samplers"
    runs, errors = [], {}
    with tempfile.TemporaryDirectory(prefix="minigrpo-compare-") as tmp:
        for kind in kinds:
            print(f"=== sampler.kind={kind} ===", flush=True)
            try:
                runs.append(run_one(args.config, kind, args, Path(tmp)))
            except Exception as e:  # record and go on: the other run still counts
                errors[kind] = f"{type(e).__name__}: {e}"
                where = "" if isinstance(e, UserError) else "\n" + traceback.format_exc()
                print(f"sampler.kind={kind} failed: {errors[kind]}{where}", flush=True)
                free_device_memory()
    rows = [summary(r) for r in runs]
    payload = {
        "environment": env,
        "config": args.config,
        "args": vars(args),
        "how": __doc__,
        "summary": rows,
        "runs": runs,
        "errors": errors,
    }
    path = write_result(name, payload, out_dir=args.out_dir)
    png = (RESULTS if args.out_dir is None else Path(args.out_dir)) / f"{name}_{device_slug(env)}.png"
    if runs:
        try:
            plot(runs, png, f"{Path(args.config).name}, {env['device']}")
        except ImportError as e:  # the JSON holds the curves; the picture is a convenience
            print(f"no plot ({e}): pip install matplotlib")
            png = None
    print()
    print_table(rows, list(rows[0]) if rows else ["sampler"])
    for kind, message in errors.items():
        print(f"failed: sampler.kind={kind}: {message}")
    print(f"\nwrote {path}" + (f" and {png}" if runs and png else ""))


if __name__ == "__main__":
    run_cli(lambda _: main())  # a bad argument or config is one `error:` line
