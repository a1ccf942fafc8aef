"""Gemma 3 (text): sandwich norms, ``(1 + w)`` RMSNorm weights, gelu_tanh, embeddings scaled
by sqrt(hidden), attention scale ``query_pre_attn_scalar ** -0.5``, q/k norms, and a mix of
sliding-window layers (local rotary base, default 10000) and full layers (global base,
optionally linearly scaled).

Norms: Hugging Face stores ``w`` and computes ``x_hat * (1 + w)``; llama.cpp's converter adds
the 1 before writing the GGUF. Canonical norms are effective weights, so HF tensors get
``+1`` here and GGUF tensors are taken as stored. Q/K rows are not permuted in Gemma GGUFs.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ...errors import CheckpointError
from ...spec import ModelSpec, RopeSpec
from .base import Adapter, Fields, activation, gguf_common, gguf_rope, hf_common, hf_layer_types, hf_rope

_HF_NAMES = {
    "post_attn_norm.weight": "post_attention_layernorm.weight",
    "pre_mlp_norm.weight": "pre_feedforward_layernorm.weight",
    "post_mlp_norm.weight": "post_feedforward_layernorm.weight",
}


def _pattern_types(n_layers: int, pattern: int) -> tuple[str, ...]:
    """Every ``pattern``-th layer is full, the others slide (Gemma 3: pattern 6)."""
    return tuple("full" if (i + 1) % pattern == 0 else "sliding" for i in range(n_layers))


class Gemma3Adapter(Adapter):
    name = "gemma3"
    hf_model_types = ("gemma3_text", "gemma3")
    gguf_archs = ("gemma3",)

    def text_config(self, config: dict[str, Any], where: str) -> Fields:
        if config.get("model_type") == "gemma3" and isinstance(config.get("text_config"), dict):
            return Fields(config["text_config"], where + " (text_config)")
        return Fields(config, where)

    def hf_prefixes(self) -> tuple[str, ...]:
        # text-only checkpoints, then the two layouts of multimodal Gemma3ForConditionalGeneration
        return ("model.", "model.language_model.", "language_model.model.")

    def hf_lm_head(self, prefix: str) -> str:
        return "language_model.lm_head.weight" if prefix.startswith("language_model.") else "lm_head.weight"

    def hf_layer_name(self, canon: str) -> str:
        return _HF_NAMES.get(canon) or super().hf_layer_name(canon)

    def norm_add_hf(self) -> float:
        return 1.0

    def spec_from_hf(self, cfg: Fields) -> ModelSpec:
        kw = hf_common(cfg, self.name, tie_default=True)
        kw["head_dim"] = cfg.int("head_dim", 256)
        n = kw["num_layers"]
        types = hf_layer_types(cfg, n)
        if not types and cfg.data.get("layer_types") is None:
            pattern = cfg.int("sliding_window_pattern", cfg.data.get("_sliding_window_pattern") or 6)
            types = _pattern_types(n, pattern)
        if types and "sliding" in types:
            kw["layer_types"], kw["sliding_window"] = types, cfg.int("sliding_window", 4096)
        if cfg.get("attention_bias", False):
            raise CheckpointError(f"{cfg.where}: attention_bias=true is not supported for gemma3")
        rope = hf_rope(cfg, kw["head_dim"], "full_attention", default_theta=1_000_000.0)
        params = cfg.data.get("rope_parameters")
        if isinstance(params, Mapping) and "sliding_attention" in params:
            local = hf_rope(cfg, kw["head_dim"], "sliding_attention")
        else:
            local = RopeSpec(theta=cfg.float("rope_local_base_freq", 10000.0), rotary_dim=kw["head_dim"])
        return ModelSpec(
            rope=rope, rope_local=local, sandwich_norm=True, qk_norm=True,
            activation=activation(cfg, "hidden_activation", "gelu_pytorch_tanh"),
            embedding_scale=math.sqrt(kw["hidden_size"]),
            attn_scale=cfg.float("query_pre_attn_scalar", 256) ** -0.5,
            attn_softcap=cfg.get("attn_logit_softcapping", None),
            final_logit_softcap=cfg.get("final_logit_softcapping", None), **kw)

    def spec_from_gguf(self, meta: Fields, shapes: Mapping[str, tuple[int, ...]],
                       read: Callable[[str], np.ndarray]) -> ModelSpec:
        kw = gguf_common(meta, "gemma3", shapes)
        n, hd, a = kw["num_layers"], kw["head_dim"], "gemma3."
        window = meta.int(a + "attention.sliding_window", 0)
        if window > 0:
            pattern = meta.get(a + "attention.sliding_window_pattern", 6)
            if isinstance(pattern, (list, tuple)):  # per-layer flags, True = sliding
                if len(pattern) != n:
                    raise CheckpointError(f"{meta.where}: {a}attention.sliding_window_pattern has "
                                          f"{len(pattern)} entries, expected {n}")
                types = tuple("sliding" if p else "full" for p in pattern)
            else:
                types = _pattern_types(n, int(pattern))
            if "sliding" in types:
                kw["layer_types"], kw["sliding_window"] = types, window
        # llama.cpp's rule (after gemma_pytorch): the 27B model (62 layers) scales queries by
        # (hidden / heads) ** -0.5, every other size by head_dim ** -0.5; GGUF stores neither.
        q_scalar = kw["hidden_size"] / kw["num_heads"] if n == 62 else hd
        softcap = meta.get(a + "final_logit_softcapping", None)
        return ModelSpec(
            arch=self.name, rope=gguf_rope(meta, "gemma3", hd),
            rope_local=RopeSpec(theta=meta.float(a + "rope.freq_base_swa", 10000.0), rotary_dim=hd),
            sandwich_norm=True, qk_norm=True, activation="gelu_tanh",
            embedding_scale=math.sqrt(kw["hidden_size"]), attn_scale=q_scalar ** -0.5,
            final_logit_softcap=float(softcap) if softcap else None, **kw)
