"""Triton import guard: kernel files import `triton`/`tl` from here so that they load without Triton."""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    triton = None
    tl = None
    HAS_TRITON = False


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(impl: str, *tensors) -> str:
    """Map `impl` ("auto" | "triton" | "ref") to the path that runs: auto is Triton on CUDA, else ref."""
    if impl not in ("auto", "triton", "ref"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'ref', got {impl!r}")
    if impl == "auto":
        return "triton" if HAS_TRITON and all(t.is_cuda for t in tensors) else "ref"
    if impl == "triton" and not HAS_TRITON:
        raise RuntimeError("impl='triton' was asked for but Triton is not installed")
    if impl == "triton" and not interpreting() and not all(t.is_cuda for t in tensors):
        raise RuntimeError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)")
    return impl
