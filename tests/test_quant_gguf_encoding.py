"""GGUF encodings: type mapping, and our bytes read back by gguf-py's dequantizers.

The expected values come from NumPy restatements of each format's rule written here (Q8_0,
Q4_0), or from the encoder's own unpacked fields (Q4_K); gguf-py's ``gguf.quants.dequantize``
is the independent reader of the bytes. tests/test_quant_gguf_ggml.py checks the same bytes
against ggml itself.
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from edgeinfer.errors import QuantizationError
from edgeinfer.quant.gguf_encoding import (GgufEncoding, encode, encoding_for_format,
                                           encoding_for_shape, q4_k_fields, quantize_q4_k)
from edgeinfer.quant.recipe import WeightFormat


def _data(shape, seed=0, kind="normal"):
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.standard_normal(shape).astype(np.float32)
    if kind == "heavy":
        return rng.standard_t(3, shape).astype(np.float32)
    return rng.uniform(0.2, 1.0, shape).astype(np.float32)  # all positive


def _round_away(v):
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def ref_q8_0(x):
    """Q8_0: d = absmax / 127 (stored fp16), q = round-half-away(x / d) in int8."""
    b = x.reshape(-1, 32).astype(np.float32)
    d = np.abs(b).max(axis=1, keepdims=True) / 127
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    q = _round_away(b * inv)
    return (q * d.astype(np.float16).astype(np.float32)).reshape(x.shape)


def ref_q4_0(x):
    """Q4_0: d = (signed value of largest magnitude) / -8 (fp16), q = clip(trunc(x/d + 8.5), 0, 15) - 8."""
    b = x.reshape(-1, 32).astype(np.float32)
    i = np.abs(b).argmax(axis=1)[:, None]
    d = np.take_along_axis(b, i, axis=1) / -8
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    q = np.clip(np.trunc(b * inv + np.float32(8.5)), 0, 15) - 8
    return (q * d.astype(np.float16).astype(np.float32)).reshape(x.shape)


# -- mapping -------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt, kw, want", [
    ("fp32", {}, T.F32), ("fp16", {}, T.F16), ("int8", {}, T.Q8_0), ("int4", {}, T.Q4_0),
    ("int4", {"symmetric": False}, T.Q4_1), ("int4", {"int4_type": "q4_k"}, T.Q4_K),
    ("int4", {"int4_type": "Q4_1"}, T.Q4_1), ("fp8", {}, T.Q8_0),
])
def test_format_mapping(fmt, kw, want):
    assert encoding_for_format(fmt, **kw).ggml_type is want


def test_mapping_notes_say_what_differs():
    assert encoding_for_format(WeightFormat.INT8, block_size=32).note is None
    assert "blocks of 32" in encoding_for_format("int8", block_size=128).note
    assert "fp8 has no GGUF type" in encoding_for_format("fp8").note
    assert "symmetric" in encoding_for_format("int8", symmetric=False).note
    assert encoding_for_format("int4", int4_type="q4_k", block_size=32).note is None
    with pytest.raises(QuantizationError, match="q4_k"):
        encoding_for_format("int4", int4_type="q3_k")
    with pytest.raises(QuantizationError, match="unknown format"):
        encoding_for_format("int3")


def test_ragged_rows_fall_back_with_a_note():
    q4k = encoding_for_format("int4", int4_type="q4_k")
    assert encoding_for_shape(q4k, (8, 512)) == q4k
    fb = encoding_for_shape(q4k, (8, 576))  # SmolLM2's hidden size: 576 % 256 != 0
    assert fb.ggml_type is T.Q4_0 and "576" in fb.note
    assert encoding_for_shape(q4k, (8, 576), symmetric=False).ggml_type is T.Q4_1
    fb = encoding_for_shape(encoding_for_format("int8"), (8, 48))
    assert fb.ggml_type is T.F16 and "Q8_0" in fb.note
    assert encoding_for_shape(encoding_for_format("int8"), (64,)).ggml_type is T.F32  # 1-D: F32
    assert encoding_for_shape(GgufEncoding(T.F16), (3, 5)).ggml_type is T.F16


def test_ragged_rows_are_refused_by_the_encoder():
    for t in (T.Q8_0, T.Q4_0, T.Q4_K):
        with pytest.raises(QuantizationError, match="multiple of"):
            encode(np.ones((4, 48), np.float32), t)
    with pytest.raises(QuantizationError, match="multiple of 256"):
        quantize_q4_k(np.ones((2, 288), np.float32))


def test_non_finite_and_out_of_range_are_refused():
    x = _data((2, 64))
    x[1, 3] = np.nan
    with pytest.raises(QuantizationError, match="NaN"):
        encode(x, T.Q8_0)
    with pytest.raises(QuantizationError, match="float16 range"):
        encode(np.full((1, 32), 1e6, np.float32), T.F16)
    with pytest.raises(QuantizationError, match="not supported"):
        encode(_data((1, 256)), T.Q6_K)


# -- bytes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("t, ref", [(T.Q8_0, ref_q8_0), (T.Q4_0, ref_q4_0)])
@pytest.mark.parametrize("kind", ["normal", "heavy", "positive"])
def test_block32_bytes_dequantize_to_the_format_rule(t, ref, kind):
    x = _data((48, 96), kind=kind)
    b = encode(x, t)
    assert b.dtype == np.uint8 and b.shape == (48, 96 // 32 * {T.Q8_0: 34, T.Q4_0: 18}[t])
    got = gq.dequantize(b, t)
    np.testing.assert_array_equal(got, ref(x))


@pytest.mark.parametrize("t, bound", [(T.Q8_0, 1 / 254), (T.Q4_0, 1 / 8)])
def test_block32_error_bound(t, bound):
    # |x - x'| <= absmax/254 (Q8_0, half a step) and <= absmax/8 (Q4_0: step absmax/8,
    # codes -8..7 so the far side of the range may be a full step away), plus the fp16
    # rounding of the scale: |q| * |d16 - d| <= absmax * 2^-11.
    x = _data((64, 256), seed=3, kind="heavy")
    err = np.abs(gq.dequantize(encode(x, t), t) - x).reshape(-1, 32)
    amax = np.abs(x).reshape(-1, 32).max(axis=1, keepdims=True)
    assert (err <= amax * (bound + 2.0 ** -11) * (1 + 1e-6)).all()


@pytest.mark.parametrize("kind", ["normal", "heavy", "positive"])
def test_q4_k_bytes_dequantize_to_the_encoders_values(kind):
    x = _data((6, 768), seed=1, kind=kind)
    f = q4_k_fields(x)
    assert f.sc.max() <= 63 and f.m.max() <= 63 and f.q.max() <= 15
    b = encode(x, T.Q4_K)
    assert b.dtype == np.uint8 and b.shape == (6, 3 * 144)
    np.testing.assert_array_equal(gq.dequantize(b, T.Q4_K), f.values().reshape(x.shape))


def test_q4_k_scale_and_min_packing_uses_all_bits():
    # Sub-blocks with very different ranges and offsets exercise the high bits of the 6-bit
    # scales and mins of sub-blocks 4..7 (stored split across bytes 0..11).
    rng = np.random.default_rng(5)
    spans = np.array([0.01, 0.5, 2.0, 7.0, 0.03, 3.0, 9.0, 1.0], np.float32)
    x = (rng.uniform(0, 1, (4, 8, 32)) * spans[:, None] - spans[::-1, None] / 3).astype(np.float32)
    x = x.reshape(4, 256)
    f = q4_k_fields(x)
    assert (f.sc[:, 4:] >= 16).any() and (f.m[:, 4:] >= 16).any()
    np.testing.assert_array_equal(gq.dequantize(encode(x, T.Q4_K), T.Q4_K), f.values())


@pytest.mark.parametrize("kind", ["normal", "heavy", "positive"])
def test_q4_k_error_bound(kind):
    # Per sub-block of 32, with range r = max(x) - min(min(x), 0): an exact 16-level grid has
    # error <= r/30. Our search trades the max error for lower RMS error and the 6-bit scale
    # grid adds some: bound 1.5 * r / 15 (measured <= 1.12 * r / 15).
    x = _data((32, 512), seed=2, kind=kind)
    err = np.abs(gq.dequantize(encode(x, T.Q4_K), T.Q4_K) - x).reshape(-1, 32)
    sub = x.reshape(-1, 32)
    r = sub.max(axis=1) - np.minimum(sub.min(axis=1), 0)
    assert (err.max(axis=1) <= 1.5 * r / 15 + 1e-6).all()
    if kind != "positive":  # (Q4_K's offset is tied to min(x, 0): all-positive data is its worst case)
        # a 4-bit format that beats Q4_0 and Q4_1 on zero-centred data
        rms = lambda t: float(np.sqrt(np.mean((gq.dequantize(encode(x, t), t) - x) ** 2)))  # noqa: E731
        assert rms(T.Q4_K) < rms(T.Q4_0)
        assert rms(T.Q4_K) < rms(T.Q4_1)


@pytest.mark.parametrize("t", [T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K])
def test_all_zero_blocks(t):
    x = np.zeros((3, 512), np.float32)
    x[1, 256:] = _data((256,), seed=4)  # one row half zero, half not
    got = gq.dequantize(encode(x, t), t)
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got[0], 0.0)
    np.testing.assert_array_equal(got[1, :256], 0.0)
    np.testing.assert_array_equal(got[2], 0.0)


def test_float_types_and_shapes():
    x = _data((3, 4, 64))
    np.testing.assert_array_equal(encode(x, T.F32), x)
    np.testing.assert_array_equal(encode(x, T.F16), x.astype(np.float16))
    assert encode(x, T.Q8_0).shape == (3, 4, 2 * 34)
    assert GgufEncoding(T.Q4_K).nbytes((10, 512)) == 10 * 2 * 144
    assert GgufEncoding(T.F16).nbytes((10, 3)) == 60
