"""Read a Hugging Face model folder: config.json, *.safetensors (single or sharded),
tokenizer.json, the chat template (chat_template.jinja or tokenizer_config.json) and
generation_config.json. Never unpickles: folders with only .bin/.pt weights are refused.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from ..errors import CheckpointError
from ..spec import TokenizerInfo
from .adapters import get_adapter
from .checkpoint import Checkpoint, WeightSource
from .safetensors_io import SafetensorsFiles

GENERATION_KEYS = ("do_sample", "temperature", "top_p", "top_k", "min_p", "typical_p",
                   "repetition_penalty", "max_new_tokens", "max_length")


def read_json(path: Path, required: bool = True) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path}: file is missing")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_hf_folder(folder: Path) -> Checkpoint:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: no config.json; not a Hugging Face model folder")
    config = read_json(config_path)
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise CheckpointError(f"{config_path}: pre-quantized checkpoints ({method}) are not "
                              "supported; use the float (F32/F16/BF16) checkpoint")
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise CheckpointError(f"{config_path}: field 'model_type' is missing")
    adapter = get_adapter(model_type, where=str(config_path))
    cfg = adapter.text_config(config, str(config_path))
    spec = adapter.spec_from_hf(cfg)
    raw = SafetensorsFiles.open(folder)
    weights = WeightSource(raw, adapter.hf_tensor_map(spec, raw.names()))
    weights.validate(spec)
    tokenizer = read_hf_tokenizer(folder, [config, cfg.data], spec.vocab_size)
    return Checkpoint(path=folder, kind="hf", spec=spec, weights=weights, tokenizer=tokenizer)


def _token_id(tok: Tokenizer, value: Any) -> int | None:
    """A special token from tokenizer_config.json (a string or {"content": ...}) -> id."""
    if isinstance(value, dict):
        value = value.get("content")
    return tok.token_to_id(value) if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _chat_template(folder: Path, tok_cfg: dict[str, Any]) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    tmpl = tok_cfg.get("chat_template")
    if isinstance(tmpl, list):  # [{"name": ..., "template": ...}]: take "default" or the first
        named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
        tmpl = named.get("default") or next(iter(named.values()), None)
    return tmpl if isinstance(tmpl, str) else None


def read_hf_tokenizer(folder: Path, configs: list[dict[str, Any]],
                      vocab_size: int | None = None) -> TokenizerInfo:
    """Tokenizer and chat data. ``configs``: config.json (and its text part) for token ids;
    ``vocab_size``: the model's, which every token id must stay below.

    ``add_bos_token`` says whether tokenizer.json's post-processor adds BOS (encode with
    ``add_special_tokens=True`` to get it); tokenizer_config.json's flag is not applied, as
    transformers' generic tokenizer does not apply it either.
    """
    path = folder / "tokenizer.json"
    if not path.is_file():
        extra = " (only tokenizer.model found; convert it with transformers first)" if (
            folder / "tokenizer.model").is_file() else ""
        raise CheckpointError(f"{folder}: tokenizer.json is missing{extra}")
    text = path.read_text(encoding="utf-8")
    try:
        tok = Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception for malformed documents
        raise CheckpointError(f"{path}: not a valid tokenizers document ({e})") from None
    top = max(tok.get_vocab(with_added_tokens=True).values(), default=-1)
    if vocab_size is not None and top >= vocab_size:
        raise CheckpointError(f"{path}: token id {top} is outside the model's vocabulary "
                              f"(vocab_size={vocab_size})")
    tok_cfg = read_json(folder / "tokenizer_config.json", required=False)
    gen = read_json(folder / "generation_config.json", required=False)
    sources = [gen, *configs]

    def first(key: str, tok_key: str) -> int | None:
        for src in sources:
            if _ids(src.get(key)):
                return _ids(src.get(key))[0]
        return _token_id(tok, tok_cfg.get(tok_key))

    bos, pad = first("bos_token_id", "bos_token"), first("pad_token_id", "pad_token")
    eos: list[int] = []
    for v in [*(s.get("eos_token_id") for s in sources), _token_id(tok, tok_cfg.get("eos_token"))]:
        eos += [i for i in _ids(v) if i not in eos]
    return TokenizerInfo(
        tokenizer_json=text, chat_template=_chat_template(folder, tok_cfg), bos_token_id=bos,
        eos_token_ids=tuple(eos), pad_token_id=pad, add_bos_token=_adds_bos(tok, bos),
        generation_defaults={k: gen[k] for k in GENERATION_KEYS if gen.get(k) is not None})


def _adds_bos(tok: Tokenizer, bos: int | None) -> bool:
    ids = tok.encode("a", add_special_tokens=True).ids
    return bos is not None and len(ids) > len(tok.encode("a", add_special_tokens=False).ids) \
        and ids[0] == bos
