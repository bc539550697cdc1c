"""A run built from its config: device and precision, policy (+ LoRA / NF4 base), reference, sampler,
optimizer, data, rewards, and the state of a resumed run.

    resume, specs, examples = check_before_loading(cfg)   # before any weights load
    run = build_run(cfg, world, resume, specs, examples)   # python -m minigrpo.train
    model, tokenizer = load_policy(cfg, device, dtype)     # eval and the benchmarks pick pieces

`check_before_loading(cfg)` runs every check that needs only the config and the file system (the
run folder and what resuming would read, the reward functions, the data file, the model folder), so
a mistake there is reported before any weights load. Nothing in here edits the config.
"""

from __future__ import annotations

import copy
import importlib.util
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minigrpo import lora, rewards
from minigrpo.algorithms import needs_reference, updates_per_step
from minigrpo.checkpoint import load_masters, load_optimizer_state, restore_rng, restoring
from minigrpo.config import Config, ConfigError, resolve_dtype
from minigrpo.config_rules import distributed_errors
from minigrpo.data import Example, PromptLoader, build_dataset, uses_plain_text
from minigrpo.distributed import World, broadcast_trainable, shard_model
from minigrpo.env_config import build_environment, check_chat_template, check_environment
from minigrpo.errors import UserError
from minigrpo.grad_scale import GradScale
from minigrpo.loop_columns import ARGUMENT_COLUMNS, data_source, loop_columns, refuse_loop_columns
from minigrpo.models.loading import (
    build_random,
    check_model_source,
    load_pretrained,
    load_weights,
    local_model_args,
    save_pretrained,
)
from minigrpo.models.presets import preset_config
from minigrpo.models.transformer import RMSNorm
from minigrpo.optim import build_optimizer, build_scheduler, dither_onto_masters
from minigrpo.prompt_fit import local_position_limit, position_limit, prompts_that_fit
from minigrpo.quant import require_nf4
from minigrpo.reward_fns import set_run_device
from minigrpo.run_folder import ResumePoint, check_run_dir, check_same_architecture, resumable_changes
from minigrpo.sampling.base import Sampler
from minigrpo.sampling.kv_sampler import KVCacheSampler
from minigrpo.sampling.params import SamplingParams, stream_key

# ================================================================================================
# checks before any weights load


def check_before_loading(
    cfg: Config, world_size: int = 1
) -> tuple[ResumePoint | None, list[rewards.RewardSpec], list[Example]]:
    """Every check the config and the file system allow, before any weights load: the run folder
    (a new run must not overwrite one; --resume needs an intact checkpoint and an unchanged
    config; the folder must be writable), the settings that depend on the number of ranks
    (world_size, known at launch), the optional packages the settings need, the reward
    functions (importable, known kwargs), the training data (readable, well formed), the model
    folder, the environment's tools and class (env.kind) and, for a local model folder, the prompts
    against its chat template and positions (prompt_fit.py); the device before all of them. Returns
    what it had to read."""
    pick_device(cfg.run.device)  # a missing GPU first: nothing is fetched for a run that cannot start
    validate_distributed(cfg, world_size)
    if cfg.model.arch is not None:
        raise UserError("training needs a tokenizer: model.arch builds weights only; set model.name_or_path")
    check_packages(cfg)
    if cfg.lora.enabled and cfg.lora.quantize_base is not None:  # 4-bit kernels on this device
        require_nf4(pick_device(cfg.run.device), cfg.lora.quantize_base)
    resume = check_run_dir(cfg, resumable_changes(cfg))
    specs = rewards.build_reward_specs(cfg.rewards)
    check_environment(cfg)
    examples = build_dataset(cfg.data, cfg.data.split)
    if not examples:
        raise UserError(f"data: the {cfg.data.split!r} split of data.source={cfg.data.source!r} holds no example")
    refuse_loop_columns(examples, data_source(cfg), episodes=cfg.env.kind is not None)
    loop_given = set(loop_columns(episodes=cfg.env.kind is not None)) - set(ARGUMENT_COLUMNS)
    rewards.check_reward_columns(specs, loop_given | {k for ex in examples for k in ex.columns})
    tokenizer = check_model_source(cfg.model.name_or_path, revision=cfg.model.revision, key="model.name_or_path")
    check_same_architecture(cfg.model.name_or_path, None if cfg.lora.enabled else resume)
    if cfg.lora.enabled and resume is not None:  # the adapter against the base folder's shapes, unloaded
        check_resumed_adapter(cfg, resume)
    if tokenizer is not None:  # a local model folder: its tokenizer is read already
        check_chat_template(cfg, tokenizer)
        args = local_model_args(cfg.model.name_or_path)  # None for a GGUF file
        if cfg.sampler.kind == "vllm" and args is not None:  # what vLLM cannot build: said now, not once loaded
            from minigrpo.sampling.vllm_ranks import check_vllm_model

            check_vllm_model(args, pick_device(cfg.run.device).type)
        warn_plain_prompts(cfg, tokenizer, examples)
        limit = local_position_limit(cfg.model.name_or_path)
        examples, _ = prompts_that_fit(cfg, examples, tokenizer, limit)
        if resume is not None and limit is not None:  # the prompts are final: the loader gets these
            check_data_cursor(cfg, resume, examples)
    warn_small_dataset(cfg, examples)
    if cfg.algorithm == "ppo" and cfg.ppo.value_path is not None:
        from minigrpo.algorithms.value_model import check_value_path

        check_value_path(cfg.ppo.value_path, policy=cfg.model.name_or_path)
    return resume, specs, examples


def warn_plain_prompts(cfg: Config, tokenizer: Any, examples: list[Example]) -> None:
    """A model without a chat template gets plain-text prompts: say so where the config or the data
    expect a conversation (settings only a template reads, chat messages joined as bare text)."""
    if not uses_plain_text(tokenizer):
        return
    notes = []
    if cfg.data.chat_template_kwargs:
        notes.append(f"data.chat_template_kwargs={cfg.data.chat_template_kwargs} is not read")
    if cfg.data.system_prompt is not None:
        notes.append("data.system_prompt is plain text before each prompt")
    if any(isinstance(ex.prompt, list) for ex in examples):
        notes.append("chat-message prompts are their contents joined by blank lines, with no role or reply header")
    if notes:
        warnings.warn(
            f"the model {cfg.model.name_or_path} has no chat template, so its prompts are plain text: "
            + "; ".join(notes),
            UserWarning,
            stacklevel=2,
        )


def warn_small_dataset(cfg: Config, examples: list[Example]) -> None:
    """Fewer prompts than a step samples: every step then draws some prompt twice (two groups of it, each
    scored against its own mean), which a user with a small file may not expect."""
    B = cfg.grpo.prompts_per_step
    if len(examples) < B:
        warnings.warn(
            f"the training data holds {len(examples)} prompt(s), fewer than grpo.prompts_per_step={B}: each step "
            f"samples some prompts more than once (as separate groups); lower grpo.prompts_per_step to "
            f"{len(examples)} or below to sample each once",
            UserWarning,
            stacklevel=2,
        )


def check_resumed_adapter(cfg: Config, resume: ResumePoint) -> None:
    """A LoRA checkpoint's adapter fits model.name_or_path (a local folder): a base replaced by another
    architecture is one line naming both before the base's weights load, not after."""
    from minigrpo.lora_export import ADAPTER_WEIGHTS, check_adapter_fits

    if not (resume.path / ADAPTER_WEIGHTS).is_file():
        return
    try:
        check_adapter_fits(resume.path, cfg.model.name_or_path)
    except UserError as e:
        raise UserError(f"--resume from {resume.path} onto model.name_or_path={cfg.model.name_or_path}: {e}") from None


def check_data_cursor(cfg: Config, resume: ResumePoint, examples: list[Example]) -> None:
    """The checkpoint's data cursor fits these prompts (as many, the same ones, in the same order
    settings): a data file edited since the checkpoint is reported now, not once the weights loaded."""
    try:
        PromptLoader(examples, seed=cfg.run.seed, shuffle=cfg.data.shuffle).load_state_dict(resume.state["data"])
    except UserError as e:
        where = cfg.data.path if cfg.data.path is not None else f"data.source={cfg.data.source}"
        raise UserError(f"--resume from {resume.path} with the training data {where}: {e}") from None


def validate_distributed(cfg: Config, world_size: int) -> None:
    """Checks that need the number of ranks (known only at launch): raise one ConfigError listing all."""
    errors = distributed_errors(cfg, world_size)
    if errors:
        raise ConfigError("invalid config for distributed training:\n  - " + "\n  - ".join(errors))


def check_packages(cfg: Config, *, sampling: bool = True) -> None:
    """The optional packages the settings need are installed (vLLM unless `sampling` is off, bitsandbytes,
    the logging backends), and the precision and an 8-bit optimizer suit the device (check_dtype)."""
    needs = []
    if sampling and cfg.sampler.kind == "vllm":
        needs.append(("vllm", "sampler.kind=vllm", "pip install -e '.[vllm]' (see README: vLLM sampler)"))
    if cfg.lora.enabled and cfg.lora.quantize_base is not None:
        needs.append(("bitsandbytes", f"lora.quantize_base={cfg.lora.quantize_base}", "pip install -e '.[qlora]'"))
    if cfg.train.optimizer != "adamw":
        needs.append(("bitsandbytes", f"train.optimizer={cfg.train.optimizer}", "pip install -e '.[qlora]'"))
    if cfg.log.tensorboard:
        needs.append(("tensorboard", "log.tensorboard=true", "pip install tensorboard, or set log.tensorboard=false"))
    if cfg.log.wandb:
        needs.append(("wandb", "log.wandb=true", "pip install wandb, or set log.wandb=false"))
    for module, setting, how in needs:
        if importlib.util.find_spec(module) is None:
            raise UserError(f"{setting} needs the package {module}, which is not installed: {how}")
    check_dtype(cfg, pick_device(cfg.run.device))
    if cfg.train.optimizer != "adamw" and pick_device(cfg.run.device).type != "cuda":
        raise UserError(
            f"train.optimizer={cfg.train.optimizer} needs CUDA (bitsandbytes' 8-bit optimizers) and this run is on "
            f"the CPU (run.device={cfg.run.device}): use train.optimizer=adamw"
        )


def check_dtype(cfg: Config, device: torch.device) -> None:
    """run.dtype on the run's device. On the CPU, auto is float32 and bfloat16 runs as asked (as fast as
    the CPU's bf16 instructions make it: here a matmul takes a fifth of float32's time). float16 runs
    too, correctly (its loss scale included) but slowly: CPUs have no float16 arithmetic and convert
    each operation (here a matmul takes 3.7x float32's time), with a coarser precision, so it is a
    warning naming the faster choices. On CUDA every dtype is taken as it is."""
    if device.type == "cpu" and resolve_dtype(cfg.run.dtype, device.type) == "float16":
        warnings.warn(
            f"run.dtype=float16 on the CPU (run.device={cfg.run.device}) is several times slower than float32: CPUs "
            "convert each float16 operation; use run.dtype=float32 (auto on the CPU) or bfloat16",
            UserWarning,
            stacklevel=2,
        )


# ================================================================================================
# pieces


def pick_device(name: str) -> torch.device:
    """run.device: "auto" takes CUDA when there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"run.device={name!r} but CUDA is not available on this machine (use run.device=cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"run.device={name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def compute_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """The dtype the model computes in (run.dtype; "auto": bf16 on CUDA, fp32 on the CPU)."""
    return getattr(torch, resolve_dtype(cfg.run.dtype, device.type))


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators from any integer (run.seed may be any):
    numpy takes only 0 <= seed < 2**32 and torch 64 bits, so each gets the seed modulo its range
    (the identity for the usual seeds)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed % 2**64)


def load_policy(
    cfg: Config,
    device: torch.device,
    dtype: torch.dtype,
    *,
    masters: dict[torch.nn.Parameter, torch.Tensor] | None = None,
):
    """The policy and its tokenizer: loaded (model.name_or_path) or random (model.arch, no tokenizer),
    the base quantized to NF4 as it is read (QLoRA), then LoRA adapters added (the only trainable weights).

    masters: pass a dict to train a 16-bit model in full: the checkpoint is then read in fp32 (in host
    memory, so that a model too large for the device still meets the memory pre-flight, not an
    out-of-memory error), its values kept there, by parameter, for the optimizer's fp32 masters
    (optim.py says why they must not start from the bf16 rounding), and the model cast to `dtype`
    and moved to `device`; the optimizer moves each master to the device as it takes it.
    """
    quantize = cfg.lora.quantize_base if cfg.lora.enabled else None
    low = dtype in (torch.bfloat16, torch.float16)
    read_fp32 = masters is not None and low and not cfg.lora.enabled and cfg.model.arch is None
    read_fp32 = read_fp32 and cfg.train.master_start == "checkpoint"
    if cfg.model.arch is not None:
        model = build_random(preset_config(cfg.model.arch), dtype=dtype, device=device, seed=cfg.run.seed)
        tokenizer = None
        if quantize:
            from minigrpo.quant import quantize_model_linears

            quantize_model_linears(model, quantize, device=device)
    else:
        model, tokenizer = load_pretrained(
            cfg.model.name_or_path,
            dtype=torch.float32 if read_fp32 else dtype,
            device="cpu" if read_fp32 else device,
            revision=cfg.model.revision,
            quantize=quantize,
        )
    if read_fp32:
        masters.update(model.lower_precision(dtype, keep_gains=cfg.train.fp32_norms))
        model.to(device)
    if cfg.lora.enabled:  # after quantizing: adapters wrap the (NF4) base linears
        lora.apply_lora(model, cfg.lora)
    elif cfg.train.fp32_norms and low:
        model.norms_in_fp32()  # trainable gains: a step of lr ~1e-5 is far below bf16's resolution near 1
    model.gradient_checkpointing = cfg.model.gradient_checkpointing
    model.activation_offload = cfg.model.activation_offload
    return model, tokenizer


def low_precision_masters(model: torch.nn.Module, fp32_norms: bool) -> list[torch.nn.Parameter]:
    """FSDP's fp32 parameters that run in the 16-bit compute dtype: all but the RMSNorm gains when those
    run in fp32 (train.fp32_norms), which keep the checkpoint's values, as on one process."""
    gains = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)} if fp32_norms else set()
    return [p for p in model.parameters() if id(p) not in gains]


def load_checkpoint_weights(cfg: Config, model: torch.nn.Module, path: Path) -> None:
    """A checkpoint's weights into the loaded policy: its PEFT adapter (LoRA) or its whole model."""
    if cfg.lora.enabled:
        lora.load_peft_adapter(model, path)
    else:
        load_weights(model, path)


def build_sampler(cfg: Config, model, tokenizer, prompt_tokens: int | None = None) -> Sampler:
    """The sampler `sampler.kind` names: the own KV-cache sampler, or a colocated vLLM engine (as long
    as the longest prompt, `prompt_tokens`, and its completion need)."""
    if cfg.sampler.kind == "vllm":
        from minigrpo.sampling.vllm_sampler import VLLMSampler  # the only import of vllm

        return VLLMSampler.from_config(cfg, model, tokenizer, prompt_tokens=prompt_tokens)
    return KVCacheSampler(
        model,
        tokenizer,
        cuda_graphs=cfg.sampler.compile,
        seed=cfg.run.seed,
        max_rows=cfg.sampler.max_rows,
        merge_lora=cfg.sampler.merge_lora,
    )


def sampling_params(
    cfg: Config, tokenizer, *, n: int | None = None, temperature: float | None = None, max_new_tokens: int | None = None
) -> SamplingParams:
    """The sampler section as SamplingParams (G completions per prompt unless n is given)."""
    return SamplingParams(
        n=cfg.grpo.group_size if n is None else n,
        temperature=cfg.sampler.temperature if temperature is None else temperature,
        top_p=cfg.sampler.top_p,
        top_k=cfg.sampler.top_k,
        min_p=cfg.sampler.min_p,
        max_new_tokens=cfg.sampler.max_new_tokens if max_new_tokens is None else max_new_tokens,
        stop_ids=tuple(tokenizer.stop_ids),
        stop_strings=tuple(cfg.sampler.stop),
    )


def save_model_fn(cfg: Config):
    """How checkpoints store the policy: the full HF checkpoint, or the PEFT adapter (+ tokenizer)."""
    if not cfg.lora.enabled:
        return save_pretrained

    def save_adapter(model, tokenizer, directory):
        base = cfg.model.name_or_path or ""
        lora.save_peft_adapter(model, directory, base_model_name_or_path=base, revision=cfg.model.revision)
        if tokenizer is not None:
            tokenizer.save(directory)

    return save_adapter


# ================================================================================================
# the whole run


@dataclass
class Run:
    """Everything the training loop works with, built from the config (and a checkpoint on resume)."""

    cfg: Config
    world: World
    dtype: torch.dtype  # the compute dtype
    model: torch.nn.Module
    ref_model: torch.nn.Module | None  # a frozen copy (full fine-tuning, needs_reference); LoRA: None
    tokenizer: Any
    sampler: Sampler
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: PromptLoader
    specs: list[rewards.RewardSpec]
    params: SamplingParams
    env: Any = None  # the multi-turn environment (env.kind), None for one-turn rollouts
    critic: Any = None  # algorithm ppo: the value model, its optimizer and schedule (algorithms/value_model.py)
    grad_scale: GradScale = field(default_factory=GradScale)  # float16: the loss scale (minigrpo/grad_scale.py)
    start_step: int = 0  # the step a resumed run continues after
    resumed_from: Path | None = None


def build_run(
    cfg: Config, world: World, resume: ResumePoint | None, specs: list[rewards.RewardSpec], examples: list[Example]
) -> Run:
    """Load the policy (and the checkpoint's weights), shard or replicate it over the ranks, build the
    reference, data loader, optimizer, schedule and sampler, and restore a resumed run's state."""
    from minigrpo.memory import preflight

    device, dtype = world.device, compute_dtype(cfg, world.device)
    set_run_device(device)  # reward models on "auto" / "cuda" load beside the policy, not on GPU 0
    strategy = cfg.distributed.resolved_strategy(cfg.lora.enabled) if world.distributed else None
    param_dtype = torch.float32 if strategy == "fsdp" else dtype  # FSDP keeps fp32 parameters (the masters)
    seed_everything(cfg.run.seed)  # every rank builds the same initial weights
    # the checkpoint's fp32 values of a 16-bit model trained in full (a resumed run's masters load
    # with its optimizer state instead)
    masters: dict | None = {} if resume is None else None
    model, tokenizer = load_policy(cfg, device, param_dtype, masters=masters)  # FSDP: fp32 already
    if strategy == "fsdp" and dtype != torch.float32:  # its fp32 parameters are the masters: off the grid
        dither_onto_masters(low_precision_masters(model, cfg.train.fp32_norms), dtype)
    # the reference policy is the initial one (copied before a resumed run's weights load): LoRA
    # switches its adapters off; full fine-tuning needs a frozen copy
    frozen_copy = needs_reference(cfg) and not cfg.lora.enabled
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if frozen_copy else None
    critic = None  # PPO's value model starts from the initial policy too (or ppo.value_path)
    if cfg.algorithm == "ppo":  # replicated on every rank, so in the compute dtype as in one process
        from minigrpo.algorithms.value_model import build_critic

        critic = build_critic(cfg, model, device, dtype, cfg.train.steps * updates_per_step(cfg))
    if resume is not None:  # weights first, into the whole model: sharding comes after
        load_checkpoint_weights(cfg, model, resume.path)
        if strategy == "fsdp":
            with restoring(resume.path, "fp32 master weights"):  # the fp32 values behind a bf16 checkpoint
                load_masters(model, resume.state["optimizer"])
    if strategy == "fsdp":
        for m in (model, ref_model):
            if m is not None:
                reshard = cfg.distributed.reshard_after_forward
                shard_model(
                    m, world, compute_dtype=dtype, reshard_after_forward=reshard, fp32_norms=cfg.train.fp32_norms
                )
    elif strategy == "ddp":
        broadcast_trainable(model, world)
    if critic is not None:
        broadcast_trainable(critic.model, world)  # replicated under either strategy
    if world.rank:
        seed_everything(cfg.run.seed + world.rank)  # rank 0 keeps the run seed's stream (as one process)
    examples, prompt_tokens = prompts_that_fit(cfg, examples, tokenizer, position_limit(model.args))
    if device.type == "cuda":  # stop now, naming the setting to change, not OOM at step n (each rank: its share)
        verbose, refuse = world.rank == 0, strategy != "fsdp"  # FSDP's estimate is not measured yet: a warning
        preflight(cfg, model.args, device, prompt_tokens, world_size=world.size, verbose=verbose, refuse=refuse)
    optimizer = build_optimizer(model.parameters(), cfg.train, masters=masters)
    masters = None  # the optimizer holds them now
    run = Run(
        cfg=cfg,
        world=world,
        dtype=dtype,
        model=model,
        ref_model=ref_model,
        tokenizer=tokenizer,
        sampler=build_sampler(cfg, model, tokenizer, prompt_tokens),
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg.train, cfg.train.steps * updates_per_step(cfg), updates_per_step(cfg)),
        loader=PromptLoader(examples, seed=cfg.run.seed, shuffle=cfg.data.shuffle),
        specs=specs,
        params=sampling_params(cfg, tokenizer),
        env=build_environment(cfg, tokenizer),
        critic=critic,
        grad_scale=GradScale.for_dtype(dtype),
    )
    if resume is not None:
        restore_state(run, resume)
    return run


def restore_state(run: Run, resume: ResumePoint) -> None:
    """Optimizer, schedule, data cursor and RNG of a checkpoint (the weights are already in the model).
    The checkpoint may come from any number of ranks."""
    restore_trainer_state(run, resume)
    if run.critic is not None:
        from minigrpo.algorithms.value_model import load_critic_state

        load_critic_state(run.critic, resume.state.get("critic"), resume.path)
    run.sampler.sync(run.model)  # an external sampler must see the resumed weights


def restore_trainer_state(run: Any, resume: ResumePoint) -> None:
    """What restore_state restores except the sampler: for any run with model, optimizer, scheduler,
    loader, world and cfg (the SFT run too); sets run.start_step and run.resumed_from."""
    state, world = resume.state, run.world
    with restoring(resume.path, "optimizer state"):
        load_optimizer_state(run.model, run.optimizer, state["optimizer"])
    with restoring(resume.path, "learning-rate schedule"):
        run.scheduler.load_state_dict(state["scheduler"])
    run.loader.load_state_dict(state["data"])
    with restoring(resume.path, "loss scale"):
        run.grad_scale.load_state_dict(state.get("grad_scale", {}))  # absent from older checkpoints
    run.start_step, run.resumed_from = int(state["step"]), resume.path
    with restoring(resume.path, "RNG states"):
        restored = restore_rng(state, world.rank, world.size)
    if not restored:  # written by another number of ranks
        seed_everything(stream_key(run.cfg.run.seed, run.start_step, world.rank)[0])
