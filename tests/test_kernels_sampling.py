"""Fused sampling kernel (softmax + two-stage exponential race + log-prob) vs its torch reference.

Tokens must be equal exactly (random logits: near-ties of the race, where rounding could decide,
do not occur); log-probs within 1e-5 absolute of the fp32 reference and of fp64 log_softmax of the
same (rounded) logits. On the CPU the kernels run in Triton's interpreter, so shapes are small and
`chunk` is set small, to give each row several chunks of the first launch.
"""

import re

import pytest
import torch
from helpers.kernel_checks import DEVICES, near_certain_logits, near_certain_tolerance

from minigrpo.kernels import fused_linear_logprobs, sample_race, sample_race_ref
from minigrpo.sampling.params import RaceNoise, SamplingParams, filter_probs, sample_tokens

ATOL = 1e-5  # on log-probs (fp32 math; |logp| stays below ~20 here)


def _keys(n: int, seed: int = 0, device="cpu") -> torch.Tensor:
    """(n,) int64 row keys: random 32-bit words (including the top bit)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**32, (n,), generator=gen, dtype=torch.int64).to(device)


def _logits(n: int, v: int, dtype, device, scale: float = 2.0) -> torch.Tensor:
    return (torch.randn(n, v, dtype=torch.float64) * scale).to(dtype).to(device)


def _fp64_logp(logits: torch.Tensor, temperature: float, tokens: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits / T)[tokens] in fp64 from the same (rounded) logits; T = 0 means 1."""
    x = logits.double() / (temperature or 1.0)
    return x.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("V", "chunk"), [(1000, 512), (300, 256), (5000, 1024), (255, 256), (768, 256), (100, 512)])
def test_kernel_matches_reference(V, chunk, dtype, device):
    N = 4
    logits = _logits(N, V, dtype, device)
    keys = _keys(N, seed=V, device=device)
    sampled_off_argmax = 0
    for temperature in [0.0, 0.7, 1.0, 1.3]:
        for t in [0, 17]:
            pos = torch.tensor([t], dtype=torch.int64, device=device)
            tokens, logp = sample_race(logits, temperature, keys, pos, impl="triton", chunk=chunk)
            ref_tokens, ref_logp = sample_race_ref(logits, temperature, keys, pos)
            assert tokens.dtype == torch.int64 and logp.dtype == torch.float32
            assert tokens.tolist() == ref_tokens.tolist(), (temperature, t)
            torch.testing.assert_close(logp, ref_logp, rtol=0, atol=ATOL)
            torch.testing.assert_close(logp.double(), _fp64_logp(logits, temperature, tokens), rtol=0, atol=ATOL)
            if temperature == 0:
                assert tokens.tolist() == logits.argmax(-1).tolist()
            else:
                sampled_off_argmax += int((tokens != logits.argmax(-1)).sum())
    assert sampled_off_argmax > 0  # the race really samples (scale 2 logits: argmax has p << 1)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_rows_draw_the_same_alone_as_in_a_batch(device):
    N, V = 6, 700
    logits = _logits(N, V, torch.bfloat16, device)
    keys = _keys(N, device=device)
    pos = torch.tensor([5], device=device)
    tokens, logp = sample_race(logits, 1.0, keys, pos, impl="triton", chunk=256)
    for i in range(N):
        tok_i, logp_i = sample_race(logits[i : i + 1], 1.0, keys[i : i + 1], pos, impl="triton", chunk=256)
        assert int(tok_i) == int(tokens[i])
        assert torch.equal(logp_i[0], logp[i])


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_a_peaked_distribution_always_draws_its_peak(device):
    V = 1000
    peaks = torch.tensor([0, 255, 256, 511, 999, 700, 3, 768], device=device)  # block edges, last entry
    N = len(peaks)
    logits = torch.randn(N, V, device=device)
    logits[torch.arange(N), peaks] += 30.0
    keys = _keys(N, seed=3, device=device)
    for temperature in [0.7, 1.0, 1.3]:
        for t in [0, 17]:
            pos = torch.tensor([t], device=device)
            tokens, logp = sample_race(logits, temperature, keys, pos, impl="triton", chunk=256)
            assert tokens.tolist() == peaks.tolist()
            torch.testing.assert_close(logp.double(), _fp64_logp(logits, temperature, peaks), rtol=0, atol=ATOL)
            assert float(logp.min()) > -1e-4  # p(peak) ~ 1


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_rows_of_a_larger_buffer(dtype, device):
    N, V = 3, 600
    buf = _logits(N, V + 40, dtype, device)
    logits = buf[:, 7 : 7 + V]  # row stride V + 40, unit stride along V
    assert logits.stride() == (V + 40, 1)
    keys = _keys(N, seed=1, device=device)
    for temperature in [0.0, 1.0]:
        pos = torch.tensor([2], device=device)
        tokens, logp = sample_race(logits, temperature, keys, pos, impl="triton", chunk=256)
        ref_tokens, ref_logp = sample_race_ref(logits.contiguous(), temperature, keys, pos)
        assert tokens.tolist() == ref_tokens.tolist()
        torch.testing.assert_close(logp, ref_logp, rtol=0, atol=ATOL)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
def test_near_certain_logp_agrees_with_the_trainer(temperature, device):
    # the sampler's log-prob and the trainer's (fused_linear_logprobs over the same logits, head I)
    # must agree for near-certain tokens too: logits offset by +-30..45, logp = -tiny (1e-7..3e-5).
    # Both within ~1e-7 of fp64; the trainer once rounded through m + log s and was 1e-6 off.
    N, V = 24, 300
    x, _ = near_certain_logits(N, V, device=device)  # (N, V) fp32
    x = x * (temperature or 1.0)  # the same margins after tempering
    pos = torch.tensor([5], dtype=torch.int64, device=device)
    tokens, logp = sample_race(x, temperature, _keys(N, device=device), pos, impl="triton", chunk=256)
    assert tokens.tolist() == x.argmax(-1).tolist()  # p(argmax) > 1 - 3e-5 for every row
    ref = _fp64_logp(x, temperature, tokens)
    assert torch.all((logp.double() - ref).abs() <= near_certain_tolerance(ref))
    eye = torch.eye(V, device=device)  # trainer's head: logits = x @ I.T = x
    for impl in ["triton", "ref"]:
        trainer = fused_linear_logprobs(x, eye, tokens, temperature=temperature or 1.0, impl=impl)
        assert torch.all((trainer.double() - ref).abs() <= near_certain_tolerance(ref)), impl
        torch.testing.assert_close(trainer, logp, rtol=0, atol=2e-7)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_greedy_takes_the_first_of_tied_maxima(device):
    logits = torch.randn(2, 1100, device=device).to(torch.bfloat16)
    logits[0, [300, 900]] = 8.0  # tie across chunks (chunk = 512)
    logits[1, [10, 20, 1000]] = 8.0  # tie inside one race block, and in another chunk
    keys, pos = _keys(2, device=device), torch.tensor([0], device=device)
    tokens, logp = sample_race(logits, 0.0, keys, pos, impl="triton", chunk=512)
    assert tokens.tolist() == [300, 10]
    torch.testing.assert_close(logp.double(), _fp64_logp(logits, 0.0, tokens), rtol=0, atol=ATOL)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_tokens_uses_the_kernel_without_filters(dtype, device):
    N, V = 5, 900
    logits = _logits(N, V, dtype, device)
    noise = RaceNoise.make((11, 2, 0), torch.arange(N, device=device), torch.tensor([3], device=device))
    for params in [SamplingParams(temperature=0.8), SamplingParams(temperature=0.0)]:
        tok_k, logp_k = sample_tokens(logits, params, noise=noise, impl="triton")
        tok_r, logp_r = sample_tokens(logits, params, noise=noise, impl="ref")
        assert tok_k.tolist() == tok_r.tolist()
        torch.testing.assert_close(logp_k, logp_r, rtol=0, atol=ATOL)
        # the reference is the race on the tempered softmax probabilities (the torch path)
        if not params.greedy:
            logp_all = (logits.float() / params.temperature).log_softmax(-1)
            assert tok_r.tolist() == noise.race(logp_all.exp()).tolist()


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_sample_tokens_keeps_the_torch_path_for_filters(device):
    N, V = 4, 700
    logits = _logits(N, V, torch.bfloat16, device, scale=0.5)  # flat: the race alone rarely picks the argmax
    noise = RaceNoise.make((5, 0, 0), torch.arange(N, device=device))
    top1, _ = sample_tokens(logits, SamplingParams(temperature=1.0, top_k=1), noise=noise, impl="triton")
    assert top1.tolist() == logits.argmax(-1).tolist()  # only the filtered path guarantees this
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.9)
    tok_k, logp_k = sample_tokens(logits, params, noise=noise, impl="triton")
    tok_r, logp_r = sample_tokens(logits, params, noise=noise, impl="ref")
    assert torch.equal(tok_k, tok_r) and torch.equal(logp_k, logp_r)
    logp_all = (logits.float() / 0.9).log_softmax(-1)
    expected = noise.race(filter_probs(logp_all.exp(), top_k=50, top_p=0.9))
    assert tok_k.tolist() == expected.tolist()


def test_auto_is_the_reference_on_cpu():
    logits, keys, pos = _logits(3, 500, torch.float32, "cpu"), _keys(3), torch.tensor([1])
    for a, b in zip(sample_race(logits, 1.0, keys, pos), sample_race_ref(logits, 1.0, keys, pos)):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_large_vocabulary_cuda():
    dev = torch.device("cuda")
    N, V = 64, 151936
    logits = _logits(N, V, torch.bfloat16, dev)
    keys, pos = _keys(N, device=dev), torch.tensor([9], device=dev)
    for temperature in [0.0, 0.7, 1.0]:
        tokens, logp = sample_race(logits, temperature, keys, pos, impl="triton")
        ref_tokens, ref_logp = sample_race_ref(logits, temperature, keys, pos)
        assert tokens.tolist() == ref_tokens.tolist()
        torch.testing.assert_close(logp, ref_logp, rtol=0, atol=ATOL)


@pytest.mark.gpu
def test_cuda_graph_replays_with_the_position_advanced_in_place():
    dev = torch.device("cuda")
    N, V = 16, 151936
    logits = _logits(N, V, torch.bfloat16, dev)
    keys, pos = _keys(N, device=dev), torch.zeros(1, dtype=torch.int64, device=dev)
    sample_race(logits, 1.0, keys, pos, impl="triton")  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens, logp = sample_race(logits, 1.0, keys, pos, impl="triton")
    for t in range(3):
        pos.fill_(t)
        graph.replay()
        eager_tokens, eager_logp = sample_race(logits, 1.0, keys, torch.tensor([t], device=dev), impl="triton")
        assert torch.equal(tokens, eager_tokens) and torch.equal(logp, eager_logp)


@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_an_empty_vocabulary_is_refused_before_any_launch(impl):
    # (2, 0) logits: the first launch would have no chunk to write, the second read garbage (a crash)
    keys, pos = _keys(2), torch.tensor([0])
    for temperature in (0.0, 1.0):
        with pytest.raises(ValueError, match=r"logits \(2, 0\) have an empty vocabulary"):
            sample_race(torch.zeros(2, 0), temperature, keys, pos, impl=impl)
    with pytest.raises(ValueError, match=r"\(3,\) row keys for 2 rows"):
        sample_race(torch.zeros(2, 5), 1.0, _keys(3), pos, impl=impl)
    with pytest.raises(ValueError, match="chunk must be a power of two >= 256, got 300"):
        sample_race(torch.zeros(2, 5), 1.0, keys, pos, impl=impl, chunk=300)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("V", [1, 7, 600])
def test_tiny_vocabularies_and_masked_logits(V, temperature, device):
    # -inf outside a few allowed ids (the first and the last among them): tokens never land there
    logits = _logits(3, V, torch.float32, device)
    if V > 7:
        allowed = torch.tensor([0, 5, 300, V - 1], device=device)
        logits = torch.full_like(logits, float("-inf")).index_copy_(1, allowed, logits[:, allowed])
    keys, pos = _keys(3, device=device), torch.tensor([2], device=device)
    tokens, logp = sample_race(logits, temperature, keys, pos, impl="triton", chunk=256)
    want_tokens, want_logp = sample_race_ref(logits, temperature, keys, pos)
    assert tokens.tolist() == want_tokens.tolist()
    assert torch.isfinite(logits.gather(1, tokens[:, None])).all()
    torch.testing.assert_close(logp.double(), _fp64_logp(logits, temperature, tokens), rtol=0, atol=ATOL)
    torch.testing.assert_close(logp, want_logp, rtol=0, atol=ATOL)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1e-30, 1e-20, 1e-12])
def test_tiny_temperatures_still_race_between_tied_maxima(temperature, dtype, device):
    # at temperatures near SamplingParams' floor (1e-30) the distribution is the tied maxima, each
    # with p = 1/2: across chunks (tokens 5 and 600) and inside one race block (10 and 20). The race
    # must still be decided by the noise, as in the reference; adding x = z / T ~ 1e31 to the noise
    # in fp64 rounded the noise away and the first maximum always won (token 5 / 10 for every key).
    N, V = 16, 700
    logits = (torch.randn(V, dtype=torch.float64) * 3).clamp(max=8.0).to(dtype).repeat(N, 1).to(device)
    logits[: N // 2, [5, 600]] = 9.0  # rows 0-7: tie across chunks (chunk 256)
    logits[N // 2 :, [10, 20]] = 9.0  # rows 8-15: tie inside race block 0
    keys = _keys(N, seed=11, device=device)
    pos = torch.tensor([4], device=device)
    tokens, logp = sample_race(logits, temperature, keys, pos, impl="triton", chunk=256)
    ref_tokens, ref_logp = sample_race_ref(logits, temperature, keys, pos)
    assert tokens.tolist() == ref_tokens.tolist()
    assert set(tokens[: N // 2].tolist()) == {5, 600} and set(tokens[N // 2 :].tolist()) == {10, 20}
    torch.testing.assert_close(logp, torch.full_like(logp, -0.6931471805599453), rtol=0, atol=1e-6)
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=ATOL)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_huge_temperatures_draw_uniformly_or_are_refused(device):
    # T = 1e30: every allowed logit has x ~ 0, the draw is uniform over them, logp = -log(allowed).
    # Past 1 / fp32's tiny (8.5e37) 1 / T is no normal fp32 number: at 1e50 the kernel's (-inf - m) * 0
    # was NaN (NaN log-probs; at T = inf a padded lane won: token 300 of V = 300), and the reference's
    # logits / T (T inf in fp32) drew token 0, a -inf logit. Both are refused, naming the temperature.
    N, V = 6, 300
    logits = _logits(N, V, torch.float32, device)
    logits[:, 250:] = float("-inf")  # masked ids, the last race block's tail among them
    logits[1, :] = float("-inf")
    logits[1, 7] = 0.5  # a row with one allowed token
    keys, pos = _keys(N, seed=2, device=device), torch.tensor([6], device=device)
    tokens, logp = sample_race(logits, 1e30, keys, pos, impl="triton", chunk=256)
    ref_tokens, ref_logp = sample_race_ref(logits, 1e30, keys, pos)
    assert tokens.tolist() == ref_tokens.tolist()
    assert int(tokens[1]) == 7 and bool((tokens < 250).all())
    allowed = torch.tensor([250.0, 1, 250, 250, 250, 250], device=device)
    torch.testing.assert_close(logp, -allowed.log(), rtol=0, atol=1e-6)
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=ATOL)
    for temperature in (1e38, 1e50, 1e300, float("inf"), 1e-39):
        for impl in ("triton", "ref"):
            with pytest.raises(ValueError, match=r"temperature must be 0 or in .* got " + re.escape(str(temperature))):
                sample_race(logits, temperature, keys, pos, impl=impl, chunk=256)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_row_keys_outside_32_bits_draw_as_their_low_word(device):
    # the kernels read a row key's low 32 bits (a uint32 cast); the reference (the CPU path) mixed all
    # 64 and drew other tokens for negative keys or keys >= 2^32 ([414, 438, 67, 469] vs the kernel's
    # [147, 180, 570, 414] here): both now draw what the key's low word draws
    x = _logits(4, 600, torch.float32, device, scale=0.3)
    keys = torch.tensor([-1, -12345, 2**40 + 5, 2**33], device=device)
    pos = torch.tensor([3], device=device)
    low = keys & 0xFFFFFFFF
    want = sample_race_ref(x, 1.0, low, pos)[0]
    assert sample_race_ref(x, 1.0, keys, pos)[0].tolist() == want.tolist()
    assert sample_race(x, 1.0, keys, pos, impl="triton", chunk=256)[0].tolist() == want.tolist()


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_numpy_and_fraction_temperatures_draw_as_python_floats(device):
    # a numpy.float32 temperature made 1 / T a numpy.float32, which the kernel launch cannot convert
    # (TypeError); a Fraction divided no tensor in the reference: both now draw what the float draws
    import fractions

    import numpy as np

    x = _logits(4, 600, torch.float32, device)
    keys, pos = _keys(4, seed=9, device=device), torch.tensor([5], device=device)
    want_tokens, want_logp = sample_race_ref(x, 0.75, keys, pos)
    for temperature in (np.float32(0.75), np.float64(0.75), fractions.Fraction(3, 4)):
        for impl in ("triton", "ref"):
            tokens, logp = sample_race(x, temperature, keys, pos, impl=impl, chunk=256)
            assert tokens.tolist() == want_tokens.tolist(), (type(temperature), impl)
            torch.testing.assert_close(logp, want_logp, rtol=0, atol=ATOL)
