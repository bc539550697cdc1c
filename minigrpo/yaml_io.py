"""Strict YAML in and out for configs: duplicate keys refused, numbers and dates read as YAML 1.2 reads them.

PyYAML implements YAML 1.1, where `010` is octal eight, `1:30` is the sexagesimal 90, `1e-5` is
text and `2024-01-01` a date; every config reader expects ten, text, a float and text.
`parse_yaml` / `load_yaml_file` read with 1.2's numbers (a bare `1e-5` stays text where the schema
wants a string: see `_FloatText`) and no dates, and `dump_yaml` quotes any string either version
would read otherwise, so yaml.safe_load reads our files back too. Every problem is a ConfigError
with the line and column (and for a tab or an unquoted `*`, how to fix it).
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import yaml

from minigrpo.errors import ConfigError

_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
# YAML 1.2 numbers (PyYAML implements 1.1): `010` is ten, not octal eight; `1:30` is text, not the
# sexagesimal 90; `1e-5` and `1e5` are numbers, not text (see `_FloatText`). Underscores between
# digits stay allowed (`1_000`), as in 1.1.
_INT_RE = re.compile(r"^[-+]?(?:[0-9][0-9_]*|0x[0-9a-fA-F_]+|0o[0-7_]+|0b[01_]+)$")
_FLOAT_RE = re.compile(
    r"^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*|[0-9][0-9_]*(?=[eE]))(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)


# YAML 1.1 types that 1.2 has not: `2024-01-01` is a date and a lone `=` a "value" key there, text in 1.2
# (a run named by its date, a date handed to a reward or a chat template, `stop: [=]`)
_DROPPED = (_INT, _FLOAT, "tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:value")


class _Yaml12Numbers(yaml.resolver.Resolver):
    """PyYAML's implicit types with the int and float patterns of YAML 1.2 and neither 1.1's dates nor
    its `=` (booleans stay 1.1: yes/no)."""

    yaml_implicit_resolvers: ClassVar[dict] = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in _DROPPED]
        for first, resolvers in yaml.resolver.Resolver.yaml_implicit_resolvers.items()
    }


_Yaml12Numbers.add_implicit_resolver(_INT, _INT_RE, list("-+0123456789"))
_Yaml12Numbers.add_implicit_resolver(_FLOAT, _FLOAT_RE, list("-+0123456789."))
_RESOLVER_11, _RESOLVER_12 = yaml.resolver.Resolver(), _Yaml12Numbers()


class _FloatText(str):
    """A plain scalar that YAML 1.2 reads as a float and PyYAML's 1.1 as text (`1e-5`, `1e5`,
    `1.5e3`): a float where the schema wants a number or leaves the type open (`rewards.*.kwargs`,
    which would otherwise hand a reward function the text "1e-5"), the text where it wants a
    string. So `run.name: 1e-5` and a run_config.yaml that yaml.safe_dump wrote unquoted still load."""


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float | str:
    """A YAML 1.2 float; one that YAML 1.1 reads as text is kept as `_FloatText`."""
    text = loader.construct_scalar(node)
    if _RESOLVER_11.resolve(yaml.ScalarNode, text, (True, False)) == "tag:yaml.org,2002:str":
        return _FloatText(text)
    return loader.construct_yaml_float(node)


def plain_numbers(value: Any) -> Any:
    """`value` with every `_FloatText` in it made a float (a mapping's key: a plain str), nested too."""
    if isinstance(value, _FloatText):
        return float(value.replace("_", ""))
    if isinstance(value, list):
        return [plain_numbers(v) for v in value]
    if isinstance(value, dict):
        return {str(k) if isinstance(k, _FloatText) else k: plain_numbers(v) for k, v in value.items()}
    return value


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    """A YAML 1.2 integer: decimal unless prefixed 0x / 0o / 0b (a leading zero is no octal)."""
    text = loader.construct_scalar(node).replace("_", "")
    sign, body = (-1, text[1:]) if text.startswith("-") else (1, text.removeprefix("+"))
    base = {"0x": 16, "0o": 8, "0b": 2}.get(body[:2].lower(), 10)
    try:
        return sign * int(body if base == 10 else body[2:], base)
    except ValueError:
        shown = repr(text) if len(text) <= 40 else f"{text[:20]!r}... ({len(text)} characters)"
        problem = f"{shown} is no integer" + (" Python reads (it has too many digits)" if len(text) > 40 else "")
        raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark) from None


# levels of nested lists and mappings a document may hold: a config uses a handful; deeper is a typo such as
# thousands of `[` (which would otherwise overflow Python's stack and end the command with a traceback)
MAX_DEPTH = 100


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice (PyYAML keeps the last one), an alias
    inside the value it names (`kwargs: &k {x: *k}`: a value holding itself, endless for every reader
    of the config) and nesting deeper than MAX_DEPTH, and reads numbers as YAML 1.2 does (`_Yaml12Numbers`)."""

    yaml_implicit_resolvers = _Yaml12Numbers.yaml_implicit_resolvers

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._open_anchors: list[str] = []  # anchors of the values being composed, outermost first

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) and event.anchor in self._open_anchors:
            raise yaml.composer.ComposerError(
                None, None, f"the alias *{event.anchor} is inside the value &{event.anchor} it names", event.start_mark
            )
        if isinstance(event, yaml.AliasEvent):
            return super().compose_node(parent, index)
        if len(self._open_anchors) >= MAX_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
        self._open_anchors.append(event.anchor or "")  # "" for a value without an anchor: counts the depth
        try:
            return super().compose_node(parent, index)
        finally:
            self._open_anchors.pop()

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        """The mapping, refusing a key given twice: the same value (`a:` twice, `1:` and `1.0:`), or the same
        text once every reader turns keys to text (`1:` and `"1":`, which Python keeps apart but the config's
        str keys and the saved YAML would silently merge into one)."""
        first_line: dict[Any, int] = {}
        by_text: dict[str, tuple[Any, int]] = {}  # str(key) -> (key, line)
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.style is None and key_node.tag in _WORD_TAGS:
                key_node.tag = "tag:yaml.org,2002:str"  # a plain `on:`, `no:` or `~:` is that name, not True/False/None
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` keys may be overridden
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            if not isinstance(key, Hashable):  # an unhashable key: the base class says so
                continue
            if key in first_line:
                raise ConfigError(f"duplicate key {key!r} at line {line} (first at line {first_line[key]})")
            if str(key) in by_text:
                other, other_line = by_text[str(key)]
                raise ConfigError(_same_text(other, key, f"at line {line} (first at line {other_line})"))
            first_line[key], by_text[str(key)] = line, (key, line)
        mapping = super().construct_mapping(node, deep)
        texts: dict[str, Any] = {}
        for key in mapping:  # a key merged in (`<<: *base`) beside one of the same text
            if str(key) in texts:
                where = f"in the mapping at line {node.start_mark.line + 1} (one merged in by <<)"
                raise ConfigError(_same_text(texts[str(key)], key, where))
            texts[str(key)] = key
        return mapping


def _same_text(first: Any, key: Any, where: str) -> str:
    """The error of two keys that differ only in type (`1` and `"1"`): every config key is read as text."""
    return f"duplicate key {str(key)!r} {where}: {first!r} and {key!r} are the same key once read as text; keep one"


# a plain key that YAML 1.1 reads as a bool or null (`on`, `no`, `~`): every key is a name here, so it is read as
# written (`train: {on: 1}` is the unknown key 'train.on', not 'train.True'; `kwargs: {no: 1}` passes `no`)
_WORD_TAGS = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:null")
_StrictLoader.add_constructor(_INT, _construct_int)
_StrictLoader.add_constructor(_FLOAT, _construct_float)


def _yaml_hint(e: yaml.YAMLError, problem: str) -> str:
    """How to fix the YAML mistakes a config makes most: a tab, and a text that begins with a
    character YAML reserves (`operations: [+, *]`: `*` begins an alias, `&` an anchor)."""
    context = str(getattr(e, "context", None) or "")
    if "'\\t'" in problem:
        return "; indent with spaces, not tabs"
    if "alias" in context or "anchor" in context or "undefined alias" in problem:
        return '; a value that begins with * or & must be quoted ("*")'
    if "cannot start any token" in problem:
        return "; quote a value that begins with it"
    return ""


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error on one line: what is wrong, where, where the construct it is in began when that is
    another line (an unclosed `[` or quote is found only at the end of the file, many lines below the
    mistake), and for the usual mistakes how to fix it."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark, context = getattr(e, "problem_mark", None), getattr(e, "context", None)
    begun = getattr(e, "context_mark", None)  # where the construct holding the problem began
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
    if str(context).startswith("while ") and begun and (mark is None or begun.line != mark.line):
        where += f", {context} that began at line {begun.line + 1}, column {begun.column + 1}"
    return f"{problem}{where}{_yaml_hint(e, problem)}"


def parse_yaml(text: str) -> Any:
    """One YAML document, strictly (duplicate keys are a ConfigError)."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {_yaml_problem(e)}") from None


def load_yaml_file(path: str | Path) -> dict[str, Any]:
    """A config file's top-level mapping; an unreadable, empty or non-mapping file is a ConfigError.
    `~` is the home folder (`--config=~/x.yaml`, which the shell leaves as it is)."""
    if not str(path).strip():  # Path("") is ".", which would be reported as a folder
        raise ConfigError(f"the config file name is empty ({str(path)!r}): give a YAML file, or leave out --config")
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {str(path)!r}: {e.strerror}") from None
    except RuntimeError as e:  # Path.expanduser: `~user` of no such user, or no home folder
        raise ConfigError(f"cannot read config file {str(path)!r}: {e} (write the path out in full)") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        raw = parse_yaml(text)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if raw is None:
        raise ConfigError(f"config file {path} is empty: it sets nothing (leave out --config to run the defaults)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


class _Dumper(yaml.SafeDumper):
    """Safe YAML with block mappings and lists of scalars on one line (`betas: [0.9, 0.99]`). A string
    is written plain only when both YAML 1.1 (yaml.safe_load) and our 1.2 numbers read it back as a
    string: "1e5" and "010" are quoted, so either reader gets the string back."""

    def resolve(self, kind: Any, value: Any, implicit: Any) -> str:
        tag = super().resolve(kind, value, implicit)
        return _RESOLVER_12.resolve(kind, value, implicit) if tag == "tag:yaml.org,2002:str" else tag


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(not isinstance(v, (list, dict)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


# NEL, a line break to a YAML reader, which reads it back as "\n" (folded to a space inside quotes), while
# PyYAML's writer, with allow_unicode, writes it as it is in plain, quoted and block scalars alike: a string
# holding one is written double-quoted, where it becomes the escape `\N` (its fellow breaks U+2028/U+2029
# are kept as they are by the reader and `\r` is escaped already)
_READ_AS_NEWLINE = "\x85"


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    """A string in the style that reads back as exactly this string: double-quoted (escapes) when it holds
    NEL or a short text with newlines, a literal block for a long one (newlines stay visible), else plain
    where YAML allows it (PyYAML quotes it otherwise)."""
    style = '"' if "\n" in data and len(data) < 80 else ("|" if "\n" in data else None)
    if _READ_AS_NEWLINE in data:
        style = '"'
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(list, _represent_list)
_Dumper.add_representer(str, _represent_str)


def dump_yaml(data: Mapping[str, Any]) -> str:
    """Plain data as block YAML in the given key order (what `to_plain` returns)."""
    return yaml.dump(dict(data), Dumper=_Dumper, sort_keys=False, allow_unicode=True)
