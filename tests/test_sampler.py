"""The own sampler: greedy = step-by-step argmax of full forwards, log-probs = the full forward's
log_softmax(logits / T), stops, groups, truncation flags, and the sampling distribution itself."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers.tiny import tiny_model

from minigrpo.sampling import kv_sampler
from minigrpo.sampling.base import Sampler
from minigrpo.sampling.kv_sampler import KVCacheSampler
from minigrpo.sampling.params import (
    RaceNoise,
    SamplingParams,
    filter_probs,
    generation_waves,
    mix32,
    mix32_ref,
    sample_tokens,
)


class CharTokenizer:
    """Token i <-> one printable character; 0 is padding, 1 and 2 are special (bos, eos)."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    specials = frozenset({0, 1, 2})

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(33 + i % 90) for i in ids if not (skip_special_tokens and i in self.specials))


PROMPTS = [[1, 5, 9, 13, 17, 21, 25], [1, 40, 41], [1, 77, 78, 79, 80]]


def full_forward_logp(model, prompt: list[int], completion: list[int], temperature: float) -> torch.Tensor:
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids)[0, len(prompt) - 1 : len(prompt) - 1 + len(completion)].float()
    return (logits / temperature).log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def test_greedy_equals_stepwise_argmax():
    model = tiny_model(seed=4)
    sampler = KVCacheSampler(model, CharTokenizer())
    out = sampler.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=12, ignore_stop=True))
    for i, prompt in enumerate(PROMPTS):
        ids = list(prompt)
        for _ in range(12):
            with torch.no_grad():
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert out.completion_ids[i].tolist() == ids[len(prompt) :], f"prompt {i}"
    assert out.completion_mask.all() and out.truncated.all()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_full_forward(temperature):
    model = tiny_model(seed=5)
    params = SamplingParams(n=3, temperature=temperature, max_new_tokens=10, ignore_stop=True)
    out = KVCacheSampler(model, CharTokenizer()).generate(PROMPTS, params)
    assert out.completion_ids.shape == (9, 10)
    for row in range(9):
        prompt = PROMPTS[row // 3]
        ref = full_forward_logp(model, prompt, out.completion_ids[row].tolist(), temperature)
        err = (out.sampler_logp[row] - ref).abs().max().item()
        assert err < 1e-5, f"row {row}: max |diff| {err:.2e}"
    assert out.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # the three completions of a group are drawn independently
    assert len({tuple(r) for r in out.completion_ids[:3].tolist()}) > 1


def test_stop_ids_end_a_completion_and_keep_the_stop_token():
    model = tiny_model(seed=6)
    free = KVCacheSampler(model, CharTokenizer()).generate(
        [PROMPTS[0]], SamplingParams(temperature=0.0, max_new_tokens=10, ignore_stop=True)
    )
    greedy = free.completion_ids[0].tolist()
    stop = greedy[3]  # make the 4th greedy token a stop token
    first = greedy.index(stop)
    out = KVCacheSampler(model, CharTokenizer()).generate(
        [PROMPTS[0]], SamplingParams(temperature=0.0, max_new_tokens=10, stop_ids=(stop,))
    )
    assert out.completion_mask[0].tolist() == [1] * (first + 1) + [0] * (out.completion_mask.shape[1] - first - 1)
    assert out.completion_ids[0, : first + 1].tolist() == greedy[: first + 1]
    assert not out.truncated[0]
    assert out.completion_ids.shape[1] <= 10


def test_stop_strings_cut_at_the_first_token_that_completes_them():
    model = tiny_model(seed=6)
    tok = CharTokenizer()
    free = KVCacheSampler(model, tok).generate(
        [PROMPTS[1]], SamplingParams(temperature=0.0, max_new_tokens=12, ignore_stop=True)
    )
    text = tok.decode(free.completion_ids[0].tolist())
    stop = text[4:6]  # two characters spanning tokens 4 and 5
    cut = text.index(stop) + 2
    out = KVCacheSampler(model, tok).generate(
        [PROMPTS[1]], SamplingParams(temperature=0.0, max_new_tokens=12, stop_strings=(stop,))
    )
    assert out.completion_texts[0] == text[:cut]
    assert int(out.completion_mask[0].sum()) == cut and not out.truncated[0]


def test_truncated_flag_and_padding():
    model = tiny_model(seed=7)
    out = KVCacheSampler(model, CharTokenizer()).generate(PROMPTS, SamplingParams(n=2, max_new_tokens=5, stop_ids=(2,)))
    for row in range(6):
        length = int(out.completion_mask[row].sum())
        ids = out.completion_ids[row].tolist()
        assert out.truncated[row] == (2 not in ids[:length])
        assert all(t == 0 for t in ids[length:])
        assert (out.sampler_logp[row, length:] == 0).all() and (out.sampler_logp[row, :length] < 0).all()


def expected_stops(rows: list[list[int]], stop_ids, stop_strings, tok) -> tuple[list[int], list[bool]]:
    """Reference stop rule on free-running rows: a row ends after its first stop id, or after the
    fewest tokens whose text holds a stop string, whichever comes first; else it is truncated."""
    lengths, truncated = [], []
    for toks in rows:
        end = next((t + 1 for t, x in enumerate(toks) if x in stop_ids), None)
        limit = end or len(toks)
        cut = next((k for k in range(1, limit + 1) if any(s in tok.decode(toks[:k]) for s in stop_strings)), None)
        lengths.append(cut or limit)
        truncated.append(end is None and cut is None)
    return lengths, truncated


def test_rows_stop_at_different_steps():
    """Stop ids and stop strings end rows at different steps. A row's draws do not depend on the
    others' stops (counter noise), so the stopped rollout is the free-running one cut by the stop
    rule: the same tokens and log-probs up to each stop, padding and zero log-prob after it."""
    model, tok = tiny_model(seed=7), CharTokenizer()
    free_params = SamplingParams(n=4, temperature=1.0, max_new_tokens=10, ignore_stop=True)
    free = KVCacheSampler(model, tok).generate(PROMPTS, free_params, key=(3, 1, 0))
    rows = free.completion_ids.tolist()  # (12, 10)
    stop_ids = (rows[0][2], rows[5][6])
    stop_strings = (tok.decode(rows[9][4:6]),)  # two characters that end row 9 after 6 tokens (or earlier)
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=10, stop_ids=stop_ids, stop_strings=stop_strings)
    out = KVCacheSampler(model, tok).generate(PROMPTS, params, key=(3, 1, 0))
    lengths, truncated = expected_stops(rows, stop_ids, stop_strings, tok)
    assert len(set(lengths)) >= 3 and any(truncated) and not all(truncated), (lengths, truncated)
    assert out.completion_lengths.tolist() == lengths
    assert out.truncated.tolist() == truncated
    assert out.completion_ids.shape == (12, max(lengths))
    for r, n in enumerate(lengths):
        assert out.completion_mask[r].tolist() == [1] * n + [0] * (max(lengths) - n), f"row {r}"
        assert out.completion_ids[r, :n].tolist() == rows[r][:n], f"row {r}"
        assert (out.completion_ids[r, n:] == tok.pad_token_id).all(), f"row {r}: tokens after the stop"
        assert (out.sampler_logp[r, n:] == 0).all()
        assert (out.sampler_logp[r, :n] - free.sampler_logp[r, :n]).abs().max() < 1e-6, f"row {r}"
        assert out.completion_texts[r] == tok.decode(rows[r][:n], skip_special_tokens=True)


@pytest.mark.parametrize("check_every", [1, 4])
@pytest.mark.parametrize("kv_bucket", [1, 3, 8])
@pytest.mark.parametrize("all_stop", [False, True], ids=["some-truncated", "all-stop-early"])
def test_kv_buckets_and_check_cadence_change_nothing(kv_bucket, check_every, all_stop):
    """Decode steps attend over the first kv_len cache slots, rounded up to a multiple of kv_bucket,
    and the host looks for finished rows every check_every steps. Small buckets put the sequences
    across bucket boundaries (the default bucket, 256, is longer than all of them): an off-by-one
    in kv_len drops or adds a slot and changes the log-probs. When every row stops early, a sparser
    check exits later; the rollout must not show it. Any setting gives the default's rollout."""
    model, tok = tiny_model(seed=9), CharTokenizer()
    stop_ids = tuple(range(3, 40)) if all_stop else (7, 11, 19)
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=13, stop_ids=stop_ids, stop_strings=("&",))
    ref = KVCacheSampler(model, tok).generate(PROMPTS, params, key=(5, 2, 0))
    out = KVCacheSampler(model, tok, kv_bucket=kv_bucket, check_every=check_every).generate(
        PROMPTS, params, key=(5, 2, 0)
    )
    lengths = ref.completion_lengths.tolist()
    assert len(set(lengths)) > 2 and not ref.truncated.all(), lengths
    assert bool(ref.truncated.any()) != all_stop and (max(lengths) < 13) == all_stop, lengths
    for name in ("completion_ids", "completion_mask", "truncated", "prompt_ids", "prompt_mask"):
        assert torch.equal(getattr(out, name), getattr(ref, name)), name
    # fp32: attention over more (masked) slots sums in another order, a few ulps of log-probs near -10
    err = ((out.sampler_logp - ref.sampler_logp).abs() / (1 + ref.sampler_logp.abs())).max().item()
    assert err < 1e-6, f"max |diff| / (1 + |logp|) {err:.2e}"
    assert out.completion_texts == ref.completion_texts


def test_left_padding_does_not_change_results():
    model = tiny_model(seed=8)
    params = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_stop=True)
    together = KVCacheSampler(model, CharTokenizer()).generate(PROMPTS, params)
    for i, prompt in enumerate(PROMPTS):
        alone = KVCacheSampler(model, CharTokenizer()).generate([prompt], params)
        assert together.completion_ids[i].tolist() == alone.completion_ids[0].tolist()
        assert (together.sampler_logp[i] - alone.sampler_logp[0]).abs().max() < 1e-5


def test_filters():
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]], dtype=torch.float64)

    def kept(**kw):
        return (filter_probs(probs, **kw) > 0).int().tolist()[0]

    assert kept(top_k=2) == [1, 1, 0, 0, 0]
    assert kept(top_p=0.69) == [1, 1, 0, 0, 0]  # 0.5 < 0.69 <= 0.7
    assert kept(top_p=0.71) == [1, 1, 1, 0, 0]
    assert kept(min_p=0.25) == [1, 1, 1, 0, 0]  # drops p < 0.125
    assert kept(top_k=3, top_p=0.75) == [1, 1, 0, 0, 0]  # top-p over the renormalised top-3: 0.7 / 0.85
    assert torch.equal(filter_probs(probs, top_k=2)[0, :2], probs[0, :2])


def test_sampling_frequencies_follow_the_tempered_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(40000, -1)
    gen = torch.Generator().manual_seed(0)
    tokens, logp = sample_tokens(logits, SamplingParams(temperature=0.5), gen)
    expected = (logits[0] / 0.5).softmax(-1)
    freq = torch.bincount(tokens, minlength=4).float() / len(tokens)
    assert (freq - expected).abs().max() < 0.01  # 4 sigma at n = 40000
    assert torch.allclose(logp, expected.log()[tokens], atol=1e-6)
    top1, _ = sample_tokens(logits[:100], SamplingParams(top_k=1), gen)
    assert (top1 == 0).all()


# ------------------------------------------------------------------------------- counter-based noise


def test_mix32_matches_its_python_specification_and_never_collides():
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randint(0, 2**32, (5000,), generator=gen), torch.tensor([0, 1, 2**31, 2**32 - 1])])
    assert mix32(x).tolist() == [mix32_ref(int(v)) for v in x]
    consecutive = mix32(torch.arange(1 << 16))
    assert consecutive.unique().numel() == 1 << 16  # a bijection maps distinct counters apart
    assert int(consecutive.min()) >= 0 and int(consecutive.max()) < 2**32


def test_counter_noise_is_uniform_and_independent_along_the_vocabulary():
    noise = RaceNoise.make((7, 3, 0), torch.arange(4))
    u = noise.uniforms(torch.arange(1 << 16)).flatten()  # (4 * 65536,)
    assert float(u.min()) > 0 and float(u.max()) < 1
    n, bins = u.numel(), 256
    counts = torch.bincount((u * bins).long(), minlength=bins).double()
    chi2 = float(((counts - n / bins) ** 2 / (n / bins)).sum())
    assert chi2 < 255 + 6 * (2 * 255) ** 0.5, chi2  # dof 255: mean 255, sd 22.6
    bits = ((u * 2**32).long()[:, None] >> torch.arange(32)) & 1
    assert (bits.double().mean(0) - 0.5).abs().max() < 0.005  # every bit balanced (sd 0.001)
    a, b = u[:-1] - 0.5, u[1:] - 0.5
    assert abs(float((a * b).mean() / (a * a).mean())) < 0.01  # neighbour correlation (sd 0.002)


def test_two_stage_race_draws_tokens_with_their_probabilities():
    """A vocabulary of 1003 (not a multiple of the 256-entry blocks) with mass spread over 4 blocks."""
    V, N = 1003, 40000
    probs = torch.exp(-torch.arange(V, dtype=torch.float64) / 150.0)
    probs /= probs.sum()
    tokens = RaceNoise.make((1, 2, 3), torch.arange(N)).race(probs.float().expand(N, -1))
    assert int(tokens.max()) < V
    edges = torch.linspace(0, V, 21).long()  # 20 buckets, each spanning block boundaries differently
    expected = torch.stack([probs[lo:hi].sum() for lo, hi in itertools.pairwise(edges.tolist())])
    freq = torch.bincount(torch.bucketize(tokens, edges[1:-1], right=True), minlength=20).double() / N
    sigma = (expected * (1 - expected) / N).sqrt()
    assert ((freq - expected).abs() / sigma).max() < 4.5


def test_a_row_draws_the_same_tokens_in_any_batch():
    """Rows are named by (key, global row id): sampling a prompt alone, with its rows' global ids,
    reproduces what it drew inside the whole batch (how ranks split a step without changing it)."""
    model = tiny_model(seed=3)
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=6, ignore_stop=True)
    together = KVCacheSampler(model, CharTokenizer()).generate(PROMPTS, params, key=(0, 5, 0))
    for i, prompt in enumerate(PROMPTS):
        alone = KVCacheSampler(model, CharTokenizer()).generate(
            [prompt], params, key=(0, 5, 0), row_ids=range(4 * i, 4 * i + 4)
        )
        assert torch.equal(alone.completion_ids, together.completion_ids[4 * i : 4 * i + 4])
    other = KVCacheSampler(model, CharTokenizer()).generate(PROMPTS, params, key=(0, 6, 0))
    assert not torch.equal(other.completion_ids, together.completion_ids)  # another step, other draws
    groups = together.completion_ids.view(3, 4, -1)
    assert all(len({tuple(r.tolist()) for r in g}) > 1 for g in groups)  # a group's rows differ
    with pytest.raises(ValueError, match="row_ids"):
        KVCacheSampler(model, CharTokenizer()).generate(PROMPTS, params, key=(0, 5, 0), row_ids=range(3))


@pytest.mark.parametrize("max_rows", [1, 3, 4, 5, 8, 12])
def test_waves_of_rows_draw_what_one_batch_draws(max_rows):
    """sampler.max_rows: the rows are decoded in waves (whole prompts, or parts of one group) and the
    rollout equals the one-batch rollout exactly; stop tokens end rows at different lengths."""
    model = tiny_model(seed=4)
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=7, stop_ids=(7, 11, 19))
    one = KVCacheSampler(model, CharTokenizer()).generate(PROMPTS, params, key=(1, 2, 0))
    waves = KVCacheSampler(model, CharTokenizer(), max_rows=max_rows).generate(PROMPTS, params, key=(1, 2, 0))
    assert len(set(one.completion_lengths.tolist())) > 1  # the stops cut rows short
    for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "truncated", "prompt_index"):
        assert torch.equal(getattr(waves, name), getattr(one, name)), name
    assert torch.allclose(waves.sampler_logp, one.sampler_logp, atol=1e-6)
    assert waves.completion_texts == one.completion_texts and waves.group_size == 4


@pytest.mark.parametrize("max_rows", [None, 3, 5, 8])
def test_the_logits_processor_is_told_the_rows_ids_in_the_call(max_rows):
    """logits_processor(logits, rows, step): `rows` are the rows' ids in the call (0..N-1). Here it
    forces row r to write its own script, ended by a stop token after r % 5 + 2 tokens. In waves
    (max_rows: whole prompts, or parts of one group) and after compactions every row must still be
    told its id in the call, not its place in its wave or in the shrunk batch: else it writes
    another row's script (max_rows=3 gave rows 4..7 the scripts of rows 0..3)."""
    N, Tc = 12, 8
    lengths = [r % 5 + 2 for r in range(N)]
    script = torch.tensor([[2 if t == lengths[r] - 1 else 10 + (7 * r + t) % 60 for t in range(Tc)] for r in range(N)])

    def force(logits, rows, step):  # (n, V), (n,), (1,): only row r's script token is possible
        want = script[rows, step]  # (n,)
        return torch.full_like(logits, float("-inf")).scatter(1, want[:, None], 0.0)

    sampler = KVCacheSampler(tiny_model(seed=2), CharTokenizer(), logits_processor=force, max_rows=max_rows)
    sampler.compact_below = 0.9
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=Tc, stop_ids=(2,))
    out = sampler.generate(PROMPTS, params, key=(2, 3, 0))
    assert out.completion_lengths.tolist() == lengths and not out.truncated.any()
    assert out.stats["compactions"] >= 1, out.stats
    for r, n in enumerate(lengths):
        assert out.completion_ids[r, :n].tolist() == script[r, :n].tolist(), f"row {r}"
    assert (out.sampler_logp == 0).all()  # one possible token: log-prob 0 (padding: 0 too)


@pytest.mark.parametrize("check_every", [1, 3])
@pytest.mark.parametrize("compact_below,chunk", [(0.5, 32), (0.9, 1), (0.9, 2)])
def test_finished_rows_leave_the_batch_without_changing_a_token(compact_below, chunk, check_every, monkeypatch):
    """Compaction: once few rows are live, the finished ones leave the batch (the live rows' cache
    moved down in place `chunk` rows at a time, their inputs and noise keys selected). Rows are
    independent and name their noise by global id, so the rollout equals the never-compacted one;
    the test fails if a compaction drops a filled cache slot, overwrites a row before it moved, or
    mixes up rows' outputs or noise keys."""
    monkeypatch.setattr(kv_sampler, "COMPACT_ROWS", chunk)
    model, tok = tiny_model(seed=9), CharTokenizer()
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=16, stop_ids=tuple(range(3, 12)))
    ref = KVCacheSampler(model, tok, compact_below=0.0).generate(PROMPTS, params, key=(6, 1, 0))
    out = KVCacheSampler(model, tok, compact_below=compact_below, check_every=check_every).generate(
        PROMPTS, params, key=(6, 1, 0)
    )
    lengths = ref.completion_lengths.tolist()
    assert len(set(lengths)) > 3 and max(lengths) > 8, lengths  # rows end at many different steps
    assert ref.stats["compactions"] == 0 and out.stats["compactions"] >= 1, out.stats
    assert out.stats["graph_captures"] == 0 and out.stats["capture_s"] == 0.0  # no CUDA graphs on the CPU
    for name in ("completion_ids", "completion_mask", "truncated", "prompt_index"):
        assert torch.equal(getattr(out, name), getattr(ref, name)), name
    assert torch.allclose(out.sampler_logp, ref.sampler_logp, atol=1e-6)
    assert out.completion_texts == ref.completion_texts
    with pytest.raises(ValueError, match="compact_below"):
        KVCacheSampler(model, tok, compact_below=1.0)


def test_stop_tokens_are_found_without_host_syncs(monkeypatch):
    """A CUDA-graph step must not wait for the host. torch.isin sorts and takes unique values (a host
    sync, which breaks a capture) once the stop ids outnumber about 10 * rows^0.145: here 40 stop ids
    for rows that compaction shrinks to a few. The sampler must never call it, and is_stop must agree
    with it."""
    stop_ids = torch.tensor(list(range(3, 43)))
    tokens = torch.randint(0, 64, (5, 9))
    assert torch.equal(kv_sampler.is_stop(tokens, stop_ids), torch.isin(tokens, stop_ids))
    assert torch.equal(kv_sampler.is_stop(tokens[0], stop_ids[:0]), torch.zeros(9, dtype=torch.bool))

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.isin called while sampling")

    monkeypatch.setattr(torch, "isin", forbidden)
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=12, stop_ids=tuple(range(3, 43)))
    out = KVCacheSampler(tiny_model(seed=9), CharTokenizer(), compact_below=0.9, check_every=2)
    out = out.generate(PROMPTS, params, key=(6, 1, 0))
    assert out.stats["compactions"] >= 1 and not out.truncated.all()


@pytest.mark.parametrize(
    "prompts,n,max_rows,want",
    [
        (3, 4, None, [(0, 3, 0, 4)]),
        (3, 4, 12, [(0, 3, 0, 4)]),
        (3, 4, 8, [(0, 2, 0, 4), (2, 3, 0, 4)]),
        (3, 4, 5, [(0, 1, 0, 4), (1, 2, 0, 4), (2, 3, 0, 4)]),
        (2, 8, 3, [(0, 1, 0, 3), (0, 1, 3, 6), (0, 1, 6, 8), (1, 2, 0, 3), (1, 2, 3, 6), (1, 2, 6, 8)]),
        (1, 8, 5, [(0, 1, 0, 4), (0, 1, 4, 8)]),
    ],
)
def test_generation_waves(prompts, n, max_rows, want):
    assert generation_waves(prompts, n, max_rows) == want


def test_the_own_sampler_implements_the_sampler_protocol():
    model = tiny_model(seed=1)
    sampler = KVCacheSampler(model, CharTokenizer())
    assert isinstance(sampler, Sampler)
    sampler.sleep()
    sampler.wake()
    sampler.sync(model)
    assert sampler.last_sync == {} and sampler.pad_id == 0
    params = SamplingParams(n=2, max_new_tokens=3, ignore_stop=True)
    assert sampler.generate(PROMPTS, params, key=(0, 1, 0), row_ids=range(6)).num_sequences == 6
    sampler.close()


def test_sync_rejects_another_model():
    model = tiny_model(seed=1)
    sampler = KVCacheSampler(model, CharTokenizer())
    sampler.sync(model)
    with pytest.raises(ValueError, match="same model"):
        sampler.sync(tiny_model(seed=2))


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sampler_logprobs_equal_trainer_logprobs(temperature):
    """The acceptance contract: the trainer's chunked log-probs of the sampled sequences equal the
    sampler's own (fp32, 1e-5), with finished rows padded differently in each row."""
    from minigrpo.logprobs import completion_logprobs

    model = tiny_model(seed=9)
    params = SamplingParams(n=4, temperature=temperature, max_new_tokens=9, stop_ids=(2, 7, 11))
    out = KVCacheSampler(model, CharTokenizer()).generate(PROMPTS, params)
    with torch.no_grad():
        logp, entropy = completion_logprobs(
            model,
            out.input_ids(),
            out.attention_mask(),
            out.completion_mask,
            temperature=temperature,
            return_entropy=True,
        )
    assert logp.shape == out.sampler_logp.shape
    err = (logp - out.sampler_logp).abs().max().item()
    assert err < 1e-5, f"trainer vs sampler log-probs: max |diff| {err:.2e}"
    active = out.completion_mask.bool()
    assert (logp[~active] == 0).all() and (entropy[active] > 0).all()


def test_select_reads_a_bool_mask_as_the_rows_to_keep():
    """rollout.select(keep) with keep a bool mask (N,): as_tensor(mask, long) made it the indices 0 and 1,
    so the rows kept were rows 0 and 1 whatever the mask said (here rows 1, 4 and 5 are kept)."""
    model = tiny_model(seed=3)
    out = KVCacheSampler(model, CharTokenizer()).generate(
        PROMPTS, SamplingParams(n=2, max_new_tokens=4, ignore_stop=True), key=(1,)
    )
    keep = torch.tensor([False, True, False, False, True, True])
    for rows in (keep, keep.tolist()):
        picked = out.select(rows)
        assert torch.equal(picked.completion_ids, out.completion_ids[[1, 4, 5]])
        assert torch.equal(picked.prompt_index, torch.tensor([0, 2, 2]))
        assert picked.completion_texts == [out.completion_texts[i] for i in (1, 4, 5)]
    assert torch.equal(out.select([5, 0]).sampler_logp, out.sampler_logp[[5, 0]])  # indices stay indices
    with pytest.raises(ValueError, match=r"bool mask of rows must have shape \(6,\), got \(3,\)"):
        out.select(keep[:3])
