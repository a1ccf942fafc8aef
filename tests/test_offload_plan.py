"""The offload planner (edgeinfer.runtime.offload.plan_offload): a pure function, checked
against brute force and against the budget on many random cases."""
from __future__ import annotations

import itertools
import random

import pytest

from edgeinfer.errors import MemoryBudgetError
from edgeinfer.runtime.offload import FixedCosts, Part, default_priority, plan_offload

MiB = 2**20


def smollm_parts(head_chunks: int = 1) -> list[Part]:
    """SmolLM2-135M fp32: 30 layers of 14.2 MB, a 113 MB tied head, the embed table."""
    layer = 14_161_920
    head = 113_246_208
    parts = [Part("embed", "embed", head, gather_only=True)]
    parts += [Part(f"layer.{i}", "layer", layer) for i in range(30)]
    parts += [Part(f"head.{c}", "head", head // head_chunks) for c in range(head_chunks)]
    return parts


def test_everything_resident_when_budget_is_large():
    parts = smollm_parts()
    plan = plan_offload(parts, 2**31, FixedCosts(baseline=60 * MiB))
    assert plan.streamed == () and plan.pool_bytes == 0
    assert plan.peak_bytes <= 2**31


def test_two_x_budget_streams_some_layers_with_prefetch():
    parts = smollm_parts(head_chunks=8)
    plan = plan_offload(parts, 270 * MiB, FixedCosts(baseline=150 * MiB, kv=10 * MiB, activations=10 * MiB))
    assert plan.peak_bytes <= 270 * MiB
    assert plan.prefetch and plan.pool_bytes == 2 * 14_161_920
    assert "layer.0" in plan.resident and "layer.1" in plan.resident
    assert "embed" in plan.streamed  # row gather: never worth keeping the table
    # resident + streamed partition the parts, both in pass order
    names = [p.name for p in parts]
    assert sorted(plan.resident + plan.streamed, key=names.index) == names
    assert list(plan.streamed) == [n for n in names if n in plan.streamed]


def test_unchunked_head_needs_a_pool_as_big_as_itself():
    parts = smollm_parts(head_chunks=1)
    plan = plan_offload(parts, 200 * MiB, FixedCosts(baseline=60 * MiB))
    assert plan.peak_bytes <= 200 * MiB
    if "head.0" in plan.streamed:
        assert plan.pool_bytes >= 113_246_208


def test_too_small_budget_names_what_is_missing():
    parts = smollm_parts(head_chunks=8)
    with pytest.raises(MemoryBudgetError, match=r"too small.*draft.*layer\.\d+"):
        plan_offload(parts, 100 * MiB, FixedCosts(baseline=95 * MiB))


def test_one_part_pool_when_double_buffering_does_not_fit():
    parts = [Part(f"layer.{i}", "layer", 10 * MiB) for i in range(4)]
    plan = plan_offload(parts, 25 * MiB, FixedCosts(baseline=10 * MiB))
    assert plan.pool_bytes == 10 * MiB and not plan.prefetch and plan.resident == ()


def test_unstreamable_parts_are_always_resident():
    parts = [Part("embed", "embed", 5 * MiB, streamable=False)] + [Part(f"layer.{i}", "layer", 4 * MiB)
                                                                   for i in range(3)]
    plan = plan_offload(parts, 20 * MiB, FixedCosts(baseline=2 * MiB))
    assert "embed" in plan.resident
    with pytest.raises(MemoryBudgetError, match="resident-only"):
        plan_offload(parts, 10 * MiB, FixedCosts(baseline=2 * MiB))


def test_priority_order_is_respected_among_equal_parts():
    parts = [Part(f"layer.{i}", "layer", MiB) for i in range(6)]
    plan = plan_offload(parts, 4 * MiB, FixedCosts(baseline=0), priority=["layer.5", "layer.4"])
    assert plan.resident == ("layer.4", "layer.5")
    assert default_priority(parts)[:4] == ["layer.0", "layer.1", "layer.5", "layer.2"]
    with pytest.raises(MemoryBudgetError, match="unknown"):
        plan_offload(parts, 6 * MiB, FixedCosts(baseline=0), priority=["layer.9"])


def _peak(parts, resident, fixed, gather):
    from edgeinfer.runtime.offload import _pool_need
    streamed = [p for p in parts if p.name not in resident]
    g = gather if any(p.gather_only for p in streamed) else 0
    return fixed.total() + sum(p.nbytes for p in parts if p.name in resident) + _pool_need(streamed, 1) + g


@pytest.mark.parametrize("seed", range(40))
def test_random_plans_never_exceed_budget_and_match_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 7)
    parts = [Part(f"layer.{i}", "layer", rng.randint(1, 20) * MiB) for i in range(n)]
    if rng.random() < 0.5:
        parts.append(Part("head.0", "head", rng.randint(1, 30) * MiB))
    if rng.random() < 0.5:
        parts.insert(0, Part("embed", "embed", rng.randint(5, 30) * MiB, gather_only=True))
    fixed = FixedCosts(baseline=rng.randint(0, 40) * MiB, kv=rng.randint(0, 5) * MiB,
                       activations=rng.randint(0, 5) * MiB, margin=MiB)
    budget = rng.randint(10, 200) * MiB
    gather = MiB
    # brute force: the most resident bytes any subset can have while one-part streaming fits
    best = None
    names = [p.name for p in parts]
    for k in range(len(parts) + 1):
        for res in itertools.combinations(names, k):
            if _peak(parts, set(res), fixed, gather) <= budget:
                w = sum(p.nbytes for p in parts if p.name in res)
                best = w if best is None else max(best, w)
    if best is None:
        with pytest.raises(MemoryBudgetError):
            plan_offload(parts, budget, fixed, gather_bytes=gather)
        return
    plan = plan_offload(parts, budget, fixed, gather_bytes=gather)
    assert plan.peak_bytes <= budget
    assert plan.resident_bytes <= best
    # greedy keeps a reasonable share of what is possible: it misses at most one part's worth
    # (plus the second pool slot it reserves for prefetch)
    assert plan.resident_bytes >= best - 2 * max(p.nbytes for p in parts)


def test_draft_check_happens_on_estimates_and_names_the_fix():
    from edgeinfer.runtime.offload import DRAFT_EXPANSION, check_draft_fits

    est = check_draft_fits(300 * MiB, 60 * MiB, 84 * MiB, 10 * MiB, 40 * MiB)
    assert est == int(84 * MiB * DRAFT_EXPANSION) + 10 * MiB
    with pytest.raises(MemoryBudgetError, match=r"too small for the draft.*ngram, recycle"):
        check_draft_fits(128 * MiB, 60 * MiB, 84 * MiB, 10 * MiB, 40 * MiB)


def test_llama_cpp_options_mean_the_same_budget():
    from edgeinfer.runtime.offload import llama_cpp_memory_options

    model, kv = 540 * MiB, 10 * MiB
    fits = llama_cpp_memory_options(1024 * MiB, model, kv)
    assert fits["use_mmap"] and fits["use_mlock"] and fits["fits"]
    tight = llama_cpp_memory_options(257 * MiB, model, kv)
    assert tight["use_mmap"] and not tight["use_mlock"] and not tight["fits"]
    gpu = llama_cpp_memory_options(257 * MiB, model, kv, n_layers=30, gpu_budget=100 * MiB)
    assert gpu["n_gpu_layers"] == int((100 * MiB - kv) // (model / 30))
