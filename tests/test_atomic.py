"""Files written whole or not at all (minigrpo.atomic)."""

from __future__ import annotations

import json

import pytest

from minigrpo.atomic import atomic_path, write_atomic, write_json


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "state.json"
    write_json(path, {"step": 1, "name": "é"})
    with pytest.raises(RuntimeError, match="crash"), atomic_path(path) as tmp:
        tmp.write_text("half a fi")
        raise RuntimeError("crash")
    assert json.loads(path.read_text(encoding="utf-8")) == {"name": "é", "step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_writes_replace_text_and_bytes(tmp_path):
    path = tmp_path / "f"
    write_atomic(path, "text\n")
    assert path.read_text() == "text\n"
    write_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    write_json(path, {"b": 1, "a": 2})
    assert path.read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'
    write_json(path, {"b": 1, "a": 2}, sort_keys=False)
    assert list(json.loads(path.read_text())) == ["b", "a"]
