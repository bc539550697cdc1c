"""One decoder-only Transformer for the Llama, Mistral, Qwen2/2.5, Qwen3 and Phi-3/3.5/4 families.

Every family difference is a field of `ModelArgs` (see args.py); module names follow the HF
checkpoints (`model.layers.0.self_attn.q_proj`, ...) so that weights load and save by name.

Shape glossary: B batch rows, T tokens in this forward, S key slots attended (T without a cache,
the cache length with one), D model dim, H / Hkv query / key-value heads, Dh head dim,
R rotary dim (<= Dh), V vocab.

Left padding: `attention_mask` (B, S) marks real tokens; position ids default to the running count
of real tokens, so a padded row computes exactly what it computes alone. Pad queries attend to
themselves only (never fully masked rows, hence no NaN), and no real query ever sees a pad key.
Without a KV cache, rows of the usual shape (pads, one run of real tokens, pads) need no mask: each
row is rotated so that its leading pads trail, where causal attention hides them from every real
query, runs as plain causal attention (flash kernels, no (B, T, T) mask in memory), and is rotated
back.

Decode steps (T == 1 over a KV cache) on CUDA rotate q/k and write k/v into the cache in one kernel
(kernels/kv_write.py) and attend with the split-K kernel of kernels/flash_decode.py, which reads the
2-D key mask and the slot directly (no 4-D mask); `Transformer.decode_attention_impl` chooses
("ref": apply_rotary, KVCache.update and SDPA with a 4-D mask, as on the CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minigrpo.kernels import apply_rotary, decode_attention, rms_norm, rotary_into_cache, swiglu, swiglu_halves
from minigrpo.kernels._triton import resolve_impl

from .args import ModelArgs
from .kv_cache import KVCache
from .offload import checkpoint_block
from .packed import joined_linear, pack_rows, packed_linear
from .rotary import RotaryAngles


class RMSNorm(nn.Module):
    """RMSNorm over the last dim; with `residual` it also returns the sum it normalised. The output
    has the input's dtype, also when the gain is kept in fp32 (Transformer.norms_in_fp32)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return rms_norm(x, self.weight, self.eps, residual=residual, out_dtype=x.dtype)


def attention_mask_4d(
    key_mask: torch.Tensor | None,
    cache_position: torch.Tensor,
    kv_len: int,
    window: int | None,
    batch_size: int,
) -> torch.Tensor:
    """Boolean (B, 1, T, S) mask: causal by slot, minus pad keys, within the sliding window.

    The window counts real tokens (key_mask 1), as the row alone would: pads inside a row (a
    right-padded prompt before its completion, a turn's left-padded block after the history) do not
    push real keys out of it. Without key_mask every slot is a token."""
    q = cache_position.view(-1, 1)  # (T, 1)
    j = torch.arange(kv_len, device=cache_position.device).view(1, -1)  # (1, S)
    allowed = j <= q  # (T, S)
    if window is not None and key_mask is None:
        allowed = allowed & (j > q - window)
    allowed = allowed.unsqueeze(0).expand(batch_size, -1, -1)  # (B, T, S)
    if key_mask is not None:
        real = key_mask[:, :kv_len].bool()  # (B, S)
        if window is not None:
            count = real.long().cumsum(-1)  # (B, S): real tokens up to and including each slot
            allowed = allowed & (count[:, None, :] > count[:, cache_position, None] - window)  # (B, T, S)
        allowed = allowed & real[:, None, :]
        allowed = allowed | (j == q)  # a pad query sees itself: no fully masked row
    return allowed.unsqueeze(1)


_DECODE_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # caches the kernel reads


@dataclass(frozen=True)
class DecodeInputs:
    """What the split-K decode kernel reads instead of a 4-D mask: one query per row (T == 1) at
    cache slot `slot`, attending slots [0, kv_len) of the cache (kernels/flash_decode.py)."""

    key_mask: torch.Tensor  # (B, >= kv_len) 1 for real keys, 0 for prompt padding
    slot: torch.Tensor  # (1,) the query's cache slot (a device tensor: read inside the kernel)
    kv_len: int  # slots the kernel may look at (the CUDA-graph bucket)


def padding_layout(attention_mask: torch.Tensor) -> tuple[bool, torch.Tensor | None]:
    """attention_mask (B, T) -> (plain, lead). plain: every row is pads, one run of real tokens, pads
    (or all pads), so causal attention needs no mask once each row is rotated left by lead (B,), its
    count of leading pads; lead is None when not plain or no row has any (nothing to rotate). One host
    sync."""
    real = attention_mask.bool()
    T = real.shape[1]
    count = real.sum(-1)  # (B,)
    lead = (real.cumsum(-1) == 0).sum(-1)  # (B,) pads before the first real token
    last = T - 1 - real.flip(-1).int().argmax(-1)  # (B,) the last real token
    contiguous = (count == 0) | (last - lead + 1 == count)
    plain, any_lead = torch.stack([contiguous.all(), (lead > 0).any()]).tolist()
    return plain, lead if plain and any_lead else None


def rotate_rows(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x (B, T, ...) with row b rotated left by shift[b]: out[b, t] = x[b, (t + shift[b]) % T].

    index_select on the flattened rows: its backward keeps only the index (gather's keeps x too)."""
    B, T = x.shape[:2]
    cols = (torch.arange(T, device=x.device) + shift.view(-1, 1)) % T  # (B, T)
    rows = (torch.arange(B, device=x.device) * T).view(-1, 1)  # (B, 1)
    return x.reshape(B * T, *x.shape[2:]).index_select(0, (rows + cols).view(-1)).view(x.shape)


class Attention(nn.Module):
    """GQA self-attention with optional q/k/v bias, q/k RMSNorm (Qwen3) and fused qkv (Phi-3)."""

    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.layer, self.args = layer, args
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        d, q_out, kv_out = args.dim, args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        if args.fused_qkv:
            self.qkv_proj = nn.Linear(d, q_out + 2 * kv_out, bias=args.qkv_bias)
        else:
            self.q_proj = nn.Linear(d, q_out, bias=args.qkv_bias)
            self.k_proj = nn.Linear(d, kv_out, bias=args.qkv_bias)
            self.v_proj = nn.Linear(d, kv_out, bias=args.qkv_bias)
        self.o_proj = nn.Linear(q_out, d, bias=args.o_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.norm_eps)

    def qkv_linears(self) -> list[nn.Module]:
        """The separate q, k, v projections ([] with a fused qkv_proj)."""
        return [] if self.args.fused_qkv else [self.q_proj, self.k_proj, self.v_proj]

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> q (B, T, H, Dh), k and v (B, T, Hkv, Dh)."""
        B, T, _ = x.shape
        if self.args.fused_qkv:
            q_out, kv_out = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            q, k, v = self.qkv_proj(x).split([q_out, kv_out, kv_out], dim=-1)
        else:  # one GEMM when q, k, v lie side by side in memory (packed.py)
            q, k, v = packed_linear(x, self.qkv_linears())
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if self.args.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        kv_cache: KVCache | None = None,
        cache_position: torch.Tensor | None = None,
        kv_len: int | None = None,
        decode: DecodeInputs | None = None,
    ) -> torch.Tensor:
        """With `decode` (T == 1 over kv_cache), one kernel rotates q and k and writes k and v into the
        cache at the slot, attention is the split-K kernel, and `mask` is unused."""
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x)
        if decode is not None:
            k_cache, v_cache = kv_cache.k[self.layer], kv_cache.v[self.layer]  # (B, Hkv, S_max - first, Dh)
            q = rotary_into_cache(
                q, k, v, cos, sin, k_cache, v_cache, decode.slot, first=kv_cache.first, impl="triton"
            )  # (B, 1, H, Dh); rotary(k) and v now sit at the slot of this layer's cache
            out = decode_attention(
                q[:, 0],  # (B, H, Dh)
                k_cache,  # this step's key already written
                v_cache,
                decode.key_mask,
                decode.slot,
                decode.kv_len,
                window=self.args.layer_windows[self.layer],
                prefix=kv_cache.layer_prefix(self.layer),
                rows=None if kv_cache.prefix is None else kv_cache.prefix.rows,
                impl="triton",
            )  # (B, H, Dh)
            return self.o_proj(out.reshape(B, 1, self.n_heads * self.head_dim))
        q, k = apply_rotary(q, k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|Hkv, T, Dh)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v, cache_position, kv_len)  # (B, Hkv, S, Dh)
        if T == 1 and self.n_kv_heads != self.n_heads and mask is not None:
            # decode: the G = H / Hkv query heads sharing a key/value head become G query rows of
            # that head, so attention reads each cached key once and no K/V copy is made
            G = self.n_heads // self.n_kv_heads
            q = q.reshape(B, self.n_kv_heads, G, self.head_dim)  # (B, Hkv, G, Dh)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # mask (B, 1, 1, S) broadcasts
            return self.o_proj(out.reshape(B, 1, self.n_heads * self.head_dim))
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and T > 1,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )  # (B, H, T, Dh)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)); Phi-3 stores gate and up as one matrix.

    silu(gate) * up is one fused kernel on CUDA (kernels/swiglu.py), the torch reference elsewhere."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.fused = args.fused_gate_up
        d, f = args.dim, args.intermediate_size
        if self.fused:
            self.gate_up_proj = nn.Linear(d, 2 * f, bias=args.mlp_bias)
        else:
            self.gate_proj = nn.Linear(d, f, bias=args.mlp_bias)
            self.up_proj = nn.Linear(d, f, bias=args.mlp_bias)
        self.down_proj = nn.Linear(f, d, bias=args.mlp_bias)

    def gate_up_linears(self) -> list[nn.Module]:
        """The separate gate and up projections ([] with a fused gate_up_proj)."""
        return [] if self.fused else [self.gate_proj, self.up_proj]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate_up = self.gate_up_proj(x)  # (B, T, 2F)
        else:  # one GEMM when packed: (B, T, 2F); else None
            gate_up = joined_linear(x, self.gate_up_linears())
        if gate_up is None:
            return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))  # (B, T, D)
        return self.down_proj(swiglu_halves(gate_up))  # its gradient one (B, T, 2F) tensor


class Block(nn.Module):
    """Pre-norm decoder block. Each residual add runs in the norm after it: the attention's in the second
    norm, the MLP's in the next block's first norm. With `carry` it returns (h, m), its output unsummed,
    and takes the last block's m as `pending`: one kernel fewer a block, the same numbers (the norm adds
    as torch does and normalises the rounded sum). Transformer.hidden carries only while no forward hook
    watches the blocks or their norms: a hook sees a block's output summed."""

    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args, layer)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(
        self, x, cos, sin, mask, kv_cache=None, cache_position=None, kv_len=None, decode=None, pending=None, carry=False
    ):
        if pending is None:
            normed = self.input_layernorm(x)
        else:
            normed, x = self.input_layernorm(pending, residual=x)  # x = x + pending
        attn = self.self_attn(normed, cos, sin, mask, kv_cache, cache_position, kv_len, decode)
        normed, h = self.post_attention_layernorm(attn, residual=x)  # h = x + attn
        m = self.mlp(normed)  # (B, T, D)
        return (h, m) if carry else h + m


def _hooks_watch(decoder: nn.Module) -> bool:
    """Whether forward hooks watch the blocks or the norms that would add their outputs (or every module):
    they see a block's output summed, and a norm's input as the whole residual stream, as they always did."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    watched = [decoder.norm, *decoder.layers, *(block.input_layernorm for block in decoder.layers)]
    return any(m._forward_hooks or m._forward_pre_hooks for m in watched)


def _check_inputs(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, with_cache: bool
) -> None:
    """A ValueError naming the argument for shapes that would fail deep inside (or broadcast silently): ids
    (B, T), a mask (B, T) (with a cache (B, S) over its slots), position ids (B or 1, T)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    if attention_mask is not None:
        ok = attention_mask.dim() == 2 and attention_mask.shape[0] == B and (with_cache or attention_mask.shape[1] == T)
        if not ok:
            want = f"({B}, S)" if with_cache else f"({B}, {T}), as input_ids"
            raise ValueError(f"attention_mask must be {want}, got shape {tuple(attention_mask.shape)}")
    pos_ok = position_ids is None or (position_ids.dim() == 2 and position_ids.shape[0] in (1, B))
    if not pos_ok or (position_ids is not None and position_ids.shape[1] != T):
        raise ValueError(f"position_ids must be ({B} or 1, {T}), as input_ids, got shape {tuple(position_ids.shape)}")


class Decoder(nn.Module):
    """Embedding, blocks and final norm (the checkpoint's `model.` prefix)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        # the pad token's row gets no gradient from lookups, as in transformers (with pad == eos: eos's row)
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim, padding_idx=args.embedding_padding_idx)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)


class Transformer(nn.Module):
    """Causal LM. `model(ids)` gives logits (B, T, V); `model.hidden(ids)` the final-norm states (B, T, D)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model = Decoder(args)
        self.lm_head = None if args.tie_word_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.rotary = RotaryAngles(args)
        self.rotary.reset()
        self.gradient_checkpointing = False
        self.activation_offload = False  # with checkpointing: block inputs wait in CPU memory (offload.py)
        # decode steps (T == 1 over a KV cache): "auto" runs the split-K Triton kernel on CUDA and SDPA
        # with a 4-D mask elsewhere; "triton" forces the kernel (the CPU interpreter in tests); "ref": SDPA
        self.decode_attention_impl = "auto"

    @property
    def output_weight(self) -> torch.Tensor:
        """The LM head matrix (V, D): the embedding itself when tied."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def norms_in_fp32(self) -> None:
        """Keep every RMSNorm gain in fp32 while the rest stays 16-bit, as autocast training keeps it.

        Why: gains sit near 1, where bf16's step is 2^-7; an AdamW step at RL learning rates (~1e-5)
        moves a gain 1000x less, so a bf16 gain never moves even though its fp32 master does. The
        gains are a few thousand numbers; the scale runs in fp32 and rounds once (kernels/rmsnorm.py).
        """
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.weight.data = module.weight.data.float()

    def lower_precision(self, dtype: torch.dtype, *, keep_gains: bool) -> dict[nn.Parameter, torch.Tensor]:
        """Cast the fp32 parameters to `dtype` (the RMSNorm gains too, unless keep_gains); returns
        {parameter: its fp32 values} of those that held more precision than `dtype` (a 16-bit
        checkpoint's do not): the optimizer's masters start from them (optim.py)."""
        gains = {id(m.weight) for m in self.modules() if isinstance(m, RMSNorm)} if keep_gains else set()
        full = {}
        for p in self.parameters():
            if p.dtype == torch.float32 and id(p) not in gains:
                low = p.data.to(dtype)
                if not torch.equal(low.float(), p.data):
                    full[p] = p.data
                p.data = low
        return full

    def projection_sets(self) -> list[list[nn.Module]]:
        """Each block's separate q, k, v and gate, up projections: the sets that read one input."""
        sets = [(block.self_attn.qkv_linears(), block.mlp.gate_up_linears()) for block in self.model.layers]
        return [linears for pair in sets for linears in pair if linears]

    def pack_projections(self) -> bool:
        """Store each block's q, k, v (and gate, up) weights back to back, so a 16-bit model runs each
        set as one GEMM (models/packed.py); idempotent. Returns whether every set is packed."""
        return all([pack_rows(linears) for linears in self.projection_sets()])  # a list: every set is tried

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random init for weight-free models (benchmarks, tests): N(0, initializer_range), norms 1."""
        std = self.args.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
        self.rotary.reset(self.device)

    def _decode_kernel_applies(self, kv_cache: KVCache) -> bool:
        """Whether decode steps over this cache run the split-K kernel (decode_attention_impl)."""
        if kv_cache.k.dtype not in _DECODE_KERNEL_DTYPES:
            return False
        return resolve_impl(self.decode_attention_impl, kv_cache.k) == "triton"

    def hidden(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        cache_position: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> final-norm hidden states (B, T, D).

        attention_mask: (B, S) 1 for real tokens, 0 for padding. Without a cache S = T; with one,
        S is the number of cache slots attended and `cache_position` (T,) the slots being written.
        """
        _check_inputs(input_ids, attention_mask, position_ids, with_cache=kv_cache is not None)
        B, T = input_ids.shape
        device = input_ids.device
        lead = None  # (B,) leading pads rotated to the end of each row, if any
        if kv_cache is None and attention_mask is not None and position_ids is None:
            plain, lead = padding_layout(attention_mask)  # not plain: a row with an inner gap, masked below
            if plain:  # trailing pads are hidden from real queries by causality
                # positions count the real tokens (a pad repeats a neighbour's), so the longest row and not
                # the padded width sets the largest one, which longrope's and dynamic RoPE's choice reads
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
                attention_mask = None
                if lead is not None:
                    input_ids, position_ids = rotate_rows(input_ids, lead), rotate_rows(position_ids, lead)
        if kv_cache is not None:
            assert cache_position is not None and attention_mask is not None, "a KV cache needs both"
            kv_len = attention_mask.shape[1]
        else:
            cache_position = torch.arange(T, device=device)
            kv_len = T
        if position_ids is None:
            if attention_mask is not None and kv_cache is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
            else:
                position_ids = cache_position.unsqueeze(0).expand(B, -1)
        cos, sin = self.rotary(position_ids)  # (B, T, R/2) fp32
        decode = None  # a decode step on the split-K kernel reads the 2-D mask: no 4-D masks are built
        if kv_cache is not None and T == 1 and self._decode_kernel_applies(kv_cache):
            decode = DecodeInputs(attention_mask, cache_position, kv_len)
        masks = dict.fromkeys(self.args.layer_windows)  # window -> (B, 1, T, S) bool mask, or None
        for w in masks:
            plain = attention_mask is None and kv_cache is None and (w is None or w >= T)
            if not plain and decode is None:
                masks[w] = attention_mask_4d(attention_mask, cache_position, kv_len, w, B)

        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        pending = None  # the last block's MLP output, added to x by the next norm (Block's docstring)
        checkpointed = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        carry = not checkpointed and not _hooks_watch(self.model)  # a checkpoint keeps one tensor: the input
        for block, window in zip(self.model.layers, self.args.layer_windows):
            args = (x, cos, sin, masks[window], kv_cache, cache_position, kv_len, decode)
            if checkpointed:
                x = checkpoint_block(block, *args, offload=self.activation_offload)
            elif carry:
                x, pending = block(*args, pending=pending, carry=True)
            else:
                x = block(*args)
        x = self.model.norm(x) if pending is None else self.model.norm(pending, residual=x)[0]  # (B, T, D)
        return x if lead is None else rotate_rows(x, -lead)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., D) -> logits (..., V) in the model dtype."""
        return F.linear(hidden, self.output_weight)

    def forward(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V). Keyword arguments as in `hidden`."""
        return self.logits(self.hidden(input_ids, **kwargs))
