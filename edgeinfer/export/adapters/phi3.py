"""Phi-3 / Phi-3.5 / Phi-4-mini: fused ``qkv_proj`` and ``gate_up_proj`` (split at read
time: q, k, v rows in that order; gate rows before up rows), optional partial rotary, and a
sliding window on every layer when the config sets one. LongRoPE scaling is not supported.
GGUF files keep the fusion (``attn_qkv``, ``ffn_up`` of 2 x intermediate rows) and are not
row-permuted.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

import numpy as np

from ...errors import CheckpointError
from ...spec import ModelSpec
from .base import Adapter, Fields, TensorRef, activation, gguf_common, gguf_rope, hf_common, hf_rope


def _split_refs(spec: ModelSpec, layer: str, qkv: str | None, gate_up: str | None) -> dict[str, TensorRef]:
    out: dict[str, TensorRef] = {}
    if qkv:
        q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        for name, rows in (("q_proj", (0, q)), ("k_proj", (q, q + kv)), ("v_proj", (q + kv, q + 2 * kv))):
            out[f"{layer}attn.{name}.weight"] = TensorRef(qkv, rows=rows)
    if gate_up:
        it = spec.intermediate_size
        out[f"{layer}mlp.gate_proj.weight"] = TensorRef(gate_up, rows=(0, it))
        out[f"{layer}mlp.up_proj.weight"] = TensorRef(gate_up, rows=(it, 2 * it))
    return out


class Phi3Adapter(Adapter):
    name = "phi3"
    hf_model_types = ("phi3",)
    gguf_archs = ("phi3",)

    def spec_from_hf(self, cfg: Fields) -> ModelSpec:
        kw = hf_common(cfg, self.name, tie_default=False)
        kw["rope"] = hf_rope(cfg, kw["head_dim"])
        kw["activation"] = activation(cfg, "hidden_act", "silu")
        if cfg.has("sliding_window"):
            kw["sliding_window"] = cfg.int("sliding_window")
            kw["layer_types"] = ("sliding",) * kw["num_layers"]
        return ModelSpec(**kw)

    def hf_tensor_map(self, spec: ModelSpec, names: Collection[str]) -> dict[str, TensorRef]:
        out = super().hf_tensor_map(spec, names)
        for i in range(spec.num_layers):
            p = f"model.layers.{i}."
            out.update(_split_refs(spec, f"layers.{i}.", p + "self_attn.qkv_proj.weight",
                                   p + "mlp.gate_up_proj.weight"))
        return out

    def spec_from_gguf(self, meta: Fields, shapes: Mapping[str, tuple[int, ...]],
                       read: Callable[[str], np.ndarray]) -> ModelSpec:
        if "rope_factors_long.weight" in shapes or "rope_factors_short.weight" in shapes:
            raise CheckpointError(f"{meta.where}: LongRoPE (rope_factors_long/short) is not supported")
        kw = gguf_common(meta, "phi3", shapes)
        window = meta.int("phi3.attention.sliding_window", 0)
        if window > 0:
            kw["sliding_window"], kw["layer_types"] = window, ("sliding",) * kw["num_layers"]
        return ModelSpec(arch=self.name, rope=gguf_rope(meta, "phi3", kw["head_dim"]), **kw)

    def gguf_tensor_map(self, spec: ModelSpec, names: Collection[str] = ()) -> dict[str, TensorRef]:
        out = super().gguf_tensor_map(spec, names)
        for i in range(spec.num_layers):
            p = f"blk.{i}."
            fused_qkv = p + "attn_qkv.weight" if p + "attn_qkv.weight" in names else None
            fused_mlp = p + "ffn_up.weight" if p + "ffn_gate.weight" not in names else None
            out.update(_split_refs(spec, f"layers.{i}.", fused_qkv, fused_mlp))
        return out
