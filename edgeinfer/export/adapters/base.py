"""Shared pieces of the per-architecture adapters.

An adapter turns one checkpoint format's description of a model (a Hugging Face
``config.json`` or a GGUF file's metadata) into a :class:`~edgeinfer.spec.ModelSpec`, and
maps the file's tensor names onto the canonical names of ``edgeinfer.spec`` through
:class:`TensorRef` recipes (row split, rotary un-permutation, Gemma's ``1 + w``). The readers
own the files; adapters only see dictionaries, tensor names and shapes.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ...errors import CheckpointError
from ...spec import ModelSpec, RopeSpec

_MISSING = object()


@dataclass(frozen=True)
class TensorRef:
    """How one canonical tensor is produced from one tensor stored in the file.

    Applied in this order: keep rows ``[rows[0], rows[1])`` of a fused tensor (Phi-3
    ``qkv_proj`` / ``gate_up_proj``), undo llama.cpp's rotary row interleaving for
    ``unpermute_heads`` heads, then add ``add`` to every element (Gemma norms).
    """

    source: str
    rows: tuple[int, int] | None = None
    unpermute_heads: int | None = None
    add: float = 0.0

    def out_shape(self, src_shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.rows is None:
            return tuple(src_shape)
        return (self.rows[1] - self.rows[0], *src_shape[1:])

    def finish(self, arr: np.ndarray) -> np.ndarray:
        """``arr``: the source tensor float32, rows already selected. Returns float32."""
        if self.unpermute_heads:
            n = self.unpermute_heads
            # llama.cpp stores each head's rows as (d/2, 2) pairs; HF keeps (2, d/2) halves.
            arr = arr.reshape(n, -1, 2, *arr.shape[1:]).swapaxes(1, 2).reshape(arr.shape)
        if self.add:
            arr = arr + np.float32(self.add)
        return np.ascontiguousarray(arr, dtype=np.float32)


class Fields:
    """Typed access to a config dict or GGUF metadata; errors name the source and the key."""

    def __init__(self, data: Mapping[str, Any], where: str):
        self.data = data
        self.where = where

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def get(self, key: str, default: Any = _MISSING) -> Any:
        v = self.data.get(key)
        if v is None:
            if default is _MISSING:
                raise CheckpointError(f"{self.where}: required field {key!r} is missing")
            return default
        return v

    def int(self, key: str, default: Any = _MISSING) -> int:
        v = self.get(key, default)
        if isinstance(v, (list, tuple)):  # GGUF per-layer arrays: accept only if uniform
            if not v or any(x != v[0] for x in v):
                raise CheckpointError(
                    f"{self.where}: field {key!r} varies per layer ({list(v)[:8]}...), "
                    "which is not supported")
            v = v[0]
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise CheckpointError(f"{self.where}: field {key!r} must be an integer, got {v!r}")
        return int(v)

    def float(self, key: str, default: Any = _MISSING) -> float:
        v = self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise CheckpointError(f"{self.where}: field {key!r} must be a number, got {v!r}")
        return float(v)

    def bool(self, key: str, default: Any = _MISSING) -> bool:
        v = self.get(key, default)
        if not isinstance(v, (bool, np.bool_)):
            raise CheckpointError(f"{self.where}: field {key!r} must be true/false, got {v!r}")
        return bool(v)


_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


def activation(cfg: Fields, key: str, default: str) -> str:
    name = cfg.get(key, default)
    if name not in _ACTIVATIONS:
        raise CheckpointError(
            f"{cfg.where}: {key}={name!r} is not supported, expected one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def rope_from_params(p: Mapping[str, Any], theta: float, rotary_dim: int, where: str) -> RopeSpec:
    """RopeSpec from an HF ``rope_scaling`` / ``rope_parameters`` dict (``p`` may be empty)."""
    kind = p.get("rope_type", p.get("type", "default")) or "default"
    theta = float(p.get("rope_theta", theta))
    if kind == "default":
        return RopeSpec(theta=theta, rotary_dim=rotary_dim)
    if kind == "linear":
        return RopeSpec(theta=theta, rotary_dim=rotary_dim, scaling_type="linear",
                        factor=float(p["factor"]))
    if kind == "llama3":
        return RopeSpec(theta=theta, rotary_dim=rotary_dim, scaling_type="llama3",
                        factor=float(p["factor"]),
                        low_freq_factor=float(p.get("low_freq_factor", 1.0)),
                        high_freq_factor=float(p.get("high_freq_factor", 4.0)),
                        original_max_position=int(p.get("original_max_position_embeddings", 8192)))
    raise CheckpointError(
        f"{where}: rope scaling type {kind!r} is not supported (supported: default, linear, llama3)")


def hf_rope(cfg: Fields, head_dim: int, layer_kind: str | None = None,
            default_theta: float = 10000.0) -> RopeSpec:
    """Rotary settings of an HF config, old style (``rope_theta`` + ``rope_scaling``) or
    transformers-5 style (``rope_parameters``, optionally keyed by layer kind)."""
    params = cfg.data.get("rope_parameters")
    if isinstance(params, Mapping) and layer_kind and layer_kind in params:
        params = params[layer_kind]
    if not isinstance(params, Mapping):
        params = dict(cfg.data.get("rope_scaling") or {})
    partial = float(params.get("partial_rotary_factor", cfg.data.get("partial_rotary_factor") or 1.0))
    theta = cfg.float("rope_theta", default_theta)
    return rope_from_params(params, theta, int(head_dim * partial), cfg.where)


_LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}


def hf_layer_types(cfg: Fields, num_layers: int) -> tuple[str, ...]:
    raw = cfg.data.get("layer_types")
    if raw is None:
        return ()
    if any(t not in _LAYER_TYPES for t in raw):
        bad = sorted({t for t in raw if t not in _LAYER_TYPES})
        raise CheckpointError(f"{cfg.where}: layer_types {bad} are not supported "
                              f"(supported: {sorted(_LAYER_TYPES)})")
    types = tuple(_LAYER_TYPES[t] for t in raw)
    return types if "sliding" in types else ()


def hf_common(cfg: Fields, arch: str, tie_default: bool) -> dict[str, Any]:
    """ModelSpec fields every llama-like HF config spells the same way."""
    heads = cfg.int("num_attention_heads")
    hidden = cfg.int("hidden_size")
    return dict(
        arch=arch, vocab_size=cfg.int("vocab_size"), hidden_size=hidden,
        intermediate_size=cfg.int("intermediate_size"), num_layers=cfg.int("num_hidden_layers"),
        num_heads=heads, num_kv_heads=cfg.int("num_key_value_heads", heads),
        head_dim=cfg.int("head_dim", hidden // heads),
        rms_norm_eps=cfg.float("rms_norm_eps", 1e-6),
        max_position=cfg.int("max_position_embeddings", 2048),
        tie_word_embeddings=cfg.bool("tie_word_embeddings", tie_default),
    )


def gguf_common(meta: Fields, arch: str, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """ModelSpec fields from the standard ``{arch}.*`` GGUF keys. ``shapes``: tensor name ->
    NumPy-order shape ([rows, cols] for matrices)."""
    if "token_embd.weight" not in shapes:
        raise CheckpointError(f"{meta.where}: tensor 'token_embd.weight' is missing")
    vocab, hidden = shapes["token_embd.weight"]
    a = arch + "."
    heads = meta.int(a + "attention.head_count")
    head_dim = meta.int(a + "attention.key_length", hidden // heads)
    return dict(
        vocab_size=int(vocab), hidden_size=meta.int(a + "embedding_length", hidden),
        intermediate_size=meta.int(a + "feed_forward_length"),
        num_layers=meta.int(a + "block_count"), num_heads=heads,
        num_kv_heads=meta.int(a + "attention.head_count_kv", heads), head_dim=head_dim,
        rms_norm_eps=meta.float(a + "attention.layer_norm_rms_epsilon"),
        max_position=meta.int(a + "context_length", 2048),
        tie_word_embeddings="output.weight" not in shapes,
    )


def gguf_rope(meta: Fields, arch: str, head_dim: int) -> RopeSpec:
    a = arch + "."
    theta = meta.float(a + "rope.freq_base", 10000.0)
    dim = meta.int(a + "rope.dimension_count", head_dim)
    kind = meta.get(a + "rope.scaling.type", "none")
    if kind in ("none", ""):
        return RopeSpec(theta=theta, rotary_dim=dim)
    if kind == "linear":
        return RopeSpec(theta=theta, rotary_dim=dim, scaling_type="linear",
                        factor=meta.float(a + "rope.scaling.factor"))
    raise CheckpointError(f"{meta.where}: rope scaling type {kind!r} is not supported "
                          "(supported: none, linear; llama3 via rope_freqs)")


# Canonical per-layer names -> (HF name under "model.layers.{i}.", GGUF name under "blk.{i}.");
# the two readings of HF "post_attention_layernorm" are resolved per adapter (Gemma: sandwich).
LAYER_NAMES: dict[str, tuple[str, str]] = {
    "input_norm.weight": ("input_layernorm.weight", "attn_norm.weight"),
    "attn.q_proj.weight": ("self_attn.q_proj.weight", "attn_q.weight"),
    "attn.k_proj.weight": ("self_attn.k_proj.weight", "attn_k.weight"),
    "attn.v_proj.weight": ("self_attn.v_proj.weight", "attn_v.weight"),
    "attn.q_proj.bias": ("self_attn.q_proj.bias", "attn_q.bias"),
    "attn.k_proj.bias": ("self_attn.k_proj.bias", "attn_k.bias"),
    "attn.v_proj.bias": ("self_attn.v_proj.bias", "attn_v.bias"),
    "attn.o_proj.weight": ("self_attn.o_proj.weight", "attn_output.weight"),
    "attn.q_norm.weight": ("self_attn.q_norm.weight", "attn_q_norm.weight"),
    "attn.k_norm.weight": ("self_attn.k_norm.weight", "attn_k_norm.weight"),
    "post_attn_norm.weight": ("post_attention_layernorm.weight", "post_attention_norm.weight"),
    "pre_mlp_norm.weight": ("post_attention_layernorm.weight", "ffn_norm.weight"),
    "post_mlp_norm.weight": ("post_feedforward_layernorm.weight", "post_ffw_norm.weight"),
    "mlp.gate_proj.weight": ("mlp.gate_proj.weight", "ffn_gate.weight"),
    "mlp.up_proj.weight": ("mlp.up_proj.weight", "ffn_up.weight"),
    "mlp.down_proj.weight": ("mlp.down_proj.weight", "ffn_down.weight"),
}
GGUF_GLOBAL_NAMES = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}


class Adapter:
    """One architecture family. Subclasses set the class attributes and the spec builders;
    the default tensor maps cover the llama layout (HF ``model.layers.{i}.*``, GGUF ``blk.{i}.*``)."""

    name: ClassVar[str]
    hf_model_types: ClassVar[tuple[str, ...]]
    gguf_archs: ClassVar[tuple[str, ...]]

    def text_config(self, config: dict[str, Any], where: str) -> Fields:
        """The part of config.json that describes the language model."""
        return Fields(config, where)

    def spec_from_hf(self, cfg: Fields) -> ModelSpec:
        raise NotImplementedError

    def spec_from_gguf(self, meta: Fields, shapes: Mapping[str, tuple[int, ...]],
                       read: Callable[[str], np.ndarray]) -> ModelSpec:
        raise NotImplementedError

    # -- tensor maps: canonical name -> TensorRef -------------------------------------------
    def norm_add_hf(self) -> float:
        return 0.0  # Gemma: 1.0 (stored w, effective 1 + w)

    def hf_layer_name(self, canon: str) -> str:
        """HF tensor name of a canonical per-layer suffix, relative to ``layers.{i}.``."""
        return LAYER_NAMES[canon][0]

    def hf_layer_map(self, spec: ModelSpec, i: int, prefix: str) -> dict[str, TensorRef]:
        p = f"{prefix}layers.{i}."
        add = self.norm_add_hf()
        return {f"layers.{i}.{c}": TensorRef(p + self.hf_layer_name(c),
                                             add=add if c.endswith("norm.weight") else 0.0)
                for c in layer_suffixes(spec)}

    def hf_prefixes(self) -> tuple[str, ...]:
        """Where the text model's ``layers.{i}`` / ``norm`` / ``embed_tokens`` may live."""
        return ("model.",)

    def hf_tensor_map(self, spec: ModelSpec, names: Collection[str]) -> dict[str, TensorRef]:
        """``names``: the tensor names present in the checkpoint (to locate the prefix)."""
        pres = self.hf_prefixes()
        pre = next((p for p in pres if p + "embed_tokens.weight" in names), pres[0])
        out = {"embed_tokens.weight": TensorRef(pre + "embed_tokens.weight")}
        for i in range(spec.num_layers):
            out.update(self.hf_layer_map(spec, i, pre))
        out["norm.weight"] = TensorRef(pre + "norm.weight", add=self.norm_add_hf())
        if not spec.tie_word_embeddings:
            out["lm_head.weight"] = TensorRef(self.hf_lm_head(pre))
        return out

    def hf_lm_head(self, prefix: str) -> str:
        return "lm_head.weight"

    def gguf_unpermute(self, spec: ModelSpec, canon: str) -> int | None:
        return None  # llama: undo llama.cpp's rotary permutation of q/k rows

    def gguf_tensor_map(self, spec: ModelSpec, names: Collection[str] = ()) -> dict[str, TensorRef]:
        """``names``: the tensor names present in the file (for layouts that vary)."""
        glob = {canon: TensorRef(g) for canon, g in GGUF_GLOBAL_NAMES.items()}
        out = {"embed_tokens.weight": glob["embed_tokens.weight"]}
        for i in range(spec.num_layers):
            for canon in layer_suffixes(spec):
                out[f"layers.{i}.{canon}"] = TensorRef(
                    f"blk.{i}.{LAYER_NAMES[canon][1]}", unpermute_heads=self.gguf_unpermute(spec, canon))
        out["norm.weight"] = glob["norm.weight"]
        if not spec.tie_word_embeddings:
            out["lm_head.weight"] = glob["lm_head.weight"]
        return out


def layer_suffixes(spec: ModelSpec) -> list[str]:
    """Canonical per-layer names without the ``layers.{i}.`` prefix (same for every layer)."""
    return [n[len("layers.0."):] for n in spec.tensor_names() if n.startswith("layers.0.")]
