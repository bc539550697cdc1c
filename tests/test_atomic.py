"""Files written whole or not at all (minigrpo.atomic)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from minigrpo import atomic
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


def test_the_new_data_reaches_the_disk_before_the_rename(tmp_path, monkeypatch):
    """A rename that reaches the disk before the data leaves an empty file after a power loss: the
    temporary file must be fsync'ed, with its full content, before it replaces the old one."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        target = Path(os.readlink(f"/proc/self/fd/{fd}"))
        content = target.read_bytes() if target.is_file() else None
        events.append(("fsync", target.name, content))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(src).name, Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    write_atomic(tmp_path / "config.yaml", "train:\n  lr: 0.01\n")
    tmp_name = f".config.yaml.{os.getpid()}.tmp"
    assert events[:2] == [
        ("fsync", tmp_name, b"train:\n  lr: 0.01\n"),
        ("replace", tmp_name, "config.yaml"),
    ]
    assert events[2:] == [("fsync", tmp_path.name, None)]  # the folder: the rename itself is durable
    events.clear()
    with atomic_path(tmp_path / "w.bin") as tmp, open(tmp, "wb") as f:
        f.write(b"\x01\x02")
    assert events[0] == ("fsync", f".w.bin.{os.getpid()}.tmp", b"\x01\x02") and events[1][0] == "replace"
