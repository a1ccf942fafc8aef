"""HF folder reader + adapters on tiny random checkpoints, checked against transformers.

Three independent answers: a hand-written expected ModelSpec per architecture (plus the
rotary frequencies / attention scale / windows of the transformers model itself); the
transformers state dict mapped to canonical names here, by hand; and a NumPy forward pass
that follows the math documented in edgeinfer/spec.py, compared to transformers' logits.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from tiny_models import ADDS_BOS, BOS, CHAT_TEMPLATE, EOS, IM_END, PAD, TINY_ARCHS, load_reference_model

from edgeinfer.export.checkpoint import Checkpoint, canonical_shape, load_checkpoint
from edgeinfer.spec import ModelSpec, RopeSpec

BASE = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=16, rms_norm_eps=1e-5, max_position=256, vocab_size=300)
EXPECTED = {
    "llama": dict(arch="llama", rope=RopeSpec(10000.0, 16, "llama3", 4.0, 1.0, 4.0, 64)),
    "llama_tied": dict(arch="llama", num_layers=3, tie_word_embeddings=True, rope=RopeSpec(10000.0, 16)),
    "mistral": dict(arch="llama", rope=RopeSpec(10000.0, 16), layer_types=("sliding",) * 2,
                    sliding_window=8),
    "qwen2": dict(arch="qwen2", vocab_size=320, tie_word_embeddings=True, qkv_bias=True,
                  rope=RopeSpec(1e6, 16)),
    "qwen3": dict(arch="qwen3", head_dim=32, qk_norm=True, rope=RopeSpec(10000.0, 32)),
    "gemma3": dict(arch="gemma3", num_layers=3, tie_word_embeddings=True, qk_norm=True,
                   sandwich_norm=True, activation="gelu_tanh", embedding_scale=8.0,
                   attn_scale=24 ** -0.5, final_logit_softcap=10.0,
                   layer_types=("sliding", "sliding", "full"), sliding_window=4,
                   rope=RopeSpec(1e6, 16, "linear", 2.0), rope_local=RopeSpec(10000.0, 16)),
    "phi3": dict(arch="phi3", rope=RopeSpec(10000.0, 8)),
}


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    cache: dict[str, tuple[Checkpoint, object]] = {}

    def get(arch: str):
        if arch not in cache:
            path = tiny_checkpoint(arch)
            cache[arch] = (load_checkpoint(path), load_reference_model(path))
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_spec_from_config(arch, loaded):
    ckpt, model = loaded(arch)
    assert ckpt.kind == "hf"
    assert ckpt.spec == ModelSpec(**{**BASE, "tie_word_embeddings": False, **EXPECTED[arch]})
    # the transformers model's own rotary tables, scale and windows agree
    rot = model.model.rotary_emb
    for i, layer in enumerate(model.model.layers):
        kind = "sliding_attention" if ckpt.spec.layer_type(i) == "sliding" else "full_attention"
        inv = getattr(rot, f"{kind}_inv_freq", None) if arch == "gemma3" else rot.inv_freq
        np.testing.assert_allclose(ckpt.spec.rope_for_layer(i).inv_freq(), inv.double().numpy(), rtol=1e-6)
        assert layer.self_attn.scaling == pytest.approx(ckpt.spec.scale)
        window = (getattr(layer.self_attn, "sliding_window", None) if arch == "gemma3"
                  else getattr(model.config, "sliding_window", None))  # mistral/phi3: all layers
        assert window == (ckpt.spec.sliding_window if ckpt.spec.layer_type(i) == "sliding" else None)


def _expected_canonical(arch: str, spec: ModelSpec, model) -> dict[str, np.ndarray]:
    """transformers' state dict under canonical names, mapped by hand."""
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    one = 1.0 if arch == "gemma3" else 0.0  # Gemma computes x_hat * (1 + w)
    out = {"embed_tokens.weight": sd["model.embed_tokens.weight"],
           "norm.weight": sd["model.norm.weight"] + one}
    if not spec.tie_word_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    for i in range(spec.num_layers):
        p, c = f"model.layers.{i}.", f"layers.{i}."
        out[c + "input_norm.weight"] = sd[p + "input_layernorm.weight"] + one
        if arch == "phi3":
            qkv, gu = sd[p + "self_attn.qkv_proj.weight"], sd[p + "mlp.gate_up_proj.weight"]
            for name, part in zip(("q", "k", "v"), np.split(qkv, [q, q + kv])):
                out[c + f"attn.{name}_proj.weight"] = part
            out[c + "mlp.gate_proj.weight"], out[c + "mlp.up_proj.weight"] = np.split(gu, 2)
        else:
            for name in ("q", "k", "v"):
                out[c + f"attn.{name}_proj.weight"] = sd[p + f"self_attn.{name}_proj.weight"]
                if spec.qkv_bias:
                    out[c + f"attn.{name}_proj.bias"] = sd[p + f"self_attn.{name}_proj.bias"]
            for name in ("gate", "up"):
                out[c + f"mlp.{name}_proj.weight"] = sd[p + f"mlp.{name}_proj.weight"]
        out[c + "attn.o_proj.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[c + "mlp.down_proj.weight"] = sd[p + "mlp.down_proj.weight"]
        if spec.qk_norm:
            out[c + "attn.q_norm.weight"] = sd[p + "self_attn.q_norm.weight"] + one
            out[c + "attn.k_norm.weight"] = sd[p + "self_attn.k_norm.weight"] + one
        if arch == "gemma3":
            out[c + "post_attn_norm.weight"] = sd[p + "post_attention_layernorm.weight"] + one
            out[c + "pre_mlp_norm.weight"] = sd[p + "pre_feedforward_layernorm.weight"] + one
            out[c + "post_mlp_norm.weight"] = sd[p + "post_feedforward_layernorm.weight"] + one
        else:
            out[c + "pre_mlp_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    return out


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_weights_equal_transformers_state_dict(arch, loaded):
    ckpt, model = loaded(arch)
    expected = _expected_canonical(arch, ckpt.spec, model)
    assert ckpt.weights.names() == ckpt.spec.tensor_names()
    assert set(expected) == set(ckpt.weights.names())
    for name, want in expected.items():
        got = ckpt.weights.get(name)
        assert got.dtype == np.float32 and got.shape == canonical_shape(ckpt.spec, name)
        assert ckpt.weights.shape(name) == got.shape
        np.testing.assert_array_equal(got, want.astype(np.float32), err_msg=name)
    kind = "BF16" if arch == "qwen3" else "F32"
    assert {ckpt.weights.source_type(n) for n in ckpt.weights.names()} == {kind}
    stored = sum(f.stat().st_size for f in ckpt.path.glob("*.safetensors"))
    assert 0.9 * stored < sum(ckpt.weights.nbytes_on_disk(n) for n in ckpt.weights.names()) <= stored


# -- a NumPy forward pass following edgeinfer/spec.py, float64 ------------------------------
def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x, pos, rope: RopeSpec):  # x [T, heads, head_dim]
    r = rope.rotary_dim
    ang = pos[:, None] * rope.inv_freq()[None, :]  # [T, r/2]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = x[..., : r // 2], x[..., r // 2: r]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., r:]], axis=-1)


def numpy_logits(spec: ModelSpec, w, ids: list[int]) -> np.ndarray:
    g = {n: w.get(n).astype(np.float64) for n in w.names()}
    t, hd, eps = len(ids), spec.head_dim, spec.rms_norm_eps
    pos = np.arange(t, dtype=np.float64)
    h = g["embed_tokens.weight"][ids] * spec.embedding_scale
    act = (lambda x: x / (1 + np.exp(-x))) if spec.activation == "silu" else (
        lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))))
    for i in range(spec.num_layers):
        p = f"layers.{i}."
        x = _rms(h, g[p + "input_norm.weight"], eps)
        proj = {n: x @ g[p + f"attn.{n}_proj.weight"].T
                + (g[p + f"attn.{n}_proj.bias"] if spec.qkv_bias else 0) for n in ("q", "k", "v")}
        q = proj["q"].reshape(t, spec.num_heads, hd)
        k = proj["k"].reshape(t, spec.num_kv_heads, hd)
        v = proj["v"].reshape(t, spec.num_kv_heads, hd)
        if spec.qk_norm:
            q, k = _rms(q, g[p + "attn.q_norm.weight"], eps), _rms(k, g[p + "attn.k_norm.weight"], eps)
        q, k = _rope(q, pos, spec.rope_for_layer(i)), _rope(k, pos, spec.rope_for_layer(i))
        rep = spec.num_heads // spec.num_kv_heads
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) * spec.scale
        if spec.attn_softcap:
            s = spec.attn_softcap * np.tanh(s / spec.attn_softcap)
        qi, ki = np.arange(t)[:, None], np.arange(t)[None, :]
        visible = ki <= qi
        if spec.layer_type(i) == "sliding":
            visible &= qi - ki < spec.sliding_window
        s = np.where(visible[None], s, -np.inf)
        prob = np.exp(s - s.max(-1, keepdims=True))
        prob /= prob.sum(-1, keepdims=True)
        a = np.einsum("hqk,khd->qhd", prob, v).reshape(t, -1) @ g[p + "attn.o_proj.weight"].T
        if spec.sandwich_norm:
            a = _rms(a, g[p + "post_attn_norm.weight"], eps)
        h = h + a
        x = _rms(h, g[p + "pre_mlp_norm.weight"], eps)
        m = (act(x @ g[p + "mlp.gate_proj.weight"].T) * (x @ g[p + "mlp.up_proj.weight"].T)) \
            @ g[p + "mlp.down_proj.weight"].T
        if spec.sandwich_norm:
            m = _rms(m, g[p + "post_mlp_norm.weight"], eps)
        h = h + m
    head = g["embed_tokens.weight"] if spec.tie_word_embeddings else g["lm_head.weight"]
    logits = _rms(h, g["norm.weight"], eps) @ head.T
    if spec.final_logit_softcap:
        logits = spec.final_logit_softcap * np.tanh(logits / spec.final_logit_softcap)
    return logits


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_numpy_forward_on_canonical_weights_matches_transformers(arch, loaded):
    import torch

    ckpt, model = loaded(arch)
    ids = [BOS, 37, 120, 5, 250, 99, 18, 77, 140, 201, 63, 8, 290, 45]  # crosses windows 4 and 8
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].double().numpy()
    got = numpy_logits(ckpt.spec, ckpt.weights, ids)
    assert want.std() > 0.5  # realistic magnitudes: logits are far from uniform
    np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max(), rtol=0)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tokenizer_info(arch, loaded, tiny_checkpoint):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    ckpt, _ = loaded(arch)
    info = ckpt.tokenizer
    assert info.chat_template == CHAT_TEMPLATE
    assert info.bos_token_id == BOS and info.pad_token_id == PAD
    assert info.eos_token_ids == (EOS, IM_END)
    assert info.add_bos_token == (arch in ADDS_BOS)
    assert info.generation_defaults == {"do_sample": True, "temperature": 0.7, "top_p": 0.9}
    ours = Tokenizer.from_str(info.tokenizer_json)
    ref = AutoTokenizer.from_pretrained(tiny_checkpoint(arch))
    for text in ["Hello, world!", "<|im_start|>user\nhi<|im_end|>\n", "  code: x = 42\n", ""]:
        assert ours.encode(text).ids == ref(text)["input_ids"], text


def test_add_bos_follows_tokenizer_json_like_transformers(tiny_checkpoint, tmp_path):
    """tokenizer_config.json's add_bos_token is not applied by transformers' generic tokenizer
    (tokenizer.json's post-processor decides); the reader reports the same."""
    import json
    import shutil

    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    for arch in ("llama", "qwen2"):  # adds BOS / does not
        dst = tmp_path / arch
        shutil.copytree(tiny_checkpoint(arch), dst)
        cfg = json.loads((dst / "tokenizer_config.json").read_text())
        cfg["add_bos_token"] = not cfg["add_bos_token"]
        (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
        info = load_checkpoint(dst).tokenizer
        ids = Tokenizer.from_str(info.tokenizer_json).encode("hi there").ids
        assert ids == AutoTokenizer.from_pretrained(dst)("hi there")["input_ids"]
        assert info.add_bos_token == (arch in ADDS_BOS) == (ids[0] == BOS)


def test_multimodal_gemma3_layout(tiny_checkpoint, tmp_path):
    """Gemma3ForConditionalGeneration folders: text config under text_config, language model
    tensors under model.language_model.*; vision tensors are ignored."""
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    src = tiny_checkpoint("gemma3")
    dst = tmp_path / "gemma3_mm"
    shutil.copytree(src, dst)
    text_cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": text_cfg,
                                                 "vision_config": {"hidden_size": 8}}))
    tensors = {k.replace("model.", "model.language_model.", 1): v
               for k, v in load_file(src / "model.safetensors").items()}
    tensors["model.vision_tower.patch_embed.weight"] = np.zeros((8, 3), np.float32)
    save_file(tensors, dst / "model.safetensors")
    text, mm = load_checkpoint(src), load_checkpoint(dst)
    assert mm.spec == text.spec
    for name in text.weights.names():
        np.testing.assert_array_equal(mm.weights.get(name), text.weights.get(name))
