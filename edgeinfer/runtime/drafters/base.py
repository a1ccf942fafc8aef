"""The interface every drafter implements, and the helpers they share.

A drafter proposes a :class:`~edgeinfer.runtime.tree.TokenTree` whose virtual root (-1) is the
last committed token, within a :class:`TreeBudget` (one definition, in runtime/config.py):

* ``max_nodes`` / ``max_depth``: hard caps (depth counts nodes on a root-to-leaf path);
* ``branch_threshold``: a candidate other than the top-1 whose draft probability exceeds it
  opens a new branch (LLMCad); 1.0 (or more) gives a chain;
* ``min_confidence``: the LLMCad fallback threshold alpha: drafting stops once the tree
  confidence ``T_c = max over leaves of C_i`` is below it (runtime/policy.py sets it).

``propose`` may also take ``stop``: a callable on the tree grown so far, checked after every
draft step, for policies richer than one threshold (policy.CostAwarePolicy) and for the
pipeline. Drafters whose trees cost nothing to build (n-gram, recycling) ignore it.

A drafter that learns across generations (Token Recycling's table) has ``forget()``, which
``Engine.reset_drafters`` calls (benchmarks do before every run: a table that saw the same
prompt's output before drafts it far better than it would a new prompt).
"""
from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from ..config import TreeBudget
from ..tree import TokenTree

__all__ = ["Drafter", "TreeBudget", "StopFn", "tree_confidence", "node_confidences"]

StopFn = Callable[[TokenTree], bool]


@runtime_checkable
class Drafter(Protocol):
    name: str

    def propose(self, context: Sequence[int], budget: TreeBudget,
                stop: StopFn | None = None) -> TokenTree:
        """A tree continuing ``context`` (all committed tokens, the last one is the root)."""
        ...

    def observe(self, result: Any) -> None:
        """Learn from a verification (a runtime.verify.VerifyResult)."""
        ...


def node_confidences(tree: TokenTree) -> np.ndarray:
    """C_i for every node: the product of draft probabilities root..i. float64 [n]."""
    c = np.ones(len(tree), dtype=np.float64)
    for i, (p, q) in enumerate(zip(tree.parents, tree.probs)):
        c[i] = q * (c[p] if p >= 0 else 1.0)
    return c


def tree_confidence(tree: TokenTree) -> float:
    """LLMCad's T_c: the largest branch confidence C_i over the tree's leaves (1.0 when empty:
    an empty tree has not started, nothing argues for verifying it)."""
    if len(tree) == 0:
        return 1.0
    c = node_confidences(tree)
    return float(c[tree.leaves()].max())

