"""Rebuild a ``tokenizers`` document (tokenizer.json) from a GGUF vocabulary, encoding
exactly like llama.cpp does with the same file.

* ``tokenizer.ggml.model == "gpt2"``: byte-level BPE with the file's merges; the
  pre-tokenizer comes from ``tokenizer.ggml.pre`` (the original tokenizer.json regexes).
* ``"llama"`` (SentencePiece, e.g. Gemma 3): llama.cpp merges adjacent pieces greedily by
  the *score* of the merged piece and falls back to ``<0xXX>`` byte tokens. That is a BPE
  whose merge list is every (left, right) split of a vocabulary piece, ranked by the piece's
  score, with ``byte_fallback``; spaces become U+2581 and, when ``add_space_prefix``, every
  text fragment gets a leading one (llama.cpp adds it after each special token too).

Control tokens become special added tokens and user-defined ones plain added tokens; both
are matched in the raw text before normalisation, like llama.cpp does. The post-processor
adds BOS/EOS when the file says so.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CASED = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+{c}"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*{c}")
_TEKKEN = _CASED.replace("{c}", "") + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_GPT4O = (_CASED.replace("{c}", r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?")
          + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class PreTok:
    split: str | None = None  # regex split before byte-level mapping; None: the GPT-2 regex
    digits: bool = False  # split digits one by one first (StarCoder / SmolLM)
    ignore_merges: bool = False  # a whole pre-token found in the vocab is kept as is
    add_bos: bool = False  # llama.cpp's default when the file has no add_bos_token


def _group(names: str, pre: PreTok) -> dict[str, PreTok]:
    return {n: pre for n in names.split()}


# tokenizer.ggml.pre -> pre-tokenizer, grouped the way llama.cpp groups them. The regexes are
# the models' original tokenizer.json ones; llama.cpp rewrites the cased (gpt-4o / tekken)
# ones without \p{M}, so it differs from the originals (and from us) on a combining mark that
# follows a non-letter. tests/test_tokenizer_gguf.py checks every name against llama.cpp.
PRE_TOKENIZERS: dict[str, PreTok] = {
    **_group("gpt-2 phi-2 mpt olmo jais exaone4 mellum", PreTok()),
    **_group("smollm starcoder refact command-r codeshell exaone minerva-7b", PreTok(digits=True)),
    **_group("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2",
             PreTok(_LLAMA3, ignore_merges=True, add_bos=True)),
    **_group("dbrx smaug-bpe", PreTok(_LLAMA3)),
    **_group("qwen2 deepseek-r1-qwen stablelm2 megrez hunyuan kormo", PreTok(_QWEN2)),
    "tekken": PreTok(_TEKKEN, ignore_merges=True, add_bos=True),
    **_group("gpt-4o llama4", PreTok(_GPT4O)),
}
# End-of-generation tokens llama.cpp recognises by name (when they are control tokens).
EOG_NAMES = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
             "<|eom_id|>", "<|end_of_text|>", "<EOT>")


@dataclass(frozen=True)
class GGUFVocab:
    model: str  # tokenizer.ggml.model: "gpt2" | "llama"
    pre: str | None
    tokens: Sequence[str]
    types: Sequence[int]
    scores: Sequence[float] | None
    merges: Sequence[str] | None
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    arch: str

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], tokens: list[str], types: list[int] | None,
                      scores: list[float] | None, merges: list[str] | None, where: str) -> "GGUFVocab":
        model = meta.get("tokenizer.ggml.model")
        pre = meta.get("tokenizer.ggml.pre")
        if model == "gpt2":
            if pre not in PRE_TOKENIZERS:
                raise CheckpointError(f"{where}: tokenizer.ggml.pre={pre!r} is not supported; "
                                      f"supported: {', '.join(sorted(PRE_TOKENIZERS))}")
            default_bos, default_prefix = PRE_TOKENIZERS[pre].add_bos, False
            if not merges:
                raise CheckpointError(f"{where}: BPE vocabulary without 'tokenizer.ggml.merges'")
        elif model == "llama":
            default_bos, default_prefix = True, True
            if not scores or len(scores) != len(tokens):
                raise CheckpointError(f"{where}: SentencePiece vocabulary needs one "
                                      "'tokenizer.ggml.scores' entry per token")
        else:
            raise CheckpointError(f"{where}: tokenizer.ggml.model={model!r} is not supported "
                                  "(supported: gpt2, llama)")
        types = list(types) if types else [NORMAL] * len(tokens)
        if len(types) != len(tokens):
            raise CheckpointError(f"{where}: tokenizer.ggml.token_type has {len(types)} entries, "
                                  f"expected {len(tokens)}")

        def tid(key: str) -> int | None:
            v = meta.get(f"tokenizer.ggml.{key}")
            if v is None:
                return None
            if not 0 <= int(v) < len(tokens):
                raise CheckpointError(f"{where}: tokenizer.ggml.{key}={v} is outside the vocabulary")
            return int(v)

        return cls(model=model, pre=pre, tokens=tokens, types=types, scores=scores, merges=merges,
                   bos_id=tid("bos_token_id"), eos_id=tid("eos_token_id"),
                   unk_id=tid("unknown_token_id"),
                   add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", default_bos)),
                   add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
                   add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", default_prefix)),
                   arch=str(meta.get("general.architecture", "")))


def end_of_generation_ids(vocab: GGUFVocab, meta: dict[str, Any]) -> tuple[int, ...]:
    """EOS, then eot/eom ids, then control tokens llama.cpp treats as end of generation."""
    ids = [vocab.eos_id] + [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
    ids += [i for i, (t, ty) in enumerate(zip(vocab.tokens, vocab.types))
            if ty == CONTROL and t in EOG_NAMES]
    out: list[int] = []
    for i in ids:
        if i is not None and int(i) not in out:
            out.append(int(i))
    return tuple(out)


def _added_tokens(vocab: GGUFVocab) -> list[dict[str, Any]]:
    # llama.cpp strips spaces right of Phi-3's special tokens, except these
    rstrip = vocab.arch == "phi3"
    keep = {"<unk>", "<s>", "<|endoftext|>"}
    out = []
    for i, (tok, ty) in enumerate(zip(vocab.tokens, vocab.types)):
        if ty in (CONTROL, USER_DEFINED, UNKNOWN) or (rstrip and tok == "</s>"):
            out.append({"id": i, "content": tok, "single_word": False, "lstrip": False,
                        "rstrip": rstrip and tok not in keep, "normalized": False,
                        "special": ty != USER_DEFINED})
    return out


def _post_processor(vocab: GGUFVocab) -> dict[str, Any] | None:
    ends = [(vocab.add_bos, vocab.bos_id, 0), (vocab.add_eos, vocab.eos_id, -1)]
    specials = {vocab.tokens[i]: {"id": vocab.tokens[i], "ids": [i], "tokens": [vocab.tokens[i]]}
                for on, i, _ in ends if on and i is not None}
    if not specials:
        return None

    def seq(name: str, type_id: int) -> list[dict[str, Any]]:
        s: list[dict[str, Any]] = [{"Sequence": {"id": name, "type_id": type_id}}]
        if vocab.add_bos and vocab.bos_id is not None:
            s.insert(0, {"SpecialToken": {"id": vocab.tokens[vocab.bos_id], "type_id": type_id}})
        if vocab.add_eos and vocab.eos_id is not None:
            s.append({"SpecialToken": {"id": vocab.tokens[vocab.eos_id], "type_id": type_id}})
        return s

    return {"type": "TemplateProcessing", "single": seq("A", 0), "pair": seq("A", 0) + seq("B", 1),
            "special_tokens": specials}


def _bpe_model(vocab: GGUFVocab, merges: list[list[str]], **extra: Any) -> dict[str, Any]:
    ids: dict[str, int] = {}
    for i, t in enumerate(vocab.tokens):
        ids.setdefault(t, i)  # duplicate spellings: the first id wins, as in llama.cpp
    return {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            "ignore_merges": False, "vocab": ids, "merges": merges, **extra}


def _gpt2_parts(vocab: GGUFVocab, where: str) -> dict[str, Any]:
    pre = PRE_TOKENIZERS[vocab.pre]
    merges = []
    for m in vocab.merges or ():
        left, sep, right = m.partition(" ")
        if not sep:
            raise CheckpointError(f"{where}: merge {m!r} is not 'left right'")
        merges.append([left, right])
    steps: list[dict[str, Any]] = []
    if pre.digits:
        steps.append({"type": "Digits", "individual_digits": True})
    if pre.split:
        steps.append({"type": "Split", "pattern": {"Regex": pre.split}, "behavior": "Isolated",
                      "invert": False})
    steps.append({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": pre.split is None})
    return {"normalizer": None,
            "pre_tokenizer": steps[0] if len(steps) == 1 else {"type": "Sequence", "pretokenizers": steps},
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                        "use_regex": True},
            "model": _bpe_model(vocab, merges, ignore_merges=pre.ignore_merges)}


def spm_merges(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> list[list[str]]:
    """Every (left, right) split of a piece into two vocabulary pieces, best score first.

    llama.cpp merges the adjacent pair whose joined text has the highest score; ranking each
    pair by its joined piece's score reproduces that. Byte tokens are never merge results.
    """
    ids: dict[str, int] = {}
    for i, t in enumerate(tokens):
        ids.setdefault(t, i)
    ranked = []
    for piece, i in ids.items():
        if types[i] == BYTE or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-scores[i], i, ids[left], left, right))
    ranked.sort(key=lambda r: r[:3])
    return [[r[3], r[4]] for r in ranked]


def _spm_parts(vocab: GGUFVocab) -> dict[str, Any]:
    assert vocab.scores is not None
    norm: list[dict[str, Any]] = [{"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]
    decode: list[dict[str, Any]] = [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"}]
    if vocab.add_space_prefix:
        norm.insert(0, {"type": "Prepend", "prepend": "\u2581"})
        decode.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    unk = vocab.tokens[vocab.unk_id] if vocab.unk_id is not None else None
    return {"normalizer": {"type": "Sequence", "normalizers": norm}, "pre_tokenizer": None,
            "decoder": {"type": "Sequence", "decoders": decode},
            "model": _bpe_model(vocab, spm_merges(vocab.tokens, vocab.scores, vocab.types),
                                unk_token=unk, fuse_unk=True, byte_fallback=BYTE in vocab.types)}


def build_tokenizer_json(vocab: GGUFVocab, where: str) -> str:
    """A `tokenizers` JSON document encoding like llama.cpp with this vocabulary."""
    parts = _gpt2_parts(vocab, where) if vocab.model == "gpt2" else _spm_parts(vocab)
    doc = {"version": "1.0", "truncation": None, "padding": None,
           "added_tokens": _added_tokens(vocab), "post_processor": _post_processor(vocab), **parts}
    return json.dumps(doc, ensure_ascii=False)
