"""Emit the pieces of a decoder (embedding, rotary tables, one layer, LM head) into a
:class:`~edgeinfer.export.onnx_graph.GraphBuilder`, following the layer math in
:mod:`edgeinfer.spec`. Every activation is float32 ``[1, n, features]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from onnx import NodeProto

from ..errors import CheckpointError
from ..quant.onnx_encoding import encode_embedding, encode_linear
from ..quant.recipe import QuantRecipe, WeightFormat
from ..spec import ModelSpec
from .onnx_attention import AttentionInputs, emit_core_attention
from .onnx_graph import MS_DOMAIN, GraphBuilder, node_path

GetWeight = Callable[[str], np.ndarray]


@dataclass(frozen=True)
class GraphOptions:
    """Implementation choices that do not change the graph's math (nor its contract, except
    ``kv_in_place``'s KV layout, which the graph names in its metadata).

    Measured on SmolLM2-135M, onnxruntime 1.31 CPU (process CPU ms per call, past 128):
    ``attention="gqa"`` (copying the cache) and ``fuse_gate_up=True`` were within noise
    (< 0.3 ms of ~19 ms at n=1) of the defaults, so the defaults keep the standard ops.
    ``attention="gqa"`` (com.microsoft GroupQueryAttention, rotary inside) needs
    head_dim % 16 == 0 (else the builder falls back to "onnx") and, with past = 0, nodes in a
    chain (prefill): the kernel then ignores position_ids beyond the first.

    ``kv_in_place=True`` (with ``attention="gqa"``) changes the KV half of the graph contract:
    ``present_key.{i}`` / ``present_value.{i}`` are the *whole* cache buffer, the same memory
    as ``past_key.{i}`` / ``past_value.{i}`` [1, kv_heads, capacity, head_dim] (the runtime
    binds both to one buffer), GroupQueryAttention writes the n new nodes' K/V into it at
    positions ``total - n .. total`` and attends over ``[0, total)`` only, where ``total`` is the
    width of ``attention_bias`` [1, 1, n, total]. The graph says so in its metadata
    (``bundle.KV_LAYOUT_KEY``). Measured on SmolLM2-135M (2 threads, one decode step, context 128 /
    512 / 1024): fp32 22.1 / 25.6 / 31.3 ms -> 21.0 / 22.8 / 24.6 ms, int4 affine draft 10.3 /
    14.4 / 20.8 -> 9.1 / 10.9 / 13.7 ms: the opset-23 Attention (and GQA without a shared
    buffer) copies past + new into a present tensor every step, O(context) per layer.
    """

    skip_norm: bool = True      # fuse residual Add + RMSNorm into SkipSimplifiedLayerNormalization
    fuse_qkv: bool = True       # one MatMul for q/k/v when they share a weight format
    fuse_gate_up: bool = False  # one MatMul for gate/up (+ Split)
    attention: str = "onnx"     # "onnx" (opset-23 Attention) | "gqa" (GroupQueryAttention)
    kv_in_place: bool = False   # "gqa" only: new K/V written into the bound cache buffer
    # an fp32 LM head as Gemm(transB=1) on the weight as stored [vocab, hidden]: a row slice of
    # the weight then gives a column block of the logits (a streamed head shard read in slices
    # needs no [nodes, vocab] partial product per slice: runtime/shard_graphs.HeadSplit "nk")
    gemm_head: bool = False

    def __post_init__(self) -> None:
        if self.kv_in_place and self.attention != "gqa":
            raise ValueError(f"GraphOptions: kv_in_place needs attention='gqa', not {self.attention!r}")


def required_weight(get_weight: GetWeight, name: str) -> np.ndarray:
    try:
        w = get_weight(name)
    except KeyError:
        raise CheckpointError(f"weights: tensor {name!r} is missing") from None
    return np.asarray(w, dtype=np.float32)


def emit_linear(g: GraphBuilder, get_weight: GetWeight, recipe: QuantRecipe, names: list[str],
                x: str, out: str, bias: bool = False) -> str:
    """``out = x @ W.T (+ b)`` where W stacks the weights ``names`` along the output axis."""
    fmts = {recipe.format_for(n) for n in names}
    if len(fmts) != 1:
        raise CheckpointError(f"cannot fuse {names} with different formats {sorted(f.value for f in fmts)}")
    ws = [required_weight(get_weight, n) for n in names]
    w = ws[0] if len(ws) == 1 else np.concatenate(ws, axis=0)
    b = None
    if bias:
        bs = [required_weight(get_weight, n[: -len("weight")] + "bias") for n in names]
        b = bs[0] if len(bs) == 1 else np.concatenate(bs)
    nodes, inits = encode_linear(_linear_path(names), w, b, recipe, fmts.pop(), x, out)
    g.add_initializers(inits)
    g.add_nodes(nodes)
    return out


def _linear_path(names: list[str]) -> str:
    """Node path of one linear (``/model/layers.3/attn/q_proj``) or of a fused stack of them
    (``/model/layers.3/attn/qkv_proj``, ``/model/layers.3/mlp/gate_up_proj``)."""
    if len(names) == 1:
        return node_path(names[0])
    prefix, parts = names[0].rsplit(".", 2)[0], [n.rsplit(".", 2)[1].removesuffix("_proj") for n in names]
    return node_path(prefix) + "/" + ("" if all(len(x) == 1 for x in parts) else "_").join(parts) + "_proj"


def emit_norm(g: GraphBuilder, path: str, x: str, weight: np.ndarray, eps: float,
              skip: str | None = None, opts: GraphOptions = GraphOptions()) -> tuple[str, str]:
    """RMSNorm of ``x`` (or of ``x + skip``). Returns (normed, the sum that was normalized)."""
    w = g.const(path.removeprefix("/model/").replace("/", ".") + ".weight", weight.astype(np.float32))
    if skip is not None and opts.skip_norm:
        outs = g.node("SkipSimplifiedLayerNormalization", [x, skip, w], f"{path}/SkipRMSNorm",
                      outputs=[f"{path}/output_0", "", "", f"{path}/output_3"],
                      domain=MS_DOMAIN, epsilon=float(eps))
        return outs[0], outs[3]
    if skip is not None:
        x = g.node("Add", [x, skip], f"{path}/Add")
    y = g.node("RMSNormalization", [x, w], f"{path}/RMSNorm", outputs=[f"{path}/output_0"],
               axis=-1, epsilon=float(eps), stash_type=1)[0]
    return y, x


HEAD_PATH, HEAD_IN, HEAD_OUT = "/model/lm_head", "/model/norm/output_0", "/model/lm_head/output_0"


def emit_embedding(g: GraphBuilder, spec: ModelSpec, get_weight: GetWeight, recipe: QuantRecipe,
                   ids: str, tie_head: bool = True) -> tuple[str, list[NodeProto] | None]:
    """Embedding lookup (x embedding_scale) of ``ids`` [1, n] -> [1, n, hidden].

    With ``tie_head`` and tied embeddings stored in one format, the LM head is encoded here
    too and the embedding reads the head's initializers (the table is stored once); the head's
    nodes (input ``HEAD_IN``, output ``HEAD_OUT``) are returned for :func:`emit_head`.
    """
    table = required_weight(get_weight, "embed_tokens.weight")
    fe, fh = recipe.format_for("embed_tokens.weight"), recipe.format_for("lm_head.weight")
    share = (tie_head and spec.tie_word_embeddings and fe == fh
             and (not fe.is_block_quantized or recipe.outlier == "none"))
    head_nodes = None
    if share:
        head_nodes, inits = encode_linear(HEAD_PATH, table, None, recipe, fh, HEAD_IN, HEAD_OUT)
        g.add_initializers(inits)
    out = "/model/embed_tokens/output_0"
    nodes, inits = encode_embedding("/model/embed_tokens", table, fe, ids, out, recipe=recipe,
                                    share=HEAD_PATH if share else None)
    g.add_initializers(inits)
    g.add_nodes(nodes)
    if spec.embedding_scale != 1.0:
        out = g.node("Mul", [out, g.f32(spec.embedding_scale)], "/model/embed_tokens/Mul")
    return out, head_nodes


def _heads_norm(g: GraphBuilder, p: str, x: str, heads: int, hd: int, w: np.ndarray, eps: float) -> str:
    """Per-head RMSNorm of [1, n, heads*hd] over each head's hd features."""
    x4 = g.node("Reshape", [x, g.i64([0, 0, heads, hd])], f"{p}/Reshape")
    y, _ = emit_norm(g, p, x4, w, eps)
    return g.node("Reshape", [y, g.i64([0, 0, heads * hd])], f"{p}/Reshape_1")


def emit_attention(g: GraphBuilder, spec: ModelSpec, i: int, get_weight: GetWeight,
                   recipe: QuantRecipe, x: str, io: AttentionInputs, past_k: str, past_v: str,
                   opts: GraphOptions) -> tuple[str, str, str]:
    """Self-attention of layer ``i`` on normed ``x``. Returns (out [1,n,hidden],
    present_key, present_value [1, kv_heads, n, head_dim] of the n new nodes)."""
    p, pre = f"/model/layers.{i}/attn", f"layers.{i}.attn."
    H, KV, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
    projs = [pre + f"{n}_proj.weight" for n in ("q", "k", "v")]
    if opts.fuse_qkv and len({recipe.format_for(n) for n in projs}) == 1:
        qkv = emit_linear(g, get_weight, recipe, projs, x, f"{p}/qkv_proj/output_0", spec.qkv_bias)
        if opts.attention == "gqa" and not spec.qk_norm:  # GQA takes packed QKV as its query
            q, k, v = qkv, "", ""
        else:
            q, k, v = g.node("Split", [qkv, g.i64([H * hd, KV * hd, KV * hd])], f"{p}/qkv_split",
                             outputs=3, axis=-1)
    else:
        q, k, v = (emit_linear(g, get_weight, recipe, [n], x, f"{p}/{s}_proj/output_0", spec.qkv_bias)
                   for n, s in zip(projs, "qkv"))
    if spec.qk_norm:
        q = _heads_norm(g, f"{p}/q_norm", q, H, hd, required_weight(get_weight, pre + "q_norm.weight"), spec.rms_norm_eps)
        k = _heads_norm(g, f"{p}/k_norm", k, KV, hd, required_weight(get_weight, pre + "k_norm.weight"), spec.rms_norm_eps)
    y, pk, pv = emit_core_attention(g, spec, i, opts.attention, io, q, k, v, past_k, past_v,
                                    opts.kv_in_place)
    out = emit_linear(g, get_weight, recipe, [pre + "o_proj.weight"], y, f"{p}/o_proj/output_0")
    return out, pk, pv


def emit_mlp(g: GraphBuilder, spec: ModelSpec, i: int, get_weight: GetWeight, recipe: QuantRecipe,
             x: str, opts: GraphOptions) -> str:
    p, pre = f"/model/layers.{i}/mlp", f"layers.{i}.mlp."
    names = [pre + "gate_proj.weight", pre + "up_proj.weight"]
    if opts.fuse_gate_up and len({recipe.format_for(n) for n in names}) == 1:
        gu = emit_linear(g, get_weight, recipe, names, x, f"{p}/gate_up_proj/output_0")
        gate, up = g.node("Split", [gu, g.i64([spec.intermediate_size] * 2)], f"{p}/gate_up_split",
                          outputs=2, axis=-1)
    else:
        gate = emit_linear(g, get_weight, recipe, names[:1], x, f"{p}/gate_proj/output_0")
        up = emit_linear(g, get_weight, recipe, names[1:], x, f"{p}/up_proj/output_0")
    h = g.node("Mul", [emit_mlp_activation(g, spec, p, gate), up], f"{p}/Mul")
    return emit_linear(g, get_weight, recipe, [pre + "down_proj.weight"], h, f"{p}/down_proj/output_0")


def emit_mlp_activation(g: GraphBuilder, spec: ModelSpec, p: str, gate: str) -> str:
    """The MLP's activation of its gate projection (``p``: the node name prefix)."""
    if spec.activation == "silu":
        return g.node("Mul", [gate, g.node("Sigmoid", [gate], f"{p}/act/Sigmoid")], f"{p}/act/Mul")
    if spec.activation == "gelu_tanh":
        return g.node("Gelu", [gate], f"{p}/act/Gelu", approximate="tanh")
    raise CheckpointError(f"activation {spec.activation!r} is not supported")


def emit_attention_block(g: GraphBuilder, spec: ModelSpec, i: int, get_weight: GetWeight,
                         recipe: QuantRecipe, h: str, pending: str | None, io: AttentionInputs,
                         past_k: str, past_v: str, opts: GraphOptions) -> tuple[str, str, str, str]:
    """The first half of decoder layer ``i``: the input norm of ``h + pending``, attention, the
    pre-MLP norm. Returns (x: the MLP's normed input, h: the residual stream after attention,
    present_key, present_value)."""
    p, pre, eps = f"/model/layers.{i}", f"layers.{i}.", spec.rms_norm_eps
    x, h = emit_norm(g, f"{p}/input_norm", h, required_weight(get_weight, pre + "input_norm.weight"), eps,
                     skip=pending, opts=opts)
    a, pk, pv = emit_attention(g, spec, i, get_weight, recipe, x, io, past_k, past_v, opts)
    if spec.sandwich_norm:
        a, _ = emit_norm(g, f"{p}/post_attn_norm", a, required_weight(get_weight, pre + "post_attn_norm.weight"), eps)
    x, h = emit_norm(g, f"{p}/pre_mlp_norm", h, required_weight(get_weight, pre + "pre_mlp_norm.weight"), eps,
                     skip=a, opts=opts)
    return x, h, pk, pv


def emit_mlp_output(g: GraphBuilder, spec: ModelSpec, i: int, get_weight: GetWeight, m: str) -> str:
    """The MLP branch's output as added to the residual stream (post-MLP norm if sandwiched)."""
    if spec.sandwich_norm:
        m, _ = emit_norm(g, f"/model/layers.{i}/post_mlp_norm", m,
                         required_weight(get_weight, f"layers.{i}.post_mlp_norm.weight"), spec.rms_norm_eps)
    return m


def emit_layer(g: GraphBuilder, spec: ModelSpec, i: int, get_weight: GetWeight, recipe: QuantRecipe,
               h: str, pending: str | None, io: AttentionInputs, past_k: str, past_v: str,
               opts: GraphOptions) -> tuple[str, str, str, str]:
    """One decoder layer. The residual stream is ``h + pending`` (``pending`` is the last
    branch output, not yet added, so the add can fuse into the next norm). Returns
    (h, pending, present_key, present_value)."""
    x, h, pk, pv = emit_attention_block(g, spec, i, get_weight, recipe, h, pending, io, past_k, past_v, opts)
    m = emit_mlp(g, spec, i, get_weight, recipe, x, opts)
    return h, emit_mlp_output(g, spec, i, get_weight, m), pk, pv


def emit_head(g: GraphBuilder, spec: ModelSpec, get_weight: GetWeight, recipe: QuantRecipe,
              h: str, pending: str | None, logits_index: str,
              head_nodes: list[NodeProto] | None, opts: GraphOptions) -> str:
    """Final norm + LM head on the ``logits_index`` rows. Returns logits [1, m, vocab]."""
    h = g.node("Gather", [h, logits_index], "/model/logits_index/Gather", axis=1)  # [1, m, hidden]
    if pending is not None:
        pending = g.node("Gather", [pending, logits_index], "/model/logits_index/Gather_1", axis=1)
    x, _ = emit_norm(g, "/model/norm", h, required_weight(get_weight, "norm.weight"), spec.rms_norm_eps,
                     skip=pending, opts=opts)
    fmt = recipe.format_for("lm_head.weight")
    if head_nodes is None and opts.gemm_head and fmt is WeightFormat.FP32:
        src = "embed_tokens.weight" if spec.tie_word_embeddings else "lm_head.weight"
        w = g.const("lm_head.weight", required_weight(get_weight, src))  # [vocab, hidden]
        x2 = g.node("Reshape", [x, g.i64([-1, spec.hidden_size])], "/model/lm_head/Reshape")
        y = g.node("Gemm", [x2, w], "/model/lm_head/Gemm", transB=1)  # [m, vocab]
        out = g.node("Unsqueeze", [y, g.i64([0])], "/model/lm_head/Unsqueeze")
    else:
        if head_nodes is None:
            src = "embed_tokens.weight" if spec.tie_word_embeddings else "lm_head.weight"
            head_nodes, inits = encode_linear(HEAD_PATH, required_weight(get_weight, src), None, recipe,
                                              fmt, x, HEAD_OUT)
            g.add_initializers(inits)
        g.add_nodes(head_nodes)
        out = HEAD_OUT
    if spec.final_logit_softcap:
        c = float(spec.final_logit_softcap)
        t = g.node("Tanh", [g.node("Div", [out, g.f32(c)], "/model/softcap/Div")], "/model/softcap/Tanh")
        out = g.node("Mul", [t, g.f32(c)], "/model/softcap/Mul")
    return out
