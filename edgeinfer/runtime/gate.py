"""`SpeculationGate`: in ``mode="auto"``, speculate only while it beats plain decoding.

Speculation pays only when a draft step costs much less than a target step. Whether it does
depends on the pair and the machine: an fp32 SmolLM2 target with its int4 draft speculates at
1.2x its plain speed on 2 cores, but the same draft next to the *exact* int4 target (quant/
exact.py, 1.6x faster per step than fp32) speculates at 0.75-0.8x plain. So auto mode measures
both and picks, round by round:

* ``plain_probe`` plain steps first (the plain rate, an exponential mean of tokens/s);
* then speculation; a round's rate is its emitted tokens over its wall time (draft + verify +
  bookkeeping), not counting the first round after plain steps (the draft model catches up
  with what they produced then: measured 19-28 tok/s against a steady 57-70 for SmolLM2);
  after ``min_rounds`` counted rounds, while the mean speculative rate stays below the
  plain rate times (1 - ``margin``), the gate switches to plain steps, then tries speculation
  again (text changes: a repetitive stretch suits n-gram drafts); ``plain_steps`` doubles after
  each lost try (up to ``max_backoff`` times) and is reset by a won one;
* a draft model whose every token costs one draft step of ``d`` seconds can never beat plain
  decoding when ``d`` is at least a plain step (a round of k steps yields at most k + 1 tokens
  for more than k * d + one plain step of time): given ``draft_step``, the gate skips the probe
  then and only re-checks on the backoff schedule;
* while speculating it re-measures the plain rate with one plain step every ``refresh`` rounds.

Measured (SmolLM2, 2 cores, 96 tokens): with the exact int4 target (14 ms per step) and its
int4 draft (12.6 ms per step) auto mode ran at 0.77x plain before the draft-step bound and the
backoff, probing and losing three rounds every 32 tokens.

Greedy decoding only: under sampling the choice, which depends on timing, would change which
random draws a seed's output is made of (the distribution stays the target's, but a seed
would no longer reproduce its text). The engine keeps one gate per drafter for its whole
life, so what one generation measured carries over to the next. Output is the same either way
(both are the target's own choice), so this only moves speed.
"""
from __future__ import annotations

__all__ = ["SpeculationGate"]


class SpeculationGate:
    def __init__(self, plain_probe: int = 2, min_rounds: int = 3, plain_steps: int = 32,
                 refresh: int = 32, margin: float = 0.05, weight: float = 0.3, max_backoff: int = 4) -> None:
        self.plain_probe, self.min_rounds, self.plain_steps = plain_probe, min_rounds, plain_steps
        self.refresh, self.margin, self.weight, self.max_backoff = refresh, margin, weight, max_backoff
        self._losses = 0  # consecutive lost tries (the backoff exponent)
        self.plain_rate: float | None = None  # tokens / s
        self.spec_rate: float | None = None
        self._plain_left = plain_probe  # plain steps still to take before speculating
        self._rounds = 0  # speculative rounds since the last switch
        self._since_refresh = 0
        self.switches = 0  # times speculation was turned off
        self.plain_steps_taken = 0

    @staticmethod
    def _mean(old: float | None, new: float, w: float) -> float:
        return new if old is None else (1 - w) * old + w * new

    def _lose(self) -> None:
        self._plain_left = self.plain_steps << min(self._losses, self.max_backoff)
        self._losses += 1
        self.switches += 1

    def speculate(self, draft_step: float | None = None) -> bool:
        """Should the next step speculate? ``draft_step``: seconds per draft step of a drafter
        that spends one per drafted token (a draft model), if known."""
        if self._plain_left > 0:
            return False
        if (draft_step is not None and self.plain_rate is not None
                and draft_step * self.plain_rate >= 1 - self.margin):
            self._lose()  # cannot win: see the module docstring
            return False
        if self.plain_rate is not None and self._since_refresh >= self.refresh:
            self._since_refresh = 0
            self._plain_left = 1
            return False
        return True

    def record_plain(self, seconds: float, tokens: int = 1) -> None:
        self.plain_steps_taken += 1
        self._plain_left = max(0, self._plain_left - 1)
        if seconds > 0:
            self.plain_rate = self._mean(self.plain_rate, tokens / seconds, self.weight)
        if self._plain_left == 0:  # (re)start speculating with a fresh speculative mean
            self._rounds = 0

    def record_round(self, seconds: float, tokens: int) -> None:
        if seconds <= 0:
            return
        self._rounds += 1
        self._since_refresh += 1
        if self._rounds == 1:  # the first round after plain steps also catches the draft up
            return  # with what they produced: not the steady-state rate
        rate = tokens / seconds
        self.spec_rate = rate if self._rounds == 2 else self._mean(self.spec_rate, rate, self.weight)
        counted = self._rounds - 1
        if counted >= self.min_rounds and self.plain_rate is not None:
            if self.spec_rate < self.plain_rate * (1 - self.margin):
                self._lose()
            elif counted == self.min_rounds:
                self._losses = 0  # a won try resets the backoff
