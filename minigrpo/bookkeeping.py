"""The bookkeeping both training entry points share: the metrics logger and checkpoints.

    logger = open_logger(run)   # metrics.jsonl, table, curves.png; the resolved config.yaml
    save(run, step)             # an atomic checkpoint: model (or adapter), optimizer, schedule, data, RNG
                                # (and PPO's critic: weights, optimizer, schedule, in the trainer state)
    interrupted(run_dir, cfg)   # after Ctrl-C: one line, the checkpoint to continue from (or: complete), exit 130

`run` is a `build.Run` (python -m minigrpo.train) or an `sft.SFTRun` (python -m minigrpo.sft): anything
with cfg, world, dtype, model, tokenizer, optimizer, scheduler, loader (state_dict), start_step and
resumed_from. Both write the same run folder layout, so checkpoints, --resume and plots work alike.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import torch

from minigrpo.algorithms.value_model import critic_state
from minigrpo.build import save_model_fn
from minigrpo.checkpoint import (
    CheckpointError,
    CheckpointWarning,
    ModelStateView,
    UnreadableCheckpointError,
    find_resume_checkpoint,
    optimizer_state,
    rng_state,
    save_checkpoint,
)
from minigrpo.config import save_config
from minigrpo.distributed import full_state_dict, is_sharded
from minigrpo.metrics import MetricsLogger
from minigrpo.optim import resumed_rate_note
from minigrpo.run_folder import missing_final_outputs

T = TypeVar("T")


def open_logger(run: Any) -> MetricsLogger:
    """The metrics logger (rank 0 writes); a resumed run drops the records after its checkpoint."""
    cfg, world = run.cfg, run.world
    if run.resumed_from is not None and world.main:
        print(f"resumed from {run.resumed_from} (step {run.start_step})")
        critic = getattr(run, "critic", None)  # algorithm ppo: the critic's schedule jumps as the policy's
        schedules = (run.scheduler, cfg.train, run.start_step, None if critic is None else critic.scheduler)
        note = resumed_rate_note(*schedules)  # train.steps changed the schedule
        if note is not None:
            print(note)
    if world.main:
        save_config(cfg, cfg.run.run_dir / "config.yaml")  # the config that runs
        if world.distributed:
            share, uneven = divmod(cfg.grpo.prompts_per_step, world.size)
            print(f"{world.size} ranks, {share}{'+' if uneven else ''} prompts per rank")
    logger = MetricsLogger(
        cfg.run.run_dir,
        total_steps=cfg.train.steps,
        start_step=run.start_step,
        print_every=cfg.log.every,
        plots=cfg.log.plots,
        tensorboard=cfg.log.tensorboard,
        wandb=cfg.log.wandb,
        wandb_project=cfg.log.wandb_project,
        progress=cfg.log.progress,
        config=cfg.to_dict(),
        enabled=world.main,
    )
    if run.start_step and world.main:
        logger.truncate_after(run.start_step)
    return logger


def until_interrupted(run: Callable[[Any], T], cfg: Any, final_folders: tuple[str, ...] = ()) -> T:
    """run(cfg), with Ctrl-C turned into `interrupted` (one line, exit status 130). final_folders: what
    the run writes into its folder after its last step (a complete run is told apart by them)."""
    try:
        return run(cfg)
    except KeyboardInterrupt:
        interrupted(cfg.run.run_dir, cfg, final_folders)


def interrupted(run_dir: Path, cfg: Any = None, final_folders: tuple[str, ...] = ()) -> NoReturn:
    """After Ctrl-C (every file of the run is whole: checkpoints and metrics are written atomically or
    line by line): one `interrupted:` line saying how the run goes on, and exit status 130 (128 + SIGINT)."""
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank is interrupted, rank 0 tells
        print(f"interrupted: {how_to_go_on(Path(run_dir), cfg, final_folders)}", file=sys.stderr, flush=True)
    raise SystemExit(130)


def how_to_go_on(run_dir: Path, cfg: Any = None, final_folders: tuple[str, ...] = ()) -> str:
    """How an interrupted run goes on: --resume from the checkpoint a resume would take (the newest intact
    one, as find_resume_checkpoint picks it: a newer broken one is passed over), else a fresh start. A
    checkpoint that cannot be read says itself what to do (make it readable): the run folder stays. Given
    the run's cfg, a checkpoint at train.steps is the end: the run is complete, or lacks final outputs."""
    try:
        with warnings.catch_warnings():  # the broken checkpoints passed over: --resume names them itself
            warnings.simplefilter("ignore", CheckpointWarning)
            found = find_resume_checkpoint(run_dir, read_tensors=False)  # headers: no GBs of optimizer state read
    except UnreadableCheckpointError as e:
        return str(e)
    except CheckpointError as e:
        return f"{e}; delete {run_dir} or set another run.name"
    if found is not None and cfg is not None and int(found[1]["step"]) >= cfg.train.steps:
        return run_end_note(cfg, found[0], final_folders)
    if found is not None:
        return f"continue from {found[0]} with --resume"
    if (run_dir / "metrics.jsonl").exists():
        return f"{run_dir} holds no checkpoint yet, so nothing to resume: delete it or set another run.name"
    return "no step finished: start the run again"


def run_end_note(cfg: Any, final_checkpoint: Path, final_folders: tuple[str, ...]) -> str:
    """How a run whose final checkpoint is written stands: complete (naming its final model), or lacking
    final outputs (merged export, curves) that --resume writes from that checkpoint (run_folder.finish_run)."""
    run_dir, steps = cfg.run.run_dir, cfg.train.steps
    missing = missing_final_outputs(cfg, final_folders)
    if missing:
        it = "it" if len(missing) == 1 else "them"
        return (
            f"{run_dir} ran to train.steps={steps} ({final_checkpoint}) but lacks {', '.join(missing)}: rerun with "
            f"--resume, which writes {it} from that checkpoint"
        )
    final = run_dir / final_folders[0] if final_folders else final_checkpoint
    what = "LoRA adapter" if cfg.lora.enabled and not final_folders else "model"
    return f"the run is complete: {run_dir} ran to train.steps={steps}; its final {what} is {final}"


def save(run: Any, step: int) -> None:
    """Checkpoint `step`: every rank takes part in gathering shards and RNG states; rank 0 writes."""
    cfg, world, model = run.cfg, run.world, run.model
    sharded = is_sharded(model)
    opt = optimizer_state(model, run.optimizer, keep=world.main, fp32_params=sharded and run.dtype != torch.float32)
    rngs = world.all_gather(rng_state())
    to_save = ModelStateView(model, full_state_dict(model, world), run.dtype) if sharded else model
    if world.main:
        state = {"optimizer": opt, "scheduler": run.scheduler.state_dict(), "data": run.loader.state_dict()}
        state["grad_scale"] = run.grad_scale.state_dict()
        state["dtype"] = str(run.dtype).removeprefix("torch.")  # what a resume computes in (run_folder)
        if getattr(run, "critic", None) is not None:  # algorithm ppo: the value model's weights and optimizer
            state["critic"] = critic_state(run.critic)
        save_checkpoint(
            cfg.run.run_dir,
            step,
            model=to_save,
            tokenizer=run.tokenizer,
            trainer_state={**state, "world_size": world.size},
            keep_last=cfg.checkpoint.keep_last,
            run_config=cfg.to_dict(),
            save_model=save_model_fn(cfg),
            rng_states=rngs,
        )
    world.barrier()  # no rank runs ahead (or resumes) before the checkpoint is complete
