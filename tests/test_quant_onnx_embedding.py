"""encode_embedding in real onnxruntime sessions, alone and sharing a tied LM head's table."""
from __future__ import annotations

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from edgeinfer.errors import QuantizationError  # noqa: E402
from edgeinfer.quant.blockwise import quantize  # noqa: E402
from edgeinfer.quant.onnx_encoding import CONTRIB_OPSET, encode_embedding, encode_linear  # noqa: E402
from edgeinfer.quant.recipe import BLOCK_SIZES, QuantRecipe, WeightFormat  # noqa: E402

F = WeightFormat
CASES = [(F.FP32, 32, True), (F.FP16, 32, True)]
CASES += [(f, bs, sym) for f in (F.INT4, F.INT8) for bs in BLOCK_SIZES for sym in (True, False)]
CASES += [(F.FP8, bs, True) for bs in BLOCK_SIZES]
IDS = np.array([[5, 0, 63, 5, 17, 1]], np.int64)


def run(nodes, inits, hidden: int, vocab: int):
    """Feeds ids [1, n] and an identity head input; returns (embedding [1, n, H], head [H, V])."""
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "n"]),
              helper.make_tensor_value_info("h", TensorProto.FLOAT, [hidden, hidden])]
    outputs = [helper.make_tensor_value_info("emb", TensorProto.FLOAT, [1, "n", hidden])]
    if any(nd.output[0] == "logits" for nd in nodes):
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, [hidden, vocab]))
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, ir_version=10, opset_imports=[
        helper.make_opsetid("", 23), helper.make_opsetid(*CONTRIB_OPSET)])
    onnx.checker.check_model(model)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"ids": IDS, "h": np.eye(hidden, dtype=np.float32)})


def table(vocab: int, hidden: int) -> np.ndarray:
    t = np.random.default_rng(hidden).standard_normal((vocab, hidden)).astype(np.float32)
    t[0] = 0.0  # an all-zero row
    return t


def expected_rows(t: np.ndarray, fmt: F, bs: int, sym: bool) -> np.ndarray:
    if fmt is F.FP32:
        return t
    if fmt is F.FP16:
        return t.astype(np.float16).astype(np.float32)
    return quantize(t, fmt, bs, sym).dequantize()


@pytest.mark.parametrize("fmt,block_size,symmetric", CASES)
@pytest.mark.parametrize("hidden", [100, 128])  # ragged and aligned hidden size
def test_embedding_rows_equal_numpy_reference(fmt, block_size, symmetric, hidden):
    t = table(64, hidden)
    recipe = QuantRecipe(block_size=block_size, symmetric=symmetric, accuracy_level=0)
    nodes, inits = encode_embedding("embed_tokens", t, fmt, "ids", "emb", recipe=recipe)
    (emb,) = run(nodes, inits, hidden, 64)
    assert emb.shape == (1, IDS.shape[1], hidden) and emb.dtype == np.float32
    assert np.array_equal(emb[0], expected_rows(t, fmt, block_size, symmetric)[IDS[0]])
    if fmt.is_block_quantized:  # the table stays quantized in the graph
        assert nodes[0].op_type == "GatherBlockQuantized" and nodes[0].domain == "com.microsoft"
    if fmt is F.FP16:
        assert [nd.op_type for nd in nodes] == ["Gather", "Cast"]  # gather first, cast n rows


@pytest.mark.parametrize("fmt,block_size,symmetric", CASES)
def test_tied_head_shares_the_table(fmt, block_size, symmetric):
    vocab, hidden = 64, 100
    t = table(vocab, hidden)
    recipe = QuantRecipe(fmt, block_size=block_size, symmetric=symmetric, accuracy_level=0)
    head_nodes, head_inits = encode_linear("lm_head", t, None, recipe, fmt, "h", "logits")
    emb_nodes, emb_inits = encode_embedding("embed_tokens", t, fmt, "ids", "emb", recipe=recipe,
                                            share="lm_head")
    emb, logits = run(head_nodes + emb_nodes, head_inits + emb_inits, hidden, vocab)
    rows = expected_rows(t, fmt, block_size, symmetric)
    assert np.array_equal(emb[0], rows[IDS[0]])
    assert np.array_equal(logits, rows.T)  # identity through the head: its matrix
    # the table is stored once: the embedding adds only small constants (+ own zero points)
    big = [x.name for x in emb_inits if len(x.raw_data) >= vocab * hidden // 4]
    assert not big, big
    _, own_inits = encode_embedding("embed_tokens", t, fmt, "ids", "emb", recipe=recipe)
    assert sum(len(x.raw_data) for x in emb_inits) < sum(len(x.raw_data) for x in own_inits) / 4


def test_sharing_an_outlier_transformed_head_is_refused():
    t = table(64, 64)
    recipe = QuantRecipe(F.INT4, outlier="scale", accuracy_level=0)
    with pytest.raises(QuantizationError, match="outlier"):
        encode_embedding("embed_tokens", t, F.INT4, "ids", "emb", recipe=recipe, share="lm_head")


def test_embedding_names_are_deterministic():
    t = table(64, 100)
    recipe = QuantRecipe(block_size=32, symmetric=False, accuracy_level=0)
    a = encode_embedding("embed_tokens.weight", t, F.INT4, "ids", "emb", recipe=recipe)
    b = encode_embedding("embed_tokens", t, F.INT4, "ids", "emb", recipe=recipe)
    assert [n.SerializeToString() for n in a[0]] == [n.SerializeToString() for n in b[0]]
    assert [x.SerializeToString() for x in a[1]] == [x.SerializeToString() for x in b[1]]
    assert all(n.name.startswith("embed_tokens/") for n in a[0])
    assert all(x.name.startswith("embed_tokens.") for x in a[1])
