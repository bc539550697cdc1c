"""Tool.from_function(fn).spec() equals transformers' get_json_schema(fn) (the schema chat templates such as
Qwen2.5's and Llama-3.1's write into the prompt), while Tool.parameters stays plain JSON Schema for checking
the model's calls. transformers is a test-only reference here."""

from __future__ import annotations

import enum
import json
import typing
from typing import Any, Literal, Optional, Union

import pytest

from minigrpo.tools import Tool, ToolCall, ToolCallError, json_schema_of, parse_tool_calls

get_json_schema = pytest.importorskip("transformers.utils").get_json_schema  # the test-only reference


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class NoMembers(enum.Enum):
    pass


class PairValued(enum.Enum):
    A = (1, 2)


def scalars(a: int, b: float, c: str, d: bool = False) -> None:
    """Scalars of every kind.

    Args:
        a: an integer.
        b (float): a number.
        c: a string,
            on two lines.
        d: a flag.
    """


def optionals(x: Optional[int] = None, y: str | None = None, z: list[str] | None = None) -> str:  # noqa: UP045
    """Optional arguments: nullable, none required.

    Args:
        x: an optional integer.
        y: an optional string.
        z: optional tags.

    Returns:
        a summary
        of the arguments.

    Raises:
        ValueError: never.
    """
    return ""


def unions(a: Union[int, str], b: int | float | None, c: list[int] | str, d: Any = None) -> dict[str, int]:  # noqa: UP007
    """Unions: a type list, nullable, anyOf for a member with items, and Any.

    Args:
        a: an int or a string.
        b: a number, maybe null.
        c: integers or a string.
        d: anything.
    """
    return {}


def containers(
    a: list[int],
    b: dict[str, list[float]],
    c: tuple[int, str],
    d: list,
    e: dict,
    f: tuple,
    g: typing.List[bool],  # noqa: UP006
    h: typing.Dict[str, Optional[int]],  # noqa: UP006, UP045
) -> list[tuple[int, int]]:
    """Containers, nested.

    Args:
        a: integers.
        b: lists of numbers by name.
        c: a pair.
        d: a list.
        e: an object.
        f: a tuple.
        g: flags.
        h: optional integers by name.
    """
    return []


def choices(
    drink: str, size: Literal["s", "m", "l"], mixed: Literal[1, "x", None], color: Color, level: Level = Level.LOW
):
    """Choose a drink.

    A longer explanation
    kept on its own lines.

    Example:
        choices("tea", "m", 1, Color.RED)

    Args:
        drink: what to drink (choices: ["tea", "coffee"])
        size: the size.
        mixed: one of three (Choices: [1, " x ", null])
        color: a color.
        level: how much.
    """


def odd_docstring(first: int, second: str, third: bool = True) -> int:
    """Entries as transformers reads them.

    Args:
        first:
            the first, on the line below its name.
        second (str): the second; see
            e.g.: a deeper `name:` line continues the entry,
        as does a line without one;
        note: one at the entry's indentation starts another entry.
        third: the third.
    Returns: inline text is no "Returns:" section.
    """
    return 0


def set_return(a: int) -> set[int]:
    """A return type JSON cannot express is left out.

    Args:
        a: anything.

    Returns:
        a set.
    """
    return set()


PARITY = [scalars, optionals, unions, containers, choices, odd_docstring, set_return]


@pytest.mark.parametrize("fn", PARITY, ids=[f.__name__ for f in PARITY])
def test_spec_equals_transformers_get_json_schema(fn):
    ours = Tool.from_function(fn).spec()
    assert json.dumps(ours) == json.dumps(get_json_schema(fn))  # the same text in the prompt: key order too


def test_spec_values_written_out():
    """A few of the values above spelt out, so that a change in the reference shows here too."""
    props = Tool.from_function(unions).spec()["function"]["parameters"]["properties"]
    assert props["a"] == {"type": ["integer", "string"], "description": "an int or a string."}
    assert props["b"] == {"type": ["integer", "number"], "nullable": True, "description": "a number, maybe null."}
    assert props["c"]["anyOf"] == [{"type": "array", "items": {"type": "integer"}}, {"type": "string"}]
    assert props["d"] == {"description": "anything."}
    spec = Tool.from_function(optionals).spec()["function"]
    assert "required" not in spec["parameters"]
    assert spec["return"] == {"type": "string", "description": "a summary\n    of the arguments."}
    drink = Tool.from_function(choices).spec()["function"]["parameters"]["properties"]["drink"]
    assert drink == {"type": "string", "enum": ["tea", "coffee"], "description": "what to drink"}
    docs = Tool.from_function(odd_docstring).spec()["function"]["parameters"]["properties"]
    assert docs["first"]["description"] == "the first, on the line below its name."
    assert docs["second"]["description"] == (
        "the second; see e.g.: a deeper `name:` line continues the entry, as does a line without one;"
    )
    assert docs["third"]["description"] == "the third."
    assert "return" not in Tool.from_function(set_return).spec()["function"]


def test_parameters_are_plain_json_schema_and_check_calls():
    """Tool.parameters (what calls are checked against) lists null in the type, so an explicit null for an
    Optional parameter is a call; union members and docstring choices are checked."""
    tool = Tool.from_function(optionals)
    assert tool.parameters == {
        "type": "object",
        "properties": {
            "x": {"type": ["integer", "null"], "description": "an optional integer."},
            "y": {"type": ["string", "null"], "description": "an optional string."},
            "z": {"type": ["array", "null"], "items": {"type": "string"}, "description": "optional tags."},
        },
        "required": [],
    }
    assert json_schema_of(Optional[Literal["a", "b"]]) == {"type": ["string", "null"], "enum": ["a", "b", None]}  # noqa: UP045
    assert json_schema_of(dict[str, Optional[int]]) == {  # noqa: UP045
        "type": "object",
        "additionalProperties": {"type": ["integer", "null"]},
    }
    (call,) = parse_tool_calls('<tool_call>{"name": "optionals", "arguments": {"x": null}}</tool_call>', [tool])
    assert call == ToolCall("optionals", {"x": None}, call.raw)

    both = Tool.from_function(unions)
    ok = '<tool_call>{"name": "unions", "arguments": {"a": "s", "b": null, "c": [1]}}</tool_call>'
    assert isinstance(parse_tool_calls(ok, [both])[0], ToolCall)
    bad = '<tool_call>{"name": "unions", "arguments": {"a": [1], "b": 1, "c": "s"}}</tool_call>'
    (err,) = parse_tool_calls(bad, [both])
    assert isinstance(err, ToolCallError) and err.message == "argument 'a' should be an integer or a string, got [1]"

    pick = Tool.from_function(choices)
    text = '<tool_call>{"name": "choices", "arguments": {"drink": "milk", "size": "m", "mixed": 1, "color": "red"}}'
    (err,) = parse_tool_calls(text + "</tool_call>", [pick])
    assert err.message == 'argument \'drink\' should be one of "tea", "coffee", got "milk"'


def single_tuple(a: tuple[int]) -> int:
    """Doc.

    Args:
        a: one.
    """
    return 0


def open_tuple(a: tuple[int, ...]) -> int:
    """Doc.

    Args:
        a: many.
    """
    return 0


def a_set(a: set[int]) -> int:
    """Doc.

    Args:
        a: a set.
    """
    return 0


def empty_enum(a: NoMembers) -> int:
    """Doc.

    Args:
        a: nothing.
    """
    return 0


def pair_enum(a: PairValued) -> int:
    """Doc.

    Args:
        a: pairs.
    """
    return 0


def object_literal(a: Literal[Color.RED]) -> int:
    """Doc.

    Args:
        a: a member.
    """
    return 0


def bad_choices(a: str) -> int:
    """Doc.

    Args:
        a: one of (choices: [tea, coffee])
    """
    return 0


@pytest.mark.parametrize(
    "fn, reason",
    [
        (single_tuple, "tuple[int] has a single element"),
        (open_tuple, "tuple[int, ...]: a tuple of any length is a list"),
        (a_set, "type set[int] cannot be expressed in JSON schema"),
        (empty_enum, "Enum NoMembers has no members"),
        (pair_enum, "Enum PairValued's values must be int, float, str, bool or None"),
        (object_literal, "a Literal's values must be int, float, str, bool or None"),
        (bad_choices, "(choices: [tea, coffee]) in the docstring is no JSON list"),
    ],
)
def test_functions_transformers_refuses_raise_one_line(fn, reason):
    with pytest.raises(Exception):  # noqa: B017 - the reference raises its own exception types
        get_json_schema(fn)
    with pytest.raises(ValueError) as info:
        Tool.from_function(fn)
    message = str(info.value)
    assert message.startswith(f"cannot declare {fn.__name__!r} as a tool: parameter 'a': ") and reason in message
    assert "\n" not in message


def test_calls_are_checked_against_unions_tuples_and_nullable_values():
    """A union with an array member (anyOf), a tuple (prefixItems) and transformers' "nullable" are
    checked, not waved through: the model reads each problem as its call's result."""
    from minigrpo.tools import Tool
    from minigrpo.tools.arguments import check_arguments

    def lookup(ids: list[int] | str, pair: tuple[int, str], limit: int | None = None) -> str:
        """Look things up.

        Args:
            ids: the ids, or one name
            pair: a number and a label
            limit: at most this many
        """
        return ""

    schema = Tool.from_function(lookup).parameters
    good = {"ids": [1, 2.0], "pair": [3.0, "x"], "limit": None}
    assert check_arguments(schema, good) == ({"ids": [1, 2], "pair": [3, "x"], "limit": None}, [])
    cases = [
        ({"ids": 5, "pair": [1, "a"]}, "argument 'ids' should be an array or a string, got 5"),
        ({"ids": [1, "a"], "pair": [1, "a"]}, "argument 'ids' item 1 should be an integer, got \"a\""),
        ({"ids": "a", "pair": [1]}, "argument 'pair' should be an array of 2 items, got [1]"),
        ({"ids": "a", "pair": [1, 2]}, "argument 'pair' item 1 should be a string, got 2"),
    ]
    for arguments, problem in cases:
        assert check_arguments(schema, arguments)[1] == [problem]
    nullable = {"type": "object", "properties": {"n": {"type": "integer", "nullable": True}}}
    assert check_arguments(nullable, {"n": None}) == ({"n": None}, [])
    assert check_arguments(nullable, {"n": "x"})[1] == ["argument 'n' should be an integer, got \"x\""]
