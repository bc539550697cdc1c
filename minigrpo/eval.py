"""Evaluate a model on a held-out split: `python -m minigrpo.eval --checkpoint DIR [options]`.

    python -m minigrpo.eval --checkpoint runs/demo_cpu/checkpoints/step_000020
    python -m minigrpo.eval --checkpoint smollm2 --config configs/demo_cpu.yaml --num 100

Accuracy is the fraction of completions whose extracted final answer (answer tag, \\boxed{},
`####` or the last number) equals the reference; the configured reward functions are reported too.
Sampling follows `eval.temperature` (greedy by default) and `eval.max_new_tokens`. Without
`--config`, the run config saved in a training checkpoint (`run_config.yaml`) is used; a LoRA
checkpoint (a PEFT adapter) is applied to the base model that config names.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from minigrpo import lora, rewards
from minigrpo.config import Config, load_config, resolve_dtype
from minigrpo.data import Example, batch_columns, build_dataset, encode_prompts
from minigrpo.models.loading import load_pretrained
from minigrpo.sampling.sampler import Sampler
from minigrpo.train import load_policy, pick_device, reward_specs, sampling_params


@torch.no_grad()
def evaluate(cfg: Config, model, tokenizer, examples: list[Example], *, batch_size: int = 32) -> dict[str, Any]:
    """Greedy (or eval.temperature) completions for every example -> accuracy and mean rewards."""
    sampler = Sampler(model, tokenizer, cuda_graphs=cfg.sampler.compile, max_rows=cfg.sampler.max_rows)
    params = sampling_params(cfg, tokenizer, n=1, temperature=cfg.eval.temperature)
    if cfg.eval.max_new_tokens is not None:
        params = dataclasses.replace(params, max_new_tokens=cfg.eval.max_new_tokens)
    specs = reward_specs(cfg)
    correct, totals, per_fn, samples = [], [], {s.name: [] for s in specs}, []
    t0 = time.perf_counter()
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        ids, _ = encode_prompts(batch, tokenizer, cfg.data.system_prompt)
        rollout = sampler.generate(ids, params)
        answers = [ex.answer for ex in batch]
        columns = batch_columns(batch)
        columns["completion_lengths"] = rollout.completion_lengths.tolist()
        scored = rewards.score([ex.prompt for ex in batch], rollout.completion_texts, answers, specs, columns=columns)
        for i, text in enumerate(rollout.completion_texts):
            ok = rewards.answers_match(rewards.extract_answer(text), answers[i])
            correct.append(ok)
            totals.append(float(scored.total[i]))
            for k, name in enumerate(scored.names):
                per_fn[name].append(float(scored.per_fn[i, k]))
            if len(samples) < 5:
                sample = {"prompt": str(batch[i].prompt), "completion": text, "answer": answers[i], "correct": ok}
                samples.append(sample)

    def mean(xs: list[float]) -> float:
        valid = [x for x in xs if x == x]  # NaN: no score
        return sum(valid) / len(valid) if valid else float("nan")

    return {
        "num_examples": len(examples),
        "accuracy": sum(correct) / max(len(correct), 1),
        "reward": mean(totals),
        **{f"reward/{name}": mean(v) for name, v in per_fn.items()},
        "seconds": time.perf_counter() - t0,
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="Evaluate a checkpoint on a held-out split")
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, hub id, .gguf file or 'smollm2'")
    parser.add_argument("--config", default=None, help="YAML config (default: the run's config.yaml, if found)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    parser.add_argument("--split", default=None, help="dataset split (default: data.eval_split)")
    parser.add_argument("--num", type=int, default=None, help="number of examples (default: eval.num_prompts)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    config_path = args.config
    ckpt = Path(args.checkpoint)
    if config_path is None and ckpt.is_dir():  # a training checkpoint carries its run config
        found = [p for p in (ckpt / "run_config.yaml", ckpt.resolve().parents[1] / "config.yaml") if p.is_file()]
        config_path = str(found[0]) if found else None
    cfg = load_config(config_path, args.overrides)
    split = args.split or cfg.data.eval_split or cfg.data.split
    examples = build_dataset(cfg.data, split)[: args.num or cfg.eval.num_prompts]
    device = pick_device(cfg.run.device)
    dtype = getattr(torch, resolve_dtype(cfg.run.dtype, device.type))
    if (ckpt / "adapter_config.json").is_file():  # a LoRA run: its base model plus the saved adapter
        model, tokenizer = load_policy(cfg, device, dtype)
        lora.load_peft_adapter(model, ckpt)
    else:
        model, tokenizer = load_pretrained(args.checkpoint, dtype=dtype, device=device)
    results = evaluate(cfg, model.eval(), tokenizer, examples, batch_size=args.batch_size)
    print(f"{args.checkpoint} on {split} ({results['num_examples']} examples, {results['seconds']:.1f}s):")
    for key, value in results.items():
        if key.startswith(("accuracy", "reward")):
            print(f"  {key:<28} {value:.4f}")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
