"""The draft-model drafter: LLMCad tree construction (branching threshold, branch pacer,
budgets, stop signals) with hand-computed answers, and its KV bookkeeping on the real
ModelRunner (tiny ONNX model) checked against full recomputation without any cache."""
from __future__ import annotations

import math

import numpy as np
import pytest

from edgeinfer.runtime.config import TreeBudget
from edgeinfer.runtime.drafters.base import Drafter
from edgeinfer.runtime.drafters.model import ModelDrafter
from edgeinfer.runtime.sampling import SamplingParams
from edgeinfer.runtime.tree import TokenTree


class PathRunner:
    """The ModelRunner interface without a KV cache: every new node's logits are computed from
    its full token path (committed + scratch ancestors + itself) by ``logits_fn``. A drafter
    that passes wrong parents or commits the wrong nodes sees different logits."""

    def __init__(self, logits_fn, max_context: int = 10_000) -> None:
        self.logits_fn, self.max_context = logits_fn, max_context
        self.committed: list[int] = []
        self.tok: list[int] = []
        self.par: list[int] = []
        self.calls: list[list[int]] = []

    @property
    def past_len(self) -> int:
        return len(self.committed)

    @property
    def num_scratch(self) -> int:
        return len(self.tok)

    def _path(self, j: int) -> list[int]:
        out = []
        while j >= 0:
            out.append(self.tok[j])
            j = self.par[j]
        return self.committed + out[::-1]

    def forward(self, tokens, parents=None, logits_index=None):
        s, n = len(self.tok), len(tokens)
        if parents is None:
            parents = [s - 1 + i for i in range(n)]
        assert len(parents) == n and all(-1 <= p < s + i for i, p in enumerate(parents))
        assert self.past_len + s + n <= self.max_context
        self.tok += [int(t) for t in tokens]
        self.par += [int(p) for p in parents]
        self.calls.append([int(t) for t in tokens])
        idx = range(n) if logits_index is None else logits_index
        return np.stack([self.logits_fn(self._path(s + i)) for i in idx]).astype(np.float32)

    def commit(self, nodes):
        nodes = list(nodes)
        assert all(self.par[b] == a for a, b in zip(nodes, nodes[1:])) and (not nodes or self.par[nodes[0]] == -1)
        self.committed += [self.tok[j] for j in nodes]
        self.discard()

    def discard(self):
        self.tok, self.par = [], []

    def truncate(self, length):
        self.discard()
        del self.committed[length:]


V = 16


def table_logits(table):
    """Bigram distributions: table[last token] = {token: prob}; default {last + 1: 0.7}; the
    rest of the mass spread evenly over the other tokens."""
    def fn(path):
        t = path[-1]
        row = table.get(t, {(t + 1) % V: 0.7})
        rest = (1.0 - sum(row.values())) / (V - len(row))
        p = np.full(V, rest)
        for k, v in row.items():
            p[k] = v
        return np.log(p)
    return fn


TABLE = {2: {3: 0.5, 4: 0.35, 5: 0.1}, 3: {6: 0.9}, 4: {7: 0.6, 8: 0.32}, 6: {9: 0.8}}


def grow(budget, stop=None, table=TABLE, **kw):
    runner = PathRunner(table_logits(table))
    d = ModelDrafter(runner, **kw)
    return d, runner, d.propose([1, 2], budget, stop)


def test_branching_threshold_and_pacer_order_by_hand():
    # root: 3 (.5), 4 (.35) branch (> .3). M = 6. Pacer (share - len):
    #   3: 6*.5/.85-1 = 2.53 vs 4: 1.47            -> expand 3 (child 6, C .45)
    #   6: 6*.45/.8-2 = 1.38 vs 4: 6*.35/.8-1 = 1.63 -> expand 4 (children 7 .21, 8 .112)
    #   6: 1.50, 7: -.37, 8: -1.13                   -> expand 6 (child 9) -> 6 nodes, stop
    d, runner, tree = grow(TreeBudget(max_nodes=6, max_depth=4, branch_threshold=0.3))
    assert tree.tokens == [3, 4, 6, 7, 8, 9] and tree.parents == [-1, -1, 0, 1, 1, 2]
    np.testing.assert_allclose(tree.probs, [0.5, 0.35, 0.9, 0.6, 0.32, 0.8], rtol=1e-5)
    assert runner.calls == [[1, 2], [3], [4], [6]]
    assert tree.sources == ["model"] * 6 and tree.draft_dists == {}
    assert isinstance(d, Drafter)


def test_min_confidence_depth_cap_chain_and_stop():
    # alpha .46: after expanding 3, T_c = max(.45, .35) < .46
    _, _, tree = grow(TreeBudget(max_nodes=6, max_depth=4, min_confidence=0.46))
    assert tree.tokens == [3, 4, 6]
    _, _, tree = grow(TreeBudget(max_nodes=16, max_depth=2))  # depth-1 leaves cannot grow
    assert tree.tokens == [3, 4, 6, 7, 8] and max(tree.depths()) == 1
    _, _, tree = grow(TreeBudget(max_nodes=5, max_depth=8, branch_threshold=1.0))  # width 1
    assert tree.tokens == [3, 6, 9, 10, 11] and tree.parents == [-1, 0, 1, 2, 3]
    _, runner, tree = grow(TreeBudget(max_nodes=16), stop=lambda t: len(t) >= 3)
    assert tree.tokens == [3, 4, 6] and len(runner.calls) == 2
    _, _, tree = grow(TreeBudget(max_nodes=16), max_children=1)
    assert tree.parents == list(range(-1, len(tree) - 1))  # a chain again


def test_sampling_mode_records_the_distribution_it_sampled_from():
    _, runner, tree = grow(TreeBudget(max_nodes=8, max_depth=3), sampling=SamplingParams(temperature=1.0),
                           seed=3)
    root_q = np.exp(table_logits(TABLE)([1, 2]))
    np.testing.assert_allclose(tree.draft_dists[-1], root_q, rtol=1e-5)
    assert len(tree.children(-1)) == 2  # 1 + one other token above .3
    for parent, q in tree.draft_dists.items():
        for c in tree.children(parent):
            assert tree.probs[c] == pytest.approx(float(q[tree.tokens[c]]), rel=1e-6)
    assert set(tree.draft_dists) <= {-1} | {i for i in range(len(tree)) if tree.children(i)}


# -- KV bookkeeping over many rounds --------------------------------------------------------------

def hashed_logits(path):
    """A 'model' that depends on the last three tokens and the position."""
    r = np.random.default_rng(hash((tuple(path[-3:]), len(path))) & 0xFFFFFFFF)
    return r.normal(size=V) * 2.5


def node_probs_ok(tree: TokenTree, ctx, logits_fn, rtol=1e-5) -> None:
    for i in range(len(tree)):
        path = list(ctx) + [tree.tokens[j] for j in tree.path_to(i)]
        x = np.asarray(logits_fn(path[:-1]), dtype=np.float64)
        p = np.exp(x - x.max())
        assert tree.probs[i] == pytest.approx(p[path[-1]] / p.sum(), rel=rtol, abs=1e-6), (i, path)


def simulate(drafter, runner, logits_fn, rounds, seed, budget, check_fresh=None):
    rng = np.random.default_rng(seed)
    ctx = [1, 2, 3]
    for r in range(rounds):
        tree = drafter.propose(ctx, budget)
        assert runner.committed == ctx[:runner.past_len] and runner.past_len < len(ctx)
        node_probs_ok(tree, ctx, logits_fn)
        if check_fresh is not None:
            fresh = check_fresh().propose(ctx, budget)
            assert (fresh.tokens, fresh.parents) == (tree.tokens, tree.parents)
        leaf = tree.leaves()[rng.integers(len(tree.leaves()))] if len(tree) else -1
        path = tree.path_to(leaf) if leaf >= 0 else []
        path = path[:rng.integers(len(path) + 1)]
        ctx = ctx + [tree.tokens[i] for i in path] + [int(rng.integers(V))]
        if r % 5 == 4:  # a rollback, as after a rejected lossy step or a new turn
            ctx = ctx[:-3] + [int(rng.integers(V))]
    return ctx


@pytest.mark.parametrize("reuse_kv", [True, False])
def test_kv_bookkeeping_matches_a_fresh_drafter_every_round(reuse_kv):
    budget = TreeBudget(max_nodes=7, max_depth=4, branch_threshold=0.2)
    runner = PathRunner(hashed_logits)
    d = ModelDrafter(runner, reuse_kv=reuse_kv)
    simulate(d, runner, hashed_logits, 15, seed=1, budget=budget,
             check_fresh=lambda: ModelDrafter(PathRunner(hashed_logits)))


def test_reusing_the_accepted_path_runs_fewer_tokens():
    budget = TreeBudget(max_nodes=7, max_depth=4, branch_threshold=0.2)
    counts = {}
    for reuse in (True, False):
        runner = PathRunner(hashed_logits)
        d = ModelDrafter(runner, reuse_kv=reuse)
        simulate(d, runner, hashed_logits, 15, seed=2, budget=budget)
        counts[reuse] = d.stats["forward_tokens"]
    assert counts[True] < counts[False]


def test_speculation_that_comes_true_is_reused_without_a_forward():
    runner = PathRunner(table_logits(TABLE))
    d = ModelDrafter(runner)
    budget = TreeBudget(max_nodes=6, max_depth=4)
    tree = d.propose([1, 2], budget)  # best branch 3 -> 6 -> 9 (C .36)
    assert d.speculate(lambda: False, max_steps=3) == 3  # forwards 9, 10, 11
    assert runner.calls[-3:] == [[9], [10], [11]]
    calls = len(runner.calls)
    ctx = [1, 2, 3, 6, 9, 10]  # whole best branch accepted, bonus 10 = the speculated token
    tree = d.propose(ctx, TreeBudget(max_nodes=2, max_depth=4))
    assert d.stats["spec_hits"] == 1 and len(runner.calls) == calls  # no forward at all
    assert tree.tokens == [11, 12] and tree.parents == [-1, 0]
    node_probs_ok(tree, ctx, table_logits(TABLE))
    # a context that leaves the speculated path drops the work and catches up
    ctx2 = ctx + [11, 5]
    tree = d.propose(ctx2, TreeBudget(max_nodes=3))
    assert runner.calls[calls] == [5]  # 1 2 3 6 9 10 11 committed from scratch, only 5 runs
    assert runner.committed == ctx2[:runner.past_len]
    node_probs_ok(tree, ctx2, table_logits(TABLE))
    assert d.speculate(lambda: True, max_steps=3) == 0  # stop() is honoured before any step


def test_context_limit_stops_growth_instead_of_failing():
    runner = PathRunner(table_logits(TABLE), max_context=4)
    d = ModelDrafter(runner)
    tree = d.propose([1, 2], TreeBudget(max_nodes=8))
    assert len(tree) >= 1 and runner.past_len + runner.num_scratch <= 4


# -- the real ModelRunner on a tiny ONNX model ------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ort = pytest.importorskip("onnxruntime")
    rm = pytest.importorskip("runtime_models")
    from edgeinfer.runtime.session import ModelRunner

    spec = rm.tiny_spec(layers=2, vocab=64)
    path = rm.build_tiny_onnx(spec, tmp_path_factory.mktemp("draft"), seed=5)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return spec, path, (lambda p: rm.raw_logits(sess, spec, list(p))[-1]), ModelRunner


@pytest.mark.parametrize("reuse_kv", [True, False])
def test_real_runner_trees_equal_full_recomputation(tiny, reuse_kv):
    spec, path, raw_fn, ModelRunner = tiny
    budget = TreeBudget(max_nodes=8, max_depth=4, branch_threshold=0.08)
    real = ModelRunner(path, spec, max_context=256)
    d_real = ModelDrafter(real, reuse_kv=reuse_kv)
    d_ref = ModelDrafter(PathRunner(raw_fn))
    rng = np.random.default_rng(0)
    ctx = [5, 9, 13]
    branched = False
    for r in range(8):
        t_real, t_ref = d_real.propose(ctx, budget), d_ref.propose(ctx, budget)
        assert (t_real.tokens, t_real.parents) == (t_ref.tokens, t_ref.parents)
        np.testing.assert_allclose(t_real.probs, t_ref.probs, rtol=1e-4, atol=1e-6)
        branched |= any(len(t_real.children(i)) > 1 for i in range(-1, len(t_real)))
        leaf = t_real.leaves()[rng.integers(len(t_real.leaves()))]
        acc = t_real.path_to(leaf)[:rng.integers(1, 4)]
        ctx = ctx + [t_real.tokens[i] for i in acc] + [int(rng.integers(spec.vocab_size))]
    assert branched and real.past_len == len(d_real._committed)
    assert math.isfinite(real.forward_seconds)


def test_set_sampling_switches_modes():
    runner = PathRunner(table_logits(TABLE))
    d = ModelDrafter(runner)
    d.set_sampling(SamplingParams(temperature=0.7), seed=1)
    tree = d.propose([1, 2], TreeBudget(max_nodes=4))
    q = tree.draft_dists[-1]
    x = table_logits(TABLE)([1, 2]) / 0.7
    want = np.exp(x - x.max())
    np.testing.assert_allclose(q, want / want.sum(), rtol=1e-5)
    d.set_sampling(SamplingParams(temperature=0))
    assert d.sampling is None and d.propose([1, 2, 7], TreeBudget(max_nodes=4)).draft_dists == {}


def test_speculation_stops_below_its_confidence_floor():
    runner = PathRunner(table_logits(TABLE))
    d = ModelDrafter(runner)
    d.propose([1, 2], TreeBudget(max_nodes=6, max_depth=4))  # best leaf 9: C .36
    # 9 (C .36) is expanded; its child 10 has C .36 * .7 = .252, 11 would be .176
    assert d.speculate(lambda: False, max_steps=8, min_confidence=0.2) == 2
    assert runner.calls[-2:] == [[9], [10]]


# -- lookahead: guessed chains expanded by the same forward ------------------------------------

from edgeinfer.runtime.drafters.lookahead import NgramLookahead  # noqa: E402


def always(**kw):
    """A lookahead that feeds every guess it finds (no cost to weigh)."""
    return NgramLookahead(cost_ratio=0.0, adapt_cost=False, **kw)


def test_lookahead_grows_the_same_chain_in_fewer_forwards():
    # Default rows only: t -> t + 1 (p .7). The context repeats 0 1 2, so prompt lookup guesses
    # 3 4 5 after the root (all the draft's top-1), then 7 8 9 after ... 4 5 6.
    ctx = list(range(12)) + [0, 1, 2]
    budget = TreeBudget(max_nodes=8, max_depth=9, branch_threshold=1.0)
    trees, calls = {}, {}
    for la in (None, always()):
        runner = PathRunner(table_logits({}))
        d = ModelDrafter(runner, lookahead=la)
        trees[la is None], calls[la is None] = d.propose(ctx, budget), runner.calls
        node_probs_ok(trees[la is None], ctx, table_logits({}))
    assert trees[True].tokens == trees[False].tokens == [3, 4, 5, 6, 7, 8, 9, 10]
    assert trees[True].parents == trees[False].parents
    np.testing.assert_allclose(trees[True].probs, trees[False].probs, rtol=1e-6)
    assert calls[True] == [ctx] + [[t] for t in range(3, 10)]
    assert calls[False] == [ctx + [3, 4, 5], [6, 7, 8, 9]]


def test_wrong_guesses_change_nothing_but_the_forward_width():
    # The context's earlier 0 1 2 was followed by 9 9 9: the guess 9 is not a child of 2.
    ctx = [5, 0, 1, 2, 9, 9, 9, 0, 1, 2]
    budget = TreeBudget(max_nodes=5, max_depth=6, branch_threshold=1.0)
    runner = PathRunner(table_logits({}))
    d = ModelDrafter(runner, lookahead=always())
    tree = d.propose(ctx, budget)
    assert tree.tokens == [3, 4, 5, 6, 7] and d.stats["guessed"] == 0
    assert runner.calls[0] == ctx + [9, 9, 9]
    node_probs_ok(tree, ctx, table_logits({}))
    fed = [len(c) - 1 for c in runner.calls[1:] if len(c) > 1]
    assert d.lookahead.stats == {"forwards": 1 + len(fed), "fed": 3 + sum(fed), "matched": 0}


@pytest.mark.parametrize("reuse_kv", [True, False])
def test_lookahead_kv_bookkeeping_matches_a_fresh_drafter_every_round(reuse_kv):
    # Random trees over a 16-token vocabulary: contexts repeat n-grams often, some guesses match.
    budget = TreeBudget(max_nodes=7, max_depth=5, branch_threshold=0.2)
    runner = PathRunner(hashed_logits)
    d = ModelDrafter(runner, reuse_kv=reuse_kv, lookahead=always(min_ngram=1))
    simulate(d, runner, hashed_logits, 25, seed=4, budget=budget,
             check_fresh=lambda: ModelDrafter(PathRunner(hashed_logits), lookahead=always(min_ngram=1)))
    assert d.stats["guessed"] > 0 and d.lookahead.stats["fed"] > d.lookahead.stats["matched"]


def test_lookahead_speculation_and_reroot():
    # Speculating past the tree with guesses; the next propose re-roots in the speculated part.
    runner = PathRunner(table_logits({}))
    d = ModelDrafter(runner, lookahead=always())
    ctx = list(range(10)) + [0, 1]
    tree = d.propose(ctx, TreeBudget(max_nodes=2, max_depth=4, branch_threshold=1.0))
    assert tree.tokens == [2, 3] and runner.calls == [ctx + [2, 3, 4]]  # 3 has no room for children
    assert d.speculate(lambda: False, max_steps=1) == 1  # expands 3 with guesses 4 5 6
    assert runner.calls[-1] == [3, 4, 5, 6] and d.stats["guessed"] == 1 + 3
    ctx2 = ctx + [2, 3, 4]
    calls = len(runner.calls)
    tree = d.propose(ctx2, TreeBudget(max_nodes=3, max_depth=4, branch_threshold=1.0))
    assert tree.tokens == [5, 6, 7] and d.stats["spec_hits"] == 1
    node_probs_ok(tree, ctx2, table_logits({}))
    assert len(runner.calls) <= calls + 1


@pytest.mark.parametrize("reuse_kv", [True, False])
def test_real_runner_lookahead_trees_equal_full_recomputation(tiny, reuse_kv):
    spec, path, raw_fn, ModelRunner = tiny
    budget = TreeBudget(max_nodes=8, max_depth=5, branch_threshold=0.08)
    real = ModelRunner(path, spec, max_context=256)
    d_real = ModelDrafter(real, reuse_kv=reuse_kv, lookahead=always(min_ngram=1))
    d_ref = ModelDrafter(PathRunner(raw_fn), reuse_kv=reuse_kv, lookahead=always(min_ngram=1))
    rng = np.random.default_rng(1)
    ctx = [5, 9, 13, 5, 9]
    for r in range(10):
        t_real, t_ref = d_real.propose(ctx, budget), d_ref.propose(ctx, budget)
        assert (t_real.tokens, t_real.parents) == (t_ref.tokens, t_ref.parents)
        np.testing.assert_allclose(t_real.probs, t_ref.probs, rtol=1e-4, atol=1e-6)
        leaf = t_real.leaves()[rng.integers(len(t_real.leaves()))]
        acc = t_real.path_to(leaf)[:rng.integers(1, 5)]
        # repeat an earlier piece of the context now and then, so that prompt lookup has matches
        tail = ctx[-4:-2] if r % 2 else [int(rng.integers(spec.vocab_size))]
        ctx = ctx + [t_real.tokens[i] for i in acc] + tail
    assert d_real.lookahead.stats["fed"] > 0 and real.past_len == len(d_real._committed)


# -- the guesser itself ---------------------------------------------------------------------------

def test_ngram_lookahead_picks_the_longest_most_recent_match():
    la = always(max_guesses=3, max_ngram=3, min_ngram=1)
    text = np.array([7, 1, 2, 3, 4, 8, 2, 3, 5, 6, 1, 2, 3], dtype=np.int64)
    assert la.guesses(text, 3) == (3, [4, 8, 2])  # "1 2 3" -> 4 8 2 (not the "2 3" -> 5 6 match)
    assert la.guesses(text, 2) == (3, [4, 8])  # the depth left limits it
    assert la.guesses(text[:8], 3) == (2, [4, 8, 2])  # ends "8 2 3": only "2 3" occurred before
    recent = np.array([2, 3, 9, 2, 3, 5, 1, 2, 3], dtype=np.int64)
    assert la.guesses(recent, 3) == (2, [5, 1, 2])  # the most recent "2 3" wins
    assert la.guesses(np.array([1, 2, 3], dtype=np.int64), 3) == (0, [])
    assert la.guesses(text, 0) == (0, [])


def test_ngram_lookahead_gate_learns_and_explores():
    la = NgramLookahead(max_guesses=2, max_ngram=2, min_ngram=1, decay=0.9, cost_ratio=0.3,
                        explore_every=5)
    text = np.array([4, 5, 6, 4, 5], dtype=np.int64)  # "4 5" -> 6 4
    assert la.guesses(text, 2) == (2, [6, 4])  # the prior (1 in 2) is above the cost ratio
    for _ in range(20):
        la.record(2, 2, 1)  # the first guess always right, the second never
    r = la.rates()
    assert r[1, 0] > 0.9 and r[1, 1] < 0.3 and r[0, 0] == 0.5  # k = 1 untouched
    outs = [la.guesses(text, 2) for _ in range(10)]
    assert outs.count((2, [6, 4])) == 2 and outs.count((2, [6])) == 8  # every 5th chance explores
    la.record_cost(step_seconds=0.010, seconds=0.016, nodes=3)  # 0.3 per extra node
    assert la.cost_ratio == pytest.approx(0.3)
    la.reset()
    assert np.allclose(la.rates(), 0.5) and la.stats["fed"] == 0 and la.cost_ratio == pytest.approx(0.3)


@pytest.mark.parametrize("kw", [{"max_guesses": 0}, {"min_ngram": 0}, {"min_ngram": 3, "max_ngram": 2},
                                {"decay": 0}, {"prior": (3.0, 2.0)}, {"margin": -1.0}])
def test_ngram_lookahead_rejects_bad_settings(kw):
    from edgeinfer.errors import ConfigError

    with pytest.raises(ConfigError, match="NgramLookahead"):
        NgramLookahead(**kw)
