"""Check that a target and a draft share a tokenizer (same size, same token <-> id mapping)."""
from __future__ import annotations

import json

from ..errors import TokenizerMismatchError


def vocab_of(tokenizer_json: str) -> dict[int, str]:
    """id -> token string of a `tokenizers` JSON document (model vocab plus added tokens)."""
    doc = json.loads(tokenizer_json)
    model = doc.get("model") or {}
    vocab = model.get("vocab")
    out: dict[int, str] = {}
    if isinstance(vocab, dict):  # BPE / WordPiece / WordLevel: {token: id}
        out.update({int(i): t for t, i in vocab.items()})
    elif isinstance(vocab, list):  # Unigram: [[token, score], ...]
        out.update({i: entry[0] for i, entry in enumerate(vocab)})
    for added in doc.get("added_tokens") or []:
        out[int(added["id"])] = added["content"]
    return out


def check_same_tokenizer(target_json: str, draft_json: str, target_name: str = "target",
                         draft_name: str = "draft") -> None:
    """Raise TokenizerMismatchError naming the first token id whose mapping differs."""
    a, b = vocab_of(target_json), vocab_of(draft_json)
    if len(a) != len(b):
        raise TokenizerMismatchError(
            f"tokenizers differ: {target_name} has {len(a)} tokens, {draft_name} has {len(b)}")
    for i in sorted(a):
        if b.get(i) != a[i]:
            raise TokenizerMismatchError(
                f"tokenizers differ at id {i}: {target_name} has {a[i]!r}, "
                f"{draft_name} has {b.get(i)!r}")
