"""Offloading inside a real cgroup memory cap (small scale; needs root and cgroup memory).

A child process runs a random 12-layer model (about 56 MB of fp32 weights) inside a cap that
holds the interpreter and libraries but only part of the model. Checked: it is not
OOM-killed; with a budget below the cap, its working set (cgroup charge minus inactive page
cache: everything it holds, onnxruntime's allocations included) never exceeds the budget
after any pass; its greedy output equals onnxruntime on the full graph (near-tie rule); and a
cap too small gives MemoryBudgetError before anything is loaded, not an OOM kill."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import pytest

from edgeinfer.quant.recipe import QuantRecipe
from edgeinfer.runtime.cgroup import memory_cgroup_root, run_capped

from runtime_models import build_tiny_onnx, random_weights, raw_greedy, same_or_near_tie, tiny_spec

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or memory_cgroup_root() is None,
                                reason="needs root and a writable cgroup memory controller")
MiB = 2**20
PROMPT = [5, 99, 1234, 17, 4000, 8]
STEPS = 12

CHILD = """
import json, sys
import numpy as np
from edgeinfer.runtime.memory import cgroup_memory
from edgeinfer.runtime.streaming import ShardPaths, StreamingRunner
spec_d, shards_d, prompt, steps, budget = json.loads(sys.argv[1])
from edgeinfer.spec import ModelSpec
spec = ModelSpec.from_dict(spec_d)
r = StreamingRunner(ShardPaths.from_manifest(shards_d["root"], shards_d), spec, budget,
                    max_context=64, max_nodes=len(prompt), threads=1)
ws = []
logits = r.forward(prompt, logits_index=[len(prompt) - 1])
r.commit(range(len(prompt)))
out = []
for _ in range(steps):
    ws.append(cgroup_memory().working_set())
    out.append(int(np.argmax(logits[-1])))
    logits = r.forward([out[-1]])
    r.commit([0])
print(json.dumps({"tokens": out, "budget": r.budget.bytes, "plan_peak": r.plan.peak_bytes,
                  "streamed": r.plan.streamed, "max_ws": max(ws)}))
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from edgeinfer.export.onnx_shards import build_layer_shards

    spec = dataclasses.replace(tiny_spec(layers=12, vocab=4096), hidden_size=256, intermediate_size=1024,
                               head_dim=64, num_heads=4, num_kv_heads=2)
    root = tmp_path_factory.mktemp("capped")
    full = build_tiny_onnx(spec, root, seed=3)
    info = build_layer_shards(spec, random_weights(spec, 3).__getitem__, QuantRecipe(), root / "layers")
    shards = {**info.to_manifest(root), "root": str(root)}
    ref, gaps = raw_greedy(full, spec, PROMPT, STEPS)
    return spec, shards, ref, gaps


def _child(spec, shards, cap: int, budget: int | None = None):
    arg = json.dumps([spec.to_dict(), shards, PROMPT, STEPS, budget])
    return run_capped([sys.executable, "-c", CHILD, arg], cap, timeout=300, drop=False,
                      cwd=Path(__file__).resolve().parents[1])


def test_streams_inside_cap_without_exceeding_budget(model):
    """The budget comes from the cgroup limit; the kernel stops the child at the cap, so what
    is checked is: no OOM kill, streaming happened, and the output is right."""
    spec, shards, ref, gaps = model
    cap = 64 * MiB
    r = _child(spec, shards, cap)
    assert r.returncode == 0 and not r.oom_killed, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["budget"] == cap and got["plan_peak"] <= cap
    assert any(n.startswith("layer.") for n in got["streamed"]), "the cap should force streaming"
    assert same_or_near_tie(got["tokens"], ref, gaps)


def test_working_set_stays_within_a_budget_below_the_cap(model):
    """memory_budget below the cgroup limit: nothing stops the child at the budget but the
    plan, so a working set above it after any pass would be the planner's fault."""
    spec, shards, ref, gaps = model
    budget, cap = 60 * MiB, 90 * MiB
    r = _child(spec, shards, cap, budget)
    assert r.returncode == 0 and not r.oom_killed, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["budget"] == budget and any(n.startswith("layer.") for n in got["streamed"])
    assert got["max_ws"] <= budget, f"working set {got['max_ws'] / MiB:.1f} MiB above the {budget / MiB:.0f} MiB budget"
    assert same_or_near_tie(got["tokens"], ref, gaps)


def test_budget_too_small_is_a_clear_error_not_an_oom_kill(model):
    """24 MiB cannot even hold the interpreter and onnxruntime: refused before any weight."""
    spec, shards, _, _ = model
    r = _child(spec, shards, 64 * MiB, 24 * MiB)
    assert not r.oom_killed
    assert r.returncode == 1 and "MemoryBudgetError" in r.stderr and "too small" in r.stderr
