"""GenerationConfig / EngineOptions / TreeBudget validation: each bad value raises ConfigError
naming the field."""
import dataclasses

import pytest

from edgeinfer.errors import ConfigError
from edgeinfer.runtime.config import EngineOptions, FallbackConfig, GenerationConfig, TreeBudget


def test_defaults_are_greedy_and_lossless():
    c = GenerationConfig()
    assert c.greedy and c.max_new_tokens > 0 and not c.lossy_rollback and c.mode == "auto"
    assert c.tree.branch_threshold == pytest.approx(0.3)
    assert c.fallback.alpha_init == pytest.approx(0.01)


@pytest.mark.parametrize("field,value", [
    ("max_new_tokens", 0), ("max_new_tokens", -3), ("max_new_tokens", 2.5), ("max_new_tokens", True),
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", "hot"),
    ("top_k", -1), ("top_p", 0.0), ("top_p", 1.5), ("top_p", -0.2),
    ("seed", -1), ("mode", "beam"), ("stop", [""]), ("stop", [3]), ("drafters", [""]),
    ("lossy_rollback", "yes"), ("rollback_threshold", 0), ("tree", {"max_nodes": 3}),
])
def test_generation_config_rejects(field, value):
    with pytest.raises(ConfigError, match=f"GenerationConfig.{field}"):
        GenerationConfig(**{field: value})


def test_generation_config_normalises_and_replaces():
    c = GenerationConfig(stop="END", drafters=["model", "ngram"], top_p=1, temperature=0.7)
    assert c.stop == ("END",) and c.drafters == ("model", "ngram") and not c.greedy
    d = c.replace(max_new_tokens=5, top_k=None)
    assert d.max_new_tokens == 5 and d.top_k == c.top_k
    with pytest.raises(ConfigError, match="max_new_tokens"):
        c.replace(max_new_tokens=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.max_new_tokens = 3  # type: ignore[misc]


@pytest.mark.parametrize("kw,field", [
    ({"max_nodes": 0}, "max_nodes"), ({"max_depth": 0}, "max_depth"),
    ({"branch_threshold": 1.5}, "branch_threshold"), ({"min_confidence": -0.1}, "min_confidence"),
])
def test_tree_budget_rejects(kw, field):
    with pytest.raises(ConfigError, match=f"TreeBudget.{field}"):
        TreeBudget(**kw)


def test_tree_budget_capped():
    b = TreeBudget(max_nodes=10, max_depth=6).capped(3)
    assert (b.max_nodes, b.max_depth) == (3, 3)


@pytest.mark.parametrize("alpha", [0, 1, 1.5, -0.1])
def test_fallback_alpha_range(alpha):
    with pytest.raises(ConfigError, match="alpha_init"):
        FallbackConfig(alpha_init=alpha)


@pytest.mark.parametrize("kw,field", [
    ({"providers": []}, "providers"), ({"providers": [3]}, "providers"),
    ({"draft_providers": [""]}, "draft_providers"), ({"threads": -1}, "threads"),
    ({"graph_optimization": "max"}, "graph_optimization"), ({"max_context": 1}, "max_context"),
    ({"kv_block": 0}, "kv_block"), ({"verify_checksums": 1}, "verify_checksums"),
    ({"draft_lookahead": -1}, "draft_lookahead"), ({"draft_lookahead": 1.5}, "draft_lookahead"),
])
def test_engine_options_rejects(kw, field):
    with pytest.raises(ConfigError, match=f"EngineOptions.{field}"):
        EngineOptions(**kw)


def test_engine_options_accepts_single_and_pairs():
    assert EngineOptions(providers="cpu").providers == ("cpu",)
    o = EngineOptions(providers=[("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"}), "cpu"])
    assert o.providers[0][0] == "CPUExecutionProvider" and o.draft_providers is None
