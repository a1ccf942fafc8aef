"""ONNX encodings of quantized linear layers and embedding tables (onnxruntime 1.31, CPU).

``encode_linear`` emits ``y[..., N] = x[..., K] @ W.T (+ b)`` for float32 ``x``:

=========  ==================================================================================
fp32       MatMul on the pre-transposed initializer ``W.T`` [K, N]
fp16       float16 ``W.T`` + Cast -> MatMul; ORT constant-folds the Cast at session creation
           (measured: the optimized graph is a single MatMul, same speed as fp32; saves disk,
           not RAM)
int4/int8  com.microsoft MatMulNBits (B uint8 [N, n_blocks, blob], scales float32 [N, n_blocks],
           packed zero points when asymmetric, bias as its 6th input, recipe.accuracy_level)
fp8        float8e4m3fn codes [N, n_blocks, block] -> Cast -> Mul(scales [N, n_blocks, 1]) ->
           Reshape (-> Slice) -> Transpose -> MatMul. All-constant, so ORT folds it into a
           float32 weight at session creation: fp8 saves disk, not RAM. The standard blocked
           DequantizeLinear is *not* folded by ORT (it keeps Q/DQ nodes) and ran ~23x slower
           than fp32, so it is not used.
=========  ==================================================================================

Measured (ORT 1.31 CPU, 1 thread, AVX-512 VNNI host, x [M, 576] @ [576 -> 1536], us for
M = 1 / 4 / 16): fp32 42 / 43 / 119; fp16 and fp8 (folded) the same; int4 b32 accuracy_level 0
40 / 131 / 211, level 4 16 / 36 / 130; int8 b32 level 0 891 / 930 / 978 (no fast kernel),
level 4 18 / 35 / 117; blocked DequantizeLinear fp8 971 / 1062 / 1127. So int formats want
``recipe.accuracy_level = 4`` on CPU (int8 activations inside the kernel, ~0.5% relative
output error); level 0 keeps float32 activations and matches x @ dequantize(W).T exactly.

Affine int blocks (``QuantizedTensor.offsets``) add ``blocksum(x) @ offsets.T`` to the
MatMulNBits output: x (zero-padded to whole blocks) -> Reshape [..., n_blocks, block] ->
ReduceSum -> MatMul with ``offsets.T`` [n_blocks, N] -> Add. Measured (same host, M = 1 / 4 /
16): int4 level 4 14 / 37 / 132 us -> 18 / 41 / 140 us with offsets; int8 17 / 35 / 114 ->
20 / 41 / 122. The embedding adds the gathered offsets to every element of its block.

Outlier-aware block formats put the activation transform in front of the product:
``Gather(x, input_perm, axis=-1)`` ("reorder") or ``Mul(x, input_scale)`` ("scale").

``encode_embedding`` emits ``out[*ids.shape, H] = table[ids]``: Gather (fp32), Gather + Cast
(fp16, the table stays float16 in memory), com.microsoft GatherBlockQuantized (int4/int8/fp8,
table stays quantized in memory). With ``share=`` it reuses the initializers an earlier
``encode_linear`` wrote for the same table (a tied LM head), so the table is stored once.

Names are deterministic: nodes ``f"{name}/MatMul"``, ``f"{name}/Add"``, ...; initializers
``f"{name}.weight"``, ``f"{name}.scales"``, ``f"{name}.zero_points"``, ``f"{name}.bias"``, ...
(a trailing ``.weight`` on ``name`` is dropped). Graphs using int/fp8 formats must import the
``com.microsoft`` domain (:data:`CONTRIB_OPSET`).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import QuantizationError
from .blockwise import QuantizedTensor, pack_codes
from .recipe import QuantRecipe, WeightFormat
from .weights import quantize_weight

MS_DOMAIN = "com.microsoft"
CONTRIB_OPSET = (MS_DOMAIN, 1)
Encoded = tuple[list[onnx.NodeProto], list[onnx.TensorProto]]


def _base(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def _init(array: np.ndarray, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def _fp8_init(q: np.ndarray, name: str) -> onnx.TensorProto:
    return helper.make_tensor(name, TensorProto.FLOAT8E4M3FN, list(q.shape),
                              np.ascontiguousarray(q).view(np.uint8).tobytes(), raw=True)


def _fp16(w: np.ndarray, where: str) -> np.ndarray:
    if np.abs(w).max(initial=0.0) > np.finfo(np.float16).max:
        raise QuantizationError(f"{where}: values exceed the float16 range (max 65504)")
    return w.astype(np.float16)


def _ints(name: str, values: list[int]) -> onnx.TensorProto:
    return _init(np.asarray(values, dtype=np.int64), name)


def _input_transform(b: str, qt: QuantizedTensor, x: str) -> tuple[str, Encoded]:
    """Nodes feeding ``transform_input(x)`` to the quantized product."""
    nodes, inits = [], []
    if qt.input_perm is not None:
        inits.append(_init(qt.input_perm.astype(np.int64), f"{b}.input_perm"))
        nodes.append(helper.make_node("Gather", [x, inits[-1].name], [f"{b}/InputPermute_output_0"],
                                      name=f"{b}/InputPermute", axis=-1))
        x = nodes[-1].output[0]
    if qt.input_scale is not None:
        inits.append(_init(qt.input_scale.astype(np.float32), f"{b}.input_scale"))
        nodes.append(helper.make_node("Mul", [x, inits[-1].name], [f"{b}/InputScale_output_0"],
                                      name=f"{b}/InputScale"))
        x = nodes[-1].output[0]
    return x, (nodes, inits)


def _block_offsets(b: str, qt: QuantizedTensor, x: str, out: str) -> Encoded:
    """``out[..., N] = blocksum(x)[..., n_blocks] @ offsets.T`` for an affine tensor."""
    n, k = qt.shape
    nb, bs = qt.n_blocks, qt.block_size
    nodes, inits = [], []
    if nb * bs != k:  # zero-pad the last dimension to whole blocks
        inits += [_ints(f"{b}.offset_pads", [0, nb * bs - k]), _ints(f"{b}.offset_pad_axes", [-1])]
        nodes.append(helper.make_node("Pad", [x, inits[-2].name, "", inits[-1].name],
                                      [f"{b}/OffsetPad_output_0"], name=f"{b}/OffsetPad"))
        x = nodes[-1].output[0]
    inits += [_ints(f"{b}.offset_shape", [0, 0, nb, bs]), _ints(f"{b}.offset_axes", [-1]),
              _init(np.ascontiguousarray(qt.offsets.T), f"{b}.offsets")]
    nodes += [
        helper.make_node("Reshape", [x, inits[-3].name], [f"{b}/OffsetReshape_output_0"],
                         name=f"{b}/OffsetReshape"),
        helper.make_node("ReduceSum", [f"{b}/OffsetReshape_output_0", inits[-2].name],
                         [f"{b}/BlockSum_output_0"], name=f"{b}/BlockSum", keepdims=0),
        helper.make_node("MatMul", [f"{b}/BlockSum_output_0", inits[-1].name], [out],
                         name=f"{b}/OffsetMatMul")]
    return nodes, inits


def _matmul_nbits(b: str, qt: QuantizedTensor, x: str, bias: str, out: str,
                  accuracy_level: int) -> Encoded:
    n, k = qt.shape
    if qt.offsets is not None:  # y = MatMulNBits(x) + blocksum(x) @ offsets.T
        nodes, inits = _matmul_nbits(b, replace(qt, offsets=None), x, bias,
                                     f"{b}/MatMul_output_0", accuracy_level)
        o_nodes, o_inits = _block_offsets(b, qt, x, f"{b}/OffsetMatMul_output_0")
        nodes += o_nodes + [helper.make_node("Add", [nodes[0].output[0], o_nodes[-1].output[0]],
                                             [out], name=f"{b}/OffsetAdd")]
        return nodes, inits + o_inits
    inits = [_init(pack_codes(qt.q, qt.bits), f"{b}.weight"), _init(qt.scales, f"{b}.scales")]
    zp = ""
    if qt.zero_points is not None:
        inits.append(_init(pack_codes(qt.zero_points, qt.bits, pad=8), f"{b}.zero_points"))
        zp = inits[-1].name
    ins = [x, inits[0].name, inits[1].name, zp, "", bias]
    while ins[-1] == "":
        ins.pop()
    node = helper.make_node("MatMulNBits", ins, [out], name=f"{b}/MatMul", domain=MS_DOMAIN,
                            K=k, N=n, bits=qt.bits, block_size=qt.block_size,
                            accuracy_level=accuracy_level)
    return [node], inits


def _fp8_weight(b: str, qt: QuantizedTensor) -> tuple[str, Encoded]:
    """Constant nodes producing the dequantized fp8 weight transposed, float32 [K, N]."""
    n, k = qt.shape
    nb, bs = qt.n_blocks, qt.block_size
    inits = [_fp8_init(qt.q, f"{b}.weight"), _init(qt.scales[:, :, None], f"{b}.scales"),
             _ints(f"{b}.dequant_shape", [n, nb * bs])]
    nodes = [helper.make_node("Cast", [inits[0].name], [f"{b}/Cast_output_0"], name=f"{b}/Cast",
                              to=TensorProto.FLOAT),
             helper.make_node("Mul", [f"{b}/Cast_output_0", inits[1].name], [f"{b}/Mul_output_0"],
                              name=f"{b}/Mul"),
             helper.make_node("Reshape", [f"{b}/Mul_output_0", inits[2].name],
                              [f"{b}/Reshape_output_0"], name=f"{b}/Reshape")]
    w = nodes[-1].output[0]
    if nb * bs != k:
        inits += [_ints(f"{b}.slice_starts", [0]), _ints(f"{b}.slice_ends", [k]),
                  _ints(f"{b}.slice_axes", [1])]
        nodes.append(helper.make_node("Slice", [w] + [t.name for t in inits[-3:]],
                                      [f"{b}/Slice_output_0"], name=f"{b}/Slice"))
        w = nodes[-1].output[0]
    nodes.append(helper.make_node("Transpose", [w], [f"{b}/Transpose_output_0"],
                                  name=f"{b}/Transpose", perm=[1, 0]))
    return nodes[-1].output[0], (nodes, inits)


def encode_linear(name: str, weight: np.ndarray, bias: np.ndarray | None, recipe: QuantRecipe,
                  fmt: WeightFormat, input_name: str, output_name: str, *,
                  act_rms: np.ndarray | None = None,
                  quantized: QuantizedTensor | None = None) -> Encoded:
    """Nodes + initializers computing ``output[..., N] = input[..., K] @ weight.T (+ bias)``.

    weight: float32 [N, K] (HF layout); bias: float32 [N] or None; fmt: this tensor's format
    (``recipe.format_for(canonical_name)``); recipe: block size, symmetry, outlier mode and
    MatMulNBits accuracy_level. act_rms: optional float [K] activation RMS for the outlier
    modes. quantized: an already quantized ``weight`` (skips quantization; must match fmt).
    """
    fmt = WeightFormat.parse(fmt)
    b = _base(name)
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim != 2:
        raise QuantizationError(f"{b}.weight: expected [N, K], got shape {w.shape}")
    n, k = w.shape
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    bias_name = ""
    if bias is not None:
        bvec = np.asarray(bias, dtype=np.float32)
        if bvec.shape != (n,):
            raise QuantizationError(f"{b}.bias: shape {bvec.shape}, expected ({n},)")
        inits.append(_init(bvec, f"{b}.bias"))
        bias_name = inits[-1].name

    if fmt.is_block_quantized:
        qt = quantized if quantized is not None else quantize_weight(w, fmt, recipe, act_rms)
        if qt.format is not fmt or qt.shape != (n, k):
            raise QuantizationError(f"{b}: quantized tensor is {qt.format.value} {qt.shape}, "
                                    f"expected {fmt.value} {(n, k)}")
        x, (pre_nodes, pre_inits) = _input_transform(b, qt, input_name)
        nodes += pre_nodes
        inits += pre_inits
        if fmt is not WeightFormat.FP8:
            mm_nodes, mm_inits = _matmul_nbits(b, qt, x, bias_name, output_name,
                                               recipe.accuracy_level)
            return nodes + mm_nodes, inits + mm_inits
        wname, (w_nodes, w_inits) = _fp8_weight(b, qt)
        nodes += w_nodes
        inits += w_inits
    elif fmt is WeightFormat.FP16:
        x = input_name
        inits.append(_init(_fp16(w.T, f"{b}.weight"), f"{b}.weight"))
        nodes.append(helper.make_node("Cast", [inits[-1].name], [f"{b}/Cast_output_0"],
                                      name=f"{b}/Cast", to=TensorProto.FLOAT))
        wname = nodes[-1].output[0]
    else:
        x = input_name
        inits.append(_init(w.T, f"{b}.weight"))
        wname = inits[-1].name

    mm_out = f"{b}/MatMul_output_0" if bias_name else output_name
    nodes.append(helper.make_node("MatMul", [x, wname], [mm_out], name=f"{b}/MatMul"))
    if bias_name:
        nodes.append(helper.make_node("Add", [mm_out, bias_name], [output_name], name=f"{b}/Add"))
    return nodes, inits


def encode_embedding(name: str, table: np.ndarray, fmt: WeightFormat, ids_input: str,
                     output_name: str, *, recipe: QuantRecipe | None = None,
                     share: str | None = None, ids_rank: int = 2) -> Encoded:
    """Nodes + initializers computing ``output[*ids.shape, H] = table[ids]`` (float32).

    table: float32 [vocab, H]; ids_input: int64 indices of rank ``ids_rank`` (the graph's
    input_ids [1, n] by default); recipe: block size / symmetry for int formats (outlier and
    format fields are ignored). share: the ``name`` given to :func:`encode_linear` for this same
    table (tied LM head) with the same fmt and recipe; the embedding then reads that call's
    initializers and adds none of its own (except small shape constants and, for asymmetric
    int formats, its own zero points). Sharing an int/fp8 table needs ``recipe.outlier ==
    "none"`` (an outlier-transformed head no longer stores the table itself).
    """
    fmt = WeightFormat.parse(fmt)
    recipe = recipe or QuantRecipe()
    b = _base(name)
    t = np.asarray(table, dtype=np.float32)
    if t.ndim != 2:
        raise QuantizationError(f"{b}.weight: expected [vocab, hidden], got shape {t.shape}")
    v, h = t.shape
    src = _base(share) if share is not None else b
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    if not fmt.is_block_quantized:  # fp32 / fp16 Gather
        cast = fmt is WeightFormat.FP16
        gathered = f"{b}/Gather_output_0" if (cast or share) else output_name
        if share is None:
            inits.append(_init(_fp16(t, f"{b}.weight") if cast else t, f"{b}.weight"))
            nodes.append(helper.make_node("Gather", [inits[-1].name, ids_input], [gathered],
                                          name=f"{b}/Gather", axis=0))
        else:  # the head stored table.T [H, vocab]: gather columns, move H last
            nodes.append(helper.make_node("Gather", [f"{src}.weight", ids_input], [gathered],
                                          name=f"{b}/Gather", axis=1))
            moved = f"{b}/Transpose_output_0" if cast else output_name
            nodes.append(helper.make_node("Transpose", [gathered], [moved], name=f"{b}/Transpose",
                                          perm=list(range(1, ids_rank + 1)) + [0]))
            gathered = moved
        if cast:
            nodes.append(helper.make_node("Cast", [gathered], [output_name], name=f"{b}/Cast",
                                          to=TensorProto.FLOAT))
        return nodes, inits

    if share is not None and recipe.outlier != "none":
        raise QuantizationError(f"{b}: cannot share {src}.weight quantized with outlier mode "
                                f"{recipe.outlier!r}; encode the tied head with outlier 'none'")
    qt = quantize_weight(t, fmt, QuantRecipe(fmt, recipe.block_size, recipe.symmetric,
                                             affine=recipe.affine))
    nb, bs = qt.n_blocks, qt.block_size
    fp8 = fmt is WeightFormat.FP8
    # data [vocab, n_blocks, blob] (the MatMulNBits B layout / the fp8 head layout) gathered on
    # axis 0, quantized along axis 2; scales [vocab, n_blocks, 1].
    data, scales = f"{src}.weight", f"{src}.scales"
    if share is None:
        inits.append(_fp8_init(qt.q, data) if fp8 else _init(pack_codes(qt.q, qt.bits), data))
        inits.append(_init(qt.scales[:, :, None], scales))
    elif not fp8:  # MatMulNBits keeps scales [vocab, n_blocks]
        inits.append(_ints(f"{b}.scales_shape", [v, nb, 1]))
        nodes.append(helper.make_node("Reshape", [scales, inits[-1].name],
                                      [f"{b}/ScalesReshape_output_0"], name=f"{b}/ScalesReshape"))
        scales = nodes[-1].output[0]
    ins = [data, ids_input, scales]
    attrs = {} if fp8 else {"bits": qt.bits}
    if qt.zero_points is not None:
        inits.append(_init(pack_codes(qt.zero_points[:, :, None], qt.bits), f"{b}.zero_points"))
        ins.append(inits[-1].name)
    nodes.append(helper.make_node("GatherBlockQuantized", ins, [f"{b}/Gather_output_0"],
                                  name=f"{b}/Gather", domain=MS_DOMAIN, gather_axis=0,
                                  quantize_axis=2, block_size=bs, **attrs))
    gathered = nodes[-1].output[0]
    if qt.offsets is not None:  # + offsets[ids] [*ids, n_blocks, 1]
        gathered = _gather_offsets(b, src, qt, ids_input, ids_rank, share is not None,
                                   gathered, nodes, inits)
    # [*ids, n_blocks, block] -> [*ids, n_blocks * block] (-> [..., :H])
    inits.append(_ints(f"{b}.out_shape", [0] * ids_rank + [nb * bs]))
    ragged = nb * bs != h
    flat = f"{b}/Reshape_output_0" if ragged else output_name
    nodes.append(helper.make_node("Reshape", [gathered, inits[-1].name], [flat],
                                  name=f"{b}/Reshape"))
    if ragged:
        inits += [_ints(f"{b}.slice_starts", [0]), _ints(f"{b}.slice_ends", [h]),
                  _ints(f"{b}.slice_axes", [-1])]
        nodes.append(helper.make_node("Slice", [flat] + [x.name for x in inits[-3:]],
                                      [output_name], name=f"{b}/Slice"))
    return nodes, inits


def _gather_offsets(b: str, src: str, qt: QuantizedTensor, ids: str, ids_rank: int, shared: bool,
                    gathered: str, nodes: list, inits: list) -> str:
    """Append nodes adding the affine offsets of the gathered rows to ``gathered``
    [*ids, n_blocks, block]; returns the sum's name. A tied head stores them as ``offsets.T``
    [n_blocks, vocab] (see :func:`_block_offsets`), an embedding of its own as [vocab, n_blocks, 1]."""
    if shared:
        inits.append(_ints(f"{b}.offset_axes", [-1]))
        nodes += [helper.make_node("Gather", [f"{src}.offsets", ids], [f"{b}/OffsetGather_output_0"],
                                   name=f"{b}/OffsetGather", axis=1),
                  helper.make_node("Transpose", [f"{b}/OffsetGather_output_0"],
                                   [f"{b}/OffsetTranspose_output_0"], name=f"{b}/OffsetTranspose",
                                   perm=list(range(1, ids_rank + 1)) + [0]),
                  helper.make_node("Unsqueeze", [f"{b}/OffsetTranspose_output_0", inits[-1].name],
                                   [f"{b}/OffsetUnsqueeze_output_0"], name=f"{b}/OffsetUnsqueeze")]
    else:
        inits.append(_init(qt.offsets[:, :, None], f"{b}.offsets"))
        nodes.append(helper.make_node("Gather", [inits[-1].name, ids],
                                      [f"{b}/OffsetUnsqueeze_output_0"], name=f"{b}/OffsetGather",
                                      axis=0))
    nodes.append(helper.make_node("Add", [gathered, nodes[-1].output[0]],
                                  [f"{b}/OffsetAdd_output_0"], name=f"{b}/OffsetAdd"))
    return nodes[-1].output[0]
