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
# 9 and 5); an exponent counts only when no word character follows it ("3e5" is 300000, "3e5x" is not)
NUMBER = re.compile(r"(?:(?<!\w)[-\u2212])?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+(?!\w))?")
# the content cannot hold an "<answer>": many unclosed tags then cost linear time, not quadratic
ANSWER_TAG = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)
# \frac{a}{b}, \dfrac, \tfrac; LaTeX also takes a single digit without braces: \frac12, \frac{3}4
_FRAC = re.compile(r"([-+]?)\\[dt]?frac\s*(?:\{\s*([-+]?\d+)\s*\}|(\d))\s*(?:\{\s*(\d+)\s*\}|(\d))")
_PLAIN = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


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


def to_number(s: str | None) -> float | None:
    """The number a whole answer string spells, else None.

    Strips spaces, "$" and "\\$", a "%" suffix, a trailing "." and \\boxed{}; removes thousands
    separators ("1,234" and "1{,}234"); reads integers, decimals, exponents ("2.5e3"), "a/b" and
    \\frac{a}{b} (or \\frac12); the unicode minus "\u2212" is "-", a space after a sign is dropped ("- 3").
    A value that is not finite ("1e999", a runaway string of digits) is no number.
    """
    if s is None:
        return None
    s = s.strip().replace("\u2212", "-")
    boxed = _last_boxed(s)
    if boxed is not None:
        s = boxed.strip()
    s = s.replace("\\$", "").replace("$", "").replace("{,}", ",").replace("\\!", "").strip()
    s = s.removesuffix("\\%").removesuffix("%").rstrip(".").strip()
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)
    s = re.sub(r"^([-+])\s+", r"\1", s)
    value = None
    if _PLAIN.fullmatch(s):
        value = float(s)
    elif frac := re.fullmatch(r"([-+]?\d+)\s*/\s*(\d+)", s):
        value = _ratio(1, frac[1], frac[2])
    elif frac := _FRAC.fullmatch(s):
        value = _ratio(-1 if frac[1] == "-" else 1, frac[2] or frac[3], frac[4] or frac[5])
    return value if value is not None and math.isfinite(value) else None


def _ratio(sign: int, numerator: str, denominator: str) -> float | None:
    """sign * a / b as floats (a runaway string of digits must not raise); None when b is 0."""
    return sign * float(numerator) / float(denominator) if float(denominator) != 0 else None


def answer_number(s: str | None) -> float | None:
    """to_number(s), or the single number in s ("18 dollars" -> 18); None if there are 0 or 2+."""
    value = to_number(s)
    if value is not None or s is None:
        return value
    found = NUMBER.findall(s)
    return to_number(found[0]) if len(found) == 1 else None


def extract_answer(text: str, *, last_number: bool = True) -> str | None:
    """The answer a completion gives, as a raw string, by the first rule that applies:

    1. the content of the last <answer>...</answer> (an unclosed <answer>: everything after it);
    2. the content of the last \\boxed{...};
    3. the rest of the line after the last "####";
    4. if last_number: the last number in the text.
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
        found = NUMBER.findall(text)
        return found[-1] if found else None
    return None


def reference_answer(answer: Any) -> str | None:
    """The reference answer as text; a full GSM8K solution is cut to what follows its "####"."""
    if answer is None:
        return None
    answer = str(answer)
    return answer.rsplit("####", 1)[1].strip() if "####" in answer else answer.strip()


def answers_match(pred: str | None, ref: str | None) -> bool:
    """Numerically equal (rel 1e-9: "18" == "18.0" == "$18" == "18."), else equal as normalised text."""
    if pred is None or ref is None:
        return False
    p, r = answer_number(pred), to_number(ref)
    if p is not None and r is not None:
        return math.isclose(p, r, rel_tol=1e-9, abs_tol=1e-12)
    norm = lambda s: re.sub(r"\s+", " ", s.replace("$", "")).strip().rstrip(".").strip().lower()
    return r is None and norm(pred) == norm(ref)
