"""The synthetic arithmetic task ("What is 7 + 5?"): questions drawn from a seed, no files at all.

    train = synthetic_arithmetic(seed, 2000, cfg, "train", part="train")  # never a held-out expression
    test = synthetic_arithmetic(seed, 200, cfg, "test", part="eval")      # only held-out expressions

The expression space is small (single-digit + and -: 155 non-negative expressions), so two random
streams of it share nearly every prompt. An eval split is made held out instead: a fixed fifth of the
space, chosen by a hash of (seed, expression), is kept for eval splits and never drawn for training.
The choice depends on nothing else (not on the split names, num_train or num_eval), so a given
seed always splits the space the same way. A run without an eval split trains on the whole space
(part="all").
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

from minigrpo.config import SyntheticCfg
from minigrpo.datafiles import DataError

if TYPE_CHECKING:
    from minigrpo.data import Example

Part = Literal["all", "train", "eval"]
PARTS = ("all", "train", "eval")
HELD_OUT_SHARE = 0.2  # share of the expression space kept for eval splits
COUNTED_SPACE = 20_000  # spaces with at most this many expressions are counted before drawing
MAX_TRIES = 10_000  # draws for one example before the space is declared empty of what is asked


def evaluate(operands: list[int], ops: list[str]) -> int:
    """Value of `a0 op0 a1 op1 a2 ...` with the usual precedence (* before + and -)."""
    terms, signs = [operands[0]], [1]
    for op, x in zip(ops, operands[1:]):
        if op == "*":
            terms[-1] *= x
        else:
            terms.append(x)
            signs.append(1 if op == "+" else -1)
    return sum(s * t for s, t in zip(signs, terms))


def spell(operands: list[int], ops: list[str]) -> str:
    """The expression as the question shows it: "7 + 5"."""
    return " ".join([str(operands[0])] + [f"{op} {x}" for op, x in zip(ops, operands[1:])])


def is_held_out(seed: int, expression: str) -> bool:
    """Whether `expression` belongs to the eval part of the task `seed` (about HELD_OUT_SHARE of all
    expressions). A hash, so the answer is the same on every machine and Python version."""
    digest = hashlib.sha256(f"arithmetic/held-out/{seed}/{expression}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < HELD_OUT_SHARE * 2**64


def in_part(seed: int, expression: str, part: Part) -> bool:
    """Whether the expression may be drawn for `part`: "all" takes any, "eval" the held-out ones,
    "train" the rest."""
    return part == "all" or is_held_out(seed, expression) == (part == "eval")


def space_size(cfg: SyntheticCfg) -> int:
    """How many (operands, operators) tuples the task draws from, negative values included."""
    return (cfg.max_operand - cfg.min_operand + 1) ** cfg.num_operands * len(set(cfg.operations)) ** (
        cfg.num_operands - 1
    )


def all_expressions(cfg: SyntheticCfg) -> Iterator[tuple[str, int]]:
    """Every (expression, value) of the space that the task may draw (negative values only with
    cfg.allow_negative), in a fixed order."""
    numbers = range(cfg.min_operand, cfg.max_operand + 1)
    operators = sorted(set(cfg.operations))
    for operands in itertools.product(numbers, repeat=cfg.num_operands):
        for ops in itertools.product(operators, repeat=cfg.num_operands - 1):
            value = evaluate(list(operands), list(ops))
            if cfg.allow_negative or value >= 0:
                yield spell(list(operands), list(ops)), value


def _check_part_is_drawable(seed: int, cfg: SyntheticCfg, part: Part, split: str) -> None:
    """A small space is counted first: a part with no expression is a clear error, not a search."""
    if space_size(cfg) > COUNTED_SPACE:
        return
    expressions = [e for e, _ in all_expressions(cfg)]
    if not expressions:
        raise DataError("data.synthetic draws only negative values; set allow_negative=true or widen the range")
    if any(in_part(seed, e, part) for e in expressions):
        return
    if part == "eval":
        raise DataError(
            f"data.synthetic has {len(expressions)} expressions and none is held out for the eval split {split!r}: "
            "widen the operand range or add operations, or set data.eval_split=null"
        )
    raise DataError(
        f"data.synthetic has {len(expressions)} expressions and all are held out for the eval split: widen the "
        "operand range or add operations, or set data.eval_split=null to train on all of them"
    )


def _draw(rng: random.Random, seed: int, cfg: SyntheticCfg, part: Part) -> tuple[str, int]:
    """One (expression, value): operands and operators drawn uniformly, redrawn while the value is
    negative (unless allowed) or the expression belongs to the other part."""
    for _attempt in range(MAX_TRIES):
        operands = [rng.randint(cfg.min_operand, cfg.max_operand) for _ in range(cfg.num_operands)]
        ops = [rng.choice(cfg.operations) for _ in range(cfg.num_operands - 1)]
        value = evaluate(operands, ops)
        expression = spell(operands, ops)
        if (cfg.allow_negative or value >= 0) and in_part(seed, expression, part):
            return expression, value
    if part == "all":
        raise DataError("data.synthetic draws only negative values; set allow_negative=true or widen the range")
    raise DataError(
        f"data.synthetic drew no non-negative {part} expression in {MAX_TRIES} tries; set allow_negative=true "
        "or widen the range, or set data.eval_split=null"
    )


def synthetic_arithmetic(
    seed: int, n: int, cfg: SyntheticCfg | None = None, split: str = "train", *, part: Part | None = None
) -> list[Example]:
    """`n` arithmetic questions ("What is 7 + 5?") drawn from `seed`; no files involved.

    Deterministic per (seed, split, part): the split name selects an independent stream, so the
    eval set is not the start of the training set, and `part` says which expressions may be drawn
    (module docstring): part="eval" and part="train" share no prompt. By default a split named
    "train" draws part="train" and any other part="eval" (build_dataset passes the part its config
    implies). Answers are exact integers; an expression whose value would be negative is redrawn
    unless cfg.allow_negative. columns["expression"] holds "7 + 5".
    """
    from minigrpo.data import Example  # data re-exports this function: imported here, not at load

    part = part or ("train" if split == "train" else "eval")
    if part not in PARTS:
        raise ValueError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    cfg = cfg or SyntheticCfg()
    if n > 0:
        _check_part_is_drawable(seed, cfg, part, split)
    rng = random.Random(f"arithmetic/{split}/{seed}")  # a str seed is hashed with sha512: stable everywhere
    examples = []
    for _ in range(n):
        expression, value = _draw(rng, seed, cfg, part)
        question = cfg.question.format(expression=expression)
        if cfg.instruction:
            question = f"{question} {cfg.instruction}"
        examples.append(Example(prompt=question, answer=str(value), columns={"expression": expression}))
    return examples
