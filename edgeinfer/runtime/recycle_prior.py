"""Token Recycling's prior: the target's top-k next tokens after every token of its vocabulary.

Token Recycling (drafters/recycle.py) drafts from a table of the target's past top-k after
each token. A token the table has not seen yet drafts nothing, and that is every new word a
generation produces: its bonus token is, by construction, not a node of the pass that chose it.
Measured on the offloading benchmark's bundle (128 MiB budget, 48 tokens, Token Recycling and
prompt lookup in one tree, hot start from the prompt): 22 of 37 target passes on a story prompt,
16 of 32 on a chat prompt and 12 of 25 on a code prompt verified an empty tree, each one a full
pass over storage for a single token. The prior fills those rows before anything is generated:
for every vocabulary token v, the target's top-k after ``context + [v]`` (``context`` a short
neutral prefix, for a chat model its generation prompt, e.g. ``<|im_start|>assistant\\n``).
Real observations replace a prior row as soon as the target has run on that token. Measured
with it on the same runs: passes 37 / 32 / 25 -> 30 / 20 / 18, no empty tree left; on the
tokens such rows are asked about (the ones not seen before in that generation) the prior's
top-8 holds the next token 32-48% of the time with that context, 18-38% with the BOS token alone.

It is computed once, at export (``edgeinfer export --recycle-prior``), by branching every token
off the context in one tree pass per chunk: SmolLM2-135M's 49152 tokens take ~70 s on 2 cores.

File format (the one definition): raw little-endian int32, row-major ``[vocab, k]``, no
header; the manifest's :class:`~edgeinfer.bundle.RecyclePriorEntry` names the file, ``k`` and
the context, and the bundle's file list carries its size and SHA-256.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import BundleError, ConfigError

PRIOR_DTYPE = np.dtype("<i4")
DEFAULT_PRIOR_K = 8  # RecyclingDrafter's default k
DEFAULT_CHUNK = 128  # tokens per tree pass (measured on SmolLM2 fp32: 128 -> 69 s, 512 -> 89 s)


def prior_context(tokenizer: Any) -> list[int]:
    """The prefix every vocabulary token is branched from: the chat template's generation
    prompt (what it adds after the messages, e.g. ``<|im_start|>assistant\\n``) when the
    tokenizer has one, else its BOS token, else a newline."""
    if getattr(tokenizer, "chat_template", None):
        msgs = [{"role": "user", "content": "x"}]
        try:
            with_prompt = tokenizer.render_chat(msgs, add_generation_prompt=True)
            without = tokenizer.render_chat(msgs, add_generation_prompt=False)
        except ConfigError:
            with_prompt = without = ""
        if with_prompt.startswith(without) and len(with_prompt) > len(without):
            ids = tokenizer.encode(with_prompt[len(without):], add_bos=False)
            if ids:
                return ids
    if getattr(tokenizer, "bos_token_id", None) is not None:
        return [int(tokenizer.bos_token_id)]
    return tokenizer.encode("\n", add_bos=False) or [0]


def compute_prior(runner: Any, context: Sequence[int], k: int = DEFAULT_PRIOR_K, chunk: int = DEFAULT_CHUNK,
                  progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """The table ``[vocab, k]`` (PRIOR_DTYPE): row v holds the target's k most likely tokens
    after ``context + [v]``, best first. ``runner``: a ModelRunner of the target (its cache is
    reset before and after); each pass branches ``chunk`` tokens off the committed context."""
    from .verify import topk_rows

    if not context:
        raise ValueError("compute_prior: the context needs at least one token")
    vocab = runner.spec.vocab_size
    if not 1 <= k <= vocab:
        raise ValueError(f"compute_prior: k={k} must be in [1, {vocab}]")
    chunk = max(1, min(chunk, runner.max_context - len(context) - 1))
    out = np.empty((vocab, k), dtype=PRIOR_DTYPE)
    runner.reset()
    try:
        runner.forward(list(context))
        runner.commit(np.arange(len(context)))
        for start in range(0, vocab, chunk):
            ids = np.arange(start, min(vocab, start + chunk))
            logits = runner.forward(ids, parents=[-1] * len(ids))  # every token a child of the context
            runner.discard()
            out[start:start + len(ids)] = topk_rows(logits, k)
            if progress is not None:
                progress(start + len(ids), vocab)
    finally:
        runner.reset()
    return out


def write_prior(path: Path, table: np.ndarray) -> None:
    """Write ``table`` atomically (a temporary file in the same folder, then a rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        np.ascontiguousarray(table, dtype=PRIOR_DTYPE).tofile(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # nothing half-written left behind
        raise


def load_prior(path: Path, vocab_size: int, k: int) -> np.ndarray:
    """The table at ``path``, memory-mapped read-only, checked against the manifest's shape and
    the vocabulary (ids in [0, vocab) or -1 for "none"). BundleError names the file otherwise."""
    path = Path(path)
    want = vocab_size * k * PRIOR_DTYPE.itemsize
    try:
        size = path.stat().st_size
    except OSError as e:
        raise BundleError(f"{path}: cannot read the Token Recycling prior ({e.strerror})") from None
    if size != want:
        raise BundleError(f"{path}: {size} bytes, but a [{vocab_size}, {k}] int32 table "
                          f"(manifest recycle_prior.k = {k}) needs {want}")
    table = np.memmap(path, dtype=PRIOR_DTYPE, mode="r", shape=(vocab_size, k))
    lo, hi = int(table.min()), int(table.max())
    if lo < -1 or hi >= vocab_size:
        raise BundleError(f"{path}: token ids must lie in [-1, {vocab_size}), found {lo}..{hi}")
    return table


def load_bundle_prior(root: str | os.PathLike, manifest: Any) -> np.ndarray | None:
    """The target's prior from a bundle (None when its manifest names none)."""
    entry = manifest.models["target"].recycle_prior
    if entry is None:
        return None
    return load_prior(Path(root) / entry.file, manifest.models["target"].spec.vocab_size, entry.k)
