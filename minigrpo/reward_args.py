"""How a reward function's parameters are read: the three data lists it must take first, the settings
(a config entry's kwargs) it accepts, and the data columns it requires or may take.

A reward is called as fn(prompts, completions, answers, **columns, **settings); everything here reads
its signature, so that a mismatch is one line naming the reward before any weight loads.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from minigrpo.reward_fns import RewardError, RewardFn


def setting_names(fn: Any, skip: int) -> list[str] | None:
    """The keyword arguments `fn` accepts after its first `skip` positional parameters (a reward's
    prompts, completions, answers); None: any key (it takes **kwargs, or has no readable signature)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    kind = inspect.Parameter
    if any(p.kind is kind.VAR_KEYWORD for p in params):
        return None
    data_args = [p for p in params if p.kind in (kind.POSITIONAL_ONLY, kind.POSITIONAL_OR_KEYWORD)][:skip]
    return [p.name for p in params if p.kind in (kind.POSITIONAL_OR_KEYWORD, kind.KEYWORD_ONLY) and p not in data_args]


def check_settings(name: str, kwargs: Mapping[str, Any], accepted: list[str] | None) -> None:
    """RewardError naming the first of `kwargs` that `accepted` (setting_names; None: any) lacks."""
    unknown = [k for k in kwargs if accepted is not None and k not in accepted]
    if unknown:
        hint = difflib.get_close_matches(unknown[0], accepted or [], n=1)
        raise RewardError(
            f"reward {name!r} has no setting {unknown[0]!r} in its kwargs"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + f"; it accepts: {', '.join(accepted) if accepted else 'no kwargs'}"
        )


def check_data_arguments(name: str, fn: Any) -> None:
    """RewardError unless `fn` can be called as fn(prompts, completions, answers, ...): a function taking
    fewer positional arguments (TRL's fn(completions, **kwargs)) would fail on every row, masked as a
    failure instead of scoring. A required argument past the three is a data column's name."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return
    kind = inspect.Parameter
    if any(p.kind is kind.VAR_POSITIONAL for p in params):
        return
    positional = [p for p in params if p.kind in (kind.POSITIONAL_ONLY, kind.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 3:  # more required ones may be data columns, passed by name (columns_for)
        raise RewardError(
            f"reward {name!r}: {getattr(fn, '__name__', type(fn).__name__)}{inspect.signature(fn)} cannot be called as "
            "fn(prompts, completions, answers, **columns): take the three lists as the first positional arguments"
        )


def required_columns(fn: Any) -> list[str]:
    """The parameters `fn` requires after (prompts, completions, answers): data columns it must be given,
    whether or not it also takes **kwargs."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return []
    kind = inspect.Parameter
    data_args = [p for p in params if p.kind in (kind.POSITIONAL_ONLY, kind.POSITIONAL_OR_KEYWORD)][:3]
    named = (kind.POSITIONAL_OR_KEYWORD, kind.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in named and p not in data_args and p.default is p.empty]


def missing_column(name: str, fn: Any, columns: Iterable[str], settings: Mapping[str, Any] | None) -> None:
    """RewardError naming the first column `fn` requires that `columns` (and its bound settings) lack."""
    columns = list(columns)
    missing = [k for k in required_columns(fn) if k not in columns and k not in (settings or {})]
    if missing:
        raise RewardError(
            f"reward {name!r} needs the column {missing[0]!r}, which the data does not have "
            f"(columns: {', '.join(columns) or 'none'})"
        )


def columns_for(name: str, fn: Any, columns: dict[str, Any], settings: Mapping[str, Any] | None = None) -> dict:
    """The columns `fn` takes: all of them when it has **kwargs, else those it names (a function written
    as fn(prompts, completions, answers) gets none). RewardError naming a column it requires that the
    batch lacks."""
    missing_column(name, fn, columns, settings)
    accepted = setting_names(fn, 3)
    if accepted is None:
        return columns
    return {k: v for k, v in columns.items() if k in accepted}


def bind_settings(fn: RewardFn, name: str, settings: dict[str, Any]) -> RewardFn:
    """`fn` called with its fixed settings on top of the per-row columns (a column of the same name is
    an error: which of the two was meant cannot be guessed)."""

    def bound(prompts: list, completions: list[str], answers: list, **columns: Any) -> list:
        clash = sorted(set(columns) & set(settings))
        if clash:
            raise RewardError(f"reward {name!r}: kwargs {clash} have the names of data columns; rename one")
        return fn(prompts, completions, answers, **columns_for(name, fn, columns, settings), **settings)

    bound.__name__ = getattr(fn, "__name__", name)
    bound.reward_fn, bound.reward_settings = fn, dict(settings)  # type: ignore[attr-defined]
    return bound


def check_reward_model_kwargs(
    path: Any, batch_size: Any, max_length: Any, device: Any, dtype: Any, chat_template: Any, dtypes: tuple[str, ...]
) -> None:
    """RewardError naming the first of the `reward_model` reward's kwargs that has a wrong type or value,
    from the values alone (the checkpoint's own checks follow in minigrpo.models.reward_model)."""

    def bad(what: str) -> RewardError:
        return RewardError(f"reward 'reward_model': kwargs {what}")

    if path is None:
        raise bad("path is missing: give the reward model's checkpoint folder or hub id")
    if not isinstance(path, str) or not path:
        raise bad(f"path={path!r} must be a folder or hub id")
    for key, value in (("batch_size", batch_size), ("max_length", max_length)):
        if value is None and key == "max_length":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad(f"{key}={value!r} must be a whole number >= 1")
    if not isinstance(device, str):
        raise bad(f"device={device!r} must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if device != "auto":
        _check_device(device, bad)
    if not isinstance(dtype, str) or (dtype != "auto" and dtype not in dtypes):
        raise bad(f"dtype={dtype!r} must be 'auto' or one of {', '.join(dtypes)}")
    if chat_template is not None and not isinstance(chat_template, str):
        raise bad(f"chat_template={chat_template!r} must be 'auto', 'none', a template name or source")


def _check_device(device: str, bad: Callable[[str], RewardError]) -> None:
    """A device the scores can be computed on here: the CPU, or a CUDA device this process sees."""
    import torch

    try:
        where = torch.device(device)
    except RuntimeError as e:
        raise bad(f"device={device!r} is no device ({e})") from e
    if where.type not in ("cpu", "cuda"):
        raise bad(f"device={device!r} must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
    count = torch.cuda.device_count() if where.type == "cuda" and torch.cuda.is_available() else 0
    if where.type == "cuda" and (where.index or 0) >= count:
        raise bad(f"device={device!r} is not available: this process sees {count} CUDA device(s)")
