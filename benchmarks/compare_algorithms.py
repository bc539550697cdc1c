"""GRPO, online DPO and PPO on the same task, one training run each: reward, speed and memory side by side.

    python benchmarks/compare_algorithms.py [--algorithms grpo,online_dpo,ppo] [--steps 100]
                                            [--set key=value ...] [--eval-num 200 | --no-eval]
                                            [--tag NAME] [--out-dir DIR] [--timeout 3600] [--quick]

Each algorithm trains from its config (CONFIGS: SmolLM2-135M-Instruct on two-digit arithmetic, one
GPU) in its own process, `python -m minigrpo.train`, so GPU memory and the peak counters start clean
and a crash costs only that algorithm's row (its error is recorded; the others still run). Every run
gets the same `--steps` and `--set` overrides, applied last (a `dpo.*` or `ppo.*` key only to the
algorithm that reads it); every config is checked before the first run. Outputs go to a temporary
folder, deleted afterwards. After training, the final weights are scored greedily on the held-out split
(`python -m minigrpo.eval`, `--eval-num` prompts; the initial model once too), unless `--no-eval`.

The configs keep the budget equal where the algorithm allows: GRPO and online DPO sample 32 prompts
x 8 completions per step, PPO 256 prompts x 1 (its critic, not a group, is the baseline): 256
completions per step each, the same sampling settings and reward. What still differs (learning rate,
optimizer steps per training step, KL term) is listed under the table and in the JSON ("differences").

Writes results/algorithms[_TAG]_<device>.json: per algorithm the per-step series (reward, completion
length, seconds per step and its phases, peak memory), seconds per step (median over steps 3..N),
rollout / log-prob / update / sync medians, the largest per-step peak of allocated GPU memory (the
process's peak RSS on the CPU), the eval accuracy and the algorithm's own metrics averaged over the
last steps (dpo/*, ppo/*, entropy, GRPO's clip fractions and kl); plus device and versions. A PNG of the reward
curves (with completion length and seconds per step) goes beside it. `--quick` is the CPU smoke size:
a tiny random model with a word-level tokenizer, single-digit sums, 16 completions of at most 8
tokens per step, 3 steps, the dense `proximity` reward (so online DPO finds pairs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import DEVICE, RESULTS, device_slug, environment, out_folder, positive_float, print_table, write_result

from minigrpo.algorithms import updates_per_step
from minigrpo.config import Config, load_config
from minigrpo.errors import ArgumentParser, UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "grpo": "configs/smollm2_arith_gpu.yaml",
    "online_dpo": "configs/smollm2_arith_online_dpo.yaml",
    "ppo": "configs/smollm2_arith_ppo.yaml",
}
SERIES = ("reward", "completion_len_mean", "truncated_frac", "tokens_per_s", "mem/peak_gb", "loss", "grad_norm")
PHASES = ("time/step", "time/rollout", "time/logprobs", "time/update", "time/sync")
FINAL_PREFIXES = ("dpo/", "ppo/", "kl", "clip", "entropy")  # the algorithms' own metrics, reported at the end
MEASURE_FROM = 3  # seconds per step: medians over steps MEASURE_FROM..N (the first steps warm up)
QUICK_COMPLETIONS = 16  # --quick: completions per step (prompts_per_step = 16 / the config's group_size)
OWN_SECTIONS = {"dpo.": "online_dpo", "ppo.": "ppo"}  # a --set key here goes to that algorithm's run only
QUICK_WORDS = ["<pad>", "<s>", "</s>", "<unk>", *"0123456789", "+", "-", "=", "?", "what", "is"]


# ================================================================================================
# the runs' settings (parent process)


def quick_model(folder: Path) -> Path:
    """A tiny random Llama with a word-level tokenizer over QUICK_WORDS (digits one by one), saved as
    an HF checkpoint folder: what --quick trains on the CPU in seconds."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers, pre_tokenizers

    from minigrpo.models.loading import build_random, save_pretrained
    from minigrpo.models.presets import preset_config
    from minigrpo.tokenizer import Tokenizer

    backend = Backend(models.WordLevel({w: i for i, w in enumerate(QUICK_WORDS)}, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = Tokenizer(backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    config = {**preset_config("tiny-llama"), "vocab_size": len(QUICK_WORDS)}
    save_pretrained(build_random(config, seed=0), tokenizer, folder)
    return folder


def applies(override: str, algorithm: str) -> bool:
    """Whether a KEY=VALUE override goes to `algorithm`'s run: every key but the sections that only
    one algorithm reads (OWN_SECTIONS; a config of another algorithm rejects them)."""
    owner = next((a for prefix, a in OWN_SECTIONS.items() if override.startswith(prefix)), None)
    return owner is None or owner == algorithm


def quick_overrides(model: Path, group_size: int) -> list[str]:
    """CPU smoke sizes for one config: the tiny model, QUICK_COMPLETIONS completions per step."""
    # fmt: off
    return [
        f"run.device={'cuda' if DEVICE.type == 'cuda' else 'cpu'}", "run.dtype=float32",
        f"model.name_or_path={model}", "data.synthetic.operations=['+']", "data.synthetic.min_operand=0",
        "data.synthetic.max_operand=4", "data.synthetic.num_train=200", "data.num_eval=16",
        "data.synthetic.instruction=null", "sampler.max_new_tokens=8",
        f"grpo.prompts_per_step={max(1, QUICK_COMPLETIONS // group_size)}", "train.micro_batch_size=8",
        "train.steps=3", "train.lr=1e-3", "ppo.value_lr=1e-3", "rewards.0.name=proximity",
    ]
    # fmt: on


def run_overrides(algorithm: str, args, output_dir: Path, quick: list[str]) -> list[str]:
    """What every run gets, in order: no checkpoints but the final one (for the eval), no plots or
    progress bar, the quick sizes, --steps, then --set (dpo.* and ppo.* only where they apply)."""
    # fmt: off
    overrides = [
        f"run.output_dir={output_dir}", f"run.name={algorithm}", "checkpoint.every=0",
        f"checkpoint.save_final={'false' if args.no_eval else 'true'}", "checkpoint.keep_last=1",
        "log.progress=false", "log.plots=false", *quick,
        *([f"train.steps={args.steps}"] if args.steps is not None else []), *args.set,
    ]
    # fmt: on
    return [o for o in overrides if applies(o, algorithm)]


def settings(cfg: Config) -> dict[str, Any]:
    """What makes the runs comparable (or not): batch, budget, optimizer, KL term, sampling."""
    kl = cfg.ppo.kl_coef if cfg.algorithm == "ppo" else cfg.dpo.beta if cfg.algorithm == "online_dpo" else cfg.grpo.beta
    return {
        "prompts_per_step": cfg.grpo.prompts_per_step,
        "group_size": cfg.grpo.group_size,
        "completions_per_step": cfg.grpo.prompts_per_step * cfg.grpo.group_size,
        "steps": cfg.train.steps,
        "lr": cfg.train.lr,
        "optimizer_steps_per_step": updates_per_step(cfg),
        "kl_or_dpo_beta": kl,  # GRPO: grpo.beta (k3 KL), online DPO: dpo.beta, PPO: ppo.kl_coef (per token)
        "max_new_tokens": cfg.sampler.max_new_tokens,
        "temperature": cfg.sampler.temperature,
        "rewards": [r.name for r in cfg.rewards],
        "model": cfg.model.name_or_path,
        "seed": cfg.run.seed,
    }


def differences(runs: dict[str, dict]) -> list[str]:
    """One line per setting whose value differs between the algorithms' runs."""
    keys = sorted({k for r in runs.values() for k in r["settings"]})
    out = []
    for key in keys:
        values = {a: r["settings"].get(key) for a, r in runs.items()}
        if len({json.dumps(v) for v in values.values()}) > 1:
            out.append(f"{key}: " + ", ".join(f"{a} {v}" for a, v in values.items()))
    return out


# ================================================================================================
# one algorithm (a child process each)


def child_env() -> dict[str, str]:
    """This tree first on the child's path (not an installed copy); PYTHONSAFEPATH keeps the
    repository's kernels/ folder from shadowing a package of that name."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONSAFEPATH": "1"}


def run_module(module: str, args: list[str], timeout: float) -> str | None:
    """`python -m module args` with its output shown (stderr after it ends) -> None, or the error."""
    cmd = [sys.executable, "-m", module, *args]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), stderr=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timeout ({timeout:.0f} s)"
    sys.stderr.write(proc.stderr)
    if proc.returncode == 0:
        return None
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]  # a user error is one such line
    last = errors[-1] if errors else lines[-1] if lines else "no output"
    return f"exit status {proc.returncode}: {last[:500]}"


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """The step records of metrics.jsonl (null where a value was NaN/inf); [] if there is none."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def evaluate(checkpoint: str, num: int, out: Path, timeout: float, config: list[str] = ()) -> dict[str, Any]:
    """Greedy accuracy of `checkpoint` on the held-out split (minigrpo.eval) -> its results or an error.
    config: ["--config", path, "--set", ...] for the initial model (a checkpoint brings its run's config)."""
    argv = ["--checkpoint", checkpoint, "--num", str(num), "--output", str(out), *config]
    error = run_module("minigrpo.eval", argv, timeout)
    if error is not None:
        return {"error": error}
    results = json.loads(out.read_text())
    return {k: v for k, v in results.items() if k != "samples"}


def run_algorithm(algorithm: str, config: str, overrides: list[str], args, output_dir: Path) -> dict[str, Any]:
    """One training run (and the eval of its final weights) -> the series, timings, memory, metrics."""
    print(f"=== algorithm: {algorithm} ({config}) ===", flush=True)
    argv = ["--config", str(ROOT / config), "--set", *overrides]
    error = run_module("minigrpo.train", argv, args.timeout)
    history = read_history(output_dir / algorithm)
    out: dict[str, Any] = {"algorithm": algorithm, "config": config, "overrides": overrides, "error": error}
    out["steps"] = [h["step"] for h in history]
    keys = sorted({k for h in history for k in h if k in SERIES or k in PHASES or k.startswith(FINAL_PREFIXES)})
    out["series"] = {k: [h.get(k) for h in history] for k in keys}
    if error is None and not args.no_eval and history:
        final = output_dir / algorithm / "checkpoints" / f"step_{history[-1]['step']:06d}"
        out["eval"] = evaluate(str(final), args.eval_num, output_dir / f"eval_{algorithm}.json", args.timeout)
    return out


# ================================================================================================
# summary, table, plot (parent process)


def _median(xs: list | None) -> float | None:
    vals = [x for x in xs or [] if x is not None and math.isfinite(x)]
    return statistics.median(vals) if vals else None


def _mean(xs: list) -> float | None:
    vals = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(vals) / len(vals) if vals else None


def summarize(run: dict[str, Any]) -> dict[str, Any]:
    """Timings (medians over steps MEASURE_FROM..N, all steps in a shorter run), the largest per-step
    peak of memory, reward over the first and last n steps (n = min(10, N // 2)) and the algorithm's
    own metrics averaged over the last n steps."""
    steps, s = run["steps"], run["series"]
    measured = [i for i, step in enumerate(steps) if step >= MEASURE_FROM] or list(range(len(steps)))
    n = max(1, min(10, len(steps) // 2))

    def med(key: str) -> float | None:
        return _median([s[key][i] for i in measured]) if key in s else None

    reward = s.get("reward", [])
    peaks = [x for x in s.get("mem/peak_gb", []) if x is not None]
    update = [sum(s[k][i] or 0.0 for k in ("time/logprobs", "time/update") if k in s) for i in measured]
    return {
        "measured_steps": [steps[i] for i in measured],
        "reward_first": _mean(reward[:n]),
        "reward_last": _mean(reward[-n:]),
        "seconds_per_step": med("time/step"),
        "rollout_s": med("time/rollout"),
        "logprobs_s": med("time/logprobs"),
        "update_s": med("time/update"),
        "logprobs_update_s": _median(update) if steps else None,
        "sync_s": med("time/sync"),
        "peak_gib": max(peaks) if peaks else None,
        "completion_len_last": _mean(s.get("completion_len_mean", [])[-n:]),
        "final": {k: _mean(v[-n:]) for k, v in s.items() if k.startswith(FINAL_PREFIXES)},
    }


OWN_METRIC = {"grpo": "entropy", "online_dpo": "dpo/accuracy", "ppo": "ppo/explained_variance"}  # in the table


def table_rows(runs: dict[str, dict], base: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per algorithm (and the initial model's eval accuracy); `B x G` and `completions`
    show the budget: PPO's 256 x 1 samples as many completions per step as GRPO's 32 x 8."""
    rows = []
    for algorithm, run in runs.items():
        st, sm = run["settings"], run.get("summary", {})
        key, final = OWN_METRIC[algorithm], sm.get("final", {})
        rows.append(
            {
                "algorithm": algorithm,
                "B x G": f"{st['prompts_per_step']} x {st['group_size']}",
                "completions": st["completions_per_step"],
                "lr": st["lr"],
                "opt steps": st["optimizer_steps_per_step"],
                "reward first": sm.get("reward_first"),
                "reward last": sm.get("reward_last"),
                "eval acc": (run.get("eval") or {}).get("accuracy"),
                "s/step": sm.get("seconds_per_step"),
                "rollout s": sm.get("rollout_s"),
                "logp+update s": sm.get("logprobs_update_s"),
                "peak GiB": sm.get("peak_gib"),
                "own metric": f"{key} {final[key]:.3g}" if final.get(key) is not None else "-",
                "error": (run.get("error") or "")[:60] or None,
            }
        )
    if base is not None:
        rows.append({"algorithm": "(initial)", "eval acc": base.get("accuracy"), "error": base.get("error")})
    return rows


def plot(runs: dict[str, dict], path: Path, title: str) -> None:
    """Reward, completion length and seconds per step of every algorithm (minigrpo.plot's panels)."""
    from minigrpo.plot import Panel, write_line_plots

    panels = [
        Panel("mean reward"),
        Panel("completion length (tokens)", include_zero=True),
        Panel("seconds per step", include_zero=True),
    ]
    for algorithm, run in runs.items():
        for panel, key in zip(panels, ("reward", "completion_len_mean", "time/step")):
            if key in run["series"]:
                panel.series[algorithm] = (run["steps"], run["series"][key])
    write_line_plots(path, panels, title=title, width=1500, height=420)


def parse_args() -> argparse.Namespace:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algorithms", default=",".join(CONFIGS), help=f"a list of {', '.join(CONFIGS)}")
    ap.add_argument("--steps", type=int, default=None, help="train.steps of every run (default: the configs')")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    ap.add_argument("--eval-num", type=int, default=200, help="held-out prompts scored after training")
    ap.add_argument("--no-eval", action="store_true", help="no eval (and no final checkpoint)")
    ap.add_argument("--timeout", type=positive_float, default=3600, help="seconds for one training run (and one eval)")
    ap.add_argument("--tag", default="", help="result file algorithms_<tag>_<device>.json")
    ap.add_argument(
        "--out-dir", type=out_folder, default=None, help="write the JSON and PNG here instead of benchmarks/results"
    )
    ap.add_argument("--quick", action="store_true", help="CPU smoke sizes: a tiny random model, 3 steps")
    args = ap.parse_args()
    args.algorithms = [a for a in args.algorithms.split(",") if a]
    if (
        not args.algorithms
        or any(a not in CONFIGS for a in args.algorithms)
        or len(set(args.algorithms)) < len(args.algorithms)
    ):
        ap.error(f"--algorithms: a list of {', '.join(CONFIGS)}, each once; got {','.join(args.algorithms)!r}")
    if args.steps is not None and args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    if args.eval_num < 1:
        ap.error(f"--eval-num must be >= 1, got {args.eval_num}")
    if args.quick:
        args.eval_num = min(args.eval_num, 8)
    return args


def plan_runs(args, output_dir: Path) -> dict[str, dict[str, Any]]:
    """Every algorithm's config, overrides and settings; all configs load (and are checked) here,
    before any run starts: a mistake is one `error:` line naming the algorithm."""
    model = quick_model(output_dir / "quick_model") if args.quick else None
    runs = {}
    for algorithm in args.algorithms:
        config = CONFIGS[algorithm]
        quick = quick_overrides(model, load_config(str(ROOT / config), []).grpo.group_size) if model else []
        overrides = run_overrides(algorithm, args, output_dir, quick)
        try:
            cfg = load_config(str(ROOT / config), overrides)
        except UserError as e:
            raise UserError(f"{algorithm} ({config}): {e}") from None
        runs[algorithm] = {"config": config, "overrides": overrides, "settings": settings(cfg)}
    return runs


def main() -> None:
    args = parse_args()
    env = environment()
    name = f"algorithms_{args.tag}" if args.tag else "algorithms"
    name += "_quick" if args.quick else ""  # a smoke run never overwrites a real run's results
    base = None
    with tempfile.TemporaryDirectory(prefix="minigrpo-algorithms-") as tmp:
        output_dir = Path(tmp)
        runs = plan_runs(args, output_dir)
        if not args.no_eval:  # the initial model, once: every algorithm starts from it
            print("=== the initial model ===", flush=True)
            first = runs[args.algorithms[0]]
            config = ["--config", str(ROOT / first["config"]), "--set", *first["overrides"]]
            out = output_dir / "eval_initial.json"
            base = evaluate(first["settings"]["model"], args.eval_num, out, args.timeout, config)
        for algorithm, run in runs.items():
            run.update(run_algorithm(algorithm, run["config"], run["overrides"], args, output_dir))
            run["summary"] = summarize(run) if run["steps"] else {}
            if run["error"]:
                print(f"{algorithm} failed: {run['error']}", flush=True)
    notes = differences(runs)
    payload = {
        "environment": env,
        "args": vars(args),
        "how": __doc__,
        "measure_from": MEASURE_FROM,
        "eval_initial": base,
        "differences": notes,
        "runs": runs,
        "errors": {a: r["error"] for a, r in runs.items() if r.get("error")},
    }
    path = write_result(name, payload, out_dir=args.out_dir)
    png: Path | None = (RESULTS if args.out_dir is None else Path(args.out_dir)) / f"{name}_{device_slug(env)}.png"
    try:
        task = "tiny random model (--quick)" if args.quick else "SmolLM2-135M arithmetic"
        steps = max((r["settings"]["steps"] for r in runs.values()), default=0)
        plot(runs, png, f"{task}, {steps} steps, {env['device']}")
    except ImportError as e:  # the JSON holds the curves; the picture is a convenience
        print(f"no plot ({e})")
        png = None
    rows = table_rows(runs, base)
    print()
    print_table(rows, list(rows[0]))
    print("\nsettings that differ between the runs:" if notes else "\nthe runs' settings are equal")
    for line in notes:
        print(f"  {line}")
    print(f"\nwrote {path}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    run_cli(lambda _: main())  # a bad argument or config is one `error:` line
