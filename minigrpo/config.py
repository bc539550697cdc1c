"""The run configuration: one typed field per hyper-parameter, its limit beside it, checked up front.

    cfg = load_config("configs/demo_cpu.yaml", ["grpo.group_size=4", "train.lr=1e-5"])
    save_config(cfg, cfg.run.run_dir / "config.yaml")     # the resolved config, saved with the run

Nested dataclasses mirrored by the YAML (`grpo: {group_size: 8}`), never `cfg.get(key, default)`.
`spec(default, ">= 1")` puts a field's limit beside it; `validate` adds the checks between fields;
`configio.py` is the generic loader (strict YAML, `a.b=v` overrides, coercion, did-you-mean).
Derived fields (`spec(..., derived=...)`) default to None and are filled once, in `__post_init__`,
only while None (an explicit value wins); the saved config holds the filled values, and nothing
edits a config after it is built. Imports no torch: a config is checked before any heavy work.

Sizes: one optimizer step samples B = `grpo.prompts_per_step` prompts, G = `grpo.group_size`
completions each: N = B*G sequences, trained in N / `train.micro_batch_size` equal forward/backward
passes whose gradients are accumulated, so N must be a multiple of micro_batch_size.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

from minigrpo import configio
from minigrpo.algorithms.dpo_config import DPOCfg
from minigrpo.algorithms.ppo_config import PPOCfg
from minigrpo.atomic import write_atomic
from minigrpo.config_names import foreign_name
from minigrpo.config_rules import cross_field_errors, read_by_command
from minigrpo.config_rules import resolve_dtype as resolve_dtype  # re-exported: run.dtype on a device type
from minigrpo.configio import MAX_COUNT, MAX_SECONDS, ConfigError, ConfigWarning, Section, spec
from minigrpo.env_config import EnvCfg
from minigrpo.errors import ArgumentParser
from minigrpo.sft_config import SFTCfg

config_to_dict = configio.to_plain  # plain YAML-safe data of a config or any part of it
LoRATarget = Literal["q", "k", "v", "o", "gate", "up", "down"]  # a block's linear layers (lora.TARGETS)


# ---------------------------------------- Schema


@dataclass
class RunCfg(Section):
    """Where the run writes, its seed, and the device/precision it runs in."""

    name: str = spec("run", match=r"(?!\.\.?$)[^/\\]+", why="a plain folder name")  # the run directory: output_dir/name
    output_dir: str = "runs"  # parent folder of run directories (~ is the home folder, as in the data and model paths)
    seed: int = spec(0, "any")  # seed of torch / sampling RNGs and of the prompt order
    # "auto": cuda if available, else cpu
    device: str = spec("auto", match=r"auto|cpu|cuda(:\d+)?", why="auto, cpu, cuda or cuda:N")
    # weights/activations dtype; "auto": bfloat16 on CUDA, float32 on CPU (resolve_dtype; build.check_dtype)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    resume: bool = False  # continue from the latest checkpoint in the run directory (CLI: --resume)

    @property
    def run_dir(self) -> Path:
        """The run directory: checkpoints, metrics.jsonl, plots and the resolved config.yaml."""
        return Path(self.output_dir).expanduser() / self.name


@dataclass
class ModelCfg(Section):
    """The policy model. Exactly one of `name_or_path` / `arch` is set; with neither, the packaged
    SmolLM2 GGUF ("smollm2") is used, so the default config runs without network."""

    # local HF folder, hub repo id, .gguf file, or "smollm2" (the packaged GGUF)
    name_or_path: str | None = spec(None, derived='"smollm2" when model.arch is None too')
    arch: str | None = None  # architecture preset with random weights, for benchmarks ("qwen2.5-1.5b")
    revision: str | None = None  # hub revision (branch, tag or commit) of name_or_path
    gradient_checkpointing: bool = False  # recompute block activations in backward to save memory
    activation_offload: bool = False  # with checkpointing: keep the saved block inputs in pinned CPU memory

    def __post_init__(self) -> None:
        if self.name_or_path is None and self.arch is None:
            self.name_or_path = "smollm2"


@dataclass
class LoRACfg(Section):
    """Low-rank adapters on the linear layers; the base weights are frozen (optionally NF4)."""

    enabled: bool = False  # train adapters instead of all weights
    r: int = spec(16, ">= 1", most=MAX_COUNT)  # adapter rank
    alpha: float = spec(32.0, "> 0")  # delta W = (alpha / r) * B @ A (alpha / sqrt(r) with rslora)
    dropout: float = spec(0.0, "in [0, 1)")  # dropout on the adapter input
    # linear layers that get adapters, by short name (attention q/k/v/o, MLP gate/up/down)
    targets: list[LoRATarget] = field(default_factory=lambda: list(get_args(LoRATarget)))
    rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r)
    quantize_base: Literal[None, "nf4"] = None  # "nf4": frozen base weights in 4-bit NF4 (QLoRA)


@dataclass
class SyntheticCfg(Section):
    """The file-free arithmetic task ("What is 7 + 5?") used by the CPU demo and tests."""

    seed: int = spec(0, "any")  # task seed, independent of run.seed: the data stays fixed across seeds
    num_train: int = spec(2000, ">= 1", most=MAX_COUNT)  # examples generated for the training split (an epoch)
    operations: list[Literal["+", "-", "*"]] = field(default_factory=lambda: ["+", "-"])  # operators drawn
    num_operands: int = spec(2, ">= 2", most=MAX_COUNT)  # operands per expression
    min_operand: int = spec(0, "any")  # smallest operand (inclusive)
    max_operand: int = spec(9, "any")  # largest operand (inclusive)
    allow_negative: bool = False  # allow expressions whose value is negative (else they are redrawn)
    question: str = "What is {expression}?"  # question template; must contain {expression}
    # answer-format instruction appended to the question (None: no instruction)
    instruction: str | None = "Give the final answer as a number inside <answer></answer>."


@dataclass
class DataCfg(Section):
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
    # more chat template variables for every prompt rendered (rollouts, eval, SFT), e.g. {enable_thinking: false}
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    shuffle: bool = True  # reshuffle the prompt order every epoch (seeded by run.seed and the epoch)
    max_prompt_tokens: int | None = spec(None, ">= 1", most=MAX_COUNT)  # drop longer prompts (None: keep all)
    num_eval: int = spec(200, ">= 0", most=MAX_COUNT)  # eval set size (synthetic: generated; files: the first rows)
    synthetic: SyntheticCfg = field(default_factory=SyntheticCfg)  # knobs of the synthetic task


@dataclass
class SamplerCfg(Section):
    """Rollout generation: which sampler, and the sampling distribution."""

    kind: Literal["own", "vllm"] = "own"  # own KV-cache sampler on the policy, or colocated vLLM
    temperature: float = spec(1.0, "> 0", why="use eval.temperature=0 for greedy evaluation")  # also in training
    top_p: float = spec(1.0, "in (0, 1]")  # nucleus sampling mass; 1 = off
    top_k: int = spec(0, ">= 0", most=MAX_COUNT, why="0 = off")  # keep the k most likely tokens
    min_p: float = spec(0.0, "in [0, 1)")  # drop tokens below min_p * p_max; 0 = off
    max_new_tokens: int = spec(256, ">= 1", most=MAX_COUNT)  # completion limit (also Dr.GRPO's max_completion_length)
    stop: list[str] = field(default_factory=list)  # extra stop strings (EOS ids come from the model)
    compile: bool = True  # CUDA graphs / torch.compile for decoding (GPU only)
    # own sampler: rows decoded at once (its KV cache holds this many sequences); the step's rows are
    # generated in waves of whole prompts (or of parts of one prompt's group), the same tokens as in
    # one go; null: every row at once. Long completions: trades rollout time for memory.
    max_rows: int | None = spec(None, ">= 1", most=MAX_COUNT, why="null = every row at once")
    # own sampler with LoRA on a 16-bit base: each adapted weight merged (W + s B A, rounded once)
    # into a copy for the rollout, one GEMM per projection instead of three; the copy costs memory
    # while sampling (the pre-flight counts it). false: adapters unmerged (NF4, fp32 bases always are)
    merge_lora: bool = True
    gpu_memory_utilization: float = spec(0.3, "in (0, 1]")  # vLLM: share of GPU memory for weights + KV cache
    vllm_sleep: bool = True  # vLLM: release its memory while the trainer runs
    # vLLM: fingerprints check every sync; the log-prob probe (how weights load, not their values)
    # runs on the first sync, every k-th, and after a failed check or a level-2 sleep (vllm_sync.py)
    vllm_probe_every: int = spec(10, ">= 0", why="0 = only the first sync")


@dataclass
class GRPOCfg(Section):
    """The GRPO objective: group sizes, advantages, clipping, loss normalisation, IS correction."""

    prompts_per_step: int = spec(8, ">= 1", most=MAX_COUNT)  # B: prompts sampled per optimizer step
    group_size: int = spec(8, ">= 1", most=MAX_COUNT)  # G per prompt; >= 2 but with algorithm ppo (a critic, no groups)
    # loss normalisation: grpo = mean of per-sequence token means; bnpo = token mean of the
    # micro-batch; dr_grpo = token sum / (sequences * max_new_tokens); dapo = token sum / tokens of step
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    epsilon: float = spec(0.2, "> 0")  # lower clip: ratio >= 1 - epsilon
    epsilon_high: float | None = spec(None, "> 0", derived="grpo.epsilon")  # upper clip: ratio <= 1 + epsilon_high
    delta: float | None = spec(None, "> 1")  # two-sided clip: cap the unclipped ratio at delta (None: off)
    beta: float = spec(0.0, ">= 0")  # KL(policy || reference) coefficient, k3 estimator; 0 = no reference pass
    importance_sampling_level: Literal["token", "sequence"] = "token"  # per-token ratio, or GSPO
    scale_rewards: Literal["group", "batch", "none"] = "group"  # divide advantages by which std
    advantage_estimator: Literal["grpo", "rloo"] = "grpo"  # group mean baseline, or leave-one-out
    num_iterations: int = spec(1, ">= 1", most=MAX_COUNT)  # mu: optimizer passes over each batch of rollouts
    mask_truncated_completions: bool = False  # drop completions that hit max_new_tokens from the loss
    dynamic_sampling: bool = False  # DAPO: resample groups whose rewards are all equal
    max_resample_rounds: int = spec(3, ">= 0", most=MAX_COUNT)  # dynamic sampling: extra rounds a step at most
    # sampler-vs-trainer importance weights: token/sequence, truncate/mask outside [is_min, is_cap].
    # None = auto: off for the own sampler (the trainer's weights; with LoRA merged for the rollout,
    # rounded once more), token_truncate for vLLM
    is_correction: Literal[None, "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = spec(
        None, derived='"token_truncate" when sampler.kind is vllm'
    )
    is_cap: float = spec(3.0, ">= 1")  # upper bound C of the IS weight
    is_min: float | None = spec(None, ">= 0")  # lower bound of the IS weight (None: none); <= is_cap

    def __post_init__(self) -> None:
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon


@dataclass
class RewardSpec(Section):
    """One reward function: a registry name or an import path `package.module:function`."""

    name: str  # registry name ("correctness") or "package.module:function"; unique within rewards
    weight: float = spec(1.0, "finite")  # weight in the summed reward r = sum_k weight_k * r_k
    # a call taking longer is a failure (masked and counted, not fatal)
    timeout_s: float = spec(10.0, "> 0", most=MAX_SECONDS)
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments for the function


@dataclass
class TrainCfg(Section):
    """Optimizer, schedule and micro-batching."""

    steps: int = spec(100, ">= 1", most=MAX_COUNT)  # optimizer steps
    lr: float = spec(1e-6, ">= 0")  # peak learning rate
    weight_decay: float = spec(0.0, ">= 0")  # decoupled (AdamW) decay of the matrices (not biases, norm gains)
    betas: tuple[float, float] = spec((0.9, 0.99), "in [0, 1)")  # Adam betas
    eps: float = spec(1e-8, "> 0")  # Adam epsilon
    schedule: Literal["constant", "linear", "cosine"] = "constant"  # lr shape after the warmup
    warmup_steps: int = spec(0, ">= 0")  # linear warmup from 0 to lr over this many training steps (as steps)
    min_lr_ratio: float = spec(0.0, "in [0, 1]")  # linear/cosine: final lr as a fraction of lr
    max_grad_norm: float | None = spec(1.0, "> 0")  # clip the global gradient norm (None: no clipping)
    micro_batch_size: int = spec(8, ">= 1", most=MAX_COUNT)  # sequences per forward/backward pass; must divide B*G
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw8bit"] = "adamw"  # 8-bit ones need bitsandbytes
    fp32_norms: bool = True  # 16-bit full fine-tuning: RMSNorm gains stay fp32 (bf16 rounds lr-sized steps away)
    # 16-bit full fine-tuning: where the fp32 masters start (optim.py). checkpoint: its values where they
    # hold more than the compute dtype, else dithered in each weight's rounding interval; dither: always
    master_start: Literal["checkpoint", "dither"] = "checkpoint"


@dataclass
class LogCfg(Section):
    """Metrics, samples and plots."""

    every: int = spec(1, ">= 1", most=MAX_COUNT)  # a table row every this many steps (metrics.jsonl: every step)
    sample_every: int = spec(10, ">= 0", why="0 = never")  # print a sampled completion every this many steps
    plots: bool = True  # write PNG plots of the metrics into the run directory
    tensorboard: bool = False  # also log to TensorBoard
    wandb: bool = False  # also log to Weights & Biases
    wandb_project: str | None = None  # W&B project (None: "minigrpo")
    progress: bool = True  # show a progress bar


@dataclass
class CheckpointCfg(Section):
    """Periodic, atomic checkpoints (model or adapter, optimizer, scheduler, RNG, data cursor)."""

    every: int = spec(50, ">= 0", most=MAX_COUNT, why="0 = only the final checkpoint")  # save every this many steps
    keep_last: int = spec(2, ">= 1", most=MAX_COUNT)  # periodic checkpoints kept on disk (older ones are deleted)
    save_final: bool = True  # save after the last step
    save_merged: bool = False  # LoRA: also write a merged HF checkpoint (run.dtype) to run_dir/merged at the end


@dataclass
class EvalCfg(Section):
    """Evaluation on the eval split (`python -m minigrpo.eval`)."""

    num_prompts: int | None = spec(None, ">= 0", most=MAX_COUNT, derived="data.num_eval")  # <= data.num_eval
    temperature: float = spec(0.0, ">= 0", why="0 = greedy")  # sampling temperature
    # completions sampled per prompt (k; > 1 needs eval.temperature > 0): accuracy is their mean (pass@1
    # estimated over k), pass@k (any of them right) and maj@k (the most frequent answer right) beside it
    samples_per_prompt: int = spec(1, ">= 1", most=MAX_COUNT)
    max_new_tokens: int | None = spec(None, ">= 1", most=MAX_COUNT, derived="sampler.max_new_tokens")  # its limit


@dataclass
class DistributedCfg(Section):
    """Data parallelism under torchrun (WORLD_SIZE > 1; a single process ignores this section): each
    rank samples, scores and trains on its share of every step's prompts (minigrpo/distributed.py)."""

    strategy: Literal["auto", "fsdp", "ddp"] = "auto"  # auto: fsdp for full fine-tuning, ddp for LoRA
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on CUDA, gloo on CPU
    reshard_after_forward: bool = True  # fsdp: free gathered block weights after forward (less memory)
    timeout_s: float = spec(1800.0, "> 0", most=MAX_SECONDS)  # collective timeout: a rank stuck this long fails the job

    def resolved_strategy(self, lora_enabled: bool) -> str:
        """fsdp or ddp: "auto" shards full fine-tuning and replicates a LoRA model (adapters are tiny)."""
        if self.strategy != "auto":
            return self.strategy
        return "ddp" if lora_enabled else "fsdp"


@dataclass
class Config(Section):
    """The whole run. `load_config` builds and validates it; `save_config` writes it back."""

    # the objective trained on the sampled groups (minigrpo/algorithms/): grpo, online_dpo (its dpo:
    # section) or ppo (its ppo: section); every algorithm shares the rollout, rewards, checkpoints and metrics
    algorithm: Literal["grpo", "online_dpo", "ppo"] = "grpo"
    run: RunCfg = field(default_factory=RunCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    lora: LoRACfg = field(default_factory=LoRACfg)
    data: DataCfg = field(default_factory=DataCfg)
    sampler: SamplerCfg = field(default_factory=SamplerCfg)
    grpo: GRPOCfg = field(default_factory=GRPOCfg)
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec("correctness")])  # summed, weighted
    train: TrainCfg = field(default_factory=TrainCfg)
    log: LogCfg = field(default_factory=LogCfg)
    checkpoint: CheckpointCfg = field(default_factory=CheckpointCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    distributed: DistributedCfg = field(default_factory=DistributedCfg)
    sft: SFTCfg = field(default_factory=SFTCfg)  # python -m minigrpo.sft only (minigrpo/sft_config.py)
    env: EnvCfg = field(default_factory=EnvCfg)  # multi-turn episodes (minigrpo/env_config.py); kind null: off
    dpo: DPOCfg = field(default_factory=DPOCfg)  # algorithm: online_dpo only (minigrpo/algorithms/dpo_config.py)
    ppo: PPOCfg = field(default_factory=PPOCfg)  # algorithm: ppo only (minigrpo/algorithms/ppo_config.py)
    # an unknown key that TRL, PEFT or transformers configs use: which key of ours it is (config_names.py)
    foreign_name: ClassVar[Any] = staticmethod(foreign_name)

    def __post_init__(self) -> None:
        # Derived fields that read another section: filled only when still None (explicit wins).
        if self.eval.num_prompts is None:
            self.eval.num_prompts = self.data.num_eval
        if self.eval.max_new_tokens is None:
            self.eval.max_new_tokens = self.sampler.max_new_tokens
        if self.grpo.is_correction is None and self.sampler.kind == "vllm":
            self.grpo.is_correction = "token_truncate"  # vLLM's kernels are not ours: correct the mismatch
        if self.env.max_episode_tokens is None:
            self.env.max_episode_tokens = self.sampler.max_new_tokens * self.env.max_turns

    @property
    def sequences_per_step(self) -> int:
        """N = B * G sequences sampled and trained on per optimizer step."""
        return self.grpo.prompts_per_step * self.grpo.group_size

    @property
    def micro_batches_per_step(self) -> int:
        """Forward/backward passes accumulated into one optimizer step: N / micro_batch_size."""
        return self.sequences_per_step // self.train.micro_batch_size


# ---------------------------------------- Validation: settings against each other, before any model loads


def validate(cfg: Config) -> list[str]:
    """Check the settings, alone and against each other; raise one ConfigError listing every problem,
    one per line, each naming its dotted key. A hand-built Config is rebuilt from plain data first
    (the same type errors as YAML). Legal but suspicious combinations (GSPO with a token-sum loss:
    a warning, as in TRL, since the math is well defined) are ConfigWarnings, also returned."""
    cfg = Config.from_dict(config_to_dict(cfg))
    notes: list[str] = []
    limit_errors = read_by_command(cfg, _without_derived_echoes(cfg, configio.check_limits(cfg)))
    failed = {message.split(" ", 1)[0] for message in limit_errors}  # each starts with its dotted key
    # a rule between fields that reads a value its own limit refused adds only an echo of that error: dropped
    errors = limit_errors + [e for e in cross_field_errors(cfg, notes) if not configio.names_any(e, failed)]
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))
    for note in notes:
        warnings.warn(note, ConfigWarning, stacklevel=2)
    return notes


def _without_derived_echoes(cfg: Config, errors: list[str]) -> list[str]:
    """The limit errors but those of a derived field (`grpo.epsilon_high`) that holds what it derives to
    while a key it derives from failed too: `grpo.epsilon=-0.1` is one error, not a second one about an
    epsilon_high the user never set (the saved value, equal to its source, is the same case)."""
    failed = {message.split(" ", 1)[0] for message in errors}
    echoes = set()
    for key in _derived_keys():
        sources = {s for s in re.findall(r"[a-z_]+(?:\.[a-z_]+)+", _field(key).metadata["derived"]) if s in failed}
        if sources and key in failed and configio.changed_keys(_get(cfg, key), _get(_released(cfg, key), key)) == []:
            echoes.add(key)
    return [message for message in errors if message.split(" ", 1)[0] not in echoes]


def _released(cfg: Config, key: str) -> Config:
    """`cfg` rebuilt with the derived field `key` back to null: what it derives to from its sources."""
    raw = config_to_dict(cfg)
    *sections, name = key.split(".")
    functools.reduce(lambda d, k: d[k], sections, raw)[name] = None
    return Config.from_dict(raw)


def _field(key: str) -> dataclasses.Field:
    """The dataclass field of a dotted key of Config (`grpo.epsilon_high`)."""
    cls: Any = Config
    *sections, name = key.split(".")
    for section in sections:
        cls = next(f.default_factory for f in dataclasses.fields(cls) if f.name == section)
    return next(f for f in dataclasses.fields(cls) if f.name == name)


# ---------------------------------------- Load / save / compare / command line


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read YAML (None: all defaults), apply `a.b=v` overrides, coerce, validate."""
    raw: dict[str, Any] = {} if path is None else configio.load_yaml_file(path)
    if overrides:
        release_derived(raw)
    try:
        for item in overrides:
            configio.apply_override(raw, item, Config)
    except ConfigError as e:  # `grpo: 3` in the file, stepped into by `grpo.beta=0.1`: the file's mistake
        raise _in_file(e, path, overrides) from None
    cfg = _build(raw, path, overrides)
    try:
        validate(cfg)
    except ConfigError as e:
        raise configio.in_file(e, path, overrides) from None
    return cfg


def _derived_keys(cls: type = Config, path: str = "") -> list[str]:
    """Dotted keys of the derived fields (`spec(..., derived=...)`) of `cls` and its sections."""
    keys = []
    for f in dataclasses.fields(cls):
        key = f"{path}{f.name}"
        if f.metadata.get("derived"):
            keys.append(key)
        if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            keys += _derived_keys(f.default_factory, key + ".")
    return keys


def release_derived(raw: dict[str, Any]) -> None:
    """Turn back into null each derived value of a file that equals what it derives to from the
    file's own values (a saved config.yaml or run_config.yaml writes them out): it then follows
    an override of its source (`--set data.num_eval=20` moves eval.num_prompts too) instead of
    staying at the saved value. A value the file sets to anything else is the user's and stays."""
    try:
        saved = Config.from_dict(raw)
    except ConfigError:  # reported with the overrides applied, by the caller
        return
    for key in _derived_keys():
        *sections, name = key.split(".")
        node = functools.reduce(lambda d, k: d.get(k) if isinstance(d, dict) else None, sections, raw)
        if not isinstance(node, dict) or node.get(name) is None:
            continue
        value, node[name] = node[name], None
        if _get(Config.from_dict(raw), key) != _get(saved, key):
            node[name] = value


def _get(cfg: Config, key: str) -> Any:
    return functools.reduce(getattr, key.split("."), cfg)


def _overridden(key: str, overrides: Sequence[str]) -> bool:
    """Whether an `a.b=v` override set `key` (or a section holding it)."""
    keys = [item.partition("=")[0].strip() for item in overrides]
    return any(key == k or key.startswith(k + ".") for k in keys)


def _build(raw: dict[str, Any], path: str | Path | None, overrides: Sequence[str]) -> Config:
    """Config.from_dict(raw), its errors named as `_in_file` names them."""
    try:
        return Config.from_dict(raw)
    except ConfigError as e:
        raise _in_file(e, path, overrides) from None


def _in_file(e: ConfigError, path: str | Path | None, overrides: Sequence[str]) -> ConfigError:
    """`e` naming the file too when the file wrote its key (a wrong type or unknown key, not an override's),
    as its YAML errors do: the key alone does not say where to look."""
    if path is None or e.key is None or _overridden(e.key, overrides):
        return e
    return ConfigError(f"{path}: {e}", e.key)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically); `load_config(path)` gives an equal Config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "# minigrpo resolved config\n" + configio.dump_yaml(config_to_dict(cfg)))


def config_diff(a: Config, b: Config) -> list[str]:
    """Dotted keys whose values differ between two configs ("train.lr", "rewards.0.weight"),
    in schema order; a list of another length is one key ("rewards")."""
    return configio.changed_keys(config_to_dict(a), config_to_dict(b))


def build_arg_parser(description: str | None = None, prog: str | None = None) -> ArgumentParser:
    """`--config FILE`, `--set a.b=v ...` (repeatable) and `--resume`; bad arguments raise UsageError.
    prog: the command's name ("minigrpo.train") in usage and error lines."""
    parser = ArgumentParser(description=description, prog=prog)
    parser.add_argument("--config", type=str, default=None, help="YAML config file (default: all defaults)")
    add_overrides_argument(parser, "train.lr=1e-5 train.steps=100")
    parser.add_argument("--resume", action="store_true", help="resume from the latest checkpoint (run.resume)")
    return parser


def add_overrides_argument(parser: ArgumentParser, example: str) -> None:
    """`--set KEY=VALUE ...` (repeatable; the last value of a key wins) into args.overrides."""
    help_text = f"override config values (the last of a key wins), e.g. --set {example}"
    parser.add_argument(
        "--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help=help_text
    )


def config_from_args(
    argv: Sequence[str] | None = None, description: str | None = None, prog: str | None = None
) -> Config:
    """Parse the command line into a validated Config (`--resume` sets run.resume=true)."""
    args = build_arg_parser(description, prog).parse_args(argv)
    overrides = [*args.overrides, *(["run.resume=true"] if args.resume else [])]
    return load_config(args.config, overrides)
