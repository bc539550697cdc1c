"""CUDA graphs of the sampler's decode step: one per KV-length bucket, replayed for every step in it.

A decode step of a small model is hundreds of tiny kernels; launching them from Python costs more than
running them. Capturing the step once per bucket and replaying it turns each step into one launch.

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
    """Replay the captured step of a bucket, or run it once for real (warm-up) and capture it."""

    def __init__(self) -> None:
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.captures = 0  # graphs captured so far
        self.capture_s = 0.0  # host seconds spent in them: each is a real step plus its recording

    def run(self, bucket: int, step: Callable[[], None]) -> None:
        """One decode step of `bucket` (the KV length it attends over)."""
        graph = self.graphs.get(bucket)
        if graph is not None:
            graph.replay()
            return
        start = time.perf_counter()
        side = torch.cuda.Stream()  # warm-up off the default stream, as capture requires
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            step()
        self.graphs[bucket] = graph
        self.captures += 1
        self.capture_s += time.perf_counter() - start

    def reset(self) -> None:
        """Forget every graph (their buffers were replaced) and capture the next ones into a new pool."""
        self.graphs.clear()
        self.pool = torch.cuda.graph_pool_handle()
