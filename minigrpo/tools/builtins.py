"""Built-in tools: a safe calculator and Python execution in the sandbox.

    tools = [Tool.from_function(calculator), python_tool(timeout_s=5.0)]

`calculator` evaluates arithmetic by walking the expression's syntax tree: numbers and
+ - * / // % ** (and unary + -), nothing else: no names, no calls, no attributes. Exponents and
results are bounded, so `9**9**9` is refused instead of hanging the trainer. Digits of any script
("١٢", fullwidth "１２") read as the ASCII digits they stand for, as `int()` reads them. `python` runs code in
`sandbox.run_python` and reports its output; a failed run is a failed ToolResult with its reason.
"""

from __future__ import annotations

import ast
import math
import operator
import signal
import unicodedata
from typing import Any

from minigrpo.tools.run import ToolResult
from minigrpo.tools.sandbox import SandboxResult, run_python
from minigrpo.tools.schema import Tool

__all__ = ["builtin_tools", "calculator", "python", "python_tool", "sandbox_result"]

MAX_EXPRESSION_CHARS = 500
MAX_EXPONENT = 10_000
MAX_RESULT_BITS = 4096  # about 1233 decimal digits

_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_SIGNS = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def calculator(expression: str) -> int | float:
    """Evaluate an arithmetic expression.

    Args:
        expression: numbers combined with + - * / // % ** and parentheses, e.g. "(3 + 4) * 2 ** 5".
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression too long ({len(expression)} characters, at most {MAX_EXPRESSION_CHARS})")
    try:
        tree = ast.parse(_ascii_digits(expression).strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an arithmetic expression: {e.msg} at char {max(0, (e.offset or 1) - 1)}") from None
    value = _eval(tree.body)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def _ascii_digits(expression: str) -> str:
    """`expression` with every decimal digit of another script (Unicode category Nd) as its ASCII digit:
    Python's parser refuses them in literals, yet they are plainly numbers (int("١٢") == 12)."""
    if expression.isascii():
        return expression
    return "".join(str(unicodedata.decimal(c)) if not c.isascii() and c.isdecimal() else c for c in expression)


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant):
        if type(node.value) not in (int, float):
            raise ValueError(f"only numbers are allowed, got {node.value!r}")
        return _checked(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _SIGNS:
        return _SIGNS[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        try:
            return _checked(_OPS[type(node.op)](left, right))
        except ZeroDivisionError:
            raise ValueError("division by zero") from None
        except OverflowError:
            raise ValueError("the result is too large") from None
    if isinstance(node, ast.Name):
        raise ValueError(f"names are not allowed ({node.id!r}): use numbers only")
    if isinstance(node, ast.Call):
        raise ValueError("function calls are not allowed: use numbers and + - * / // % ** only")
    raise ValueError(f"{type(node).__name__} is not allowed: use numbers and + - * / // % ** only")


def _check_power(base: int | float, exponent: int | float) -> None:
    if abs(exponent) > MAX_EXPONENT:
        raise ValueError(f"exponent too large ({exponent}, at most {MAX_EXPONENT})")
    exact = isinstance(base, int) and isinstance(exponent, int) and exponent > 0
    if exact and max(base.bit_length() - 1, 0) * exponent > MAX_RESULT_BITS:
        raise ValueError(f"the result is too large (more than {MAX_RESULT_BITS} bits)")


def _checked(value: Any) -> int | float:
    if isinstance(value, complex):
        raise ValueError("the result is a complex number")
    if isinstance(value, int) and value.bit_length() > MAX_RESULT_BITS:
        raise ValueError(f"the result is too large (more than {MAX_RESULT_BITS} bits)")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("the result is too large (not a finite number)")
    return value


def sandbox_result(run: SandboxResult) -> ToolResult:
    """A sandbox run as the text the model reads: stdout, then stderr and the reason for a failure."""
    parts = [run.stdout.rstrip("\n")] if run.stdout.strip() else []
    if run.stderr.strip():
        parts.append(run.stderr.rstrip("\n"))
    kind = None
    if run.timed_out:
        kind, note = "timeout", f"killed: time limit exceeded ({run.seconds:.1f} s)"
    elif run.memory_exceeded:
        kind, note = "memory", "killed: memory limit exceeded"
    elif run.cpu_exceeded:
        kind, note = "cpu", "killed: CPU time limit exceeded"
    elif run.exit_status is not None and run.exit_status < 0:
        kind, note = "error", _signal_note(-run.exit_status)
    elif run.exit_status != 0:
        kind, note = "error", f"exit status {run.exit_status}"
    if kind is not None:
        parts.append(f"[{note}]")
    return ToolResult("\n".join(parts) if parts else "(no output)", kind is None, kind, "python")


def _signal_note(number: int) -> str:
    """Why a run ended by a signal no sandbox limit sent: a SIGKILL below the CPU and time limits comes
    from the system (its out-of-memory killer) or from the code itself."""
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    cause = " (not a sandbox limit: the system's out-of-memory killer or the code itself)" if name == "SIGKILL" else ""
    return f"killed by {name}{cause}"


def python_tool(*, timeout_s: float = 5.0, memory_mb: int = 512, max_output_chars: int = 4000) -> Tool:
    """The `python` tool with these sandbox limits."""

    def python(code: str) -> ToolResult:
        """Run Python code (standard library only) and return what it prints; the value of a last
        expression is printed too. Each call starts fresh: nothing is kept between calls.

        Args:
            code: the Python source to run.
        """
        run = run_python(code, timeout_s=timeout_s, memory_mb=memory_mb, max_output_chars=max_output_chars)
        return sandbox_result(run)

    return Tool.from_function(python)


def python(code: str) -> ToolResult:
    """Run Python code (standard library only) and return what it prints; the value of a last
    expression is printed too. Each call starts fresh: nothing is kept between calls.

    Args:
        code: the Python source to run.
    """
    return sandbox_result(run_python(code))


def builtin_tools() -> dict[str, Tool]:
    """The built-ins by name, with default limits: calculator, python."""
    return {"calculator": Tool.from_function(calculator), "python": Tool.from_function(python)}
