"""The fixed prompt set and its encoding into token ids.

Every method gets the same prompt token ids: the chat template is rendered once (from the
model's own template, e.g. the GGUF's ``tokenizer.chat_template``) and tokenized once with
the model's ``tokenizer.json``; the ids are then handed to every engine.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError

_PASTED = (
    "The town of Aldmere sits where two rivers meet, and for most of its history it lived by "
    "the water. Barges carried wool downstream to the coast and came back with salt, iron and "
    "news. In the spring floods the lower streets filled with brown water, and families moved "
    "their furniture upstairs as calmly as others might close a window. Everything changed "
    "when the railway arrived. Within ten years the barges were gone, the wharves were turned "
    "into warehouses, and the town began to face the station instead of the river. The old "
    "ferry house became a tea room. Some residents welcomed the faster post and the cheaper "
    "coal; others complained that strangers now passed through without stopping and that the "
    "market had lost its character. Today the warehouses are being converted into flats, and "
    "the council is debating whether to reopen the river path that once ran between them. "
    "Supporters say it would bring visitors back to the waterfront, while opponents worry "
    "about the cost of repairing the flood walls and about noise for the new residents.")


@dataclass(frozen=True)
class Prompt:
    key: str
    kind: str  # chat | code | summary | longform
    text: str


PROMPTS: dict[str, Prompt] = {p.key: p for p in (
    Prompt("chat", "chat",
           "Hi! I am planning a weekend trip to the mountains with two friends. What should we "
           "pack, and how do we stay safe if the weather turns bad?"),
    Prompt("code", "code",
           "Write a Python function `merge_intervals(intervals)` that takes a list of (start, end) "
           "pairs and returns the merged, sorted list of non-overlapping intervals. Include a "
           "docstring and two short examples."),
    Prompt("summary", "summary",
           "Summarize the following text in three sentences, keeping the main facts.\n\n"
           + _PASTED),
    Prompt("longform", "longform",
           "Write a short essay, in several paragraphs, about why public libraries still matter "
           "in a world where most information is online."),
)}


def select_prompts(keys: tuple[str, ...] = ()) -> list[Prompt]:
    """The prompts named by ``keys`` (all when empty), in the given order."""
    if not keys:
        return list(PROMPTS.values())
    unknown = [k for k in keys if k not in PROMPTS]
    if unknown:
        raise ConfigError(f"bench config: unknown prompt(s) {unknown}, expected from {sorted(PROMPTS)}")
    return [PROMPTS[k] for k in keys]


def render_chat(template: str | None, user_text: str, bos_token: str = "",
                eos_token: str = "") -> str:
    """The chat template applied to one user message with the generation prompt.

    With no template (a base model) the text is used as is.
    """
    if not template:
        return user_text
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ConfigError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=[{"role": "user", "content": user_text}], add_generation_prompt=True,
        bos_token=bos_token, eos_token=eos_token)


def encode_prompts(tokenizer_json: str | Path, chat_template: str | None, prompts: list[Prompt],
                   bos_token_id: int | None = None, add_bos: bool = False) -> dict[str, list[int]]:
    """prompt key -> token ids (list of int), chat template rendered once per prompt."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    bos = tok.id_to_token(bos_token_id) if bos_token_id is not None else ""
    out: dict[str, list[int]] = {}
    for p in prompts:
        text = render_chat(chat_template, p.text, bos_token=bos or "")
        ids = tok.encode(text, add_special_tokens=False).ids
        if add_bos and bos_token_id is not None and (not ids or ids[0] != bos_token_id):
            ids = [bos_token_id] + ids
        out[p.key] = [int(i) for i in ids]
    return out


def tokenizer_meta(meta: dict[str, Any]) -> tuple[int | None, tuple[int, ...], bool]:
    """(bos id, eos ids, add_bos) from a dict with those keys (prepared-model metadata)."""
    eos = meta.get("eos_token_ids") or ()
    return meta.get("bos_token_id"), tuple(int(e) for e in eos), bool(meta.get("add_bos_token"))
