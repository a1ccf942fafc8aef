"""Plain greedy decoding over the tree-verify ONNX graph: the reference answer.

Deliberately simple (a raw onnxruntime session, a NumPy KV cache that grows by
concatenation, masks built from first principles) so other tests and the README can compare
the real runtime's output against it. Depends on nothing else in ``edgeinfer.runtime``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from ..bundle import kv_in_place
from ..spec import ModelSpec

MASK_MIN = float(np.finfo(np.float32).min)  # "not visible" in attention_bias

KV = list[tuple[np.ndarray, np.ndarray]]  # per layer (key, value) float32 [1, kv_heads, len, head_dim]


@dataclass
class TreeOutput:
    logits: np.ndarray  # float32 [m, vocab] for the requested nodes
    present: KV         # per layer K/V of the n new nodes, [1, kv_heads, n, head_dim]


def empty_kv(spec: ModelSpec) -> KV:
    z = np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), dtype=np.float32)
    return [(z, z) for _ in range(spec.num_layers)]


def tree_inputs(spec: ModelSpec, parents: Sequence[int], past_len: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Positions int64 [1, n], full mask and sliding mask (or None) float32 [1, 1, n, past+n].

    Node i sees every committed token and its own ancestors and itself; on sliding layers
    additionally only keys whose position is within ``sliding_window`` of the query's
    (``pos_q - pos_k < window``, as Hugging Face does). Parents index earlier nodes, -1 = root.
    """
    n = len(parents)
    depth = np.zeros(n, dtype=np.int64)
    see = np.zeros((n, n), dtype=bool)
    for i, p in enumerate(parents):
        if not -1 <= p < i:
            raise ValueError(f"parents[{i}] = {p}: must be -1 or an earlier node index")
        see[i, i] = True
        if p >= 0:
            depth[i] = depth[p] + 1
            see[i] |= see[p]
    pos = past_len + depth
    visible = np.concatenate([np.ones((n, past_len), dtype=bool), see], axis=1)
    full = np.where(visible, 0.0, MASK_MIN).astype(np.float32)[None, None]
    sliding = None
    if spec.has_sliding_layers:
        key_pos = np.concatenate([np.arange(past_len, dtype=np.int64), pos])
        near = (pos[:, None] - key_pos[None, :]) < int(spec.sliding_window)
        sliding = np.where(visible & near, 0.0, MASK_MIN).astype(np.float32)[None, None]
    return pos[None], full, sliding


def run_tree(session: ort.InferenceSession, spec: ModelSpec, past: KV, tokens: Sequence[int],
             parents: Sequence[int], past_len: int,
             logits_index: Sequence[int] | None = None) -> TreeOutput:
    """One graph call on a token tree placed after ``past_len`` committed tokens.

    ``past`` holds at least ``past_len`` positions per layer (extra ones are ignored);
    ``logits_index`` defaults to every node. A graph with the in-place KV layout (bundle.py)
    is fed exactly ``past_len`` positions and no shared buffer, so its present outputs are past
    + new concatenated; the new nodes' part is sliced out of them.
    """
    n = len(tokens)
    if len(parents) != n:
        raise ValueError(f"{len(parents)} parents for {n} tokens")
    pos, full, sliding = tree_inputs(spec, parents, past_len)
    idx = np.arange(n) if logits_index is None else np.asarray(logits_index)
    feeds = {"input_ids": np.asarray(tokens, dtype=np.int64)[None], "position_ids": pos,
             "attention_bias": full, "logits_index": idx.astype(np.int64)}
    if sliding is not None:
        feeds["attention_bias_sliding"] = sliding
    for i, (k, v) in enumerate(past):
        feeds[f"past_key.{i}"] = np.ascontiguousarray(k[:, :, :past_len])
        feeds[f"past_value.{i}"] = np.ascontiguousarray(v[:, :, :past_len])
    wanted = ["logits"] + [f"present_{kv}.{i}" for i in range(spec.num_layers) for kv in ("key", "value")]
    out = session.run(wanted, feeds)
    skip = past_len if kv_in_place(session.get_modelmeta().custom_metadata_map) else 0
    present = [(out[1 + 2 * i][:, :, skip:], out[2 + 2 * i][:, :, skip:]) for i in range(spec.num_layers)]
    return TreeOutput(logits=out[0][0], present=present)


def append_kv(past: KV, present: KV, nodes: Sequence[int] | None = None) -> KV:
    """Committed cache + the K/V of ``nodes`` (indices into the new nodes; default all)."""
    sel = slice(None) if nodes is None else list(nodes)
    return [(np.concatenate([k, pk[:, :, sel]], axis=2), np.concatenate([v, pv[:, :, sel]], axis=2))
            for (k, v), (pk, pv) in zip(past, present)]


def make_session(onnx_path: Path | str, threads: int = 0) -> ort.InferenceSession:
    """A CPU session (``threads`` = intra-op threads, 0 = onnxruntime's default)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])


def greedy_decode_session(session: ort.InferenceSession, spec: ModelSpec, prompt_ids: Sequence[int],
                          max_new_tokens: int, eos_ids: Sequence[int] = ()) -> list[int]:
    """Generated token ids (prompt excluded; a final EOS is included when produced)."""
    if not prompt_ids:
        raise ValueError("prompt_ids must not be empty")
    past, past_len = empty_kv(spec), 0
    tokens = list(prompt_ids)
    out: list[int] = []
    while len(out) < max_new_tokens:
        res = run_tree(session, spec, past, tokens, list(range(-1, len(tokens) - 1)), past_len,
                       logits_index=[len(tokens) - 1])
        past, past_len = append_kv(past, res.present), past_len + len(tokens)
        nxt = int(np.argmax(res.logits[-1]))
        out.append(nxt)
        if nxt in eos_ids:
            break
        tokens = [nxt]
    return out


def greedy_decode_onnx(onnx_path: Path | str, spec: ModelSpec, prompt_ids: Sequence[int],
                       max_new_tokens: int, eos_ids: Sequence[int] = ()) -> list[int]:
    """Plain greedy decoding with a KV cache: prefill the prompt, then one token per call."""
    return greedy_decode_session(make_session(onnx_path), spec, prompt_ids, max_new_tokens, eos_ids)
