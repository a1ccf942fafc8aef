"""Build the tree-verify ONNX graph of a :class:`~edgeinfer.spec.ModelSpec` from its weights.

Graph contract (DESIGN.md section 3, docs/TEAM_NOTES.md): inputs ``input_ids`` int64 [1, n],
``position_ids`` int64 [1, n], ``attention_bias`` float32 [1, 1, n, past+n],
``attention_bias_sliding`` (only with sliding layers), ``logits_index`` int64 [m],
``past_key.{i}`` / ``past_value.{i}`` float32 [1, kv_heads, past, head_dim]; outputs
``logits`` float32 [1, m, vocab] and ``present_key.{i}`` / ``present_value.{i}`` float32
[1, kv_heads, n, head_dim] holding only the n new nodes' K (after rotary) and V.

Ops (opset 23): ``Attention`` with a float mask, 3-D Q/K/V, grouped KV through
``q_num_heads``/``kv_num_heads`` (its own past+new present outputs are left unused);
``RotaryEmbedding`` fed cos/sin computed once per rotary spec from ``position_ids``;
``RMSNormalization``, with each residual Add fused into com.microsoft
``SkipSimplifiedLayerNormalization``; q/k/v as one MatMul; the LM head only on the
``logits_index`` rows. Linear weights and the embedding go through
:mod:`edgeinfer.quant.onnx_encoding` in the format ``recipe.format_for(name)`` picks; a tied
head shares the embedding's initializers when both use one format.

Measured (SmolLM2-135M, past 128, onnxruntime 1.31 CPU, one intra-op thread, process CPU ms
per call, n = 1 / 4 / 16): fp32 20.3 / 30.4 / 47.3 against onnxruntime-genai's own fp32
graph of the same weights 19.7 / 29.5 / 46.7; int4 (MatMulNBits, accuracy level 4) 6.4 /
10.1 / 27.0 against genai int4 6.1 / 9.9 / 26.8. GroupQueryAttention copying the cache as
``Attention`` does measured within noise of it; with ``GraphOptions.kv_in_place`` (the export
pipeline's choice for whole-model graphs) it writes into the runtime's cache instead and the
O(context) copy per step is gone (figures in GraphOptions). The builder's own default stays the
standard op and the first KV layout (what layer shards and the reference tests use).
"""
from __future__ import annotations

import dataclasses
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from onnx import TensorProto

from ..bundle import KV_IN_PLACE, KV_LAYOUT_KEY
from ..errors import EdgeInferError
from ..quant.recipe import QuantRecipe
from ..spec import ModelSpec
from .onnx_attention import emit_attention_inputs
from .onnx_graph import ExternalDataWriter, GraphBuilder, save_model
from .onnx_layers import GetWeight, GraphOptions, emit_embedding, emit_head, emit_layer

Progress = Callable[[int, int], None]
INT64, FLOAT = TensorProto.INT64, TensorProto.FLOAT


@dataclass(frozen=True)
class OnnxBuildInfo:
    """What :func:`build_model_onnx` wrote."""

    path: Path                      # the .onnx file
    data_path: Path                 # its external data file (``<name>.onnx.data``)
    inputs: tuple[str, ...]         # non-KV graph inputs, in graph order
    outputs: tuple[str, ...]        # all graph outputs, in graph order
    num_layers: int
    data_bytes: int                 # size of the external data file
    op_counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def add_position_inputs(g: GraphBuilder, spec: ModelSpec, sliding: bool, full: bool = True
                        ) -> tuple[str, str | None, str | None]:
    """Declare position_ids and the masks. Returns (position_ids, mask_full, mask_sliding)."""
    pos = g.input("position_ids", INT64, [1, "n"])
    mf = g.input("attention_bias", FLOAT, [1, 1, "n", "past_plus_n"]) if full else None
    ms = g.input("attention_bias_sliding", FLOAT, [1, 1, "n", "past_plus_n"]) if sliding else None
    return pos, mf, ms


def add_kv_io(g: GraphBuilder, spec: ModelSpec, i: int) -> tuple[str, str]:
    shape = [1, spec.num_kv_heads, "past", spec.head_dim]
    return g.input(f"past_key.{i}", FLOAT, shape), g.input(f"past_value.{i}", FLOAT, shape)


def add_present_outputs(g: GraphBuilder, spec: ModelSpec, i: int, pk: str, pv: str,
                        in_place: bool = False) -> None:
    """Declare layer i's present K/V: the n new nodes', or (``in_place``) the whole cache
    buffer, the same shape as the past input it shares memory with."""
    shape = [1, spec.num_kv_heads, "past" if in_place else "n", spec.head_dim]
    g.output(pk, f"present_key.{i}", FLOAT, shape)
    g.output(pv, f"present_value.{i}", FLOAT, shape)


def resolve_options(spec: ModelSpec, options: GraphOptions) -> GraphOptions:
    """``options`` with choices this spec cannot use replaced: GroupQueryAttention on CPU needs
    head_dim and every rotary_dim to be multiples of 16, otherwise the opset-23 Attention op
    is used."""
    dims = [spec.head_dim] + [spec.rope_for_layer(i).rotary_dim for i in range(spec.num_layers)]
    if options.attention == "gqa" and any(d % 16 for d in dims):
        return dataclasses.replace(options, attention="onnx", kv_in_place=False)
    return options


def finish(g: GraphBuilder, data: ExternalDataWriter, out_path: Path, graph_name: str,
           spec: ModelSpec, t0: float, metadata: dict[str, str] | None = None) -> OnnxBuildInfo:
    data.close()
    model = g.model(graph_name, doc=f"edgeinfer tree-verify graph, arch {spec.arch}", metadata=metadata)
    save_model(model, out_path)
    kv = ("past_key.", "past_value.")
    return OnnxBuildInfo(
        path=out_path, data_path=data.path,
        inputs=tuple(v.name for v in g.inputs if not v.name.startswith(kv)),
        outputs=tuple(v.name for v in g.outputs), num_layers=spec.num_layers,
        data_bytes=data.offset, op_counts=dict(Counter(n.op_type for n in g.nodes)),
        seconds=time.perf_counter() - t0)


def build_model_onnx(spec: ModelSpec, get_weight: GetWeight, recipe: QuantRecipe, out_path: Path,
                     progress: Progress | None = None,
                     options: GraphOptions = GraphOptions()) -> OnnxBuildInfo:
    """Write the full tree-verify graph to ``out_path`` (+ ``out_path.name + '.data'``).

    ``get_weight(canonical_name)`` returns a float32 array; it is called lazily, layer by
    layer, so the caller may stream weights from disk.
    """
    t0 = time.perf_counter()
    out_path = Path(out_path)
    if not out_path.parent.is_dir():
        raise EdgeInferError(f"{out_path.parent}: output directory does not exist")
    total = spec.num_layers + 2
    options = resolve_options(spec, options)
    data = ExternalDataWriter(out_path.with_name(out_path.name + ".data"))
    try:
        g = GraphBuilder(data)
        ids = g.input("input_ids", INT64, [1, "n"])
        pos, mask_full, mask_sliding = add_position_inputs(g, spec, spec.has_sliding_layers)
        logits_index = g.input("logits_index", INT64, ["m"])
        h, head_nodes = emit_embedding(g, spec, get_weight, recipe, ids)
        io = emit_attention_inputs(g, spec, range(spec.num_layers), options.attention, pos,
                                   mask_full, mask_sliding, options.kv_in_place)
        if progress:
            progress(1, total)
        pending, presents = None, []
        for i in range(spec.num_layers):
            pk_in, pv_in = add_kv_io(g, spec, i)
            h, pending, pk, pv = emit_layer(g, spec, i, get_weight, recipe, h, pending, io,
                                            pk_in, pv_in, options)
            presents.append((pk, pv))
            if progress:
                progress(i + 2, total)
        logits = emit_head(g, spec, get_weight, recipe, h, pending, logits_index, head_nodes, options)
        g.output(logits, "logits", FLOAT, [1, "m", spec.vocab_size])
        for i, (pk, pv) in enumerate(presents):
            add_present_outputs(g, spec, i, pk, pv, options.kv_in_place)
        meta = {KV_LAYOUT_KEY: KV_IN_PLACE} if options.kv_in_place else None
        info = finish(g, data, out_path, "edgeinfer_tree_verify", spec, t0, meta)
    finally:
        data.close()
    if progress:
        progress(total, total)
    return info
