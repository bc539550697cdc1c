"""README.md and the module docstrings as promises: the commands they show parse, the config keys and
flags they name exist, the defaults they state are the schema's, every module is in the layout, and the
calls of the `minigrpo/*.py` docstring examples match the signatures of the functions they name.

Everything here reads files and builds configs; no weights load but the README's library example, run
on a tiny checkpoint. No network, no GPU."""

from __future__ import annotations

import ast
import builtins
import contextlib
import dataclasses
import importlib
import inspect
import io
import re
import shlex
import warnings
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.tiny import tiny_run_checkpoint

from minigrpo.config import Config, build_arg_parser, config_from_args, load_config, resolve_dtype

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BENCH_README = (ROOT / "benchmarks" / "README.md").read_text()
COMMANDS = ("train", "eval", "sft", "export")
SECTIONS = {f.name for f in dataclasses.fields(Config)}


# ---------------------------------------------------------------------------- reading the docs


def code_blocks(text: str) -> list[str]:
    """The fenced code blocks of a markdown text, continuation lines joined."""
    return [b.replace("\\\n", " ") for b in re.findall(r"```[a-z]*\n(.*?)```", text, re.S)]


def minigrpo_commands(text: str) -> list[list[str]]:
    """Every `python -m minigrpo.X ...` line of a markdown text's code blocks, or of a docstring's
    indented lines, as argv with X first."""
    found = []
    lines = "\n".join(code_blocks(text)).splitlines() if "```" in text else text.splitlines()
    for line in (ln for ln in lines if "```" in text or ln.startswith("    ")):
        match = re.search(r"(?:python|torchrun[^-]*(?:--\S+\s+\S+\s+)*)\s*-m minigrpo\.(\w+)(?=\s|$)(.*)", line)
        if match:
            args = shlex.split(match.group(2).split(" #")[0], comments=False)
            found.append([match.group(1), *args])
    return found


def module_docstring(path: Path) -> str:
    return ast.get_docstring(ast.parse(path.read_text()), clean=True) or ""


def top_modules() -> list[Path]:
    return sorted((ROOT / "minigrpo").glob("*.py"))


def default_of(key: str) -> Any:
    """The default value of a dotted config key (`grpo.epsilon`)."""
    value: Any = Config()
    for part in key.split("."):
        assert dataclasses.is_dataclass(value) and part in {f.name for f in dataclasses.fields(value)}, key
        value = getattr(value, part)
    return value


def is_config_key(key: str) -> bool:
    try:
        default_of(key)
    except AssertionError:
        return False
    return True


def parse_value(text: str) -> Any:
    """A default as the README writes it: 0.1, (0.9, 0.99), on / off, a bare word."""
    text = text.strip().strip("`")
    if text in ("on", "off"):
        return text == "on"
    if text.startswith("("):
        return tuple(parse_value(part) for part in text.strip("()").split(","))
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


DEFAULT_FORMS = (
    r"`(?P<key>[a-z_]+\.[a-z_.]+)` \(default (?P<value>[^)]+)\)",  # `dpo.beta` (default 0.1)
    r"`(?P<key>[a-z_]+\.[a-z_.]+)` defaults to (?P<value>\([^)]*\)|[\w.]+)",  # `train.betas` defaults to (a, b)
    r"`(?P<key>[a-z_]+\.[a-z_.]+)`(?:-th)?, (?P<value>[\w.]+) by default",  # `sampler.merge_lora`, on by default
)


def stated_defaults(text: str) -> list[tuple[str, Any]]:
    """(dotted key, value) for each default the text states in one of DEFAULT_FORMS."""
    return [(m["key"], parse_value(m["value"])) for form in DEFAULT_FORMS for m in re.finditer(form, text)]


# ---------------------------------------------------------------------------- defaults


def test_stated_defaults_are_parsed():
    """The parser sees the README's default claims (so the next test cannot pass on none)."""
    keys = {key for key, _ in stated_defaults(README)}
    assert {"dpo.beta", "train.betas", "sampler.merge_lora", "sampler.vllm_probe_every"} <= keys


@pytest.mark.parametrize("key,value", stated_defaults(README))
def test_readme_defaults_are_the_config_defaults(key, value):
    default = default_of(key)
    assert (tuple(default) if isinstance(default, (list, tuple)) else default) == value, key


def test_readme_precision_and_algorithm_defaults():
    """`run.dtype: bfloat16` (the default on CUDA), `grpo` (the default) algorithm, and is_correction
    filled in as `token_truncate` for vLLM when it is left null."""
    dtype = re.search(r"`run\.dtype: (\w+)` \(the default on CUDA\)", README)[1]
    assert resolve_dtype(Config().run.dtype, "cuda") == dtype
    assert resolve_dtype(Config().run.dtype, "cpu") == "float32"
    algorithm = re.search(r"`algorithm:` picks .*?`(\w+)` \(the default\)", README, re.S)[1]
    assert Config().algorithm == algorithm
    filled = re.search(r"`grpo\.is_correction`:\s+`(\w+)` when it is left null", README)[1]
    assert load_config(None, ["sampler.kind=vllm"]).grpo.is_correction == filled
    assert Config().grpo.is_correction is None


def test_readme_loss_scale_numbers():
    """float16's dynamic loss scale: 2^16 at first, doubled after 2000 finite updates; twenty skips stop."""
    from minigrpo.grad_scale import MAX_SKIPS_IN_A_ROW, GradScale

    match = re.search(r"2\^(\d+) at first, halved on an\s+overflow, doubled after (\d+) finite updates", README)
    scale = GradScale(enabled=True)
    assert scale.scale == 2.0 ** int(match[1]) and scale.growth_interval == int(match[2])
    assert "twenty in a row stop the run" in README and MAX_SKIPS_IN_A_ROW == 20


# ---------------------------------------------------------------------------- keys, flags, commands


@pytest.mark.parametrize("text", [README, BENCH_README], ids=["README", "benchmarks/README"])
def test_named_config_keys_exist(text):
    """Every `section.key` the docs name is a field of the config (a function like `lora.f(...)` is not a key)."""
    keys = set(re.findall(r"(?<![\w/.-])([a-z_]+(?:\.[a-z_0-9]+)+)(?![\w(])", text))
    named = {k for k in keys if k.split(".")[0] in SECTIONS and not re.search(r"\.(py|ya?ml|jsonl?|png|md)$", k)}
    assert named, "no config key found"
    assert sorted(k for k in named if not is_config_key(k)) == []


@cache
def command_flags(command: str) -> frozenset[str]:
    """The options of `python -m minigrpo.<command>`, read from its --help."""
    if command in ("train", "sft"):
        text = build_arg_parser().format_help()
    else:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            importlib.import_module(f"minigrpo.{command}").parse_args(["--help"])
        text = out.getvalue()
    return frozenset(re.findall(r"--[a-z][a-z0-9-]*", text))


def test_readme_flags_exist():
    """Every --flag the README names belongs to one of the commands (torchrun's and pip's aside)."""
    others = {"--nproc_per_node", "--no-deps", "--help"}
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", README)) - others
    known = set().union(*(command_flags(c) for c in COMMANDS))
    assert flags and sorted(flags - known) == []


def documented_commands() -> list[tuple[str, list[str]]]:
    sources = {"README": README, "benchmarks/README": BENCH_README}
    sources |= {f"minigrpo/{p.name}": module_docstring(p) for p in top_modules()}
    return [(where, argv) for where, text in sources.items() for argv in minigrpo_commands(text)]


def test_documented_commands_found():
    where = {w for w, _ in documented_commands()}
    assert {"README", "benchmarks/README", "minigrpo/eval.py", "minigrpo/export.py"} <= where
    assert {argv[0] for _, argv in documented_commands()} == set(COMMANDS)


@pytest.mark.parametrize("where,argv", documented_commands(), ids=lambda x: x if isinstance(x, str) else " ".join(x))
def test_documented_command_parses(where, argv):
    """The command's arguments parse, its --config file exists and its --set keys are config keys."""
    command, args = argv[0], argv[1:]
    if command in ("train", "sft"):
        if "X.yaml" in " ".join(args):
            return  # a placeholder config name
        config_from_args(args)
        return
    parsed = importlib.import_module(f"minigrpo.{command}").parse_args(args)
    config = getattr(parsed, "config", None)
    if config is not None:
        assert (ROOT / config).is_file(), f"{where}: {config}"
    load_config(config and ROOT / config, getattr(parsed, "overrides", []))


def test_export_types_listed():
    """`--gguf q8_0   # f16, bf16, ...`: the README lists every export type."""
    from minigrpo.export import QUANT_CHOICES

    line = next(line for line in README.splitlines() if "minigrpo.export" in line and "--gguf" in line)
    shown = {line.split("--gguf")[1].split()[0], *re.findall(r"\w+", line.split("#")[1])}
    assert shown == set(QUANT_CHOICES)


# ---------------------------------------------------------------------------- layout


def test_layout_lists_every_module():
    layout = README.split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"[\w]+\.py", layout))
    modules = [p for p in (ROOT / "minigrpo").rglob("*.py") if "kernels" not in p.parts and p.name != "__init__.py"]
    assert sorted(str(p.relative_to(ROOT)) for p in modules if p.name not in listed) == []
    folders = {p.name for p in (ROOT / "minigrpo").iterdir() if p.is_dir() and not p.name.startswith("__")}
    assert sorted(f for f in folders if f"{f}/" not in layout) == []


# ---------------------------------------------------------------------------- docstring examples


@cache
def defined_names() -> dict[str, str]:
    """Top-level function and class names of every minigrpo module -> the module defining it."""
    names: dict[str, str] = {}
    for path in sorted((ROOT / "minigrpo").rglob("*.py")):
        if "kernels" in path.parts:
            continue
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.setdefault(node.name, module)
    return names


PLACEHOLDERS = {"fn", "reward_fn", "model", "consider", "print"}  # an example's own values, not functions
CODE_LINE = re.compile(r"^(?:with\s+|[\w\s,\[\]]+=\s*)?[A-Za-z_][\w.]*\(")


def example_calls(path: Path) -> list[tuple[str, ast.Call]]:
    """The calls of a module docstring's example lines (indented, starting with a call or an assignment)."""
    calls = []
    for line in module_docstring(path).splitlines():
        code = line.split("  #")[0].strip()
        if not line.startswith("    ") or not CODE_LINE.match(code):
            continue
        for piece in code.rstrip(":").split(";"):
            try:
                with warnings.catch_warnings():  # a LaTeX answer in a string: "2\sqrt{3}"
                    warnings.simplefilter("ignore")
                    tree = ast.parse(piece.strip())
            except SyntaxError:
                continue
            calls += [(piece.strip(), n) for n in ast.walk(tree) if isinstance(n, ast.Call)]
    return calls


def resolve(module: Any, func: ast.expr) -> Any:
    """The function an example calls: a name of the module or of minigrpo, or a class's method; None
    for what the example itself defines (a variable, a method of an instance)."""
    if isinstance(func, ast.Attribute):
        owner = getattr(module, func.value.id, None) if isinstance(func.value, ast.Name) else None
        return getattr(owner, func.attr) if inspect.isclass(owner) else None
    if not isinstance(func, ast.Name) or func.id in PLACEHOLDERS or hasattr(builtins, func.id):
        return None
    if hasattr(module, func.id):
        return getattr(module, func.id)
    defining = defined_names().get(func.id)
    assert defining is not None, f"{module.__name__}: the docstring calls {func.id}, which minigrpo does not define"
    return getattr(importlib.import_module(defining), func.id)


def binds(function: Any, call: ast.Call) -> str | None:
    """None if the call's arguments fit the signature (a bare `...` stands for the rest), else why not."""
    if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
        return None
    positional = list(call.args)
    elided = any(isinstance(a, ast.Constant) and a.value is Ellipsis for a in positional)
    positional = [a for a in positional if not (isinstance(a, ast.Constant) and a.value is Ellipsis)]
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return None
    bind = signature.bind_partial if elided else signature.bind
    try:
        bind(*positional, **{k.arg: None for k in call.keywords})
    except TypeError as e:
        return f"{function.__name__}{signature}: {e}"
    return None


def all_modules() -> list[Path]:
    """Every module of the package, its subpackages included (the kernels are documented in kernels/)."""
    return sorted(p for p in (ROOT / "minigrpo").rglob("*.py") if "kernels" not in p.relative_to(ROOT).parts)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize("path", all_modules(), ids=lambda p: str(p.relative_to(ROOT / "minigrpo")))
def test_docstring_example_calls_fit_their_signatures(path):
    module = importlib.import_module(module_name(path))
    wrong = []
    for line, call in example_calls(path):
        function = resolve(module, call.func)
        if function is not None and callable(function) and (why := binds(function, call)):
            wrong.append(f"{line}  ->  {why}")
    assert wrong == []


def test_docstring_examples_are_checked():
    """The example parser finds the calls it should (so the test above cannot pass on none)."""
    found = {c.func.id for p in top_modules() for _, c in example_calls(p) if isinstance(c.func, ast.Name)}
    assert {"build_run", "load_policy", "load_config", "group_advantages", "policy_loss", "save_gguf"} <= found


# ---------------------------------------------------------------------------- the library example


def test_readme_library_example(tmp_path):
    """load_pretrained / model(input_ids) -> (B, T, V) / save_pretrained, as the README shows them, on a
    tiny checkpoint; what save_pretrained writes loads in transformers with the same logits (1e-5)."""
    block = next(b for b in code_blocks(README) if "from minigrpo import load_pretrained" in b)
    assert "logits = model(input_ids)  # (B, T, V)" in block
    from transformers import AutoModelForCausalLM

    from minigrpo import load_pretrained, save_pretrained

    model, tokenizer = load_pretrained(tiny_run_checkpoint(tmp_path / "in"), dtype=torch.float32, device="cpu")
    input_ids = torch.randint(0, model.args.vocab_size, (2, 5))
    logits = model(input_ids)  # (B, T, V)
    assert logits.shape == (2, 5, model.args.vocab_size)
    save_pretrained(model, tokenizer, tmp_path / "out")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids).logits, logits.detach(), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- documented results


def test_tool_stats_keys_in_the_docstring():
    """tools/run.py's example names metric keys ToolStats.metrics() really writes, for a call that timed out."""
    import time

    from minigrpo.tools import run
    from minigrpo.tools.call_json import ToolCall
    from minigrpo.tools.schema import Tool

    def slow(seconds: float) -> str:
        """Sleep, then answer."""
        time.sleep(seconds)
        return "done"

    tool = Tool.from_function(slow)
    result = run.call_tool(tool, ToolCall(name="slow", arguments={"seconds": 1.0}, raw=""), timeout_s=0.05)
    assert (result.ok, result.error_kind) == (False, "timeout")
    stats = run.ToolStats()
    stats.add([result])
    doc = module_docstring(ROOT / "minigrpo" / "tools" / "run.py")
    line = next(ln for ln in doc.splitlines() if "stats.metrics()" in ln)
    named = re.findall(r'"(tools/[\w/]+)"', line)
    assert named and set(named) <= set(stats.metrics()), (named, stats.metrics())
