"""LoRA exports: PEFT-format adapter files and merged checkpoints (see minigrpo.lora).

    save_peft_adapter(model, "out/adapter", base_model_name_or_path="Qwen/Qwen2.5-1.5B-Instruct")
    load_peft_adapter(model, "out/adapter")          # resume / eval: adds the adapters if missing
    save_merged(model, tokenizer, "out/merged")      # an HF checkpoint holding W + s * B @ A

`plain_tensors(model)` lists the tensors of the plain model an adapted (and/or NF4) model stands
for: merged weights under the base's names, computed one at a time when asked. `save_merged` writes
them, and the vLLM sampler pushes them (minigrpo.sampling.vllm_sync). Every name here is also
importable from minigrpo.lora.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minigrpo.atomic import atomic_path, write_folder_whole, write_json
from minigrpo.errors import UserError
from minigrpo.lora import (
    TARGETS,
    LoRAError,
    LoRALinear,
    add_adapters,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    target_module_names,
)
from minigrpo.models.loading import save_pretrained
from minigrpo.models.safetensors_io import DTYPES, iter_tensors, read_header, save_file

PEFT_PREFIX = "base_model.model."  # PEFT's key prefix: the PeftModel, then the wrapped CausalLM
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_ST_DTYPE = {dtype: name for name, dtype in DTYPES.items()}
# a packaged model name (models/loading.py PACKAGED_MODELS) -> the hub model it is a copy of, which is what
# PEFT reads from base_model_name_or_path; the name itself is kept in the weights file's metadata for minigrpo
PACKAGED_BASES = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
OWN_BASE_KEY = "minigrpo.base_model"
MERGED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what save_merged writes
PlainTensor = tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]  # (name, shape, make the tensor)


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
    base_model_name_or_path is written as PEFT can load it (`peft_base_name`); minigrpo reads its own
    name back (`adapter_base`).
    """
    layers = lora_layers(model)
    if not layers:
        raise LoRAError(f"nothing to save in {directory}: the model has no LoRA adapters (apply_lora first)")
    first = next(iter(layers.values()))
    for name, layer in layers.items():
        if (layer.r, layer.alpha, layer.rslora) != (first.r, first.alpha, first.rslora):
            raise ValueError(f"{name} has a different rank or scaling from {next(iter(layers))}: not one LoRA config")
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": peft_base_name(base_model_name_or_path),
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
    own = {OWN_BASE_KEY: base_model_name_or_path} if base_model_name_or_path in PACKAGED_BASES else {}
    with atomic_path(out / ADAPTER_WEIGHTS) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt", **own})
    write_json(out / ADAPTER_CONFIG, config)
    return out


def peft_base_name(base: str | None) -> str | None:
    """The base model as PEFT (transformers) can load it: the hub model a packaged one (`smollm2`) is a
    copy of, a local folder's absolute path (a relative one would be read from the loader's working
    directory), else `base` as it is (a hub id)."""
    if not base:
        return base
    if base in PACKAGED_BASES:
        return PACKAGED_BASES[base]
    path = Path(base).expanduser()
    return str(path.resolve()) if path.exists() else base


def adapter_base(directory: str | os.PathLike, config: dict[str, Any]) -> tuple[Any, str | None]:
    """(base model, revision) of the adapter in `directory` whose adapter_config.json holds `config`, as
    minigrpo loads it: the packaged model it was trained on where its weights file records one (PEFT's
    base_model_name_or_path then names the hub original), else base_model_name_or_path."""
    own = _weights_metadata(Path(directory) / ADAPTER_WEIGHTS).get(OWN_BASE_KEY)
    if own in PACKAGED_BASES:
        return own, None
    return config.get("base_model_name_or_path"), config.get("revision")


def _weights_metadata(path: Path) -> dict[str, Any]:
    """The `__metadata__` of a safetensors file's header ({} when it has none or cannot be read)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(min(n, 100_000_000)))
    except (OSError, struct.error, ValueError):
        return {}
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


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
    config = check_peft_adapter(path)
    state = {key.removeprefix(PEFT_PREFIX): tensor for key, tensor in iter_tensors(path / ADAPTER_WEIGHTS)}
    names = _adapted_names(model, state, config, path)
    r, alpha, rslora = int(config["r"]), float(config["lora_alpha"]), bool(config.get("use_rslora", False))
    layers = lora_layers(model)
    if any(layer.merged for layer in layers.values()):
        raise LoRAError(f"cannot load {path} into merged adapters: unmerge_lora(model) first")
    if not layers:
        dropout = float(config.get("lora_dropout") or 0.0)
        add_adapters(model, names, r=r, alpha=alpha, dropout=dropout, rslora=rslora, dtype=torch.float32)
    else:
        if list(layers) != names:
            raise AdapterError(
                f"{path} adapts {len(names)} layers, the model {len(layers)}: not the same adapter layout"
            )
        layer = next(iter(layers.values()))
        if (layer.r, layer.alpha, layer.rslora) != (r, alpha, rslora):
            raise AdapterError(
                f"{path}: r={r}, lora_alpha={alpha}, use_rslora={rslora}, but the model's adapters have "
                f"r={layer.r}, alpha={layer.alpha}, rslora={layer.rslora}"
            )
    load_lora_state_dict(model, state)
    return names


def check_adapter_fits(directory: str | os.PathLike, base: str | os.PathLike | None) -> None:
    """load_peft_adapter's layout and shape checks against the base model's config (a folder's
    config.json, a GGUF file's or packaged model's header), before the base's weights load (an adapter
    for another model is one line, not minutes of loading first): a meta-device model of that config,
    which holds no memory, stands in for the base. A hub id is checked as it loads."""
    from minigrpo.models.args import ModelArgs
    from minigrpo.models.transformer import Transformer

    base_config = _base_config(base)
    if base_config is None:
        return
    path = Path(directory)
    config = check_peft_adapter(path)
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_hf_config(base_config))
    header = read_header(path / ADAPTER_WEIGHTS)
    state = {key.removeprefix(PEFT_PREFIX): torch.empty(h["shape"], device="meta") for key, h in header.items()}
    _adapted_names(model, state, config, path)


def _base_config(base: str | os.PathLike | None) -> dict[str, Any] | None:
    """The HF config of the base model `base` read without its weights: a local folder's config.json, a
    GGUF file's header (its suffix in any case, as the model loader reads it) or a packaged model's;
    None for a hub id (known once fetched) or no base."""
    if base is None:
        return None
    path = Path(base).expanduser()
    if (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    from minigrpo.models.loading import PACKAGED_MODELS

    if str(base) in PACKAGED_MODELS or (path.suffix.lower() == ".gguf" and path.is_file()):
        from minigrpo.models.gguf import GGUFCheckpoint, packaged_gguf

        try:
            return GGUFCheckpoint(packaged_gguf(str(base)) if str(base) in PACKAGED_MODELS else path).config
        except FileNotFoundError:  # the package that ships it is missing: the model loader says so
            return None
    return None


def _adapted_names(model: nn.Module, state: dict[str, torch.Tensor], config: dict[str, Any], path: Path) -> list[str]:
    """The model's layers the adapter's A / B tensors (by module name) adapt, in the model's order;
    an AdapterError for a layer the model cannot adapt or a tensor of another shape."""
    adaptable = target_module_names(model, list(TARGETS))
    found = {key.rsplit(".", 2)[0] for key in state}
    outside = sorted(found - set(adaptable))
    if outside:
        raise AdapterError(f"{path}: adapter for {outside[0]!r}, which is not an adaptable linear layer of this model")
    names = [n for n in adaptable if n in found]
    _check_adapter_shapes(model, state, names, int(config["r"]), path / ADAPTER_WEIGHTS)
    return names


def _check_adapter_shapes(
    model: nn.Module, state: dict[str, torch.Tensor], names: list[str], r: int, where: Path
) -> None:
    """Every adapted module has its A (r, in) and B (out, r) in `state`, with this model's in and out:
    an adapter for another base model, or whose r disagrees with its tensors, is an AdapterError
    (one line through run_cli) before the model changes, not a shape error halfway through loading."""
    for name in names:
        module = model.get_submodule(name)
        for part, shape in (("lora_A", (r, module.in_features)), ("lora_B", (module.out_features, r))):
            key = f"{name}.{part}.weight"
            if key not in state:
                raise AdapterError(f"{where}: {PEFT_PREFIX}{key} is missing (each adapted layer needs A and B)")
            if tuple(state[key].shape) != shape:
                raise AdapterError(
                    f"{where}: {PEFT_PREFIX}{key} has shape {list(state[key].shape)}, this model needs "
                    f"{list(shape)} (r={r}): an adapter for another base model?"
                )


class AdapterError(UserError, ValueError):
    """A folder that is no plain PEFT LoRA adapter (its config or weights file), named with the file."""


def check_peft_adapter(directory: str | os.PathLike) -> dict[str, Any]:
    """What load_peft_adapter reads, without a tensor: a plain LoRA adapter_config.json (with r and
    lora_alpha) and a weights file whose header holds LoRA A and B weights only; returns the config.
    A folder that is none is an AdapterError (one line through run_cli), so callers check it before
    any weights load."""
    path = Path(directory)
    where = path / ADAPTER_CONFIG
    try:
        config = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{where}: not a readable adapter config ({e})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{where}: not a JSON object")
    _check_peft_config(config, where)
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise AdapterError(f"{where}: {key}={value!r} must be a number > 0")
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise AdapterError(f"{path / ADAPTER_WEIGHTS} is missing: {path} is no complete LoRA adapter")
    keys = read_header(path / ADAPTER_WEIGHTS)
    for key in keys:
        if not key.startswith(PEFT_PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise AdapterError(f"{path / ADAPTER_WEIGHTS}: unexpected tensor {key!r} (only LoRA A and B weights)")
    if not keys:  # loading it would freeze the model and add nothing to train
        raise AdapterError(f"{path / ADAPTER_WEIGHTS} holds no LoRA weights")
    return config


def _check_peft_config(config: dict[str, Any], where: Path) -> None:
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{where}: peft_type={config.get('peft_type')!r}, only LORA adapters are supported")
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
        if value != plain and not (plain in (None, {}) and value in (None, [], {})):  # null / empty: unused
            raise AdapterError(f"{where}: {key}={value!r} is not supported (plain LoRA only: {key}={plain!r})")
    _check_init_keeps_base(config.get("init_lora_weights", True), where)


# init_lora_weights values whose initialization rewrote the base weights (W - s * B0 @ A0, or LoftQ's
# quantized W): such an adapter fits that modified base only, never the original one it names
_RESIDUAL_INITS = ("pissa", "olora", "corda", "lora_ga")  # "pissa_niter_<n>" too


def _check_init_keeps_base(init: Any, where: Path) -> None:
    """Refuse an adapter trained on a base PEFT modified when it initialized the adapter: on the original
    base it loads without an error and gives wrong logits. PEFT's conversion on save (or LoftQ's recipe)
    writes init_lora_weights=true, and such an adapter is plain LoRA on the original base."""
    if not isinstance(init, str):
        return
    kind = init.lower()
    if kind == "loftq":
        raise AdapterError(
            f"{where}: init_lora_weights='loftq' fits only the LoftQ-quantized base saved with it; save that base as "
            "the base model and set init_lora_weights=true in the adapter config, as PEFT's LoftQ recipe does"
        )
    if kind in _RESIDUAL_INITS or kind.startswith("pissa"):
        raise AdapterError(
            f"{where}: init_lora_weights={init!r} was trained on a residual of the base, not the base itself; "
            "save it with PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) to get a plain "
            "LoRA adapter of the original base"
        )


# ----------------------------------------------------------------------------------------------
# merged export, one tensor at a time


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

    The folder is written whole or not at all: under a temporary sibling name, renamed to `directory`
    once complete (an export that fails half way leaves nothing there, never config.json beside missing
    weights, which transformers would fill with random ones). An existing `directory` is replaced whole
    if it is empty or holds only the files of an HF model export (an earlier export); any other folder,
    or a file, is a UserError before anything is computed, so no file of the user's is ever deleted.
    """
    out = Path(directory)
    if dtype not in MERGED_DTYPES:
        raise LoRAError(f"save_merged: dtype={dtype!r} must be one of torch.float32, torch.bfloat16, torch.float16")
    problem = _merged_output_problem(out)
    if problem is not None:
        raise UserError(f"save_merged: {problem}")
    write_folder_whole(out, lambda tmp: _write_merged(model, tokenizer, tmp, dtype, max_shard_bytes))
    return out


# the files of an HF model export (ours, transformers'): an existing folder holding only these is replaced whole
_EXPORT_FILE = re.compile(
    r"(config|generation_config|tokenizer|tokenizer_config|special_tokens_map|added_tokens|vocab|chat_template)\.json"
    r"|chat_template\.jinja|merges\.txt|tokenizer\.model"
    r"|model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json"
)


def _merged_output_problem(out: Path) -> str | None:
    """Why save_merged may not write the folder `out` (None: it may, replacing an earlier export whole)."""
    if out.exists() and not out.is_dir():
        return f"{out} is a file, not a folder; name a folder for the merged checkpoint"
    if not out.is_dir():
        return None
    foreign = sorted(p.name for p in out.iterdir() if not (p.is_file() and _EXPORT_FILE.fullmatch(p.name)))
    if foreign:
        return (
            f"{out} already holds {foreign[0]!r}, which is no file of a model export: name a new (or empty) "
            "folder, or an earlier export to replace"
        )
    return None


def _write_merged(model: nn.Module, tokenizer: Any, out: Path, dtype: torch.dtype, max_shard_bytes: int) -> None:
    """save_merged's files, written into the (new, empty) folder `out`."""
    save_pretrained(_WithoutTensors(model), tokenizer, out, dtype=dtype)  # metadata, tokenizer, empty weights
    entries = plain_tensors(model)
    shards: list[list[PlainTensor]] = [[]]
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
        return
    (out / "model.safetensors").unlink(missing_ok=True)  # save_pretrained's empty one
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(out / fname, shard, dtype)
        weight_map.update({name: fname for name, _, _ in shard})
    total = sum(math.prod(shape) * dtype.itemsize for _, shape, _ in entries)
    write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


class _WithoutTensors:
    """What save_pretrained reads of a model, minus its tensors: it writes config.json,
    generation_config.json, the tokenizer and an empty weights file (replaced by save_merged)."""

    def __init__(self, model: nn.Module) -> None:
        self.args, self.lm_head, self.dtype = model.args, model.lm_head, model.dtype

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}


def plain_tensors(model: nn.Module) -> list[PlainTensor]:
    """(name, shape, make tensor) of every tensor of the plain model, in state-dict order.

    Adapted layers give their merged weight (W + scaling * B @ A, fp32), quantized linears their
    dequantized weight (both under the base's name, with the base's bias); every other module its own
    parameters and persistent buffers. Nothing is computed before `make()` is called, so a consumer
    holds one merged tensor at a time; the model is never modified.
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
def _write_safetensors(path: Path, entries: list[PlainTensor], dtype: torch.dtype) -> None:
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


__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "PEFT_PREFIX",
    "AdapterError",
    "PlainTensor",
    "check_peft_adapter",
    "load_peft_adapter",
    "plain_tensors",
    "save_merged",
    "save_peft_adapter",
]
