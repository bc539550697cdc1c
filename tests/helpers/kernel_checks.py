"""Shared pieces of the kernel tests: the error budget, the device parameter and its fixture.

Budget: err(kernel) <= 2 * err(plain torch in the same dtype) + FLOOR[dtype], where err is the
relative norm ||out - ref|| / ||ref|| against the spec evaluated in fp64. Tests parametrize the
`device` fixture of conftest.py indirectly with DEVICES; on the CPU the Triton kernels run under
the interpreter (conftest sets TRITON_INTERPRET=1 before Triton is imported).
"""

from __future__ import annotations

import pytest
import torch

FLOOR = {torch.float32: 1e-6, torch.bfloat16: 1e-3}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def need_interpreter() -> None:
    """Skip where kernels are compiled (CUDA); fail if the interpreter was switched on too late."""
    from minigrpo.kernels._triton import interpreter_ready

    if not interpreter_ready():
        if torch.cuda.is_available():
            pytest.skip("the CPU interpreter runs where there is no CUDA; here the kernels are compiled")
        pytest.fail("TRITON_INTERPRET=1 must be set before triton is first imported")


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm()).item()
