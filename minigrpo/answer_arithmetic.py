"""The value of an answer written as arithmetic on numbers, \\pi, \\sqrt and \\frac, so that equal values in
other forms match ("2\\sqrt{3}" is "\\sqrt{12}", "\\frac{\\sqrt{3}}{2}" is "\\sqrt{3}/2"): a small recursive-descent
reader of the canonical text answers.canonical makes; anything else (a variable, a function) has no value. And
when two values are the same number: same_number, and exact_whole for whole numbers past a float's precision.

    evaluate("2\\sqrt{3}")  -> 3.4641...        evaluate("x+1")  -> None
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

# the tokens of arithmetic on numbers: numbers, \\pi, \\sqrt, \\frac, operators and brackets
_TOKEN = re.compile(r"\d+(?:\.\d+)?|\.\d+|\\(?:pi|sqrt|frac|cdot|times)(?![a-z])|[-+*/^(){}\[\]]")


def evaluate(s: str) -> float | None:
    """The value of a canonical answer that is arithmetic on numbers, \\pi, \\sqrt{..} (\\sqrt[n]{..}) and
    \\frac{..}{..} ("\\frac{\\sqrt{3}}{2}", "2\\pi", "3^{2}"); None for anything else (a variable, a function,
    an equation) and for what has no finite value."""
    tokens = _TOKEN.findall(s) if len(s) <= 200 else []
    if not tokens or "".join(tokens) != s:
        return None
    try:
        parser = _Arithmetic(tokens)
        value = parser.sum()
    except (ValueError, ZeroDivisionError, OverflowError, RecursionError, IndexError, TypeError):
        return None
    finite = isinstance(value, float) and math.isfinite(value)  # (-8)^{1/3} is complex in Python: no answer
    return value if parser.peek() is None and finite else None


def same_number(p: float, r: float) -> bool:
    """Two whole numbers must be equal; other values within rel 1e-9 (float rounding)."""
    if p.is_integer() and r.is_integer():  # a relative tolerance would pass an off-by-one 10-digit answer
        return p == r
    return math.isclose(p, r, rel_tol=1e-9, abs_tol=1e-12)


FLOAT_EXACT = 2.0**53  # from here on a float cannot tell n from n + 1: 10000000000000001 reads as 1e16


def exact_whole(number: str) -> int | None:
    """The whole number one number as answers.NUMBER finds it spells, exactly ("$10,000,000,000,000,001",
    "1.000.000", "-1e17"); None for a value that is not whole or runs past 400 digits."""
    digits = re.sub(r"[,$\\\u00a0\u2009\u202f]", "", number)
    digits = digits.replace(".", "") if digits.count(".") > 1 else digits  # "1.000.000": thousands
    try:
        value = Decimal(digits)
    except InvalidOperation:
        return None
    return int(value) if abs(value.adjusted()) <= 400 and value == value.to_integral_value() else None


class _Arithmetic:
    """Recursive descent over tokens: sum = product (+|- product)*, product = signed (op signed | signed)*, signed
    = (+|-)* power, power = atom (^ signed)?, atom = number | \\pi | \\sqrt | \\frac | (sum) | {sum}."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens, self.i = tokens, 0

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        token, self.i = self.tokens[self.i], self.i + 1
        if expected not in (None, token):
            raise ValueError(f"expected {expected}")
        return token

    def sum(self) -> float:
        value = self.product()
        while self.peek() in ("+", "-"):
            value = value + self.product() if self.take() == "+" else value - self.product()
        return value

    def product(self) -> float:
        value = self.signed()
        while self.peek() is not None and self.peek() not in ("+", "-", ")", "}", "]", "^"):
            op = self.take() if self.peek() in ("*", "/", "\\cdot", "\\times") else "*"  # "2\\pi": a product
            value = value / self.signed() if op == "/" else value * self.signed()
        return value

    def signed(self) -> float:
        if self.peek() in ("+", "-"):
            return -self.signed() if self.take() == "-" else self.signed()
        return self.power()

    def power(self) -> float:
        base = self.atom()
        return base ** self.signed() if self.peek() == "^" and self.take() else base

    def root_degree(self) -> float:
        """n of \\sqrt[n]{..}, 2 without it."""
        if self.peek() != "[":
            return 2.0
        self.take()
        degree = self.sum()
        self.take("]")
        return degree

    def atom(self) -> float:
        token = self.take()
        if token in ("(", "{"):
            value = self.sum()
            self.take(")" if token == "(" else "}")
            return value
        if token == "\\pi":
            return math.pi
        if token == "\\sqrt":
            degree = self.root_degree()
            radicand = self.atom()  # below 0: math.sqrt raises, a power is complex (no answer)
            return math.sqrt(radicand) if degree == 2 else radicand ** (1 / degree)
        if token == "\\frac":
            return self.atom() / self.atom()
        return float(token)
