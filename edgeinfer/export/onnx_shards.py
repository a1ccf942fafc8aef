"""Per-layer ONNX shards of the tree-verify graph, for offloading (load/unload one layer).

Each shard is its own ``.onnx`` with its own ``.onnx.data`` file:

* ``embed.onnx``: ``input_ids`` int64 [1, n] -> ``hidden_out`` float32 [1, n, hidden]
* ``layer_{i:03d}.onnx``: ``hidden_in`` [1, n, hidden], ``position_ids`` int64 [1, n], the one
  mask that layer uses (``attention_bias``, or ``attention_bias_sliding`` on sliding layers),
  ``past_key.{i}``/``past_value.{i}`` -> ``hidden_out``, ``present_key.{i}``/``present_value.{i}``
* ``head.onnx``: ``hidden_in``, ``logits_index`` int64 [m] -> ``logits`` float32 [1, m, vocab]

Feeding each shard's ``hidden_out`` to the next one's ``hidden_in`` computes exactly what the
full graph computes (same names and semantics for every other input and output). A tied
head stores its own copy of the table so that it loads independently of the embed shard.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from onnx import TensorProto

from ..quant.recipe import QuantRecipe
from ..spec import ModelSpec
from .onnx_attention import emit_attention_inputs
from .onnx_builder import (OnnxBuildInfo, add_kv_io, add_position_inputs, add_present_outputs,
                           finish, resolve_options)
from .onnx_graph import ExternalDataWriter, GraphBuilder
from .onnx_layers import GetWeight, GraphOptions, emit_embedding, emit_head, emit_layer

HIDDEN_IN, HIDDEN_OUT = "hidden_in", "hidden_out"
INT64, FLOAT = TensorProto.INT64, TensorProto.FLOAT


@dataclass(frozen=True)
class ShardInfo:
    """What :func:`build_layer_shards` wrote; ``layers[i]`` is decoder layer i."""

    embed: OnnxBuildInfo
    layers: tuple[OnnxBuildInfo, ...]
    head: OnnxBuildInfo

    def to_manifest(self, relative_to: Path) -> dict[str, Any]:
        """``{"embed": path, "layers": [paths], "head": path}``, POSIX paths relative to
        ``relative_to`` (the bundle root)."""
        def rel(p: Path) -> str:
            return Path(p).relative_to(relative_to).as_posix()

        return {"embed": rel(self.embed.path), "layers": [rel(x.path) for x in self.layers],
                "head": rel(self.head.path)}


def _shard(out_dir: Path, name: str, spec: ModelSpec, emit: Callable[[GraphBuilder], None]) -> OnnxBuildInfo:
    t0 = time.perf_counter()
    path = out_dir / f"{name}.onnx"
    data = ExternalDataWriter(path.with_name(path.name + ".data"))
    try:
        g = GraphBuilder(data)
        emit(g)
        return finish(g, data, path, f"edgeinfer_{name}", spec, t0)
    finally:
        data.close()


def build_layer_shards(spec: ModelSpec, get_weight: GetWeight, recipe: QuantRecipe, out_dir: Path,
                       progress: Callable[[int, int], None] | None = None,
                       options: GraphOptions = GraphOptions()) -> ShardInfo:
    """Write embed, per-layer and head shards into ``out_dir`` (created with its parents if
    missing). Same ``get_weight``/``recipe``/``options`` semantics as build_model_onnx."""
    if options.kv_in_place:  # the streamed runner feeds and collects K/V itself (shard contract)
        raise ValueError("build_layer_shards: kv_in_place is for whole-model graphs only")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    options = resolve_options(spec, options)
    total = spec.num_layers + 2

    def embed(g: GraphBuilder) -> None:
        ids = g.input("input_ids", INT64, [1, "n"])
        h, _ = emit_embedding(g, spec, get_weight, recipe, ids, tie_head=False)
        g.output(h, HIDDEN_OUT, FLOAT, [1, "n", spec.hidden_size])

    def layer(i: int) -> Callable[[GraphBuilder], None]:
        def emit(g: GraphBuilder) -> None:
            h = g.input(HIDDEN_IN, FLOAT, [1, "n", spec.hidden_size])
            sliding = spec.layer_type(i) == "sliding"
            pos, mf, ms = add_position_inputs(g, spec, sliding=sliding, full=not sliding)
            io = emit_attention_inputs(g, spec, range(i, i + 1), options.attention, pos, mf, ms)
            pk_in, pv_in = add_kv_io(g, spec, i)
            h, pending, pk, pv = emit_layer(g, spec, i, get_weight, recipe, h, None, io,
                                            pk_in, pv_in, options)
            h = g.node("Add", [h, pending], f"/model/layers.{i}/residual/Add")
            g.output(h, HIDDEN_OUT, FLOAT, [1, "n", spec.hidden_size])
            add_present_outputs(g, spec, i, pk, pv)
        return emit

    def head(g: GraphBuilder) -> None:
        h = g.input(HIDDEN_IN, FLOAT, [1, "n", spec.hidden_size])
        idx = g.input("logits_index", INT64, ["m"])
        logits = emit_head(g, spec, get_weight, recipe, h, None, idx, None, options)
        g.output(logits, "logits", FLOAT, [1, "m", spec.vocab_size])

    e = _shard(out_dir, "embed", spec, embed)
    if progress:
        progress(1, total)
    layers = []
    for i in range(spec.num_layers):
        layers.append(_shard(out_dir, f"layer_{i:03d}", spec, layer(i)))
        if progress:
            progress(i + 2, total)
    hd = _shard(out_dir, "head", spec, head)
    if progress:
        progress(total, total)
    return ShardInfo(embed=e, layers=tuple(layers), head=hd)
