"""Sampling: logits -> probabilities (temperature, top-k, top-p) and the lossless acceptance
rule for a whole token tree.

Processing follows the usual order (temperature, then top-k, then top-p) with the same tie
and boundary conventions as Hugging Face's logits warpers: top-k keeps every token whose logit
is >= the k-th largest; top-p keeps a token when the probability mass of the tokens ranked
strictly above it is < top_p (so at least one token always survives). ``temperature == 0``
gives a point mass on the argmax (greedy), which makes the tree rule below reduce to greedy
verification.

Tree acceptance (multi-round speculative sampling: SpecInfer, RSD). At a node with target
distribution p and children x_1..x_m tried in index order:

* sampled children (``tree.draft_dists[node] = q``: x_1..x_m were drawn from q without
  replacement): x_i is drawn from q_i = q restricted to the tokens not drawn before it,
  renormalised. Accept x_i with probability min(1, p_i(x_i) / q_i(x_i)); on rejection
  p_{i+1} = norm(max(p_i - q_i, 0)).
* deterministic children (no ``draft_dists`` entry: n-gram, recycling, greedy tree drafts):
  q_i is a point mass on x_i, so the same rule reads: accept with probability p_i(x_i); on
  rejection p_{i+1} = p_i with x_i removed, renormalised. This is lossless for *any* way of
  choosing the children, as long as the choice does not look at the verifier's random draws.
* all children rejected (or none): emit a sample of the last residual p_{m+1}; after an
  accepted leaf: emit a sample of the target's distribution there (the bonus token).

Each step is one round of standard speculative sampling whose rejection branch is replaced
by another round against the residual, which itself emits exactly the residual distribution;
so every emitted token has the target's distribution. tests/test_runtime_sampling.py checks
this statistically and checks that wrong rules fail the same test.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError
from .tree import TokenTree

__all__ = ["SamplingParams", "process_logits", "sample", "make_rng", "TreeAcceptance",
           "accept_tree", "sample_children"]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0: greedy (point mass on the argmax)
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ConfigError(f"SamplingParams.temperature must be a number >= 0, got {t!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"SamplingParams.top_k must be an integer >= 0, got {self.top_k!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ConfigError(f"SamplingParams.top_p must be a number in (0, 1], got {p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_config(cls, config: Any) -> "SamplingParams":
        """From a runtime.config.GenerationConfig (temperature, top_k, top_p)."""
        return cls(float(config.temperature), int(config.top_k), float(config.top_p))


def make_rng(seed: int | None) -> np.random.Generator:
    return np.random.default_rng(seed)


def process_logits(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Probabilities float64 [..., vocab] (each row sums to 1) from logits float [..., vocab]."""
    x = np.asarray(logits, dtype=np.float64)
    if params.greedy:
        out = np.zeros_like(x)
        np.put_along_axis(out, np.argmax(x, axis=-1)[..., None], 1.0, axis=-1)
        return out
    x = x / params.temperature
    vocab = x.shape[-1]
    if 0 < params.top_k < vocab:
        kth = -np.partition(-x, params.top_k - 1, axis=-1)[..., params.top_k - 1:params.top_k]
        x = np.where(x >= kth, x, -np.inf)
    p = np.exp(x - x.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    if params.top_p < 1.0:
        order = np.argsort(-p, axis=-1, kind="stable")
        ps = np.take_along_axis(p, order, axis=-1)
        before = np.cumsum(ps, axis=-1) - ps  # mass ranked strictly above each token
        keep_sorted = before < params.top_p
        keep_sorted[..., 0] = True
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(axis=-1, keepdims=True)
    return p


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    """One token from probs [vocab] (need not be normalised) by inverse CDF on one uniform."""
    c = np.cumsum(probs, dtype=np.float64)
    if not c[-1] > 0:
        raise ValueError("sample: the distribution has no mass")
    i = int(np.searchsorted(c, rng.random() * c[-1], side="right"))
    return min(i, len(c) - 1)


def sample_children(q: np.ndarray, count: int, rng: np.random.Generator) -> list[int]:
    """``count`` distinct tokens drawn from q [vocab] one after another without replacement
    (fewer if q has fewer tokens with mass): the drafting side of the sampled-children rule."""
    rem = np.array(q, dtype=np.float64)
    out: list[int] = []
    for _ in range(count):
        if not rem.sum() > 0:
            break
        t = sample(rem, rng)
        out.append(t)
        rem[t] = 0.0
    return out


@dataclass
class TreeAcceptance:
    accepted: list[int] = field(default_factory=list)  # node indices, root-to-node path
    tokens: list[int] = field(default_factory=list)  # their tokens
    next_token: int = -1  # the token sampled after the accepted path (residual or bonus)


def _normalised(p: np.ndarray) -> np.ndarray | None:
    s = p.sum()
    return p / s if s > 0 else None


def accept_tree(tree: TokenTree, target_probs: np.ndarray, rng: np.random.Generator) -> TreeAcceptance:
    """Walk ``tree`` with the lossless rule (module docstring).

    target_probs: float [n + 1, vocab], the target's processed distribution at the root (row
    0) and after node i (row i + 1); rows must sum to 1 (process_logits output).
    """
    n = len(tree)
    if target_probs.shape[0] != n + 1:
        raise ValueError(f"accept_tree: target_probs has {target_probs.shape[0]} rows, expected "
                         f"{n + 1} (root + {n} nodes)")
    kids: dict[int, list[int]] = {}
    for i, par in enumerate(tree.parents):
        kids.setdefault(par, []).append(i)
    out = TreeAcceptance()
    node = -1
    while True:
        p = np.array(target_probs[node + 1], dtype=np.float64)
        q = tree.draft_dists.get(node)
        q_rem = None if q is None else np.array(q, dtype=np.float64)
        chosen = -1
        for c in kids.get(node, ()):
            x = tree.tokens[c]
            if q_rem is None:  # point mass on x
                if rng.random() < p[x]:
                    chosen = c
                    break
                residual = p.copy()
                residual[x] = 0.0
            else:
                qi = _normalised(q_rem)
                if qi is None or qi[x] <= 0:
                    raise ValueError(f"accept_tree: node {c} (token {x}) has no mass in the draft "
                                     f"distribution it was supposedly sampled from")
                if rng.random() * qi[x] < p[x]:  # u < min(1, p/q)
                    chosen = c
                    break
                residual = np.maximum(p - qi, 0.0)
                q_rem[x] = 0.0
            # p == q_i up to rounding leaves no residual; rejection was then a rounding
            # artefact and p itself is the right distribution to continue with.
            p = _normalised(residual) if residual.sum() > 1e-12 else p
        if chosen < 0:
            out.next_token = sample(p, rng)
            return out
        out.accepted.append(chosen)
        out.tokens.append(tree.tokens[chosen])
        node = chosen

