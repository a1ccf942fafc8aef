"""The committed KV cache of one model, preallocated for ``max_context`` tokens.

Layout (chosen by measurement, see session.py): one float buffer of ``2 * layers`` rows (K and
V of each layer, the order of the graph's present outputs) of ``kv_heads * max_context *
head_dim`` elements, zeros whose pages become resident only as the cache fills
(memory.lazy_zeros: a mapping of its own, advised against transparent huge pages). The
first ``kv_heads * capacity * head_dim`` elements of a row are viewed as a C-contiguous
``[1, kv_heads, capacity, head_dim]`` array that is fed to the graph as ``past_key.{i}`` /
``past_value.{i}`` *without a copy*; one NumPy operation writes or gathers all layers.
Positions at or beyond the valid length are padding that the attention bias masks out.
``capacity`` grows in whole blocks of ``block`` tokens, by at least an eighth; growing re-lays
the rows out in place (a copy of the cache every few blocks instead of a concatenation per
token). Padding always holds finite numbers (zeros or old K/V), so a masked column contributes
exactly 0 to attention.

Positions ``[0, length)`` are the committed tokens. The runner may write uncommitted
("scratch") entries after ``length``; :meth:`gather` moves an accepted path of them down.
"""
from __future__ import annotations

import ctypes
from typing import Sequence

import numpy as np

from .memory import lazy_zeros


class KVCache:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, max_context: int,
                 block: int = 64, dtype: np.dtype = np.float32) -> None:
        if min(num_layers, kv_heads, head_dim, max_context, block) <= 0:
            raise ValueError("KVCache: all sizes must be positive")
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.max_context, self.block = max_context, block
        # Row 2i: layer i's K, row 2i+1: its V.
        # zeros whose pages become resident only as the cache fills (memory.lazy_zeros: its own
        # mapping, no huge pages: else each row's first token made 2 MiB of it resident)
        self._buf = lazy_zeros((2 * num_layers, kv_heads * max_context * head_dim), dtype)
        self.length = 0  # committed tokens
        self.capacity = 0
        self.keys: list[np.ndarray] = []  # per layer [1, kv_heads, capacity, head_dim] views
        self.values: list[np.ndarray] = []
        self.layout_version = 0  # bumps whenever the views above are replaced
        self._set_capacity(min(block, max_context))

    # -- layout ------------------------------------------------------------------------------
    def _set_capacity(self, cap: int) -> None:
        old, buf = self.capacity, self._buf
        if old and self.kv_heads > 1:
            row_bytes, hd, item = buf.strides[0], self.head_dim, buf.itemsize
            base = buf.ctypes.data
            # Head h moves from h*old*hd to h*cap*hd. From the last head down, no head is
            # overwritten before it has moved; memmove handles the overlap within a head
            # without the temporary copy numpy makes for overlapping slices (2x faster).
            for r in range(buf.shape[0]):
                row = base + r * row_bytes
                for h in range(self.kv_heads - 1, 0, -1):
                    ctypes.memmove(row + h * cap * hd * item, row + h * old * hd * item, old * hd * item)
        self.capacity = cap
        self._all = buf[:, :self.kv_heads * cap * self.head_dim].reshape(
            2 * self.num_layers, self.kv_heads, cap, self.head_dim)  # [2L, H, C, D]
        self.keys = [self._all[2 * i][None] for i in range(self.num_layers)]
        self.values = [self._all[2 * i + 1][None] for i in range(self.num_layers)]
        self.layout_version += 1

    def ensure(self, total: int) -> bool:
        """Make room for ``total`` positions (committed + scratch + new). Returns True when the
        views changed (the caller must rebind them)."""
        if total > self.max_context:
            raise ValueError(f"KVCache: {total} positions exceed max_context {self.max_context}")
        if total <= self.capacity:
            return False
        # Geometric growth (by an eighth, at least one block): a re-layout copies the cache, so
        # its cost per generated token stays constant however long the context; the padding it
        # leaves costs at most ~1/8 more attention columns.
        want = max(total, self.capacity + self.capacity // 8)
        self._set_capacity(min(self.max_context, -(-want // self.block) * self.block))
        return True

    # -- contents ----------------------------------------------------------------------------
    def write_interleaved(self, pos: int, kv: list[np.ndarray]) -> None:
        """Store ``[k0, v0, k1, v1, ...]`` (each ``[1, kv_heads, n, head_dim]``, the graph's
        present outputs in order) at positions ``pos..pos+n``."""
        n = kv[0].shape[2]
        if pos + n > self.capacity:
            raise ValueError(f"KVCache.write: positions {pos}..{pos + n} beyond capacity {self.capacity}")
        self._all[:, :, pos:pos + n] = np.concatenate(kv, axis=0)

    def write(self, pos: int, new_keys: list[np.ndarray], new_values: list[np.ndarray]) -> None:
        """Store per-layer ``[1, kv_heads, n, head_dim]`` arrays at positions ``pos..pos+n``."""
        self.write_interleaved(pos, [a for kv in zip(new_keys, new_values) for a in kv])

    def append(self, new_keys: list[np.ndarray], new_values: list[np.ndarray],
               index: np.ndarray | None = None) -> None:
        """Commit rows ``index`` (all if None) of per-layer ``[1, kv_heads, n, head_dim]``
        arrays after the committed tokens (gather by node index)."""
        if index is not None:
            index = np.asarray(index, dtype=np.int64)
            new_keys = [k[:, :, index] for k in new_keys]
            new_values = [v[:, :, index] for v in new_values]
        n = new_keys[0].shape[2]
        self.ensure(self.length + n)
        self.write(self.length, new_keys, new_values)
        self.length += n

    def gather(self, positions: Sequence[int]) -> None:
        """Commit the entries at cache ``positions`` (all >= length, increasing): they move to
        ``length, length+1, ...`` and become committed."""
        pos = [int(p) for p in positions]
        k = len(pos)
        if k == 0:
            return
        if pos[0] < self.length or pos[-1] >= self.capacity or any(b <= a for a, b in zip(pos, pos[1:])):
            raise ValueError(f"KVCache.gather: positions {pos} must increase, "
                             f"within [{self.length}, {self.capacity})")
        start = self.length
        if pos[-1] != start + k - 1:  # not already in place (a chain commits for free)
            self._all[:, :, start:start + k] = self._all[:, :, pos]
        self.length = start + k

    def truncate(self, length: int) -> None:
        """Drop committed tokens beyond ``length`` (a rollback). Capacity is kept."""
        if not 0 <= length <= self.length:
            raise ValueError(f"KVCache.truncate: length {length} not in [0, {self.length}]")
        self.length = length

    def nbytes_used(self) -> int:
        """Bytes of the cache that hold committed tokens (all layers, K and V)."""
        return 2 * self.num_layers * self.kv_heads * self.length * self.head_dim * self._buf.itemsize
