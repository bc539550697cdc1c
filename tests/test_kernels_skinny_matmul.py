"""Split-K decode linear (kernels/skinny_matmul.py) vs its reference and F.linear.

fp32: kernel, reference and F.linear agree within a relative 1e-5 of the output scale. bf16: the
error budget of helpers/kernel_checks.py against the fp64 spec on the same rounded inputs. Every
split count (one split written directly, several reduced), masked edges in M, N and K, strided
inputs, with and without a bias; the reduction is deterministic (bitwise equal repeats).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.kernel_checks import DEVICES, FLOOR, rel_err

from minigrpo.kernels import skinny_linear, skinny_linear_ref
from minigrpo.kernels.skinny_matmul import MAX_ROWS, _skinny_linear_triton, split_k

CASES = [  # (M, N, K, k_split, block_n, block_k, bias); k_split None: the launcher's choice
    (1, 64, 128, None, 64, 128, False),  # one row
    (5, 100, 70, None, 32, 32, True),  # every edge masked, several splits
    (16, 96, 256, 256, 32, 64, True),  # one split: written directly with its bias
    (64, 80, 300, 64, 32, 32, False),  # full row tile, 5 splits, the last one short
    (7, 48, 200, 96, 16, 32, True),  # k_split of three tiles, N smaller than two blocks
]


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}-N{}-K{}-split{}-bias{}".format(*c[:4], c[6]))
def test_kernel_matches_reference_and_linear(case, dtype, device):
    M, N, K, k_split, block_n, block_k, has_bias = case
    g = torch.Generator(device="cpu").manual_seed(M * N + K)
    x = torch.randn(M, K, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    w = (torch.randn(N, K, generator=g, dtype=torch.float64) / K**0.5).to(device=device, dtype=dtype)
    b = torch.randn(N, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) if has_bias else None
    got = _skinny_linear_triton(x, w, b, k_split=k_split, block_n=block_n, block_k=block_k)
    assert got.shape == (M, N) and got.dtype == dtype
    spec = F.linear(x.double(), w.double(), None if b is None else b.double())
    if dtype == torch.float32:
        scale = spec.abs().max().item()
        torch.testing.assert_close(got, skinny_linear_ref(x, w, b), rtol=0, atol=1e-5 * scale)
        torch.testing.assert_close(got, F.linear(x, w, b), rtol=0, atol=1e-5 * scale)
    else:
        e_k, e_t = rel_err(got, spec), rel_err(F.linear(x, w, b), spec)
        assert e_k <= 2 * e_t + FLOOR[dtype], f"kernel {e_k:.2e} vs F.linear in bf16 {e_t:.2e}"
    again = _skinny_linear_triton(x, w, b, k_split=k_split, block_n=block_n, block_k=block_k)
    assert torch.equal(got, again)  # a fixed order of sums: the same bits every time


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_public_function_strided_rows_and_fallbacks(device):
    # the decode input is (B, 1, K), here the last position of a (B, T, K) tensor (a strided view)
    B, T, N, K = 6, 3, 72, 96
    hidden = torch.randn(B, T, K, device=device)
    x = hidden[:, -1:]  # (B, 1, K), row stride T * K
    w, b = torch.randn(N, K, device=device) / K**0.5, torch.randn(N, device=device)
    got = skinny_linear(x, w, b, impl="triton")
    assert got.shape == (B, 1, N)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=0, atol=1e-5)
    # more rows than the kernel's tile, and a weight that needs a gradient: F.linear itself
    many = torch.randn(MAX_ROWS + 1, K, device=device)
    assert torch.equal(skinny_linear(many, w, b, impl="triton"), F.linear(many, w, b))
    w_train = w.clone().requires_grad_()
    out = skinny_linear(x, w_train, b, impl="triton")
    out.sum().backward()
    torch.testing.assert_close(w_train.grad, x.reshape(-1, K).sum(0).expand(N, K), rtol=1e-5, atol=1e-5)


def test_auto_is_the_reference_on_cpu_and_split_sizes(monkeypatch):
    from minigrpo.kernels import skinny_matmul

    def no_kernel(*args, **kwargs):
        raise AssertionError("auto ran the Triton path on the CPU")

    monkeypatch.setattr(skinny_matmul, "_skinny_linear_triton", no_kernel)
    x, w = torch.randn(4, 32), torch.randn(16, 32)
    assert torch.equal(skinny_linear(x, w), skinny_linear_ref(x, w))
    # Qwen2.5-1.5B's decode matmuls (N, K) -> (columns of K per split, programs): q/o, k/v, gate/up,
    # down, the LM head; splits are whole K tiles, at most one split per tile
    want = {(1536, 1536): (256, 144), (256, 1536): (128, 48), (8960, 1536): (768, 280), (1536, 8960): (896, 240),
            (151936, 1536): (1536, 2374)}  # fmt: skip
    for (N, K), (k_split, programs) in want.items():
        assert split_k(N, K) == k_split, (N, K, split_k(N, K))
        assert -(-N // 64) * -(-K // k_split) == programs


# ----------------------------------------------------------------------------------------------
# Through the model
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["llama", "phi3-fused"])
def test_sampler_with_split_k_decode_matmuls_draws_the_same_tokens(variant, monkeypatch):
    # every linear layer of a decode step (q, k, v, o, gate, up, down; Phi-3: qkv, o, gate_up, down)
    # goes through the kernel (interpreter), and the sampler draws what it draws with F.linear
    from helpers.tiny import tiny_model

    from minigrpo.models import transformer
    from minigrpo.sampling.kv_sampler import KVCacheSampler
    from minigrpo.sampling.params import SamplingParams

    calls = []

    def spy(x, w, b=None, **kw):
        calls.append(tuple(w.shape))
        return skinny_linear(x, w, b, **kw)

    monkeypatch.setattr(transformer, "skinny_linear", spy)

    class Chars:
        pad_token_id, eos_token_id = 0, 2

        def decode(self, ids, skip_special_tokens=False):
            return "".join(chr(33 + i % 90) for i in ids)

    kw = dict(model_type="phi3", partial_rotary_factor=0.5) if variant == "phi3-fused" else {}
    model = tiny_model(seed=4, **kw)
    model.decode_attention_impl = "triton"  # decode steps take the kernel path (DecodeInputs)
    prompts = [[1, 5, 9, 13, 17], [1, 40, 41]]
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=6, ignore_stop=True)
    plain = KVCacheSampler(model, Chars()).generate(prompts, params, key=(1, 2, 3))
    assert not calls
    model.decode_matmul_impl = "triton"
    split = KVCacheSampler(model, Chars()).generate(prompts, params, key=(1, 2, 3))
    per_layer = 4 if variant == "phi3-fused" else 7
    assert len(calls) == 5 * model.args.n_layers * per_layer  # 5 decode steps (the first token is the prefill's)
    assert torch.equal(split.completion_ids, plain.completion_ids)
    torch.testing.assert_close(split.sampler_logp, plain.sampler_logp, rtol=0, atol=1e-5)
