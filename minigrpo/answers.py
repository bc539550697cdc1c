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

# 1,234.5 | 12.5 | .5, signed by "-" or "\u2212" (unicode minus) unless after a word character ("9-5" is 9 and 5)
NUMBER = re.compile(r"(?:(?<!\w)[-\u2212])?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")
# the content cannot hold an "<answer>": many unclosed tags then cost linear time, not quadratic
ANSWER_TAG = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)
_FRAC = re.compile(r"([-+]?)\\[dt]?frac\{\s*([-+]?\d+)\s*\}\{\s*(\d+)\s*\}")


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
    separators ("1,234" and "1{,}234"); reads integers, decimals, "a/b" and \\frac{a}{b}; the unicode
    minus "\u2212" is "-".
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
    if re.fullmatch(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)", s):
        return float(s)
    frac = re.fullmatch(r"([-+]?\d+)\s*/\s*(\d+)", s)
    if frac and float(frac[2]) != 0:  # floats: a runaway string of digits must not raise
        return float(frac[1]) / float(frac[2])
    frac = _FRAC.fullmatch(s)
    if frac and float(frac[3]) != 0:
        return (-1 if frac[1] == "-" else 1) * float(frac[2]) / float(frac[3])
    return None


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
