"""The adapted layer: `LoRALinear`, a frozen linear module with a low-rank adapter beside it.

    layer = LoRALinear(nn.Linear(64, 96), r=4, alpha=8)   # y = base(x) + s * B @ A @ dropout(x)
    layer.merge(); layer.unmerge()                        # W +/- s B A in place (fp32 math)

An adapted layer computes  y = base(x) + s * B @ A @ dropout(x)  with A (r, in), B (out, r) and
s = alpha / r, or alpha / sqrt(r) with rsLoRA (a scale that does not shrink as r grows). Dropout acts on
the adapter's input only (the base sees x itself), as PEFT's. A starts as nn.Linear's weight does
(Kaiming-uniform, a = sqrt(5)) and B at zero, so at init the adapted model is the base model exactly.
The model-level functions (apply_lora, adapters_disabled, merge_lora, ...) live in lora.py, which
re-exports everything here; the module docstring there tells the dtypes, names and fused layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from minigrpo.errors import UserError

MERGED_NO_GRADIENT = "LoRA adapters are merged and would get no gradient: unmerge_lora(model) first"


class LoRAError(UserError, ValueError):
    """LoRA settings that cannot work (an unknown target, rank 0, dropout 1, nothing to export), naming the value."""


def check_adapter_settings(r: object, alpha: object, dropout: object) -> None:
    """A LoRAError naming the lora.* key unless r is an integer >= 1, alpha a finite number > 0 and
    dropout in [0, 1): r = 0 would divide alpha by zero, alpha <= 0 would make every update zero or
    reversed, and dropout = 1 would zero every adapter input, so the adapters would never learn."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise LoRAError(f"LoRA rank r={r!r} must be an integer >= 1 (lora.r)")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha < math.inf:
        raise LoRAError(f"LoRA alpha={alpha!r} must be a finite number > 0 (lora.alpha)")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise LoRAError(f"LoRA dropout={dropout!r} must be in [0, 1) (lora.dropout)")


class LoRALinear(nn.Module):
    """base(x) + scaling * lora_B(lora_A(dropout(x))); the base's tensors keep their names (see above)."""

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if isinstance(base, LoRALinear):
            raise ValueError("this layer already has a LoRA adapter")
        check_adapter_settings(r, alpha, dropout)
        if next(base.children(), None) is not None:
            raise TypeError(f"cannot wrap {type(base).__name__}: the base must hold its tensors itself")
        weight = getattr(base, "weight", None)
        out_f = getattr(base, "out_features", None) or (weight.shape[0] if weight is not None else None)
        in_f = getattr(base, "in_features", None) or (weight.shape[1] if weight is not None else None)
        if out_f is None or in_f is None:
            raise TypeError(f"cannot wrap {type(base).__name__}: it needs in_features/out_features or a 2-d weight")
        object.__setattr__(self, "base", base)  # a plain attribute, not a child module
        self._parameters = base._parameters  # shared dicts: base.weight IS self.weight
        self._buffers = base._buffers
        self._non_persistent_buffers_set = base._non_persistent_buffers_set
        self.in_features, self.out_features = in_f, out_f
        self.r, self.alpha, self.rslora = r, float(alpha), rslora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        tensors = [t for t in (*base._parameters.values(), *base._buffers.values()) if t is not None]
        device = tensors[0].device if tensors else None
        self.lora_A = nn.Linear(in_f, r, bias=False, device=device, dtype=dtype)  # A (r, in)
        self.lora_B = nn.Linear(r, out_f, bias=False, device=device, dtype=dtype)  # B (out, r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False  # adapters_disabled(): forward computes base(x) only
        self.merged = False  # merge_lora(): the delta lives inside the base weight
        self.frozen: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] | None = None  # adapters_frozen()
        self.frozen_weight: torch.Tensor | None = None  # adapters_frozen(merge=True): W + s B A, W's dtype
        self.frozen_bias: torch.Tensor | None = None  # ... and the base's bias (a view beside its set's)
        self.reset_lora_parameters()
        self.train(base.training)  # added to a model in eval mode, the adapter's dropout is off too

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as nn.Linear's weight
        nn.init.zeros_(self.lora_B.weight)  # delta = 0: the adapted model starts as the base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (merged := self.inference_weights()) is not None:
            return F.linear(x, *merged)  # sampling: one GEMM
        out = self.base(x)  # (..., out)
        if self.merged and self.training and torch.is_grad_enabled():
            raise RuntimeError(MERGED_NO_GRADIENT)
        if self.merged or self.disabled:  # the delta is inside the base weight, or the adapters are off
            return out
        A, B = self._adapter_weights(x.dtype)  # (r, in), (out, r) in the activations' dtype
        u = F.linear(self.lora_dropout(x), A)  # (..., r); x itself without dropout (no copy)
        if out.dtype == u.dtype:  # out + scaling * u @ B^T as one matmul that adds `out` (a decode
            # step runs every projection's adapter: two kernels each instead of four)
            flat = torch.addmm(out.reshape(-1, out.shape[-1]), u.reshape(-1, self.r), B.t(), alpha=self.scaling)
            return flat.view(out.shape)
        delta = F.linear(u * self.scaling, B)  # (..., out)
        return out + delta.to(out.dtype)

    def _adapter_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B in `dtype`: cast on every call, or once per adapters_frozen() block without autograd."""
        frozen = self.frozen
        if frozen is None or torch.is_grad_enabled():
            return self.lora_A.weight.to(dtype), self.lora_B.weight.to(dtype)
        if dtype not in frozen:
            frozen[dtype] = (self.lora_A.weight.detach().to(dtype), self.lora_B.weight.detach().to(dtype))
        return frozen[dtype]

    def inference_weights(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(weight, bias) of the plain linear this layer is now, without autograd: its merged copy
        inside adapters_frozen(merge=True); None where the adapters run (models/packed.py reads it),
        as in training mode with dropout, which acts on the adapter's input and cannot be merged."""
        if self.frozen_weight is None or self.disabled or torch.is_grad_enabled() or self._dropout_active():
            return None
        return self.frozen_weight, self.frozen_bias

    def _dropout_active(self) -> bool:
        """True in training mode with dropout > 0: the adapter sees a fresh mask of x on each forward."""
        return self.training and isinstance(self.lora_dropout, nn.Dropout)

    def mergeable_for_sampling(self) -> bool:
        """A plain 16-bit nn.Linear base, not merged already: W + s B A fits a copy in W's dtype.

        fp32 bases (the references, the exactness tests) keep the unmerged forward, so their samples
        stay bitwise those of the layer's own forward, as models/packed.py keeps fp32 sets unjoined.
        """
        w = getattr(self.base, "weight", None)
        plain = type(self.base) is nn.Linear and w is not None and type(w.data) is torch.Tensor
        return plain and w.dtype in (torch.bfloat16, torch.float16) and not self.merged

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A as a new (out, in) fp32 tensor."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()).mul_(self.scaling)

    def merged_weight(self) -> torch.Tensor:
        """W + scaling * B @ A (out, in) fp32, W dequantized if needed; never written into the model."""
        dense = dense_weight(self.base)
        if self.merged:  # the base already holds the delta
            return dense.float()
        return self.delta_weight().add_(dense)

    @torch.no_grad()
    def merge(self) -> None:
        weight = self._float_base_weight("merge")
        weight.copy_(weight.float() + self.delta_weight())  # fp32 sum, one rounding to the weight dtype
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        weight = self._float_base_weight("unmerge")
        weight.copy_(weight.float() - self.delta_weight())
        self.merged = False

    def _float_base_weight(self, what: str) -> torch.Tensor:
        weight = getattr(self.base, "weight", None)
        if hasattr(self.base, "dequantized_weight") or weight is None or not weight.is_floating_point():
            raise TypeError(
                f"cannot {what} LoRA into a {type(self.base).__name__} base: its weight is not a plain float "
                "tensor (e.g. NF4), and writing the update back into it would round it away; "
                "export with save_merged(), which dequantizes and merges in fp32"
            )
        return weight

    def train(self, mode: bool = True) -> LoRALinear:
        self.base.train(mode)
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True) -> LoRALinear:
        self.base._apply(fn, recurse)  # the shared tensors, converted once and by the base's own rules
        for child in self.children():
            child._apply(fn, recurse)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        self.base._save_to_state_dict(destination, prefix, keep_vars)  # lora_A/lora_B follow as children

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        n = len(unexpected_keys)
        self.base._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        ours = tuple(f"{prefix}{name}." for name in self._modules)  # the adapters load as children
        unexpected_keys[n:] = [k for k in unexpected_keys[n:] if not k.startswith(ours)]

    def extra_repr(self) -> str:
        return f"{self.base!r}, r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}"


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) float weight of a linear module: dequantized when it is stored quantized."""
    return module.dequantized_weight() if hasattr(module, "dequantized_weight") else module.weight
