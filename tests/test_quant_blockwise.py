"""Block-wise INT4 / INT8 / FP8 references: fast path == reference, == onnxruntime's own
quantizer, and quantize -> dequantize error bounds per format."""
from __future__ import annotations

import numpy as np
import pytest

from edgeinfer.errors import QuantizationError
from edgeinfer.quant.blockwise import (QuantizedTensor, format_bits, pack_codes, quantize,
                                       quantize_reference, unpack_codes)
from edgeinfer.quant.recipe import BLOCK_SIZES, WeightFormat

INT_FORMATS = (WeightFormat.INT4, WeightFormat.INT8)
BLOCK_FORMATS = INT_FORMATS + (WeightFormat.FP8,)


def _weights(rng: np.random.Generator) -> list[np.ndarray]:
    """Weights that exercise ragged K, all-zero blocks, ties, exact grid values, tiny/huge."""
    out = []
    for n, k, scale in ((3, 1, 1.0), (7, 33, 1.0), (16, 100, 1e-3), (5, 257, 50.0), (12, 64, 1.0)):
        w = (rng.standard_normal((n, k)) * scale).astype(np.float32)
        w[0] = 0.0  # all-zero row
        w[1, : min(k, 40)] = 0.0  # all-zero leading blocks
        out.append(w)
    grid = rng.integers(-8, 8, (6, 96)).astype(np.float32) * 0.25  # many ties / half-way points
    grid[2, :] = np.where(np.arange(96) % 2, 1.0, -1.0)  # |max| == |min| in every block
    out.append(grid)
    out.append(np.exp(rng.uniform(-20, 5, (4, 80))).astype(np.float32) * rng.choice([-1, 1], (4, 80)))
    # values half-way between levels for the sym/asym int4/int8 steps of a block spanning
    # [-m, m]: w * (1/scale) then lands within an ulp of .5, where rounding rules differ
    m = rng.uniform(0.5, 3.0, (64, 1)).astype(np.float32)
    k = rng.integers(-128, 127, (64, 14)) + 0.5
    steps = [m / 8, 2 * m / 15, m / 128, 2 * m / 255]
    half = np.concatenate([np.clip(k * st, -m, m) for st in steps], axis=1)
    out.append(np.concatenate([-m, m, half[:, :254]], axis=1).astype(np.float32))
    return out


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_fast_path_is_bit_exact_with_reference(fmt, symmetric):
    rng = np.random.default_rng(1)
    for w in _weights(rng):
        for bs in BLOCK_SIZES:
            a, b = quantize(w, fmt, bs, symmetric), quantize_reference(w, fmt, bs, symmetric)
            assert a.q.dtype == b.q.dtype and a.q.shape == b.q.shape
            assert np.array_equal(a.q.view(np.uint8), b.q.view(np.uint8)), (w.shape, bs)
            assert np.array_equal(a.scales.view(np.uint32), b.scales.view(np.uint32))
            assert (a.zero_points is None) == (b.zero_points is None)
            if a.zero_points is not None:
                assert np.array_equal(a.zero_points, b.zero_points)
            assert np.array_equal(a.dequantize(), b.dequantize())


def test_chunked_fast_path_matches_single_pass(monkeypatch):
    from edgeinfer.quant import blockwise

    w = np.random.default_rng(2).standard_normal((300, 70)).astype(np.float32)
    whole = quantize(w, WeightFormat.INT4, 32, False)
    monkeypatch.setattr(blockwise, "_CHUNK", 1000)  # 14 rows per chunk
    parts = quantize(w, WeightFormat.INT4, 32, False)
    assert np.array_equal(whole.q, parts.q) and np.array_equal(whole.scales, parts.scales)
    assert np.array_equal(whole.zero_points, parts.zero_points)


def _ort_quantizer(bits):
    pybind = pytest.importorskip("onnxruntime.capi._pybind_state")
    fn = getattr(pybind, f"quantize_matmul_{bits}bits", None)
    if fn is None:
        pytest.skip(f"onnxruntime has no quantize_matmul_{bits}bits")
    return fn


@pytest.mark.parametrize("fmt", INT_FORMATS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_codes_equal_onnxruntime_quantizer(fmt, symmetric, block_size):
    """Independent answer: ORT's C++ blockwise quantizer (what matmul_nbits_quantizer uses),
    fed the zero-padded [K_pad, N] weight exactly as its Python wrapper does."""
    bits = format_bits(fmt)
    ort_quant = _ort_quantizer(bits)
    rng = np.random.default_rng(3)
    for w in _weights(rng):
        n, k = w.shape
        nb = -(-k // block_size)
        wt = np.ascontiguousarray(np.pad(w.T, ((0, nb * block_size - k), (0, 0))), np.float32)
        packed = np.zeros((n, nb, block_size * bits // 8), np.uint8)
        scales = np.zeros((n, nb), np.float32)
        zp = np.zeros((n, -(-nb * bits // 8)), np.uint8)
        ort_quant(packed, wt, scales, zp, block_size, n, nb * block_size, symmetric)
        qt = quantize(w, fmt, block_size, symmetric)
        assert np.array_equal(pack_codes(qt.q, bits), packed), (w.shape, block_size)
        assert np.array_equal(qt.scales.view(np.uint32), scales.view(np.uint32))
        if not symmetric:
            assert np.array_equal(pack_codes(qt.zero_points, bits, pad=8), zp)


def test_fp8_codes_equal_onnx_quantizelinear():
    """Independent answer: ORT's blocked QuantizeLinear to float8e4m3fn (saturating)."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(4)
    for n, k, bs in ((8, 64, 32), (6, 100, 32), (5, 40, 16), (3, 300, 256)):
        w = (rng.standard_normal((n, k)) * np.exp(rng.uniform(-12, 4, (n, 1)))).astype(np.float32)
        w[0] = 0.0
        qt = quantize(w, WeightFormat.FP8, bs)
        nb = qt.n_blocks
        scales = np.where(qt.scales == 0, 1, qt.scales).astype(np.float32)  # q is 0 there anyway
        zero = helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [n, nb], bytes(n * nb), raw=True)
        node = helper.make_node("QuantizeLinear", ["w", "s", "zp"], ["q"], axis=1, block_size=bs)
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("w", TensorProto.FLOAT, [n, k])],
                                  [helper.make_tensor_value_info("q", TensorProto.FLOAT8E4M3FN, [n, k])],
                                  [numpy_helper.from_array(scales, "s"), zero])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        got = np.asarray(sess.run(None, {"w": w})[0]).view(np.uint8)
        assert np.array_equal(got, qt.q.reshape(n, -1)[:, :k].view(np.uint8))


@pytest.mark.parametrize("fmt", INT_FORMATS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_int_error_bounds(fmt, symmetric, block_size):
    rng = np.random.default_rng(5)
    qmax = (1 << format_bits(fmt)) - 1
    for w in _weights(rng):
        n, k = w.shape
        qt = quantize(w, fmt, block_size, symmetric)
        deq = qt.dequantize()
        assert deq.shape == w.shape and deq.dtype == np.float32 and np.all(np.isfinite(deq))
        step = np.abs(np.repeat(qt.scales, block_size, axis=1)[:, :k])
        err = np.abs(w - deq)
        codes = qt.q.reshape(n, -1)[:, :k]
        slack = 1e-4 * step + 1e-6 * np.abs(w)
        half = err <= 0.5 * step + slack
        if symmetric:
            # codes 0 .. qmax-1 are within half a step; the top code may be clamped (ORT maps
            # the block's largest-magnitude value to code 0, so the opposite extreme loses 1 step)
            assert np.all(half | (codes == qmax))
            assert np.all(err <= step + slack)
        else:
            assert np.all(half)
        assert np.all(deq[w == 0] == 0)  # zeros (and the ragged padding) stay exactly zero
        pad = qt.q.reshape(n, -1)[:, k:]
        assert np.all(pad == qt.zero_point_array().repeat(block_size, axis=1)[:, k:])


def test_symmetric_keeps_block_extreme_exact():
    w = np.random.default_rng(6).standard_normal((10, 96)).astype(np.float32)
    for fmt in INT_FORMATS:
        deq = quantize(w, fmt, 32, True).dequantize()
        blocks = w.reshape(10, 3, 32)
        idx = np.abs(blocks).argmax(axis=2)
        assert np.array_equal(np.take_along_axis(deq.reshape(10, 3, 32), idx[..., None], 2),
                              np.take_along_axis(blocks, idx[..., None], 2))


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_fp8_error_bound(block_size):
    rng = np.random.default_rng(7)
    for w in _weights(rng):
        k = w.shape[1]
        qt = quantize(w, WeightFormat.FP8, block_size)
        assert qt.zero_points is None and qt.symmetric
        deq = qt.dequantize()
        scale = np.repeat(qt.scales, block_size, axis=1)[:, :k]
        # E4M3: 3 mantissa bits (half ulp = 2**-4 relative); subnormal spacing 2**-9 * scale
        bound = np.maximum(np.abs(w) * 2.0**-4, scale * 2.0**-10) * (1 + 1e-5) + 1e-30
        assert np.all(np.abs(w - deq) <= bound)
        assert np.all(np.isfinite(deq)) and np.all(deq[w == 0] == 0)
        assert np.all(np.abs(qt.q.astype(np.float32)) <= 448.0)


def test_all_zero_weight_gives_zero_scales_and_no_nan():
    w = np.zeros((4, 50), np.float32)
    for fmt in BLOCK_FORMATS:
        for sym in (True, False):
            qt = quantize(w, fmt, 32, sym)
            assert np.all(qt.scales == 0)
            assert np.array_equal(qt.dequantize(), w)


def test_pack_unpack_roundtrip_and_nibble_order():
    q = np.array([[1, 2, 3, 15, 0]], np.uint8)
    packed = pack_codes(q, 4, pad=8)
    assert packed.tolist() == [[0x21, 0xF3, 0x80]]  # element 2i in the low nibble
    assert np.array_equal(unpack_codes(packed, 4, 5), q)
    codes = np.random.default_rng(8).integers(0, 256, (3, 4, 32)).astype(np.uint8)
    assert np.array_equal(unpack_codes(pack_codes(codes, 8), 8, 32), codes)


def test_invalid_inputs_raise_quantization_error():
    w = np.ones((4, 32), np.float32)
    with pytest.raises(QuantizationError, match="block_size"):
        quantize(w, WeightFormat.INT4, 48)
    with pytest.raises(QuantizationError, match="not block-quantized"):
        quantize(w, WeightFormat.FP16, 32)
    bad = w.copy()
    bad[1, 2] = np.nan
    with pytest.raises(QuantizationError, match="NaN"):
        quantize(bad, WeightFormat.INT8, 32)
    with pytest.raises(QuantizationError, match="2-D"):
        quantize(np.ones(32, np.float32), WeightFormat.INT8, 32)
    qt = quantize(w, WeightFormat.INT4, 32, False)
    with pytest.raises(QuantizationError, match="zero_points"):
        QuantizedTensor(qt.format, 32, True, qt.q, qt.scales, qt.zero_points, qt.shape)
    with pytest.raises(QuantizationError, match="q: shape"):
        QuantizedTensor(qt.format, 16, False, qt.q, qt.scales, qt.zero_points, qt.shape)
