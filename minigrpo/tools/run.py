"""Running a parsed tool call: every outcome is a `ToolResult` the model reads, never an exception.

    result = call_tool(tool, call, timeout_s=10.0)    # ToolResult(content, ok, error_kind, name)
    results = run_tool_calls(calls, tools)            # the calls of one turn, ToolCallErrors included
    stats.add(results); stats.metrics()               # {"tools/calls": ..., "tools/failures/timeout": ...}

A tool's return value becomes text: a str as is, bytes decoded as UTF-8 (an undecodable byte as U+FFFD),
dicts / lists / numbers / bools / None as JSON (str() where JSON cannot write them), anything else through
str(). An `async def` tool is awaited (in its own event loop, within the timeout). A tool may also return a
ToolResult itself (the Python sandbox does, to report a failed run with its output); its content
becomes text the same way. An exception becomes `error: <Type>: <message>` (no traceback: the model
needs the message, not our stack); a call that exceeds `timeout_s` is abandoned (it runs
in a daemon thread, which Python cannot kill, so a tool that may hang should enforce its own limit,
as the sandbox does with a process). Content is cut to `max_chars` with a note saying how much went.

error_kind is None for a successful call, else one of: "bad_call" (malformed or invalid call),
"exception" (the tool raised), "timeout", or what a tool that returns ToolResults reports (the
sandbox: "error", "timeout", "memory", "cpu").
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from minigrpo.tools.calls import ToolCall, ToolCallError, valid_text
from minigrpo.tools.schema import Tool, as_tools

__all__ = ["ToolResult", "ToolStats", "call_tool", "run_tool_calls", "to_text", "truncate"]

DEFAULT_MAX_CHARS = 4000


@dataclasses.dataclass(frozen=True)
class ToolResult:
    """What a call gave back, as the text the model reads; ok False with error_kind for a failure."""

    content: str
    ok: bool = True
    error_kind: str | None = None
    name: str = ""
    call_id: str = ""  # the id of the call it answers, where the format gives ids ("mistral")


def call_tool(
    tool: Tool | None,
    call: ToolCall | ToolCallError,
    timeout_s: float | None = 10.0,
    *,
    max_chars: int = DEFAULT_MAX_CHARS,
) -> ToolResult:
    """Run `call` with `tool` (None is fine for a ToolCallError); the result, failures included. Its
    content and name are text UTF-8 can write (calls.valid_text): the model reads them as tokens."""
    result = _call_tool(tool, call, timeout_s, max_chars)
    content, name = valid_text(result.content), valid_text(result.name)
    return dataclasses.replace(result, content=content, name=name, call_id=call.id)


def _call_tool(
    tool: Tool | None, call: ToolCall | ToolCallError, timeout_s: float | None, max_chars: int
) -> ToolResult:
    """call_tool's result as the tool and the call give it."""
    if isinstance(call, ToolCallError):
        return ToolResult(truncate(f"error: {call.message}", max_chars), False, "bad_call", call.name or "")
    if tool is None or tool.name != call.name:
        return ToolResult(f"error: no tool named {call.name!r}", False, "bad_call", call.name)
    status, value = _run(tool.fn, call.arguments, timeout_s)
    if status == "timeout":
        return ToolResult(f"error: the tool did not answer within {timeout_s:g} s", False, "timeout", tool.name)
    if status == "error":
        message = f"{type(value).__name__}: {value}" if str(value) else type(value).__name__
        return ToolResult(truncate(f"error: {message}", max_chars), False, "exception", tool.name)
    name = value.name if isinstance(value, ToolResult) and isinstance(value.name, str) and value.name else tool.name
    try:
        text = to_text(value.content if isinstance(value, ToolResult) else value)
    except Exception as e:  # e.g. an int past Python's digit limit: the tool's result, not the run, fails
        message = f"error: the result cannot be written as text ({type(e).__name__}: {e})"
        return ToolResult(truncate(message, max_chars), False, "exception", name)
    if isinstance(value, ToolResult):  # the tool's own verdict, its content as text (any value, as a return)
        return dataclasses.replace(value, content=truncate(text, max_chars), name=name)
    return ToolResult(truncate(text, max_chars), True, None, name)


def run_tool_calls(
    calls: Iterable[ToolCall | ToolCallError],
    tools: Sequence[Tool | Callable[..., Any]] | Mapping[str, Tool],
    timeout_s: float | None = 10.0,
    *,
    max_chars: int = DEFAULT_MAX_CHARS,
) -> list[ToolResult]:
    """The results of one turn's calls, in order (one result per call, errors included)."""
    by_name = as_tools(tools)
    return [call_tool(by_name.get(c.name or ""), c, timeout_s, max_chars=max_chars) for c in calls]


def _run(fn: Callable[..., Any], arguments: Mapping[str, Any], timeout_s: float | None) -> tuple[str, Any]:
    """("ok", value) | ("error", exception) | ("timeout", None); with a timeout, in a daemon thread.
    A tool's SystemExit (sys.exit, argparse) is its failure, not the run's end; a KeyboardInterrupt in
    this thread is the user's (Ctrl-C) and stops the run."""
    if timeout_s is None:
        try:
            return "ok", _called(fn, arguments)
        except (Exception, SystemExit) as e:
            return "error", e
    box: list[tuple[str, Any]] = []

    def target() -> None:
        try:
            box.append(("ok", _called(fn, arguments)))
        except BaseException as e:  # a thread must not die silently
            box.append(("error", e))

    thread = threading.Thread(target=target, name=f"tool-{getattr(fn, '__name__', 'fn')}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return box[0] if box else ("timeout", None)


def _called(fn: Callable[..., Any], arguments: Mapping[str, Any]) -> Any:
    """fn's value for `arguments`; an async def tool's (any awaitable it returns) awaited to its end, not
    its coroutine object (whose repr would be the result, the tool never run)."""
    value = fn(**arguments)
    if inspect.isawaitable(value):
        value = asyncio.run(_awaited(value))
    return value


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def to_text(value: Any) -> str:
    """A tool's return value as the text the model reads (JSON for data, str() for anything else)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):  # str() would give "b'...'" with escapes
        return bytes(value).decode("utf-8", errors="replace")
    if value is None or isinstance(value, (dict, list, tuple, bool, int, float)):
        try:
            return json.dumps(value, ensure_ascii=False, default=str)
        except (ValueError, TypeError):  # a circular structure, keys JSON cannot write (tuples)
            return str(value)
    return str(value)


def truncate(text: str, max_chars: int) -> str:
    """`text` cut to `max_chars` characters, with a note saying how many were cut."""
    if len(text) <= max_chars:
        return text
    return f"{text[:max_chars]}\n... [truncated: {len(text) - max_chars} more characters]"


@dataclasses.dataclass
class ToolStats:
    """Counts of tool calls and their failures, for the metrics of a step."""

    calls: Counter = dataclasses.field(default_factory=Counter)  # per tool name
    failures: Counter = dataclasses.field(default_factory=Counter)  # per error_kind

    def add(self, results: Iterable[ToolResult]) -> None:
        for r in results:
            self.calls[r.name or "?"] += 1
            if not r.ok:
                self.failures[r.error_kind or "error"] += 1

    def metrics(self) -> dict[str, float]:
        """tools/calls, tools/failures, tools/failures/<kind>, tools/<name>/calls."""
        out = {"tools/calls": float(sum(self.calls.values())), "tools/failures": float(sum(self.failures.values()))}
        out.update({f"tools/failures/{k}": float(v) for k, v in sorted(self.failures.items())})
        out.update({f"tools/{k}/calls": float(v) for k, v in sorted(self.calls.items())})
        return out
