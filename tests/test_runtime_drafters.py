"""Training-free drafters (n-gram / prompt lookup, Token Recycling), tree merging and the
shared helpers, on hand-made inputs with hand-computed answers."""
from __future__ import annotations

import numpy as np
import pytest

from edgeinfer.errors import ConfigError
from edgeinfer.runtime.config import TreeBudget
from edgeinfer.runtime.drafters.base import Drafter, node_confidences, tree_confidence
from edgeinfer.runtime.drafters.combined import CombinedDrafter, merge_trees
from edgeinfer.runtime.drafters.ngram import NgramDrafter, find_continuations
from edgeinfer.runtime.drafters.recycle import RecyclingDrafter, static_shape
from edgeinfer.runtime.tree import TokenTree
from edgeinfer.runtime.verify import verify_greedy


def as_lists(t: TokenTree):
    return t.tokens, t.parents, [round(p, 6) for p in t.probs]


def test_confidences_and_leaves():
    t = TokenTree()
    a = t.add(1, -1, 0.5)
    t.add(2, a, 0.4)
    t.add(3, -1, 0.3)
    np.testing.assert_allclose(node_confidences(t), [0.5, 0.2, 0.3])
    assert t.leaves() == [1, 2] and tree_confidence(t) == pytest.approx(0.3)
    assert tree_confidence(TokenTree()) == 1.0


# -- n-gram -------------------------------------------------------------------------------------

def test_find_continuations_most_recent_first_and_not_the_suffix_itself():
    ctx = np.array([1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 8, 6, 1, 2, 3])
    assert find_continuations(ctx, 3, 3) == [[7, 8, 6], [4, 5, 9]]
    assert find_continuations(ctx, 1, 2) == [[7, 8], [4, 5]]
    assert find_continuations(np.array([4, 4]), 1, 3) == [[4]]
    assert find_continuations(np.array([1, 2]), 3, 3) == []


def test_ngram_two_matches_become_two_branches():
    ctx = [1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 8, 6, 1, 2, 3]
    d = NgramDrafter(max_ngram=3, min_ngram=3)
    tree = d.propose(ctx, TreeBudget(max_nodes=16, max_depth=3))
    assert as_lists(tree) == ([7, 8, 6, 4, 5, 9], [-1, 0, 1, -1, 3, 4], [0.5, 1, 1, 0.5, 1, 1])
    assert set(tree.sources) == {"ngram"} and tree.draft_dists == {}
    assert isinstance(d, Drafter)


def test_ngram_shared_prefixes_merge_with_match_shares():
    # suffix [5, 1] occurs at 6 (-> 2 0 5), 3 (-> 3 5 1) and 0 (-> 2 5 1)
    ctx = [5, 1, 2, 5, 1, 3, 5, 1, 2, 0, 5, 1]
    tree = NgramDrafter(max_ngram=2, min_ngram=2).propose(ctx, TreeBudget(max_nodes=16, max_depth=3))
    assert tree.tokens == [2, 0, 5, 3, 5, 1, 5, 1]
    assert tree.parents == [-1, 0, 1, -1, 3, 4, 0, 6]
    np.testing.assert_allclose(tree.probs, [2 / 3, 0.5, 1, 1 / 3, 1, 1, 0.5, 1])


def test_ngram_budgets_and_fallback_to_shorter_ngrams():
    ctx = [1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 8, 6, 1, 2, 3]
    tree = NgramDrafter(max_ngram=3).propose(ctx, TreeBudget(max_nodes=4, max_depth=3))
    assert tree.tokens == [7, 8, 6, 4] and tree.parents == [-1, 0, 1, -1]
    tree = NgramDrafter(max_ngram=3).propose(ctx, TreeBudget(max_nodes=8, max_depth=1))
    assert tree.tokens == [7, 4] and tree.parents == [-1, -1]
    # no 3- or 2-gram match for [.., 8, 3]: the 1-gram [3] is used
    ctx2 = [3, 4, 1, 3, 5, 8, 3]
    assert NgramDrafter(max_ngram=3).propose(ctx2, TreeBudget(max_depth=2)).tokens == [5, 8, 4, 1]
    assert NgramDrafter(max_ngram=3, min_ngram=2).propose(ctx2, TreeBudget()).tokens == []
    # longer n-gram matches come first; shorter ones only fill spare branches
    ctx3 = [7, 1, 2, 9, 2, 8, 1, 2]
    assert NgramDrafter(max_ngram=2, max_branches=4).propose(ctx3, TreeBudget(max_depth=1)).tokens == [9, 8]
    assert NgramDrafter(max_ngram=2, shorter_fill=False).propose(ctx3, TreeBudget(max_depth=1)).tokens == [9]
    with pytest.raises(ConfigError):
        NgramDrafter(max_ngram=1, min_ngram=2)


# -- token recycling ----------------------------------------------------------------------------

def test_static_shape_by_hand():
    # weights .6/.2/.1: paths .6, .36, .216, .2, then .12 (0,1) before .12 (3,0) (pushed first);
    # .1296 would be depth 3 and is skipped.
    assert static_shape(6, 3, (0.6, 0.2, 0.1)) == [(-1, 0), (0, 0), (1, 0), (-1, 1), (0, 1), (3, 0)]
    with pytest.raises(ConfigError):
        static_shape(4, 2, (0.5, 1.0))


def test_recycling_bfs_tree_from_adjacency():
    d = RecyclingDrafter(vocab_size=32, k=3, shape_nodes=6, shape_depth=3, rank_weights=(0.6, 0.2, 0.1))
    d.update(np.array([10, 11, 14, 12]), np.array([[11, 12, 13], [14, 15, 16], [17, 18, 19], [18, 20, 21]]))
    tree = d.propose([5, 10], TreeBudget(max_nodes=16, max_depth=8))
    assert tree.tokens == [11, 14, 17, 12, 15, 18]
    assert tree.parents == [-1, 0, 1, -1, 0, 3]
    np.testing.assert_allclose(tree.probs, [0.6, 0.6, 0.6, 0.2, 0.2, 0.6])
    # unknown rows end a branch; budgets cut the shape in its (best-first) order
    assert d.propose([17], TreeBudget()).tokens == []
    assert d.propose([10], TreeBudget(max_nodes=3)).tokens == [11, 14, 17]
    assert d.propose([10], TreeBudget(max_depth=1)).tokens == [11, 12]


def test_recycling_memory_and_dtype():
    d = RecyclingDrafter(vocab_size=49152, k=8)
    assert d.adj.dtype == np.int32 and d.adj.shape == (49152, 8)
    assert d.nbytes < 2 * 1024 * 1024


def test_recycling_observes_the_targets_topk_from_a_verification():
    vocab = 20
    tree = TokenTree.chain([3, 4])
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, vocab)).astype(np.float32)
    result = verify_greedy(tree, logits, root_token=7)
    d = RecyclingDrafter(vocab_size=vocab, k=4)
    d.observe(result)
    want = np.argsort(-logits, axis=1)[:, :4]
    np.testing.assert_array_equal(d.adj[[7, 3, 4]], want)
    untouched = [t for t in range(vocab) if t not in (7, 3, 4)]
    assert (d.adj[untouched] == -1).all()
    # the next proposal from token 7 starts with the target's top-1 there
    assert d.propose([7], TreeBudget(max_nodes=1)).tokens == [int(want[0, 0])]


# -- merging ------------------------------------------------------------------------------------

def test_merge_dedupes_shared_prefixes_and_keeps_best_nodes():
    a = TokenTree.chain([1, 2, 3], [0.9, 0.5, 0.5], source="a")  # C: .9 .45 .225
    b = TokenTree()
    x = b.add(1, -1, 0.8, "b")  # shares token 1 with a
    b.add(4, x, 0.7, "b")  # C .56
    b.add(5, -1, 0.1, "b")  # C .1
    merged = merge_trees([a, b], TreeBudget(max_nodes=4, max_depth=8))
    assert merged.tokens == [1, 4, 2, 3] and merged.parents == [-1, 0, 0, 2]
    assert merged.probs[0] == 0.9 and merged.sources == ["a", "b", "a", "a"]
    # weights rank the drafters: b's nodes now win the budget
    merged = merge_trees([a, b], TreeBudget(max_nodes=3), weights=[0.1, 1.0])
    assert merged.tokens == [1, 4, 5]
    merged = merge_trees([a, b], TreeBudget(max_nodes=8, max_depth=2))
    assert merged.tokens == [1, 4, 2, 5]


def test_merge_carries_draft_dists_only_when_still_valid():
    q = np.full(8, 0.125)
    sampled = TokenTree()
    sampled.add(1, -1, 0.2, "m")
    sampled.add(2, -1, 0.1, "m")
    sampled.draft_dists[-1] = q
    other = TokenTree.chain([1], [0.3], source="n")
    # other only repeats a sampled child: the children are still the sampled prefix
    assert -1 in merge_trees([sampled, other], TreeBudget()).draft_dists
    assert -1 in merge_trees([sampled], TreeBudget(max_nodes=1)).draft_dists
    # another drafter's child under the same parent: point masses
    assert merge_trees([sampled, TokenTree.chain([3], [0.5])], TreeBudget()).draft_dists == {}
    # merge order that breaks the sampling order: point masses
    swapped = TokenTree()
    swapped.add(1, -1, 0.1, "m")
    swapped.add(2, -1, 0.2, "m")
    swapped.draft_dists[-1] = q
    assert merge_trees([swapped], TreeBudget()).tokens == [2, 1]
    assert merge_trees([swapped], TreeBudget()).draft_dists == {}


def test_combined_drafter_merges_ngram_and_recycling():
    rec = RecyclingDrafter(vocab_size=16, k=2, shape_nodes=4, shape_depth=2, rank_weights=(0.5, 0.2))
    rec.update(np.array([3, 4]), np.array([[4, 9], [5, 6]]))
    comb = CombinedDrafter([NgramDrafter(max_ngram=2), rec])
    ctx = [1, 3, 4, 5, 2, 3]  # n-gram: [3] -> 4 5 2
    tree = comb.propose(ctx, TreeBudget(max_nodes=5, max_depth=3))
    assert comb.name == "ngram+recycle"
    assert tree.tokens == [4, 5, 2, 9, 6] and tree.parents == [-1, 0, 1, -1, 0]
    assert tree.sources == ["ngram", "ngram", "ngram", "recycle", "recycle"]
    logits = np.zeros((6, 16), np.float32)
    logits[:, 0] = 1.0
    comb.observe(verify_greedy(tree, logits, root_token=3))
    assert rec.adj[3, 0] == 0  # the all-zero logits' top-1 is token 0
