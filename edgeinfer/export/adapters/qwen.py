"""Qwen2 / Qwen2.5 (biases on q/k/v) and Qwen3 (per-head q_norm / k_norm, explicit head_dim).

llama.cpp does not permute Q/K rows for these (they use NeoX rotary), so GGUF tensors map
one to one.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from ...errors import CheckpointError
from ...spec import ModelSpec
from .base import Adapter, Fields, activation, gguf_common, gguf_rope, hf_common, hf_layer_types, hf_rope


def _qwen_sliding(cfg: Fields, kw: dict) -> None:
    """Qwen's sliding window: explicit ``layer_types``, or the older ``use_sliding_window`` +
    ``max_window_layers`` pair (layers from ``max_window_layers`` on slide)."""
    window = cfg.get("sliding_window", None) if cfg.get("use_sliding_window", False) else None
    types = hf_layer_types(cfg, kw["num_layers"])
    if not types and window:
        first = cfg.int("max_window_layers", kw["num_layers"])
        types = tuple("sliding" if i >= first else "full" for i in range(kw["num_layers"]))
        types = types if "sliding" in types else ()
    if types:
        if not window:
            raise CheckpointError(f"{cfg.where}: layer_types has sliding layers but "
                                  "use_sliding_window/sliding_window do not set a window")
        kw["layer_types"], kw["sliding_window"] = types, int(window)


class Qwen2Adapter(Adapter):
    name = "qwen2"
    hf_model_types = ("qwen2",)
    gguf_archs = ("qwen2",)
    qk_norm = False

    def spec_from_hf(self, cfg: Fields) -> ModelSpec:
        kw = hf_common(cfg, self.name, tie_default=False)
        if self.qk_norm:  # Qwen3: the bias flag covers o_proj too, which the spec cannot hold
            if cfg.get("attention_bias", False):
                raise CheckpointError(f"{cfg.where}: attention_bias=true (o_proj bias) is not supported")
            kw["head_dim"] = cfg.int("head_dim", 128)
        kw["qkv_bias"] = not self.qk_norm  # Qwen2 always has q/k/v biases
        kw["qk_norm"] = self.qk_norm
        kw["rope"] = hf_rope(cfg, kw["head_dim"])
        kw["activation"] = activation(cfg, "hidden_act", "silu")
        _qwen_sliding(cfg, kw)
        return ModelSpec(**kw)

    def spec_from_gguf(self, meta: Fields, shapes: Mapping[str, tuple[int, ...]],
                       read: Callable[[str], np.ndarray]) -> ModelSpec:
        arch = meta.get("general.architecture")
        kw = gguf_common(meta, arch, shapes)
        return ModelSpec(arch=self.name, rope=gguf_rope(meta, arch, kw["head_dim"]),
                         qkv_bias="blk.0.attn_q.bias" in shapes, qk_norm=self.qk_norm, **kw)


class Qwen3Adapter(Qwen2Adapter):
    name = "qwen3"
    hf_model_types = ("qwen3",)
    gguf_archs = ("qwen3",)
    qk_norm = True
