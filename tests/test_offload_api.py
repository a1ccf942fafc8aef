"""edgeinfer.load(memory_budget=...) streams the target from the bundle's shards and still
decodes exactly like the in-memory target; a budget too small fails before loading."""
from __future__ import annotations

import numpy as np
import pytest

import edgeinfer
from edgeinfer.errors import BundleError, ConfigError, MemoryBudgetError
from edgeinfer.export.pipeline import DraftFromTarget, ExportConfig, export_bundle
from edgeinfer.runtime.streaming import StreamingRunner


@pytest.fixture(scope="module")
def sharded(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("off") / "b"
    export_bundle(ExportConfig(out=out, target=tiny_checkpoint("llama"), shards=True,
                               draft_from_target=DraftFromTarget.parse("int8")))
    return out


def test_streamed_target_matches_in_memory(sharded):
    ref = edgeinfer.load(sharded).generate("the quick brown fox", max_new_tokens=10, mode="plain")
    eng = edgeinfer.load(sharded, memory_budget="2GB")
    assert isinstance(eng.target, StreamingRunner)
    for mode, drafter in (("plain", None), ("tree", "model"), ("tree", "recycle")):
        r = eng.generate("the quick brown fox", max_new_tokens=10, mode=mode, drafter=drafter)
        assert r.tokens == ref.tokens, (mode, drafter)
    rep = eng.target.memory_report()
    assert rep["planned_peak"] <= rep["budget"]


def test_budget_errors(sharded, tiny_checkpoint, tmp_path):
    with pytest.raises(MemoryBudgetError, match="too small"):
        edgeinfer.load(sharded, memory_budget="1MB")
    with pytest.raises(ConfigError, match="memory_budget"):
        edgeinfer.load(sharded, memory_budget="lots")
    plain = tmp_path / "noshards"
    export_bundle(ExportConfig(out=plain, target=tiny_checkpoint("llama")))
    with pytest.raises(BundleError, match="--shards"):
        edgeinfer.load(plain, memory_budget="1GB")


def test_streamed_engine_defaults_and_resident_draft_settings(sharded):
    """A streamed engine: trees as large as its planned pass, the cost-aware policy under the
    default (auto) fallback, and a draft session without onnxruntime's arena."""
    from edgeinfer.runtime.policy import CostAwarePolicy, make_policy

    eng = edgeinfer.load(sharded, memory_budget="2GB", offload_tree_nodes=20, threads=2)
    # drafting happens between the streamed target's passes: the draft gets the target's threads
    assert eng.runners["draft"].session.get_session_options().intra_op_num_threads == 2
    assert (eng.defaults.tree.max_nodes, eng.defaults.tree.max_depth) == (20, 10)
    assert eng.target.max_nodes == 21
    assert isinstance(make_policy(eng.defaults, eng.target, eng.drafters["model"]), CostAwarePolicy)
    assert eng.runners["draft"].session.get_session_options().enable_cpu_mem_arena is False
    resident = edgeinfer.load(sharded)
    assert resident.runners["draft"].session.get_session_options().enable_cpu_mem_arena is True
    # not given: 24-node trees beside a draft model, 64 for the training-free drafters alone
    from edgeinfer.runtime.memory import current_usage

    budget = current_usage() + 2**30  # above what this test process already holds
    assert edgeinfer.load(sharded, memory_budget=budget).defaults.tree.max_nodes == 24
    free = edgeinfer.load(sharded, memory_budget=budget, drafters=("recycle", "ngram"))
    assert (free.defaults.tree.max_nodes, free.target.max_nodes) == (64, 65)
    r = eng.generate("the quick brown fox", max_new_tokens=12, mode="tree", drafter="model")
    assert r.stats.verifications > 0
    pol = make_policy(eng.defaults, eng.target, eng.drafters["model"])
    pol.refresh()  # the passes just measured feed the policy's costs
    assert pol.verify_s is not None and pol.verify_s > 0 and pol.draft_step_s > 0


def test_export_splits_layers_into_matrix_shards_by_default(sharded, tiny_checkpoint, tmp_path):
    """The default --shards layout: four shards a layer (attention, gate, up, down), listed per
    layer in the manifest; a bundle of one shard per layer streams the same tokens."""
    from edgeinfer.bundle import load_manifest

    layers = load_manifest(sharded).models["target"].shards["layers"]
    assert all(isinstance(p, list) and [q.rsplit("_", 1)[1] for q in p] ==
               ["attn.onnx", "gate.onnx", "up.onnx", "down.onnx"] for p in layers)
    whole = tmp_path / "whole"
    export_bundle(ExportConfig(out=whole, target=tiny_checkpoint("llama"), shards=True, shard_split="layer",
                               draft_from_target=DraftFromTarget.parse("int8")))
    assert all(isinstance(p, str) for p in load_manifest(whole).models["target"].shards["layers"])
    a = edgeinfer.load(sharded, memory_budget="2GB").generate("the quick brown fox", max_new_tokens=8, mode="plain")
    b = edgeinfer.load(whole, memory_budget="2GB").generate("the quick brown fox", max_new_tokens=8, mode="plain")
    assert a.tokens == b.tokens
    with pytest.raises(ConfigError, match="shard_split"):
        ExportConfig(out=tmp_path / "x", shards=True, shard_split="rows")


def test_manifest_shard_layers_must_be_paths(tmp_path):
    from edgeinfer.runtime.streaming import ShardPaths

    for bad in ({"embed": "e", "head": "h", "layers": [[]]}, {"embed": "e", "head": "h", "layers": [3]},
                {"embed": "e", "layers": ["a"]}):
        with pytest.raises(BundleError, match="'layers'"):
            ShardPaths.from_manifest(tmp_path, bad)
    ok = ShardPaths.from_manifest(tmp_path, {"embed": "e", "head": "h", "layers": ["a", ["b", "c"]]})
    assert ok.layers == ((tmp_path / "a",), (tmp_path / "b", tmp_path / "c"))
    assert ok.layer_files == (tmp_path / "a", tmp_path / "b", tmp_path / "c")


def test_cli_run_with_a_memory_budget_prints_the_plan(sharded, capsys):
    """`edgeinfer run --memory-budget ... --stats`: the plan, what stays resident (in layers
    and parts), the per-pass I/O split; the tokens are the in-memory target's."""
    import json

    from edgeinfer.cli import main

    ref = edgeinfer.load(sharded).generate("the quick brown fox", max_new_tokens=6, mode="plain")
    assert main(["run", str(sharded), "the quick brown fox", "--memory-budget", "2GB", "--max-new-tokens", "6",
                 "--mode", "plain", "--stats"]) == 0
    err = capsys.readouterr().err
    assert "memory budget 1907 MiB" in err and "resident: embed, layers 0-" in err and "per pass" in err
    assert main(["run", str(sharded), "the quick brown fox", "--raw", "--memory-budget", "2GB",
                 "--max-new-tokens", "6", "--mode", "plain", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == list(ref.tokens)


def test_inspect_names_the_shard_layout(sharded, capsys):
    import json

    from edgeinfer.cli import main

    assert main(["inspect", str(sharded), "--json"]) == 0
    target = next(m for m in json.loads(capsys.readouterr().out)["models"] if m["role"] == "target")
    layers = [k for k in target["files"] if k.startswith("target/layers/layer_") and k.endswith(".onnx.data")]
    assert target["shards"] == {"layers": 2, "shards_per_layer": 4,
                                "largest_shard_bytes": max(target["files"][k] for k in layers)}
    assert main(["inspect", str(sharded)]) == 0
    out = capsys.readouterr().out
    assert "shards for offloading: 2 layers x 4 shard(s)" in out and "target/layers/ (" in out
    assert "layer_000_gate.onnx" not in out  # shard files summed up in one line


def test_streaming_needs_no_onnx_package(sharded):
    """The export writes the rewritten shard graphs (stream index), so a streamed engine loads
    and decodes with onnxruntime alone: importing onnx would hold ~11 MiB of the budget."""
    import json
    import subprocess
    import sys

    shards = json.loads((sharded / "manifest.json").read_text())["models"]["target"]["shards"]
    assert (sharded / shards["stream_index"]).is_file()
    code = (f"import sys, edgeinfer; e = edgeinfer.load({str(sharded)!r}, memory_budget='2GB'); "
            "r = e.generate('the quick brown fox', max_new_tokens=6, mode='tree', drafter='model'); "
            "print(len(r.tokens), 'onnx' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["6", "False"]


def test_streamed_engine_without_a_draft_model_merges_recycling_and_prompt_lookup(tiny_checkpoint, tmp_path):
    """No draft model to keep resident: the streamed engine's trees come from Token Recycling and
    prompt lookup merged into one tree, and decode exactly like the in-memory target."""
    out = tmp_path / "nodraft"
    export_bundle(ExportConfig(out=out, target=tiny_checkpoint("llama"), shards=True))
    prompt = "the quick brown fox jumps over the lazy dog. the quick brown fox jumps"
    ref = edgeinfer.load(out).generate(prompt, max_new_tokens=24, mode="plain")
    eng = edgeinfer.load(out, memory_budget="2GB")
    assert eng.default_drafters == ("recycle", "ngram")
    r = eng.generate(prompt, max_new_tokens=24, mode="tree")
    assert r.tokens == ref.tokens
    assert r.stats.verifications > 0 and r.stats.mode == "tree"


def test_streamed_greedy_passes_are_compact_and_sampling_trees_fit_full_logits(sharded):
    """Greedy steps on a streamed target ask for each row's top-k only (verify.TopRows) and
    decode the in-memory target's tokens; sampling and the lossy rollback read full logits,
    so their trees stay within offload_sampling_nodes."""
    from edgeinfer.runtime.verify import TopRows

    prompt = "the quick brown fox"
    ref = edgeinfer.load(sharded).generate(prompt, max_new_tokens=16, mode="plain")
    from edgeinfer.runtime.memory import current_usage

    eng = edgeinfer.load(sharded, memory_budget=current_usage() + 2**30, offload_tree_nodes=20,
                         offload_sampling_nodes=3)
    assert eng.target.compact_logits and eng.target.full_logits_nodes == 4
    seen: list = []
    forward = eng.target.forward

    def spy(*a, **kw):
        out = forward(*a, **kw)
        seen.append(out)
        return out

    eng.target.forward = spy
    for drafter in ("model", "recycle", None):
        seen.clear()
        r = eng.generate(prompt, max_new_tokens=16, mode="plain" if drafter is None else "tree", drafter=drafter)
        assert r.tokens == ref.tokens, drafter
        assert seen and all(isinstance(o, TopRows) for o in seen), drafter
    for kw in ({"temperature": 0.8, "seed": 3}, {"lossy_rollback": True, "rollback_threshold": 2.0}):
        seen.clear()
        r = eng.generate(prompt, max_new_tokens=16, mode="tree", drafter="model", ignore_eos=True, **kw)
        assert len(r.tokens) == 16 and r.stats.verifications > 0
        assert all(isinstance(o, np.ndarray) for o in seen)
        assert max(e.tokens for e in r.stats.trace if e.phase == "verify") <= 4, kw
