"""Rollout: what a sampler returns, in the layout the trainer consumes.

N = B * G sequences; completions of prompt b are rows [b*G, (b+1)*G). Prompts are LEFT padded to
Tp and completions RIGHT padded to Tc, so `input_ids = cat(prompt_ids, completion_ids)` puts every
completion's first token at column Tp, and the hidden state at column Tp - 1 + t predicts
completion token t for every row.

`loss_mask` says which completion tokens are the model's own: in a multi-turn episode
(minigrpo/episodes.py) the completion interleaves the model's turns with the environment's tokens
(tool results, replies), which are context only (attention mask 1, loss mask 0). A single-turn
rollout leaves it None and it becomes `completion_mask`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # (N, Tp) long, left padded
    prompt_mask: torch.Tensor  # (N, Tp) long, 1 on real prompt tokens
    completion_ids: torch.Tensor  # (N, Tc) long, right padded
    completion_mask: torch.Tensor  # (N, Tc) long, 1 up to and including the stop token
    sampler_logp: torch.Tensor  # (N, Tc) fp32: log_softmax(logits / T)[token] at sampling time, 0 on padding
    truncated: torch.Tensor  # (N,) bool: ended at max_new_tokens without a stop token or string
    completion_texts: list[str]  # decoded completions (special tokens removed)
    prompt_index: torch.Tensor  # (N,) long: which input prompt each row answers
    group_size: int  # G
    stats: dict[str, float] = field(default_factory=dict)  # timings, token counts
    loss_mask: torch.Tensor | None = None  # (N, Tc) long, 1 on the model's tokens; None: completion_mask

    def __post_init__(self) -> None:
        if self.loss_mask is None:
            self.loss_mask = self.completion_mask
        N, Tc = self.completion_ids.shape
        assert self.prompt_ids.shape[0] == N and self.prompt_mask.shape == self.prompt_ids.shape
        assert self.completion_mask.shape == (N, Tc) and self.sampler_logp.shape == (N, Tc)
        assert self.truncated.shape == (N,) and len(self.completion_texts) == N
        assert self.loss_mask.shape == (N, Tc)

    @property
    def num_sequences(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def completion_lengths(self) -> torch.Tensor:
        """(N,) long: tokens per completion (stop token included)."""
        return self.completion_mask.sum(-1)

    def input_ids(self) -> torch.Tensor:
        """(N, Tp + Tc): prompt and completion, the trainer's forward input."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    def attention_mask(self) -> torch.Tensor:
        """(N, Tp + Tc): 1 on every real token of prompt and completion."""
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    def select(self, rows: torch.Tensor | list[int] | list[bool]) -> Rollout:
        """A rollout of the given rows (e.g. whole groups kept by dynamic sampling): row indices, or a
        bool mask (N,) of the rows to keep (read as a mask, not as the indices 0 and 1)."""
        idx = torch.as_tensor(rows).cpu()
        if idx.dtype == torch.bool:
            if idx.shape != (self.num_sequences,):
                raise ValueError(f"a bool mask of rows must have shape ({self.num_sequences},), got {tuple(idx.shape)}")
            idx = idx.nonzero().flatten()  # (n,)
        idx = idx.to(torch.long)
        cpu = idx.tolist()
        return Rollout(
            prompt_ids=self.prompt_ids[idx.to(self.prompt_ids.device)],
            prompt_mask=self.prompt_mask[idx.to(self.prompt_mask.device)],
            completion_ids=self.completion_ids[idx.to(self.completion_ids.device)],
            completion_mask=self.completion_mask[idx.to(self.completion_mask.device)],
            sampler_logp=self.sampler_logp[idx.to(self.sampler_logp.device)],
            truncated=self.truncated[idx.to(self.truncated.device)],
            completion_texts=[self.completion_texts[i] for i in cpu],
            prompt_index=self.prompt_index[idx.to(self.prompt_index.device)],
            group_size=self.group_size,
            stats=dict(self.stats),
            loss_mask=self.loss_mask[idx.to(self.loss_mask.device)],
        )

    def to(self, device: torch.device | str) -> Rollout:
        moved = {
            k: getattr(self, k).to(device)
            for k in (
                "prompt_ids",
                "prompt_mask",
                "completion_ids",
                "completion_mask",
                "sampler_logp",
                "truncated",
                "prompt_index",
                "loss_mask",
            )
        }
        return Rollout(
            **moved, completion_texts=self.completion_texts, group_size=self.group_size, stats=dict(self.stats)
        )


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B token-id prompts -> ids (B, Tp) long left padded with pad_id, and their mask (B, Tp) long."""
    Tp = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), Tp), pad_id, dtype=torch.long)  # (B, Tp)
    mask = torch.zeros(len(prompts), Tp, dtype=torch.long)  # (B, Tp)
    for i, p in enumerate(prompts):
        ids[i, Tp - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, Tp - len(p) :] = 1
    return ids, mask


def stop_string_cut(tokenizer: Any, tokens: list[int], stops: Sequence[str]) -> int | None:
    """Fewest leading tokens whose text contains a stop string (None if the whole text has none).

    Both samplers end a completion there (the stop string is kept), decoding with our tokenizer. A
    prefix that ends inside a multi-byte character decodes it as U+FFFD until a later token completes
    it: a stop string holding U+FFFD matches only a U+FFFD of the completion itself (`settled_text`),
    never one of a character whose bytes have not all come."""
    if not tokens:
        return None

    def text(n: int) -> str:
        return tokenizer.decode(tokens[:n], skip_special_tokens=False)

    whole = text(len(tokens))
    if not any(s in whole for s in stops):
        return None
    if any(REPLACEMENT in s for s in stops):  # a prefix's U+FFFD may be a partial character's: read each
        for n in range(1, len(tokens) + 1):
            rest = tokenizer.decode(tokens[n:], skip_special_tokens=False)
            if any(s in settled_text(text(n), rest, whole) for s in stops):
                return n
    lo, hi = 1, len(tokens)  # "contains a stop string" is monotone in the prefix length
    while lo < hi:
        mid = (lo + hi) // 2
        if any(s in text(mid) for s in stops):
            hi = mid
        else:
            lo = mid + 1
    return lo


REPLACEMENT = "\ufffd"  # what a decoder writes for bytes that are no (or not yet a whole) UTF-8 character


def settled_text(prefix: str, rest: str | None = None, whole: str | None = None) -> str:
    """A prefix's text without the U+FFFDs of a character that its tokens end inside of.

    With the text of the tokens after it (`rest`) and of all of them (`whole`): the prefix ends inside
    a character when its text ends in U+FFFD, the rest's begins with one (the character's remaining
    bytes, alone) and the two do not join up to the whole. While the completion is still growing
    (`rest` None) a trailing U+FFFD may be such a start: it is read once a token follows it."""
    if not prefix.endswith(REPLACEMENT):
        return prefix
    if rest is not None and (not rest.startswith(REPLACEMENT) or prefix + rest == whole):
        return prefix
    return prefix.rstrip(REPLACEMENT)


def stop_string_seen(tokenizer: Any, tokens: list[int], stops: Sequence[str]) -> bool:
    """Whether the text of a completion still growing (`tokens` so far) contains a stop string, read as
    `settled_text` reads it: never on the U+FFFD of a character whose bytes have not all come."""
    text = settled_text(tokenizer.decode(tokens, skip_special_tokens=False))
    return any(s in text for s in stops)


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Join rollouts (e.g. refills of dynamic sampling), re-padding prompts left and completions right."""
    if len(parts) == 1:
        return parts[0]
    Tp = max(p.prompt_ids.shape[1] for p in parts)
    Tc = max(p.completion_ids.shape[1] for p in parts)

    def left(t: torch.Tensor, width: int, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (width - t.shape[1], 0), value=value)

    def right(t: torch.Tensor, width: int, value: float) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    offset, index = 0, []
    for p in parts:
        index.append(p.prompt_index + offset)
        offset += int(p.prompt_index.max()) + 1 if p.num_sequences else 0
    return Rollout(
        prompt_ids=torch.cat([left(p.prompt_ids, Tp, pad_id) for p in parts]),
        prompt_mask=torch.cat([left(p.prompt_mask, Tp, 0) for p in parts]),
        completion_ids=torch.cat([right(p.completion_ids, Tc, pad_id) for p in parts]),
        completion_mask=torch.cat([right(p.completion_mask, Tc, 0) for p in parts]),
        sampler_logp=torch.cat([right(p.sampler_logp, Tc, 0.0) for p in parts]),
        truncated=torch.cat([p.truncated for p in parts]),
        completion_texts=[t for p in parts for t in p.completion_texts],
        prompt_index=torch.cat(index),
        group_size=parts[0].group_size,
        stats={k: sum(p.stats.get(k, 0.0) for p in parts) for k in parts[0].stats},
        loss_mask=torch.cat([right(p.loss_mask, Tc, 0) for p in parts]),
    )


@torch.no_grad()
def logprob_mismatch(sampler_logp: torch.Tensor, trainer_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Sampler vs trainer log-probs of the same tokens, for the step metrics.

    Args:
        sampler_logp: (N, Tc) fp32 log-probs reported by the sampler (`Rollout.sampler_logp`).
        trainer_logp: (N, Tc) fp32 log-probs of the trainer before the update (`old_logp`).
        mask: (N, Tc) 1 on completion tokens.
    Returns mean / max |diff| and the per-token IS ratio exp(trainer - sampler): min / mean / max.
    """
    assert sampler_logp.shape == trainer_logp.shape == mask.shape
    active = mask.bool().to(trainer_logp.device)
    diff = (trainer_logp.float() - sampler_logp.float().to(trainer_logp.device))[active]  # (n,)
    if diff.numel() == 0:
        diff = torch.zeros(1)
    ratio = diff.exp()
    return {
        "logp_diff_mean": float(diff.abs().mean()),
        "logp_diff_max": float(diff.abs().max()),
        "is_ratio_min": float(ratio.min()),
        "is_ratio_mean": float(ratio.mean()),
        "is_ratio_max": float(ratio.max()),
    }
