"""GGUF files written by edgeinfer, run by llama.cpp (llama-cpp-python).

* tiny random Hugging Face checkpoints (tests/tiny_models.py), read by edgeinfer's reader and
  written as F32 GGUF: llama.cpp's logits match transformers' for llama (llama3 rope scaling),
  llama_tied, qwen2, qwen3, gemma3 and phi3; those llama.cpp cannot run are refused;
* our Q8_0 / Q4_0 files equal llama.cpp's own quantization of our F32 file, byte for byte;
* quantized token embeddings read back through llama.cpp (``llama_model_get_tok_embd``,
  which dequantizes the loaded tensor with ggml) equal the values our encoder meant;
* llama.cpp tokenizes like the tokenizers JSON the GGUF vocabulary came from.
"""
from __future__ import annotations

import ctypes
import json

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf import quants as gq
from tokenizers import Regex, Tokenizer, pre_tokenizers

from edgeinfer.errors import CheckpointError
from edgeinfer.export.checkpoint import load_checkpoint
from edgeinfer.export.gguf_writer import write_gguf
from edgeinfer.quant.gguf_encoding import encode
from edgeinfer.quant.recipe import QuantRecipe
from edgeinfer.spec import RopeSpec, TokenizerInfo

from test_gguf_vocab import LLAMA3_REGEX, byte_level, spm_bpe
from test_gguf_writer import TOKENIZER, make_spec, random_weights

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
torch = pytest.importorskip("torch")
pytestmark = pytest.mark.llama


def load(path, **kw) -> "llama_cpp.Llama":
    return llama_cpp.Llama(str(path), n_ctx=128, n_threads=1, verbose=False, **kw)


def _gemma3_llama_cpp_compatible(path):
    """llama.cpp fixes Gemma 3's attention scale at 1/sqrt(head_dim) (query_pre_attn_scalar =
    head_dim, as in the released models); the shared tiny config uses 24 with head_dim 16."""
    cfg = json.loads((path / "config.json").read_text())
    cfg["query_pre_attn_scalar"] = cfg["head_dim"]
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("arch", ["llama", "llama_tied", "qwen2", "qwen3", "gemma3", "phi3"])
def test_tiny_checkpoint_round_trip(tmp_path, arch):
    """HF folder -> edgeinfer reader -> F32 GGUF -> llama.cpp logits == transformers logits."""
    tiny_models = pytest.importorskip("tiny_models")
    src = tiny_models.make_tiny_checkpoint(arch, tmp_path / "hf")
    if arch == "gemma3":
        _gemma3_llama_cpp_compatible(src)
    ckpt = load_checkpoint(src)
    info = write_gguf(ckpt.spec, ckpt.weights.get, ckpt.tokenizer, QuantRecipe(), tmp_path / "m.gguf")
    assert info.file_type == "ALL_F32"
    text = "The quick brown fox: 0123456789 verifies a tree in one pass!"
    tok = Tokenizer.from_str(ckpt.tokenizer.tokenizer_json)
    ids = tok.encode(text).ids  # with <s> where the checkpoint adds it
    llm = load(info.path, logits_all=True, type_k=0, type_v=0)  # GGML_TYPE_F32 KV cache (default F16)
    assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids
    assert len(ids) > 8  # longer than gemma3's sliding window of 4
    llm.eval(ids)
    ours = np.array(llm.scores[: len(ids)], dtype=np.float32)
    model = tiny_models.load_reference_model(src)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].float().numpy()
    # llama.cpp's CPU kernels round differently from torch's: measured max |diff| 4e-6 .. 2.4e-5
    # with max |logit| 5 .. 17, except gemma3 2.2e-3 at 10 (ggml's CPU GELU reads a float16
    # lookup table, GGML_GELU_FP16). A wrong layout or a missed convention gives errors of
    # the order of the logits.
    scale = np.abs(ref).max()
    tol = (5e-4 if ckpt.spec.activation == "gelu_tanh" else 2e-5) * scale
    assert np.abs(ours - ref).max() < tol, (np.abs(ours - ref).max(), scale)
    print(f"{arch}: max |llama.cpp - transformers| = {np.abs(ours - ref).max():.2e} (max |logit| {scale:.2f})")
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("arch, match", [("mistral", "sliding"), ("gemma3", "attn_scale")])
def test_tiny_checkpoints_llama_cpp_cannot_run_are_refused(tmp_path, arch, match):
    tiny_models = pytest.importorskip("tiny_models")
    ckpt = load_checkpoint(tiny_models.make_tiny_checkpoint(arch, tmp_path / "hf"))
    with pytest.raises(CheckpointError, match=match):
        write_gguf(ckpt.spec, ckpt.weights.get, ckpt.tokenizer, QuantRecipe(), tmp_path / "m.gguf")


@pytest.fixture(scope="module")
def get_tok_embd():
    """llama.cpp's staging API ``llama_model_get_tok_embd`` (C++ symbol, llama-ext.h)."""
    try:
        fn = getattr(llama_cpp.llama_cpp._lib, "_Z24llama_model_get_tok_embdPK11llama_modelPf")
    except AttributeError:
        pytest.skip("this llama.cpp build does not export llama_model_get_tok_embd; "
                    "tests/test_quant_gguf_ggml.py checks ggml's dequantizer directly")
    fn.restype = ctypes.c_uint32
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p]

    def read(path) -> np.ndarray:
        llm = load(path)
        n = fn(llm._model.model, None)
        out = np.zeros(n, np.float32)
        assert fn(llm._model.model, out.ctypes.data) == n
        return out

    return read


@pytest.mark.parametrize("fmt, int4_type, t", [("int8", None, T.Q8_0), ("int4", None, T.Q4_0),
                                               ("int4", "q4_1", T.Q4_1), ("int4", "q4_k", T.Q4_K)])
def test_quantized_embeddings_read_back_through_llama_cpp(tmp_path, get_tok_embd, fmt, int4_type, t):
    spec = make_spec("llama", hidden_size=256, num_heads=8, num_kv_heads=2, head_dim=32,
                     intermediate_size=512, rope=RopeSpec(10000.0, 32))
    w = random_weights(spec, seed=7)
    w["embed_tokens.weight"][5] = 0.0  # an all-zero row (8 zero blocks)
    info = write_gguf(spec, w.__getitem__, TOKENIZER, QuantRecipe(fmt, embed_format=fmt),
                      tmp_path / "e.gguf", int4_type=int4_type)
    assert info.tensor_types["token_embd.weight"] == t.name
    got = get_tok_embd(info.path).reshape(spec.vocab_size, spec.hidden_size)
    x = w["embed_tokens.weight"]
    want = gq.dequantize(encode(x, t), t)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got[5], 0.0)
    assert np.abs(got - x).max() < np.abs(x).max() / (100 if t is T.Q8_0 else 6)


@pytest.mark.parametrize("fmt, ftype", [("int8", "LLAMA_FTYPE_MOSTLY_Q8_0"), ("int4", "LLAMA_FTYPE_MOSTLY_Q4_0")])
def test_quantized_file_equals_llama_cpp_quantize_of_our_f32_file(tmp_path, fmt, ftype):
    """llama.cpp's own quantizer (llama_model_quantize, "pure": every 2-D tensor to the file
    type) applied to our F32 GGUF gives, tensor for tensor, the bytes of our quantized GGUF."""
    spec = make_spec("llama", hidden_size=256, num_heads=8, num_kv_heads=2, head_dim=32,
                     intermediate_size=512, rope=RopeSpec(10000.0, 32), tie_word_embeddings=False)
    w = random_weights(spec, seed=3)
    f32 = write_gguf(spec, w.__getitem__, TOKENIZER, QuantRecipe(), tmp_path / "f32.gguf").path
    ours = write_gguf(spec, w.__getitem__, TOKENIZER, QuantRecipe(fmt, embed_format=fmt),
                      tmp_path / "ours.gguf").path
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread, params.pure = getattr(llama_cpp, ftype), 1, True
    ref = tmp_path / "llama_cpp.gguf"
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(ref).encode(), ctypes.byref(params)) == 0
    a = {t.name: t for t in GGUFReader(ours).tensors}
    b = {t.name: t for t in GGUFReader(ref).tensors}
    assert set(a) == set(b)
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type, name
        np.testing.assert_array_equal(a[name].data, b[name].data, err_msg=name)
    assert {t.tensor_type for t in a.values() if len(t.shape) == 2} == {T.Q8_0 if fmt == "int8" else T.Q4_0}


TEXTS = ["Hello world", "the 12345 apples, 3.14 and 1000000!", "  leading   spaces\n\nnew lines\t tab",
         "héllo wörld — ünïcode ✅ 🦙", "they're we've I'LL", "abc ab abcd"]


@pytest.mark.parametrize("kind", ["gpt-2", "smollm", "llama-bpe", "spm"])
def test_llama_cpp_tokenizes_like_the_json(tmp_path, kind):
    if kind == "spm":
        js = spm_bpe()
    else:
        pre = {"gpt-2": None,
               "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False)]),
               "llama-bpe": pre_tokenizers.Sequence([
                   pre_tokenizers.Split(Regex(LLAMA3_REGEX), "isolated"),
                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])}[kind]
        js = byte_level(pre)
    tok = Tokenizer.from_str(js)
    spec = make_spec("llama", vocab_size=tok.get_vocab_size())
    info = write_gguf(spec, random_weights(spec).__getitem__, TokenizerInfo(js), QuantRecipe(),
                      tmp_path / "t.gguf")
    assert info.tokenizer_pre == ("default" if kind == "spm" else kind)
    llm = load(info.path, vocab_only=True)
    for text in TEXTS:
        want = tok.encode(text, add_special_tokens=False).ids
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == want, text
