"""`SpeculationGate`: in ``mode="auto"``, decode with whichever setup measures fastest.

Speculation pays only when a draft step costs much less than a target step, and which drafter
and tree shape pay most depends on the pair, the machine and the text. Measured on 2 cores
(SmolLM2, 96 tokens): the fp32 target with its int4 draft speculates at 1.5x its plain speed
in chains, 1.4x in trees; Token Recycling chains on new text gain under 10%; next to the *exact*
int4 target (quant/exact.py, 1.6x faster per step than fp32) no speculation pays. So auto mode
measures plain decoding and each speculative *arm* (a mode and a drafter, e.g.
``"chain:model"``, ``"chain:recycle"``) and picks, round by round:

* ``plain_probe`` plain steps first (the plain rate, an exponential mean of tokens/s);
* then a *stint* of each arm in turn. A round's rate is its emitted tokens over its wall time
  (draft + verify + bookkeeping), not counting a stint's first round (a draft model catches up
  then with what other steps produced: measured 19-28 tok/s against a steady 57-70 for
  SmolLM2); a stint is measured after ``min_rounds`` counted rounds that emitted at least
  ``min_tokens`` tokens (a draft model's round gives 1-13 tokens, a Token Recycling round 1-3),
  as weighted tokens over weighted seconds (a mean of per-round rates would let one round that
  accepted nothing drag a good arm down);
* once every arm is measured the best one runs on, and the gate moves to another arm whose
  last rate beats the running one's by ``margin``; while the best rate stays below the plain
  rate times (1 - ``margin``) it decodes plain, then tries the arm measured longest ago (text
  changes: a repetitive stretch suits n-gram and recycling drafts); the plain stretch
  (``plain_steps``) doubles after each lost try (up to ``max_backoff`` times) and is reset by a
  won one;
* a draft model whose every token costs one draft step of ``d`` seconds can never beat plain
  decoding when ``d`` is at least a plain step (a round of k steps yields at most k + 1 tokens
  for more than k * d + one plain step of time): given its ``draft_step``, such an arm is
  skipped without a stint and re-checked only on the backoff schedule;
* while speculating it re-measures the plain rate with one plain step every ``refresh``
  rounds, and, with several arms, gives the arm measured longest ago another stint once
  ``explore_seconds`` of decoding, and at least ``explore_cost`` times that arm's last stint
  times how much slower it measured, have passed since the last such stint (a rate taken on
  other text, or by Token Recycling with its table still empty, goes stale; re-measuring a slow
  arm costs more, so it comes less often: measured on the default pair, a Token Recycling stint
  of 13 rounds, ~0.3 s at plain speed, against chains of the draft at 1.5x).

Greedy decoding only: under sampling the choice, which depends on timing, would change which
random draws a seed's output is made of (the distribution stays the target's, but a seed
would no longer reproduce its text). The engine keeps one gate per set of arms for its whole
life, so what one generation measured carries over to the next. Output is the same whichever
arm runs (the target decides every token), so this only moves speed.
"""
from __future__ import annotations

from typing import Mapping, Sequence

__all__ = ["SpeculationGate", "SPEC"]

SPEC = "spec"  # the one arm of a single-arm gate
MAX_SLOWDOWN = 10.0  # cap on how much rarer a slow arm's re-measurement gets


class SpeculationGate:
    """Chooses, step by step, between plain decoding (``None``) and the speculative ``arms``
    (names of decoding setups, e.g. ``"tree:model"``, ``"chain:recycle"``) by their measured
    rates; see the module docstring."""

    def __init__(self, arms: Sequence[str] = (SPEC,), plain_probe: int = 2, min_rounds: int = 3,
                 min_tokens: int = 16, plain_steps: int = 32, refresh: int = 32, margin: float = 0.05,
                 weight: float = 0.3, max_backoff: int = 4, explore_seconds: float = 1.0,
                 explore_cost: float = 8.0) -> None:
        if not arms or len(set(arms)) != len(arms):
            raise ValueError(f"SpeculationGate: arms must be distinct names, got {list(arms)}")
        self.arms = tuple(arms)
        self.plain_probe, self.min_rounds, self.plain_steps = plain_probe, min_rounds, plain_steps
        self.min_tokens = min_tokens
        self.refresh, self.margin, self.weight, self.max_backoff = refresh, margin, weight, max_backoff
        self.explore_seconds, self.explore_cost = explore_seconds, explore_cost
        self._losses = 0  # consecutive lost tries (the backoff exponent)
        self.plain_rate: float | None = None  # tokens / s
        self.rates: dict[str, float] = {}  # arm -> its latest stint's mean rate (tokens / s)
        self._untried = list(self.arms)  # arms without a finished stint yet, in order
        self.current: str | None = None  # the arm of the stint under way (None: none)
        self._plain_left = plain_probe  # plain steps still to take before speculating
        self._rounds = 0  # rounds of the current stint, its catch-up round included
        self._stint_rate: float | None = None
        self._stint_sums = (0.0, 0.0)  # weighted tokens, weighted seconds of the stint
        self._stint_tokens = 0  # tokens of the stint's counted rounds
        self._stint_done = False  # measured: min_rounds counted rounds and min_tokens tokens
        self._since_refresh = 0
        self._since_explore = 0.0  # seconds of measured rounds since an arm was last re-measured
        self._stint_seconds: dict[str, float] = {}  # arm -> wall time of its last stint
        self._stint_time = 0.0  # wall time of the stint under way so far
        self._measured: dict[str, int] = {}  # arm -> round count when its rate was last updated
        self._total_rounds = 0
        self.switches = 0  # times speculation was turned off
        self.arm_switches = 0  # times one arm replaced another
        self.plain_steps_taken = 0

    # -- single-arm view (one speculative setup against plain decoding) ---------------------
    @property
    def spec_rate(self) -> float | None:
        return self.rates.get(self.current or self.arms[0])

    def speculate(self, draft_step: float | None = None) -> bool:
        """Should the next step speculate with the only arm? (``choose`` for one arm.)"""
        return self.choose({self.arms[0]: draft_step}) is not None

    # -- decisions ---------------------------------------------------------------------------
    @staticmethod
    def _mean(old: float | None, new: float, w: float) -> float:
        return new if old is None else (1 - w) * old + w * new

    def _start(self, arm: str) -> None:
        if arm != self.current and self.current is not None:
            self.arm_switches += 1
        self.current = arm
        self._new_stint()

    def _new_stint(self) -> None:
        self._rounds, self._stint_rate, self._stint_sums = 0, None, (0.0, 0.0)
        self._stint_time, self._stint_tokens, self._stint_done = 0.0, 0, False

    def _lose(self) -> None:
        """Every arm measured slower than plain: plain steps, doubling with each lost try."""
        self._plain_left = self.plain_steps << min(self._losses, self.max_backoff)
        self._losses += 1
        self.switches += 1
        self.current = None

    def _stalest(self, besides: str | None = None) -> str:
        return min((a for a in self.arms if a != besides), key=lambda a: self._measured.get(a, -1))

    def _best(self) -> str | None:
        known = [a for a in self.arms if a in self.rates]
        return max(known, key=lambda a: self.rates[a]) if known else None

    def _beats_plain(self, rate: float) -> bool:
        return self.plain_rate is None or rate >= self.plain_rate * (1 - self.margin)

    def _after_stint(self) -> None:
        """The current stint has been measured: next untried arm, the best arm, or plain."""
        if self.current in self._untried:
            self._untried.remove(self.current)
        if self._untried:
            self._start(self._untried[0])
            return
        best = self._best()
        if best is None or not self._beats_plain(self.rates[best]):
            self._lose()
        elif best != self.current and self.rates[best] > self.rates[self.current] * (1 + self.margin):
            self._start(best)
        else:
            self._losses = 0  # a won try resets the backoff

    def choose(self, draft_steps: Mapping[str, float | None] | None = None) -> str | None:
        """The arm for the next step, or None for a plain step. ``draft_steps``: per arm, the
        seconds per draft step of a drafter that spends one per drafted token (a draft
        model), when known."""
        draft_steps = draft_steps or {}
        for _ in range(len(self.arms) + 1):
            if self._plain_left > 0:
                return None
            if self.current is None:  # after plain steps: an untried arm, else the stalest one
                self._start(self._untried[0] if self._untried else self._stalest())
            step = draft_steps.get(self.current)
            if step is not None and self.plain_rate is not None and step * self.plain_rate >= 1 - self.margin:
                self.rates[self.current] = 0.0  # cannot win: see the module docstring
                self._after_stint()
                continue
            break
        else:
            return None
        if self.plain_rate is not None and self._since_refresh >= self.refresh:
            self._since_refresh = 0
            self._plain_left = 1
            return None
        return self.current

    def record_plain(self, seconds: float, tokens: int = 1) -> None:
        self.plain_steps_taken += 1
        self._plain_left = max(0, self._plain_left - 1)
        if seconds > 0:
            self.plain_rate = self._mean(self.plain_rate, tokens / seconds, self.weight)
        if self._plain_left == 0:  # (re)start speculating with a fresh stint
            self._new_stint()

    def record_round(self, seconds: float, tokens: int, arm: str | None = None) -> None:
        """A speculative round of ``arm`` (default: the current one) took ``seconds`` for
        ``tokens`` emitted tokens."""
        if seconds <= 0:
            return
        arm = arm or self.current or self.arms[0]
        if arm != self.current:
            self._start(arm)
        self._rounds += 1
        self._total_rounds += 1
        self._stint_time += seconds
        self._since_refresh += 1
        if self._rounds == 1:  # the first round of a stint also catches its drafter up
            return  # with what other steps produced: not the steady-state rate
        # throughput: exponentially weighted tokens over exponentially weighted seconds (a mean
        # of per-round rates would let one round that accepted nothing drag a good arm down)
        t, sec = self._stint_sums
        self._stint_sums = (tokens, seconds) if self._rounds == 2 else (
            (1 - self.weight) * t + self.weight * tokens, (1 - self.weight) * sec + self.weight * seconds)
        self._stint_rate = self._stint_sums[0] / self._stint_sums[1]
        self.rates[arm] = self._stint_rate
        self._measured[arm] = self._total_rounds
        counted = self._rounds - 1
        self._stint_tokens += tokens
        if not self._stint_done:
            if counted >= self.min_rounds and self._stint_tokens >= self.min_tokens:
                self._stint_done = True
                self._stint_seconds[arm] = self._stint_time
                self._after_stint()
        else:
            self._since_explore += seconds
            best = self._best()
            others_lose = best == arm or not self._beats_plain(self.rates[best])
            if not self._beats_plain(self._stint_rate) and others_lose:
                self._lose()
            elif best != arm and self.rates[best] > self._stint_rate * (1 + self.margin):
                self._start(best)
            elif len(self.arms) > 1:  # re-measure the arm measured longest ago (module docstring)
                stale = self._stalest(besides=arm)
                other = self.rates.get(stale, 0.0)
                slower = min(MAX_SLOWDOWN, self._stint_rate / other if other > 0 else MAX_SLOWDOWN)
                wait = self.explore_cost * self._stint_seconds.get(stale, 0.0) * slower
                if self._since_explore >= max(self.explore_seconds, wait):
                    self._since_explore = 0.0
                    self._start(stale)
