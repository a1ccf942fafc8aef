"""Real models: our GGUF of SmolLM2-135M-Instruct (and Gemma 3 270M) run by llama.cpp.

References: transformers loading the *source* GGUF itself (dequantized to float32, no
edgeinfer code), and our ONNX export at the matching precision. Our GGUFs are written from
edgeinfer's reader (``load_checkpoint``). Greedy agreement rule (DESIGN.md section 5):
identical tokens, or at the first difference the reference's top-2 logits are within 1e-3
relative. Q8_0 in llama.cpp also quantizes activations to 8 bits: against the fp32 model it is
held to a teacher-forced top-1 agreement; against our int8 ONNX export of the same Q8_0 weights
(8-bit activations too) to the near-tie rule with the margin of 8-bit activations.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
from tokenizers import Tokenizer

from edgeinfer.errors import CheckpointError
from edgeinfer.export.checkpoint import load_checkpoint
from edgeinfer.export.gguf_writer import write_gguf
from edgeinfer.models import default_model_path
from edgeinfer.quant.recipe import QuantRecipe
from edgeinfer.runtime import reference_decode as rd

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.slow, pytest.mark.llama]

N_NEW = 32
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "List three prime numbers bigger than 100.",
             "Explain what a token tree is in speculative decoding."]


def _path(key):
    try:
        return default_model_path(key)
    except CheckpointError as e:
        pytest.skip(str(e))


def near_tie_agree(ours, ref, ref_logits_at) -> tuple[bool, str]:
    """DESIGN.md rule; ``ref_logits_at(i)`` gives the reference's logits before token i."""
    i = next((k for k, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
    if i is None:
        return True, "identical"
    top = np.sort(ref_logits_at(i))[::-1]
    gap = (top[0] - top[1]) / abs(top[0])
    return gap <= 1e-3, f"first difference at {i}, reference top-2 gap {gap:.1e}"


def llama_greedy(llm, ids, eos) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    while len(out) < N_NEW:
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        if out[-1] in eos:
            break
        llm.eval([out[-1]])
    return out


def teacher_forced_agreement(llm, ids, continuation) -> float:
    """Share of positions where llama.cpp's argmax is the reference's next token."""
    llm.reset()
    llm.eval(ids + continuation[:-1])
    logits = np.array(llm.scores[len(ids) - 1: len(ids) - 1 + len(continuation)])
    return float((logits.argmax(-1) == np.array(continuation)).mean())


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    src = _path("smollm2-135m-instruct")
    ckpt = load_checkpoint(src)
    tok = Tokenizer.from_str(ckpt.tokenizer.tokenizer_json)
    hf_tok = transformers.AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name,
                                                              dtype=torch.float32).eval()
    texts = [hf_tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                        add_generation_prompt=True) for q in QUESTIONS]
    eos = tuple(ckpt.tokenizer.eos_token_ids)
    prompts, refs = [], []
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False).ids
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=N_NEW, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True, eos_token_id=list(eos))
        prompts.append(ids)
        refs.append((out.sequences[0, len(ids):].tolist(), torch.stack(out.scores)[:, 0].float().numpy()))
    tmp = tmp_path_factory.mktemp("smol_gguf")
    files = {fmt: write_gguf(ckpt.spec, ckpt.weights.get, ckpt.tokenizer,
                             QuantRecipe(fmt, embed_format=fmt), tmp / f"{fmt}.gguf")
             for fmt in ("fp16", "int8")}
    return dict(ckpt=ckpt, texts=texts, prompts=prompts, refs=refs, eos=eos, files=files, tmp=tmp)


def _llm(path, **kw):
    return llama_cpp.Llama(str(path), n_ctx=512, logits_all=True, n_threads=2, verbose=False, **kw)


def test_smollm2_f16_greedy_matches_transformers(smol):
    info = smol["files"]["fp16"]
    assert (info.file_type, info.tokenizer_pre) == ("MOSTLY_F16", "smollm")
    llm = _llm(info.path)
    for text, ids, (ref, scores) in zip(smol["texts"], smol["prompts"], smol["refs"]):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        ok, why = near_tie_agree(llama_greedy(llm, ids, smol["eos"]), ref, lambda i: scores[i])
        assert ok, why  # measured: identical on all four prompts (32 tokens or up to EOS)


def test_smollm2_q8_0_tracks_transformers(smol):
    info = smol["files"]["int8"]
    assert info.file_type == "MOSTLY_Q8_0" and set(info.tensor_types.values()) == {"Q8_0", "F32"}
    llm = _llm(info.path)
    rates = [teacher_forced_agreement(llm, ids, ref) for ids, (ref, _) in zip(smol["prompts"], smol["refs"])]
    # measured 0.875 / 0.906 / 0.963 / 0.969 (greedy output diverges after 0-15 tokens: at
    # position 0 of the first prompt the fp32 model's top-2 gap is 3.2e-3)
    assert min(rates) >= 0.8 and np.mean(rates) >= 0.88, rates


def test_smollm2_q8_0_equals_llama_cpp_quantize(smol):
    """Our Q8_0 file holds exactly the tensors llama.cpp's quantizer makes from our F32 file."""
    ckpt, tmp = smol["ckpt"], smol["tmp"]
    f32 = write_gguf(ckpt.spec, ckpt.weights.get, ckpt.tokenizer, QuantRecipe(), tmp / "f32.gguf").path
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread, params.pure = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, 2, True
    ref = tmp / "llama_cpp_q8_0.gguf"
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(ref).encode(), ctypes.byref(params)) == 0
    f32.unlink()
    from gguf import GGUFReader

    ours = {t.name: t for t in GGUFReader(smol["files"]["int8"].path).tensors}
    theirs = {t.name: t for t in GGUFReader(ref).tensors}
    assert set(ours) == set(theirs)
    for name, t in ours.items():
        assert t.tensor_type == theirs[name].tensor_type, name
        np.testing.assert_array_equal(t.data, theirs[name].data, err_msg=name)
    ref.unlink()


def test_smollm2_gguf_reads_back(smol):
    """edgeinfer's reader on our F16 file: same spec, tokenizer data, fp16-rounded weights
    (the reader undoes the Q/K interleaving the writer applied)."""
    ckpt = smol["ckpt"]
    back = load_checkpoint(smol["files"]["fp16"].path)
    assert back.spec == ckpt.spec
    for field in ("chat_template", "bos_token_id", "add_bos_token"):
        assert getattr(back.tokenizer, field) == getattr(ckpt.tokenizer, field), field
    assert back.tokenizer.eos_token_ids[0] == ckpt.tokenizer.eos_token_ids[0]
    names = ["embed_tokens.weight", "norm.weight"] + [
        f"layers.{i}.{n}.weight" for i in (0, 17, 29) for n in
        ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "input_norm", "mlp.down_proj")]
    for name in names:
        w = ckpt.weights.get(name)
        want = w if w.ndim == 1 else w.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(back.weights.get(name), want, err_msg=name)


def _onnx_logits_at(sess, spec, ids, ref):
    """The ONNX model's logits before token i of ``ref`` (a fresh prefill of ids + ref[:i])."""
    def at(i):
        pre = ids + ref[:i]
        return rd.run_tree(sess, spec, rd.empty_kv(spec), pre, list(range(-1, len(pre) - 1)), 0,
                           logits_index=[len(pre) - 1]).logits[-1]
    return at


def test_smollm2_f16_gguf_agrees_with_our_fp16_onnx(smol):
    onnx_builder = pytest.importorskip("edgeinfer.export.onnx_builder")
    ckpt, tmp = smol["ckpt"], smol["tmp"]
    onnx = onnx_builder.build_model_onnx(ckpt.spec, ckpt.weights.get, QuantRecipe("fp16", embed_format="fp16"),
                                         tmp / "fp16.onnx").path
    sess = rd.make_session(onnx, threads=2)
    llm = _llm(smol["files"]["fp16"].path)
    for ids in smol["prompts"]:
        ref = rd.greedy_decode_session(sess, ckpt.spec, ids, N_NEW, smol["eos"])
        ok, why = near_tie_agree(llama_greedy(llm, ids, smol["eos"]), ref, _onnx_logits_at(sess, ckpt.spec, ids, ref))
        assert ok, why  # measured: identical on all four prompts


# Near-tie margin where BOTH sides quantize activations to 8 bits per 32-block (llama.cpp's
# Q8_0 x Q8_0 dot products; MatMulNBits at accuracy_level 4), each rounding differently: measured
# on SmolLM2 the two int8 kernels' logits differ by 0.97 (median over positions of the largest
# difference over the vocabulary, up to 2.7), about 5e-2 of the top logit, so a relative top-2
# gap below 2.5e-2 is a numeric tie at this precision (fp32/fp16 keep DESIGN.md's 1e-3).
INT8_ACTIVATION_MARGIN = 2.5e-2


def test_smollm2_q8_0_gguf_agrees_with_our_int8_onnx(smol):
    """Same weights on both sides: our ONNX int8 export *of our Q8_0 GGUF* (affine int8 blocks
    hold the Q8_0 grid exactly) against llama.cpp running that GGUF with an f32 KV cache (ours
    is f32; llama.cpp's default f16 cache adds its own rounding). Greedy output: identical or a
    first difference at a near-tie; teacher-forced along our greedy output, every position
    where llama.cpp's argmax differs is a near-tie too."""
    onnx_builder = pytest.importorskip("edgeinfer.export.onnx_builder")
    from edgeinfer.quant.recipe import WeightFormat

    tmp = smol["tmp"]
    q8 = load_checkpoint(smol["files"]["int8"].path)
    recipe = QuantRecipe(WeightFormat.INT8, affine=True, embed_format=WeightFormat.INT8)
    onnx = onnx_builder.build_model_onnx(q8.spec, q8.weights.get, recipe, tmp / "q8_0_int8.onnx").path
    sess = rd.make_session(onnx, threads=2)
    llm = _llm(smol["files"]["int8"].path, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    identical, same, positions = 0, 0, 0
    for ids in smol["prompts"]:
        ref = rd.greedy_decode_session(sess, q8.spec, ids, N_NEW, smol["eos"])
        theirs = llama_greedy(llm, ids, smol["eos"])
        i = next((k for k, (a, b) in enumerate(zip(theirs, ref)) if a != b), None)
        if i is None:
            assert theirs == ref
            identical += 1
        else:
            top = np.sort(_onnx_logits_at(sess, q8.spec, ids, ref)(i))[::-1]
            gap = (top[0] - top[1]) / abs(top[0])
            assert gap <= INT8_ACTIVATION_MARGIN, f"first difference at {i}: our top-2 gap {gap:.1e}"
        seq = ids + ref
        ours = rd.run_tree(sess, q8.spec, rd.empty_kv(q8.spec), seq, list(range(-1, len(seq) - 1)), 0,
                           logits_index=list(range(len(ids) - 1, len(seq) - 1))).logits
        llm.reset()
        llm.eval(seq)
        their_logits = np.array(llm.scores[len(ids) - 1: len(seq) - 1])
        for k in np.flatnonzero(ours.argmax(-1) != their_logits.argmax(-1)):
            a, b = int(ours[k].argmax()), int(their_logits[k].argmax())
            gap = (ours[k, a] - ours[k, b]) / abs(ours[k, a])
            assert gap <= INT8_ACTIVATION_MARGIN, f"position {k}: tokens {a} vs {b}, our gap {gap:.1e}"
        same += int((ours.argmax(-1) == their_logits.argmax(-1)).sum())
        positions += len(ref)
    # measured: 2 of 4 prompts identical (32 tokens or EOS), the others first differ at near-ties;
    # teacher-forced 0.88 / 0.93 / 1.0 / 0.94 of positions agree, every other one a near-tie
    assert identical >= 2 and same / positions >= 0.9, (identical, same, positions)


GEMMA_TEXTS = ["The capital of France is", "def fibonacci(n):\n    ",
               "Once upon a time, in a   land far away"]


def test_gemma3_f16_greedy_matches_transformers(tmp_path):
    src = _path("gemma3-270m")
    ckpt = load_checkpoint(src)
    info = write_gguf(ckpt.spec, ckpt.weights.get, ckpt.tokenizer, QuantRecipe("fp16", embed_format="fp16"),
                      tmp_path / "gemma3.gguf")
    assert (info.arch, info.tokenizer_model) == ("gemma3", "llama")
    tok = Tokenizer.from_str(ckpt.tokenizer.tokenizer_json)
    llm = _llm(info.path)
    for text in GEMMA_TEXTS + ["Números: 12345 — ünïcode ✅ 🦙 <b>bold</b>\n\n\tindent"]:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok.encode(text).ids, text
    model = transformers.AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name,
                                                              dtype=torch.float32).eval()
    for text in GEMMA_TEXTS:
        ids = tok.encode(text).ids
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True)
        ref, scores = out.sequences[0, len(ids):].tolist(), torch.stack(out.scores)[:, 0].float().numpy()
        llm.reset()
        llm.eval(ids)
        ours = []
        for _ in range(len(ref)):
            ours.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([ours[-1]])
        ok, why = near_tie_agree(ours, ref, lambda i: scores[i])
        assert ok, why
