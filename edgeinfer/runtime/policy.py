"""When to stop drafting and verify: LLMCad's self-adjusting fallback, and a cost-aware variant.

FallbackPolicy (LLMCad, the default):

* tree confidence T_c = max over the tree's leaves of C_i (C_i = product of the draft
  probabilities on the path to leaf i); verify once T_c < alpha, or when the hard caps
  (max_nodes / max_depth of the base TreeBudget) are reached;
* alpha starts at ``alpha_init`` (0.01); after each verification, on the *best branch*:
  if every drafted token of it was accepted, alpha <- alpha / 2; otherwise
  alpha <- (N_all - N_correct) / N_all.

  The best branch is the branch verification got furthest along: among the leaves at or below
  the last accepted node (every leaf when nothing was accepted) the one with the largest C_i
  (lowest index on ties). N_all is its length in tokens, N_correct the number of accepted
  tokens. "Every token accepted" therefore means the accepted path ends at a leaf.

The engine hands drafters ``policy.budget()`` (min_confidence = alpha, which drafters check
after every draft step) and, for richer policies, ``stop=policy.should_verify``.

CostAwarePolicy (a separate option, for offloading, where one verification costs far more than
a draft step): fed the measured cost of a verification (fixed + per tree node) and of a draft
step, it keeps drafting while the next step is expected to raise the throughput of the whole
round. A node's chance of being accepted is taken as C_i^gamma, where gamma calibrates the
draft's confidences (a quantized draft is often underconfident: SmolLM2's int4 draft has path
confidences far below its 0.9 per-token acceptance, so uncalibrated trees stopped at 5-12 nodes
though a 25-node pass cost no more than an 8-node one). With E = sum_i C_i^gamma expected
accepted tokens, S draft steps so far (= number of expanded nodes, the distinct parents), n
nodes and t = S * t_draft + t_verify + n * t_node, a round yields (E + 1) / t tokens per second;
one more step adds at most T_c^gamma tokens for t_draft + t_node seconds, so it verifies when
T_c^gamma / (t_draft + t_node) < (E + 1) / t. An expensive verification makes the right side
small and the tree grows (up to the caps); a cheap one makes trees small. After each
verification gamma moves (rate ``calibration_rate``) toward the value at which the tree's
expected accepted length sum_i C_i^gamma equals the observed one (bisection, gamma in
[GAMMA_MIN, GAMMA_MAX]). Until costs are set it behaves as FallbackPolicy. ``attach`` gives
it live sources (the target's ``verify_cost()``, the drafter's ``step_seconds``) that
``refresh()`` reads before each tree; the engine does this for a streamed target.

``make_policy(config, target, drafter)`` picks the policy of a GenerationConfig.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import ConfigError
from .config import TreeBudget
from .drafters.base import node_confidences, tree_confidence
from .tree import TokenTree

__all__ = ["FallbackPolicy", "CostAwarePolicy", "best_branch", "make_policy"]

GAMMA_MIN, GAMMA_MAX = 0.05, 4.0  # range of CostAwarePolicy's confidence calibration exponent

# Seconds per draft step assumed for drafters that do not measure one (n-gram, Token Recycling:
# a table lookup, far below any model step).
CHEAP_DRAFT_STEP_S = 1e-4


def best_branch(tree: TokenTree, accepted: Sequence[int]) -> int:
    """The leaf ending the best branch (see module docstring); -1 for an empty tree."""
    if len(tree) == 0:
        return -1
    conf = node_confidences(tree)
    leaves = tree.leaves()
    if accepted:
        last = accepted[-1]
        leaves = [leaf for leaf in leaves if last in tree.path_to(leaf)]
    return max(leaves, key=lambda leaf: (conf[leaf], -leaf))


class FallbackPolicy:
    """LLMCad's self-adjusting fallback. ``alpha`` is public state; ``history`` lists the
    alpha after every update (for traces and tests)."""

    def __init__(self, base: TreeBudget | None = None, alpha_init: float = 0.01,
                 min_alpha: float = 0.0, max_alpha: float = 1.0) -> None:
        if not 0.0 <= min_alpha <= max_alpha <= 1.0:
            raise ConfigError(f"FallbackPolicy: need 0 <= min_alpha <= max_alpha <= 1, got "
                              f"min_alpha={min_alpha!r}, max_alpha={max_alpha!r}")
        if not min_alpha <= alpha_init <= max_alpha or alpha_init <= 0:
            raise ConfigError(f"FallbackPolicy.alpha_init must be in ({min_alpha}, {max_alpha}], "
                              f"got {alpha_init!r}")
        self.base = base or TreeBudget()
        self.alpha_init, self.min_alpha, self.max_alpha = alpha_init, min_alpha, max_alpha
        self.alpha = alpha_init
        self.history: list[float] = []

    @classmethod
    def from_config(cls, config: Any) -> "FallbackPolicy":
        """From a runtime.config.GenerationConfig (``tree`` caps, ``fallback.alpha_init``)."""
        return cls(config.tree, alpha_init=config.fallback.alpha_init)

    def set_caps(self, max_nodes: int | None = None, max_depth: int | None = None) -> None:
        """Change the hard caps at run time (validated by TreeBudget)."""
        self.base = dataclasses.replace(self.base, **{k: v for k, v in
                                                      (("max_nodes", max_nodes), ("max_depth", max_depth))
                                                      if v is not None})

    def refresh(self) -> None:
        """Called before each tree; LLMCad's rule measures nothing (see CostAwarePolicy)."""

    def budget(self) -> TreeBudget:
        """The budget for the next tree: the caps, and min_confidence = alpha."""
        return dataclasses.replace(self.base, min_confidence=float(self.alpha))

    def capped(self, tree: TokenTree) -> bool:
        return len(tree) >= self.base.max_nodes

    def should_verify(self, tree: TokenTree) -> bool:
        """True when drafting should stop: T_c < alpha or the node cap reached."""
        return len(tree) > 0 and (self.capped(tree) or tree_confidence(tree) < self.alpha)

    def update(self, tree: TokenTree, accepted: Sequence[int]) -> float:
        """Apply the update rule after verifying ``tree`` (``accepted``: node indices of the
        accepted root-to-node path). Returns the new alpha."""
        leaf = best_branch(tree, accepted)
        if leaf >= 0:
            n_all = len(tree.path_to(leaf))
            n_correct = len(accepted)
            new = self.alpha / 2 if n_correct >= n_all else (n_all - n_correct) / n_all
            self.alpha = min(self.max_alpha, max(self.min_alpha, new))
            self.history.append(self.alpha)
        return self.alpha

    def observe(self, result: Any) -> float:
        """update() from a runtime.verify.VerifyResult."""
        return self.update(result.tree, result.accepted_nodes)

    def reset(self) -> None:
        self.alpha = self.alpha_init
        self.history.clear()


class CostAwarePolicy(FallbackPolicy):
    """FallbackPolicy's alpha bookkeeping plus the throughput rule of the module docstring."""

    def __init__(self, base: TreeBudget | None = None, alpha_init: float = 0.01,
                 calibration_rate: float = 0.5, **kw: float) -> None:
        super().__init__(base, alpha_init, **kw)
        if not 0 < calibration_rate <= 1:
            raise ConfigError(f"CostAwarePolicy.calibration_rate must be in (0, 1], got {calibration_rate!r}")
        self.rate = calibration_rate
        self.gamma = 1.0  # accepted-chance of a node ~ C_i ** gamma (module docstring)
        self.verify_s: float | None = None
        self.verify_per_node_s = 0.0
        self.draft_step_s: float | None = None
        self._verify_source: Callable[[], tuple[float, float]] | None = None
        self._draft_source: Callable[[], float | None] | None = None

    def attach(self, verify_cost: Callable[[], tuple[float, float]],
               draft_step: Callable[[], float | None] | None = None) -> None:
        """Live cost sources: ``verify_cost() -> (fixed seconds, seconds per node)`` (e.g.
        StreamingRunner.verify_cost) and ``draft_step() -> seconds or None`` (None or a missing
        source: CHEAP_DRAFT_STEP_S)."""
        self._verify_source, self._draft_source = verify_cost, draft_step

    def refresh(self) -> None:
        """Read the attached sources (no-op without them, or before the first measurement)."""
        if self._verify_source is None:
            return
        fixed, per_node = self._verify_source()
        if fixed <= 0:
            return
        step = self._draft_source() if self._draft_source is not None else None
        self.set_costs(fixed, max(CHEAP_DRAFT_STEP_S, float(step or 0.0)), per_node)

    def set_costs(self, verify_s: float, draft_step_s: float, verify_per_node_s: float = 0.0) -> None:
        """Seconds per verification (fixed part), per draft step, and per tree node verified."""
        for name, v in (("verify_s", verify_s), ("draft_step_s", draft_step_s),
                        ("verify_per_node_s", verify_per_node_s)):
            if not v >= 0:
                raise ConfigError(f"CostAwarePolicy.set_costs: {name} must be >= 0, got {v!r}")
        if draft_step_s + verify_per_node_s <= 0:
            raise ConfigError("CostAwarePolicy.set_costs: draft_step_s + verify_per_node_s must be > 0")
        self.verify_s, self.draft_step_s, self.verify_per_node_s = verify_s, draft_step_s, verify_per_node_s

    def budget(self) -> TreeBudget:
        # The throughput rule replaces alpha as the stop criterion once costs are known.
        if self.verify_s is None:
            return super().budget()
        return dataclasses.replace(self.base, min_confidence=0.0)

    def should_verify(self, tree: TokenTree) -> bool:
        if self.verify_s is None or self.draft_step_s is None:
            return super().should_verify(tree)
        if len(tree) == 0:
            return False
        if self.capped(tree):
            return True
        conf = node_confidences(tree) ** self.gamma
        expected = float(conf.sum())
        steps = len(set(tree.parents))
        t = steps * self.draft_step_s + self.verify_s + len(tree) * self.verify_per_node_s
        gain = tree_confidence(tree) ** self.gamma
        return gain * t < (expected + 1.0) * (self.draft_step_s + self.verify_per_node_s)

    @staticmethod
    def fit_gamma(conf: np.ndarray, accepted: int) -> float:
        """The exponent g in [GAMMA_MIN, GAMMA_MAX] with sum(conf ** g) closest to ``accepted``
        (the sum falls as g grows, since every confidence is at most 1)."""
        lo, hi = GAMMA_MIN, GAMMA_MAX
        if float((conf ** lo).sum()) <= accepted:
            return lo
        if float((conf ** hi).sum()) >= accepted:
            return hi
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            if float((conf ** mid).sum()) > accepted:
                lo = mid
            else:
                hi = mid
        return 0.5 * (lo + hi)

    def update(self, tree: TokenTree, accepted: Sequence[int]) -> float:
        if len(tree):
            conf = np.clip(node_confidences(tree), 1e-12, 1.0)
            self.gamma += self.rate * (self.fit_gamma(conf, len(accepted)) - self.gamma)
        return super().update(tree, accepted)

    def reset(self) -> None:
        super().reset()
        self.gamma = 1.0


def make_policy(config: Any, target: Any = None, drafter: Any = None) -> FallbackPolicy:
    """The policy a GenerationConfig asks for (``config.fallback.policy``): "auto" is the cost-
    aware one when ``target`` measures its verification cost (a StreamingRunner), else LLMCad's.
    A cost-aware policy is attached to ``target.verify_cost`` and ``drafter.step_seconds``."""
    kind = config.fallback.policy
    verify_cost = getattr(target, "verify_cost", None)
    if kind == "auto":
        kind = "cost" if verify_cost is not None else "llmcad"
    if kind == "llmcad":
        return FallbackPolicy.from_config(config)
    policy = CostAwarePolicy(config.tree, alpha_init=config.fallback.alpha_init)
    if verify_cost is not None:
        step = (lambda: getattr(drafter, "step_seconds", None)) if drafter is not None else None
        policy.attach(verify_cost, step)
    return policy
