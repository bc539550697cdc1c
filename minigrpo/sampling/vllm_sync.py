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

Proof (`SyncError` if it fails): (1) after every sync, fingerprints of every vLLM parameter stored
as pushed (embeddings and norms on the CPU, also the projections on GPU, the fused q/k/v and
gate/up ones block by block, `packed_rows`) equal the policy's:
exact, catches updates too small for any log-prob test; both sides' fingerprints are computed on
their device and read back together in one transfer (`stale_tensors`). (2) on the syncs
`ProbeSchedule` picks (the first, then every k-th), the log-prob probe, one forward on each side:
over a fixed sequence (a fixed prompt and the first policy's greedy continuation of it,
`probe_sequence`), vLLM's prompt log-probs (raw logits, temperature 1) agree with the trainer's
log-probs of the same tokens within PROBE_TOLERANCE: catches weights that are stored but not used by
the kernels, or used in another layout (fused, repacked, tied), which only the forward sees. Nothing
here imports vLLM: the worker functions receive vLLM's worker object, the rest the engine
(`vllm.LLM`).

A policy that is not the engine's model (other names or shapes than the first sync pushed) is a
SyncError before anything is pushed (`same_model_shapes`): vLLM's reload would fail half-way on it and
leave the engine unusable, even for a correct sync afterwards.
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

from .params import SamplingError

# Log-prob probe tolerance (max |diff|, mean |diff|) by the coarser of the policy's and vLLM's dtype.
# Measured vLLM-vs-trainer differences of 16 greedy tokens (CPU): fp32 tiny and random 10M-150M
# models ~2e-6, SmolLM2-135M max 2.3e-5 / mean 1e-5; bf16 SmolLM2-135M max 0.20 / mean 0.04 (0.40 /
# 0.044 over 32-token rollouts). A missed AdamW step at lr 1e-6 moves SmolLM2's probe by max 6e-3 /
# mean 1.7e-3 in fp32 (caught) but only by bf16 noise in bf16: there the exact fingerprints decide.
# The probe scores the 27 next tokens of one sequence (11 fixed prompt ids, then 16 greedy ones of the
# first policy checked); CPU, random 10M: fp32 max 9.5e-7 as before; bf16 max 7.8e-3 / mean 1.9e-3
# (the greedy probe: 7.8e-3 / 1.5e-3). A trained model in bf16 is not yet measured on this probe.
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


def pushed_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor a sync pushes (policy_weights_for_sync), nothing computed."""
    return {name: tuple(shape) for name, shape, _ in plain_tensors(model)}


def same_model_shapes(expected: dict[str, tuple[int, ...]] | None, model: nn.Module) -> dict[str, tuple[int, ...]]:
    """pushed_shapes(model), or a SyncError before anything is pushed when `expected` (those of the
    model the engine was built for, None at the first sync) differ: vLLM's in-place reload of a tensor
    of another shape, or of one it does not have, fails half-way and leaves the engine's layers
    unusable, even for a correct sync afterwards."""
    now = pushed_shapes(model)
    if expected is None or now == expected:
        return now
    changed = [f"{n} {now[n]} (engine: {shape})" for n, shape in expected.items() if now.get(n, shape) != shape]
    missing = [n for n in expected if n not in now]
    extra = [n for n in now if n not in expected]
    found = [
        f"{what}: {names[0]}" + (f" and {len(names) - 1} more" if len(names) > 1 else "")
        for what, names in (("other shape", changed), ("missing", missing), ("unknown", extra))
        if names
    ]
    raise SyncError("the policy is not the model the vLLM engine was built for (" + "; ".join(found) + ")")


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


def fingerprints(
    named_tensors: Iterable[tuple[str, torch.Tensor]], *, read_back: bool = True
) -> tuple[list[str], torch.Tensor]:
    """(names, (n, 3) fp64): the fingerprint of every tensor, in the input order.

    A tensor's fingerprint, as an (R, C) matrix (its first dim by the rest): the sum, and the row-
    and column-index-weighted sums (which catch moved values), from its fp32 row and column sums
    (a one-ulp change of an element moves them). Tensors are consumed one at a time and only their
    (R,) and (C,) sums are kept, so a stream of merged weights never exists whole: two reductions
    per tensor, the weighted sums once per shape over the stacked sums. Nothing waits for the
    device: with read_back (default) one device-to-host copy at the end; without, the (n, 3) values
    stay on the tensors' device, still being computed, for a caller that reads several sets back
    in one copy. The same values in the same order of shapes on the same device give bitwise the
    same fingerprints.
    """
    names: list[str] = []
    slots: list[tuple[tuple, int]] = []  # per tensor: (its shape group, its row in the group)
    groups: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}  # (R, C, device) -> sums
    for name, t in named_tensors:
        m = t.detach().reshape(t.shape[0], -1) if t.dim() > 1 else t.detach().reshape(-1, 1)  # (R, C)
        key = (*m.shape, m.device)
        rows, cols = groups.setdefault(key, ([], []))
        slots.append((key, len(rows)))
        names.append(name)
        rows.append(m.sum(1, dtype=torch.float32))  # (R,)
        cols.append(m.sum(0, dtype=torch.float32))  # (C,)
    if not names:
        return names, torch.zeros(0, 3, dtype=torch.float64)
    per_group = {}
    for (R, C, device), (rows, cols) in groups.items():
        r64 = torch.stack(rows).double()  # (k, R)
        c64 = torch.stack(cols).double()  # (k, C)
        r = torch.arange(R, dtype=torch.float64, device=device)
        c = torch.arange(C, dtype=torch.float64, device=device)
        per_group[(R, C, device)] = torch.stack([r64.sum(1), (r64 * r).sum(1), (c64 * c).sum(1)], dim=1)  # (k, 3)
    device = slots[0][0][2]
    # rows back into the input order: views and one stack on the device (an index tensor would be a
    # host-to-device copy, which waits for the device)
    out = torch.stack([per_group[key][i].to(device) for key, i in slots])  # (n, 3)
    return names, out.cpu() if read_back else out


def fingerprint(t: torch.Tensor) -> torch.Tensor:
    """(3,) fp64 on the CPU: one tensor's fingerprint (`fingerprints`)."""
    return fingerprints([("", t)])[1][0]


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


def wake_engine(llm: Any, device: torch.device, tags: list[str] | None = None) -> None:
    """Wake a sleeping engine's memory (`tags`: "weights", "kv_cache"; None: all) on `device`.

    vLLM maps its memory itself (cuMemCreate), outside torch's caching allocator, so blocks that the
    trainer freed but torch keeps cached are not free to it: a colocated 1.5B full fine-tuning ran
    out of memory waking a 20 GiB KV cache at its third step with 50 GiB cached by the update. The
    cache goes back to the driver first; the update takes its blocks again from there.
    """
    if device.type == "cuda":
        torch.cuda.empty_cache()
    llm.wake_up(tags=tags)


def worker_clear_kv_cache(worker: Any) -> int:
    """Zero the KV cache memory. Wrong weights can write NaN into it, and attention reads whole
    blocks (masked slots included, 0 * NaN = NaN): without this, a correct re-sync after a failed one
    still samples NaN (measured). Returns the number of cache tensors cleared."""
    caches = [t for t in getattr(worker.model_runner, "kv_caches", None) or [] if isinstance(t, torch.Tensor)]
    for t in caches:
        t.zero_()
    return len(caches)


def worker_fingerprints(
    worker: Any, shapes: dict[str, tuple[int, ...]], read_back: bool = True
) -> tuple[list[str], torch.Tensor]:
    """(names, (n, 3) fp64): fingerprints of the worker's parameters among `shapes` that it stores as
    pushed (vocabulary padding cut off), and of the row blocks of its fused parameters (`packed_rows`)
    that hold a pushed tensor; the others are left out. read_back=False: left on the worker's device,
    not waited for (in-process only: the tensor passes by reference)."""
    model = worker.model_runner.get_model()
    params = dict(model.named_parameters())
    packed = packed_rows(params, getattr(model, "packed_modules_mapping", None) or {}, shapes)

    def stored_as_pushed() -> Iterator[tuple[str, torch.Tensor]]:
        for name, shape in shapes.items():
            if name in packed:
                yield name, packed[name]
                continue
            p = params.get(name)
            if p is None or p.numel() == 0 or p.dim() != len(shape) or tuple(p.shape[1:]) != tuple(shape[1:]):
                continue
            if p.shape[0] >= shape[0]:
                yield name, p.detach()[: shape[0]]

    return fingerprints(stored_as_pushed(), read_back=read_back)


def worker_packed_names(worker: Any, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The pushed names among `shapes` that the worker holds as row blocks of fused parameters."""
    model = worker.model_runner.get_model()
    params = dict(model.named_parameters())
    return list(packed_rows(params, getattr(model, "packed_modules_mapping", None) or {}, shapes))


def packed_rows(
    params: dict[str, torch.Tensor], mapping: dict[str, list[str]], shapes: dict[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """Pushed name -> the rows of a fused parameter that should hold it.

    vLLM stacks some projections into one parameter along the first dim, in the order its model's
    `packed_modules_mapping` lists them ({"qkv_proj": ["q_proj", "k_proj", "v_proj"], ...}): the
    pushed `...q_proj.weight` lands in rows [0, R_q) of `...qkv_proj.weight`, k_proj after it, and so
    on. Only parameters whose parts were all pushed, with matching trailing dims, and that have at
    least their rows give views; whether a view really holds the pushed bytes (and not a repacked
    layout, as on the CPU backend) is for the caller to find out: VLLMSampler keeps a name only if
    its fingerprints matched at the first sync, which the probe also checks.
    """
    out: dict[str, torch.Tensor] = {}
    for name, p in params.items():
        parts = name.split(".")
        for fused, members in mapping.items():
            if fused not in parts[:-1] or name in shapes:
                continue
            at = parts.index(fused)
            names = [".".join([*parts[:at], m, *parts[at + 1 :]]) for m in members]
            if not all(n in shapes and tuple(shapes[n][1:]) == tuple(p.shape[1:]) for n in names):
                continue
            if sum(shapes[n][0] for n in names) > p.shape[0]:
                continue
            start = 0
            for n in names:
                out[n] = p.detach()[start : start + shapes[n][0]]  # (R_n, ...) view
                start += shapes[n][0]
    return out


# ================================================================================================
# verification


def stale_tensors(llm: Any, policy: nn.Module, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> list[str]:
    """Names among `shapes` whose fingerprint in the engine differs from the policy's (sorted).

    Both sides are queued on the device before either is read (the device reduces the policy's
    tensors while the host launches the engine's; nothing waits in between), then read back in
    one copy."""
    names, ours = fingerprints(policy_weights_for_sync(policy, dtype, only=set(shapes)), read_back=False)  # (n, 3)
    their_names, theirs = llm.collective_rpc(worker_fingerprints, args=(shapes, False))[0]  # (m, 3)
    both = torch.cat([ours, theirs.to(ours.device)]).cpu()  # (n + m, 3): the one host sync
    ours, theirs = both[: len(names)], both[len(names) :]
    row = {n: i for i, n in enumerate(their_names)}
    stale = [n for n in shapes if n not in row or n not in names]
    both_sides = [(i, row[n]) for i, n in enumerate(names) if n in row]
    if both_sides:
        mine, other = (torch.tensor(x) for x in zip(*both_sides))
        same = torch.isclose(ours[mine], theirs[other], rtol=1e-9, atol=0).all(1)  # (k,)
        stale += [names[int(i)] for i in mine[~same]]
    return sorted(stale)


def fingerprintable(
    llm: Any, policy: nn.Module, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype
) -> dict[str, tuple[int, ...]]:
    """Of the names and shapes just pushed (the first sync), those the engine can fingerprint from now
    on: parameters stored as pushed, and blocks of fused parameters (`packed_rows`) that equal what
    was pushed (a block held in another layout, e.g. repacked on the CPU, never can: it is left to
    the probe). A parameter stored as pushed is kept even if it differs now: the check must fail."""
    readable, _ = llm.collective_rpc(worker_fingerprints, args=(shapes,))[0]
    blocks = set(llm.collective_rpc(worker_packed_names, args=(shapes,))[0])
    packed = {n: shapes[n] for n in readable if n in blocks}
    differing = set(stale_tensors(llm, policy, packed, dtype)) if packed else set()
    return {n: shapes[n] for n in readable if n not in differing}


def probe_sequence(policy: nn.Module, prompt: Sequence[int], continuation: int) -> list[int]:
    """`prompt` and the policy's greedy continuation of `continuation` tokens: the probe's tokens.

    Chosen once per sampler (full forwards without a cache: its cost does not matter). The greedy
    tokens are likely under the policy, the regime where PROBE_TOLERANCE was measured (greedy
    continuations); arbitrary ids alone would all be unlikely tokens, not measured in bf16.
    """
    device = next(policy.parameters()).device
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)  # (1, T)
    with _eval_mode(policy), torch.no_grad():
        for _ in range(continuation):
            last = policy.hidden(ids)[:, -1]  # (1, D)
            token = nn.functional.linear(last, policy.output_weight).argmax(-1)  # (1,)
            ids = torch.cat([ids, token[:, None]], dim=1)
    return [int(t) for t in ids[0].tolist()]


def probe_that_fits(
    prompt: Sequence[int], continuation: int, max_model_len: int, vocab_size: int
) -> tuple[list[int], int]:
    """The probe's prompt (ids checked against the vocabulary: a SamplingError) and continuation
    length, cut to an engine of `max_model_len` positions: the probe request holds its whole sequence
    and asks one token more, so the sequence has at most max_model_len - 1 tokens (the continuation
    gives way first). An engine shorter than the default probe (a tiny model, a short max_model_len)
    would otherwise fail its first sync inside vLLM."""
    prompt = [int(t) for t in prompt]
    if not all(0 <= t < vocab_size for t in prompt):
        raise SamplingError(f"probe_prompt {prompt} has ids outside the vocabulary [0, {vocab_size})")
    room = max_model_len - 1
    prompt = prompt[: max(room - 1, 1)]
    return prompt, max(0, min(int(continuation), room - len(prompt)))


def probe_logprob_diff(llm: Any, params: Any, policy: nn.Module, probe: Sequence[int]) -> tuple[float, float]:
    """Max and mean |diff| of vLLM's and the trainer's log-probs of tokens 1..T-1 of `probe` given
    their prefix: one forward on each side. `params`: vLLM SamplingParams asking for the prompt
    log-probs (`prompt_logprobs=0`, `max_tokens=1`, temperature 1): vLLM computes them as
    log_softmax of the raw logits, what `completion_logprobs` computes at temperature 1. The
    trainer's forward is queued first and read last, so the device runs it while vLLM prepares its
    request on the host."""
    ids = [int(t) for t in probe]
    device = next(policy.parameters()).device
    x = torch.tensor([ids], device=device)  # (1, T)
    with _eval_mode(policy), torch.no_grad():
        t_logp = completion_logprobs(
            policy, x, torch.ones_like(x), torch.ones(1, len(ids) - 1, dtype=torch.long, device=device)
        )[0]  # (T-1,) on the device
    out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
    scored = out.prompt_logprobs  # [None, {token: Logprob} for tokens 1..T-1]
    if scored is None or len(scored) != len(ids):
        raise RuntimeError(f"vLLM returned no prompt log-probs for the {len(ids)} probe tokens")
    v_logp = torch.tensor([scored[i][t].logprob for i, t in enumerate(ids) if i > 0], dtype=torch.float32)  # (T-1,)
    diff = (v_logp - t_logp.cpu()).abs()
    return float(diff.max()), float(diff.mean())


class ProbeSchedule:
    """Which syncs run the log-prob probe (the fingerprints check every sync).

    The fingerprints prove, every sync, that the engine holds the pushed bytes of every tensor it
    stores as pushed. The probe proves that vLLM's forward on those bytes computes the trainer's
    log-probs (layouts, fused or repacked projections, a tied head): that depends on how weights
    are loaded, the same at every sync, so the first sync proves it and later probes re-check the
    weights no fingerprint sees. Probed: the first sync; every `every`-th sync since the last
    probe (0: never again); the next sync after a failed check, and one after the engine dropped
    its weights (sleep level 2: they are re-created), whatever `every` says.
    """

    def __init__(self, every: int) -> None:
        if every < 0:
            raise ValueError(f"probe_every must be >= 0 (0 = only the first sync), got {every}")
        self.every = every
        self.unprobed = 0  # syncs since the last probe
        self.due = True  # the next sync probes (the first one; after a failure or a weight drop)

    def probe_next(self, *, weights_recreated: bool = False) -> bool:
        """Counts a sync; whether its check runs the probe."""
        self.unprobed += 1
        self.due |= weights_recreated
        return self.due or (self.every > 0 and self.unprobed >= self.every)

    def probed(self) -> None:
        """A check with the probe passed."""
        self.unprobed, self.due = 0, False

    def failed(self) -> None:
        """A check failed: the next sync probes."""
        self.due = True


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


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
    "ProbeSchedule",
    "SyncError",
    "fingerprint",
    "fingerprintable",
    "fingerprints",
    "layer_unit",
    "packed_rows",
    "policy_weights_for_sync",
    "probe_logprob_diff",
    "probe_sequence",
    "probe_that_fits",
    "probe_tolerance",
    "pushed_shapes",
    "same_model_shapes",
    "stale_tensors",
    "weight_buckets",
    "worker_clear_kv_cache",
    "worker_fingerprints",
    "worker_load",
    "worker_packed_names",
    "worker_refresh_tied_head",
]
