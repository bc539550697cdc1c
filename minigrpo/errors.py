"""Mistakes a user can fix, and how the command lines report them: one line, exit status 2.

A wrong config key, a missing data file, a reward that cannot be imported, a folder that is no
checkpoint: each raises a `UserError` (or a subclass such as `ConfigError`, `DataError`,
`RewardError`) whose message names the key, file, value or reward. The entry points run their
`main` through `run_cli`, which prints `error: <message>` on one line and exits with status 2;
Ctrl-C is one `interrupted` line and exit status 130. Anything else is a bug and keeps its traceback.

This module imports nothing heavy, so every module (config included) can raise these errors.
"""

from __future__ import annotations

import argparse
import errno
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A mistake in the input (config, command line, data, files of a run): fixable by the user."""


class ConfigError(UserError, ValueError):
    """Any problem with a configuration: unknown key, wrong type, value out of range, clash. `key` is
    the dotted key of a wrong type, unknown or missing key (None otherwise), so that the loader can
    name the file that set it (`config.load_config`)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class UsageError(UserError):
    """A bad command-line argument."""


def one_line(message: str) -> str:
    """A message on one line: a list of problems (one per line, '  - ' bullets) joined by '; '."""
    parts = [part.strip().removeprefix("- ").strip() for part in str(message).splitlines()]
    parts = [p for p in parts if p]
    if len(parts) > 1 and parts[0].endswith(":"):  # "invalid config:" followed by its bullets
        return f"{parts[0]} {'; '.join(parts[1:])}"
    return "; ".join(parts)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are `UsageError`s (one line through `run_cli`), not usage dumps."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def fail(message: str, code: int = 2) -> NoReturn:
    """Print `error: message` on stderr and exit (status 2: bad input)."""
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning meant for the user (a UserWarning: a suspicious setting, a checkpoint skipped) as
    one `warning:` line; any other warning keeps Python's format (it points at code)."""
    if issubclass(category, UserWarning) and not issubclass(category, DeprecationWarning):
        print(f"warning: {one_line(str(message))}", file=sys.stderr if file is None else file, flush=True)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


def run_cli(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> Any:
    """Call `main(argv)`; a UserError (or a full disk, or a file the user may not read or write) becomes
    one `error:` line and exit status 2,
    Ctrl-C one `interrupted` line and exit status 130 (128 + SIGINT; a partial output file is gone:
    minigrpo.atomic removes it), and user warnings print as one `warning:` line each."""
    warnings.showwarning = _show_warning
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except UserError as e:
        fail(str(e))
    except OSError as e:
        if e.errno == errno.ENOSPC:
            fail(f"no space left on device: {e.filename or 'while writing'}")
        if isinstance(e, PermissionError) and e.filename:  # a file or folder this user may not read or write
            fail(f"cannot use {e.filename} ({e.strerror})")
        raise
    finally:
        warnings.showwarning = _python_show_warning


def path_arg(path: str | None, flag: str) -> str | None:
    """A path from the command line with a leading `~` read as the home folder (the shell does so for
    `--out ~/x` but not `--out=~/x`); an empty path, or a `~user` with no home folder, is a UserError
    naming `flag`."""
    if path == "":
        raise UserError(f"{flag} is empty: name a file or folder")
    try:
        return str(Path(path).expanduser()) if path is not None and path.startswith("~") else path
    except RuntimeError as e:  # Path.expanduser: no such user, or no home folder
        raise UserError(f"{flag} {path}: {e} (write the path out in full)") from None


# how often a run folder's checkpoint is picked again when a run still training deletes the one picked
PICK_ATTEMPTS = 3


def read_vanishing(given: Path, pick: Callable[[Path], Path | None], read: Callable[[Path], T]) -> T:
    """`read(folder)` for the folder `given` stands for: `pick(given)` (a run folder's newest intact
    checkpoint), or `given` itself when pick returns None. A run still training deletes its older
    checkpoints (checkpoint.keep_last), so the folder picked may vanish while it is read: it is picked
    again (PICK_ATTEMPTS in all); a folder given directly, or one that keeps vanishing, is one UserError
    naming it. An error while the folder is still there is raised as it is."""
    for attempt in range(1, PICK_ATTEMPTS + 1):
        last = attempt == PICK_ATTEMPTS
        try:
            picked = pick(given)
        except FileNotFoundError as e:  # a checkpoint deleted while the pick checked its files
            if isinstance(e, UserError):
                raise
            if last:
                raise _vanished(given, e.filename or given, picked=True) from e
            continue
        folder = given if picked is None else picked
        existed = picked is not None or folder.is_dir()  # a pick is a folder that was there
        try:
            return read(folder)
        except (UserError, OSError) as e:
            if not existed or folder.exists():
                raise
            if picked is None or last:
                raise _vanished(given, folder, picked=picked is not None) from e
    raise AssertionError("unreachable")  # the last attempt returns or raises


def _vanished(given: Path, folder: Path | str, *, picked: bool) -> UserError:
    """The error for a checkpoint `folder` deleted while it was read: `given` itself, or the last of a
    run folder's checkpoints `picked` from it."""
    if not picked:
        return UserError(
            f"{folder} was removed while it was read: a run still training deletes its older checkpoints "
            "(checkpoint.keep_last); pass the run folder instead, for its newest checkpoint"
        )
    return UserError(
        f"{given}: its newest checkpoint was removed while it was read, {PICK_ATTEMPTS} times (last: {folder}): "
        "a run still training deletes its older checkpoints (checkpoint.keep_last); try again, or once it has ended"
    )
