"""Tools for multi-turn rollouts: declare Python functions as tools, parse the model's calls, run them.

    tools = as_tools([calculator, python_tool(timeout_s=5.0), my_function])
    text = tokenizer.apply_chat_template(messages, tools=[t.spec() for t in tools.values()], ...)
    calls = parse_tool_calls(completion, tools, format=detect_format(tokenizer.chat_template))
    results = run_tool_calls(calls, tools)               # never raises: failures are results
    messages += [assistant_message(completion, calls), *tool_messages(results)]

- schema.py: `Tool` from a function (JSON schema from annotations, descriptions from the docstring)
- calls.py: the "hermes" (Qwen2.5), "llama3" (Llama-3.1) and "mistral" call formats, checking against the tools
  (call_json.py: one call read from JSON; mistral_calls.py: Mistral's two forms)
- run.py: `call_tool` -> `ToolResult`, timeouts, truncation, `ToolStats` metrics
- render.py: results (and calls) as chat messages: the template's tool role, or plain text for a
  template without tool support (`renders_tool_calls`)
- builtins.py: `calculator` (safe arithmetic) and `python` (through sandbox.py)
- sandbox.py: Python in a separate, limited, throw-away process
"""

from minigrpo.tools.builtins import builtin_tools, calculator, python, python_tool
from minigrpo.tools.calls import (
    FORMATS,
    ToolCall,
    ToolCallError,
    ToolCallFormat,
    check_arguments,
    detect_format,
    get_format,
    parse_tool_calls,
    register_format,
)
from minigrpo.tools.render import assistant_message, renders_tool_calls, tool_messages
from minigrpo.tools.run import ToolResult, ToolStats, call_tool, run_tool_calls
from minigrpo.tools.sandbox import SandboxResult, run_python
from minigrpo.tools.schema import Tool, as_tools, json_schema_of

__all__ = [
    "FORMATS",
    "SandboxResult",
    "Tool",
    "ToolCall",
    "ToolCallError",
    "ToolCallFormat",
    "ToolResult",
    "ToolStats",
    "as_tools",
    "assistant_message",
    "builtin_tools",
    "calculator",
    "call_tool",
    "check_arguments",
    "detect_format",
    "get_format",
    "json_schema_of",
    "parse_tool_calls",
    "python",
    "python_tool",
    "register_format",
    "renders_tool_calls",
    "run_python",
    "run_tool_calls",
    "tool_messages",
]
