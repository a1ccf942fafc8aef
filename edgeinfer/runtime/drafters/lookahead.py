"""Lookahead guesses for the draft model: more than one draft token from one draft forward.

A draft forward that expands node v can also run a few *guessed* tokens after v (a chain
v -> g1 -> g2 ...) in the same call. The draft's logits at v say which children v gets; when
g1 is one of them, the logits computed at g1 are exactly g1's own draft distribution (its
attention saw v's path and g1), so g1 is expanded for free, and so on down the chain while the
guesses keep matching. Children are still the draft's top-1 and threshold branches (or its
samples), so the guesses decide only which nodes get expanded without a forward of their own.

Guesses come from the context itself (prompt lookup): the continuation of the most recent
earlier occurrence of the longest n-gram (``max_ngram`` down to ``min_ngram`` tokens) ending
at v. Whether a guess pays depends on the machine: a forward of 1 + g nodes costs more than a
one-node step (measured on 2 cores, SmolLM2 int4 affine draft: +1.6 ms per extra node against
an 8.4 ms step, a ratio of 0.19), and a guess saves a whole step only when it matches. So the
guesser keeps, per n-gram length k and guess position j, a decayed rate of "the chain of
guesses matched at least up to j" and feeds guess j only while that rate exceeds the measured
cost ratio of an extra node (``cost_ratio``, updated by the drafter from its forwards). Every
``explore_every``-th chance feeds all guesses regardless, so a rate that fell can recover.

Measured, teacher-forced on the benchmark prompts' greedy outputs (4 prompts x 128 tokens,
the draft's own top-1 as the truth): a context n-gram matched at 56-82% of positions (k >= 1)
and its first token was the draft's next token 28-51% of those times (code 51%, chat 28%);
with k >= 2, 25-44% of positions, first token right 36-74%, first two 10-58%.

What it bought in the engine (SmolLM2 pair on 2 cores, 4 prompts x 96 tokens x 2 runs,
interleaved, greedy, identical output): draft forwards -12 to -16%, a forward ~15% dearer, and
more verifications (the int4 draft's multi-node forwards agree a little less with the target
than its one-node steps), so trees 80.1 -> 77.2-78.7 tok/s overall, while the code prompt went
84 -> 98-102. Hence EngineOptions.draft_lookahead is 0 (off) by default.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ...errors import ConfigError
from .ngram import find_continuations

__all__ = ["NgramLookahead", "make_lookahead", "path_text"]


def make_lookahead(max_guesses: int) -> "NgramLookahead | None":
    """The guesser for EngineOptions.draft_lookahead (None when 0: lookahead off)."""
    return NgramLookahead(max_guesses=max_guesses) if max_guesses else None


class NgramLookahead:
    """See the module docstring. ``max_guesses``: longest guessed chain per forward;
    ``decay``: weight of the past in a match rate (per forward that fed that guess); ``prior``:
    (matches, trials) every rate starts from; ``cost_ratio``: the starting estimate of an
    extra node's cost relative to a one-node step (kept fixed with ``adapt_cost=False``);
    ``margin``: a guess is fed while its rate exceeds ``margin * cost_ratio``."""

    def __init__(self, max_guesses: int = 3, max_ngram: int = 4, min_ngram: int = 1,
                 decay: float = 0.98, prior: tuple[float, float] = (1.0, 2.0),
                 cost_ratio: float = 0.2, explore_every: int = 32, adapt_cost: bool = True,
                 margin: float = 1.0) -> None:
        if max_guesses < 1 or not 1 <= min_ngram <= max_ngram:
            raise ConfigError(f"NgramLookahead: need max_guesses >= 1 and 1 <= min_ngram <= max_ngram, "
                              f"got {max_guesses!r}, {min_ngram!r}, {max_ngram!r}")
        if not 0 < decay <= 1 or not 0 <= prior[0] <= prior[1] or prior[1] <= 0 or margin < 0:
            raise ConfigError(f"NgramLookahead: need 0 < decay <= 1, 0 <= matches <= trials (> 0) "
                              f"in the prior and margin >= 0, got {decay!r}, {prior!r}, {margin!r}")
        self.max_guesses, self.max_ngram, self.min_ngram = max_guesses, max_ngram, min_ngram
        self.decay, self.prior, self.explore_every = decay, prior, max(1, explore_every)
        self.cost_ratio, self.adapt_cost, self.margin = float(cost_ratio), adapt_cost, float(margin)
        rows = max_ngram - min_ngram + 1
        self._hit = np.full((rows, max_guesses), prior[0], dtype=np.float64)
        self._tried = np.full((rows, max_guesses), prior[1], dtype=np.float64)
        self._chances = 0
        # totals since the last reset: forwards with guesses, guesses fed, guesses that matched
        self.stats = {"forwards": 0, "fed": 0, "matched": 0}

    def rates(self) -> np.ndarray:
        """float [n-gram lengths min..max, guess position 1..max_guesses]: decayed P(the
        guessed chain matched at least up to that position | it was fed)."""
        return self._hit / self._tried

    def guesses(self, text: np.ndarray, limit: int) -> tuple[int, list[int]]:
        """(k, tokens to feed after the last token of ``text``): at most min(limit,
        max_guesses) tokens continuing the longest n-gram match, cut where the match rate
        drops below the cost ratio; (0, []) when nothing matches or pays."""
        limit = min(limit, self.max_guesses)
        if limit <= 0:
            return 0, []
        for k in range(self.max_ngram, self.min_ngram - 1, -1):
            conts = find_continuations(text, k, limit)
            if conts and conts[0]:
                cont = conts[0]
                break
        else:
            return 0, []
        self._chances += 1
        if self._chances % self.explore_every == 0:
            return k, cont
        rate = self.rates()[k - self.min_ngram]
        g = 0
        while g < len(cont) and rate[g] > self.margin * self.cost_ratio:
            g += 1
        return k, cont[:g]

    def record(self, k: int, fed: int, matched: int) -> None:
        """After a forward that fed ``fed`` guesses of an n-gram of length ``k`` and found the
        first ``matched`` of them among the draft's children."""
        if fed <= 0:
            return
        row, d = k - self.min_ngram, self.decay
        self._tried[row, :fed] = self._tried[row, :fed] * d + 1.0
        self._hit[row, :fed] *= d
        self._hit[row, :matched] += 1.0
        self.stats["forwards"] += 1
        self.stats["fed"] += fed
        self.stats["matched"] += matched

    def record_cost(self, step_seconds: float, seconds: float, nodes: int) -> None:
        """Update the cost ratio of one extra node from a forward of ``nodes`` nodes that took
        ``seconds`` against the drafter's one-node step estimate."""
        if self.adapt_cost and nodes > 1 and step_seconds > 0:
            ratio = max(0.0, (seconds - step_seconds) / ((nodes - 1) * step_seconds))
            self.cost_ratio = 0.9 * self.cost_ratio + 0.1 * ratio

    def reset(self) -> None:
        """Forget the learned rates (back to the prior); the cost ratio is kept (a property of
        the machine and model, not of the text)."""
        self._hit.fill(self.prior[0])
        self._tried.fill(self.prior[1])
        self._chances = 0
        self.stats = {"forwards": 0, "fed": 0, "matched": 0}


def path_text(context: np.ndarray, path: Sequence[int]) -> np.ndarray:
    """The context followed by the tokens of a tree path, as one int64 array."""
    if not len(path):
        return context
    return np.concatenate([context, np.asarray(path, dtype=np.int64)])
