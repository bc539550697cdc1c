"""DecodeGraphs' bookkeeping on the CPU, against a stand-in for torch's CUDA graph API that keeps
torch's pool rule: a pool lives while a graph uses it or a tensor allocated in it lives, and capturing
into a pool whose graphs are all gone while it still lives fails ('use_count > 0', as on the H100).
The stand-in also fails a capture that synchronizes the device or runs outside a side stream. The
real capture runs in tests/test_gpu.py."""

from __future__ import annotations

import contextlib
import itertools

import pytest

from minigrpo.sampling import decode_graphs
from minigrpo.sampling.decode_graphs import DecodeGraphs


class FakeCuda:
    """graph_pool_handle / CUDAGraph / Stream / stream / current_stream / synchronize, with pool use counts."""

    def __init__(self):
        self.ids = itertools.count(1)
        self.use_count: dict[int, int] = {}  # pools that still live (every capture leaves a tensor in it)
        self.capturing = False
        self.replays = 0
        self.modes: list[str] = []  # capture_error_mode of each capture
        self.waits: list[tuple[str, str]] = []  # (waiting stream, stream waited for)
        self.current = "main"
        fake = self

        class Graph:
            def __init__(self):
                self.pool = None

            def capture_begin(self, pool=None, capture_error_mode="global"):
                if fake.current == "main":
                    raise RuntimeError("cannot capture on the legacy default stream")
                if fake.use_count.get(pool) == 0:
                    raise RuntimeError("it->second->use_count > 0 INTERNAL ASSERT FAILED")
                fake.use_count[pool] = fake.use_count.get(pool, 0) + 1
                self.pool, fake.capturing = pool, True
                fake.modes.append(capture_error_mode)

            def capture_end(self):
                fake.capturing = False

            def replay(self):
                fake.replays += 1

            def __del__(self):
                if self.pool is not None:
                    fake.use_count[self.pool] -= 1

        class Stream:
            def __init__(self, name="side"):
                self.name = name

            def wait_stream(self, other):
                fake.waits.append((self.name, other.name))

        @contextlib.contextmanager
        def on(stream):
            before, fake.current = fake.current, stream.name
            try:
                yield
            finally:
                fake.current = before

        def synchronize():
            raise AssertionError("a capture must not wait for the GPU")

        self.CUDAGraph, self.Stream, self.on, self.synchronize = Graph, Stream, on, synchronize

    def install(self, monkeypatch):
        cuda = decode_graphs.torch.cuda
        monkeypatch.setattr(cuda, "graph_pool_handle", lambda: (next(self.ids), 0))
        monkeypatch.setattr(cuda, "CUDAGraph", self.CUDAGraph)
        monkeypatch.setattr(cuda, "Stream", self.Stream)
        monkeypatch.setattr(cuda, "stream", self.on)
        monkeypatch.setattr(cuda, "current_stream", lambda: self.Stream(self.current))
        monkeypatch.setattr(cuda, "synchronize", self.synchronize)
        monkeypatch.setattr(cuda, "empty_cache", self.synchronize)


@pytest.fixture
def fake(monkeypatch):
    f = FakeCuda()
    f.install(monkeypatch)
    return f


def test_each_bucket_is_captured_once_then_replayed_and_only_the_first_warms_up(fake):
    calls = []
    graphs = DecodeGraphs()
    for bucket in (8, 8, 8, 16, 16, 8):
        graphs.run(bucket, lambda b=bucket: calls.append((b, fake.capturing, fake.current)))
    # the first bucket: one real step on the side stream (after the work queued on main), then the
    # recorded one; the second bucket is only recorded, then replayed (that is its step); every
    # later step replays
    assert calls == [(8, False, "side"), (8, True, "side"), (16, True, "side")]
    assert graphs.captures == 2 and fake.replays == 1 + 4  # the second capture's step, four replays
    assert fake.waits == [("side", "main"), ("main", "side"), ("main", "side")]
    assert fake.modes == ["relaxed", "relaxed"]  # Triton may compile a new variant while recording
    assert graphs.capture_s > 0.0  # the rollout's stats report it: the part of a decode loop not replayed


def test_after_a_reset_graphs_are_captured_anew_in_a_new_pool(fake):
    graphs = DecodeGraphs()
    graphs.run(8, lambda: None)
    first_pool = graphs.pool
    graphs.reset()
    assert graphs.pool != first_pool and not graphs.graphs
    graphs.run(8, lambda: None)  # the stand-in raises if this captured into the emptied pool
    assert graphs.captures == 2 and fake.replays == 1  # recorded without a real step first, then replayed
    assert fake.use_count == {first_pool: 0, graphs.pool: 1}


def test_the_stand_in_fails_as_torch_does_when_the_pool_is_reused(fake):
    """Guards the test above: dropping the graphs but keeping the pool is the failure seen on the GPU."""
    graphs = DecodeGraphs()
    graphs.run(8, lambda: None)
    graphs.graphs.clear()
    with pytest.raises(RuntimeError, match="use_count > 0"):
        graphs.run(8, lambda: None)


def test_a_step_that_fails_while_recording_ends_the_capture(fake):
    """The error reaches the caller, and the capture is closed (not left open on the side stream)."""
    graphs = DecodeGraphs()
    graphs.run(8, lambda: None)

    def broken():
        raise ValueError("bad shape")

    with pytest.raises(ValueError, match="bad shape"):
        graphs.run(16, broken)
    assert not fake.capturing and 16 not in graphs.graphs
