"""Tiny random models for the runtime tests: ONNX graphs from the exporter's graph builder with
random weights, and an independent greedy decode that uses onnxruntime directly (full sequence
every step, no KV cache, no edgeinfer runtime code)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgeinfer.quant.recipe import QuantRecipe
from edgeinfer.spec import ModelSpec, RopeSpec

NEG = float(np.finfo(np.float32).min)


def tiny_spec(layers: int = 2, kv_heads: int = 2, sliding_window: int | None = None,
              vocab: int = 256, max_position: int = 512) -> ModelSpec:
    if sliding_window:  # gemma3-like: sliding layers, one full layer
        return ModelSpec(arch="gemma3", vocab_size=vocab, hidden_size=64, intermediate_size=128,
                         num_layers=layers, num_heads=4, num_kv_heads=kv_heads, head_dim=16,
                         rms_norm_eps=1e-6, max_position=max_position, rope=RopeSpec(1e6, 16),
                         rope_local=RopeSpec(1e4, 16), tie_word_embeddings=True, qk_norm=True,
                         sandwich_norm=True, activation="gelu_tanh", embedding_scale=8.0,
                         layer_types=tuple("full" if (i + 1) % 3 == 0 else "sliding" for i in range(layers)),
                         sliding_window=sliding_window)
    return ModelSpec(arch="llama", vocab_size=vocab, hidden_size=64, intermediate_size=128,
                     num_layers=layers, num_heads=4, num_kv_heads=kv_heads, head_dim=16,
                     rms_norm_eps=1e-5, max_position=max_position, rope=RopeSpec(10000.0, 16))


def random_weights(spec: ModelSpec, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, hd, it = spec.hidden_size, spec.head_dim, spec.intermediate_size
    shapes = {
        "embed_tokens.weight": (spec.vocab_size, h), "lm_head.weight": (spec.vocab_size, h),
        "norm.weight": (h,), "q_proj.weight": (spec.num_heads * hd, h),
        "k_proj.weight": (spec.num_kv_heads * hd, h), "v_proj.weight": (spec.num_kv_heads * hd, h),
        "o_proj.weight": (h, spec.num_heads * hd), "q_norm.weight": (hd,), "k_norm.weight": (hd,),
        "gate_proj.weight": (it, h), "up_proj.weight": (it, h), "down_proj.weight": (h, it),
    }
    out = {}
    for name in spec.tensor_names():
        key = name if name in shapes else name.split(".", 3)[-1]
        shape = shapes.get(key, (h,))  # remaining: per-layer norms [hidden]
        if name.endswith("norm.weight"):
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name in ("embed_tokens.weight", "lm_head.weight"):
            w = rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) / np.sqrt(shape[1])
        out[name] = w.astype(np.float32)
    return out


def build_tiny_onnx(spec: ModelSpec, out_dir: Path, seed: int = 0, name: str = "model.onnx",
                    in_place: bool = False) -> Path:
    """The fp32 graph of ``spec`` with random weights; ``in_place``: GroupQueryAttention with the
    in-place KV layout (what exports write), else the standard Attention."""
    from edgeinfer.export.onnx_builder import build_model_onnx
    from edgeinfer.export.onnx_layers import GraphOptions

    weights = random_weights(spec, seed)
    path = Path(out_dir) / name
    options = GraphOptions(attention="gqa", kv_in_place=True) if in_place else GraphOptions()
    build_model_onnx(spec, weights.__getitem__, QuantRecipe(), path, options=options)
    return path


def raw_logits(sess: ort.InferenceSession, spec: ModelSpec, tokens: list[int]) -> np.ndarray:
    """Logits float32 [n, vocab] of a full causal pass over ``tokens`` with an empty past."""
    n = len(tokens)
    causal = np.where(np.tri(n, dtype=bool), 0.0, NEG).astype(np.float32)[None, None]
    pos = np.arange(n, dtype=np.int64)
    feed = {"input_ids": np.array([tokens], dtype=np.int64), "position_ids": pos[None],
            "attention_bias": causal, "logits_index": np.arange(n, dtype=np.int64)}
    if spec.has_sliding_layers:
        far = (pos[:, None] - pos[None, :]) >= spec.sliding_window
        feed["attention_bias_sliding"] = np.where(far[None, None], np.float32(NEG), causal)
    empty = np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), dtype=np.float32)
    for i in range(spec.num_layers):
        feed[f"past_key.{i}"] = empty
        feed[f"past_value.{i}"] = empty
    return sess.run(["logits"], feed)[0][0]


def raw_greedy(onnx_path: Path | ort.InferenceSession, spec: ModelSpec, prompt: list[int],
               steps: int) -> tuple[list[int], list[float]]:
    """Greedy continuation and, per step, the relative gap (top1 - top2) / max(1, |top1|)."""
    sess = (onnx_path if isinstance(onnx_path, ort.InferenceSession)
            else ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]))
    toks, gaps = list(prompt), []
    for _ in range(steps):
        row = raw_logits(sess, spec, toks)[-1]
        top2 = np.sort(row)[-2:]
        gaps.append(float(top2[1] - top2[0]) / max(1.0, abs(float(top2[1]))))
        toks.append(int(np.argmax(row)))
    return toks[len(prompt):], gaps


def same_or_near_tie(got: list[int], ref: list[int], gaps: list[float], tol: float = 1e-3) -> bool:
    """DESIGN.md section 5: identical, or at the first difference the reference's top-2 logits
    are within a small margin."""
    for i, (a, b) in enumerate(zip(got, ref)):
        if a != b:
            return gaps[i] <= tol
    return len(got) == len(ref)


# -- tokenizers and bundles ------------------------------------------------------------------

CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog. 你好，世界！日本語のテキスト。",
    "Emoji: 😀 🎉 👍🏽 and accents: café naïve über. Numbers 12345.",
] * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")


def byte_bpe_tokenizer(vocab_size: int = 300):
    """GPT-2 style byte-level BPE trained on CORPUS: CJK and emoji span several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def spm_bpe_tokenizer(vocab_size: int = 400):
    """SentencePiece-style BPE (Metaspace, byte fallback): characters outside the vocab become
    <0xNN> byte tokens (plain vocab entries, as in Llama/Gemma tokenizer.json files)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([c.replace("\U0001f600", "").replace("\U0001f389", "") for c in CORPUS], trainer)
    doc = json.loads(tok.to_str())
    vocab = doc["model"]["vocab"]
    for i in range(256):
        vocab.setdefault(f"<0x{i:02X}>", len(vocab))
    doc["model"]["byte_fallback"] = True
    return Tokenizer.from_str(json.dumps(doc))


def make_bundle(root: Path, spec: ModelSpec, seed: int = 0, draft_layers: int | None = None,
                chat_template: str | None = CHATML, eos: str = "<|im_end|>") -> Path:
    """A complete bundle: tokenizer (byte BPE), chat template, target graph and optionally a
    first-k-layers draft of the same weights; manifest with sizes and checksums."""
    from edgeinfer.bundle import Manifest, ModelEntry, file_entries, write_manifest
    from edgeinfer.export.onnx_builder import build_model_onnx

    root = Path(root)
    tok = byte_bpe_tokenizer()
    assert tok.get_vocab_size() <= spec.vocab_size
    root.mkdir(parents=True)
    tok.save(str(root / "tokenizer.json"))
    if chat_template:
        (root / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    weights = random_weights(spec, seed)
    models = {}
    roles = [("target", spec)] + ([("draft", spec.truncated(draft_layers))] if draft_layers else [])
    for role, s in roles:
        (root / role).mkdir()
        build_model_onnx(s, weights.__getitem__, QuantRecipe(), root / role / "model.onnx")
        models[role] = ModelEntry(spec=s, quant=QuantRecipe().to_dict(), onnx=f"{role}/model.onnx")
    manifest = Manifest(models=models, chat_template_file="chat_template.jinja" if chat_template else None,
                        eos_token_ids=(tok.token_to_id(eos),), files=file_entries(root),
                        created_by="tests")
    write_manifest(root, manifest)
    return root
