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

Lookahead (``lookahead``, a :class:`~.lookahead.NgramLookahead`): a forward that expands a
node (or catches up to the root) also runs a short chain of tokens guessed from the context
after it; every guess found among the draft's children of the node before it is expanded by
that same forward (lookahead.py), if the node budget leaves room for its children. Every node
is still one of the draft's own children with its own probability; the shape can differ from
the tree grown without lookahead, as a guessed node is expanded whether or not the branch pacer
would have picked it next.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np

from ...errors import ConfigError
from ..sampling import SamplingParams, process_logits, sample_children
from ..tree import TokenTree
from .base import StopFn, TreeBudget
from .lookahead import NgramLookahead, path_text

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
    (they widen the draft's attention, so the drafter commits once there are more);
    lookahead: guessed chains run in the same forward (module docstring), None: off."""

    name = "model"

    def __init__(self, runner: Any, sampling: SamplingParams | None = None, seed: int | None = None,
                 reuse_kv: bool = True, max_children: int = 4, scratch_limit: int = 96,
                 lookahead: NgramLookahead | None = None) -> None:
        if max_children < 1:
            raise ConfigError(f"ModelDrafter.max_children must be >= 1, got {max_children!r}")
        self.runner = runner
        self.sampling = None if sampling is None or sampling.greedy else sampling
        self.rng = np.random.default_rng(seed)
        self.reuse_kv, self.max_children, self.scratch_limit = reuse_kv, max_children, scratch_limit
        self.lookahead = lookahead
        self._budget: TreeBudget | None = None  # of the current propose (None while speculating)
        # the rooted context as an array, for the guesses: made on first use after each sync
        # (a proposal without lookahead never converts the context)
        self._ctx_arr: np.ndarray | None = None
        self.trace: list[tuple[str, float, float]] | None = None  # (kind, start, end) per forward
        # spec_hits: re-rooted at a speculated node (tree start reused); spec_kv_hits: speculated
        # K/V committed (the verified context ran into, but not through, the speculation)
        # guessed: expansions done by lookahead guesses (forwards saved)
        self.stats = {"forwards": 0, "forward_tokens": 0, "reroots": 0, "spec_hits": 0, "spec_kv_hits": 0,
                      "guessed": 0}
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
        self._marks: list[int] = []  # store sizes after each expansion of the last forward
        self._last_seconds = 0.0  # the last forward's wall time

    # -- runner access ---------------------------------------------------------------------
    def _forward(self, kind: str, tokens: list[int], parents: list[int] | None,
                 logits_from: int = 0) -> np.ndarray:
        """runner.forward + trace + the scratch mirror; logits float32 [m, vocab] of the nodes
        from index ``logits_from`` on."""
        base = len(self._slot_tok)
        t0 = time.perf_counter()
        index = list(range(logits_from, len(tokens))) if logits_from else None
        logits = self.runner.forward(tokens, parents, index)
        t1 = time.perf_counter()
        self._last_seconds = t1 - t0
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
                self._store, self._ctx, self._ctx_arr = store.subtree(v), ctx, None
                self._marks = [len(self._store)]
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
        self._ctx_arr = None
        run = ctx[lcp:]
        k, guess = (self._guesses(self._context_array(ctx), budget.max_depth - 1, len(run))
                    if self.lookahead is not None else (0, []))
        base = len(self._slot_tok)
        logits = self._forward("catchup", run + guess, None, logits_from=len(run) - 1)
        self._store, self._ctx = _Store(ctx[-1], base + len(run) - 1), ctx
        self._make_children(0, logits[0], min(self.max_children, budget.max_nodes), spec=False)
        self._marks = [len(self._store)]
        self._follow(0, k, guess, logits[1:], base + len(run), spec=False, timed=len(run) == 1)

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
        k, guess = 0, []
        if self.lookahead is not None:
            depth_left = (self._budget.max_depth - 2 - store.depth[node] if self._budget is not None
                          else self.lookahead.max_guesses)
            k, guess = self._guesses(self._path_text(node), depth_left, 1)
        base = len(self._slot_tok)
        parent_slot = store.slot[store.par[node]]
        parents = [parent_slot] + [base + j for j in range(len(guess))]
        logits = self._forward(kind, [store.tok[node]] + guess, parents)
        store.slot[node] = base
        store.spec[node] = store.spec[node] or spec  # created or expanded while speculating
        self._make_children(node, logits[0], budget_left, spec)
        self._marks = [len(store)]
        self._follow(node, k, guess, logits[1:], base + 1, spec)
        return True

    # -- lookahead (module docstring) ----------------------------------------------------------
    def _path_text(self, node: int) -> np.ndarray:
        """The rooted context followed by the tokens from the root down to ``node``."""
        store, path = self._store, []
        while node > 0:
            path.append(store.tok[node])
            node = store.par[node]
        return path_text(self._context_array(self._ctx), path[::-1])

    def _context_array(self, ctx: list[int]) -> np.ndarray:
        """``ctx`` (the context being rooted) as int64, converted once per sync."""
        if self._ctx_arr is None:
            self._ctx_arr = np.asarray(ctx, dtype=np.int64)
        return self._ctx_arr

    def _guesses(self, text: np.ndarray, depth_left: int, run: int) -> tuple[int, list[int]]:
        """Guessed tokens to run after ``text`` in a forward of ``run`` other tokens (none
        without lookahead, beyond the depth budget or the context limit)."""
        if self.lookahead is None or depth_left <= 0:
            return 0, []
        k, guess = self.lookahead.guesses(text, depth_left)
        while guess and not self._room(run + len(guess)):
            guess = guess[:-1]
        return k, guess

    def _follow(self, node: int, k: int, guess: list[int], logits: np.ndarray, first_slot: int,
                spec: bool, timed: bool = True) -> None:
        """Expand the guessed chain below ``node`` while each guess is one of the children
        already made (guess j ran at slot ``first_slot + j`` with logits ``logits[j]``).
        ``timed``: the forward ran one node besides the guesses, so its time tells the cost of
        the guesses (a catch-up of a longer chain, e.g. the prompt, does not)."""
        if not guess:
            return
        store, budget = self._store, self._budget
        matched = 0
        for j, g in enumerate(guess):
            child = next((c for c in store.kids[node] if store.tok[c] == g), -1)
            left = (budget.max_nodes - (len(store) - 1)) if budget is not None else self.max_children
            if child < 0 or left <= 0:  # no room for its children: leave it unexpanded
                break
            store.slot[child] = first_slot + j
            store.spec[child] = spec
            self._make_children(child, logits[j], left, spec)
            self._marks.append(len(store))
            matched += 1
            node = child
        self.stats["guessed"] += matched
        self.lookahead.record(k, len(guess), matched)
        if timed and self.step_seconds is not None:
            self.lookahead.record_cost(self.step_seconds, self._last_seconds, 1 + len(guess))

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

    def _tree_confidence(self, upto: int | None = None) -> float:
        """T_c of the store's first ``upto`` nodes (all by default)."""
        store = self._store
        n = len(store) if upto is None else upto
        leaves = [i for i in range(1, n) if not any(c < n for c in store.kids[i])]
        return max((store.conf[i] for i in leaves), default=1.0)

    def _grown(self, budget: TreeBudget, stop: StopFn | None) -> tuple[TokenTree, bool]:
        """The tree after the last forward and whether drafting stops there. A forward that
        expanded guessed nodes too is checked as if they had come one forward each (the store
        as it was after each expansion, ``self._marks``): the stop rules (node cap, alpha,
        ``stop``) then end the tree where one-node steps would have ended it, and the rest stays
        in the store for a later proposal to re-root into."""
        for m in self._marks:
            tree = self._export(budget, upto=m)
            if (len(tree) >= budget.max_nodes or self._tree_confidence(m) < budget.min_confidence
                    or (stop is not None and len(tree) and stop(tree))):
                return tree, True
        return tree, False

    def propose(self, context: Sequence[int], budget: TreeBudget,
                stop: StopFn | None = None) -> TokenTree:
        ctx = [int(t) for t in context]
        if not ctx:
            raise ValueError("ModelDrafter.propose: empty context (the root needs a token)")
        self._threshold = budget.branch_threshold
        self._budget = budget
        self._sync(ctx, budget)
        store = self._store
        while True:
            tree, done = self._grown(budget, stop)
            if done:
                return tree
            leaf = self._pick(budget)
            if leaf < 0 or not self._expand(leaf, "expand", budget.max_nodes - (len(store) - 1), False):
                return tree

    def _export(self, budget: TreeBudget, upto: int | None = None) -> TokenTree:
        """The store as a TokenTree within the budget (only its first ``upto`` nodes if given)."""
        store, tree = self._store, TokenTree()
        at = {0: -1}
        self._exported = []
        for i in range(1, len(store) if upto is None else upto):
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
        self._budget = None  # beyond the tree: no node or depth budget
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

    def forget(self) -> None:
        """Forget the lookahead's match rates (Engine.reset_drafters)."""
        if self.lookahead is not None:
            self.lookahead.reset()

    def reset(self) -> None:
        """Forget the tree and the cache (a new conversation)."""
        self.runner.truncate(0)
        self._committed, self._slot_tok, self._slot_par = [], [], []
        self._ctx, self._store, self._exported, self._ctx_arr = None, None, [], None
