"""Tiny random Hugging Face checkpoints for unit tests (transformers + torch, CPU, seconds).

``make_tiny_checkpoint(arch, out_dir, seed=0)`` writes a folder like one from the Hub:
config.json, model.safetensors (sharded when asked), generation_config.json, a small
byte-level BPE tokenizer.json trained here (ChatML special tokens), tokenizer_config.json
with a chat template. Sizes: hidden 64, 4 heads / 2 kv heads, intermediate 128, 2-3 layers,
vocabulary ~300. Weights are drawn with realistic magnitudes (linear std 0.15, embeddings
std 0.5, norms around 1 in effective terms) so logits are far from uniform.

Architectures (TINY_ARCHS):
  llama       untied, llama3 rope scaling (factor 4, original context 64), 2 layers
  llama_tied  tied embeddings, plain rope, 3 layers
  mistral     sliding window 8 on every layer
  qwen2       q/k/v biases, tied, vocabulary padded past the tokenizer (like Qwen)
  qwen3       q/k norms, head_dim 32 (q_proj 128 wide), stored in bfloat16, 2 shards,
              chat template in chat_template.jinja
  gemma3      sandwich norms, (1 + w) norms, gelu_tanh, query_pre_attn_scalar 24,
              sliding window 4 on layers 0-1 (local rope 10000), full layer 2 with global
              rope 1e6 x linear factor 2, final logit softcap 10
  phi3        fused qkv_proj / gate_up_proj, partial rotary 0.5
"""
from __future__ import annotations

import json
from pathlib import Path

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]  # ids 0..4
PAD, BOS, EOS, IM_START, IM_END = range(5)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TINY_ARCHS = ("llama", "llama_tied", "mistral", "qwen2", "qwen3", "gemma3", "phi3")
ADDS_BOS = {"llama", "llama_tied", "mistral", "gemma3"}
VOCAB_PADDING = {"qwen2": 20}

_CORPUS = """The quick brown fox jumps over the lazy dog. Speculative decoding drafts tokens
with a small model and verifies them with a big one in a single pass. def forward(self, x):
    return self.proj(x) * 2 + 1  # numbers 0123456789 and 3.14159, 2026-11-22
Tokens, trees, branches: every accepted path ends with a bonus token from the target.
Hello, world! Bonjour le monde. Hallo Welt. <html><body>edge inference</body></html>
"""


def train_tokenizer():
    """A byte-level BPE ``tokenizers.Tokenizer`` with the ChatML specials at ids 0-4."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return tok


def _config(arch: str, vocab: int):
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
                  tie_word_embeddings=False)
    if arch == "llama":
        return tf.LlamaConfig(**common, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    if arch == "llama_tied":
        return tf.LlamaConfig(**{**common, "num_hidden_layers": 3, "tie_word_embeddings": True})
    if arch == "mistral":
        return tf.MistralConfig(**common, head_dim=16, sliding_window=8)
    if arch == "qwen2":
        return tf.Qwen2Config(**{**common, "tie_word_embeddings": True},
                              rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    if arch == "qwen3":
        return tf.Qwen3Config(**common, head_dim=32)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(
            **{**common, "num_hidden_layers": 3, "tie_word_embeddings": True}, head_dim=16,
            query_pre_attn_scalar=24, sliding_window=4, final_logit_softcapping=10.0,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}})
    if arch == "phi3":
        return tf.Phi3Config(**common, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    raise ValueError(f"unknown tiny arch {arch!r}; expected one of {TINY_ARCHS}")


def _randomize(model, arch: str) -> None:
    """Weights with magnitudes that make logits distinct (not transformers' std 0.02)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # Gemma stores w of (1 + w): keep the effective weight near 1
                base = 0.0 if arch == "gemma3" else 1.0
                p.copy_(base + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))


def make_tiny_checkpoint(arch: str, out_dir: Path, seed: int = 0,
                         max_shard_size: str | None = None) -> Path:
    """Write a tiny random checkpoint of ``arch`` into ``out_dir``; returns ``out_dir``."""
    import torch
    import transformers as tf

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    if arch in ADDS_BOS:
        from tokenizers import processors
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)])
    tok.save(str(out_dir / "tokenizer.json"))
    config = _config(arch, tok.get_vocab_size() + VOCAB_PADDING.get(arch, 0))
    torch.manual_seed(seed)
    model_cls = tf.Gemma3ForCausalLM if arch == "gemma3" else tf.AutoModelForCausalLM
    model = model_cls.from_config(config) if model_cls is tf.AutoModelForCausalLM else model_cls(config)
    _randomize(model, arch)
    if arch == "qwen3":
        model = model.to(torch.bfloat16)
        max_shard_size = max_shard_size or "100KB"
    model.generation_config = tf.GenerationConfig(
        bos_token_id=BOS, eos_token_id=[EOS, IM_END], pad_token_id=PAD,
        do_sample=True, temperature=0.7, top_p=0.9)
    # transformers 5 always writes safetensors (save_pretrained has no pickle path).
    model.save_pretrained(out_dir, max_shard_size=max_shard_size or "50GB")
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
               "eos_token": "<|im_end|>", "pad_token": "<pad>", "add_bos_token": arch in ADDS_BOS}
    if arch == "qwen3":
        (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    else:
        tok_cfg["chat_template"] = CHAT_TEMPLATE
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=1), encoding="utf-8")
    return out_dir


def load_reference_model(path: Path):
    """The transformers model of a tiny checkpoint, float32, eval mode."""
    import torch
    import transformers as tf

    cls = tf.Gemma3ForCausalLM if json.loads((Path(path) / "config.json").read_text()).get(
        "model_type") == "gemma3_text" else tf.AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=torch.float32).eval()


# -- GGUF copies in llama.cpp's layout (written here, independently of edgeinfer's readers) --
GGUF_ARCH = {"llama": "llama", "llama_tied": "llama", "mistral": "llama", "qwen2": "qwen2",
             "qwen3": "qwen3", "gemma3": "gemma3", "phi3": "phi3"}
_GGUF_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
               "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _llama_cpp_permute(w, n_head: int):
    """llama.cpp's convert script: interleave each head's two rotary halves row by row."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_layer_name(arch: str, rest: str) -> str:
    """HF 'mlp.down_proj.weight' (under model.layers.{i}.) -> GGUF 'ffn_down.weight'."""
    stem, kind = rest.rsplit(".", 1)
    if arch == "gemma3" and stem == "post_attention_layernorm":
        return f"post_attention_norm.{kind}"
    if stem == "post_attention_layernorm":
        return f"ffn_norm.{kind}"
    return {"pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}.get(
        stem, _GGUF_LAYER.get(stem, stem)) + "." + kind


def write_tiny_gguf(arch: str, hf_dir: Path, out_path: Path) -> Path:
    """A GGUF of a tiny checkpoint as llama.cpp's converter would write it: Q/K rows permuted
    for llama, Gemma norms with the 1 added, Phi-3 fusions kept, llama3 rope as rope_freqs,
    token_embd in F16 and ffn_down in Q8_0, gpt2 tokenizer metadata from tokenizer.json."""
    import gguf
    import numpy as np

    model = load_reference_model(hf_dir)
    cfg, g = model.config, GGUF_ARCH[arch]
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    w = gguf.GGUFWriter(str(out_path), g)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rp = cfg.rope_parameters
    if arch == "gemma3":
        full, local = rp["full_attention"], rp["sliding_attention"]
        w.add_rope_freq_base(full["rope_theta"])
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(full["factor"])
        w.add_rope_freq_base_swa(local["rope_theta"])
        w.add_sliding_window(cfg.sliding_window)
        w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    else:
        w.add_rope_freq_base(rp["rope_theta"])
        w.add_rope_dimension_count(int(hd * rp.get("partial_rotary_factor", 1.0)))
    if rp.get("rope_type") == "llama3":
        default = 1.0 / rp["rope_theta"] ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
        w.add_tensor("rope_freqs.weight", (default / model.model.rotary_emb.inv_freq.double().numpy())
                     .astype(np.float32))
    one = 1.0 if arch == "gemma3" else 0.0
    for name, t in sd.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name.startswith("model.layers."):
            i, rest = name[len("model.layers."):].split(".", 1)
            gname = f"blk.{i}.{_gguf_layer_name(arch, rest)}"
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight",
                     "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}[name]
        if g == "llama" and ".attn_q." in gname:
            t = _llama_cpp_permute(t, heads)
        elif g == "llama" and ".attn_k." in gname:
            t = _llama_cpp_permute(t, kv)
        if "norm" in gname:
            t = t + one
        if gname == "token_embd.weight":
            w.add_tensor(gname, t.astype(np.float16))
        elif gname.endswith("ffn_down.weight"):
            w.add_tensor(gname, gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, np.ascontiguousarray(t, dtype=np.float32))
    _add_gpt2_vocab(w, hf_dir, cfg.vocab_size, add_bos=arch in ADDS_BOS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(out_path)


def _add_gpt2_vocab(w, hf_dir: Path, n_vocab: int, add_bos: bool) -> None:
    import gguf

    doc = json.loads((Path(hf_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    by_id = {i: t for t, i in doc["model"]["vocab"].items()}
    special = {a["id"] for a in doc["added_tokens"] if a["special"]}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.UNUSED if i not in by_id
             else gguf.TokenType.NORMAL for i in range(n_vocab)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in doc["model"]["merges"]])
    w.add_bos_token_id(BOS)
    w.add_eos_token_id(IM_END)
    w.add_pad_token_id(PAD)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(CHAT_TEMPLATE)
