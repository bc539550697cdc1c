"""LoRA: low-rank adapters on the linear layers of a frozen `Transformer`, and their exports.

    names = apply_lora(model, cfg.lora)              # adapters on q/k/v/o/gate/up/down; the rest frozen
    with adapters_disabled(model):                   # the reference policy: the same weights, no adapters
        ref_logp = completion_logprobs(model, ...)
    save_peft_adapter(model, "out/adapter", base_model_name_or_path="Qwen/Qwen2.5-1.5B-Instruct")
    save_merged(model, tokenizer, "out/merged")      # a 16-bit HF checkpoint holding W + s * B @ A
    load_peft_adapter(model, "out/adapter")          # resume / eval: adds the adapters if missing

An adapted layer computes  y = base(x) + s * B @ A @ dropout(x)  with A (r, in), B (out, r) and
s = alpha / r, or alpha / sqrt(r) with rsLoRA (a scale that does not shrink as r grows). A starts as
nn.Linear's weight does (Kaiming-uniform, a = sqrt(5)) and B at zero, so at init the adapted model
is the base model exactly. Adapters are stored in their own dtype (fp32 by default, also on a bf16
base), so the optimizer steps fp32 adapters directly, and computed in the activations' dtype, as
mixed precision does: on a bf16 base, A and B are cast to bf16 for the two small matmuls (fp32
accumulation inside them) and their gradients come back in fp32. Computing in fp32 instead would
cast every adapted layer's input up and run fp32 GEMMs, about a quarter of a LoRA step's time on an
H100; backward keeps x as it came, shared with the base, and A's (r)-wide output.

Names. `LoRALinear` wraps the base module without making it a child: it shares the base's
parameter and buffer dicts, so the base tensors keep their checkpoint names (`...q_proj.weight`) and
the adapters sit beside them (`...q_proj.lora_A.weight`, `...q_proj.lora_B.weight`): PEFT's names
without its `base_model.model.` prefix. State-dict saving and loading of the base part are delegated
to the base module, so a base with its own serialisation (a 4-bit linear) keeps it. The base module
stays reachable as `layer.base`, not through `model.modules()`.

Fused layers (Phi-3). Where the checkpoint stores q, k, v as one `qkv_proj` (and gate, up as one
`gate_up_proj`), any of q/k/v in the targets adapts the whole `qkv_proj` with one A, B pair (and
gate/up the whole `gate_up_proj`), as PEFT does on Phi-3 models: targets ["q"] there adapts k and v too.

Quantized bases. Any module that computes base(x) can be wrapped. A base whose weight is not a plain
float tensor (NF4) exposes `in_features`, `out_features`, `bias` (float or None) and
`dequantized_weight() -> (out, in)` float tensor. `merge_lora` refuses such a base (merging back into
4 bits would round the update away); `save_merged` dequantizes it, merges in fp32 and casts once.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minigrpo.atomic import atomic_path, write_json
from minigrpo.config import LoRACfg
from minigrpo.models.loading import save_pretrained
from minigrpo.models.safetensors_io import DTYPES, iter_tensors, save_file

# config short name -> module path inside a block; the fused (Phi-3) module where the model has one
TARGETS = {
    "q": ("self_attn.q_proj", "self_attn.qkv_proj"),
    "k": ("self_attn.k_proj", "self_attn.qkv_proj"),
    "v": ("self_attn.v_proj", "self_attn.qkv_proj"),
    "o": ("self_attn.o_proj", "self_attn.o_proj"),
    "gate": ("mlp.gate_proj", "mlp.gate_up_proj"),
    "up": ("mlp.up_proj", "mlp.gate_up_proj"),
    "down": ("mlp.down_proj", "mlp.down_proj"),
}
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix: the PeftModel, then the wrapped CausalLM
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_ST_DTYPE = {dtype: name for name, dtype in DTYPES.items()}


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
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as nn.Linear's weight
        nn.init.zeros_(self.lora_B.weight)  # delta = 0: the adapted model starts as the base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # (..., out)
        if self.merged:
            if self.training and torch.is_grad_enabled():
                raise RuntimeError("LoRA adapters are merged and would get no gradient: unmerge_lora(model) first")
            return out
        if self.disabled:
            return out
        A = self.lora_A.weight.to(x.dtype)  # (r, in) in the activations' dtype
        B = self.lora_B.weight.to(x.dtype)  # (out, r)
        h = self.lora_dropout(x)  # (..., in) x itself without dropout (no copy)
        delta = F.linear(F.linear(h, A) * self.scaling, B)  # (..., r) -> (..., out)
        return out + delta.to(out.dtype)

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
    if hasattr(module, "dequantized_weight"):
        return module.dequantized_weight()
    return module.weight


# ----------------------------------------------------------------------------------------------
# adding, finding, switching adapters


def target_module_names(model: nn.Module, targets: list[str]) -> list[str]:
    """Module names (`model.layers.0.self_attn.q_proj`, ...) that `targets` select, in model order."""
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown LoRA target {unknown[0]!r}: valid targets are {', '.join(TARGETS)}")
    names = []
    for i, block in enumerate(model.model.layers):
        for short in TARGETS:
            if short not in targets:
                continue
            path = next((p for p in TARGETS[short] if _has_submodule(block, p)), None)
            if path is None:
                raise ValueError(f"layer {i} has no module for LoRA target {short!r} (looked for {TARGETS[short]})")
            name = f"model.layers.{i}.{path}"
            if name not in names:
                names.append(name)
    return names


def apply_lora(model: nn.Module, cfg: LoRACfg, *, dtype: torch.dtype = torch.float32) -> list[str]:
    """Freeze every parameter of `model` and wrap the target linear layers in `LoRALinear`.

    Returns the adapted module names. Adapters are created on each base weight's device in `dtype`;
    afterwards only adapter parameters have requires_grad.
    """
    names = target_module_names(model, list(cfg.targets))
    _add_adapters(model, names, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, rslora=cfg.rslora, dtype=dtype)
    return names


def _add_adapters(model: nn.Module, names: list[str], *, r, alpha, dropout, rslora, dtype) -> None:
    existing = lora_layers(model)
    if existing:
        raise ValueError(f"LoRA is already applied to this model ({len(existing)} adapted layers); apply it once")
    model.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout, rslora, dtype))


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """{module name: LoRALinear} of every adapted layer, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (A, B of every adapted layer): what the optimizer steps."""
    return [p for _, p in _adapter_params(model)]


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run `model` as its frozen base: the reference policy of the KL term, without a second copy."""
    layers = list(lora_layers(model).values())
    if not layers:
        raise ValueError("the model has no LoRA adapters: disabling them would leave the policy itself")
    if any(layer.merged for layer in layers):
        raise RuntimeError("LoRA adapters are merged into the base weights: unmerge_lora(model) first")
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer, state in zip(layers, before):
            layer.disabled = state


def merge_lora(model: nn.Module) -> list[str]:
    """W += scaling * B @ A in place for every adapter (fp32 math); forward then skips the adapters."""
    layers = _layers_in_state(model, merged=False, action="merge")
    for layer in layers.values():
        layer._float_base_weight("merge")  # all or nothing: check every base before changing any
    for layer in layers.values():
        layer.merge()
    return list(layers)


def unmerge_lora(model: nn.Module) -> list[str]:
    """Undo merge_lora: W -= scaling * B @ A (exact within fp32 rounding on an fp32 base; lossy in bf16)."""
    layers = _layers_in_state(model, merged=True, action="unmerge")
    for layer in layers.values():
        layer.unmerge()
    return list(layers)


def _layers_in_state(model: nn.Module, *, merged: bool, action: str) -> dict[str, LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"the model has no LoRA adapters to {action}")
    wrong = [name for name, layer in layers.items() if layer.merged != merged]
    if wrong:
        state = "not merged" if merged else "already merged"
        raise RuntimeError(f"cannot {action} LoRA: {wrong[0]} is {state} ({len(wrong)} layers in all)")
    return layers


# ----------------------------------------------------------------------------------------------
# trainer checkpoints: the adapters only


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{`<module>.lora_A.weight` / `.lora_B.weight`: tensor} of every adapter (detached, not copied)."""
    return {name: p.detach() for name, p in _adapter_params(model)}


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors saved by `lora_state_dict` into the adapted model (names and shapes checked)."""
    params = dict(_adapter_params(model))
    missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or extra:
        raise KeyError(f"adapter state does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise ValueError(f"shape mismatch for {name}: saved {list(tensor.shape)}, model {list(params[name].shape)}")
        params[name].copy_(tensor)


def _adapter_params(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    for name, layer in lora_layers(model).items():
        yield f"{name}.lora_A.weight", layer.lora_A.weight
        yield f"{name}.lora_B.weight", layer.lora_B.weight


# ----------------------------------------------------------------------------------------------
# PEFT-format adapters: what PeftModel.from_pretrained (and vLLM's LoRA loader) read


def save_peft_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    base_model_name_or_path: str | None,
    revision: str | None = None,
) -> Path:
    """Write `adapter_config.json` and `adapter_model.safetensors` in PEFT's LoRA format.

    Keys are `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` (no adapter name), tensors
    in the adapters' dtype. Each file is written under a temporary name and renamed into place.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to save")
    first = next(iter(layers.values()))
    for name, layer in layers.items():
        if (layer.r, layer.alpha, layer.rslora) != (first.r, first.alpha, first.rslora):
            raise ValueError(f"{name} has a different rank or scaling from {next(iter(layers))}: not one LoRA config")
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": revision,
        "r": first.r,
        "lora_alpha": int(first.alpha) if first.alpha.is_integer() else first.alpha,
        "lora_dropout": dropout,
        "use_rslora": first.rslora,
        "target_modules": _peft_target_modules(model, list(layers)),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_dora": False,
        "lora_bias": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {PEFT_PREFIX + k: v.cpu() for k, v in lora_state_dict(model).items()}
    with atomic_path(out / ADAPTER_WEIGHTS) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    write_json(out / ADAPTER_CONFIG, config)
    return out


def _peft_target_modules(model: nn.Module, names: list[str]) -> list[str]:
    """PEFT's target_modules: the short module names (`q_proj`) when every such module is adapted,
    else the full module names (PEFT matches a target by equality or by a `.`-suffix)."""
    kinds = sorted({name.rpartition(".")[2] for name in names})
    every = [n for n in target_module_names(model, list(TARGETS)) if n.rpartition(".")[2] in kinds]
    return kinds if set(every) == set(names) else list(names)


def load_peft_adapter(model: nn.Module, directory: str | os.PathLike) -> list[str]:
    """Read a PEFT LoRA adapter into `model`; returns the adapted module names.

    A model without adapters gets them as the file describes (fp32); an adapted model must have the
    same adapted modules, rank and scaling. Only plain LoRA on the linear layers is supported
    (no DoRA, no bias, no modules_to_save, no per-layer ranks).
    """
    path = Path(directory)
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    _check_peft_config(config, path / ADAPTER_CONFIG)
    state = {}
    for key, tensor in iter_tensors(path / ADAPTER_WEIGHTS):
        if not key.startswith(PEFT_PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ValueError(f"{path / ADAPTER_WEIGHTS}: unexpected tensor {key!r} (only LoRA A and B weights)")
        state[key.removeprefix(PEFT_PREFIX)] = tensor
    adaptable = target_module_names(model, list(TARGETS))
    found = {key.rsplit(".", 2)[0] for key in state}
    outside = sorted(found - set(adaptable))
    if outside:
        raise ValueError(f"{path}: adapter for {outside[0]!r}, which is not an adaptable linear layer of this model")
    names = [n for n in adaptable if n in found]
    r, alpha, rslora = int(config["r"]), float(config["lora_alpha"]), bool(config.get("use_rslora", False))
    layers = lora_layers(model)
    if not layers:
        dropout = float(config.get("lora_dropout") or 0.0)
        _add_adapters(model, names, r=r, alpha=alpha, dropout=dropout, rslora=rslora, dtype=torch.float32)
    else:
        if list(layers) != names:
            raise ValueError(f"{path} adapts {len(names)} layers, the model {len(layers)}: not the same adapter layout")
        layer = next(iter(layers.values()))
        if (layer.r, layer.alpha, layer.rslora) != (r, alpha, rslora):
            raise ValueError(
                f"{path}: r={r}, lora_alpha={alpha}, use_rslora={rslora}, but the model's adapters have "
                f"r={layer.r}, alpha={layer.alpha}, rslora={layer.rslora}"
            )
    load_lora_state_dict(model, state)
    return names


def _check_peft_config(config: dict[str, Any], where: Path) -> None:
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{where}: peft_type={config.get('peft_type')!r}, only LORA adapters are supported")
    unsupported = {
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "lora_bias": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layer_replication": None,
    }
    for key, plain in unsupported.items():
        value = config.get(key, plain)
        if value != plain and not (plain is None and value == []):
            raise ValueError(f"{where}: {key}={value!r} is not supported (plain LoRA only: {key}={plain!r})")


# ----------------------------------------------------------------------------------------------
# merged 16-bit export, one tensor at a time


def save_merged(
    model: nn.Module,
    tokenizer: Any,
    directory: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:
    """Write the HF checkpoint `save_pretrained` would write for the base, with W + scaling * B @ A
    in place of every adapted weight: a plain model that transformers, vLLM and load_pretrained read.

    Each tensor is computed (dequantized if stored quantized, merged in fp32, cast to `dtype`), written
    and freed before the next, so memory holds the model plus one merged tensor; the model is not
    modified. config.json, generation_config.json and the tokenizer come from `save_pretrained` itself.
    """
    out = Path(directory)
    save_pretrained(_WithoutTensors(model), tokenizer, out, dtype=dtype)  # metadata, tokenizer, empty weights
    entries = _dense_entries(model)
    shards: list[list[tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]]] = [[]]
    size = 0
    for entry in entries:
        nbytes = math.prod(entry[1]) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    if len(shards) == 1:
        _write_safetensors(out / "model.safetensors", shards[0], dtype)
        (out / "model.safetensors.index.json").unlink(missing_ok=True)  # a stale index would win on load
        return out
    (out / "model.safetensors").unlink(missing_ok=True)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(out / fname, shard, dtype)
        weight_map.update({name: fname for name, _, _ in shard})
    total = sum(math.prod(shape) * dtype.itemsize for _, shape, _ in entries)
    write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return out


class _WithoutTensors:
    """What save_pretrained reads of a model, minus its tensors: it writes config.json,
    generation_config.json, the tokenizer and an empty weights file (replaced by save_merged)."""

    def __init__(self, model: nn.Module) -> None:
        self.args, self.lm_head, self.dtype = model.args, model.lm_head, model.dtype

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}


def _dense_entries(model: nn.Module) -> list[tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]]:
    """(name, shape, make tensor) of every tensor of the plain model, in state-dict order.

    Adapted layers give their merged weight, quantized linears their dequantized weight (both under
    the base's name, with the base's bias); every other module its own parameters and persistent buffers.
    """
    entries = []
    done: tuple[str, ...] = ()  # prefixes of modules already written whole
    for mname, module in model.named_modules():
        if done and mname.startswith(done):
            continue
        prefix = f"{mname}." if mname else ""
        if isinstance(module, LoRALinear) or hasattr(module, "dequantized_weight"):
            base = module.base if isinstance(module, LoRALinear) else module
            make = module.merged_weight if isinstance(module, LoRALinear) else module.dequantized_weight
            entries.append((f"{prefix}weight", (module.out_features, module.in_features), make))
            bias = getattr(base, "bias", None)
            if bias is not None:
                entries.append((f"{prefix}bias", tuple(bias.shape), lambda b=bias: b))
            done += (prefix,)
            continue
        for name, t in module._parameters.items():
            if t is not None:
                entries.append((prefix + name, tuple(t.shape), lambda t=t: t))
        for name, t in module._buffers.items():
            if t is not None and name not in module._non_persistent_buffers_set:
                entries.append((prefix + name, tuple(t.shape), lambda t=t: t))
    return entries


@torch.no_grad()
def _write_safetensors(
    path: Path, entries: list[tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]], dtype: torch.dtype
) -> None:
    """A safetensors file written tensor by tensor: the header first (shapes are known), then each
    tensor's bytes as soon as it is made. Written under a temporary name and renamed into place."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, make in entries:
            t = make().detach().to("cpu", dtype).contiguous()
            if tuple(t.shape) != shape:
                raise RuntimeError(f"{name}: made a tensor of shape {list(t.shape)}, expected {list(shape)}")
            if t.numel():
                f.write(t.view(-1).view(torch.uint8).numpy().data)  # little-endian, as the format wants
            del t


# ----------------------------------------------------------------------------------------------
# small helpers


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


__all__ = [
    "TARGETS",
    "LoRALinear",
    "adapters_disabled",
    "apply_lora",
    "dense_weight",
    "load_lora_state_dict",
    "load_peft_adapter",
    "lora_layers",
    "lora_parameters",
    "lora_state_dict",
    "merge_lora",
    "save_merged",
    "save_peft_adapter",
    "target_module_names",
    "unmerge_lora",
]
