"""Reading answers: the answer a completion gives, the number an answer spells, and whether two match.

    extract_answer("<reasoning>...</reasoning><answer>72</answer>")  -> "72"
    answers_match("$72.", "72")                                       -> True

The built-in rewards (minigrpo.reward_fns) and the evaluation's accuracy both read answers here, so
"correct" means the same thing in training and in eval.
"""

from __future__ import annotations

import math
import re
from typing import Any

# 1,234.5 | 12.5 | .5 | 2.5e-3, signed by "-" or "\u2212" (unicode minus) unless after a word character ("9-5" is
# 9 and 5); an exponent counts only when no word character follows it ("3e5" is 300000, "3e5x" is not). Thousands
# groups are 3 digits and no more ("1,2345" is 1 and 2345), split by "," or a typographic space (no-break, thin,
# narrow no-break: "1\u2009000"); a plain space is a separator only inside a whole answer (to_number)
_GROUPED = r"\d{1,3}(?:(?:,|[\u00a0\u2009\u202f])\d{3}(?!\d))+"
NUMBER = re.compile(rf"(?:(?<!\w)[-\u2212])?(?:{_GROUPED}(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+(?!\w))?")
# the content cannot hold an "<answer>": many unclosed tags then cost linear time, not quadratic
ANSWER_TAG = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)
# \frac{a}{b}, \dfrac, \tfrac; LaTeX also takes a single digit without braces: \frac12, \frac{3}4
_FRAC = re.compile(r"([-+]?)\\[dt]?frac\s*(?:\{\s*([-+]?\d+)\s*\}|(\d))\s*(?:\{\s*(\d+)\s*\}|(\d))")
_PLAIN = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
# a mixed number as a whole answer: "2 1/2", "-3\frac{1}{4}" (a proper fraction after the whole part)
_MIXED = re.compile(r"([-+]?)(\d+)(?:\s+(\d+)\s*/\s*(\d+)|\s*\\[dt]?frac\s*\{\s*(\d+)\s*\}\s*\{\s*(\d+)\s*\})")


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None if absent."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return text[i:]  # unclosed: the rest


# a thousands separator inside a whole answer: ",", a space (plain, no-break, thin, narrow no-break) or LaTeX's
# "\," / "\ " / "{,}"; "1 000" and "1\,000" are 1000, but only when every group after the first has 3 digits
_SEPARATOR = r"(?:,|\{,\}|\\[, ]|[ \u00a0\u2009\u202f])"
_GROUPED_WHOLE = re.compile(rf"[-+]?\d{{1,3}}(?:{_SEPARATOR}\d{{3}})+(?:\.\d+)?")
# 1.5 \times 10^{3}, 1.5 \cdot 10^3, 1.5 × 10^3, 1.5 x 10^3, 1.5*10**3: scientific notation as people write it
_TIMES_TEN = re.compile(
    r"([-+]?(?:\d+(?:\.\d*)?|\.\d+))\s*(?:\\times|\\cdot|\u00d7|x|\*)\s*10\s*(?:\^|\*\*)\s*\{?\s*([-+]?\d+)\s*\}?"
)


def to_number(s: str | None) -> float | None:
    """The number a whole answer string spells, else None.

    Strips spaces, "$" and "\\$", a "%" suffix, a trailing "." and \\boxed{}; removes thousands
    separators ("1,234", "1{,}234", "1 234", "1\\,234"); reads integers, decimals, exponents ("2.5e3",
    "2.5 \\times 10^{3}"), "a/b", \\frac{a}{b} (or \\frac12) and mixed numbers ("2 1/2",
    "3\\frac{1}{2}"); the unicode minus "\u2212" is "-", a space after a sign is dropped ("- 3"). A
    value that is not finite ("1e999", a runaway string of digits) is no number.
    """
    if s is None:
        return None
    s = s.strip().replace("\u2212", "-")
    boxed = _last_boxed(s)
    if boxed is not None:
        s = boxed.strip()
    s = s.replace("\\$", "").replace("$", "").replace("\\!", "").strip()
    s = s.removesuffix("\\%").removesuffix("%").rstrip(".").strip()
    s = re.sub(r"^([-+])\s+", r"\1", s)
    if _GROUPED_WHOLE.fullmatch(s):
        s = re.sub(_SEPARATOR, "", s)
    value = None
    if _PLAIN.fullmatch(s):
        value = float(s)
    elif frac := re.fullmatch(r"([-+]?\d+)\s*/\s*(\d+)", s):
        value = _ratio(1, frac[1], frac[2])
    elif frac := _FRAC.fullmatch(s):
        value = _ratio(-1 if frac[1] == "-" else 1, frac[2] or frac[3], frac[4] or frac[5])
    elif sci := _TIMES_TEN.fullmatch(s):
        value = float(f"{sci[1]}e{sci[2]}")
    elif mixed := _MIXED.fullmatch(s):
        value = _mixed(mixed)
    return value if value is not None and math.isfinite(value) else None


def _mixed(m: re.Match) -> float | None:
    """The value of a _MIXED match, None unless its fraction is proper ("2 3/2" is no mixed number)."""
    numerator, denominator = float(m[3] or m[5]), float(m[4] or m[6])
    if not 0 <= numerator < denominator:
        return None
    return (-1 if m[1] == "-" else 1) * (float(m[2]) + numerator / denominator)


def _ratio(sign: int, numerator: str, denominator: str) -> float | None:
    """sign * a / b as floats (a runaway string of digits must not raise); None when b is 0."""
    return sign * float(numerator) / float(denominator) if float(denominator) != 0 else None


# math around a lone number changes its value: "\sqrt{4}", "x^2", "2\pi", "\log 8" are not 4, 2, 2 and 8
# (a degree sign, "18^\circ", is only a unit)
_MATH_AROUND = re.compile(
    r"\^(?!\s*\{?\s*\\circ)|\\(?:sqrt|pi|log|ln|exp|sin|cos|tan|cdot|times|div|pm|mp|infty)(?![a-zA-Z])"
    r"|\bsqrt\b|[\u221a\u03c0\u00d7\u00f7]"
)


def answer_number(s: str | None) -> float | None:
    """to_number(s), or the single number in s ("18 dollars" -> 18); None if there are 0 or 2+, or if
    math around it would change its value ("\\sqrt{4}", "x^2")."""
    value = to_number(s)
    if value is not None or s is None:
        return value
    found = NUMBER.findall(s)
    return to_number(found[0]) if len(found) == 1 and not _MATH_AROUND.search(s) else None


# "The answer is 18", "Final answer: 18", "**Answer:** $18": the phrase a model states its answer with
_ANSWER_PHRASE = re.compile(r"\banswer\s*(?:is|was|:|=)", re.IGNORECASE)
# the end of the stated answer: a line break, or a sentence mark followed by a space or the end
_STATEMENT_END = re.compile(r"\n|[.,;!?](?=\s|$)")


def _stated_answer(text: str) -> str | None:
    """What follows the last "answer is" / "answer:" up to the end of its sentence, when that reads as one
    number ("18 apples", "$1,234.50", "\\frac{1}{2}"); None when there is no such phrase or it holds no
    single number ("the answer: first 3 + 4 = 7" is a working, not an answer)."""
    ends = [phrase.end() for phrase in _ANSWER_PHRASE.finditer(text)]
    if not ends:
        return None
    rest = text[ends[-1] :]
    end = _STATEMENT_END.search(rest)
    stated = rest[: end.start() if end else len(rest)].strip(" \t*:")
    return stated if answer_number(stated) is not None else None


def extract_answer(text: str, *, last_number: bool = True) -> str | None:
    """The answer a completion gives, as a raw string, by the first rule that applies:

    1. the content of the last <answer>...</answer> (an unclosed <answer>: everything after it);
    2. the content of the last \\boxed{...};
    3. the rest of the line after the last "####";
    4. if last_number: what follows the last "answer is" / "answer:" when it is one number, else the
       last number in the text.
    """
    tags = ANSWER_TAG.findall(text)
    if tags:
        return tags[-1].strip()
    if "<answer>" in text:
        return text.rsplit("<answer>", 1)[1].strip()
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().split("\n", 1)[0].strip()
    if last_number:
        stated = _stated_answer(text)
        if stated is not None:
            return stated
        found = NUMBER.findall(text)
        return found[-1] if found else None
    return None


def reference_answer(answer: Any) -> str | None:
    """The reference answer as text; a full GSM8K solution is cut to what follows its "####"."""
    if answer is None or (isinstance(answer, float) and not math.isfinite(answer)):  # a missing cell read as NaN
        return None
    answer = str(answer)
    return answer.rsplit("####", 1)[1].strip() if "####" in answer else answer.strip()


def answers_match(pred: str | None, ref: str | None) -> bool:
    """Numerically equal, else equal as normalised text. Two whole numbers must be equal ("18" == "18.0" ==
    "$18" == "18.", but 1219253924 != 1219253925); other values within rel 1e-9 (float rounding)."""
    if pred is None or ref is None:
        return False
    p, r = answer_number(pred), to_number(ref)
    if p is not None and r is not None:
        if p.is_integer() and r.is_integer():  # a relative tolerance would pass an off-by-one 10-digit answer
            return p == r
        return math.isclose(p, r, rel_tol=1e-9, abs_tol=1e-12)
    norm = lambda s: re.sub(r"\s+", " ", s.replace("$", "")).strip().rstrip(".").strip().lower()
    return r is None and norm(pred) == norm(ref)
