"""Llama family: Llama 2/3 (incl. llama3 rope scaling), SmolLM/SmolLM2, Mistral.

GGUF specifics: llama.cpp's converter permutes the rows of ``attn_q`` / ``attn_k`` (and their
biases) per head so that rotary pairs are interleaved (its "normal" rope); we undo that so
Q/K come back in Hugging Face rotate-half order. Llama 3 rope scaling is stored as a
``rope_freqs.weight`` tensor of per-frequency divisors rather than as metadata; we recover
the llama3 parameters from it and check they reproduce it exactly.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

from ...errors import CheckpointError
from ...spec import ModelSpec, RopeSpec
from .base import Adapter, Fields, activation, gguf_common, gguf_rope, hf_common, hf_rope


class LlamaAdapter(Adapter):
    name = "llama"
    hf_model_types = ("llama", "mistral")
    gguf_archs = ("llama", "mistral")

    def spec_from_hf(self, cfg: Fields) -> ModelSpec:
        kw = hf_common(cfg, self.name, tie_default=False)
        if cfg.get("attention_bias", False) or cfg.get("mlp_bias", False):
            raise CheckpointError(f"{cfg.where}: attention_bias / mlp_bias (biases on o_proj or "
                                  "the MLP) are not supported for llama")
        kw["rope"] = hf_rope(cfg, kw["head_dim"])
        kw["activation"] = activation(cfg, "hidden_act", "silu")
        # Mistral (not Llama) applies its sliding window on every layer when one is set.
        if cfg.get("model_type", "") == "mistral" and cfg.has("sliding_window"):
            kw["sliding_window"] = cfg.int("sliding_window")
            kw["layer_types"] = ("sliding",) * kw["num_layers"]
        return ModelSpec(**kw)

    def spec_from_gguf(self, meta: Fields, shapes: Mapping[str, tuple[int, ...]],
                       read: Callable[[str], np.ndarray]) -> ModelSpec:
        arch = meta.get("general.architecture")
        kw = gguf_common(meta, arch, shapes)
        rope = gguf_rope(meta, arch, kw["head_dim"])
        if "rope_freqs.weight" in shapes:
            orig = meta.int(f"{arch}.rope.scaling.original_context_length", 8192)
            rope = llama3_rope_from_freqs(read("rope_freqs.weight"), rope, orig, meta.where)
        return ModelSpec(arch=self.name, rope=rope, qkv_bias="blk.0.attn_q.bias" in shapes, **kw)

    def gguf_unpermute(self, spec: ModelSpec, canon: str) -> int | None:
        if canon.startswith("attn.q_proj."):
            return spec.num_heads
        if canon.startswith("attn.k_proj."):
            return spec.num_kv_heads
        return None


def llama3_rope_from_freqs(freqs: np.ndarray, base: RopeSpec, original_max_position: int,
                           where: str) -> RopeSpec:
    """Recover llama3 rope scaling from llama.cpp's ``rope_freqs`` (per-frequency divisors:
    1 for high frequencies, ``factor`` for low ones, a smooth blend between)."""
    ff = np.asarray(freqs, dtype=np.float64).reshape(-1)
    inv = RopeSpec(theta=base.theta, rotary_dim=base.rotary_dim).inv_freq()
    if ff.shape != inv.shape:
        raise CheckpointError(f"{where}: rope_freqs has {ff.size} entries, expected {inv.size}")
    factor = float(ff.max())
    if factor <= 1.0 + 1e-6:
        return base
    x = original_max_position * inv / (2 * math.pi)  # original_max_position / wavelength
    mid = (ff > 1 + 1e-4) & (ff < factor * (1 - 1e-4))
    low, high = 1.0, 4.0
    if mid.sum() >= 2:
        s = (1 / ff[mid] - 1 / factor) / (1 - 1 / factor)  # smooth = (x - low) / (high - low)
        a, b = np.polyfit(x[mid], s, 1)
        low, high = -b / a, -b / a + 1 / a
    if low > 0 and abs(original_max_position / low - round(original_max_position / low)) < 1e-3:
        # (context, low, high) and (context / low, 1, high / low) describe the same scaling;
        # prefer low = 1 (what configs use), e.g. (8192, 1, 4) for Llama 3.1.
        original_max_position, high, low = round(original_max_position / low), high / low, 1.0
    rope = RopeSpec(theta=base.theta, rotary_dim=base.rotary_dim, scaling_type="llama3",
                    factor=factor, low_freq_factor=float(low), high_freq_factor=round(float(high), 4),
                    original_max_position=int(original_max_position))
    if not np.allclose(rope.inv_freq(), inv / ff, rtol=1e-4, atol=0):
        raise CheckpointError(f"{where}: rope_freqs.weight does not match llama3 rope scaling "
                              f"(factor {factor}, original context {original_max_position})")
    return rope
