"""The `env:` section of the config: multi-turn episodes in the rollout phase (minigrpo/episodes.py).

    env: {kind: gsm8k_tools, max_turns: 4}                      # the built-in GSM8K-with-Python environment
    env: {kind: tools, tools: [calculator, python, "my.mod:fn"]}  # a ToolEnvironment with these tools
    env: {kind: "my.pkg.envs:Maze", kwargs: {size: 5}}           # a user environment class

With `env.kind` set, every turn of every episode is sampled by the run's sampler (own or vLLM),
`run_episodes` plays the episodes and `episodes_to_rollout` builds the training rows (the loss on
the model's tokens only); the reward functions get the episode columns (minigrpo.episodes.
episode_columns) and see the model's LAST turn as the completion. Kept apart from config.py so the
schema file stays readable; `Config.env` is `EnvCfg`.

A user class (`package.module:Class`) is called with `env.kwargs`, plus, for each of these names its
constructor declares (or when it takes **kwargs), the run's value: `tools` (env.tools resolved, a
name -> Tool dict), `chat_template` (the tokenizer's), `format`, `system_prompt`, `timeout_s`
(env.tool_timeout_s), `max_chars` (env.sandbox.max_output_chars) and `chat_template_kwargs`: the arguments of
ToolEnvironment, so a subclass of it needs no constructor. The object must have `reset` and `step`.

Checks: `env_errors` (config only, at load time), `check_environment` (imports the user tools
and class, looks for its reset and step, binds the kwargs) and `check_chat_template` (the model
folder's tokenizer has a chat template that can play a small synthetic episode of this environment,
`check_episode_layout`), before any weights load. A model whose chat template shows no tool
definitions (SmolLM2's) learns of the tools from the system prompt alone: `build_environment` warns
when env.system_prompt does not name them (`warn_unseen_tools`). This module imports no torch;
building the environment (`build_environment`) imports minigrpo.episodes when it runs.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

from minigrpo.configio import MAX_COUNT, MAX_SECONDS, ConfigError, ConfigWarning, Section, spec

BUILTIN_TOOLS = ("calculator", "python")
ENV_KINDS = ("tools", "gsm8k_tools")  # besides "package.module:Class"
_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")

GSM8K_TOOLS_PROMPT = (
    "Solve the math problem. You may call tools to compute: write a call as\n"
    '<tool_call>\n{"name": "python", "arguments": {"code": "print(12 * 7)"}}\n</tool_call>\n'
    'or <tool_call>\n{"name": "calculator", "arguments": {"expression": "12 * 7"}}\n</tool_call>\n'
    "and stop; the result comes back in the next message. When you know the answer, reply without a "
    "tool call in the format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>"
)


@dataclass
class SandboxCfg(Section):
    """Limits of the built-in `python` tool's process (minigrpo/tools/sandbox.py)."""

    timeout_s: float = spec(5.0, "> 0", most=MAX_SECONDS)  # wall time per run; the process group is killed past it
    memory_mb: int = spec(512, ">= 16", most=MAX_COUNT)  # address-space limit
    # output kept per run (also the cut of every tool result)
    max_output_chars: int = spec(4000, ">= 1", most=MAX_COUNT)


@dataclass
class EnvCfg(Section):
    """Multi-turn episodes: an environment answers the model's turns (null kind: one-turn rollouts)."""

    # null: plain rollouts; "tools": a ToolEnvironment over env.tools; "gsm8k_tools": tools with the
    # python + calculator tools and a prompt saying how to call them; or "package.module:Class"
    kind: str | None = None
    # built-in tool names (calculator, python) or "package.module:function"; gsm8k_tools: empty = both
    tools: list[str] = field(default_factory=list)
    format: str | None = None  # tool-call format ("hermes", "llama3", "mistral"); null: read from the chat template
    system_prompt: str | None = None  # the episodes' system message (null: data.system_prompt; gsm8k_tools: its own)
    max_turns: int = spec(4, ">= 1", most=MAX_COUNT)  # model turns per episode at most
    # completion tokens (model + environment) per episode at most
    max_episode_tokens: int | None = spec(None, ">= 1", derived="sampler.max_new_tokens * env.max_turns")
    # one tool call's limit (a call past it is a failed result)
    tool_timeout_s: float = spec(10.0, "> 0", most=MAX_SECONDS)
    sandbox: SandboxCfg = field(default_factory=SandboxCfg)  # the python tool's limits
    kwargs: dict[str, Any] = field(default_factory=dict)  # keyword arguments of a user environment class
    # more chat template variables for every rendering of an episode, e.g. {enable_thinking: false} (Qwen3)
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)


def _did_you_mean(word: str, options: list[str] | tuple[str, ...]) -> str:
    near = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


def completion_budget(cfg: Any, *, evaluating: bool = False) -> tuple[int, str]:
    """(tokens after the prompt, the key that sets them): a multi-turn episode's token budget, the
    evaluation's or the training rollout's max_new_tokens."""
    if cfg.env.kind is not None:
        return cfg.env.max_episode_tokens, "env.max_episode_tokens"
    if evaluating:
        return cfg.eval.max_new_tokens, "eval.max_new_tokens"
    return cfg.sampler.max_new_tokens, "sampler.max_new_tokens"


def env_errors(cfg: Any) -> list[str]:
    """Checks of the env section that need no import (the config is loading)."""
    env, errors = cfg.env, []
    if env.kind is None:  # the settings of an environment that is off would be ignored: say so
        if env.tools:
            errors.append(f"env.tools={env.tools} is read only with env.kind set (tools, gsm8k_tools or a class)")
        if env.kwargs:
            errors.append(f"env.kwargs={env.kwargs} are read only by a user class (env.kind='package.module:Class')")
        if env.chat_template_kwargs:
            errors.append(f"env.chat_template_kwargs={env.chat_template_kwargs} are read only with env.kind set")
        for key in ("format", "system_prompt"):
            if getattr(env, key) is not None:
                errors.append(f"env.{key}={getattr(env, key)!r} is read only with env.kind set")
        return errors
    if env.kind not in ENV_KINDS and not _IMPORT_PATH.match(env.kind):
        errors.append(
            f"env.kind={env.kind!r} is neither {', '.join(ENV_KINDS)} nor 'package.module:Class'"
            + _did_you_mean(env.kind, ENV_KINDS)
        )
    for i, name in enumerate(env.tools):
        if name not in BUILTIN_TOOLS and not _IMPORT_PATH.match(name):
            errors.append(
                f"env.tools.{i}={name!r} is neither a built-in tool ({', '.join(BUILTIN_TOOLS)}) nor "
                "'package.module:function'" + _did_you_mean(name, BUILTIN_TOOLS)
            )
        elif name in env.tools[:i]:
            errors.append(f"env.tools.{i}={name!r} is listed twice")
    if env.kind == "tools" and not env.tools:
        errors.append("env.kind=tools needs env.tools (e.g. [calculator, python])")
    if env.kwargs and not _IMPORT_PATH.match(env.kind):
        errors.append(f"env.kwargs are read only by a user class (env.kind='package.module:Class'), not {env.kind!r}")
    if env.max_episode_tokens is not None and env.max_episode_tokens < cfg.sampler.max_new_tokens:
        errors.append(
            f"env.max_episode_tokens ({env.max_episode_tokens}) must be >= sampler.max_new_tokens "
            f"({cfg.sampler.max_new_tokens}): one turn must fit in an episode"
        )
    return errors + _episode_budget_errors(cfg) + _sandbox_timeout_errors(env)


def _sandbox_timeout_errors(env: EnvCfg) -> list[str]:
    """The python tool's own limit must come first: past env.tool_timeout_s its call is abandoned as a hung
    tool ("did not answer"), what the code printed is lost and its process runs on beside the next calls."""
    uses_python = "python" in env.tools or (env.kind == "gsm8k_tools" and not env.tools)
    if not uses_python or env.sandbox.timeout_s < env.tool_timeout_s:
        return []
    return [
        f"env.sandbox.timeout_s ({env.sandbox.timeout_s:g}) must be below env.tool_timeout_s "
        f"({env.tool_timeout_s:g}): the python tool's run is killed at the first, the call abandoned at the second"
    ]


def _episode_budget_errors(cfg: Any) -> list[str]:
    """env.max_episode_tokens past MAX_COUNT, which no row can hold. Checked here, with env.kind set, and
    not as the field's limit: the derived default (sampler.max_new_tokens * env.max_turns) of an
    environment that is off is never read, so it must not refuse a config."""
    budget, turn, turns = cfg.env.max_episode_tokens, cfg.sampler.max_new_tokens, cfg.env.max_turns
    if budget is None or budget <= MAX_COUNT:
        return []
    derived = f" = sampler.max_new_tokens * env.max_turns ({turn} * {turns})" if budget == turn * turns else ""
    return [
        f"env.max_episode_tokens must be <= {MAX_COUNT}, got {budget}{derived} (no run can use a larger count): "
        "set env.max_episode_tokens, or lower env.max_turns"
    ]


# ----------------------------------------------------------------------------- resolving (imports)


def _import(path: str, what: str) -> Any:
    """The object `package.module:name`, or ConfigError naming `what` (the config key)."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or the module failed while importing
        raise ConfigError(f"{what}={path!r}: cannot import {module_name!r} ({type(e).__name__}: {e})") from None
    if not hasattr(module, attr):
        names = [n for n in dir(module) if not n.startswith("_")]
        raise ConfigError(f"{what}={path!r}: {module_name!r} has no {attr!r}" + _did_you_mean(attr, names))
    return getattr(module, attr)


def resolve_tools(env: EnvCfg) -> dict[str, Any]:
    """env.tools as name -> Tool (gsm8k_tools with no tools listed: calculator and python)."""
    from minigrpo.tools import Tool, calculator, python_tool

    names = env.tools or (list(BUILTIN_TOOLS) if env.kind == "gsm8k_tools" else [])
    box = env.sandbox
    tools = {}
    for i, name in enumerate(names):
        if name == "python":
            tool = python_tool(timeout_s=box.timeout_s, memory_mb=box.memory_mb, max_output_chars=box.max_output_chars)
        elif name == "calculator":
            tool = Tool.from_function(calculator)
        else:
            fn = _import(name, f"env.tools.{i}")
            _check_tool_object(fn, f"env.tools.{i}={name!r}")
            try:
                tool = fn if isinstance(fn, Tool) else Tool.from_function(fn)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"env.tools.{i}={name!r} cannot be a tool: {e}") from None
        if tool.name in tools:
            raise ConfigError(f"env.tools.{i}={name!r}: a second tool named {tool.name!r}")
        tools[tool.name] = tool
    return tools


def _check_tool_object(fn: Any, where: str) -> None:
    """ConfigError for what cannot answer a call: no callable (its declaration would fail on the missing
    name instead), or a generator function (every call's result would be the text of a generator object)."""
    from minigrpo.tools import Tool

    if isinstance(fn, Tool):
        return
    if not callable(fn):
        raise ConfigError(f"{where} is not a function (its type is {type(fn).__name__})")
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        raise ConfigError(f"{where} is a generator function (it yields): a tool returns its result")


def _class_arguments(cls: Any, env: EnvCfg, offered: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments a user class gets (see the module docstring); ConfigError if they do not bind."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return dict(env.kwargs)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    clash = sorted(set(env.kwargs) & set(offered))
    if clash:
        raise ConfigError(f"env.kwargs {clash} have the names of arguments the run passes; set them in env instead")
    given = {k: v for k, v in offered.items() if takes_any or k in params}
    kwargs = {**given, **env.kwargs}
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as e:
        raise ConfigError(f"env.kind={env.kind!r} cannot be built with env.kwargs={env.kwargs}: {e}") from None
    return kwargs


def check_environment(cfg: Any) -> None:
    """The checks that import: tools, the user class and its kwargs, the call format (before any weights load)."""
    env = cfg.env
    if env.kind is None:
        return
    from minigrpo.tools import FORMATS

    tools = resolve_tools(env)
    if _IMPORT_PATH.match(env.kind):
        cls = _import(env.kind, "env.kind")
        if not callable(cls):
            raise ConfigError(f"env.kind={env.kind!r} is a {type(cls).__name__}, not a class")
        missing = [m for m in ("reset", "step") if not callable(getattr(cls, m, None))]
        if isinstance(cls, type) and missing and not hasattr(cls, "__getattr__"):  # else found once built
            methods = " and no ".join(f"{m}()" for m in missing)
            raise ConfigError(
                f"env.kind={env.kind!r}: the class {cls.__name__} has no {methods} "
                "(an environment has reset() and step())"
            )
        _class_arguments(cls, env, _offered(cfg, tools, None))
    if env.format is not None and env.format not in FORMATS:  # checked after user modules registered theirs
        raise ConfigError(
            f"env.format={env.format!r} is no tool-call format; known: {', '.join(sorted(FORMATS))}"
            + _did_you_mean(env.format, sorted(FORMATS))
        )


def check_chat_template(cfg: Any, tokenizer: Any) -> None:
    """With env.kind set, the model's tokenizer has a chat template (the episodes are conversations)
    and it can play one (`check_episode_layout`)."""
    if cfg.env.kind is None:
        return
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError(
            f"env.kind={cfg.env.kind!r} needs a chat template (the episodes are conversations); the model has none"
        )
    check_episode_layout(cfg, tokenizer)


_PROBE_CALL = "CALL"  # stands for a call's text in the probe turns (cut from the content, as a parsed call's)
# the model's probe turns: a plain one, and a reasoning model's (a template may treat them apart: Qwen3's
# drops a turn's reasoning once a user message follows it, and its empty <think> block once anything does)
_PROBE_TURNS = (_PROBE_CALL, f"<think>\nLet me compute.\n</think>\n\n{_PROBE_CALL}")


def check_episode_layout(cfg: Any, tokenizer: Any) -> None:
    """The chat template extends a small synthetic episode as run_episodes needs: a question, the
    model's turn (a tool call, for a tool environment) and the environment's answer as this run gives
    it. A template that renders earlier turns differently once the answer follows (LayoutError) or
    raises on it (e.g. a call without the id Mistral's needs) is a ConfigError here, before any weights
    load, not at the first answer of the run. A user class that is no ToolEnvironment is probed with a
    user message; where only tool messages extend cleanly (Qwen3's template drops the reasoning of turns
    before the last user message) it may answer with those: a ConfigWarning then."""
    from minigrpo.chat_template import ChatTemplateError
    from minigrpo.episode_text import render

    env = cfg.env
    tools = resolve_tools(env)
    specs = [t.spec() for t in tools.values()] if tools else None
    system_prompt = episode_system_prompt(cfg)
    history = [{"role": "user", "content": "What is 2 + 3?"}]
    history = history if system_prompt is None else [{"role": "system", "content": system_prompt}, *history]
    try:
        render(tokenizer, history, specs, True, env.chat_template_kwargs)
    except ChatTemplateError as e:
        opening = "a system prompt and a user message" if system_prompt is not None else "a user message"
        reason = f"the model's chat template cannot open an episode with {opening}"
        raise ConfigError(f"env.kind={env.kind!r}: {reason}: {e}") from None
    with_tools = env.kind in ENV_KINDS or _is_tool_environment(_import(env.kind, "env.kind"))
    probe = _Probe(tokenizer, history, specs, env, tools)
    answer = "tool results" if with_tools else "a user message"
    problem = probe.problem(answer, every=not with_tools)
    if problem is None:
        return
    reason = f"the model's chat template cannot play an episode whose environment answers with {answer}"
    if with_tools or probe.problem("a tool message") is not None:
        raise ConfigError(f"env.kind={env.kind!r}: {reason}: {problem}")
    # a user class may answer with tool messages, which the template extends: say what fails, do not refuse
    warnings.warn(ConfigWarning(f"env.kind={env.kind!r}: {reason} (tool messages are fine): {problem}"), stacklevel=3)


@dataclass
class _Probe:
    """A synthetic episode's opening (`history`) and the run's tokenizer, tool specs and tools."""

    tokenizer: Any
    history: list[dict[str, Any]]
    specs: list[dict[str, Any]] | None
    env: EnvCfg
    tools: dict[str, Any]

    def problem(self, answer: str, every: bool = False) -> Exception | None:
        """None if the template extends the episode with `answer` after one of the _PROBE_TURNS (every
        one of them: a user message may follow a turn with or without reasoning), else why not (the
        first failure: LayoutError or ChatTemplateError)."""
        from minigrpo.chat_template import ChatTemplateError
        from minigrpo.episode_text import LayoutError

        problems = []
        for text in _PROBE_TURNS:
            try:
                self.play(text, answer)
                if not every:
                    return None
            except (LayoutError, ChatTemplateError) as e:
                problems.append(e)
        return problems[0] if problems else None

    def play(self, text: str, answer: str) -> None:
        """The environment's segment after the model's turn `text` (a call for "tool results", else a reply
        answered by a user or tool message), as run_episodes makes it; raises where it cannot."""
        from minigrpo.chat_template import ChatTemplateError
        from minigrpo.episode_text import environment_text, episode_template

        assistant, plain = {"role": "assistant", "content": text}, None
        new = [{"role": "user" if answer == "a user message" else "tool", "content": "5"}]
        if answer == "tool results":
            template = episode_template(self.tokenizer, self.specs)
            assistant, plain, new = _tool_turn(self.env, self.tools, template, text)
        kwargs = dict(model_text=text, stop_text=None, tools=self.specs, variables=self.env.chat_template_kwargs)
        try:
            environment_text(self.tokenizer, self.history, assistant, new, **kwargs)
        except ChatTemplateError:  # as run_episodes: calls the template refuses stay in the text
            if plain is None:
                raise
            environment_text(self.tokenizer, self.history, plain, new, **kwargs)


def _is_tool_environment(cls: Any) -> bool:
    """`cls` is a ToolEnvironment (subclass): its answers are tool messages. Checked without importing
    minigrpo.episodes (torch): such a class imported it."""
    episodes = sys.modules.get("minigrpo.episodes")
    return episodes is not None and isinstance(cls, type) and issubclass(cls, episodes.ToolEnvironment)


def _tool_turn(env: EnvCfg, tools: dict[str, Any], template: str | None, text: str) -> tuple[Any, Any, Any]:
    """(assistant message of `text` with one call, the same with the call left in its text, the call's
    result) as a ToolEnvironment of this config writes them."""
    from minigrpo.tools import (
        ToolCall,
        ToolResult,
        assistant_message,
        detect_format,
        get_format,
        renders_tool_calls,
        tool_messages,
    )

    fmt = get_format(env.format or detect_format(template) or "hermes")
    plain = template is not None and not renders_tool_calls(template)
    name = next(iter(tools), "probe")
    call = ToolCall(name, {}, _PROBE_CALL, "a1b2c3d4e" if fmt.call_ids else "")
    answer = tool_messages([ToolResult("5", name=name, call_id=call.id)], plain=plain)
    return assistant_message(text, [call], plain=plain), assistant_message(text, [call], plain=True), answer


def episode_system_prompt(cfg: Any) -> str | None:
    """The episodes' system message: env.system_prompt, else gsm8k_tools' own, else data.system_prompt."""
    if cfg.env.system_prompt is not None:
        return cfg.env.system_prompt
    return GSM8K_TOOLS_PROMPT if cfg.env.kind == "gsm8k_tools" else cfg.data.system_prompt


def _offered(cfg: Any, tools: dict[str, Any], chat_template: str | None) -> dict[str, Any]:
    env = cfg.env
    return {
        "tools": tools,
        "chat_template": chat_template,
        "format": env.format,
        "system_prompt": episode_system_prompt(cfg),
        "timeout_s": env.tool_timeout_s,
        "max_chars": env.sandbox.max_output_chars,
        "chat_template_kwargs": dict(env.chat_template_kwargs),
    }


def warn_unseen_tools(tokenizer: Any, tools: dict[str, Any], system_prompt: str | None) -> list[str]:
    """The tools the model is never told of (and a ConfigWarning naming them): with a chat template
    that shows no tool definitions (SmolLM2's renders the same text with and without `tools`), the
    system prompt is the model's only description of the tools, so each must at least be named there."""
    probe = [{"role": "user", "content": "?"}]
    specs = [t.spec() for t in tools.values()]
    if tokenizer.apply_chat_template(probe, tools=specs) != tokenizer.apply_chat_template(probe):
        return []
    missing = [name for name in tools if name not in (system_prompt or "")]
    if missing:
        warnings.warn(
            ConfigWarning(
                f"env: the model's chat template shows no tool definitions and the system prompt "
                f"(env.system_prompt) does not name {', '.join(missing)}: the model is not told how to call them"
            ),
            stacklevel=2,
        )
    return missing


def build_environment(cfg: Any, tokenizer: Any) -> Any:
    """The run's environment (None without env.kind): a ToolEnvironment, or the user class."""
    env = cfg.env
    if env.kind is None:
        return None
    from minigrpo.episode_text import episode_template
    from minigrpo.episodes import ToolEnvironment

    check_chat_template(cfg, tokenizer)
    tools = resolve_tools(env)
    specs = [t.spec() for t in tools.values()] if tools else None
    offered = _offered(cfg, tools, episode_template(tokenizer, specs))  # the template the episodes render with
    if env.kind in ENV_KINDS:
        warn_unseen_tools(tokenizer, offered["tools"], offered["system_prompt"])
        return ToolEnvironment(**offered)
    cls = _import(env.kind, "env.kind")
    built = cls(**_class_arguments(cls, env, offered))
    if not (callable(getattr(built, "reset", None)) and callable(getattr(built, "step", None))):
        raise ConfigError(f"env.kind={env.kind!r} built a {type(built).__name__} without reset() and step()")
    return built
