"""The runtime on the real default model (SmolLM2-135M-Instruct, exported by the pipeline) against
transformers loading the same GGUF: greedy tokens, chat template, tokenizer, UTF-8 streaming."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow

MSGS = [{"role": "user", "content": "Write one sentence about the sea with an emoji and the word 海."}]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    from edgeinfer.models import default_model_path

    try:
        path = default_model_path("smollm2-135m-instruct")
    except Exception as e:
        pytest.skip(str(e))
    import edgeinfer
    from edgeinfer.export.pipeline import default_pair_config, export_bundle

    out = tmp_path_factory.mktemp("smol") / "bundle"
    export_bundle(default_pair_config(out))
    return path, edgeinfer.load(out, threads=2, max_context=512)


@pytest.fixture(scope="module")
def hf(smol):
    import torch
    import transformers as tf

    path = smol[0]
    tok = tf.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return tok, model.eval()


def test_chat_template_and_tokens_match_transformers(smol, hf):
    _, engine = smol
    tok, _ = hf
    text = tok.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=True)
    assert engine.tokenizer.render_chat(MSGS) == text
    assert engine.tokenizer.encode_chat(MSGS) == tok(text, add_special_tokens=False)["input_ids"]


def test_greedy_plain_and_speculative_match_transformers(smol, hf):
    import torch

    _, engine = smol
    tok, model = hf
    ids = engine.tokenizer.encode_chat(MSGS)
    steps = 24
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=steps, min_new_tokens=steps,
                             output_logits=True, return_dict_in_generate=True)
    ref = out.sequences[0, len(ids):].tolist()
    gaps = []
    for row in out.logits:
        top2 = np.sort(row[0].float().numpy())[-2:]
        gaps.append(float(top2[1] - top2[0]) / max(1.0, abs(float(top2[1]))))
    for mode, drafter in (("plain", None), ("tree", "model"), ("chain", "model"), ("tree", "ngram")):
        r = engine.generate(MSGS, max_new_tokens=steps, mode=mode, drafter=drafter, ignore_eos=True)
        for i, (a, b) in enumerate(zip(r.tokens, ref)):
            if a != b:
                assert gaps[i] <= 1e-3, (mode, drafter, i, r.tokens, ref)
                break
    assert r.stats.providers["target"] == "CPUExecutionProvider"
    # loading handed back the pages of the memory-mapped weights it read (release_file_pages);
    # the tokens above show that what the models read again faulted back in correctly
    assert engine.target.released_file_bytes > 0 and engine.runners["draft"].released_file_bytes > 0


def test_stream_utf8_with_real_tokenizer(smol):
    _, engine = smol
    text = "Sea 🌊 and 海 — naïve café 👍🏽 日本語"
    ids = engine.tokenizer.encode(text)
    assert any("\ufffd" in engine.tokenizer.decode([i]) for i in ids)  # characters split across tokens
    d = engine.tokenizer.detokenizer()
    pieces = [d.add(i) for i in ids] + [d.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    s = engine.stream(MSGS, max_new_tokens=16)
    assert "".join(s) == s.result.text == engine.tokenizer.decode(s.result.tokens)
