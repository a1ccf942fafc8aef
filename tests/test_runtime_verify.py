"""Greedy / sampling / lossy verification on hand-made logits."""
import numpy as np
import pytest

from edgeinfer.runtime.sampling import SamplingParams, accept_tree, process_logits
from edgeinfer.runtime.tree import TokenTree
from edgeinfer.runtime.verify import verify_greedy, verify_lossy, verify_sampling

V = 12


def tree_of(tokens, parents):
    t = TokenTree()
    for tok, p in zip(tokens, parents):
        t.add(tok, p)
    return t


def logits_with_argmax(argmaxes, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((len(argmaxes), V)).astype(np.float32)
    for i, a in enumerate(argmaxes):
        x[i, a] = x[i].max() + 1.0
    return x


# nodes: 0:5(root) 1:7(root) 2:8(0) 3:9(0) 4:3(2) 5:6(1)
TREE = ([5, 7, 8, 9, 3, 6], [-1, -1, 0, 0, 2, 1])


def test_longest_matching_path_and_bonus():
    t = tree_of(*TREE)
    # rows: root, then nodes 0..5
    x = logits_with_argmax([5, 8, 0, 4, 0, 0, 0])
    r = verify_greedy(t, x, root_token=2)
    assert r.accepted_nodes == [0, 2] and r.accepted_tokens == [5, 8] and r.bonus_token == 4
    assert r.tokens == [5, 8, 4] and r.num_accepted == 2 and r.root_token == 2


def test_second_root_child_and_leaf_bonus():
    t = tree_of(*TREE)
    x = logits_with_argmax([7, 0, 6, 0, 0, 0, 11])
    r = verify_greedy(t, x, root_token=2)
    assert r.accepted_nodes == [1, 5] and r.bonus_token == 11  # accepted to a leaf: its row gives the bonus


def test_nothing_accepted():
    t = tree_of(*TREE)
    r = verify_greedy(t, logits_with_argmax([1, 5, 8, 0, 0, 0, 0]), root_token=2)
    assert r.accepted_nodes == [] and r.tokens == [1]


def test_empty_tree_and_shape_check():
    r = verify_greedy(TokenTree(), logits_with_argmax([3]), root_token=0)
    assert r.tokens == [3]
    with pytest.raises(ValueError, match="expected"):
        verify_greedy(tree_of(*TREE), logits_with_argmax([3, 3]), root_token=0)


def test_topk_rows_root_first():
    t = tree_of(*TREE)
    x = np.random.default_rng(4).standard_normal((7, V)).astype(np.float32)
    r = verify_greedy(t, x, root_token=2)
    want = np.argsort(-x, axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(r.topk(4), want)
    assert r.topk_ids.shape == (7, 8) and r.topk_ids.dtype == np.int64


def test_sampling_with_lazy_rows_equals_rule_on_full_array():
    t = tree_of(*TREE)
    x = np.random.default_rng(5).standard_normal((7, V)).astype(np.float32) * 2
    params = SamplingParams(temperature=0.9, top_k=6, top_p=0.9)
    for seed in range(50):
        got = verify_sampling(t, x, 2, params, np.random.default_rng(seed))
        ref = accept_tree(t, process_logits(x, params), np.random.default_rng(seed))
        assert (got.accepted_nodes, got.bonus_token) == (ref.accepted, ref.next_token)


def test_sampling_at_temperature_zero_is_greedy():
    t = tree_of(*TREE)
    x = logits_with_argmax([5, 8, 0, 4, 0, 0, 0])
    r = verify_sampling(t, x, 2, SamplingParams(temperature=0.0), np.random.default_rng(0))
    assert r.accepted_nodes == [0, 2] and r.bonus_token == 4


def test_lossy_accepts_low_cross_entropy_only():
    t = tree_of([5], [-1])
    x = np.full((2, V), -10.0, dtype=np.float32)
    x[0, 4], x[0, 5] = 3.0, 2.9  # draft 5 is not the argmax but nearly as likely
    x[1, 9] = 1.0
    ce = float(np.log(np.exp(x[0].astype(np.float64)).sum()) - x[0, 5])
    assert verify_lossy(t, x, 0, threshold=ce + 1e-3).tokens == [5, 9]
    assert verify_lossy(t, x, 0, threshold=ce - 1e-3).tokens == [4]
    assert verify_greedy(t, x, 0).tokens == [4]
