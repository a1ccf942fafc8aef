"""Drafters: the draft model (model.py), prompt lookup (ngram.py), Token Recycling (recycle.py),
and their merge into one tree (combined.py)."""
from __future__ import annotations

import os
from typing import Any


def training_free_drafters(root: str | os.PathLike, manifest: Any) -> dict[str, Any]:
    """The drafters every engine offers besides a draft model: prompt lookup ("ngram") and
    Token Recycling ("recycle", starting from the bundle's prior when it has one)."""
    from ..recycle_prior import load_bundle_prior
    from .ngram import NgramDrafter
    from .recycle import RecyclingDrafter

    vocab = manifest.models["target"].spec.vocab_size
    return {"ngram": NgramDrafter(), "recycle": RecyclingDrafter(vocab, prior=load_bundle_prior(root, manifest))}
