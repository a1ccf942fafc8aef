"""The compute-IO pipeline: draft steps overlap the target's verification (trace), speculation
that comes true is reused, and the generated tokens equal plain greedy decoding of the target."""
from __future__ import annotations

import time

import numpy as np
import pytest

from edgeinfer.runtime.config import TreeBudget
from edgeinfer.runtime.drafters.model import ModelDrafter
from edgeinfer.runtime.pipeline import PipelinedSpeculator, overlap_seconds
from edgeinfer.runtime.policy import FallbackPolicy
from edgeinfer.runtime.verify import verify_greedy
from test_runtime_drafters_model import V, PathRunner, hashed_logits


def test_overlap_seconds():
    trace = [("verify", 0.0, 1.0), ("speculate", 0.5, 0.7), ("speculate", 0.9, 1.4),
             ("expand", 0.1, 0.2), ("verify", 2.0, 3.0)]
    assert overlap_seconds(trace) == pytest.approx(0.3)


def target_logits(path):
    """Agrees with the draft (hashed_logits) on most argmaxes, not all."""
    r = np.random.default_rng((hash(tuple(path[-2:])) + 7) & 0xFFFFFFFF)
    return hashed_logits(path) + 1.2 * r.normal(size=V)


class FakeTarget:
    """verify_fn: target logits for the root and every node from full paths, after a sleep
    standing in for an I/O-bound verification (time.sleep releases the GIL like ORT's run)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def __call__(self, ctx, tree):
        time.sleep(self.delay)
        rows = [target_logits(ctx)]
        for i in range(len(tree)):
            rows.append(target_logits(ctx + [tree.tokens[j] for j in tree.path_to(i)]))
        return verify_greedy(tree, np.stack(rows).astype(np.float32), ctx[-1])


def plain_greedy(ctx, steps):
    out = list(ctx)
    for _ in range(steps):
        out.append(int(np.argmax(target_logits(out))))
    return out[len(ctx):]


def generate(spec: PipelinedSpeculator, ctx, steps):
    out = list(ctx)
    while len(out) - len(ctx) < steps:
        out += spec.step(out).tokens
    return out[len(ctx):len(ctx) + steps]


@pytest.mark.parametrize("enabled", [True, False])
def test_pipeline_output_equals_plain_greedy_and_overlaps(enabled):
    prompt, steps = [1, 2, 3], 40
    drafter = ModelDrafter(PathRunner(hashed_logits))
    policy = FallbackPolicy(TreeBudget(max_nodes=6, max_depth=4, branch_threshold=0.2))
    with PipelinedSpeculator(drafter, FakeTarget(0.01), policy, max_ahead=4, enabled=enabled) as spec:
        got = generate(spec, prompt, steps)
        assert got == plain_greedy(prompt, steps)
        assert spec.stats["steps"] > 0 and len(policy.history) == spec.stats["steps"]
        kinds = {k for k, _, _ in spec.trace}
        if enabled:
            assert spec.stats["speculated_steps"] > 0 and spec.stats["reused"] > 0
            # speculation runs only while a verification is in flight: every speculate step
            # starts after the previous verification ended and before the current one ends
            # (its done() check precedes the step; 5 ms scheduling slack). The worker thread
            # may start a verification a little after the first speculation step.
            assert spec.overlap_seconds() > 0
            ends = [e for k, _, e in spec.trace if k == "verify"]
            spec_starts = [s for k, s, _ in spec.trace if k == "speculate"]
            assert len(spec_starts) == spec.stats["speculated_steps"]
            for s in spec_starts:
                assert any(prev <= s <= e + 0.005 for prev, e in zip([0.0] + ends, ends))
        else:
            assert "speculate" not in kinds and spec.stats["reused"] == 0


# -- real onnxruntime sessions on tiny models ------------------------------------------------------

class RunnerTarget:
    """A minimal verify_fn on a ModelRunner (what the engine's does): the target's committed
    cache holds the context minus its last token; the root and the tree run in one pass and the
    accepted path is committed."""

    def __init__(self, runner) -> None:
        self.runner = runner

    def __call__(self, ctx, tree):
        r = self.runner
        if r.past_len != len(ctx) - 1:
            r.truncate(0)
            if len(ctx) > 1:
                r.forward(ctx[:-1], logits_index=[len(ctx) - 2])
                r.commit(list(range(len(ctx) - 1)))
        logits = r.forward([ctx[-1]] + tree.tokens, [-1] + [p + 1 for p in tree.parents])
        res = verify_greedy(tree, logits, ctx[-1])
        r.commit([0] + [a + 1 for a in res.accepted_nodes])
        return res


@pytest.mark.parametrize("same_model", [True, False])
def test_real_sessions_pipeline_is_lossless_and_overlaps(tmp_path, same_model):
    rm = pytest.importorskip("runtime_models")
    from edgeinfer.runtime.session import ModelRunner

    spec = rm.tiny_spec(layers=2, vocab=64)
    draft_path = rm.build_tiny_onnx(spec, tmp_path, seed=5, name="draft.onnx")
    target_spec = spec if same_model else rm.tiny_spec(layers=4, vocab=64)
    target_path = draft_path if same_model else rm.build_tiny_onnx(target_spec, tmp_path, seed=6,
                                                                   name="target.onnx")
    prompt, steps = [5, 9, 13, 2], 64
    ref, gaps = rm.raw_greedy(target_path, target_spec, prompt, steps)
    drafter = ModelDrafter(ModelRunner(draft_path, spec, threads=1, max_context=256))
    target = RunnerTarget(ModelRunner(target_path, target_spec, threads=1, max_context=256))
    policy = FallbackPolicy(TreeBudget(max_nodes=4, max_depth=4, branch_threshold=0.1))
    with PipelinedSpeculator(drafter, target, policy, max_ahead=4) as pipe:
        got = generate(pipe, prompt, steps)
        assert rm.same_or_near_tie(got, ref, gaps)
        assert pipe.overlap_seconds() > 0
        if same_model:  # the draft is always right: its speculation comes true
            assert pipe.stats["reused"] + pipe.stats["reused_kv"] > 0
