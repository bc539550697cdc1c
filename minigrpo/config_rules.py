"""The config's settings checked against each other (each field alone is checked by its limit in
minigrpo/config.py): what `config.validate` adds to the limits, before any model loads.

Each finding is one line naming its dotted keys; odd but legal combinations go to `notes` (warnings).
The sections' own rules live with them (lora_config, sft_config, env_config, algorithms).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

from minigrpo.algorithms import config_errors as algorithm_errors
from minigrpo.chat_template import template_variable_errors
from minigrpo.configio import MAX_COUNT, none_texts, template_errors
from minigrpo.env_config import env_errors
from minigrpo.lora_config import lora_errors, lora_notes, lora_strategy_errors
from minigrpo.sft_config import sft_errors

if TYPE_CHECKING:
    from minigrpo.config import Config, RunCfg

_REWARD_RE = re.compile(r"^[A-Za-z_]\w*$|^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
_DATA_SUFFIXES = {"jsonl": (".jsonl", ".json"), "parquet": (".parquet",)}
# vLLM 0.32 raises a temperature in (0, 0.01) to 0.01 (samples and log-probs then at 0.01, not at the
# trainer's T) and refuses one above 2 (its sampling_params.py): with sampler.kind vllm those are refused
VLLM_TEMPERATURES = (0.01, 2.0)
MIN_TEMPERATURE = 1e-30  # sampling/params.py's: below it logits / temperature overflow fp32 (NaN log-probs)
MAX_TEMPERATURE = 1e37  # sampling/params.py's: above ~8.5e37, 1 / temperature is no normal fp32 (the sampling kernel)


# the command whose config loads: "train" (GRPO, and eval) or "sft" (python -m minigrpo.sft reads fewer sections)
_COMMAND: ContextVar[str] = ContextVar("minigrpo_config_command", default="train")


@contextmanager
def rules_of(command: str) -> Iterator[None]:
    """Configs loaded inside are checked for what `command` reads: "sft" refuses a config only for the
    sections SFT reads (run, model, lora, train, log, checkpoint, sft; data.synthetic with
    sft.source=synthetic; data.chat_template_kwargs), not for GRPO's sampler, grpo, rewards or data."""
    token = _COMMAND.set(command)
    try:
        yield
    finally:
        _COMMAND.reset(token)


def read_by_command(cfg: Config, errors: list[str]) -> list[str]:
    """The limit errors (each starting with its dotted key) of settings the loading command reads: all of
    them for "train", for "sft" only those of the sections rules_of names (GRPO's are ignored there)."""
    if _COMMAND.get() != "sft":
        return errors
    read = ["run.", "model.", "lora.", "train.", "log.", "checkpoint.", "sft.", "data.chat_template_kwargs"]
    read += ["data.synthetic."] if cfg.sft.source == "synthetic" else []
    return [e for e in errors if any(e.startswith(prefix) for prefix in read)]


def cross_field_errors(cfg: Config, notes: list[str]) -> list[str]:
    """Checks between fields (each field is checked alone by its limit); odd findings go to `notes`.
    Inside `rules_of("sft")` only what SFT reads is checked."""
    errors = model_errors(cfg)
    if _COMMAND.get() == "sft":
        errors += synthetic_errors(cfg) if cfg.sft.source == "synthetic" else []
        errors += train_errors(cfg) + data_template_errors(cfg)
        errors += lora_errors(cfg) + sft_errors(cfg)
    else:
        notes += unread_notes(cfg)
        errors += grpo_run_errors(cfg, notes) + train_errors(cfg) + data_template_errors(cfg)
        errors += template_variable_errors(cfg.env.chat_template_kwargs, "env.chat_template_kwargs")
        errors += lora_errors(cfg) + sft_errors(cfg) + env_errors(cfg) + algorithm_errors(cfg)
    notes += lora_notes(cfg)
    notes += [
        f"{key}={text!r} is the text {text}, not null: write null (or ~) for no value" for key, text in none_texts(cfg)
    ]
    return errors


def _resampled_where(cfg: Config) -> str:
    """Where grpo.max_resample_rounds is read: PPO has no dynamic sampling to switch on."""
    if cfg.algorithm == "ppo":
        return "with grpo.dynamic_sampling=true, which algorithm=ppo does not take"
    return "with grpo.dynamic_sampling=true"


def unread_notes(cfg: Config) -> list[str]:
    """One note per group of settings changed from their defaults that the run never reads because of
    another setting (`sampler.gpu_memory_utilization` with the own sampler): a warning, not an error,
    since switching the other setting (`--set sampler.kind=own` on a vLLM config) rightly keeps them."""
    notes = []
    for off, section, name, keys, where in _unread_groups(cfg):
        changed = _changed(section, name, keys) if off else []
        if changed:
            notes.append(f"{', '.join(changed)}: ignored, read only {where}")
    return notes


def _unread_groups(cfg: Config) -> tuple:
    """(the setting that makes them unread, section, its dotted name, its keys (None: all), where they are read)."""
    g, sampler = cfg.grpo, cfg.sampler
    synthetic_read = "synthetic" in (cfg.data.source, cfg.sft.source)
    return (
        (sampler.kind != "vllm", sampler, "sampler", VLLM_SAMPLER_KEYS, "with sampler.kind=vllm"),
        (not g.dynamic_sampling, g, "grpo", ("max_resample_rounds",), _resampled_where(cfg)),
        (g.is_correction is None, g, "grpo", ("is_cap", "is_min"), "with grpo.is_correction set"),
        (cfg.train.schedule == "constant", cfg.train, "train", ("min_lr_ratio",), "by the linear and cosine schedules"),
        (not cfg.log.wandb, cfg.log, "log", ("wandb_project",), "with log.wandb=true"),
        (not cfg.lora.enabled, cfg.checkpoint, "checkpoint", ("save_merged",), "with lora.enabled=true"),
        (not synthetic_read, cfg.data.synthetic, "data.synthetic", None, "with data.source=synthetic"),
    )


def unread_keys(cfg: Config) -> tuple[str, ...]:
    """The dotted keys a run with `cfg` never reads because of another setting: those of unread_notes,
    whatever their values, and LoRA's settings with LoRA off and the sections of the algorithms not run."""
    keys = [
        f"{name}.{key}"
        for off, section, name, only, _ in _unread_groups(cfg)
        if off
        for key in (only or [f.name for f in fields(section)])
    ]
    if not cfg.lora.enabled:
        keys += [f"lora.{f.name}" for f in fields(cfg.lora) if f.name != "enabled"]
    readers = {"dpo": "online_dpo", "ppo": "ppo"}  # each algorithm's section and the algorithm reading it
    keys += [f"{section}." for section, algorithm in readers.items() if cfg.algorithm != algorithm]
    return tuple(keys)


def resolve_dtype(dtype: str, device_type: str) -> str:
    """The dtype name that `run.dtype` means on a device type: "auto" is bfloat16 on CUDA, else float32;
    a named dtype is taken on any device (float16 on the CPU with a warning: build.check_dtype)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device_type.startswith("cuda") else "float32"


def saved_compute_dtype(saved_run: dict, state: dict) -> str | None:
    """The dtype a checkpointed run computed in: as its trainer state records it ("bfloat16"), else (a
    checkpoint written before the record) what its run config's run.dtype meant on its run.device; None
    where that device was auto and nothing recorded the dtype (the machine it ran on decided)."""
    if isinstance(state.get("dtype"), str):
        return state["dtype"]
    dtype, device = saved_run.get("dtype", "auto"), saved_run.get("device", "auto")
    if not isinstance(dtype, str) or not isinstance(device, str) or (dtype == "auto" and device == "auto"):
        return None
    return resolve_dtype(dtype, device)


def resumed_dtype_error(saved_run: dict, state: dict, run: RunCfg, device_type: str) -> str | None:
    """One line when a resumed run would compute in another dtype than its checkpoint's run did (None: the
    same, or unknown). run.dtype auto is bfloat16 on CUDA and float32 on the CPU, so a run saved on CUDA
    and resumed with run.device=cpu would otherwise go on in float32 with nothing said."""
    saved, now = saved_compute_dtype(saved_run, state), resolve_dtype(run.dtype, device_type)
    if saved is None or saved == now:
        return None
    there = f"run.device={saved_run.get('device', 'auto')!r}, run.dtype={saved_run.get('dtype', 'auto')!r}"
    return (
        f"run.device={run.device!r} with run.dtype={run.dtype!r} computes in {now}, but the run computed in {saved} "
        f"({there} there): set run.dtype={saved} to go on as it ran, or start a new run"
    )


VLLM_SAMPLER_KEYS = ("gpu_memory_utilization", "vllm_sleep", "vllm_probe_every")  # read by the vLLM sampler only


def _changed(section: object, name: str, keys: tuple[str, ...] | None) -> list[str]:
    """`name.key=value` of each of `keys` (None: every field) that differs from the section's default."""
    default = type(section)()
    keys = keys or tuple(f.name for f in fields(section))
    return [f"{name}.{k}={getattr(section, k)!r}" for k in keys if getattr(section, k) != getattr(default, k)]


def data_template_errors(cfg: Config) -> list[str]:
    """data.chat_template_kwargs: template variables (e.g. enable_thinking) every prompt renders with."""
    return template_variable_errors(cfg.data.chat_template_kwargs, "data.chat_template_kwargs")


def model_errors(cfg: Config) -> list[str]:
    """The model section: one source of weights, a known preset, offload only with checkpointing."""
    errors: list[str] = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            errors.append(msg)

    model = cfg.model
    need(
        (model.name_or_path is None) != (model.arch is None),
        f"set exactly one of model.name_or_path ({model.name_or_path!r}) and model.arch ({model.arch!r})",
    )
    if model.arch is not None:
        from minigrpo.models.presets import PRESETS  # plain dicts: no torch

        need(model.arch in PRESETS, f"model.arch={model.arch!r} is no preset; known: {', '.join(sorted(PRESETS))}")
    need(
        not model.activation_offload or model.gradient_checkpointing,
        "model.activation_offload=true needs model.gradient_checkpointing=true (it offloads the checkpointed inputs)",
    )
    return errors


def train_errors(cfg: Config) -> list[str]:
    """The train section's schedule (read by GRPO and SFT alike)."""
    tr = cfg.train
    if tr.warmup_steps <= tr.steps:
        return []
    return [f"train.warmup_steps ({tr.warmup_steps}) must be <= train.steps ({tr.steps})"]


def synthetic_errors(cfg: Config) -> list[str]:
    """data.synthetic: operators, operand range and question template (GRPO's task, SFT's synthetic source)."""
    syn, errors = cfg.data.synthetic, []
    if not syn.operations:
        errors.append("data.synthetic.operations must list at least one operator")
    if syn.min_operand > syn.max_operand:
        errors.append(f"data.synthetic.min_operand ({syn.min_operand}) must be <= max_operand ({syn.max_operand})")
    return errors + template_errors("data.synthetic.question", syn.question, "expression", ("expression",))


def grpo_run_errors(cfg: Config, notes: list[str]) -> list[str]:
    """What GRPO (python -m minigrpo.train, eval) reads besides: data, sampler, grpo, rewards, eval."""
    errors: list[str] = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            errors.append(msg)

    data, g, tr = cfg.data, cfg.grpo, cfg.train
    need(
        data.eval_split is None or data.eval_split != data.split,
        f"data.eval_split={data.eval_split!r} is the training split (data.split): evaluation would score training "
        "prompts; name another split, or null for no eval set",
    )
    # data: a file source needs a path whose suffix matches it
    if data.source in ("jsonl", "parquet", "hub"):
        need(data.path is not None, f"data.source={data.source!r} needs data.path (a file, folder or repo id)")
    suffixes = _DATA_SUFFIXES.get(data.source)
    for key, path in (("path", data.path), ("eval_path", data.eval_path)):
        if suffixes and Path(path or "").suffix in (".jsonl", ".json", ".parquet"):
            need(Path(path).suffix in suffixes, f"data.{key}={path!r} does not match data.source={data.source!r}")
    need(
        data.eval_path is None or suffixes is not None,
        f"data.eval_path is only read by jsonl/parquet sources, not data.source={data.source!r}",
    )
    if data.source == "synthetic":
        errors += synthetic_errors(cfg)
    need(all(cfg.sampler.stop), "sampler.stop must not contain empty strings")
    low, high = VLLM_TEMPERATURES
    t = cfg.sampler.temperature
    need(
        cfg.sampler.kind != "vllm" or t == 0 or low <= t <= high,
        f"sampler.temperature must be 0 (greedy) or in [{low:g}, {high:g}] with sampler.kind=vllm (vLLM raises a "
        f"smaller one to {low:g} and refuses a larger one), got {t:g}",
    )
    for key, temperature in (("sampler.temperature", t), ("eval.temperature", cfg.eval.temperature)):
        need(
            not 0 < temperature < math.inf or MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE,  # the limits' cases
            f"{key} must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}] (logits / temperature and "
            f"1 / temperature must stay finite fp32), got {temperature:g}",
        )
    need(
        cfg.sampler.kind != "vllm" or t == 0 or cfg.sampler.min_p == 0 or cfg.sampler.top_p >= 1,
        f"sampler.min_p={cfg.sampler.min_p:g} with sampler.top_p={cfg.sampler.top_p:g} cannot be sampled by vLLM as "
        "the own sampler and the trainer read them (vLLM applies min-p before top-p, we apply it after): use one",
    )
    need(
        cfg.eval.samples_per_prompt <= 1 or cfg.eval.temperature != 0,  # a bad value has its own error
        f"eval.samples_per_prompt={cfg.eval.samples_per_prompt} needs eval.temperature > 0 (greedy decoding "
        "gives every sample of a prompt the same completion)",
    )
    need(
        cfg.sampler.max_rows is None or cfg.sampler.kind == "own",
        f"sampler.max_rows={cfg.sampler.max_rows} applies to the own sampler; vLLM schedules its sequences "
        "within sampler.gpu_memory_utilization (set sampler.max_rows=null)",
    )

    need(
        g.group_size != 1 or cfg.algorithm == "ppo",
        "grpo.group_size must be >= 2, got 1 (advantages compare the completions of one prompt; "
        "algorithm: ppo, whose critic gives the baseline, allows 1)",
    )

    # grpo: clip ranges and IS bounds
    eps, eps_high = g.epsilon, g.epsilon_high
    need(eps_high >= eps, f"grpo.epsilon_high ({eps_high}) must be >= grpo.epsilon ({eps}) or null")
    need(g.is_min is None or g.is_min <= g.is_cap, f"grpo.is_min ({g.is_min}) must be <= grpo.is_cap ({g.is_cap})")
    if g.delta is not None and 1 < g.delta <= 1 + g.epsilon_high:
        notes.append(
            f"grpo.delta ({g.delta}) <= 1 + epsilon_high ({1 + g.epsilon_high}): it also caps the ratio of "
            "positive-advantage tokens inside the clip range"
        )
    if g.importance_sampling_level == "sequence" and g.loss_type != "grpo":
        notes.append(
            f"grpo.importance_sampling_level='sequence' (GSPO) with grpo.loss_type={g.loss_type!r}: "
            "this loss weights each sequence by its length; GSPO is defined with loss_type='grpo'"
        )

    # rewards: names only look right here; the functions are resolved when the run starts
    need(len(cfg.rewards) > 0, "rewards must list at least one reward function")
    names = [reward.name for reward in cfg.rewards]
    for i, name in enumerate(names):
        need(
            bool(_REWARD_RE.match(name)),
            f"rewards.{i}.name={name!r} is neither a registry name nor 'package.module:function'",
        )
        need(
            name not in names[:i],
            f"rewards.{i}.name={name!r} repeats rewards.{names.index(name)}.name: list each reward once "
            "(its metrics are keyed by its name)",
        )
    need(
        not cfg.rewards or any(reward.weight != 0 for reward in cfg.rewards),
        "every rewards.*.weight is 0: every advantage would be 0 and nothing would be learned",
    )

    # the sizes of one step: N = B*G sequences, trained in N / micro_batch_size passes
    n, mb = g.prompts_per_step * g.group_size, tr.micro_batch_size
    sizes = f"grpo.prompts_per_step * grpo.group_size ({g.prompts_per_step} * {g.group_size} = {n} sequences per step)"
    need(n <= MAX_COUNT, f"{sizes} must be <= {MAX_COUNT}: no step can sample or train on more")
    if 1 <= n <= MAX_COUNT and mb >= 1 and n % mb:
        errors.append(
            f"{sizes} must be divisible by train.micro_batch_size ({mb}): each optimizer step "
            f"trains on the N = B*G sequences in N / micro_batch_size equal passes; {divisors_near(n, mb)}"
        )
    need(
        cfg.eval.num_prompts <= data.num_eval,
        f"eval.num_prompts ({cfg.eval.num_prompts}) must be <= data.num_eval ({data.num_eval})",
    )
    return errors


def divisors_near(n: int, near: int, most: int = 12) -> str:
    """The divisors of `n` as an error shows them: all of them, or the `most` closest to `near` when there
    are more (found up to sqrt(n): a listing of range(n) would hang on n = 10**9)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    divisors = sorted({*small, *(n // d for d in small)})
    if len(divisors) <= most:
        return f"divisors of {n}: {divisors}"
    closest = sorted(sorted(divisors, key=lambda d: (abs(d - near), d))[:most])
    return f"divisors of {n} near {near}: {closest}"


def distributed_errors(cfg: Config, world_size: int) -> list[str]:
    """The rules that need the number of ranks, known only at launch (none for one process). Both
    samplers run under torchrun: sampler.kind=vllm builds one engine per rank (on its own GPU)."""
    if world_size <= 1:
        return []
    errors = []
    strategy = cfg.distributed.resolved_strategy(cfg.lora.enabled)
    if cfg.grpo.prompts_per_step < world_size:
        errors.append(
            f"grpo.prompts_per_step ({cfg.grpo.prompts_per_step}) must be >= the number of ranks ({world_size}): "
            "each rank samples whole groups"
        )
    if re.match(r"^cuda:\d+$", cfg.run.device):
        errors.append(f"run.device={cfg.run.device!r} under torchrun: each rank uses its LOCAL_RANK's GPU; use cuda")
    if strategy == "fsdp" and cfg.train.optimizer != "adamw":
        errors.append(f"train.optimizer={cfg.train.optimizer!r} cannot step FSDP shards; use adamw (or strategy ddp)")
    errors += lora_strategy_errors(cfg)
    if strategy == "fsdp" and cfg.model.activation_offload:
        errors.append("model.activation_offload is not supported with FSDP; use gradient_checkpointing alone")
    return errors
