"""CUDA graphs of the sampler's decode step: one per KV-length bucket, replayed for every step in it.

A decode step of a small model is hundreds of tiny kernels; launching them from Python costs more than
running them. Capturing the step once per bucket and replaying it turns each step into one launch.

A capture must not stall the GPU. The host runs ahead of it (a replay is one launch, a step
milliseconds of GPU work), so a new bucket's graph can be recorded while the GPU still works through
the steps queued before it, if the capture does not wait for them: `torch.cuda.graph` synchronizes
the device and empties the allocator's cache first, so the captures here call `capture_begin` /
`capture_end` themselves. Only a loop's first capture runs its step for real first (what initialises
lazily, such as the side stream's cuBLAS workspace, must not do so inside a capture); the others
record the step without running it, then replay it. They record in relaxed mode, so that Triton may
compile and load a kernel variant that a new batch size or KV length needs while recording.

The graphs of one decode loop share a private memory pool. `reset` (after a compaction replaced the
buffers the graphs read and write) drops them and starts a NEW pool: torch keeps a pool whose graphs
are all gone alive while tensors allocated in it still live, and capturing into such a pool again
fails an allocator assertion ('use_count > 0' in CUDACachingAllocator). Seen on an H100 when an
evaluation compacted its batch while a buffer from the first capture was still referenced.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


class DecodeGraphs:
    """Replay the captured step of a bucket, or capture it (after one real step, the loop's first) and replay it."""

    def __init__(self) -> None:
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.side = torch.cuda.Stream()  # captures run off the default stream, as CUDA requires
        self.captures = 0  # graphs captured so far
        self.capture_s = 0.0  # host seconds spent in them: their recording (and the first one's real step)

    def run(self, bucket: int, step: Callable[[], None]) -> None:
        """One decode step of `bucket` (the KV length it attends over)."""
        graph = self.graphs.get(bucket)
        if graph is None:
            start, warm_up = time.perf_counter(), self.captures == 0
            graph = self.graphs[bucket] = self._capture(step, warm_up)
            self.captures += 1
            self.capture_s += time.perf_counter() - start
            if warm_up:
                return  # the warm-up was this step
        graph.replay()

    def _capture(self, step: Callable[[], None], warm_up: bool) -> torch.cuda.CUDAGraph:
        main = torch.cuda.current_stream()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(self.side):
            if warm_up:  # a real step, after the work queued before it
                self.side.wait_stream(main)
                step()
            graph.capture_begin(pool=self.pool, capture_error_mode="relaxed")
            try:
                step()
            finally:
                graph.capture_end()
        main.wait_stream(self.side)
        return graph

    def reset(self) -> None:
        """Forget every graph (their buffers were replaced) and capture the next ones into a new pool."""
        self.graphs.clear()
        self.pool = torch.cuda.graph_pool_handle()
