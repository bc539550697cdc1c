"""Tool calls on the values real tools return and the user tools a config names: an async def tool is
awaited, bytes are text, and a config entry that cannot be a tool is one line before any weights load."""

from __future__ import annotations

import asyncio
import sys
import textwrap

import pytest

from minigrpo.config import load_config
from minigrpo.configio import ConfigError
from minigrpo.env_config import EnvCfg, resolve_tools
from minigrpo.tools import Tool, ToolCall, ToolResult, call_tool, parse_tool_calls, run_tool_calls


async def lookup(city: str) -> dict:
    """The weather of a city.

    Args:
        city: its name
    """
    await asyncio.sleep(0)
    return {"city": city, "celsius": 21}


async def slow_lookup(city: str) -> str:
    """A lookup that never answers.

    Args:
        city: its name
    """
    await asyncio.sleep(30)
    return city


async def failing_lookup(city: str) -> str:
    """A lookup that raises.

    Args:
        city: its name
    """
    raise KeyError(city)


def read_bytes(name: str) -> bytes:
    """A file's raw bytes.

    Args:
        name: the file
    """
    return f"{name}: caf\u00e9\n".encode() + b"\xff"


@pytest.mark.parametrize("timeout_s", [None, 5.0])
def test_an_async_tool_is_awaited(timeout_s):
    """An async def tool's result was its coroutine object's repr ("<coroutine object lookup at 0x...>"),
    marked ok, the tool never run (and a "never awaited" warning). It is awaited now, with or without a
    timeout; its exception and its hang are failed results as a plain tool's are."""
    tools = [Tool.from_function(f) for f in (lookup, slow_lookup, failing_lookup)]
    text = "".join(
        f'<tool_call>{{"name": "{name}", "arguments": {{"city": "Oslo"}}}}</tool_call>'
        for name in ("lookup", "failing_lookup")
    )
    calls = parse_tool_calls(text, tools, "hermes")
    ok, failed = run_tool_calls(calls, tools, timeout_s)
    assert ok == ToolResult('{"city": "Oslo", "celsius": 21}', True, None, "lookup")
    assert failed == ToolResult("error: KeyError: 'Oslo'", False, "exception", "failing_lookup")
    hung = call_tool(tools[1], ToolCall("slow_lookup", {"city": "Oslo"}, ""), timeout_s=0.2)
    assert hung == ToolResult("error: the tool did not answer within 0.2 s", False, "timeout", "slow_lookup")


def test_bytes_a_tool_returns_are_text():
    """bytes went through str(): the model read "b'Oslo: caf\\xc3\\xa9\\n\\xff'" (escapes, the b prefix)
    instead of the text; they are decoded as UTF-8 now, an undecodable byte as U+FFFD."""
    result = call_tool(Tool.from_function(read_bytes), ToolCall("read_bytes", {"name": "Oslo"}, ""))
    assert result == ToolResult("Oslo: caf\u00e9\n\ufffd", True, None, "read_bytes")
    assert call_tool(Tool.from_function(lambda: bytearray(b"ab"), name="raw"), ToolCall("raw", {}, "")).content == "ab"


USER_TOOLS = '''
LIMIT = 5
TABLE = {"a": 1}


def numbers(n: int):
    """Count.

    Args:
        n: how far
    """
    yield from range(n)


async def stream(n: int):
    """Count, asynchronously.

    Args:
        n: how far
    """
    yield n
'''

YIELDS = "is a generator function (it yields): a tool returns its result"


@pytest.mark.parametrize(
    "name, message",
    [
        ("LIMIT", "env.tools.0='user_tools_d:LIMIT' is not a function (its type is int)"),
        ("TABLE", "env.tools.0='user_tools_d:TABLE' is not a function (its type is dict)"),
        ("numbers", f"env.tools.0='user_tools_d:numbers' {YIELDS}"),
        ("stream", f"env.tools.0='user_tools_d:stream' {YIELDS}"),
    ],
)
def test_a_user_tool_that_cannot_answer_a_call_is_one_line(tmp_path, monkeypatch, name, message):
    """A constant named in env.tools was refused with "cannot declare 5 as a tool: the name must match
    ^[A-Za-z_]...", which says nothing of the mistake, and a generator function was accepted: every call
    answered "<generator object numbers at 0x...>". Both are ConfigErrors naming the entry now."""
    (tmp_path / "user_tools_d.py").write_text(textwrap.dedent(USER_TOOLS))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "user_tools_d", raising=False)
    with pytest.raises(ConfigError) as info:
        resolve_tools(EnvCfg(kind="tools", tools=[f"user_tools_d:{name}"]))
    assert str(info.value) == message


@pytest.mark.parametrize(
    "overrides",
    [
        ["env.kind=gsm8k_tools", "env.sandbox.timeout_s=15"],
        ["env.kind=tools", "env.tools=[python]", "env.sandbox.timeout_s=10", "env.tool_timeout_s=10"],
    ],
)
def test_a_sandbox_limit_past_the_tool_timeout_is_refused(overrides):
    """With env.sandbox.timeout_s at or past env.tool_timeout_s (default 10), a long python call was
    abandoned as a hung tool: the model read "did not answer within 10 s" instead of what the code
    printed, and the sandbox process ran on beside the next calls. The config is refused now."""
    with pytest.raises(ConfigError, match=r"env.sandbox.timeout_s \(1[05]\) must be below env.tool_timeout_s \(10\)"):
        load_config(None, overrides)
    assert load_config(None, ["env.kind=tools", "env.tools=[calculator]", "env.sandbox.timeout_s=15"]).env.kind
