"""Rows from data files: JSON Lines, JSON arrays, parquet, a folder's split files, a hub snapshot.

Every row comes with where it was found ("data/train.jsonl:17", "train.parquet: row 3"), so a bad
row is reported as file and line, not as a traceback: a missing file, bytes that are not UTF-8, a
line that is not JSON or not an object each raise DataError naming the file (and line).
pyarrow (parquet) and huggingface_hub (hub datasets) are imported only when needed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from minigrpo.errors import UserError

SUFFIXES = (".jsonl", ".json", ".parquet")
Row = tuple[str, dict[str, Any]]  # (where: "file:line" or "file: row i", the row's fields)


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


def read_json_rows(path: Path) -> list[Row]:
    """Rows of a JSON Lines file (a .json file holding one JSON array is read too); blank lines are skipped."""
    text = _read_text(path)
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON: {e.msg} (column {e.colno})") from None
        located = [(f"{path}: item {i + 1}", item) for i, item in enumerate(items)]
    else:
        located = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                located.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON: {e.msg} (column {e.colno})") from None
    for where, row in located:
        if not isinstance(row, dict):
            raise DataError(f"{where}: a JSON {type(row).__name__}, not an object with named fields")
    return located


def read_parquet_rows(path: Path) -> list[Row]:
    """Rows of a parquet file. pyarrow is optional: it is imported here, not at module import."""
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
    try:
        rows = pq.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file: {e}") from None
    return [(f"{path}: row {i + 1}", row) for i, row in enumerate(rows)]


def read_rows(path: Path) -> list[Row]:
    """Rows of one data file, by its suffix."""
    if path.suffix == ".parquet":
        return read_parquet_rows(path)
    if path.suffix in (".jsonl", ".json"):
        return read_json_rows(path)
    raise DataError(f"{path}: unknown data file type (expected one of {', '.join(SUFFIXES)})")


def split_files(root: Path, split: str, subset: str | None = None, suffixes: Sequence[str] = SUFFIXES) -> list[Path]:
    """The data files of `split` in a folder (a local folder or a downloaded hub snapshot).

    A file belongs to the split when a path component or the name starts with the split name as a
    whole word: `train.jsonl`, `train-00000-of-00002.parquet`, `data/train/part0.jsonl`; with
    `subset`, only files below a folder of that name count (hub datasets keep one folder per config).
    """
    word = re.compile(rf"(^|[/_.-]){re.escape(split)}([/_.-]|$)")
    files = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or path.suffix not in suffixes or any(p.startswith(".") for p in rel.parts):
            continue
        if subset is not None and subset not in rel.parts[:-1]:
            continue
        if word.search(rel.with_suffix("").as_posix()):
            files.append(path)
    if not files:
        raise DataError(
            f"no {'/'.join(suffixes)} files for split {split!r} in {root}"
            + (f" below a folder named {subset!r}" if subset else "")
        )
    folders = sorted({str(p.parent.relative_to(root)) for p in files})
    if len(folders) > 1 and subset is None:
        raise DataError(
            f"files for split {split!r} in several folders of {root} ({', '.join(folders)}): set data.subset"
        )
    return files


def resolve_files(path: str | Path, split: str, subset: str | None, suffixes: Sequence[str]) -> list[Path]:
    """A file is read as is; a folder is searched for the split's files."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return split_files(path, split, subset, suffixes)
    if path.exists():  # a device, a socket, a pipe
        raise DataError(f"data path {str(path)!r} is neither a file nor a folder")
    raise DataError(f"data path {str(path)!r} does not exist")


def download(repo_id: str, revision: str | None) -> Path:
    """A local snapshot of the data files of a hub dataset repo (cached by huggingface_hub)."""
    import huggingface_hub

    try:
        root = huggingface_hub.snapshot_download(
            repo_id=repo_id, repo_type="dataset", revision=revision, allow_patterns=[f"*{s}" for s in SUFFIXES]
        )
    except Exception as e:  # offline, unknown repo or revision, no access: the hub's errors vary by version
        where = f"{repo_id}@{revision}" if revision else repo_id
        raise DataError(f"cannot fetch the hub dataset {where!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    return Path(root)
