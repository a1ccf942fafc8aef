"""Write a model in canonical form (edgeinfer.spec) as a GGUF file llama.cpp can run.

The GGUF follows llama.cpp's own conventions per architecture (``llama``, ``qwen2``, ``qwen3``,
``gemma3``, ``phi3``): its metadata keys (``{arch}.block_count``, ...), its tensor names
(``token_embd``, ``blk.N.attn_q``, ..., ``output_norm``, ``output``), and the layouts the
canonical form undid:

* llama: Q/K projection rows go back from rotate-half (HF) to llama.cpp's interleaved rotary
  order, within each head's rotary part (the other architectures use NeoX rotary = HF order).
* gemma3: llama.cpp's converter stores ``1 + w`` for Gemma norms and llama.cpp multiplies by
  the stored value, so the canonical *effective* weights are written as they are.
* phi3: ``ffn_up`` holds ``[gate; up]`` stacked, as llama.cpp's phi3 graph expects.

Tensors are streamed: the header is planned from the spec, then each weight is fetched,
encoded and written in turn, so peak memory is about one tensor. The file is written to a
temporary name beside ``out_path`` and renamed at the end (no partial file under the name).
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import (GGUFWriter, MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSOR, MODEL_TENSORS,
                  TENSOR_NAMES, GGMLQuantizationType, RopeScalingType)

from ..errors import CheckpointError, QuantizationError, UnsupportedArchitectureError
from ..quant.gguf_encoding import (FILE_TYPES, GgufEncoding, encode, encoding_for_format,
                                   encoding_for_shape)
from ..quant.recipe import QuantRecipe, WeightFormat
from ..spec import ModelSpec, RopeSpec, TokenizerInfo
from .checkpoint import canonical_shape
from .gguf_vocab import GgufVocab, vocab_from_tokenizer_json

GetWeight = Callable[[str], np.ndarray]
QUANTIZATION_VERSION = 2  # ggml's current quantization format version


@dataclass(frozen=True)
class ArchRules:
    """What llama.cpp's graph for one GGUF architecture computes (and so what a spec must be)."""

    model_arch: MODEL_ARCH
    activation: str
    qk_norm: bool = False
    sandwich_norm: bool = False
    embedding_scale_sqrt_hidden: bool = False  # gemma: llama.cpp always scales by sqrt(hidden)
    permute_qk: bool = False  # llama.cpp rotary NORM (interleaved) instead of NeoX
    fused_gate_up: bool = False  # phi3: ffn_up = [gate; up]
    sliding: bool = False
    final_logit_softcap: bool = False
    llama3_rope: bool = False  # rope_freqs tensor


ARCHS: dict[str, ArchRules] = {
    "llama": ArchRules(MODEL_ARCH.LLAMA, "silu", permute_qk=True, llama3_rope=True),
    "qwen2": ArchRules(MODEL_ARCH.QWEN2, "silu"),
    "qwen3": ArchRules(MODEL_ARCH.QWEN3, "silu", qk_norm=True),
    "gemma3": ArchRules(MODEL_ARCH.GEMMA3, "gelu_tanh", qk_norm=True, sandwich_norm=True,
                        embedding_scale_sqrt_hidden=True, sliding=True, final_logit_softcap=True),
    "phi3": ArchRules(MODEL_ARCH.PHI3, "silu", fused_gate_up=True),
}

# canonical per-layer suffix -> llama.cpp tensor
_LAYER_TENSORS = {
    "input_norm": MODEL_TENSOR.ATTN_NORM, "attn.q_proj": MODEL_TENSOR.ATTN_Q,
    "attn.k_proj": MODEL_TENSOR.ATTN_K, "attn.v_proj": MODEL_TENSOR.ATTN_V,
    "attn.o_proj": MODEL_TENSOR.ATTN_OUT, "attn.q_norm": MODEL_TENSOR.ATTN_Q_NORM,
    "attn.k_norm": MODEL_TENSOR.ATTN_K_NORM, "post_attn_norm": MODEL_TENSOR.ATTN_POST_NORM,
    "pre_mlp_norm": MODEL_TENSOR.FFN_NORM, "post_mlp_norm": MODEL_TENSOR.FFN_POST_NORM,
    "mlp.gate_proj": MODEL_TENSOR.FFN_GATE, "mlp.up_proj": MODEL_TENSOR.FFN_UP,
    "mlp.down_proj": MODEL_TENSOR.FFN_DOWN,
}
_GLOBAL_TENSORS = {"embed_tokens": MODEL_TENSOR.TOKEN_EMBD, "norm": MODEL_TENSOR.OUTPUT_NORM,
                   "lm_head": MODEL_TENSOR.OUTPUT}
# formats from most to least precise (a fused tensor takes its most precise part's format)
_PRECISION = (WeightFormat.FP32, WeightFormat.FP16, WeightFormat.INT8, WeightFormat.FP8,
              WeightFormat.INT4)


@dataclass(frozen=True)
class GgufWriteInfo:
    path: Path
    arch: str
    file_type: str  # general.file_type name, e.g. "MOSTLY_Q8_0"
    n_tensors: int
    nbytes: int  # size of the file
    tensor_types: dict[str, str]  # GGUF tensor name -> GGML type name
    tokenizer_model: str  # "gpt2" | "llama"
    tokenizer_pre: str
    notes: tuple[str, ...]  # where the GGUF differs from the recipe, and why


@dataclass(frozen=True)
class _Planned:
    name: str  # GGUF tensor name
    sources: tuple[str, ...]  # canonical names, concatenated along axis 0
    shape: tuple[int, ...]  # NumPy order ([out, in] for linear weights)
    encoding: GgufEncoding
    permute_heads: int = 0  # >0: llama Q/K rows, this many heads


def check_spec(spec: ModelSpec) -> ArchRules:
    """The llama.cpp rules for ``spec``; CheckpointError if llama.cpp would compute otherwise."""
    rules = ARCHS.get(spec.arch)
    if rules is None:
        raise UnsupportedArchitectureError(
            f"GGUF export: architecture {spec.arch!r} is not supported, expected one of {sorted(ARCHS)}")
    where = f"GGUF export ({spec.arch})"

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise CheckpointError(f"{where}: {what}")

    need(spec.activation == rules.activation, f"activation is {spec.activation!r}, llama.cpp uses {rules.activation!r}")
    need(spec.qk_norm == rules.qk_norm, f"qk_norm={spec.qk_norm}, llama.cpp's graph has qk_norm={rules.qk_norm}")
    need(spec.sandwich_norm == rules.sandwich_norm,
         f"sandwich_norm={spec.sandwich_norm}, llama.cpp's graph has {rules.sandwich_norm}")
    emb = math.sqrt(spec.hidden_size) if rules.embedding_scale_sqrt_hidden else 1.0
    need(math.isclose(spec.embedding_scale, emb, rel_tol=1e-3),
         f"embedding_scale={spec.embedding_scale}, llama.cpp uses {emb:g}")
    need(math.isclose(spec.scale, 1.0 / math.sqrt(spec.head_dim), rel_tol=1e-6),
         f"attn_scale={spec.scale}, llama.cpp uses 1/sqrt(head_dim)")
    need(spec.attn_softcap is None, "attention logit soft-capping is not in llama.cpp's graph")
    need(spec.final_logit_softcap is None or rules.final_logit_softcap,
         "final logit soft-capping is not in llama.cpp's graph")
    need(not spec.has_sliding_layers or rules.sliding, "sliding-window layers are not supported")
    need(spec.rope_local is None or rules.sliding, "a separate local rotary is not supported")
    for rope in filter(None, (spec.rope, spec.rope_local)):
        need(rope.scaling_type in ("default", "linear") or (rope.scaling_type == "llama3" and rules.llama3_rope),
             f"rope scaling {rope.scaling_type!r} is not supported")
        need(rope.rotary_dim % 2 == 0 and rope.rotary_dim <= spec.head_dim,
             f"rotary_dim {rope.rotary_dim} must be even and <= head_dim {spec.head_dim}")
    if spec.has_sliding_layers and spec.rope_local is None:  # llama.cpp: sliding layers unscaled
        need(spec.rope.scaling_type == "default", "sliding layers need their own rotary when the global one is scaled")
    if spec.rope_local is not None:
        need(spec.rope_local.rotary_dim == spec.rope.rotary_dim and spec.rope_local.scaling_type == "default",
             "the local rotary must differ from the global one in theta only")
    return rules


def _gguf_name(rules: ArchRules, canonical: str) -> str:
    parts = canonical.split(".")
    kind = parts[-1]  # weight | bias
    if parts[0] == "layers":
        tensor, bid = _LAYER_TENSORS[".".join(parts[2:-1])], int(parts[1])
    else:
        tensor, bid = _GLOBAL_TENSORS[parts[0]], None
    if tensor is MODEL_TENSOR.FFN_NORM and tensor not in MODEL_TENSORS[rules.model_arch]:
        tensor = MODEL_TENSOR.FFN_PRE_NORM  # gemma3's name for it (the same "blk.N.ffn_norm")
    if tensor not in MODEL_TENSORS[rules.model_arch]:
        raise CheckpointError(f"GGUF export: llama.cpp's {MODEL_ARCH_NAMES[rules.model_arch]} has no "
                              f"tensor for {canonical!r}")
    return TENSOR_NAMES[tensor].format(bid=bid) + "." + kind


def plan_tensors(spec: ModelSpec, recipe: QuantRecipe, rules: ArchRules,
                 int4_type: str | None = None) -> list[_Planned]:
    """The GGUF tensors for ``spec`` under ``recipe``, in file order."""
    symmetric = recipe.symmetric and not recipe.affine  # affine int4 is Q4_1's own scheme

    def encoding(name: str, shape: tuple[int, ...], fmt: WeightFormat | None = None) -> GgufEncoding:
        req = encoding_for_format(fmt or recipe.format_for(name), block_size=recipe.block_size,
                                  symmetric=symmetric, int4_type=int4_type)
        return encoding_for_shape(req, shape, symmetric=symmetric)

    out: list[_Planned] = []
    for name in spec.tensor_names():
        shape = canonical_shape(spec, name)
        if rules.fused_gate_up and ".mlp.gate_proj." in name:
            continue  # written with up_proj
        if rules.fused_gate_up and ".mlp.up_proj." in name:
            gate = name.replace("up_proj", "gate_proj")
            fmt = min(recipe.format_for(gate), recipe.format_for(name), key=_PRECISION.index)
            fused = (2 * shape[0], shape[1])
            out.append(_Planned(_gguf_name(rules, name), (gate, name), fused, encoding(name, fused, fmt)))
            continue
        heads = 0
        if rules.permute_qk and (".attn.q_proj." in name or ".attn.k_proj." in name):
            heads = spec.num_heads if ".q_proj." in name else spec.num_kv_heads
        out.append(_Planned(_gguf_name(rules, name), (name,), shape, encoding(name, shape), heads))
    return out


def to_interleaved_rotary(w: np.ndarray, n_heads: int, rotary_dim: int) -> np.ndarray:
    """Q/K rows [n_heads*head_dim, ...] from rotate-half order to llama.cpp's interleaved one.

    Within each head's first ``rotary_dim`` rows, [x_0..x_{r/2-1}, y_0..y_{r/2-1}] becomes
    [x_0, y_0, x_1, y_1, ...]; rows beyond ``rotary_dim`` stay in place.
    """
    head_dim = w.shape[0] // n_heads
    h = w.reshape(n_heads, head_dim, *w.shape[1:]).copy()
    rot = h[:, :rotary_dim].reshape(n_heads, 2, rotary_dim // 2, *w.shape[1:])
    h[:, :rotary_dim] = rot.swapaxes(1, 2).reshape(n_heads, rotary_dim, *w.shape[1:])
    return h.reshape(w.shape)


def _load(p: _Planned, get_weight: GetWeight, spec: ModelSpec) -> np.ndarray:
    parts = []
    for name in p.sources:
        w = np.asarray(get_weight(name), dtype=np.float32)
        want = canonical_shape(spec, name)
        if w.shape != want:
            raise CheckpointError(f"tensor {name!r}: shape {w.shape}, expected {want} from the model spec")
        parts.append(w)
    w = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    if p.permute_heads:
        w = to_interleaved_rotary(w, p.permute_heads, spec.rope.rotary_dim)
    return w


def _add_metadata(w: GGUFWriter, spec: ModelSpec, rules: ArchRules, file_type: GGMLQuantizationType) -> None:
    w.add_block_count(spec.num_layers)
    w.add_context_length(spec.max_position)
    w.add_embedding_length(spec.hidden_size)
    w.add_feed_forward_length(spec.intermediate_size)
    w.add_head_count(spec.num_heads)
    w.add_head_count_kv(spec.num_kv_heads)
    w.add_key_length(spec.head_dim)
    w.add_value_length(spec.head_dim)
    w.add_layer_norm_rms_eps(spec.rms_norm_eps)
    w.add_vocab_size(spec.vocab_size)
    w.add_rope_dimension_count(spec.rope.rotary_dim)
    w.add_rope_freq_base(spec.rope.theta)
    if spec.rope.scaling_type == "linear":
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(spec.rope.factor)
    if rules.sliding and spec.has_sliding_layers:
        w.add_sliding_window(int(spec.sliding_window or 0))
        w.add_sliding_window_pattern([spec.layer_type(i) == "sliding" for i in range(spec.num_layers)])
        w.add_rope_freq_base_swa((spec.rope_local or spec.rope).theta)
    if spec.final_logit_softcap is not None:
        w.add_final_logit_softcapping(spec.final_logit_softcap)
    w.add_file_type(FILE_TYPES[file_type])
    w.add_quantization_version(QUANTIZATION_VERSION)


def _add_tokenizer(w: GGUFWriter, vocab: GgufVocab, tok: TokenizerInfo) -> None:
    w.add_tokenizer_model(vocab.model)
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.token_types)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    if vocab.merges is not None:
        w.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        w.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.unk_id is not None:
        w.add_unk_token_id(vocab.unk_id)
    if tok.bos_token_id is not None:
        w.add_bos_token_id(tok.bos_token_id)
    if tok.eos_token_ids:
        w.add_eos_token_id(tok.eos_token_ids[0])
    if tok.pad_token_id is not None:
        w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(bool(tok.add_bos_token))
    w.add_add_eos_token(False)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


def _llama3_rope_factors(rope: RopeSpec) -> np.ndarray:
    """llama.cpp's rope_freqs: per-frequency divisors, float32 [rotary_dim // 2]."""
    base = replace(rope, scaling_type="default", factor=1.0).inv_freq()
    return (base / rope.inv_freq()).astype(np.float32)


def write_gguf(spec: ModelSpec, get_weight: GetWeight, tokenizer: TokenizerInfo, recipe: QuantRecipe,
               out_path: Path, progress: Callable[[int, int], None] | None = None, *,
               int4_type: str | None = None, tokenizer_pre: str | None = None) -> GgufWriteInfo:
    """Write ``spec`` + weights (canonical names, float32) as a llama.cpp GGUF at ``out_path``.

    ``get_weight(name)`` returns a canonical tensor (float32, HF layout). Formats follow
    ``recipe`` (see edgeinfer.quant.gguf_encoding for the GGML types); ``int4_type`` picks
    ``"q4_0"`` | ``"q4_1"`` | ``"q4_k"`` for int4 tensors; ``tokenizer_pre`` overrides the
    llama.cpp pre-tokenizer name for a byte-level BPE tokenizer. ``progress(done, total)`` is
    called after each tensor.
    """
    out_path = Path(out_path)
    rules = check_spec(spec)
    vocab = vocab_from_tokenizer_json(tokenizer.tokenizer_json, spec.vocab_size, pre=tokenizer_pre,
                                      where=f"{out_path.name}: tokenizer")
    plan = plan_tensors(spec, recipe, rules, int4_type)
    extra: list[tuple[str, np.ndarray]] = []
    if spec.rope.scaling_type == "llama3":
        extra.append((TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS] + ".weight", _llama3_rope_factors(spec.rope)))
    main = encoding_for_format(recipe.format, symmetric=recipe.symmetric and not recipe.affine,
                               int4_type=int4_type)
    notes = list(vocab.notes)
    for p in plan:
        if p.encoding.note and p.encoding.note not in notes:
            notes.append(p.encoding.note)
    if recipe.outlier != "none" and recipe.format.is_block_quantized:
        notes.append(f"outlier handling {recipe.outlier!r} has no GGUF form; the original weights are quantized")
    if len(tokenizer.eos_token_ids) > 1:
        notes.append(f"GGUF holds one eos id: {tokenizer.eos_token_ids[0]} of {list(tokenizer.eos_token_ids)}")

    arch = MODEL_ARCH_NAMES[rules.model_arch]
    writer = GGUFWriter(None, arch)
    _add_metadata(writer, spec, rules, main.ggml_type)
    _add_tokenizer(writer, vocab, tokenizer)
    for p in plan:
        writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.encoding.nbytes(p.shape),
                               raw_dtype=p.encoding.ggml_type)
    for name, arr in extra:
        writer.add_tensor_info(name, arr.shape, arr.dtype, arr.nbytes, raw_dtype=GGMLQuantizationType.F32)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    total = len(plan) + len(extra)
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, p in enumerate(plan):
            try:
                data = encode(_load(p, get_weight, spec), p.encoding.ggml_type)
            except QuantizationError as e:
                raise QuantizationError(f"tensor {' + '.join(p.sources)} -> {p.name}: {e}") from None
            writer.write_tensor_data(data)
            if progress is not None:
                progress(i + 1, total)
        for j, (_, arr) in enumerate(extra):
            writer.write_tensor_data(arr)
            if progress is not None:
                progress(len(plan) + j + 1, total)
        writer.close()
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, out_path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    types = {p.name: p.encoding.ggml_type.name for p in plan}
    types.update({name: "F32" for name, _ in extra})
    return GgufWriteInfo(path=out_path, arch=arch, file_type=FILE_TYPES[main.ggml_type].name,
                         n_tensors=total, nbytes=out_path.stat().st_size, tensor_types=types,
                         tokenizer_model=vocab.model, tokenizer_pre=vocab.pre, notes=tuple(notes))
