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


def test_a_killed_writer_s_temporary_is_removed_by_the_next_write(tmp_path):
    """A writer killed by SIGKILL leaves `.NAME.PID.tmp` (a partial file as big as the export) that no
    later write replaced, its name holding another pid. The next write of the same file removes those of
    dead processes; a live process's (another export writing now) and other files' temporaries stay."""
    import signal
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    path = tmp_path / "model.q8_0.gguf"
    killed_tmp = tmp_path / f".{path.name}.{child.pid}.tmp"
    killed_tmp.write_bytes(b"half an export")
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    live_tmp = tmp_path / f".{path.name}.{os.getppid()}.tmp"  # the process that started this test runs
    other_tmp = tmp_path / f".other.gguf.{child.pid}.tmp"  # another output's: left to its own writer
    for tmp in (live_tmp, other_tmp):
        tmp.write_bytes(b"x")
    write_atomic(path, b"whole")
    assert path.read_bytes() == b"whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, live_tmp.name, other_tmp.name])


def test_a_bracketed_file_name_finds_its_own_temporaries(tmp_path):
    """A name with glob characters (`run[1].json`) matches its own temporaries only, read literally."""
    path = tmp_path / "run[1].json"
    stale = tmp_path / f".{path.name}.{2**40}.tmp"  # no such process id
    stale.write_text("partial")
    write_json(path, {"ok": True})
    assert not stale.exists() and json.loads(path.read_text()) == {"ok": True}
