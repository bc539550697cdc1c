"""The package layout: `minigrpo.kernels` is the top-level kernels/ folder, never a top-level module."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import minigrpo

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_importable_as_subpackage():
    import minigrpo.kernels as k

    assert Path(k.__file__).resolve().parent == (ROOT / "kernels").resolve()
    assert callable(k.rms_norm) and callable(k.apply_rotary)


def _repo_kernels_importable(cwd: Path, extra_path: str | None = None) -> list[str]:
    """Where a top-level `import kernels` would load from inside this repository's kernels/ folder."""
    code = (
        "import importlib.util, json; s = importlib.util.find_spec('kernels'); "
        "print(json.dumps(None if s is None else [s.origin, list(s.submodule_search_locations or [])]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if extra_path:
        env["PYTHONPATH"] = extra_path
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, check=True)
    found = json.loads(proc.stdout)
    places = [] if found is None else [p for p in [found[0], *found[1]] if p]
    return [p for p in places if Path(p).resolve().is_relative_to((ROOT / "kernels").resolve())]


def test_no_top_level_kernels_module_from_this_repository(tmp_path):
    # A `kernels` module may exist (Hugging Face's PyPI package of that name, which transformers
    # depends on); it must not be ours. Run from a neutral directory so the repo root is not on sys.path.
    assert _repo_kernels_importable(tmp_path) == []
    # the check itself can fail: with the repo root on the path, our folder is what it finds
    assert _repo_kernels_importable(tmp_path, extra_path=str(ROOT)) != []


def test_import_is_lazy():
    code = "import sys, minigrpo; sys.exit(1 if 'minigrpo.models.transformer' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    assert minigrpo.__version__
    assert importlib.util.find_spec("minigrpo.kernels") is not None
