"""Quantization recipe: which format each canonical tensor gets.

One recipe per model in a bundle; it is stored in the manifest as ``QuantRecipe.to_dict()``.
Only 2-D linear weights (``*_proj.weight``, ``lm_head.weight``) are quantized; norms and
biases always stay float32. ``embed_tokens.weight`` follows ``embed_format``.
"""
from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

from ..errors import QuantizationError


class WeightFormat(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"
    FP8 = "fp8"  # E4M3 with one float32 scale per block

    @classmethod
    def parse(cls, value: "str | WeightFormat", field: str = "quant") -> "WeightFormat":
        try:
            return cls(str(value.value if isinstance(value, WeightFormat) else value).lower())
        except ValueError:
            raise QuantizationError(
                f"{field}: unknown format {value!r}, expected one of {[f.value for f in cls]}") from None

    @property
    def is_block_quantized(self) -> bool:
        return self in (WeightFormat.INT8, WeightFormat.INT4, WeightFormat.FP8)


BLOCK_SIZES = (16, 32, 64, 128, 256)
OUTLIER_MODES = ("none", "scale", "reorder")
# MatMulNBits accuracy_level: 0 unset (float32 activations, exact), 1 fp32, 2 fp16, 3 bf16,
# 4 int8 (activations quantized per block inside the kernel; much faster on CPU).
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


@dataclass(frozen=True)
class QuantRecipe:
    format: WeightFormat = WeightFormat.FP32
    block_size: int = 32
    symmetric: bool = True
    # Affine int blocks: a float offset per block (GGUF Q4_1 style) and exact re-encoding of
    # weights that already lie on a block grid (a dequantized GGUF); needs symmetric=True.
    affine: bool = False
    # Outlier handling for block formats: "scale" folds a per-input-channel scale into the
    # weight (and its inverse into the activation), "reorder" permutes input channels so that
    # outlier channels share blocks. "none" is plain block quantization.
    outlier: str = "none"
    embed_format: WeightFormat = WeightFormat.FP32
    keep: tuple[str, ...] = ()  # fnmatch patterns of canonical names kept at keep_format
    keep_format: WeightFormat = WeightFormat.FP32
    # com.microsoft MatMulNBits "accuracy_level" for int4/int8 weights (see ACCURACY_LEVELS).
    accuracy_level: int = 4  # measured: int4/int8 MatMulNBits on CPU are 2.5-50x faster at 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "format", WeightFormat.parse(self.format))
        object.__setattr__(self, "embed_format", WeightFormat.parse(self.embed_format, "embed_format"))
        object.__setattr__(self, "keep_format", WeightFormat.parse(self.keep_format, "keep_format"))
        object.__setattr__(self, "keep", tuple(self.keep))
        if self.block_size not in BLOCK_SIZES:
            raise QuantizationError(f"block_size: {self.block_size} is not one of {BLOCK_SIZES}")
        if self.affine and (not self.symmetric or self.format is WeightFormat.FP8):
            raise QuantizationError("affine: needs symmetric=True and an int4/int8 format (the "
                                    "per-block offset replaces the zero point)")
        if self.outlier not in OUTLIER_MODES:
            raise QuantizationError(f"outlier: {self.outlier!r} is not one of {OUTLIER_MODES}")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise QuantizationError(
                f"accuracy_level: {self.accuracy_level!r} is not one of {ACCURACY_LEVELS}")

    def format_for(self, name: str) -> WeightFormat:
        """The format of canonical tensor ``name`` under this recipe."""
        if name == "embed_tokens.weight":
            return self.embed_format
        if not (name.endswith("_proj.weight") or name == "lm_head.weight"):
            return WeightFormat.FP32
        if any(fnmatch.fnmatchcase(name, pat) for pat in self.keep):
            return self.keep_format
        return self.format

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("format", "embed_format", "keep_format"):
            d[k] = d[k].value
        d["keep"] = list(self.keep)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantRecipe":
        try:
            return cls(**d)
        except TypeError as e:
            raise QuantizationError(f"malformed quantization recipe ({e})") from None
