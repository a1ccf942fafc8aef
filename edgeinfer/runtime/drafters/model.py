"""The draft-model drafter (LLMCad token tree) on a ModelRunner with its own KV cache.

Growing a tree (``propose``):

1. Catch up: the runner's committed cache is brought to a prefix of the context and the rest
   of the context is run as one chain; its last logits give the root's distribution.
2. Each forward call expands one leaf (one draft step): its top-1 token extends the branch and
   every other token whose draft probability exceeds ``budget.branch_threshold`` opens a new
   branch (at most ``max_children`` children). The *branch pacer* gives the step to the
   expandable leaf furthest behind its share: argmax_i M * C_i / sum_j C_j - len_i over the
   leaves (M = budget.max_nodes, C_i = product of probabilities on the path, len_i = its
   number of tokens); ties go to the larger C_i, then the older leaf.
3. Drafting stops at the node cap, when no leaf may grow (max_depth), when the tree
   confidence T_c = max_i C_i drops below ``budget.min_confidence`` (the policy's alpha), or
   when ``stop(tree)`` says so; each check happens after every draft step.

Sampling mode (``sampling`` given): children are *sampled* without replacement from the
processed draft distribution q (the count is 1 + the number of other tokens above the branch
threshold), and q is attached as ``tree.draft_dists[parent]`` for the lossless rule.
Greedy mode: children are the top-1 and the tokens above the threshold of softmax(logits), and
count as point masses. Width 1 (a chain): branch_threshold = 1.

KV reuse (``reuse_kv=True``, the default): the expanded nodes keep their K/V as runner
scratch; at the next ``propose`` the accepted path is found by matching the new context
against the old tree and its expanded part is committed, so only the unexpanded rest (usually
the bonus token) is run. ``reuse_kv=False`` commits only the old catch-up chain and re-runs
all accepted tokens. Measured on SmolLM2-135M (int4 draft, 3 prompts x 64 tokens): keeping
the path ran 17-19% fewer draft tokens in the same number of forward calls, for about the
same or less draft time; committing costs one in-place gather, so it is never slower.
When the new context ends exactly at an expanded node (a pipeline speculation that came true,
see ``speculate``), the drafter re-roots there and keeps that subtree, with no forward call.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np

from ...errors import ConfigError
from ..sampling import SamplingParams, process_logits, sample_children
from ..tree import TokenTree
from .base import StopFn, TreeBudget

__all__ = ["ModelDrafter"]


class _Store:
    """The draft's working tree. Node 0 is the root (the last context token)."""

    def __init__(self, token: int, slot: int) -> None:
        self.tok, self.par, self.prob, self.conf = [token], [-1], [1.0], [1.0]
        self.depth, self.slot, self.spec = [-1], [slot], [False]
        self.kids: list[list[int]] = [[]]
        self.dist: list[np.ndarray | None] = [None]

    def __len__(self) -> int:
        return len(self.tok)

    def add(self, token: int, parent: int, prob: float, spec: bool) -> int:
        self.tok.append(token)
        self.par.append(parent)
        self.prob.append(prob)
        self.conf.append(self.conf[parent] * prob)
        self.depth.append(self.depth[parent] + 1)
        self.slot.append(-1)
        self.spec.append(spec)
        self.kids.append([])
        self.dist.append(None)
        self.kids[parent].append(len(self.tok) - 1)
        return len(self.tok) - 1

    def subtree(self, v: int) -> "_Store":
        """The subtree under v as a new store rooted at v (slots kept, confidences rebased)."""
        out = _Store(self.tok[v], self.slot[v])
        out.dist[0] = self.dist[v]
        new = {v: 0}
        for i in range(v + 1, len(self.tok)):
            p = self.par[i]
            if p in new:
                j = out.add(self.tok[i], new[p], self.prob[i], False)
                out.slot[j], out.dist[j] = self.slot[i], self.dist[i]
                new[i] = j
        return out


class ModelDrafter:
    """runner: the draft's ModelRunner (owned: nothing else may touch it); sampling / seed:
    sampled children (see set_sampling); reuse_kv: keep expanded nodes' K/V across proposals;
    max_children: branches per expansion; scratch_limit: uncommitted nodes kept for re-rooting
    (they widen the draft's attention, so the drafter commits once there are more)."""

    name = "model"

    def __init__(self, runner: Any, sampling: SamplingParams | None = None, seed: int | None = None,
                 reuse_kv: bool = True, max_children: int = 4, scratch_limit: int = 96) -> None:
        if max_children < 1:
            raise ConfigError(f"ModelDrafter.max_children must be >= 1, got {max_children!r}")
        self.runner = runner
        self.sampling = None if sampling is None or sampling.greedy else sampling
        self.rng = np.random.default_rng(seed)
        self.reuse_kv, self.max_children, self.scratch_limit = reuse_kv, max_children, scratch_limit
        self.trace: list[tuple[str, float, float]] | None = None  # (kind, start, end) per forward
        # spec_hits: re-rooted at a speculated node (tree start reused); spec_kv_hits: speculated
        # K/V committed (the verified context ran into, but not through, the speculation)
        self.stats = {"forwards": 0, "forward_tokens": 0, "reroots": 0, "spec_hits": 0, "spec_kv_hits": 0}
        # running mean (weight 0.2) of one-token forwards on the critical path (not the pipeline's
        # speculation, which shares the cores with a target pass and runs slower): a draft
        # step's cost for CostAwarePolicy and auto mode's gate
        self.step_seconds: float | None = None
        self._committed: list[int] = []  # mirrors the runner's committed cache
        self._slot_tok: list[int] = []  # mirrors the runner's scratch: token, parent slot
        self._slot_par: list[int] = []
        self._ctx: list[int] | None = None  # the context the store is rooted at
        self._store: _Store | None = None
        self._exported: list[int] = []  # store nodes of the last proposed tree, in tree order

    # -- runner access ---------------------------------------------------------------------
    def _forward(self, kind: str, tokens: list[int], parents: list[int] | None,
                 last_only: bool) -> np.ndarray:
        """runner.forward + trace + the scratch mirror; logits float32 [m, vocab]."""
        base = len(self._slot_tok)
        t0 = time.perf_counter()
        logits = self.runner.forward(tokens, parents, [len(tokens) - 1] if last_only else None)
        t1 = time.perf_counter()
        if self.trace is not None:
            self.trace.append((kind, t0, t1))
        self.stats["forwards"] += 1
        self.stats["forward_tokens"] += len(tokens)
        if len(tokens) == 1 and kind != "speculate":  # not the steps that overlap a target pass
            dt = t1 - t0
            self.step_seconds = dt if self.step_seconds is None else 0.8 * self.step_seconds + 0.2 * dt
        for i, t in enumerate(tokens):
            self._slot_tok.append(int(t))
            self._slot_par.append((base + i - 1 if i else base - 1) if parents is None else parents[i])
        return logits

    def _room(self, n: int) -> bool:
        limit = getattr(self.runner, "max_context", None)
        return limit is None or self.runner.past_len + len(self._slot_tok) + n <= limit

    def _commit_slot_path(self, slot: int) -> None:
        path = []
        while slot >= 0:
            path.append(slot)
            slot = self._slot_par[slot]
        path.reverse()
        self.runner.commit(path)
        self._committed += [self._slot_tok[s] for s in path]
        self._slot_tok, self._slot_par = [], []

    def _clear_scratch(self) -> None:
        self.runner.discard()
        self._slot_tok, self._slot_par = [], []

    # -- sync with the context ---------------------------------------------------------------
    def _sync(self, ctx: list[int], budget: TreeBudget) -> None:
        old, store = self._ctx, self._store
        if old is not None and store is not None and len(ctx) >= len(old) and ctx[:len(old)] == old:
            path = [0]
            for t in ctx[len(old):]:
                nxt = next((c for c in store.kids[path[-1]] if store.tok[c] == t), -1)
                if nxt < 0:
                    break
                path.append(nxt)
            v = path[-1]
            if (self.reuse_kv and len(path) == len(ctx) - len(old) + 1 and store.slot[v] >= 0
                    and len(self._slot_tok) <= self.scratch_limit):
                self.stats["reroots"] += v != 0
                self.stats["spec_hits"] += store.spec[v]
                self._store, self._ctx = store.subtree(v), ctx
                return
            # Deepest expanded node on the matched path that is not the new root.
            last_ctx = len(ctx) - 1
            cands = [u for j, u in enumerate(path) if store.slot[u] >= 0 and len(old) - 1 + j < last_ctx]
            if not self.reuse_kv:
                cands = cands[:1]
            if cands:
                self.stats["spec_kv_hits"] += store.spec[cands[-1]]
                self._commit_slot_path(store.slot[cands[-1]])
            else:
                self._clear_scratch()
            lcp = len(self._committed)  # a prefix of old, hence of ctx
        else:
            self._clear_scratch()
            lcp, limit = 0, min(len(self._committed), len(ctx) - 1)
            while lcp < limit and self._committed[lcp] == ctx[lcp]:
                lcp += 1
            if lcp < len(self._committed):
                self.runner.truncate(lcp)
                del self._committed[lcp:]
        logits = self._forward("catchup", ctx[lcp:], None, last_only=True)
        self._store, self._ctx = _Store(ctx[-1], len(self._slot_tok) - 1), ctx
        self._make_children(0, logits[-1], min(self.max_children, budget.max_nodes), spec=False)

    # -- growing -----------------------------------------------------------------------------
    def _make_children(self, node: int, logits: np.ndarray, budget_left: int, spec: bool) -> None:
        """Children of an expanded node from its logits float [vocab] (module docstring)."""
        store, thr = self._store, self._threshold
        count = min(budget_left, self.max_children)
        if count <= 0:
            return
        if self.sampling is None:
            x = logits.astype(np.float32, copy=False)
            e = np.exp(x - x.max())
            q = e / e.sum()
            top = int(np.argmax(q))
            others = [int(t) for t in np.flatnonzero(q > thr) if t != top]
            others.sort(key=lambda t: -q[t])
            toks = ([top] + others)[:count]
        else:
            q = process_logits(logits, self.sampling).astype(np.float32)
            n_above = int(np.count_nonzero(q > thr)) - (1 if q.max() > thr else 0)
            toks = sample_children(q, min(count, 1 + n_above), self.rng)
            store.dist[node] = q
        for t in toks:
            store.add(t, node, float(q[t]), spec)

    def _expand(self, node: int, kind: str, budget_left: int, spec: bool) -> bool:
        store = self._store
        if not self._room(1):
            return False
        parent_slot = store.slot[store.par[node]]
        logits = self._forward(kind, [store.tok[node]], [parent_slot], last_only=False)
        store.slot[node] = len(self._slot_tok) - 1
        store.spec[node] = store.spec[node] or spec  # created or expanded while speculating
        self._make_children(node, logits[0], budget_left, spec)
        return True

    def _pick(self, budget: TreeBudget) -> int:
        """The branch pacer: the expandable leaf furthest behind its share (-1: none)."""
        store = self._store
        leaves = [i for i in range(1, len(store)) if not store.kids[i] and store.slot[i] < 0]
        total = sum(store.conf[i] for i in leaves)
        best, key = -1, None
        for i in leaves:
            if store.depth[i] + 1 >= budget.max_depth:
                continue
            share = budget.max_nodes * store.conf[i] / total if total > 0 else 0.0
            k = (share - (store.depth[i] + 1), store.conf[i], -i)
            if key is None or k > key:
                best, key = i, k
        return best

    def _tree_confidence(self) -> float:
        store = self._store
        leaves = [i for i in range(1, len(store)) if not store.kids[i]]
        return max((store.conf[i] for i in leaves), default=1.0)

    def propose(self, context: Sequence[int], budget: TreeBudget,
                stop: StopFn | None = None) -> TokenTree:
        ctx = [int(t) for t in context]
        if not ctx:
            raise ValueError("ModelDrafter.propose: empty context (the root needs a token)")
        self._threshold = budget.branch_threshold
        self._sync(ctx, budget)
        store = self._store
        tree = self._export(budget)
        while len(tree) < budget.max_nodes:
            if self._tree_confidence() < budget.min_confidence:
                break
            if stop is not None and len(tree) and stop(tree):
                break
            leaf = self._pick(budget)
            if leaf < 0 or not self._expand(leaf, "expand", budget.max_nodes - (len(store) - 1), False):
                break
            tree = self._export(budget)
        return tree

    def _export(self, budget: TreeBudget) -> TokenTree:
        store, tree = self._store, TokenTree()
        at = {0: -1}
        self._exported = []
        for i in range(1, len(store)):
            p = store.par[i]
            if len(tree) >= budget.max_nodes:
                break
            if p in at and store.depth[i] < budget.max_depth:
                at[i] = tree.add(store.tok[i], at[p], store.prob[i], self.name)
                self._exported.append(i)
        for node, idx in at.items():
            q = store.dist[node]
            got = [c for c in store.kids[node] if c in at]
            if q is not None and got and got == store.kids[node][:len(got)]:
                tree.draft_dists[idx] = q
        return tree

    # -- the compute-IO pipeline ---------------------------------------------------------------
    def speculate(self, stop: Callable[[], bool], max_steps: int, min_confidence: float = 0.0) -> int:
        """Extend the best branch of the last proposed tree (its most confident leaf) beyond its
        leaf with the draft's most likely continuation, one forward per step, until ``stop()``,
        ``max_steps`` or the continuation's confidence C (the leaf's C times the speculated
        tokens' probabilities: the chance, by the draft's account, that the step is ever used)
        drops below ``min_confidence``. Returns the number of forward calls made. The next
        ``propose`` reuses the work when the verified context follows it (module docstring)."""
        store = self._store
        if store is None or not self._exported or not self.reuse_kv:
            return 0
        shown = set(self._exported)
        leaves = [i for i in self._exported if not any(c in shown for c in store.kids[i])]
        node = max(leaves, key=lambda i: (store.conf[i], -i))
        steps = 0
        while steps < max_steps and store.conf[node] >= min_confidence and not stop():
            if store.slot[node] < 0:
                if len(self._slot_tok) >= self.scratch_limit:
                    break
                if not self._expand(node, "speculate", self.max_children, True):
                    break
                steps += 1
            if not store.kids[node]:
                break
            node = store.kids[node][0]
        return steps

    def set_sampling(self, sampling: SamplingParams | None, seed: int | None = None) -> None:
        """Sample children from ``sampling``-processed draft distributions from now on (None or
        temperature 0: deterministic top-1 + threshold children). The engine calls this per
        generation with the call's SamplingParams and seed."""
        self.sampling = None if sampling is None or sampling.greedy else sampling
        if seed is not None:
            self.rng = np.random.default_rng(seed)

    def observe(self, result: Any) -> None:
        """Nothing to learn: the next propose matches the verified context itself."""

    def reset(self) -> None:
        """Forget the tree and the cache (a new conversation)."""
        self.runner.truncate(0)
        self._committed, self._slot_tok, self._slot_par = [], [], []
        self._ctx, self._store, self._exported = None, None, []
