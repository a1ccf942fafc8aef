"""Prompt lookup / n-gram drafter: find earlier occurrences of the context's last k tokens and
propose what followed them, several matches as branches of one tree.

For k from ``max_ngram`` down to ``min_ngram`` every earlier position whose k tokens equal the
context's last k yields a continuation of up to ``max_depth`` tokens; longer n-grams come first,
then more recent matches. Continuations become root-to-leaf paths of the tree (shared
prefixes merged), added in that order until the node budget is spent. A node's probability is
the share of the continuations through its parent that also pass through it, so C_i is the
fraction of matches agreeing with branch i (1.0 for a single match). The drafter is
deterministic: in sampling mode its children count as point masses.

The search is a vectorised compare over the whole context (O(len * k), ~10 us per 1k tokens);
an incremental index did not pay at the context lengths we run (<= 4k).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ...errors import ConfigError
from ..tree import TokenTree
from .base import StopFn, TreeBudget

__all__ = ["NgramDrafter", "find_continuations"]


def find_continuations(context: np.ndarray, k: int, length: int) -> list[list[int]]:
    """Continuations (most recent match first) of earlier occurrences of context[-k:].

    context: int [L]. A match at position i (context[i:i+k] == context[-k:], i + k < L) yields
    context[i+k : i+k+length]; the suffix itself never counts as a match.
    """
    L = len(context)
    if k <= 0 or L <= k:
        return []
    windows = np.lib.stride_tricks.sliding_window_view(context[:L - 1], k)  # [L-k, k]
    hits = np.flatnonzero((windows == context[L - k:]).all(axis=1))
    return [context[i + k:i + k + length].tolist() for i in hits[::-1]]


class NgramDrafter:
    name = "ngram"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, max_branches: int = 4,
                 shorter_fill: bool = True) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ConfigError(f"NgramDrafter: need 1 <= min_ngram <= max_ngram, got "
                              f"min_ngram={min_ngram!r}, max_ngram={max_ngram!r}")
        if max_branches < 1:
            raise ConfigError(f"NgramDrafter.max_branches must be >= 1, got {max_branches!r}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.max_branches = max_branches
        self.shorter_fill = shorter_fill  # fill spare branches with matches of shorter n-grams

    def continuations(self, context: Sequence[int], depth: int) -> list[list[int]]:
        """Distinct continuations in priority order, at most ``max_branches``."""
        ctx = np.asarray(context, dtype=np.int64)
        out: list[list[int]] = []
        seen: set[tuple[int, ...]] = set()
        for k in range(self.max_ngram, self.min_ngram - 1, -1):
            found = False
            for cont in find_continuations(ctx, k, depth):
                key = tuple(cont)
                if cont and not any(s[:len(key)] == key for s in seen):
                    seen.add(key)
                    out.append(cont)
                    found = True
                    if len(out) >= self.max_branches:
                        return out
            if found and not self.shorter_fill:
                break
        return out

    def propose(self, context: Sequence[int], budget: TreeBudget,
                stop: StopFn | None = None) -> TokenTree:
        conts = self.continuations(context, budget.max_depth)
        # Count continuations through every path prefix (trie), then emit in priority order.
        through: dict[tuple[int, ...], int] = {}
        for c in conts:
            for d in range(1, len(c) + 1):
                through[tuple(c[:d])] = through.get(tuple(c[:d]), 0) + 1
        tree = TokenTree()
        index: dict[tuple[int, ...], int] = {}
        for c in conts:
            parent = -1
            for d in range(1, len(c) + 1):
                key = tuple(c[:d])
                if key not in index:
                    if len(tree) >= budget.max_nodes:
                        return tree
                    up = through[key[:-1]] if d > 1 else len(conts)
                    index[key] = tree.add(key[-1], parent, through[key] / up, self.name)
                parent = index[key]
        return tree

    def observe(self, result: Any) -> None:
        """Nothing to learn: the context already holds every accepted token."""
