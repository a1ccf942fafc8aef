"""The lossless invariant on the real default pair (SmolLM2-135M-Instruct fp32 target, int4 affine
draft): for varied prompts, every drafter, tree and chain, greedy speculative output equals
the plain greedy output of the same target (DESIGN.md section 5: identical tokens, or at the
first difference the target's top-2 logits are within 1e-3 relative)."""
from __future__ import annotations

import numpy as np
import pytest

import edgeinfer
from edgeinfer.export.pipeline import default_pair_config, export_bundle
from edgeinfer.runtime.reference_decode import empty_kv, make_session, run_tree

pytestmark = pytest.mark.slow

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],  # short answer, ends on EOS
    [{"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number."}],
    [{"role": "user", "content": "List five fruits, one per line."}],
    [{"role": "user", "content": "Explain in detail how a refrigerator works."}],  # hits max length
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Say hello."}],
    [{"role": "user", "content": "Summarize: The meeting was moved from Monday to Wednesday because "
                                 "the room was booked. Everyone must bring their reports."}],
    [{"role": "user", "content": "Translate 'good morning' into Spanish, French and German."}],
    [{"role": "user", "content": "Write a SQL query that counts orders per customer."}],
    [{"role": "user", "content": "Count from 1 to 20, separated by commas."}],  # repetitive: n-gram hits
    [{"role": "user", "content": "Give me a haiku about autumn leaves."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a fun fact about octopuses."}],  # multi-turn
]
MODES = [("chain", ("model",)), ("tree", ("model",)), ("tree", ("ngram",)), ("tree", ("recycle",)),
         ("tree", ("model", "ngram", "recycle"))]
MAX_NEW = 48


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("default") / "bundle"
    export_bundle(default_pair_config(out))
    return out


def near_tie(session, spec, ids: list[int], rel: float = 1e-3) -> bool:
    """Whether the target's top-2 logits after ``ids`` are within ``rel`` of each other."""
    logits = run_tree(session, spec, empty_kv(spec), ids, list(range(-1, len(ids) - 1)), 0,
                      logits_index=[len(ids) - 1]).logits[0]
    a, b = np.sort(logits)[-2:]
    return abs(b - a) <= rel * max(abs(a), abs(b))


def test_speculative_equals_plain_greedy(bundle):
    engine = edgeinfer.load(bundle)
    manifest_spec = engine.target.spec
    session = None
    finishes = set()
    for messages in PROMPTS:
        plain = engine.generate(messages, max_new_tokens=MAX_NEW, mode="plain")
        finishes.add(plain.finish_reason)
        for mode, drafters in MODES:
            spec_run = engine.generate(messages, max_new_tokens=MAX_NEW, mode=mode, drafter=drafters)
            a, b = plain.tokens, spec_run.tokens
            if a == b:
                continue
            k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            session = session or make_session(bundle / "target" / "model.onnx")
            context = engine.encode_prompt(messages) + a[:k]
            assert near_tie(session, manifest_spec, context), (
                f"{mode} {drafters} differs from plain at token {k} without a near-tie: "
                f"{messages[-1]['content']!r}")
    assert finishes == {"eos", "length"}  # the set covers both endings
