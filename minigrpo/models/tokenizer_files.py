"""A model folder's tokenizer files, checked as they are loaded: each bad file is named.

    tokenizer = load_tokenizer_folder(Path("path/to/model"))   # a minigrpo.tokenizer.Tokenizer

Tokenizer.from_dir reads tokenizer.json (with the `tokenizers` library) and the JSON and jinja
files beside it, each once, and names the file (and key) of any value that makes no tokenizer
(tokenizer_config.py). Here its errors become TokenizerFilesErrors, an error of the constructor
names the folder, and every chat template is compiled up front: a user learns which file to fix
before any weight is read, not from a traceback at the first prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from minigrpo.errors import UserError


class TokenizerFilesError(UserError, ValueError):
    """Tokenizer files that are there but do not make a tokenizer (truncated, corrupt, inconsistent)."""


def load_tokenizer_folder(directory: Path):
    """The Tokenizer of a model folder, with every chat template compiled. A file that does not parse
    (a JSON file, a .jinja file that is not UTF-8, generation_config.json's eos_token_id that is no
    token id) is a TokenizerFilesError naming it; a template that does not compile, a ChatTemplateError
    naming the file it came from."""
    from minigrpo.tokenizer import Tokenizer

    try:
        tokenizer = Tokenizer.from_dir(directory)
    except Exception as e:
        if isinstance(e, UserError):  # Tokenizer.from_dir's own errors already name the file and key
            raise TokenizerFilesError(str(e)) from e
        if type(e) is Exception:  # the tokenizers library's (Rust) error: tokenizer.json itself
            raise TokenizerFilesError(f"{directory / 'tokenizer.json'}: not a readable tokenizer ({e})") from e
        if not isinstance(e, (ValueError, TypeError, KeyError, AttributeError, OSError)):
            raise
        raise TokenizerFilesError(
            f"{directory}: the tokenizer files do not make a tokenizer ({type(e).__name__}: {e})"
        ) from e
    _compile_chat_templates(tokenizer, directory)
    return tokenizer


def _compile_chat_templates(tokenizer: Any, directory: Path) -> None:
    """Compile every chat template of `tokenizer` now, so a broken one is an error naming its file
    before the run starts, not at the first prompt."""
    from minigrpo.chat_template import compile_named_templates

    compile_named_templates(
        tokenizer.chat_templates, lambda name: f"{chat_template_file(directory, name)}: chat template {name!r}"
    )


def chat_template_file(directory: Path, name: str) -> Path:
    """The file chat template `name` was read from (as Tokenizer.from_dir picks them)."""
    if name == "default" and (directory / "chat_template.jinja").is_file():
        return directory / "chat_template.jinja"
    extra = directory / "additional_chat_templates" / f"{name}.jinja"
    return extra if extra.is_file() else directory / "tokenizer_config.json"


__all__ = ["TokenizerFilesError", "chat_template_file", "load_tokenizer_folder"]
