"""Memory-aware layer offloading: the plan of what stays resident and what streams.

The planner is a pure function. It takes the target's streamable *parts* (decoder layers, the
LM head or its row chunks, the embedding table) with their sizes, the bytes everything else
needs (process baseline, the resident draft, KV caches, ONNX Runtime sessions and their
activation arenas, a margin) and the budget, and returns an :class:`OffloadPlan`:

* ``resident``: parts loaded once and kept;
* ``streamed``: parts read from storage on every pass, in pass order;
* ``pool_bytes``: the streaming pool (bytes of streamed weights in memory at once). With at
  least twice the largest streamed part the loader reads part i+1 while part i computes; with
  one part's worth it still works, without overlap (``prefetch`` False).

Every byte is counted in ``breakdown`` and ``peak_bytes <= budget`` always holds for a returned
plan; a budget that cannot hold the fixed costs plus one streamed part raises
:class:`~edgeinfer.errors.MemoryBudgetError` before anything is loaded.

Which parts stay resident: every streamed byte costs the same read time on every pass, so the
planner maximises resident bytes; ties go in ``priority`` order. The default order keeps the
first layers (a pass can start computing while the loader is still behind), then the last
layers, the head, and the embedding table last (a row gather reads only the rows it needs).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

from ..errors import MemoryBudgetError
from ..spec import ModelSpec
from .memory import format_bytes

PartKind = Literal["embed", "layer", "head"]


@dataclass(frozen=True)
class Part:
    """One unit of target weights that is either resident or streamed as a whole."""

    name: str  # "layer.3", "head.0" (row chunk 0 of the head), "embed"
    kind: PartKind
    nbytes: int  # bytes it occupies in memory once loaded
    streamable: bool = True  # False: must be resident (e.g. a graph that cannot take its weights as inputs)
    gather_only: bool = False  # embed table read row by row: streaming costs only the rows used


@dataclass(frozen=True)
class FixedCosts:
    """Bytes that do not depend on the plan (all measured or estimated by the caller)."""

    baseline: int  # the process now: interpreter, libraries, sessions, the loaded draft
    kv: int = 0  # target + draft KV caches at max_context, not yet touched
    activations: int = 0  # ONNX Runtime arenas for the largest pass (target and draft)
    margin: int = 0  # safety for allocator slack and page cache of the graph files

    def total(self) -> int:
        return self.baseline + self.kv + self.activations + self.margin


@dataclass(frozen=True)
class OffloadPlan:
    budget: int
    resident: tuple[str, ...]  # part names, pass order
    streamed: tuple[str, ...]  # part names, pass order
    pool_bytes: int  # streaming pool (0 when nothing streams)
    prefetch: bool  # the pool holds two parts: load overlaps compute
    resident_bytes: int
    streamed_bytes: int  # read from storage per full pass
    breakdown: dict[str, int] = field(default_factory=dict)

    @property
    def peak_bytes(self) -> int:
        return sum(self.breakdown.values())

    def describe(self) -> str:
        b = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.breakdown.items())
        return (f"budget {format_bytes(self.budget)}: {len(self.resident)} parts resident "
                f"({format_bytes(self.resident_bytes)}), {len(self.streamed)} streamed "
                f"({format_bytes(self.streamed_bytes)} per pass, pool {format_bytes(self.pool_bytes)}"
                f"{', prefetch' if self.prefetch else ', no prefetch'}); planned peak "
                f"{format_bytes(self.peak_bytes)} = {b}")


def default_priority(parts: Sequence[Part]) -> list[str]:
    """First layers, last layers (alternating from both ends), then head chunks, then embed."""
    layers = [p.name for p in parts if p.kind == "layer"]
    order: list[str] = []
    lo, hi = 0, len(layers) - 1
    while lo <= hi:  # 0, 1, L-1, 2, 3, L-2, ...: two from the front for one from the back
        for _ in range(2):
            if lo <= hi:
                order.append(layers[lo])
                lo += 1
        if lo <= hi:
            order.append(layers[hi])
            hi -= 1
    order += [p.name for p in parts if p.kind == "head"]
    order += [p.name for p in parts if p.kind == "embed"]
    return order


def _pool_need(streamed: Sequence[Part], depth: int) -> int:
    """Pool bytes so that ``depth`` consecutive streamed parts fit (depth 2: double buffering)."""
    sizes = [p.nbytes for p in streamed if not p.gather_only]
    if not sizes:
        return 0
    if len(sizes) == 1 or depth == 1:
        return max(sizes)
    return max(sizes[k] + sizes[(k + 1) % len(sizes)] for k in range(len(sizes)))


def plan_offload(parts: Sequence[Part], budget: int, fixed: FixedCosts,
                 priority: Sequence[str] | None = None, gather_bytes: int = 0) -> OffloadPlan:
    """Plan residency for ``parts`` (in pass order) under ``budget`` bytes.

    ``gather_bytes``: memory a row-gathered embedding needs per pass (rows of the largest
    pass), counted only if the embedding is not resident.
    """
    if budget <= 0:
        raise MemoryBudgetError(f"memory budget must be positive, got {budget} bytes")
    names = [p.name for p in parts]
    if len(set(names)) != len(names):
        raise MemoryBudgetError(f"offload planner: duplicate part names in {names}")
    by_name = {p.name: p for p in parts}
    order = list(priority) if priority is not None else default_priority(parts)
    unknown = [n for n in order if n not in by_name]
    if unknown:
        raise MemoryBudgetError(f"offload planner: priority names unknown parts {unknown}")
    order += [n for n in names if n not in order]

    fixed_total = fixed.total()
    resident = {p.name for p in parts if not p.streamable}

    def cost(res: set[str], depth: int) -> tuple[int, int, int]:
        streamed = [p for p in parts if p.name not in res]
        pool = _pool_need(streamed, depth)
        gather = gather_bytes if any(p.gather_only for p in streamed) else 0
        weights = sum(by_name[n].nbytes for n in res)
        return weights, pool, gather

    def fits(res: set[str], depth: int) -> bool:
        return fixed_total + sum(cost(res, depth)) <= budget

    # The floor: fixed costs, the parts that cannot stream, and one streamed part at a time.
    if not fits(resident, 1):
        w, pool, gather = cost(resident, 1)
        biggest = max((p for p in parts if p.name not in resident and not p.gather_only),
                      key=lambda p: p.nbytes, default=None)
        need = fixed_total + w + pool + gather
        what = f"the largest streamed part ({biggest.name}, {format_bytes(biggest.nbytes)})" if biggest else "nothing"
        raise MemoryBudgetError(
            f"memory budget {format_bytes(budget)} is too small: at least {format_bytes(need)} is "
            f"needed for the process and draft ({format_bytes(fixed.baseline)}), KV caches "
            f"({format_bytes(fixed.kv)}), runtime buffers ({format_bytes(fixed.activations + fixed.margin)})"
            f"{', resident-only parts ' + format_bytes(w) if w else ''} and {what}")
    depth = 2 if fits(resident, 2) else 1
    for name in order:
        if name in resident:
            continue
        trial = resident | {name}
        if fits(trial, depth):
            resident = trial
    # Everything resident that could be: if double buffering was impossible, try again now.
    if depth == 1 and fits(resident, 2):
        depth = 2
    weights, pool, gather = cost(resident, depth)
    streamed_parts = [p for p in parts if p.name not in resident]
    breakdown = {"baseline": fixed.baseline, "kv": fixed.kv, "activations": fixed.activations,
                 "margin": fixed.margin, "resident weights": weights, "stream pool": pool}
    if gather:
        breakdown["embed rows"] = gather
    plan = OffloadPlan(
        budget=budget,
        resident=tuple(n for n in names if n in resident),
        streamed=tuple(p.name for p in streamed_parts),
        pool_bytes=pool,
        prefetch=depth == 2 and len([p for p in streamed_parts if not p.gather_only]) > 1,
        resident_bytes=weights,
        streamed_bytes=sum(p.nbytes for p in streamed_parts if not p.gather_only),
        breakdown=breakdown)
    assert plan.peak_bytes <= budget, plan.describe()
    return plan


# -- memory costs that do not depend on the plan ------------------------------------------

def safety_margin(budget: int) -> int:
    """Bytes of a budget left unplanned for what no estimate covers (allocator slack, Python
    objects, the kernel reclaiming page cache under the cap more slowly than a pass allocates,
    code and library pages first touched after loading). Measured: with 3.3 MiB of a 128 MiB
    cap, two of three runs with a busy second core were OOM-killed (none on an idle machine);
    with 7.3 MiB, once the head's buffers were counted exactly, a 49-node Token Recycling tree
    run at 128 MiB thrashed (the kernel evicting the process's own code pages; no OOM kill).
    This gives 9.3 MiB there, 10.6 MiB at 257 MiB."""
    return min(16 * 2**20, 8 * 2**20 + budget // 100)


def kv_bytes(spec: ModelSpec, max_context: int, itemsize: int = 4) -> int:
    """Bytes of a full KV cache for ``spec`` at ``max_context`` tokens."""
    return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * max_context * itemsize


def activation_bytes(spec: ModelSpec, max_nodes: int, max_context: int, head_rows: int,
                     full_rows: int | None = None) -> int:
    """A bound on per-pass buffers: masks, layer intermediates (counted twice: onnxruntime's
    temporaries), the logits and one head slice's output. Measured for SmolLM2 (49 nodes, 160
    context, arena off): 18-19 MB at the peak of a pass, this gives 25.5 MB. ``full_rows``: the
    rows of full logits a pass may return when the others come back as their top-k only (a
    compact pass: then per head slice also argpartition's int64 indices); None: all of them."""
    n, c = max_nodes, max_context + max_nodes
    masks = 2 * n * c * 4
    layer = n * 4 * (8 * spec.hidden_size + 3 * spec.num_heads * c + 5 * spec.intermediate_size
                     + (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim)
    if full_rows is None:
        logits = n * spec.vocab_size * 4 + n * head_rows * 4
    else:
        logits = min(full_rows, n) * spec.vocab_size * 4 + n * head_rows * (4 + 8)
    return masks + 2 * layer + logits


# -- checks before anything is loaded --------------------------------------------------------

# Resident bytes of an onnxruntime session per byte of its external data (pre-packed weights plus
# the arena of a first pass), measured on SmolLM2 drafts: int4, 84 MB of data -> 108 MB after
# loading, 117 MB after a 25-node pass (1.39x); int4 affine with an int8 head, 115 -> 137 / 150 MB
# (1.30x). The pages of the data file itself are dropped after loading (lock_pages_on_fault).
# The check before loading uses the lower end, 1.2: it refuses budgets that cannot work and lets
# the streaming target's planner, which measures what the loaded draft really holds, decide the
# close cases (it too raises MemoryBudgetError before reading any target weight).
DRAFT_EXPANSION = 1.2


def check_draft_fits(budget: int, baseline: int, draft_data_bytes: int, draft_extra: int,
                     target_floor: int, where: str = "draft") -> int:
    """Raise MemoryBudgetError, before the draft is loaded, if the budget cannot hold the
    process (``baseline``), the resident draft (its data times DRAFT_EXPANSION plus
    ``draft_extra``: KV cache and per-pass buffers) and the least the streamed target needs
    (``target_floor``, see streaming.target_floor_bytes). Returns the draft estimate."""
    draft = int(draft_data_bytes * DRAFT_EXPANSION) + draft_extra
    need = baseline + draft + target_floor
    if need > budget:
        raise MemoryBudgetError(
            f"memory budget {format_bytes(budget)} is too small for the {where}: it needs about "
            f"{format_bytes(draft)} resident, the process already holds {format_bytes(baseline)} and "
            f"streaming the target needs at least {format_bytes(target_floor)} "
            f"(total {format_bytes(need)}); use a smaller drafter (ngram, recycle) or a larger budget")
    return draft


def llama_cpp_memory_options(budget: int, model_bytes: int, kv_bytes: int, overhead: int = 64 * 2**20,
                             n_layers: int = 0, gpu_budget: int = 0) -> dict[str, object]:
    """llama.cpp options that give a memory budget the same meaning as here (whole-process
    memory, page cache included).

    llama.cpp has no layer streaming of its own: with ``use_mmap`` its weights are file pages
    that the kernel keeps or evicts, so when the model does not fit, every token pages evicted
    weights back in (the benchmark's llama.cpp baseline). So: if model + KV + overhead fit the
    budget, map and lock the weights (``use_mlock``: resident, like our resident parts);
    otherwise map without locking (the only way it runs at all). ``gpu_budget`` (bytes of
    device memory the budget allows) gives ``n_gpu_layers``: as many layers as fit there."""
    fits = model_bytes + kv_bytes + overhead <= budget
    out: dict[str, object] = {"use_mmap": True, "use_mlock": fits, "n_gpu_layers": 0,
                              "fits": fits}
    if gpu_budget > 0 and n_layers > 0:
        per_layer = model_bytes / n_layers
        out["n_gpu_layers"] = int(min(n_layers, max(0, gpu_budget - kv_bytes) // per_layer))
    return out
