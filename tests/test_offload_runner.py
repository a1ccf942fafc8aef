"""StreamingRunner (edgeinfer.runtime.streaming): the target run from per-layer shards.

Independent answers: onnxruntime on the full tree-verify graph with the whole sequence and no
KV cache (tests/runtime_models.raw_logits / raw_greedy); the same runner with every part
resident; the bytes of the shard files."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from edgeinfer.errors import MemoryBudgetError, ShardError
from edgeinfer.quant.recipe import QuantRecipe
from edgeinfer.runtime import shard_io
from edgeinfer.runtime.memory import current_usage
from edgeinfer.runtime.streaming import ShardPaths, StreamingRunner

from runtime_models import build_tiny_onnx, random_weights, raw_greedy, raw_logits, same_or_near_tie, tiny_spec

KiB, MiB = 2**10, 2**20


def _build(root: Path, spec, seed: int = 0, split: str = "layer", gemm_head: bool = True) -> tuple[Path, ShardPaths]:
    from edgeinfer.export.onnx_shards import build_layer_shards

    w = random_weights(spec, seed)
    full = build_tiny_onnx(spec, root, seed)
    info = build_layer_shards(spec, w.__getitem__, QuantRecipe(), root / "layers", split=split,
                              gemm_head=gemm_head)
    return full, ShardPaths.from_manifest(root, info.to_manifest(root))


@pytest.fixture(scope="module", params=["llama", "gemma3", "llama-matrix"])
def model(request, tmp_path_factory):
    """"llama-matrix": each layer in four shards (attention, gate, up, down) streamed as parts;
    "gemma3" (sliding layers) keeps the head as a MatMul on [hidden, vocab] (the layout of
    bundles exported before the Gemm head), read in slices of the hidden axis."""
    spec = tiny_spec(layers=6, sliding_window=8 if request.param == "gemma3" else None)
    root = tmp_path_factory.mktemp(request.param)
    full, shards = _build(root, spec, split="matrix" if request.param.endswith("matrix") else "layer",
                          gemm_head=request.param != "gemma3")
    return spec, full, shards


def _layer_bytes(r: StreamingRunner, i: int = 0) -> int:
    """Bytes of decoder layer i's weights, all its parts."""
    return sum(p.nbytes for n, p in r._parts.items() if n == f"layer.{i}" or n.startswith(f"layer.{i}."))


def _data_file(shards: ShardPaths, part: str) -> Path:
    """The data file of a planner part named layer.{i} or layer.{i}.{j}."""
    _, i, *j = part.split(".")
    return shards.layers[int(i)][int(j[0]) if j else 0].with_suffix(".onnx.data")


def _copy_shards(shards0: ShardPaths, dest: Path) -> ShardPaths:
    return ShardPaths.from_manifest(dest, {
        "embed": _copy(shards0.embed, dest), "head": _copy(shards0.head, dest),
        "layers": [[_copy(p, dest) for p in parts] for parts in shards0.layers]})


def runner(spec, shards, budget=None, **kw) -> StreamingRunner:
    """budget None: everything resident. Budgets count from a zero baseline so that tiny
    models stream; the runner adds offload.safety_margin(budget) on top."""
    kw.setdefault("max_context", 96)
    kw.setdefault("max_nodes", 16)
    return StreamingRunner(shards, spec, budget or 1 << 30, baseline=0, head_chunk_bytes=8 * KiB, **kw)


def streaming_budget(spec, shards) -> int:
    """A budget that keeps about half of the layers resident."""
    probe = runner(spec, shards)
    layer = _layer_bytes(probe)
    b = probe.plan.breakdown
    fixed = b["baseline"] + b["kv"] + b["activations"] + b.get("embed rows", 0)
    others = sum(probe._parts[n].nbytes for n in probe.plan.resident if not n.startswith("layer."))
    probe.close()
    from edgeinfer.runtime.offload import safety_margin

    base = fixed + others + (spec.num_layers // 2 + 2) * layer
    return base + safety_margin(base + safety_margin(2 * base)) + 64 * KiB


def test_plan_streams_and_keeps_to_budget(model):
    spec, _, shards = model
    budget = streaming_budget(spec, shards)
    r = runner(spec, shards, budget)
    assert r.plan.peak_bytes <= budget
    assert any(n.startswith("layer.") for n in r.plan.streamed)
    assert any(n.startswith("layer.") for n in r.plan.resident)
    assert r.plan.prefetch and r._ring is not None and r._ring.k == 2
    assert r._split is not None and r._split.layout == ("kn" if spec.has_sliding_layers else "nk")
    parts = len(shards.layers[0])
    # shared sessions: one per kind of part (sliding layers' attention differs)
    assert len({g.signature for gs in r._layers for g in gs}) == parts + spec.has_sliding_layers
    if parts > 1:  # the pool holds two consecutive parts, not two layers
        assert r.plan.pool_bytes < _layer_bytes(r)
    r.close()


def test_matches_full_graph_without_cache(model):
    """Prefill, a tree pass, a commit of one path and a decode step agree with a full
    no-cache pass of the full graph (onnxruntime directly)."""
    import onnxruntime as ort

    spec, full, shards = model
    sess = ort.InferenceSession(str(full), providers=["CPUExecutionProvider"])
    r = runner(spec, shards, streaming_budget(spec, shards))
    prompt = [3, 17, 99, 4, 250, 8, 31]
    got = r.forward(prompt)
    want = raw_logits(sess, spec, prompt)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    r.commit(np.arange(len(prompt)))
    # tree: 0 <- 1 <- 3, 0 <- 2, and 4 at the root
    toks, parents = [5, 6, 7, 9, 11], [-1, 0, 0, 1, -1]
    tree_logits = r.forward(toks, parents)
    for leaf, path in ((3, [0, 1, 3]), (2, [0, 2]), (4, [4])):
        want = raw_logits(sess, spec, prompt + [toks[j] for j in path])[-1]
        np.testing.assert_allclose(tree_logits[leaf], want, rtol=1e-4, atol=1e-4)
    r.commit([0, 1, 3])
    got = r.forward([42])[0]
    want = raw_logits(sess, spec, prompt + [5, 6, 9, 42])[-1]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    r.close()


def test_streamed_equals_resident_exactly(model):
    spec, _, shards = model
    a = runner(spec, shards)
    b = runner(spec, shards, streaming_budget(spec, shards))
    assert not a.plan.streamed or a.plan.streamed == ("embed",)
    prompt = [1, 2, 3, 4, 5]
    np.testing.assert_array_equal(a.forward(prompt), b.forward(prompt))
    a.commit(range(5))
    b.commit(range(5))
    for tok in (7, 9, 11, 200):
        np.testing.assert_array_equal(a.forward([tok]), b.forward([tok]))
        a.commit([0])
        b.commit([0])
    assert b.passes[-1].streamed_bytes > 0 and a.passes[-1].streamed_bytes == 0
    a.close()
    b.close()


def test_greedy_decode_matches_reference(model):
    spec, full, shards = model
    prompt = [11, 23, 5, 77]
    ref, gaps = raw_greedy(full, spec, prompt, 12)
    r = runner(spec, shards, streaming_budget(spec, shards), prefetch=True)
    logits = r.forward(prompt, logits_index=[len(prompt) - 1])
    r.commit(range(len(prompt)))
    out = []
    for _ in range(12):
        out.append(int(np.argmax(logits[-1])))
        logits = r.forward([out[-1]])
        r.commit([0])
    assert same_or_near_tie(out, ref, gaps)
    r.close()


def test_too_small_budget_fails_before_reading_weights(model, monkeypatch):
    spec, _, shards = model
    reads = []
    real = shard_io.WeightReader.read
    monkeypatch.setattr(shard_io.WeightReader, "read", lambda self, *a, **k: (reads.append(a), real(self, *a, **k)))
    layer = max(p.nbytes for n, p in runner(spec, shards)._parts.items() if n.startswith("layer."))
    reads.clear()
    with pytest.raises(MemoryBudgetError, match=r"too small.*process and draft.*largest streamed part"):
        StreamingRunner(shards, spec, 3 * MiB, baseline=3 * MiB - layer, max_context=96, max_nodes=16)
    assert reads == []


def _replace(path: Path, data: bytes) -> None:
    """Swap the file's content at once (the loader thread may be reading it)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


@pytest.mark.parametrize("damage", ["missing", "corrupt", "truncated"])
def test_damaged_shard_mid_generation_is_a_clear_error(model, tmp_path, damage):
    spec, _, shards0 = model
    shards = _copy_shards(shards0, tmp_path)
    r = runner(spec, shards, streaming_budget(spec, shards))
    victim = next(n for n in r.plan.streamed if n.startswith("layer."))
    data = _data_file(shards, victim)
    r.forward([1, 2, 3])
    r.commit(range(3))
    good = r.forward([4])
    r.discard()
    saved = data.read_bytes()
    if damage == "missing":
        data.unlink()
    elif damage == "corrupt":
        mid = len(saved) // 2
        _replace(data, saved[:mid] + bytes(64 * [0x5A]) + saved[mid + 64:])
    else:
        _replace(data, saved[: len(saved) // 2])
    expect = {"missing": "missing", "corrupt": "modified or replaced", "truncated": "expected"}[damage]
    for _ in range(2):  # the part may already sit in the ring from before the damage
        try:
            r.forward([4])
            r.discard()
        except ShardError as e:
            assert str(data) in str(e) and expect in str(e)
            break
    else:
        pytest.fail("a damaged shard was not reported")
    # the request ended; with the file restored, a runner loaded again gives the same logits
    r.close()
    _replace(data, saved)
    r = runner(spec, shards, streaming_budget(spec, shards))
    r.forward([1, 2, 3])
    r.commit(range(3))
    np.testing.assert_array_equal(r.forward([4]), good)
    r.close()


def test_in_place_bit_flip_caught_by_crc32_mode(model, tmp_path):
    """Bytes changed in place with size, mtime and inode kept: only verify="crc32" sees it."""
    import os

    spec, _, shards0 = model
    shards = _copy_shards(shards0, tmp_path)
    r = runner(spec, shards, streaming_budget(spec, shards), verify="crc32")
    victim = next(n for n in r.plan.streamed if n.startswith("layer."))
    data = _data_file(shards, victim)
    r.forward([1, 2, 3])
    r.discard()
    st = os.stat(data)
    with open(data, "r+b") as f:
        f.seek(st.st_size // 2)
        f.write(b"\x7f" * 16)
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ShardError, match="checksum mismatch"):
        for _ in range(2):
            r.forward([1, 2, 3])
            r.discard()
    r.close()


def _copy(p: Path, dest: Path) -> str:
    for f in (p, p.with_suffix(".onnx.data")):
        shutil.copy(f, dest / f.name)
    return p.name


def test_prefetch_overlaps_compute(tmp_path):
    """With two buffers, layer i+1 is read while layer i computes; with one, never."""
    spec = tiny_spec(layers=8)
    import dataclasses

    spec = dataclasses.replace(spec, hidden_size=256, intermediate_size=1024, head_dim=64, num_heads=4,
                               num_kv_heads=2)
    _, shards = _build(tmp_path, spec)

    def overlap(prefetch: bool) -> tuple[float, float]:
        r = StreamingRunner(shards, spec, 20 * MiB, baseline=0, max_context=96, max_nodes=32,
                            prefetch=prefetch, direct_io=False, verify="stat")
        assert r.plan.resident == () or all(not n.startswith("layer.") for n in r.plan.resident)
        r.forward(list(range(1, 9)))
        r.commit(range(8))
        for _ in range(4):
            r.forward(list(range(20, 52)), [-1] + list(range(31)))  # 32-node passes
            r.discard()
        loads = [(a, b) for kind, _, a, b in r.trace if kind == "load"]
        comps = [(a, b) for kind, _, a, b in r.trace if kind == "compute"]
        both = sum(max(0.0, min(b1, b2) - max(a1, a2)) for a1, b1 in loads for a2, b2 in comps)
        total = sum(b - a for a, b in comps)
        r.close()
        return both, total

    both, total = overlap(True)
    assert both > 0.3 * total, f"only {both:.4f} s of {total:.4f} s of compute overlapped a load"
    none, _ = overlap(False)
    assert none < 0.02 * total


def test_long_prefill_runs_in_planned_pass_sizes(model):
    import onnxruntime as ort

    spec, full, shards = model
    sess = ort.InferenceSession(str(full), providers=["CPUExecutionProvider"])
    r = runner(spec, shards, streaming_budget(spec, shards), max_nodes=4)
    prompt = [3, 17, 99, 4, 250, 8, 31, 2, 77, 5, 6]
    got = r.forward(prompt, logits_index=[10, 0, 5])
    assert [p.nodes for p in r.passes] == [4, 4, 3]
    want = raw_logits(sess, spec, prompt)
    np.testing.assert_allclose(got, want[[10, 0, 5]], rtol=1e-4, atol=1e-4)
    r.commit(range(len(prompt)))
    assert r.past_len == len(prompt)
    with pytest.raises(ValueError, match="max_nodes"):
        r.forward([1, 2, 3, 4, 5], [-1, 0, 1, 2, 3])
    r.close()


def test_engine_request_ends_with_shard_error(model, tmp_path):
    """Through the engine: a shard removed mid-generation ends the request with ShardError
    after the tokens already produced (which are the right ones)."""
    from edgeinfer.runtime.engine import Engine

    spec, full, shards0 = model
    shards = _copy_shards(shards0, tmp_path)
    r = runner(spec, shards, streaming_budget(spec, shards))
    victim = next(n for n in r.plan.streamed if n.startswith("layer."))
    engine = Engine(r, None, {})
    prompt = [11, 23, 5, 77]
    ref, gaps = raw_greedy(full, spec, prompt, 12)
    got: list[int] = []
    with pytest.raises(ShardError, match="missing|modified"):
        for batch in engine.stream_tokens(prompt, max_new_tokens=12, mode="plain", ignore_eos=True):
            got += list(batch)
            if len(got) == 3:
                _data_file(shards, victim).unlink()
    assert 3 <= len(got) < 12 and same_or_near_tie(got, ref[:len(got)], gaps)
    r.close()


def test_verify_cost_fit_never_says_a_pass_is_free():
    """A fit whose intercept comes out <= 0 (noisy fast passes) falls back to the mean pass."""
    from types import SimpleNamespace

    from edgeinfer.runtime.streaming import StreamingRunner

    fake = SimpleNamespace(passes=[SimpleNamespace(nodes=n, wall_seconds=t)
                                   for n, t in ((1, 0.001), (25, 0.030), (2, 0.001), (24, 0.031))])
    fixed, per_node = StreamingRunner.verify_cost(fake)
    assert fixed > 0 and per_node == 0.0 and abs(fixed - 0.01575) < 1e-9
    fake.passes = [SimpleNamespace(nodes=n, wall_seconds=0.2 + 0.001 * n) for n in (1, 5, 9)]
    fixed, per_node = StreamingRunner.verify_cost(fake)
    assert abs(fixed - 0.2) < 1e-9 and abs(per_node - 0.001) < 1e-9


def test_head_slices_and_the_logits_buffers_the_plan_counts(tmp_path):
    """A Gemm head (row slices = column blocks of the logits) with only a reshape after it has
    no tail to run; a softcap tail makes one more [nodes, vocab] array, which the plan counts."""
    import dataclasses

    from edgeinfer.runtime.offload import activation_bytes

    for softcap in (None, 30.0):
        spec = dataclasses.replace(tiny_spec(layers=2), final_logit_softcap=softcap)
        root = tmp_path / f"softcap{softcap}"
        root.mkdir()
        full, shards = _build(root, spec, split="matrix")
        r = runner(spec, shards, max_nodes=16)
        assert r._split.layout == "nk" and (r._split.tail is None) == (softcap is None)
        rows = r._parts["head.0"].rows[1] - r._parts["head.0"].rows[0]
        want = activation_bytes(spec, 16, 96, rows) + (16 * spec.vocab_size * 4 if softcap else 0)
        assert r.plan.breakdown["activations"] == want
        ref = raw_logits(__import__("onnxruntime").InferenceSession(str(full)), spec, [3, 1, 4, 1, 5])
        np.testing.assert_allclose(r.forward([3, 1, 4, 1, 5]), ref, rtol=1e-4, atol=1e-4)
        r.close()


def test_describe_parts_names_layers_and_parts(tmp_path):
    spec = tiny_spec(layers=6)
    _, shards = _build(tmp_path, spec, split="matrix")
    r = runner(spec, shards)
    heads = list(r._head_parts)
    names = (["embed"] + [f"layer.{i}.{j}" for i in (0, 1, 2, 4) for j in range(4)]
             + ["layer.5.0", "layer.5.2"] + heads[:1])
    assert r.describe_parts(names) == (f"embed, layers 0-2, layer 4, layer 5 (2 of 4 parts), "
                                       f"head{'' if len(heads) == 1 else f' (1 of {len(heads)} slices)'}")
    assert r.describe_parts(r.plan.resident).startswith("embed, layers 0-5")  # all resident here
    assert r.describe_parts([]) == ""
    r.close()


# -- the stream index: shard graphs rewritten at export, read without onnx ---------------------

def _indexed(shards: ShardPaths, root: Path) -> ShardPaths:
    from dataclasses import replace

    from edgeinfer.runtime.shard_graphs import write_stream_index

    rel = write_stream_index(root, shards.embed, list(shards.layer_files), shards.head, root / "layers" / "stream")
    return replace(shards, root=root, index=rel)


def _same_graph(a, b) -> None:
    assert (a.path, a.data_path, a.signature, a.inputs, a.outputs, a.span) == \
           (b.path, b.data_path, b.signature, b.inputs, b.outputs, b.span)
    assert a.model_bytes == b.model_bytes and a.tensors == b.tensors
    assert a.inline.keys() == b.inline.keys()
    for k in a.inline:
        assert a.inline[k].dtype == b.inline[k].dtype
        np.testing.assert_array_equal(a.inline[k], b.inline[k])


def test_stream_index_holds_what_the_rewrite_gives(model, tmp_path):
    from edgeinfer.runtime.shard_graphs import (head_matmul_graph, load_shard_graph, load_stream_index,
                                                row_gather_weight, split_head)

    spec, _, shards0 = model
    shards = _indexed(_copy_shards(shards0, tmp_path), tmp_path)
    index = load_stream_index(shards.root, shards.index)
    for p in (shards.embed, shards.head, *shards.layer_files):
        _same_graph(index.shard(tmp_path, p), load_shard_graph(p))
    embed = load_shard_graph(shards.embed)
    gather = row_gather_weight(embed)
    assert gather is not None and index.gather_weight == gather
    _same_graph(index.embed_rows, load_shard_graph(shards.embed, frozenset({gather})))
    split = split_head(load_shard_graph(shards.head))
    assert (index.head_split.weight, index.head_split.layout) == (split.weight, split.layout)
    assert (index.head_split.pre, index.head_split.tail) == (split.pre, split.tail)
    assert index.head_matmul == head_matmul_graph(split.layout)
    if spec.num_layers and any(len(parts) > 1 for parts in shards.layers):  # shared graphs stored once
        assert len(list((tmp_path / "layers" / "stream" / "graphs").iterdir())) < len(shards.layer_files)


def test_streaming_from_the_index_equals_the_rewrite(model, tmp_path):
    spec, _, shards0 = model
    shards = _indexed(_copy_shards(shards0, tmp_path), tmp_path)
    a = runner(spec, shards0, streaming_budget(spec, shards0))  # rewritten at load
    b = runner(spec, shards, streaming_budget(spec, shards0))
    assert a.plan.streamed == b.plan.streamed and b.plan.streamed
    prompt = [1, 2, 3, 4, 5]
    np.testing.assert_array_equal(a.forward(prompt), b.forward(prompt))
    a.commit(range(5))
    b.commit(range(5))
    for tok in (7, 9, 200):
        np.testing.assert_array_equal(a.forward([tok]), b.forward([tok]))
        a.commit([0])
        b.commit([0])
    a.close()
    b.close()


@pytest.mark.parametrize("damage,message", [
    ("missing", "cannot read the stream index"),
    ("json", "not valid JSON"),
    ("format", "'format' must be"),
    ("version", "unknown 'version'"),
    ("graph_missing", "is missing"),
    ("graph_corrupt", "do not match its name"),
    ("no_entry", "no entry for shard"),
    ("field", "malformed"),
])
def test_stream_index_errors_name_the_file(model, tmp_path, damage, message):
    import json

    spec, _, shards0 = model
    shards = _indexed(_copy_shards(shards0, tmp_path), tmp_path)
    path = tmp_path / shards.index
    d = json.loads(path.read_text())
    graphs = sorted((path.parent / "graphs").iterdir())
    if damage == "missing":
        path.unlink()
    elif damage == "json":
        path.write_text("{not json")
    elif damage in ("format", "version"):
        d[damage] = "other" if damage == "format" else 99
        path.write_text(json.dumps(d))
    elif damage == "graph_missing":
        graphs[0].unlink()
    elif damage == "graph_corrupt":
        graphs[0].write_bytes(graphs[0].read_bytes()[:-1] + b"\0")
    elif damage == "no_entry":
        d["shards"].pop(shards.layer_files[0].relative_to(tmp_path).as_posix())
        path.write_text(json.dumps(d))
    elif damage == "field":
        first = next(iter(d["shards"]))
        del d["shards"][first]["tensors"]
        path.write_text(json.dumps(d))
    with pytest.raises(ShardError, match=message) as err:
        runner(spec, shards, streaming_budget(spec, shards0))
    assert str(tmp_path) in str(err.value)


def test_guard_streams_resident_parts_when_the_process_outgrows_the_plan(model):
    """Memory the plan did not foresee (here an array the test holds) makes the guard drop the
    lowest-priority resident parts and stream them, with the same logits as before."""
    spec, _, shards = model
    ref = runner(spec, shards)  # everything resident
    budget = streaming_budget(spec, shards)  # about half of the layers resident
    r = runner(spec, shards, budget, guard=True)
    off = runner(spec, shards, budget)  # the same plan without the guard
    resident0 = list(r.plan.resident)
    assert sum(n.startswith("layer.") for n in resident0) >= 2 and r.plan.streamed
    prompt = [1, 2, 3, 4, 5]
    for x in (ref, r, off):
        x.forward(prompt)
        x.commit(range(5))
    assert r.demoted == []  # within the plan: nothing changes
    # grow the process past the guard's line: by what brings the plan's figure there, plus 1 MiB
    # (well above the other tests' noise in this process's usage)
    line = r.budget.bytes - r.plan.breakdown["margin"] // 2
    hog = np.ones(line - r._planned_loaded - (current_usage() - r._usage_loaded) + MiB, dtype=np.uint8)
    for tok in (7, 9, 11):
        want = ref.forward([tok])
        np.testing.assert_array_equal(r.forward([tok]), want)
        np.testing.assert_array_equal(off.forward([tok]), want)
        for x in (ref, r, off):
            x.commit([0])
    freed = sum(r._parts[n].nbytes for n in r.demoted)
    assert r.demoted and set(r.demoted) <= set(resident0) and off.demoted == []
    assert all(n not in r.plan.resident and n in r.plan.streamed for n in r.demoted)
    assert r.plan.resident_bytes == off.plan.resident_bytes - freed
    rep = r.memory_report()
    assert rep["demoted"] == r.demoted and rep["planned_peak"] <= rep["budget"]
    # the lowest-priority parts go first (the planner's order from its end)
    fits = len(r._ring.bufs[0])  # a demoted part streams through the ring's buffers
    order = [n for n in r._priority if n in resident0 and r._parts[n].nbytes <= fits]
    assert r.demoted == order[::-1][:len(r.demoted)]
    del hog
    for x in (ref, r, off):
        x.close()


def test_guard_demotes_only_what_the_excess_needs(model):
    """The guard's arithmetic on given usage figures (no process noise): nothing at the line,
    then just enough lowest-priority parts for an excess of 1.5 parts."""
    spec, _, shards = model
    r = runner(spec, shards, streaming_budget(spec, shards), guard=True)
    r.forward([1, 2, 3])
    r.commit(range(3))
    line = r.budget.bytes - r.plan.breakdown["margin"] // 2
    at_line = r._usage_loaded + line - r._planned_loaded
    r._guard(at_line)
    assert r.demoted == []
    fits = len(r._ring.bufs[0])
    order = [n for n in reversed(r._priority) if n in r.plan.resident and r._parts[n].nbytes <= fits]
    part = r._parts[order[0]].nbytes
    r._guard(at_line + part + part // 2)
    need, k = part + part // 2, 0
    while sum(r._parts[n].nbytes for n in order[:k]) < need:
        k += 1
    assert r.demoted == order[:k]
    ref = runner(spec, shards)
    ref.forward([1, 2, 3])
    ref.commit(range(3))
    np.testing.assert_array_equal(r.forward([5]), ref.forward([5]))  # now streaming what it demoted
    r.close()
    ref.close()


def test_compact_passes_return_the_top_k_of_the_full_logits(tmp_path):
    """``forward(top_k=...)``: each row's best logits folded over the head's column blocks, the
    same ids and values as the top-k of the full graph's logits (onnxruntime, no cache), for a
    chain and for a tree; fewer full-logit rows planned; full logits never beyond them."""
    from edgeinfer.runtime.offload import activation_bytes
    from edgeinfer.runtime.verify import TopRows

    spec = tiny_spec(layers=2)
    full, shards = _build(tmp_path, spec, split="matrix")
    import onnxruntime as ort

    sess = ort.InferenceSession(str(full))
    r = runner(spec, shards, max_nodes=16, full_logits_nodes=3)
    assert r.compact_logits and r.full_logits_nodes == 3 and len(r._head_parts) > 1
    rows = r._parts["head.0"].rows[1] - r._parts["head.0"].rows[0]
    assert r.plan.breakdown["activations"] == activation_bytes(spec, 16, 96, rows, full_rows=3)
    assert activation_bytes(spec, 16, 96, rows, full_rows=3) < activation_bytes(spec, 16, 96, rows)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    ref = raw_logits(sess, spec, prompt)
    top = r.forward(prompt, top_k=5)
    assert isinstance(top, TopRows) and top.ids.shape == (len(prompt), 5)
    want = np.argsort(-ref, axis=1, kind="stable")[:, :5]
    np.testing.assert_allclose(top.values, np.take_along_axis(ref, want, 1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.take_along_axis(ref, top.ids, 1), top.values, rtol=1e-4, atol=1e-4)
    r.commit(np.arange(len(prompt)))
    # a tree: node 0 and 1 children of the root, node 2 child of node 0
    tree_tokens, parents = [7, 2, 8], [-1, -1, 0]
    t = r.forward(tree_tokens, parents, top_k=5)
    for node, path in ((0, [7]), (1, [2]), (2, [7, 8])):
        row = raw_logits(sess, spec, prompt + path)[-1]
        np.testing.assert_array_equal(t.ids[node], np.argsort(-row, kind="stable")[:5])
    r.discard()
    # full logits: a chain of more rows than planned runs as several passes, a tree cannot
    whole = r.forward([5, 3, 5, 8])
    np.testing.assert_allclose(whole, raw_logits(sess, spec, prompt + [5, 3, 5, 8])[-4:], rtol=1e-4, atol=1e-4)
    r.discard()
    with pytest.raises(ValueError, match="full_logits_nodes=3"):
        r.forward([1, 2, 3, 4], [-1, 0, 0, 1])
    r.close()


def test_merge_top_keeps_the_best_and_breaks_ties_by_id():
    from edgeinfer.runtime.verify import argmax_rows, merge_top

    rng = np.random.default_rng(0)
    full = rng.normal(size=(6, 50)).astype(np.float32)
    full[0, [7, 30, 41]] = 9.0  # a three-way tie for the best: argmax takes the lowest id
    best = None
    for c0 in range(0, 50, 16):
        best = merge_top(best, full[:, c0:c0 + 16], c0, 4)
    vals, ids = best
    order = np.lexsort((np.tile(np.arange(50), (6, 1)), -full), axis=-1)[:, :4]
    np.testing.assert_array_equal(ids, order)
    np.testing.assert_array_equal(vals, np.take_along_axis(full, order, 1))
    assert ids[0, 0] == 7 == int(np.argmax(full[0]))
    from edgeinfer.runtime.verify import TopRows

    np.testing.assert_array_equal(argmax_rows(TopRows(ids, vals, 50)), np.argmax(full, axis=1))
