"""Outlier-aware block quantization: per-input-channel scale folding and channel reordering.

A few input channels (columns j of ``W [N, K]``) with large magnitudes set the scale of every
block they sit in and waste the levels of their block neighbours. Two remedies, both exact
rewrites of ``y = x @ W.T`` before quantization:

* ``"scale"`` (AWQ / SmoothQuant-like): ``W' = W * s`` (column j times ``s_j``) and
  ``x' = x / s``. Every ``s_j`` is a power of two, so both sides are rescaled exactly in float32
  and the activation multiplier ``1 / s`` (stored as ``QuantizedTensor.input_scale``) is exact.
* ``"reorder"``: a permutation ``p`` of the input channels sorted by magnitude, so outlier
  channels share blocks: ``W' = W[:, p]``, ``x' = x[..., p`` ] (``QuantizedTensor.input_perm``).

The choice is made on a proxy of the output error,
``E = sum_j a_j**2 * sum_n (W[n, j] - W_eff[n, j])**2``, where ``W_eff`` is the quantized weight
mapped back to the original channels and ``a_j`` the RMS of activation channel j (1 when no
statistics are given). The identity is always a candidate, so the returned tensor is never
worse than plain block quantization on that proxy.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..errors import QuantizationError
from .blockwise import QuantizedTensor, quantize
from .recipe import WeightFormat

# exponents tried for s_j ~ a_j**alpha / c_j**beta (c_j = max |W[:, j]|)
_ALPHAS = (0.25, 0.5, 0.75, 1.0)
_BETAS = (0.25, 0.5, 0.75, 1.0)
_MAX_LOG2 = 16  # |log2 s_j| is clipped to this


def _column_absmax(w: np.ndarray) -> np.ndarray:
    """w [N, K] -> float64 [K]: largest |W[:, j]|, zero columns set to the median nonzero."""
    c = np.abs(w).max(axis=0).astype(np.float64)
    nz = c[c > 0]
    return np.where(c > 0, c, np.median(nz) if nz.size else 1.0)


def _act_rms(act_rms: np.ndarray | None, k: int) -> np.ndarray | None:
    if act_rms is None:
        return None
    a = np.asarray(act_rms, dtype=np.float64).reshape(-1)
    if a.shape != (k,) or not np.all(np.isfinite(a)) or np.any(a < 0):
        raise QuantizationError(
            f"act_rms: expected {k} finite non-negative per-channel values, got shape {a.shape}")
    nz = a[a > 0]
    return np.where(a > 0, a, np.median(nz) if nz.size else 1.0)


def _pow2(s: np.ndarray) -> np.ndarray:
    """Nearest power of two (in log2), normalized so the median channel keeps scale 1."""
    e = np.round(np.log2(s))
    e = np.clip(e - np.median(e).round(), -_MAX_LOG2, _MAX_LOG2)
    return np.exp2(e).astype(np.float32)


def _proxy_error(w: np.ndarray, qt: QuantizedTensor, weight2: np.ndarray) -> float:
    d = (w - qt.effective_weight()).astype(np.float64)
    return float((d * d).sum(axis=0) @ weight2)


def quantize_scaled(w: np.ndarray, fmt: WeightFormat, block_size: int, symmetric: bool,
                    input_scale: np.ndarray, affine: bool = False) -> QuantizedTensor:
    """Quantize ``W / input_scale`` (columns; input_scale float32 [K], powers of two)."""
    m = np.asarray(input_scale, dtype=np.float32)
    return replace(quantize(w / m, fmt, block_size, symmetric, affine), input_scale=m)


def quantize_permuted(w: np.ndarray, fmt: WeightFormat, block_size: int, symmetric: bool,
                      perm: np.ndarray, affine: bool = False) -> QuantizedTensor:
    """Quantize ``W[:, perm]`` (perm int64 [K], a permutation of range(K))."""
    p = np.asarray(perm, dtype=np.int64)
    if p.shape != (w.shape[1],) or not np.array_equal(np.sort(p), np.arange(w.shape[1])):
        raise QuantizationError(f"perm: not a permutation of range({w.shape[1]})")
    return replace(quantize(np.ascontiguousarray(w[:, p]), fmt, block_size, symmetric, affine),
                   input_perm=p)


def scale_candidates(w: np.ndarray, act_rms: np.ndarray | None = None) -> list[np.ndarray]:
    """Activation multipliers ``1 / s`` (float32 [K], powers of two) worth trying."""
    c = _column_absmax(w)
    a = _act_rms(act_rms, w.shape[1])
    out = []
    for beta in _BETAS:  # weight-only: pull column maxima towards each other
        out.append(_pow2(c ** beta))  # 1 / s with s = c**-beta
    if a is not None:  # AWQ-like: scale up salient (large-activation) channels
        for alpha in _ALPHAS:
            for beta in (0.0,) + _BETAS[:2]:
                out.append(_pow2(c ** beta / a ** alpha))
    return out


def reorder_permutation(w: np.ndarray, act_rms: np.ndarray | None = None) -> np.ndarray:
    """int64 [K]: input channels by decreasing importance ``max|W[:, j]| * a_j`` (stable)."""
    imp = _column_absmax(w)
    a = _act_rms(act_rms, w.shape[1])
    if a is not None:
        imp = imp * a
    return np.argsort(-imp, kind="stable").astype(np.int64)


def quantize_outlier_aware(w: np.ndarray, fmt: WeightFormat, block_size: int, symmetric: bool,
                           mode: str, act_rms: np.ndarray | None = None,
                           affine: bool = False) -> QuantizedTensor:
    """Block-quantize w float32 [N, K] with outlier handling ``mode`` ("none" | "scale" |
    "reorder"); act_rms: optional float [K] RMS of each input channel over calibration data."""
    w = np.asarray(w, dtype=np.float32)
    plain = quantize(w, fmt, block_size, symmetric, affine)
    if mode == "none":
        return plain
    if w.ndim != 2:
        raise QuantizationError(f"weight: expected [N, K], got shape {w.shape}")
    a = _act_rms(act_rms, w.shape[1])
    weight2 = a * a if a is not None else np.ones(w.shape[1])
    best, best_err = plain, _proxy_error(w, plain, weight2)
    if mode == "scale":
        tried = [quantize_scaled(w, fmt, block_size, symmetric, m, affine)
                 for m in scale_candidates(w, a)]
    elif mode == "reorder":
        tried = [quantize_permuted(w, fmt, block_size, symmetric, reorder_permutation(w, a), affine)]
    else:
        raise QuantizationError(f"outlier: {mode!r} is not one of ('none', 'scale', 'reorder')")
    for qt in tried:
        err = _proxy_error(w, qt, weight2)
        if err < best_err:
            best, best_err = qt, err
    return best
