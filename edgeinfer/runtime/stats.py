"""Statistics of one generation call, and a cheap per-phase trace.

The trace holds one small tuple per phase per step (no formatting, no logging in the decode
loop); :meth:`Trace.events` turns it into dataclasses afterwards. Timestamps are
``time.perf_counter()`` seconds relative to the start of the call, so phases recorded from
another thread (the compute-IO pipeline) line up with the engine's.
"""
from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class TraceEvent:
    phase: str  # prefill | draft | verify | decode | observe | ... (pipeline phases welcome)
    model: str  # target | draft | the drafter's name
    start: float  # seconds since the call started
    end: float
    tokens: int = 0  # tokens processed (prefill, verify: tree nodes + 1) or proposed (draft)
    thread: str = ""


class Trace:
    """Append-only, thread-safe (list.append under the GIL) phase log."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self._rows: list[tuple[str, str, float, float, int, int]] = []

    def record(self, phase: str, model: str, start: float, end: float, tokens: int = 0) -> None:
        """``start``/``end``: raw time.perf_counter() values."""
        if self.enabled:
            self._rows.append((phase, model, start, end, tokens, threading.get_ident()))

    def events(self) -> list[TraceEvent]:
        names = {t.ident: t.name for t in threading.enumerate()}
        return [TraceEvent(p, m, s - self.t0, e - self.t0, n, names.get(tid, str(tid)))
                for p, m, s, e, n, tid in self._rows]


@dataclass
class GenerationStats:
    mode: str = "plain"  # plain | chain | tree
    drafters: tuple[str, ...] = ()
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0  # first token -> last token
    ttft_seconds: float = 0.0  # call start (incl. tokenization) -> first token available
    total_seconds: float = 0.0
    verifications: int = 0  # target tree passes in speculative mode
    drafted_tokens: int = 0  # tree nodes sent to verification
    accepted_tokens: int = 0  # drafted tokens the target accepted
    draft_seconds: float = 0.0  # drafters' propose + observe
    # the draft model's forward passes in this call (its prompt catch-up included) and their
    # time: they run one at a time within the decode, so decoding can never beat
    # draft_bound_tokens_per_s, however cheap verification is
    draft_forwards: int = 0
    draft_forward_seconds: float = 0.0
    target_seconds: float = 0.0  # target forward passes (prefill + decode)
    # mode="auto": decoding steps the SpeculationGate ran plain (speculation measured slower)
    auto_plain_steps: int = 0
    # mode="auto": speculative rounds per arm the gate chose ("tree:model", "chain:recycle", ...)
    auto_rounds: dict[str, int] = field(default_factory=dict)
    providers: dict[str, str] = field(default_factory=dict)  # model -> execution provider
    provider_notes: dict[str, str] = field(default_factory=dict)  # model -> why others were skipped
    finish_reason: str = ""  # eos | stop | length
    trace: list[TraceEvent] = field(default_factory=list, repr=False)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first one, per second of decoding."""
        n = self.generated_tokens - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def mean_accepted(self) -> float:
        """Drafted tokens accepted per verification (the bonus token not counted)."""
        return self.accepted_tokens / self.verifications if self.verifications else 0.0

    @property
    def draft_forwards_per_token(self) -> float:
        """Draft model forward passes per generated token (0 without a draft model)."""
        return self.draft_forwards / self.generated_tokens if self.generated_tokens else 0.0

    @property
    def draft_bound_tokens_per_s(self) -> float:
        """Tokens after the first one per second of the draft model's forward passes: the
        decode rate the draft alone allows (0 without a draft model)."""
        n = self.generated_tokens - 1
        return n / self.draft_forward_seconds if n > 0 and self.draft_forward_seconds > 0 else 0.0

    def to_dict(self, trace: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not trace:
            d.pop("trace")
        for name in ("prefill_tokens_per_s", "decode_tokens_per_s", "acceptance_rate", "mean_accepted",
                     "draft_forwards_per_token", "draft_bound_tokens_per_s"):
            d[name] = getattr(self, name)
        return d


def attach_drafter_trace(drafter: Any) -> list | None:
    """Drafters that time their own forward calls (a ``trace`` attribute holding
    ``(kind, start, end)`` tuples, e.g. drafters.model.ModelDrafter) log into a fresh list."""
    if drafter is not None and hasattr(drafter, "trace"):
        drafter.trace = []
        return drafter.trace
    return None


def drafter_events(rows: list | None, t0: float) -> list[TraceEvent]:
    return [TraceEvent(str(kind), "draft", s - t0, e - t0) for kind, s, e in (rows or [])]
