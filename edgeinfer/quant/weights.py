"""Entry points the graph builder and ``edgeinfer inspect`` use: quantize one weight under a
recipe, and the storage cost of each format as encoded by :mod:`edgeinfer.quant.onnx_encoding`.
"""
from __future__ import annotations

import numpy as np

from ..errors import QuantizationError
from .blockwise import QuantizedTensor
from .outlier import quantize_outlier_aware
from .recipe import BLOCK_SIZES, OUTLIER_MODES, QuantRecipe, WeightFormat


def quantize_weight(w: np.ndarray, fmt: WeightFormat, recipe: QuantRecipe,
                    act_rms: np.ndarray | None = None) -> QuantizedTensor:
    """Block-quantize a linear weight w float32 [N, K] to ``fmt`` (int4 | int8 | fp8) with the
    recipe's block size, symmetry and outlier mode. act_rms: optional float [K] RMS of each
    input channel over calibration activations (used by the outlier modes)."""
    fmt = WeightFormat.parse(fmt)
    if not fmt.is_block_quantized:
        raise QuantizationError(f"quantize_weight: format {fmt.value!r} is not block-quantized "
                                "(fp32/fp16 weights are stored as plain tensors)")
    symmetric = True if fmt is WeightFormat.FP8 else recipe.symmetric
    affine = recipe.affine and fmt is not WeightFormat.FP8
    return quantize_outlier_aware(w, fmt, recipe.block_size, symmetric, recipe.outlier, act_rms,
                                  affine=affine)


def bytes_on_disk(fmt: WeightFormat, shape: tuple[int, int], block_size: int = 32,
                  symmetric: bool = True, outlier: str = "none", affine: bool = False) -> int:
    """Bytes of the ONNX initializers :func:`encode_linear` writes for a weight of ``shape``
    (N, K) in ``fmt`` (bias excluded; a few bytes of shape constants ignored)."""
    fmt = WeightFormat.parse(fmt)
    n, k = (int(d) for d in shape)
    if n <= 0 or k <= 0:
        raise QuantizationError(f"shape: expected positive (N, K), got {tuple(shape)}")
    if fmt is WeightFormat.FP32:
        return 4 * n * k
    if fmt is WeightFormat.FP16:
        return 2 * n * k
    if block_size not in BLOCK_SIZES:
        raise QuantizationError(f"block_size: {block_size} is not one of {BLOCK_SIZES}")
    if outlier not in OUTLIER_MODES:
        raise QuantizationError(f"outlier: {outlier!r} is not one of {OUTLIER_MODES}")
    nb = -(-k // block_size)
    bits = 4 if fmt is WeightFormat.INT4 else 8
    total = n * nb * block_size * bits // 8 + 4 * n * nb  # codes (ragged tail padded) + scales
    if fmt is not WeightFormat.FP8 and not symmetric:
        total += n * (-(-nb * bits // 8))  # packed zero points
    if affine and fmt is not WeightFormat.FP8:
        total += 4 * n * nb  # float32 block offsets
    total += {"none": 0, "scale": 4 * k, "reorder": 8 * k}[outlier]
    return total


def bits_per_weight(fmt: WeightFormat, shape: tuple[int, int], block_size: int = 32,
                    symmetric: bool = True, outlier: str = "none", affine: bool = False) -> float:
    """Average stored bits per weight element, scales/zero points/offsets/padding included."""
    n, k = shape
    return 8.0 * bytes_on_disk(fmt, shape, block_size, symmetric, outlier, affine) / (n * k)


def quantized_nbytes(qt: QuantizedTensor) -> int:
    """Bytes on disk of an already quantized tensor (same count as :func:`bytes_on_disk`)."""
    outlier = "scale" if qt.input_scale is not None else (
        "reorder" if qt.input_perm is not None else "none")
    return bytes_on_disk(qt.format, qt.shape, qt.block_size, qt.symmetric, outlier, qt.affine)
