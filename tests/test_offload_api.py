"""edgeinfer.load(memory_budget=...) streams the target from the bundle's shards and still
decodes exactly like the in-memory target; a budget too small fails before loading."""
from __future__ import annotations

import pytest

import edgeinfer
from edgeinfer.errors import BundleError, ConfigError, MemoryBudgetError
from edgeinfer.export.pipeline import DraftFromTarget, ExportConfig, export_bundle
from edgeinfer.runtime.streaming import StreamingRunner


@pytest.fixture(scope="module")
def sharded(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("off") / "b"
    export_bundle(ExportConfig(out=out, target=tiny_checkpoint("llama"), shards=True,
                               draft_from_target=DraftFromTarget.parse("int8")))
    return out


def test_streamed_target_matches_in_memory(sharded):
    ref = edgeinfer.load(sharded).generate("the quick brown fox", max_new_tokens=10, mode="plain")
    eng = edgeinfer.load(sharded, memory_budget="2GB")
    assert isinstance(eng.target, StreamingRunner)
    for mode, drafter in (("plain", None), ("tree", "model"), ("tree", "recycle")):
        r = eng.generate("the quick brown fox", max_new_tokens=10, mode=mode, drafter=drafter)
        assert r.tokens == ref.tokens, (mode, drafter)
    rep = eng.target.memory_report()
    assert rep["planned_peak"] <= rep["budget"]


def test_budget_errors(sharded, tiny_checkpoint, tmp_path):
    with pytest.raises(MemoryBudgetError, match="too small"):
        edgeinfer.load(sharded, memory_budget="1MB")
    with pytest.raises(ConfigError, match="memory_budget"):
        edgeinfer.load(sharded, memory_budget="lots")
    plain = tmp_path / "noshards"
    export_bundle(ExportConfig(out=plain, target=tiny_checkpoint("llama")))
    with pytest.raises(BundleError, match="--shards"):
        edgeinfer.load(plain, memory_budget="1GB")
