"""What to sample (SamplingParams) and how tokens are drawn from logits (pure tensor functions).

Log-prob semantics, shared with the trainer: the log-prob of a sampled token is
`log_softmax(logits / temperature)[token]` in fp32, over the FULL vocabulary. top-k / top-p / min-p
only restrict which tokens may be drawn; they do not renormalise the reported log-prob, because the
trainer's policy is the tempered softmax and the two must agree. Greedy (temperature 0) reports
log-probs at temperature 1.

Drawing uses the exponential race: argmax_i(p_i / E_i) with independent E_i ~ Exp(1) picks token i
with probability p_i / sum(p), with no host synchronisation (unlike torch.multinomial). The race
runs in two stages over blocks of RACE_BLOCK vocabulary entries: blocks race with their masses
P_b = sum of p over the block, then the tokens of the winning block race with their own p. The
winner has the same distribution as a race over all V tokens (P(v) = P_b/sum P * p_v/P_b), but
only about V/RACE_BLOCK + RACE_BLOCK noise values are needed per row instead of V.

Counter-based noise. The uniform behind E = -log(u) is not drawn from a torch.Generator: it is a
pure function of integers,

    u(key, row, t, v) = (x + 1/2) / 2^32,   x = h(r_t ^ h(v ^ SALT_TOKEN)),  r_t = h(r ^ h(t ^ SALT_POS)),
    r = h(k1 ^ h(k0 ^ row)),                 (k0, k1) = stream_key(*key)  (splitmix64 on the host)

where `row` is the row's GLOBAL id, t the index of the completion token being drawn, v the token
(or, for the block stage, the block index with bit 31 set, so the two stages never share a
counter), and h the 32-bit "lowbias32" mixer (xorshift-multiply, constants 0x7feb352d and
0x846ca68b, from C. Wellons' hash-prospector search; its measured avalanche bias is 0.17 on his
scale, murmur3's finalizer scores 0.26). Each h is a bijection of 32-bit words, so r is distinct
for distinct rows and, for a fixed (row, t), distinct tokens get distinct x. A row therefore
draws the same tokens whichever batch, micro-batch or rank it is sampled in: sampling is split
invariant, a resumed run redraws nothing differently, and the noise costs no generator state
(CUDA-graph friendly: row keys and t are static device tensors). The integer math runs in int64
on values below 2^32 with 16-bit partial products (in the Triton kernel: wrapping uint32), so
nothing overflows and every device computes the same bits. tests/test_sampler.py checks h against
a pure-Python reference, the uniformity of u (chi-square over 256 bins, bit balance, neighbour
correlation) and the token frequencies.

Where the code lives: the mixer, the noise and the race are in minigrpo.kernels.sampling (torch
reference + fused Triton kernel); RaceNoise holds one batch's counters. With noise and no filters,
sample_tokens is that module's `sample_race`: on CUDA, two launches read the (bf16) logits once for
the softmax statistics, the race and the log-prob, instead of ~8 fp32 passes over (B, V) in torch.
Filters (they sort) and noise=None keep the torch path, which for the same noise draws the same
tokens (up to rounding on near-ties of the race).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from minigrpo.errors import UserError
from minigrpo.kernels.sampling import MASK32, mix32, race_ref, race_uniforms, sample_race

MIN_TEMPERATURE = 1e-30  # smallest temperature > 0: logits / T must stay finite in fp32 (else NaN log-probs)
MAX_TEMPERATURE = 1e37  # largest: the sampling kernel multiplies by 1 / T, which must be a normal fp32 number


class SamplingError(UserError, ValueError):
    """Bad sampling settings or prompts (a value out of range, a token id the model does not have)."""


def _check_int(name: str, value, low: int) -> None:
    """An integer (not a bool, not a float) >= low, or a SamplingError naming the setting."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SamplingError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise SamplingError(f"{name} must be >= {low}, got {value}")


def _check_real(name: str, value) -> float:
    """A finite real number (NaN and infinities are refused), as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise SamplingError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _stop_ids(ids) -> tuple[int, ...]:
    """stop_ids as a tuple of token ids >= 0 (any iterable of integers)."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise SamplingError(f"stop_ids must be a sequence of token ids, got {ids!r}")
    ids = tuple(ids)
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 0]
    if bad:
        raise SamplingError(f"stop_ids must be token ids >= 0, got {bad[0]!r} in {ids!r}")
    return tuple(int(i) for i in ids)


def _stop_strings(stops) -> tuple[str, ...]:
    """stop_strings as a tuple of non-empty strings; one string is one stop string (not its characters)."""
    stops = (stops,) if isinstance(stops, str) else stops
    if not isinstance(stops, Iterable):
        raise SamplingError(f"stop_strings must be a sequence of strings, got {stops!r}")
    stops = tuple(stops)
    for stop in stops:
        if not isinstance(stop, str) or not stop:
            raise SamplingError(f"stop_strings must be non-empty strings (an empty one ends any text), got {stop!r}")
    return stops


@dataclass(frozen=True)
class SamplingParams:
    """One rollout's sampling settings.

    Stops, as transformers' `generate` applies `eos_token_id` and `stop_strings`: a completion ends with
    the token that completes a stop string (a string spanning several tokens, or inside one longer token
    whose text runs past it, ends at that token), kept in completion_ids, completion_mask and the text;
    the first of several occurrences counts. One difference by design: only the completion's text is
    searched, so a stop string begun in the prompt's last tokens never matches (transformers' criterion
    reads the prompt too). Tokens drawn after a stop are padding, with mask 0 and log-prob 0.
    """

    n: int = 1  # completions per prompt (the group size G)
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus: smallest set of tokens with total probability >= top_p
    top_k: int = 0  # keep the k most likely tokens (0: off)
    min_p: float = 0.0  # drop tokens with p < min_p * max p
    max_new_tokens: int = 256
    stop_ids: tuple[int, ...] = ()  # a completion ends after any of these tokens (kept in it)
    stop_strings: tuple[str, ...] = ()  # ... or once its text contains one of these (kept in it)
    ignore_stop: bool = False  # always generate max_new_tokens (benchmarks)

    def __post_init__(self) -> None:
        """Check every setting (naming the bad one) and store the counts as int, the rest as float and the
        stop lists as tuples of str / int: a numpy or Fraction setting then samples as its Python value does
        (a numpy.float32 temperature reached the Triton kernel as an argument it cannot take)."""
        for name, low in (("n", 1), ("top_k", 0), ("max_new_tokens", 1)):
            _check_int(name, getattr(self, name), low)
            object.__setattr__(self, name, int(getattr(self, name)))
        temperature = _check_real("temperature", self.temperature)
        if temperature < 0:
            raise SamplingError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if temperature > 0 and not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
            raise SamplingError(
                f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]: logits / "
                f"temperature and 1 / temperature must stay finite fp32, got {self.temperature}"
            )
        if not 0 < _check_real("top_p", self.top_p) <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= _check_real("min_p", self.min_p) < 1:
            raise SamplingError(f"min_p must be in [0, 1), got {self.min_p}")
        for name in ("temperature", "top_p", "min_p"):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "stop_ids", _stop_ids(self.stop_ids))
        object.__setattr__(self, "stop_strings", _stop_strings(self.stop_strings))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def filters(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T)[tokens] in fp32: logits (B, V), tokens (B,) -> (B,)."""
    scaled = logits.float() / (temperature if temperature > 0 else 1.0)
    return scaled.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)


def filter_probs(probs: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """Zero out tokens outside top-k, then top-p, then min-p (probs (B, V), not renormalised): the
    tokens `filter_scores` keeps of log(probs)."""
    return probs.masked_fill(filter_scores(probs.log(), top_k, top_p, min_p).isneginf(), 0.0)


def filter_scores(scores: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """Tempered logits (B, V) with the tokens outside top-k, then top-p, then min-p set to -inf.

    The order and the arithmetic are transformers' logits processors' (what a config means there):
    top-k keeps every token tied with the k-th; top-p takes its nucleus of the top-k survivors'
    renormalised mass, and min-p comes last. The order matters: min-p first shrinks the mass top-p
    counts against, so the nucleus could lose tokens (p = [.5, .3, .04 x 5], top_p .6, min_p .1:
    {.5, .3} in this order, {.5} with min-p first)."""
    if 0 < top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        scores = scores.masked_fill(scores < kth, -math.inf)
    if top_p < 1.0:
        scores = scores.masked_fill(outside_nucleus(scores, top_p), -math.inf)
    if min_p > 0.0:
        probs = scores.softmax(-1)  # (B, V)
        scores = scores.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), -math.inf)
    return scores


def outside_nucleus(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """(B, V) bool: the tokens past the smallest set of most likely tokens whose mass reaches top_p.

    The mass is summed from the least likely token up (a token goes while the mass at and below it is
    <= 1 - top_p; the most likely always stays), and tied tokens are ordered by torch's ascending sort,
    both as transformers does: the same rounding on exact boundaries (ten tokens of .1, top_p .3: three
    tokens, where a sum from the top gives four) and the same choice among tokens tied at the boundary
    (common with bf16 logits). A row's order depends on that row alone, so the choice is split invariant."""
    ascending, order = scores.sort(-1)  # (B, V) each
    mass = ascending.softmax(-1)  # (B, V) in sorted order
    del ascending
    drop = mass.cumsum_(-1) <= 1 - top_p  # (B, V)
    del mass
    drop[:, -1] = False
    return torch.zeros_like(drop).scatter_(-1, order, drop)


# ----------------------------------------------------------------------------- counter-based noise

MASK64 = 0xFFFFFFFFFFFFFFFF


def splitmix64(x: int) -> int:
    """The splitmix64 finalizer on a Python int (64-bit wraparound): host-side key derivation."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def stream_key(*words: int) -> tuple[int, int]:
    """Two 32-bit words naming one noise stream, e.g. (seed, step, round): a splitmix64 chain."""
    h = 0
    for w in words:
        h = splitmix64(h ^ (int(w) & MASK64))
    return h & MASK32, h >> 32


def mix32_ref(x: int) -> int:
    """The same mixer on a Python int: the specification the tensor version is tested against."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


@dataclass
class RaceNoise:
    """The counters of one batch of rows: who each row is (its key) and which token is being drawn.

    row_keys: (N,) int64 words r = h(k1 ^ h(k0 ^ global_row_id)); position: (1,) int64 t, the index
    of the completion token being drawn (the sampler advances it in place, so CUDA graphs replay it).
    """

    row_keys: torch.Tensor  # (N,) int64 in [0, 2^32)
    position: torch.Tensor  # (1,) int64

    @classmethod
    def make(
        cls,
        key: Sequence[int],
        row_ids: torch.Tensor,
        position: torch.Tensor | None = None,
    ) -> RaceNoise:
        """Noise of the stream `key` (e.g. (seed, step, round)) for rows with these global ids."""
        k0, k1 = stream_key(*key)
        rows = row_ids.to(torch.int64) & MASK32  # (N,)
        keys = mix32(mix32(rows ^ k0) ^ k1)
        if position is None:
            position = torch.zeros(1, dtype=torch.int64, device=rows.device)
        return cls(row_keys=keys, position=position)

    def uniforms(self, index: torch.Tensor) -> torch.Tensor:
        """u in (0, 1) fp64 for counters `index` (K,) or (N, K) int64 at the current position -> (N, K)."""
        return race_uniforms(self.row_keys, self.position, index)

    def race(self, probs: torch.Tensor) -> torch.Tensor:
        """argmax_v p_v / E_v in two stages (blocks, then the tokens of the winning block): (N, V) -> (N,)."""
        return race_ref(probs, self.row_keys, self.position)


def sample_tokens(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    *,
    noise: RaceNoise | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row. logits (B, V) any float dtype -> tokens (B,) int64, their log-probs (B,) fp32.

    noise: the rows' counters (see RaceNoise); None draws fresh row keys from torch's RNG
    (`generator`), i.e. an ordinary random draw. With noise and no filters, the draw is the fused
    kernel `sample_race` (impl: "auto" = Triton on CUDA, the torch reference elsewhere; "triton",
    "ref"); filters and noise=None take the torch path below (for the same noise and no filters
    it draws the same tokens, up to rounding on near-ties).
    """
    if noise is not None and not params.filters:
        return sample_race(logits, params.temperature, noise.row_keys, noise.position, impl=impl)
    if params.greedy:
        tokens = logits.argmax(-1)
        return tokens, token_logprobs(logits, tokens, 1.0)
    scores = logits.float() / params.temperature  # (B, V)
    logp = scores.log_softmax(-1)  # (B, V)
    if params.filters:  # before the probabilities exist: the sort's buffers and theirs never coexist
        removed = filter_scores(scores, params.top_k, params.top_p, params.min_p).isneginf()  # (B, V)
        del scores
        probs = logp.exp().masked_fill_(removed, 0.0)
    else:
        probs = logp.exp()
    if noise is None:
        keys = torch.randint(0, 2**32, (logits.shape[0],), generator=generator, device=logits.device)
        noise = RaceNoise(row_keys=keys, position=torch.zeros(1, dtype=torch.int64, device=logits.device))
    tokens = noise.race(probs)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


def generation_waves(num_prompts: int, n: int, max_rows: int | None) -> list[tuple[int, int, int, int]]:
    """Split B prompts x n completions into waves of at most `max_rows` rows (None: one wave).

    Each wave is (first prompt, end prompt, first completion, end completion): whole prompts when
    max_rows >= n, else one prompt's group cut into near-equal parts. Rows stay in their order.
    """
    if max_rows is None or num_prompts * n <= max_rows:
        return [(0, num_prompts, 0, n)]
    if max_rows >= n:
        k = max_rows // n  # whole prompts per wave
        return [(p, min(p + k, num_prompts), 0, n) for p in range(0, num_prompts, k)]
    size = -(-n // -(-n // max_rows))  # the fewest parts of at most max_rows, sizes within one of each other
    return [(p, p + 1, c, min(c + size, n)) for p in range(num_prompts) for c in range(0, n, size)]
