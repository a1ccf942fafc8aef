"""Token Recycling: reuse the target's past top-k candidates as a draft.

An adjacency matrix ``adj`` int32 [vocab, k] holds, for every token, the target's top-k next
tokens the last time the target ran on that token (-1: never seen). Every verification
updates the rows of all tree nodes (and the root, when the result carries its top-k) from the
target's top-k at those nodes. A proposal fills a fixed static tree shape breadth-first from
the last context token: a shape node (parent, rank) gets token ``adj[token of parent, rank]``.
Memory: vocab * k * 4 bytes (49152 x 8 -> 1.5 MiB). The table outlives a generation (what the
target said in one call drafts the next); ``forget`` empties it. Measured (SmolLM2, chains, 96
tokens): 0.19-0.46 accepted tokens per verification on a prompt the table has not seen, 0.58-0.65
on one it has seen generated before, which is why benchmarks reset it before every run.
With a ``prior`` (runtime/recycle_prior.py: the target's top-k after every vocabulary token in
a neutral context, stored in the bundle), rows start from it instead of empty, and ``forget``
returns to it: a token the target has not run on yet drafts its prior row instead of nothing.

The static shape is built once: the M root-to-node paths with the largest product of per-rank
weights (a positional acceptance prior, rank 0 most likely), found greedily with a heap. A
shape node's draft probability is its rank weight, so C_i orders branches sensibly for the
policy and for tree merging. Deterministic: in sampling mode children count as point masses.
"""
from __future__ import annotations

import heapq
from typing import Any, Sequence

import numpy as np

from ...errors import ConfigError
from ..tree import TokenTree
from .base import StopFn, TreeBudget

__all__ = ["RecyclingDrafter", "static_shape", "DEFAULT_RANK_WEIGHTS"]

DEFAULT_RANK_WEIGHTS = (0.6, 0.15, 0.07, 0.04, 0.03, 0.02, 0.015, 0.01)


def static_shape(num_nodes: int, max_depth: int, rank_weights: Sequence[float]
                 ) -> list[tuple[int, int]]:
    """(parent shape index or -1, rank) per node, topological and in decreasing path weight."""
    if any(not 0 < w < 1 for w in rank_weights):
        raise ConfigError(f"static_shape: rank weights must be in (0, 1), got {list(rank_weights)}")
    shape: list[tuple[int, int]] = []
    depth: list[int] = []
    heap = [(-w, r, -1, r) for r, w in enumerate(rank_weights)]  # (-weight, tiebreak, parent, rank)
    heapq.heapify(heap)
    counter = len(rank_weights)
    while heap and len(shape) < num_nodes:
        negw, _, parent, rank = heapq.heappop(heap)
        d = 0 if parent < 0 else depth[parent] + 1
        if d >= max_depth:
            continue
        shape.append((parent, rank))
        depth.append(d)
        me = len(shape) - 1
        for r, w in enumerate(rank_weights):
            heapq.heappush(heap, (negw * w, counter, me, r))
            counter += 1
    return shape


class RecyclingDrafter:
    name = "recycle"

    def __init__(self, vocab_size: int, k: int = 8, shape_nodes: int = 64, shape_depth: int = 8,
                 rank_weights: Sequence[float] = DEFAULT_RANK_WEIGHTS, prior: np.ndarray | None = None) -> None:
        if vocab_size < 1 or not 1 <= k <= len(rank_weights):
            raise ConfigError(f"RecyclingDrafter: need vocab_size >= 1 and 1 <= k <= "
                              f"{len(rank_weights)} (rank weights given), got {vocab_size!r}, {k!r}")
        if prior is not None and (prior.ndim != 2 or prior.shape[0] != vocab_size or prior.shape[1] < k):
            raise ConfigError(f"RecyclingDrafter: a prior of shape {prior.shape} does not fit "
                              f"vocab_size={vocab_size}, k={k}")
        self.vocab_size, self.k = vocab_size, k
        self.weights = tuple(float(w) for w in rank_weights[:k])
        # the prior (often a read-only memory map of the bundle's file) is kept to forget back to
        self.prior = None if prior is None else prior[:, :k]
        self.adj = np.empty((vocab_size, k), dtype=np.int32)
        self.forget()  # fills it: the prior, or -1 everywhere
        self.shape = static_shape(shape_nodes, shape_depth, self.weights)

    @property
    def nbytes(self) -> int:
        return self.adj.nbytes

    def forget(self) -> None:
        """Forget every recorded top-k (a fresh table, as after loading: the prior, or empty)."""
        if self.prior is None:
            self.adj.fill(-1)
        else:
            self.adj[:] = self.prior

    def update(self, tokens: np.ndarray, topk: np.ndarray) -> None:
        """adj[tokens[i]] = topk[i, :k] (later rows win on repeated tokens).
        tokens: int [n]; topk: int [n, >=k], best first."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        topk = np.asarray(topk)
        if topk.ndim != 2 or topk.shape[0] != tokens.size or topk.shape[1] < self.k:
            raise ValueError(f"RecyclingDrafter.update: top-k ids of shape {topk.shape} do not fit "
                             f"{tokens.size} tokens with k={self.k}")
        self.adj[tokens] = topk[:, :self.k]

    def observe(self, result: Any) -> None:
        """Update from a runtime.verify.VerifyResult: the target's top-k after the root
        (``root_token``) and after every tree node (``topk(k)``, root row first)."""
        topk = result.topk(self.k)
        tokens = np.asarray([result.root_token] + list(result.tree.tokens), dtype=np.int64)
        self.update(tokens, topk)

    @property
    def prompt_topk(self) -> int:
        """How many of the target's top tokens after each prompt token it learns from (the
        engine's prefill then computes logits at each distinct token's last position;
        observe_prompt)."""
        return self.k

    def observe_prompt(self, tokens: Sequence[int], topk: np.ndarray) -> None:
        """Learn the target's top-k after each prompt token (a hot start: the table would
        otherwise know only what this generation's own passes have shown it)."""
        self.update(np.asarray(tokens, dtype=np.int64), topk)

    def propose(self, context: Sequence[int], budget: TreeBudget,
                stop: StopFn | None = None) -> TokenTree:
        tree = TokenTree()
        if not len(context):
            return tree
        root = int(context[-1])
        adj = self.adj
        at: list[int] = []  # shape index -> tree index (-2: not placed)
        depth: list[int] = []
        for parent, rank in self.shape:
            if len(tree) >= budget.max_nodes:
                break
            pt = -1 if parent < 0 else at[parent]
            d = 0 if parent < 0 else depth[parent] + 1
            depth.append(d)
            if pt == -2 or d >= budget.max_depth:
                at.append(-2)
                continue
            src = root if pt < 0 else tree.tokens[pt]
            tok = int(adj[src, rank])
            if tok < 0:
                at.append(-2)
                continue
            at.append(tree.add(tok, pt, self.weights[rank], self.name))
        return tree
