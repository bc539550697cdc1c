"""Every string dump_yaml writes reads back exactly, by the project's reader (parse_yaml) and by
yaml.safe_load: line breaks YAML normalises (NEL, LS, PS, CR), blanks at either end, a BOM, and the
words and numbers YAML 1.1 or 1.2 would read as something else (yes, on, null, ~, 1e3, 0x10, 010)."""

from __future__ import annotations

import random

import pytest
import yaml

from minigrpo.yaml_io import dump_yaml, parse_yaml

# characters a YAML writer or reader treats specially: breaks, blanks, indicators, escapes, BOM, controls
ODD_CHARS = [
    *("\n", "\r", "\x85", "\u2028", "\u2029", "\t", " ", "\ufeff", "\x00", "\x07", "\x1b", "\x7f", "\x9f"),
    *("\xa0", "\u3000", "\ufffe", "\ud800", "\U0001f600", "é", "…", "#", ":", "-", "?", "*", "&", "!", "%"),
    *("@", "`", "'", '"', "\\", "|", ">", "{", "}", "[", "]", ",", "a", "b", "1", "0", "e", "x", "."),
]
# texts YAML 1.1 (yaml.safe_load) or 1.2 (parse_yaml) read as no string when written plain
NON_STRING_WORDS = [
    *("yes", "no", "on", "off", "y", "n", "Yes", "NO", "true", "False", "null", "Null", "NULL", "~", ""),
    *("1e3", "1e-5", "1.5e3", "0x10", "0o17", "0b101", "010", "1_000", "1:30", "2024-01-01", "=", "<<"),
    *(".inf", "-.inf", ".nan", "+1", "-0", "1.", ".5"),
]


def random_strings(count: int, seed: int = 0) -> list[str]:
    """Strings of ODD_CHARS (1 to 200 of them: short ones are double-quoted, long ones with newlines
    become literal blocks), and NON_STRING_WORDS with a blank, tab or newline at either end."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        if rng.random() < 0.3:
            ends = ["", "", " ", "\t", "\n", "\x85", "\ufeff"]
            out.append(rng.choice(ends) + rng.choice(NON_STRING_WORDS) + rng.choice(ends))
        else:
            out.append("".join(rng.choices(ODD_CHARS, k=rng.choice([1, 2, 3, 8, 40, 90, 200]))))
    return out


def layouts(text: str) -> list[dict]:
    """`text` as a value, a list item, a mapping key and a nested value (the places a config holds text)."""
    return [{"k": text}, {"k": [text, 1]}, {text: 1}, {"k": {"j": text}}]


def assert_round_trip(data: dict) -> None:
    written = dump_yaml(data)
    back = parse_yaml(written)
    assert back == data, f"{data!r} was written as {written!r} and read back as {back!r}"
    values = [*back.keys(), *(v for v in back.values() if isinstance(v, str))]
    assert all(type(v) is str for v in values if isinstance(v, str)), f"{written!r}: a string read back as {values!r}"
    assert yaml.safe_load(written) == data, f"{data!r} was written as {written!r}, which yaml.safe_load reads otherwise"


@pytest.mark.parametrize(
    "text",
    ["\x85", "a\x85b", "\x85\n", "line one\x85line two", "\x85" * 90 + "\n", "a\n\x85", "x" * 100 + "\n\x85 "],
)
def test_next_line_characters_survive(text):
    """Before: NEL (U+0085) was written as it is (plain, quoted or in a literal block) and read back as a
    line break: `'a\\x85b'` came back as 'a b' and a literal block's NELs as newlines."""
    for data in layouts(text):
        assert_round_trip(data)


@pytest.mark.parametrize(
    "text",
    ["\u2028", "a\u2029b", "\r", "a\r\nb", "\t", "a\t", "\ta", " a", "a ", " ", "\ufeff", "\ufeffa", "a\n", "\na"],
)
def test_other_breaks_and_blanks_survive(text):
    for data in layouts(text):
        assert_round_trip(data)


@pytest.mark.parametrize("word", NON_STRING_WORDS)
def test_words_yaml_reads_as_other_types_stay_strings(word):
    for data in layouts(word):
        assert_round_trip(data)


def test_random_strings_of_odd_characters_round_trip():
    for text in random_strings(600):
        for data in layouts(text):
            assert_round_trip(data)


def test_every_latin1_character_and_the_unicode_breaks_and_blanks_round_trip():
    """Each code point below U+0100 (controls, NEL, NBSP), Unicode's breaks, spaces, BOM and surrogates,
    and one in 997 above U+0100, alone and inside a word, in one document."""
    special = [*range(0x2000, 0x2030), 0x1680, 0x3000, 0xD800, 0xDFFF, 0xE000, 0xFEFF, 0xFFFE, 0xFFFF, 0x10FFFF]
    points = [*range(0x100), *special, *range(0x100, 0x110000, 997)]
    data = {f"k{p}": chr(p) for p in points}
    data |= {f"w{p}": f"a{chr(p)}b" for p in points}
    back = parse_yaml(dump_yaml(data))
    wrong = [f"U+{ord(data[k][-2 if k[0] == 'w' else 0]):04X}" for k in data if back.get(k) != data[k]]
    assert not wrong, f"read back otherwise: {', '.join(wrong[:20])}"
