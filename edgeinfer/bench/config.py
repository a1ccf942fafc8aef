"""Typed configuration and result records of the benchmark suite.

Definitions used everywhere (README in benchmarks/ repeats them):

* ``ttft_s``: from the start of a generate call (prompt token ids in hand) to the moment the
  first new token is available. It covers prefill plus the first token.
* ``prefill_s``: prefill time; equals ``ttft_s`` unless a method measures prefill on its own.
* ``decode_s``: from the first new token to the last one. Decode tokens/s is
  ``(len(tokens) - 1) / decode_s`` and so excludes prefill.
* ``steps``: target forward passes during decoding (after the first token).
* ``proposed`` / ``accepted``: draft tokens offered to / accepted by the target. Acceptance
  rate = accepted / proposed; mean accepted length = (len(tokens) - 1) / steps, the tokens
  each target pass yields (accepted draft tokens + the target's own token).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping

from ..errors import ConfigError
from ..models import DEFAULT_MODEL

FAMILIES = ("edgeinfer", "llama.cpp", "onnxruntime-genai", "transformers")
GGUF_PRECISIONS = ("source", "F16", "Q8_0", "Q4_0", "Q4_1")
GENAI_PRECISIONS = ("int4", "fp32")
MODES = ("plain", "chain", "tree")


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark invocation. Validated on construction (ConfigError names the field)."""

    model: str = DEFAULT_MODEL  # known model key, a GGUF file or a Hugging Face folder
    bundle: str | None = None  # an edgeinfer bundle dir; None -> export one into the cache
    methods: tuple[str, ...] = ()  # fnmatch patterns on method names; () = every method
    prompts: tuple[str, ...] = ()  # prompt keys (edgeinfer.bench.prompts); () = all
    max_new_tokens: int = 128
    repetitions: int = 3
    warmup: int = 1  # untimed runs per method before the timed ones
    threads: int = 0  # 0 -> os.cpu_count()
    gguf_precisions: tuple[str, ...] = ("F16", "Q8_0", "Q4_0", "source")
    genai_precisions: tuple[str, ...] = GENAI_PRECISIONS
    drafters: tuple[str, ...] = ()  # edgeinfer drafters; () = every drafter the runtime has
    tree_budgets: tuple[int, ...] = (4, 8, 16, 32)  # tree node budgets of the sweep
    lookup_tokens: int = 8  # draft length of the prompt-lookup anchors
    anchors: bool = True  # False: edgeinfer methods only
    sweep: bool = True  # run the tree budget sweep
    probe_mb: int = 256  # array size of the memory-bandwidth probe
    timeout_s: float = 900.0  # per worker request (setup or one generation)
    memory_budget_mb: int = 0  # workers alive at once (estimated); 0 = half of MemAvailable
    out_dir: str = "bench_out"

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "repetitions"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"bench config: {name} must be an int >= 1, got {getattr(self, name)!r}")
        for name in ("warmup", "threads", "memory_budget_mb"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"bench config: {name} must be an int >= 0, got {getattr(self, name)!r}")
        for name in ("methods", "prompts", "gguf_precisions", "genai_precisions", "drafters",
                     "tree_budgets"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        bad = [p for p in self.gguf_precisions if p not in GGUF_PRECISIONS]
        if bad:
            raise ConfigError(f"bench config: gguf_precisions {bad} not in {GGUF_PRECISIONS}")
        bad = [p for p in self.genai_precisions if p not in GENAI_PRECISIONS]
        if bad:
            raise ConfigError(f"bench config: genai_precisions {bad} not in {GENAI_PRECISIONS}")
        if any(not isinstance(b, int) or b < 1 for b in self.tree_budgets):
            raise ConfigError(f"bench config: tree_budgets must be ints >= 1, got {self.tree_budgets}")
        if self.lookup_tokens < 1 or self.probe_mb < 1 or self.timeout_s <= 0:
            raise ConfigError("bench config: lookup_tokens, probe_mb and timeout_s must be positive")
        if self.bundle is not None:
            object.__setattr__(self, "bundle", str(self.bundle))
        object.__setattr__(self, "model", str(self.model))
        object.__setattr__(self, "out_dir", str(self.out_dir))

    @property
    def num_threads(self) -> int:
        return self.threads or (os.cpu_count() or 1)

    @classmethod
    def quick(cls, **overrides: Any) -> "BenchConfig":
        """The CI preset: one prompt, a few tokens, edgeinfer plain + tree and one anchor."""
        base = dict(prompts=("chat",), max_new_tokens=12, repetitions=1, warmup=1,
                    methods=("edgeinfer plain", "edgeinfer tree*", "llama.cpp source"),
                    gguf_precisions=("source",), genai_precisions=(), tree_budgets=(8,),
                    sweep=False, probe_mb=64, timeout_s=600.0)
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_(self, **changes: Any) -> "BenchConfig":
        return replace(self, **changes)


@dataclass(frozen=True)
class MethodSpec:
    """One way of generating: a family, an adapter and its options (all JSON values)."""

    name: str  # unique and stable, e.g. "llama.cpp Q8_0 +lookup"
    family: str  # one of FAMILIES
    adapter: str  # key in edgeinfer.bench.methods.ADAPTERS
    options: Mapping[str, Any] = field(default_factory=dict)
    weight_files: tuple[str, ...] = ()  # files whose bytes are read per plain decode step
    speculative: bool = False
    budget: int | None = None  # tree node budget (sweep); None otherwise

    @property
    def is_anchor(self) -> bool:
        return self.family != "edgeinfer"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["options"] = dict(self.options)
        d["weight_files"] = list(self.weight_files)
        d["is_anchor"] = self.is_anchor
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MethodSpec":
        return cls(name=d["name"], family=d["family"], adapter=d["adapter"],
                   options=dict(d.get("options") or {}),
                   weight_files=tuple(d.get("weight_files") or ()),
                   speculative=bool(d.get("speculative")), budget=d.get("budget"))


@dataclass
class RunResult:
    """What one generate call returns (see the module docstring for the definitions)."""

    tokens: list[int]
    prompt_tokens: int
    ttft_s: float
    prefill_s: float
    decode_s: float
    steps: int | None = None
    proposed: int | None = None
    accepted: int | None = None
    draft_forwards: int | None = None  # the draft model's forward passes (edgeinfer with a draft)
    draft_forward_s: float | None = None  # and their time

    @property
    def decode_tps(self) -> float | None:
        n = len(self.tokens) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else None

    @property
    def prefill_tps(self) -> float | None:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else None

    @property
    def acceptance_rate(self) -> float | None:
        if self.proposed is None or self.accepted is None or self.proposed == 0:
            return None
        return self.accepted / self.proposed

    @property
    def mean_accepted_len(self) -> float | None:
        if not self.steps:
            return None
        return (len(self.tokens) - 1) / self.steps

    @property
    def draft_bound_tps(self) -> float | None:
        """Tokens after the first per second of draft forward passes (they run one at a time
        within the decode): the most the decode can reach, however cheap its verification."""
        n = len(self.tokens) - 1
        if not self.draft_forwards or not self.draft_forward_s or n <= 0:
            return None
        return n / self.draft_forward_s

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(decode_tps=self.decode_tps, prefill_tps=self.prefill_tps,
                 acceptance_rate=self.acceptance_rate, mean_accepted_len=self.mean_accepted_len,
                 draft_bound_tps=self.draft_bound_tps)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunResult":
        return cls(tokens=[int(t) for t in d["tokens"]], prompt_tokens=int(d["prompt_tokens"]),
                   ttft_s=float(d["ttft_s"]), prefill_s=float(d["prefill_s"]),
                   decode_s=float(d["decode_s"]), steps=d.get("steps"),
                   proposed=d.get("proposed"), accepted=d.get("accepted"),
                   draft_forwards=d.get("draft_forwards"), draft_forward_s=d.get("draft_forward_s"))
