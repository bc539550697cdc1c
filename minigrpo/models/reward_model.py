"""Reward models: our Transformer body with transformers' sequence-classification `score` head.

    model, tokenizer = load_reward_model("path/to/Skywork-Reward-Llama")   # *ForSequenceClassification
    scores = model(input_ids, attention_mask=mask)                          # (B, num_labels) fp32

    fn = make_reward_model(path="path/to/rm", batch_size=8)                 # a reward function
    fn(prompts, completions, answers)                                       # list of N floats

A checkpoint saved by `LlamaForSequenceClassification`, `Qwen2ForSequenceClassification`, ...
holds the body under the usual names (`model.layers.0...`), the head as `score.weight`
(num_labels, D) and no LM head; config.json names the architecture, `pad_token_id` (absent: the
family's default, Phi-3's 32000) and the labels (`num_labels`, or `id2label` whose length is the
count; transformers' default is 2; a head with another number of rows is an error naming the key).
A `score.bias` that some checkpoints carry is ignored with a warning, as transformers' bias-free head
ignores it.

Pooling, as transformers does it (GenericForSequenceClassification.forward): the head reads the
hidden state of each row's rightmost token that is not `pad_token_id`, so left and right padding
give the same score; a row of pads only reads its first token (its first real one, padded). Without
a pad_token_id in the config, transformers only takes one row at a time; here the last real token
of `attention_mask` (or the last column) is read instead, and a token outside a given mask is never
read (padding filled with another id, or pad_token_id = -1: transformers then reads a lone row's last
token, and so do we for every padded row). Consequence of matching: when pad_token_id is also a
real token (pad == eos), a trailing real one is skipped, exactly as transformers skips it.

As a reward (`make_reward_model`, registered as `reward_model` in minigrpo.reward_fns): each prompt plus
completion is rendered as a conversation with the reward model's own chat template (plain
"prompt\\n\\ncompletion" text when it has none; a prompt ending with an assistant message, a begun reply,
has the completion appended to that message), tokenized by its own tokenizer, kept to the last
`max_length` tokens (the pooled token is the last one), right-padded, scored in batches of `batch_size`
rows sorted by length, without gradients, one call at a time in the process. A chat template that
refuses a conversation (raise_exception, e.g. "System role not supported") stops the run with a
RewardModelError: it would refuse every step's rows alike. The model loads on the first call, once per
(folder, device, dtype) in the process; a folder is checked when the reward is built, a hub id's config
and tokenizer before its weights download. That first call counts against the reward's `timeout_s`:
give it room for the load, or call `fn.load()` before the first step.
"""

from __future__ import annotations

import functools
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minigrpo.chat_template import ChatTemplateError, compile_chat_template
from minigrpo.errors import UserError
from minigrpo.reward_args import check_reward_model_kwargs
from minigrpo.reward_fns import RewardError, reward_device

from .args import ModelArgs, hf_default
from .hub import download
from .transformer import Transformer

__all__ = [
    "RewardModel",
    "RewardModelError",
    "RewardModelScorer",
    "check_reward_folder",
    "check_reward_settings",
    "check_score_head",
    "last_token_index",
    "load_reward_model",
    "make_reward_model",
    "read_reward_config",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RewardModelError(RewardError):
    """A folder that is no sequence-classification checkpoint, or one unfit to be a reward (num_labels != 1).

    A RewardError (a UserError): raised from inside a reward call (a hub id checked when it is
    fetched), rewards.score stops the run instead of masking every row."""


def last_token_index(
    input_ids: torch.Tensor, pad_token_id: int | None, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """input_ids (B, T) -> (B,) column whose hidden state is scored: the rightmost token that is not
    pad_token_id (transformers' rule; the first token for a row of pads) and, given attention_mask, is
    a real token of it (the last column with neither). The mask matters where padding holds another id
    than pad_token_id, as with pad_token_id = -1 (no id at all, so transformers reads a lone row's last
    token): a padded row is then still scored at its own last token, as it is alone. A row whose real
    tokens are all pad_token_id is read at its first real token (transformers reads such a row, alone,
    at column 0), never at a padding column before it."""
    cols = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
    keep = torch.ones_like(input_ids, dtype=torch.bool)  # (B, T)
    if pad_token_id is not None:
        keep &= input_ids != pad_token_id
    if attention_mask is None:
        return (cols * keep).argmax(-1)  # (B,) the largest kept column; 0 when none is kept
    real = attention_mask.bool()  # (B, T)
    keep &= real
    first_real = real.int().argmax(-1)  # (B,) 0 for a row without a real token
    return torch.where(keep.any(-1), (cols * keep).argmax(-1), first_real)  # (B,)


class RewardModel(Transformer):
    """The Transformer body (`model.`) with `score` (num_labels, D) in place of the LM head.

    `model(ids, attention_mask=...)` -> (B, num_labels) fp32 scores; `hidden` is the Transformer's.
    """

    reads_lm_head = False  # a checkpoint's lm_head.weight is no part of a reward model: never compared

    def __init__(self, args: ModelArgs, num_labels: int = 1, pad_token_id: int | None = None) -> None:
        super().__init__(args)
        self.lm_head = None  # no LM head: a checkpoint's lm_head.weight, if any, is ignored (as tied ones are)
        self.score = nn.Linear(args.dim, num_labels, bias=False)
        self.num_labels = num_labels
        self.pad_token_id = pad_token_id

    @property
    def output_weight(self) -> torch.Tensor:
        raise TypeError("a RewardModel has no LM head: it scores sequences (model(ids) -> (B, num_labels))")

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise TypeError("a RewardModel has no LM head: it scores sequences (model(ids) -> (B, num_labels))")

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """input_ids (B, T) -> scores (B, num_labels) fp32. Keyword arguments as in `hidden`.

        The head runs in fp32 on the pooled states only (B rows, not B * T)."""
        hidden = self.hidden(input_ids, **kwargs)  # (B, T, D)
        index = last_token_index(input_ids, self.pad_token_id, kwargs.get("attention_mask"))  # (B,)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), index]  # (B, D)
        return F.linear(pooled.float(), self.score.weight.float())  # (B, num_labels)


# ----------------------------------------------------------------------------------------------
# loading


def read_reward_config(config: dict[str, Any], where: Path | str) -> tuple[int, int | None]:
    """(num_labels, pad_token_id) of a sequence-classification config.json; RewardModelError when the
    config names no *ForSequenceClassification architecture or its labels make no sense."""
    archs = config.get("architectures") or []
    if not isinstance(archs, list) or not any(str(a).endswith("ForSequenceClassification") for a in archs):
        raise RewardModelError(
            f"{where}: not a sequence-classification checkpoint (architectures={archs!r}); a reward model is "
            "saved by a *ForSequenceClassification class (e.g. LlamaForSequenceClassification) with a score head"
        )
    num_labels = config.get("num_labels")
    if num_labels is None:
        id2label = config.get("id2label")
        num_labels = len(id2label) if isinstance(id2label, dict) else 2  # transformers' default
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise RewardModelError(f"{where}: num_labels={num_labels!r} must be a whole number >= 1")
    # a config.json without the key has the family's default, as transformers' config class fills it in
    # (Phi-3: 32000, its <|endoftext|>, which its chat template writes last: that token is skipped)
    pad = config["pad_token_id"] if "pad_token_id" in config else hf_default(config.get("model_type"), "pad_token_id")
    if isinstance(pad, list):  # some configs list several; transformers compares with the first
        pad = pad[0] if pad else None
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int)):
        raise RewardModelError(f"{where}: pad_token_id={pad!r} must be a whole number or null")
    return num_labels, pad


def meta_reward_model(config: dict[str, Any], where: Path) -> RewardModel:
    """The RewardModel a sequence-classification config.json (at `where`) describes, on the meta device."""
    from . import loading

    num_labels, pad = read_reward_config(config, where)
    build = functools.partial(RewardModel, num_labels=num_labels, pad_token_id=pad)
    return loading._model_from_config(config, where, build)  # no memory


def load_reward_model(
    name_or_path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    load_tokenizer: bool = True,
    require_tokenizer: bool = False,
    check: Callable[[RewardModel, Any], None] | None = None,
) -> tuple[RewardModel, Any]:
    """Load an HF *ForSequenceClassification checkpoint (local folder or hub id) and its tokenizer.

    What needs no weight is checked first, a hub repo's before its weights download: the config (a
    sequence-classification one), the tokenizer (every id a row of the embedding), then `check(model,
    tokenizer)` on the meta-device model (a reward's own settings). Names and shapes are then checked
    as in load_pretrained (score.weight included); errors are UserErrors naming the folder or repo."""
    from . import loading

    read = functools.partial(_read_small_files, load_tokenizer=load_tokenizer, required=require_tokenizer, check=check)
    source, (model, tokenizer) = _fetch(str(name_or_path), revision, read)
    tensors = loading._hf_tensor_source(source)
    check_score_head(source, tensors[0], model.num_labels)
    loading._fill(model, tensors, dtype, device)
    return model.eval(), tokenizer


def _fetch(name: str, revision: str | None, read: Callable[[Path, str | None], Any]) -> tuple[Path, Any]:
    """(folder, read(folder, repo_id)) of a local folder or hub repo `name`: a hub repo's weights are
    fetched only once `read` has passed on its config and tokenizer files."""
    from . import loading

    if name in loading.PACKAGED_MODELS or Path(name).expanduser().exists() or loading._looks_local(name):
        source = loading._resolve(name, revision)
        return source, read(source, None)
    parts: list[Any] = []

    def weights_to_fetch(folder: Path) -> list[str]:
        parts.append(read(folder, name))
        return loading._hub_weight_files(folder)

    source = download(name, revision, weights_to_fetch)
    return source, parts[-1]


def _read_small_files(
    folder: Path, repo_id: str | None, *, load_tokenizer: bool, required: bool, check: Callable | None
) -> tuple[RewardModel, Any]:
    """(meta-device RewardModel, tokenizer or None) from config.json and the tokenizer files, no weight read."""
    from . import loading

    model = meta_reward_model(loading._read_config(folder), folder / "config.json")
    tokenizer_dir = loading._tokenizer_dir(folder, required=required, repo_id=repo_id) if load_tokenizer else None
    tokenizer = loading.load_tokenizer_folder(tokenizer_dir) if tokenizer_dir is not None else None
    loading._check_vocab(tokenizer, model.args.vocab_size, folder)  # an id past the embedding: a crash per row
    if check is not None:
        check(model, tokenizer)
    return model, tokenizer


def check_score_head(folder: Path, shapes: dict[str, Any], num_labels: int | None = None) -> None:
    """The weights (names -> (shape, file), from the headers) hold the score head a classification config
    promises, with one row per label when `num_labels` is given (a config.json that names no labels
    counts 2, transformers' default, which a one-score head's config must then override).

    A `score.bias` is taken out of `shapes` (so it is neither checked nor loaded), with a warning:
    transformers' head for these families has no bias and drops it too, so the scores stay its scores."""
    if "score.weight" not in shapes:
        raise RewardModelError(
            f"{folder}: its config names a *ForSequenceClassification model but its weights hold no score head "
            "(score.weight): save the reward model with its head (e.g. LlamaForSequenceClassification.save_pretrained)"
        )
    shape = shapes["score.weight"][0]
    rows = shape[0] if len(shape) == 2 else num_labels  # another shape: the shape check names it
    if num_labels is not None and rows != num_labels:
        raise RewardModelError(
            f"{folder}: its score head (score.weight) has {rows} row(s) but config.json gives {num_labels} labels "
            f"(num_labels, else the length of id2label, else 2): set num_labels to {rows} in config.json"
        )
    if shapes.pop("score.bias", None) is not None:
        warnings.warn(
            f"{folder}: score.bias is ignored, as transformers ignores it (a *ForSequenceClassification head has "
            "no bias): the scores are those transformers gives",
            UserWarning,
            stacklevel=2,
        )


def _local_config(path: str) -> tuple[Path, dict[str, Any]] | None:
    """(folder, config) when `path` is a local folder (the checks that can run before loading);
    None for a hub id that is not on disk (checked when fetched). RewardModelError otherwise."""
    from .loading import _looks_local, _read_config

    folder = Path(path).expanduser()
    if not folder.exists():
        if _looks_local(path):
            raise RewardModelError(f"reward model path {path!r} does not exist")
        return None
    if folder.is_file():
        raise RewardModelError(f"reward model path {path!r} is a file; expected a checkpoint folder")
    return folder, _read_config(folder)


def check_reward_folder(folder: Path, config: dict[str, Any]) -> tuple[ModelArgs, Any]:
    """Everything load_reward_model checks, as a reward needs it, without reading a weight: a
    sequence-classification config with num_labels=1 the model can be built from, weights whose
    names and shapes fit it (headers only), a tokenizer that loads. Returns (model args, tokenizer)."""
    from . import loading

    model = meta_reward_model(config, folder / "config.json")
    num_labels, shapes = model.num_labels, loading._hf_tensor_source(folder)[0]
    check_score_head(folder, shapes, num_labels)  # a head that disagrees with the labels: say which to fix
    if num_labels != 1:
        raise RewardModelError(_labels_message(str(folder), num_labels))
    loading._check(model, shapes)
    tokenizer = loading.load_tokenizer_folder(loading._tokenizer_dir(folder, required=True))
    loading._check_vocab(tokenizer, model.args.vocab_size, folder)  # an id past the embedding: a crash per row
    return model.args, tokenizer


def check_reward_settings(path: str, args: ModelArgs, tokenizer: Any, max_length: int | None, template: Any) -> None:
    """The settings that depend on the checkpoint: RewardModelError when max_length passes the
    positions the model was trained on, or chat_template names a template its tokenizer lacks (which
    would render as its own text: the same string, and so the same score, for every row) or is
    jinja source that does not parse."""
    limit = args.max_position_embeddings
    if max_length is not None and max_length > limit:
        raise RewardModelError(
            f"reward 'reward_model': kwargs max_length={max_length} is more than {path!r}'s "
            f"max_position_embeddings ({limit}): its scores past that many tokens are untrained; give at most {limit}"
        )
    if template in (None, "auto", "none"):
        return
    if _is_template_source(template):
        try:
            compile_chat_template(template)
        except ChatTemplateError as e:
            raise RewardModelError(f"reward 'reward_model': kwargs chat_template (jinja source): {e}") from e
        return
    if template not in tokenizer.chat_templates:
        names = ", ".join(sorted(tokenizer.chat_templates))
        has = f"has {names}" if names else "has no chat template"
        raise RewardModelError(
            f"reward 'reward_model': kwargs chat_template={template!r} is no template of {path!r}'s tokenizer, which "
            f"{has}: give one of them, 'auto', 'none' or jinja source"
        )


def _is_template_source(template: str) -> bool:
    """Jinja source holds a statement or an expression; a template name holds neither."""
    return "{{" in template or "{%" in template


# ----------------------------------------------------------------------------------------------
# the reward function

_LOADED: dict[tuple, tuple[RewardModel, Any]] = {}  # (path, device, dtype) -> (model, tokenizer)
_LOAD_LOCK = threading.Lock()
# One scoring at a time in the process: a call that timed out keeps running (a thread cannot be stopped), and
# the rewards' per-row retry would otherwise run a second forward beside it (twice the activations).
_SCORE_LOCK = threading.Lock()


def _conversation(prompt: Any, completion: str) -> list[dict[str, Any]]:
    """The prompt (text, or chat messages) followed by the completion as the assistant's turn.

    A prompt that ends with an assistant message is a reply begun for the policy (a prefill such as
    "<think>"): the policy continued that message, so the completion is appended to its content,
    one reply, not a second assistant turn after it."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, Sequence) and all(isinstance(m, dict) for m in prompt):
        messages = [dict(m) for m in prompt]
    else:
        raise ValueError(f"prompt is {type(prompt).__name__}; expected text or a list of chat messages")
    if messages and messages[-1].get("role") == "assistant":
        begun = messages.pop()
        return [*messages, {**begun, "content": str(begun.get("content") or "") + completion}]
    return [*messages, {"role": "assistant", "content": completion}]


class RewardModelScorer:
    """The `reward_model` reward function: fn(prompts, completions, answers, **columns) -> N floats,
    None for a completion that is None (no text to score, as with every built-in).

    Built by `make_reward_model`; `load()` loads the model now (else the first call does)."""

    def __init__(
        self, path: str, batch_size: int, max_length: int | None, device: str, dtype: str, chat_template: str | None
    ) -> None:
        self.path, self.batch_size, self.max_length = path, batch_size, max_length
        self.device_name, self.dtype_name, self.chat_template = device, dtype, chat_template
        self.__name__ = "reward_model"

    def load(self) -> tuple[RewardModel, Any]:
        """The model and tokenizer, loaded on the first call; a hub id's config, tokenizer and this reward's
        settings are checked before its weights download (a RewardModelError stops the run)."""
        device = reward_device(self.device_name)
        auto = torch.bfloat16 if device.type == "cuda" else torch.float32
        dtype = auto if self.dtype_name == "auto" else DTYPES[self.dtype_name]
        key = (self.path, str(device), dtype)
        with _LOAD_LOCK:
            if key in _LOADED:
                self.check(*_LOADED[key])
                return _LOADED[key]
            try:
                _LOADED[key] = load_reward_model(
                    self.path, dtype=dtype, device=device, require_tokenizer=True, check=self.check
                )
            except RewardModelError:
                raise
            except UserError as e:  # a hub id that cannot be fetched: stop the run, not mask every row
                raise RewardModelError(f"reward 'reward_model': {e}") from e
            return _LOADED[key]

    def check(self, model: RewardModel, tokenizer: Any) -> None:
        """This reward's needs of a (meta-device or loaded) model: one label, and settings that fit it."""
        if model.num_labels != 1:
            raise RewardModelError(_labels_message(self.path, model.num_labels))
        check_reward_settings(self.path, model.args, tokenizer, self.max_length, self.chat_template)

    def render(self, tokenizer: Any, prompt: Any, completion: str) -> list[int]:
        """Token ids of one scored conversation: the RM's chat template, else plain text."""
        messages = _conversation(prompt, completion)
        use_template = self.chat_template not in (None, "none") and (
            self.chat_template != "auto" or tokenizer.chat_template is not None
        )
        if use_template:
            template = None if self.chat_template == "auto" else self.chat_template
            try:
                text = tokenizer.apply_chat_template(messages, chat_template=template)
            except ChatTemplateError as e:  # the same refusal on every step: stop, not mask every row
                raise RewardModelError(
                    f"reward 'reward_model': {self.path!r}'s chat template cannot render the conversation ({e}); "
                    "give kwargs chat_template: none (plain text) or a template that takes it"
                ) from e
            return tokenizer.encode(text, add_special_tokens=False)  # the template wrote the special tokens
        return tokenizer.encode("\n\n".join(str(m.get("content") or "") for m in messages))

    @torch.no_grad()
    def __call__(
        self, prompts: list, completions: list[str], answers: list, *, prompt_messages: list | None = None, **_: Any
    ) -> list[float | None]:
        """prompt_messages: the conversations the policy saw (the loop's column: data.system_prompt included),
        scored in place of the bare prompts when given."""
        prompts = prompts if prompt_messages is None else prompt_messages
        with _SCORE_LOCK:  # a call abandoned at its timeout ends before the next (its per-row retry) runs
            return self._score(prompts, completions)

    def _score(self, prompts: list, completions: list[str]) -> list[float | None]:
        model, tokenizer = self.load()
        limit = self.max_length or model.args.max_position_embeddings
        rows = [[] if c is None else self.render(tokenizer, p, c)[-limit:] for p, c in zip(prompts, completions)]
        pad = _padding_id(model, tokenizer)
        out: list[float | None] = [None] * len(rows)
        order = sorted((i for i in range(len(rows)) if rows[i]), key=lambda i: len(rows[i]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            T = max(len(rows[i]) for i in chunk)
            ids = torch.full((len(chunk), T), pad, dtype=torch.long)  # (b, T) right-padded
            mask = torch.zeros((len(chunk), T), dtype=torch.long)  # (b, T)
            for r, i in enumerate(chunk):
                ids[r, : len(rows[i])] = torch.tensor(rows[i])
                mask[r, : len(rows[i])] = 1
            scores = model(ids.to(model.device), attention_mask=mask.to(model.device))  # (b, 1) fp32
            for i, value in zip(chunk, scores[:, 0].tolist()):
                out[i] = value
        return out


def _padding_id(model: RewardModel, tokenizer: Any) -> int:
    """The id that fills a batch's padding: the model's pad id, else the tokenizer's, else 0, the
    first of them that is a row of the embedding (a config's pad_token_id may be -1: no token). The
    attention mask keeps the filler out of the scores whichever id it is (last_token_index)."""
    for candidate in (model.pad_token_id, tokenizer.pad_token_id):
        if isinstance(candidate, int) and 0 <= candidate < model.args.vocab_size:
            return candidate
    return 0


def _labels_message(path: str, num_labels: int) -> str:
    return (
        f"reward model {path!r} has num_labels={num_labels}: a reward needs one score per sequence "
        "(num_labels=1, a Bradley-Terry reward model)"
    )


def make_reward_model(
    path: str | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    chat_template: str | None = "auto",
) -> RewardModelScorer:
    """The `reward_model` reward: scores of a *ForSequenceClassification checkpoint with num_labels=1.

    path: a checkpoint folder or a hub id. batch_size: rows per forward. max_length: tokens kept per
    row, the last ones (None: the model's max_position_embeddings). device: "auto" (the run's
    device, reward_fns.set_run_device; without one CUDA if available, else the CPU), "cpu", "cuda" (the
    run's GPU on a CUDA run, else the current one), "cuda:1". dtype: "auto" (bfloat16 on CUDA, float32 on the
    CPU), "float32", "bfloat16", "float16". chat_template: "auto" (the RM's template when it has
    one, else plain text), "none" (always plain text), or a template name / jinja source.
    A local path, its config (sequence classification, num_labels), its tokenizer and the settings
    are checked here (a RewardModelError): the device is one this process sees, max_length is at
    most max_position_embeddings, a template name is one of the tokenizer's. The weights load on
    the first call, where a hub id gets the same checks and any failure to fetch it stops the run."""

    check_reward_model_kwargs(path, batch_size, max_length, device, dtype, chat_template, tuple(DTYPES))
    local = _local_config(path)
    if local is not None:
        args, tokenizer = check_reward_folder(*local)
        check_reward_settings(path, args, tokenizer, max_length, chat_template)
        path = str(local[0])
    return RewardModelScorer(path, batch_size, max_length, device, dtype, chat_template)
