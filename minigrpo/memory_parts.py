"""Memory model, part by part: the bytes of each thing one GRPO (or SFT) step holds on the device.

memory.py adds these up into the phases of a step (estimate_peak, estimate_sft_peak: a
MemoryEstimate) and checks them against the device (preflight); each function here is checked
against a measurement in tests/test_memory.py.

Static terms are counted exactly: 16-bit weights, NF4 codes with their quant state (quant.py), fp32
LoRA adapters, AdamW moments (fp32, on fp32 master copies of 16-bit parameters as optim.py keeps
them), bitsandbytes' 8-bit AdamW (two uint8 states plus an fp32 absmax per 256 values).

Activations are counted from what our `Transformer` keeps for the backward, tensor by tensor (the
list is in `saved_bytes_per_token`); with n = micro_batch x T tokens, per block:

    saved = n * [b (4D + 2 Dq + 2 Dkv + 4F) + 4H + 8]  (+ micro_batch * T * T * b, a float attention
                                                           bias, only where a sliding window < T)

b = bytes of the model dtype, Dq = H * Dh, Dkv = Hkv * Dh, F = intermediate size. The four D-sized
tensors are the block input and the three norm outputs / residual sums, 2 Dq + 2 Dkv are the
attention's q, k, v and output, 4F the SwiGLU's gate, up, silu(gate) and product (3F with the
fused kernel on CUDA, which recomputes silu), 4H the attention
log-sum-exp and 8 the two norms' rstd. (The CPU reference kernels keep fp32 copies for the norms:
`impl="ref"` counts those.) Without checkpointing every block keeps its set until the backward;
with it, each block keeps only its input (n * b * D), one block's set exists at a time during the
recomputation, and with offload the inputs wait in pinned host memory instead (two at a time on
the device). On top come the rotary angles (and boolean masks, only for sliding windows shorter than
the sequence: padded rows otherwise run as plain causal attention) shared by all blocks, the final norm,
the log-prob kernel (one logits tile of about 32M elements, or the fused policy head's block of
whole rows, about 160M on CUDA; the selected hidden states, dh and, when the LM head trains, dW)
and the backward's own temporaries (gradients of the block's intermediates; calibrated below). The
CPU tests measure all of this with an allocation tracker (a TorchDispatchMode that follows every
tensor's storage, tests/helpers/allocations.py) and hold the estimate within 10% of it.
"""

from __future__ import annotations

import math

import torch

from minigrpo.config import Config, resolve_dtype
from minigrpo.kernels.logprobs import plan_chunks
from minigrpo.kernels.policy_head import plan_rows
from minigrpo.memory_estimate import GiB as GiB  # re-exported: eval_memory.py imports them from here
from minigrpo.memory_estimate import MemoryEstimate as MemoryEstimate
from minigrpo.models.args import ModelArgs
from minigrpo.optim import STEP_BUCKET_BYTES

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_LORA_TARGETS = {  # short target name -> (module, in dim, out dim) as a function of ModelArgs
    "q": lambda a: (a.dim, a.n_heads * a.head_dim),
    "k": lambda a: (a.dim, a.n_kv_heads * a.head_dim),
    "v": lambda a: (a.dim, a.n_kv_heads * a.head_dim),
    "o": lambda a: (a.n_heads * a.head_dim, a.dim),
    "gate": lambda a: (a.dim, a.intermediate_size),
    "up": lambda a: (a.dim, a.intermediate_size),
    "down": lambda a: (a.intermediate_size, a.dim),
}
# Backward temporaries of one block beyond its saved set, in units of n * b * F and n * b * D
# (gradients of the SwiGLU intermediates, of the attention inputs and of the residual stream).
# Calibrated with the allocation tracker on CPU (tests/test_memory.py) and by torch.cuda peaks on an H100.
_BWD_F, _BWD_D = 2, 1
_LOSS_FP32_PER_TOKEN = 16  # the GRPO loss's (N, Tc) fp32 temporaries (ratios, clips, masks, ...)
_SFT_BYTES_PER_TOKEN = 9  # SFT's loss-position mask (bool) and the negated log-probs (fp32), ~ per token
# cuBLAS / cuBLASLt / cuDNN workspaces, which torch allocates through its caching allocator: a
# constant 64-66 MiB over three small configs on an H100 (torch 2.11, benchmarks/bench_memory.py --quick)
CUDA_WORKSPACES = 65 * 2**20


# ================================================================================================
# static terms


def optimizer_notes(cfg: Config) -> list[str]:
    """What the estimate cannot count of the configured optimizer."""
    if cfg.train.optimizer == "paged_adamw8bit":
        return ["paged 8-bit AdamW keeps its state in CUDA managed memory (not in torch's allocator)"]
    return []


def dtype_bytes(cfg: Config, device_type: str) -> int:
    """Bytes per element of the model dtype that `run.dtype` means on `device_type`."""
    return _DTYPE_BYTES[resolve_dtype(cfg.run.dtype, device_type)]


def linear_shapes(args: ModelArgs) -> list[tuple[int, int]]:
    """(out, in) of every linear weight of one block (fused qkv / gate_up as the checkpoint has them)."""
    d, q, kv, f = args.dim, args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.intermediate_size
    attn = [(q + 2 * kv, d)] if args.fused_qkv else [(q, d), (kv, d), (kv, d)]
    mlp = [(2 * f, d)] if args.fused_gate_up else [(f, d), (f, d)]
    return [*attn, (d, q), *mlp, (d, f)]


def weight_bytes(args: ModelArgs, b: int, quantize: str | None = None) -> int:
    """Device bytes of the model's weights: all in the model dtype, or block linears in NF4."""
    total = args.num_params() * b
    if quantize is None:
        return total
    from minigrpo.quant import nf4_weight_bytes

    dense = sum(o * i for o, i in linear_shapes(args)) * args.n_layers
    nf4 = sum(nf4_weight_bytes(o * i) for o, i in linear_shapes(args)) * args.n_layers
    return total - dense * b + nf4


def dequantized_weight_bytes(args: ModelArgs, cfg: Config, b: int) -> int:
    """The dense weight a 4-bit layer (lora.quantize_base) makes for each call (quant.NF4Linear: its
    codes dequantized to the compute dtype, freed after the matmul; the backward makes it again): the
    largest block linear, one at a time in every pass of the model."""
    quantized = cfg.lora.enabled and cfg.lora.quantize_base is not None
    return max(o * i for o, i in linear_shapes(args)) * b if quantized else 0


def lora_adapter_shapes(args: ModelArgs, targets: list[str] | tuple[str, ...]) -> list[tuple[str, int, int]]:
    """(group, in, out) of each adapter of one block. As lora.py does, Phi-3's fused qkv_proj and
    gate_up_proj get one adapter for all the targets they hold."""
    for t in targets:
        if t not in _LORA_TARGETS:
            raise ValueError(f"unknown LoRA target {t!r}; known: {sorted(_LORA_TARGETS)}")
    out: list[tuple[str, int, int]] = []
    d, f = args.dim, args.intermediate_size
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    if args.fused_qkv and any(t in targets for t in ("q", "k", "v")):
        out.append(("qkv", d, q + 2 * kv))
    else:
        out += [("qkv", *_LORA_TARGETS[t](args)) for t in ("q", "k", "v") if t in targets]
    if "o" in targets:
        out.append(("o", q, d))
    if args.fused_gate_up and any(t in targets for t in ("gate", "up")):
        out.append(("gate_up", d, 2 * f))
    else:
        out += [("gate_up", *_LORA_TARGETS[t](args)) for t in ("gate", "up") if t in targets]
    if "down" in targets:
        out.append(("down", f, d))
    return out


def lora_params(args: ModelArgs, r: int, targets: list[str]) -> int:
    """Adapter parameters: r * (in + out) per adapter per block."""
    return sum(r * (i + o) for _, i, o in lora_adapter_shapes(args, targets)) * args.n_layers


def optimizer_state_bytes(numels: list[int], optimizer: str) -> int:
    """AdamW moments on the stepped (fp32) values: 8 bytes each; 8-bit AdamW: two uint8 states and an
    fp32 absmax per 256 values, for tensors of >= 4096 elements (smaller ones keep 32-bit states)."""
    if optimizer == "adamw":
        return 8 * sum(numels)
    total = 0
    for n in numels:
        total += 2 * n + 2 * 4 * math.ceil(n / 256) if n >= 4096 else 8 * n
    return total


def step_transient_bytes(
    n: int, masters: bool, optimizer: str, largest: int, bucket_bytes: int = STEP_BUCKET_BYTES, grad_b: int = 0
) -> int:
    """Bytes an optimizer step adds at its peak, for n stepped values whose largest tensor has
    `largest`. With fp32 masters (optim.MasterWeights) the step goes a bucket at a time: one bucket
    of fp32 gradients (bucket_bytes, or the largest tensor alone), and for AdamW its foreach
    temporaries of as many values; stepped directly, AdamW's temporaries for all n values.
    grad_b: the bytes of a 16-bit gradient, to count the bucket's gradients as freed (each goes as
    its fp32 copy is made); 0 counts them as still held."""
    if not masters:
        return 4 * n if optimizer == "adamw" else 0
    bucket = min(4 * n, max(bucket_bytes, 4 * largest))
    return bucket * (2 if optimizer == "adamw" else 1) - bucket // 4 * grad_b


def parameter_numels(args: ModelArgs, *, head: bool = True) -> list[int]:
    """numel of every parameter tensor of the model, one entry each (8-bit AdamW decides per tensor
    whether its state is 8-bit): the embedding, each block's linears, biases, RMSNorm gains (and
    Qwen3's q / k norms), the final norm and, untied (and `head`), the LM head."""
    d, q, kv, f = args.dim, args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.intermediate_size
    dh = args.head_dim
    biases = ([q + 2 * kv] if args.fused_qkv else [q, kv, kv]) if args.qkv_bias else []
    biases += [d] if args.o_bias else []
    biases += ([2 * f] if args.fused_gate_up else [f, f]) + [d] if args.mlp_bias else []
    block = [o * i for o, i in linear_shapes(args)] + biases + [d, d] + ([dh, dh] if args.qk_norm else [])
    untied = [args.vocab_size * d] if head and not args.tie_word_embeddings else []
    return [args.vocab_size * d, *block * args.n_layers, d, *untied]


def trainable_numels(args: ModelArgs, cfg: Config) -> list[int]:
    """numel of every trainable tensor: LoRA A and B per target and block, or every parameter."""
    if cfg.lora.enabled:
        out = []
        for _, i, o in lora_adapter_shapes(args, cfg.lora.targets):
            out += [cfg.lora.r * i, cfg.lora.r * o] * args.n_layers
        return out
    return parameter_numels(args)


def trainer_bytes(args: ModelArgs, cfg: Config, b: int) -> dict[str, int]:
    """What the trained model holds for the whole run, GRPO's policy and SFT's model alike: weights
    (NF4 blocks under QLoRA), fp32 LoRA adapters, fp32 masters of 16-bit weights trained in full
    (optim.MasterWeights), the optimizer's state; and `gradients` (fp32 for adapters, the model dtype
    otherwise) and `numel`, the values the optimizer steps."""
    lora = cfg.lora
    numels = trainable_numels(args, cfg)
    n = sum(numels)
    out = {"weights": weight_bytes(args, b, lora.quantize_base if lora.enabled else None)}
    if lora.enabled:
        out["lora_adapters"] = 4 * n
    out["master_weights"] = 4 * n if b < 4 and not lora.enabled else 0
    out["optimizer_state"] = optimizer_state_bytes(numels, cfg.train.optimizer)
    widened = 0 if lora.enabled else fp32_gain_bytes(args, cfg, b)  # the gains and their gradients
    out["weights"] += widened
    return {**out, "gradients": 4 * n if lora.enabled else b * n + widened, "numel": n}


def fp32_gain_bytes(args: ModelArgs, cfg: Config, b: int) -> int:
    """Bytes a 16-bit model trained in full adds by keeping its RMSNorm gains in fp32 (train.fp32_norms,
    Transformer.norms_in_fp32), to its weights and as much to its gradients: (4 - b) per gain, the two
    norms of each block (and Qwen3's q / k norms) and the final one."""
    if b >= 4 or not cfg.train.fp32_norms:
        return 0
    per_block = 2 * args.dim + (2 * args.head_dim if args.qk_norm else 0)
    return (4 - b) * (args.n_layers * per_block + args.dim)


def vllm_share(cfg: Config, device_total: int | None) -> int:
    """Bytes a colocated vLLM sampler takes: sampler.gpu_memory_utilization of the device's total
    (0 when the total is unknown). It holds them while it generates, and all along unless it sleeps
    (sampler.vllm_sleep) while the trainer runs."""
    return int(cfg.sampler.gpu_memory_utilization * device_total) if device_total else 0


def value_model_bytes(args: ModelArgs, cfg: Config, b: int) -> dict[str, int]:
    """The PPO critic's static bytes (algorithms/value_model.py): weights, gradients, fp32 masters,
    optimizer state, and `numel`, the values its optimizer steps. `separate`: a body like the
    policy's without the LM head, every weight trained, in the model dtype, plus the (1, D) fp32
    head; `lora`: a second adapter set on the policy's base (fp32, as the policy's) plus the head."""
    head = args.dim  # (1, D) fp32
    if cfg.ppo.value_model == "lora":
        numels = [*trainable_numels(args, cfg), head]
        n = sum(numels)
        weights, masters = 4 * n, 0
    else:
        numels = parameter_numels(args, head=False)  # a critic has no LM head
        body = sum(numels)
        numels, n = [*numels, head], body + head
        weights = b * body + 4 * head + fp32_gain_bytes(args, cfg, b)  # its gains fp32 as the policy's
        masters = 4 * n if b < 4 else 0  # optim.MasterWeights steps fp32 copies of 16-bit weights
    optimizer = optimizer_state_bytes(numels, cfg.train.optimizer)
    return {"weights": weights, "gradients": weights, "masters": masters, "optimizer": optimizer, "numel": n}


# ================================================================================================
# activations


def saved_bytes_per_token(
    args: ModelArgs,
    b: int,
    impl: str = "triton",
    trainable: str = "full",
    lora_targets: tuple[str, ...] = (),
    lora_r: int = 0,
    lora_dropout: bool = False,
) -> int:
    """Bytes one block keeps for its backward per token, its own input excluded (counted apart, as
    the checkpoint boundary) and the attention bias excluded (it is per (query, key) pair).

    trainable: "full" (every weight), "linears" (the block linears only: norms, embedding and head
    frozen) or "lora" (adapters of `lora_r` on `lora_targets` over a frozen base, computed in the
    activations' dtype). Per token, with b the model dtype's bytes:
        always        q, k after RoPE, v, the attention output: b (2 Dq + 2 Dkv); its log-sum-exp 4H;
                      gate, up, silu(gate): 3 b F (the fused SwiGLU kernel: gate and up, 2 b F);
                      the post-attention sum h: b D; two rstd: 8
        base linears  their inputs: b (2 D + F) (q/k/v input, MLP input, down_proj's; o_proj reads
                      the attention output, already kept)
        adapters      without dropout the adapters keep the input they share with the base; with
                      dropout each keeps its own dropped-out copy plus the mask (bool on CUDA,
                      float on CPU); A's scaled output (r)
    impl="ref" (the CPU reference kernels): the norms keep fp32 copies of their inputs (the block
    input's when the dtype is 16-bit, h's always) and, when their weights train, their outputs too.
    """
    d, dq, dkv, f = args.dim, args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.intermediate_size
    a = max(b, 4)
    swiglu = (2 if impl == "triton" else 3) * b * f
    core = b * (2 * dq + 2 * dkv) + 4 * args.n_heads + swiglu + 8
    norms_train = trainable == "full"
    if impl == "triton":
        norms = b * d
    else:
        norms = (a if b < 4 else 0) * d + a * d + (2 * b * d if norms_train else 0)
    if trainable in ("full", "linears"):
        inputs = b * (2 * d + f)
    else:
        inputs = 0
        adapters = lora_adapter_shapes(args, lora_targets)
        for group in ("qkv", "o", "gate_up", "down"):
            widths = [i for g, i, _ in adapters if g == group]
            if widths and lora_dropout:  # each adapter keeps dropout(x) and the mask
                mask = 1 if impl == "triton" else b  # CUDA: a bool mask; CPU: a float one
                inputs += (b + mask) * sum(widths)  # (the frozen base keeps no input)
            elif widths and group != "o":  # o_proj's input is the attention output, kept anyway
                inputs += b * widths[0]  # one tensor shared by the adapters that read it
        inputs += len(adapters) * lora_r * b  # A's scaled outputs
    qk_norm = (dq + dkv) * b + 4 * (args.n_heads + args.n_kv_heads) if args.qk_norm else 0
    return core + norms + inputs + qk_norm


def forward_transient_per_token(args: ModelArgs, b: int) -> int:
    """Bytes per token alive at once inside one block's forward without autograd (prefill, old/ref
    log-probs): the residual stream and the larger of the attention's and the SwiGLU's tensors."""
    d, dq, dkv, f = args.dim, args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.intermediate_size
    attn = 3 * dq + 3 * dkv + d
    mlp = 4 * f + d
    return b * (2 * d + max(attn, mlp))


def activation_bytes(
    args: ModelArgs,
    *,
    micro_batch: int,
    seq_len: int,
    completion_len: int,
    b: int,
    checkpointing: bool,
    offload: bool = False,
    impl: str = "triton",
    trainable: str = "full",
    lora_targets: tuple[str, ...] = (),
    lora_r: int = 0,
    lora_dropout: bool = False,
    device_type: str = "cuda",
    objective: str = "grpo",
) -> dict[str, int]:
    """What one micro-batch's forward + backward adds on top of the static terms, in bytes.

    trainable, lora_*: what trains, as in `saved_bytes_per_token` ("full" also trains the LM head).
    Keys: blocks (kept by the blocks until their backward: inputs, or every saved set without
    checkpointing, plus the rotary angles and masks they share), head (the final norm's and the
    log-prob kernel's saved tensors), head_backward (the kernel's backward buffers), recompute
    (one block's saved set while it is recomputed), backward (that block's backward temporaries),
    loss, peak, offload_host (pinned CPU bytes). objective: "grpo" (the log-prob kernel or the fused
    policy head, whichever holds more, and the loss's per-token fp32 temporaries) or "sft" (the
    cross-entropy kernel alone on completion_len loss tokens, a scalar loss; minigrpo/sft.py).

    The peak is the larger of two moments: the log-prob kernel's backward (every block's tensors
    still kept) and the first block's backward (the head's tensors freed by then).
    """
    n, n_c, T, L = micro_batch * seq_len, micro_batch * completion_len, seq_len, args.n_layers
    d, a = args.dim, max(b, 4)
    boundary = n * b * d  # one block's input
    per_token = saved_bytes_per_token(args, b, impl, trainable, tuple(lora_targets), lora_r, lora_dropout)
    windows = masked_windows(args, T)
    per_block = n * per_token + (micro_batch * T * T * b if windows else 0)  # + a float attention bias
    shared = 2 * n * (args.rotary_dim // 2) * 4 + windows * micro_batch * T * T  # cos, sin fp32; bool masks
    if checkpointing:
        inputs = (min(L, 2) if offload and device_type == "cuda" else L) * boundary
        blocks, recompute = inputs + shared, per_block
    else:  # each block's input is kept by its first norm (the reference norm keeps only an fp32 copy)
        kept_input = 0 if impl != "triton" and b < 4 else boundary
        blocks, recompute = L * (kept_input + per_block) + shared, 0
    trainable_base = trainable == "full"
    final_norm = n * ((b if impl == "triton" else a) * d + 4 + (b * d if trainable_base and impl != "triton" else 0))
    final_norm += n * 16  # left padding: the rotated ids and the rotation's index (transformer.rotate_rows)
    head = final_norm + n_c * (b * d + 8 + 4 + 4) + 2 * n_c * 4 * 2  # + selected states, targets, lse, entropy
    rows, cols = plan_chunks(max(n_c, 1), args.vocab_size, torch.device(device_type))
    # the logits buffer: the log-prob kernel's tile, or the fused policy head's block of whole rows
    tile = rows * cols
    if objective == "grpo":
        tile = max(tile, plan_rows(max(n_c, 1), args.vocab_size, torch.device(device_type)) * args.vocab_size)
    head_backward = tile * b + n_c * b * d + rows * d * 4 + n_c * 8
    head_backward += args.vocab_size * d * b if trainable_base else 0  # dW of the LM head
    if impl != "triton":
        # the reference tile math's fp32 temporaries: GRPO's 4 (entropy too); SFT's two in the backward
        # or three in the forward (no dh, dW yet), whichever holds more
        ref = 4 * tile * 4 if objective == "grpo" else max(2 * tile * 4, 3 * tile * 4 + tile * b - head_backward)
        head_backward += ref
    backward = n * b * (_BWD_F * args.intermediate_size + _BWD_D * d)
    if impl != "triton" and b < 4:
        backward += n * 2 * a * d  # the reference norms' fp32 gradients
    loss = n_c * _LOSS_FP32_PER_TOKEN * 4 if objective == "grpo" else n_c * _SFT_BYTES_PER_TOKEN
    peak = max(blocks + head + head_backward, blocks + recompute + backward) + loss
    return {
        "blocks": blocks,
        "head": head,
        "head_backward": head_backward,
        "recompute": recompute,
        "backward": backward,
        "loss": loss,
        "peak": peak,
        "offload_host": L * boundary if offload and checkpointing and device_type == "cuda" else 0,
    }


ACTIVATION_PARTS = ("activations_blocks", "activations_head", "logprob_backward", "activations_recompute")
ACTIVATION_PARTS += ("block_backward", "loss")


def micro_batch_activations(cfg: Config, args: ModelArgs, mb: int, T: int, n_loss: int, b: int, device_type: str, **kw):
    """activation_bytes of one micro-batch of mb rows of T tokens, n_loss of them (per row) reaching
    the LM head, with the model's memory settings and what trains (adapters or every weight)."""
    lora = cfg.lora
    return activation_bytes(
        args,
        micro_batch=mb,
        seq_len=T,
        completion_len=n_loss,
        b=b,
        checkpointing=cfg.model.gradient_checkpointing,
        offload=cfg.model.activation_offload,
        impl="triton" if device_type == "cuda" else "ref",
        trainable="lora" if lora.enabled else "full",
        lora_targets=tuple(lora.targets) if lora.enabled else (),
        lora_r=lora.r,
        lora_dropout=lora.enabled and lora.dropout > 0,
        device_type=device_type,
        **kw,
    )


def activation_parts(act: dict[str, int]) -> dict[str, int]:
    """The parts of activation_bytes' peak, at its moment: the LM-head kernel's backward (every block's
    tensors still kept), or the first block's recompute + backward (the head's tensors freed)."""
    at_head = act["head"] + act["head_backward"] >= act["recompute"] + act["backward"]
    return {
        "activations_blocks": act["blocks"],
        "activations_head": act["head"] if at_head else 0,
        "logprob_backward": act["head_backward"] if at_head else 0,
        "activations_recompute": 0 if at_head else act["recompute"],
        "block_backward": 0 if at_head else act["backward"],
        "loss": act["loss"],
    }


def update_bytes(act: dict[str, int], grads: int, later_grads: int = 0, *, accumulating=True, head_grad=0, layers=1):
    """The update phase above the static bytes: one micro-batch's activations (activation_bytes) and the
    gradients then held: `grads` and `later_grads` (PPO's critic, whose pass follows), all of them for a
    later micro-batch of an optimizer step (`accumulating`). The only one of a step makes them as its
    backward goes: none at the LM head's (its dW in head_backward becomes the gradient), `head_grad` at
    the last layer's, all (nearly) at the first layer's, the other `layers`' tensors freed by then."""
    if accumulating:
        return act["peak"] + grads + later_grads
    at_head = act["blocks"] + act["head"] + act["head_backward"]
    block_backward = act["recompute"] + act["backward"]
    at_last_layer = act["blocks"] + block_backward + head_grad
    at_first_layer = act["blocks"] // layers + block_backward + grads
    value_pass = act["blocks"] + block_backward + grads if later_grads else 0
    return max(at_head, at_last_layer, at_first_layer, value_pass) + act["loss"]


def kv_cache_bytes(args: ModelArgs, sequences: int, length: int, b: int) -> int:
    """The sampler's static KV cache: sequences x length x 2 (k, v) x layers x Hkv x Dh x b."""
    return sequences * length * 2 * args.n_layers * args.n_kv_heads * args.head_dim * b


def episode_rollout_bytes(
    args: ModelArgs, rows: int, max_rows: int | None, prompt_len: int, episode_len: int, turn_len: int, b: int
) -> tuple[int, int, int]:
    """(rows decoded at once, their KV cache, the largest prefill transient) of `rows` multi-turn
    episodes on the own sampler (minigrpo/episodes.py): rows of at most prompt_len + episode_len
    tokens, turns of at most turn_len, every row its own prompt (a turn's prompt is the episode so far).

    A turn's cache spans S = prompt_len + episode_len + turn_len slots at most: the longest history
    and a turn of any row after it (the turns share slot columns). In a session
    (sampling/kv_session.py) every row keeps S slots between turns and a prefill forward takes at most
    PREFILL_TOKENS tokens (rows x columns), each attending to at most S keys. Decoding in waves
    (max_rows < rows) there is no session: a turn prefills whole histories into a cache of their
    own, then copies it into the decode cache, as a plain rollout prefills its prompts (memory.py)."""
    from minigrpo.sampling.kv_session import PREFILL_TOKENS

    T, per_token = prompt_len + episode_len, forward_transient_per_token(args, b)
    S = T + turn_len
    if max_rows is None or rows <= max_rows:
        cols = min(T, max(1, PREFILL_TOKENS // rows))
        return rows, kv_cache_bytes(args, rows, S, b), rows * cols * (per_token + S * (1 + b))
    n = max_rows
    prefill = kv_cache_bytes(args, n, T, b) + n * T * per_token + n * T * T * (1 + b)
    return n, kv_cache_bytes(args, n, S, b), prefill


def masked_windows(args: ModelArgs, seq_len: int) -> int:
    """Distinct sliding windows shorter than the sequence: the only attention that still needs a
    (B, T, T) mask (padded rows of the usual shape run as plain causal attention)."""
    return len({w for w in args.layer_windows if w is not None and w < seq_len})


def nograd_forward_bytes(args: ModelArgs, mb: int, T: int, Tc: int, b: int, device_type: str) -> int:
    """One micro-batch through completion_logprobs under no_grad: the largest block transient, the
    masks, the final hidden states and the kernel's tile."""
    n, n_c = mb * T, mb * Tc
    rows, cols = plan_chunks(max(n_c, 1), args.vocab_size, torch.device(device_type))
    windows = masked_windows(args, T)
    masks = windows * mb * T * T + (mb * T * T * b if windows else 0)
    return (
        n * forward_transient_per_token(args, b) + masks + 2 * n * b * args.dim + n_c * b * args.dim + rows * cols * b
    )
