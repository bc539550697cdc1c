"""The decode steps' KV cache: pre-allocated keys and values for every layer, and the prompt slots
that the rows of one group share (stored once per prompt, read once per group by decode attention)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from minigrpo.kernels.flash_decode import Prefix, with_prefix
from minigrpo.kernels.prefix_attention import prefix_rows

from .args import ModelArgs


@dataclass
class SharedPrefix:
    """Keys and values of the first slots of every row, stored once per group of rows that share
    them (the G completions of one prompt): row b's first `length` slots are row group[b] of k, v.
    With max_rows (>= the rows of any prefix row: the group size), `rows` lists each prefix row's
    rows, and decode attention reads a prefix once per group instead of once per row."""

    k: torch.Tensor  # (L, P, Hkv, Tp, Dh)
    v: torch.Tensor  # (L, P, Hkv, Tp, Dh)
    group: torch.Tensor  # (B,) int64: the prefix row of each cache row
    max_rows: int | None = None

    def __post_init__(self) -> None:
        self.rows = None if self.max_rows is None else prefix_rows(self.group, self.k.shape[1], self.max_rows)

    @property
    def length(self) -> int:
        return self.k.shape[3]


class KVCache:
    """Pre-allocated keys and values for every layer: k, v (L, B, Hkv, S_max - first, Dh).

    Slots are columns of a left-padded batch: slot j of every row holds that row's j-th column.
    With a `prefix`, slots [0, first) of the rows live there (read-only, shared) and k, v hold
    slots [first, max_len): slot j is column j - first.
    """

    def __init__(
        self, args: ModelArgs, batch_size: int, max_len: int, *, dtype, device, prefix: SharedPrefix | None = None
    ) -> None:
        self.prefix = prefix
        self.first = 0 if prefix is None else prefix.length
        assert self.first <= max_len, f"a {self.first}-slot prefix in a {max_len}-slot cache"
        shape = (args.n_layers, batch_size, args.n_kv_heads, max_len - self.first, args.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def layer_prefix(self, layer: int) -> Prefix | None:
        """The shared prefix of one layer as decode_attention takes it, or None."""
        p = self.prefix
        return None if p is None else (p.k[layer], p.v[layer], p.group)

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, cache_position: torch.Tensor, kv_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, Dh) at slots `cache_position` (T,), all past the prefix; return slots
        [0, kv_len) (B, Hkv, kv_len, Dh) each (with a prefix, a copy that gathers it)."""
        columns = cache_position - self.first if self.first else cache_position
        self.k[layer].index_copy_(2, columns, k)
        self.v[layer].index_copy_(2, columns, v)
        return with_prefix(self.k[layer], self.v[layer], self.layer_prefix(layer), kv_len)

    def keep_rows(self, keep: torch.Tensor, filled: int, chunk: int = 32) -> None:
        """Keep only the rows `keep` (n',) ascending, moved down to [0, n') in place (their slots
        [first, filled): nothing past `filled` was written), `chunk` rows per copy, so memory never
        grows; k and v become views of the first n' rows."""
        k, v, cols = self.k, self.v, max(0, filled - self.first)  # (L, n, Hkv, S, Dh)
        for i in range(0, len(keep), chunk):  # keep[j] >= j: a chunk never overwrites a later source
            src = keep[i : i + chunk]
            k[:, i : i + len(src), :, :cols] = k[:, src, :, :cols]  # the gather copies first
            v[:, i : i + len(src), :, :cols] = v[:, src, :, :cols]
        self.k, self.v = k[:, : len(keep)], v[:, : len(keep)]
        if self.prefix is not None:
            p = self.prefix
            # a prefix read per group pays for itself only over well-filled groups (H100, long-tailed
            # 64x8 rollout: 8% slower than per row once most rows had finished); with fewer than half
            # of max_rows left per prefix row on average, read it per row from here on
            full = p.max_rows is not None and 2 * len(keep) >= p.max_rows * p.k.shape[1]
            self.prefix = replace(p, group=p.group[keep], max_rows=p.max_rows if full else None)
