"""Per-architecture adapters, registered by name.

``get_adapter("llama")`` accepts an adapter name, a Hugging Face ``model_type`` or a GGUF
``general.architecture``; anything else raises :class:`UnsupportedArchitectureError` listing
what is supported. Add an architecture by subclassing :class:`Adapter` and calling
:func:`register`.
"""
from __future__ import annotations

from ...errors import UnsupportedArchitectureError
from .base import Adapter, Fields, TensorRef
from .gemma3 import Gemma3Adapter
from .llama import LlamaAdapter
from .phi3 import Phi3Adapter
from .qwen import Qwen2Adapter, Qwen3Adapter

__all__ = ["Adapter", "Fields", "TensorRef", "ADAPTERS", "register", "get_adapter",
           "supported_architectures"]

ADAPTERS: dict[str, Adapter] = {}
_ALIASES: dict[str, str] = {}


def register(adapter: Adapter) -> Adapter:
    ADAPTERS[adapter.name] = adapter
    for alias in (adapter.name, *adapter.hf_model_types, *adapter.gguf_archs):
        _ALIASES[alias] = adapter.name
    return adapter


for _cls in (LlamaAdapter, Qwen2Adapter, Qwen3Adapter, Gemma3Adapter, Phi3Adapter):
    register(_cls())


def supported_architectures() -> list[str]:
    """Every accepted name (adapter names, HF model types, GGUF architectures), sorted."""
    return sorted(_ALIASES)


def get_adapter(arch: str, where: str = "") -> Adapter:
    """The adapter for an adapter name, HF ``model_type`` or GGUF architecture."""
    if arch in _ALIASES:
        return ADAPTERS[_ALIASES[arch]]
    prefix = f"{where}: " if where else ""
    raise UnsupportedArchitectureError(
        f"{prefix}architecture {arch!r} is not supported; supported: "
        f"{', '.join(supported_architectures())}")
