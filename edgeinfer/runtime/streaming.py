"""`StreamingRunner`: the target model run from per-layer shards inside a memory budget.

It has ModelRunner's interface (``forward`` / ``commit`` / ``discard`` / ``truncate``, with the
tree and scratch semantics inherited from it), so the engine, the verifier and the compute-IO
pipeline use it unchanged. One ``forward`` runs the embed shard, each decoder layer's shard (or
the shards of its parts, ``layer.{i}.{j}``) and the head shard in turn (export/onnx_shards.py:
an output ``x_out`` feeds the later shards' input ``x_in``); the planner (offload.py) decides
which parts stay resident; the others are read by a
background thread into a ring of buffers (shard_io.py) in pass order, so part i+1 loads while
part i computes, and the first parts of the next pass load while the draft drafts.

Loading mechanism, chosen by measurement (SmolLM2-135M fp32, 14 MB layers, 2 cores, virtio
disk ~1 GB/s, caches dropped; per pass of 8 layers): a new onnxruntime session per shard load
310-480 ms; persistent sessions over memory-mapped external data 90-130 ms but the page cache
they fill counts against a cgroup cap and the kernel, not the plan, decides what stays (with
pre-packing on they also copy every weight: 274 MB peak for 113 MB); weights as graph inputs
read with O_DIRECT into our own buffers 83 ms with the lowest peak (72 MB), one shared session
for all layers, and exact control of what is resident. Reading each part as 4 concurrent
pieces raised O_DIRECT throughput from ~0.75 to ~1.0 GB/s.

Special parts: the embedding table is read row by row when its shard is a plain Gather (a pass
reads only its tokens' rows, kept in a small cache); the LM head's weight is read in row
slices when its matmul can be cut out (shard_graphs.HeadSplit), so no buffer as large as the
whole head is needed. ``passes`` holds per-pass figures; ``plan`` says what is resident.
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnxruntime as ort

from ..errors import BundleError, ConfigError
from ..spec import ModelSpec
from .kvcache import KVCache
from .memory import current_usage, resolve_budget, return_freed_memory
from .offload import (FixedCosts, OffloadPlan, Part, activation_bytes, default_priority, kv_bytes,
                      plan_offload, safety_margin)
from .providers import CPU, STOP_SPINNING, ProviderReport
from .session import ModelRunner
from .shard_graphs import (ALIGN, STANDARD_INPUTS, ShardGraph, head_matmul_graph, load_shard_graph,
                           load_stream_index, row_gather_weight, split_head)
from .shard_io import (RowReader, StreamPart, StreamRing, WeightReader, aligned_buffer, file_stamp,
                       tensor_views)
from .verify import TopRows, merge_top


@dataclass(frozen=True)
class ShardPaths:
    embed: Path
    layers: tuple[tuple[Path, ...], ...]  # per decoder layer, its shards in the order they run
    head: Path
    # the bundle root and its stream index (shard_graphs.write_stream_index), when the export
    # wrote one: the rewritten graphs are then read from it, without the onnx package
    root: Path | None = None
    index: str | None = None

    @classmethod
    def from_manifest(cls, root: str | os.PathLike, shards: Mapping[str, Any]) -> "ShardPaths":
        """From a bundle root and its ``ModelEntry.shards`` ({"embed", "layers", "head"}, and
        "stream_index" when the export wrote one; an entry of "layers" is one path, or a list of
        the paths of that layer's parts)."""
        root = Path(root)
        try:
            layers = tuple((root / p,) if isinstance(p, str) else tuple(root / q for q in p)
                           for p in shards["layers"])
            if any(not parts for parts in layers):
                raise TypeError
            index = shards.get("stream_index")
            if index is not None and not isinstance(index, str):
                raise TypeError
            return cls(root / shards["embed"], layers, root / shards["head"], root, index)
        except (KeyError, TypeError, AttributeError):
            raise BundleError(f"{root}: manifest 'shards' must have 'embed', 'layers' (a path or a "
                              f"list of paths per layer), 'head' and optionally 'stream_index' (a path), "
                              f"got {shards!r}") from None

    @property
    def layer_files(self) -> tuple[Path, ...]:
        """Every layer shard, in pass order."""
        return tuple(p for parts in self.layers for p in parts)


@dataclass
class PassStats:
    nodes: int
    streamed_bytes: int  # weights read from storage for this pass's streamed parts
    io_seconds: float  # loader time spent on those parts (partly before the pass began)
    compute_seconds: float  # onnxruntime run time, all graphs
    stall_seconds: float  # time the pass waited for a part still loading
    wall_seconds: float
    usage_after: int = 0  # what the process holds after the pass (memory.current_usage)


def _store(acts: dict[str, np.ndarray], name: str, value: np.ndarray) -> None:
    """Keep a graph output for the next graphs; ``x_out`` feeds the next shard's ``x_in``."""
    acts[name] = value
    if name.endswith("_out"):
        acts[name[:-4] + "_in"] = value


def target_floor_bytes(shards: ShardPaths, spec: ModelSpec, budget: int, max_context: int,
                       max_nodes: int) -> int:
    """The least a StreamingRunner needs besides the process: KV cache, per-pass buffers, the
    margin and one streaming buffer as large as the largest layer (from file sizes only)."""
    largest = max((p.with_name(p.name + ".data").stat().st_size for p in shards.layer_files), default=0)
    return (kv_bytes(spec, max_context) + activation_bytes(spec, max_nodes, max_context, spec.vocab_size)
            + safety_margin(budget) + largest)


class StreamingRunner(ModelRunner):
    """See the module docstring. ``budget``: bytes, a size string or None (cgroup limit /
    available memory); ``reserve``: bytes the caller will still allocate later (e.g. the
    draft's KV cache growth) - load the draft *before* this runner so that its weights are in
    the measured baseline. ``max_nodes``: the largest pass (tree size + root, or a prefill
    chunk). ``baseline``: the bytes already in use (default: measured now, the cgroup's working
    set or RSS). ``prefetch=False`` streams with one buffer (no overlap; for comparison).
    ``verify``: "stat" checks size, mtime and inode of a shard file on every read (free;
    catches files rewritten, replaced, truncated or removed mid-generation); "crc32" also
    compares a CRC-32 of every streamed read with one taken at load (catches in-place bit
    flips too; measured: plain streaming at a 2x cap 4.1 -> 2.5 tokens/s on 2 cores).
    ``gather_cache_rows``: embedding rows kept after a streamed embedding's row reads (a miss
    is one O_DIRECT read of a few KiB; 256 rows of SmolLM2 are 0.6 MiB, 1024 were 2.3 MiB of a
    budget where the prefetch buffer needs 3.4). ``guard``: after each pass, stream resident
    parts instead while the process has grown past the plan (``_guard``; ``demoted`` lists
    them); edgeinfer.load turns it on. Raises MemoryBudgetError before reading any weight if
    the budget is too small."""

    def __init__(self, shards: ShardPaths, spec: ModelSpec, budget: int | str | None = None, *,
                 max_context: int | None = None, threads: int = 0, max_nodes: int = 64,
                 reserve: int = 0, priority: Sequence[str] | None = None, verify: str = "stat",
                 direct_io: bool = True, head_chunk_bytes: int | None = None, gather_cache_rows: int = 256,
                 kv_block: int = 64, baseline: int | None = None, prefetch: bool | None = None,
                 guard: bool = False, full_logits_nodes: int | None = None, name: str = "target") -> None:
        self.spec, self.name = spec, name
        self.max_context = int(max_context or min(spec.max_position, 4096))
        if len(shards.layers) != spec.num_layers:
            raise BundleError(f"shards: {len(shards.layers)} layer shards for a {spec.num_layers}-layer model")
        self.budget = resolve_budget(budget)
        self.reader = WeightReader(direct=direct_io)
        if verify not in ("stat", "crc32"):
            raise ConfigError(f"StreamingRunner.verify must be 'stat' or 'crc32', got {verify!r}")
        self.verify = verify
        self.max_nodes = max_nodes
        self.passes: list[PassStats] = []
        # ("load" | "compute", part, start, end) perf_counter stamps of the last passes
        self.trace: deque[tuple[str, str, float, float]] = deque(maxlen=8192)
        self._prefetch = prefetch
        self.forward_calls, self.forward_seconds = 0, 0.0
        self.report = ProviderReport(name, (CPU,), CPU, (), (CPU,))
        self.provider = CPU
        self._sliding = spec.has_sliding_layers
        self._window = spec.sliding_window or 0
        self._clear_scratch()

        self._load_graphs(shards, threads)
        parts, head_rows = self._make_parts(head_chunk_bytes)
        # Compact passes (forward's top_k): a head cut into blocks of output columns without a
        # tail can keep only each row's best logits, so the plan needs full [rows, vocab] logits
        # for at most full_logits_nodes rows (sampling, lossy rollback) and top-k for the rest.
        self.compact_logits = self._split is not None and self._split.layout == "nk" and self._split.tail is None
        self.full_logits_nodes = (max_nodes if full_logits_nodes is None or not self.compact_logits
                                  else max(1, min(full_logits_nodes, max_nodes)))
        gather_bytes = gather_cache_rows * self._row_bytes + max_nodes * (self._row_bytes + 2 * ALIGN)
        fixed = FixedCosts(baseline=(current_usage() if baseline is None else baseline) + reserve,
                           kv=kv_bytes(spec, self.max_context),
                           activations=activation_bytes(
                               spec, max_nodes, self.max_context, head_rows,
                               full_rows=None if self.full_logits_nodes == max_nodes else self.full_logits_nodes)
                           + self._tail_bytes(max_nodes),
                           margin=safety_margin(self.budget.bytes))
        self.plan: OffloadPlan = plan_offload(parts, self.budget.bytes, fixed, priority, gather_bytes)
        self._priority = list(priority) if priority is not None else default_priority(parts)
        self._load_weights()
        self._rows = None if self._gather_w is None else RowReader(
            self.reader, self._embed.data_path, next(r for r in self._embed.tensors if r.input_name == self._gather_w),
            self._parts["embed"].stamp, gather_cache_rows)
        self.cache = KVCache(spec.num_layers, spec.num_kv_heads, spec.head_dim, self.max_context,
                             block=kv_block, dtype=np.float32)
        # The memory guard (``guard``, see _guard). With a measured baseline the process's usage
        # is compared with the budget as it is. With a given one (a caller planning from its
        # own figure, e.g. a test's zero) the usage counts from what the plan expects in memory
        # now (that baseline less the caller's reserve, plus the resident weights), growing by
        # what the process grows from here.
        self.guard = guard
        self.demoted: list[str] = []  # resident parts the guard turned into streamed ones
        self._usage_loaded = current_usage()
        self._planned_loaded = (self._usage_loaded if baseline is None
                                else fixed.baseline - reserve + self.plan.resident_bytes)

    # -- set-up ------------------------------------------------------------------------
    def _load_graphs(self, shards: ShardPaths, threads: int) -> None:
        """Rewritten shard graphs (no weights read) and the sessions they share: from the
        bundle's stream index when it has one, else rewritten here (needs onnx)."""
        head_mm: bytes | None = None
        if shards.index is not None and shards.root is not None:
            index = load_stream_index(shards.root, shards.index)
            embed = index.embed_rows or index.shard(shards.root, shards.embed)
            self._gather_w = index.gather_weight
            head = index.shard(shards.root, shards.head)
            self._split, head_mm = index.head_split, index.head_matmul
            self._layers = [[index.shard(shards.root, p) for p in parts] for parts in shards.layers]
        else:
            embed = load_shard_graph(shards.embed)
            self._gather_w = row_gather_weight(embed)
            if self._gather_w is not None:
                embed = load_shard_graph(shards.embed, frozenset({self._gather_w}))
            head = load_shard_graph(shards.head)
            self._split = split_head(head)
            # per layer its shard graphs (one, or its parts: export/onnx_shards.py ``split``)
            self._layers = [[load_shard_graph(p) for p in parts] for parts in shards.layers]
        self._chunk_w = self._split.weight if self._split else None
        self._embed, self._head = embed, head
        # planner part names: layer.{i} for a layer of one shard, layer.{i}.{j} for its parts
        self._part_names = [[f"layer.{i}"] if len(parts) == 1 else [f"layer.{i}.{j}" for j in range(len(parts))]
                            for i, parts in enumerate(self._layers)]
        self._so = ort.SessionOptions()
        self._so.intra_op_num_threads = threads
        self._so.log_severity_level = 3
        # no arena: per-pass buffers are freed after the pass (with return_freed_memory, back to
        # the system), so between passes only weights and caches stay resident
        self._so.enable_cpu_mem_arena = False
        # every session here (embed, layers, head) has its own thread pool: one still spinning
        # after its run would take the cores from the next one's and from the draft's steps
        # (providers.STOP_SPINNING)
        self._so.add_session_config_entry(*STOP_SPINNING)
        return_freed_memory()
        self._sessions: dict[str, ort.InferenceSession] = {}
        for g in [embed] + [g for parts in self._layers for g in parts] + ([] if self._split else [head]):
            self._session(g.signature, g.model_bytes, g.path)
        if self._split is not None:
            self._pre = self._session("head.pre", self._split.pre, head.path)
            self._tail = self._session("head.tail", self._split.tail, head.path) if self._split.tail else None
            self._head_mm = self._session("head.matmul", head_mm or head_matmul_graph(self._split.layout), head.path)

    def _make_parts(self, head_chunk_bytes: int | None) -> tuple[list[Part], int]:
        """The planner's parts (embed, layers, head or head row slices); also returns the
        rows of the largest head output slice (for the activation estimate)."""
        parts: list[Part] = []
        self._parts: dict[str, StreamPart] = {}
        embed, head, spec = self._embed, self._head, self.spec
        self._row_bytes = 0
        if self._gather_w is not None:
            t = next(r for r in embed.tensors if r.input_name == self._gather_w)
            self._row_bytes = t.length // t.shape[0]
        self._add(parts, StreamPart("embed", embed, *embed.span), "embed", gather=self._gather_w is not None)
        for graphs, names in zip(self._layers, self._part_names):
            for g, name in zip(graphs, names):
                self._add(parts, StreamPart(name, g, *g.span), "layer")
        head_rows = spec.vocab_size
        if self._chunk_w is None:
            self._add(parts, StreamPart("head", head, *head.span), "head")
        else:
            t = next(r for r in head.tensors if r.input_name == self._chunk_w)
            rb = t.length // t.shape[0]
            largest = max(g.nbytes for graphs in self._layers for g in graphs)
            step = max(1, (head_chunk_bytes or largest) // rb)
            if self._split.layout == "nk":
                step = step // 64 * 64 if step > 64 else step  # whole column blocks of the output
                head_rows = min(step, t.shape[0])
            for c, r0 in enumerate(range(0, t.shape[0], step)):
                r1 = min(t.shape[0], r0 + step)
                s0 = (t.offset + r0 * rb) // ALIGN * ALIGN
                s1 = -(-(t.offset + r1 * rb) // ALIGN) * ALIGN
                self._add(parts, StreamPart(f"head.{c}", head, s0, s1, rows=(r0, r1)), "head")
        self._head_parts = [n for n in self._parts if n == "head" or n.startswith("head.")]
        return parts, head_rows

    def _load_weights(self) -> None:
        """The small tensors a sliced graph always needs, the resident parts, reference
        checksums of the streamed parts; then the ring starts reading."""
        self._common: dict[str, dict[str, np.ndarray]] = {}
        self._keep: list[Any] = []
        for g, big in ((self._embed, self._gather_w), (self._head, self._chunk_w)):
            if big is not None:
                self._common[g.signature] = self._load_small(g, exclude=big)
        self._resident: dict[str, dict[str, np.ndarray]] = {}
        self._resident_bufs: dict[str, Any] = {}
        for name in self.plan.resident:
            p = self._parts[name]
            buf = aligned_buffer(p.nbytes)
            self.reader.read(p.graph.data_path, p.start, p.end, buf, p.stamp)
            self._keep.append(buf)
            self._resident_bufs[name] = buf
            self._resident[name] = self._views(p, buf)
        streamed = [self._parts[n] for n in self.plan.streamed if not (n == "embed" and self._gather_w)]
        checksum = self.verify == "crc32"
        if checksum and streamed:
            probe = aligned_buffer(max(p.nbytes for p in streamed))
            for p in streamed:
                p.crc = self.reader.read(p.graph.data_path, p.start, p.end, probe, p.stamp, checksum=True)
            probe.close()
        prefetch = self.plan.prefetch if self._prefetch is None else self._prefetch and self.plan.prefetch
        self._ring = StreamRing(streamed, 2 if prefetch else 1, self.reader, checksum,
                                self.trace) if streamed else None

    def _session(self, key: str, model: bytes, path: Path) -> ort.InferenceSession:
        if key not in self._sessions:
            try:
                self._sessions[key] = ort.InferenceSession(model, self._so, providers=[CPU])
            except Exception as e:  # onnxruntime raises several unrelated types
                raise BundleError(f"{path}: onnxruntime cannot load this shard "
                                  f"({' '.join(str(e).split())[:300]})") from None
        return self._sessions[key]

    def _tail_bytes(self, nodes: int) -> int:
        """A split head with a tail (e.g. a logit softcap) makes one more [nodes, vocab] array."""
        return nodes * self.spec.vocab_size * 4 if self._split is not None and self._split.tail else 0

    def _add(self, parts: list[Part], p: StreamPart, kind: str, gather: bool = False) -> None:
        """Register ``p``; its data file must exist now (its size is the one later reads expect)."""
        if p.graph.data_path is None:
            raise BundleError(f"{p.graph.path}: shard has no external weights to stream")
        p.stamp = file_stamp(p.graph.data_path)
        self._parts[p.name] = p
        parts.append(Part(p.name, kind, p.nbytes, gather_only=gather))  # type: ignore[arg-type]

    def _load_small(self, g: ShardGraph, exclude: str) -> dict[str, np.ndarray]:
        out = {}
        for r in g.tensors:
            if r.input_name == exclude:
                continue
            s0, s1 = r.offset // ALIGN * ALIGN, -(-(r.offset + r.length) // ALIGN) * ALIGN
            buf = aligned_buffer(s1 - s0)
            self.reader.read(g.data_path, s0, s1, buf)
            self._keep.append(buf)
            out[r.input_name] = np.frombuffer(buf, r.dtype, r.length // r.dtype.itemsize,
                                              r.offset - s0).reshape(r.shape)
        return out

    def _views(self, p: StreamPart, buf: Any) -> dict[str, np.ndarray]:
        g = p.graph
        if p.rows is None:
            return tensor_views(g, buf)
        t = next(r for r in g.tensors if r.input_name == self._chunk_w)
        rb = t.length // t.shape[0]
        r0, r1 = p.rows
        w = np.frombuffer(buf, t.dtype, (r1 - r0) * rb // t.dtype.itemsize, t.offset + r0 * rb - p.start)
        return {**self._common[g.signature], t.input_name: w.reshape((r1 - r0,) + t.shape[1:])}

    # -- per-pass helpers ----------------------------------------------------------------
    def _weights(self, name: str, st: dict[str, float]) -> dict[str, np.ndarray]:
        if name in self._resident:
            return self._resident[name]
        buf, load_s, stall = self._ring.acquire(name)
        st["io"] += load_s
        st["stall"] += stall
        st["bytes"] += self._parts[name].nbytes
        return self._views(self._parts[name], buf)

    def _release(self, name: str) -> None:
        if name not in self._resident:
            self._ring.release()

    def _run(self, g: ShardGraph | ort.InferenceSession, feeds: dict[str, Any],
             st: dict[str, float]) -> list[np.ndarray]:
        sess = g if isinstance(g, ort.InferenceSession) else self._sessions[g.signature]
        t0 = time.perf_counter()
        out = sess.run(None, feeds)
        st["compute"] += time.perf_counter() - t0
        return out

    # -- the step ------------------------------------------------------------------------
    def forward(self, tokens: Sequence[int] | np.ndarray, parents: Sequence[int] | None = None,
                logits_index: Sequence[int] | np.ndarray | None = None,
                top_k: int | None = None) -> np.ndarray | TopRows:
        """As ModelRunner.forward: logits float32 [m, vocab] for the nodes in ``logits_index``;
        with ``top_k`` and ``compact_logits``, only each row's best ``top_k`` (verify.TopRows).
        A chain longer than the plan allows (a long prefill: ``max_nodes`` nodes, or
        ``full_logits_nodes`` rows of full logits) runs as several passes, so that no pass needs
        more memory than planned; a tree must fit one pass."""
        t_start = time.perf_counter()
        ids = np.asarray(tokens, dtype=np.int64).reshape(1, -1)
        n = ids.shape[1]
        if n == 0:
            raise ValueError("StreamingRunner.forward: no tokens given")
        compact = top_k is not None and self.compact_logits
        rows = n if logits_index is None else np.asarray(logits_index).size
        if n > self.max_nodes or (not compact and rows > self.full_logits_nodes):
            if parents is not None:
                raise ValueError(f"StreamingRunner.forward: a tree of {n} nodes exceeds max_nodes="
                                 f"{self.max_nodes} (or, with full logits, full_logits_nodes="
                                 f"{self.full_logits_nodes}) this runner was planned for")
            return self._forward_chunked(ids[0], logits_index, top_k)
        s, L = self.num_scratch, self.cache.length
        self._check_room(L, s, n)
        self.cache.ensure(L + s + n)
        anc_new, depth_new, step = self._tree_inputs(n, parents, logits_index, L, s)
        std = {"input_ids": ids, **step}
        st = {"io": 0.0, "stall": 0.0, "compute": 0.0, "bytes": 0}
        try:
            acts: dict[str, np.ndarray] = {}
            self._forward_embed(ids, std, acts, st)
            for i, graphs in enumerate(self._layers):
                for g, part in zip(graphs, self._part_names[i]):
                    w = self._weights(part, st)
                    feeds = self._feeds(g, std, acts, w, self.cache.keys[i], self.cache.values[i])
                    t0 = time.perf_counter()
                    outs = self._run(g, feeds, st)
                    self.trace.append(("compute", part, t0, time.perf_counter()))
                    self._release(part)
                    for name, val in zip(g.outputs, outs):
                        if name == "present_key":
                            self.cache.keys[i][:, :, L + s:L + s + n] = val
                        elif name == "present_value":
                            self.cache.values[i][:, :, L + s:L + s + n] = val
                        else:
                            _store(acts, name, val)
            logits = self._forward_head(std, acts, std["logits_index"], st, top_k if compact else None)
        except BaseException:
            if self._ring is not None:
                self._ring.restart()
            raise
        self._anc, self._depth = anc_new, depth_new
        wall = time.perf_counter() - t_start
        self.forward_calls += 1
        self.forward_seconds += wall
        usage = current_usage()
        self.passes.append(PassStats(n, int(st["bytes"]), st["io"], st["compute"], st["stall"], wall, usage))
        if self.guard:
            self._guard(usage)
        return logits

    def _guard(self, usage: int) -> None:
        """Stream resident parts instead once the process has grown past the plan.

        The plan counts what it can foresee (KV cache, pass buffers, the streaming pool), and
        the margin covers the rest; but measured under a 128 MiB cap, the first streamed Token
        Recycling generation grew beyond the plan (the heap's free chunks that loading trimmed,
        touched again by the passes' small allocations: +10-12 MiB that then stay), and at the
        cap the kernel evicts the process's code pages: decoding slowed 2.5-9x. So,
        between passes: if the usage (as __init__ describes) passes the budget less half the
        margin, the lowest-priority resident parts that fit the streaming buffers are dropped
        from memory and stream from then on, as many as bring it back under that line."""
        ring = self._ring
        if ring is None:  # nothing streams: no pool to stream a demoted part through
            return
        margin = self.plan.breakdown.get("margin", 0)
        # in the plan's terms: what it expected in memory after loading, plus the measured growth
        excess = self._planned_loaded + (usage - self._usage_loaded) - (self.budget.bytes - margin // 2)
        if excess <= 0:
            return
        size = len(ring.bufs[0])
        order = [n for n in reversed(self._priority) if n in self._resident and self._parts[n].nbytes <= size]
        freed, dropped = 0, []
        for name in order:
            if freed >= excess:
                break
            del self._resident[name]
            buf = self._resident_bufs.pop(name)
            self._keep = [b for b in self._keep if b is not buf]
            try:
                buf.close()  # gives the pages back now (no view of it is left)
            except BufferError:  # a view still exists: the pages go when it does
                pass
            freed += self._parts[name].nbytes
            dropped.append(name)
        if not dropped:
            return
        self.demoted += dropped
        names = list(self._parts)
        resident = tuple(n for n in self.plan.resident if n not in dropped)
        streamed = tuple(n for n in names if n not in resident)
        breakdown = dict(self.plan.breakdown)
        breakdown["resident weights"] = breakdown.get("resident weights", 0) - freed
        self.plan = dataclasses.replace(
            self.plan, resident=resident, streamed=streamed, resident_bytes=self.plan.resident_bytes - freed,
            streamed_bytes=self.plan.streamed_bytes + freed, breakdown=breakdown)
        ring.set_parts([self._parts[n] for n in streamed if not (n == "embed" and self._gather_w)])
        self._planned_loaded -= freed

    def _forward_chunked(self, ids: np.ndarray, logits_index: Sequence[int] | np.ndarray | None,
                         top_k: int | None) -> np.ndarray | TopRows:
        n = ids.size
        want = np.arange(n) if logits_index is None else np.asarray(logits_index, np.int64).reshape(-1)
        if want.size == 0 or want.min() < 0 or want.max() >= n:
            raise ValueError(f"StreamingRunner.forward: logits_index {want.tolist()} not within [0, {n})")
        # full logits: no more rows in one pass than the plan holds
        step = self.max_nodes if top_k is not None and self.compact_logits else self.full_logits_nodes
        rows: dict[int, Any] = {}
        c0 = 0
        while c0 < n:
            chunk = ids[c0:c0 + self.max_nodes]
            sel = np.unique(want[(want >= c0) & (want < c0 + chunk.size)]) - c0
            if sel.size > step:  # more rows of full logits than a pass may hold: end it at the last
                sel = sel[:step]
                chunk = chunk[:sel[-1] + 1]
            out = self.forward(chunk, None, sel if sel.size else [chunk.size - 1], top_k=top_k)
            if isinstance(out, TopRows):
                rows.update((int(c0 + k), (out.ids[j], out.values[j])) for j, k in enumerate(sel))
            else:
                rows.update((int(c0 + k), out[j]) for j, k in enumerate(sel))
            c0 += chunk.size
        picked = [rows[int(k)] for k in want]
        if picked and isinstance(picked[0], tuple):
            return TopRows(np.stack([p[0] for p in picked]), np.stack([p[1] for p in picked]), self.spec.vocab_size)
        return np.stack(picked)

    def _feeds(self, g: ShardGraph | ort.InferenceSession, std: dict[str, np.ndarray],
               acts: dict[str, np.ndarray], weights: dict[str, np.ndarray], pk: np.ndarray | None = None,
               pv: np.ndarray | None = None) -> dict[str, Any]:
        feeds: dict[str, Any] = {}
        if isinstance(g, ort.InferenceSession):  # the head's "pre" graph
            names, where = [i.name for i in g.get_inputs()], self._head.path
            weights = {**self._head.inline, **weights}
        else:
            names, where = g.inputs + list(g.inline) + [r.input_name for r in g.tensors], g.path
            weights = {**g.inline, **weights}
        for name in names:
            if name in weights:
                feeds[name] = weights[name]
                continue
            if name in STANDARD_INPUTS:
                feeds[name] = std[name]
            elif name == "past_key":
                feeds[name] = pk
            elif name == "past_value":
                feeds[name] = pv
            elif name in acts:
                feeds[name] = acts[name]
            else:
                raise BundleError(f"{where}: input {name!r} is produced by no earlier shard")
        return feeds

    def _forward_embed(self, ids: np.ndarray, std: dict[str, np.ndarray], acts: dict[str, np.ndarray],
                       st: dict[str, float]) -> None:
        g = self._embed
        if self._gather_w is not None and "embed" not in self._resident:
            table, remapped = self._rows.rows(ids)
            weights = {**self._common[g.signature], self._gather_w: table}
            feeds = self._feeds(g, {**std, "input_ids": remapped}, acts, weights)
            outs = self._run(g, feeds, st)
        else:
            w = self._weights("embed", st)
            outs = self._run(g, self._feeds(g, std, acts, w), st)
            self._release("embed")
        for name, val in zip(g.outputs, outs):
            _store(acts, name, val)

    def _forward_head(self, std: dict[str, np.ndarray], acts: dict[str, np.ndarray], li: np.ndarray,
                      st: dict[str, float], top_k: int | None = None) -> np.ndarray | TopRows:
        m, vocab = li.size, self.spec.vocab_size
        if self._split is None:
            w = self._weights("head", st)
            out = self._run(self._head, self._feeds(self._head, std, acts, w), st)[0]
            self._release("head")
            return out.reshape(m, vocab)
        common = self._common.get(self._head.signature, {})
        a = self._run(self._pre, self._feeds(self._pre, std, acts, common), st)[0]
        lead, K = a.shape[:-1], a.shape[-1]
        a2 = np.ascontiguousarray(a.reshape(-1, K), dtype=np.float32)  # [m, K]
        kn = self._split.layout == "kn"
        if top_k is not None:  # compact: each block of output columns folded into the best top_k
            best = None
            for name in self._head_parts:
                r0, _ = self._parts[name].rows
                w = self._weights(name, st)[self._chunk_w]
                block = self._run(self._head_mm, {"a": a2, "w": w}, st)[0]
                self._release(name)
                best = merge_top(best, block, r0, top_k)
            return TopRows(best[1], best[0], vocab)
        y = np.zeros((a2.shape[0], vocab), dtype=np.float32)
        for name in self._head_parts:
            r0, r1 = self._parts[name].rows
            w = self._weights(name, st)[self._chunk_w]
            if kn:  # rows of W [K, N] are a slice of K: add the partial product
                y += self._run(self._head_mm, {"a": np.ascontiguousarray(a2[:, r0:r1]), "w": w}, st)[0]
            else:  # rows of W [N, K] are a slice of N: one block of output columns
                y[:, r0:r1] = self._run(self._head_mm, {"a": a2, "w": w}, st)[0]
            self._release(name)
        y = y.reshape(lead + (vocab,))
        if self._tail is not None:
            y = self._run(self._tail, {"head_matmul_y": y}, st)[0]
        return y.reshape(m, vocab)

    # -- reporting and shutdown ----------------------------------------------------------
    def describe(self) -> str:
        return f"{self.name}: streaming from shards; {self.plan.describe()}"

    def verify_cost(self, window: int = 16) -> tuple[float, float]:
        """(seconds a pass costs whatever its size, seconds per extra node), a least-squares
        fit of wall time on node count over the last ``window`` passes: what
        ``CostAwarePolicy.set_costs(verify_s, draft_step_s, verify_per_node_s)`` wants. With
        streaming the first term is mostly I/O, so trees grow when storage is slow."""
        ps = self.passes[-window:]
        if not ps:
            return 0.0, 0.0
        n = np.array([p.nodes for p in ps], dtype=np.float64)
        t = np.array([p.wall_seconds for p in ps], dtype=np.float64)
        if np.ptp(n) == 0:
            return float(t.mean()), 0.0
        slope, icpt = np.polyfit(n, t, 1)
        slope = max(0.0, float(slope))
        fixed = float(t.mean() - slope * n.mean())
        if fixed <= 0:  # noise on fast passes tilted the fit: a pass never costs nothing, so
            return float(t.mean()), 0.0  # fall back to the size-independent model
        return fixed, slope

    def describe_parts(self, names: Sequence[str]) -> str:
        """Part names in words: runs of whole layers as ranges, split layers with some of their
        parts counted, e.g. ``"embed, layers 0-11, layer 12 (2 of 4 parts), head"``."""
        names = list(names)
        counts: dict[int, int] = {}
        for n in names:
            if n.startswith("layer."):
                i = int(n.split(".")[1])
                counts[i] = counts.get(i, 0) + 1
        out = ["embed"] if "embed" in names else []
        run: list[int] = []

        def flush() -> None:
            if run:
                out.append(f"layer {run[0]}" if len(run) == 1 else f"layers {run[0]}-{run[-1]}")
                run.clear()

        for i in sorted(counts):
            total = len(self._layers[i])
            whole = counts[i] == total
            if not (whole and run and run[-1] == i - 1):
                flush()
            if whole:
                run.append(i)
            else:
                out.append(f"layer {i} ({counts[i]} of {total} parts)")
        flush()
        heads = sum(1 for n in names if n == "head" or n.startswith("head."))
        if heads:
            total = len(self._head_parts)
            out.append("head" if heads == total else f"head ({heads} of {total} slices)")
        return ", ".join(out)

    def memory_report(self) -> dict[str, Any]:
        """Budget, planned breakdown, resident parts and the usage now (bytes)."""
        return {"budget": self.budget.bytes, "budget_source": self.budget.source,
                "planned_peak": self.plan.peak_bytes, "breakdown": dict(self.plan.breakdown),
                "resident": list(self.plan.resident), "streamed": list(self.plan.streamed),
                "streamed_bytes_per_pass": self.plan.streamed_bytes, "usage_now": current_usage(),
                "demoted": list(self.demoted)}

    def close(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
