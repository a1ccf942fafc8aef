"""LLMCad self-adjusting fallback and the cost-aware variant, with hand-computed numbers."""
from __future__ import annotations

import numpy as np
import pytest

from edgeinfer.errors import ConfigError
from edgeinfer.runtime.config import FallbackConfig, GenerationConfig, TreeBudget
from edgeinfer.runtime.policy import CostAwarePolicy, FallbackPolicy, best_branch
from edgeinfer.runtime.tree import TokenTree
from edgeinfer.runtime.verify import verify_greedy


def example_tree() -> TokenTree:
    """0:10 (.9) -> 1:11 (.8) -> 2:12 (.5);  0 -> 3:13 (.6);  4:14 (.1).
    Leaves and C: 2 -> .36, 3 -> .54, 4 -> .1; T_c = .54."""
    t = TokenTree()
    t.add(10, -1, 0.9)
    t.add(11, 0, 0.8)
    t.add(12, 1, 0.5)
    t.add(13, 0, 0.6)
    t.add(14, -1, 0.1)
    return t


def test_best_branch():
    t = example_tree()
    assert best_branch(t, []) == 3  # the most confident leaf
    assert best_branch(t, [0]) == 3  # leaves under node 0: 2 (.36), 3 (.54)
    assert best_branch(t, [0, 1]) == 2
    assert best_branch(t, [4]) == 4
    assert best_branch(TokenTree(), []) == -1


def test_alpha_update_sequence_by_hand():
    t = example_tree()
    pol = FallbackPolicy(TreeBudget(max_nodes=16, max_depth=8))
    assert pol.alpha == 0.01
    steps = [([0, 1, 2], 0.005),  # whole best branch (3 tokens) accepted: alpha / 2
             ([0], 0.5),  # best branch 0->3: N_all 2, N_correct 1 -> 1/2
             ([0, 3], 0.25),  # ends at leaf 3: halve
             ([], 1.0),  # best branch 0->3, nothing accepted: 2/2
             ([0, 1], 1 / 3),  # best branch 0->1->2: (3 - 2) / 3
             ([4], 1 / 6)]  # leaf 4 accepted: halve
    for accepted, want in steps:
        assert pol.update(t, accepted) == pytest.approx(want)
    assert pol.history == pytest.approx([w for _, w in steps])
    pol.update(TokenTree(), [])  # nothing drafted: no change
    assert pol.alpha == pytest.approx(1 / 6) and len(pol.history) == len(steps)
    pol.reset()
    assert pol.alpha == 0.01 and pol.history == []


def test_should_verify_and_budget():
    t = example_tree()  # T_c = .54
    pol = FallbackPolicy(TreeBudget(max_nodes=16, max_depth=5, branch_threshold=0.25), alpha_init=0.5)
    assert not pol.should_verify(t)
    pol.alpha = 0.6
    assert pol.should_verify(t)
    b = pol.budget()
    assert (b.min_confidence, b.max_nodes, b.max_depth, b.branch_threshold) == (0.6, 16, 5, 0.25)
    pol.alpha = 0.01
    pol.set_caps(max_nodes=5)
    assert pol.should_verify(t) and pol.budget().max_nodes == 5  # the hard cap
    assert not pol.should_verify(TokenTree())
    with pytest.raises(ConfigError):
        pol.set_caps(max_nodes=0)
    with pytest.raises(ConfigError):
        FallbackPolicy(alpha_init=0.0)


def test_from_config_and_observe_a_real_verification():
    cfg = GenerationConfig(tree=TreeBudget(max_nodes=12, max_depth=4),
                           fallback=FallbackConfig(alpha_init=0.04))
    pol = FallbackPolicy.from_config(cfg)
    assert pol.alpha == 0.04 and pol.base.max_nodes == 12
    t = example_tree()
    logits = np.zeros((len(t) + 1, 20), np.float32)
    logits[0, 10] = logits[1, 11] = logits[2, 5] = 1.0  # accepts 10, 11; bonus 5
    result = verify_greedy(t, logits, root_token=1)
    assert result.accepted_nodes == [0, 1]
    assert pol.observe(result) == pytest.approx(1 / 3)


def chain(probs):
    return TokenTree.chain(list(range(len(probs))), probs)


def test_cost_aware_rule_by_hand():
    # chain .9, .8: C = .9, .72; sum 1.62; T_c .72; 2 draft steps.
    t = chain([0.9, 0.8])
    pol = CostAwarePolicy(TreeBudget(max_nodes=32))
    assert not pol.should_verify(t)  # no costs yet: LLMCad rule with alpha .01
    pol.set_costs(verify_s=0.030, draft_step_s=0.005)
    # t = 2 * .005 + .030 = .040; rate (1.62 + 1) / .040 = 65.5/s; next step .72 / .005 = 144/s
    assert not pol.should_verify(t)
    pol.set_costs(verify_s=0.001, draft_step_s=0.005)
    # t = .011; rate 238/s > 144/s: verify now
    assert pol.should_verify(t)
    pol.set_costs(verify_s=0.001, draft_step_s=0.001, verify_per_node_s=0.004)
    # t = .002 + .001 + 2 * .004 = .011; next step costs .005 -> same decision
    assert pol.should_verify(t)
    assert pol.budget().min_confidence == 0.0
    with pytest.raises(ConfigError):
        pol.set_costs(verify_s=-1, draft_step_s=0.01)


def test_cost_aware_calibration_by_hand():
    t = chain([0.5, 0.5, 0.5])  # C = .5, .25, .125: 0.875 tokens predicted
    g = CostAwarePolicy.fit_gamma(np.array([0.5, 0.25, 0.125]), 2)
    assert 0.5 ** g + 0.25 ** g + 0.125 ** g == pytest.approx(2.0, abs=1e-6)  # underconfident: g < 1
    assert g < 1
    pol = CostAwarePolicy(calibration_rate=0.5)
    pol.update(t, [0, 1])  # 2 accepted: gamma moves half way to g
    assert pol.gamma == pytest.approx(1 + 0.5 * (g - 1))
    assert pol.alpha == pytest.approx(1 / 3)  # alpha bookkeeping as in FallbackPolicy
    pol.update(t, [0, 1, 2])  # all accepted: towards the lower bound
    assert pol.gamma < 1 + 0.5 * (g - 1)
    assert CostAwarePolicy.fit_gamma(np.array([0.9, 0.8]), 0) == 4.0  # nothing accepted: the upper bound
    pol.reset()
    assert pol.gamma == 1.0


def test_calibrated_underconfident_draft_grows_longer_trees():
    """A draft whose confidences run low (.6 per token) but whose tokens are accepted: once
    calibrated, the same expensive verification lets the chain grow much longer."""
    def size_at_stop(pol):
        for n in range(1, 64):
            if pol.should_verify(chain([0.6] * n)):
                return n
        return 64

    pol = CostAwarePolicy(TreeBudget(max_nodes=64, max_depth=64), calibration_rate=1.0)
    pol.set_costs(verify_s=0.4, draft_step_s=0.016)
    before = size_at_stop(pol)
    pol.update(chain([0.6] * 8), list(range(8)))  # all 8 accepted
    after = size_at_stop(pol)
    assert before < 8 < after, (before, after)


def test_expensive_verification_grows_bigger_trees():
    """Grow a chain of .9-confidence tokens step by step until the policy says verify."""
    def size_at_stop(verify_s):
        pol = CostAwarePolicy(TreeBudget(max_nodes=64))
        pol.set_costs(verify_s=verify_s, draft_step_s=0.005)
        for n in range(1, 64):
            if pol.should_verify(chain([0.9] * n)):
                return n
        return 64

    # Stops when .9**n / .005 s < (E + 1) / (n * .005 s + verify_s), E = sum_k .9**k
    assert [size_at_stop(v) for v in (0.001, 0.02, 0.2, 2.0)] == [1, 7, 19, 37]


class _Timed:
    """Stands for a target that measures its passes (StreamingRunner.verify_cost)."""

    def __init__(self, fixed, per_node):
        self.cost = (fixed, per_node)

    def verify_cost(self):
        return self.cost


class _Drafter:
    step_seconds = 0.005


def test_make_policy_picks_by_target_and_config():
    from edgeinfer.runtime.config import FallbackConfig, GenerationConfig
    from edgeinfer.runtime.policy import make_policy

    auto = GenerationConfig(tree=TreeBudget(max_nodes=64))
    assert type(make_policy(auto, object(), _Drafter())) is FallbackPolicy  # resident target
    streamed = make_policy(auto, _Timed(0.2, 0.0), _Drafter())
    assert isinstance(streamed, CostAwarePolicy) and streamed.base.max_nodes == 64
    forced = GenerationConfig(fallback=FallbackConfig(policy="llmcad"))
    assert type(make_policy(forced, _Timed(0.2, 0.0), _Drafter())) is FallbackPolicy
    cost = make_policy(GenerationConfig(fallback=FallbackConfig(policy="cost")), object(), None)
    assert isinstance(cost, CostAwarePolicy)
    cost.refresh()  # no cost source: stays on the alpha rule
    assert cost.verify_s is None
    with pytest.raises(ConfigError, match="FallbackConfig.policy"):
        FallbackConfig(policy="greedy")


def test_attached_costs_are_read_before_each_tree():
    target, drafter = _Timed(0.0, 0.0), _Drafter()
    pol = CostAwarePolicy(TreeBudget(max_nodes=64))
    pol.attach(target.verify_cost, lambda: drafter.step_seconds)
    pol.refresh()
    assert pol.verify_s is None  # nothing measured yet
    target.cost = (0.2, 0.001)
    pol.refresh()
    assert (pol.verify_s, pol.draft_step_s, pol.verify_per_node_s) == (0.2, 0.005, 0.001)
    # an expensive streamed verification: a .9-confidence chain keeps growing past 7 nodes
    assert not pol.should_verify(chain([0.9] * 7))
    drafter.step_seconds = None  # a drafter that does not measure steps counts as nearly free
    pol.refresh()
    from edgeinfer.runtime.policy import CHEAP_DRAFT_STEP_S

    assert pol.draft_step_s == CHEAP_DRAFT_STEP_S
