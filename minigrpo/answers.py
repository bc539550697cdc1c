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

from minigrpo.answer_arithmetic import FLOAT_EXACT, evaluate, exact_value, exact_whole, mixed_number, ratio, same_number

# 1,234.5 | 12.5 | .5 | 2.5e-3, signed by "-" or "\u2212" (unicode minus) unless after a word character ("9-5" is
# 9 and 5), a dollar sign allowed between sign and digits ("-$5" is -5); an exponent counts only when no word
# character follows it ("3e5" is 300000, "3e5x" is not). Thousands groups are 3 digits and no more ("1,2345" is 1 and
# 2345), split by "," or a typographic space (no-break, thin, narrow no-break: "1\u2009000") or, with two dots or
# more, by "." ("1.000.000"); a plain space is a separator only inside a whole answer (to_number)
_GROUPED = r"\d{1,3}(?:(?:,|[\u00a0\u2009\u202f])\d{3}(?!\d))+"
_DOTTED = r"\d{1,3}(?:\.\d{3}){2,}(?![.,]?\d)"
_SIGN = r"(?:(?<!\w)[-\u2212](?:\\?\$)?)?"
NUMBER = re.compile(rf"{_SIGN}(?:{_GROUPED}(?:\.\d+)?|{_DOTTED}|\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+(?!\w))?")
# the content cannot hold an "<answer>": many unclosed tags then cost linear time, not quadratic
ANSWER_TAG = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)
# \frac{a}{b}, \dfrac, \tfrac; LaTeX also takes a single digit without braces: \frac12, \frac{3}4
_FRAC = re.compile(r"([-+]?)\\[dt]?frac\s*(?:\{\s*([-+]?\d+)\s*\}|(\d))\s*(?:\{\s*(\d+)\s*\}|(\d))")
_PLAIN = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
# a mixed number as a whole answer: "2 1/2", "-3\frac{1}{4}" (a proper fraction after the whole part)
_MIXED = re.compile(r"([-+]?)(\d+)(?:\s+(\d+)\s*/\s*(\d+)|\s*\\[dt]?frac\s*\{\s*(\d+)\s*\}\s*\{\s*(\d+)\s*\})")


_BOXED = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
# what a brace-less \boxed holds: "\boxed 5", "\boxed -3.", "\boxed B" (LaTeX boxes one token; people mean
# the number); "put it in \boxed as asked" boxes nothing
_BOXED_WORD = re.compile(r"\s*([-+]?\d[^\s${}\\]*|[A-Z](?![a-zA-Z]))")


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced, or of a brace-less "\\boxed 5";
    None if absent."""
    for box in reversed(list(_BOXED.finditer(text))):
        i = box.end()
        while i < len(text) and text[i].isspace():
            i += 1
        if i < len(text) and text[i] == "{":
            return _braced(text, i + 1)
        word = _BOXED_WORD.match(text, box.end())
        if word:
            return word[1].rstrip(".,;")
    return None


def _braced(text: str, i: int) -> str:
    """text from i up to the "}" that closes the "{" before i (unclosed: the rest)."""
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return text[i:]


# a thousands separator inside a whole answer: ",", a space (plain, no-break, thin, narrow no-break) or LaTeX's
# "\," / "\ " / "{,}"; "1 000" and "1\,000" are 1000, but only when every group after the first has 3 digits
_SEPARATOR = r"(?:,|\{,\}|\\[, ]|[ \u00a0\u2009\u202f])"
_GROUPED_WHOLE = re.compile(rf"[-+]?\d{{1,3}}(?:{_SEPARATOR}\d{{3}})+(?:\.\d+)?")
# thousands grouped by "." where the dots cannot be decimal marks: two or more of them ("1.000.000" is a million)
_DOTTED_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:\.\d{3}){2,}")
# a decimal comma where no thousands separator can be meant: one comma with other than 3 digits after it ("3,5",
# "0,25", "3{,}5"; "1,000" is 1000 and "1234,567" no number), or after thousands grouped by "." or a space ("1.234,5")
_DECIMAL_COMMA = re.compile(
    r"([-+]?\d+)(?:,|\{,\})(\d{1,2}|\d{4,})|([-+]?\d{1,3}(?:[. \u00a0\u2009\u202f]\d{3})+)(?:,|\{,\})(\d+)"
)
# 1.5 \times 10^{3}, 1.5 \cdot 10^3, 1.5 × 10^3, 1.5 x 10^3, 1.5*10**3: scientific notation as people write it
_TIMES_TEN = re.compile(
    r"([-+]?(?:\d+(?:\.\d*)?|\.\d+))\s*(?:\\times|\\cdot|\u00d7|x|\*)\s*10\s*(?:\^|\*\*)\s*\{?\s*([-+]?\d+)\s*\}?"
)
# LaTeX that only spaces, sizes or styles an answer: "\left(", "\!", "\displaystyle", "~"
_LATEX_SPACING = re.compile(r"\\(?:left|right|[bB]igg?[lr]?|displaystyle)(?![a-zA-Z])|\\[!;: ]|~")
# a wrapper whose content is the answer: "\text{(B)}", "\textbf{5}", "\mathrm{cm}", "\boxed{..}" inside
_STYLE = re.compile(
    r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mathbf|mathit|mathsf|mbox|operatorname|boxed|fbox)\s*"
    r"\{([^{}]*)\}"
)
# a degree sign: "30^\circ", "30^{\circ}", "30°" are 30
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ(?![a-zA-Z])|\u00b0|\\degree(?![a-zA-Z])")
# one-token arguments LaTeX takes without braces: "\sqrt2", "\frac12", "\frac\pi2", "\frac{3}4"
_ONE_TOKEN = r"\s*(\d|[a-zA-Z]|\\[a-zA-Z]+)"
_BARE_SQRT = re.compile(r"\\sqrt" + _ONE_TOKEN)
_BARE_FRAC_TOP = re.compile(r"\\frac" + _ONE_TOKEN)
_BARE_FRAC_BOTTOM = re.compile(r"\\frac\{([^{}]*)\}" + _ONE_TOKEN)


def plain_latex(s: str) -> str:
    """s without the LaTeX that does not change its value: spacing and sizing ("\\,", "\\left"; "1\\,000" is
    "1 000"), style wrappers ("\\text{..}": their content stays, spaced), degree signs; "\\dfrac" and "\\tfrac"
    are "\\frac", and brace-less arguments get braces ("\\frac12" is "\\frac{1}{2}")."""
    if "\\" not in s and "~" not in s and "\u00b0" not in s:
        return s.strip()
    s = s.replace("\\,", " ").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _DEGREES.sub("", _LATEX_SPACING.sub(" ", s))
    for _ in range(3):  # "\textbf{\text{5}}": a few nested wrappers, never one pass per level of a runaway text
        s = _STYLE.sub(r" \1 ", s)
    s = _BARE_FRAC_BOTTOM.sub(r"\\frac{\1}{\2}", _BARE_FRAC_TOP.sub(r"\\frac{\1}", _BARE_SQRT.sub(r"\\sqrt{\1}", s)))
    return s.strip()


def to_number(s: str | None) -> float | None:
    """The number a whole answer string spells, else None.

    Strips spaces, "$" and "\\$", a "%" suffix, a trailing "." and \\boxed{}; removes thousands
    separators ("1,234", "1{,}234", "1 234", "1\\,234"); reads integers, decimals, exponents ("2.5e3",
    "2.5 \\times 10^{3}"), "a/b", \\frac{a}{b} (or \\frac12) and mixed numbers ("2 1/2",
    "3\\frac{1}{2}"); a comma is a decimal mark only where it cannot separate thousands ("3,5" is 3.5, "1.234,5"
    is 1234.5, "1,000" is 1000), dots separate thousands where they cannot be one decimal mark ("1.000.000"); the
    unicode minus "\u2212" is "-", a space after a sign is dropped ("- 3"). A value that is not finite ("1e999", a
    runaway string of digits) is no number.
    """
    if s is None:
        return None
    s = s.strip().replace("\u2212", "-")
    boxed = _last_boxed(s)
    if boxed is not None:
        s = boxed.strip()
    s = plain_latex(s.replace("\\$", "").replace("$", "").replace("\\!", ""))
    s = s.removesuffix("\\%").removesuffix("%").rstrip(".").strip()
    s = re.sub(r"^([-+])\s+", r"\1", s)
    if _GROUPED_WHOLE.fullmatch(s):
        s = re.sub(_SEPARATOR, "", s)
    elif _DOTTED_THOUSANDS.fullmatch(s):
        s = s.replace(".", "")
    elif comma := _DECIMAL_COMMA.fullmatch(s):
        s = re.sub(r"[. \u00a0\u2009\u202f]", "", comma[1] or comma[3]) + "." + (comma[2] or comma[4])
    value = None
    if _PLAIN.fullmatch(s):
        value = float(s)
    elif frac := re.fullmatch(r"([-+]?\d+)\s*/\s*(\d+)", s):
        value = ratio(1, frac[1], frac[2])
    elif frac := _FRAC.fullmatch(s):
        value = ratio(-1 if frac[1] == "-" else 1, frac[2] or frac[3], frac[4] or frac[5])
    elif sci := _TIMES_TEN.fullmatch(s):
        value = float(f"{sci[1]}e{sci[2]}")
    elif mixed := _MIXED.fullmatch(s):
        value = mixed_number(mixed[1], mixed[2], mixed[3] or mixed[5], mixed[4] or mixed[6])
    return value if value is not None and math.isfinite(value) else None


# math around a lone number changes its value: "\sqrt{4}", "x^2", "2\pi", "2x", "\log 8" are not 4, 2, 2, 2, 8, and
# "x > 5", "x \le 5" are no number at all (a degree sign, "18^\circ", is only a unit)
_MATH_AROUND = re.compile(
    r"\^(?!\s*\{?\s*\\circ)|\\(?:sqrt|pi|log|ln|exp|sin|cos|tan|cdot|times|div|pm|mp|infty)(?![a-zA-Z])"
    r"|\\(?:le|ge|leq|geq|lt|gt|ne|neq|leqslant|geqslant)(?![a-zA-Z])|[<>\u2264\u2265\u2260]"
    r"|\bsqrt\b|[\u221a\u03c0\u00d7\u00f7]|\d[abijnxyz](?![a-zA-Z])"
)
# a unit of area or volume: "5 cm^2", "5\text{ m}^{3}", "5 ft²" hold one number, 5 (the power belongs to the unit)
_LENGTH_UNIT = r"[kcmd]?m|in|ft|yd|mi|inch(?:es)?|feet|foot|yards?|miles?|(?:centi|milli|kilo)?met(?:er|re)s?|units?"
_UNIT_POWER = re.compile(rf"(?<![a-zA-Z])((?:{_LENGTH_UNIT})\}}?)\s*(?:\^\s*\{{?\s*[23]\s*\}}?|[\u00b2\u00b3])")
# words after a whole number that name its unit ("cups", "square feet"); not "pi", "x" or "i"
_UNIT_WORDS = re.compile(r"(?:\s+(?!pi\b|sqrt\b)[a-zA-Z]{2,}\.?)+\s*$")
# an HTML tag around an answer ("<b>18</b>"): markup, not the "<" or ">" of a bound
_MARKUP_TAG = re.compile(r"</?[a-zA-Z][^<>]*>")
# the "=" of an equation ("9 \times 2 = 18"), not of "<=", ">=", "!=" or "=>"
_EQUALS = re.compile(r"(?<![<>!])=(?![>=])")
# a left-hand side that lists several things ("x = 1, y = 2"): what follows its last "=" is not the answer
_LISTING = re.compile(r";|,\s|\band\b")
# a variable: a letter standing alone ("x", not the letters of "total" or "\\times"); "x" between digits is a times
_VARIABLE = re.compile(r"(?<![a-zA-Z\\])[a-zA-Z](?![a-zA-Z])")
_TIMES_X = re.compile(r"(?<=\d)\s*x\s*(?=\d)")


def answer_number(s: str | None) -> float | None:
    """to_number(s), or the single number in s ("18 dollars", "5 cm^2" -> 18, 5), or what an equation equals
    ("9 \\times 2 = 18", "x = 18" -> 18); None if there are 0 or 2+ numbers, or if math around the number would
    change its value ("\\sqrt{4}", "x^2") or make it a bound ("x > 5")."""
    value = to_number(s)
    if value is not None or s is None:
        return value
    s = _UNIT_POWER.sub(r"\1", _MARKUP_TAG.sub(" ", plain_latex(s)))
    if len(s) <= 200 and (unit := _UNIT_WORDS.search(s)) and (value := to_number(s[: unit.start()])) is not None:
        return value  # "\frac{1}{2} cup", "2 1/2 hours"
    equals = list(_EQUALS.finditer(s))
    if equals and _names_a_value(s[: equals[-1].start()]):
        value = answer_number(s[equals[-1].end() :])
        if value is not None:
            return value
    found = NUMBER.findall(s)
    return to_number(found[0]) if len(found) == 1 and not _MATH_AROUND.search(s) else None


def _names_a_value(lhs: str) -> bool:
    """Whether the left-hand side of "lhs = rhs" makes rhs the answer: a name ("x", "Total cost") or a working
    of numbers ("9 \\times 2", "16 - 3 - 4"); not algebra ("2x", "x^2", "x + 3": an equation to solve) nor
    a list ("x = 1, y")."""
    if _LISTING.search(lhs):
        return False
    lhs = _TIMES_X.sub("*", lhs).strip(" $")
    return not _VARIABLE.search(lhs) or bool(_VARIABLE.fullmatch(lhs))


# "The answer is 18", "Final answer: 18", "**Answer:** $18": the phrase a model states its answer with
_ANSWER_PHRASE = re.compile(r"\banswer\s*(?:is|was|:|=)", re.IGNORECASE)
# a multiple-choice letter as the stated answer: "(B)", "(B) 12", "B"
_STATED_CHOICE = re.compile(r"\(([A-E])\)(?:\s.*)?|[A-E]")
# the end of the stated answer: a line break, or a sentence mark followed by a space or the end
_STATEMENT_END = re.compile(r"\n|[.,;!?](?=\s|$)")


# a stated number, its units, then an aside: "18 (9 eggs x $2)", "42 apples in 3 baskets", "42 because 6 * 7 = 42"
_NOT_UNIT = r"(?!(?:times|plus|minus|divided|multiplied|over|of|and|or|by|out|to)\b)"
_LEADING_ANSWER = re.compile(
    rf"(\S*?\d\S*?(?:\s+{_NOT_UNIT}[a-zA-Z]{{2,}})*?)"
    r"(?:\s*\(|\s+(?:in|for|after|from|because|since|as|which|that|at|on|with|when|if)\b)"
)


def _stated_answer(text: str) -> str | None:
    """What follows the last "answer is" / "answer:" up to the end of its sentence, when that reads as one
    number ("18 apples", "$1,234.50", "\\frac{1}{2}"), or when it opens with one number and its units before an
    aside ("18 (9 eggs x $2)", "42 apples in 3 baskets": the first number); None when there is no such phrase,
    it holds no single number, holds an equation ("the answer: first 3 + 4 = 7" is a working, not an answer;
    "3 times 4, which" is no stated number) or is negated ("the answer is not 18")."""
    ends = [phrase.end() for phrase in _ANSWER_PHRASE.finditer(text)]
    if not ends:
        return None
    rest = text[ends[-1] :]
    end = _STATEMENT_END.search(rest)
    stated = rest[: end.start() if end else len(rest)].strip(" \t*:")
    if re.match(r"not\b", stated, re.IGNORECASE):  # "the answer is not 18" names a wrong answer
        return None
    if _STATED_CHOICE.fullmatch(plain_latex(stated)):  # "The answer is (B).", "the answer is \\textbf{(C)}"
        return stated
    if "=" not in stated and answer_number(stated) is not None:
        return stated
    lead = _LEADING_ANSWER.match(stated)
    return lead[1] if lead and answer_number(lead[1]) is not None else None


# the text after "####" that starts with a word: a markdown heading, not the GSM8K answer marker
_HEADING = re.compile(r"[A-Za-z]{2,}")


def extract_answer(text: str, *, last_number: bool = True) -> str | None:
    """The answer a completion gives, as a raw string, by the first rule that applies:

    1. the content of the last <answer>...</answer> (an unclosed <answer>: everything after it, but for a closing tag
       cut off at the end, "72\n</ans");
    2. the content of the last \\boxed{...};
    3. the rest of the line after the last "####", unless it reads as a markdown heading ("#### Step 3",
       "#### Final answer: 18") and rule 4 applies;
    4. if last_number: the whole text when it is one number ("1 000", "3 1/2"), else what follows the last
       "answer is" / "answer:" when it is one number, else the last number in the text: in "5 apples and 3 pears,
       8 in all" that is 8; a fraction, mixed number or scientific notation it ends counts whole ("3/4",
       "\\frac{3}{4}", "2 1/2", "2 \\times 10^3"), not a date ("12/25/2024" gives 2024); a number inside a word
       counts ("12kg" is 12).

    Past a closed reasoning block only the text after its "</think>" is read (drafts are no answer), when there is
    any. None for no text (a None completion).
    """
    if text is None:
        return None
    if "</think>" in text and text.rsplit("</think>", 1)[1].strip():
        text = text.rsplit("</think>", 1)[1]
    tags = ANSWER_TAG.findall(text)
    if tags:
        return tags[-1].strip()
    if "<answer>" in text:
        return _without_cut_closing_tag(text.rsplit("<answer>", 1)[1]).strip()
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    if "####" in text:
        marked = text.rsplit("####", 1)[1].strip().split("\n", 1)[0].strip()
        if not (last_number and _HEADING.match(marked)):
            return marked
    if last_number and len(text) <= 200 and to_number(text) is not None:  # "1 000", "3 1/2": one number, whole
        return text.strip()
    if last_number:
        stated = _stated_answer(text)
        if stated is not None:
            return stated
        return _last_number(text)
    return None


def _without_cut_closing_tag(rest: str) -> str:
    """rest without the start of a "</answer>" that generation cut off at its end ("72\n</ans" is "72\n")."""
    for k in range(len("</answer>") - 1, 0, -1):
        if rest.endswith("</answer>"[:k]):
            return rest[:-k]
    return rest


# what comes before an exponent of ten: "10^", "10^{", "10**"
_TEN_TO_THE = re.compile(r"10\s*(?:\^|\*\*)\s*\{?\s*$")
# what comes before the denominator of a fraction: "3/", "-3 / ", "\frac{3}{" (not a date's "12/25/")
_FRACTION_TOP = re.compile(
    r"(?<![\d/.,])[-\u2212]?\d+\s*/\s*$|[-\u2212]?\\[dt]?frac\s*\{\s*[-\u2212]?\d+\s*\}\s*\{\s*$"
)
# the whole part of a mixed number, before its fraction: "2 " of "2 1/2", "2" of "2\frac{1}{2}"
_MIXED_WHOLE = re.compile(r"(?<![\d/.,])[-\u2212]?\d+[ \t]*$")


def _last_number(text: str) -> str | None:
    """The last number of the text; when it is the denominator of a fraction ("3/4", "\\frac{3}{4}"), the whole
    fraction; when it is the exponent of scientific notation ("6.02 \\times 10^{23}"), the whole product."""
    numbers = list(NUMBER.finditer(text))
    if not numbers:
        return None
    last = numbers[-1]
    if fraction := _last_fraction(text, last):
        return fraction
    if _TEN_TO_THE.search(text, max(0, last.start() - 16), last.start()):
        window = _TIMES_TEN.finditer(text, max(0, last.start() - 200), last.end() + 2)
        product = next((m for m in window if m.end() >= last.end()), None)
        if product is not None:
            return product[0].strip()
    return last[0]


def _last_fraction(text: str, last: re.Match) -> str | None:
    """The fraction whose denominator is the match `last` ("3/4", "\\frac{3}{4}"), with the whole part of a mixed
    number before it ("2 1/2"); None if it is no denominator."""
    if not last[0].isdigit():
        return None
    top = _FRACTION_TOP.search(text, max(0, last.start() - 40), last.start())
    if top is None:
        return None
    close = re.match(r"\s*\}", text[last.end() :]) if "frac" in top[0] else None
    if ("frac" in top[0] and not close) or ("frac" not in top[0] and re.match(r"/|\.\d", text[last.end() :])):
        return None  # "\frac{3}{4" is cut off; "1/2/2024" is a date
    end = last.end() + (close.end() if close else 0)
    whole = _MIXED_WHOLE.search(text, max(0, top.start() - 24), top.start())
    mixed = whole is not None and to_number(text[whole.start() : end]) is not None
    return text[whole.start() if mixed else top.start() : end]


def reference_answer(answer: Any) -> str | None:
    """The reference answer as text: a full GSM8K solution cut to what follows its "####", a full MATH
    solution to the content of its last \\boxed{...}."""
    if answer is None or (isinstance(answer, float) and not math.isfinite(answer)):  # a missing cell read as NaN
        return None
    answer = str(answer)
    if "####" in answer:
        return answer.rsplit("####", 1)[1].strip()
    boxed = _last_boxed(answer) if "boxed" in answer else None
    return (answer if boxed is None else boxed).strip()


# a percent: "50%", "50\\%", "50 percent"
_PERCENT = re.compile(r"%|\bper\s?cent\b", re.IGNORECASE)


def answer_value(s: str | None) -> float | None:
    """answer_number(s), else the value of s as arithmetic on numbers ("2^{10}", "\\frac{1}{-2}", "0.1 + 0.2"): the
    value correctness compares, so that every reward reading a number reads the same one."""
    value = answer_number(s)
    return value if value is not None or s is None else evaluate(canonical(s))


def number_readings(pred: str | None, ref: str | None) -> list[tuple[float, float]]:
    """The (predicted, reference) value pairs the two answers may mean; empty unless both hold a number.

    A number is read past its units on both sides (answer_number: "$18", "18 dollars", "5 cm^2"), or as the value of
    its arithmetic (answer_value: "2^{10}"). A percent also reads as the fraction it is, as math graders do: a
    reference "50%" accepts 50 and 0.5, and a predicted "50%" equals a reference 0.5. A whole reference is not
    loosened that way: "100%" is not 1, and against a bare 50 the fraction 0.5 is wrong (a percent sign alone is a
    unit: "50%" is right).
    """
    p, r = answer_value(pred), answer_value(ref)
    if p is None or r is None:
        return []
    pred_percent, ref_percent = bool(_PERCENT.search(pred)), bool(_PERCENT.search(ref))
    pairs = [(p, r)]
    if ref_percent and not pred_percent:  # "0.5%" is a half percent, never the fraction 0.5
        pairs.append((p, r / 100))
    if pred_percent and not ref_percent and not r.is_integer():
        pairs.append((p / 100, r))
    return pairs


def _same_whole_beyond_float(pred: str, ref: str, p: float, r: float) -> bool | None:
    """Whether two whole numbers too large for a float to tell apart are equal, digit for digit; None when they are
    not such numbers or one is not read exactly (the float comparison stands)."""
    if not (p.is_integer() and r.is_integer() and max(abs(p), abs(r)) >= FLOAT_EXACT):
        return None
    exact_p, exact_r = _exact_whole(pred, p), _exact_whole(ref, r)
    return None if exact_p is None or exact_r is None else exact_p == exact_r


def _exact_whole(s: str, value: float) -> int | None:
    """The whole number s spells, exactly (its arithmetic: "2^{64}"; the whole answer: "12 345 678"; its one number:
    "12345678 apples"); None when there is none or it is not `value`, the float s reads as."""
    exact = exact_value(canonical(s))
    if exact is None:
        numbers = NUMBER.findall(plain_latex(s.replace("\u2212", "-"))) if to_number(s) is None else [canonical(s)]
        exact = exact_whole(numbers[0]) if len(numbers) == 1 else None
    if exact is None or isinstance(exact, float) or exact.denominator != 1 or abs(exact) >= 2**1024:
        return None
    return int(exact) if float(exact) == value else None


def answers_match(pred: str | None, ref: str | None) -> bool:
    """Numerically equal (any of number_readings: units read past, a percent also as its fraction), else the same
    math (same_math: LaTeX forms, choice letters, tuples, intervals and sets, values of \\sqrt and \\pi). Two whole
    numbers must be equal ("18" == "18.0" == "$18" == "18." == "018", but 1219253924 != 1219253925; past 2**53,
    where floats round, digit for digit: 10000000000000001 != 10000000000000000); other values within rel 1e-9
    (float rounding). A full GSM8K solution as the reference is cut at its "####"."""
    ref = reference_answer(ref)
    if pred is None or not ref:
        return False
    pairs = number_readings(pred, ref)
    if not pairs:
        return same_math(pred, ref)
    exact = _same_whole_beyond_float(pred, ref, *pairs[0])
    return exact if exact is not None else any(same_number(p, r) for p, r in pairs)


# "x = ", "x \\in ", "y=" before the answer: a name, not part of it
_NAMED = re.compile(r"[a-z](?:=|\\in(?![a-z]))")
# a multiple-choice letter: "(B)", "(B) 12", "B", "B.", "B)" (in canonical form: lower case, no spaces)
_CHOICE = re.compile(r"\(([a-e])\).*|([a-e])[.)]?")


def canonical(s: str) -> str:
    """The text of an answer with what does not change it taken out: "$", LaTeX spacing and style (plain_latex),
    a leading "x = " or "x \\in ", spaces (but one between two digits: "2 1/2" is not "21/2"), case and a final
    "."; "\\dfrac12" and "\\frac{1}{2}" are the same text, and the unicode minus "\u2212" is "-"."""
    s = plain_latex(s.replace("\\$", "").replace("$", "")).lower().replace("\u221e", "\\infty").replace("\u2212", "-")
    s = re.sub(r"(?<=\d)\s+(?=\d)", " ", s)
    s = re.sub(r"(?<!\d)\s+|\s+(?!\d)", "", s).rstrip(".")
    named = _NAMED.match(s)
    return s[named.end() :] if named and s.count("=") <= 1 else s


def same_math(pred: str, ref: str) -> bool:
    """Whether two answers that are not plain numbers say the same: equal canonical text ("\\dfrac{\\pi}2" is
    "\\frac{\\pi}{2}"), the same choice letter ("\\textbf{(B)} 12" answers "B"), the same items (tuples and
    intervals in order with the same brackets, sets and bare lists in any order, each item compared as an
    answer), or the same value of arithmetic on numbers, \\sqrt and \\pi ("2\\sqrt{3}" is "\\sqrt{12}")."""
    p, r = canonical(pred), canonical(ref)
    if p == r:
        return True
    if ref_choice := _CHOICE.fullmatch(r):
        pred_choice = _CHOICE.fullmatch(p)
        return bool(pred_choice) and (pred_choice[1] or pred_choice[2]) == (ref_choice[1] or ref_choice[2])
    p_items, r_items = _items(p), _items(r)
    if p_items is not None or r_items is not None:
        return p_items is not None and r_items is not None and _same_items(p_items, r_items)
    p_value, r_value = evaluate(p), evaluate(r)
    return p_value is not None and r_value is not None and same_number(p_value, r_value)


def _items(s: str) -> tuple[str, str, list[str]] | None:
    """(opening bracket, closing bracket, items) of a list spanning the whole canonical answer: a tuple "(1,2)", an
    interval "(0,1]" ("(", "]", ["0", "1"]), a set "\\{1,2\\}", a bare list "1,2,3" ("", "", [...]); None for one
    item, and for a long text (no list a grader compares item by item)."""
    if len(s) > 1000:
        return None
    opening = next((b for b in ("(", "[", "\\{") if s.startswith(b)), "")
    closing = next((b for b in (")", "]", "\\}") if s.endswith(b)), "") if opening else ""
    opening, closing = (opening, closing) if opening and closing else ("", "")
    inner = s[len(opening) : len(s) - len(closing)]
    items, depth, start = [], 0, 0
    for i, char in enumerate(inner):
        depth += (char in "([{") - (char in ")]}")
        if depth < 0:  # "(1,2)\\cup(3,4)": the first bracket closes before the end
            return None
        if char == "," and depth == 0:
            items.append(inner[start:i])
            start = i + 1
    items.append(inner[start:])
    if len(items) < 2 and opening != "\\{":
        return None
    return opening, closing, items


def _same_items(p: tuple[str, str, list[str]], r: tuple[str, str, list[str]]) -> bool:
    """Same brackets and items; a set ("\\{..\\}") or a bare list matches in any order, each item once."""
    (p_open, p_close, p_items), (r_open, r_close, r_items) = p, r
    if len(p_items) != len(r_items):
        return False
    if p_open in ("", "\\{") and r_open in ("", "\\{"):
        left = list(r_items)
        for item in p_items:
            match = next((i for i, other in enumerate(left) if answers_match(item, other)), None)
            if match is None:
                return False
            left.pop(match)
        return True
    return (p_open, p_close) == (r_open, r_close) and all(answers_match(a, b) for a, b in zip(p_items, r_items))
