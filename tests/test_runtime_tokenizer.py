"""Tokenizer wrapper: incremental UTF-8-safe detokenization, chat templates in the sandbox,
BOS handling, stop strings."""
import numpy as np
import pytest

from edgeinfer.errors import BundleError, ConfigError
from edgeinfer.runtime.tokenizer import StopMatcher, Tokenizer

from runtime_models import CHATML, byte_bpe_tokenizer, spm_bpe_tokenizer

TEXT = "Hi 😀! 你好，世界 — café 👍🏽 日本語のテキスト. The end 🎉"


@pytest.fixture(scope="module", params=["byte_bpe", "spm_byte_fallback"])
def hf_tok(request):
    return byte_bpe_tokenizer() if request.param == "byte_bpe" else spm_bpe_tokenizer()


def stream(tok, ids):
    d = tok.detokenizer()
    pieces = [d.add(i) for i in ids]
    pieces.append(d.flush())
    return pieces


def test_stream_reassembles_multibyte_characters(hf_tok):
    tok = Tokenizer(hf_tok)
    ids = tok.encode(TEXT)
    # the test is only meaningful if some character is split across tokens
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    pieces = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == TEXT
    assert not any("\ufffd" in p for p in pieces)
    assert sum(bool(p) for p in pieces) > 5  # text arrives incrementally, not all at the end


def test_stream_equals_full_decode_on_random_text(hf_tok):
    tok = Tokenizer(hf_tok)
    rng = np.random.default_rng(0)
    alphabet = list("abc xyz.,!\n") + ["😀", "🎉", "你", "好", "é", "ü", "👍🏽", "日本", "—"]
    for _ in range(30):
        text = "".join(rng.choice(alphabet, 25))
        ids = tok.encode(text)
        assert "".join(stream(tok, ids)) == tok.decode(ids)


def test_stream_equals_full_decode_on_random_ids():
    # Byte-level BPE decodes bytes concatenatively, so even invalid UTF-8 streams exactly as a
    # full decode does. (SentencePiece byte fallback replaces a whole *group* of invalid byte
    # tokens, so there only valid text, above, streams identically.)
    hf = byte_bpe_tokenizer()
    tok = Tokenizer(hf)
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = [int(i) for i in rng.integers(0, hf.get_vocab_size(), 30)]
        assert "".join(stream(tok, ids)) == tok.decode(ids)


def test_add_accepts_several_tokens_at_once():
    tok = Tokenizer(byte_bpe_tokenizer())
    ids = tok.encode(TEXT)
    d = tok.detokenizer()
    out = "".join(d.add(ids[i:i + 3]) for i in range(0, len(ids), 3)) + d.flush()
    assert out == TEXT


def test_bos_added_once():
    hf = byte_bpe_tokenizer()
    bos = hf.token_to_id("<|endoftext|>")
    tok = Tokenizer(hf, bos_token_id=bos, add_bos_token=True)
    ids = tok.encode("Hello")
    assert ids[0] == bos and ids[1] != bos
    assert tok.encode("<|endoftext|>Hello") == ids  # special token text is recognised, not doubled
    assert tok.encode("Hello", add_bos=False)[0] != bos
    assert Tokenizer(hf, bos_token_id=bos).encode("Hello")[0] != bos


def test_chat_template_renders_chatml():
    hf = byte_bpe_tokenizer()
    tok = Tokenizer(hf, chat_template=CHATML, eos_token_ids=[hf.token_to_id("<|im_end|>")])
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"}]
    text = tok.render_chat(msgs)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = tok.encode_chat(msgs)
    assert ids[0] == hf.token_to_id("<|im_start|>") and ids.count(hf.token_to_id("<|im_end|>")) == 2
    assert not tok.render_chat(msgs, add_generation_prompt=False).endswith("assistant\n")


def test_chat_template_variables_and_helpers():
    hf = byte_bpe_tokenizer()
    t = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}"
         "{% endif %}{{ m | tojson }}{% endfor %}{{ eos_token }}")
    tok = Tokenizer(hf, chat_template=t, bos_token_id=0, eos_token_ids=[2])
    out = tok.render_chat([{"role": "user", "content": "é"}])
    assert out == '<|endoftext|>{"role": "user", "content": "é"}<|im_end|>'
    with pytest.raises(ConfigError, match="chat template: no tools"):
        tok.render_chat([{"role": "tool", "content": "x"}])


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",  # sandbox: no dunder access
    "{% set x = [] %}{{ x.append(1) }}",  # immutable: no mutation of objects
])
def test_chat_template_is_sandboxed(template):
    tok = Tokenizer(byte_bpe_tokenizer(), chat_template=template)
    with pytest.raises(ConfigError, match="chat template"):
        tok.render_chat([{"role": "user", "content": "x"}])


def test_chat_errors():
    hf = byte_bpe_tokenizer()
    with pytest.raises(ConfigError, match="no chat template"):
        Tokenizer(hf).render_chat([{"role": "user", "content": "x"}])
    tok = Tokenizer(hf, chat_template=CHATML)
    for bad, field in [([], "messages"), ([{"role": "user"}], r"messages\[0\].content"),
                       ([{"content": "x"}], r"messages\[0\].role"), (["hi"], r"messages\[0\]")]:
        with pytest.raises(ConfigError, match=field):
            tok.render_chat(bad)
    with pytest.raises(BundleError, match="does not compile"):
        Tokenizer(hf, chat_template="{% for %}").render_chat([{"role": "user", "content": "x"}])


def test_bad_tokenizer_file(tmp_path):
    p = tmp_path / "tokenizer.json"
    p.write_text("{not json")
    with pytest.raises(BundleError, match="tokenizer.json: not a valid tokenizers JSON"):
        Tokenizer.from_file(p)


def test_stop_matcher():
    m = StopMatcher(["END", "\n\n"])
    out = [m.feed(p) for p in ["Hello E", "N", "D of", " story"]]
    assert out == ["Hello ", "", "", ""] and m.hit == "END"
    m = StopMatcher(["END"])
    assert [m.feed(p) for p in ["Hello E", "Nx"]] == ["Hello ", "ENx"] and m.hit is None
    assert m.feed("ab") == "ab" and m.flush() == ""
    m = StopMatcher(["STOP"])
    assert m.feed("abc ST") == "abc " and m.flush() == "ST"  # held-back text is released at the end
    m = StopMatcher(["b", "ab"])
    assert m.feed("xab") == "x" and m.hit == "ab"  # earliest occurrence wins
    assert StopMatcher([]).feed("anything") == "anything"
