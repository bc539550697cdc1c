"""Prompt datasets: rows -> `Example`s (prompt, reference answer, extra columns), and a resumable loader.

    examples = build_dataset(cfg.data)                          # the training split, per data.source
    loader = PromptLoader(examples, seed=cfg.run.seed, shuffle=cfg.data.shuffle)
    batch = loader.next_batch(cfg.grpo.prompts_per_step)        # B examples
    messages = build_messages(batch[0], cfg.data.system_prompt)  # [system], user
    text = render_prompt(messages, tokenizer)                   # chat template + generation header
    columns = batch_columns(batch, repeat=cfg.grpo.group_size)  # {name: N values}, prompt-major
    reward_fn(prompts, completions, answers, **columns)

Sources: JSON Lines, parquet (pyarrow, imported only when needed), Hugging Face Hub dataset repos
(through huggingface_hub), GSM8K, and a synthetic arithmetic task generated from a seed with no
files at all (it serves the CPU demo and the tests; minigrpo.synthetic). Reading files (and DataError, re-exported here)
lives in minigrpo.datafiles: a bad file or row is reported as file and line; a dotted data.answer_field or
data.prompt_field (`reward_model.ground_truth`) reads a nested field; a folder's dataset card (README.md
`configs:`) names its split files, as on the hub.

The loader's cursor (`state_dict`) is saved with every checkpoint, so a resumed run sees exactly the
batches an uninterrupted run would have seen, also when it stopped at an epoch boundary.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minigrpo.chat_template import ChatTemplateError, check_template_variables
from minigrpo.config import DataCfg
from minigrpo.datafiles import (
    REWARD_ARGUMENTS,  # noqa: F401 (re-exported)
    ROLES,  # noqa: F401 (re-exported: minigrpo.data.ROLES is imported elsewhere)
    SUFFIXES,
    DataError,
    Row,
    download,
    read_json_rows,
    read_parquet_rows,
    read_rows,
    refuse_shared_files,
    resolve_files,
    row_fields,
    snapshot,
    split_files,
)
from minigrpo.synthetic import synthetic_arithmetic

Message = dict[str, str]  # {"role": one of ROLES, "content": str}
GSM8K_REPO = "openai/gsm8k"  # hub dataset repo read when data.source=gsm8k has no data.path


@dataclass
class Example:
    """One prompt of the dataset.

    prompt: the user turn as text, or a whole conversation (a list of chat messages) when the
        dataset stores one; `build_messages` turns either into messages.
    answer: the reference answer, always a string (GSM8K: the final number only); a row's number
        becomes its str(), a list, object or NaN is refused.
    columns: the row's other fields (GSM8K: the full worked `solution`); the loop gathers them
        per field and passes them to reward functions as `**columns`.
    """

    prompt: str | list[Message]
    answer: str
    columns: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Rows from files
# ----------------------------------------------------------------------------------------------


def _to_examples(rows: Iterable[Row], prompt_field: str, answer_field: str) -> Iterator[Example]:
    """Rows -> Examples, one at a time: the prompt and answer fields are taken out (a dotted name reads
    a nested field: datafiles.field_value), the other fields become columns."""
    for where, row in rows:
        prompt, answer, columns = row_fields(where, row, prompt_field, answer_field)
        yield Example(prompt=prompt, answer=answer, columns=columns)


def _file_rows(files: list[Path]) -> Iterator[Row]:
    """The rows of the files one after the other, read as they are consumed (a file is streamed)."""
    for f in files:
        yield from read_rows(f)


def _load_files(files: list[Path], prompt_field: str, answer_field: str, limit: int | None = None) -> list[Example]:
    """The first `limit` examples of the files (None: all): the rows past them are never read."""
    return list(itertools.islice(_to_examples(_file_rows(files), prompt_field, answer_field), limit))


def load_jsonl(path: str | Path, prompt_field: str = "question", answer_field: str = "answer") -> list[Example]:
    """Examples from a JSON Lines file."""
    path = Path(path)
    return list(_to_examples(read_json_rows(path), prompt_field, answer_field))


def load_parquet(path: str | Path, prompt_field: str = "question", answer_field: str = "answer") -> list[Example]:
    """Examples from a parquet file (needs pyarrow, an optional package)."""
    path = Path(path)
    return list(_to_examples(read_parquet_rows(path), prompt_field, answer_field))


def load_hub(
    repo_id: str,
    split: str = "train",
    prompt_field: str = "question",
    answer_field: str = "answer",
    *,
    subset: str | None = None,
    revision: str | None = None,
) -> list[Example]:
    """Examples of one split of a Hugging Face Hub dataset repo (its jsonl/json/parquet files); a local
    folder holding such a repo's files (e.g. a snapshot downloaded beforehand) is read offline."""
    return _load_files(split_files(snapshot(repo_id, revision), split, subset), prompt_field, answer_field)


# ----------------------------------------------------------------------------------------------
# GSM8K
# ----------------------------------------------------------------------------------------------


def parse_gsm8k_answer(solution: str) -> str:
    """The final answer of a GSM8K solution: the rest of the line after the last `####` (a remark on
    the lines below is no part of it), stripped, without thousands separators ("#### 1,234" -> "1234")."""
    if "####" not in solution:
        raise DataError(f"GSM8K solution has no '####' final answer: {solution[-80:]!r}")
    final = solution.rsplit("####", 1)[1].strip().split("\n", 1)[0].strip().replace(",", "")
    if not final:
        raise DataError(f"GSM8K solution has nothing after its '####': {solution[-80:]!r}")
    return final


def _looks_like_repo_id(path: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", path)) and Path(path).suffix not in SUFFIXES


def load_gsm8k(
    path_or_repo: str | Path | None = None,
    split: str = "train",
    *,
    subset: str | None = None,
    revision: str | None = None,
) -> list[Example]:
    """GSM8K ({question, answer} rows) from a file, a folder with `<split>.jsonl`, or a hub repo
    (default openai/gsm8k, its "main" config). Example.answer is the final number only; the full
    worked solution is kept in columns["solution"]."""
    return _gsm8k_examples(_gsm8k_files(path_or_repo, split, subset, revision))


def _gsm8k_files(path_or_repo: str | Path | None, split: str, subset: str | None, revision: str | None) -> list[Path]:
    """The files of a GSM8K split: a local file or folder, else a hub repo (openai/gsm8k: its "main" config)."""
    path_or_repo = GSM8K_REPO if path_or_repo is None else str(path_or_repo)
    if not Path(path_or_repo).expanduser().exists() and _looks_like_repo_id(path_or_repo):
        if subset is None and path_or_repo == GSM8K_REPO:
            subset = "main"
        return split_files(download(path_or_repo, revision), split, subset)
    return resolve_files(path_or_repo, split, subset, SUFFIXES)


def _gsm8k_examples(
    files: list[Path], limit: int | None = None, prompt_field: str = "question", answer_field: str = "answer"
) -> list[Example]:
    """GSM8K rows as Examples (the first `limit`): the answer (a worked solution ending "#### 72") cut to
    the final number, the worked solution kept as a column; the fields as data.prompt_field / answer_field
    name them (GSM8K's own by default)."""
    examples = []
    for where, row in itertools.islice(_file_rows(files), limit):
        ex = next(_to_examples([(where, row)], prompt_field, answer_field))
        try:
            final = parse_gsm8k_answer(ex.answer)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        examples.append(Example(ex.prompt, final, {**ex.columns, "solution": ex.answer}))
    return examples


# ----------------------------------------------------------------------------------------------
# Dispatch on data.source
# ----------------------------------------------------------------------------------------------


def build_dataset(cfg: DataCfg, split: str | None = None, limit: int | None = None) -> list[Example]:
    """The examples of one split (default: the training split `cfg.split`) from `cfg.source`.

    Any other split is an eval split: its first `limit` examples, by default `cfg.num_eval`
    (synthetic: that many generated, from the expressions held out of training whenever the
    config has an eval split; minigrpo.synthetic). The training split is capped only by `limit`. An eval split
    that would read a file of the training split is refused (its prompts would be training prompts).
    `max_prompt_tokens` is applied later by `filter_long_prompts`, where the tokenizer is known.
    A relative data.path / data.eval_path is read from the working directory, as every path of a
    config is (run.output_dir, model.name_or_path).
    """
    split = cfg.split if split is None else split
    is_eval = split != cfg.split
    if limit is None and is_eval:
        limit = cfg.num_eval
    if cfg.source == "synthetic":
        n = limit if is_eval else cfg.synthetic.num_train
        part = "eval" if is_eval else "all" if cfg.eval_split is None else "train"
        return synthetic_arithmetic(cfg.synthetic.seed, n, cfg.synthetic, split=split, part=part)[:limit]
    files = _source_files(cfg, split, is_eval)
    if is_eval:
        refuse_shared_files(files, _training_files(cfg), split, cfg.split)
    if cfg.source == "gsm8k":
        examples = _gsm8k_examples(files, limit, cfg.prompt_field, cfg.answer_field)
    else:
        examples = _load_files(files, cfg.prompt_field, cfg.answer_field, limit)
    if not examples and limit != 0:  # name the files: an empty one is the usual cause
        verb = "hold" if len(files) > 1 else "holds"
        raise DataError(f"split {split!r}: {', '.join(map(str, files))} {verb} no rows")
    return examples


def _source_files(cfg: DataCfg, split: str, is_eval: bool) -> list[Path]:
    """The data files of one split of data.source (every source but the synthetic one)."""
    if cfg.source == "gsm8k":
        if is_eval:
            _refuse_training_file(cfg.path, split, "point data.path at a folder with per-split files")
        return _gsm8k_files(cfg.path, split, cfg.subset, cfg.revision)
    if cfg.source == "hub":
        if cfg.path is None:
            raise DataError("data.source='hub' needs data.path (a dataset repo id)")
        return split_files(snapshot(cfg.path, cfg.revision), split, cfg.subset)
    if cfg.source in ("jsonl", "parquet"):
        return _file_source_files(cfg, split, is_eval)
    raise DataError(f"unknown data.source {cfg.source!r}")


def _training_files(cfg: DataCfg) -> list[Path]:
    """The training split's files, or none when it has none (a folder holding only eval files)."""
    try:
        return _source_files(cfg, cfg.split, is_eval=False)
    except DataError:
        return []


def _refuse_training_file(path: str | None, split: str, fix: str) -> None:
    """An eval split read from data.path when that is one file would be the training rows: refused."""
    if path is not None and Path(path).expanduser().is_file():
        raise DataError(f"split {split!r}: data.path {path} is one file, the training data; {fix}")


def _file_source_files(cfg: DataCfg, split: str, is_eval: bool) -> list[Path]:
    """The files of a jsonl/parquet source: data.path (a file or a folder of split files), or
    data.eval_path for an eval split."""
    from_eval_path = is_eval and cfg.eval_path is not None
    path = cfg.eval_path if from_eval_path else cfg.path
    if path is None:
        raise DataError(f"data.source={cfg.source!r} needs data.path")
    if is_eval and cfg.eval_path is None:
        fix = f"set data.eval_path to the {split} file (or point data.path at a folder with per-split files)"
        _refuse_training_file(path, split, fix)
    suffixes = (".parquet",) if cfg.source == "parquet" else (".jsonl", ".json")
    return resolve_files(path, split, cfg.subset, suffixes, "data.eval_path" if from_eval_path else "data.path")


# ----------------------------------------------------------------------------------------------
# Prompt rendering
# ----------------------------------------------------------------------------------------------


def build_messages(example: Example, system_prompt: str | None = None) -> list[Message]:
    """The conversation of an example: [system], user. A text prompt becomes the user turn; a
    message-list prompt is copied. `system_prompt` (the run's data.system_prompt) replaces a
    system message the row already has."""
    if isinstance(example.prompt, str):
        messages = [{"role": "user", "content": example.prompt}]
    else:
        messages = [dict(m) for m in example.prompt]
    if system_prompt is not None:
        messages = [{"role": "system", "content": system_prompt}] + [m for m in messages if m.get("role") != "system"]
    return messages


def render_prompt(
    messages: list[Message],
    tokenizer: Any = None,
    *,
    prefill: bool = False,
    chat_template_kwargs: Mapping | None = None,
) -> str:
    """The prompt text the model continues: the tokenizer's chat template with the assistant
    generation header. Any object with `apply_chat_template(messages, add_generation_prompt=True,
    tokenize=False, **kwargs) -> str` works (tokenize=False makes transformers tokenizers return text too).

    prefill: a conversation that ends with an assistant message is a reply begun for the model
    ("<think>"): the text stops at that message's end, inside the open turn, with no new header
    (transformers' continue_final_message, what TRL does with such prompts).
    chat_template_kwargs: more template variables for every rendering (data.chat_template_kwargs).

    With no tokenizer, or one without any chat template (a base model), the contents are joined with
    blank lines: "system\\n\\nuser". Such a model sees no assistant header, so its completion simply
    continues the text. A tokenizer with named templates but no default one raises (as transformers does).
    """
    if uses_plain_text(tokenizer):
        return _plain_text(messages)
    kwargs = chat_template_kwargs or {}
    if prefill and messages[-1]["role"] == "assistant":
        return _continued_reply(messages, tokenizer, kwargs)
    return _template_text(tokenizer, messages, header=True, kwargs=kwargs)


def uses_plain_text(tokenizer: Any) -> bool:
    """Whether prompts for `tokenizer` are plain text: no tokenizer, or one with no chat template at all."""
    if tokenizer is None or not hasattr(tokenizer, "apply_chat_template"):
        return True
    return getattr(tokenizer, "chat_template", "") is None and not getattr(tokenizer, "chat_templates", None)


def _template_text(tokenizer: Any, messages: list[Message], header: bool, kwargs: Mapping) -> str:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=header, tokenize=False, **kwargs)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected the prompt text")
    return text


_REPLY_END = "<<minigrpo-reply-end>> "  # marks where the begun reply ends; a template may trim its space


def _continued_reply(messages: list[Message], tokenizer: Any, kwargs: Mapping[str, Any]) -> str:
    """The whole conversation rendered, cut right after the final (assistant) message's content: a
    marker appended to that content shows where it ends. A template that trims the content (the
    marker's space is gone) loses the reply's trailing spaces too. A template that rewrites the begun
    reply (DeepSeek-R1's drops what ends with "</think>", Qwen3's moves it into its own think block) is
    refused, as transformers' continue_final_message refuses it: the model would continue another text."""
    reply = messages[-1]["content"]
    marked = [*messages[:-1], {**messages[-1], "content": reply + _REPLY_END}]
    text = _template_text(tokenizer, marked, header=False, kwargs=kwargs)
    at = text.rfind(_REPLY_END.strip())
    if at < 0:
        raise DataError("the chat template drops the final assistant message, so the model cannot continue it")
    if reply.strip() not in text:
        raise ChatTemplateError(
            f"the chat template rewrites the begun assistant reply {reply[:60]!r} (drops or moves part of it), "
            "so the model cannot continue it as written"
        )
    return text[:at] if text.startswith(_REPLY_END, at) else text[:at].rstrip()


def _plain_text(messages: list[Message]) -> str:
    return "\n\n".join(m["content"] for m in messages)


def encode_prompts(
    examples: Sequence[Example],
    tokenizer: Any,
    system_prompt: str | None = None,
    chat_template_kwargs: Mapping | None = None,
) -> tuple[list[list[int]], list[str]]:
    """Render every example's chat prompt and encode it -> (token ids per prompt, prompt texts).

    A chat template writes its own special tokens, so its text is encoded without adding more
    (as transformers does); plain-text prompts get the tokenizer's usual ones (e.g. BOS). A
    conversation ending with an assistant message is continued (`render_prompt`'s prefill).
    `chat_template_kwargs` (data.chat_template_kwargs) are more template variables for every prompt.
    """
    kwargs = check_template_variables(chat_template_kwargs or {}, "data.chat_template_kwargs")
    chats = [build_messages(ex, system_prompt) for ex in examples]
    texts = [render_prompt(chat, tokenizer, prefill=True, chat_template_kwargs=kwargs) for chat in chats]
    return [tokenizer.encode(text, add_special_tokens=uses_plain_text(tokenizer)) for text in texts], texts


def batch_columns(examples: Sequence[Example], repeat: int = 1) -> dict[str, list[Any]]:
    """The extra columns of a batch as reward-function keyword arguments: one list per column name,
    N = len(examples) * repeat long, each example's value repeated `repeat` (= G) times in a row,
    matching rollouts laid out prompt-major (the G completions of a prompt are adjacent). A column
    that some rows lack is None there."""
    names = list(dict.fromkeys(k for ex in examples for k in ex.columns))
    return {k: [ex.columns.get(k) for ex in examples for _ in range(repeat)] for k in names}


def filter_long_prompts(
    examples: list[Example],
    encode: Callable[[str], Sequence[int]],
    max_tokens: int | None,
    render: Callable[[Example], str] | None = None,
) -> list[Example]:
    """The examples whose rendered prompt has at most `max_tokens` tokens (None: all of them).

    Args:
        encode: text -> token ids, e.g. `lambda s: tok.encode(s, add_special_tokens=False)` when
            the chat template already writes the special tokens.
        render: example -> prompt text, e.g. `lambda ex: render_prompt(build_messages(ex, sys), tok)`;
            default: the plain-text rendering without a system prompt.
    Raises DataError if no example is short enough (an empty dataset would only fail later).
    """
    if max_tokens is None:
        return list(examples)
    render = render or (lambda ex: _plain_text(build_messages(ex)))
    kept = [ex for ex in examples if len(encode(render(ex))) <= max_tokens]
    if not kept:
        raise DataError(f"all {len(examples)} prompts are longer than data.max_prompt_tokens={max_tokens}")
    return kept


# ----------------------------------------------------------------------------------------------
# The resumable loader
# ----------------------------------------------------------------------------------------------


class PromptLoader:
    """Endless batches of examples: epoch after epoch, each in its own seeded order.

    Epoch e visits every example once, in a permutation drawn from (seed, e) (or in file order
    when shuffle is False). A batch that runs past the end of an epoch continues into the next,
    so every batch has exactly B examples. The cursor is (epoch, index into that epoch's order);
    `state_dict`/`load_state_dict` save and restore it, and a restored loader yields exactly the
    batches the original would have yielded next, at an epoch boundary too: the cursor may sit at
    index == len (the epoch is used up) and the next batch then starts epoch + 1.
    """

    def __init__(self, examples: Sequence[Example], seed: int = 0, shuffle: bool = True) -> None:
        if not examples:
            raise DataError("cannot iterate over an empty dataset")
        self.examples = list(examples)
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.index = 0, 0
        self.consumed = 0  # examples handed out since the start of training
        self._order_epoch, self._order = -1, list(range(len(self.examples)))
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def order(self, epoch: int) -> list[int]:
        """The visiting order of epoch `epoch`: a permutation of range(len(self))."""
        order = list(range(len(self.examples)))
        if self.shuffle:
            random.Random(f"prompts/{self.seed}/{epoch}").shuffle(order)
        return order

    def next_batch(self, batch_size: int) -> list[Example]:
        """The next `batch_size` examples, moving into the next epoch(s) when one runs out."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        batch = []
        while len(batch) < batch_size:
            if self.index == len(self.examples):
                self.epoch, self.index = self.epoch + 1, 0
            if self._order_epoch != self.epoch:
                self._order_epoch, self._order = self.epoch, self.order(self.epoch)
            take = min(batch_size - len(batch), len(self.examples) - self.index)
            batch += [self.examples[i] for i in self._order[self.index : self.index + take]]
            self.index += take
        self.consumed += batch_size
        return batch

    def fingerprint(self) -> str:
        """A short hash of the examples, to refuse restoring a cursor into a different dataset."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for ex in self.examples:
                # default=str: a parquet message may hold values JSON has no type for (a timestamp)
                h.update(json.dumps([ex.prompt, ex.answer], ensure_ascii=False, default=str).encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def state_dict(self) -> dict[str, Any]:
        """The cursor, as plain JSON-able values."""
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "consumed": self.consumed,
            "num_examples": len(self.examples),
            "fingerprint": self.fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a cursor saved by `state_dict` from a loader over the same examples and seed."""
        mine = self.state_dict()
        for key in ("num_examples", "fingerprint", "seed", "shuffle"):
            if key in state and state[key] != mine[key]:
                raise DataError(
                    f"cannot resume the prompt loader: saved {key}={state[key]!r}, this run has "
                    f"{mine[key]!r} (the dataset or its settings changed since the checkpoint)"
                )
        if not 0 <= state["index"] <= len(self.examples) or state["epoch"] < 0:
            raise DataError(f"invalid loader cursor epoch={state['epoch']}, index={state['index']}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self.consumed = int(state.get("consumed", 0))
