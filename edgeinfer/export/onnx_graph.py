"""Small helpers for emitting an ONNX graph directly from NumPy weights.

:class:`GraphBuilder` collects nodes, initializers and graph inputs/outputs with deterministic
names, and streams every large initializer into one external data file as soon as it is added,
so peak memory stays around one tensor's size instead of the whole model (fp32 Gemma 3 270M is
about 1 GB; protobuf cannot hold more than 2 GB in one message anyway).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import EdgeInferError

OPSET = 23
MS_DOMAIN = "com.microsoft"
IR_VERSION = 10  # what onnxruntime >= 1.20 reads; opset 23 needs IR >= 10

# Initializers at least this large go to the external data file; smaller ones stay inline.
EXTERNAL_MIN_BYTES = 1024
# Large tensors start on a 64 KiB boundary so onnxruntime can memory-map them directly
# (64 KiB is the allocation granularity on every platform ORT runs on).
ALIGN_LARGE_BYTES = 1 << 20
ALIGN_LARGE = 1 << 16
ALIGN_SMALL = 64


def node_path(name: str) -> str:
    """Canonical tensor name -> node path: ``layers.3.attn.q_proj.weight`` ->
    ``/model/layers.3/attn/q_proj``."""
    base = name[: -len(".weight")] if name.endswith(".weight") else name
    return "/model/" + re.sub(r"\.(?!\d)", "/", base)


class ExternalDataWriter:
    """Appends tensor bytes to one external data file and points TensorProtos at it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f: BinaryIO = open(self.path, "wb")
        self.offset = 0

    def externalize(self, t: TensorProto) -> TensorProto:
        """Move ``t.raw_data`` into the file; ``t`` keeps only a reference (offset, length)."""
        data = t.raw_data
        align = ALIGN_LARGE if len(data) >= ALIGN_LARGE_BYTES else ALIGN_SMALL
        pad = (-self.offset) % align
        if pad:
            self._f.write(b"\0" * pad)
            self.offset += pad
        self._f.write(data)
        onnx.external_data_helper.set_external_data(
            t, location=self.path.name, offset=self.offset, length=len(data))
        t.data_location = TensorProto.EXTERNAL
        t.ClearField("raw_data")
        self.offset += len(data)
        return t

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


class GraphBuilder:
    """Collects one ONNX graph. Node ``name`` values double as the prefix of their outputs."""

    def __init__(self, data: ExternalDataWriter | None):
        self.data = data
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.uses_ms_domain = False
        self._init_names: set[str] = set()
        self._node_names: set[str] = set()

    # -- graph interface -------------------------------------------------------------------
    def input(self, name: str, elem_type: int, shape: Sequence[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: Sequence[int | str]) -> str:
        """Expose ``value`` as graph output ``name`` (an Identity when the names differ)."""
        if value != name:
            self.node("Identity", [value], name=f"/output/{name}", outputs=[name])
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    # -- nodes -----------------------------------------------------------------------------
    def node(self, op: str, inputs: Sequence[str], name: str, outputs: Sequence[str] | int = 1,
             domain: str = "", **attrs) -> str | list[str]:
        """Emit one node named ``name``; returns its output name (or names when ``outputs`` is
        a count > 1 or an explicit list). Default outputs are ``{name}/output_{k}``."""
        if name in self._node_names:
            raise EdgeInferError(f"graph builder: duplicate node name {name!r}")
        self._node_names.add(name)
        outs = [f"{name}/output_{k}" for k in range(outputs)] if isinstance(outputs, int) else list(outputs)
        if domain == MS_DOMAIN:
            self.uses_ms_domain = True
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name, domain=domain or None,
                                           **attrs))
        return outs[0] if isinstance(outputs, int) and outputs == 1 else outs

    def add_nodes(self, nodes: Sequence[onnx.NodeProto]) -> None:
        for n in nodes:
            if n.name in self._node_names:
                raise EdgeInferError(f"graph builder: duplicate node name {n.name!r}")
            self._node_names.add(n.name)
            if n.domain == MS_DOMAIN:
                self.uses_ms_domain = True
            self.nodes.append(n)

    # -- initializers ----------------------------------------------------------------------
    def add_initializer(self, t: TensorProto) -> str:
        if t.name in self._init_names:
            raise EdgeInferError(f"graph builder: duplicate initializer {t.name!r}")
        self._init_names.add(t.name)
        if self.data is not None and t.HasField("raw_data") and len(t.raw_data) >= EXTERNAL_MIN_BYTES:
            self.data.externalize(t)
        self.initializers.append(t)
        return t.name

    def add_initializers(self, ts: Sequence[TensorProto]) -> None:
        for t in ts:
            self.add_initializer(t)

    def const(self, name: str, value: np.ndarray | Sequence | float | int, dtype=None) -> str:
        """A named initializer from an array (created once; repeated calls reuse it)."""
        if name in self._init_names:
            return name
        arr = np.asarray(value, dtype=dtype)
        return self.add_initializer(numpy_helper.from_array(np.ascontiguousarray(arr), name))

    def i64(self, values: Sequence[int] | int) -> str:
        """A shared int64 constant (shapes, axes), named by its value."""
        arr = np.asarray(values, dtype=np.int64)
        tag = "_".join(str(v).replace("-", "m") for v in arr.reshape(-1)) if arr.ndim else f"s{int(arr)}"
        return self.const(f"const.i64.{'v' if arr.ndim else ''}{tag}", arr)

    def f32(self, value: float) -> str:
        """A shared float32 scalar constant, named by its value."""
        return self.const(f"const.f32.{np.float32(value)!r}".replace("-", "m"),
                          np.asarray(value, dtype=np.float32))

    # -- finishing -------------------------------------------------------------------------
    def model(self, graph_name: str, doc: str = "", metadata: dict[str, str] | None = None) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs,
                                  initializer=self.initializers)
        opsets = [helper.make_opsetid("", OPSET)]
        if self.uses_ms_domain:
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="edgeinfer",
                                  doc_string=doc)
        model.ir_version = IR_VERSION
        if metadata:
            helper.set_model_props(model, metadata)
        return model


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Write ``model`` (initializers already external) without touching its external data."""
    data = model.SerializeToString()
    with open(path, "wb") as f:
        f.write(data)
