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


def near_certain_logits(
    N: int, V: int, offsets: tuple[float, ...] = (30.0, -30.0, 45.0), device="cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits (N, V) whose target (N,) is near-certain: logp = -tiny (1e-7 < tiny < 3e-5).

    Row n is offset by offsets[n % len]; its target is the max, one competitor sits 10.5-16 below
    it (the tiny mass) and the rest 40-50 below (their exp vanishes in fp32 next to 1). An ulp of
    the offset (1.9e-6 at 30, 3.8e-6 at 45) dwarfs tiny, so logp computed as zt - (m + log s)
    loses tiny to rounding, while (zt - m) - log s keeps it to about an ulp of 1 (6e-8).
    """
    gen = torch.Generator().manual_seed(N * 1000 + V)
    c = torch.tensor(offsets, dtype=torch.float64).repeat(-(-N // len(offsets)))[:N, None]  # (N, 1)
    x = c - 40 - 10 * torch.rand(N, V, generator=gen, dtype=torch.float64)  # (N, V)
    perm = torch.argsort(torch.rand(N, V, generator=gen), dim=1)
    tgt, rival = perm[:, 0], perm[:, 1]  # (N,) each, distinct
    rows = torch.arange(N)
    x[rows, tgt] = c[:, 0] + 0.25 * torch.rand(N, generator=gen, dtype=torch.float64)
    x[rows, rival] = c[:, 0] - 10.5 - 5.5 * torch.rand(N, generator=gen, dtype=torch.float64)
    return x.float().to(device), tgt.contiguous().to(device)


def near_certain_tolerance(ref: torch.Tensor) -> torch.Tensor:
    """Per-element bound on |logp - ref| for near-certain targets: about an ulp of 1, plus relative 1e-6."""
    return 1e-7 + 1e-6 * ref.abs()


def kernel_device() -> torch.device:
    """Where a test that runs one device compiles or interprets the Triton kernels: CUDA when there is
    one (the kernels refuse CPU tensors there), else the CPU under the interpreter."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    need_interpreter()
    return torch.device("cpu")
