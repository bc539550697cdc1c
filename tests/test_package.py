"""The package layout: `minigrpo.kernels` is the top-level kernels/ folder, never a top-level module."""

import importlib.util
import json
import os
import re
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


# ------------------------------------------------------------------------------------------------
# the shape a reader relies on


def _sources(*folders: str) -> dict[Path, str]:
    return {p: p.read_text(encoding="utf-8") for f in folders for p in sorted((ROOT / f).rglob("*.py"))}


def test_no_package_file_over_500_lines():
    long = {str(p.relative_to(ROOT)): t.count("\n") for p, t in _sources("minigrpo").items() if t.count("\n") > 500}
    assert not long, f"split these by job: {long}"


def test_math_modules_import_no_model_code():
    code = (
        "import sys, minigrpo.grpo, minigrpo.advantages, minigrpo.logprobs; "
        "print(sorted(m for m in sys.modules if m.startswith(('minigrpo.models', 'minigrpo.sampling'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


TRAIN_IMPORT = r"^\s*(from minigrpo\.train import|from minigrpo import .*\btrain\b|import minigrpo\.train)"


def test_nothing_imports_the_training_entry_point():
    importers = [
        str(p.relative_to(ROOT))
        for p, text in _sources("minigrpo", "benchmarks").items()
        if re.search(
            r"^\s*(from minigrpo\.train import|from minigrpo import .*\btrain\b|import minigrpo\.train)", text, re.M
        )
        and p.name not in ("compare_samplers.py", "bench_e2e.py")  # benchmarks of whole trainings call it
    ]
    assert not importers, f"what two entry points share belongs in a module below them: {importers}"


def test_only_the_vllm_sampler_imports_vllm():
    importers = [
        str(p.relative_to(ROOT))
        for p, text in _sources("minigrpo").items()
        if re.search(r"^\s*(import vllm|from vllm)", text, re.M) and p.name != "vllm_sampler.py"
    ]
    assert not importers, importers


def test_the_loop_never_probes_a_sampler():
    for name in ("train.py", "step.py", "build.py", "eval.py"):
        text = (ROOT / "minigrpo" / name).read_text(encoding="utf-8")
        assert not re.search(r"(hasattr|getattr)\(\s*(run\.)?sampler", text), name
