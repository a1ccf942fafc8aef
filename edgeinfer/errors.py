"""Exception hierarchy. Library code raises these; only the CLI turns them into exit codes.

Every message should name the file (or field) at fault and what was expected, so that the
CLI can print it as one readable line.
"""
from __future__ import annotations


class EdgeInferError(Exception):
    """Base class for every error edgeinfer raises on purpose."""


class CheckpointError(EdgeInferError):
    """A model checkpoint (HF folder, safetensors, GGUF) is missing, corrupt or inconsistent."""


class UnsupportedArchitectureError(CheckpointError):
    """No adapter is registered for the checkpoint's architecture."""


class TokenizerMismatchError(EdgeInferError):
    """Target and draft do not share a tokenizer."""


class QuantizationError(EdgeInferError):
    """Unknown quantization format, bad block size, or a tensor that cannot be quantized."""


class BundleError(EdgeInferError):
    """A bundle directory is missing files, has a bad manifest or a wrong checksum."""


class ConfigError(EdgeInferError, ValueError):
    """A configuration value (generation option, CLI flag) is out of range."""


class ProviderError(EdgeInferError):
    """No requested execution provider could create a session."""


class ContextLimitError(EdgeInferError):
    """The prompt plus generated tokens exceed the model's context window."""


class MemoryBudgetError(EdgeInferError):
    """The memory budget cannot hold even the minimum resident set."""


class ShardError(EdgeInferError):
    """A streamed layer shard is missing or corrupt."""
