"""Tokenizer: a `tokenizers.Tokenizer` plus special tokens, stop ids and a sandboxed chat template.

The contract is "same ids as transformers' fast tokenizer on the same files", so a checkpoint
tokenizes identically here, in transformers and in vLLM:

* `add_special_tokens=True` applies tokenizer.json's post-processor and nothing else. transformers
  (v5) drops tokenizer_config.json's `add_bos_token`/`add_eos_token` whenever tokenizer.json exists,
  so those flags are read but not applied here either. Passing `add_bos_token=`/`add_eos_token=` to
  the constructor is an explicit override that rewrites the post-processor, as transformers does for
  explicit keyword arguments.
* Named special tokens (bos/eos/unk/pad/...) are registered as special added tokens, so they are
  matched whole in text and dropped by `skip_special_tokens=True`.
* `pad_token` falls back to `eos_token` when the config names none (the usual choice for causal
  LMs); the chat template still sees only the tokens the config names.
* `stop_ids` is every end-of-sequence id: the tokenizer's eos, generation_config.json's `eos_token_id`
  (an int or a list: Llama-3 and Phi-3.5 have several) and any extra ids the caller passes. A folder
  whose generation_config.json names no `eos_token_id` (or that has no such file) takes config.json's,
  as transformers' `generate` does (it builds its generation config from config.json then).
* generation_config.json's sampling defaults (temperature, top_p, top_k, repetition_penalty,
  do_sample, ...) are not applied: rollouts sample with `sampler.*` and evaluation with
  `eval.temperature` (greedy by default), where transformers' `generate` would use them. A run config
  is the one source of truth for sampling, so loading a folder that sets them warns once, naming them.

Chat templates render in a jinja2 sandbox (minigrpo.chat_template), with the variables transformers
passes: the conversation, `add_generation_prompt`, every named token (model-specific ones such as
`image_token` included) and any extra keyword arguments. A call with `tools` renders the model's
"tool_use" template when it has one, as in transformers.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, processors

from minigrpo.atomic import write_json
from minigrpo.chat_template import (
    ChatTemplateError,
    encode_marked,
    mark_control_tokens,
    render_chat_template,
    template_literal_text,
)
from minigrpo.tokenizer_config import (
    NAMED_SPECIAL_TOKENS,
    TokenizerConfigError,
    add_config_tokens,
    chat_control_tokens,
    class_default_tokens,
    config_special_tokens,
    eos_ids,
    folder_model_type,
    folder_template_files,
    folder_templates,
    generation_stop_ids,
    read_config,
    read_json_object,
    rebuild_backend,
    rebuilt_class,
)

__all__ = ["NAMED_SPECIAL_TOKENS", "ChatTemplateError", "GenerationConfigWarning", "Tokenizer", "TokenizerConfigError"]

_MAX_SANE_LENGTH = 1 << 40  # transformers writes int(1e30) for "no limit"
_KEPT_FLAGS = ("lstrip", "rstrip", "single_word", "normalized")  # an added token made special keeps these


class Tokenizer:
    """Encode/decode text, render chat prompts and know the stop ids of one model.

    Args:
        tk: the backend tokenizer (copied; padding and truncation are switched off).
        bos_token, eos_token, unk_token, pad_token: special token strings; each must be in the vocab.
            `pad_token=None` falls back to `eos_token`.
        chat_template: a jinja template, or a dict of named templates (the one used by default is
            "default").
        add_bos_token, add_eos_token: None keeps tk's post-processor; a bool rewrites it so that
            `encode(..., add_special_tokens=True)` adds (or does not add) BOS/EOS.
        extra_stop_ids: ids that end generation besides `eos_token` (e.g. generation_config.json's).
        extra_special_tokens: more special token strings (registered like the named ones).
        template_tokens: the `*_token` variables the chat template sees. None: the named tokens
            given here (bos/eos/unk/pad, pad only when given explicitly).
        model_max_length: the longest sequence the model was trained for, if known.
        chat_template_files: the file each named template was read from; a template that fails names it.
        chat_control_tokens: added tokens that `sanitize_control_tokens` treats as control tokens besides the
            special ones (tokenizer_config.json's `chat_control_tokens`); None: those the template writes.
    """

    def __init__(
        self,
        tk: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | Mapping[str, str] | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        extra_stop_ids: Iterable[int] = (),
        extra_special_tokens: Iterable[str] = (),
        template_tokens: Mapping[str, str] | None = None,
        model_max_length: int | None = None,
        chat_template_files: Mapping[str, str | os.PathLike] | None = None,
        chat_control_tokens: Iterable[str] | None = None,
    ) -> None:
        self._tk = tokenizers.Tokenizer.from_str(tk.to_str())  # own copy: we change its state below
        self._tk.no_padding()
        self._tk.no_truncation()
        self.bos_token, self.eos_token, self.unk_token = bos_token, eos_token, unk_token
        self.pad_token = pad_token if pad_token is not None else eos_token
        self._register_special([bos_token, eos_token, unk_token, self.pad_token, *extra_special_tokens])
        self.bos_token_id = self._required_id(bos_token, "bos_token")
        self.eos_token_id = self._required_id(eos_token, "eos_token")
        self.unk_token_id = self._required_id(unk_token, "unk_token")
        self.pad_token_id = self._required_id(self.pad_token, "pad_token")
        if add_bos_token is not None or add_eos_token is not None:
            self._set_post_processor(add_bos_token, add_eos_token)

        if isinstance(chat_template, Mapping):
            self.chat_templates: dict[str, str] = dict(chat_template)
        else:
            self.chat_templates = {} if chat_template is None else {"default": chat_template}
        if template_tokens is None:
            named = {"bos_token": bos_token, "eos_token": eos_token, "unk_token": unk_token, "pad_token": pad_token}
            template_tokens = {k: v for k, v in named.items() if v is not None}
        self.template_tokens = dict(template_tokens)
        self.model_max_length = model_max_length
        self.chat_template_files = {k: str(v) for k, v in (chat_template_files or {}).items()}
        self.chat_control_tokens = None if chat_control_tokens is None else tuple(chat_control_tokens)

        stops = {i for i in (self.eos_token_id, *extra_stop_ids) if i is not None}
        bad = sorted(i for i in stops if i < 0 or self._tk.id_to_token(i) is None)  # ids may leave gaps: no count
        if bad:
            raise ValueError(f"stop ids {bad} are outside the vocabulary (no token has them)")
        self.stop_ids: tuple[int, ...] = tuple(sorted(stops))

    # ---- construction ------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a Hugging Face tokenizer folder: tokenizer.json plus its optional JSON/jinja files.

        Reads tokenizer.json (required), tokenizer_config.json (a `tokenizer_class` that transformers 5
        rebuilds, LlamaTokenizer, GPT2Tokenizer or Qwen2Tokenizer, gets that class's pipeline around the
        file's vocabulary, as in transformers: see tokenizer_config.rebuilt_class; config.json's
        `model_type` takes part in that choice), special_tokens_map.json (only when the config has no
        `added_tokens_decoder`, as transformers does), chat_template.jinja and
        additional_chat_templates/*.jinja (these win over the config's `chat_template`, as in
        transformers) and generation_config.json (its `eos_token_id` adds stop ids, config.json's when it
        names none; its sampling defaults are not applied and warn). A file or value
        that makes no tokenizer is a TokenizerConfigError naming the file (and key).
        """
        d = Path(path)
        tk_file = d / "tokenizer.json"
        if not tk_file.is_file():
            raise FileNotFoundError(f"{tk_file} not found: only fast tokenizers (tokenizer.json) are supported")
        try:
            tk = tokenizers.Tokenizer.from_file(str(tk_file))
        except Exception as e:  # the library's bare (Rust) Exception names no file
            raise TokenizerConfigError(f"{tk_file}: not a readable tokenizer ({e})") from e
        cfg, origin = read_config(d)
        rebuilt = rebuilt_class(cfg, folder_model_type(d), tk)
        if rebuilt is not None:  # transformers builds this class's own pipeline around the file's vocabulary
            tk = rebuild_backend(rebuilt, tk, cfg)
            class_default_tokens(cfg, origin, rebuilt, tk)
        add_config_tokens(cfg, d / "tokenizer_config.json", tk)
        tokens, template_tokens, specials = config_special_tokens(cfg, origin, tk, tk_file)

        gen_file = d / "generation_config.json"
        generation = read_json_object(gen_file, TokenizerConfigError) if gen_file.is_file() else {}
        extra_stop = eos_ids(generation.get("eos_token_id"), gen_file) or generation_stop_ids(d / "config.json")
        warn_ignored_sampling_defaults(gen_file, generation)
        max_len = cfg.get("model_max_length")
        templates = folder_templates(d, cfg.get("chat_template"))
        return cls(
            tk,
            bos_token=tokens["bos_token"],
            eos_token=tokens["eos_token"],
            pad_token=tokens["pad_token"],
            unk_token=tokens["unk_token"],
            chat_template=templates or None,
            chat_template_files=folder_template_files(d, templates),
            chat_control_tokens=chat_control_tokens(cfg, d / "tokenizer_config.json"),
            extra_stop_ids=extra_stop,
            extra_special_tokens=specials,
            template_tokens=template_tokens,
            model_max_length=int(max_len) if isinstance(max_len, (int, float)) and max_len < _MAX_SANE_LENGTH else None,
        )

    def _register_special(self, contents: Iterable[str | None]) -> None:
        """Make each token a special added token (kept whole in text, skippable on decode); an added token
        keeps its matching flags (lstrip, rstrip, single_word, normalized), as in transformers."""
        added = {t.content: t for t in self._tk.get_added_tokens_decoder().values()}
        new = []
        for content in dict.fromkeys(c for c in contents if c is not None):
            old = added.get(content)
            if old is not None and old.special:
                continue
            if old is None and self._tk.token_to_id(content) is None:
                raise ValueError(f"special token {content!r} is not in the tokenizer's vocabulary")
            flags = {"normalized": False} if old is None else {k: getattr(old, k) for k in _KEPT_FLAGS}
            new.append(AddedToken(content, special=True, **flags))
        if new:
            self._tk.add_special_tokens(new)

    def _required_id(self, token: str | None, what: str) -> int | None:
        if token is None:
            return None
        tid = self._tk.token_to_id(token)
        if tid is None:
            raise ValueError(f"{what} {token!r} is not in the tokenizer's vocabulary")
        return tid

    def _set_post_processor(self, add_bos: bool | None, add_eos: bool | None) -> None:
        """Rewrite the post-processor to add BOS/EOS as asked; None keeps the current behaviour."""
        add_bos = self.add_bos_token if add_bos is None else add_bos
        add_eos = self.add_eos_token if add_eos is None else add_eos
        if (add_bos, add_eos) == (self.add_bos_token, self.add_eos_token):
            return
        if (add_bos and self.bos_token is None) or (add_eos and self.eos_token is None):
            raise ValueError("add_bos_token/add_eos_token need bos_token/eos_token")
        bos = f"{self.bos_token}:0 " if add_bos else ""
        eos = f" {self.eos_token}:0" if add_eos else ""
        bos1 = f" {self.bos_token}:1" if add_bos else ""
        eos1 = f" {self.eos_token}:1" if add_eos else ""
        special = [(self.bos_token, self.bos_token_id)] if add_bos else []
        if add_eos and self.eos_token != (self.bos_token if add_bos else None):
            special.append((self.eos_token, self.eos_token_id))
        self._tk.post_processor = processors.TemplateProcessing(
            single=f"{bos}$A:0{eos}", pair=f"{bos}$A:0{eos}{bos1} $B:1{eos1}", special_tokens=special
        )

    # ---- encode / decode ---------------------------------------------------------------------------

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer` (read it, do not change it)."""
        return self._tk

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` applies the post-processor (e.g. Llama-3's BOS)."""
        return self._tk.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = True) -> list[list[int]]:
        """`encode` for many texts at once (parallel in the Rust backend)."""
        batch = getattr(self._tk, "encode_batch_fast", self._tk.encode_batch)  # _fast: no offsets (tokenizers>=0.21)
        encs = batch(list(texts), add_special_tokens=add_special_tokens)
        return [e.ids for e in encs]

    def decode(self, ids: Iterable[int] | int, *, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list, tuple or 1-D tensor, or one id); `skip_special_tokens` drops special tokens."""
        return self._tk.decode(_as_id_list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Iterable[Iterable[int]], *, skip_special_tokens: bool = False) -> list[str]:
        """`decode` for many sequences at once."""
        seqs = [_as_id_list(ids) for ids in batch]
        return self._tk.decode_batch(seqs, skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (transformers' `len(tokenizer)`)."""
        return self._tk.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        """Id of one token string, or None if it is not in the vocabulary."""
        return self._tk.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Token string of one id, or None if the id is out of range."""
        return self._tk.id_to_token(token_id)

    def _special_affixes(self) -> tuple[list[int], list[int]]:
        """Ids the post-processor puts before and after a single sequence."""
        plain = self._tk.encode("a", add_special_tokens=False).ids
        full = self._tk.encode("a", add_special_tokens=True).ids
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return full[:start], full[start + len(plain) :]
        return [], []

    @property
    def add_bos_token(self) -> bool:
        """Whether `encode(..., add_special_tokens=True)` starts with BOS."""
        return self.bos_token_id is not None and self.bos_token_id in self._special_affixes()[0]

    @property
    def add_eos_token(self) -> bool:
        """Whether `encode(..., add_special_tokens=True)` ends with EOS."""
        return self.eos_token_id is not None and self.eos_token_id in self._special_affixes()[1]

    # ---- chat template -----------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        """The default chat template: None if the model has none, and also if it has only named ones
        (`chat_templates`, e.g. "tool_use"), which prompts must then pick by name."""
        return self.chat_templates.get("default")

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        tokenize: bool = False,
        chat_template: str | None = None,
        tools: Sequence[Mapping[str, Any] | Any] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        sanitize_control_tokens: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render one conversation with the chat template (as transformers does) and optionally tokenize.

        Args:
            messages: dicts with at least "role" and "content"; keys whose value is None are dropped.
            add_generation_prompt: end with the header that starts an assistant turn.
            continue_final_message: end right after the final message's text, inside its open turn (a
                reply begun for the model to continue); a string names the field to continue
                ("reasoning_content"). Not with add_generation_prompt.
            tokenize: return ids (encoded with `add_special_tokens=False`: the template already has
                every special token) instead of the string.
            chat_template: the name of one of `chat_templates`, or a template string; default "tool_use"
                when `tools` is given and the model has a template of that name, else "default".
            tools: JSON-schema dicts (passed as is), `minigrpo.tools.Tool`s or Python functions (their
                schemas, read from the signature and docstring).
            documents: document dicts, passed to the template as is.
            sanitize_control_tokens: encode the control tokens found in the messages, tools, documents and
                kwargs as plain text, so that only the ones the template writes are control ids (as transformers:
                the special tokens plus `chat_control_tokens`, else the added tokens the template's text has).
                Needs `tokenize`. Off by default, as in transformers: a typed "<|im_end|>" is then one id.
            **kwargs: more template variables (e.g. `enable_thinking`); they override special tokens.

        Raises:
            ChatTemplateError: no template, or the template raised / broke the sandbox / failed to parse; one
                line that names the file the template was read from (Tokenizer.from_dir).
        """
        if sanitize_control_tokens and not tokenize:
            raise ChatTemplateError("sanitize_control_tokens=True changes the ids, not the text: needs tokenize=True")
        name = self._pick_template(chat_template, tools)
        template = self.chat_templates.get(name, name)
        try:
            control = self._control_tokens(template) if sanitize_control_tokens else None
            if control is not None:
                messages, tools, documents, kwargs = (
                    mark_control_tokens(x, control) for x in (messages, tools, documents, kwargs)
                )
            text = render_chat_template(
                template,
                messages,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tools=tools,
                documents=documents,
                variables={**self.template_tokens, **kwargs},
            )
            if control is not None:
                return encode_marked(self._tk, text, control)
        except ChatTemplateError as e:
            file = self.chat_template_files.get(name) if name in self.chat_templates else None
            if file is None:
                raise
            raise ChatTemplateError(f"{file}: {e}") from e
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _control_tokens(self, template: str) -> tuple[str, ...]:
        """The added tokens sanitize_control_tokens encodes as text in a user's input: the special ones, and those
        of `chat_control_tokens` when the config lists them, else those the template's text has (but whitespace)."""
        added = self._tk.get_added_tokens_decoder().values()
        if self.chat_control_tokens is not None:
            return tuple(t.content for t in added if t.special or t.content in self.chat_control_tokens)
        literal = template_literal_text(template)
        return tuple(t.content for t in added if t.special or (t.content in literal and not t.content.isspace()))

    def _pick_template(self, chat_template: str | None, tools: Sequence[Any] | None = None) -> str:
        """The name of the template to render (a key of `chat_templates`), or the template source given: a
        name or source given, else "tool_use" for a call with tools (even an empty list, as transformers
        does) when the model has one, else "default"."""
        if chat_template is not None:
            return chat_template
        if tools is not None and "tool_use" in self.chat_templates:
            return "tool_use"
        if "default" in self.chat_templates:
            return "default"
        if self.chat_templates:
            raise ChatTemplateError(
                f"the chat templates {sorted(self.chat_templates)} include no 'default' one (transformers refuses "
                "this too): name one as chat_template= (in a run config: data.chat_template_kwargs.chat_template)"
            )
        raise ChatTemplateError("this tokenizer has no chat template (tokenizer_config.json has none)")

    # ---- saving ------------------------------------------------------------------------------------

    def generation_config(self) -> dict[str, Any]:
        """The token fields of generation_config.json: bos, every stop id as eos, pad."""
        eos: int | list[int] | None = list(self.stop_ids) if len(self.stop_ids) > 1 else self.eos_token_id
        return {"bos_token_id": self.bos_token_id, "eos_token_id": eos, "pad_token_id": self.pad_token_id}

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `path`.

        transformers' `AutoTokenizer.from_pretrained(path)` loads the result with the same ids and
        chat template. generation_config.json is the model saver's (see `generation_config()`): the
        stop ids beyond `eos_token` live there.
        """
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        self._tk.save(str(d / "tokenizer.json"))
        tokens = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": self.pad_token,
        }
        named = {k: v for k, v in self.template_tokens.items() if k.endswith("_token") and isinstance(v, str)}
        tokens = {**named, **{k: v for k, v in tokens.items() if v is not None}}  # sep, image, ... kept
        cfg: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **tokens,
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "clean_up_tokenization_spaces": False,
        }
        if self.model_max_length is not None:
            cfg["model_max_length"] = self.model_max_length
        if self.chat_control_tokens is not None:
            cfg["chat_control_tokens"] = list(self.chat_control_tokens)
        if list(self.chat_templates) == ["default"]:
            cfg["chat_template"] = self.chat_templates["default"]
        elif self.chat_templates:
            cfg["chat_template"] = [{"name": k, "template": v} for k, v in self.chat_templates.items()]
        write_json(d / "tokenizer_config.json", cfg, sort_keys=False)
        write_json(d / "special_tokens_map.json", tokens, sort_keys=False)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
            f"pad={self.pad_token!r}, stop_ids={list(self.stop_ids)}, chat_template={self.chat_template is not None})"
        )


# ---- helpers -----------------------------------------------------------------------------------------

# generation_config.json keys that change what transformers' generate draws (not when it stops)
SAMPLING_DEFAULT_KEYS = (
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "typical_p",
    "repetition_penalty",
    "no_repeat_ngram_size",
)


class GenerationConfigWarning(UserWarning):
    """A model folder's generation_config.json sets sampling defaults that minigrpo does not apply."""


def warn_ignored_sampling_defaults(path: Path, generation: Mapping[str, Any]) -> None:
    """Warn when generation_config.json (`generation`, read from `path`) sets sampling defaults: transformers'
    `generate` would apply them, minigrpo samples with the run config's `sampler.*` / `eval.temperature` only
    (one source of truth)."""
    found = {k: generation[k] for k in SAMPLING_DEFAULT_KEYS if generation.get(k) is not None}
    if found:
        settings = ", ".join(f"{k}={v!r}" for k, v in found.items())
        warnings.warn(
            GenerationConfigWarning(
                f"{path} sets {settings}: not applied (transformers' generate would); rollouts sample with "
                "sampler.temperature/top_p/top_k/min_p and evaluation with eval.temperature (greedy by default); "
                "repetition_penalty and no_repeat_ngram_size have no counterpart"
            ),
            stacklevel=3,
        )


def _as_id_list(ids: Iterable[int] | int) -> list[int]:
    """Token ids to decode as a list of ints: a list, tuple or 1-D tensor / array of them, or one id (an int,
    a 0-d tensor, a numpy integer), as transformers' decode accepts. A negative id (a -100 label left in)
    is a ValueError naming it, not the backend's bare OverflowError."""
    tolist = getattr(ids, "tolist", None)
    values = tolist() if tolist is not None else ids
    out = [int(values)] if isinstance(values, int) else [int(i) for i in values]
    if out and min(out) < 0:
        raise ValueError(f"cannot decode token id {min(out)}: token ids are >= 0 (mask out -100 labels first)")
    return out
