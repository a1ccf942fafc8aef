"""Lossless compression of an already quantized checkpoint: the "exact" recipe.

A checkpoint read from a Q4_0 / Q4_1 / Q4_K GGUF holds linear weights that lie on a 4-bit block
grid. Affine int4 blocks (quant/blockwise.py) store such a tensor exactly, and MatMulNBits at
``accuracy_level`` 0 multiplies it with float32 activations, so the graph computes what the fp32
export computes, up to the order of float additions (a numeric near-tie where the two differ),
from a third of the bytes. :func:`exact_recipe` checks every linear weight and keeps at fp32 each
one that int4 blocks cannot hold (e.g. a Q6_K or float tensor); the embedding table and the LM
head stay fp32 (8-bit tables are held exactly too, but MatMulNBits has no fast int8 kernel
with float activations).

Measured on SmolLM2-135M-Instruct (Q4_1 GGUF; 2 cores): 184 MB instead of 540 MB, decode step
11.9 ms instead of 19.3 ms, identical greedy tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .blockwise import quantize
from .recipe import QuantRecipe, WeightFormat

__all__ = ["ExactReport", "exact_recipe", "holds_exactly"]

# Largest difference allowed between a weight and its affine int4 reconstruction, relative to
# the tensor's largest magnitude: float32 rounding of ``lo + j * step`` (a few ulps), nothing more.
EXACT_TOLERANCE = 2.0**-20


@dataclass(frozen=True)
class ExactReport:
    exact: tuple[str, ...]  # linear weights stored as affine int4 blocks
    kept: tuple[str, ...]  # linear weights that stay fp32 (not on a 4-bit block grid)


def holds_exactly(w: np.ndarray, block_size: int = 32) -> bool:
    """True when affine int4 blocks of ``block_size`` reproduce ``w`` float32 [N, K] to within
    float rounding (EXACT_TOLERANCE of its largest magnitude)."""
    w = np.asarray(w, dtype=np.float32)
    back = quantize(w, WeightFormat.INT4, block_size, affine=True).dequantize()
    scale = float(np.abs(w).max()) or 1.0
    return bool(np.abs(back - w).max() <= EXACT_TOLERANCE * scale)


def exact_recipe(names: Sequence[str], get_weight: Callable[[str], np.ndarray], block_size: int = 32,
                 progress: Callable[[int, int], None] | None = None) -> tuple[QuantRecipe, ExactReport]:
    """The lossless recipe for the canonical tensors ``names`` (see the module docstring).
    ``get_weight(name)`` returns float32 arrays; only ``*_proj.weight`` tensors are examined."""
    linear = [n for n in names if n.endswith("_proj.weight")]
    exact, kept = [], []
    for i, name in enumerate(linear):
        (exact if holds_exactly(get_weight(name), block_size) else kept).append(name)
        if progress is not None:
            progress(i + 1, len(linear))
    recipe = QuantRecipe(WeightFormat.INT4, block_size=block_size, affine=True, accuracy_level=0,
                         embed_format=WeightFormat.FP32, keep=tuple(kept) + ("lm_head.weight",),
                         keep_format=WeightFormat.FP32)
    return recipe, ExactReport(tuple(exact), tuple(kept))
