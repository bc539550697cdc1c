"""The training runs the loop tests launch: a tiny random Llama with a word-level tokenizer on the
copy task ('repeat 7' -> '7'), as a plain config dict."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from helpers.tiny import tiny_run_checkpoint, write_copy_task

TIMING = ("time/", "tokens_per_s", "mem/")  # metrics that differ between identical runs


def run_config(tmp_path: Path, **sections) -> dict:
    """80 steps of 8 prompts x 16 one-token completions on the CPU; `sections` update each section."""
    (tmp_path / "model").mkdir(exist_ok=True)
    if not (tmp_path / "model" / "config.json").exists():
        tiny_run_checkpoint(tmp_path / "model", seed=0)
        write_copy_task(tmp_path / "train.jsonl")
    cfg = {
        "run": {"name": "run", "output_dir": str(tmp_path / "runs"), "seed": 0, "device": "cpu"},
        "model": {"name_or_path": str(tmp_path / "model")},
        "data": {"source": "jsonl", "path": str(tmp_path / "train.jsonl"), "eval_split": None},
        "sampler": {"temperature": 1.0, "max_new_tokens": 1},
        "grpo": {"prompts_per_step": 8, "group_size": 16},
        "rewards": [{"name": "exact_answer"}],
        "train": {"steps": 80, "lr": 0.001, "micro_batch_size": 64, "max_grad_norm": 1.0},
        "log": {"plots": False, "progress": False, "sample_every": 0},
        "checkpoint": {"every": 0, "save_final": False},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values} if isinstance(values, dict) else values
    return cfg


def launch(root: Path, cfg: dict, *extra: str) -> list[dict]:
    """Write cfg to root/<run name>.yaml, train it in this process (`python -m minigrpo.train` with
    `extra` arguments) and return the records of root/runs/<run name>/metrics.jsonl."""
    from minigrpo.train import main

    path = root / f"{cfg['run']['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    main(["--config", str(path), *extra])
    lines = (root / "runs" / cfg["run"]["name"] / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]
