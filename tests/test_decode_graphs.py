"""DecodeGraphs' bookkeeping on the CPU, against a stand-in for torch's CUDA graph API that keeps
torch's pool rule: a pool lives while a graph uses it or a tensor allocated in it lives, and capturing
into a pool whose graphs are all gone while it still lives fails ('use_count > 0', as on the H100).
The real capture runs in tests/test_gpu.py."""

from __future__ import annotations

import itertools

import pytest
import torch

from minigrpo.sampling import decode_graphs
from minigrpo.sampling.decode_graphs import DecodeGraphs


class FakeCuda:
    """graph_pool_handle / CUDAGraph / graph / Stream / stream / current_stream, with pool use counts."""

    def __init__(self):
        self.ids = itertools.count(1)
        self.use_count: dict[int, int] = {}  # pools that still live (every capture leaves a tensor in it)
        self.capturing = False
        self.replays = 0
        fake = self

        class Graph:
            def __init__(self):
                self.pool = None

            def replay(self):
                fake.replays += 1

            def __del__(self):
                if self.pool is not None:
                    fake.use_count[self.pool] -= 1

        class Capture:
            def __init__(self, graph, pool):
                self.graph, self.pool = graph, pool

            def __enter__(self):
                if fake.use_count.get(self.pool) == 0:
                    raise RuntimeError("it->second->use_count > 0 INTERNAL ASSERT FAILED")
                fake.use_count[self.pool] = fake.use_count.get(self.pool, 0) + 1
                self.graph.pool, fake.capturing = self.pool, True

            def __exit__(self, *exc):
                fake.capturing = False

        class Stream:
            def wait_stream(self, other):
                pass

        self.CUDAGraph, self.Capture, self.Stream = Graph, Capture, Stream

    def install(self, monkeypatch):
        cuda = decode_graphs.torch.cuda
        monkeypatch.setattr(cuda, "graph_pool_handle", lambda: (next(self.ids), 0))
        monkeypatch.setattr(cuda, "CUDAGraph", self.CUDAGraph)
        monkeypatch.setattr(cuda, "graph", lambda graph, pool=None: self.Capture(graph, pool))
        monkeypatch.setattr(cuda, "Stream", self.Stream)
        monkeypatch.setattr(cuda, "stream", lambda s: torch.no_grad())  # any context manager
        monkeypatch.setattr(cuda, "current_stream", self.Stream)


@pytest.fixture
def fake(monkeypatch):
    f = FakeCuda()
    f.install(monkeypatch)
    return f


def test_each_bucket_is_warmed_up_captured_once_then_replayed(fake):
    calls = []
    graphs = DecodeGraphs()
    for bucket in (8, 8, 8, 16, 16, 8):
        graphs.run(bucket, lambda b=bucket: calls.append((b, fake.capturing)))
    # per new bucket: one real step outside the capture, then the captured one; the rest replay
    assert calls == [(8, False), (8, True), (16, False), (16, True)]
    assert graphs.captures == 2 and fake.replays == 4
    assert graphs.capture_s > 0.0  # the rollout's stats report it: the part of a decode loop not replayed


def test_after_a_reset_graphs_are_captured_anew_in_a_new_pool(fake):
    graphs = DecodeGraphs()
    graphs.run(8, lambda: None)
    first_pool = graphs.pool
    graphs.reset()
    assert graphs.pool != first_pool and not graphs.graphs
    graphs.run(8, lambda: None)  # the stand-in raises if this captured into the emptied pool
    assert graphs.captures == 2 and fake.replays == 0
    assert fake.use_count == {first_pool: 0, graphs.pool: 1}


def test_the_stand_in_fails_as_torch_does_when_the_pool_is_reused(fake):
    """Guards the test above: dropping the graphs but keeping the pool is the failure seen on the GPU."""
    graphs = DecodeGraphs()
    graphs.run(8, lambda: None)
    graphs.graphs.clear()
    with pytest.raises(RuntimeError, match="use_count > 0"):
        graphs.run(8, lambda: None)
