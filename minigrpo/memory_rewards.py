"""Reward models in the memory pre-flight: the device bytes of each `reward_model` reward of a run.

A `reward_model` reward (reward_fns.make_reward_model, models/reward_model.py) loads its checkpoint on
its device at the first scoring and keeps it for the whole run, so its weights are held in every phase
of a step; its scoring forward runs in the scoring phase, after the sampler's KV cache is freed (a
colocated vLLM sampler is still awake then, and FSDP's weights still gathered for the rollout). Its
architecture comes from its config.json, read before any weight loads. b is the bytes of its dtype
(kwargs dtype; "auto": bfloat16 on CUDA, float32 on the CPU):

    weights   the body without an LM head, plus the (num_labels, D) score head, all in b, plus the
              fp32 RoPE frequencies: b (P - V D [untied head] + num_labels D) + 4 R/2
    scoring   one forward without autograd of `batch_size` rows (the rows of a step, if fewer) of
              T = prompt + completion tokens (at most kwargs max_length, else its positions): per token
              the largest block transient (memory_parts.forward_transient_per_token), three D-sized
              states (the residual stream, the pending MLP output, the final norm's output), the RoPE
              angles (cos, sin: 4 R) and the ids, mask and positions (int64: 32); masks for sliding
              windows shorter than T. (The rows are tokenized by the reward model's own tokenizer and
              template: T counts the policy's tokens, which a similar vocabulary matches closely.)

Only the reward models on the run's device count: device "auto" or "cuda" is the run's own GPU (each
rank's under torchrun; reward_fns.set_run_device), "cuda:N" device N (under torchrun every rank loads its
copy there), "cpu" counts nothing on a GPU. The
rewards run one after another, so the largest scoring forward is the phase's. A hub id not on disk is
not counted (a note says so): its config is known once it is fetched.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from minigrpo.config import Config
from minigrpo.memory_knobs import Changes, with_setting
from minigrpo.memory_parts import forward_transient_per_token, masked_windows
from minigrpo.models.args import ModelArgs

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_INT64_PER_TOKEN = 4 * 8  # the ids and mask (the scorer's), the positions and their clamped copy (the model's)


@dataclass(frozen=True)
class RewardModelLoad:
    """One `reward_model` reward as the pre-flight counts it: where it sits and what it holds there."""

    index: int  # its place in cfg.rewards (the `--set rewards.<index>.kwargs...` of a suggestion)
    path: str
    args: ModelArgs
    num_labels: int
    dtype: str  # the resolved dtype ("bfloat16", ...)
    batch_size: int
    max_length: int | None
    copies: int  # copies on this device: one, or one per rank when every rank names the same GPU


@dataclass
class RewardModelBytes:
    """What the run's reward models add on the pre-flight's device: `weights` held all along, the largest
    scoring forward's `scoring` transient, and `notes` on what could not be counted."""

    weights: int = 0
    scoring: int = 0
    models: list[RewardModelLoad] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def reward_model_settings() -> dict[str, Any]:
    """The defaults of the `reward_model` reward's kwargs (its factory's), so the count follows them."""
    from minigrpo.reward_fns import make_reward_model

    return {p.name: p.default for p in inspect.signature(make_reward_model).parameters.values()}


def reward_model_weight_bytes(args: ModelArgs, num_labels: int, b: int) -> int:
    """Bytes a loaded RewardModel holds: every parameter in b bytes (no LM head; the score head
    (num_labels, D)) and the RoPE inverse frequencies in fp32 (longrope keeps a second set)."""
    head = 0 if args.tie_word_embeddings else args.vocab_size * args.dim  # num_params counts an untied head
    frequencies = (args.rotary_dim // 2) * 4 * (2 if args.rope_type == "longrope" else 1)
    return (args.num_params() - head + num_labels * args.dim) * b + frequencies


def reward_scoring_bytes(args: ModelArgs, rows: int, seq_len: int, b: int) -> int:
    """Peak bytes of one scoring forward without autograd: rows x seq_len tokens (module docstring)."""
    n = rows * seq_len
    per_token = forward_transient_per_token(args, b) + 3 * b * args.dim + 4 * args.rotary_dim + _INT64_PER_TOKEN
    windows = masked_windows(args, seq_len)
    masks = windows * rows * seq_len * seq_len + (rows * seq_len * seq_len * b if windows else 0)
    return n * per_token + masks


def reward_model_bytes(
    cfg: Config, device_type: str, rows: int, seq_len: int, *, device_index: int | None = None, world_size: int = 1
) -> RewardModelBytes:
    """The `reward_model` rewards of `cfg` on the pre-flight's device (device_type, device_index: None
    for the current CUDA device), each scoring up to `rows` rows of `seq_len` tokens per step."""
    models, notes = reward_models_on(cfg, device_type, device_index, world_size)
    out = RewardModelBytes(models=models, notes=notes)
    for rm in models:
        b = _DTYPE_BYTES[rm.dtype]
        out.weights += rm.copies * reward_model_weight_bytes(rm.args, rm.num_labels, b)
        T = min(seq_len, rm.max_length or rm.args.max_position_embeddings)  # rows keep their last max_length
        out.scoring = max(out.scoring, rm.copies * reward_scoring_bytes(rm.args, min(rm.batch_size, rows), T, b))
    return out


def reward_models_on(
    cfg: Config, device_type: str, device_index: int | None = None, world_size: int = 1
) -> tuple[list[RewardModelLoad], list[str]]:
    """The `reward_model` rewards of `cfg` that load on the pre-flight's device, and notes naming those
    that cannot be counted."""
    models, notes, defaults = [], [], reward_model_settings()
    for index, entry in enumerate(cfg.rewards):
        if entry.name != "reward_model":
            continue
        kwargs = _settings({**defaults, **entry.kwargs}, index)
        where = _device(kwargs["device"], device_type, device_index)
        if not _same_device(where, device_type, device_index):
            continue
        read = _checkpoint(kwargs["path"])
        if read is None:
            notes.append(f"reward model {kwargs['path']!r} (rewards.{index}) is not counted: a hub id not on disk")
            continue
        dtype = kwargs["dtype"] if kwargs["dtype"] != "auto" else "bfloat16" if where.type == "cuda" else "float32"
        copies = world_size if where.type == "cuda" and kwargs["device"] not in ("auto", "cuda") else 1
        batch, longest = kwargs["batch_size"], kwargs["max_length"]
        models.append(RewardModelLoad(index, kwargs["path"], *read, dtype, batch, longest, copies))
    return models, notes


def _settings(kwargs: dict[str, Any], index: int) -> dict[str, Any]:
    """The kwargs the count reads, checked as the reward checks them when it is built (a config that
    never went through build_reward_specs, e.g. a benchmark's, fails here with the same key named)."""
    from minigrpo.reward_fns import RewardError

    def bad(key: str, must: str) -> RewardError:
        return RewardError(f"rewards.{index}.kwargs.{key}={kwargs[key]!r} must be {must}")

    if not isinstance(kwargs["path"], str) or not kwargs["path"]:
        raise bad("path", "the reward model's checkpoint folder or hub id")
    for key in ("batch_size", "max_length"):
        value = kwargs[key]
        if not (value is None and key == "max_length") and (type(value) is not int or value < 1):
            raise bad(key, "a whole number >= 1")
    if kwargs["dtype"] != "auto" and kwargs["dtype"] not in _DTYPE_BYTES:
        raise bad("dtype", f"'auto' or one of {', '.join(_DTYPE_BYTES)}")
    if not isinstance(kwargs["device"], str):
        raise bad("device", "'auto', 'cpu', 'cuda' or 'cuda:N'")
    return kwargs


def _device(name: str, device_type: str, device_index: int | None = None) -> torch.device:
    """The device a reward model's `device` kwarg loads it on (reward_fns.reward_device), as seen
    from a run on the pre-flight's device (device_type, device_index: None for the current CUDA device):
    "auto" is the run's device, and so is "cuda" on a CUDA run (the policy's GPU, whichever is current)."""
    if name == "auto" or (name == "cuda" and device_type == "cuda"):
        name = device_type if device_type != "cuda" or device_index is None else f"cuda:{device_index}"
    where = torch.device(name)
    if where.type == "cuda" and where.index is None:
        return torch.device("cuda", _current_cuda())
    return where


def _same_device(where: torch.device, device_type: str, device_index: int | None) -> bool:
    """Whether a reward model on `where` shares the pre-flight's device."""
    if where.type != device_type:
        return False
    return where.type != "cuda" or where.index == (device_index if device_index is not None else _current_cuda())


def _current_cuda() -> int:
    """The current CUDA device's index (0 where there is none: the estimate of a CUDA run made elsewhere)."""
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def _checkpoint(path: str) -> tuple[ModelArgs, int] | None:
    """(architecture, num_labels) of a reward model folder from its config.json, no weight read; None
    for a hub id that is not on disk. A missing local path or a bad config is the reward's own error."""
    from minigrpo.models.reward_model import _local_config

    local = _local_config(path)
    if local is None:
        return None
    config_file = local[0] / "config.json"
    stat = config_file.stat() if config_file.is_file() else None
    return _read_checkpoint(str(local[0]), (stat.st_mtime_ns, stat.st_size) if stat else None)


@functools.lru_cache(maxsize=16)
def _read_checkpoint(folder: str, stamp: tuple[int, int] | None) -> tuple[ModelArgs, int]:
    """The folder's architecture and labels (cached per config.json version: the pre-flight's suggestions
    estimate the step many times)."""
    from minigrpo.models import loading
    from minigrpo.models.reward_model import RewardModel, read_reward_config

    config = loading._read_config(Path(folder))
    where = Path(folder) / "config.json"
    num_labels, pad = read_reward_config(config, where)
    build = functools.partial(RewardModel, num_labels=num_labels, pad_token_id=pad)
    return loading._model_from_config(config, where, build).args, num_labels  # meta device: no memory


# ================================================================================================
# what the pre-flight may suggest


def with_reward_setting(cfg: Config, index: int, key: str, value: Any) -> Config:
    """A copy of cfg with `rewards[index].kwargs[key]` set to value."""
    return with_setting(cfg, f"rewards.{index}.kwargs.{key}", value)


def reward_model_fixes(
    cfg: Config,
    total: Callable[[Config], int],
    budget: int,
    out: list,
    device_type: str,
    device_index: int | None,
    keys: tuple[str, ...] = ("batch_size", "dtype"),
) -> None:
    """Append to `out` (key, old, new, predicted total) for each change of a reward model's `keys` that
    brings total(config) under budget (and, where `out` is memory_knobs.Changes, every change considered
    to out.helpful, which a combination may use): fewer rows per scoring forward (the same scores: halved until one
    fits), bfloat16 weights in place of float32 (half the bytes), the reward model on the CPU ("device":
    nothing on the GPU, but a slow scoring, so the pre-flight proposes it last)."""
    for rm in reward_models_on(cfg, device_type, device_index)[0]:
        consider = _considerer(cfg, rm.index, total, budget, out)
        size = rm.batch_size
        while "batch_size" in keys and size > 1 and not consider("batch_size", size // 2):
            size //= 2
        if "dtype" in keys and rm.dtype == "float32":
            consider("dtype", "bfloat16")
        if "device" in keys:
            consider("device", "cpu")


def _considerer(cfg: Config, index: int, total: Callable[[Config], int], budget: int, out: list):
    """consider(key, value): True, and recorded in `out`, when rewards[index].kwargs[key] = value fits."""
    kwargs = {**reward_model_settings(), **cfg.rewards[index].kwargs}

    def consider(key: str, value: Any) -> bool:
        name = f"rewards.{index}.kwargs.{key}"
        if isinstance(out, Changes):
            out.helpful.append((name, value))
        t = total(with_reward_setting(cfg, index, key, value))
        if t <= budget:
            out.append((name, kwargs[key], value, t))
        return t <= budget

    return consider
