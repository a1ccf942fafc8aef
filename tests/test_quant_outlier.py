"""Outlier-aware quantization: the rewrites are exact, and they lower the output error
||x W^T - x W_q^T|| on weights with planted outlier input channels."""
from __future__ import annotations

import numpy as np
import pytest

from edgeinfer.errors import QuantizationError
from edgeinfer.quant.blockwise import quantize
from edgeinfer.quant.outlier import (quantize_outlier_aware, quantize_permuted, quantize_scaled,
                                     reorder_permutation, scale_candidates)
from edgeinfer.quant.recipe import QuantRecipe, WeightFormat
from edgeinfer.quant.weights import quantize_weight


def _planted(seed: int = 0, n: int = 256, k: int = 512, n_out: int = 8, mag: float = 30.0):
    """Gaussian weight whose n_out input channels (each in a different 32-block) are mag x."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
    cols = rng.choice(k // 32, min(n_out, k // 32), replace=False) * 32
    cols = cols + rng.integers(0, 32, cols.size)
    w[:, cols] *= mag
    x = rng.standard_normal((64, k)).astype(np.float32)
    return w, x, cols


def _output_error(w: np.ndarray, x: np.ndarray, qt) -> float:
    """||x W^T - x' deq(W')^T|| with x' what the graph feeds the quantized weight."""
    y = x.astype(np.float64) @ w.T.astype(np.float64)
    yq = qt.transform_input(x).astype(np.float64) @ qt.dequantize().T.astype(np.float64)
    return float(np.linalg.norm(y - yq))


# Largest allowed (output error with the option) / (plain output error) on the planted weight.
# Scale folding shrinks the outlier channels themselves. Reordering only gathers them into one
# block per row, whose step is then set by the largest of 8 outliers: that pays for symmetric
# blocks (step ~ max |w|) but little or nothing for asymmetric ones (step ~ max - min); the
# identity is kept when the permutation does not lower the error.
RATIOS = {("scale", WeightFormat.INT4, True): 0.5, ("scale", WeightFormat.INT4, False): 0.5,
          ("scale", WeightFormat.INT8, True): 0.5, ("scale", WeightFormat.INT8, False): 0.5,
          ("reorder", WeightFormat.INT4, True): 0.75, ("reorder", WeightFormat.INT4, False): 0.9,
          ("reorder", WeightFormat.INT8, True): 0.75, ("reorder", WeightFormat.INT8, False): 1.0}


@pytest.mark.parametrize("mode,fmt,symmetric", sorted(RATIOS, key=str))
def test_outlier_modes_lower_output_error(mode, fmt, symmetric):
    w, x, _ = _planted()
    plain_qt = quantize(w, fmt, 32, symmetric)
    plain = _output_error(w, x, plain_qt)
    qt = quantize_outlier_aware(w, fmt, 32, symmetric, mode)
    assert qt.input_perm is None or mode == "reorder"
    assert qt.input_scale is None or mode == "scale"
    assert qt.q.shape == plain_qt.q.shape and qt.q.dtype == plain_qt.q.dtype  # same bits/block
    ratio = RATIOS[(mode, fmt, symmetric)]
    if ratio < 1:
        assert (qt.input_scale if mode == "scale" else qt.input_perm) is not None
        assert _output_error(w, x, qt) < ratio * plain
    else:
        assert _output_error(w, x, qt) <= plain


def test_scale_mode_uses_activation_statistics():
    """Salient activation channels (AWQ): with act_rms the scale search targets them."""
    rng = np.random.default_rng(1)
    k = 256
    w = (rng.standard_normal((128, k)) * 0.02).astype(np.float32)
    act = np.ones(k)
    hot = rng.choice(k, 6, replace=False)
    act[hot] = 40.0
    x = (rng.standard_normal((256, k)) * act).astype(np.float32)
    rms = np.sqrt((x.astype(np.float64) ** 2).mean(axis=0))
    plain = _output_error(w, x, quantize(w, WeightFormat.INT4, 32, True))
    blind = _output_error(w, x, quantize_outlier_aware(w, WeightFormat.INT4, 32, True, "scale"))
    aware = _output_error(w, x, quantize_outlier_aware(w, WeightFormat.INT4, 32, True, "scale", rms))
    assert aware < 0.7 * plain and aware < blind


def test_rewrites_are_exact_before_quantization():
    w, x, _ = _planted(2, n=64, k=128)
    m = scale_candidates(w)[1]
    assert np.all(np.log2(m) == np.round(np.log2(m)))  # powers of two
    qs = quantize_scaled(w, WeightFormat.INT8, 32, True, m)
    assert np.array_equal(qs.dequantize(), quantize(w / m, WeightFormat.INT8, 32, True).dequantize())
    assert np.array_equal((w / m) * m, w)  # exact rescaling
    p = reorder_permutation(w)
    qp = quantize_permuted(w, WeightFormat.INT4, 32, True, p)
    assert np.array_equal(qp.transform_input(x), x[:, p])
    # effective_weight maps the quantized weight back to the original channels
    for qt in (qs, qp):
        ref = qt.transform_input(x).astype(np.float64) @ qt.dequantize().T
        np.testing.assert_allclose(x.astype(np.float64) @ qt.effective_weight().T, ref, rtol=1e-5, atol=1e-5)


def test_reorder_groups_outlier_channels_into_one_block():
    w, _, cols = _planted(3)
    p = reorder_permutation(w)
    assert set(p[:8].tolist()) == set(cols.tolist())
    with pytest.raises(QuantizationError, match="permutation"):
        quantize_permuted(w, WeightFormat.INT4, 32, True, np.zeros(w.shape[1], np.int64))


def test_never_worse_than_plain_on_well_behaved_weights():
    """Without outliers the search may keep plain quantization, never a worse candidate."""
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((64, 96)) * 0.02).astype(np.float32)
    plain = quantize(w, WeightFormat.INT4, 32, True)
    base = float(((w - plain.dequantize()).astype(np.float64) ** 2).sum())
    for mode in ("scale", "reorder"):
        qt = quantize_outlier_aware(w, WeightFormat.INT4, 32, True, mode)
        assert float(((w - qt.effective_weight()).astype(np.float64) ** 2).sum()) <= base * (1 + 1e-6)


def test_quantize_weight_follows_recipe():
    w, _, _ = _planted(5, n=32, k=128)
    r = QuantRecipe(WeightFormat.INT4, block_size=64, symmetric=False, outlier="scale")
    qt = quantize_weight(w, WeightFormat.INT4, r)
    assert (qt.block_size, qt.symmetric, qt.input_scale is not None) == (64, False, True)
    fp8 = quantize_weight(w, WeightFormat.FP8, r)
    assert fp8.symmetric and fp8.zero_points is None
    with pytest.raises(QuantizationError, match="not block-quantized"):
        quantize_weight(w, WeightFormat.FP16, r)
    with pytest.raises(QuantizationError, match="act_rms"):
        quantize_weight(w, WeightFormat.INT4, r, act_rms=np.ones(5))
