"""Checks of the `lora:` section (LoRACfg in config.py) against itself and the settings it works with.

Kept apart from config.py so that the schema file stays readable; `validate` adds these errors to
its list. Imports no torch.
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
    if lora.enabled and cfg.distributed.strategy == "fsdp":
        errors.append(
            "distributed.strategy=fsdp with lora.enabled: LoRA trains with ddp (the frozen, possibly NF4, base is "
            "replicated and only the adapters' gradients are all-reduced); use strategy auto or ddp"
        )
    if lora.quantize_base is not None and not lora.enabled:
        errors.append(f"lora.quantize_base={lora.quantize_base!r} needs lora.enabled=true (a quantized base is frozen)")
    return errors
