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

``split`` cuts each decoder layer into smaller shards, run in order, so that a streaming
runner needs less memory for the weights in flight (double buffering holds two consecutive
shards):

* ``"layer"``: one shard per layer, as above;
* ``"block"``: ``layer_{i:03d}_attn`` (input norm, attention, the pre-MLP norm: outputs
  ``mlp_x_out`` and ``residual_out`` besides the presents) and ``layer_{i:03d}_mlp``
  (``mlp_x_in``, ``residual_in`` -> ``hidden_out``);
* ``"matrix"``: the attention block, then ``_gate`` (``mlp_x_in`` -> ``mlp_act_out``), ``_up``
  (``mlp_x_in``, ``mlp_act_in`` -> ``mlp_prod_out``) and ``_down`` (``mlp_prod_in``,
  ``residual_in`` -> ``hidden_out``): about one weight matrix each (gate and up stay together
  when the recipe fuses them).

A value named ``x_out`` feeds the later shards' ``x_in`` (the runner keeps a pass's values).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from onnx import TensorProto

from ..bundle import SHARD_SPLITS
from ..quant.recipe import QuantRecipe
from ..spec import ModelSpec
from .onnx_attention import emit_attention_inputs
from .onnx_builder import (OnnxBuildInfo, add_kv_io, add_position_inputs, add_present_outputs,
                           finish, resolve_options)
from .onnx_graph import ExternalDataWriter, GraphBuilder
from .onnx_layers import (GetWeight, GraphOptions, emit_attention_block, emit_embedding, emit_head, emit_layer,
                          emit_linear, emit_mlp, emit_mlp_activation, emit_mlp_output)

HIDDEN_IN, HIDDEN_OUT = "hidden_in", "hidden_out"
MLP_X, RESIDUAL = "mlp_x", "residual"  # values passed between the shards of one layer
INT64, FLOAT = TensorProto.INT64, TensorProto.FLOAT


@dataclass(frozen=True)
class ShardInfo:
    """What :func:`build_layer_shards` wrote; ``layers[i]`` are decoder layer i's shards, in
    the order they run (one with ``split="layer"``)."""

    embed: OnnxBuildInfo
    layers: tuple[tuple[OnnxBuildInfo, ...], ...]
    head: OnnxBuildInfo

    def to_manifest(self, relative_to: Path) -> dict[str, Any]:
        """``{"embed": path, "layers": [path or [paths] per layer], "head": path}``, POSIX
        paths relative to ``relative_to`` (the bundle root); a layer of one shard is a path."""
        def rel(p: Path) -> str:
            return Path(p).relative_to(relative_to).as_posix()

        layers = [rel(x[0].path) if len(x) == 1 else [rel(p.path) for p in x] for x in self.layers]
        return {"embed": rel(self.embed.path), "layers": layers, "head": rel(self.head.path)}


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
                       options: GraphOptions = GraphOptions(), split: str = "layer",
                       gemm_head: bool = True) -> ShardInfo:
    """Write embed, per-layer (or, with ``split``, per part of a layer: module docstring) and
    head shards into ``out_dir`` (created with its parents if missing). Same
    ``get_weight``/``recipe``/``options`` semantics as build_model_onnx. ``gemm_head``: an fp32
    head as Gemm on its [vocab, hidden] weight (GraphOptions.gemm_head), so that a runner
    reading it in row slices computes column blocks of the logits: measured for SmolLM2 at
    25 nodes, 4.5 MiB less per pass than partial products of the whole width."""
    if options.kv_in_place:  # the streamed runner feeds and collects K/V itself (shard contract)
        raise ValueError("build_layer_shards: kv_in_place is for whole-model graphs only")
    if split not in SHARD_SPLITS:
        raise ValueError(f"build_layer_shards: split must be one of {SHARD_SPLITS}, got {split!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    options = resolve_options(spec, options)
    total = spec.num_layers + 2

    def embed(g: GraphBuilder) -> None:
        ids = g.input("input_ids", INT64, [1, "n"])
        h, _ = emit_embedding(g, spec, get_weight, recipe, ids, tie_head=False)
        g.output(h, HIDDEN_OUT, FLOAT, [1, "n", spec.hidden_size])

    def layer_inputs(g: GraphBuilder, i: int) -> tuple[str, Any, str, str]:
        """hidden_in, the positions and mask layer i attends with, its past K/V inputs."""
        h = g.input(HIDDEN_IN, FLOAT, [1, "n", spec.hidden_size])
        sliding = spec.layer_type(i) == "sliding"
        pos, mf, ms = add_position_inputs(g, spec, sliding=sliding, full=not sliding)
        io = emit_attention_inputs(g, spec, range(i, i + 1), options.attention, pos, mf, ms)
        pk_in, pv_in = add_kv_io(g, spec, i)
        return h, io, pk_in, pv_in

    def layer(i: int) -> Callable[[GraphBuilder], None]:
        def emit(g: GraphBuilder) -> None:
            h, io, pk_in, pv_in = layer_inputs(g, i)
            h, pending, pk, pv = emit_layer(g, spec, i, get_weight, recipe, h, None, io,
                                            pk_in, pv_in, options)
            h = g.node("Add", [h, pending], f"/model/layers.{i}/residual/Add")
            g.output(h, HIDDEN_OUT, FLOAT, [1, "n", spec.hidden_size])
            add_present_outputs(g, spec, i, pk, pv)
        return emit

    def attention_block(i: int) -> Callable[[GraphBuilder], None]:
        def emit(g: GraphBuilder) -> None:
            h, io, pk_in, pv_in = layer_inputs(g, i)
            x, h, pk, pv = emit_attention_block(g, spec, i, get_weight, recipe, h, None, io, pk_in, pv_in,
                                                options)
            g.output(x, MLP_X + "_out", FLOAT, [1, "n", spec.hidden_size])
            g.output(h, RESIDUAL + "_out", FLOAT, [1, "n", spec.hidden_size])
            add_present_outputs(g, spec, i, pk, pv)
        return emit

    def finish_layer(g: GraphBuilder, i: int, m: str) -> None:
        """``hidden_out = residual_in + m`` (after the post-MLP norm of sandwich-norm models)."""
        m = emit_mlp_output(g, spec, i, get_weight, m)
        h = g.input(RESIDUAL + "_in", FLOAT, [1, "n", spec.hidden_size])
        g.output(g.node("Add", [h, m], f"/model/layers.{i}/residual/Add"), HIDDEN_OUT, FLOAT,
                 [1, "n", spec.hidden_size])

    def mlp_block(i: int) -> Callable[[GraphBuilder], None]:
        def emit(g: GraphBuilder) -> None:
            x = g.input(MLP_X + "_in", FLOAT, [1, "n", spec.hidden_size])
            finish_layer(g, i, emit_mlp(g, spec, i, get_weight, recipe, x, options))
        return emit

    def mlp_matrices(i: int) -> list[tuple[str, Callable[[GraphBuilder], None]]]:
        p, pre, wide = f"/model/layers.{i}/mlp", f"layers.{i}.mlp.", [1, "n", spec.intermediate_size]
        names = [pre + "gate_proj.weight", pre + "up_proj.weight"]
        if options.fuse_gate_up and len({recipe.format_for(n) for n in names}) == 1:
            def gate_up(g: GraphBuilder) -> None:  # one fused matrix: one shard
                x = g.input(MLP_X + "_in", FLOAT, [1, "n", spec.hidden_size])
                gu = emit_linear(g, get_weight, recipe, names, x, f"{p}/gate_up_proj/output_0")
                y, u = g.node("Split", [gu, g.i64([spec.intermediate_size] * 2)], f"{p}/gate_up_split",
                              outputs=2, axis=-1)
                g.output(g.node("Mul", [emit_mlp_activation(g, spec, p, y), u], f"{p}/Mul"),
                         "mlp_prod_out", FLOAT, wide)

            parts = [("gate_up", gate_up)]
        else:
            def gate(g: GraphBuilder) -> None:
                x = g.input(MLP_X + "_in", FLOAT, [1, "n", spec.hidden_size])
                y = emit_linear(g, get_weight, recipe, names[:1], x, f"{p}/gate_proj/output_0")
                g.output(emit_mlp_activation(g, spec, p, y), "mlp_act_out", FLOAT, wide)

            def up(g: GraphBuilder) -> None:
                x = g.input(MLP_X + "_in", FLOAT, [1, "n", spec.hidden_size])
                act = g.input("mlp_act_in", FLOAT, wide)
                y = emit_linear(g, get_weight, recipe, names[1:], x, f"{p}/up_proj/output_0")
                g.output(g.node("Mul", [act, y], f"{p}/Mul"), "mlp_prod_out", FLOAT, wide)

            parts = [("gate", gate), ("up", up)]

        def down(g: GraphBuilder) -> None:
            prod = g.input("mlp_prod_in", FLOAT, wide)
            finish_layer(g, i, emit_linear(g, get_weight, recipe, [pre + "down_proj.weight"], prod,
                                           f"{p}/down_proj/output_0"))
        return parts + [("down", down)]

    def layer_parts(i: int) -> list[tuple[str, Callable[[GraphBuilder], None]]]:
        if split == "layer":
            return [("", layer(i))]
        mlp = [("mlp", mlp_block(i))] if split == "block" else mlp_matrices(i)
        return [("attn", attention_block(i))] + mlp

    def head(g: GraphBuilder) -> None:
        h = g.input(HIDDEN_IN, FLOAT, [1, "n", spec.hidden_size])
        idx = g.input("logits_index", INT64, ["m"])
        logits = emit_head(g, spec, get_weight, recipe, h, None, idx, None,
                           dataclasses.replace(options, gemm_head=gemm_head))
        g.output(logits, "logits", FLOAT, [1, "m", spec.vocab_size])

    e = _shard(out_dir, "embed", spec, embed)
    if progress:
        progress(1, total)
    layers = []
    for i in range(spec.num_layers):
        layers.append(tuple(_shard(out_dir, f"layer_{i:03d}" + (f"_{part}" if part else ""), spec, emit)
                            for part, emit in layer_parts(i)))
        if progress:
            progress(i + 2, total)
    hd = _shard(out_dir, "head", spec, head)
    if progress:
        progress(total, total)
    return ShardInfo(embed=e, layers=tuple(layers), head=hd)
