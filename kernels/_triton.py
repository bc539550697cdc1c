"""Triton import guard and launch helpers shared by the kernel files.

Kernel files import `triton`/`tl` from here so that they load without Triton, and decorate their
kernels with `jit` (below) instead of `triton.jit`: whether a kernel is compiled for the GPU or run
by Triton's CPU interpreter is decided at launch, from `TRITON_INTERPRET`, not when the kernel
files are imported. (Triton itself must still be imported with the variable set for the
interpreter to work: see `interpreter_ready`; on a machine without CUDA this module defaults
TRITON_INTERPRET=1 before importing Triton.)
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

# Without CUDA, Triton kernels can only run through its interpreter, and Triton fixes that choice
# for its own library functions when it is first imported: default the variable here, before the
# import, unless the caller set it or Triton is already loaded.
if "TRITON_INTERPRET" not in os.environ and "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

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


def interpreter_ready() -> bool:
    """True when Triton kernels can run on the CPU: Triton was imported with TRITON_INTERPRET=1.

    Triton fixes its own library functions (tl.sum, ...) as compiled or interpreted when it is
    first imported, so the variable must be set before that (see the top of this module).
    """
    if not (HAS_TRITON and interpreting()):
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.sum, InterpretedFunction)


def resolve_impl(impl: str, *tensors) -> str:
    """Map `impl` ("auto" | "triton" | "ref") to the path that runs: auto is Triton on CUDA, else ref."""
    if impl not in ("auto", "triton", "ref"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'ref', got {impl!r}")
    if impl == "auto":
        return "triton" if HAS_TRITON and all(t.is_cuda for t in tensors) else "ref"
    if impl == "triton" and not HAS_TRITON:
        raise RuntimeError("impl='triton' was asked for but Triton is not installed")
    if impl == "triton" and not all(t.is_cuda for t in tensors) and not interpreter_ready():
        raise RuntimeError(
            "impl='triton' needs CUDA tensors, or the CPU interpreter: TRITON_INTERPRET=1 set before "
            "triton is first imported"
        )
    return impl


class _Kernel:
    """A `@jit` kernel: builds the compiled or the interpreted Triton function on first launch.

    Kernels decorated this way must not call other jitted helpers (write helpers inline): a helper
    would have to be resolved one way or the other when the kernel is defined.
    """

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._compiled: Any = None
        self._interpreted: Any = None

    def _target(self) -> Any:
        if interpreting():
            if self._interpreted is None:
                from triton.runtime.interpreter import InterpretedFunction

                _round_bf16_casts_to_nearest()
                _allow_tensor_loop_bounds()
                self._interpreted = InterpretedFunction(self.fn)
            return self._interpreted
        if self._compiled is None:
            self._compiled = triton.runtime.jit.JITFunction(self.fn)
        return self._compiled

    def __getitem__(self, grid: Any) -> Any:
        return self._target()[grid]


def _allow_tensor_loop_bounds() -> None:
    """Let the interpreter run `for i in tl.range(lo, hi, step, ...)` whose bounds are scalars the
    kernel loaded or computed, as the compiler does (a loop it can pipeline, where a `while` is not).

    Triton 3.6's interpreter maps tl.range to Python's range, which takes ints only; here each bound
    that is a tensor is read as its single value.
    """
    import numpy as np
    from triton.runtime import interpreter

    if getattr(interpreter, "_tensor_loop_bounds", False):
        return
    plain_patch = interpreter._patch_lang_core

    def as_int(x):
        if isinstance(x, tl.tensor):
            return int(np.asarray(x.handle.data).reshape(-1)[0])
        return x.value if isinstance(x, tl.constexpr) else x

    def patch(lang, scope):
        plain_patch(lang, scope)

        def tensor_range(arg1, arg2=None, step=None, **kwargs):  # kwargs: num_stages etc., compiler hints
            start, end = (0, arg1) if arg2 is None else (arg1, arg2)
            return range(as_int(start), as_int(end), 1 if step is None else as_int(step))

        scope.set_attr(lang, "range", tensor_range)

    interpreter._patch_lang_core = patch
    interpreter._tensor_loop_bounds = True


def _round_bf16_casts_to_nearest() -> None:
    """Make the interpreter's fp32 -> bf16 casts round to nearest even, as the GPU does.

    Triton 3.6's interpreter truncates them (and its optional rounding drops the carry into the
    exponent), which would double the rounding error that CPU tests hold the kernels to.
    """
    import numpy as np
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_bf16_rne", False):
        return
    plain_cast, plain_fp_to_fp = builder.cast_impl, builder.create_fp_to_fp

    def to_bf16(src):
        bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round half to even on the dropped bits
        return interpreter.TensorHandle(bits.astype(np.uint16), tl.bfloat16)

    def is_f32_to_bf16(src, dst_type):
        return src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16

    def cast_impl(self, src, dst_type):
        return to_bf16(src) if is_f32_to_bf16(src, dst_type) else plain_cast(self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if is_f32_to_bf16(src, dst_type):
            return to_bf16(src)
        return plain_fp_to_fp(self, src, dst_type, rounding_mode)

    builder.cast_impl = cast_impl
    builder.create_fp_trunc = cast_impl
    builder.create_fp_to_fp = create_fp_to_fp
    builder._bf16_rne = True


def jit(fn: Any) -> _Kernel:
    """Decorator for a Triton kernel, compiled or interpreted as `TRITON_INTERPRET` says at launch."""
    return _Kernel(fn)


def cdiv(a: int, b: int) -> int:
    """Ceiling of a / b for positive ints."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def num_programs_per_wave(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a persistent grid's width); 4 under the interpreter."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count
