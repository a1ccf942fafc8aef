"""tokenizers JSON -> GGUF vocabulary (edgeinfer.export.gguf_vocab), on small built tokenizers.

Whether llama.cpp tokenizes like the JSON is checked in tests/test_gguf_llama_cpp.py.
"""
from __future__ import annotations

import json

import pytest
from gguf import TokenType
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from edgeinfer.errors import CheckpointError
from edgeinfer.export.gguf_vocab import vocab_from_tokenizer_json

LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def byte_level(pre_tokenizer, n_extra_specials: int = 1) -> str:
    alpha = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alpha)}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False) if pre_tokenizer is None else pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([f"<|s{i}|>" for i in range(n_extra_specials)])
    tok.add_tokens(["<user>"])
    return tok.to_str()


def spm_bpe(prepend: bool = True) -> str:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for p in ["▁", "a", "b", "c", "▁a", "ab", "▁ab", "bc", "▁abc"]:
        vocab[p] = len(vocab)
    merges = [("▁", "a"), ("a", "b"), ("▁a", "b"), ("b", "c"), ("▁ab", "c")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    norms = ([normalizers.Prepend("▁")] if prepend else []) + [normalizers.Replace(" ", "▁")]
    tok.normalizer = normalizers.Sequence(norms)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return tok.to_str()


def test_byte_level_bpe_is_gpt2_with_merges_and_types():
    v = vocab_from_tokenizer_json(byte_level(None), 300)
    assert (v.model, v.pre, v.scores) == ("gpt2", "gpt-2", None)
    assert v.merges == ["Ġ t", "h e", "Ġt he"]
    assert v.tokens[256:259] == ["Ġt", "he", "Ġthe"]
    assert v.tokens[259:261] == ["<|s0|>", "<user>"]
    assert v.token_types[259] == TokenType.CONTROL and v.token_types[260] == TokenType.USER_DEFINED
    assert v.token_types[0] == TokenType.NORMAL
    assert v.tokens[261:] == [f"[PAD{i}]" for i in range(261, 300)]
    assert set(v.token_types[261:]) == {TokenType.UNUSED} and "39 unused" in v.notes[0]


@pytest.mark.parametrize("pre, name", [
    (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                              pre_tokenizers.ByteLevel(add_prefix_space=False)]), "smollm"),
    (pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_REGEX), "isolated"),
                              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), "llama-bpe"),
    (pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")), "isolated"),
                              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), "qwen2"),
])
def test_pre_tokenizer_names_llama_cpp_knows(pre, name):
    assert vocab_from_tokenizer_json(byte_level(pre), 300).pre == name


def test_unknown_pre_tokenizer_is_refused_unless_named():
    pre = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=False),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False)])
    with pytest.raises(CheckpointError, match="Digits.*pre-tokenizer name"):
        vocab_from_tokenizer_json(byte_level(pre), 300, where="x.json")
    assert vocab_from_tokenizer_json(byte_level(pre), 300, pre="gpt-2").pre == "gpt-2"


def test_sentencepiece_bpe_is_llama_with_rank_scores():
    v = vocab_from_tokenizer_json(spm_bpe(), 270)
    assert (v.model, v.pre, v.merges, v.add_space_prefix) == ("llama", "default", None, True)
    assert v.token_types[:3] == [TokenType.CONTROL] * 3
    assert set(v.token_types[3:259]) == {TokenType.BYTE} and v.tokens[3 + 0x41] == "<0x41>"
    assert v.token_types[259:268] == [TokenType.NORMAL] * 9
    assert v.scores[:3] == [-1000.0] * 3 and set(v.scores[3:259]) == {0.0}
    assert v.scores[259:268] == [-float(i) for i in range(9)]  # SentencePiece's -rank
    assert v.tokens[268:] == ["[PAD268]", "[PAD269]"]
    assert vocab_from_tokenizer_json(spm_bpe(prepend=False), 268).add_space_prefix is False


def test_unigram_keeps_its_scores():
    pieces = [("<unk>", 0.0), ("▁", -1.0), ("a", -2.0), ("▁ab", -1.5)]
    pieces += [(f"<0x{b:02X}>", 0.0) for b in range(256)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    v = vocab_from_tokenizer_json(tok.to_str(), len(pieces))
    assert v.model == "llama" and v.add_space_prefix is True and v.unk_id == 0
    assert v.scores[1:4] == [-1.0, -2.0, -1.5] and v.token_types[0] == TokenType.UNKNOWN
    assert v.token_types[4] == TokenType.BYTE


def test_unsupported_tokenizers_are_refused():
    wordlevel = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).to_str()
    with pytest.raises(CheckpointError, match="WordLevel"):
        vocab_from_tokenizer_json(wordlevel, 2)
    with pytest.raises(CheckpointError, match="beyond the model's vocab_size 100"):
        vocab_from_tokenizer_json(byte_level(None), 100)
    doc = json.loads(byte_level(None))
    doc["model"]["merges"] = []
    with pytest.raises(CheckpointError, match="without merges"):
        vocab_from_tokenizer_json(json.dumps(doc), 300)
    doc = json.loads(spm_bpe())
    doc["model"]["vocab"] = {k: i for k, i in doc["model"]["vocab"].items() if k != "<0x41>"}
    with pytest.raises(CheckpointError, match="255 <0xXX> byte tokens"):
        vocab_from_tokenizer_json(json.dumps(doc), 270)
    with pytest.raises(CheckpointError, match="not a valid tokenizers JSON"):
        vocab_from_tokenizer_json("{", 10)
