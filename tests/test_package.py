"""The package layout: `minigrpo.kernels` is the top-level kernels/ folder, never a top-level module."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import minigrpo

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_importable_as_subpackage():
    import minigrpo.kernels as k

    assert Path(k.__file__).resolve().parent == (ROOT / "kernels").resolve()
    assert callable(k.rms_norm) and callable(k.apply_rotary)


def test_no_top_level_kernels_module_installed(tmp_path):
    # Run from a neutral directory so the repo root is not on sys.path.
    code = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('kernels') is None else 3)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path)
    assert proc.returncode == 0, "a top-level 'kernels' module is importable: it would shadow the PyPI package"


def test_import_is_lazy():
    code = "import sys, minigrpo; sys.exit(1 if 'minigrpo.models.transformer' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    assert minigrpo.__version__
    assert importlib.util.find_spec("minigrpo.kernels") is not None
