"""The compute-IO pipeline (LLMCad): draft while the target verifies.

One ``step``:

1. the draft model proposes tree T for the context (reusing speculative work from the last
   step when the verified context followed it, see ModelDrafter.speculate / propose);
2. ``verify(context, T)`` (the target's tree pass + acceptance + the target cache commit) runs
   on a worker thread; onnxruntime releases the GIL inside ``run``, so both models compute at
   once (or the draft computes while the target waits for layers streamed from storage);
3. meanwhile the draft extends T's best branch beyond its leaf, one forward per step, until
   the verification returns, ``max_ahead`` steps, or the speculated path's draft confidence
   falls below ``spec_min_confidence``;
4. when the accepted path + bonus token equal the speculated prefix, the next propose re-roots
   at the bonus token and keeps the subtree drafted ahead; otherwise that work is dropped.

Every verification and draft forward is recorded in ``trace`` as (kind, start, end) with
time.perf_counter() stamps; kinds: "verify", and the drafter's "catchup" / "expand" /
"speculate". ``overlap_seconds()`` sums how long speculation ran inside verifications.

Measured (SmolLM2-135M fp32 target + int4 draft, one intra-op thread each, 2 shared and busy
cores, 3 prompts x 64 greedy tokens, outputs identical to plain decoding): compute-bound, the
pipeline ran at 0.95x the same speculation without it (both models want the same cores); with
150 ms of emulated layer streaming per target pass (an offloaded target) it ran at 1.07x
(1.01-1.38x), reusing speculated work in about 30% of the steps. Speculating without the
confidence floor (spec_min_confidence=0) was slower than not pipelining in both regimes: the
extra draft steps took CPU from the target's compute.

Engine integration (Engine._tokens): build once per generation
``PipelinedSpeculator(model_drafter, verify_fn, policy, learn=False)`` where
``verify_fn(context, tree) -> VerifyResult`` is the engine's own verify block (target forward
on ``[context[-1]] + tree.tokens``, verify_greedy / verify_sampling, commit of root + accepted
path). Per iteration, instead of propose + verify: ``result = pipe.step(context, budget)``
with the engine's capped budget, then the engine's usual observe / stats / ``context +=
result.tokens``. The target runner must only be touched inside verify_fn while a step runs.
``close()`` (or ``with``) stops the worker thread.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from .config import TreeBudget
from .drafters.model import ModelDrafter
from .tree import TokenTree

__all__ = ["PipelinedSpeculator", "overlap_seconds"]

VerifyFn = Callable[[list[int], TokenTree], Any]


def overlap_seconds(trace: Sequence[tuple[str, float, float]], a: str = "verify",
                    b: str = "speculate") -> float:
    """Total time during which an event of kind ``a`` and one of kind ``b`` both ran."""
    xs = [(s, e) for k, s, e in trace if k == a]
    ys = [(s, e) for k, s, e in trace if k == b]
    return sum(max(0.0, min(e1, e2) - max(s1, s2)) for s1, e1 in xs for s2, e2 in ys)


class PipelinedSpeculator:
    """``step(context)`` = propose + verify on a worker thread + speculate meanwhile.

    drafter: the ModelDrafter (needs ``speculate``); verify: ``verify_fn(context, tree)``;
    policy: a FallbackPolicy-like object (``budget()``, ``should_verify``, ``observe``) or None
    (then ``budget`` is used); max_ahead: speculative draft steps per verification;
    spec_min_confidence: no speculative step whose chance of being used (draft confidence of
    the speculated path) is below this (they only cost CPU the target may need); enabled:
    False runs the same loop without the worker thread (the baseline); learn: False leaves
    ``policy.observe`` / ``drafter.observe`` to the caller (the engine does its own).
    """

    def __init__(self, drafter: ModelDrafter, verify: VerifyFn, policy: Any | None = None,
                 budget: TreeBudget | None = None, max_ahead: int = 8, enabled: bool = True,
                 learn: bool = True, spec_min_confidence: float = 0.1) -> None:
        self.drafter, self.verify, self.policy = drafter, verify, policy
        self.budget = budget or TreeBudget()
        self.max_ahead, self.enabled, self.learn = max_ahead, enabled, learn
        self.spec_min_confidence = spec_min_confidence
        self.verify_events: list[tuple[str, float, float]] = []
        if drafter.trace is None:
            drafter.trace = []
        # reused: the next tree started from speculated nodes; reused_kv: only their K/V was kept
        self.stats = {"steps": 0, "speculated_steps": 0, "reused": 0, "reused_kv": 0}
        self._pool = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeinfer-verify")
                      if enabled else None)

    @property
    def trace(self) -> list[tuple[str, float, float]]:
        """Verify events and the drafter's forward events, by start time."""
        return sorted(self.verify_events + list(self.drafter.trace or []), key=lambda e: e[1])

    def _timed_verify(self, context: list[int], tree: TokenTree) -> Any:
        t0 = time.perf_counter()
        try:
            return self.verify(context, tree)
        finally:
            self.verify_events.append(("verify", t0, time.perf_counter()))

    def step(self, context: Sequence[int], budget: TreeBudget | None = None) -> Any:
        """Propose, verify (overlapped with speculation) and learn; returns the VerifyResult.
        ``budget`` overrides the policy's (the engine caps it near the context end)."""
        ctx = [int(t) for t in context]
        policy = self.policy
        if budget is None:
            budget = policy.budget() if policy is not None else self.budget
        stop = policy.should_verify if policy is not None else None
        ds = self.drafter.stats
        hits, kv_hits = ds["spec_hits"], ds["spec_kv_hits"]
        tree = self.drafter.propose(ctx, budget, stop)
        self.stats["reused"] += ds["spec_hits"] - hits
        self.stats["reused_kv"] += ds["spec_kv_hits"] - kv_hits
        if self._pool is None:
            result = self._timed_verify(ctx, tree)
        else:
            future = self._pool.submit(self._timed_verify, ctx, tree)
            self.stats["speculated_steps"] += self.drafter.speculate(future.done, self.max_ahead,
                                                                    self.spec_min_confidence)
            result = future.result()
        self.stats["steps"] += 1
        if self.learn:
            if policy is not None:
                policy.observe(result)
            self.drafter.observe(result)
        return result

    def overlap_seconds(self) -> float:
        return overlap_seconds(self.trace)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> "PipelinedSpeculator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
