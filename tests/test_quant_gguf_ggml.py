"""Our GGUF quant bytes against ggml itself (the library inside llama-cpp-python).

ggml's C API is reached through ctypes: ``ggml_quantize_chunk`` (llama.cpp's quantizer) and
the ``to_float`` row dequantizer of ``ggml_get_type_traits`` (what llama.cpp runs on load).
"""
from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from edgeinfer.quant.gguf_encoding import encode, q4_k_fields

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
pytestmark = pytest.mark.llama


class _Traits(ctypes.Structure):  # struct ggml_type_traits (ggml.h)
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


@pytest.fixture(scope="module")
def ggml():
    path = os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so")
    if not os.path.exists(path):
        pytest.skip(f"{path} not found")
    lib = ctypes.CDLL(path)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return lib


def ggml_quantize(lib, x: np.ndarray, t: T) -> np.ndarray:
    x = np.ascontiguousarray(x, np.float32)
    rows, n = x.shape
    bs, ts = GGML_QUANT_SIZES[t]
    out = np.zeros((rows, n // bs * ts), np.uint8)
    written = lib.ggml_quantize_chunk(int(t), x.ctypes.data, out.ctypes.data, 0, rows, n, None)
    assert written == out.nbytes
    return out


def ggml_to_float(lib, data: np.ndarray, t: T) -> np.ndarray:
    tr = lib.ggml_get_type_traits(int(t)).contents
    assert (tr.blck_size, tr.type_size) == GGML_QUANT_SIZES[t]
    data = np.ascontiguousarray(data)
    n = data.nbytes // tr.type_size * tr.blck_size
    out = np.zeros(n, np.float32)
    _TO_FLOAT(tr.to_float)(data.ctypes.data, out.ctypes.data, n)
    return out.reshape(*data.shape[:-1], -1)


def _data(kind, shape=(64, 512), seed=0):
    rng = np.random.default_rng(seed)
    return {"normal": lambda: rng.standard_normal(shape),
            "heavy": lambda: rng.standard_t(3, shape),
            "uniform": lambda: rng.uniform(-1, 1, shape)}[kind]().astype(np.float32)


@pytest.mark.parametrize("t", [T.Q8_0, T.Q4_0, T.Q4_1])
@pytest.mark.parametrize("kind", ["normal", "heavy", "uniform"])
def test_block32_bytes_equal_ggml_quantizer(ggml, t, kind):
    x = _data(kind)
    x[3, :64] = 0.0  # zero blocks too
    np.testing.assert_array_equal(encode(x, t), ggml_quantize(ggml, x, t))


@pytest.mark.parametrize("t", [T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K])
def test_ggml_dequantizes_our_bytes_like_gguf_py(ggml, t):
    x = _data("heavy", seed=1)
    ours = encode(x, t)
    got = ggml_to_float(ggml, ours, t)
    np.testing.assert_array_equal(got, gq.dequantize(ours, t))
    if t is T.Q4_K:
        np.testing.assert_array_equal(got.reshape(-1, 256), q4_k_fields(x).values())


@pytest.mark.parametrize("kind", ["normal", "heavy", "uniform"])
def test_q4_k_error_matches_ggml_quantizer(ggml, kind):
    x = _data(kind, seed=2)
    ref = ggml_to_float(ggml, ggml_quantize(ggml, x, T.Q4_K), T.Q4_K)
    ours = ggml_to_float(ggml, encode(x, T.Q4_K), T.Q4_K)
    rms_ref = np.sqrt(np.mean((ref - x) ** 2))
    rms_ours = np.sqrt(np.mean((ours - x) ** 2))
    assert rms_ours <= 1.02 * rms_ref, (rms_ours, rms_ref)
