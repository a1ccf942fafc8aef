"""GGUF reader + adapters.

Fast: tiny checkpoints written as GGUF in llama.cpp's layout (tests/tiny_models.py; Q/K
permuted for llama, Gemma norms +1, Phi-3 fused, llama3 rope as rope_freqs, F16 / Q8_0
tensors) read back to the same spec and canonical weights as the HF folder; transformers
loading the same GGUF agrees with the HF model, which checks the test writer itself.
Slow: the real SmolLM2 (Q4_1) and Gemma 3 (Q4_K_M) files against transformers' own GGUF
loader (its torch dequantization, its un-permutation and its Gemma norm handling).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from tiny_models import TINY_ARCHS, load_reference_model, write_tiny_gguf

from edgeinfer.export.checkpoint import load_checkpoint
from edgeinfer.export.gguf_reader import parse_gguf


def assert_header_matches_gguf_py(path) -> None:
    """Our header parser returns what gguf-py's GGUFReader reads from the same file."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    meta, tensors, buf = parse_gguf(path)
    want = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert meta.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, float):  # we give float32 scalars as their shortest decimal
            assert np.float32(meta[key]) == np.float32(value), key
        else:
            assert meta[key] == value, key
    assert {t.name: (t.tensor_type, tuple(reversed(t.shape.tolist())), t.data_offset, t.n_bytes)
            for t in reader.tensors} == {
        n: (t.ggml_type, t.shape, t.offset, t.nbytes) for n, t in tensors.items()}
    for t in reader.tensors[:3] + reader.tensors[-3:]:
        raw = np.asarray(buf[t.data_offset:t.data_offset + t.n_bytes])
        assert raw.tobytes() == np.asarray(t.data).tobytes(), t.name


@pytest.fixture(scope="module")
def pair(tiny_checkpoint, tmp_path_factory):
    """arch -> (HF checkpoint, GGUF checkpoint, GGUF path) of the same tiny model."""
    root = tmp_path_factory.mktemp("tiny_gguf")
    cache = {}

    def get(arch: str):
        if arch not in cache:
            path = write_tiny_gguf(arch, tiny_checkpoint(arch), root / f"{arch}.gguf")
            cache[arch] = (load_checkpoint(tiny_checkpoint(arch)), load_checkpoint(path), path)
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_header_parser_agrees_with_gguf_py(arch, pair):
    assert_header_matches_gguf_py(pair(arch)[2])


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_gguf_spec_equals_hf_spec(arch, pair):
    hf, gg, _ = pair(arch)
    assert gg.kind == "gguf"
    want = hf.spec
    if arch == "mistral":  # llama.cpp runs the llama arch without a sliding window
        want = dataclasses.replace(want, layer_types=(), sliding_window=None)
    if arch == "gemma3":  # GGUF has no query_pre_attn_scalar; llama.cpp uses head_dim
        want = dataclasses.replace(want, attn_scale=want.head_dim ** -0.5)
    assert gg.spec == want


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_gguf_weights_equal_hf_weights(arch, pair):
    import gguf

    hf, gg, _ = pair(arch)
    assert gg.weights.names() == hf.weights.names()
    for name in hf.weights.names():
        want, got = hf.weights.get(name), gg.weights.get(name)
        kind = gg.weights.source_type(name)
        assert got.dtype == np.float32 and got.flags.writeable, name
        if name == "embed_tokens.weight":
            assert kind == "F16"
            np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32))
        elif name.endswith("down_proj.weight"):
            assert kind == "Q8_0"
            q8 = gguf.GGMLQuantizationType.Q8_0
            np.testing.assert_array_equal(got, gguf.quants.dequantize(gguf.quants.quantize(want, q8), q8))
            amax = np.abs(want.reshape(-1, 32)).max(1, keepdims=True)
            # half a quantization step, plus what rounding the scale to F16 adds
            assert (np.abs(got - want).reshape(-1, 32) <= amax / 127 * 0.6).all()
        else:
            assert kind == "F32"
            np.testing.assert_array_equal(got, want, err_msg=name)
    fused = {"phi3": "attn_qkv.weight"}.get(arch)
    if fused:  # a split tensor reports its share of the fused tensor's bytes
        q = gg.weights.nbytes_on_disk("layers.0.attn.q_proj.weight")
        k = gg.weights.nbytes_on_disk("layers.0.attn.k_proj.weight")
        assert q == 2 * k == gg.weights.raw.nbytes("blk.0." + fused) // 2


@pytest.mark.parametrize("arch", [a for a in TINY_ARCHS if a != "qwen3"])
def test_tiny_gguf_writer_agrees_with_transformers(arch, pair, tiny_checkpoint):
    """transformers' GGUF loader reads our test files back to the HF model (its qwen3 GGUF
    loader ignores attention.key_length, hence no qwen3 here)."""
    import torch
    import transformers as tf

    _, _, path = pair(arch)
    loaded = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ref = load_reference_model(tiny_checkpoint(arch)).state_dict()
    got = loaded.state_dict()
    for name, want in ref.items():
        tol = 2e-2 if "down_proj" in name or "embed" in name or "lm_head" in name else 1e-6
        torch.testing.assert_close(got[name].float(), want.float(), atol=tol, rtol=0, msg=name)


# -- the real files ---------------------------------------------------------------------
REAL = {"smollm2-135m-instruct": "SmolLM2-135M-Instruct.Q4_1.gguf", "gemma3-270m": "gemma-3-270m-q4_k_m.gguf"}
_HF_LAYER = {"attn.q_proj.weight": "self_attn.q_proj.weight", "attn.k_proj.weight": "self_attn.k_proj.weight",
             "attn.v_proj.weight": "self_attn.v_proj.weight", "attn.o_proj.weight": "self_attn.o_proj.weight",
             "attn.q_norm.weight": "self_attn.q_norm.weight", "attn.k_norm.weight": "self_attn.k_norm.weight",
             "mlp.gate_proj.weight": "mlp.gate_proj.weight", "mlp.up_proj.weight": "mlp.up_proj.weight",
             "mlp.down_proj.weight": "mlp.down_proj.weight", "input_norm.weight": "input_layernorm.weight",
             "post_attn_norm.weight": "post_attention_layernorm.weight",
             "post_mlp_norm.weight": "post_feedforward_layernorm.weight"}


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from edgeinfer.models import default_model_path

    cache = {}

    def get(key: str):
        if key not in cache:
            import torch
            import transformers as tf

            path = default_model_path(key)
            folder = tmp_path_factory.mktemp(key)
            (folder / path.name).symlink_to(path)
            model = tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file=path.name, dtype=torch.float32)
            cache.clear()  # keep one real model in memory at a time
            cache[key] = (load_checkpoint(path), model)
        return cache[key]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("key", REAL)
def test_real_header_parser_agrees_with_gguf_py(key):
    from edgeinfer.models import default_model_path

    assert_header_matches_gguf_py(default_model_path(key))


@pytest.mark.slow
@pytest.mark.parametrize("key", REAL)
def test_real_gguf_matches_transformers(key, real):
    ckpt, model = real(key)
    spec, cfg = ckpt.spec, model.config
    gemma = spec.arch == "gemma3"
    assert (spec.num_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim,
            spec.intermediate_size, spec.vocab_size, spec.tie_word_embeddings) == (
        cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
        cfg.head_dim, cfg.intermediate_size, cfg.vocab_size, cfg.tie_word_embeddings)
    assert spec.rms_norm_eps == pytest.approx(cfg.rms_norm_eps, rel=1e-6)
    for i, layer in enumerate(model.model.layers):
        assert layer.self_attn.scaling == pytest.approx(spec.scale)
        kind = "sliding_attention" if spec.layer_type(i) == "sliding" else "full_attention"
        if gemma:
            assert cfg.layer_types[i] == kind and layer.self_attn.sliding_window == (
                spec.sliding_window if kind == "sliding_attention" else None)
        inv = getattr(model.model.rotary_emb, f"{kind}_inv_freq" if gemma else "inv_freq")
        np.testing.assert_allclose(spec.rope_for_layer(i).inv_freq(), inv.double().numpy(), rtol=1e-6)
    if gemma:
        assert spec.embedding_scale == pytest.approx(model.model.embed_tokens.embed_scale.item())
        assert spec.activation == "gelu_tanh" and spec.sandwich_norm and spec.qk_norm
    sd = model.state_dict()
    one = 1.0 if gemma else 0.0  # transformers keeps Gemma's w; canonical is 1 + w
    layer_names = {**_HF_LAYER, "pre_mlp_norm.weight": "pre_feedforward_layernorm.weight" if gemma
                   else "post_attention_layernorm.weight"}
    names = ["embed_tokens.weight", "norm.weight"] + [
        f"layers.{i}.{leaf}" for i in (0, spec.num_layers // 2, spec.num_layers - 1) for leaf in layer_names
        if f"layers.{i}.{leaf}" in ckpt.weights]
    for name in names:
        if name.startswith("layers."):
            i, leaf = name.split(".", 2)[1:]
            hf = f"model.layers.{i}." + layer_names[leaf]
        else:
            hf = "model." + name
        want = sd[hf].float().numpy() + (one if "norm" in name else 0.0)
        np.testing.assert_allclose(ckpt.weights.get(name), want, rtol=0, atol=1e-6 * max(1, abs(want).max()),
                                   err_msg=f"{name} ({ckpt.weights.source_type(name)})")
    types = {ckpt.weights.source_type(n) for n in names}
    assert types >= ({"Q4_K", "Q5_0", "Q6_K", "Q8_0", "F32"} if gemma else {"Q4_1", "Q8_0", "F32"})


@pytest.mark.slow
def test_opening_a_real_gguf_reads_no_weights():
    """Opening maps the file and parses its header: resident memory grows by a small part of
    the 98 MB file (all weights dequantized would be 540 MB)."""
    import gc

    psutil = pytest.importorskip("psutil")
    from edgeinfer.models import default_model_path

    path = default_model_path("smollm2-135m-instruct")
    proc = psutil.Process()
    gc.collect()
    before = proc.memory_info().rss
    ckpt = load_checkpoint(path)
    grown = proc.memory_info().rss - before
    assert grown < 0.3 * path.stat().st_size, grown
    assert len(ckpt.weights.names()) == 30 * 9 + 2
