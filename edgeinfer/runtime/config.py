"""Configuration of a generation call and of an engine: frozen dataclasses validated on
construction. A bad value raises :class:`~edgeinfer.errors.ConfigError` naming the field and
what was expected; the CLI builds these objects and calls the Python API with them.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import ConfigError

Mode = Literal["auto", "plain", "chain", "tree"]
FALLBACK_POLICIES = ("auto", "llmcad", "cost")
MODES = ("auto", "plain", "chain", "tree")
GRAPH_OPT_LEVELS = ("disable", "basic", "extended", "all")


def _int(owner: str, name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        want = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{owner}.{name} must be {want}, got {value!r}")


def _float(owner: str, name: str, value: Any, lo: float, hi: float, lo_open: bool = False,
           hi_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ConfigError(f"{owner}.{name} must be a number in {interval}, got {value!r}")


def _str_tuple(owner: str, name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    try:
        out = tuple(value)
    except TypeError:
        raise ConfigError(f"{owner}.{name} must be a list of strings, got {value!r}") from None
    for v in out:
        if not isinstance(v, str) or not v:
            raise ConfigError(f"{owner}.{name} must contain non-empty strings, got {v!r}")
    return out


@dataclass(frozen=True)
class TreeBudget:
    """How big a draft tree may grow before it is verified (LLMCad token tree)."""

    # Defaults from budget sweeps on SmolLM2-135M (fp32 target, int4 affine draft on 2 threads,
    # 2 CPU cores, chat prompts, 96 tokens): 12 nodes; 4-8 nodes cut acceptance, 16-32 cost
    # more than they accept. Depth 12: chains of depth 8 / 10 / 12 / 14 ran at 64 / 74 / 69 /
    # 73 tok/s (plain 46), a draft this close to its target (0.91 of drafted tokens accepted)
    # fills depth 8 too often.
    max_nodes: int = 12  # hard cap on tree size (nodes, root excluded)
    max_depth: int = 12  # longest root-to-leaf path
    branch_threshold: float = 0.3  # a candidate with draft probability above this opens a branch
    min_confidence: float = 0.0  # stop extending once every branch's confidence C_i is below this

    def __post_init__(self) -> None:
        _int("TreeBudget", "max_nodes", self.max_nodes, 1)
        _int("TreeBudget", "max_depth", self.max_depth, 1)
        _float("TreeBudget", "branch_threshold", self.branch_threshold, 0.0, 1.0)
        _float("TreeBudget", "min_confidence", self.min_confidence, 0.0, 1.0)

    def capped(self, max_nodes: int) -> "TreeBudget":
        """This budget with at most ``max_nodes`` nodes (and depth), e.g. near the context end."""
        n = max(1, min(self.max_nodes, max_nodes))
        return dataclasses.replace(self, max_nodes=n, max_depth=min(self.max_depth, n))


@dataclass(frozen=True)
class FallbackConfig:
    """When to stop drafting and verify (runtime/policy.py). ``policy``: "llmcad" verifies once
    the tree confidence drops below alpha (LLMCad's self-adjusting fallback); "cost" keeps
    drafting while a further draft step is expected to raise tokens per second, from the
    measured cost of a verification and of a draft step (trees grow when verifying is
    expensive, e.g. a target streamed from storage); "auto" is "cost" for a streamed target and
    "llmcad" otherwise."""

    enabled: bool = True
    alpha_init: float = 0.01
    policy: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"FallbackConfig.enabled must be true or false, got {self.enabled!r}")
        _float("FallbackConfig", "alpha_init", self.alpha_init, 0.0, 1.0, lo_open=True, hi_open=True)
        if self.policy not in FALLBACK_POLICIES:
            raise ConfigError(f"FallbackConfig.policy must be one of {list(FALLBACK_POLICIES)}, got {self.policy!r}")


@dataclass(frozen=True)
class GenerationConfig:
    """Options of one generate/stream call. ``temperature == 0`` is greedy decoding."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    stop: tuple[str, ...] = ()  # generation ends before the first occurrence of any of these
    seed: int | None = None
    mode: Mode = "auto"  # auto: tree when a drafter is available, else plain
    drafters: tuple[str, ...] = ()  # drafter names; empty: the engine's default
    tree: TreeBudget = field(default_factory=TreeBudget)
    fallback: FallbackConfig = field(default_factory=FallbackConfig)
    lossy_rollback: bool = False  # BiLD-style rollback; changes the output, off by default
    rollback_threshold: float = 2.0  # cross-entropy above which lossy rollback fires
    ignore_eos: bool = False  # keep generating after EOS (benchmarks)

    def __post_init__(self) -> None:
        o = "GenerationConfig"
        _int(o, "max_new_tokens", self.max_new_tokens, 1)
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ConfigError(f"{o}.temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        _int(o, "top_k", self.top_k, 0)
        _float(o, "top_p", self.top_p, 0.0, 1.0, lo_open=True)
        object.__setattr__(self, "stop", _str_tuple(o, "stop", self.stop))
        _int(o, "seed", self.seed, 0, allow_none=True)
        if self.mode not in MODES:
            raise ConfigError(f"{o}.mode must be one of {MODES}, got {self.mode!r}")
        object.__setattr__(self, "drafters", _str_tuple(o, "drafters", self.drafters))
        if not isinstance(self.tree, TreeBudget):
            raise ConfigError(f"{o}.tree must be a TreeBudget, got {type(self.tree).__name__}")
        if not isinstance(self.fallback, FallbackConfig):
            raise ConfigError(f"{o}.fallback must be a FallbackConfig, got {type(self.fallback).__name__}")
        for name in ("lossy_rollback", "ignore_eos"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{o}.{name} must be true or false, got {getattr(self, name)!r}")
        _float(o, "rollback_threshold", self.rollback_threshold, 0.0, math.inf, lo_open=True, hi_open=True)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def replace(self, **changes: Any) -> "GenerationConfig":
        """A copy with ``changes`` applied (validated again); None values are ignored."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass(frozen=True)
class EngineOptions:
    """How an engine runs its models: providers per model, threads, context size."""

    providers: tuple[Any, ...] = ("cpu",)  # target: names/aliases in order of preference
    draft_providers: tuple[Any, ...] | None = None  # None: same as the target's
    threads: int = 0  # intra-op threads per session, 0: onnxruntime's default
    # None: as many as the target when the two take turns (draft, then verify): measured on 2
    # cores, the int4 SmolLM2 draft steps in 8.7 ms on 2 threads against 13.2 ms on one (once
    # the sessions stop spinning between runs, SessionSettings.stop_spinning); also next to a
    # streamed target, whose drafting happens between its passes (measured in 321 / 257 MiB
    # caps: drafting 1.50 -> 0.98 s and 1.36 -> 0.99 s per 48 tokens, target time unchanged);
    # one thread when the draft runs beside a resident target's pass (pipeline=True), so that
    # the two do not fight over the cores.
    draft_threads: int | None = None
    inter_op_threads: int = 0
    graph_optimization: str = "all"  # disable | basic | extended | all
    max_context: int | None = None  # None: min(model max_position, 4096)
    kv_block: int = 64  # KV capacity grows in blocks of this many tokens (see kvcache.py)
    verify_checksums: bool = True  # check every bundle file's SHA-256 on load
    pipeline: bool = False  # compute-IO overlap: the draft model drafts on while the target verifies
    pipeline_max_ahead: int = 8  # draft steps beyond the tree per verification (pipeline only)
    # Lookahead guesses per draft forward (drafters/lookahead.py): up to this many tokens guessed
    # from the context run after the node being expanded, in the same forward; 0 (the default):
    # off. Measured on 2 cores (SmolLM2 pair, 4 prompts x 96 tokens x 2 runs, interleaved): with 3
    # guesses draft forwards -12 to -16%, but a forward costs ~+15% (an extra node adds ~0.19 of
    # a step: the int4 kernel is compute-bound) and the draft's multi-node forwards agree less
    # with the target, so trees went 80.1 -> 77.2-78.7 tok/s overall while the code prompt went
    # 84 -> 98-102 (chains 81 -> 91-93 there). Worth it on repetitive text (code, edits).
    draft_lookahead: int = 0
    # Memory budget ("200MB", "1.5GiB", bytes, or "auto" = cgroup limit / available memory).
    # When set, the target streams its layers from the bundle's per-layer shards (offload.py).
    memory_budget: str | int | None = None
    # largest tree a streamed pass is planned for, and the streamed engine's default tree budget
    # (depth max(8, n / 2)): a pass costs about the same for 8 or 25 nodes when layers stream.
    # None: 24 with a draft model, 64 with the training-free drafters alone (their trees need
    # width; measured at a 128 MiB cap, story prompt: 48 -> 64 nodes, 1.62 -> 1.81 tokens per
    # pass, 4.45 -> 5.41 tok/s; 96 gave no more)
    offload_tree_nodes: int | None = None
    # a streamed target returns each node's top-k only when that is all a step reads (greedy;
    # StreamingRunner.compact_logits), and full [rows, vocab] logits for sampling and the lossy
    # rollback, whose trees are capped at this many nodes so that those logits stay small
    # (SmolLM2: 0.2 MiB per row; a 49-node tree's full logits are 9.6 MiB)
    offload_sampling_nodes: int = 8

    def __post_init__(self) -> None:
        o = "EngineOptions"
        object.__setattr__(self, "providers", _providers(o, "providers", self.providers))
        if self.draft_providers is not None:
            object.__setattr__(self, "draft_providers",
                               _providers(o, "draft_providers", self.draft_providers))
        _int(o, "threads", self.threads, 0)
        _int(o, "draft_threads", self.draft_threads, 0, allow_none=True)
        _int(o, "inter_op_threads", self.inter_op_threads, 0)
        if self.graph_optimization not in GRAPH_OPT_LEVELS:
            raise ConfigError(
                f"{o}.graph_optimization must be one of {GRAPH_OPT_LEVELS}, got {self.graph_optimization!r}")
        _int(o, "max_context", self.max_context, 2, allow_none=True)
        _int(o, "kv_block", self.kv_block, 1)
        _int(o, "offload_tree_nodes", self.offload_tree_nodes, 1, allow_none=True)
        _int(o, "offload_sampling_nodes", self.offload_sampling_nodes, 0)
        if self.memory_budget is not None:
            from .memory import parse_budget

            if self.memory_budget != "auto":
                parse_budget(self.memory_budget)  # raises ConfigError naming the value
        for name in ("verify_checksums", "pipeline"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{o}.{name} must be true or false, got {getattr(self, name)!r}")
        _int(o, "pipeline_max_ahead", self.pipeline_max_ahead, 1)
        _int(o, "draft_lookahead", self.draft_lookahead, 0)


def _providers(owner: str, name: str, value: Any) -> tuple[Any, ...]:
    if isinstance(value, (str, tuple)) and (isinstance(value, str) or
                                            (len(value) == 2 and isinstance(value[1], dict))):
        value = [value]
    out = []
    for p in value:
        if isinstance(p, list):
            p = tuple(p)
        ok = isinstance(p, str) and p or (isinstance(p, tuple) and len(p) == 2
                                          and isinstance(p[0], str) and isinstance(p[1], dict))
        if not ok:
            raise ConfigError(f"{owner}.{name}: expected provider names (or (name, options) pairs), got {p!r}")
        out.append(p)
    if not out:
        raise ConfigError(f"{owner}.{name} must name at least one execution provider")
    return tuple(out)
