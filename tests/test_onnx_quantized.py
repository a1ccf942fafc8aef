"""Quantized graphs are wired right: each equals the fp32 graph built from the weights as the
quant library dequantizes them (its NumPy reference), on tiny random checkpoints.

Integer recipes use MatMulNBits ``accuracy_level=1`` (float32 activations): the default 4
quantizes activations to int8 inside the kernel, which no fp32 graph reproduces.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edgeinfer.export.checkpoint import load_checkpoint
from edgeinfer.export.onnx_builder import build_model_onnx
from edgeinfer.quant.recipe import QuantRecipe, WeightFormat
from edgeinfer.quant.weights import quantize_weight
from edgeinfer.runtime.reference_decode import append_kv, empty_kv, make_session, run_tree

PROMPT = [1, 57, 112, 9, 230, 77, 14, 180, 33, 250]
TREE_TOKENS, TREE_PARENTS = [40, 41, 42, 43], [-1, 0, 0, -1]

CASES = {
    # tied head + int4 embedding share one quantized table
    "llama_tied-int4": ("llama_tied", QuantRecipe(format="int4", embed_format="int4", block_size=32,
                                                    accuracy_level=1)),
    # asymmetric int8 with v_proj kept fp32 (q/k/v then cannot fuse), q/k/v biases
    "qwen2-int8-keep": ("qwen2", QuantRecipe(format="int8", symmetric=False, block_size=16,
                                             keep=("*.v_proj.weight",), accuracy_level=1)),
    # fp8 linears, fp16 embedding != head format (tied table stored twice)
    "gemma3-fp8": ("gemma3", QuantRecipe(format="fp8", embed_format="fp16", block_size=16)),
    "phi3-fp16": ("phi3", QuantRecipe(format="fp16")),
}


def dequantized(w: np.ndarray, fmt: WeightFormat, recipe: QuantRecipe) -> np.ndarray:
    if fmt.is_block_quantized:
        return quantize_weight(w, fmt, recipe).effective_weight()
    if fmt is WeightFormat.FP16:
        return w.astype(np.float16).astype(np.float32)
    return w


def reference_weights(spec, get, recipe: QuantRecipe):
    """(untied spec, canonical fp32 weights) equivalent to the quantized model."""
    w = {n: dequantized(get(n), recipe.format_for(n), recipe) for n in spec.tensor_names()}
    if spec.tie_word_embeddings:
        w["lm_head.weight"] = dequantized(get("embed_tokens.weight"),
                                          recipe.format_for("lm_head.weight"), recipe)
    return dataclasses.replace(spec, tie_word_embeddings=False), w


def run(path, spec):
    s = make_session(path)
    n = len(PROMPT)
    pre = run_tree(s, spec, empty_kv(spec), PROMPT, list(range(-1, n - 1)), 0)
    past = append_kv(empty_kv(spec), pre.present)
    tree = run_tree(s, spec, past, TREE_TOKENS, TREE_PARENTS, n)
    return pre, tree


@pytest.mark.parametrize("case", list(CASES))
def test_quantized_graph_equals_fp32_graph_of_dequantized_weights(case, tiny_checkpoint, tmp_path):
    arch, recipe = CASES[case]
    ckpt = load_checkpoint(tiny_checkpoint(arch))
    info = build_model_onnx(ckpt.spec, ckpt.weights.get, recipe, tmp_path / "q.onnx")
    ref_spec, ref_w = reference_weights(ckpt.spec, ckpt.weights.get, recipe)
    ref_info = build_model_onnx(ref_spec, ref_w.__getitem__, QuantRecipe(), tmp_path / "ref.onnx")
    assert info.data_bytes < ref_info.data_bytes or recipe.format is WeightFormat.FP8
    q_pre, q_tree = run(info.path, ckpt.spec)
    r_pre, r_tree = run(ref_info.path, ref_spec)
    for a, b in ((q_pre, r_pre), (q_tree, r_tree)):
        np.testing.assert_allclose(a.logits, b.logits, rtol=0, atol=1e-4 * np.abs(b.logits).max())
        for (ak, av), (bk, bv) in zip(a.present, b.present):
            np.testing.assert_allclose(ak, bk, rtol=0, atol=1e-4 * max(1.0, np.abs(bk).max()))
            np.testing.assert_allclose(av, bv, rtol=0, atol=1e-4 * max(1.0, np.abs(bv).max()))
    # and quantization did change the model (the test would notice a silently fp32 graph)
    f_info = build_model_onnx(ckpt.spec, ckpt.weights.get, QuantRecipe(), tmp_path / "fp32.onnx")
    f_pre, _ = run(f_info.path, ckpt.spec)
    assert np.abs(f_pre.logits - q_pre.logits).max() > 10 * np.abs(r_pre.logits - q_pre.logits).max()


def test_int4_ops_and_fusion(tiny_checkpoint, tmp_path):
    ckpt = load_checkpoint(tiny_checkpoint("llama_tied"))
    spec = ckpt.spec
    info = build_model_onnx(spec, ckpt.weights.get, QuantRecipe(format="int4", embed_format="int4"),
                            tmp_path / "m.onnx")
    # per layer: fused qkv, o, gate, up, down; plus the LM head
    assert info.op_counts["MatMulNBits"] == 5 * spec.num_layers + 1
    assert info.op_counts.get("GatherBlockQuantized") == 1 and "MatMul" not in info.op_counts
