"""Per-layer shards chained embed -> layers -> head equal the full tree-verify graph."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgeinfer.export.checkpoint import load_checkpoint
from edgeinfer.export.onnx_builder import build_model_onnx
from edgeinfer.export.onnx_layers import GraphOptions
from edgeinfer.export.onnx_shards import HIDDEN_IN, HIDDEN_OUT, build_layer_shards
from edgeinfer.quant.recipe import QuantRecipe
from edgeinfer.runtime.reference_decode import (append_kv, empty_kv, make_session, run_tree,
                                                tree_inputs)

PROMPT = [1, 57, 112, 9, 230, 77, 14, 180, 33, 250, 5]
TREE_TOKENS, TREE_PARENTS = [40, 41, 42, 43, 44, 45], [-1, 0, 0, 1, -1, 4]


def run_shards(info, spec, past, tokens, parents, past_len, logits_index):
    pos, full, sliding = tree_inputs(spec, parents, past_len)
    h = make_session(info.embed.path).run([HIDDEN_OUT], {"input_ids": np.array([tokens])})[0]
    present = []
    for i, parts in enumerate(info.layers):
        values = {HIDDEN_IN: h, "position_ids": pos, "attention_bias": full,
                  "attention_bias_sliding": sliding, f"past_key.{i}": past[i][0],
                  f"past_value.{i}": past[i][1]}
        for part in parts:  # a value named x_out feeds the later parts' x_in
            s = make_session(part.path)
            outs = [o.name for o in s.get_outputs()]
            got = s.run(outs, {x.name: values[x.name] for x in s.get_inputs()})
            values.update({n[:-4] + "_in" if n.endswith("_out") else n: v for n, v in zip(outs, got)})
        h = values[HIDDEN_IN]
        present.append((values[f"present_key.{i}"], values[f"present_value.{i}"]))
    logits = make_session(info.head.path).run(
        ["logits"], {HIDDEN_IN: h, "logits_index": np.asarray(logits_index, dtype=np.int64)})[0]
    return logits[0], present


@pytest.mark.parametrize("arch,attention,split", [
    ("llama_tied", "onnx", "layer"), ("gemma3", "onnx", "layer"), ("qwen2", "onnx", "layer"),
    ("gemma3", "gqa", "layer"), ("llama_tied", "onnx", "block"), ("gemma3", "onnx", "matrix"),
    ("qwen2", "gqa", "matrix"), ("llama_tied", "fused", "matrix")])
def test_chained_shards_equal_full_graph(arch, attention, split, tiny_checkpoint, tmp_path):
    """Every split (one shard per layer, attention + MLP, one per weight matrix; gemma3 has
    sandwich norms and sliding layers, "fused" fuses gate/up) computes the full graph."""
    ckpt = load_checkpoint(tiny_checkpoint(arch))
    spec = ckpt.spec
    opts = GraphOptions(fuse_gate_up=True) if attention == "fused" else GraphOptions(attention=attention)
    full = build_model_onnx(spec, ckpt.weights.get, QuantRecipe(), tmp_path / "model.onnx", options=opts)
    calls = []
    info = build_layer_shards(spec, ckpt.weights.get, QuantRecipe(), tmp_path / "layers",
                              progress=lambda d, t: calls.append((d, t)), options=opts, split=split)
    assert calls[-1] == (spec.num_layers + 2, spec.num_layers + 2) and len(info.layers) == spec.num_layers
    per_layer = {"layer": 1, "block": 2, "matrix": 3 if attention == "fused" else 4}[split]
    assert {len(parts) for parts in info.layers} == {per_layer}
    s = make_session(full.path)
    pre = run_tree(s, spec, empty_kv(spec), PROMPT, list(range(-1, len(PROMPT) - 1)), 0)
    past = append_kv(empty_kv(spec), pre.present)
    idx = [5, 3, 0, 2]
    exp = run_tree(s, spec, past, TREE_TOKENS, TREE_PARENTS, len(PROMPT), logits_index=idx)
    logits, present = run_shards(info, spec, past, TREE_TOKENS, TREE_PARENTS, len(PROMPT), idx)
    # the full graph fuses each residual Add into the next norm; a shard ends with the Add,
    # so the two round differently by an ulp or so
    np.testing.assert_allclose(logits, exp.logits, rtol=0, atol=1e-5 * np.abs(exp.logits).max())
    for (k, v), (ek, ev) in zip(present, exp.present):
        np.testing.assert_allclose(k, ek, rtol=0, atol=1e-5 * max(1.0, np.abs(ek).max()))
        np.testing.assert_allclose(v, ev, rtol=0, atol=1e-5 * max(1.0, np.abs(ev).max()))


def test_shards_are_independent_files(tiny_checkpoint, tmp_path):
    ckpt = load_checkpoint(tiny_checkpoint("gemma3"))
    spec = ckpt.spec
    info = build_layer_shards(spec, ckpt.weights.get, QuantRecipe(format="int4", accuracy_level=1),
                              tmp_path / "target" / "layers")
    man = info.to_manifest(relative_to=tmp_path)
    assert man == {"embed": "target/layers/embed.onnx", "head": "target/layers/head.onnx",
                   "layers": [f"target/layers/layer_{i:03d}.onnx" for i in range(spec.num_layers)]}
    for i, (shard,) in enumerate(info.layers):
        m = onnx.load(str(shard.path), load_external_data=False)
        locs = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
        assert locs == {shard.path.name + ".data"}
        want = "attention_bias_sliding" if spec.layer_type(i) == "sliding" else "attention_bias"
        assert set(shard.inputs) == {HIDDEN_IN, "position_ids", want}
        assert shard.outputs == (HIDDEN_OUT, f"present_key.{i}", f"present_value.{i}")
    # the tied head carries its own table: it loads without the embed shard
    (tmp_path / "target" / "layers" / "embed.onnx.data").unlink()
    make_session(info.head.path)
