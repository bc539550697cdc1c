"""NF4 base weights for QLoRA: frozen linear layers stored in 4 bits through bitsandbytes.

    model, tok = load_pretrained(path, dtype=torch.bfloat16, device="cuda", quantize="nf4")  # while loading
    quantize_model_linears(model)                       # or afterwards, one layer at a time
    y = model(ids)                                      # NF4Linear: dequantize + matmul in bf16
    w = model.model.layers[0].mlp.down_proj.dequantized_weight()   # (out, in) dense, for merged exports

Format. NF4 ("4-bit NormalFloat", QLoRA) maps each weight to one of 16 levels placed at quantiles of
a standard normal, per block of 64 weights scaled by the block's absmax. With double quantization
the absmax scales are quantized again to 8 bits in blocks of 256 (one fp32 scale and a mean offset
per block of 256). Bytes per weight: 1/2 (codes) + 1/64 (8-bit absmax) + 4/(64*256) (second-level
scales) = 0.516, against 2 in bf16 (3.9x less). `nf4_weight_bytes` gives the exact count.

What is quantized: the linear layers of the decoder blocks (q/k/v/o, gate/up/down, or Phi-3's fused
qkv_proj and gate_up_proj). The embedding, the norms, the biases and the LM head stay 16-bit: they
are small next to the blocks (the head is read by the chunked log-prob kernel, which needs it dense).

Compute. `NF4Linear.forward` calls bitsandbytes' `matmul_4bit`: the weight is dequantized to the
compute dtype (the dtype it was quantized from, then the one `.to(dtype)` / `.bfloat16()` gives the
model) and multiplied; the autograd function keeps only the packed weight, so the backward
re-dequantizes it and gives the input gradient. The weight itself is frozen (4-bit codes have no
gradient): trainable parameters live in adapters around it.

Devices. bitsandbytes runs 4-bit on CUDA; recent releases (verified: 0.50.2) also ship a CPU backend
(quantize, dequantize and the matmul), which the tests use. Its CPU dequantize kernel (under its
matmul too) assumes every row starts a block: where an even in_features is no multiple of the
blocksize it reads the wrong scales (relative error 0.2-0.4 instead of NF4's 0.09), so such layers
dequantize in plain torch here (`dequantize_nf4`: the format's definition) and multiply densely.
`require_nf4(device)` checks the path once per device type and fails with an error that names the
setting (`lora.quantize_base`) otherwise.

Checkpoint names stay those of the dense model (`...q_proj.weight`): the loader quantizes each
weight as it is read, so the 16-bit model never exists whole on the device. `state_dict()` holds
the packed codes under `weight` plus bitsandbytes' quant-state entries (`weight.absmax`, ...), and
`load_state_dict` takes either that or a dense `(out, in)` weight, which it quantizes.
"""

from __future__ import annotations

import functools
import logging
import warnings
from typing import Any

import torch
from torch import nn

from minigrpo.errors import UserError

BLOCKSIZE = 64  # weights per absmax block (bitsandbytes' default for 4-bit)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the block sizes bitsandbytes' 4-bit kernels take
NESTED_BLOCKSIZE = 256  # absmax values per second-level block (double quantization)
SUPPORTED = ("nf4",)


class QuantizationUnavailableError(UserError, RuntimeError):
    """4-bit weights were asked for where bitsandbytes cannot provide them."""


# ----------------------------------------------------------------------------------------------
# availability


class _HubKernelNotice(logging.Filter):
    """Drops bitsandbytes' notice that an optional CPU kernel from the Hugging Face hub is missing:
    its fallback (the library's own CPU kernels) is what runs, and correctly."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


@functools.cache
def _quiet_cpu_backend() -> None:
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_HubKernelNotice())


def _bnb():
    """bitsandbytes, imported on first use (importing it costs about a second)."""
    _quiet_cpu_backend()
    try:
        with warnings.catch_warnings():  # its import uses torch.jit.script_method (deprecated)
            warnings.simplefilter("ignore", DeprecationWarning)
            import bitsandbytes
    except ImportError as e:  # its first line: a failed native-library load explains itself over many
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QuantizationUnavailableError(
            "lora.quantize_base: nf4 needs bitsandbytes (pip install 'minigrpo[qlora]'); "
            f"it could not be imported: {why}"
        ) from e
    return bitsandbytes


@functools.cache
def _probe(device_type: str) -> str | None:
    """None if a tiny NF4 round trip (quantize, matmul, backward) works on this device type, else why not."""
    try:
        bnb = _bnb()
        device = torch.device(device_type)
        dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
        g = torch.Generator(device).manual_seed(0)  # its own: the probe must not move a seeded run's RNG
        w = torch.randn(128, 128, device=device, dtype=dtype, generator=g)
        packed, state = bnb.functional.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")
        x = torch.randn(3, 128, device=device, dtype=dtype, requires_grad=True, generator=g)
        y = bnb.matmul_4bit(x, packed.t(), quant_state=state)
        y.sum().backward()
        ref = (x.detach() @ bnb.functional.dequantize_4bit(packed, state).t()).float()
        err = float((y.detach().float() - ref).norm() / ref.norm())
        if not err < 2e-2 or x.grad is None:  # bf16 rounding alone gives ~3e-3
            return f"its 4-bit matmul disagrees with the dequantized weight (relative error {err:.1e})"
    except QuantizationUnavailableError as e:
        return str(e)
    except Exception as e:  # any missing kernel or backend: say which
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def require_nf4(device: str | torch.device, method: str = "nf4") -> None:
    """Raise a `QuantizationUnavailableError` naming `lora.quantize_base` unless NF4 works on `device`."""
    if method not in SUPPORTED:
        raise ValueError(f"lora.quantize_base={method!r} is not supported; choose one of {SUPPORTED} or null")
    device_type = torch.device(device).type
    why = _probe(device_type)
    if why is None:
        return
    _bnb()  # not installed: say so, not that the device lacks a 4-bit path
    if device_type == "cuda":
        raise QuantizationUnavailableError(f"lora.quantize_base: nf4 does not work on this GPU: {why}")
    raise QuantizationUnavailableError(
        f"lora.quantize_base: nf4 needs CUDA, or a bitsandbytes with a CPU 4-bit backend "
        f"(bitsandbytes>=0.50); on {device_type}: {why}. Use run.device=cuda or lora.quantize_base=null"
    )


def nf4_weight_bytes(numel: int, *, double_quant: bool = True, blocksize: int = BLOCKSIZE) -> int:
    """Device bytes of one NF4 weight of `numel` elements: codes, absmax scales and the nested state."""
    blocks = -(-numel // blocksize)
    codes = (numel + 1) // 2
    if not double_quant:
        return codes + 4 * blocks + 4 * 16  # fp32 absmax per block + the 16-entry code table
    nested = -(-blocks // NESTED_BLOCKSIZE)
    # 8-bit absmax per block, fp32 scale per nested block, the 16 + 256 entry code tables, the offset
    return codes + blocks + 4 * nested + 4 * (16 + 256) + 4


# ----------------------------------------------------------------------------------------------
# the module


class NF4Linear(nn.Module):
    """A frozen `nn.Linear` whose weight (out, in) is stored as NF4 codes with double quantization.

    `weight` is the packed uint8 codes ((out * in + 1) // 2, 1), a parameter without gradient;
    `quant_state` (bitsandbytes' QuantState) holds the scales and the compute dtype; `bias` stays
    in 16 (or 32) bits. forward: x (..., in) -> (..., out) in x's dtype.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: nn.Parameter | torch.Tensor | None = None,
        *,
        double_quant: bool = True,
        blocksize: int = BLOCKSIZE,
    ) -> None:
        super().__init__()
        assert weight.dim() == 2 and weight.is_floating_point(), f"weight must be (out, in) float, got {weight.shape}"
        if blocksize not in BLOCKSIZES:
            raise ValueError(f"NF4 blocksize={blocksize!r} is not supported; choose one of {BLOCKSIZES}")
        self.out_features, self.in_features = weight.shape
        self.double_quant, self.blocksize = double_quant, blocksize
        packed, self.quant_state = _quantize(weight, double_quant, blocksize)
        self.weight = nn.Parameter(packed, requires_grad=False)
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias, requires_grad=bias.is_floating_point())
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Linear, device: str | torch.device | None = None, **kwargs: Any) -> NF4Linear:
        """Quantize an `nn.Linear` (its weight moved to `device` first; the bias is moved and kept)."""
        weight = linear.weight.detach()
        bias = linear.bias
        if device is not None:
            weight = weight.to(device)
            if bias is not None:
                bias = nn.Parameter(bias.detach().to(device), requires_grad=bias.requires_grad)
        return cls(weight, bias, **kwargs)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the matmul runs in: the weight's dtype when quantized, then as .to(dtype) moves it."""
        return self.quant_state.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bnb = _bnb()
        dtype = self.compute_dtype
        bias = self.bias if self.bias is None or self.bias.dtype == dtype else self.bias.to(dtype)
        if self._bnb_kernel_misreads():  # the dense weight (no gradient), x's gradient through F.linear
            return nn.functional.linear(x.to(dtype), self.dequantized_weight(), bias).to(x.dtype)  # (..., out)
        y = bnb.matmul_4bit(x.to(dtype), self.weight.t(), quant_state=self.quant_state, bias=bias)
        return y.to(x.dtype)  # (..., out)

    def _bnb_kernel_misreads(self) -> bool:
        """True where bitsandbytes' CPU dequantize kernel would read the wrong scales: it takes each
        row as starting a block, so an even in_features that is no multiple of the blocksize (odd
        widths take its generic path, which is right)."""
        n = self.in_features
        return self.weight.device.type == "cpu" and n % self.quant_state.blocksize != 0 and n % 2 == 0

    @torch.no_grad()
    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight (out, in) this module computes with, in `dtype` (default: the compute dtype)."""
        shape = (self.out_features, self.in_features)
        if self._bnb_kernel_misreads():
            w = dequantize_nf4(self.weight.data, self.quant_state, shape)
        else:
            w = _bnb().functional.dequantize_4bit(self.weight.data, self.quant_state)
        return w.view(shape).to(dtype or self.compute_dtype)

    def nbytes(self) -> int:
        """Device bytes of the packed weight and its quant state (the bias not included)."""
        qs = self.quant_state
        tensors = [self.weight, qs.absmax, qs.code]
        if qs.nested:
            tensors += [qs.state2.absmax, qs.state2.code, qs.offset]
        return sum(t.numel() * t.element_size() for t in tensors)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"nf4, blocksize={self.quant_state.blocksize}, double_quant={self.double_quant}, "
            f"compute_dtype={self.compute_dtype}"
        )

    # -- device and dtype moves: the quant state is no parameter, so it follows the weight by hand --

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        device = self.weight.device
        if device.type != "meta":
            if self.quant_state.absmax.device != device:
                self.quant_state.to(device)
            self.quant_state.dtype = self._float_dtype_after(fn, device)
        return self

    def _float_dtype_after(self, fn, device: torch.device) -> torch.dtype:
        """The compute dtype after `fn`, as a float weight would follow .to(dtype) / .half() / .bfloat16():
        the uint8 codes never change dtype, so an empty float tensor is passed through `fn` to read it."""
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=device))
        if isinstance(probe, torch.Tensor) and probe.dtype in (torch.float32, torch.bfloat16, torch.float16):
            return probe.dtype
        return self.compute_dtype

    # -- state dict: packed codes + bitsandbytes' quant-state entries; a dense weight also loads ---

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, value in self.quant_state.as_dict(packed=True).items():
            destination[f"{prefix}weight.{key}"] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        wkey, bkey = prefix + "weight", prefix + "bias"
        extra = {k[len(wkey) + 1 :]: state_dict[k] for k in state_dict if k.startswith(wkey + ".")}
        if wkey not in state_dict:
            missing.append(wkey)
        else:
            w = state_dict[wkey]
            with torch.no_grad():
                if w.is_floating_point():  # a dense checkpoint weight: quantize it here
                    if tuple(w.shape) != (self.out_features, self.in_features):
                        errors.append(
                            f"size mismatch for {wkey}: {list(w.shape)} vs {self.out_features, self.in_features}"
                        )
                    else:  # as this module quantizes (with or without the nested absmax state)
                        dense = w.to(self.weight.device, self.compute_dtype)
                        packed, self.quant_state = _quantize(dense, self.double_quant, self.blocksize)
                        self.weight = nn.Parameter(packed, requires_grad=False)
                elif not extra:
                    errors.append(f"{wkey} holds 4-bit codes but no quant state ({wkey}.absmax, ...)")
                else:
                    state = _bnb().functional.QuantState.from_dict(extra, device=self.weight.device)
                    if tuple(state.shape) != (self.out_features, self.in_features):  # codes of another layer
                        errors.append(
                            f"size mismatch for {wkey}: 4-bit codes of a {list(state.shape)} weight vs "
                            f"{[self.out_features, self.in_features]}"
                        )
                    else:
                        self.quant_state = state
                        self.weight = nn.Parameter(w.to(self.weight.device), requires_grad=False)
                        self.double_quant = bool(state.nested)  # the codes come with their own state
                        self.blocksize = state.blocksize
        if self.bias is not None:
            if bkey in state_dict:
                with torch.no_grad():
                    self.bias.copy_(state_dict[bkey])
            else:
                missing.append(bkey)
        if strict:
            known = {wkey, bkey, *(f"{wkey}.{k}" for k in extra)}
            unexpected.extend(
                k for k in state_dict if k.startswith(prefix) and k not in known and "." not in k[len(prefix) :]
            )


def _quantize(weight: torch.Tensor, double_quant: bool, blocksize: int = BLOCKSIZE):
    """(packed uint8 codes, QuantState) of a dense (out, in) weight, on its device, in its dtype."""
    bnb = _bnb()
    return bnb.functional.quantize_4bit(
        weight.contiguous(), blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4"
    )


def dequantize_nf4(packed: torch.Tensor, state: Any, shape: tuple[int, int]) -> torch.Tensor:
    """The NF4 format's definition in plain torch: weight i = code[nibble i] * absmax[i // blocksize]
    over the flattened (out, in) weight, high nibble first; the absmax scales are first dequantized
    from 8 bits (+ offset) under double quantization. Returns (out, in) in the state's dtype."""
    numel = shape[0] * shape[1]
    codes = packed.view(torch.uint8).reshape(-1)
    nibbles = torch.stack((codes >> 4, codes & 15), dim=1).reshape(-1)[:numel].long()  # (out * in,)
    absmax = state.absmax
    if state.nested:  # 8-bit scales: blockwise-dequantized with the second-level state, then shifted
        absmax = _bnb().functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    values = state.code.float()[nibbles]  # (out * in,) fp32 in [-1, 1]
    blocks = nn.functional.pad(values, (0, -numel % state.blocksize)).view(-1, state.blocksize)  # (blocks, bs)
    dense = blocks * absmax.float().view(-1, 1)[: blocks.shape[0]]
    return dense.view(-1)[:numel].view(shape).to(state.dtype)  # (out, in)


# ----------------------------------------------------------------------------------------------
# quantizing a model


def is_quantizable(model: nn.Module, module_name: str) -> bool:
    """True for the linear layers of the decoder blocks (not the LM head, not the embedding)."""
    if not module_name.startswith("model.layers."):
        return False
    module = model.get_submodule(module_name)
    return isinstance(module, nn.Linear)


def _swap(model: nn.Module, module_name: str, new: nn.Module) -> None:
    parent_name, _, child = module_name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def quantize_linear_weight(model: nn.Module, module_name: str, weight: torch.Tensor, method: str = "nf4") -> bool:
    """The loader's hook: if `module_name` is a block linear, replace it by an NF4Linear built from
    `weight` (already on its device, in the compute dtype) and return True; else return False.

    The module's bias, loaded or still on the meta device, is carried over: the loader fills it
    by name whichever comes first in the file.
    """
    if method not in SUPPORTED:
        raise ValueError(f"lora.quantize_base={method!r} is not supported; choose one of {SUPPORTED} or null")
    if not is_quantizable(model, module_name):
        return False
    linear = model.get_submodule(module_name)
    _swap(model, module_name, NF4Linear(weight, linear.bias))
    return True


def quantize_model_linears(model: nn.Module, method: str = "nf4", *, device: str | torch.device | None = None) -> int:
    """Replace every block linear of `model` by an NF4Linear, one layer at a time; returns how many.

    With `device`, each dense weight is moved there just before it is quantized (and every other
    parameter and buffer is moved too), so a model built on the CPU reaches the GPU already in
    4 bits: at most one dense layer is on the GPU at any time.
    """
    adapted = [n for n, m in model.named_modules() if isinstance(getattr(m, "base", None), nn.Linear)]
    if adapted:  # their bases are no modules of the model: they would stay dense, unnoticed
        raise ValueError(
            f"cannot quantize a model with LoRA adapters ({adapted[0]} has one): quantize the base, then apply_lora"
        )
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    require_nf4(dev, method)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and is_quantizable(model, n)]
    for name in names:
        linear = model.get_submodule(name)
        _swap(model, name, NF4Linear.from_linear(linear, device=dev))
        del linear  # the dense weight is freed here, before the next layer is touched
    if device is not None:
        model.to(dev)
        if hasattr(model, "rotary"):
            model.rotary.reset(dev)
    return len(names)


def quantized_linears(model: nn.Module) -> dict[str, NF4Linear]:
    """name -> NF4Linear of every quantized layer (empty for a dense model), those under LoRA adapters
    too: an adapted layer keeps its base as an attribute, no child module."""
    found = {}
    for name, module in model.named_modules():
        layer = getattr(module, "base", module)
        if isinstance(layer, NF4Linear):
            found[name] = layer
    return found


__all__ = [
    "NF4Linear",
    "QuantizationUnavailableError",
    "dequantize_nf4",
    "is_quantizable",
    "nf4_weight_bytes",
    "quantize_linear_weight",
    "quantize_model_linears",
    "quantized_linears",
    "require_nf4",
]
