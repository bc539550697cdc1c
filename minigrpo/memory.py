"""Memory pre-flight: the peak device memory of one GRPO step, predicted before step 1.

    est = estimate_peak(cfg, model.args, prompt_tokens=512)     # MemoryEstimate: parts, phases, total
    print(est.table())
    preflight(cfg, model.args, device, prompt_tokens=512)       # raises MemoryPreflightError if it cannot fit

A step has four phases whose peaks never overlap (each frees its working memory before the next):

    rollout     weights + optimizer state + KV cache N x (Tp + Tc) + prefill or decode transient
    logprobs    weights + optimizer state + one micro-batch forward without autograd  (old / ref passes)
    update      weights + optimizer state + gradients + one micro-batch's activations at their peak
    optimizer   weights + optimizer state + gradients + the optimizer's own temporaries

Static terms are counted exactly: 16-bit weights, NF4 codes with their quant state (quant.py), fp32
LoRA adapters, AdamW moments (fp32, on fp32 master copies of 16-bit parameters as optim.py keeps
them), bitsandbytes' 8-bit AdamW (two uint8 states plus an fp32 absmax per 256 values).

Activations are counted from what our `Transformer` keeps for the backward, tensor by tensor (the
list is in `saved_bytes_per_token`); with n = micro_batch x T tokens, per block:

    saved = n * [b (4D + 2 Dq + 2 Dkv + 4F) + 4H + 8]  (+ micro_batch * T * T * b, a float attention
                                                           bias, only where a sliding window < T)

b = bytes of the model dtype, Dq = H * Dh, Dkv = Hkv * Dh, F = intermediate size. The four D-sized
tensors are the block input and the three norm outputs / residual sums, 2 Dq + 2 Dkv are the
attention's q, k, v and output, 4F the SwiGLU's gate, up, silu(gate) and product, 4H the attention
log-sum-exp and 8 the two norms' rstd. (The CPU reference kernels keep fp32 copies for the norms:
`impl="ref"` counts those.) Without checkpointing every block keeps its set until the backward;
with it, each block keeps only its input (n * b * D), one block's set exists at a time during the
recomputation, and with offload the inputs wait in pinned host memory instead (two at a time on
the device). On top come the rotary angles (and boolean masks, only for sliding windows shorter than
the sequence: padded rows otherwise run as plain causal attention) shared by all blocks, the final norm,
the log-prob kernel (one logits tile of about 32M elements, the selected hidden states, dh and,
when the LM head trains, dW) and the backward's own temporaries (gradients of the block's
intermediates; calibrated below). The CPU tests measure all of this with `AllocationTracker` (a
TorchDispatchMode that follows every tensor's storage) and hold the estimate within 10% of it.

The estimate is of memory *allocated* by torch; the caching allocator reserves somewhat more
(fragmentation), which `preflight` covers with a margin.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from minigrpo.config import Config, resolve_dtype
from minigrpo.models.args import ModelArgs
from minigrpo.sampling.params import generation_waves

GiB = 2**30
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
# Calibrated by `AllocationTracker` on CPU (tests/test_memory.py) and by torch.cuda peaks on an H100.
_BWD_F, _BWD_D = 2, 1
_LOSS_FP32_PER_TOKEN = 16  # the GRPO loss's (N, Tc) fp32 temporaries (ratios, clips, masks, ...)
# cuBLAS / cuBLASLt / cuDNN workspaces, which torch allocates through its caching allocator: a
# constant 64-66 MiB over three small configs on an H100 (torch 2.11, benchmarks/bench_memory.py --quick)
_CUDA_WORKSPACES = 65 * 2**20


class MemoryPreflightError(RuntimeError):
    """The configured step does not fit in the device's free memory."""


@dataclass
class MemoryEstimate:
    """Predicted bytes per component (`parts`), per phase (`phases`) and their maximum (`total`)."""

    parts: dict[str, int]
    phases: dict[str, int]
    host: dict[str, int] = field(default_factory=dict)  # pinned CPU memory (activation offload)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    def table(self) -> str:
        """The breakdown as aligned text: components, then phases (the peak one marked)."""
        lines = ["memory pre-flight (GiB)"]
        for name, v in self.parts.items():
            if v:
                lines.append(f"  {name:<28}{v / GiB:9.2f}")
        for name, v in self.host.items():
            lines.append(f"  {name + ' (host)':<28}{v / GiB:9.2f}")
        lines.append("  phases:")
        for name, v in self.phases.items():
            mark = "  <- peak" if name == self.peak_phase else ""
            lines.append(f"    {name:<26}{v / GiB:9.2f}{mark}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"parts": self.parts, "phases": self.phases, "host": self.host, "total": self.total}


# ================================================================================================
# static terms


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


def trainable_numels(args: ModelArgs, cfg: Config) -> list[int]:
    """numel of every trainable tensor: LoRA A and B per target and block, or every parameter."""
    if cfg.lora.enabled:
        out = []
        for _, i, o in lora_adapter_shapes(args, cfg.lora.targets):
            out += [cfg.lora.r * i, cfg.lora.r * o] * args.n_layers
        return out
    return [args.num_params()]  # full fine-tuning: the total is what matters


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
                      gate, up, silu(gate): 3 b F; the post-attention sum h: b D; two rstd: 8
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
    core = b * (2 * dq + 2 * dkv) + 4 * args.n_heads + 3 * b * f + 8
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
) -> dict[str, int]:
    """What one micro-batch's forward + backward adds on top of the static terms, in bytes.

    trainable, lora_*: what trains, as in `saved_bytes_per_token` ("full" also trains the LM head).
    Keys: blocks (kept by the blocks until their backward: inputs, or every saved set without
    checkpointing, plus the rotary angles and masks they share), head (the final norm's and the
    log-prob kernel's saved tensors), head_backward (the kernel's backward buffers), recompute
    (one block's saved set while it is recomputed), backward (that block's backward temporaries),
    loss, peak, offload_host (pinned CPU bytes).

    The peak is the larger of two moments: the log-prob kernel's backward (every block's tensors
    still kept) and the first block's backward (the head's tensors freed by then).
    """
    from minigrpo.kernels.logprobs import _plan

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
    rows, cols = _plan(max(n_c, 1), args.vocab_size, torch.device(device_type), None)
    head_backward = rows * cols * b + n_c * b * d + rows * d * 4 + n_c * 8
    head_backward += args.vocab_size * d * b if trainable_base else 0  # dW of the LM head
    if impl != "triton":
        head_backward += 4 * rows * cols * 4  # the reference tile math's fp32 temporaries
    backward = n * b * (_BWD_F * args.intermediate_size + _BWD_D * d)
    if impl != "triton" and b < 4:
        backward += n * 2 * a * d  # the reference norms' fp32 gradients
    loss = n_c * _LOSS_FP32_PER_TOKEN * 4
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


def kv_cache_bytes(args: ModelArgs, sequences: int, length: int, b: int) -> int:
    """The sampler's static KV cache: sequences x length x 2 (k, v) x layers x Hkv x Dh x b."""
    return sequences * length * 2 * args.n_layers * args.n_kv_heads * args.head_dim * b


# ================================================================================================
# the whole step


def estimate_peak(
    cfg: Config,
    model_args: ModelArgs,
    *,
    prompt_tokens: int,
    device_type: str = "cuda",
    device_total: int | None = None,
) -> MemoryEstimate:
    """Predict the peak device memory of one training step of `cfg` on `model_args`.

    prompt_tokens: the longest prompt in tokens (Tp); completions are taken at sampler.max_new_tokens.
    device_type: "cuda" (Triton kernels) or "cpu" (reference kernels, fp32 norm copies).
    device_total: the device's total bytes; needed only to count a colocated vLLM sampler.
    """
    args, lora, tr, g = model_args, cfg.lora, cfg.train, cfg.grpo
    b = dtype_bytes(cfg, device_type)
    impl = "triton" if device_type == "cuda" else "ref"
    Tp, Tc = prompt_tokens, cfg.sampler.max_new_tokens
    T, B, G = Tp + Tc, g.prompts_per_step, g.group_size
    N, mb = B * G, min(tr.micro_batch_size, B * G)
    offload = bool(getattr(cfg.model, "activation_offload", False))
    parts: dict[str, int] = {}
    notes: list[str] = []

    # ---- static: weights, adapters, masters, optimizer state
    quantize = lora.quantize_base if lora.enabled else None
    parts["weights"] = weight_bytes(args, b, quantize)
    numels = trainable_numels(args, cfg)
    n_train = sum(numels)
    if lora.enabled:
        parts["lora_adapters"] = 4 * n_train  # fp32 adapters
        grad_bytes, masters = 4 * n_train, 0
    else:
        grad_bytes = b * n_train
        masters = 4 * n_train if b < 4 else 0  # optim.MasterWeights
    parts["master_weights"] = masters
    parts["optimizer_state"] = optimizer_state_bytes(numels, tr.optimizer)
    if tr.optimizer == "paged_adamw8bit":
        notes.append("paged 8-bit AdamW keeps its state in CUDA managed memory (not in torch's allocator)")
    parts["reference_model"] = parts["weights"] if g.beta > 0 and not lora.enabled else 0
    parts["cuda_workspaces"] = _CUDA_WORKSPACES if device_type == "cuda" else 0
    static = sum(parts.values())

    # ---- rollout: KV cache + prefill / decode transients
    vocab = args.vocab_size
    if cfg.sampler.kind == "vllm":
        parts["kv_cache"] = 0
        vllm = int(cfg.sampler.gpu_memory_utilization * device_total) if device_total else 0
        parts["vllm"] = vllm
        if not device_total:
            notes.append("vLLM's share (sampler.gpu_memory_utilization x device memory) is not counted")
        rollout = static + vllm
    else:
        waves = generation_waves(B, G, cfg.sampler.max_rows)  # the largest wave decides
        Bw = max(p1 - p0 for p0, p1, _, _ in waves)  # prompts prefilled at once
        Nw = max((p1 - p0) * (c1 - c0) for p0, p1, c0, c1 in waves)  # rows decoded at once
        parts["kv_cache"] = kv_cache_bytes(args, Nw, T, b)
        small = kv_cache_bytes(args, Bw, Tp, b)  # the prefill's cache, copied into the big one
        prefill = small + Bw * Tp * forward_transient_per_token(args, b) + Bw * Tp * Tp * (1 + b)
        decode = Nw * vocab * (b + 4 * 5) + (Nw * vocab * 12 if _filters(cfg) else 0)
        decode += N * Tc * (8 + 4) if len(waves) > 1 else 0  # finished waves' tokens and log-probs
        parts["rollout_transient"] = max(prefill, decode)
        rollout = static + parts["kv_cache"] + parts["rollout_transient"]

    # ---- old / reference log-prob passes: a forward without autograd per micro-batch
    need_logprobs = g.num_iterations > 1 or g.beta > 0 or g.is_correction is not None
    nograd = _nograd_forward_bytes(args, mb, T, Tc, b, device_type)
    logprobs = static + nograd if need_logprobs else 0

    # ---- update: gradients + one micro-batch's activations
    act = activation_bytes(
        args,
        micro_batch=mb,
        seq_len=T,
        completion_len=Tc,
        b=b,
        checkpointing=cfg.model.gradient_checkpointing,
        offload=offload,
        impl=impl,
        trainable="lora" if lora.enabled else "full",
        lora_targets=tuple(lora.targets) if lora.enabled else (),
        lora_r=lora.r,
        lora_dropout=lora.enabled and lora.dropout > 0,
        device_type=device_type,
    )
    parts["gradients"] = grad_bytes
    parts["activations_blocks"] = act["blocks"]
    at_head = act["blocks"] + act["head"] + act["head_backward"] >= act["blocks"] + act["recompute"] + act["backward"]
    # the moment of the peak: the log-prob kernel's backward, or the first block's recompute + backward
    parts["activations_head"] = act["head"] if at_head else 0
    parts["logprob_backward"] = act["head_backward"] if at_head else 0
    parts["activations_recompute"] = 0 if at_head else act["recompute"]
    parts["block_backward"] = 0 if at_head else act["backward"]
    parts["loss"] = act["loss"]
    update = static + grad_bytes + act["peak"]

    # ---- optimizer step: fp32 copies of 16-bit grads (MasterWeights) + AdamW's foreach temporaries
    step_tmp = (4 * n_train if masters else 0) + (4 * n_train if tr.optimizer == "adamw" else 0)
    parts["optimizer_step_transient"] = step_tmp
    optimizer = static + grad_bytes + step_tmp

    host = {"activation_offload": act["offload_host"]} if act["offload_host"] else {}
    phases = {"rollout": rollout, "logprobs": logprobs, "update": update, "optimizer": optimizer}
    return MemoryEstimate(parts=parts, phases=phases, host=host, notes=notes)


def _filters(cfg: Config) -> bool:
    s = cfg.sampler
    return s.top_p < 1.0 or s.top_k > 0 or s.min_p > 0


def masked_windows(args: ModelArgs, seq_len: int) -> int:
    """Distinct sliding windows shorter than the sequence: the only attention that still needs a
    (B, T, T) mask (padded rows of the usual shape run as plain causal attention)."""
    return len({w for w in args.layer_windows if w is not None and w < seq_len})


def _nograd_forward_bytes(args: ModelArgs, mb: int, T: int, Tc: int, b: int, device_type: str) -> int:
    """One micro-batch through completion_logprobs under no_grad: the largest block transient, the
    masks, the final hidden states and the kernel's tile."""
    from minigrpo.kernels.logprobs import _plan

    n, n_c = mb * T, mb * Tc
    rows, cols = _plan(max(n_c, 1), args.vocab_size, torch.device(device_type), None)
    windows = masked_windows(args, T)
    masks = windows * mb * T * T + (mb * T * T * b if windows else 0)
    return (
        n * forward_transient_per_token(args, b) + masks + 2 * n * b * args.dim + n_c * b * args.dim + rows * cols * b
    )


# ================================================================================================
# pre-flight: compare with the device, and say what to change


def preflight(
    cfg: Config,
    model_args: ModelArgs,
    device: torch.device | str,
    prompt_tokens: int,
    *,
    free_bytes: int | None = None,
    total_bytes: int | None = None,
    margin: float = 0.05,
    verbose: bool = True,
) -> MemoryEstimate:
    """Print the predicted breakdown; raise MemoryPreflightError when it exceeds the free memory.

    free_bytes / total_bytes default to `torch.cuda.mem_get_info(device)`, the free bytes plus what
    torch already reserves in this process (the estimate counts the weights and optimizer state, so
    it may be called before or after they are on the device); on CPU nothing is checked (the
    estimate is still returned). The error names the settings that would make the step fit, each
    with the total it would predict. `margin` is the share of the memory kept for the allocator's
    fragmentation and the CUDA graphs' pools.
    """
    device = torch.device(device)
    if device.type == "cuda" and free_bytes is None:
        free_bytes, total_bytes = torch.cuda.mem_get_info(device)
        free_bytes += torch.cuda.memory_reserved(device)
    est = estimate_peak(cfg, model_args, prompt_tokens=prompt_tokens, device_type=device.type, device_total=total_bytes)
    if verbose:
        print(est.table())
    if free_bytes is None:
        return est
    budget = int(free_bytes * (1 - margin))
    if est.total <= budget:
        return est
    fixes = suggest_fixes(cfg, model_args, prompt_tokens=prompt_tokens, budget=budget, device_type=device.type)
    lines = [
        f"a training step is predicted to need {est.total / GiB:.1f} GiB at its peak ({est.peak_phase} phase), "
        f"but {device} has {free_bytes / GiB:.1f} GiB free ({budget / GiB:.1f} GiB usable with a {margin:.0%} margin).",
        "Largest parts: "
        + ", ".join(f"{k} {v / GiB:.1f} GiB" for k, v in sorted(est.parts.items(), key=lambda kv: -kv[1])[:4]),
    ]
    if fixes:
        lines.append("Settings that would fit (each alone, predicted peak):")
        lines += [
            f"  --set {key}={_show(new)}   ({key}={_show(old)} -> {_show(new)}: {total / GiB:.1f} GiB)"
            for key, old, new, total in fixes
        ]
    else:
        lines.append("No single setting change fits; combine several of: " + ", ".join(_KNOBS))
    raise MemoryPreflightError("\n".join(lines))


def _show(value: Any) -> str:
    """A value as `--set` takes it (YAML: true/false, null)."""
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else str(value)


_KNOBS = (
    "model.gradient_checkpointing",
    "model.activation_offload",
    "train.micro_batch_size",
    "train.optimizer",
    "lora.enabled",
    "lora.quantize_base",
    "sampler.max_rows",
    "sampler.max_new_tokens",
    "grpo.group_size",
    "grpo.prompts_per_step",
)


def suggest_fixes(
    cfg: Config, model_args: ModelArgs, *, prompt_tokens: int, budget: int, device_type: str = "cuda"
) -> list[tuple[str, Any, Any, int]]:
    """(key, old, new, predicted total) for each single setting change that brings the peak under
    `budget`, the least intrusive first (memory techniques before smaller batches and shorter outputs)."""

    def total(c: Config) -> int:
        return estimate_peak(c, model_args, prompt_tokens=prompt_tokens, device_type=device_type).total

    def with_(key: str, value: Any) -> Config:
        c = copy.deepcopy(cfg)
        section, name = key.split(".")
        setattr(getattr(c, section), name, value)
        return c

    out: list[tuple[str, Any, Any, int]] = []

    def consider(key: str, value: Any) -> bool:
        section, name = key.split(".")
        old = getattr(getattr(cfg, section), name)
        if old == value:
            return False
        t = total(with_(key, value))
        if t <= budget:
            out.append((key, old, value, t))
            return True
        return False

    m, tr, g = cfg.model, cfg.train, cfg.grpo
    consider("model.gradient_checkpointing", True)
    if m.gradient_checkpointing and hasattr(m, "activation_offload") and device_type == "cuda":
        consider("model.activation_offload", True)
    N = g.prompts_per_step * g.group_size
    for size in sorted((d for d in range(1, tr.micro_batch_size) if N % d == 0), reverse=True):
        if consider("train.micro_batch_size", size):
            break
    if tr.optimizer == "adamw" and device_type == "cuda":
        consider("train.optimizer", "adamw8bit")
    if not cfg.lora.enabled:
        consider("lora.enabled", True)
    elif cfg.lora.quantize_base is None and device_type == "cuda":
        consider("lora.quantize_base", "nf4")
    # the longest completions that fit (bisection over max_new_tokens)
    lo, hi = 0, cfg.sampler.max_new_tokens
    while hi - lo > max(1, cfg.sampler.max_new_tokens // 64):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total(with_("sampler.max_new_tokens", mid)) <= budget else (lo, mid)
    if cfg.sampler.kind == "own":  # fewer rows decoded at once: the same tokens, a smaller KV cache
        rows = min(cfg.sampler.max_rows or N, N)
        while rows > 1 and not consider("sampler.max_rows", rows // 2):
            rows //= 2
    if 0 < lo < cfg.sampler.max_new_tokens:
        consider("sampler.max_new_tokens", lo)
    for size in range(g.group_size - 1, 1, -1):
        if (g.prompts_per_step * size) % tr.micro_batch_size == 0 and consider("grpo.group_size", size):
            break
    for count in range(g.prompts_per_step - 1, 0, -1):
        if (count * g.group_size) % tr.micro_batch_size == 0 and consider("grpo.prompts_per_step", count):
            break
    return out


# ================================================================================================
# measuring on CPU: every tensor storage allocated under the mode, live and peak


class AllocationTracker(TorchDispatchMode):
    """Bytes of the tensor storages created while active: `live` now, `peak` at most.

    A storage is counted from the op that returns it until it is freed (checked by weak reference
    before every op and when `live` is read). Storages made before entering (parameters, inputs)
    are not counted, nor views of them, nor an op's internal workspaces. Works on any device; the
    CPU tests use it where torch.cuda's counters are unavailable.
    """

    def __init__(self) -> None:
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef

        self._ref = StorageWeakRef
        self._live: dict[int, tuple[Any, int, Any, tuple[int, ...]]] = {}  # ref, bytes, op, shape
        self._bytes = 0
        self.peak = 0

    @property
    def live(self) -> int:
        """Bytes alive now."""
        self._prune()
        return self._bytes

    def _prune(self) -> None:
        dead = [k for k, (ref, *_) in self._live.items() if ref.expired()]
        for k in dead:
            self._bytes -= self._live.pop(k)[1]

    def live_tensors(self) -> list[tuple[int, str, tuple[int, ...]]]:
        """(bytes, creating op, shape) of every storage alive now, largest first (for inspection)."""
        self._prune()
        return sorted(((n, str(op), shape) for _, n, op, shape in self._live.values()), key=lambda x: -x[0])

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._prune()
        out = func(*args, **(kwargs or {}))
        inputs = {
            self._ref(t.untyped_storage()).cdata
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and t.device.type != "meta"
        }
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                ref = self._ref(storage)
                if ref.cdata not in self._live and ref.cdata not in inputs and storage.nbytes():  # views: not new
                    self._live[ref.cdata] = (ref, storage.nbytes(), func, tuple(t.shape))
                    self._bytes += storage.nbytes()
        self.peak = max(self.peak, self._bytes)
        return out


__all__ = [
    "AllocationTracker",
    "MemoryEstimate",
    "MemoryPreflightError",
    "activation_bytes",
    "estimate_peak",
    "kv_cache_bytes",
    "lora_params",
    "optimizer_state_bytes",
    "preflight",
    "saved_bytes_per_token",
    "suggest_fixes",
    "weight_bytes",
]
