"""The policy loss of one update micro-batch, through the fused LM head when the loss allows it.

    loss, stats = micro_batch_loss(model, ids, attn, cmask, mask, A, opts, normalizer,
                                   old_logp=..., ref_logp=..., sampler_logp=..., temperature=...)
    loss.backward()

Two paths to the same loss, gradients and stats (tests/test_kernels_policy_head.py):
    general  logp, entropy = completion_logprobs(...); grpo.policy_loss(logp, ...)
             the LM head's backward recomputes the logits: 8NDV (kernels/logprobs.py)
    fused    the loss is a sum of per-token terms, each a function of its own log-prob, so the
             LM-head kernel computes the gradients inside its forward: 6NDV (kernels/policy_head.py)
The fused path applies when grpo.is_tokenwise says so: every loss type (grpo, bnpo, dr_grpo, dapo;
their normalisers are fixed per step), clipping (epsilon, epsilon_high, delta), beta > 0 (the k3
KL), token IS corrections, and sequence IS corrections when old_logp is given (the loop always
computes it for IS). It does not apply to importance_sampling_level "sequence" (GSPO: a row's ratio
mixes all its tokens' log-probs), which takes the general path. The objective has no entropy bonus:
the entropy is a metric, and the kernel returns it detached. The LM head is always a plain (V, D)
tensor (LoRA adapts and NF4 quantises only the blocks' linears; a tied head is the embedding
matrix, whose gradient autograd adds up); when it is frozen the kernel skips dW.

The per-token terms are grpo.py's own functions (policy_ratio, importance_weights, token_terms,
token_weights) evaluated on the selected tokens, a block at a time (`PolicyTokenLoss`); the stats
are grpo.policy_loss's, computed without gradients from the log-probs the kernel returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from minigrpo import grpo
from minigrpo.kernels import clipped_token_loss_and_grad, fused_linear_token_loss
from minigrpo.logprobs import (
    HiddenStatesModel,
    completion_logprobs,
    completion_states,
    scatter_tokens,
    scoring_temperature,
)


@dataclass(frozen=True)
class PolicyTokenLoss:
    """grpo's policy loss of one micro-batch as per-token terms over its n selected tokens.

    Called by the fused kernel as (logp (r,), start, stop) -> (r,) weighted losses of the selected
    tokens [start, stop) (row-major order); their sum over all n tokens is policy_loss's loss.
    """

    opts: grpo.LossOptions
    weight: Tensor  # (n,) fp32 token_weights: the mask over the step's normaliser
    advantages: Tensor  # (n,) fp32 the row's advantage at each token
    old_logp: Tensor | None  # (n,) None: on-policy, old = logp.detach() (ratio 1, gradient A)
    ref_logp: Tensor | None  # (n,) only when beta != 0
    is_weight: Tensor | None  # (n,) IS weights fixed before the pass (old_logp given)
    sampler_logp: Tensor | None  # (n,) token IS weights made per block from logp (old_logp None)

    def __call__(self, logp: Tensor, start: int, stop: int) -> Tensor:
        o, sl = self.opts, slice(start, stop)
        old = logp.detach() if self.old_logp is None else self.old_logp[sl]
        ratio = grpo.policy_ratio(logp, old)  # (r,)
        w = self._is_weights(logp, sl)
        ref = None if self.ref_logp is None else self.ref_logp[sl]
        loss, _, _ = grpo.token_terms(ratio, self.advantages[sl], o, is_weight=w, logp=logp, ref_logp=ref)
        return loss * self.weight[sl]  # (r,)

    def value_and_grad(self, logp: Tensor, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """(losses (r,), d losses / d logp (r,)) of __call__, in closed form (one kernel, no autograd)."""
        o, sl = self.opts, slice(start, stop)
        w = self._is_weights(logp, sl)
        return clipped_token_loss_and_grad(
            logp,
            self.advantages[sl],
            self.weight[sl],
            epsilon=o.epsilon,
            epsilon_high=o.epsilon_high,
            delta=o.delta,
            log_ratio_clamp=grpo.LOG_RATIO_CLAMP,
            old_logp=None if self.old_logp is None else self.old_logp[sl],
            is_weight=w,
            ref_logp=None if self.ref_logp is None else self.ref_logp[sl],
            beta=o.beta,
        )

    def _is_weights(self, logp: Tensor, sl: slice) -> Tensor | None:
        """(r,) IS weights of the tokens in sl: fixed before the pass, or made per block from the
        log-probs (on-policy: old = logp) against the sampler's; None without IS correction."""
        if self.sampler_logp is None:
            return None if self.is_weight is None else self.is_weight[sl]
        o = self.opts
        every = torch.ones_like(logp)
        w, _ = grpo.importance_weights(
            logp.detach(), self.sampler_logp[sl], every, o.is_correction, cap=o.is_cap, floor=o.is_min
        )
        return w


def policy_token_loss(
    select: Tensor,
    mask: Tensor,
    advantages: Tensor,
    opts: grpo.LossOptions,
    normalizer: grpo.LossNormalizer,
    *,
    old_logp: Tensor | None = None,
    ref_logp: Tensor | None = None,
    sampler_logp: Tensor | None = None,
) -> PolicyTokenLoss:
    """The PolicyTokenLoss of the tokens `select` (N, Tc) bool picks; other inputs as policy_loss's.

    Inputs are checked as policy_loss checks them: beta != 0 without ref_logp, or an IS correction
    without sampler_logp, is an error (not a loss without its KL term or its IS weights).
    """
    if not grpo.is_tokenwise(opts, old_logp_given=old_logp is not None):
        raise ValueError("this loss is not a sum of per-token terms (sequence-level ratio or IS weights)")
    normalizer = grpo.check_loss_inputs(mask, opts, normalizer, ref_logp=ref_logp, sampler_logp=sampler_logp)
    m = mask.to(torch.float32)  # (N, Tc)
    assert select.shape == m.shape and advantages.shape == m.shape[:1], (select.shape, m.shape, advantages.shape)
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp), ("sampler_logp", sampler_logp)):
        if t is not None and t.shape != m.shape:
            raise ValueError(f"{name} must be (N, Tc) = {tuple(m.shape)} like the mask, got {tuple(t.shape)}")
    is_weight = sampler = None
    if opts.is_correction is not None and old_logp is not None:
        w, _ = grpo.importance_weights(
            old_logp, sampler_logp, m, opts.is_correction, cap=opts.is_cap, floor=opts.is_min
        )
        is_weight = w.expand_as(m)[select]  # (n,) token or sequence weights
    elif opts.is_correction is not None:
        sampler = sampler_logp.detach()[select]
    return PolicyTokenLoss(
        opts=opts,
        weight=grpo.token_weights(m, normalizer)[select],
        advantages=advantages.detach().to(torch.float32)[:, None].expand_as(m)[select],
        old_logp=None if old_logp is None else old_logp.detach()[select],
        ref_logp=ref_logp.detach()[select] if ref_logp is not None and opts.beta != 0.0 else None,
        is_weight=is_weight,
        sampler_logp=sampler,
    )


def micro_batch_loss(
    model: HiddenStatesModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    mask: Tensor,
    advantages: Tensor,
    opts: grpo.LossOptions,
    normalizer: grpo.LossNormalizer,
    *,
    old_logp: Tensor | None = None,
    ref_logp: Tensor | None = None,
    sampler_logp: Tensor | None = None,
    temperature: float = 1.0,
    fused: bool | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """(loss, stats) of grpo.policy_loss on the micro-batch's completions under model.

    Args:
        input_ids, attention_mask: (N, Tp + Tc) prompts and completions (see completion_logprobs).
        completion_mask: (N, Tc) the completion tokens; mask: (N, Tc) the loss mask (grpo.loss_mask).
        advantages, opts, normalizer, old_logp, ref_logp, sampler_logp: as grpo.policy_loss's.
        temperature: the sampling temperature (0, greedy, scores at 1).
        fused: True forces the fused LM head (an error where the loss does not allow it), False the
            general path; None takes the fused one whenever grpo.is_tokenwise allows it and the head
            is not fp64 (the fused per-token terms run in fp32; an fp64 model keeps fp64 throughout).
    """
    temperature = scoring_temperature(temperature)  # before any compute: a bad one fails at once
    if fused is None:
        tokenwise = grpo.is_tokenwise(opts, old_logp_given=old_logp is not None)
        fused = tokenwise and model.output_weight.dtype != torch.float64
    loss_args = dict(normalizer=normalizer, ref_logp=ref_logp, sampler_logp=sampler_logp)
    if not fused:
        logp, entropy = completion_logprobs(
            model, input_ids, attention_mask, completion_mask, temperature=temperature, return_entropy=True
        )  # (N, Tc) each
        return grpo.policy_loss(logp, old_logp, advantages, mask, opts, **loss_args, entropy=entropy.detach())
    select = completion_mask.bool() & (mask > 0)  # (N, Tc): tokens outside the loss mask pass no gradient
    token_loss = policy_token_loss(  # checks the loss inputs before the forward
        select, mask, advantages, opts, normalizer, old_logp=old_logp, ref_logp=ref_logp, sampler_logp=sampler_logp
    )
    states, targets = completion_states(model, input_ids, attention_mask, select)  # (n, D), (n,)
    loss, logp, entropy = fused_linear_token_loss(
        states,
        model.output_weight,
        targets,
        token_loss,
        temperature=temperature,
        return_entropy=True,
    )
    logp, entropy = scatter_tokens(select, logp), scatter_tokens(select, entropy)  # (N, Tc)
    with torch.no_grad():
        _, stats = grpo.policy_loss(logp, old_logp, advantages, mask, opts, **loss_args, entropy=entropy)
    return loss, stats
