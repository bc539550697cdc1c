"""Checks of the `lora:` section (LoRACfg in config.py) against itself and the settings it works with.

Kept apart from config.py so that the schema file stays readable; `validate` adds these errors to
its list, and the notes of `lora_notes` to its warnings. Imports no torch.
"""

from __future__ import annotations

from typing import Any


def lora_errors(cfg: Any) -> list[str]:
    """One message per problem of cfg.lora, each naming its key."""
    lora, errors = cfg.lora, []
    if lora.enabled and not lora.targets:
        errors.append("lora.targets must name at least one layer")
    for i, target in enumerate(lora.targets):
        if target in lora.targets[:i]:
            errors.append(
                f"lora.targets.{i}={target!r} repeats lora.targets.{lora.targets.index(target)}: name each layer once"
            )
    errors += lora_strategy_errors(cfg)
    if lora.quantize_base is not None and not lora.enabled:
        errors.append(f"lora.quantize_base={lora.quantize_base!r} needs lora.enabled=true (a quantized base is frozen)")
    return errors


def lora_strategy_errors(cfg: Any) -> list[str]:
    """LoRA with distributed.strategy=fsdp, in one wording wherever it is checked: when the config loads
    (lora_errors), and at launch for a Config built in code that never went through validate."""
    if not (cfg.lora.enabled and cfg.distributed.strategy == "fsdp"):
        return []
    return [
        "distributed.strategy=fsdp with lora.enabled: LoRA trains with ddp (the frozen, possibly NF4, base is "
        "replicated and only the adapters' gradients are all-reduced); use distributed.strategy=auto or ddp"
    ]


def lora_notes(cfg: Any) -> list[str]:
    """Legal but suspicious (a ConfigWarning, not an error): adapter settings changed from their
    defaults while lora.enabled is false, so the run ignores them. Not an error because switching
    LoRA off (`--set lora.enabled=false` on a LoRA config) rightly keeps the section's other keys;
    lora.quantize_base, which changes how the base loads, is an error of its own (lora_errors)."""
    lora = cfg.lora
    if lora.enabled:
        return []
    current, default = lora.to_dict(), type(lora)().to_dict()
    keys = [k for k in default if k not in ("enabled", "quantize_base")]
    changed = [f"lora.{k}={current[k]!r}" for k in keys if current[k] != default[k]]
    if not changed:
        return []
    return [f"{', '.join(changed)}: ignored, the lora section is read only with lora.enabled=true"]
