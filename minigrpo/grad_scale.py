"""Float16 loss scaling, and what an update does with a gradient that is not finite.

Why: float16 keeps 5 exponent bits, so a gradient below 6e-8 rounds to zero and one above 65504
overflows. A GRPO loss is a mean over thousands of tokens, so most of its per-token gradients sit
far below 1 and a good share of them vanish in float16 backward passes (activations' gradients
included, not only the weights'). A dynamic loss scale S multiplies the loss before backward, so
every gradient on the way is S times larger, and divides the gradients by S before the optimizer
sees them. S starts large (2^16); an update whose gradients overflow (a non-finite global norm) is
skipped and S halves; after `growth_interval` finite updates in a row S doubles again. bfloat16 and
float32 have float32's exponent range and need no scale (S stays 1).

A non-finite gradient is never stepped, whatever the dtype: a NaN or inf would turn every weight it
reaches into NaN and the run into noise. Such an update is skipped and counted (`skipped_updates`);
after MAX_SKIPS_IN_A_ROW of them in a row the run stops with a one-line error (the loss diverged, or
the model produces NaN: lowering train.lr or finding the NaN is the user's move, not more steps).

The scale, the streak of finite updates and the counts are part of a checkpoint (`state_dict`), so
a resumed float16 run continues bit for bit.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import torch

from minigrpo.distributed import (
    World,
    all_reduce_gradients,
    clip_factor,
    global_grad_norm,
    is_sharded,
    scale_gradients,
)
from minigrpo.errors import UserError
from minigrpo.optim import MasterWeights

MAX_SKIPS_IN_A_ROW = 20  # float16 from 2^16 reaches its working scale in a handful of skips


class DivergedError(UserError):
    """Every update of a stretch of the run had non-finite gradients."""


@dataclass
class GradScale:
    """The loss scale of a run and its bookkeeping of skipped updates.

    enabled: False (bfloat16, float32): the scale stays 1 and only non-finite updates are skipped.
    """

    enabled: bool = False
    scale: float = 2.0**16
    growth_interval: int = 2000  # finite updates in a row before the scale doubles
    finite_in_a_row: int = 0
    skips_in_a_row: int = 0
    skipped_updates: int = 0

    def __post_init__(self) -> None:
        if not self.enabled:
            self.scale = 1.0

    @classmethod
    def for_dtype(cls, dtype: torch.dtype) -> GradScale:
        """A dynamic scale for float16, none otherwise."""
        return cls(enabled=dtype == torch.float16)

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call backward on: S times the loss (the loss itself when S is 1)."""
        return loss * self.scale if self.scale != 1.0 else loss

    def record(self, grad_norm: float, model: str = "the policy", lr_key: str = "train.lr") -> bool:
        """Book one update whose scaled gradients have global norm `grad_norm`; True if it may step.

        Raises DivergedError after MAX_SKIPS_IN_A_ROW non-finite updates in a row, naming the `model`
        and the learning-rate key (`lr_key`) that steps it.
        """
        if math.isfinite(grad_norm):
            self.skips_in_a_row = 0
            self.finite_in_a_row += 1
            if self.enabled and self.finite_in_a_row >= self.growth_interval:
                self.scale *= 2.0
                self.finite_in_a_row = 0
            return True
        self.finite_in_a_row = 0
        self.skips_in_a_row += 1
        self.skipped_updates += 1
        if self.enabled:
            self.scale = max(self.scale / 2.0, 2.0**-24)
        if self.skips_in_a_row >= MAX_SKIPS_IN_A_ROW:
            raise DivergedError(
                f"the last {self.skips_in_a_row} updates of {model} all had non-finite gradients (skipped); the "
                f"loss or the model diverged: lower {lr_key} or train.max_grad_norm, or look for NaN in the inputs"
            )
        return False

    def state_dict(self) -> dict[str, float | int | bool]:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict` (a checkpoint's). The scale and its streak of finite updates carry over
        only between float16 runs: a run in another dtype keeps its own scale (1, or a fresh 2^16 that
        grows after growth_interval finite updates of its own, not of a bfloat16 run's count)."""
        unknown = set(state) - set(asdict(self))
        if unknown:
            raise ValueError(f"unknown grad scale state keys {sorted(unknown)}")
        _check_saved_state(state)
        for key in ("growth_interval", "skips_in_a_row", "skipped_updates"):
            if key in state:
                setattr(self, key, int(state[key]))
        if self.enabled and state.get("enabled"):
            self.scale = float(state.get("scale", self.scale))
            self.finite_in_a_row = int(state.get("finite_in_a_row", self.finite_in_a_row))


def _check_saved_state(state: dict) -> None:
    """ValueError naming the first saved value no run could have written: a scale that is not a
    positive finite number (every loss would be NaN or 0), a growth interval below 1 (the scale would
    double on every update), a negative count."""
    scale = state.get("scale", 1.0)
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"grad scale state: scale={scale!r} is not a positive finite number")
    lows = {"growth_interval": 1, "finite_in_a_row": 0, "skips_in_a_row": 0, "skipped_updates": 0}
    for key, low in lows.items():
        value = state.get(key, low)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"grad scale state: {key}={value!r} is not an integer >= {low}")


def optimizer_step(
    cfg, model, optimizer, scheduler, world: World, grad_scale: GradScale | None = None, *, critic: bool = False
) -> tuple[float, float]:
    """The end of every update, after the last backward: reduce replicated gradients over the ranks,
    unscale and clip the global norm (train.max_grad_norm), step the optimizer and the schedule,
    zero the gradients. Returns (the gradient norm before clipping, the learning rate this step used).
    critic: the model is PPO's critic (a divergence names it and ppo.value_lr).

    An update whose gradient norm is not finite (a float16 overflow, a NaN) is skipped: no optimizer
    step, the loss scale halves (grad_scale's rules); the schedule still advances, so the learning
    rate stays a function of the step.
    """
    grad_scale = grad_scale or GradScale()
    # listed after backward: FSDP2 swaps unsharded parameters in and out (the root stays
    # unsharded after a no-grad forward), so a list made earlier may hold the wrong objects
    params = [p for p in model.parameters() if p.requires_grad]
    if world.distributed and not is_sharded(model):
        all_reduce_gradients(params, world)
    grad_norm = global_grad_norm(params, grad_scale.scale)  # the same on every rank
    lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
    named = ("PPO's critic", "ppo.value_lr") if critic else ("the policy", "train.lr")  # for a divergence
    stepped = grad_scale.record(grad_norm, *named)  # every rank decides alike: the norm is the same on all
    if stepped:
        factor = clip_factor(grad_norm, cfg.train.max_grad_norm or math.inf) / grad_scale.scale
        if isinstance(optimizer, MasterWeights):
            optimizer.step(grad_factor=factor)  # on the fp32 copies: a float16 gradient unscaled in place underflows
        else:
            scale_gradients(params, factor)
            optimizer.step()
    with warnings.catch_warnings():
        if not stepped:  # torch warns of a schedule stepped before its optimizer: here on purpose
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr


def grad_scale_metrics(grad_scale: GradScale) -> dict[str, float]:
    """skipped_updates (so far in the run; 0 until one is skipped, so every step logs the same keys) and,
    when a loss scale is used (float16), loss_scale."""
    out = {"skipped_updates": float(grad_scale.skipped_updates)}
    return {**out, "loss_scale": grad_scale.scale} if grad_scale.enabled else out
