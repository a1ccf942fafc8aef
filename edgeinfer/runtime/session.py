"""`ModelRunner`: one tree-verifiable ONNX graph (docs/TEAM_NOTES.md graph contract) plus its
KV cache.

Per-step overhead, measured on this machine's CPU provider with a graph of this signature and
trivial compute (30 layers, 3 KV heads of 64, context 256): ``forward`` + ``commit`` of one
decode step costs 22 us more than a bare ``InferenceSession.run`` on the same inputs (which
takes 100 us). What keeps it there:

* the committed cache is fed to the graph as views of preallocated buffers (kvcache.py): no
  concatenation or copy of the past per step (concatenating instead cost 7.4 ms vs 1.9 ms
  per step on a small 30-layer model at context 256);
* one persistent feed dict for ``InferenceSession.run``: onnxruntime wraps C-contiguous NumPy
  arrays in place, and the past views in it only change when the cache grows. Alternatives
  measured on that graph: run(feed) 0.10 ms/call, IOBinding (its outputs must be rebound every
  step, 2*layers+1 calls) 0.125, ``run_with_ort_values`` 0.155;
* all layers' new K/V are written with one NumPy assignment; a decode step (one node, no
  scratch) skips the tree bookkeeping; masks and positions take a handful of NumPy calls.

Uncommitted ("scratch") nodes from earlier ``forward`` calls live in the cache right after the
committed tokens; the attention bias decides which of them each new node sees.

Graphs whose metadata names the in-place KV layout (bundle.kv_in_place; the export's default where
GroupQueryAttention runs) are run through an IOBinding instead: each layer's past input and
present output are bound to the same cache view, the kernel writes the n new nodes' K/V into it
at positions L + s .. L + s + n itself, and the attention bias covers only those L + s + n
positions. That removes the per-step copy of the whole cache that the opset-23 Attention makes
(measured, SmolLM2 fp32 at context 1024: 31.3 -> 24.6 ms a step; see GraphOptions). The logits
are written into a fresh array per call (onnxruntime reuses its own output buffers). Off the
CPU provider such a graph runs through ``run`` like the others (binding host memory as a device
kernel's output would copy the cache both ways per step): its presents are then the whole
buffer with the past copied in, and the runner takes the new nodes' K/V from positions L + s.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..bundle import kv_in_place
from ..errors import BundleError, ContextLimitError
from ..spec import ModelSpec
from .kvcache import KVCache
from .memory import release_clean_file_pages
from .providers import SessionSettings, create_session

NEG = float(np.finfo(np.float32).min)  # "not visible" in an attention bias
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
_ONE_NODE_ANC = np.ones((1, 1), dtype=bool)  # read-only constants: never written in place
_ONE_NODE_DEPTH = np.zeros(1, dtype=np.int64)
_ONE_NODE_ANC.flags.writeable = False
_ONE_NODE_DEPTH.flags.writeable = False


class ModelRunner:
    """Runs one model on new token nodes placed after its committed context.

    Attributes: ``spec``, ``past_len`` (committed tokens), ``num_scratch`` (uncommitted nodes),
    ``provider`` (the execution provider chosen), ``report`` (:class:`ProviderReport`),
    ``max_context``, ``forward_calls`` / ``forward_seconds`` (cumulative), ``kv_in_place``
    (the graph writes K/V into the bound cache itself, module docstring).
    """

    kv_in_place = False  # class defaults: subclasses with their own graphs (streaming.py) keep them
    _io: Any = None

    def __init__(self, onnx_path: str | os.PathLike, spec: ModelSpec, providers: Sequence[Any] = ("cpu",),
                 threads: int = 0, max_context: int | None = None, *, settings: SessionSettings | None = None,
                 kv_block: int = 64, name: str = "model") -> None:
        self.spec = spec
        self.name = name
        if not Path(onnx_path).is_file():
            raise BundleError(f"{onnx_path}: ONNX model not found")
        self.max_context = int(max_context or min(spec.max_position, 4096))
        settings = settings or SessionSettings(intra_op_threads=threads)
        self.session, self.report = create_session(onnx_path, providers, settings, model=name)
        self.provider: str = self.report.chosen
        # bytes of the loaded model's file pages handed back (SessionSettings.release_file_pages)
        self.released_file_bytes = (release_clean_file_pages(Path(onnx_path).parent)
                                    if settings.release_file_pages else 0)
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        required = ["input_ids", "position_ids", "attention_bias", "logits_index"]
        required += [f"past_{kv}.{i}" for i in range(spec.num_layers) for kv in ("key", "value")]
        want_out = ["logits"] + [f"present_{kv}.{i}" for i in range(spec.num_layers) for kv in ("key", "value")]
        missing = [n for n in required if n not in inputs] + [n for n in want_out if n not in outputs]
        if missing:
            raise BundleError(f"{onnx_path}: graph lacks {missing[:4]}{'...' if len(missing) > 4 else ''} "
                              f"required by the graph contract for a {spec.num_layers}-layer model")
        self._sliding = "attention_bias_sliding" in inputs
        if spec.has_sliding_layers and not self._sliding:
            raise BundleError(f"{onnx_path}: model has sliding layers but no 'attention_bias_sliding' input")
        kv_type = inputs["past_key.0"].type
        if kv_type not in _DTYPES:
            raise BundleError(f"{onnx_path}: past_key.0 has type {kv_type}, expected float or float16")
        self._kv_dtype = _DTYPES[kv_type]
        self.cache = KVCache(spec.num_layers, spec.num_kv_heads, spec.head_dim, self.max_context,
                             block=kv_block, dtype=self._kv_dtype)
        self._out_names = want_out
        self.kv_in_place = kv_in_place(self.session.get_modelmeta().custom_metadata_map)
        # Binding the cache's host memory as a device kernel's output would copy the whole cache
        # both ways every step; off the CPU provider an in-place graph runs through run()
        # instead, its presents (the whole buffer, past copied in) sliced at the new positions.
        on_cpu = self.provider == "CPUExecutionProvider"
        self._io = self.session.io_binding() if self.kv_in_place and on_cpu else None
        self._feed: dict[str, np.ndarray] = {}  # past views stay in here between steps
        self._bound_layout = -1
        self._window = spec.sliding_window or 0
        self.forward_calls = 0
        self.forward_seconds = 0.0
        self._clear_scratch()

    # -- public state --------------------------------------------------------------------
    @property
    def past_len(self) -> int:
        return self.cache.length

    @property
    def num_scratch(self) -> int:
        return len(self._depth)

    def _clear_scratch(self) -> None:
        self._depth = np.zeros(0, dtype=np.int64)  # [s] depth of each scratch node
        self._anc = np.zeros((0, 0), dtype=bool)  # [s, s] ancestor-or-self among scratch nodes

    # -- the step ------------------------------------------------------------------------
    def forward(self, tokens: Sequence[int] | np.ndarray, parents: Sequence[int] | None = None,
                logits_index: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Run the graph on ``n`` new nodes; returns logits float32 ``[m, vocab]`` for the nodes
        in ``logits_index`` (indices into these n nodes; None: all of them)."""
        ids = np.asarray(tokens, dtype=np.int64).reshape(1, -1)
        n = ids.shape[1]
        if n == 0:
            raise ValueError("ModelRunner.forward: no tokens given")
        s, L = self.num_scratch, self.cache.length
        self._check_room(L, s, n)
        if (self.kv_in_place and L + s == 0 and parents is not None
                and [int(p) for p in parents] != list(range(-1, n - 1))):
            # GroupQueryAttention's first-prompt path takes positions 0..n-1 whatever
            # position_ids say: only a chain may start an empty cache
            raise ValueError(f"{self.name}: a branching tree needs at least one token before it "
                             "(the first call on an empty cache must be a chain)")
        if self.cache.ensure(L + s + n) or self._bound_layout != self.cache.layout_version:
            self._bind_past()
        anc_new, depth_new, step = self._tree_inputs(n, parents, logits_index, L, s)
        if self._io is not None:
            logits = self._run_in_place(ids, step)
        else:
            feed = self._feed
            feed["input_ids"] = ids
            feed.update(step)
            t0 = time.perf_counter()
            out = self.session.run(self._out_names, feed)
            self.forward_seconds += time.perf_counter() - t0
            presents = out[1:]  # present_key.0, present_value.0, ...
            if self.kv_in_place:  # the whole buffer: the new nodes sit at L + s
                presents = [p[:, :, L + s:L + s + n] for p in presents]
            self.cache.write_interleaved(L + s, presents)
            logits = out[0]
        self.forward_calls += 1
        self._anc, self._depth = anc_new, depth_new
        return logits[0]

    def _run_in_place(self, ids: np.ndarray, step: dict[str, np.ndarray]) -> np.ndarray:
        """One run through the IOBinding (past/present already bound to the cache views): the
        kernel writes the new K/V into the cache; the logits go into a fresh array."""
        io = self._io
        io.bind_cpu_input("input_ids", ids)
        for name, value in step.items():
            io.bind_cpu_input(name, value)
        logits = np.empty((1, len(step["logits_index"]), self.spec.vocab_size), dtype=np.float32)
        io.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        t0 = time.perf_counter()
        self.session.run_with_iobinding(io)
        self.forward_seconds += time.perf_counter() - t0
        return logits

    def _check_room(self, L: int, s: int, n: int) -> None:
        """ContextLimitError unless L committed + s scratch + n new tokens fit."""
        if L + s + n > self.max_context:
            raise ContextLimitError(
                f"{self.name}: {L} committed + {s} pending + {n} new tokens exceed the context "
                f"limit of {self.max_context} tokens")

    def _tree_inputs(self, n: int, parents: Sequence[int] | None, logits_index: Sequence[int] | np.ndarray | None,
                     L: int, s: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """(ancestors, depths, graph inputs) for n new nodes after L committed and s scratch
        nodes: position_ids [1, n], attention_bias [1, 1, n, C + n] over the cache capacity C
        and the new nodes (in place: [1, 1, n, L + s + n], the new nodes at L + s; and its
        sliding variant), logits_index [m]. The cache must already hold L + s + n."""
        anc_new, depth_new = self._extend_tree(n, parents)
        C = L + s if self.kv_in_place else self.cache.capacity  # the new nodes' first column
        if s == 0 and n == 1 and self.kv_in_place:  # the decode step sees everything
            bias = np.zeros((1, 1, 1, C + 1), dtype=np.float32)
        else:
            rows = anc_new[s:]  # [n, s+n]
            bias = np.full((1, 1, n, C + n), NEG, dtype=np.float32)
            bias[0, 0, :, :L] = 0.0
            if s:
                bias[0, 0, :, L:L + s][rows[:, :s]] = 0.0
            bias[0, 0, :, C:][rows[:, s:]] = 0.0
        if logits_index is None:
            li = np.arange(n, dtype=np.int64)
        else:
            li = np.asarray(logits_index, dtype=np.int64).reshape(-1)
            if li.size == 0 or li.min() < 0 or li.max() >= n:
                raise ValueError(f"{type(self).__name__}.forward: logits_index {li.tolist()} not within [0, {n})")
        step = {"position_ids": (L + depth_new[s:]).reshape(1, n), "attention_bias": bias, "logits_index": li}
        if self._sliding:
            step["attention_bias_sliding"] = self._sliding_bias(bias, L, depth_new, s, n, C)
        return anc_new, depth_new, step

    def _extend_tree(self, n: int, parents: Sequence[int] | None) -> tuple[np.ndarray, np.ndarray]:
        """Ancestor matrix bool [s+n, s+n] and depths int64 [s+n] after adding n nodes."""
        s = self.num_scratch
        if s == 0 and n == 1 and parents is None:  # the decode step
            return _ONE_NODE_ANC, _ONE_NODE_DEPTH
        anc = np.zeros((s + n, s + n), dtype=bool)
        anc[:s, :s] = self._anc
        depth = np.empty(s + n, dtype=np.int64)
        depth[:s] = self._depth
        if parents is None:  # a chain after the last scratch node (or the root)
            anc[s:, s:] = np.tri(n, dtype=bool)
            if s:
                anc[s:, :s] = self._anc[s - 1]
                depth[s:] = self._depth[s - 1] + 1 + np.arange(n)
            else:
                depth[s:] = np.arange(n)
            return anc, depth
        par = [int(p) for p in parents]
        if len(par) != n:
            raise ValueError(f"ModelRunner.forward: {len(par)} parents for {n} tokens")
        for i, p in enumerate(par):
            j = s + i
            if not -1 <= p < j:
                raise ValueError(f"ModelRunner.forward: parent {p} of node {j} must be -1 or an "
                                 f"earlier node (scratch + new nodes are indexed in order)")
            if p >= 0:
                anc[j] = anc[p]
                depth[j] = depth[p] + 1
            else:
                depth[j] = 0
            anc[j, j] = True
        return anc, depth

    def _sliding_bias(self, bias: np.ndarray, L: int, depth: np.ndarray, s: int, n: int,
                      C: int) -> np.ndarray:
        """Sliding layers: also hide keys whose position is >= window behind the query's
        (a key at position k is visible from position q when q - k < window, as in transformers)."""
        col = np.zeros(C + n, dtype=np.int64)  # padding columns are masked anyway
        col[:L] = np.arange(L)
        col[L:L + s] = L + depth[:s]
        col[C:] = L + depth[s:]
        row = L + depth[s:]
        far = (row[:, None] - col[None, :]) >= self._window
        return np.where(far[None, None], np.float32(NEG), bias)

    def _bind_past(self) -> None:
        c, feed, io = self.cache, self._feed, self._io
        for i in range(self.spec.num_layers):
            for kind, view in (("key", c.keys[i]), ("value", c.values[i])):
                if io is None:
                    feed[f"past_{kind}.{i}"] = view  # C-contiguous views: read in place
                else:  # in place: the past input and the present output are the same memory
                    io.bind_cpu_input(f"past_{kind}.{i}", view)
                    io.bind_output(f"present_{kind}.{i}", "cpu", 0, view.dtype, list(view.shape),
                                   view.ctypes.data)
        self._bound_layout = c.layout_version

    # -- cache management ----------------------------------------------------------------
    def commit(self, nodes: Sequence[int]) -> None:
        """Append scratch nodes ``nodes`` (a root-to-node path, in order) to the committed
        cache and clear the scratch."""
        s = self.num_scratch
        if len(nodes) == 1 and 0 <= nodes[0] < s and self._depth[nodes[0]] == 0:  # the decode step
            self.cache.gather([self.cache.length + int(nodes[0])])
            self._clear_scratch()
            return
        nodes = np.asarray(nodes, dtype=np.int64).reshape(-1)
        if nodes.size:
            if nodes.min() < 0 or nodes.max() >= s:
                raise ValueError(f"ModelRunner.commit: nodes {nodes.tolist()} not within the {s} scratch nodes")
            path_ok = (np.array_equal(self._depth[nodes], np.arange(nodes.size))
                       and bool(np.all(self._anc[nodes[1:], nodes[:-1]])))
            if not path_ok:
                raise ValueError(f"ModelRunner.commit: nodes {nodes.tolist()} are not a root-to-node path")
            self.cache.gather(self.cache.length + nodes)
        self._clear_scratch()

    def discard(self) -> None:
        """Forget all scratch nodes."""
        self._clear_scratch()

    def truncate(self, length: int) -> None:
        """Drop committed tokens beyond ``length`` (and any scratch)."""
        self._clear_scratch()
        self.cache.truncate(length)

    def reset(self) -> None:
        self.truncate(0)
