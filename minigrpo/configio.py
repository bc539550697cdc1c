"""The generic half of the config: strict YAML in and out (yaml_io.py), `a.b=v` overrides, coercion, limits.

It knows nothing of minigrpo's schema (`config.py`): it works on any tree of dataclasses, so the
schema reads as a list of fields. `spec(default, ">= 1")` puts a limit beside its field and
`check_limits` enforces them (both in config_limits.py); `load_yaml_file` refuses empty files and
duplicate keys; `build` coerces plain data to the declared types (int, float, bool, str, Optional, Literal, list, tuple,
dict, nested dataclasses) with a did-you-mean for unknown keys; `apply_override` sets `a.b=v`;
`template_errors` checks a `str.format` template the data fills in.
Every problem is a `ConfigError` naming the dotted key (a `UserError`: one line on the CLI).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import string
import types
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from minigrpo.config_limits import MAX_COUNT as MAX_COUNT  # re-exported: the limits live in config_limits.py
from minigrpo.config_limits import MAX_EXACT_INT, join_key
from minigrpo.config_limits import MAX_SECONDS as MAX_SECONDS
from minigrpo.config_limits import check_limits as check_limits
from minigrpo.config_limits import spec as spec
from minigrpo.config_limits import within as within
from minigrpo.errors import ConfigError as ConfigError  # re-exported: defined with the other error types
from minigrpo.yaml_io import dump_yaml as dump_yaml  # re-exported: the YAML side lives in yaml_io.py
from minigrpo.yaml_io import load_yaml_file as load_yaml_file
from minigrpo.yaml_io import parse_yaml, plain_numbers

_NONE = type(None)


class ConfigWarning(UserWarning):
    """A legal but suspicious combination of settings (the run proceeds)."""


def template_errors(key: str, template: str, needed: str, fields: tuple[str, ...]) -> list[str]:
    """The problem of a `str.format` template that the data fills with `fields` (text values), or
    none: a field it does not know (`{x}`), a lone brace, or no `{needed}` (`{{needed}}` is literal
    text, not the field). Found when the config loads, not as a traceback when the data is drawn."""
    known = " and ".join(f"{{{f}}}" for f in fields)
    try:
        template.format(**dict.fromkeys(fields, "1"))
        used = {re.split(r"[.\[]", name)[0] for _, name, _, _ in string.Formatter().parse(template) if name}
    except (KeyError, IndexError, AttributeError, ValueError) as e:
        problem = f"no field {{{e.args[0]}}}" if isinstance(e, KeyError) else str(e)
        return [f"{key}={template!r}: {problem}; it may use {known} (a literal brace is written {{{{ or }}}})"]
    if needed not in used:
        return [f"{key} must contain {{{needed}}}: {template!r}"]
    return []


def none_texts(obj: Any, path: str = "") -> list[tuple[str, str]]:
    """(dotted key, text) of each text field that takes null too but holds the text "None" (Python's
    null, which YAML reads as text): `data.system_prompt: None` would put "None" before every prompt,
    `data.eval_split: None` evaluate a split named "None". Walks nested dataclasses and lists of them."""
    if isinstance(obj, (list, tuple)):
        return [
            found for i, v in enumerate(obj) if dataclasses.is_dataclass(v) for found in none_texts(v, _join(path, i))
        ]
    found: list[tuple[str, str]] = []
    for name, tp in _hints(type(obj)).items():
        key, value = _join(path, name), getattr(obj, name)
        if dataclasses.is_dataclass(value) or isinstance(value, list):
            found += none_texts(value, key)
        elif isinstance(value, str) and value.strip().lower() == "none" and _admits_none(tp):
            found.append((key, value))
    return found


def names_any(message: str, keys: set[str]) -> bool:
    """Whether a message names one of these dotted keys, whole (`grpo.epsilon` is not in `grpo.epsilon_high`;
    a section, `train`, is in `train.lr`)."""
    return any(re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", message) for key in keys)


def in_file(error: ConfigError, path: Any, overrides: Sequence[str]) -> ConfigError:
    """A validation error ("invalid config:" and one "  - problem" per line) naming the config file too
    (`cfg.yaml: invalid config: train.lr must be >= 0, got -1.0`) when one of its problems names no key an
    `a.b=v` override set: the file wrote it, and the key alone does not say which file to open. An error
    of the overrides alone stays as it is (as a wrong type does)."""
    set_keys = {item.partition("=")[0].strip() for item in overrides}
    problems = str(error).splitlines()[1:]
    if path is None or all(names_any(problem, set_keys) for problem in problems):
        return error
    return ConfigError(f"{path}: {error}", error.key)


# ----------------------------------------------------------------------------------------------
# Plain data <-> typed dataclasses
# ----------------------------------------------------------------------------------------------


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """Resolved field types of a dataclass (annotations are strings under __future__)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in get_type_hints(cls).items() if k in names}


_join = join_key


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def type_name(tp: Any) -> str:
    """Readable name of a declared type, for error messages."""
    origin, args = get_origin(tp), get_args(tp)
    if _is_union(tp):
        return " or ".join("null" if a is _NONE else type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return f"list[{type_name(args[0])}]"
    if origin is tuple:
        return f"list of {len(args)} {type_name(args[0])}s"
    if origin is dict or tp is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _bad(key: str, tp: Any, value: Any, hint: str = "") -> ConfigError:
    return ConfigError(f"{key or '<root>'}: expected {type_name(tp)}, got {value!r}{hint}", key or None)


def _admits_none(tp: Any) -> bool:
    """Whether a declared type takes null: Optional[X], or a Literal listing None."""
    return (_is_union(tp) or get_origin(tp) is Literal) and any(a is None or a is _NONE for a in get_args(tp))


def _null_hint(tp: Any, value: Any) -> str:
    """Advice for a field that takes null given the text None (Python's spelling): YAML's is null."""
    if _admits_none(tp) and isinstance(value, str) and value.strip().lower() == "none":
        return " (write null, not None, for no value)"
    return ""


def _with_null_hint(error: ConfigError, key: str, tp: Any, value: Any) -> ConfigError:
    """Optional[X]'s error from X on a value of its own key, with `_null_hint` added when it applies
    (an error deeper in the value, `a.b.0`, stays as it is)."""
    hint = _null_hint(tp, value)
    return ConfigError(f"{error}{hint}", key) if hint and error.key == key else error


def _fits(value: Any, tp: Any, key: str, root: Any) -> bool:
    """Whether a single `value` is a valid `tp` (so that [value] would be the list a key needs)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or value == "":
        return False
    try:
        _coerce(value, tp, key, root)
    except ConfigError:
        return False
    return True


def _closest(word: str, candidates: Sequence[str], cutoff: float = 0.6) -> str | None:
    """The candidate closest to `word` (difflib), or None when nothing is close. Case is ignored
    (`LR` -> `lr`, `DAPO` -> `dapo`): difflib alone finds nothing alike in a short word of other case."""
    by_lower = {c.lower(): c for c in reversed(candidates)}  # the first of candidates equal but for case
    match = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=cutoff)
    return by_lower[match[0]] if match else None


def _all_keys(cls: type, path: str = "") -> list[str]:
    """Every dotted key reachable through nested dataclass fields (not into lists)."""
    keys = []
    for name, tp in _hints(cls).items():
        keys.append(_join(path, name))
        if dataclasses.is_dataclass(tp):
            keys += _all_keys(tp, _join(path, name))
    return keys


def _sibling_with_word(key: str, names: Sequence[str], prefix: bool = False) -> str | None:
    """The one name among `names` that holds `key` as whole words (`path` and `name` in `name_or_path`,
    `num` in `num_prompts`), or with `prefix`, that `key` begins (`temp` of `temperature`); None when
    none or several do."""
    words, low = key.lower().split("_"), key.lower()
    found = [
        name
        for name in names
        if (prefix and len(low) >= 3 and name.startswith(low))
        or (not prefix and any(name.split("_")[i : i + len(words)] == words for i in range(len(name.split("_")))))
    ]
    return found[0] if len(found) == 1 else None


def _unknown_key(cls: type, path: str, key: str, root: type) -> ConfigError:
    """Unknown-key error with a suggestion: what `root.foreign_name(section, key)` says of a name that
    other tools' configs use (`num_generations`), else the same name in another section of `root`
    (`train.group_size` -> `grpo.group_size`), else the closest sibling, else the closest anywhere.
    A YAML key written dotted as `--set` writes it (`train.lr: 1e-5`) is told to nest."""
    dotted_key = _join(path, key)
    if "." in key and dotted_key in _all_keys(root):
        first, *rest = key.split(".")
        nested = f"{first}: " + "".join(f"{{{part}: " for part in rest) + "..." + "}" * len(rest)
        return ConfigError(
            f"unknown config key '{dotted_key}': a YAML key holds no dots (those are for --set); "
            f"nest it{f' in {path}' if path else ''}: {nested}",
            dotted_key,
        )
    foreign = getattr(root, "foreign_name", None)
    if foreign is not None and (said := foreign(path, key)):
        return ConfigError(f"unknown config key '{dotted_key}': {said}", dotted_key)
    elsewhere: dict[str, str] = {}  # leaf name -> its first dotted key
    for dotted in _all_keys(root):
        if "." in dotted:
            elsewhere.setdefault(dotted.rsplit(".", 1)[-1], dotted)
    siblings = list(_hints(cls))
    if (word := _sibling_with_word(key, siblings)) is not None:  # `model.path`: model.name_or_path, not data.path
        guess: str | None = _join(path, word)
    elif key in elsewhere:
        guess = elsewhere[key]
    elif (near := _closest(key, siblings) or _sibling_with_word(key, siblings, prefix=True)) is not None:
        guess = _join(path, near)
    else:
        leaf = _closest(key, list(elsewhere), cutoff=0.8)
        guess = elsewhere[leaf] if leaf else None
    hint = f" (did you mean '{guess}'?)" if guess else ""
    valid = ", ".join(_hints(cls))
    return ConfigError(f"unknown config key '{_join(path, key)}'{hint}; valid keys here: {valid}", _join(path, key))


def build(cls: type, data: Any, path: str = "", root: type | None = None) -> Any:
    """A `cls` instance from a mapping, coercing each value to its field's type; `root` is the
    top-level class (for suggestions across sections)."""
    if isinstance(data, cls):
        return data
    if data is None and path:  # a section whose keys are all commented out (`train:` alone): its defaults
        data = {}
    if not isinstance(data, Mapping):
        raise _bad(path, cls, data)
    root = root or cls
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise _unknown_key(cls, path, str(key), root)
        kwargs[key] = _coerce(value, hints[key], _join(path, key), root)
    for f in dataclasses.fields(cls):
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(path, f.name)}: required ({type_name(hints[f.name])})", _join(path, f.name))
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str, root: type) -> Any:
    """`value` converted to the declared type `tp`, or ConfigError naming `key`."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return plain_numbers(value)
    if _is_union(tp):
        if value is None:
            if _NONE in args:
                return None
            raise _bad(key, tp, value)
        options = [a for a in args if a is not _NONE]
        if len(options) == 1:
            try:
                return _coerce(value, options[0], key, root)
            except ConfigError as e:
                raise _with_null_hint(e, key, tp, value) from None
        for option in options:
            try:
                return _coerce(value, option, key, root)
            except ConfigError:
                continue
        raise _bad(key, tp, value, _null_hint(tp, value))
    if origin is Literal:
        for option in args:
            if value == option and type(value) is type(option):
                return option
        words = [a for a in args if isinstance(a, str)]
        # "q_proj" (a checkpoint's module name) is close to nothing by spelling but names "q" before its "_"
        near = _closest(value, words) or _closest(value.split("_")[0], words, 1.0) if isinstance(value, str) else None
        raise _bad(key, tp, value, f" (did you mean {near!r}?)" if near else _null_hint(tp, value))
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key, root)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _bad(key, tp, value, f" (a list of one: [{value}])" if _fits(value, args[0], key, root) else "")
        return [_coerce(v, args[0], _join(key, i), root) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise _bad(key, tp, value)
        return tuple(_coerce(v, t, _join(key, i), root) for i, (v, t) in enumerate(zip(value, args)))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _bad(key, tp, value)
        val_tp = args[1] if args else Any
        return {str(k): _coerce(v, val_tp, _join(key, k), root) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise _bad(key, tp, value)
    if tp is int:
        number = _number(value)
        if isinstance(number, int):
            return number
        if isinstance(number, float) and number.is_integer() and abs(number) <= MAX_EXACT_INT:
            return int(number)
        if isinstance(number, float) and number.is_integer():  # 1e300: no whole number a run could mean
            raise _bad(key, tp, value, " (a float beyond 2**53 is no exact integer; write the digits)")
        raise _bad(key, tp, value)
    if tp is float:
        number = _number(value)
        if number is None:
            raise _bad(key, tp, value)
        try:
            return float(number)
        except OverflowError:  # an int beyond the largest float (about 1.8e308)
            raise _bad(key, tp, value, " (too large for a float)") from None
    if tp is str:
        if isinstance(value, str) and "\0" in value:  # no path holds one (os calls raise ValueError); no text needs it
            problem = "holds a NUL character (\\0), which no name, path or text may hold"
            raise ConfigError(f"{key}: {value!r} {problem}", key)
        if isinstance(value, str):
            return str(value)  # a plain str, also of yaml_io's float-like text
        raise _bad(key, tp, value, "" if value is None else " (quote the value in YAML)")
    raise TypeError(f"{key}: unsupported config field type {tp!r}")


def _number(value: Any) -> int | float | None:
    """An int/float from a number or a numeric string (PyYAML reads `1e-5` as a string); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        for parse in (int, float):
            try:
                return parse(value.strip())
            except ValueError:
                pass
    return None


def to_plain(obj: Any) -> Any:
    """Plain YAML-safe data of a dataclass tree (or any part of it): dicts, lists, scalars."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    return obj


def changed_keys(a: Any, b: Any, path: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain trees, in `a`'s order. Mappings and
    equally long lists of mappings are compared key by key (`rewards.0.weight`); other values whole."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        keys = [*a, *(k for k in b if k not in a)]
        return [k for key in keys for k in changed_keys(a.get(key), b.get(key), _join(path, key))]
    nested = isinstance(a, list) and isinstance(b, list) and len(a) == len(b)
    if nested and any(isinstance(v, Mapping) for v in a):
        return [k for i, (x, y) in enumerate(zip(a, b)) for k in changed_keys(x, y, _join(path, i))]
    return [] if a == b or (a != a and b != b) else [path]  # NaN equals NaN here


# ----------------------------------------------------------------------------------------------
# Overrides: "a.b=v"
# ----------------------------------------------------------------------------------------------


def _accepts_str(tp: Any) -> bool:
    """True for str, Optional[str], and Literals of strings (`data.synthetic.operations.0=*`)."""
    if _is_union(tp):
        return any(_accepts_str(a) for a in get_args(tp))
    return tp is str or (get_origin(tp) is Literal and any(isinstance(a, str) for a in get_args(tp)))


def _parse_value(text: str, tp: Any) -> Any:
    """The override text as a YAML value. A string field takes the text verbatim (`run.name=007`,
    `data.system_prompt=Answer: briefly # no comment` stay as written), unless it is quoted
    (then unquoted by YAML) or a YAML null (`null`, `~`, empty), which means None."""
    stripped = text.strip()
    if _accepts_str(tp) and stripped not in ("", "~", "null", "Null", "NULL") and stripped[0] not in "'\"":
        return stripped
    try:
        return parse_yaml(text)
    except ConfigError as e:
        shown = repr(text) if len(text) <= 80 else f"{text[:40]!r}... ({len(text)} characters)"
        raise ConfigError(f"cannot parse the value {shown}: {e}") from None


def _field_default(cls: type, name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return to_plain(f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)


def _merge(dst: dict, src: Mapping) -> None:
    for k, v in src.items():
        if isinstance(v, Mapping) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def _child(tp: Any, node: Any, path: str, part: str, root: type) -> tuple[Any, Any, Any]:
    """One step of an override key: (declared type of the child, slot in `node`, its empty value)."""
    if dataclasses.is_dataclass(tp):
        hints = _hints(tp)
        if part not in hints:
            raise _unknown_key(tp, path, part, root)
        # a list or pair starts from its default (so `rewards.0.weight=2` edits the default reward and
        # `train.betas.1=0.95` keeps beta1); a section starts empty (its defaults, derived fields
        # included, are filled when built)
        empty = _field_default(tp, part) if get_origin(hints[part]) in (list, tuple) else {}
        return hints[part], part, empty
    if get_origin(tp) in (list, tuple):
        if not part.isdigit() or int(part) >= len(node):
            raise ConfigError(f"{_join(path, part)}: no such item (the list {path} has {len(node)})")
        args = get_args(tp)
        return args[int(part) if get_origin(tp) is tuple else 0], int(part), {}
    if get_origin(tp) is dict:
        return (get_args(tp) or (str, Any))[1], part, {}
    raise _no_sub_keys(_join(path, part), path, tp)


def _no_sub_keys(key: str, path: str, tp: Any) -> ConfigError:
    """`train.lr.x=1`: the override steps into a single value."""
    name = type_name(tp)
    what = "a free-form value" if tp is Any else name if name.startswith("one of") else f"a {name}"
    return ConfigError(f"{key}: {path} is {what}, it has no sub-keys")


def _non_null(tp: Any) -> Any:
    """X of Optional[X]; any other type as it is."""
    return next((a for a in get_args(tp) if a is not _NONE), tp) if _is_union(tp) else tp


def _container(tp: Any) -> type | None:
    """The plain container an override steps into for a declared type: dict for a section or a
    mapping, list for a list or pair, None for a single value (Optional[X] as X)."""
    tp = _non_null(tp)
    if dataclasses.is_dataclass(tp) or get_origin(tp) is dict or tp is dict:
        return dict
    return list if get_origin(tp) in (list, tuple) else None


def apply_override(raw: dict, item: str, root: type) -> None:
    """Set `key=value` into the raw (YAML) dict of a `root` tree; the key is checked against the
    schema on the way, so a typo fails with a suggestion. List items by index: `rewards.0.weight=2`."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    parts = key.split(".")
    tp: Any = root
    node: Any = raw
    path = ""
    for i, part in enumerate(parts):
        child_tp, slot, empty = _child(_non_null(tp), node, path, part, root)  # Optional[X]: step into X
        path = _join(path, part)
        current = node.get(slot) if isinstance(node, dict) else node[slot]
        if i == len(parts) - 1:
            try:
                value = _parse_value(text, child_tp)
            except ConfigError as e:
                raise ConfigError(f"{key}: {e}") from None
            if isinstance(value, Mapping) and isinstance(current, dict):
                _merge(current, value)  # `lora={enabled: true}` keeps the other lora keys
            else:
                node[slot] = value
            return
        container = _container(child_tp)
        if container is None:  # `train.lr.x=1`
            raise _no_sub_keys(_join(path, parts[i + 1]), path, _non_null(child_tp))
        if current is None:
            current = node[slot] = empty
        elif not isinstance(current, container):  # a section given a scalar or a list in the YAML
            raise _bad(path, child_tp, current)
        tp, node = child_tp, current


class Section:
    """Base of a config dataclass: `from_dict` (strict, coercing) and `to_dict` (plain data)."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        """Build from plain data (e.g. parsed YAML), coercing values; unknown keys raise ConfigError."""
        return build(cls, data)

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-safe data (tuples become lists)."""
        return to_plain(self)
