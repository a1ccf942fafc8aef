"""Several drafters, one tree: merge their proposals within one budget.

Nodes from all trees are taken best first by ``weight[drafter] * C_i`` (C_i: the node's
confidence in its own tree), a node only after its parent, so within the node budget the
merged tree keeps the most promising prefixes of every proposal. Paths shared by several
drafters are merged (TokenTree.add reuses an identical child, keeping the larger probability).

Sampling: a parent keeps its ``draft_dists`` entry only when its merged children are exactly,
in order, a prefix of the children one source tree sampled from that distribution; otherwise
the children count as point masses, which the acceptance rule accepts losslessly whatever way
they were chosen.
"""
from __future__ import annotations

import heapq
from typing import Any, Sequence

from ...errors import ConfigError
from ..tree import TokenTree
from .base import Drafter, StopFn, TreeBudget, node_confidences

__all__ = ["CombinedDrafter", "merge_trees"]


def merge_trees(trees: Sequence[TokenTree], budget: TreeBudget,
                weights: Sequence[float] | None = None) -> TokenTree:
    weights = [1.0] * len(trees) if weights is None else list(weights)
    if len(weights) != len(trees):
        raise ConfigError(f"merge_trees: {len(weights)} weights for {len(trees)} trees")
    merged = TokenTree()
    heap: list[tuple[float, int, int]] = []  # (-score, tree, node)
    conf = [node_confidences(t) for t in trees]
    kids = []
    for t in trees:
        k: dict[int, list[int]] = {}
        for i, p in enumerate(t.parents):
            k.setdefault(p, []).append(i)
        kids.append(k)
    where: list[dict[int, int]] = [{-1: -1} for _ in trees]  # source node -> merged node
    depth: dict[int, int] = {-1: -1}

    def push(ti: int, parent: int) -> None:
        for c in kids[ti].get(parent, ()):
            heapq.heappush(heap, (-weights[ti] * conf[ti][c], ti, c))

    for ti in range(len(trees)):
        push(ti, -1)
    while heap and len(merged) < budget.max_nodes:
        _, ti, c = heapq.heappop(heap)
        t = trees[ti]
        mp = where[ti][t.parents[c]]
        if depth[mp] + 1 >= budget.max_depth:
            continue
        m = merged.add(t.tokens[c], mp, t.probs[c], t.sources[c])
        depth[m] = depth[mp] + 1
        where[ti][c] = m
        push(ti, c)
    _carry_dists(merged, trees, where, kids)
    return merged


def _carry_dists(merged: TokenTree, trees: Sequence[TokenTree], where: list[dict[int, int]],
                 kids: list[dict[int, list[int]]]) -> None:
    """Keep q for a merged parent whose children are, in order, a prefix of the children one
    source sampled from q (other drafters may have proposed some of the same tokens)."""
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(merged.parents):
        groups.setdefault(p, []).append(i)
    for ti, t in enumerate(trees):
        for j, q in t.draft_dists.items():
            if j not in where[ti]:
                continue
            got = [merged.tokens[c] for c in groups.get(where[ti][j], [])]
            drawn = [t.tokens[c] for c in kids[ti].get(j, [])]
            if got and got == drawn[:len(got)]:
                merged.draft_dists[where[ti][j]] = q


class CombinedDrafter:
    """Runs every drafter on the same context and budget and merges their trees."""

    def __init__(self, drafters: Sequence[Drafter], weights: Sequence[float] | None = None) -> None:
        if not drafters:
            raise ConfigError("CombinedDrafter needs at least one drafter")
        self.drafters = list(drafters)
        self.weights = None if weights is None else list(weights)
        self.name = "+".join(d.name for d in self.drafters)

    def propose(self, context: Sequence[int], budget: TreeBudget,
                stop: StopFn | None = None) -> TokenTree:
        trees = [d.propose(context, budget, stop) for d in self.drafters]
        if len(trees) == 1:
            return trees[0]
        return merge_trees(trees, budget, self.weights)

    @property
    def step_seconds(self) -> float | None:
        """The slowest member's measured draft step (None when no member measures one)."""
        steps = [t for t in (getattr(d, "step_seconds", None) for d in self.drafters) if t is not None]
        return max(steps) if steps else None

    @property
    def prompt_topk(self) -> int:
        """The most any member learns from the prompt's top-k (0: none does)."""
        return max((getattr(d, "prompt_topk", 0) for d in self.drafters), default=0)

    def observe_prompt(self, tokens: Sequence[int], topk: Any) -> None:
        for d in self.drafters:
            k = getattr(d, "prompt_topk", 0)
            if k:
                d.observe_prompt(tokens, topk[:, :k])

    def observe(self, result: Any) -> None:
        for d in self.drafters:
            d.observe(result)
