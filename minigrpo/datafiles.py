"""Rows from data files: JSON Lines, a JSON array or column mapping, parquet, a folder's split files, a hub snapshot.

Every row comes with where it was found ("data/train.jsonl:17", "train.parquet: row 3"), so a bad
row is reported as file and line, not as a traceback: a missing file, bytes that are not UTF-8, a
line that is not JSON or not an object, an object naming a field twice each raise DataError naming
the file (and line). JSON Lines lines end at "\\n", "\\r\\n" or "\\r" only (a string may hold U+2028);
a byte-order mark (also one opening a later line, as files joined with `cat` have) and blank lines are
skipped. JSON Lines and parquet files stream: rows are read as they are consumed, so a file larger
than memory can be read and an eval split of its first rows reads no further. A relative path is read
from the working directory.
pyarrow (parquet) and huggingface_hub (hub datasets) are imported only when needed.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from minigrpo.errors import UserError

SUFFIXES = (".jsonl", ".json", ".parquet")
PARQUET_BATCH_ROWS = 1024  # rows of a parquet file read at once
ROLES = ("system", "user", "assistant", "tool")  # the roles a message may have
Row = tuple[str, dict[str, Any]]  # (where: "file:line" or "file: row i", the row's fields)
REWARD_ARGUMENTS = ("prompts", "completions", "answers")  # a reward function's arguments before the columns


class DataError(UserError, ValueError):
    """A dataset cannot be read or does not have the configured fields."""


def _read_text(path: Path) -> str:
    """The file's text; DataError naming the file (and line) if it is missing or not UTF-8."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"data file {path} does not exist") from None
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8-sig")  # a leading byte-order mark is dropped
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - data.rfind(b"\n", 0, e.start)
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {column}); save the file as UTF-8"
        ) from None


class _DuplicateField(Exception):
    """Raised while parsing: one JSON object names a field twice (the message is the field)."""


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict, refusing a field named twice: json.loads would keep the last value
    silently, and which of two "answer"s a row means is the user's call, not ours."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateField(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


def _parse_json(text: str, path: Path, lineno: int | None) -> Any:
    """One JSON document of `path`: a JSON Lines line (`lineno`) or the whole file (None); DataError
    naming the file and line of a syntax error, or the field an object names twice."""
    where = str(path) if lineno is None else f"{path}:{lineno}"
    try:
        return json.loads(text, object_pairs_hook=_object_without_duplicates)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno or e.lineno}: not valid JSON: {e.msg} (column {e.colno})") from None
    except _DuplicateField as e:
        raise DataError(f"{where}: an object names the field {e.args[0]!r} twice") from None


def _line_texts(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line of a file, read one line at a time (a file larger than the
    memory streams). Only "\\n", "\\r\\n" or "\\r" ends a line (a JSON string cannot hold them
    raw); str.splitlines also splits at U+2028, U+2029 and U+0085, which it can. Bytes that are not
    UTF-8 are a DataError naming the line and column."""
    lineno = 0
    with _open_binary(path) as f:
        for raw in f:
            for piece in raw.removesuffix(b"\n").removesuffix(b"\r").split(b"\r"):
                lineno += 1
                try:
                    yield lineno, piece.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(
                        f"{path}:{lineno}: not UTF-8 text (byte 0x{piece[e.start]:02x} at column {e.start + 1}); "
                        "save the file as UTF-8"
                    ) from None


def _open_binary(path: Path) -> BinaryIO:
    """The file opened for reading bytes; DataError naming it if it is missing or unreadable."""
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise DataError(f"data file {path} does not exist") from None
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e.strerror or e}") from None


def _json_layout(path: Path) -> str:
    """How a file holds its rows: "lines" (JSON Lines, streamed) or, for a .json file, "document": one
    JSON array or object, read whole (an array, a pretty-printed object, or a single line that is the
    file's only one: a mapping of columns may be all of it). Read up to its second non-blank line only."""
    if path.suffix != ".json":
        return "lines"
    if _first_character(path) == b"[":
        return "document"
    first = None
    for _lineno, line in _line_texts(path):
        text = line.removeprefix("\ufeff").strip()
        if not text:
            continue
        if first is not None:  # a second line: JSON Lines when the first is a whole document
            return "lines" if _parses(first) else "document"
        first = text
    return "document" if first is not None else "lines"


def _first_character(path: Path) -> bytes:
    """The file's first byte past blanks and a byte-order mark (b"" for a blank file); read up to it only."""
    with _open_binary(path) as f:
        chunk = f.read(65536).removeprefix(b"\xef\xbb\xbf")
        while chunk and not chunk.lstrip():
            chunk = f.read(65536)
    return chunk.lstrip()[:1]


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _document_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """The rows of a .json file holding one document: the items of an array, the rows of a mapping
    of columns to equal-length lists (as pandas and Hugging Face datasets read one), else the object
    itself as the one row."""
    document = _parse_json(_read_text(path), path, None)
    if isinstance(document, list):
        return ((f"{path}: item {i + 1}", item) for i, item in enumerate(document))
    if isinstance(document, dict) and document and all(isinstance(v, list) for v in document.values()):
        lengths = {name: len(values) for name, values in document.items()}
        if len(set(lengths.values())) > 1:
            listed = ", ".join(f"{name!r}: {n}" for name, n in lengths.items())
            raise DataError(f"{path}: a mapping of columns whose lists differ in length ({listed})")
        rows = (dict(zip(document, values)) for values in zip(*document.values()))
        return ((f"{path}: row {i + 1}", row) for i, row in enumerate(rows))
    return iter([(str(path), document)])


def read_json_rows(path: Path) -> Iterator[Row]:
    """Rows of a JSON Lines file, one line at a time (a .json file holding one array or object is
    read whole: _document_rows); blank lines and byte-order marks are skipped."""
    if _json_layout(path) == "document":
        located: Iterable[tuple[str, Any]] = _document_rows(path)
    else:
        lines = ((n, line.removeprefix("\ufeff")) for n, line in _line_texts(path))  # cat'ed files keep marks
        located = ((f"{path}:{n}", _parse_json(line, path, n)) for n, line in lines if line.strip())
    for where, row in located:
        if not isinstance(row, dict):
            raise DataError(f"{where}: a JSON {type(row).__name__}, not an object with named fields")
        yield where, row


def answer_text(where: str, name: str, value: Any) -> str:
    """The reference answer as text: a string as is, a number (or a boolean, a parquet decimal or
    date) spelled by str(). A list, an object, bytes or NaN/infinity is refused: its str() ("[1, 2]",
    "nan") would be compared with the model's answers as if it were one, and score them all wrong."""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        raise DataError(f"{where}: field {name!r} is {value}, not an answer (see data.answer_field)")
    kinds = {list: "a list", tuple: "a list", dict: "an object", bytes: "bytes"}
    if type(value) in kinds:
        kind = kinds[type(value)]
        raise DataError(f"{where}: field {name!r} is {kind}; the reference answer must be text or a number")
    return str(value)


def field_value(where: str, row: dict[str, Any], name: str, key: str) -> Any:
    """The value of the field `name` of a row (`key`: the config key naming it). A dotted name that is
    no field of the row reads inside nested objects: `reward_model.ground_truth`, where verl-style
    parquet files keep the answer. A missing or null field is a DataError naming the row."""
    if name in row:
        value = row[name]
    else:
        value, parent = row, None  # parent: the dotted name of the object `value` is, None for the row
        for part in name.split("."):
            if not isinstance(value, dict):
                raise DataError(f"{where}: field {parent!r} is {_kind(value)}, not an object with a field {part!r}")
            if part not in value:
                held = "the row has" if parent is None else f"{parent!r} has"
                raise DataError(f"{where}: no field {name!r} ({held}: {', '.join(map(str, value))}; see {key})")
            value, parent = value[part], part if parent is None else f"{parent}.{part}"
    if value is None:
        raise DataError(f"{where}: field {name!r} is null")
    return value


def _kind(value: Any) -> str:
    return "null" if value is None else f"a {type(value).__name__}"


def row_fields(where: str, row: dict[str, Any], prompt_field: str, answer_field: str) -> tuple[Any, str, dict]:
    """(prompt, reference answer, the other fields) of a row, each checked: the prompt is text or a list
    of messages (a blank one is refused by prompt_fit, where the rendering is known), the answer text or
    a number (it may be empty: rewards that need no reference, a reward model's); the other fields
    become columns."""
    prompt = field_value(where, row, prompt_field, "data.prompt_field")
    if not isinstance(prompt, (str, list)):
        raise DataError(f"{where}: field {prompt_field!r} is neither text nor a list of messages")
    if isinstance(prompt, list):
        check_prompt_messages(where, prompt, prompt_field)
    answer = answer_text(where, answer_field, field_value(where, row, answer_field, "data.answer_field"))
    columns = {k: v for k, v in row.items() if k not in (prompt_field, answer_field)}
    _refuse_argument_names(where, columns)
    return prompt, answer, columns


def _refuse_argument_names(where: str, columns: dict[str, Any]) -> None:
    """A column reaches reward functions as a keyword argument, so one named like their first three
    arguments would collide with it on every call: refused when read, not at the first step."""
    clash = next((name for name in REWARD_ARGUMENTS if name in columns), None)
    if clash is not None:
        raise DataError(
            f"{where}: field {clash!r} has the name of a reward function argument ({', '.join(REWARD_ARGUMENTS)}); "
            "rename it in the data (or read it as data.prompt_field / data.answer_field)"
        )


def check_prompt_messages(where: str, messages: list, prompt_field: str) -> None:
    """A message-list prompt holds messages: each a mapping with a known 'role' and a text 'content'
    (what a chat template and the plain-text rendering both read)."""
    if not messages:
        raise DataError(f"{where}: field {prompt_field!r} is an empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            got = f"{m!r}"[:200]
            raise DataError(f"{where}: message {i} of {prompt_field!r} needs a text 'role' and a 'content', got {got}")
        if not isinstance(m["content"], str):
            got = "None" if m["content"] is None else f"a {type(m['content']).__name__}"
            raise DataError(f"{where}: message {i} of {prompt_field!r} has {got} as 'content'; it must be text")
        if m["role"] not in ROLES:
            raise DataError(
                f"{where}: message {i} of {prompt_field!r} has role {m['role']!r}; known roles: {', '.join(ROLES)}"
            )


def read_parquet_rows(path: Path) -> Iterator[Row]:
    """Rows of a parquet file, a batch of rows at a time. pyarrow is optional: it is imported here,
    not at module import."""
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"reading {path} needs the 'pyarrow' package, which minigrpo does not install: "
            "pip install pyarrow (or convert the data to JSON Lines)"
        ) from None
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    number = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for row in batch.to_pylist():
                number += 1
                yield f"{path}: row {number}", row
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file: {e}") from None


def read_rows(path: Path) -> Iterator[Row]:
    """Rows of one data file, by its suffix, read as they are consumed."""
    if path.suffix == ".parquet":
        return read_parquet_rows(path)
    if path.suffix in (".jsonl", ".json"):
        return read_json_rows(path)
    raise DataError(f"{path}: unknown data file type (expected one of {', '.join(SUFFIXES)})")


def split_files(root: Path, split: str, subset: str | None = None, suffixes: Sequence[str] = SUFFIXES) -> list[Path]:
    """The data files of `split` in a folder (a local folder or a downloaded hub snapshot).

    A dataset card (README.md) whose YAML header declares `configs:` names them, as the hub reads it:
    the files of the split in the config `subset` (without one: the default config). Otherwise a file
    belongs to the split when a path component or the name starts with the split name as a whole
    word: `train.jsonl`, `train-00000-of-00002.parquet`, `data/train/part0.jsonl`; with `subset`, only
    files below a folder of that name count (hub datasets keep one folder per config).
    """
    declared = card_files(root, split, subset, suffixes)
    files = declared if declared is not None else _files_named(root, split, subset, suffixes)
    _refuse_mixed_formats(root, split, files)
    return files


def _refuse_mixed_formats(root: Path, split: str, files: list[Path]) -> None:
    """One split as JSON and as parquet (train.jsonl beside train.parquet, an export of the same rows)
    would be read twice over: refused, naming the files (.json and .jsonl are one format, as on the hub)."""
    formats = {p.suffix == ".parquet" for p in files}
    if len(formats) > 1:
        shown = ", ".join(p.relative_to(root).as_posix() for p in files[:6])
        raise DataError(
            f"split {split!r} in {root} has both JSON and parquet files ({shown}), likely copies of the same "
            "rows: keep one format there, or read one (data.source=jsonl or parquet, data.path: the folder or a file)"
        )


def _files_named(root: Path, split: str, subset: str | None, suffixes: Sequence[str]) -> list[Path]:
    """The files of a folder whose path names the split as a whole word (see split_files)."""
    word = re.compile(rf"(^|[/_.-]){re.escape(split)}([/_.-]|$)")
    files = []
    for path in _data_files(root, suffixes):
        rel = path.relative_to(root)
        if subset is not None and subset not in rel.parts[:-1]:
            continue
        if word.search(rel.with_suffix("").as_posix()):
            files.append(path)
    if not files:
        raise DataError(
            f"no {'/'.join(suffixes)} files for split {split!r} in {root}"
            + (f" below a folder named {subset!r}" if subset else "")
            + _files_held(root, suffixes)
        )
    folders = sorted({str(p.parent.relative_to(root)) for p in files})
    if len(folders) > 1 and subset is None:
        raise DataError(
            f"files for split {split!r} in several folders of {root} ({', '.join(folders)}): set data.subset"
        )
    return files


def _data_files(root: Path, suffixes: Sequence[str]) -> list[Path]:
    """The files of a folder with one of the suffixes, in name order, hidden ones (.cache) left out."""
    return [
        path
        for path in sorted(root.rglob("*"))
        if path.is_file()
        and path.suffix in suffixes
        and not any(p.startswith(".") for p in path.relative_to(root).parts)
    ]


def _files_held(root: Path, suffixes: Sequence[str], shown: int = 5) -> str:
    """What a folder holds instead, for the error of a split not found: its data files name its splits."""
    held = [p.relative_to(root).as_posix() for p in _data_files(root, suffixes)]
    if not held:
        return " (it holds none at all)"
    more = f" and {len(held) - shown} more" if len(held) > shown else ""
    return f" (it holds {', '.join(held[:shown])}{more}; data.split and data.eval_split name the splits)"


# ----------------------------------------------------------------------------------------------
# A dataset card's configs (README.md), as the hub reads them
# ----------------------------------------------------------------------------------------------


def card_configs(root: Path) -> list[dict[str, Any]] | None:
    """The `configs:` of the dataset card README.md's YAML header; None without a card or configs."""
    card = root / "README.md"
    if not card.is_file():
        return None
    text = card.read_text(encoding="utf-8", errors="replace").removeprefix("\ufeff")
    header = re.match(r"---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|$)", text, re.DOTALL)
    if header is None:
        return None
    import yaml

    try:
        meta = yaml.safe_load(header[1])
    except yaml.YAMLError as e:
        raise DataError(f"{card}: its YAML header does not parse: {str(e).splitlines()[0]}") from None
    configs = meta.get("configs") if isinstance(meta, dict) else None
    if configs is None:
        return None
    if not isinstance(configs, list) or not all(isinstance(c, dict) and "config_name" in c for c in configs):
        raise DataError(f"{card}: 'configs' must be a list of mappings, each with a config_name")
    return configs


def _card_config(card: Path, configs: list[dict[str, Any]], subset: str | None) -> dict[str, Any] | None:
    """The config `subset` names (None: a config it does not declare, read as a folder name); without
    a subset the card's default: the one marked default, the one named "default", or the only one."""
    names = [str(c["config_name"]) for c in configs]
    if subset is not None:
        return configs[names.index(subset)] if subset in names else None
    chosen = [c for c in configs if c.get("default") is True] or [c for c in configs if c["config_name"] == "default"]
    if chosen or len(configs) == 1:
        return (chosen or configs)[0]
    raise DataError(f"{card} declares the configs {', '.join(names)} and no default: set data.subset to one")


def _split_patterns(card: Path, config: dict[str, Any]) -> dict[str, list[str]]:
    """{split: file patterns} of a config's data_files: a pattern or a list of them (the train split),
    a list of {split, path} mappings, or a mapping of split to patterns."""
    files = config.get("data_files")
    if isinstance(files, str) or (isinstance(files, list) and all(isinstance(f, str) for f in files)):
        files = {"train": files}
    elif isinstance(files, list) and all(isinstance(f, dict) and {"split", "path"} <= set(f) for f in files):
        files = {str(f["split"]): f["path"] for f in files}
    if not isinstance(files, dict):
        raise DataError(f"{card}: config {config['config_name']!r} has no data_files this reader understands")
    patterns = {str(split): [paths] if isinstance(paths, str) else paths for split, paths in files.items()}
    if not all(isinstance(paths, list) and all(isinstance(p, str) for p in paths) for paths in patterns.values()):
        raise DataError(f"{card}: config {config['config_name']!r} has a data_files path that is no text")
    return patterns


def card_files(root: Path, split: str, subset: str | None, suffixes: Sequence[str]) -> list[Path] | None:
    """The files of `split` that the dataset card's config declares (data_dir and data_files patterns,
    relative to the folder); None when the card declares no configs, or none named `subset`."""
    configs = card_configs(root)
    if configs is None:
        return None
    card = root / "README.md"
    config = _card_config(card, configs, subset)
    if config is None:
        return None
    base = root / str(config.get("data_dir") or "")
    if "data_files" not in config:  # a folder of the config's files, found by their names
        return _files_named(base, split, None, suffixes)
    name, patterns = config["config_name"], _split_patterns(card, config)
    if split not in patterns:
        raise DataError(f"{card}: config {name!r} has the splits {', '.join(patterns)}, not {split!r} (see data.split)")
    matched = sorted({p for pattern in patterns[split] for p in base.glob(pattern.lstrip("/")) if p.is_file()})
    files = [p for p in matched if p.suffix in suffixes]
    if not files:
        what = f"only {', '.join(p.name for p in matched[:3])}" if matched else "no file"
        raise DataError(
            f"{card}: split {split!r} of config {name!r} is {', '.join(patterns[split])}, which matches {what} "
            f"in {base} (read: {'/'.join(suffixes)} files)"
        )
    return files


def resolve_files(path: str | Path, split: str, subset: str | None, suffixes: Sequence[str], key="data path") -> list:
    """A file is read as is; a folder is searched for the split's files. `key` names the setting in errors."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return split_files(path, split, subset, suffixes)
    if path.exists():  # a device, a socket, a pipe
        raise DataError(f"{key} {str(path)!r} is neither a file nor a folder")
    raise DataError(f"{key} {str(path)!r} does not exist{_read_from(path)}")


def _read_from(path: Path) -> str:
    """For a path that is not there: a pattern is not expanded (name a file or a folder of split
    files), and a relative path is looked for in the working directory, not the config's folder
    (a run's saved config may be used from elsewhere: eval)."""
    if any(c in str(path) for c in "*?["):
        return " (a pattern is not expanded: name one file, or a folder holding the split's files)"
    return "" if path.is_absolute() else f" (relative to the working directory {Path.cwd()})"


def refuse_shared_files(eval_files: list[Path], training_files: list[Path], split: str, train_split: str) -> None:
    """An eval split must not read a file of the training split: its score would be on training prompts
    (data.eval_path naming data.path's file, or split names that match the same files)."""
    shared = sorted({f.resolve() for f in eval_files} & {f.resolve() for f in training_files})
    if shared:
        raise DataError(
            f"split {split!r} reads {', '.join(map(str, shared))}, a file of the training split {train_split!r}: "
            "the eval prompts would be training prompts; name a different file or split"
        )


def snapshot(repo_or_folder: str, revision: str | None) -> Path:
    """The data files of a hub dataset: a local folder (a downloaded snapshot, read offline) as is,
    else the repo's snapshot from the hub."""
    folder = Path(repo_or_folder).expanduser()
    if folder.is_dir():
        return folder
    return download(repo_or_folder, revision)


def download(repo_id: str, revision: str | None) -> Path:
    """A local snapshot of the data files of a hub dataset repo (cached by huggingface_hub)."""
    import huggingface_hub

    try:
        patterns = [f"*{s}" for s in SUFFIXES] + ["README.md"]  # the card may name the split files (card_files)
        root = huggingface_hub.snapshot_download(
            repo_id=repo_id, repo_type="dataset", revision=revision, allow_patterns=patterns
        )
    except Exception as e:  # offline, unknown repo or revision, no access: the hub's errors vary by version
        where = f"{repo_id}@{revision}" if revision else repo_id
        raise DataError(f"cannot fetch the hub dataset {where!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    return Path(root)
