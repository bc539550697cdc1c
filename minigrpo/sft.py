"""Supervised fine-tuning before GRPO: `python -m minigrpo.sft --config configs/X.yaml [--set k=v ...] [--resume]`.

GRPO on a small model often starts with a short supervised pass that teaches the answer format,
so that the first rollouts already earn format rewards. This is that pass, on the GRPO machinery:
the same config file (the `sft:` section, see minigrpo/sft_config.py for what else it reads), the
same model loading, LoRA / QLoRA, optimizer and schedule, the same run folder (metrics.jsonl, the
table, curves.png, atomic checkpoints, exact --resume) and the same one-line errors.

    building   every check the config and the files allow (the conversations are read and checked
               here, against the model's positions too; on CUDA the memory pre-flight), then the
               policy, optimizer, schedule and loader (minigrpo/build.py)
    the loop   per step: sft.batch_size conversations -> tokens with labels on the assistant replies
               only (minigrpo/sft_data.py) -> micro-batches: hidden states -> fused LM-head
               cross-entropy (never the (B, T, V) logits) -> backward -> clip, step
    the end    run_dir/model: a plain HF checkpoint (LoRA: merged) that a GRPO config names as
               `model.name_or_path` (e.g. configs/smollm2_sft_format.yaml -> smollm2_format_grpo.yaml)

The loss of a step is the mean over its assistant tokens: sum of the token cross-entropies / the
number of loss tokens in the whole step (every micro-batch divides by the same step total), so any
micro-batch split gives the same gradient.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from minigrpo import lora
from minigrpo.bookkeeping import open_logger, save, until_interrupted
from minigrpo.build import (
    check_packages,
    compute_dtype,
    load_checkpoint_weights,
    load_policy,
    pick_device,
    restore_trainer_state,
    seed_everything,
)
from minigrpo.config import Config, config_from_args
from minigrpo.config_rules import rules_of
from minigrpo.data import Example, PromptLoader
from minigrpo.distributed import World, checked_on_every_rank, env_world_size
from minigrpo.errors import UserError, run_cli
from minigrpo.grad_scale import GradScale, grad_scale_metrics, optimizer_step
from minigrpo.kernels import fused_linear_cross_entropy
from minigrpo.memory import sft_preflight
from minigrpo.models.args import ModelArgs
from minigrpo.models.loading import check_model_source, local_model_args, save_pretrained
from minigrpo.optim import build_optimizer, build_scheduler
from minigrpo.quant import require_nf4
from minigrpo.run_folder import (
    RESUMABLE_CHANGES,
    ResumePoint,
    check_run_dir,
    check_same_architecture,
    finish_run,
    run_dir_held,
    unread_settings,
    write_folder_whole,
)
from minigrpo.sft_data import (
    IGNORE,
    check_conversations,
    collate,
    example_tokens,
    load_conversations,
    loss_tokens,
)
from minigrpo.step import peak_memory_gb

# what a resumed SFT run may change: the GRPO list, the settings SFT does not read (the other algorithms,
# episodes, GRPO's micro-batches), and what only trades memory (its loss is a mean over each step's
# tokens, whatever the micro-batches)
SFT_RESUMABLE = (
    *(k for k in RESUMABLE_CHANGES if k != "sft"),
    *("sampler.", "grpo.", "rewards", "distributed.", "algorithm", "env.", "dpo.", "ppo.", "train.micro_batch_size"),
    *("model.gradient_checkpointing", "model.activation_offload", "sft.micro_batch_size"),
)
FINAL_MODEL = "model"  # run_dir/model: the run's output, a valid model.name_or_path


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """The command line: a mistake in the config or the files is one `error:` line (exit status 2);
    Ctrl-C is one `interrupted:` line naming the checkpoint to continue from (exit status 130)."""
    return run_cli(lambda args: until_interrupted(sft, sft_config_from_args(args), (FINAL_MODEL,)), argv)


def sft_config_from_args(argv: list[str] | None) -> Config:
    """The command line's config, refused only for what SFT reads (config_rules.rules_of)."""
    with rules_of("sft"):
        return config_from_args(argv, description="SFT before GRPO", prog="minigrpo.sft")


def sft(cfg: Config) -> list[dict[str, Any]]:
    """Run (or resume) SFT as configured; returns the metrics of every step run."""
    with run_dir_held(cfg):  # first: a second process on this run folder stops here
        resume, examples, checked = checked_on_every_rank(lambda: check_before_loading(cfg))  # torchrun: one line
        if resume is not None and resume.step >= cfg.train.steps:  # killed after its final checkpoint, or complete
            return finish_run(cfg, resume, (FINAL_MODEL,), lambda names: write_final_model_from(cfg, resume))
        return loop(build_run(cfg, resume, examples, checked=checked))


# ================================================================================================
# building the run


def check_before_loading(cfg: Config) -> tuple[ResumePoint | None, list[Example], bool]:
    """Every check the config and the file system allow, before any weights load: one process, a
    tokenizer, the packages, the run folder (new, or an intact checkpoint to resume with an unchanged
    config), the conversations (read and checked: file and line named), the model folder and, when it
    is local, the conversations against its tokenizer and positions and the memory pre-flight
    (check_fits). Returns the resume point, the conversations and whether that last check ran (else
    build_run runs it once the model is loaded)."""
    device = pick_device(cfg.run.device)  # a missing GPU first: nothing is read for a run that cannot start
    if env_world_size() > 1:
        raise UserError("python -m minigrpo.sft runs in one process; launch it without torchrun")
    if cfg.model.arch is not None:
        raise UserError("SFT needs a tokenizer: model.arch builds weights only; set model.name_or_path")
    check_packages(cfg, sampling=False)
    if cfg.lora.enabled and cfg.lora.quantize_base is not None:  # 4-bit kernels on this device
        require_nf4(device, cfg.lora.quantize_base)
    lora_off = () if cfg.lora.enabled else tuple(k for k in unread_settings(cfg) if k.startswith("lora."))
    resume = check_run_dir(cfg, (*SFT_RESUMABLE, *lora_off))  # LoRA's settings are unread with LoRA off
    examples = load_conversations(cfg)
    tokenizer = check_model_source(cfg.model.name_or_path, revision=cfg.model.revision, key="model.name_or_path")
    check_same_architecture(cfg.model.name_or_path, None if cfg.lora.enabled else resume)
    args = local_model_args(cfg.model.name_or_path)
    if tokenizer is not None and args is not None:  # a local model folder: its tokenizer and config are read already
        check_fits(cfg, args, device, examples, tokenizer)
    return resume, examples, tokenizer is not None and args is not None


def check_fits(cfg: Config, args: ModelArgs, device: torch.device, examples: list[Example], tokenizer: Any) -> None:
    """The conversations against the model: its chat template, sft.max_seq_len against their replies
    and its max_position_embeddings (sft_data.check_conversations); on CUDA the memory pre-flight of a
    step (memory.sft_preflight: one micro-batch of the longest row), which names the settings that
    would fit instead of running out of memory at step 1."""
    longest = check_conversations(examples, tokenizer, cfg.sft.max_seq_len, args.max_position_embeddings)
    if device.type == "cuda":
        sft_preflight(cfg, args, device, longest)


@dataclass
class SFTRun:
    """Everything the SFT loop works with (what minigrpo/bookkeeping.py needs of a run, too)."""

    cfg: Config
    world: World
    dtype: torch.dtype
    model: torch.nn.Module
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: PromptLoader
    grad_scale: GradScale = field(default_factory=GradScale)  # float16: the loss scale
    start_step: int = 0
    resumed_from: Path | None = None


def build_run(cfg: Config, resume: ResumePoint | None, examples: list[Example], *, checked: bool = False) -> SFTRun:
    """Load the policy (LoRA / NF4 as configured; a checkpoint's weights on resume), the optimizer,
    schedule and loader, and restore a resumed run's state. The conversations are checked against
    the loaded tokenizer unless `checked` (a hub or GGUF model has none before)."""
    device = pick_device(cfg.run.device)
    dtype = compute_dtype(cfg, device)
    seed_everything(cfg.run.seed)
    masters: dict | None = {} if resume is None else None  # a resumed run's load with its optimizer state
    model, tokenizer = load_policy(cfg, device, dtype, masters=masters)
    if not checked:
        check_fits(cfg, model.args, device, examples, tokenizer)
    if resume is not None:
        load_checkpoint_weights(cfg, model, resume.path)
    optimizer = build_optimizer(model.parameters(), cfg.train, masters=masters)
    masters = None  # the optimizer holds them now
    run = SFTRun(
        cfg=cfg,
        world=World(device=device),
        dtype=dtype,
        model=model,
        tokenizer=tokenizer,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg.train, cfg.train.steps),
        loader=PromptLoader(examples, seed=cfg.run.seed, shuffle=cfg.sft.shuffle),
        grad_scale=GradScale.for_dtype(dtype),
    )
    if resume is not None:
        restore_trainer_state(run, resume)
    return run


# ================================================================================================
# the loss


def sft_loss_sum(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the cross-entropies of the label tokens (fp32 scalar), through the fused LM-head kernel.

    input_ids, attention_mask, labels: (B, T), labels IGNORE where no loss. Position t predicts token
    t + 1; only the hidden states of loss positions reach the kernel, and the (n, V) logits are never
    materialised (the kernel works on chunks of tokens and vocabulary).
    """
    hidden = model.hidden(input_ids, attention_mask=attention_mask)  # (B, T, D)
    targets = labels[:, 1:]  # (B, T-1): the token each position predicts
    active = targets != IGNORE  # (B, T-1)
    states = hidden[:, :-1][active]  # (n, D)
    return fused_linear_cross_entropy(states, model.output_weight, targets[active], reduction="sum")


def train_step(run: SFTRun, examples: list[Example]) -> dict[str, float]:
    """One optimizer step on `examples`: the mean cross-entropy over all their assistant tokens."""
    cfg, model, device = run.cfg, run.model, run.world.device
    whole = [example_tokens(ex, run.tokenizer) for ex in examples]  # uncut: what max_seq_len cuts is counted
    cut = sum(len(ids) > cfg.sft.max_seq_len for ids, _ in whole)
    rows = [(ids[: cfg.sft.max_seq_len], labels[: cfg.sft.max_seq_len]) for ids, labels in whole]
    tokens = sum(loss_tokens(labels) for _, labels in rows)  # the step's normaliser
    pad_id = run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else 0
    mb = cfg.sft.micro_batch_size
    model.train()
    loss_total = 0.0
    for start in range(0, len(rows), mb):
        part = rows[start : start + mb]
        if not any(loss_tokens(labels) for _, labels in part):
            continue  # nothing to learn here (replies cut off by max_seq_len)
        input_ids, attention_mask, labels = collate(part, pad_id, device)  # (b, T) each
        loss = sft_loss_sum(model, input_ids, attention_mask, labels) / tokens
        run.grad_scale.scaled(loss).backward()
        loss_total += float(loss.detach())
    grad_norm, lr = optimizer_step(cfg, model, run.optimizer, run.scheduler, run.world, run.grad_scale)
    lengths = [len(ids) for ids, _ in rows]
    return {
        "loss": loss_total if tokens else float("nan"),
        "grad_norm": grad_norm,
        "lr": lr,
        "loss_tokens": float(tokens),
        "seq_len_mean": sum(lengths) / len(lengths),
        "seq_len_max": float(max(lengths)),
        "cut_frac": cut / len(rows),  # conversations longer than max_seq_len (their tail carries no loss)
        **grad_scale_metrics(run.grad_scale),
    }


# ================================================================================================
# the loop


def loop(run: SFTRun) -> list[dict[str, Any]]:
    """Steps start_step+1 .. train.steps, checkpoints as configured, then the final model; the logger
    is closed however the loop ends."""
    logger = open_logger(run)
    try:
        history = steps(run, logger)
        save_final_model(run)
    finally:  # after Ctrl-C or an error too: final curves and files flushed
        logger.close()
    return history


def steps(run: SFTRun, logger: Any) -> list[dict[str, Any]]:
    """Steps start_step+1 .. train.steps with their checkpoints; returns the metrics of each."""
    cfg = run.cfg
    history = []
    for step in range(run.start_step + 1, cfg.train.steps + 1):
        t0 = time.perf_counter()
        if run.world.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(run.world.device)
        metrics = train_step(run, run.loader.next_batch(cfg.sft.batch_size))
        seconds = time.perf_counter() - t0
        metrics.update({"time/step": seconds, "tokens_per_s": metrics["seq_len_mean"] * cfg.sft.batch_size / seconds})
        metrics["mem/peak_gb"] = peak_memory_gb(run.world.device)
        logger.log(step, metrics)
        history.append({"step": step, **metrics})
        last = step == cfg.train.steps
        if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or (last and cfg.checkpoint.save_final):
            save(run, step)
    return history


def save_final_model(run: SFTRun) -> Path:
    """run_dir/model: the trained policy as a plain HF checkpoint (LoRA: adapters merged into the
    base), in the run's precision: what a GRPO config names as model.name_or_path."""
    return write_final_model(run.cfg, run.model, run.tokenizer, run.dtype)


def write_final_model(cfg: Config, model: torch.nn.Module, tokenizer: Any, dtype: torch.dtype) -> Path:
    """save_final_model's folder, written whole (a run killed while writing it leaves none)."""
    save = lora.save_merged if cfg.lora.enabled else save_pretrained
    out = write_folder_whole(cfg.run.run_dir / FINAL_MODEL, lambda folder: save(model, tokenizer, folder, dtype=dtype))
    print(f"SFT model written to {out} (use it as model.name_or_path of a GRPO config)")
    return out


def write_final_model_from(cfg: Config, resume: ResumePoint) -> Path:
    """The final model of a finished run, from its final checkpoint's weights."""
    device = pick_device(cfg.run.device)
    dtype = compute_dtype(cfg, device)
    model, tokenizer = load_policy(cfg, device, dtype)
    load_checkpoint_weights(cfg, model, resume.path)
    return write_final_model(cfg, model, tokenizer, dtype)


if __name__ == "__main__":
    main()
