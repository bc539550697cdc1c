"""LoRA: low-rank adapters on the linear layers of a frozen `Transformer`.

    names = apply_lora(model, cfg.lora)              # adapters on q/k/v/o/gate/up/down; the rest frozen
    with adapters_disabled(model):                   # the reference policy: the same weights, no adapters
        ref_logp = completion_logprobs(model, ...)
    save_peft_adapter(model, "out/adapter", base_model_name_or_path=cfg.model.name_or_path)
    save_merged(model, tokenizer, "out/merged")      # the exports live in lora_export.py (also importable
    load_peft_adapter(model, "out/adapter")          # from here): PEFT files, merged 16-bit checkpoints
    merge_and_unload(model)                          # evaluation: the adapters merged into plain linears

An adapted layer computes  y = base(x) + s * B @ A @ dropout(x)  with A (r, in), B (out, r) and
s = alpha / r, or alpha / sqrt(r) with rsLoRA (a scale that does not shrink as r grows). A starts as
nn.Linear's weight does (Kaiming-uniform, a = sqrt(5)) and B at zero, so at init the adapted model
is the base model exactly. Adapters are stored in their own dtype (fp32 by default, also on a bf16
base), so the optimizer steps fp32 adapters directly, and computed in the activations' dtype, as
mixed precision does: on a bf16 base, A and B are cast to bf16 for the two small matmuls (fp32
accumulation inside them) and their gradients come back in fp32. Computing in fp32 instead would
cast every adapted layer's input up and run fp32 GEMMs, about a quarter of a LoRA step's time on an
H100; backward keeps x as it came, shared with the base, and A's (r)-wide output. The own sampler
runs inside `adapters_frozen(model, merge=...)`: W + s B A merged into a copy for the rollout (one
GEMM per projection), or, unmerged, those casts made once per rollout rather than per token.

Names. `LoRALinear` (lora_layers.py, re-exported here) wraps the base module without making it a
child: it shares the base's parameter and buffer dicts, so the base tensors keep their checkpoint
names (`...q_proj.weight`) and the adapters sit beside them (`...q_proj.lora_A.weight`,
`...q_proj.lora_B.weight`): PEFT's names without its `base_model.model.` prefix. State-dict saving
and loading of the base part are delegated to the base module, so a base with its own serialisation
(a 4-bit linear) keeps it. The base module stays reachable as `layer.base`, not through `model.modules()`.

Fused layers (Phi-3). Where the checkpoint stores q, k, v as one `qkv_proj` (and gate, up as one
`gate_up_proj`), any of q/k/v in the targets adapts the whole `qkv_proj` with one A, B pair (and
gate/up the whole `gate_up_proj`), as PEFT does on Phi-3 models: targets ["q"] there adapts k and v too.

Quantized bases. Any module that computes base(x) can be wrapped. A base whose weight is not a plain
float tensor (NF4) exposes `in_features`, `out_features`, `bias` (float or None) and
`dequantized_weight() -> (out, in)` float tensor. `merge_lora` refuses such a base (merging back into
4 bits would round the update away); `save_merged` dequantizes it, merges in fp32 and casts once.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from minigrpo.config import LoRACfg
from minigrpo.lora_layers import MERGED_NO_GRADIENT, LoRAError, LoRALinear, check_adapter_settings, dense_weight

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
EXPORTS = ("save_peft_adapter", "load_peft_adapter", "save_merged", "plain_tensors")  # in lora_export.py
_MERGED_GUARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # merged model -> its training guard


# ----------------------------------------------------------------------------------------------
# adding, finding, switching adapters


def target_module_names(model: nn.Module, targets: list[str]) -> list[str]:
    """Module names (`model.layers.0.self_attn.q_proj`, ...) that `targets` select, in model order."""
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise LoRAError(
            f"unknown LoRA target {unknown[0]!r}: valid targets are {', '.join(TARGETS)} "
            f"(lora.targets{_target_hint(unknown[0])})"
        )
    if not targets:
        raise LoRAError(f"no LoRA targets: name at least one of {', '.join(TARGETS)} (lora.targets)")
    names = []
    for i, block in enumerate(model.model.layers):
        for short in TARGETS:
            if short not in targets:
                continue
            path = next((p for p in TARGETS[short] if _has_submodule(block, p)), None)
            if path is None:
                raise LoRAError(
                    f"layer {i} has no module for LoRA target {short!r} (lora.targets; looked for {TARGETS[short]})"
                )
            name = f"model.layers.{i}.{path}"
            if name not in names:
                names.append(name)
    return names


def apply_lora(model: nn.Module, cfg: LoRACfg, *, dtype: torch.dtype = torch.float32) -> list[str]:
    """Freeze every parameter of `model` and wrap the target linear layers in `LoRALinear`.

    Returns the adapted module names. Adapters are created on each base weight's device in `dtype`;
    afterwards only adapter parameters have requires_grad.
    """
    if isinstance(cfg.targets, str):  # list("gate") would be the targets g, a, t, e
        raise LoRAError(f"lora.targets={cfg.targets!r} must be a list of short names: some of {', '.join(TARGETS)}")
    names = target_module_names(model, list(cfg.targets))
    add_adapters(model, names, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, rslora=cfg.rslora, dtype=dtype)
    return names


def add_adapters(
    model: nn.Module, names: list[str], *, r: int, alpha: float, dropout: float, rslora: bool, dtype: torch.dtype
) -> None:
    """Freeze `model` and wrap the named linear modules in LoRALinear (apply_lora, load_peft_adapter)."""
    check_adapter_settings(r, alpha, dropout)  # before the model changes: a bad setting leaves it as it was
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


@contextmanager
def adapters_frozen(model: nn.Module, *, merge: bool = False) -> Iterator[None]:
    """Sampling: the adapters stay fixed inside, so their per-token cost is paid once per block.

    merge=False: each adapter's A and B are cast to the activations' dtype once, not in every forward
    (fp32 adapters on a 16-bit base otherwise cost two cast kernels per adapted projection per decode
    step: 420 of a SmolLM2 step's kernels). merge=True: each adapted layer whose base is a plain 16-bit
    nn.Linear gets W + s B A (fp32 math, rounded once to W's dtype) as a copy, and forwards without
    autograd run that one GEMM instead of the base's and the adapter's three, q/k/v and gate/up one
    GEMM per set as without LoRA (their copies back to back: models/packed.py) (+ one copy of those
    weights while inside; NF4 bases keep the unmerged path). Forwards under autograd, or with the
    adapters disabled, run as outside. A no-op without adapters; a nested block keeps the outer one's.
    """
    layers = [layer for layer in lora_layers(model).values() if layer.frozen is None]
    try:
        for layer in layers:
            layer.frozen = {}
        if merge:
            _merge_for_sampling(model, [layer for layer in layers if layer.mergeable_for_sampling()])
        yield
    finally:
        for layer in layers:
            layer.frozen, layer.frozen_weight, layer.frozen_bias = None, None, None


@torch.no_grad()
def _merge_for_sampling(model: nn.Module, layers: list[LoRALinear]) -> None:
    """Give each layer its merged copy; a set the model runs as one GEMM (q/k/v, gate/up:
    `projection_sets`) whose members are all here gets its copies back to back in one buffer."""
    todo = {id(layer): layer for layer in layers}
    sets = model.projection_sets() if hasattr(model, "projection_sets") else []
    sets = [s for s in sets if all(id(m) in todo for m in s) and len({m.base.bias is None for m in s}) == 1]
    sets = [s for s in sets if len({(m.weight.dtype, m.weight.device, m.in_features) for m in s}) == 1]
    for group in sets:
        for layer in group:
            del todo[id(layer)]
    for group in [*sets, *([layer] for layer in todo.values())]:
        first = group[0].weight
        rows = sum(layer.out_features for layer in group)
        weight = torch.empty(rows, first.shape[1], dtype=first.dtype, device=first.device)  # (sum out, in)
        bias = None if group[0].base.bias is None else torch.cat([layer.base.bias for layer in group])
        at = 0
        for layer in group:
            n = layer.out_features
            layer.frozen_weight = weight[at : at + n].copy_(layer.merged_weight())  # fp32 sum, one rounding
            layer.frozen_bias = None if bias is None else bias[at : at + n]
            at += n


def merge_lora(model: nn.Module) -> list[str]:
    """W += scaling * B @ A in place for every adapter (fp32 math); forward then skips the adapters."""
    layers = _layers_in_state(model, merged=False, action="merge")
    for layer in layers.values():
        layer._float_base_weight("merge")  # all or nothing: check every base before changing any
    for layer in layers.values():
        layer.merge()
    _refuse_training_while_merged(model)
    return list(layers)


def _refuse_training_while_merged(model: nn.Module) -> None:
    """MERGED_NO_GRADIENT at a training forward's start, by a hook on the input embedding (run in the caller's grad
    mode; an offloaded block's forward runs without it, so the layers' own check waits for the recompute)."""
    embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if embedding is not None and model not in _MERGED_GUARDS:
        _MERGED_GUARDS[model] = embedding.register_forward_pre_hook(functools.partial(_refuse_if_merged, model))


def _refuse_if_merged(model: nn.Module, module: nn.Module, args: tuple) -> None:
    if torch.is_grad_enabled() and any(m.merged and m.training for m in lora_layers(model).values()):
        raise RuntimeError(MERGED_NO_GRADIENT)


def unmerge_lora(model: nn.Module) -> list[str]:
    """Undo merge_lora: W -= scaling * B @ A (exact within fp32 rounding on an fp32 base; lossy in bf16)."""
    layers = _layers_in_state(model, merged=True, action="unmerge")
    for layer in layers.values():
        layer.unmerge()
    if model in _MERGED_GUARDS:
        _MERGED_GUARDS.pop(model).remove()
    return list(layers)


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> list[str]:
    """Inference for good (evaluation): every adapter whose base is a plain float linear is merged
    into it (W + s B A, fp32 sum, one rounding to W's dtype: the weights adapters_frozen(merge=True)
    samples with and save_merged writes) and the base is put back in its place, so those layers run
    one GEMM in any dtype (unmerged fp32 layers run three), q/k/v and gate/up pack as in a plain
    model, and no rollout makes a merged copy. Adapters on quantized bases (NF4) stay as they are.
    Irreversible (the adapters are gone); returns the unloaded layers' names."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to merge and unload")
    _refuse_while_disabled(layers, "merge and unload")
    unloaded = []
    for name, layer in layers.items():
        weight = getattr(layer.base, "weight", None)
        if hasattr(layer.base, "dequantized_weight") or weight is None or not weight.is_floating_point():
            continue
        if not layer.merged:
            layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base)
        unloaded.append(name)
    return unloaded


def _layers_in_state(model: nn.Module, *, merged: bool, action: str) -> dict[str, LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"the model has no LoRA adapters to {action}")
    wrong = [name for name, layer in layers.items() if layer.merged != merged]
    if wrong:
        state = "not merged" if merged else "already merged"
        raise RuntimeError(f"cannot {action} LoRA: {wrong[0]} is {state} ({len(wrong)} layers in all)")
    _refuse_while_disabled(layers, action)
    return layers


def _refuse_while_disabled(layers: dict[str, LoRALinear], action: str) -> None:
    """A RuntimeError inside adapters_disabled(): merged weights carry the adapters, so the disabled
    model (the reference policy) would silently compute the adapted one."""
    disabled = [name for name, layer in layers.items() if layer.disabled]
    if disabled:
        raise RuntimeError(f"cannot {action} LoRA inside adapters_disabled(): {disabled[0]} is disabled")


# ----------------------------------------------------------------------------------------------
# trainer checkpoints: the adapters only


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{`<module>.lora_A.weight` / `.lora_B.weight`: tensor} of every adapter (detached, not copied)."""
    return {name: p.detach() for name, p in _adapter_params(model)}


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors saved by `lora_state_dict` into the adapted model (names and shapes checked)."""
    params = dict(_adapter_params(model))
    merged = [name for name, layer in lora_layers(model).items() if layer.merged]
    if merged:  # the old delta stays inside the base weight, and unmerging would subtract the new one
        raise RuntimeError(f"cannot load adapter state into merged adapters ({merged[0]}): unmerge_lora(model) first")
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
# small helpers


def _target_hint(target: object) -> str:
    """What an unknown target probably meant: a module name (q_proj -> q, Phi-3's qkv_proj -> q), PEFT's
    "all-linear" (here: every short name, the default), or a layer that takes no adapter."""
    modules = {path.rpartition(".")[2]: short for short, paths in reversed(TARGETS.items()) for path in paths}
    if isinstance(target, str) and target in modules:
        return f": {target!r} is written {modules[target]!r}"
    if target == "all-linear":
        return ": every linear layer of the blocks is all of them, the default"
    if target in ("lm_head", "embed_tokens"):
        return ": adapters go on the blocks' linear layers only, the LM head and the embedding stay frozen"
    return ""


def _has_submodule(module: nn.Module, path: str) -> bool:
    return functools.reduce(lambda m, name: getattr(m, name, None), path.split("."), module) is not None


def __getattr__(name: str):
    """The exports (EXPORTS) are defined in lora_export.py, which imports this module; they are
    looked up there on first use, so `from minigrpo.lora import save_merged` works either way round."""
    if name in EXPORTS:
        from minigrpo import lora_export

        return getattr(lora_export, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "MERGED_NO_GRADIENT",
    "TARGETS",
    "LoRAError",
    "LoRALinear",
    "adapters_disabled",
    "adapters_frozen",
    "add_adapters",
    "apply_lora",
    "check_adapter_settings",
    "dense_weight",
    "load_lora_state_dict",
    "lora_layers",
    "lora_parameters",
    "lora_state_dict",
    "merge_and_unload",
    "merge_lora",
    "target_module_names",
    "unmerge_lora",
    *EXPORTS,
]
