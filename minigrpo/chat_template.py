"""Chat templates: render a conversation with a model's jinja template, in a sandbox, as transformers does.

    text = render_chat_template(template, messages, add_generation_prompt=True, variables=special_tokens)

Templates render in jinja2's `ImmutableSandboxedEnvironment` with `trim_blocks` and `lstrip_blocks`,
the helpers templates expect (`raise_exception`, `strftime_now`, a `tojson` that writes JSON without
HTML escaping, `loopcontrols`, a no-op `{% generation %}` block) and the variables transformers
passes (`messages`, `tools`, `documents`, `add_generation_prompt`, the special tokens, and any extra
keyword arguments). Inputs are rebuilt from plain JSON-like types first, so the sandbox never sees a
rich Python object. jinja2 is imported only when a template is rendered.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from minigrpo.errors import ConfigError, UserError


class ChatTemplateError(UserError, ValueError):
    """A chat template failed to render: it raised on purpose, hit the sandbox or was malformed."""


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    continue_final_message: bool | str = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    variables: Mapping[str, Any] | None = None,
) -> str:
    """The text of one conversation rendered with `template` (a jinja source string).

    Args:
        messages: dicts with at least "role" and "content"; keys whose value is None are dropped, and
            a message's reasoning is offered under every name templates read (see _alias_reasoning).
        add_generation_prompt: end with the header that starts an assistant turn.
        continue_final_message: end the text right after the final message's content (True) or its field
            of that name ("reasoning_content"), inside its open turn, so a model continues that message
            (a prefilled reply); not with add_generation_prompt.
        tools: JSON-schema dicts, passed to the template as is, or Python functions / minigrpo Tools, whose
            schemas are made from their signatures and docstrings (tool_schemas), as transformers does.
        documents: document dicts, passed to the template as is.
        variables: more template variables (the special tokens, `enable_thinking`, ...).

    Raises:
        ChatTemplateError: the template raised, broke the sandbox or failed to parse; or the final message
            to continue has no such text, or the template drops it.
    """
    if not messages:
        raise ValueError("cannot apply a chat template to an empty conversation")
    if continue_final_message and add_generation_prompt:
        raise ChatTemplateError("continue_final_message and add_generation_prompt exclude each other: pick one")
    chat = []
    for m in messages:
        if not isinstance(m, Mapping):
            raise TypeError(f"chat messages must be dicts, got {type(m).__name__}: {m!r}")
        chat.append(_alias_reasoning({k: _plain(v) for k, v in m.items() if v is not None}))
    if documents is not None and not all(isinstance(x, Mapping) for x in documents):
        raise TypeError("documents must be a list of dicts")
    tools = None if tools is None else tool_schemas(tools)
    context = {k: _plain(v) for k, v in (variables or {}).items()}
    context.update(
        messages=chat, tools=_plain(tools), documents=_plain(documents), add_generation_prompt=add_generation_prompt
    )
    final = _mark_final_message(chat, continue_final_message) if continue_final_message else None
    import jinja2  # heavy-ish; only needed here

    try:
        text = compile_chat_template(template).render(**context)
    except ChatTemplateError:
        raise
    except (jinja2.TemplateError, *_RENDER_FAILURES) as e:
        # an operation of the template failed on these messages ('text' + 1, a missing key, 1 / 0, a float
        # power that overflows, a macro that calls itself without end, ...)
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {one_line(e)}") from e
    return text if final is None else _cut_after_final_message(text, final)


# what a template's operations raise when they fail on the inputs given (besides jinja's own TemplateErrors)
_RENDER_FAILURES = (TypeError, ValueError, LookupError, AttributeError, ArithmeticError, RecursionError)


def one_line(message: Any) -> str:
    """`message` as one line: a template's own message (raise_exception) or jinja's may span several."""
    return " ".join(str(message).splitlines()).strip()


def tool_schemas(tools: Sequence[Any]) -> list[Any]:
    """`tools` as the JSON-schema dicts templates read: a dict as is, a Tool (minigrpo.tools) as its
    spec(), a Python function declared from its annotations and docstring (Tool.from_function, which
    raises ValueError naming the function and parameter it cannot declare)."""
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise TypeError(f"tools must be a list of JSON-schema dicts or functions, got {type(tools).__name__}")
    from minigrpo.tools.schema import Tool  # stdlib only; imported here as minigrpo.tools imports this module

    out: list[Any] = []
    for tool in tools:
        if isinstance(tool, Mapping):
            out.append(tool)
        elif isinstance(tool, Tool):
            out.append(tool.spec())
        elif inspect.isfunction(tool) or inspect.ismethod(tool):
            out.append(Tool.from_function(tool).spec())
        else:
            raise TypeError(f"a tool must be a JSON-schema dict, a function or a Tool, got {type(tool).__name__}")
    return out


# what the renderer itself passes: a user's template variable of that name would change the call, not the template
RESERVED_VARIABLES = ("messages", "add_generation_prompt", "continue_final_message", "tokenize")


def check_template_variables(variables: Any, key: str) -> dict[str, Any]:
    """Template variables a user gives (a config's `chat_template_kwargs`, e.g. {"enable_thinking": False})
    as a dict, or one ConfigError naming `key` and every bad entry (template_variable_errors)."""
    errors = template_variable_errors(variables, key)
    if errors:
        raise ConfigError("; ".join(errors), key)
    return dict(variables)


def template_variable_errors(variables: Any, key: str) -> list[str]:
    """The problems of template variables a user gives, one line each naming `key`: not a mapping, a
    name that is no identifier (a template could never read it; YAML's `1:` key included), a name the
    renderer sets itself, a value that is not JSON-like data. Empty when they are fine."""
    if not isinstance(variables, Mapping):
        return [f"{key} must be a mapping of template variable names to values, got {variables!r:.80}"]
    errors = []
    for name, value in variables.items():
        if not (isinstance(name, str) and name.isidentifier()):
            errors.append(f"{key}: {name!r} is not a template variable name (letters, digits and _)")
        elif name in RESERVED_VARIABLES:
            errors.append(f"{key}.{name} is set by the prompt rendering itself; remove it")
        else:
            try:
                _plain(value, strict=True)
            except TypeError as e:
                errors.append(f"{key}.{name}: {e}")
    return errors


# appended to the final message's text to find where it ends in the rendered conversation; a template that
# trims the message drops the space, which tells that the message's own trailing spaces are gone too
_FINAL_MESSAGE_END = "<<final-message-end>> "


def _mark_final_message(chat: list[dict[str, Any]], field: bool | str) -> str:
    """Append the end marker to the text of the final message that is continued, in place: its `field`
    ("content" for True; a reasoning field under each of its names), or the last text part of a content
    given as parts [{"type": "text", "text": ...}]. Returns that text, before the marker."""
    name = "content" if field is True else str(field)
    last = chat[-1]
    value = last.get(name)
    if isinstance(value, str):
        names = [k for k in _REASONING_KEYS if last.get(k) == value] if name in _REASONING_KEYS else [name]
        for k in names:
            last[k] = value + _FINAL_MESSAGE_END
        return value
    parts = value if isinstance(value, list) else []
    part = next((p for p in reversed(parts) if isinstance(p, dict) and isinstance(p.get("text"), str)), None)
    if part is None:
        raise ChatTemplateError(f"continue_final_message: the final message has no text {name!r} to continue")
    text, part["text"] = part["text"], part["text"] + _FINAL_MESSAGE_END
    return text


def _cut_after_final_message(text: str, final: str) -> str:
    """The rendered `text` cut where the continued final message ends (at its marker)."""
    at = text.rfind(_FINAL_MESSAGE_END.strip())
    if at < 0 or final.strip() not in text:
        raise ChatTemplateError(
            "continue_final_message: the chat template drops (part of) the final message, so it cannot be continued"
        )
    return text[:at] if text.startswith(_FINAL_MESSAGE_END, at) else text[:at].rstrip()


_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    """Offer a message's reasoning under every name templates read (as transformers does).

    Qwen3-style templates read `reasoning_content`, gpt-oss-style ones `thinking`; callers may use
    either, or `reasoning`. `reasoning_content` gets the first one present; `thinking` is filled only
    if the message has none of its own.
    """
    reasoning = next((message[k] for k in _REASONING_KEYS if k in message), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _plain(value: Any, strict: bool = False) -> Any:
    """Rebuild template input from plain JSON-like types, so the sandbox never sees rich objects.

    A dataclass or pydantic model becomes a dict of its fields; any other object (a parquet message's
    timestamp, decimal or bytes) becomes an inert placeholder naming its type ("<datetime>"), as in
    transformers: templates rarely read such values, and a row must not stop the run for them.
    `strict`: a TypeError instead (a user's template variables, checked before anything runs)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        return {_plain(k, strict): _plain(v, strict) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v, strict) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v, strict) for v in value)
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # numpy / torch scalars
        return _plain(value.item(), strict)
    if strict:
        raise TypeError(f"chat template inputs must be JSON-like data, got {type(value).__name__}")
    return _plain_object(value)


def _plain_object(value: Any) -> Any:
    """A dataclass instance or pydantic model as a plain dict of its fields; anything else as "<TypeName>"."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    dump = getattr(value, "model_dump", None)
    if callable(dump) and not isinstance(value, type):
        return _plain(dump())
    return f"<{type(value).__name__}>"


def compile_named_templates(templates: dict[str, Any], where: Callable[[str], str]) -> None:
    """Compile every named chat template now: a broken one (or one that is no string) is a ChatTemplateError
    naming `where(name)` (its file, its key) before anything runs, not a message naming nothing at the first
    prompt."""
    for name, source in templates.items():
        if not isinstance(source, str):
            raise ChatTemplateError(f"{where(name)}: a {type(source).__name__}, not a string")
        try:
            compile_chat_template(source)
        except ChatTemplateError as e:
            raise ChatTemplateError(f"{where(name)}: {e}") from e


@lru_cache(maxsize=32)
def compile_chat_template(source: str) -> Any:
    """Compile one chat template in a fresh immutable sandbox (cached per template string)."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.utils import Namespace

    class GenerationBlock(Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; render as is."""

        tags = {"generation"}  # noqa: RUF012  (jinja's API)

        def parse(self, parser: Any) -> list[Any]:
            next(parser.stream)
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return [nodes.Scope(body)]

    def check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} may not start with '_'")

    class SafeNamespace(Namespace):
        """jinja's `namespace()` without underscore-prefixed attributes."""

        def __init__(*args: Any, **kwargs: Any) -> None:
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                check_name(name)
            Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            check_name(name)
            Namespace.__setitem__(self, name, value)

    class SafeDict:
        """`dict(...)` / `dict.fromkeys(...)` for templates, without exposing the `dict` type."""

        def __call__(self, *args: Any, **kwargs: Any) -> dict:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any) -> dict:
            return dict.fromkeys(*args)

    def raise_exception(message: str) -> None:
        raise ChatTemplateError(f"chat template raised: {one_line(message)}")

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
    ) -> str:
        # jinja's own tojson HTML-escapes <, >, & and '; chat templates want plain JSON
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals.update(
        raise_exception=raise_exception, strftime_now=strftime_now, namespace=SafeNamespace, dict=SafeDict()
    )
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not parse (line {e.lineno}): {one_line(e.message)}") from e


# ---- control tokens in a user's text (sanitize_control_tokens) -------------------------------------------------

# private-use code points put around each control token found in a user's strings, so that the rendered text tells
# it apart from the control tokens the template writes itself (the same two transformers uses)
_MARK_START, _MARK_END = "\U000f0000", "\U000f0001"


def template_literal_text(source: str) -> str:
    """The text and string constants of a template, joined by NUL so that no search matches across two of them:
    the added tokens found in it are the ones the template writes (its control tokens)."""
    from jinja2 import nodes

    ast = compile_chat_template(source).environment.parse(source)
    literals = {node.data for node in ast.find_all(nodes.TemplateData)}
    literals |= {node.value for node in ast.find_all(nodes.Const) if isinstance(node.value, str)}
    return "\0".join(sorted(literals))


@lru_cache(maxsize=32)
def _control_patterns(tokens: tuple[str, ...]) -> tuple[re.Pattern, re.Pattern]:
    """A regex matching any control token (longest first, so a token wins over the tokens it contains), and one
    matching a marked control token (captured) or a lone marker."""
    alternatives = "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)) or "(?!)"
    marked = re.compile(f"{_MARK_START}({alternatives}){_MARK_END}|[{_MARK_START}{_MARK_END}]")
    return re.compile(alternatives), marked


def mark_control_tokens(value: Any, tokens: tuple[str, ...]) -> Any:
    """`value` (a string, or messages / tools / variables: dicts and lists of them) with every control token in
    its strings put between markers; markers already there are dropped first, so none can be forged. Dict keys
    and anything else (a tool given as a function) are kept as they are."""
    if isinstance(value, str):
        plain = value.replace(_MARK_START, "").replace(_MARK_END, "")
        return _control_patterns(tokens)[0].sub(lambda m: f"{_MARK_START}{m.group(0)}{_MARK_END}", plain)
    if isinstance(value, Mapping):
        return {k: mark_control_tokens(v, tokens) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [mark_control_tokens(v, tokens) for v in value]
    return value


def encode_marked(tk: Any, text: str, tokens: tuple[str, ...]) -> list[int]:
    """Ids of a conversation rendered from inputs marked by mark_control_tokens (`tk`: a tokenizers.Tokenizer): a
    marked control token is encoded as plain text, the rest (the template's own control tokens included) as
    usual. A lone marker (a template split a marked token) is dropped but still separates the text around it."""
    pieces = _control_patterns(tokens)[1].split(text)  # [text, marked token, text, ..., text]; None: lone marker
    newline = tk.encode("\n", add_special_tokens=False).ids
    ids = tk.encode(pieces[0], add_special_tokens=False).ids
    for i, piece in enumerate(pieces[1:], start=1):
        if not piece:
            continue
        as_text = i % 2 == 1
        piece_ids = _encode_piece(tk, piece, as_text, newline)
        if as_text and tk.token_to_id(piece) in piece_ids:
            raise ChatTemplateError(f"sanitize_control_tokens: the tokenizer makes {piece!r} from plain text too")
        ids += piece_ids
    return ids


def _encode_piece(tk: Any, piece: str, as_text: bool, newline: list[int]) -> list[int]:
    """Ids of a piece from the middle of a conversation, encoded after a newline that is then removed (so a
    SentencePiece pipeline adds no prefix space); `as_text` ignores the added tokens."""

    def encode(s: str) -> list[int]:
        return _ids_without_added_tokens(tk, s) if as_text else tk.encode(s, add_special_tokens=False).ids

    ids = encode("\n" + piece)
    return ids[len(newline) :] if ids[: len(newline)] == newline else encode(piece)


def _ids_without_added_tokens(tk: Any, text: str) -> list[int]:
    """Ids of `text` through the normalizer, pre-tokenizer and model alone: no added token is matched."""
    if tk.normalizer is not None:
        text = tk.normalizer.normalize_str(text)
    splits = [text] if tk.pre_tokenizer is None else [s for s, _ in tk.pre_tokenizer.pre_tokenize_str(text)]
    return [token.id for s in splits for token in tk.model.tokenize(s)]
