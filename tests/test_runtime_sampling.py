"""Sampling: logits processing against transformers' warpers, and the lossless tree rule
checked statistically (emitted tokens follow the target's distribution) with wrong rules as
negative controls that must fail the same test."""
from __future__ import annotations

import math

import numpy as np
import pytest

from edgeinfer.errors import ConfigError
from edgeinfer.runtime.sampling import (SamplingParams, TreeAcceptance, accept_tree, process_logits,
                                        sample, sample_children)
from edgeinfer.runtime.tree import TokenTree


def chi2_sf(x: float, dof: int) -> float:
    """Survival function of the chi-square distribution (integer dof, closed forms)."""
    h = x / 2.0
    if dof % 2 == 0:
        return math.exp(-h) * sum(h ** i / math.factorial(i) for i in range(dof // 2))
    s = math.erfc(math.sqrt(h))
    for i in range(1, (dof + 1) // 2):
        s += math.exp(-h + (i - 0.5) * math.log(h) - math.lgamma(i + 0.5)) if h > 0 else 0.0
    return s


def chi2_pvalue(counts: np.ndarray, expected_probs: np.ndarray) -> float:
    """Pearson test; cells expected below 5 are pooled into one."""
    counts, e = counts.ravel().astype(float), expected_probs.ravel() * counts.sum()
    small = e < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(e[~small], e[small].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    stat = float(((obs - exp) ** 2 / exp).sum())
    return chi2_sf(stat, len(obs) - 1)


def test_chi2_sf_known_values():
    # Table values: the 95% quantiles for 1, 2, 5 and 35 degrees of freedom.
    for x, dof in ((3.841, 1), (5.991, 2), (11.070, 5), (49.802, 35)):
        assert chi2_sf(x, dof) == pytest.approx(0.05, abs=2e-4)


# -- logits processing --------------------------------------------------------------------------

@pytest.mark.parametrize("t,k,p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.9, 12, 0.6),
                                   (2.0, 1, 1.0), (1.0, 0, 0.05)])
def test_process_logits_matches_transformers(t, k, p):
    torch = pytest.importorskip("torch")
    lp = pytest.importorskip("transformers.generation.logits_process")
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 50)).astype(np.float32) * 3
    logits[1, :7] = logits[1, 7]  # ties at the top-k boundary
    x = torch.from_numpy(logits.copy())
    for w in ([lp.TemperatureLogitsWarper(t)] + ([lp.TopKLogitsWarper(k)] if k else [])
              + ([lp.TopPLogitsWarper(p)] if p < 1 else [])):
        x = w(None, x)
    want = torch.softmax(x.double(), dim=-1).numpy()
    got = process_logits(logits, SamplingParams(temperature=t, top_k=k, top_p=p))
    np.testing.assert_array_equal(got > 0, want > 0)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_greedy_is_point_mass_and_params_validated():
    logits = np.array([[0.1, 2.0, -1.0], [5.0, 4.0, 0.0]])
    np.testing.assert_array_equal(process_logits(logits, SamplingParams(temperature=0)),
                                  [[0, 1, 0], [1, 0, 0]])
    for bad in (dict(temperature=-1), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ConfigError):
            SamplingParams(**bad)


def test_sample_and_sample_children_follow_the_distribution():
    rng = np.random.default_rng(1)
    q = np.array([0.5, 0.3, 0.15, 0.05, 0.0])
    counts = np.bincount([sample(q, rng) for _ in range(20000)], minlength=5)
    assert counts[4] == 0 and chi2_pvalue(counts[:4], q[:4]) > 1e-3
    # Second draw without replacement: P(b) = sum_a q(a) q(b) / (1 - q(a)), a != b.
    second = np.zeros(5)
    for a in range(5):
        for b in range(5):
            if a != b:
                second[b] += q[a] * q[b] / (1 - q[a])
    draws = [sample_children(q, 2, rng) for _ in range(20000)]
    assert all(len(set(d)) == 2 for d in draws)
    counts = np.bincount([d[1] for d in draws], minlength=5)
    assert chi2_pvalue(counts[:4], second[:4]) > 1e-3
    assert sample_children(np.array([0.0, 1.0, 0.0]), 3, rng) == [1]


# -- the tree rule ------------------------------------------------------------------------------
# A bigram "target" and "draft" on 6 tokens: the distribution after a token depends on that
# token only (p0/q0 at the start). A round drafts a tree of width (3, 2), depth 2, and emits
# accepted tokens + one sampled token; two tokens are generated per trial (a second round
# runs when the first emitted only one) and compared with p0(a) * P[a](b).

V = 6


def _bigrams(seed):
    r = np.random.default_rng(seed)
    return (r.dirichlet(np.ones(V)), r.dirichlet(np.ones(V), size=V),
            r.dirichlet(np.ones(V)), r.dirichlet(np.ones(V), size=V))


def _children(q, count, rng, mode):
    if mode == "sampled":
        return sample_children(q, count, rng), True
    top = [int(t) for t in np.argsort(-q, kind="stable")[:count]]
    return top, mode == "mislabelled"  # mislabelled: deterministic, claimed as sampled


def _round(p_root, q_root, P, Q, rng, mode, rule):
    tree = TokenTree()
    toks, with_dist = _children(q_root, 3, rng, mode)
    if with_dist:
        tree.draft_dists[-1] = q_root
    for a in toks:
        i = tree.add(a, -1, float(q_root[a]))
        kids, with_dist = _children(Q[a], 2, rng, mode)
        if with_dist:
            tree.draft_dists[i] = Q[a]
        for b in kids:
            tree.add(b, i, float(Q[a][b]))
    rows = np.stack([p_root] + [P[t] for t in tree.tokens])
    res = rule(tree, rows, rng)
    return res.tokens + [res.next_token]


def _accept_if_possible(tree, rows, rng):
    """A wrong rule: accept any child the target gives non-zero probability."""
    out, node = TreeAcceptance(), -1
    while True:
        ok = [c for c in tree.children(node) if rows[node + 1][tree.tokens[c]] > 0]
        if not ok:
            out.next_token = sample(rows[node + 1], rng)
            return out
        node = ok[0]
        out.accepted.append(node)
        out.tokens.append(tree.tokens[node])


def _two_token_pvalues(mode, rule, seed=0, trials=12000):
    p0, P, q0, Q = _bigrams(seed)
    rng = np.random.default_rng(seed + 100)
    joint = np.zeros((V, V))
    for _ in range(trials):
        out = _round(p0, q0, P, Q, rng, mode, rule)
        if len(out) < 2:
            out += _round(P[out[0]], Q[out[0]], P, Q, rng, mode, rule)
        joint[out[0], out[1]] += 1
    return chi2_pvalue(joint.sum(1), p0), chi2_pvalue(joint, p0[:, None] * P)


@pytest.mark.parametrize("mode", ["sampled", "deterministic"])
def test_tree_rule_emits_the_target_distribution(mode):
    first, joint = _two_token_pvalues(mode, accept_tree)
    assert first > 1e-3 and joint > 1e-3, (first, joint)


@pytest.mark.parametrize("mode,rule", [("sampled", _accept_if_possible),
                                       ("deterministic", _accept_if_possible),
                                       ("mislabelled", accept_tree)])
def test_wrong_rules_fail_the_same_test(mode, rule):
    first, joint = _two_token_pvalues(mode, rule)
    assert min(first, joint) < 1e-3, (first, joint)


def test_mixed_zero_draft_mass_is_rejected_loudly():
    tree = TokenTree()
    tree.add(2, -1, 0.5)
    tree.draft_dists[-1] = np.array([0.5, 0.5, 0.0])
    with pytest.raises(ValueError, match="no mass"):
        accept_tree(tree, np.full((2, 3), 1 / 3), np.random.default_rng(0))


def test_greedy_target_reduces_to_longest_match():
    # Tree: 0:[5] -> 1:[7], 2:[8]; 3:[6]. Target argmax: root 6, after 6 -> 1, after 5 -> 8.
    tree = TokenTree()
    a = tree.add(5, -1, 0.6)
    tree.add(7, a, 0.5)
    tree.add(8, a, 0.4)
    tree.add(6, -1, 0.3)
    logits = np.zeros((5, 10))
    logits[0, 6] = logits[1, 8] = logits[2, 3] = logits[3, 3] = logits[4, 1] = 5.0
    rows = process_logits(logits, SamplingParams(temperature=0))
    for seed in range(5):
        res = accept_tree(tree, rows, np.random.default_rng(seed))
        assert res.accepted == [3] and res.tokens == [6] and res.next_token == 1
    tree.draft_dists[-1] = np.full(10, 0.1)  # sampled children under a greedy target
    res = accept_tree(tree, rows, np.random.default_rng(0))
    assert res.tokens == [6] and res.next_token == 1
