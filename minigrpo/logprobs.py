"""Per-token log-probs of completions under a model, through the chunked LM-head kernel.

The trainer's policy, old and reference log-probs all come from here, with the sampler's semantics:
`log_softmax(logits / temperature)[token]` in fp32. The (N, Tc, V) logits never exist: only the
hidden states of active completion tokens go through `fused_linear_logprobs`, which works on
chunks of tokens and vocabulary.
"""

from __future__ import annotations

from typing import Protocol

import torch

from minigrpo.kernels import fused_linear_logprobs


class HiddenStatesModel(Protocol):
    """What completion_logprobs needs of a model (minigrpo.models.Transformer is one): the final-norm
    hidden states and the LM head matrix, so the logits can be computed chunk by chunk."""

    @property
    def output_weight(self) -> torch.Tensor:
        """(V, D) LM head matrix."""
        ...

    def hidden(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(N, T) token ids -> (N, T, D) final-norm hidden states."""
        ...


def completion_logprobs(
    model: HiddenStatesModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (N, Tc) fp32 (fp64 for an fp64 model) of the completion tokens (the last Tc columns of input_ids).

    Args:
        input_ids: (N, Tp + Tc) prompts (left-padded as samplers give them; right-padded ones score
            the same) followed by right-padded completions.
        attention_mask: (N, Tp + Tc) 1 on real tokens.
        completion_mask: (N, Tc) 1 on the completion tokens to score; others get 0 (no compute).
        temperature: the sampling temperature (0, greedy, scores at 1).
        return_entropy: also return the per-token entropy (N, Tc) in the log-probs' dtype (0 on inactive tokens).
    """
    active = completion_mask.bool()  # (N, Tc)
    states, targets = completion_states(model, input_ids, attention_mask, active)  # (n, D), (n,)
    out = fused_linear_logprobs(
        states,
        model.output_weight,
        targets,
        temperature=scoring_temperature(temperature),
        return_entropy=return_entropy,
    )
    logp, entropy = out if return_entropy else (out, None)
    logp = scatter_tokens(active, logp)  # (N, Tc)
    return logp if entropy is None else (logp, scatter_tokens(active, entropy))


def scoring_temperature(temperature: float) -> float:
    """The temperature tokens are scored at: 1 for greedy sampling (0), else the sampling temperature.

    Only 0 means greedy: a negative or NaN temperature is a mistake, refused here rather than scored
    at 1 as if it were greedy (the kernels refuse the rest: too large, infinite).
    """
    if temperature == 0:
        return 1.0
    if not temperature > 0:
        raise ValueError(f"temperature must be 0 (greedy, scored at 1) or positive, got {temperature}")
    return float(temperature)


def scatter_tokens(select: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(N, Tc) zeros with the (n,) values of the selected tokens put in row-major order.

    In the values' dtype, at least fp32: the kernels return fp64 for an fp64 model, and a fixed fp32
    buffer would refuse them (masked_scatter needs one dtype) or round away what fp64 is for.
    """
    dtype = torch.promote_types(values.dtype, torch.float32)
    out = torch.zeros(select.shape, dtype=dtype, device=select.device)  # (N, Tc)
    return out.masked_scatter(select, values.to(dtype))


def completion_states(
    model: HiddenStatesModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, select: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states (n, D) that predict the selected completion tokens, and those tokens (n,).

    select: (N, Tc) bool over the last Tc columns of input_ids (N, Tp + Tc); n = select.sum(), in
    row-major order. Only these rows of the hidden states go through the LM head.

    A token is predicted by the last real (attention mask 1) token before it: with left-padded
    prompts that is the column just before, and with a right-padded prompt (pads between the prompt
    and its completion) completion token 0 is predicted by the prompt's last token, not by a pad.
    """
    N, T = input_ids.shape
    Tc = select.shape[1]
    assert select.shape == (N, Tc) and attention_mask.shape == (N, T) and Tc < T
    hidden = model.hidden(input_ids, attention_mask=attention_mask)  # (N, T, D)
    rows, t = select.nonzero(as_tuple=True)  # (n,) each, row-major
    columns = predicting_columns(attention_mask, Tc)[rows, t]  # (n,)
    return hidden[rows, columns], input_ids[:, T - Tc :][select]


def predicting_columns(attention_mask: torch.Tensor, Tc: int) -> torch.Tensor:
    """(N, Tc) long: the column of the last real token before each of the last Tc columns of
    attention_mask (N, T), i.e. the hidden state that predicts that completion token (0 where no real
    token comes before it: a row without a prompt)."""
    N, T = attention_mask.shape
    columns = torch.arange(T, device=attention_mask.device).expand(N, T)  # (N, T)
    last_real = torch.where(attention_mask.bool(), columns, -1).cummax(-1).values  # (N, T): at or before
    return last_real[:, T - Tc - 1 : T - 1].clamp(min=0)  # (N, Tc): strictly before each completion column
