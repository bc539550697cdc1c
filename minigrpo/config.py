"""Typed run configuration: nested dataclasses mirrored by YAML, `--set a.b=v` overrides, validation.

    cfg = load_config("configs/demo_cpu.yaml", ["grpo.group_size=4", "train.lr=1e-5"])
    save_config(cfg, cfg.run.run_dir / "config.yaml")     # the resolved config, saved with the run

One source of truth: every hyper-parameter is a field below with its default and a one-line comment;
nothing is read with `cfg.get(key, default)`. The YAML file mirrors the tree (`grpo: {group_size: 8}`).

Loading is strict, so typos fail before any model is loaded:
- an unknown key (in YAML or an override) is a `ConfigError` naming the dotted key, with a
  did-you-mean suggestion (also across sections: `train.group_size` suggests `grpo.group_size`);
- values are coerced to the declared type (int, float, bool, str, Optional, Literal, list, tuple,
  dict, nested dataclasses); a wrong value names the key, the expected type and the value;
- `validate(cfg)` then checks settings against each other (batch divisibility, clip ranges, ...).

Derived fields are `None` by default and filled in `__post_init__` only when still `None`, so an
explicit value always wins. The saved config holds the filled values (it is the record of the run).

Sizes (pain point: batch-size confusion). One optimizer step samples B = `grpo.prompts_per_step`
prompts, G = `grpo.group_size` completions each: N = B*G sequences. They are split into
N / `train.micro_batch_size` forward/backward passes of exactly `micro_batch_size` sequences whose
gradients are accumulated into one optimizer step, so N must be a multiple of micro_batch_size.

This module imports no torch: it loads instantly and validates before any heavy work.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import math
import re
import types
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from minigrpo.atomic import write_atomic


class ConfigError(ValueError):
    """Any problem with a configuration: unknown key, wrong type, inconsistent settings."""


class ConfigWarning(UserWarning):
    """A legal but suspicious combination of settings (the run proceeds)."""


# ----------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------


class _Section:
    """Base of every config dataclass: `from_dict` (strict, coercing) and `to_dict`."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        """Build from plain data (e.g. parsed YAML), coercing values; unknown keys raise ConfigError."""
        return _build(cls, data, "")

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-safe data (tuples become lists)."""
        return config_to_dict(self)


@dataclass
class RunCfg(_Section):
    """Where the run writes, its seed, and the device/precision it runs in."""

    name: str = "run"  # run name; the run directory is output_dir/name
    output_dir: str = "runs"  # parent folder of run directories
    seed: int = 0  # seed of torch / sampling RNGs and of the prompt order
    device: str = "auto"  # "auto" (cuda if available, else cpu), "cpu", "cuda" or "cuda:N"
    # weights/activations dtype; "auto": bfloat16 on CUDA, float32 on CPU (see resolve_dtype)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    resume: bool = False  # continue from the latest checkpoint in the run directory (CLI: --resume)

    @property
    def run_dir(self) -> Path:
        """The run directory: checkpoints, metrics.jsonl, plots and the resolved config.yaml."""
        return Path(self.output_dir) / self.name


@dataclass
class ModelCfg(_Section):
    """The policy model. Exactly one of `name_or_path` / `arch` is set; with neither, the packaged
    SmolLM2 GGUF ("smollm2") is used, so the default config runs without network."""

    # local HF folder, hub repo id, .gguf file, or "smollm2" (the packaged GGUF); filled if both None
    name_or_path: str | None = None
    arch: str | None = None  # architecture preset with random weights, for benchmarks ("qwen2.5-1.5b")
    revision: str | None = None  # hub revision (branch, tag or commit) of name_or_path
    gradient_checkpointing: bool = False  # recompute block activations in backward to save memory
    activation_offload: bool = False  # with checkpointing: keep the saved block inputs in pinned CPU memory

    def __post_init__(self) -> None:
        if self.name_or_path is None and self.arch is None:
            self.name_or_path = "smollm2"


@dataclass
class LoRACfg(_Section):
    """Low-rank adapters on the linear layers; the base weights are frozen (optionally NF4)."""

    enabled: bool = False  # train adapters instead of all weights
    r: int = 16  # adapter rank
    alpha: float = 32.0  # scaling numerator: delta W = (alpha / r) * B @ A (alpha / sqrt(r) with rslora)
    dropout: float = 0.0  # dropout on the adapter input
    # linear layers that get adapters, by short name (attention q/k/v/o, MLP gate/up/down)
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])
    rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r)
    quantize_base: Literal[None, "nf4"] = None  # "nf4": frozen base weights in 4-bit NF4 (QLoRA)


@dataclass
class SyntheticCfg(_Section):
    """The file-free arithmetic task ("What is 7 + 5?") used by the CPU demo and tests."""

    seed: int = 0  # task seed, independent of run.seed so the data stays fixed across training seeds
    num_train: int = 2000  # examples generated for the training split (an epoch)
    operations: list[Literal["+", "-", "*"]] = field(default_factory=lambda: ["+", "-"])  # operators drawn
    num_operands: int = 2  # operands per expression
    min_operand: int = 0  # smallest operand (inclusive)
    max_operand: int = 9  # largest operand (inclusive)
    allow_negative: bool = False  # allow expressions whose value is negative (else they are redrawn)
    question: str = "What is {expression}?"  # question template; must contain {expression}
    # answer-format instruction appended to the question (None: no instruction)
    instruction: str | None = "Give the final answer as a number inside <answer></answer>."


@dataclass
class DataCfg(_Section):
    """Where prompts come from, and how a row maps to a prompt and a reference answer."""

    source: Literal["synthetic", "gsm8k", "jsonl", "parquet", "hub"] = "synthetic"  # kind of source
    # jsonl/parquet: a file or a folder holding per-split files; hub/gsm8k: a dataset repo id
    # (gsm8k: also a local file or folder; None means the hub repo openai/gsm8k)
    path: str | None = None
    eval_path: str | None = None  # jsonl/parquet: file of the eval split when `path` is a single file
    subset: str | None = None  # hub/folder sources: sub-folder (dataset config) holding the split files
    revision: str | None = None  # hub revision of the dataset repo
    split: str = "train"  # training split name (also names the synthetic training stream)
    eval_split: str | None = "test"  # evaluation split name (None: no eval set)
    prompt_field: str = "question"  # row field holding the prompt (a string or a list of chat messages)
    answer_field: str = "answer"  # row field holding the reference answer
    system_prompt: str | None = None  # system message put before every prompt (replaces a row's own)
    shuffle: bool = True  # reshuffle the prompt order every epoch (seeded by run.seed and the epoch)
    max_prompt_tokens: int | None = None  # drop prompts longer than this many tokens (None: keep all)
    num_eval: int = 200  # size of the eval set (synthetic: generated; files: the first num_eval rows)
    synthetic: SyntheticCfg = field(default_factory=SyntheticCfg)  # knobs of the synthetic task


@dataclass
class SamplerCfg(_Section):
    """Rollout generation: which sampler, and the sampling distribution."""

    kind: Literal["own", "vllm"] = "own"  # own KV-cache sampler on the policy, or colocated vLLM
    temperature: float = 1.0  # softmax temperature (> 0); the trainer's log-probs use the same value
    top_p: float = 1.0  # nucleus sampling mass in (0, 1]; 1 = off
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    min_p: float = 0.0  # drop tokens below min_p * p_max; 0 = off
    max_new_tokens: int = 256  # completion length limit (also Dr.GRPO's max_completion_length)
    stop: list[str] = field(default_factory=list)  # extra stop strings (EOS ids come from the model)
    compile: bool = True  # CUDA graphs / torch.compile for decoding (GPU only)
    # own sampler: rows decoded at once (its KV cache holds this many sequences); the step's rows are
    # generated in waves of whole prompts (or of parts of one prompt's group), the same tokens as in
    # one go; null: every row at once. Long completions: trades rollout time for memory.
    max_rows: int | None = None
    gpu_memory_utilization: float = 0.3  # vLLM: fraction of GPU memory for weights + KV cache
    vllm_sleep: bool = True  # vLLM: release its memory while the trainer runs


@dataclass
class GRPOCfg(_Section):
    """The GRPO objective: group sizes, advantages, clipping, loss normalisation, IS correction."""

    prompts_per_step: int = 8  # B: prompts sampled per optimizer step
    group_size: int = 8  # G: completions per prompt (>= 2: advantages are relative within a group)
    # loss normalisation: grpo = mean of per-sequence token means; bnpo = token mean of the
    # micro-batch; dr_grpo = token sum / (sequences * max_new_tokens); dapo = token sum / tokens of step
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    epsilon: float = 0.2  # lower clip: ratio >= 1 - epsilon
    epsilon_high: float | None = None  # upper clip: ratio <= 1 + epsilon_high (None: epsilon)
    delta: float | None = None  # two-sided clip: cap the unclipped ratio at delta (> 1; None: off)
    beta: float = 0.0  # KL(policy || reference) coefficient, k3 estimator; 0 = no reference pass
    importance_sampling_level: Literal["token", "sequence"] = "token"  # per-token ratio, or GSPO
    scale_rewards: Literal["group", "batch", "none"] = "group"  # divide advantages by which std
    advantage_estimator: Literal["grpo", "rloo"] = "grpo"  # group mean baseline, or leave-one-out
    num_iterations: int = 1  # mu: optimizer passes over each batch of rollouts
    mask_truncated_completions: bool = False  # drop completions that hit max_new_tokens from the loss
    dynamic_sampling: bool = False  # DAPO: resample groups whose rewards are all equal
    max_resample_rounds: int = 3  # dynamic sampling: extra generation rounds per step at most
    # sampler-vs-trainer importance weights (needed with vLLM): token/sequence, truncate/mask at is_cap
    is_correction: Literal[None, "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = None
    is_cap: float = 3.0  # upper bound C of the IS weight


@dataclass
class RewardSpec(_Section):
    """One reward function: a registry name or an import path `package.module:function`."""

    name: str  # registry name ("correctness") or "package.module:function"
    weight: float = 1.0  # weight in the summed reward r = sum_k weight_k * r_k
    timeout_s: float = 10.0  # a call taking longer is a failure (masked and counted, not fatal)
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments for the function


@dataclass
class TrainCfg(_Section):
    """Optimizer, schedule and micro-batching."""

    steps: int = 100  # optimizer steps
    lr: float = 1e-6  # peak learning rate
    weight_decay: float = 0.0  # decoupled (AdamW) weight decay
    betas: tuple[float, float] = (0.9, 0.99)  # Adam betas
    eps: float = 1e-8  # Adam epsilon
    schedule: Literal["constant", "linear", "cosine"] = "constant"  # lr shape after the warmup
    warmup_steps: int = 0  # linear warmup from 0 to lr over this many steps
    min_lr_ratio: float = 0.0  # linear/cosine: final lr as a fraction of lr
    max_grad_norm: float | None = 1.0  # clip the global gradient norm (None: no clipping)
    micro_batch_size: int = 8  # sequences per forward/backward pass; must divide B*G
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw8bit"] = "adamw"  # 8-bit ones need bitsandbytes
    logprob_chunk_size: int = 1024  # tokens per chunk of the fused log-prob kernel (memory vs speed)


@dataclass
class LogCfg(_Section):
    """Metrics, samples and plots."""

    every: int = 1  # print and append metrics every this many steps
    sample_every: int = 10  # print a sampled completion every this many steps (0 = never)
    plots: bool = True  # write PNG plots of the metrics into the run directory
    tensorboard: bool = False  # also log to TensorBoard
    wandb: bool = False  # also log to Weights & Biases
    wandb_project: str | None = None  # W&B project (None: "minigrpo")
    progress: bool = True  # show a progress bar


@dataclass
class CheckpointCfg(_Section):
    """Periodic, atomic checkpoints (model or adapter, optimizer, scheduler, RNG, data cursor)."""

    every: int = 50  # save every this many steps (0 = only the final one)
    keep_last: int = 2  # periodic checkpoints kept on disk (older ones are deleted)
    save_final: bool = True  # save after the last step
    save_merged: bool = False  # LoRA: also write a merged 16-bit HF checkpoint to run_dir/merged at the end


@dataclass
class EvalCfg(_Section):
    """Periodic evaluation on the eval split."""

    every: int = 0  # evaluate every this many steps (0 = off)
    num_prompts: int | None = None  # prompts scored per evaluation; derived: data.num_eval
    temperature: float = 0.0  # sampling temperature (0 = greedy)
    max_new_tokens: int | None = None  # completion limit; derived: sampler.max_new_tokens


@dataclass
class DistributedCfg(_Section):
    """Data parallelism under torchrun (WORLD_SIZE > 1; a single process ignores this section): each
    rank samples, scores and trains on its share of every step's prompts (minigrpo/distributed.py)."""

    strategy: Literal["auto", "fsdp", "ddp"] = "auto"  # auto: fsdp for full fine-tuning, ddp for LoRA
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on CUDA, gloo on CPU
    reshard_after_forward: bool = True  # fsdp: free gathered block weights after forward (less memory)
    timeout_s: float = 1800.0  # collective timeout: a rank stuck this long fails the job

    def resolved_strategy(self, lora_enabled: bool) -> str:
        """fsdp or ddp: "auto" shards full fine-tuning and replicates a LoRA model (adapters are tiny)."""
        if self.strategy != "auto":
            return self.strategy
        return "ddp" if lora_enabled else "fsdp"


def _default_rewards() -> list[RewardSpec]:
    return [RewardSpec(name="correctness")]


@dataclass
class Config(_Section):
    """The whole run. `load_config` builds and validates it; `save_config` writes it back."""

    run: RunCfg = field(default_factory=RunCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    lora: LoRACfg = field(default_factory=LoRACfg)
    data: DataCfg = field(default_factory=DataCfg)
    sampler: SamplerCfg = field(default_factory=SamplerCfg)
    grpo: GRPOCfg = field(default_factory=GRPOCfg)
    rewards: list[RewardSpec] = field(default_factory=_default_rewards)  # summed with their weights
    train: TrainCfg = field(default_factory=TrainCfg)
    log: LogCfg = field(default_factory=LogCfg)
    checkpoint: CheckpointCfg = field(default_factory=CheckpointCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    distributed: DistributedCfg = field(default_factory=DistributedCfg)

    def __post_init__(self) -> None:
        # Derived fields: filled only when still None, so an explicit value wins.
        if self.eval.num_prompts is None:
            self.eval.num_prompts = self.data.num_eval
        if self.eval.max_new_tokens is None:
            self.eval.max_new_tokens = self.sampler.max_new_tokens

    @property
    def sequences_per_step(self) -> int:
        """N = B * G sequences sampled and trained on per optimizer step."""
        return self.grpo.prompts_per_step * self.grpo.group_size

    @property
    def micro_batches_per_step(self) -> int:
        """Forward/backward passes accumulated into one optimizer step: N / micro_batch_size."""
        return self.sequences_per_step // self.train.micro_batch_size


# ----------------------------------------------------------------------------------------------
# Coercion: plain data -> typed dataclasses
# ----------------------------------------------------------------------------------------------

_NONE = type(None)
_DATA_SUFFIXES = {"jsonl": (".jsonl", ".json"), "parquet": (".parquet",)}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """Resolved field types of a config dataclass (annotations are strings under __future__)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in get_type_hints(cls).items() if k in names}


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _type_name(tp: Any) -> str:
    """Readable name of a declared type, for error messages."""
    origin, args = get_origin(tp), get_args(tp)
    if _is_union(tp):
        return " or ".join("null" if a is _NONE else _type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    if origin is tuple:
        return f"list of {len(args)} {_type_name(args[0])}s"
    if origin is dict or tp is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _bad(key: str, tp: Any, value: Any, hint: str = "") -> ConfigError:
    return ConfigError(f"{key or '<root>'}: expected {_type_name(tp)}, got {value!r}{hint}")


def _closest(word: str, candidates: Sequence[str], cutoff: float = 0.6) -> str | None:
    """The candidate closest to `word` (difflib), or None when nothing is close."""
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=cutoff)
    return match[0] if match else None


def _all_keys(cls: type, path: str = "") -> list[str]:
    """Every dotted key reachable through nested dataclass fields (not into lists)."""
    keys = []
    for name, tp in _hints(cls).items():
        key = _join(path, name)
        keys.append(key)
        if dataclasses.is_dataclass(tp):
            keys += _all_keys(tp, key)
    return keys


def _unknown_key(cls: type, path: str, key: str) -> ConfigError:
    """Unknown-key error with a suggestion: the same name in another section (`train.group_size`
    -> `grpo.group_size`), else the closest sibling, else the closest name anywhere."""
    elsewhere: dict[str, str] = {}  # leaf name -> its first dotted key
    for dotted in _all_keys(Config):
        if "." in dotted:
            elsewhere.setdefault(dotted.rsplit(".", 1)[-1], dotted)
    if key in elsewhere:
        guess: str | None = elsewhere[key]
    elif (near := _closest(key, list(_hints(cls)))) is not None:
        guess = _join(path, near)
    else:
        leaf = _closest(key, list(elsewhere), cutoff=0.8)
        guess = elsewhere[leaf] if leaf else None
    hint = f" (did you mean '{guess}'?)" if guess else ""
    valid = ", ".join(_hints(cls))
    return ConfigError(f"unknown config key '{_join(path, key)}'{hint}; valid keys here: {valid}")


def _build(cls: type, data: Any, path: str) -> Any:
    """A `cls` instance from a mapping, coercing each value to its field's type."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise _bad(path, cls, data)
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise _unknown_key(cls, path, str(key))
        kwargs[key] = _coerce(value, hints[key], _join(path, key))
    for f in dataclasses.fields(cls):
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(path, f.name)}: required ({_type_name(hints[f.name])})")
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` converted to the declared type `tp`, or ConfigError naming `key`."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if _is_union(tp):
        if value is None:
            if _NONE in args:
                return None
            raise _bad(key, tp, value)
        options = [a for a in args if a is not _NONE]
        if len(options) == 1:
            return _coerce(value, options[0], key)
        for option in options:
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise _bad(key, tp, value)
    if origin is Literal:
        for option in args:
            if value == option and type(value) is type(option):
                return option
        near = _closest(value, [a for a in args if isinstance(a, str)]) if isinstance(value, str) else None
        raise _bad(key, tp, value, f" (did you mean {near!r}?)" if near else "")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _bad(key, tp, value)
        return [_coerce(v, args[0], _join(key, i)) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise _bad(key, tp, value)
        return tuple(_coerce(v, t, _join(key, i)) for i, (v, t) in enumerate(zip(value, args)))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _bad(key, tp, value)
        val_tp = args[1] if args else Any
        return {str(k): _coerce(v, val_tp, _join(key, k)) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise _bad(key, tp, value)
    if tp is int:
        number = _number(value)
        if isinstance(number, int):
            return number
        if isinstance(number, float) and number.is_integer():
            return int(number)
        raise _bad(key, tp, value)
    if tp is float:
        number = _number(value)
        if number is None:
            raise _bad(key, tp, value)
        return float(number)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _bad(key, tp, value, " (quote the value in YAML)")
    raise TypeError(f"{key}: unsupported config field type {tp!r}")


def _number(value: Any) -> int | float | None:
    """An int/float from a number or a numeric string (PyYAML reads `1e-5` as a string); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        text = value.strip()
        for parse in (int, float):
            try:
                return parse(text)
            except ValueError:
                pass
    return None


def config_to_dict(cfg: Any) -> Any:
    """Plain YAML-safe data of a config (or any part of it): dataclasses -> dicts, tuples -> lists."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {str(k): config_to_dict(v) for k, v in cfg.items()}
    return cfg


# ----------------------------------------------------------------------------------------------
# Overrides: "a.b=v"
# ----------------------------------------------------------------------------------------------


def _accepts_str(tp: Any) -> bool:
    """True for str, Optional[str], and Literals of strings (`data.synthetic.operations.0=*`)."""
    if _is_union(tp):
        return any(_accepts_str(a) for a in get_args(tp))
    return tp is str or (get_origin(tp) is Literal and any(isinstance(a, str) for a in get_args(tp)))


def _parse_value(text: str, tp: Any) -> Any:
    """The override text as a YAML value. A string field takes the text verbatim (`run.name=007`,
    `data.system_prompt=Answer: briefly # no comment` stay as written), unless it is quoted
    (then unquoted by YAML) or a YAML null (`null`, `~`, empty), which means None."""
    stripped = text.strip()
    if _accepts_str(tp) and stripped not in ("", "~", "null", "Null", "NULL") and stripped[0] not in "'\"":
        return stripped
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse value {text!r}: {e}") from None


def _field_default(cls: type, name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return config_to_dict(value)


def _merge(dst: dict, src: Mapping) -> None:
    for k, v in src.items():
        if isinstance(v, Mapping) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def _child(tp: Any, node: Any, path: str, part: str) -> tuple[Any, Any, Any]:
    """One step of an override key: (declared type of the child, slot in `node`, its empty value)."""
    if dataclasses.is_dataclass(tp):
        hints = _hints(tp)
        if part not in hints:
            raise _unknown_key(tp, path, part)
        # a list starts from its default (so `rewards.0.weight=2` edits the default reward);
        # a section starts empty (its defaults, including derived fields, are filled when built)
        empty = _field_default(tp, part) if get_origin(hints[part]) is list else {}
        return hints[part], part, empty
    if get_origin(tp) is list:
        if not part.isdigit() or int(part) >= len(node):
            raise ConfigError(f"{_join(path, part)}: no such item (the list {path} has {len(node)})")
        return get_args(tp)[0], int(part), {}
    if get_origin(tp) is dict:
        return (get_args(tp) or (str, Any))[1], part, {}
    raise ConfigError(f"{_join(path, part)}: {path} is a {_type_name(tp)}, it has no sub-keys")


def _apply_override(raw: dict, item: str) -> None:
    """Set `key=value` into the raw (YAML) dict; the key is checked against the schema on the way,
    so a typo fails with a suggestion. List items are addressed by index: `rewards.0.weight=2`."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    parts = key.split(".")
    tp: Any = Config
    node: Any = raw
    path = ""
    for i, part in enumerate(parts):
        if _is_union(tp):  # Optional[X]: step into X
            tp = next(a for a in get_args(tp) if a is not _NONE)
        child_tp, slot, empty = _child(tp, node, path, part)
        path = _join(path, part)
        current = node.get(slot) if isinstance(node, dict) else node[slot]
        if i == len(parts) - 1:
            value = _parse_value(text, child_tp)
            if isinstance(value, Mapping) and isinstance(current, dict):
                _merge(current, value)  # `lora={enabled: true}` keeps the other lora keys
            else:
                node[slot] = value
            return
        if current is None:
            current = node[slot] = empty
        elif not isinstance(current, (dict, list)):
            raise _bad(path, child_tp, current)
        tp, node = child_tp, current


# ----------------------------------------------------------------------------------------------
# Validation: settings against each other, before any model is loaded
# ----------------------------------------------------------------------------------------------

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_REWARD_RE = re.compile(r"^[A-Za-z_]\w*$|^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
_INTERVAL_RE = re.compile(r"^([\[(])(\S+), (\S+)([\])])\s*(.*)$")

# Single-field ranges, "[lo, hi)" style, optionally followed by why. A null value passes (it means
# "off" for the Optional fields); a list value (train.betas) is checked element by element.
_RANGES = {
    "lora.r": "[1, inf)",
    "lora.alpha": "(0, inf)",
    "lora.dropout": "[0, 1)",
    "data.max_prompt_tokens": "[1, inf)",
    "data.num_eval": "[0, inf)",
    "data.synthetic.num_train": "[1, inf)",
    "data.synthetic.num_operands": "[2, inf)",
    "sampler.temperature": "(0, inf) (use eval.temperature=0 for greedy evaluation)",
    "sampler.top_p": "(0, 1]",
    "sampler.top_k": "[0, inf) (0 = off)",
    "sampler.min_p": "[0, 1)",
    "sampler.max_new_tokens": "[1, inf)",
    "sampler.gpu_memory_utilization": "(0, 1]",
    "sampler.max_rows": "[1, inf) (null = every row at once)",
    "grpo.prompts_per_step": "[1, inf)",
    "grpo.group_size": "[2, inf) (advantages compare the completions of one prompt)",
    "grpo.epsilon": "(0, inf)",
    "grpo.delta": "(1, inf)",
    "grpo.beta": "[0, inf)",
    "grpo.num_iterations": "[1, inf)",
    "grpo.max_resample_rounds": "[0, inf)",
    "grpo.is_cap": "[1, inf)",
    "train.steps": "[1, inf)",
    "train.lr": "[0, inf)",
    "train.weight_decay": "[0, inf)",
    "train.betas": "[0, 1)",
    "train.eps": "(0, inf)",
    "train.warmup_steps": "[0, inf)",
    "train.min_lr_ratio": "[0, 1]",
    "train.max_grad_norm": "(0, inf)",
    "train.micro_batch_size": "[1, inf)",
    "train.logprob_chunk_size": "[1, inf)",
    "log.every": "[1, inf)",
    "log.sample_every": "[0, inf) (0 = never)",
    "checkpoint.every": "[0, inf) (0 = only the final checkpoint)",
    "checkpoint.keep_last": "[1, inf)",
    "eval.every": "[0, inf) (0 = off)",
    "eval.num_prompts": "[1, inf)",
    "eval.temperature": "[0, inf) (0 = greedy)",
    "eval.max_new_tokens": "[1, inf)",
    "distributed.timeout_s": "(0, inf)",
}


def _range_error(key: str, value: Any, spec: str) -> str | None:
    """A message if `value` lies outside the interval `spec`, else None (NaN is always outside)."""
    left, lo, hi, right, why = _INTERVAL_RE.match(spec).groups()
    values = value if isinstance(value, (list, tuple)) else [value]
    ok = all(
        (v > float(lo) if left == "(" else v >= float(lo)) and (v < float(hi) if right == ")" else v <= float(hi))
        for v in values
        if v is not None
    )
    if ok:
        return None
    where = f"{'>' if left == '(' else '>='} {lo}" if hi == "inf" else f"in {left}{lo}, {hi}{right}"
    shown = list(value) if isinstance(value, tuple) else value
    return f"{key} must be {where}, got {shown}" + (f" {why}" if why else "")


def validate(cfg: Config) -> list[str]:
    """Check the settings, alone and against each other; raise one ConfigError listing every problem.

    Field types are re-checked first, so a hand-built Config gets the same errors as a YAML one.
    Legal but suspicious combinations (e.g. GSPO with a token-sum loss, chosen to be a warning as
    TRL does, since the math is well defined) are emitted as ConfigWarning and returned for the log.
    """
    Config.from_dict(config_to_dict(cfg))
    errors: list[str] = []
    notes: list[str] = []
    for key, spec in _RANGES.items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if (msg := _range_error(key, value, spec)) is not None:
            errors.append(msg)

    def need(ok: bool, msg: str) -> None:
        if not ok:
            errors.append(msg)

    run, model, data, syn = cfg.run, cfg.model, cfg.data, cfg.data.synthetic
    g, tr, ev = cfg.grpo, cfg.train, cfg.eval
    need(
        "/" not in run.name and "\\" not in run.name and run.name not in ("", ".", ".."),
        f"run.name must be a plain folder name, got {run.name!r}",
    )
    need(bool(_DEVICE_RE.match(run.device)), f"run.device must be auto, cpu, cuda or cuda:N, got {run.device!r}")
    need(
        (model.name_or_path is None) != (model.arch is None),
        f"set exactly one of model.name_or_path ({model.name_or_path!r}) and model.arch ({model.arch!r})",
    )
    need(
        not model.activation_offload or model.gradient_checkpointing,
        "model.activation_offload=true needs model.gradient_checkpointing=true (it offloads the checkpointed inputs)",
    )
    need(not cfg.lora.enabled or len(cfg.lora.targets) > 0, "lora.targets must name at least one layer")
    need(
        not (cfg.lora.enabled and cfg.distributed.strategy == "fsdp"),
        "distributed.strategy=fsdp with lora.enabled: LoRA trains with ddp (the frozen, possibly NF4, base is "
        "replicated and only the adapters' gradients are all-reduced); use strategy auto or ddp",
    )
    need(
        cfg.lora.quantize_base is None or cfg.lora.enabled,
        f"lora.quantize_base={cfg.lora.quantize_base!r} needs lora.enabled=true (a quantized base is frozen)",
    )

    # data: a file source needs a path whose suffix matches it
    if data.source in ("jsonl", "parquet", "hub"):
        need(data.path is not None, f"data.source={data.source!r} needs data.path (a file, folder or repo id)")
    for key in ("path", "eval_path"):
        suffix = Path(getattr(data, key) or "").suffix
        if data.source in _DATA_SUFFIXES and suffix in (".jsonl", ".json", ".parquet"):
            need(
                suffix in _DATA_SUFFIXES[data.source],
                f"data.{key}={getattr(data, key)!r} does not match data.source={data.source!r}",
            )
    need(
        data.eval_path is None or data.source in _DATA_SUFFIXES,
        f"data.eval_path is only read by jsonl/parquet sources, not data.source={data.source!r}",
    )
    if data.source == "synthetic":
        need(len(syn.operations) > 0, "data.synthetic.operations must list at least one operator")
        need(
            syn.min_operand <= syn.max_operand,
            f"data.synthetic.min_operand ({syn.min_operand}) must be <= max_operand ({syn.max_operand})",
        )
        need("{expression}" in syn.question, f"data.synthetic.question must contain {{expression}}: {syn.question!r}")
    need(all(cfg.sampler.stop), "sampler.stop must not contain empty strings")
    need(
        cfg.sampler.max_rows is None or cfg.sampler.kind == "own",
        f"sampler.max_rows={cfg.sampler.max_rows} applies to the own sampler; vLLM schedules its sequences "
        "within sampler.gpu_memory_utilization (set sampler.max_rows=null)",
    )

    # grpo: clip ranges
    eps_high = g.epsilon if g.epsilon_high is None else g.epsilon_high
    need(eps_high >= g.epsilon, f"grpo.epsilon_high ({g.epsilon_high}) must be >= grpo.epsilon ({g.epsilon}) or null")
    if g.delta is not None and 1 < g.delta <= 1 + eps_high:
        notes.append(
            f"grpo.delta ({g.delta}) <= 1 + epsilon_high ({1 + eps_high}): it also caps the ratio of "
            "positive-advantage tokens inside the clip range"
        )
    if g.importance_sampling_level == "sequence" and g.loss_type != "grpo":
        notes.append(
            f"grpo.importance_sampling_level='sequence' (GSPO) with grpo.loss_type={g.loss_type!r}: "
            "this loss weights each sequence by its length; GSPO is defined with loss_type='grpo'"
        )

    # rewards: names only look right here; the functions are resolved when the run starts
    need(len(cfg.rewards) > 0, "rewards must list at least one reward function")
    for i, spec in enumerate(cfg.rewards):
        need(
            bool(_REWARD_RE.match(spec.name)),
            f"rewards.{i}.name={spec.name!r} is neither a registry name nor 'package.module:function'",
        )
        need(math.isfinite(spec.weight), f"rewards.{i}.weight must be finite, got {spec.weight}")
        need(spec.timeout_s > 0, f"rewards.{i}.timeout_s must be > 0, got {spec.timeout_s}")
    need(
        not cfg.rewards or any(spec.weight != 0 for spec in cfg.rewards),
        "every rewards.*.weight is 0: every advantage would be 0 and nothing would be learned",
    )
    names = [spec.name for spec in cfg.rewards]
    if len(set(names)) < len(names):
        notes.append(f"rewards lists a function twice ({names}): their per-reward metrics share one name")

    # the sizes of one step: N = B*G sequences, trained in N / micro_batch_size passes
    n, mb = g.prompts_per_step * g.group_size, tr.micro_batch_size
    if n >= 1 and mb >= 1 and n % mb:
        errors.append(
            f"grpo.prompts_per_step * grpo.group_size ({g.prompts_per_step} * {g.group_size} = {n} "
            f"sequences per step) must be divisible by train.micro_batch_size ({mb}): each optimizer step "
            f"trains on the N = B*G sequences in N / micro_batch_size equal passes; divisors of {n}: "
            f"{[d for d in range(1, n + 1) if n % d == 0]}"
        )
    need(tr.warmup_steps <= tr.steps, f"train.warmup_steps ({tr.warmup_steps}) must be <= train.steps ({tr.steps})")

    if ev.every > 0:
        need(data.eval_split is not None, "eval.every > 0 needs data.eval_split")
        need(
            ev.num_prompts is None or ev.num_prompts <= data.num_eval,
            f"eval.num_prompts ({ev.num_prompts}) must be <= data.num_eval ({data.num_eval})",
        )
        single_file = Path(data.path or "").suffix in (".jsonl", ".json", ".parquet")
        need(
            not (data.source in _DATA_SUFFIXES and single_file and data.eval_path is None),
            f"eval.every > 0 with a single-file data.path ({data.path!r}) needs data.eval_path",
        )

    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))
    for note in notes:
        warnings.warn(note, ConfigWarning, stacklevel=2)
    return notes


def validate_distributed(cfg: Config, world_size: int) -> None:
    """Checks that need the number of ranks (known only at launch): raise one ConfigError listing all."""
    if world_size <= 1:
        return
    errors = []
    strategy = cfg.distributed.resolved_strategy(cfg.lora.enabled)
    if cfg.sampler.kind != "own":
        errors.append(f"sampler.kind={cfg.sampler.kind!r} runs in one process; under torchrun use sampler.kind=own")
    if cfg.grpo.prompts_per_step < world_size:
        errors.append(
            f"grpo.prompts_per_step ({cfg.grpo.prompts_per_step}) must be >= the number of ranks ({world_size}): "
            "each rank samples whole groups"
        )
    if re.match(r"^cuda:\d+$", cfg.run.device):
        errors.append(f"run.device={cfg.run.device!r} under torchrun: each rank uses its LOCAL_RANK's GPU; use cuda")
    if strategy == "fsdp" and cfg.train.optimizer != "adamw":
        errors.append(f"train.optimizer={cfg.train.optimizer!r} cannot step FSDP shards; use adamw (or strategy ddp)")
    if strategy == "fsdp" and cfg.lora.enabled:
        errors.append("distributed.strategy='fsdp' with lora.enabled: LoRA replicates its frozen base; use ddp")
    if strategy == "fsdp" and cfg.model.activation_offload:
        errors.append("model.activation_offload is not supported with FSDP; use gradient_checkpointing alone")
    if errors:
        raise ConfigError("invalid config for distributed training:\n  - " + "\n  - ".join(errors))


# ----------------------------------------------------------------------------------------------
# Load / save / command line
# ----------------------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read YAML (None: all defaults), apply `a.b=v` overrides, coerce, validate."""
    raw: Any = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError(f"cannot read config file {str(path)!r}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item)
    cfg = Config.from_dict(raw)
    validate(cfg)
    return cfg


class _Dumper(yaml.SafeDumper):
    """Safe YAML with block mappings and lists of scalars on one line (`betas: [0.9, 0.99]`)."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(not isinstance(v, (list, dict)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    style = '"' if "\n" in data and len(data) < 80 else ("|" if "\n" in data else None)  # newlines stay visible
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(list, _represent_list)
_Dumper.add_representer(str, _represent_str)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically); `load_config(path)` gives an equal Config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, allow_unicode=True)
    write_atomic(path, "# minigrpo resolved config\n" + body)


def build_arg_parser(description: str | None = None) -> argparse.ArgumentParser:
    """`--config FILE`, `--set a.b=v ...` (repeatable) and `--resume`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", type=str, default=None, help="YAML config file (default: all defaults)")
    parser.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set grpo.group_size=4 train.lr=1e-5",
    )
    parser.add_argument("--resume", action="store_true", help="resume from the latest checkpoint (run.resume)")
    return parser


def config_from_args(argv: Sequence[str] | None = None, description: str | None = None) -> Config:
    """Parse the command line into a validated Config (`--resume` sets run.resume=true)."""
    args = build_arg_parser(description).parse_args(argv)
    overrides = [*args.overrides, *(["run.resume=true"] if args.resume else [])]
    return load_config(args.config, overrides)


def resolve_dtype(dtype: str, device_type: str) -> str:
    """The dtype name that `run.dtype` means on a device type: "auto" is bfloat16 on CUDA, else float32."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device_type.startswith("cuda") else "float32"
