"""Tokenizer of a bundle: a `tokenizers` document, BOS/EOS handling, chat-template rendering
(Jinja2 in an immutable sandbox, the conventions of Hugging Face chat templates) and an
incremental detokenizer that never emits half a UTF-8 character.
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

from tokenizers import Tokenizer as _HFTokenizer

from ..errors import BundleError, ConfigError

Message = Mapping[str, Any]


class Tokenizer:
    def __init__(self, tokenizer: _HFTokenizer, chat_template: str | None = None,
                 bos_token_id: int | None = None, eos_token_ids: Sequence[int] = (),
                 add_bos_token: bool = False, source: str = "tokenizer") -> None:
        self.hf = tokenizer
        self.source = source
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(int(e) for e in eos_token_ids)
        self.add_bos_token = bool(add_bos_token) and bos_token_id is not None
        self.chat_template = chat_template
        self._template = None  # compiled on first use

    @classmethod
    def from_file(cls, path: str | os.PathLike, **kw: Any) -> "Tokenizer":
        path = Path(path)
        try:
            tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a plain Exception on bad JSON
            raise BundleError(f"{path}: not a valid tokenizers JSON document ({e})") from None
        return cls(tok, source=str(path), **kw)

    @classmethod
    def from_bundle(cls, root: str | os.PathLike, manifest: Any) -> "Tokenizer":
        """From a bundle directory and its :class:`~edgeinfer.bundle.Manifest`."""
        root = Path(root)
        template = None
        if manifest.chat_template_file:
            tpath = root / manifest.chat_template_file
            try:
                template = tpath.read_text(encoding="utf-8")
            except OSError as e:
                raise BundleError(f"{tpath}: cannot read the chat template ({e.strerror})") from None
        return cls.from_file(root / manifest.tokenizer_file, chat_template=template,
                             bos_token_id=manifest.bos_token_id, eos_token_ids=manifest.eos_token_ids,
                             add_bos_token=manifest.add_bos_token)

    # -- ids <-> text --------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else (self.hf.id_to_token(int(token_id)) or "")

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; special tokens written in the text are recognised. BOS is
        prepended when the bundle says so (``add_bos``: override) and not already there."""
        ids = self.hf.encode(text, add_special_tokens=False).ids
        want_bos = self.add_bos_token if add_bos is None else (add_bos and self.bos_token_id is not None)
        if want_bos and ids[:1] != [self.bos_token_id]:
            ids = [int(self.bos_token_id)] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def detokenizer(self, skip_special_tokens: bool = True) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self.hf, skip_special_tokens)

    # -- chat ----------------------------------------------------------------------------
    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                    **extra: Any) -> str:
        """The prompt text for ``messages`` (a list of {"role", "content"})."""
        if not self.chat_template:
            raise ConfigError("messages: this bundle has no chat template; pass a plain prompt string")
        check_messages(messages)
        from jinja2 import TemplateError

        template = self._compiled()
        try:
            return template.render(
                messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                bos_token=self.token_text(self.bos_token_id),
                eos_token=self.token_text(self.eos_token_ids[0] if self.eos_token_ids else None),
                **extra)
        except TemplateError as e:
            raise ConfigError(f"chat template: {e}") from None

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt))

    def _compiled(self) -> Any:
        if self._template is None:
            from jinja2 import TemplateError
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                raise TemplateError(message)

            def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
                       separators: Any = None, sort_keys: bool = False) -> str:
                return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                                  separators=separators, sort_keys=sort_keys)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[loopcontrols])
            env.filters["tojson"] = tojson
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            try:
                self._template = env.from_string(self.chat_template)
            except TemplateError as e:
                raise BundleError(f"chat template of {self.source}: does not compile ({e})") from None
        return self._template


def check_messages(messages: Any) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ConfigError("messages: expected a non-empty list of {'role': ..., 'content': ...}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ConfigError(f"messages[{i}]: expected a dict with 'role' and 'content', got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise ConfigError(f"messages[{i}].role: expected a non-empty string, got {role!r}")
        if not isinstance(content, str):
            raise ConfigError(f"messages[{i}].content: expected a string, got {type(content).__name__}")


class IncrementalDetokenizer:
    """Turns tokens into text as they arrive. The concatenation of everything returned by
    :meth:`add` and :meth:`flush` equals ``decode(all tokens)``.

    It decodes a short window: the tokens since the last emitted boundary (``prefix``) plus
    the new ones, and emits the part beyond the prefix's text once that part no longer ends
    in U+FFFD (an incomplete UTF-8 sequence: a character split across byte tokens). Decoding
    the window together with its prefix keeps decoder context (e.g. SentencePiece's leading
    space) identical to a full decode.
    """

    def __init__(self, tokenizer: _HFTokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self.tokens: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # tokens up to here have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def add(self, token_ids: int | Sequence[int]) -> str:
        """Add token(s); returns the newly complete text (possibly empty)."""
        if isinstance(token_ids, int):
            self.tokens.append(token_ids)
        else:
            self.tokens.extend(int(t) for t in token_ids)
        prefix_text = self._decode(self.tokens[self._prefix:self._read])
        full = self._decode(self.tokens[self._prefix:])
        if len(full) > len(prefix_text) and not full.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.tokens)
            return full[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character becomes U+FFFD)."""
        if self._read == len(self.tokens):
            return ""
        prefix_text = self._decode(self.tokens[self._prefix:self._read])
        full = self._decode(self.tokens[self._prefix:])
        self._prefix = self._read = len(self.tokens)
        return full[len(prefix_text):]


class StopMatcher:
    """Cuts streamed text before the first occurrence of any stop string. Text that could
    still turn out to be the start of a stop string is held back until it cannot."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._pending = ""
        self.hit: str | None = None  # the stop string found

    def feed(self, text: str) -> str:
        """Add text; returns what is safe to emit. After a hit, returns the text before the
        stop string once and then nothing."""
        if self.hit is not None:
            return ""
        if not self.stops:
            return text
        buf = self._pending + text
        found = [(i, s) for s in self.stops if (i := buf.find(s)) >= 0]
        if found:
            i, self.hit = min(found)
            self._pending = ""
            return buf[:i]
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self._pending = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold]

    def flush(self) -> str:
        """At the end of generation: the held-back text (no stop string completed)."""
        out, self._pending = ("" if self.hit is not None else self._pending), ""
        return out
