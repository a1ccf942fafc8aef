"""The architecture-neutral description of a decoder-only transformer.

Every checkpoint reader (HF folder, GGUF) goes through a per-architecture adapter that
produces a :class:`ModelSpec` plus weights under the *canonical tensor names* below. The ONNX
builder, the GGUF writer and the runtime only ever see this form, so no model names leak into
core code.

Canonical conventions (all tensors float32 NumPy arrays once loaded):

* Linear weights use the Hugging Face layout ``[out_features, in_features]``.
* Q/K projection rows are in the Hugging Face "rotate-half" (NeoX) rotary layout; readers
  undo llama.cpp's interleaving permutation for llama-family GGUF files.
* Norm weights are the *effective* multiplicative weights: Gemma's ``(1 + w)`` is folded in
  at read time, so every norm is ``x / rms(x) * weight``.
* Fused tensors (Phi-3 ``qkv_proj``, ``gate_up_proj``) are split at read time.

Canonical tensor names::

    embed_tokens.weight                 [vocab, hidden]
    layers.{i}.input_norm.weight        [hidden]
    layers.{i}.attn.q_proj.weight       [heads*head_dim, hidden]     (+ .bias if qkv_bias)
    layers.{i}.attn.k_proj.weight       [kv_heads*head_dim, hidden]  (+ .bias if qkv_bias)
    layers.{i}.attn.v_proj.weight       [kv_heads*head_dim, hidden]  (+ .bias if qkv_bias)
    layers.{i}.attn.o_proj.weight       [hidden, heads*head_dim]
    layers.{i}.attn.q_norm.weight       [head_dim]                   (if qk_norm)
    layers.{i}.attn.k_norm.weight       [head_dim]                   (if qk_norm)
    layers.{i}.post_attn_norm.weight    [hidden]                     (if sandwich_norm)
    layers.{i}.pre_mlp_norm.weight      [hidden]
    layers.{i}.post_mlp_norm.weight     [hidden]                     (if sandwich_norm)
    layers.{i}.mlp.gate_proj.weight     [intermediate, hidden]
    layers.{i}.mlp.up_proj.weight       [intermediate, hidden]
    layers.{i}.mlp.down_proj.weight     [hidden, intermediate]
    norm.weight                         [hidden]
    lm_head.weight                      [vocab, hidden]              (absent if tied)

Layer computation (pre-norm decoder)::

    h = x * embedding_scale                                   (embedding lookup)
    a = attn(norm(h, input_norm))          ; if sandwich_norm: a = norm(a, post_attn_norm)
    h = h + a
    m = mlp(norm(h, pre_mlp_norm))         ; if sandwich_norm: m = norm(m, post_mlp_norm)
    h = h + m
    logits = lm_head(norm(h, norm))        ; if final_logit_softcap: c * tanh(logits / c)

    attn: q,k,v = proj(x) (+bias); if qk_norm: per-head RMSNorm of q and k;
          rotary on q,k (rotate-half); softmax(q k^T * attn_scale + mask) v; o_proj
    mlp:  down(act(gate(x)) * up(x)),  act = silu | gelu_tanh
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import CheckpointError

Activation = Literal["silu", "gelu_tanh"]
LayerType = Literal["full", "sliding"]


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding parameters for one kind of layer."""

    theta: float
    rotary_dim: int  # == head_dim unless partial rotary
    scaling_type: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position: int = 8192  # llama3 only

    def inv_freq(self) -> "np.ndarray":  # noqa: F821 - numpy imported lazily
        """Inverse frequencies [rotary_dim // 2] float64, scaling applied."""
        import numpy as np

        d = self.rotary_dim
        inv = 1.0 / (self.theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
        if self.scaling_type == "linear":
            inv = inv / self.factor
        elif self.scaling_type == "llama3":
            low_wl = self.original_max_position / self.low_freq_factor
            high_wl = self.original_max_position / self.high_freq_factor
            wl = 2 * math.pi / inv
            smooth = (self.original_max_position / wl - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor
            )
            scaled = np.where(wl > low_wl, inv / self.factor, inv)
            mid = (wl <= low_wl) & (wl >= high_wl)
            scaled = np.where(mid, (1 - smooth) * inv / self.factor + smooth * inv, scaled)
            inv = scaled
        elif self.scaling_type != "default":
            raise CheckpointError(f"rope scaling type {self.scaling_type!r} is not supported")
        return inv


@dataclass(frozen=True)
class ModelSpec:
    """Everything the graph builder needs to know about an architecture instance."""

    arch: str  # adapter name: llama | qwen2 | qwen3 | gemma3 | phi3
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position: int
    rope: RopeSpec
    rope_local: RopeSpec | None = None  # rotary for "sliding" layers, if it differs
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    sandwich_norm: bool = False
    activation: Activation = "silu"
    embedding_scale: float = 1.0
    attn_scale: float | None = None  # None -> 1/sqrt(head_dim)
    attn_softcap: float | None = None
    final_logit_softcap: float | None = None
    layer_types: tuple[LayerType, ...] = ()  # empty -> all "full"
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise CheckpointError(f"model spec field {name!r} must be a positive int, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise CheckpointError(
                f"layer_types has {len(self.layer_types)} entries, expected num_layers={self.num_layers}")
        if "sliding" in self.layer_types and not self.sliding_window:
            raise CheckpointError("sliding layers need sliding_window > 0")

    # -- derived -------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else 1.0 / math.sqrt(self.head_dim)

    def layer_type(self, i: int) -> LayerType:
        return self.layer_types[i] if self.layer_types else "full"

    def rope_for_layer(self, i: int) -> RopeSpec:
        if self.layer_type(i) == "sliding" and self.rope_local is not None:
            return self.rope_local
        return self.rope

    @property
    def has_sliding_layers(self) -> bool:
        return "sliding" in self.layer_types

    def tensor_names(self) -> list[str]:
        """All canonical tensor names this spec requires, in a stable order."""
        names = ["embed_tokens.weight"]
        for i in range(self.num_layers):
            p = f"layers.{i}."
            names.append(p + "input_norm.weight")
            for proj in ("q_proj", "k_proj", "v_proj"):
                names.append(p + f"attn.{proj}.weight")
                if self.qkv_bias:
                    names.append(p + f"attn.{proj}.bias")
            names.append(p + "attn.o_proj.weight")
            if self.qk_norm:
                names += [p + "attn.q_norm.weight", p + "attn.k_norm.weight"]
            if self.sandwich_norm:
                names.append(p + "post_attn_norm.weight")
            names.append(p + "pre_mlp_norm.weight")
            if self.sandwich_norm:
                names.append(p + "post_mlp_norm.weight")
            names += [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight", p + "mlp.down_proj.weight"]
        names.append("norm.weight")
        if not self.tie_word_embeddings:
            names.append("lm_head.weight")
        return names

    def num_parameters(self) -> int:
        h, hd, it = self.hidden_size, self.head_dim, self.intermediate_size
        per_layer = (h * hd * (self.num_heads * 2 + self.num_kv_heads * 2) + 3 * h * it + 2 * h
                     + (hd * (self.num_heads + 2 * self.num_kv_heads) if self.qkv_bias else 0)
                     + (2 * hd if self.qk_norm else 0) + (2 * h if self.sandwich_norm else 0))
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return emb + self.num_layers * per_layer + h

    def truncated(self, num_layers: int) -> "ModelSpec":
        """The spec of this model's first ``num_layers`` layers (a self-draft)."""
        if not 0 < num_layers <= self.num_layers:
            raise CheckpointError(
                f"cannot keep {num_layers} layers of a {self.num_layers}-layer model")
        lt = self.layer_types[:num_layers] if self.layer_types else ()
        return dataclasses.replace(self, num_layers=num_layers, layer_types=lt)

    # -- (de)serialisation for the bundle manifest ----------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "spec") -> "ModelSpec":
        try:
            d = dict(d)
            d["rope"] = RopeSpec(**d["rope"])
            if d.get("rope_local") is not None:
                d["rope_local"] = RopeSpec(**d["rope_local"])
            d["layer_types"] = tuple(d.get("layer_types") or ())
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = set(d) - known
            if unknown:
                raise CheckpointError(f"{where}: unknown field(s) {sorted(unknown)}")
            return cls(**d)
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{where}: malformed model spec ({e})") from None


@dataclass(frozen=True)
class TokenizerInfo:
    """Tokenizer and chat-format data carried from a checkpoint into the bundle."""

    tokenizer_json: str  # a `tokenizers` JSON document
    chat_template: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    add_bos_token: bool = False
    generation_defaults: dict[str, Any] = field(default_factory=dict)
