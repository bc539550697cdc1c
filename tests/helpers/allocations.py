"""Test helper: count the bytes of tensor storages allocated under a TorchDispatchMode.

The CPU memory tests (tests/test_memory.py) measure activations, optimizer state and whole update
phases with it where torch.cuda's counters are unavailable, and hold minigrpo.memory's estimates
against the numbers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class AllocationTracker(TorchDispatchMode):
    """Bytes of the tensor storages created while active: `live` now, `peak` at most.

    A storage is counted from the op that returns it until it is freed (checked by weak reference
    before every op and when `live` is read). Storages made before entering (parameters, inputs)
    are not counted, nor views of them, nor an op's internal workspaces. Works on any device; the
    CPU tests use it where torch.cuda's counters are unavailable.
    """

    def __init__(self) -> None:
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef

        self._ref = StorageWeakRef
        self._live: dict[int, tuple[Any, int, Any, tuple[int, ...]]] = {}  # ref, bytes, op, shape
        self._bytes = 0
        self.peak = 0

    @property
    def live(self) -> int:
        """Bytes alive now."""
        self._prune()
        return self._bytes

    def _prune(self) -> None:
        dead = [k for k, (ref, *_) in self._live.items() if ref.expired()]
        for k in dead:
            self._bytes -= self._live.pop(k)[1]

    def live_tensors(self) -> list[tuple[int, str, tuple[int, ...]]]:
        """(bytes, creating op, shape) of every storage alive now, largest first (for inspection)."""
        self._prune()
        return sorted(((n, str(op), shape) for _, n, op, shape in self._live.values()), key=lambda x: -x[0])

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._prune()
        out = func(*args, **(kwargs or {}))
        inputs = {
            self._ref(t.untyped_storage()).cdata
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and t.device.type != "meta"
        }
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                ref = self._ref(storage)
                if ref.cdata not in self._live and ref.cdata not in inputs and storage.nbytes():  # views: not new
                    self._live[ref.cdata] = (ref, storage.nbytes(), func, tuple(t.shape))
                    self._bytes += storage.nbytes()
        self.peak = max(self.peak, self._bytes)
        return out


class LargestOutput(TorchDispatchMode):
    """Records the largest tensor (in bytes) produced by any op while active: `nbytes` and its `op`."""

    def __init__(self) -> None:
        super().__init__()
        self.nbytes, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() * t.element_size() > self.nbytes:
                self.nbytes, self.op = t.numel() * t.element_size(), str(func)
        return out
