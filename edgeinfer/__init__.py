"""edgeinfer: fast on-device LLM inference with token-tree speculation on ONNX Runtime."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["load", "GenerationConfig", "__version__"]


def __getattr__(name: str):  # lazy: importing edgeinfer loads neither onnxruntime, onnx nor torch
    if name == "load":
        from .api import load

        return load
    if name == "GenerationConfig":
        from .runtime.config import GenerationConfig

        return GenerationConfig
    raise AttributeError(f"module 'edgeinfer' has no attribute {name!r}")
