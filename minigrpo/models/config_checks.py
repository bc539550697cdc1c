"""The errors a config.json value raises, and the predicates the model config readers check values with."""

from __future__ import annotations

import math
from typing import Any

from minigrpo.errors import UserError


class UnsupportedModelError(UserError, ValueError):
    """A config names a model family or a RoPE variant this package does not implement."""


class ModelConfigError(UserError, ValueError):
    """A config.json value that is missing, of the wrong type or out of range (the message names the key)."""


def is_int(value: Any) -> bool:
    """An integer that is no bool (JSON true is not 1 here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float that is no bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def first_set(*values: Any) -> Any:
    """The first value that is not None (a 0 is a value: a bad one that the caller reports)."""
    return next(v for v in values if v is not None)
