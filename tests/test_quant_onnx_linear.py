"""encode_linear in real onnxruntime sessions: every format x block size x symmetry equals
x @ dequantize(W).T from the NumPy reference (identity input recovers the matrix exactly)."""
from __future__ import annotations

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from edgeinfer.errors import QuantizationError  # noqa: E402
from edgeinfer.quant.blockwise import quantize  # noqa: E402
from edgeinfer.quant.onnx_encoding import CONTRIB_OPSET, encode_linear  # noqa: E402
from edgeinfer.quant.recipe import BLOCK_SIZES, QuantRecipe, WeightFormat  # noqa: E402
from edgeinfer.quant.weights import bits_per_weight, bytes_on_disk, quantize_weight  # noqa: E402

F = WeightFormat
BLOCK_CASES = [(f, bs, sym) for f in (F.INT4, F.INT8) for bs in BLOCK_SIZES for sym in (True, False)]
BLOCK_CASES += [(F.FP8, bs, True) for bs in BLOCK_SIZES]


def session(nodes, inits, k: int, n: int, optimized_path=None):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "m", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "m", n])], inits)
    model = helper.make_model(graph, ir_version=10, opset_imports=[
        helper.make_opsetid("", 23), helper.make_opsetid(*CONTRIB_OPSET)])
    onnx.checker.check_model(model)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def weight(n: int, k: int, seed: int = 0) -> np.ndarray:
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    w[0] = 0.0  # all-zero blocks
    w[1, :64] = 0.0
    return w


@pytest.mark.parametrize("fmt,block_size,symmetric", BLOCK_CASES)
@pytest.mark.parametrize("k", [100, 256])  # ragged and aligned K
def test_block_formats_equal_numpy_dequantize(fmt, block_size, symmetric, k):
    n = 24
    w = weight(n, k, seed=k)
    bias = np.random.default_rng(1).standard_normal(n).astype(np.float32) if k == 100 else None
    # accuracy_level 0: float32 activations, so the kernel's matrix is observable exactly
    recipe = QuantRecipe(fmt, block_size=block_size, symmetric=symmetric, accuracy_level=0)
    nodes, inits = encode_linear("layers.0.mlp.up_proj", w, bias, recipe, fmt, "x", "y")
    sess = session(nodes, inits, k, n)
    deq = quantize(w, fmt, block_size, symmetric).dequantize()  # the NumPy reference
    b = np.zeros(n, np.float32) if bias is None else bias
    y = sess.run(None, {"x": np.eye(k, dtype=np.float32)[None]})[0][0]
    assert np.array_equal(y, deq.T + b)  # identity input: the kernel's matrix, bit for bit
    x = np.random.default_rng(2).standard_normal((2, 3, k)).astype(np.float32)
    y = sess.run(None, {"x": x})[0]
    ref = x.astype(np.float64) @ deq.T.astype(np.float64) + b
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("fmt", [F.INT4, F.INT8])
@pytest.mark.parametrize("block_size", [16, 32, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_accuracy_level_4_within_int8_activation_bound(fmt, block_size, symmetric):
    """accuracy_level 4 quantizes x per block to int8 inside the kernel: each x element moves
    by at most amax(block)/254, so |y - x @ deq.T| <= sum_blocks amax/254 * sum |deq|."""
    n, k = 24, 100
    rng = np.random.default_rng(3)
    w = weight(n, k)
    x = (rng.standard_normal((1, 8, k)) * np.exp(rng.uniform(-3, 3, (1, 8, k)))).astype(np.float32)
    ys = {}
    for level in (0, 4):
        recipe = QuantRecipe(fmt, block_size=block_size, symmetric=symmetric, accuracy_level=level)
        nodes, inits = encode_linear("lin", w, None, recipe, fmt, "x", "y")
        assert helper.get_node_attr_value(nodes[-1], "accuracy_level") == level
        ys[level] = session(nodes, inits, k, n).run(None, {"x": x})[0][0]
    deq = quantize(w, fmt, block_size, symmetric).dequantize().astype(np.float64)
    ref = x[0].astype(np.float64) @ deq.T
    nb = -(-k // block_size)
    pad = nb * block_size - k
    amax = np.pad(np.abs(x[0]), ((0, 0), (0, pad))).reshape(8, nb, block_size).max(axis=2)
    wsum = np.pad(np.abs(deq), ((0, 0), (0, pad))).reshape(n, nb, block_size).sum(axis=2)
    bound = (amax / 254.0) @ wsum.T
    assert np.all(np.abs(ys[4] - ref) <= bound * (1 + 1e-4) + 1e-5)
    assert np.abs(ys[0] - ref).max() <= 1e-5 * np.abs(ref).max()
    assert not np.array_equal(ys[0], ys[4])  # the attribute reached the kernel


@pytest.mark.parametrize("fmt", [F.FP32, F.FP16])
def test_float_formats(fmt, tmp_path):
    n, k = 40, 72
    w = weight(n, k)
    bias = np.arange(n, dtype=np.float32)
    nodes, inits = encode_linear("lin", w, bias, QuantRecipe(accuracy_level=0), fmt, "x", "y")
    opt = tmp_path / "opt.onnx"
    y = session(nodes, inits, k, n, opt).run(None, {"x": np.eye(k, dtype=np.float32)[None]})[0][0]
    expected = w if fmt is F.FP32 else w.astype(np.float16).astype(np.float32)
    assert np.array_equal(y, expected.T + bias)
    ops = [nd.op_type for nd in onnx.load(str(opt)).graph.node]
    assert "Cast" not in ops  # fp16: ORT folded the Cast into a float32 initializer


def test_fp8_dequantization_is_constant_folded(tmp_path):
    n, k = 32, 100
    w = weight(n, k)
    recipe = QuantRecipe(F.FP8, block_size=32, accuracy_level=0)
    nodes, inits = encode_linear("lin", w, None, recipe, F.FP8, "x", "y")
    assert {nd.op_type for nd in nodes} >= {"Cast", "Mul", "Reshape", "Slice", "Transpose"}
    opt = tmp_path / "opt.onnx"
    session(nodes, inits, k, n, opt)
    assert [nd.op_type for nd in onnx.load(str(opt)).graph.node] == ["MatMul"]


def planted(n=64, k=256, seed=4):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
    w[:, [c for c in (3, 70, 131, 200) if c < k]] *= 30.0
    return w, rng.standard_normal((1, 16, k)).astype(np.float32)


@pytest.mark.parametrize("mode,op", [("scale", "Mul"), ("reorder", "Gather")])
@pytest.mark.parametrize("fmt", [F.INT4, F.INT8, F.FP8])
def test_outlier_modes_in_graph(mode, op, fmt):
    w, x = planted()
    n, k = w.shape
    recipe = QuantRecipe(fmt, block_size=32, outlier=mode, accuracy_level=0)
    qt = quantize_weight(w, fmt, recipe)
    nodes, inits = encode_linear("lin", w, None, recipe, fmt, "x", "y", quantized=qt)
    y = session(nodes, inits, k, n).run(None, {"x": x})[0][0]
    ref = qt.transform_input(x[0]).astype(np.float64) @ qt.dequantize().T.astype(np.float64)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    transformed = qt.input_scale is not None or qt.input_perm is not None
    assert (nodes[0].op_type == op and nodes[0].input[0] == "x") == transformed
    if fmt is F.FP8:  # relative precision per element: the search may keep the identity
        return
    assert transformed
    exact = x[0].astype(np.float64) @ w.T.astype(np.float64)
    plain_nodes, plain_inits = encode_linear("lin", w, None, QuantRecipe(fmt, block_size=32, accuracy_level=0), fmt, "x", "y")
    y_plain = session(plain_nodes, plain_inits, k, n).run(None, {"x": x})[0][0]
    assert np.linalg.norm(y - exact) < np.linalg.norm(y_plain - exact)


def test_names_are_deterministic():
    w, _ = planted()
    recipe = QuantRecipe(F.INT4, block_size=32, symmetric=False, outlier="scale", accuracy_level=0)
    a = encode_linear("layers.3.attn.q_proj.weight", w, np.ones(64, np.float32), recipe, F.INT4, "x", "y")
    b = encode_linear("layers.3.attn.q_proj", w, np.ones(64, np.float32), recipe, F.INT4, "x", "y")
    assert [nd.SerializeToString() for nd in a[0]] == [nd.SerializeToString() for nd in b[0]]
    assert [t.SerializeToString() for t in a[1]] == [t.SerializeToString() for t in b[1]]
    assert [nd.name for nd in a[0]] == ["layers.3.attn.q_proj/InputScale", "layers.3.attn.q_proj/MatMul"]
    assert sorted(t.name for t in a[1]) == sorted(
        "layers.3.attn.q_proj." + s for s in ("weight", "scales", "zero_points", "bias", "input_scale"))


@pytest.mark.parametrize("fmt,block_size,symmetric", BLOCK_CASES + [(F.FP32, 32, True), (F.FP16, 32, True)])
@pytest.mark.parametrize("outlier", ["none", "reorder"])
def test_bytes_on_disk_counts_the_initializers(fmt, block_size, symmetric, outlier):
    w, _ = planted(n=24, k=100)
    recipe = QuantRecipe(fmt, block_size=block_size, symmetric=symmetric, outlier=outlier, accuracy_level=0)
    qt = quantize_weight(w, fmt, recipe) if fmt.is_block_quantized else None
    _, inits = encode_linear("lin", w, None, recipe, fmt, "x", "y", quantized=qt)
    stored = sum(len(t.raw_data) for t in inits if t.name.split(".")[-1] in
                 ("weight", "scales", "zero_points", "input_scale", "input_perm"))
    used = "reorder" if qt is not None and qt.input_perm is not None else "none"
    assert stored == bytes_on_disk(fmt, w.shape, block_size, symmetric, used)


def test_bits_per_weight_figures():
    shape = (1536, 576)
    assert bits_per_weight(F.FP32, shape) == 32.0 and bits_per_weight(F.FP16, shape) == 16.0
    assert bits_per_weight(F.INT4, shape, 32) == 4 + 32 / 32  # float32 scale per 32 codes
    assert bits_per_weight(F.INT4, shape, 32, symmetric=False) == 4 + 1 + 4 / 32
    assert bits_per_weight(F.INT8, (1536, 512), 128) == 8 + 32 / 128
    assert bits_per_weight(F.INT8, shape, 128) == (5 * 128 * 8 + 5 * 32) / 576  # ragged: padded
    assert bits_per_weight(F.FP8, shape, 64) == 8 + 0.5


def test_encode_linear_errors():
    w = weight(8, 32)
    with pytest.raises(QuantizationError, match="bias"):
        encode_linear("lin", w, np.ones(3, np.float32), QuantRecipe(accuracy_level=0), F.FP32, "x", "y")
    with pytest.raises(QuantizationError, match="float16 range"):
        encode_linear("lin", w * 1e6, None, QuantRecipe(accuracy_level=0), F.FP16, "x", "y")
    qt = quantize(w, F.INT8, 32)
    with pytest.raises(QuantizationError, match="expected int4"):
        encode_linear("lin", w, None, QuantRecipe(F.INT4, accuracy_level=0), F.INT4, "x", "y", quantized=qt)
