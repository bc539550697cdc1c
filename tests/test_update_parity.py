"""One GRPO update under every memory setting gives the gradients of a plain fp64 reference.

The reference scores each row alone (its real prompt tokens, then its completion: no padding at all)
with an fp64 copy of the model, writes the loss out from its definition (grpo_formulas.md: clipped
ratio, two-sided cap, k3 KL, each loss type's aggregation) and backpropagates with autograd. The
trainer's path (step.micro_batches + update_loss.micro_batch_loss in fp32) must match it within
1e-5 of the largest gradient (observed ~1e-6) for gradient checkpointing off / on / with offload,
micro-batches of 1, 3 and all 5 rows (an uneven last one), the general and the fused LM head, left-
and right-padded prompts of different lengths (one of a single token), completions that fill the
width, stop after one token or are empty. Log-probs are also checked against transformers.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from helpers.tiny import tiny_model

from minigrpo import grpo, lora
from minigrpo.config import LoRACfg
from minigrpo.logprobs import completion_logprobs
from minigrpo.sampling.rollout import Rollout
from minigrpo.step import micro_batches
from minigrpo.update_loss import micro_batch_loss

N, TP, TC, V = 5, 7, 6, 128
QWEN2 = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], use_sliding_window=False)
QWEN3 = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=16)
PHI3 = dict(model_type="phi3", architectures=["Phi3ForCausalLM"], partial_rotary_factor=0.5, sliding_window=None)
MISTRAL_WINDOW = dict(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=3, head_dim=16)
QWEN2_WINDOW = dict(QWEN2, use_sliding_window=True, sliding_window=3, max_window_layers=1)  # layer 1 windowed
# case: (model overrides, loss options, temperature, LoRA)
CASES = {
    "llama-tied-dapo": (dict(tie_word_embeddings=True), dict(loss_type="dapo"), 1.0, False),
    "qwen2-biases-grpo-kl": (QWEN2, dict(loss_type="grpo", beta=0.05), 0.7, False),
    "qwen3-qk-norm-dr-grpo-kl-lora": (QWEN3, dict(loss_type="dr_grpo", beta=0.1, max_completion_length=TC), 1.3, True),
    "phi3-partial-rotary-lora": (PHI3, dict(loss_type="dapo", epsilon_high=0.28), 0.8, True),
    "mistral-window-two-sided": (MISTRAL_WINDOW, dict(loss_type="grpo", delta=1.3), 0.9, False),
    "qwen2-window-layer-kl": (QWEN2_WINDOW, dict(loss_type="dapo", beta=0.2), 1.0, False),
}
SETTINGS = [(False, False), (True, False), (True, True)]  # (gradient checkpointing, activation offload)


def make_rollout(padding: str, generator: torch.Generator) -> Rollout:
    """N rows: prompts of 1..TP tokens (row 0 full, row 1 one token) padded on `padding`'s side,
    completions of 0..TC tokens (row 0 full and truncated, row 2 empty, row 3 one token)."""
    plen = torch.randint(1, TP + 1, (N,), generator=generator)
    clen = torch.randint(0, TC + 1, (N,), generator=generator)
    plen[0], plen[1], clen[0], clen[2], clen[3] = TP, 1, TC, 0, 1
    cols = torch.arange(TP)[None]  # (1, TP)
    pmask = (cols < plen[:, None] if padding == "right" else cols >= TP - plen[:, None]).long()  # (N, TP)
    cmask = (torch.arange(TC)[None] < clen[:, None]).long()  # (N, TC)
    return Rollout(
        prompt_ids=torch.randint(3, V, (N, TP), generator=generator) * pmask,
        prompt_mask=pmask,
        completion_ids=torch.randint(3, V, (N, TC), generator=generator) * cmask,
        completion_mask=cmask,
        sampler_logp=torch.zeros(N, TC),
        truncated=clen == TC,
        completion_texts=[""] * N,
        prompt_index=torch.arange(N),
        group_size=1,
    )


def build_model(overrides: dict, use_lora: bool, generator: torch.Generator):
    """A tiny fp32 model with random biases (zero at init) and, with LoRA, non-zero adapters."""
    model = tiny_model(seed=2, **overrides)
    if use_lora:
        lora.apply_lora(model, LoRACfg(enabled=True, r=2, alpha=4.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "lora_B" in name:
                p.normal_(0.0, 0.1, generator=generator)
    return model


def row_logprobs(model, rollout: Rollout, temperature: float) -> torch.Tensor:
    """(N, TC) log_softmax(logits / temperature)[token], each row scored alone without padding."""
    rows = []
    for i in range(N):
        prompt = rollout.prompt_ids[i][rollout.prompt_mask[i].bool()]  # (P,)
        L = int(rollout.completion_mask[i].sum())
        ids = torch.cat([prompt, rollout.completion_ids[i, :L]])[None]  # (1, P + L)
        logp = torch.log_softmax(model(ids)[0] / temperature, -1)  # (P + L, V)
        picked = logp[len(prompt) - 1 : len(prompt) - 1 + L].gather(-1, rollout.completion_ids[i, :L, None])[:, 0]
        rows.append(torch.cat([picked, picked.new_zeros(TC - L)]))
    return torch.stack(rows)  # (N, TC)


def reference_loss(logp, old, ref, adv, mask, o: dict) -> torch.Tensor:
    """The GRPO loss of the whole batch from its definition, in logp's dtype."""
    ratio = torch.exp(logp - old)  # (N, TC)
    eps, eps_high, delta = o.get("epsilon", 0.2), o.get("epsilon_high", 0.2), o.get("delta")
    capped = ratio if delta is None else torch.clamp(ratio, max=delta)
    a = adv[:, None]  # (N, 1)
    per_token = -torch.minimum(capped * a, ratio.clamp(1 - eps, 1 + eps_high) * a)
    if o.get("beta"):
        d = ref - logp
        per_token = per_token + o["beta"] * (torch.exp(d) - d - 1)
    m = mask.to(logp.dtype)
    summed = (per_token * m).sum(1)  # (N,)
    if o["loss_type"] == "grpo":
        return (summed / m.sum(1).clamp(min=1)).mean()
    if o["loss_type"] == "dr_grpo":
        return summed.sum() / (N * o["max_completion_length"])
    return summed.sum() / m.sum()  # dapo


def gradients(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}


def trainer_gradients(model, rollout, opts, mask, adv, old, ref, temperature, size, fused) -> dict[str, torch.Tensor]:
    """The update phase's gradient: micro-batches of `size` rows, each loss backpropagated."""
    model.zero_grad(set_to_none=True)
    model.train()
    normalizer = grpo.make_normalizer(mask, opts.loss_type, max_completion_length=opts.max_completion_length)
    for rows, ids, attn, cmask in micro_batches(rollout, size):
        Tc = cmask.shape[1]
        loss, _ = micro_batch_loss(
            model, ids, attn, cmask, mask[rows, :Tc], adv[rows], opts, normalizer,
            old_logp=old[rows, :Tc], ref_logp=None if ref is None else ref[rows, :Tc],
            temperature=temperature, fused=fused,
        )  # fmt: skip
        loss.backward()
    return gradients(model)


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("case", CASES)
def test_one_update_matches_an_fp64_reference_under_every_memory_setting(case, padding):
    overrides, options, temperature, use_lora = CASES[case]
    g = torch.Generator().manual_seed(1)
    model = build_model(overrides, use_lora, g)
    rollout = make_rollout(padding, g)
    adv = torch.randn(N, generator=g)
    mask = rollout.completion_mask
    exact = copy.deepcopy(model).double().train()
    with torch.no_grad():
        base = row_logprobs(exact, rollout, temperature).float()  # (N, TC)
    old = (base + 0.1 * torch.randn(N, TC, generator=g)) * mask  # off-policy: some ratios clip
    ref = (base + 0.2 * torch.randn(N, TC, generator=g)) * mask if options.get("beta") else None
    ref64 = None if ref is None else ref.double()
    logp64 = row_logprobs(exact, rollout, temperature)  # (N, TC) with grad
    reference_loss(logp64, old.double(), ref64, adv.double(), mask, options).backward()
    want = gradients(exact)
    scale = max(float(w.abs().max()) for w in want.values())
    assert scale > 1e-2, "the reference gradient is ~0: the case tests nothing"

    opts = grpo.LossOptions(**options)
    runs = [(s, b, f) for s in SETTINGS for b in (1, 3, N) for f in (False, True)]
    for (checkpointing, offload), size, fused in runs:
        model.gradient_checkpointing, model.activation_offload = checkpointing, offload
        got = trainer_gradients(model, rollout, opts, mask, adv, old, ref, temperature, size, fused)
        assert got.keys() == want.keys()
        worst = max(float((got[k] - want[k]).abs().max()) for k in want)
        setting = f"checkpointing={checkpointing} offload={offload} micro_batch={size} fused={fused}"
        assert worst <= 1e-5 * max(scale, 1.0), f"{setting}: max |grad diff| {worst:.2e} (largest grad {scale:.2e})"


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("family", ["llama", "mistral-window"])
def test_completion_logprobs_equal_transformers_on_each_row_alone(family, padding, tmp_path):
    """Token 0 of a completion is scored by the prompt's last real token (a one-token prompt, pads on
    either side), and a sliding window counts tokens, not the pads between prompt and completion."""
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from minigrpo.models.loading import save_pretrained

    g = torch.Generator().manual_seed(4)
    model = tiny_model(seed=5, **(MISTRAL_WINDOW if family == "mistral-window" else {}))
    save_pretrained(model, None, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    rollout = make_rollout(padding, g)
    ids, attn = rollout.input_ids(), rollout.attention_mask()
    with torch.no_grad():
        got = completion_logprobs(model, ids, attn, rollout.completion_mask, temperature=0.7)  # (N, TC)
        want = row_logprobs(lambda x: hf(x).logits, rollout, 0.7)  # (N, TC)
    worst = float((got - want).abs().max())
    assert worst <= 1e-5, f"max |logp diff| {worst:.2e}; per row {(got - want).abs().amax(1).tolist()}"


def test_a_sliding_window_counts_tokens_not_the_pads_inside_a_row():
    """A row with pads inside it (a multi-turn cache: history, the left pads of the next turn's block,
    its tokens; or a right-padded prompt before its completion) attends as the row alone does, with
    and without a KV cache, in the prefill and the decode step after it (window 3 < 8 tokens)."""
    from minigrpo.models.kv_cache import KVCache

    model = tiny_model(seed=2, **MISTRAL_WINDOW)
    ids = torch.randint(3, V, (1, 11), generator=torch.Generator().manual_seed(3))  # (1, 11)
    mask = torch.tensor([[0, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1]])  # (1, 11)
    real = mask[0].bool()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (1, 11)
    cache = KVCache(model.args, 1, 11, dtype=torch.float32, device=torch.device("cpu"))
    with torch.no_grad():
        alone = model.hidden(ids[:, real])  # (1, 7, D)
        plain = model.hidden(ids, attention_mask=mask)[:, real]
        prefill = model.hidden(
            ids[:, :10], attention_mask=mask[:, :10], position_ids=positions[:, :10], kv_cache=cache,
            cache_position=torch.arange(10),
        )[:, real[:10]]  # fmt: skip
        step = model.hidden(
            ids[:, 10:], attention_mask=mask, position_ids=positions[:, 10:], kv_cache=cache,
            cache_position=torch.tensor([10]),
        )  # fmt: skip
    for name, got in (("no cache", plain), ("prefill", prefill), ("decode", torch.cat([prefill, step], 1))):
        worst = float((got - alone[:, : got.shape[1]]).abs().max())
        assert worst <= 1e-5, f"{name}: max |hidden diff| {worst:.2e} against the row alone"
