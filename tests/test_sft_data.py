"""SFT data rows: a malformed conversation is one DataError naming the file, the row and the field
that sft.messages_field / sft.prompt_field configure (not the default names)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from minigrpo.config import Config
from minigrpo.datafiles import DataError
from minigrpo.sft_data import load_conversations

REPLY = {"role": "assistant", "content": "7"}
GOOD = [{"role": "user", "content": "q"}, REPLY]


def _load(tmp_path: Path, rows: list[dict], **sft) -> None:
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    load_conversations(Config.from_dict({"sft": {"source": "jsonl", "path": str(path), **sft}}))


@pytest.mark.parametrize(
    "conversation, problem",
    [
        ([], "field 'conv' is an empty list of chat messages"),
        ("hello", "field 'conv' is not a list of chat messages"),
        ([{"role": "user", "content": None}, REPLY], "message 0 of 'conv' needs a text 'role' and 'content'"),
    ],
    ids=["empty", "not_a_list", "null_content"],
)
def test_a_bad_conversation_names_the_configured_messages_field(tmp_path, conversation, problem):
    with pytest.raises(DataError) as e:
        _load(tmp_path, [{"conv": GOOD}, {"conv": conversation}], messages_field="conv")
    assert str(e.value).startswith(f"{tmp_path / 'sft.jsonl'}:2: {problem}"), str(e.value)


def test_a_bad_prompt_message_names_the_configured_prompt_field(tmp_path):
    rows = [{"q": "hi", "a": "7"}, {"q": [{"role": "user"}], "a": "7"}]
    with pytest.raises(DataError) as e:
        _load(tmp_path, rows, format="prompt_response", prompt_field="q", response_field="a")
    assert str(e.value).startswith(f"{tmp_path / 'sft.jsonl'}:2: message 0 of 'q' needs a text"), str(e.value)
