"""The SFT warm-up conversations of a tool-use run on the synthetic task, as JSONL (one {"messages": [...]} a line).

    python benchmarks/tool_sft_data.py --config configs/smollm2_arith_tools.yaml --out runs/smollm2_tools_sft.jsonl
                                       [--num 2000] [--tool-frac 0.25] [--set key=value ...]

Why: SmolLM2-135M-Instruct never writes a well-formed Hermes tool call by itself, so in GRPO its
calculator is never called and no reward shows that calling pays. A short supervised pass
(configs/smollm2_sft_tools.yaml) on these conversations teaches the call format and how to answer
from a result. A fraction `--tool-frac` of them use the tool, the rest answer directly:

    tool:    system, user question, assistant <tool_call>{"name": "calculator", ...}</tool_call>,
             user <tool_response>R</tool_response>, assistant <answer>R</answer>
    direct:  system, user question, assistant <answer>R</answer>

R is the true value (the direct answers teach the format, not the product, which a 135M model cannot
compute), so GRPO starts from a policy that calls the tool only sometimes and must learn that it pays.

Everything comes from the GRPO config, so the warm-up sees what the episodes will show: the questions
from its data.synthetic on a stream of its own (split "sft", never the training questions), the
system prompt env.system_prompt, the results computed by the calculator and laid out by the code the
episodes use (minigrpo.tools.tool_messages / assistant_message with plain=True: the layout for a
chat template without tool support, as SmolLM2's; minigrpo/tools/render.py).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from minigrpo.config import Config, load_config
from minigrpo.data import synthetic_arithmetic
from minigrpo.errors import ArgumentParser, UserError, run_cli
from minigrpo.tools import Tool, ToolCall, assistant_message, calculator, call_tool, tool_messages

SFT_SPLIT = "sft"  # the question stream of the warm-up: not GRPO's (split "train") nor the eval's


def tool_call_text(expression: str) -> str:
    """A Hermes call of the calculator, written as the system prompt shows it."""
    body = json.dumps({"name": "calculator", "arguments": {"expression": expression}})
    return f"<tool_call>\n{body}\n</tool_call>"


def conversations(cfg: Config, num: int, tool_frac: float, seed: int) -> list[list[dict[str, Any]]]:
    """`num` conversations on cfg's synthetic task; a `tool_frac` share of them call the calculator."""
    if cfg.data.source != "synthetic":
        raise UserError(
            f"data.source={cfg.data.source!r}: the warm-up conversations are written for data.source=synthetic"
        )
    if cfg.env.kind != "tools" or "calculator" not in cfg.env.tools:
        raise UserError(
            f"env.kind={cfg.env.kind!r}, env.tools={cfg.env.tools}: the warm-up needs env.kind=tools with calculator"
        )
    system = cfg.env.system_prompt if cfg.env.system_prompt is not None else cfg.data.system_prompt
    opening = [{"role": "system", "content": system}] if system else []
    tool = Tool.from_function(calculator)
    rng = random.Random(seed)
    out = []
    for ex in synthetic_arithmetic(cfg.data.synthetic.seed, num, cfg.data.synthetic, split=SFT_SPLIT):
        answer = f"<answer>{ex.answer}</answer>"
        messages = [*opening, {"role": "user", "content": ex.prompt}]
        if rng.random() < tool_frac:
            text = tool_call_text(ex.columns["expression"])
            call = ToolCall("calculator", {"expression": ex.columns["expression"]}, text)
            result = call_tool(tool, call)
            if not result.ok or result.content != ex.answer:
                raise AssertionError(
                    f"the calculator says {result.content!r} for {ex.columns['expression']}, not {ex.answer}"
                )
            messages += [assistant_message(text, [call], plain=True), *tool_messages([result], plain=True)]
        out.append([*messages, {"role": "assistant", "content": answer}])
    return out


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="the GRPO config (task, env.system_prompt)")
    ap.add_argument("--out", required=True, type=Path, help="the JSONL file to write (sft.path of the SFT config)")
    ap.add_argument("--num", type=int, default=2000, help="conversations to write (default 2000)")
    ap.add_argument("--tool-frac", type=float, default=0.25, help="share of conversations that call the tool")
    ap.add_argument("--seed", type=int, default=0, help="which conversations call the tool")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    args = ap.parse_args()
    if args.num < 1 or not 0.0 <= args.tool_frac <= 1.0:
        raise UserError(f"--num must be >= 1 and --tool-frac in [0, 1], got {args.num} and {args.tool_frac}")
    if args.out.is_dir():
        raise UserError(f"--out {args.out} is a folder; name the JSONL file, e.g. {args.out / 'tool_sft.jsonl'}")
    blocking = next((p for p in args.out.parents if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise UserError(f"--out {args.out}: {blocking} is a file, not a folder")
    rows = conversations(load_config(args.config, args.set), args.num, args.tool_frac, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for messages in rows:
            f.write(json.dumps({"messages": messages}) + "\n")
    tools = sum(any(m["role"] == "assistant" and "<tool_call>" in m["content"] for m in ms) for ms in rows)
    print(f"wrote {len(rows)} conversations ({tools} with a tool call) to {args.out}")


if __name__ == "__main__":
    run_cli(lambda _: main())  # a bad argument or config is one `error:` line
