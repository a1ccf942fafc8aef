"""Verification of a draft tree against the target's logits from one tree pass.

Row convention everywhere here: ``logits`` float32 [n + 1, vocab]; row 0 is the target's
prediction after the root (the last committed token), row ``i + 1`` after tree node ``i``.

Greedy: walk from the root, at each node follow the child whose token equals the target's
argmax there; the longest such path is accepted and the target's argmax after its last node is
the bonus token. Sampling: the lossless multi-branch rule of :mod:`edgeinfer.runtime.sampling`
(owned by the drafters side), fed target probabilities computed only for the rows it visits.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .tree import TokenTree

DEFAULT_TOPK = 8


@dataclass(frozen=True)
class TopRows:
    """The best ``k`` logits of each row of a pass, best first (equal values: the lower token id
    first, as ``np.argmax``): all that greedy verification and Token Recycling read, without the
    whole ``[rows, vocab]`` array (a streamed target's compact passes, StreamingRunner
    ``top_k``: 9.4 MiB less for a 49-node SmolLM2 pass). Sampling needs the full logits."""

    ids: np.ndarray  # int64 [rows, k]
    values: np.ndarray  # float32 [rows, k]
    vocab: int

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.ids.shape[0]), self.vocab)

    @property
    def ndim(self) -> int:
        return 2

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __getitem__(self, rows: slice) -> "TopRows":
        if not isinstance(rows, slice):
            raise TypeError("TopRows: only row slices (e.g. rows[-1:]); a row's logits are not all here")
        return TopRows(self.ids[rows], self.values[rows], self.vocab)


def argmax_rows(logits: np.ndarray | TopRows) -> np.ndarray:
    """The target's greedy token of every row: int64 [rows]."""
    if isinstance(logits, TopRows):
        return logits.ids[:, 0]
    return np.argmax(logits, axis=-1)


def merge_top(best: tuple[np.ndarray, np.ndarray] | None, block: np.ndarray, col0: int,
              k: int) -> tuple[np.ndarray, np.ndarray]:
    """Fold the logits ``block`` [rows, w] (columns ``col0 ..``) into the running best
    ``(values, ids)`` [rows, <= k], best first, equal values by lower id."""
    kk = min(k, block.shape[1])
    part = np.argpartition(block, block.shape[1] - kk, axis=1)[:, block.shape[1] - kk:]
    vals = np.take_along_axis(block, part, axis=1)
    ids = part.astype(np.int64) + col0
    if best is not None:
        vals, ids = np.concatenate([best[0], vals], axis=1), np.concatenate([best[1], ids], axis=1)
    order = np.lexsort((ids, -vals), axis=-1)[:, :k]
    return np.take_along_axis(vals, order, axis=1), np.take_along_axis(ids, order, axis=1)


@dataclass
class VerifyResult:
    tree: TokenTree
    accepted_nodes: list[int]  # tree node indices of the accepted root-to-node path
    accepted_tokens: list[int]  # their tokens
    bonus_token: int  # the target's token after the accepted path
    root_token: int  # the last committed token (the tree's virtual root)
    logits: np.ndarray | TopRows = field(repr=False)  # float32 [n + 1, vocab] (or its top-k), row 0 = root
    _topk: dict[int, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @property
    def accepted(self) -> list[int]:  # synonym used in docs/TEAM_NOTES.md
        return self.accepted_nodes

    @property
    def num_accepted(self) -> int:
        return len(self.accepted_nodes)

    @property
    def tokens(self) -> list[int]:
        """Tokens this verification emits: the accepted ones, then the bonus token."""
        return self.accepted_tokens + [self.bonus_token]

    def topk(self, k: int = DEFAULT_TOPK) -> np.ndarray:
        """Target top-k token ids int64 [n + 1, k], best first; row 0 is after the root
        (``root_token``), row i + 1 after node i. Computed on first use (token recycling)."""
        if k not in self._topk:
            self._topk[k] = topk_rows(self.logits, k)
        return self._topk[k]

    @property
    def topk_ids(self) -> np.ndarray:
        """``topk(DEFAULT_TOPK)``: [n + 1, k] with the root's row first (see ``root_token``)."""
        return self.topk(DEFAULT_TOPK)


def topk_rows(logits: np.ndarray | TopRows, k: int) -> np.ndarray:
    """Top-k token ids of every row of ``logits`` [rows, vocab], best first: int64 [rows, k]."""
    if isinstance(logits, TopRows):
        if k > logits.ids.shape[1]:
            raise ValueError(f"topk_rows: {k} ids asked of a pass that kept {logits.ids.shape[1]} per row")
        return logits.ids[:, :k]
    v, k_eff = logits.shape[1], min(k, logits.shape[1])
    out = np.empty((logits.shape[0], k_eff), dtype=np.int64)
    # Row by row: a whole-array argpartition allocates int64 indices for every logit
    # (19 MB for a 49-node SmolLM2 tree) just when a streamed target's budget is tight.
    for i, row in enumerate(logits):
        part = np.argpartition(row, v - k_eff)[v - k_eff:]
        out[i] = part[np.argsort(-row[part], kind="stable")]
    return out


def _children(tree: TokenTree) -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for i, p in enumerate(tree.parents):
        kids.setdefault(p, []).append(i)
    return kids


def verify_greedy(tree: TokenTree, logits: np.ndarray | TopRows, root_token: int) -> VerifyResult:
    """Longest path whose tokens equal the target's argmax, plus the bonus token."""
    n = len(tree)
    if logits.ndim != 2 or logits.shape[0] != n + 1:
        raise ValueError(f"verify_greedy: logits of shape {logits.shape}, expected [{n + 1}, vocab]")
    kids = _children(tree)
    accepted: list[int] = []
    node = -1
    top = logits.ids[:, 0] if isinstance(logits, TopRows) else None
    while True:
        want = int(top[node + 1] if top is not None else np.argmax(logits[node + 1]))
        nxt = next((c for c in kids.get(node, ()) if tree.tokens[c] == want), -1)
        if nxt < 0:
            break
        accepted.append(nxt)
        node = nxt
    return VerifyResult(tree, accepted, [tree.tokens[i] for i in accepted], want, int(root_token), logits)


def verify_lossy(tree: TokenTree, logits: np.ndarray, root_token: int, threshold: float) -> VerifyResult:
    """BiLD-style rollback policy (lossy, opt-in): a draft token is also accepted when it is
    not the target's argmax but the target's cross-entropy on it, -log p(x), is at most
    ``threshold``; among such children the one the target rates highest is followed."""
    if isinstance(logits, TopRows):
        raise TypeError("verify_lossy: needs the full logits, not a compact pass's top-k")
    n = len(tree)
    if logits.ndim != 2 or logits.shape[0] != n + 1:
        raise ValueError(f"verify_lossy: logits of shape {logits.shape}, expected [{n + 1}, vocab]")
    kids = _children(tree)
    accepted: list[int] = []
    node = -1
    while True:
        row = logits[node + 1]
        want = int(np.argmax(row))
        cands = kids.get(node, [])
        nxt = next((c for c in cands if tree.tokens[c] == want), -1)
        if nxt < 0 and cands:
            m = float(row[want])
            lse = m + float(np.log(np.sum(np.exp(row.astype(np.float64) - m))))
            best = max(cands, key=lambda c: (row[tree.tokens[c]], -c))
            if lse - float(row[tree.tokens[best]]) <= threshold:
                nxt = best
        if nxt < 0:
            break
        accepted.append(nxt)
        node = nxt
    return VerifyResult(tree, accepted, [tree.tokens[i] for i in accepted], want, int(root_token), logits)


class _LazyProbs:
    """Row-wise view of processed target probabilities, computed on first access (the
    acceptance rule only visits the rows on its walk; top-p sorts the whole vocabulary)."""

    def __init__(self, logits: np.ndarray, params: Any) -> None:
        from .sampling import process_logits

        self._logits, self._params, self._process = logits, params, process_logits
        self._rows: dict[int, np.ndarray] = {}
        self.shape = logits.shape

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if i not in self._rows:
            self._rows[i] = self._process(self._logits[i], self._params)
        return self._rows[i]


def verify_sampling(tree: TokenTree, logits: np.ndarray, root_token: int, params: Any,
                    rng: np.random.Generator) -> VerifyResult:
    """Lossless tree acceptance (runtime.sampling.accept_tree) with SamplingParams ``params``."""
    from .sampling import accept_tree

    if isinstance(logits, TopRows):
        raise TypeError("verify_sampling: needs the full logits, not a compact pass's top-k")
    n = len(tree)
    if logits.ndim != 2 or logits.shape[0] != n + 1:
        raise ValueError(f"verify_sampling: logits of shape {logits.shape}, expected [{n + 1}, vocab]")
    acc = accept_tree(tree, _LazyProbs(logits, params), rng)  # type: ignore[arg-type]
    return VerifyResult(tree, list(acc.accepted), list(acc.tokens), int(acc.next_token),
                        int(root_token), logits)
