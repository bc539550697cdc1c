"""Mistakes a user can fix, and how the command lines report them: one line, exit status 2.

A wrong config key, a missing data file, a reward that cannot be imported, a folder that is no
checkpoint: each raises a `UserError` (or a subclass such as `ConfigError`, `DataError`,
`RewardError`) whose message names the key, file, value or reward. The entry points run their
`main` through `run_cli`, which prints `error: <message>` on one line and exits with status 2.
Anything else is a bug and keeps its traceback.

This module imports nothing heavy, so every module (config included) can raise these errors.
"""

from __future__ import annotations

import argparse
import errno
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NoReturn


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
    """Call `main(argv)`; a UserError (or a full disk) becomes one `error:` line and exit status 2,
    and user warnings print as one `warning:` line each."""
    warnings.showwarning = _show_warning
    try:
        return main(argv)
    except UserError as e:
        fail(str(e))
    except OSError as e:
        if e.errno == errno.ENOSPC:
            fail(f"no space left on device: {e.filename or 'while writing'}")
        raise
    finally:
        warnings.showwarning = _python_show_warning
