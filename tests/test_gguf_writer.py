"""write_gguf on tiny random specs, read back with gguf-py's GGUFReader.

Expected key and tensor names are written out literally (llama.cpp's scheme) and the Q/K
row order is restated index by index, so the tests do not reuse the writer's tables.
llama.cpp itself loads these files in tests/test_gguf_llama_cpp.py.
"""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf import quants as gq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from edgeinfer.errors import CheckpointError, QuantizationError, UnsupportedArchitectureError
from edgeinfer.export.gguf_writer import write_gguf
from edgeinfer.quant.recipe import QuantRecipe
from edgeinfer.spec import ModelSpec, RopeSpec, TokenizerInfo

VOCAB = 256


def byte_level_tokenizer(n: int = VOCAB) -> str:
    """A byte-level BPE of n tokens: n-8 byte symbols + 8 merges, two special tokens."""
    alpha = sorted(pre_tokenizers.ByteLevel.alphabet())[: n - 8]
    vocab = {c: i for i, c in enumerate(alpha)}
    merges = [("a", "b"), ("c", "d"), ("e", "f"), ("g", "h"), ("i", "j"), ("k", "l"), ("m", "n"), ("o", "p")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    doc = json.loads(tok.to_str())
    doc["added_tokens"] = [
        {"id": 0, "content": alpha[0], "special": True, "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False},
    ]
    return json.dumps(doc)


TOKENIZER = TokenizerInfo(byte_level_tokenizer(), chat_template="{{ messages }}", bos_token_id=1,
                          eos_token_ids=(2, 3), pad_token_id=0, add_bos_token=True)
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
              num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, max_position=512)


def make_spec(arch: str, **kw) -> ModelSpec:
    base = dict(COMMON, arch=arch, rope=RopeSpec(10000.0, 16))
    if arch == "qwen2":
        base.update(qkv_bias=True)
    if arch == "qwen3":
        base.update(qk_norm=True, tie_word_embeddings=True)
    if arch == "llama":
        base.update(tie_word_embeddings=True)
    if arch == "phi3":
        base.update(rope=RopeSpec(10000.0, 8))
    if arch == "gemma3":
        base.update(num_layers=4, num_kv_heads=1, head_dim=32, rope=RopeSpec(1e6, 32),
                    rope_local=RopeSpec(1e4, 32), qk_norm=True, sandwich_norm=True,
                    activation="gelu_tanh", embedding_scale=8.0, final_logit_softcap=30.0,
                    layer_types=("sliding", "full", "sliding", "full"), sliding_window=5,
                    tie_word_embeddings=True)
    base.update(kw)
    return ModelSpec(**base)


def random_weights(spec: ModelSpec, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, hd, it = spec.hidden_size, spec.head_dim, spec.intermediate_size
    q, kv = spec.num_heads * hd, spec.num_kv_heads * hd
    shapes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
              "gate_proj": (it, h), "up_proj": (it, h), "down_proj": (h, it)}
    out = {}
    for name in spec.tensor_names():
        key = name.split(".")[-2]
        if name in ("embed_tokens.weight", "lm_head.weight"):
            shape = (spec.vocab_size, h)
        elif key in shapes:
            shape = shapes[key] if name.endswith(".weight") else (shapes[key][0],)
        else:
            shape = (hd,) if key in ("q_norm", "k_norm") else (h,)
        out[name] = (rng.standard_normal(shape) * (0.1 if len(shape) == 2 else 1.0) + (len(shape) == 1)
                     ).astype(np.float32)
    return out


def write(tmp_path, spec, weights=None, recipe=QuantRecipe(), tokenizer=TOKENIZER, **kw):
    weights = weights if weights is not None else random_weights(spec)
    info = write_gguf(spec, weights.__getitem__, tokenizer, recipe, tmp_path / "m.gguf", **kw)
    return info, GGUFReader(info.path), weights


def fields(r: GGUFReader) -> dict:
    return {k: f.contents() for k, f in r.fields.items()}


def tensor(r: GGUFReader, name: str) -> np.ndarray:
    t = next(t for t in r.tensors if t.name == name)
    return gq.dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in t.shape[::-1]))


def interleave_reference(w: np.ndarray, heads: int, rot: int) -> np.ndarray:
    """llama.cpp's rotary row order, restated: row 2i <- i, row 2i+1 <- rot/2 + i (per head)."""
    hd = w.shape[0] // heads
    out = w.copy()
    for h in range(heads):
        for i in range(rot // 2):
            out[h * hd + 2 * i] = w[h * hd + i]
            out[h * hd + 2 * i + 1] = w[h * hd + rot // 2 + i]
    return out


def test_llama_metadata_tensors_and_rotary_order(tmp_path):
    spec = make_spec("llama")
    info, r, w = write(tmp_path, spec)
    f = fields(r)
    assert f["general.architecture"] == "llama"
    want = {"llama.block_count": 2, "llama.context_length": 512, "llama.embedding_length": 64,
            "llama.feed_forward_length": 96, "llama.attention.head_count": 4,
            "llama.attention.head_count_kv": 2, "llama.attention.key_length": 16,
            "llama.attention.value_length": 16, "llama.rope.dimension_count": 16,
            "llama.rope.freq_base": 10000.0, "llama.vocab_size": VOCAB, "general.file_type": 0}
    assert {k: f[k] for k in want} == want
    assert math.isclose(f["llama.attention.layer_norm_rms_epsilon"], 1e-6, rel_tol=1e-6)
    names = {t.name for t in r.tensors}
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate",
                 "ffn_up", "ffn_down"]
    assert names == {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(2) for n in per_layer}  # tied: no output.weight
    assert info.n_tensors == len(names) and info.file_type == "ALL_F32"
    t = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight")
    assert list(t.shape) == [64, 64] and t.tensor_type is T.F32
    for i in range(2):
        np.testing.assert_array_equal(tensor(r, f"blk.{i}.attn_q.weight"),
                                      interleave_reference(w[f"layers.{i}.attn.q_proj.weight"], 4, 16))
        np.testing.assert_array_equal(tensor(r, f"blk.{i}.attn_k.weight"),
                                      interleave_reference(w[f"layers.{i}.attn.k_proj.weight"], 2, 16))
        np.testing.assert_array_equal(tensor(r, f"blk.{i}.attn_v.weight"), w[f"layers.{i}.attn.v_proj.weight"])
        np.testing.assert_array_equal(tensor(r, f"blk.{i}.ffn_down.weight"), w[f"layers.{i}.mlp.down_proj.weight"])
    np.testing.assert_array_equal(tensor(r, "token_embd.weight"), w["embed_tokens.weight"])
    np.testing.assert_array_equal(tensor(r, "output_norm.weight"), w["norm.weight"])


def test_partial_rotary_permutes_only_the_rotary_rows(tmp_path):
    spec = make_spec("llama", rope=RopeSpec(10000.0, 8), tie_word_embeddings=False)
    _, r, w = write(tmp_path, spec)
    np.testing.assert_array_equal(tensor(r, "blk.1.attn_q.weight"),
                                  interleave_reference(w["layers.1.attn.q_proj.weight"], 4, 8))
    np.testing.assert_array_equal(tensor(r, "output.weight"), w["lm_head.weight"])
    assert fields(r)["llama.rope.dimension_count"] == 8


def test_llama3_rope_scaling_writes_rope_freqs(tmp_path):
    rope = RopeSpec(500000.0, 16, "llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position=64)
    _, r, _ = write(tmp_path, make_spec("llama", rope=rope))
    freqs = 1.0 / 500000.0 ** (np.arange(0, 16, 2) / 16)
    wavelen = 2 * math.pi / freqs
    smooth = (64 / wavelen - 1.0) / (4.0 - 1.0)
    want = np.where(wavelen < 64 / 4.0, 1.0, np.where(wavelen > 64 / 1.0, 8.0, 1 / ((1 - smooth) / 8.0 + smooth)))
    np.testing.assert_allclose(tensor(r, "rope_freqs.weight"), want, rtol=1e-6)


def test_qwen2_qwen3_layouts(tmp_path):
    _, r, w = write(tmp_path, make_spec("qwen2"))
    assert fields(r)["general.architecture"] == "qwen2"
    np.testing.assert_array_equal(tensor(r, "blk.0.attn_q.weight"), w["layers.0.attn.q_proj.weight"])  # NeoX: as is
    np.testing.assert_array_equal(tensor(r, "blk.1.attn_k.bias"), w["layers.1.attn.k_proj.bias"])
    _, r, w = write(tmp_path, make_spec("qwen3"))
    np.testing.assert_array_equal(tensor(r, "blk.1.attn_q_norm.weight"), w["layers.1.attn.q_norm.weight"])
    np.testing.assert_array_equal(tensor(r, "blk.1.attn_k_norm.weight"), w["layers.1.attn.k_norm.weight"])


def test_gemma3_norms_as_is_and_sliding_metadata(tmp_path):
    spec = make_spec("gemma3")
    _, r, w = write(tmp_path, spec)
    f = fields(r)
    assert f["gemma3.attention.sliding_window"] == 5
    assert f["gemma3.attention.sliding_window_pattern"] == [True, False, True, False]
    assert f["gemma3.rope.freq_base"] == 1e6 and f["gemma3.rope.freq_base_swa"] == 1e4
    assert f["gemma3.final_logit_softcapping"] == 30.0
    for ours, canon in [("post_attention_norm", "post_attn_norm"), ("ffn_norm", "pre_mlp_norm"),
                        ("post_ffw_norm", "post_mlp_norm"), ("attn_norm", "input_norm"),
                        ("attn_q_norm", "attn.q_norm")]:
        np.testing.assert_array_equal(tensor(r, f"blk.3.{ours}.weight"), w[f"layers.3.{canon}.weight"])


def test_phi3_fuses_gate_and_up(tmp_path):
    _, r, w = write(tmp_path, make_spec("phi3"))
    names = {t.name for t in r.tensors}
    assert "blk.0.ffn_gate.weight" not in names
    np.testing.assert_array_equal(
        tensor(r, "blk.0.ffn_up.weight"),
        np.concatenate([w["layers.0.mlp.gate_proj.weight"], w["layers.0.mlp.up_proj.weight"]]))
    assert fields(r)["phi3.rope.dimension_count"] == 8


def test_quantized_recipe_types_and_notes(tmp_path):
    spec = make_spec("llama", hidden_size=256, num_heads=8, num_kv_heads=2, head_dim=32,
                     intermediate_size=320, rope=RopeSpec(10000.0, 32), tie_word_embeddings=False)
    recipe = QuantRecipe("int4", block_size=32, embed_format="int8", keep=("layers.1.mlp.*",), keep_format="fp16")
    info, r, w = write(tmp_path, spec, recipe=recipe, int4_type="q4_k")
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["token_embd.weight"] is T.Q8_0
    assert types["blk.0.attn_q.weight"] is T.Q4_K  # rows of 256
    assert types["blk.0.ffn_down.weight"] is T.Q4_0  # rows of 320: falls back
    assert types["blk.1.ffn_down.weight"] is T.F16  # kept
    assert types["blk.0.attn_norm.weight"] is T.F32
    assert types["output.weight"] is T.Q4_K
    assert info.tensor_types["blk.0.ffn_down.weight"] == "Q4_0"
    assert any("320" in n for n in info.notes) and info.file_type == "MOSTLY_Q4_K_M"
    assert fields(r)["general.file_type"] == 15 and fields(r)["general.quantization_version"] == 2
    x = w["layers.0.attn.q_proj.weight"]
    got = tensor(r, "blk.0.attn_q.weight")
    want = interleave_reference(x, 8, 32)  # Q4_K blocks run along rows: permuting rows commutes
    assert np.abs(got - want).max() <= 1.5 * np.abs(x).max() / 15
    info, r, _ = write(tmp_path, spec, recipe=QuantRecipe("int8", outlier="scale"))
    assert any("outlier" in n for n in info.notes)
    info, r, _ = write(tmp_path, spec, recipe=QuantRecipe("fp8"))
    assert {t.tensor_type for t in r.tensors if t.name.endswith("attn_q.weight")} == {T.Q8_0}
    assert any("fp8" in n for n in info.notes) and info.file_type == "MOSTLY_Q8_0"


def test_tokenizer_metadata(tmp_path):
    info, r, _ = write(tmp_path, make_spec("llama"))
    f = fields(r)
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert len(f["tokenizer.ggml.tokens"]) == VOCAB and f["tokenizer.ggml.merges"][:2] == ["a b", "c d"]
    assert f["tokenizer.ggml.token_type"][:2] == [3, 1]  # id 0 is special -> CONTROL
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"],
            f["tokenizer.ggml.padding_token_id"]) == (1, 2, 0)
    assert f["tokenizer.ggml.add_bos_token"] is True and f["tokenizer.chat_template"] == "{{ messages }}"
    assert any("eos" in n for n in info.notes)  # two eos ids, GGUF keeps the first
    assert (info.tokenizer_model, info.tokenizer_pre) == ("gpt2", "gpt-2")


def test_progress_and_atomic_write(tmp_path):
    spec = make_spec("llama")
    calls = []
    info, _, w = write(tmp_path, spec, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (info.n_tensors, info.n_tensors) and len(calls) == info.n_tensors
    before = (tmp_path / "m.gguf").read_bytes()

    def failing(name):
        if name == "layers.1.mlp.up_proj.weight":
            raise OSError("disk gone")
        return w[name]

    with pytest.raises(OSError, match="disk gone"):
        write_gguf(spec, failing, TOKENIZER, QuantRecipe(), tmp_path / "m.gguf")
    assert (tmp_path / "m.gguf").read_bytes() == before  # untouched
    with pytest.raises(OSError):
        write_gguf(spec, failing, TOKENIZER, QuantRecipe(), tmp_path / "new.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no partial file left


def test_bad_weight_shape_names_the_tensor(tmp_path):
    spec = make_spec("llama")
    w = random_weights(spec)
    w["layers.0.attn.k_proj.weight"] = w["layers.0.attn.q_proj.weight"]
    with pytest.raises(CheckpointError, match=r"layers.0.attn.k_proj.weight.*\(32, 64\)"):
        write(tmp_path, spec, weights=w)


@pytest.mark.parametrize("arch, change, match", [
    ("llama", {"arch": "mpt"}, "not supported"),
    ("gemma3", {"attn_scale": 24 ** -0.5}, "attn_scale"),
    ("gemma3", {"embedding_scale": 1.0}, "embedding_scale"),
    ("llama", {"final_logit_softcap": 30.0}, "soft-capping"),
    ("llama", {"activation": "gelu_tanh"}, "activation"),
    ("qwen2", {"qk_norm": True}, "qk_norm"),
    ("llama", {"layer_types": ("sliding", "full"), "sliding_window": 4}, "sliding"),
    ("qwen2", {"rope": RopeSpec(1e4, 16, "llama3", factor=8.0)}, "llama3"),
])
def test_unsupported_combinations(tmp_path, arch, change, match):
    spec = make_spec(arch)
    with pytest.raises((CheckpointError, UnsupportedArchitectureError), match=match):
        write_gguf(dataclasses.replace(spec, **change), random_weights(spec).__getitem__, TOKENIZER,
                   QuantRecipe(), tmp_path / "x.gguf")
    assert not any(tmp_path.iterdir())


def test_non_finite_weight_names_the_tensor(tmp_path):
    spec = make_spec("llama")
    w = random_weights(spec)
    w["layers.1.mlp.gate_proj.weight"][3, 4] = np.inf
    with pytest.raises(QuantizationError, match=r"layers.1.mlp.gate_proj.weight -> blk.1.ffn_gate.weight.*infinite"):
        write(tmp_path, spec, weights=w, recipe=QuantRecipe("int8"))
    assert not any(tmp_path.iterdir())
