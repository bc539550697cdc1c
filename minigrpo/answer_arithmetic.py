"""The value of an answer written as arithmetic on numbers, \\pi, \\sqrt and \\frac, so that equal values in
other forms match ("2\\sqrt{3}" is "\\sqrt{12}", "\\frac{\\sqrt{3}}{2}" is "\\sqrt{3}/2"): a small recursive-descent
reader of the canonical text answers.canonical makes; anything else (a variable, a function) has no value. Numbers
are read as exact fractions, so that arithmetic on whole numbers past a float's precision stays exact ("2^{64}",
"10^{20}+1": exact_value); \\pi, and a root that is no fraction, make a float. And when two values are the same
number: same_number, and exact_whole for whole numbers past a float's precision.

    evaluate("2\\sqrt{3}")  -> 3.4641...        evaluate("x+1")  -> None        exact_value("2^{64}")  -> 2**64
"""

from __future__ import annotations

import itertools
import math
import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

# the tokens of arithmetic on numbers: numbers, \\pi, \\sqrt, \\frac, operators ("**" is "^") and brackets
_TOKEN = re.compile(r"\d+(?:\.\d+)?|\.\d+|\\(?:pi|sqrt|frac|cdot|times)(?![a-z])|\*\*|[-+*/^(){}\[\]]")
_NUMBER_TOKEN = re.compile(r"[\d.]")
EXACT_POWER_BITS = 10_000  # a power of a fraction is exact up to this many bits; past them a float (or no value)
_ERRORS = (ValueError, ZeroDivisionError, OverflowError, RecursionError, IndexError, TypeError)


def exact_value(s: str) -> Fraction | float | None:
    """The value of a canonical answer that is arithmetic on numbers, \\pi, \\sqrt{..} (\\sqrt[n]{..}) and
    \\frac{..}{..} ("\\frac{\\sqrt{3}}{2}", "2\\pi", "3^{2}", "2**64"): a Fraction while it is exact, a float once
    \\pi or a root that is not a fraction enters; None for anything else (a variable, a function, an equation, two
    numbers side by side: "1.2.3" is no product) and for what has no finite value."""
    tokens = _TOKEN.findall(s) if len(s) <= 200 else []
    if not tokens or "".join(tokens) != s:
        return None
    if any(_NUMBER_TOKEN.match(a) and _NUMBER_TOKEN.match(b) for a, b in itertools.pairwise(tokens)):
        return None
    try:
        parser = _Arithmetic(tokens)
        value = parser.sum()
        finite = math.isfinite(float(value))  # a fraction past a float's range has no value either (OverflowError)
    except _ERRORS:  # (-8)^{1/3} is complex in Python: no answer (TypeError)
        return None
    return value if parser.peek() is None and finite else None


def evaluate(s: str) -> float | None:
    """exact_value(s) as a float: the value of a canonical answer that is arithmetic on numbers ("2\\pi", "3^{2}");
    None for anything else and for what has no finite value."""
    value = exact_value(s)
    return None if value is None else float(value)


def same_number(p: float, r: float) -> bool:
    """Two whole numbers must be equal; other values within rel 1e-9 (float rounding)."""
    if p.is_integer() and r.is_integer():  # a relative tolerance would pass an off-by-one 10-digit answer
        return p == r
    return math.isclose(p, r, rel_tol=1e-9, abs_tol=1e-12)


def ratio(sign: int, numerator: str, denominator: str) -> float | None:
    """sign * a / b as floats (a runaway string of digits must not raise); None when b is 0."""
    return sign * float(numerator) / float(denominator) if float(denominator) != 0 else None


def mixed_number(sign: str, whole: str, numerator: str, denominator: str) -> float | None:
    """The value of the mixed number sign whole numerator/denominator ("-", "2", "1", "2" is -2.5), None unless its
    fraction is proper ("2 3/2" is no mixed number)."""
    top, bottom = float(numerator), float(denominator)
    if not 0 <= top < bottom:
        return None
    return (-1 if sign == "-" else 1) * (float(whole) + top / bottom)


FLOAT_EXACT = 2.0**53  # from here on a float cannot tell n from n + 1: 10000000000000001 reads as 1e16


def exact_whole(number: str) -> int | None:
    """The whole number one number as answers.NUMBER finds it spells, or a whole answer in canonical form,
    exactly ("$10,000,000,000,000,001", "1 000{,}000", "1.000.000", "-1e17", "5%"); None for a value that is not
    whole or runs past 400 digits."""
    digits = re.sub(r"[,$\\{}% \u00a0\u2009\u202f]", "", number)
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

    def sum(self) -> Fraction | float:
        value = self.product()
        while self.peek() in ("+", "-"):
            value = value + self.product() if self.take() == "+" else value - self.product()
        return value

    def product(self) -> Fraction | float:
        value = self.signed()
        while self.peek() is not None and self.peek() not in ("+", "-", ")", "}", "]", "^", "**"):
            op = self.take() if self.peek() in ("*", "/", "\\cdot", "\\times") else "*"  # "2\\pi": a product
            value = value / self.signed() if op == "/" else value * self.signed()
        return value

    def signed(self) -> Fraction | float:
        if self.peek() in ("+", "-"):
            return -self.signed() if self.take() == "-" else self.signed()
        return self.power()

    def power(self) -> Fraction | float:
        base = self.atom()
        if self.peek() not in ("^", "**"):
            return base
        self.take()
        exponent = self.signed()
        if isinstance(base, Fraction) and isinstance(exponent, Fraction) and exponent.denominator == 1:
            bits = max(base.numerator.bit_length(), base.denominator.bit_length())
            if bits * abs(exponent) <= EXACT_POWER_BITS or bits <= 1:  # 0, 1, -1 to any power
                return base ** int(exponent)
        return float(base) ** float(exponent)

    def root_degree(self) -> Fraction | float:
        """n of \\sqrt[n]{..}, 2 without it."""
        if self.peek() != "[":
            return 2.0
        self.take()
        degree = self.sum()
        self.take("]")
        return degree

    def atom(self) -> Fraction | float:
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
            if degree == 2 and isinstance(radicand, Fraction) and radicand >= 0:
                top, bottom = math.isqrt(radicand.numerator), math.isqrt(radicand.denominator)
                if Fraction(top, bottom) ** 2 == radicand:  # \\sqrt{4} is 2, exactly
                    return Fraction(top, bottom)
            return math.sqrt(radicand) if degree == 2 else float(radicand) ** (1 / float(degree))
        if token == "\\frac":
            return self.atom() / self.atom()
        return Fraction(token)
