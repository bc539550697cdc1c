"""A Hugging Face Hub that is a local folder: the network is out of reach in tests."""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path


def fake_hub(monkeypatch, remote: Path, snapshot: Path) -> list[list[str]]:
    """snapshot_download over a local folder `remote`: copies the files the patterns match (as the hub
    client matches them) into `snapshot`; returns the patterns of each call."""
    import huggingface_hub

    calls: list[list[str]] = []

    def fake(repo_id, revision=None, allow_patterns=None):
        calls.append(list(allow_patterns))
        for file in sorted(p for p in remote.rglob("*") if p.is_file()):
            rel = file.relative_to(remote).as_posix()
            if any(fnmatch.fnmatch(rel, pattern) for pattern in allow_patterns):
                (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(file, snapshot / rel)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return calls
