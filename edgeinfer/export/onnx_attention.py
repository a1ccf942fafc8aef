"""Self-attention of one decoder layer, in the graph builder's two implementations.

* ``"onnx"`` (default): the standard opset-23 ``RotaryEmbedding`` on q and k with cos/sin of
  this call's positions, then ``Attention`` with 3-D Q/K/V (grouped KV via
  ``q_num_heads``/``kv_num_heads``), the float tree mask and past_key/past_value.
* ``"gqa"``: com.microsoft ``GroupQueryAttention`` on the packed QKV, rotary inside
  (``do_rotary=1``; cos/sin tables [max_position, rot/2] computed from constants, which ORT
  folds at session creation), causal plus the tree mask as ``attention_bias``: the tree mask
  only hides keys the causal mask shows (nodes are in topological order), so the result is
  the same. With past = 0 the kernel takes positions 0..n-1 whatever position_ids says, so
  only a chain (prefill) is correct there.

Both return the n new nodes' K (after rotary) / V as [1, kv_heads, n, head_dim]; with
``kv_in_place`` ("gqa" only) GroupQueryAttention's present outputs are returned as they are: the
whole cache buffer, which the runtime binds to the same memory as the past inputs, so the kernel
writes the new K/V in place instead of copying the cache (see GraphOptions).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from ..errors import CheckpointError
from ..spec import ModelSpec, RopeSpec
from .onnx_graph import MS_DOMAIN, GraphBuilder


@dataclass
class AttentionInputs:
    """Graph values shared by all layers' attention."""

    position_ids: str                      # int64 [1, n]
    mask_full: str | None                  # float32 [1, 1, n, past + n]
    mask_sliding: str | None
    rope: dict[RopeSpec, tuple[str, str]]  # "onnx": cos, sin [1, n, rot/2]; "gqa": tables
    past_len: str | None = None            # "gqa": int64 [1] = past
    seqlens_k: str | None = None           # "gqa": int32 [1] = past + n - 1
    total_len: str | None = None           # "gqa": int32 scalar = past + n


def rope_specs(spec: ModelSpec, layers: range) -> list[RopeSpec]:
    out: list[RopeSpec] = []
    for i in layers:
        r = spec.rope_for_layer(i)
        if r.rotary_dim % 2 or r.rotary_dim > spec.head_dim:
            raise CheckpointError(f"rope: rotary_dim {r.rotary_dim} must be even and <= head_dim "
                                  f"{spec.head_dim}")
        if r not in out:
            out.append(r)
    return out


def _tag(spec: ModelSpec, r: RopeSpec) -> str:
    return "global" if r == spec.rope else "local"


def emit_attention_inputs(g: GraphBuilder, spec: ModelSpec, layers: range, impl: str,
                          position_ids: str, mask_full: str | None, mask_sliding: str | None,
                          kv_in_place: bool = False) -> AttentionInputs:
    """Rotary tables (and, for "gqa", sequence lengths) shared by ``layers``."""
    if impl not in ("onnx", "gqa"):
        raise CheckpointError(f"attention implementation {impl!r}: expected 'onnx' or 'gqa'")
    io = AttentionInputs(position_ids, mask_full, mask_sliding, {})
    if impl == "gqa":  # cos/sin tables [max_position, rot/2]: all-constant, folded by ORT
        pos = g.const("rotary.positions", np.arange(spec.max_position, dtype=np.float32)[:, None])
    else:              # cos/sin of this call's positions [1, n, rot/2]
        pos = g.node("Cast", [position_ids], "/model/rotary/Cast", to=TensorProto.FLOAT)
        pos = g.node("Unsqueeze", [pos, g.i64([-1])], "/model/rotary/Unsqueeze")  # [1, n, 1]
    for r in rope_specs(spec, layers):
        t = _tag(spec, r)
        inv = g.const(f"rotary.{t}.inv_freq", r.inv_freq().astype(np.float32))
        freqs = g.node("Mul", [pos, inv], f"/model/rotary_{t}/Mul")  # [1, n, rot/2]
        io.rope[r] = (g.node("Cos", [freqs], f"/model/rotary_{t}/Cos"),
                      g.node("Sin", [freqs], f"/model/rotary_{t}/Sin"))
    if impl == "gqa":
        mask = mask_full or mask_sliding
        total = g.node("Shape", [mask], "/model/seqlens/Shape", start=3, end=4)   # [past + n]
        n = g.node("Shape", [position_ids], "/model/seqlens/Shape_1", start=1, end=2)
        if not kv_in_place:  # the new nodes' K/V are sliced out of GQA's present from here
            io.past_len = g.node("Sub", [total, n], "/model/seqlens/Sub")
        total32 = g.node("Cast", [total], "/model/seqlens/Cast", to=TensorProto.INT32)
        io.seqlens_k = g.node("Sub", [total32, g.const("const.i32.v1", np.ones(1, np.int32))],
                              "/model/seqlens/Sub_1")
        io.total_len = g.node("Squeeze", [total32, g.i64([0])], "/model/seqlens/Squeeze")
    return io


def _to_bnsh(g: GraphBuilder, p: str, x: str, heads: int, hd: int) -> str:
    """[1, n, heads*hd] -> [1, heads, n, hd]."""
    x4 = g.node("Reshape", [x, g.i64([0, 0, heads, hd])], f"{p}/Reshape")
    return g.node("Transpose", [x4], f"{p}/Transpose", perm=[0, 2, 1, 3])


def emit_core_attention(g: GraphBuilder, spec: ModelSpec, i: int, impl: str, io: AttentionInputs,
                        q: str, k: str, v: str, past_k: str, past_v: str,
                        kv_in_place: bool = False) -> tuple[str, str, str]:
    """q [1,n,H*hd], k/v [1,n,KV*hd] (normed, not yet rotated). Returns (attention output
    [1, n, H*hd], present_key, present_value [1, KV, n, hd]; with ``kv_in_place`` the whole
    buffer [1, KV, capacity, hd])."""
    p = f"/model/layers.{i}/attn"
    H, KV, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
    rope = spec.rope_for_layer(i)
    cos, sin = io.rope[rope]
    mask = io.mask_sliding if spec.layer_type(i) == "sliding" else io.mask_full
    if mask is None:
        raise CheckpointError(f"layer {i} ({spec.layer_type(i)}) has no attention mask input")
    if impl == "gqa":
        attrs = dict(num_heads=H, kv_num_heads=KV, scale=float(spec.scale), do_rotary=1,
                     rotary_interleaved=0)
        if spec.attn_softcap:
            attrs["softcap"] = float(spec.attn_softcap)
        y, pk_all, pv_all = g.node(
            "GroupQueryAttention",
            [q, k, v, past_k, past_v, io.seqlens_k, io.total_len, cos, sin, io.position_ids, mask],
            f"{p}/GroupQueryAttention", outputs=3, domain=MS_DOMAIN, **attrs)
        if kv_in_place:
            return y, pk_all, pv_all
        big = g.i64([np.iinfo(np.int64).max])
        pk = g.node("Slice", [pk_all, io.past_len, big, g.i64([2])], f"{p}/present_key/Slice")
        pv = g.node("Slice", [pv_all, io.past_len, big, g.i64([2])], f"{p}/present_value/Slice")
        return y, pk, pv
    rot = {} if rope.rotary_dim == hd else {"rotary_embedding_dim": rope.rotary_dim}
    q = g.node("RotaryEmbedding", [q, cos, sin], f"{p}/q_rotary", num_heads=H, interleaved=0, **rot)
    k = g.node("RotaryEmbedding", [k, cos, sin], f"{p}/k_rotary", num_heads=KV, interleaved=0, **rot)
    attrs = {"q_num_heads": H, "kv_num_heads": KV, "scale": float(spec.scale)}
    if spec.attn_softcap:
        attrs["softcap"] = float(spec.attn_softcap)
    # The op's own present outputs (past + new) are declared (the spec wants past/present
    # together) but unused: the graph returns only the new nodes' K/V.
    y = g.node("Attention", [q, k, v, mask, past_k, past_v], f"{p}/Attention", outputs=3, **attrs)[0]
    return y, _to_bnsh(g, f"{p}/present_key", k, KV, hd), _to_bnsh(g, f"{p}/present_value", v, KV, hd)
