"""The token tree passed from drafters to the scorer and verifier.

A tree is stored flattened in topological order: node ``i``'s parent has a smaller index, the
virtual root (the last committed token, not part of the tree) is parent ``-1``. Siblings share
a depth and hence a rotary position (``past_len + depth``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class TokenTree:
    tokens: list[int] = field(default_factory=list)       # token id per node
    parents: list[int] = field(default_factory=list)      # parent index per node, -1 = root
    probs: list[float] = field(default_factory=list)      # draft probability of the node's token
    sources: list[str] = field(default_factory=list)      # which drafter proposed the node
    # Optional, for lossless sampling (runtime/sampling.py): draft_dists[j] is the distribution
    # float [vocab] that node j's children (j = -1: the root's) were *sampled* from, without
    # replacement, in child order. Parents absent here had their children chosen
    # deterministically; the acceptance rule then treats each child as a point mass.
    draft_dists: dict[int, np.ndarray] = field(default_factory=dict, compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, token: int, parent: int, prob: float = 1.0, source: str = "") -> int:
        """Append a node (parent must already exist); returns its index. Reuses an identical
        existing child instead of adding a duplicate."""
        if parent >= len(self.tokens) or parent < -1:
            raise ValueError(f"parent {parent} out of range for a tree of {len(self.tokens)} nodes")
        for j in self.children(parent):
            if self.tokens[j] == token:
                self.probs[j] = max(self.probs[j], prob)
                return j
        self.tokens.append(int(token))
        self.parents.append(int(parent))
        self.probs.append(float(prob))
        self.sources.append(source)
        return len(self.tokens) - 1

    def children(self, node: int) -> list[int]:
        return [j for j, p in enumerate(self.parents) if p == node]

    def leaves(self) -> list[int]:
        """Nodes without children, in index order."""
        has_child = set(self.parents)
        return [i for i in range(len(self.tokens)) if i not in has_child]

    def depths(self) -> np.ndarray:
        """Depth per node, root children have depth 0. int64 [n]."""
        d = np.zeros(len(self.tokens), dtype=np.int64)
        for i, p in enumerate(self.parents):
            d[i] = 0 if p < 0 else d[p] + 1
        return d

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root's child down to ``node``."""
        path = []
        while node >= 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def confidence(self, node: int) -> float:
        """C_i: product of draft probabilities along the path to ``node``."""
        c = 1.0
        for j in self.path_to(node):
            c *= self.probs[j]
        return c

    def ancestor_mask(self) -> np.ndarray:
        """bool [n, n]: mask[i, j] is True when node j is node i or one of its ancestors."""
        n = len(self.tokens)
        m = np.zeros((n, n), dtype=bool)
        for i, p in enumerate(self.parents):
            m[i, i] = True
            if p >= 0:
                m[i] |= m[p]
        return m

    @classmethod
    def chain(cls, tokens: list[int], probs: list[float] | None = None, source: str = "") -> "TokenTree":
        t = cls()
        for k, tok in enumerate(tokens):
            t.add(tok, k - 1, 1.0 if probs is None else probs[k], source)
        return t
