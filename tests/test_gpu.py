"""CUDA-only paths: graph-captured decoding, Triton kernels inside the model, bf16 training with fp32
master weights. Skipped without a GPU; their logic is covered on CPU by the other test files."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny import tiny_model

from minigrpo.logprobs import completion_logprobs
from minigrpo.sampling.kv_sampler import KVCacheSampler
from minigrpo.sampling.params import SamplingParams

pytestmark = pytest.mark.gpu


class Tok:
    pad_token_id = 0
    stop_ids = (2,)

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


PROMPTS = [[1, 5, 9, 13, 17, 21, 25], [1, 40, 41], [1, 77, 78, 79, 80]]


@pytest.fixture(autouse=True)
def _exact_matmuls():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def test_model_on_cuda_matches_cpu():
    cpu = tiny_model(seed=3, model_type="qwen3", head_dim=24)
    gpu = tiny_model(seed=3, model_type="qwen3", head_dim=24).cuda()
    ids = torch.randint(3, 128, (3, 17))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        a = cpu(ids, attention_mask=mask)
        b = gpu(ids.cuda(), attention_mask=mask.cuda()).cpu()
    assert (a - b)[mask.bool()].abs().max() < 1e-4


@pytest.mark.parametrize("bucket", [8, 256])
def test_graph_decoding_equals_eager(bucket):
    model = tiny_model(seed=4).cuda()
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=40, ignore_stop=True)
    graphs = KVCacheSampler(model, Tok(), cuda_graphs=True, kv_bucket=bucket).generate(PROMPTS, params)
    eager = KVCacheSampler(model, Tok(), cuda_graphs=False, kv_bucket=bucket).generate(PROMPTS, params)
    assert torch.equal(graphs.completion_ids, eager.completion_ids)
    assert (graphs.sampler_logp - eager.sampler_logp).abs().max() < 1e-5


def test_merged_lora_graph_decoding_equals_eager_and_the_trainer():
    """bf16 LoRA model, the adapters merged into packed copies for the rollout: graphs replay them as
    eager decoding runs them, and the trainer's (unmerged) log-probs stay within bf16 noise."""
    from minigrpo.config import LoRACfg
    from minigrpo.lora import apply_lora, lora_layers

    model = tiny_model(seed=4, dtype=torch.bfloat16).cuda()
    apply_lora(model, LoRACfg(r=4, alpha=8))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0.0, 0.05)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=40, ignore_stop=True)
    graphs = KVCacheSampler(model, Tok(), cuda_graphs=True, kv_bucket=8).generate(PROMPTS, params, key=(1, 0, 0))
    eager = KVCacheSampler(model, Tok(), cuda_graphs=False, kv_bucket=8).generate(PROMPTS, params, key=(1, 0, 0))
    assert torch.equal(graphs.completion_ids, eager.completion_ids)
    with torch.no_grad():
        trainer = completion_logprobs(model, graphs.input_ids(), graphs.attention_mask(), graphs.completion_mask)
    diff = (trainer - graphs.sampler_logp)[graphs.completion_mask.bool()].abs()
    assert diff.mean() < 0.05 and all(layer.frozen_weight is None for layer in lora_layers(model).values())


@pytest.mark.parametrize("max_rows", [1, 4])
def test_graph_decoding_in_waves_equals_one_batch(max_rows):
    """Each wave captures its own graphs; the tokens are those of one batch (split invariance)."""
    model = tiny_model(seed=4).cuda()
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=40, ignore_stop=True)
    one = KVCacheSampler(model, Tok(), cuda_graphs=True, kv_bucket=8).generate(PROMPTS, params, key=(3, 1, 0))
    waves = KVCacheSampler(model, Tok(), cuda_graphs=True, kv_bucket=8, max_rows=max_rows)
    waves = waves.generate(PROMPTS, params, key=(3, 1, 0))
    assert torch.equal(waves.completion_ids, one.completion_ids)
    assert (waves.sampler_logp - one.sampler_logp).abs().max() < 1e-5


def test_graph_decoding_with_compaction_equals_the_static_batch():
    """Finished rows leave the batch (graphs captured anew for the smaller one): same tokens. With 17
    stop ids and few rows, torch.isin would sort and sync inside the capture (kv_sampler.is_stop)."""
    model = tiny_model(seed=4).cuda()
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=48, stop_ids=tuple(range(3, 20)))
    static = KVCacheSampler(model, Tok(), kv_bucket=8, compact_below=0.0).generate(PROMPTS, params, key=(2, 1, 0))
    compact = KVCacheSampler(model, Tok(), kv_bucket=8, check_every=2, compact_below=0.9)
    compact = compact.generate(PROMPTS, params, key=(2, 1, 0))
    assert compact.stats["compactions"] >= 1 and len(set(static.completion_lengths.tolist())) > 2
    # the first step captures, and so does the step after each compaction (the graphs replay old buffers)
    assert static.stats["graph_captures"] >= 1 and compact.stats["graph_captures"] >= compact.stats["compactions"] + 1
    assert torch.equal(compact.completion_ids, static.completion_ids)
    assert (compact.sampler_logp - static.sampler_logp).abs().max() < 1e-5


def test_graphs_capture_again_after_a_reset_while_a_captured_tensor_lives():
    """A compaction drops the graphs while a tensor allocated in their pool is still referenced (an
    evaluation on the H100 failed so, 'use_count > 0'): the next capture goes to a new pool.

    The loop's first capture appends twice: the warm-up's tensor (computed) and the captured one
    (allocated in the pool, computed only by a replay); a later capture appends once and replays at
    once. A replay does not call the step again."""
    from minigrpo.sampling.decode_graphs import DecodeGraphs

    x, kept = torch.arange(4.0, device="cuda"), []
    graphs = DecodeGraphs()
    graphs.run(8, lambda: kept.append(x * 2))  # kept[1] lives in the first pool from here on
    graphs.reset()
    graphs.run(8, lambda: kept.append(x + 1))  # the capture that failed into the old pool; replayed
    graphs.run(8, lambda: kept.append(None))  # replay: fills kept[2] again, appends nothing
    torch.cuda.synchronize()
    assert graphs.captures == 2 and len(kept) == 3
    assert kept[0].tolist() == [0, 2, 4, 6] and kept[2].tolist() == [1, 2, 3, 4]


def test_captures_record_while_the_gpu_is_still_busy():
    """A new bucket is recorded without waiting for the steps queued before it (no device sync):
    a long kernel is queued, the capture returns before it ends, and the replays still see its result."""
    from minigrpo.sampling.decode_graphs import DecodeGraphs

    a = torch.randn(4096, 4096, device="cuda")
    x = torch.zeros(4, device="cuda")
    graphs = DecodeGraphs()
    graphs.run(8, lambda: x.add_(1))  # warm-up (x = 1) and the first capture
    torch.cuda.synchronize()
    busy, done = torch.cuda.Event(), torch.cuda.Event()
    busy.record()
    y = a
    for _ in range(20):
        y = torch.tanh(a @ y / 64)  # tens of milliseconds of queued work, finite
    x.add_(y[0, :4].isnan().float())  # x depends on the queued work (adds 0)
    done.record()
    graphs.run(16, lambda: x.mul_(3))  # capture, then replay: x = 3
    assert not done.query()  # the host did not wait for the queued work
    graphs.run(8, lambda: None)  # replay of the first graph: x = 4
    torch.cuda.synchronize()
    assert x.tolist() == [4.0] * 4 and graphs.captures == 2


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_sampler_logprobs_match_trainer_on_cuda(dtype, tol):
    model = tiny_model(seed=5, dtype=dtype).cuda()
    params = SamplingParams(n=4, temperature=0.8, max_new_tokens=33, stop_ids=(2, 7))
    out = KVCacheSampler(model, Tok(), kv_bucket=16).generate(PROMPTS, params)
    with torch.no_grad():
        logp = completion_logprobs(model, out.input_ids(), out.attention_mask(), out.completion_mask, temperature=0.8)
    err = (logp - out.sampler_logp).abs().max().item()
    assert err < tol, f"{dtype}: max |trainer - sampler| = {err:.2e}"


def test_bf16_update_moves_fp32_master_weights():
    from minigrpo.config import TrainCfg
    from minigrpo.optim import MasterWeights, build_optimizer

    model = tiny_model(seed=6, dtype=torch.bfloat16).cuda()
    opt = build_optimizer(model.parameters(), TrainCfg(lr=1e-6))
    assert isinstance(opt, MasterWeights)
    start = [m.clone() for m in opt.masters]
    ids = torch.randint(3, 128, (4, 16), device="cuda")
    for _ in range(3):
        loss = model(ids).float().logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    moved = max((m - s).abs().max().item() for m, s in zip(opt.masters, start))
    assert 1e-7 < moved < 1e-4  # ~3 steps of lr 1e-6, far below bf16 resolution of the weights
    for p, m in zip(model.parameters(), opt.masters):
        assert torch.equal(p, m.to(torch.bfloat16))


def test_fused_adamw_on_cuda_steps_as_foreach_does():
    """build_optimizer takes torch's fused AdamW on CUDA: the same steps as the foreach one."""
    from minigrpo.config import TrainCfg
    from minigrpo.optim import build_optimizer, decay_groups

    cfg = TrainCfg(lr=1e-3, weight_decay=0.01)
    models = [tiny_model(seed=7, dtype=torch.bfloat16).cuda() for _ in range(2)]
    fused = build_optimizer(models[0].parameters(), cfg)
    assert fused.inner.defaults["fused"]
    foreach = build_optimizer(models[1].parameters(), cfg)
    groups = decay_groups(foreach.masters, 0.01)  # no decay on biases and norm gains, as build_optimizer groups them
    foreach.inner = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.01, betas=cfg.betas, foreach=True)
    assert foreach.param_groups is foreach.inner.param_groups  # the wrapper reads through to its inner optimizer
    ids = torch.randint(3, 128, (4, 16), device="cuda")
    start = [m.clone() for m in foreach.masters]
    for model, opt in zip(models, (fused, foreach)):  # one step: the same gradients on both sides
        model(ids).float().logsumexp(-1).mean().backward()
        opt.step()
    assert max((m - s).abs().max().item() for m, s in zip(foreach.masters, start)) > 1e-4  # a real step
    for a, b in zip(fused.masters, foreach.masters):
        assert (a - b).abs().max().item() <= 1e-6 * max(b.abs().max().item(), 1.0)


def test_training_loop_learns_on_gpu_in_bf16(tmp_path):
    from test_train import launch, run_config

    cfg = run_config(tmp_path, run={"device": "cuda", "dtype": "bfloat16"})
    rewards = [r["reward"] for r in launch(tmp_path, cfg)]
    assert rewards[0] <= 0.2 and sum(rewards[-10:]) / 10 >= 0.9, [round(r, 2) for r in rewards]


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_lora_training_learns_on_gpu_in_bf16(tmp_path, quantize):
    """Adapters stored in fp32 and computed in bf16, over a bf16 or NF4 base, learn the task."""
    from test_train import launch, run_config

    if quantize:
        pytest.importorskip("bitsandbytes")
    cfg = run_config(
        tmp_path,
        run={"device": "cuda", "dtype": "bfloat16"},
        lora={"enabled": True, "r": 16, "alpha": 32, "quantize_base": quantize},
        train={"lr": 0.003},
    )
    rewards = [r["reward"] for r in launch(tmp_path, cfg)]
    assert rewards[0] <= 0.2 and sum(rewards[-10:]) / 10 >= 0.85, [round(r, 2) for r in rewards]


def test_training_loop_learns_on_gpu_in_fp16(tmp_path):
    """float16 weights and activations with the dynamic loss scale (divided out on the fp32 masters)
    learn the task as bf16 does; the scale is reported and stays a power of two."""
    from test_train import launch, run_config

    cfg = run_config(tmp_path, run={"device": "cuda", "dtype": "float16"})
    records = launch(tmp_path, cfg)
    rewards = [r["reward"] for r in records]
    assert rewards[0] <= 0.2 and sum(rewards[-10:]) / 10 >= 0.9, [round(r, 2) for r in rewards]
    scales = [r["loss_scale"] for r in records]
    assert all(s >= 1 and float(s).is_integer() and (int(s) & (int(s) - 1)) == 0 for s in scales), scales
