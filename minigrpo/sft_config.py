"""The `sft:` section of the config: supervised fine-tuning before GRPO (`python -m minigrpo.sft`).

An SFT run reads `run`, `model`, `lora`, `train` (steps, lr, schedule, warmup, optimizer, clipping;
not micro_batch_size), `log`, `checkpoint` and this section; with `sft.source: synthetic` also
`data.synthetic` (the GRPO task, so the warm-up teaches the format of the task GRPO then trains).
It ignores `data` otherwise, `sampler`, `grpo`, `rewards`, `eval` and `distributed` (one process).
Kept apart from config.py so that the schema file stays readable; `Config.sft` is this class.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from minigrpo.configio import MAX_COUNT, Section, spec, template_errors

_SUFFIXES = {"jsonl": (".jsonl", ".json"), "parquet": (".parquet",)}


@dataclass
class SFTCfg(Section):
    """Chat-formatted examples, loss on the assistant tokens only (python -m minigrpo.sft)."""

    # jsonl/parquet: a file or a folder with per-split files; hub: a dataset repo id (or a downloaded
    # snapshot folder of one, read offline); synthetic: the data.synthetic questions answered with
    # response_template (no file)
    source: Literal["jsonl", "parquet", "hub", "synthetic"] = "jsonl"
    path: str | None = None  # the data file, folder or hub repo id (not read by source=synthetic)
    subset: str | None = None  # hub/folder sources: sub-folder (dataset config) holding the split files
    revision: str | None = None  # hub revision of the dataset repo
    split: str = "train"  # the split read from a folder or hub repo
    # messages: one field holds the whole conversation (a list of {role, content}); prompt_response:
    # a user prompt field and an assistant response field
    format: Literal["messages", "prompt_response"] = "messages"
    messages_field: str = "messages"  # format=messages: the row field holding the conversation
    prompt_field: str = "prompt"  # format=prompt_response: the user turn (text, or a list of messages)
    response_field: str = "response"  # format=prompt_response: the assistant turn (text)
    system_prompt: str | None = None  # system message put first in every conversation (replaces a row's own)
    # synthetic: the assistant turn, with {answer} (and optionally {expression}) filled in
    response_template: str = "<answer>{answer}</answer>"
    # longer conversations keep their first max_seq_len tokens (cut on the right: the cut tokens, replies
    # included, get no loss); a warning counts those left without an assistant token
    max_seq_len: int = spec(1024, ">= 2", most=MAX_COUNT)
    batch_size: int = spec(8, ">= 1", most=MAX_COUNT)  # conversations per optimizer step
    micro_batch_size: int = spec(8, ">= 1", most=MAX_COUNT)  # conversations a forward/backward; divides batch_size
    shuffle: bool = True  # reshuffle the conversations every epoch (seeded by run.seed and the epoch)


def sft_errors(cfg: Any) -> list[str]:
    """Checks between the sft fields that hold for every config (GRPO ones too: their defaults pass).
    Whether the data is there at all (sft.path) is checked when an SFT run starts."""
    sft, errors = cfg.sft, []
    if sft.micro_batch_size >= 1 and sft.batch_size % sft.micro_batch_size:
        errors.append(
            f"sft.micro_batch_size ({sft.micro_batch_size}) must divide sft.batch_size ({sft.batch_size}): "
            "each step trains on batch_size conversations in equal passes"
        )
    suffixes = _SUFFIXES.get(sft.source)
    suffix = Path(sft.path or "").suffix
    if suffixes and suffix in (".jsonl", ".json", ".parquet") and suffix not in suffixes:
        errors.append(f"sft.path={sft.path!r} does not match sft.source={sft.source!r}")
    if sft.source == "synthetic":  # the data.synthetic rows fill it: their answer and expression
        errors += template_errors("sft.response_template", sft.response_template, "answer", ("answer", "expression"))
    return errors
