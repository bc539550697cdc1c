"""Optimizers and learning-rate schedules.

Why master weights: an AdamW step on bf16 parameters rounds every update to 8 bits of mantissa, so
at RL learning rates (1e-6 relative to weights around 1e-2) most updates round to nothing. When the
trainable parameters are 16-bit, `MasterWeights` keeps an fp32 copy for the optimizer: gradients
are copied up, the step runs in fp32, and the result is copied back down. The model still computes
in bf16. fp32 parameters (CPU runs, LoRA adapters) are stepped directly.

Where the masters start matters as much. A master equal to its bf16 copy sits in the middle of its
rounding interval, so the copy changes only once the master has moved half a bf16 step (6e-5 for a
weight near 0.03: six AdamW steps at lr 1e-5 that all push the same way; sixty at lr 1e-6): the
policy the sampler draws from stands still for the first steps of a run. So a master starts from
the checkpoint's own fp32 values where it has more precision than bf16 (`start`, read by
build.load_policy), and otherwise (a bf16 checkpoint, a random init) from a point drawn uniformly in
the interval that rounds to its weight (`dithered`): the model is unchanged, and from the first step
its bf16 copy follows the master as fp32 weights would move (autocast does not: a bf16 checkpoint
loaded in fp32 sits on the grid the same way).

The step goes a bucket of tensors at a time (`step_buckets`): each 16-bit gradient is freed as its
fp32 copy is made, and the copies live only through their bucket's step. The fp32 gradients of the
whole model (4 bytes a parameter: 6 GB at 1.5B) never exist at once; a step's peak is the weights,
masters, optimizer state and bf16 gradients, plus one bucket.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from minigrpo.config import TrainCfg
from minigrpo.errors import ConfigError, UserError

STEP_BUCKET_BYTES = 256 * 2**20  # fp32 gradients alive at once in a MasterWeights step


def step_buckets(numels: Sequence[int], bucket_bytes: int = STEP_BUCKET_BYTES) -> list[list[int]]:
    """Indices of consecutive tensors, grouped so that each group's fp32 copies fit in bucket_bytes
    (a tensor larger than that is a group of its own)."""
    buckets: list[list[int]] = []
    size = 0
    for i, n in enumerate(numels):
        if not buckets or size + 4 * n > bucket_bytes:  # the first tensor opens one, even an empty tensor
            buckets.append([])
            size = 0
        buckets[-1].append(i)
        size += 4 * n
    return buckets


class MasterWeights(torch.optim.Optimizer):
    """Wraps an optimizer that steps fp32 copies of low-precision parameters, a bucket at a time."""

    def __init__(
        self,
        params: list[nn.Parameter],
        make_inner,
        bucket_bytes: int = STEP_BUCKET_BYTES,
        start: Mapping[nn.Parameter, torch.Tensor] | None = None,
    ) -> None:
        """start: fp32 values to begin from (the checkpoint's), for any of params; the other 16-bit
        ones start dithered in their rounding intervals, fp32 ones from their own values."""
        self.params = params
        start = start or {}
        generator = torch.Generator(params[0].device).manual_seed(0) if params else None  # fixed: reproducible
        self.masters = [_master(p, start.get(p), generator) for p in params]
        self.inner: torch.optim.Optimizer = make_inner(self.masters)
        self.buckets = step_buckets([p.numel() for p in params], bucket_bytes)

    # the inner optimizer's, looked up each time so LR schedulers act on it: its load_state_dict (a
    # resume) replaces param_groups and state with new objects, which a copy taken here would miss
    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    @property
    def defaults(self) -> dict:
        return self.inner.defaults

    @property
    def state(self):
        return self.inner.state

    def step(self, closure=None, grad_factor: float = 1.0):
        """One step of every master that has a gradient, copied down to its parameter. A closure is
        called first (with gradients enabled, as torch's optimizers do) and its loss returned.
        grad_factor multiplies the fp32 copies of the gradients (a loss scale divided out, a clip):
        in float16 the gradients themselves could not hold the unscaled values."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step_buckets(grad_factor)
        return loss

    @torch.no_grad()
    def _step_buckets(self, grad_factor: float) -> None:
        # the inner optimizer steps exactly the masters that have a gradient: one bucket per call
        for bucket in self.buckets:
            for i in bucket:
                p, m = self.params[i], self.masters[i]
                m.grad = None if p.grad is None else _fp32_copy(p.grad, grad_factor)
                p.grad = None  # its fp32 copy carries it now
            self.inner.step()
            for i in bucket:
                self.params[i].copy_(self.masters[i])
                self.masters[i].grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
        self.inner.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(), "masters": [m.detach().cpu() for m in self.masters]}

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict`; masters of another count or shape are refused before anything
        loads (a copy would broadcast a smaller one into the weights)."""
        difference = _masters_difference(state["masters"], self.masters)
        if difference:
            raise ValueError(f"the optimizer state is for other parameters: {difference}")
        self.inner.load_state_dict(state["inner"])
        with torch.no_grad():
            for p, m, saved in zip(self.params, self.masters, state["masters"]):
                m.copy_(saved)
                p.copy_(saved)


def _masters_difference(saved: Sequence[torch.Tensor], masters: Sequence[torch.Tensor]) -> str | None:
    """How saved masters differ in count or shape from these; None if they match."""
    if len(saved) != len(masters):
        return f"{len(saved)} masters saved, {len(masters)} parameters here"
    for i, (a, b) in enumerate(zip(saved, masters)):
        if a.shape != b.shape:
            return f"master {i} is {tuple(a.shape)} saved, {tuple(b.shape)} here"
    return None


def _master(p: nn.Parameter, start: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """p's fp32 master: `start` (the checkpoint's values, which round to p) if given, else for a 16-bit
    p a point dithered in each weight's rounding interval, else p's own values."""
    if start is not None:
        assert start.dtype == torch.float32 and start.shape == p.shape, f"master {tuple(start.shape)} of {p.shape}"
        return start.detach().to(p.device).requires_grad_(True)
    if p.dtype in (torch.bfloat16, torch.float16):
        return dithered(p.detach(), generator).requires_grad_(True)
    return p.detach().float().clone().requires_grad_(True)


def dither_onto_masters(params: Iterable[nn.Parameter], dtype: torch.dtype) -> int:
    """fp32 parameters that are the masters themselves (FSDP's): each tensor whose values all lie on
    the `dtype` grid (a 16-bit checkpoint) is moved to dithered points that round back to it, as
    MasterWeights starts its own. Returns how many tensors moved. Reproducible (a fixed seed), so
    every rank moves its copy alike."""
    generator, moved = None, 0
    with torch.no_grad():
        for p in params:
            low = p.to(dtype)
            if p.dtype != torch.float32 or not torch.equal(low.float(), p):
                continue
            generator = generator or torch.Generator(p.device).manual_seed(0)
            p.copy_(dithered(low, generator))
            moved += 1
    return moved


def dithered(w: torch.Tensor, generator: torch.Generator, chunk: int = 1 << 24) -> torch.Tensor:
    """fp32 values drawn uniformly from the open interval of reals that round to each element of the
    16-bit w (between the midpoints to its neighbours, clear of them), so they round back to w
    exactly; `chunk` elements at a time, which bounds the temporaries."""
    out = torch.empty(w.shape, dtype=torch.float32, device=w.device)
    for src, dst in zip(w.reshape(-1).split(chunk), out.view(-1).split(chunk)):
        inf = torch.full_like(src, float("inf"))
        v = src.float()
        lo = (torch.nextafter(src, -inf).float() + v) / 2  # (n,) the ties on either side
        hi = (torch.nextafter(src, inf).float() + v) / 2
        u = torch.rand(src.shape, generator=generator, device=src.device) * 0.998 + 0.001
        point = lo + (hi - lo) * u
        dst.copy_(torch.where(torch.isfinite(point), point, v))  # the largest finite value keeps its own
    return out


def _fp32_copy(grad: torch.Tensor, factor: float) -> torch.Tensor:
    """grad in fp32 times factor, a new tensor (an fp32 gradient is not changed in place)."""
    return grad.float() * factor if factor != 1.0 else grad.float()


def build_optimizer(
    params: Iterable[nn.Parameter], cfg: TrainCfg, *, masters: Mapping[nn.Parameter, torch.Tensor] | None = None
) -> torch.optim.Optimizer:
    """AdamW (torch), or bitsandbytes' 8-bit AdamW (paged or not) on CUDA, over trainable params,
    decaying the matrices only (decay_groups). masters: full-precision starting values of 16-bit
    params (build.load_policy's), by parameter."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters")
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.optimizer in ("adamw8bit", "paged_adamw8bit"):
        if not params[0].is_cuda:
            raise ConfigError(f"train.optimizer={cfg.optimizer} needs CUDA (bitsandbytes); use adamw on CPU")
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise UserError(
                f"train.optimizer={cfg.optimizer} needs bitsandbytes, which cannot be imported ({e}): "
                "pip install 'minigrpo[qlora]'"
            ) from e
        cls = bnb.optim.PagedAdamW8bit if cfg.optimizer == "paged_adamw8bit" else bnb.optim.AdamW8bit

        def make(ps):
            return cls(decay_groups(ps, cfg.weight_decay), **kwargs)
    else:
        # on CUDA one fused kernel per step for all tensors (foreach launches several per group)
        impl = {"fused": True} if params[0].is_cuda else {"foreach": True}

        def make(ps):
            return torch.optim.AdamW(decay_groups(ps, cfg.weight_decay), **impl, **kwargs)

    if any(p.dtype in (torch.bfloat16, torch.float16) for p in params):
        return MasterWeights(params, make, start=masters)
    return make(params)


def decay_groups(params: Sequence[torch.Tensor], weight_decay: float) -> list[dict]:
    """Parameter groups for AdamW: `weight_decay` on matrices (ndim >= 2: projections, embeddings,
    the LM head, LoRA factors) and none on vectors (biases, RMSNorm gains), which a decay would pull
    towards 0 (a gain of 0 silences its layer): the split HF Trainer and TRL make. Without decay (the
    default) one group in the parameters' order, as checkpoints saved before the split hold it (a
    resume keeps train.weight_decay, so the layout a run saved is the one it resumes); empty groups
    are left out."""
    if weight_decay == 0:
        return [{"params": list(params), "weight_decay": 0.0}]
    matrices = [p for p in params if p.dim() >= 2]
    vectors = [p for p in params if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def lr_factor(step: int, cfg: TrainCfg, total_steps: int, updates_per_step: int = 1) -> float:
    """Multiplier of cfg.lr after `step` optimizer steps (of total_steps): linear warmup, then
    constant/linear/cosine. cfg.warmup_steps counts training steps, as cfg.steps does, each of
    `updates_per_step` optimizer steps (GRPO's num_iterations), so a warmup lasts the same share
    of a run whatever the number of updates per step. The warmup gives update k of W the factor
    (k + 1) / W (transformers' k / W spends the first update at lr 0); after it the factor is
    transformers' get_{constant,linear,cosine}_schedule_with_warmup's, lifted to end at min_lr_ratio
    (cosine: as get_cosine_with_min_lr_schedule_with_warmup's min_lr_rate), and stays there past
    total_steps."""
    warmup = cfg.warmup_steps * updates_per_step
    if warmup and step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    span = total_steps - warmup  # none: a run all warmup ends at the floor, not back at the peak
    progress = 1.0 if span <= 0 else min(max(step - warmup, 0) / span, 1.0)
    shape = 1.0 - progress if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


class Schedule(torch.optim.lr_scheduler.LambdaLR):
    """torch's LambdaLR, whose restored position also sets the rate of the next step from this run's
    schedule. A resume loads the optimizer state first, and with it the rate the saved run's schedule
    gave its next step; when train.steps changed on resume (the one schedule setting a resume may change)
    that rate belongs to the schedule of the old length (a linear decay's end: 0), and LambdaLR's own
    load_state_dict would let the first resumed step take it. Extending a run means a decay that spans
    the new length, so the rates follow this run's schedule, and `saved_rates` keeps the saved one's
    for the note a resume prints (resumed_rate_note). The state_dict is LambdaLR's."""

    saved_rates: list[float] | None = None  # the saved schedule's rates of the next step, once restored

    def state_dict(self) -> dict:
        return {k: v for k, v in super().state_dict().items() if k != "saved_rates"}  # LambdaLR's, as it was

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        rates = [base * factor(self.last_epoch) for base, factor in zip(self.base_lrs, self.lr_lambdas)]
        saved = state_dict.get("_last_lr")  # absent from a state written by hand
        self.saved_rates = [float(r) for r in saved] if isinstance(saved, (list, tuple)) else None
        for group, lr in zip(self.optimizer.param_groups, rates):
            group["lr"] = lr
        self._last_lr = rates


def resumed_rate_note(
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: TrainCfg,
    step: int,
    critic_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> str | None:
    """One line for a resume after checkpoint `step` whose first update runs at another learning rate than
    the saved run's schedule gave it: train.steps changed, so a linear or cosine decay now spans the new
    length (a jump at the resume step, up when a run is extended). `critic_scheduler`, PPO's critic's own
    schedule (at ppo.value_lr) over the same length, jumps too: the line names both rates. None when the
    rates agree (a constant schedule, an unchanged length) or the saved rate is unknown."""
    parts = []
    policy, critic = rate_jump(scheduler), rate_jump(critic_scheduler)
    if policy is not None:
        lr, saved = policy
        then = "the schedule the checkpoint was saved with"
        parts.append(f"step {step + 1} runs at lr {lr:.6g}, where {then} gave {saved:.6g}")
    if critic is not None:
        lr, saved = critic
        parts.append(f"PPO's critic's step {step + 1} runs at lr {lr:.6g}, where its saved schedule gave {saved:.6g}")
    if not parts:
        return None
    return f"note: the {cfg.schedule} learning-rate schedule now spans train.steps={cfg.steps}: {'; '.join(parts)}"


def rate_jump(scheduler: torch.optim.lr_scheduler.LRScheduler | None) -> tuple[float, float] | None:
    """(The rate of the next step, the rate the saved schedule gave it) of a restored Schedule whose two
    differ; None when they agree, the saved rate is unknown, or there is no scheduler."""
    saved = getattr(scheduler, "saved_rates", None)
    if scheduler is None or not saved:
        return None
    saved_lr, lr = saved[0], scheduler.get_last_lr()[0]
    if math.isclose(saved_lr, lr, rel_tol=1e-9, abs_tol=1e-30):
        return None
    return lr, saved_lr


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainCfg, total_steps: int, updates_per_step: int = 1
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over `total_steps` optimizer steps (cfg.steps x updates_per_step; see lr_factor)."""
    return Schedule(optimizer, lambda s: lr_factor(s, cfg, total_steps, updates_per_step))
