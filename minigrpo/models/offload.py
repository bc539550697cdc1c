"""Activation checkpointing per block, optionally with the saved inputs offloaded to CPU memory.

    x = checkpoint_block(block, x, cos, sin, mask, None, None, T, offload=False)   # torch checkpoint
    x = checkpoint_block(block, x, cos, sin, mask, None, None, T, offload=True)    # + async CPU offload

Why. Plain checkpointing keeps one tensor per block, its input x (N, T, D), and recomputes the
block in the backward: L * N*T*D*2 bytes in bf16, 5.2 GB for Llama-3.1-8B at 20K tokens. With
`offload=True` those inputs go to pinned CPU memory as soon as the block's forward has been issued,
so the GPU holds the inputs of at most two blocks at a time, whatever L and T.

How (CUDA). Every copy runs on one side stream per device, so it overlaps the compute stream:
- forward: the block runs without autograd; its input is copied device -> pinned host on the side
  stream (after the compute stream reached it), and `record_stream` keeps the allocator from
  reusing x's memory before the copy has read it;
- backward, block i: its input comes back host -> device (usually prefetched already: see next),
  the compute stream waits for that copy's event, then the copy of block i-1's input is started,
  and block i is recomputed with autograd and backpropagated while that copy runs.
Blocks find their predecessor by identity: block i's input is the very tensor block i-1 returned.
The RNG state (dropout in adapters) and autocast state of the forward are restored for the
recomputation, so it reproduces the forward exactly.

On CPU the same autograd function runs without any copy (offload is a no-op there); that path is
what the CPU tests compare with plain backprop. The block's trainable parameters are inputs of the
function, so their gradients flow through the autograd engine as usual (hooks, accumulation),
and a block whose input needs no gradient (the first one, under LoRA) still trains its adapters.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_chain = threading.local()  # .last: weakref to the _SavedInput of the block run last
_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device=device)
    return _side_streams[device]


class _SavedInput:
    """One block's input between its forward and its backward: on the GPU, in pinned host memory,
    or on its way back (with the event that says when it has arrived).

    `stored` is the tensor the autograd function saves with save_for_backward: the input itself
    (CPU, offload off) or its pinned host copy. Saved so, the engine frees it after the backward
    (or keeps it for another one, retain_graph=True) and checks that the input was not modified in
    place since the forward; the offloaded input's version is checked here, through a weak reference.
    """

    def __init__(self, x: torch.Tensor, offload: bool) -> None:
        self.shape, self.dtype, self.device = x.shape, x.dtype, x.device
        self.prev: weakref.ref[_SavedInput] | None = None  # the block before this one
        self.output: weakref.ref[torch.Tensor] | None = None  # what this block returned
        self.gpu: torch.Tensor | None = None
        self.host: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None  # set when `gpu` is filled by the side stream
        self.source: weakref.ref[torch.Tensor] | None = None  # the offloaded input, if still alive
        self.version = x._version
        if not (offload and x.is_cuda):
            self.stored = x  # CPU (or offload off): keep the tensor as it is
            return
        main, side = torch.cuda.current_stream(x.device), _side_stream(x.device)
        self.host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        side.wait_stream(main)  # x is complete once the compute stream gets here
        with torch.cuda.stream(side):
            self.host.copy_(x, non_blocking=True)
        x.record_stream(side)  # x's memory is not reused before this copy has read it
        self.stored, self.source = self.host, weakref.ref(x)

    def prefetch(self) -> None:
        """Start the host -> device copy on the side stream (no-op if already on the device)."""
        if self.gpu is not None or self.host is None:
            return
        main, side = torch.cuda.current_stream(self.device), _side_stream(self.device)
        self.gpu = torch.empty(self.shape, dtype=self.dtype, device=self.device)  # on the compute stream
        side.wait_stream(main)  # ... so the side stream may only write it from this point on
        with torch.cuda.stream(side):
            self.gpu.copy_(self.host, non_blocking=True)  # after the device -> host copy (same stream)
            self.ready = torch.cuda.Event()
            self.ready.record(side)
        self.host = None  # the saved copy (the autograd engine's) lives until this block's backward

    def take(self, stored: torch.Tensor) -> torch.Tensor:
        """The input on its device, the compute stream ordered after its arrival. `stored`: the
        saved tensor, unpacked by the engine (it raises if the graph was freed already)."""
        self._check_version()
        if stored.device != self.device:  # offloaded: the copy back, unless one is on its way
            if self.gpu is None and self.host is None:
                self.host = stored  # a second backward through the graph (retain_graph=True)
            self.prefetch()
        else:
            self.gpu = stored
        if self.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready)
        x, self.gpu, self.ready = self.gpu, None, None
        return x

    def _check_version(self) -> None:
        """An offloaded input modified in place after the forward would give wrong gradients silently."""
        x = self.source() if self.source is not None else None
        if x is not None and x._version != self.version:
            raise RuntimeError(
                f"the input {tuple(self.shape)} of a checkpointed block was modified by an inplace operation "
                f"after its forward (version {x._version}, expected {self.version}): its gradients would be wrong"
            )


class _RecomputeState:
    """RNG and autocast state of the forward, restored around the recomputation."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))

    @contextlib.contextmanager
    def restored(self):
        devices = [self.device] if self.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            torch.set_rng_state(self.cpu_rng)
            if self.cuda_rng is not None:
                torch.cuda.set_rng_state(self.cuda_rng, self.device)
            enabled, dtype = self.autocast
            with torch.autocast(self.device.type, dtype=dtype, enabled=enabled):
                yield


class _CheckpointedBlock(torch.autograd.Function):
    """y = run(x, *tensors), keeping only x (maybe offloaded) and the tensors; `tensors` are the other
    arguments that need a gradient, then the block's trainable parameters (used by run as they are)."""

    @staticmethod
    def forward(ctx, run: Callable[..., torch.Tensor], offload: bool, n_args: int, x: torch.Tensor, *tensors):
        ctx.run = run
        ctx.recompute = _RecomputeState(x.device)
        with torch.no_grad():
            y = run(x, *tensors[:n_args])
        ctx.saved_input = _SavedInput(x, offload)
        ctx.save_for_backward(ctx.saved_input.stored, *tensors[:n_args])
        ctx.saved_input.stored = None  # the engine holds it now
        ctx.params = tensors[n_args:]
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        saved: _SavedInput = ctx.saved_input
        stored, *args = ctx.saved_tensors
        x = saved.take(stored)
        prev = saved.prev() if saved.prev is not None else None
        if prev is not None:
            prev.prefetch()  # the next block to backpropagate: its input comes in during this one
        needs = ctx.needs_input_grad[3:]  # x, the arguments, the parameters
        with torch.enable_grad(), ctx.recompute.restored():
            inputs = [t.detach().requires_grad_(need) for t, need in zip([x, *args], needs)]
            y = ctx.run(*inputs)
        wrt = [t for t, need in zip([*inputs, *ctx.params], needs) if need]
        grads = iter(torch.autograd.grad(y, wrt, dy, allow_unused=True) if wrt else [])
        return (None, None, None, *(next(grads) if need else None for need in needs))


def _needs_backward(x: torch.Tensor, args: tuple, params: tuple) -> bool:
    """Whether autograd records this call: grad mode on and some input (x, an argument tensor or a
    parameter) requires a gradient. Otherwise nothing is kept and nothing is offloaded."""
    grad_inputs = [x, *(a for a in args if isinstance(a, torch.Tensor))]
    return torch.is_grad_enabled() and (bool(params) or any(t.requires_grad for t in grad_inputs))


def checkpoint_block(block: nn.Module, x: torch.Tensor, *args, offload: bool = False) -> torch.Tensor:
    """block(x, *args) under activation checkpointing; only x is kept for the backward.

    offload=False: torch's non-reentrant checkpoint (x stays on the device).
    offload=True: our autograd function; on CUDA x waits in pinned CPU memory (copied on a side
    stream, overlapped with compute) and is brought back, one block ahead, in the backward. The
    other arguments (rotary angles, masks) are shared by all blocks and stay where they are; those
    that require a gradient get it, as under torch's checkpoint. Without autograd (no_grad,
    inference_mode, nothing requiring a gradient) the block just runs: nothing is kept or copied.
    """
    if not offload:
        return checkpoint(block, x, *args, use_reentrant=False)
    params = tuple(p for p in block.parameters() if p.requires_grad)
    if not _needs_backward(x, args, params):
        return block(x, *args)
    grad_at = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]

    def run(inp: torch.Tensor, *grad_args: torch.Tensor) -> torch.Tensor:
        full = list(args)
        for i, a in zip(grad_at, grad_args):
            full[i] = a
        return block(inp, *full)

    y = _CheckpointedBlock.apply(run, True, len(grad_at), x, *(args[i] for i in grad_at), *params)
    if not isinstance(y, torch.Tensor) or y.grad_fn is None:
        return y  # nothing needs a gradient: no backward will come
    _link_to_previous_block(y.grad_fn.saved_input, x, y)
    return y


def _link_to_previous_block(saved: _SavedInput, x: torch.Tensor, y: torch.Tensor) -> None:
    """Block i's input is the very tensor block i-1 returned: then block i's backward prefetches
    block i-1's input."""
    last = getattr(_chain, "last", None)
    before = last() if last is not None else None
    if before is not None and before.output is not None and before.output() is x:
        saved.prev = weakref.ref(before)
    saved.output = weakref.ref(y)
    _chain.last = weakref.ref(saved)


__all__ = ["checkpoint_block"]
