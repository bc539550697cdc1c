"""Whole GRPO steps, ours vs TRL's GRPOTrainer, on the same workload: speed (part 1) and learning (part 2).

    python benchmarks/bench_e2e.py --mode speed [--providers ours,ours-vllm,trl,trl-liger,trl-vllm]
                                   [--cases qwen2.5-1.5b/full,qwen2.5-1.5b/lora,smollm2-135m/full,smollm2-135m/lora]
                                   [--steps 10] [--measure-from 3] [--checkpointing] [--quick] [--out-dir DIR]
    python benchmarks/bench_e2e.py --mode learn [--steps 60] [--providers ours,trl] [--seed 0,1,2]
                                   [--checkpoint-dtype float32|bfloat16]
    ... [--set KEY=VALUE ...]   config overrides for every provider, e.g. run.dtype=float32 (both in fp32)

Each (case, provider) runs in its own process (clean GPU memory and peak counters; a crash is one row's
error). A missing package is "skipped: <why>". Writes results/e2e_<mode>_<device>.json (+ learn's PNG).

Workload (speed; benchmarks/README.md has the details): the settings of configs/qwen2.5-1.5b_gsm8k.yaml
(full) and configs/qwen2.5-1.5b_gsm8k_lora.yaml (LoRA r 32) on HF folders written once and loaded by
every provider: Qwen2.5-1.5B architecture with random weights (bf16) and SmolLM2-135M-Instruct (real,
fp32), both with the SmolLM2 tokenizer (no Qwen tokenizer offline). GSM8K prompts, 16 x 8 completions,
<= 512 new tokens, dapo, beta 0, micro-batches of 16, bf16. Learn: configs/smollm2_arith_gpu.yaml, 60 steps.

How each config field maps to TRL 1.16's GRPOConfig (read from the installed trl/trainer/grpo_config.py):
    grpo.group_size -> num_generations;  train.micro_batch_size -> per_device_train_batch_size, and
    gradient_accumulation_steps = B*G / micro (so generation_batch_size = B*G and steps_per_generation =
    one optimizer step per generation, as ours);  sampler.max_new_tokens -> max_completion_length;
    sampler.temperature/top_p/top_k/min_p -> temperature/top_p/top_k/min_p (min_p 0 -> None);
    grpo.loss_type/beta/epsilon/epsilon_high/delta/num_iterations/scale_rewards/importance_sampling_level/
    mask_truncated_completions -> the fields of the same names;  rewards[].weight -> reward_weights (each
    of our reward functions wrapped as a TRL reward callable that calls minigrpo.rewards.score);
    model.gradient_checkpointing -> gradient_checkpointing (non-reentrant);  run.seed -> seed;
    data order -> a datasets.Dataset in our PromptLoader's order with shuffle_dataset=False;
    train.lr/betas/eps/weight_decay/warmup_steps/schedule -> not GRPOConfig fields but the SAME torch
    AdamW and LambdaLR (minigrpo.optim.build_scheduler) passed as `optimizers` (HF's warmup starts at 0, ours
    at 1/warmup); train.max_grad_norm -> max_grad_norm (None -> 0: off);  bf16 -> bf16=True and the
    model loaded in bf16;  sampler.kind=vllm -> use_vllm, vllm_mode="colocate", vllm_gpu_memory_utilization,
    vllm_enable_sleep_mode = sampler.vllm_sleep, vllm_importance_sampling_mode="token_truncate" with
    clip_max = grpo.is_cap (ours turns token_truncate on with vLLM too).
Precision: ours computes in bf16 over fp32 master weights. TRL's full fine-tuning loads the model in
float32 (what GRPOTrainer itself does with a model path: "dtype defaults to float32") and computes under
bf16 autocast, the same mixed precision; `--trl-weights bfloat16` loads it in bf16 instead (AdamW then
updates bf16 weights, and at lr 1e-5 most updates round away: benchmarks/README.md). For LoRA the frozen
base is bf16 for both; TRL's adapters are fp32 (PEFT's autocast_adapter_dtype), ours bf16 with fp32
masters. TRL generates with
transformers' `generate` (no KV-cache sampler of its own), `trl-liger` adds Liger's layer kernels
(TRL 1.x keeps its own chunked log-prob LM head either way). TRL logs `step_time` but no rollout/update
split: this script times `_generate_and_score_completions` (generation, rewards, advantages) itself.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from common import (
    DEVICE,
    RESULTS,
    device_slug,
    environment,
    names,
    out_folder,
    positive_int,
    print_table,
    sync,
    write_result,
)
from e2e_summary import add_ratios, learning, plot_rewards, summarize

from minigrpo.errors import ArgumentParser, UsageError, UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]
PROVIDERS = ("ours", "ours-vllm", "trl", "trl-liger", "trl-vllm")
SPEED_CONFIGS = {"full": "configs/qwen2.5-1.5b_gsm8k.yaml", "lora": "configs/qwen2.5-1.5b_gsm8k_lora.yaml"}
LEARN_CONFIG = "configs/smollm2_arith_gpu.yaml"
SPEED_CASES = "qwen2.5-1.5b/full,qwen2.5-1.5b/lora,smollm2-135m/full,smollm2-135m/lora"
GIB = 2**30
CUDA = DEVICE.type == "cuda"


# ================================================================================================
# the workload: model folders and configs (parent process)


def gsm8k_dir() -> Path:
    for cand in (ROOT / "shared" / "data" / "gsm8k", ROOT.parent / "shared" / "data" / "gsm8k"):
        if (cand / "train.jsonl").exists():
            return cand
    raise UserError(f"no shared/data/gsm8k/train.jsonl in {ROOT} or {ROOT.parent} (speed mode's prompts)")


def model_folder(name: str, cache: Path, smollm2_dtype: str = "float32") -> Path:
    """An HF checkpoint folder of `name` (written once, then reused): what every provider loads.
    smollm2_dtype: SmolLM2's weights as packaged (float32) or rounded to bfloat16, as most checkpoints
    are (their values on the bf16 grid: where fp32 masters start matters, optim.py)."""
    from minigrpo.models.loading import build_random, load_pretrained, save_pretrained
    from minigrpo.models.presets import preset_config

    exact = name != "smollm2-135m" or smollm2_dtype == "float32"
    out = cache / (name if exact else f"{name}-{smollm2_dtype}")
    if (out / "config.json").exists():
        return out
    smollm2, tokenizer = load_pretrained("smollm2", dtype=torch.float32)
    if name == "smollm2-135m":
        model, dtype = smollm2, getattr(torch, smollm2_dtype)  # the real weights, exact or rounded
    else:  # an architecture with random weights and SmolLM2's tokenizer (its ids fit the larger vocabulary)
        model, dtype = build_random(preset_config(name), dtype=torch.bfloat16, seed=0), torch.bfloat16
    tmp = cache / f".{name}.partial"
    save_pretrained(model, tokenizer, tmp, dtype=dtype)
    tmp.rename(out)
    return out


def seed_list(text: str) -> list[int]:
    """A comma-separated list of distinct integers (run.seed values)."""
    try:
        seeds = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a comma-separated list of integers, got {text!r}") from None
    if not seeds or len(set(seeds)) < len(seeds):
        raise argparse.ArgumentTypeError(f"a comma-separated list of distinct integers, got {text!r}")
    return seeds


def run_overrides(args, steps: int, seed: int) -> list[str]:
    """Settings every provider's config gets: device, precision, no checkpoints/plots/eval."""
    # fmt: off
    return [
        f"run.device={'cuda' if CUDA else 'cpu'}", f"run.dtype={'bfloat16' if CUDA else 'float32'}",
        f"run.seed={seed}", f"train.steps={steps}",
        f"model.gradient_checkpointing={str(args.checkpointing).lower()}",
        "checkpoint.every=0", "checkpoint.save_final=false", "log.progress=false", "log.plots=false",
        "log.sample_every=0", "data.eval_split=null",
        # the configs warm up over 10 steps; a step's cost does not depend on the learning rate
        *(["train.warmup_steps=1"] if args.quick or args.mode == "speed" else []),
    ]
    # fmt: on


def check_overrides(args) -> None:
    """A bad --set is one error line before any model is written, not an error row per provider."""
    from minigrpo.config import load_config

    kinds = {name.partition("/")[2] for name in args.cases.split(",")}
    files = [LEARN_CONFIG] if args.mode == "learn" else [SPEED_CONFIGS[k] for k in sorted(kinds) if k in SPEED_CONFIGS]
    for file in files:
        load_config(str(ROOT / file), args.set)


def build_cases(args, cache: Path) -> list[dict[str, Any]]:
    """(name, config file, overrides) of every case of the mode."""
    sizes = [
        f"grpo.prompts_per_step={args.prompts}",
        f"grpo.group_size={args.group}",
        f"sampler.max_new_tokens={args.new_tokens}",
        f"train.micro_batch_size={args.micro}",
    ]
    if args.mode == "learn":
        model = model_folder("smollm2-135m", cache, args.checkpoint_dtype)
        extra = sizes if args.quick else []  # the config's own sizes on the GPU
        return [
            {
                "case": "smollm2-135m/arith", "seed": seed, "config": str(ROOT / LEARN_CONFIG),
                "overrides": [f"model.name_or_path={model}", *run_overrides(args, args.steps, seed), *extra, *args.set],
            }
            for seed in args.seed
        ]  # fmt: skip
    cases, (seed,) = [], args.seed  # main allows one seed in speed mode
    speed_cases = [speed_case(name) for name in args.cases.split(",")]
    data = gsm8k_dir()  # checked before any model folder is written
    for name, (arch, kind) in zip(args.cases.split(","), speed_cases):
        model = model_folder(arch, cache)
        overrides = [f"model.name_or_path={model}", f"data.path={data}", *run_overrides(args, args.steps, seed)]
        overrides += [*sizes, *args.set]  # the user's, last: they win
        cases.append({"case": name, "config": str(ROOT / SPEED_CONFIGS[kind]), "overrides": overrides})
    return cases


def speed_case(name: str) -> tuple[str, str]:
    """A --cases item, <model>/full or <model>/lora -> (model, kind); the model a preset or smollm2-135m."""
    from minigrpo.models.presets import PRESETS

    arch, _, kind = name.partition("/")
    if kind not in SPEED_CONFIGS:
        raise UsageError(f"--cases: {name!r} is not <model>/full or <model>/lora")
    if arch not in PRESETS:
        raise UsageError(f"--cases: {name!r}: unknown model {arch!r}; known: {', '.join(sorted(PRESETS))}")
    return arch, kind


def missing(provider: str) -> str | None:
    """Why a provider cannot run here (None: it can)."""
    trl = ["trl", "datasets", "peft"] if provider.startswith("trl") else []
    extra = {"trl-liger": ["liger_kernel"], "trl-vllm": ["vllm"], "ours-vllm": ["vllm"]}.get(provider, [])
    for module in trl + extra:
        if importlib.util.find_spec(module) is None:
            return f"skipped: {module} not installed"
    if provider == "trl-liger" and DEVICE.type != "cuda":
        return "skipped: Liger's kernels need CUDA"
    return None


# ================================================================================================
# providers (child process)


def run_ours(cfg) -> tuple[list[dict], dict]:
    """minigrpo.train on the config; per-step timings and rewards from its history."""
    from minigrpo.train import train

    N = cfg.grpo.prompts_per_step * cfg.grpo.group_size
    # fmt: off
    return [
        {
            "step": h["step"], "step_s": h["time/step"],
            "rollout_s": h["time/rollout"],  # sample + rewards + advantages
            "update_s": h["time/step"] - h["time/rollout"],  # log-prob passes, update, sampler sync
            "completion_tokens": h["completion_len_mean"] * N, "reward": h.get("reward"),
            "peak_gib": h["mem/peak_gb"] if DEVICE.type == "cuda" else None,  # reset at every step
        }
        for h in train(cfg)
    ], {}
    # fmt: on


def trl_reward(spec, examples: list, max_new_tokens: int):
    """One of our reward functions as a TRL reward callable (TRL passes the dataset columns as kwargs:
    `row` indexes our examples, so answers and extra columns are exactly what ours passes)."""
    from minigrpo import rewards
    from minigrpo.data import batch_columns

    def reward(prompts, completions, completion_ids, row, **_):
        exs = [examples[i] for i in row]
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        columns = batch_columns(exs)
        columns["completion_lengths"] = [len(ids) for ids in completion_ids]
        columns["max_completion_length"] = [max_new_tokens] * len(texts)
        result = rewards.score([e.prompt for e in exs], texts, [e.answer for e in exs], [spec], columns=columns)
        return [None if math.isnan(v) else v for v in result.per_fn[:, 0].tolist()]

    reward.__name__ = spec.name
    return reward


def trl_config_kwargs(cfg, provider: str, steps: int, output_dir: str) -> dict[str, Any]:
    """GRPOConfig keyword arguments reproducing our config (the mapping in the module docstring)."""
    N = cfg.grpo.prompts_per_step * cfg.grpo.group_size
    g, s, t = cfg.grpo, cfg.sampler, cfg.train
    # fmt: off
    return dict(
        output_dir=output_dir, seed=cfg.run.seed, max_steps=steps, bf16=cfg.run.dtype == "bfloat16", use_cpu=not CUDA,
        per_device_train_batch_size=t.micro_batch_size, gradient_accumulation_steps=N // t.micro_batch_size,
        num_generations=g.group_size, max_completion_length=s.max_new_tokens,
        temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, min_p=s.min_p or None,
        loss_type=g.loss_type, beta=g.beta, epsilon=g.epsilon, epsilon_high=g.epsilon_high, delta=g.delta,
        num_iterations=g.num_iterations, scale_rewards=g.scale_rewards,
        importance_sampling_level=g.importance_sampling_level,
        mask_truncated_completions=g.mask_truncated_completions,
        reward_weights=[r.weight for r in cfg.rewards], max_grad_norm=t.max_grad_norm or 0.0,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        shuffle_dataset=False, remove_unused_columns=False,  # our order; `row` reaches the rewards
        logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True,
        use_liger_kernel=provider == "trl-liger",
        use_vllm=provider == "trl-vllm", vllm_mode="colocate",
        vllm_gpu_memory_utilization=s.gpu_memory_utilization, vllm_enable_sleep_mode=s.vllm_sleep,
        vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=g.is_cap,
    )
    # fmt: on


def unshadow_hf_kernels() -> None:
    """With the repository root on sys.path (the tests put it there), its `kernels/` (minigrpo.kernels)
    shadows the Hugging Face `kernels` package that TRL imports: drop the root (minigrpo is loaded)."""
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    mod = sys.modules.get("kernels")
    if mod is not None and ROOT in Path(getattr(mod, "__file__", None) or "/").resolve().parents:
        del sys.modules["kernels"]


def trl_weight_dtype(cfg, choice: str) -> torch.dtype:
    """TRL's model weights: float32 under bf16 autocast for full fine-tuning (GRPOTrainer's own default,
    the mixed precision of our fp32 masters), bf16 for a frozen LoRA base (as ours) or when asked."""
    if cfg.run.dtype != "bfloat16":  # the CPU, or --set run.dtype=float32: plain fp32 on both sides
        return torch.float32
    return torch.bfloat16 if choice == "bfloat16" or cfg.lora.enabled else torch.float32


def trl_optimizers(model, cfg) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer TRL is handed: torch's AdamW over the trainable parameters with our settings, and
    our schedule (minigrpo.optim.build_scheduler, as the trainer builds it) over steps x num_iterations
    updates, its warmup also counted in training steps of num_iterations updates each."""
    from minigrpo.optim import build_scheduler

    t, updates = cfg.train, cfg.grpo.num_iterations
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)
    return optimizer, build_scheduler(optimizer, t, t.steps * updates, updates_per_step=updates)


def run_trl(cfg, provider: str, weights: str = "auto") -> tuple[list[dict], dict]:
    """TRL's GRPOTrainer on the same model folder, prompts (in our order), rewards and optimizer."""
    unshadow_hf_kernels()
    import datasets
    import transformers
    from trl import GRPOConfig, GRPOTrainer

    from minigrpo import rewards
    from minigrpo.data import PromptLoader, build_dataset, build_messages
    from minigrpo.models.tokenizer_files import load_tokenizer_folder
    from minigrpo.prompt_fit import prompts_that_fit

    folder, steps, B, G = cfg.model.name_or_path, cfg.train.steps, cfg.grpo.prompts_per_step, cfg.grpo.group_size
    dtype = trl_weight_dtype(cfg, weights)
    # the prompts of our loader, in its order: one step's B prompts after another
    examples, _ = prompts_that_fit(cfg, build_dataset(cfg.data, cfg.data.split), load_tokenizer_folder(Path(folder)))
    loader = PromptLoader(examples, seed=cfg.run.seed, shuffle=cfg.data.shuffle)
    ordered = [ex for _ in range(steps) for ex in loader.next_batch(B)]
    data = datasets.Dataset.from_list(
        [{"prompt": build_messages(ex, cfg.data.system_prompt), "row": i} for i, ex in enumerate(ordered)]
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(DEVICE)
    if cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        targets = [f"{t}_proj" for t in cfg.lora.targets]
        c = cfg.lora
        kw = dict(r=c.r, lora_alpha=c.alpha, lora_dropout=c.dropout, use_rslora=c.rslora, task_type="CAUSAL_LM")
        model = get_peft_model(model, LoraConfig(target_modules=targets, **kw))
    optimizer, scheduler = trl_optimizers(model, cfg)
    specs = rewards.build_reward_specs(cfg.rewards)
    fields = GRPOConfig.__dataclass_fields__
    with tempfile.TemporaryDirectory(prefix="bench-e2e-trl-") as tmp:
        kwargs = {k: v for k, v in trl_config_kwargs(cfg, provider, steps, tmp).items() if k in fields}
        clock = step_clock()
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=[trl_reward(s, ordered, cfg.sampler.max_new_tokens) for s in specs],
            args=GRPOConfig(**kwargs),
            train_dataset=data,
            processing_class=transformers.AutoTokenizer.from_pretrained(folder),
            callbacks=[clock],
            optimizers=(optimizer, scheduler),
        )
        clock.time_rollouts(trainer)
        trainer.train()
    for row in clock.steps:
        logs = clock.logs.get(row["step"], {})
        row["update_s"] = row["step_s"] - row["rollout_s"]
        row["completion_tokens"] = logs.get("completions/mean_length", float("nan")) * B * G
        row["reward"] = logs.get("reward")
        row["trl_step_time"] = logs.get("step_time")
    return clock.steps, {"grpo_config": {k: v for k, v in kwargs.items() if k != "output_dir"}}


def step_clock():
    """A TrainerCallback that times each optimizer step between CUDA synchronisations, its rollout (the
    wrapped `_generate_and_score_completions`), its peak memory, and keeps TRL's per-step logs."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[dict] = []
            self.logs: dict[int, dict] = {}
            self.t0, self.rollout = 0.0, 0.0

        def time_rollouts(self, trainer) -> None:
            inner = trainer._generate_and_score_completions

            def timed(*a, **k):
                sync()
                t0 = time.perf_counter()
                out = inner(*a, **k)
                sync()
                self.rollout += time.perf_counter() - t0
                return out

            trainer._generate_and_score_completions = timed

        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            if CUDA:
                torch.cuda.reset_peak_memory_stats()
            self.t0, self.rollout = time.perf_counter(), 0.0

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            row = {"step": state.global_step, "step_s": time.perf_counter() - self.t0, "rollout_s": self.rollout}
            self.steps.append(row | {"peak_gib": torch.cuda.max_memory_allocated() / GIB if CUDA else None})

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.setdefault(state.global_step, {}).update(logs or {})

    return StepClock()


def child(spec_path: str) -> None:
    """Run one (case, provider) and write its row to spec["out"] (errors too)."""
    from minigrpo.config import load_config

    spec = json.loads(Path(spec_path).read_text())
    row: dict[str, Any] = {"case": spec["case"], "provider": spec["provider"], "seed": spec.get("seed"), "status": "ok"}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
            overrides = [*spec["overrides"], f"run.output_dir={tmp}", f"run.name=e2e_{spec['provider']}"]
            if spec["provider"] == "ours-vllm":
                overrides.append("sampler.kind=vllm")
            cfg = load_config(spec["config"], overrides)
            t0 = time.perf_counter()
            ours = spec["provider"] in ("ours", "ours-vllm")
            steps, extra = run_ours(cfg) if ours else run_trl(cfg, spec["provider"], spec["trl_weights"])
            row |= {"seconds_total": time.perf_counter() - t0, "steps": steps, **extra}
    except torch.cuda.OutOfMemoryError:
        row["status"] = "OOM"
    except Exception as e:  # recorded; the parent goes on with the next provider
        row["status"] = f"error: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
        traceback.print_exc()
    Path(spec["out"]).write_text(json.dumps(row, default=str))


def versions() -> dict[str, str | None]:
    out = {}
    for dist in ("trl", "transformers", "peft", "datasets", "vllm", "liger-kernel"):
        found = importlib.util.find_spec(dist.replace("-", "_")) is not None
        out[dist] = importlib.metadata.version(dist) if found else None
    return out


def run_provider(case: dict, provider: str, args, tmp: Path) -> dict:
    """One (case, provider) in a fresh process -> its row (a skip, timeout or crash is a status)."""
    row = {"case": case["case"], "provider": provider, "seed": case.get("seed"), "status": missing(provider)}
    if row["status"]:
        return row
    n = len(list(tmp.iterdir()))
    spec = {**case, "provider": provider, "trl_weights": args.trl_weights, "out": str(tmp / f"row_{n}.json")}
    (tmp / f"spec_{n}.json").write_text(json.dumps(spec))
    print(f"=== {case['case']} / {provider} ===", flush=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(tmp / f"spec_{n}.json")]
    try:
        code = subprocess.run(cmd, timeout=args.provider_timeout).returncode
    except subprocess.TimeoutExpired:
        return row | {"status": f"timeout ({args.provider_timeout} s)"}
    if not Path(spec["out"]).exists():
        return row | {"status": f"error: the process exited with {code}"}
    return json.loads(Path(spec["out"]).read_text())


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=("speed", "learn"), default="speed")
    ap.add_argument("--providers", type=names(PROVIDERS), default=None, help=f"a list of {','.join(PROVIDERS)}")
    ap.add_argument("--cases", default=SPEED_CASES, help="speed mode: <model>/full or <model>/lora, comma-separated")
    ap.add_argument("--steps", type=positive_int, default=None, help="optimizer steps (speed 10, learn 60)")
    ap.add_argument(
        "--measure-from", type=positive_int, default=3, help="speed: medians over steps measure_from..steps"
    )
    for flag, default in (("--prompts", 16), ("--group", 8), ("--new-tokens", 512), ("--micro", 16)):
        ap.add_argument(flag, type=positive_int, default=default, help="speed mode (learn: the config's)")
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing for every provider")
    ap.add_argument(
        "--seed", type=seed_list, default=[0],
        help="run.seed; learn mode takes a list (0,1,2: each provider once per seed; the spread across seeds)",
    )  # fmt: skip
    ap.add_argument(
        "--trl-weights", choices=("auto", "bfloat16"), default="auto",
        help="TRL's weights: auto = float32 for full fine-tuning (its default), bf16 for a LoRA base",
    )  # fmt: skip
    ap.add_argument(
        "--set", nargs="+", default=[], metavar="KEY=VALUE",
        help="config overrides for every provider, after the benchmark's own (e.g. run.dtype=float32)",
    )  # fmt: skip
    ap.add_argument(
        "--checkpoint-dtype", choices=("float32", "bfloat16"), default="float32",
        help="learn mode: SmolLM2's checkpoint as packaged, or rounded to bf16 as most checkpoints are",
    )  # fmt: skip
    ap.add_argument("--tag", default="", help="result file e2e_<mode>_<tag>_<device>.json")
    ap.add_argument("--provider-timeout", type=positive_int, default=3600)
    ap.add_argument(
        "--model-cache", type=out_folder, default=str(Path(tempfile.gettempdir()) / "minigrpo-bench-e2e-models")
    )
    ap.add_argument("--quick", action="store_true", help="CPU smoke sizes: SmolLM2, 2 x 2 completions, 8 tokens")
    ap.add_argument("--out-dir", type=out_folder, default=None, help="write results here instead of benchmarks/results")
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    if args.mode == "speed" and len(args.seed) > 1:
        raise UsageError(f"--seed: one seed in speed mode, got {len(args.seed)}")
    providers = args.providers or (["ours", "trl"] if args.mode == "learn" else list(PROVIDERS))
    args.providers = ",".join(providers)
    args.steps = args.steps or (60 if args.mode == "learn" else 10)
    if args.quick:
        args.prompts, args.group, args.new_tokens, args.micro = 2, 2, 8, 2
        args.steps, args.measure_from = min(args.steps, 3), 2
        args.cases = "smollm2-135m/full" if args.cases == SPEED_CASES else args.cases
    env = {**environment(), **versions()}
    Path(args.model_cache).mkdir(parents=True, exist_ok=True)
    check_overrides(args)
    cases = build_cases(args, Path(args.model_cache))
    name = f"e2e_{args.mode}_{args.tag}" if args.tag else f"e2e_{args.mode}"
    folder = RESULTS if args.out_dir is None else Path(args.out_dir)
    workload = {k: v for k, v in vars(args).items() if k not in ("child", "out_dir", "model_cache")}
    rows: list[dict] = []

    def save() -> Path:
        """The result so far: written after every row, so a run stopped midway keeps what it measured."""
        add_ratios(rows)
        payload = {"environment": env, "workload": workload, "cases": cases, "how": __doc__, "rows": rows}
        if args.mode == "learn":
            for r in rows:
                r["reward_per_step"] = [s.get("reward") for s in r.get("steps", [])]
            png = folder / f"{name}_{device_slug(env)}" / "reward_vs_trl.png"
            plot_rewards(rows, png, f"{LEARN_CONFIG}, {args.steps} steps, {env['device']}")
            payload["plot"], payload["learning"] = str(png), learning(rows)
        return write_result(name, payload, out_dir=args.out_dir)

    with tempfile.TemporaryDirectory(prefix="bench-e2e-rows-") as tmp:
        for case in cases:
            for provider in providers:
                row = run_provider(case, provider, args, Path(tmp))
                row |= summarize(row, args.measure_from if args.mode == "speed" else 1)
                rows.append(row)
                print({k: v for k, v in row.items() if k not in ("steps", "grpo_config")}, flush=True)
                path = save()
    print()
    cols = ["case", "provider", *(["seed"] if args.mode == "learn" else []), "status", "step_s", "rollout_s"]
    cols += ["update_s", "tokens_per_s", "peak_gib"]
    print_table(rows, [*cols, "steps_per_hour", "ours_x", "ours_mem", "target_met"])
    if args.mode == "learn":
        print()
        print_table(learning(rows), ["provider", "seeds", "first5", "last10", "se", "ours_within_1se"])
    print(f"\nwrote {path}")


if __name__ == "__main__":
    run_cli(lambda _: main())  # a bad argument is one `error:` line
