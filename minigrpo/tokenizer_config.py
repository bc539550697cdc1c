"""The JSON and jinja files of a Hugging Face tokenizer folder, read and checked for `Tokenizer.from_dir`.

tokenizer_config.json (merged with special_tokens_map.json in the legacy layout), the chat templates
(chat_template.jinja and additional_chat_templates/*.jinja win over the config's) and
generation_config.json's stop ids. A file or value that makes no tokenizer is a TokenizerConfigError
naming the file (and key), never a traceback.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken

from minigrpo.errors import UserError

# The named special tokens transformers knows; any other `*_token` string in tokenizer_config.json is
# a model-specific token (e.g. Gemma's `image_token`) and is passed to the chat template as well.
NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class TokenizerConfigError(UserError, ValueError):
    """A tokenizer folder's file or value that makes no tokenizer; the message names the file (and key)."""


def read_json_object(path: Path, error: type[UserError]) -> dict[str, Any]:
    """The JSON object in file `path`; a file that does not parse, or holds something else than an
    object, raises `error` (a UserError class) with one line naming the file.

    Every JSON file of a model folder is read through here: config.json, the safetensors index and
    the tokenizer's files, so each bad one is reported the same way."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not valid JSON, the file is truncated or corrupt ({e})") from e
    if not isinstance(content, dict):
        raise error(f"{path}: not a JSON object")
    return content


def _read_json(path: Path) -> dict[str, Any]:
    """One JSON object file of a tokenizer folder ({} when absent)."""
    return read_json_object(path, TokenizerConfigError) if path.is_file() else {}


def read_config(d: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """tokenizer_config.json merged with special_tokens_map.json, and the file each key came from.

    special_tokens_map.json is used only when the config has no `added_tokens_decoder` (the legacy
    layout), and then has the last word, as in transformers.
    """
    cfg_file, map_file = d / "tokenizer_config.json", d / "special_tokens_map.json"
    cfg = _read_json(cfg_file)
    legacy = _read_json(map_file)  # parsed either way: a corrupt file is an error, even when unused
    origin = dict.fromkeys(cfg, cfg_file)
    if "added_tokens_decoder" not in cfg:
        cfg.update(legacy)
        origin.update(dict.fromkeys(legacy, map_file))
    for key in NAMED_SPECIAL_TOKENS:
        origin.setdefault(key, cfg_file)
    return cfg, origin


_ADDED_TOKEN_FLAGS = ("lstrip", "rstrip", "single_word", "normalized", "special")


def add_config_tokens(cfg: Mapping[str, Any], file: Path, tk: tokenizers.Tokenizer) -> None:
    """Apply tokenizer_config.json's `added_tokens_decoder` ({id: {"content": ..., flags}}) to `tk` in place,
    as transformers does: a token that tokenizer.json lacks is added, one whose flags differ (rstrip, special,
    ...) takes the config's flags; tokens go in id order. A new token must land on the id the config gives
    it (the next free one): else the model's embedding row for it is another token's, a TokenizerConfigError
    naming the file and token. A token tokenizer.json has keeps tokenizer.json's id (as in transformers)."""
    value = cfg.get("added_tokens_decoder")
    if value is None:
        return
    if not isinstance(value, Mapping):
        raise TokenizerConfigError(f"{file}: added_tokens_decoder must map token ids to tokens, got {value!r:.80}")
    have = {_token_flags(t) for t in tk.get_added_tokens_decoder().values()}
    for tid, token in sorted((_token_id(file, k), _added_token(file, k, v)) for k, v in value.items()):
        if _token_flags(token) in have:
            continue
        known = tk.token_to_id(token.content) is not None
        tk.add_tokens([token])
        got = tk.token_to_id(token.content)
        if not known and got != tid:
            raise TokenizerConfigError(
                f"{file}: added_tokens_decoder[{tid}] {token.content!r} is not in tokenizer.json and would get "
                f"id {got}, not {tid}"
            )


def _token_flags(token: AddedToken) -> tuple[Any, ...]:
    return (token.content, *(getattr(token, k) for k in _ADDED_TOKEN_FLAGS))


def _token_id(file: Path, key: Any) -> int:
    """An added_tokens_decoder key: a token id (JSON writes it as a string)."""
    try:
        tid = int(key)
    except (TypeError, ValueError):
        tid = -1
    if tid < 0:
        raise TokenizerConfigError(f"{file}: added_tokens_decoder key {key!r} is not a token id")
    return tid


def _added_token(file: Path, key: Any, entry: Any) -> AddedToken:
    """One added_tokens_decoder entry as an AddedToken; flags it leaves out take the library's defaults."""
    where = f"{file}: added_tokens_decoder[{key!r}]"
    if not (isinstance(entry, Mapping) and isinstance(entry.get("content"), str) and entry["content"]):
        raise TokenizerConfigError(f'{where} must be {{"content": "<token>", ...flags}}, got {entry!r:.80}')
    flags = {k: v for k, v in entry.items() if k not in ("content", "id", "__type")}
    bad = next((k for k, v in flags.items() if k not in _ADDED_TOKEN_FLAGS or not isinstance(v, bool)), None)
    if bad is not None:
        raise TokenizerConfigError(
            f"{where}: {bad}={flags[bad]!r}; the flags are {', '.join(_ADDED_TOKEN_FLAGS)} (bool)"
        )
    return AddedToken(entry["content"], **flags)


_REQUIRED_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


def config_special_tokens(
    cfg: Mapping[str, Any], origin: Mapping[str, Path], tk: tokenizers.Tokenizer, tk_file: Path
) -> tuple[dict[str, str | None], dict[str, str], list[str]]:
    """The special tokens a config names -> (named tokens, the chat template's `*_token` variables, the
    tokens to register as special besides bos/eos/unk/pad).

    As in transformers, the template sees every named token: the standard ones, the named entries of
    an `extra_special_tokens` dict ({"image_token": "<image>"}) and any other `*_token` key; all of
    them are special (dropped by `skip_special_tokens`). bos/eos/unk/pad and the extra special tokens
    must be in the vocabulary; a sep/cls/mask or model-specific token that is not is only a template
    variable (transformers would add it as a new token, which the model has no embedding for).
    """
    tokens = {k: _token_str(cfg.get(k), origin.get(k), k) for k in NAMED_SPECIAL_TOKENS}
    named_extra, extra = _extra_special_tokens(cfg, origin)
    template_tokens = {k: v for k, v in tokens.items() if v is not None}
    template_tokens.update(named_extra)
    for key, value in cfg.items():  # model-specific named tokens, e.g. Gemma's `image_token`
        if key.endswith("_token") and key not in NAMED_SPECIAL_TOKENS and _is_token_value(value):
            template_tokens[key] = _token_str(value, origin[key], key)
    extra_key = "extra_special_tokens" if "extra_special_tokens" in cfg else "additional_special_tokens"
    must_exist = [(origin[k], k, tokens[k]) for k in _REQUIRED_TOKENS]
    must_exist += [(origin[extra_key], f"{extra_key}[{k!r}]", t) for k, t in named_extra.items()]
    must_exist += [(origin[extra_key], extra_key, t) for t in extra]
    for file, key, token in must_exist:
        if token is not None and tk.token_to_id(token) is None:
            raise TokenizerConfigError(f"{file}: {key} {token!r} is not in the vocabulary of {tk_file.name}")
    optional = [t for k, t in template_tokens.items() if k not in _REQUIRED_TOKENS and tk.token_to_id(t) is not None]
    return tokens, template_tokens, [*extra, *optional]


def _is_token_value(value: Any) -> bool:
    """A config value that is a token: a string or an AddedToken dict {"content": "..."}."""
    return isinstance(value, str) or (isinstance(value, Mapping) and isinstance(value.get("content"), str))


def _token_str(value: Any, file: Path | None = None, key: str = "token") -> str | None:
    """A special token as written in a config: a string or an AddedToken dict {"content": ...}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    where = f"{file}: " if file is not None else ""
    raise TokenizerConfigError(f'{where}{key} must be a token string or {{"content": ...}}, got {value!r}')


def _extra_special_tokens(cfg: Mapping[str, Any], origin: Mapping[str, Path]) -> tuple[dict[str, str], list[str]]:
    """`extra_special_tokens` (or the older `additional_special_tokens`): a list of tokens, or a dict
    of named ones ({"image_token": "<image>"}) that the chat template also sees by name."""
    key = "extra_special_tokens" if "extra_special_tokens" in cfg else "additional_special_tokens"
    value = cfg.get(key)
    if not value:
        return {}, []
    if isinstance(value, Mapping):
        return {str(k): _token_str(v, origin[key], f"{key}[{k!r}]") for k, v in value.items()}, []
    if isinstance(value, list):
        return {}, [_token_str(v, origin[key], key) for v in value if v is not None]
    raise TokenizerConfigError(f"{origin[key]}: {key} must be a list of tokens or a dict of named ones, got {value!r}")


def folder_templates(d: Path, config_value: Any) -> dict[str, str]:
    """The chat templates of a folder: chat_template.jinja and additional_chat_templates/*.jinja when
    present (they replace the config's, as in transformers), else tokenizer_config.json's."""
    files = sorted((d / "additional_chat_templates").glob("*.jinja"))
    templates = {p.stem: _read_template(p) for p in files}
    if (d / "chat_template.jinja").is_file():
        templates["default"] = _read_template(d / "chat_template.jinja")
    return templates or _config_templates(config_value, d / "tokenizer_config.json")


def chat_control_tokens(cfg: Mapping[str, Any], file: Path) -> list[str] | None:
    """tokenizer_config.json's `chat_control_tokens` (added tokens that sanitize_control_tokens encodes as text
    in a user's input, besides the special ones), or None when it has none; anything but a list of strings is
    a TokenizerConfigError naming the file."""
    value = cfg.get("chat_control_tokens")
    if value is not None and not (isinstance(value, list) and all(isinstance(t, str) for t in value)):
        raise TokenizerConfigError(f"{file}: chat_control_tokens must be a list of token strings, got {value!r:.80}")
    return value


def folder_template_files(d: Path, names: Iterable[str]) -> dict[str, Path]:
    """The file each of the folder's chat templates `names` was read from (as folder_templates picks them), so
    that a template that fails names the file to fix."""
    files = {}
    for name in names:
        jinja = d / "chat_template.jinja" if name == "default" else d / "additional_chat_templates" / f"{name}.jinja"
        files[name] = jinja if jinja.is_file() else d / "tokenizer_config.json"
    return files


def _read_template(path: Path) -> str:
    """A .jinja file's text; one that is not UTF-8 is an error naming it and the byte."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e


def _config_templates(value: Any, file: Path | str = "tokenizer_config.json") -> dict[str, str]:
    """tokenizer_config.json's chat_template: a string or a list of {"name", "template"}."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(isinstance(t, Mapping) and {"name", "template"} <= t.keys() for t in value):
        return {t["name"]: t["template"] for t in value}
    raise TokenizerConfigError(
        f'{file}: chat_template must be a string or a list of {{"name": ..., "template": ...}}, got {value!r:.80}'
    )


def generation_stop_ids(path: Path) -> list[int]:
    """A JSON file's `eos_token_id` (generation_config.json's or config.json's) as stop ids (eos_ids)."""
    return eos_ids(_read_json(path).get("eos_token_id"), path)


def eos_ids(value: Any, path: Path) -> list[int]:
    """An `eos_token_id` value read from `path` (a token id, a list of them, or None: Llama-3 has three) as
    a list of ids; anything else is a TokenizerConfigError naming the file and key. Ids outside the
    vocabulary are the constructor's error (tokenizer_files names the folder for it)."""
    ids = value if isinstance(value, list) else [value]
    if value is not None and not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise TokenizerConfigError(f"{path}: eos_token_id must be a token id or a list of them, got {value!r}")
    return [] if value is None else ids


# ---- the tokenizer classes transformers 5 rebuilds ---------------------------------------------------------
#
# A tokenizer_config.json whose `tokenizer_class` is one of these makes transformers 5 build the class's own
# pipeline around tokenizer.json's vocabulary and merges instead of applying tokenizer.json as written: only
# the file's post-processor and added tokens are kept. Llama-2, Mistral and Phi-3 folders name LlamaTokenizer,
# Qwen folders Qwen2Tokenizer, SmolLM2 and Phi-4 folders GPT2Tokenizer; PreTrainedTokenizerFast (Llama-3) and
# any other class load tokenizer.json as written.

# Qwen2Tokenizer's pre-tokenizer split (the regex Qwen's tokenizer.json files carry).
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# The class transformers registers for a config.json `model_type` (of the families minigrpo loads).
_MODEL_TYPE_CLASS = {
    "mistral": None,
    "mixtral": None,
    "phi3": None,
    "qwen2": "Qwen2Tokenizer",
    "qwen2_moe": "Qwen2Tokenizer",
    "qwen3": "Qwen2Tokenizer",
    "qwen3_moe": "Qwen2Tokenizer",
}
# Model types whose registered class wins over the class tokenizer_config.json names.
_CLASS_OVERRIDING_MODEL_TYPES = ("qwen2", "phi3")
# Special tokens each class falls back to when tokenizer_config.json leaves them out.
_CLASS_DEFAULT_TOKENS = {
    "LlamaTokenizer": {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"},
    "GPT2Tokenizer": {"unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"},
    "Qwen2Tokenizer": {"unk_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
}


def folder_model_type(d: Path) -> str | None:
    """config.json's `model_type` in tokenizer folder `d`, if it has a readable one (the model loader
    reports a bad config.json; here it only picks the tokenizer class, as in transformers)."""
    try:
        value = json.loads((d / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def rebuilt_class(cfg: Mapping[str, Any], model_type: str | None, tk: tokenizers.Tokenizer) -> str | None:
    """The tokenizer class transformers 5's AutoTokenizer rebuilds the folder's pipeline with, or None when
    it applies tokenizer.json as written. Follows AutoTokenizer's choice: a LlamaTokenizer folder whose
    tokenizer.json is byte-level (Llama-3 style) loads as written, and a config.json `model_type` registered
    with another class (mistral, phi3: none; qwen2, qwen3: Qwen2Tokenizer) takes over."""
    name = cfg.get("tokenizer_class")
    name = name.removesuffix("Fast") if isinstance(name, str) else None
    if name not in _CLASS_DEFAULT_TOKENS:
        return None
    registered = _MODEL_TYPE_CLASS.get(model_type or "", name)
    if name == "LlamaTokenizer" and model_type not in _CLASS_OVERRIDING_MODEL_TYPES and '"ByteLevel"' in tk.to_str():
        return None
    if registered == name:
        return name
    if registered is None:
        return None
    return registered if model_type in _CLASS_OVERRIDING_MODEL_TYPES else name


def class_default_tokens(cfg: dict[str, Any], origin: dict[str, Path], name: str, tk: tokenizers.Tokenizer) -> None:
    """Fill the special tokens class `name` defaults to into `cfg` in place, for the keys it leaves out and
    only when the token is in the vocabulary (transformers would add it as a new token, which the model
    has no embedding for)."""
    for key, token in _CLASS_DEFAULT_TOKENS[name].items():
        if key not in cfg and tk.token_to_id(token) is not None:
            cfg[key] = token
            origin[key] = origin.get(key) or Path("tokenizer_config.json")


def rebuild_backend(name: str, tk: tokenizers.Tokenizer, cfg: Mapping[str, Any]) -> tokenizers.Tokenizer:
    """tokenizer.json's vocabulary and merges in class `name`'s own pipeline, as transformers 5 builds it.

    The file's normalizer, pre-tokenizer, decoder and model options are dropped; its post-processor is kept.
    The added tokens are tokenizer_config.json's `added_tokens_decoder` when it has one (add_config_tokens
    adds them), else tokenizer.json's, re-added in id order."""
    data = json.loads(tk.to_str())
    prefix = cfg.get("add_prefix_space")
    if name == "LlamaTokenizer":
        stages = _llama_stages(True if prefix is None else bool(prefix), bool(cfg.get("legacy", False)))
    else:
        stages = _byte_level_stages(name, bool(prefix))
    data.update(stages, model=_bpe_model(data["model"], byte_fallback=name == "LlamaTokenizer"), added_tokens=[])
    data.update(padding=None, truncation=None)
    rebuilt = tokenizers.Tokenizer.from_str(json.dumps(data))
    if "added_tokens_decoder" not in cfg:
        rebuilt.add_tokens([t for _, t in sorted(tk.get_added_tokens_decoder().items())])
    return rebuilt


def _bpe_model(model: Mapping[str, Any], *, byte_fallback: bool) -> dict[str, Any]:
    """A BPE model over the file's vocabulary and merges (a Unigram file's pieces, in order, with no merges)
    with the class's options: no unk token, no dropout, merges always applied."""
    vocab = model.get("vocab") or {}
    if isinstance(vocab, list):
        vocab = {(t[0] if isinstance(t, list) else t): i for i, t in enumerate(vocab)}
    return {
        "type": "BPE",
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": byte_fallback,
        "byte_fallback": byte_fallback,
        "ignore_merges": False,
        "vocab": vocab,
        "merges": model.get("merges") or [],
    }


def _llama_stages(add_prefix_space: bool, legacy: bool) -> dict[str, Any]:
    """LlamaTokenizer's pipeline: no normalizer; a Metaspace pre-tokenizer that marks the start of the text
    ("first"), of every piece between added tokens (`legacy`: "always") or nothing (no prefix space); a
    decoder that turns "▁" back into spaces, joins byte tokens and drops the prefix space it added."""
    scheme = ("always" if legacy else "first") if add_prefix_space else "never"
    decoders = [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if add_prefix_space:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {
        "normalizer": None,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": scheme, "split": False},
        "decoder": {"type": "Sequence", "decoders": decoders},
    }


def _byte_level_stages(name: str, add_prefix_space: bool) -> dict[str, Any]:
    """GPT2Tokenizer's pipeline (byte-level with GPT-2's own split) or Qwen2Tokenizer's (NFC, Qwen's split,
    then byte-level)."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": True, "use_regex": True}
    stages: dict[str, Any] = {"normalizer": None, "pre_tokenizer": byte_level}
    if name == "Qwen2Tokenizer":
        split = {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT_REGEX}, "behavior": "Isolated", "invert": False}
        stages["normalizer"] = {"type": "NFC"}
        stages["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [split, {**byte_level, "use_regex": False}]}
    stages["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    return stages
