"""Files written whole or not at all.

Every file minigrpo writes for someone else to read (checkpoints, configs, metrics, plots) goes to a
temporary name in the same folder first and is renamed into place, an atomic step on POSIX file
systems: a reader, or a run killed half-way, sees the old file or the new one, never a torn one.
The temporary file is fsync'ed before the rename (and the folder after it): without that a power
loss can leave the new name pointing at an empty file, the rename reaching the disk before the data.
The temporary name carries the writer's process id (`.NAME.PID.tmp`): one left by a writer that was
killed (SIGKILL, a crash) is removed by the next write of the same file, once that process is gone.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on a clean exit it replaces `path`, on an error it is
    removed. For writers that want a file name (safetensors' save_file, open(..., "wb"))."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    remove_stale_temporaries(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(path: Path) -> None:
    """Delete the temporaries of `path` (`.NAME.PID.tmp`) that writers now dead left behind: a process
    that still runs (this one, or another writing the same file now) keeps its own."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = stale.name[len(path.name) + 2 : -len(".tmp")]
        if pid.isdigit() and not process_alive(int(pid)):
            stale.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """Whether a process `pid` runs on this machine (one of another user counts: it cannot be signalled)."""
    if pid == os.getpid():
        return True
    if pid <= 0:  # os.kill would signal a process group, not ask about one process
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process (or no such process id)
        return False
    except PermissionError:
        return True
    return True


def write_probe_error(folder: str | Path) -> str | None:
    """Why a file cannot be created in the existing folder `folder` (None: it can). A real file is
    created and removed, since permission bits do not tell the whole story (read-only mounts, root)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".minigrpo-write-check-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return str(e.strerror or e)
    return None


def missing_folder_error(folder: str | Path) -> str:
    """Why `folder`, which is no existing folder, cannot hold a file: the first part of its path
    that is a file, or that the folder does not exist."""
    folder = Path(folder)
    for part in (*reversed(folder.parents), folder):
        if part.exists() and not part.is_dir():
            return f"{part} is a file, not a folder"
    return f"the folder {folder} does not exist"


def fsync_file(path: str | Path) -> None:
    """Flush a written (and closed) file's data to the disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a rename or a new file in it) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write text (UTF-8) or bytes to `path` atomically."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")


def write_json(path: str | Path, obj: Any, *, sort_keys: bool = True) -> None:
    """Indented JSON with a final newline, written atomically (non-ASCII text kept as it is)."""
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n")


def write_folder_whole(out: str | Path, write: Callable[[Path], Any]) -> Path:
    """`write(folder)` into a new temporary sibling of `out`, which takes the place of `out` once
    complete (an older `out` removed only then): a process killed or failing while writing leaves
    `out` as it was, never half written, so its presence means whole."""
    out = Path(out).expanduser().resolve()  # `.` and `merged/..` have a parent and a name too
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    old = out.with_name(f".{out.name}.{os.getpid()}.old")
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        if out.is_dir():
            os.replace(out, old)
        elif out.exists():
            out.unlink()
        os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out
