"""Pushing the policy's weights into an in-process vLLM engine, and proving they arrived.

What is pushed: the plain model the policy stands for (`policy_weights_for_sync`): LoRA layers merged
(W + scaling * B @ A in fp32, cast to vLLM's dtype; minigrpo.lora computes it), NF4 bases dequantized,
one tensor at a time when consumed; nothing is merged in the policy. vLLM thus holds a 16-bit copy
(4x an NF4 base) but samples exactly the policy the trainer scores; re-quantising W + BA to 4 bits
would round most of the small LoRA delta away.

How: `worker_load` runs on the vLLM worker (in-process, so tensors pass by reference) and calls
`reload_weights(weights_iterator=...)`, which reloads in place and re-runs vLLM's per-layer
post-processing (the CPU backend repacks each linear weight into a oneDNN layout, so copying into
parameters would not reach the kernels). Weights go in buckets of whole decoder layers
(`weight_buckets`): vLLM fuses q/k/v and gate/up into one parameter and processes a layer from the
parts one call brings, so a call with q alone leaves k and v as whatever memory held.

Proof, after every sync (`SyncError` if either fails): (1) fingerprints of every vLLM parameter
stored as pushed (embeddings and norms on the CPU, also unfused projections on GPU) equal the
policy's: exact, catches updates too small for any log-prob test; (2) the log-prob probe: vLLM's
greedy continuation of a fixed prompt, scored by vLLM and by the trainer, agrees within
PROBE_TOLERANCE: catches weights that are stored but not used by the kernels. Nothing here imports
vLLM: the worker functions receive vLLM's worker object, the rest the engine (`vllm.LLM`).
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from minigrpo.logprobs import completion_logprobs
from minigrpo.lora_export import plain_tensors

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


class SyncError(RuntimeError):
    """The sampler does not hold the policy's current weights (a sync failed or was skipped)."""


# ================================================================================================
# what is pushed, in which calls


def policy_weights_for_sync(
    model: nn.Module, dtype: torch.dtype | None = None, *, only: set[str] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of every weight of the plain model, one at a time, in module order.

    LoRA layers give their merged weight and NF4 linears their dequantized weight under the base
    weight's name (`...q_proj.weight`), computed only when consumed (lora_export.plain_tensors);
    adapter factors are not yielded. Tensors are detached and cast to `dtype` (default: the model's
    dtype; a no-op for plain parameters already in it). `only`: just these names (the others are
    never computed).
    """
    dtype = dtype or getattr(model, "dtype", None)
    for name, _, make in plain_tensors(model):
        if only is None or name in only:
            with torch.no_grad():
                t = make().detach()
            yield name, t if dtype is None else t.to(dtype)


def layer_unit(name: str) -> str:
    """Weights vLLM may fuse into one parameter share a unit: everything of one numbered layer."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return name


def weight_buckets(
    weights: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group whole units (layer_unit) into lists of at least `bucket_bytes` (0: one unit per list)."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for _, unit in itertools.groupby(weights, key=lambda kv: layer_unit(kv[0])):
        if bucket and size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
        for name, t in unit:
            bucket.append((name, t))
            size += t.numel() * t.element_size()
    if bucket:
        yield bucket


def fingerprint(t: torch.Tensor) -> torch.Tensor:
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
# what runs on the worker (in-process: plain calls, `worker` is vLLM's worker)


def worker_load(worker: Any, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Load (name, tensor) pairs in HF checkpoint format into the worker's model, in place."""
    reload = getattr(worker.model_runner, "reload_weights", None)
    if reload is not None and "weights_iterator" in inspect.signature(reload).parameters:
        worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
    else:  # older vLLM (GPU only: weights are not repacked there)
        worker.model_runner.model.load_weights(weights)


def worker_refresh_tied_head(worker: Any) -> bool:
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


def worker_clear_kv_cache(worker: Any) -> int:
    """Zero the KV cache memory. Wrong weights can write NaN into it, and attention reads whole
    blocks (masked slots included, 0 * NaN = NaN): without this, a correct re-sync after a failed one
    still samples NaN (measured). Returns the number of cache tensors cleared."""
    caches = [t for t in getattr(worker.model_runner, "kv_caches", None) or [] if isinstance(t, torch.Tensor)]
    for t in caches:
        t.zero_()
    return len(caches)


def worker_fingerprints(worker: Any, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Fingerprints of the worker's parameters stored as pushed (vocabulary padding cut off)."""
    params = dict(worker.model_runner.get_model().named_parameters())
    out = {}
    for name, shape in shapes.items():
        p = params.get(name)
        if p is None or p.numel() == 0 or p.dim() != len(shape) or tuple(p.shape[1:]) != tuple(shape[1:]):
            continue
        if p.shape[0] < shape[0]:
            continue
        out[name] = fingerprint(p.detach()[: shape[0]])
    return out


# ================================================================================================
# verification


def stale_tensors(llm: Any, policy: nn.Module, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> list[str]:
    """Names among `shapes` whose fingerprint in the engine differs from the policy's (sorted)."""
    ours = {n: fingerprint(t) for n, t in policy_weights_for_sync(policy, dtype, only=set(shapes))}
    theirs = llm.collective_rpc(worker_fingerprints, args=(shapes,))[0]
    return sorted(n for n in shapes if n not in theirs or not torch.allclose(ours[n], theirs[n], rtol=1e-9, atol=0))


def probe_logprob_diff(llm: Any, greedy: Any, policy: nn.Module, prompt: Sequence[int]) -> tuple[float, float]:
    """Max and mean |diff| of vLLM's and the trainer's log-probs of vLLM's continuation of `prompt`
    under `greedy` (vLLM SamplingParams: temperature 0, logprobs=0, ignore_eos)."""
    out = llm.generate([{"prompt_token_ids": list(prompt)}], greedy, use_tqdm=False)[0].outputs[0]
    drawn = list(out.token_ids)
    v_logp = torch.tensor([out.logprobs[i][t].logprob for i, t in enumerate(drawn)], dtype=torch.float32)
    device = next(policy.parameters()).device
    ids = torch.tensor([list(prompt) + drawn], device=device)  # (1, Tp + Tc)
    was_training = policy.training
    policy.eval()
    try:
        with torch.no_grad():
            t_logp = completion_logprobs(
                policy, ids, torch.ones_like(ids), torch.ones(1, len(drawn), dtype=torch.long, device=device)
            )[0].cpu()  # (Tc,)
    finally:
        policy.train(was_training)
    diff = (v_logp - t_logp).abs()
    return float(diff.max()), float(diff.mean())


def probe_tolerance(*dtypes: torch.dtype) -> tuple[float, float]:
    """The loosest probe tolerance among the dtypes involved."""
    tols = [PROBE_TOLERANCE.get(d, PROBE_TOLERANCE[torch.bfloat16]) for d in dtypes]
    return max(t[0] for t in tols), max(t[1] for t in tols)


# ================================================================================================
# logging


class _DropReloadNoise(logging.Filter):
    """A bucketed reload leaves every layer outside the bucket untouched, and vLLM warns about each
    of them ("Failed to load weights", "weights were not loaded"); the verification checks instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return "Failed to load weights" not in msg and "were not loaded from checkpoint" not in msg


@contextlib.contextmanager
def quiet_reload() -> Iterator[None]:
    """Silence vLLM's per-layer warnings of a bucketed reload (see _DropReloadNoise)."""
    loggers = [logging.getLogger(f"vllm.model_executor.model_loader.reload.{m}") for m in ("layerwise", "inplace")]
    filt = _DropReloadNoise()
    for lg in loggers:
        lg.addFilter(filt)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(filt)


__all__ = [
    "PROBE_TOLERANCE",
    "SyncError",
    "fingerprint",
    "layer_unit",
    "policy_weights_for_sync",
    "probe_logprob_diff",
    "probe_tolerance",
    "stale_tensors",
    "weight_buckets",
    "worker_clear_kv_cache",
    "worker_fingerprints",
    "worker_load",
    "worker_refresh_tied_head",
]
