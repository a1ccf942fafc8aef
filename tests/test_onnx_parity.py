"""The tree-verify ONNX graph against transformers on tiny random checkpoints (fp32).

Independent answer: the transformers model of the same checkpoint (eager, no cache for the
reference logits). Prompts of 14 tokens cross the sliding windows (mistral 8, gemma3 4).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgeinfer.export.checkpoint import load_checkpoint
from edgeinfer.export.onnx_builder import build_model_onnx
from edgeinfer.export.onnx_layers import GraphOptions
from edgeinfer.quant.recipe import QuantRecipe
from edgeinfer.runtime.reference_decode import (append_kv, empty_kv, make_session, run_tree,
                                                tree_inputs)
from tiny_models import TINY_ARCHS, load_reference_model

RTOL = 1e-4  # max |ours - ref| / max |ref|
PROMPT = [1, 57, 112, 9, 230, 77, 14, 180, 33, 250, 5, 96, 141, 60]
# A tree after the prompt: branches 0-1-3, 0-2, 4-5-6 (flattened, topological order).
TREE_TOKENS = [40, 41, 42, 43, 44, 45, 46]
TREE_PARENTS = [-1, 0, 0, 1, -1, 4, 5]


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def chain(n: int) -> list[int]:
    return list(range(-1, n - 1))


def branch(parents: list[int], leaf: int) -> list[int]:
    path = []
    while leaf >= 0:
        path.append(leaf)
        leaf = parents[leaf]
    return path[::-1]


class Built:
    """A tiny checkpoint, its transformers model and our fp32 graph of it."""

    def __init__(self, ckpt_dir, out_dir, options: GraphOptions = GraphOptions()):
        ckpt = load_checkpoint(ckpt_dir)
        self.spec = ckpt.spec
        self.ref = load_reference_model(ckpt_dir)
        self.info = build_model_onnx(self.spec, ckpt.weights.get, QuantRecipe(),
                                     out_dir / "model.onnx", options=options)
        self.session = make_session(self.info.path)

    def ref_logits(self, ids: list[int]) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.ref(torch.tensor([ids])).logits[0].float().numpy()

    def prefill(self, ids: list[int]):
        res = run_tree(self.session, self.spec, empty_kv(self.spec), ids, chain(len(ids)), 0)
        return res, append_kv(empty_kv(self.spec), res.present)


@pytest.fixture(scope="module")
def built(tiny_checkpoint, tmp_path_factory):
    cache: dict[tuple[str, str], Built] = {}

    def get(arch: str, attention: str = "onnx") -> Built:
        if (arch, attention) not in cache:
            out = tmp_path_factory.mktemp(f"onnx_{arch}_{attention}")
            cache[arch, attention] = Built(tiny_checkpoint(arch), out, GraphOptions(attention=attention))
        return cache[arch, attention]

    return get


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_prefill_and_cached_decode_match_transformers(built, arch):
    b = built(arch)
    ids = list(PROMPT)
    res, past = b.prefill(ids)
    ref = b.ref_logits(ids)
    assert res.logits.shape == (len(ids), b.spec.vocab_size)
    assert rel_err(res.logits, ref) < RTOL
    for _ in range(5):  # cached decode steps, one token each
        ids.append(int(np.argmax(ref[-1])))
        step = run_tree(b.session, b.spec, past, [ids[-1]], [-1], len(ids) - 1)
        past = append_kv(past, step.present)
        ref = b.ref_logits(ids)
        assert rel_err(step.logits[-1], ref[-1]) < RTOL


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tree_branches_equal_chain_passes(built, arch):
    b = built(arch)
    _, past = b.prefill(PROMPT)
    p = len(PROMPT)
    tree = run_tree(b.session, b.spec, past, TREE_TOKENS, TREE_PARENTS, p)
    kv_shape = (1, b.spec.num_kv_heads, len(TREE_TOKENS), b.spec.head_dim)
    assert all(k.shape == kv_shape and v.shape == kv_shape for k, v in tree.present)
    for leaf in (3, 2, 6):
        path = branch(TREE_PARENTS, leaf)
        toks = [TREE_TOKENS[j] for j in path]
        ch = run_tree(b.session, b.spec, past, toks, chain(len(path)), p)
        np.testing.assert_allclose(tree.logits[path], ch.logits, rtol=0, atol=1e-5 * np.abs(ch.logits).max())
        for (tk, tv), (ck, cv) in zip(tree.present, ch.present):
            np.testing.assert_allclose(tk[:, :, path], ck, rtol=0, atol=1e-5)
            np.testing.assert_allclose(tv[:, :, path], cv, rtol=0, atol=1e-5)
        ref = b.ref_logits(PROMPT + toks)[p:]
        assert rel_err(tree.logits[path], ref) < RTOL


@pytest.mark.parametrize("arch", ["llama_tied", "gemma3"])
def test_logits_index_selects_rows(built, arch):
    b = built(arch)
    _, past = b.prefill(PROMPT)
    full = run_tree(b.session, b.spec, past, TREE_TOKENS, TREE_PARENTS, len(PROMPT))
    idx = [6, 0, 3, 3]
    sel = run_tree(b.session, b.spec, past, TREE_TOKENS, TREE_PARENTS, len(PROMPT), logits_index=idx)
    assert sel.logits.shape == (len(idx), b.spec.vocab_size)
    np.testing.assert_allclose(sel.logits, full.logits[idx], rtol=0, atol=1e-6 * np.abs(full.logits).max())
    for (a, _), (c, _) in zip(sel.present, full.present):  # K/V of every node regardless
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("arch", ["gemma3", "mistral"])
def test_sliding_mask_input_is_used(built, arch):
    """Feeding the full mask to the sliding layers must change the answer (the window matters)."""
    b = built(arch)
    ids = PROMPT
    pos, full, sliding = tree_inputs(b.spec, chain(len(ids)), 0)
    assert sliding is not None and not np.array_equal(full, sliding)
    feeds = {"input_ids": np.array([ids]), "position_ids": pos, "attention_bias": full,
             "attention_bias_sliding": full, "logits_index": np.arange(len(ids))}
    for i in range(b.spec.num_layers):
        feeds[f"past_key.{i}"] = feeds[f"past_value.{i}"] = np.zeros(
            (1, b.spec.num_kv_heads, 0, b.spec.head_dim), np.float32)
    wrong = b.session.run(["logits"], feeds)[0][0]
    assert rel_err(wrong, b.ref_logits(ids)) > 100 * RTOL


@pytest.mark.parametrize("arch", ["llama_tied", "gemma3", "qwen2", "qwen3"])
def test_gqa_attention_option_matches_transformers(built, arch):
    """GraphOptions(attention="gqa") (com.microsoft GroupQueryAttention) is the same model."""
    b = built(arch, "gqa")
    ops = b.info.op_counts
    assert ops.get("GroupQueryAttention") == b.spec.num_layers and "Attention" not in ops
    pre, past = b.prefill(PROMPT)
    assert rel_err(pre.logits, b.ref_logits(PROMPT)) < RTOL
    tree = run_tree(b.session, b.spec, past, TREE_TOKENS, TREE_PARENTS, len(PROMPT))
    ref_tree = built(arch).session
    exp = run_tree(ref_tree, b.spec, built(arch).prefill(PROMPT)[1], TREE_TOKENS, TREE_PARENTS, len(PROMPT))
    assert rel_err(tree.logits, exp.logits) < RTOL
    for (a, c), (x, y) in zip(tree.present, exp.present):
        np.testing.assert_allclose(a, x, rtol=0, atol=1e-5)
        np.testing.assert_allclose(c, y, rtol=0, atol=1e-5)
    for leaf in (3, 6):
        path = branch(TREE_PARENTS, leaf)
        ref = b.ref_logits(PROMPT + [TREE_TOKENS[j] for j in path])[len(PROMPT):]
        assert rel_err(tree.logits[path], ref) < RTOL


def test_gqa_falls_back_where_ort_cannot_run_it(built):
    """phi3's partial rotary (8 of 16 dims) is below GroupQueryAttention's CPU minimum."""
    b = built("phi3", "gqa")
    assert "GroupQueryAttention" not in b.info.op_counts
    assert b.info.op_counts["Attention"] == b.spec.num_layers
    assert rel_err(b.prefill(PROMPT)[0].logits, b.ref_logits(PROMPT)) < RTOL


def test_graph_contract(built):
    b = built("gemma3")
    spec, model = b.spec, onnx.load(str(b.info.path), load_external_data=False)
    assert {(o.domain or "", o.version) for o in model.opset_import} >= {("", 23)}
    ins = {v.name: v for v in model.graph.input}
    outs = [v.name for v in model.graph.output]
    assert list(b.info.inputs) == ["input_ids", "position_ids", "attention_bias",
                                   "attention_bias_sliding", "logits_index"]
    assert outs == ["logits"] + [f"present_{kv}.{i}" for i in range(spec.num_layers) for kv in ("key", "value")]
    i64, f32 = onnx.TensorProto.INT64, onnx.TensorProto.FLOAT
    assert ins["input_ids"].type.tensor_type.elem_type == i64
    assert ins["attention_bias"].type.tensor_type.elem_type == f32
    dims = [d.dim_value or d.dim_param for d in ins["past_key.2"].type.tensor_type.shape.dim]
    assert dims == [1, spec.num_kv_heads, "past", spec.head_dim]
    names = {n.name for n in model.graph.node}
    assert "/model/layers.2/attn/Attention" in names and "/model/layers.0/attn/qkv_proj/MatMul" in names
    # every large initializer lives in the one external data file beside the graph
    locs = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locs == {b.info.path.name + ".data"} and b.info.data_path.stat().st_size == b.info.data_bytes


def test_no_sliding_input_without_sliding_layers(built):
    assert "attention_bias_sliding" not in built("llama").info.inputs


def test_build_is_deterministic(tiny_checkpoint, tmp_path):
    ckpt = load_checkpoint(tiny_checkpoint("qwen2"))
    calls: list[tuple[int, int]] = []
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        build_model_onnx(ckpt.spec, ckpt.weights.get, QuantRecipe(), tmp_path / d / "model.onnx",
                         progress=lambda done, total: calls.append((done, total)))
    total = ckpt.spec.num_layers + 2
    assert calls[: total] == [(k, total) for k in range(1, total + 1)]
    for f in ("model.onnx", "model.onnx.data"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
