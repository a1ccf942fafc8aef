"""A `tokenizers` JSON document -> llama.cpp's GGUF tokenizer metadata (``tokenizer.ggml.*``).

Two kinds of tokenizer are expressible:

* byte-level BPE (GPT-2 style: ByteLevel pre-tokenizer, no byte fallback) -> model ``"gpt2"``
  with tokens, token types and merges, plus the name of a pre-tokenizer that llama.cpp
  implements (``tokenizer.ggml.pre``). The name is recognised from the structure of the
  JSON's pre-tokenizer (llama.cpp's own converter hashes a test string's tokens instead; the
  structures below are the ones whose splitting rules llama.cpp reproduces exactly).
* SentencePiece-style BPE or Unigram with byte fallback (``<0x00>`` .. ``<0xFF>`` tokens) ->
  model ``"llama"`` with scores. Unigram scores are the vocab's log-probabilities; a BPE vocab
  has no scores, so normal tokens get ``-rank`` in id order (SentencePiece's own BPE trainer
  assigns scores that way: the earlier a piece was merged, the higher), bytes 0, specials -1000.

Anything else raises :class:`CheckpointError` naming the part of the JSON at fault.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from gguf import TokenType

from ..errors import CheckpointError

# Split regexes of pre-tokenizers llama.cpp implements (as they appear in tokenizer.json).
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_PRE = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
SPECIAL_SCORE = -1000.0


@dataclass(frozen=True)
class GgufVocab:
    """Everything ``tokenizer.ggml.*`` needs, in GGUF's terms."""

    model: str  # "gpt2" | "llama"
    pre: str  # llama.cpp pre-tokenizer name ("default" for "llama")
    tokens: list[str]  # [vocab_size], id order
    token_types: list[int]  # gguf.TokenType values, [vocab_size]
    scores: list[float] | None = None  # "llama" only
    merges: list[str] | None = None  # "gpt2" only: "left right"
    unk_id: int | None = None
    add_space_prefix: bool | None = None  # "llama" only
    notes: tuple[str, ...] = field(default_factory=tuple)


def _components(node: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A normalizer / pre-tokenizer / decoder node flattened (Sequence unrolled)."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        key = "pretokenizers" if "pretokenizers" in node else (
            "normalizers" if "normalizers" in node else "decoders")
        out: list[dict[str, Any]] = []
        for child in node.get(key) or []:
            out += _components(child)
        return out
    return [node]


def _split_regex(node: dict[str, Any]) -> str | None:
    pattern = node.get("pattern") or {}
    return pattern.get("Regex") if isinstance(pattern, dict) else None


def byte_level_pre_name(pre_tokenizer: dict[str, Any] | None) -> str | None:
    """llama.cpp's pre-tokenizer name for a byte-level pre-tokenizer, or None if unknown."""
    parts = _components(pre_tokenizer)
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True) and not parts[0].get("add_prefix_space"):
        return "gpt-2"
    if (kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits")
            and parts[1].get("use_regex", True) and not parts[1].get("add_prefix_space")):
        return "smollm"
    if (kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True)
            and parts[0].get("behavior") == "Isolated" and not parts[0].get("invert")
            and not parts[1].get("add_prefix_space")):
        return _SPLIT_PRE.get(_split_regex(parts[0]) or "")
    return None


def _id_to_token(doc: dict[str, Any], where: str) -> dict[int, str]:
    vocab = (doc.get("model") or {}).get("vocab")
    out: dict[int, str] = {}
    if isinstance(vocab, dict):
        out.update({int(i): t for t, i in vocab.items()})
    elif isinstance(vocab, list):
        out.update({i: entry[0] for i, entry in enumerate(vocab)})
    else:
        raise CheckpointError(f"{where}: model.vocab is missing")
    return out


def _merges(model: dict[str, Any], where: str) -> list[str]:
    out = []
    for m in model.get("merges") or []:
        if isinstance(m, str):
            out.append(m)
        elif isinstance(m, (list, tuple)) and len(m) == 2:
            if " " in m[0] or " " in m[1]:
                raise CheckpointError(f"{where}: merge {m!r} has a space, GGUF merges cannot hold it")
            out.append(f"{m[0]} {m[1]}")
        else:
            raise CheckpointError(f"{where}: malformed merge {m!r}")
    return out


def _add_space_prefix(doc: dict[str, Any]) -> bool:
    for node in _components(doc.get("normalizer")):
        if node.get("type") == "Prepend" and node.get("prepend") == "\u2581":
            return True
    for node in _components(doc.get("pre_tokenizer")):
        if node.get("type") == "Metaspace":
            scheme = node.get("prepend_scheme", "always" if node.get("add_prefix_space", True) else "never")
            return scheme != "never"
    return False


def vocab_from_tokenizer_json(tokenizer_json: str, vocab_size: int, *,
                              pre: str | None = None, where: str = "tokenizer.json") -> GgufVocab:
    """Convert a `tokenizers` JSON document into GGUF vocabulary data of ``vocab_size`` entries.

    Ids the tokenizer does not use (the model's embedding may be padded) become unused
    ``[PAD{id}]`` tokens. ``pre`` overrides the recognised pre-tokenizer name ("gpt2" only).
    """
    try:
        doc = json.loads(tokenizer_json)
    except (json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"{where}: not a valid tokenizers JSON document ({e})") from None
    model = doc.get("model") or {}
    kind = model.get("type")
    id_to_tok = _id_to_token(doc, where)
    added = {int(a["id"]): a for a in doc.get("added_tokens") or []}
    for i, a in added.items():
        id_to_tok[i] = a["content"]
    if id_to_tok and max(id_to_tok) >= vocab_size:
        raise CheckpointError(
            f"{where}: token id {max(id_to_tok)} is beyond the model's vocab_size {vocab_size}")
    unk = model.get("unk_token")
    tok_to_id = {t: i for i, t in id_to_tok.items()}
    unk_id = tok_to_id.get(unk) if isinstance(unk, str) else None
    if kind == "Unigram" and isinstance(model.get("unk_id"), int):
        unk_id = model["unk_id"]
    decoders = {d.get("type") for d in _components(doc.get("decoder"))}
    pre_parts = {p.get("type") for p in _components(doc.get("pre_tokenizer"))}
    byte_fallback = bool(model.get("byte_fallback")) or kind == "Unigram"
    byte_level = "ByteLevel" in pre_parts or "ByteLevel" in decoders

    notes: list[str] = []
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in id_to_tok:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        t = id_to_tok[i]
        tokens.append(t)
        if i in added:
            types.append(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
        elif i == unk_id:
            types.append(TokenType.UNKNOWN)
        elif byte_fallback and _BYTE_TOKEN.match(t):
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.NORMAL)
    if len(id_to_tok) < vocab_size:
        notes.append(f"{vocab_size - len(id_to_tok)} unused ids written as [PAD] tokens")

    if kind == "BPE" and byte_level and not model.get("byte_fallback"):
        name = pre or byte_level_pre_name(doc.get("pre_tokenizer"))
        if name is None:
            raise CheckpointError(
                f"{where}: pre_tokenizer {json.dumps(doc.get('pre_tokenizer'))[:300]} is not one "
                "llama.cpp implements (known: ByteLevel, Digits+ByteLevel, Split(llama3|qwen2 "
                "regex)+ByteLevel); pass the llama.cpp pre-tokenizer name explicitly")
        merges = _merges(model, where)
        if not merges:
            raise CheckpointError(f"{where}: byte-level BPE without merges; llama.cpp cannot load it")
        return GgufVocab("gpt2", name, tokens, types, merges=merges, unk_id=unk_id, notes=tuple(notes))
    if kind in ("BPE", "Unigram") and byte_fallback and not byte_level:
        n_bytes = sum(1 for t in types if t == TokenType.BYTE)
        if n_bytes != 256:
            raise CheckpointError(
                f"{where}: SentencePiece-style vocab has {n_bytes} <0xXX> byte tokens, expected 256")
        if kind == "Unigram":
            raw = model["vocab"]
            scores = [float(raw[i][1]) if i < len(raw) and i not in added else SPECIAL_SCORE
                      for i in range(vocab_size)]
            for i, t in enumerate(types):
                if t == TokenType.BYTE:
                    scores[i] = 0.0
        else:
            scores, rank = [], 0
            for t in types:
                if t == TokenType.NORMAL:
                    scores.append(-float(rank))
                    rank += 1
                else:
                    scores.append(0.0 if t == TokenType.BYTE else SPECIAL_SCORE)
        return GgufVocab("llama", "default", tokens, types, scores=scores, unk_id=unk_id,
                         add_space_prefix=_add_space_prefix(doc), notes=tuple(notes))
    raise CheckpointError(
        f"{where}: model type {kind!r} (byte_fallback={model.get('byte_fallback')}, byte-level="
        f"{byte_level}) has no GGUF tokenizer; expected byte-level BPE or SentencePiece-style "
        "BPE/Unigram with byte fallback")
