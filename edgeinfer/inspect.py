"""`edgeinfer inspect`: what a bundle, GGUF file or Hugging Face folder contains."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError


@dataclass(frozen=True)
class TensorInfo:
    name: str
    format: str  # e.g. "F32", "Q4_1", "int4 (MatMulNBits)", "float32"
    shape: tuple[int, ...]
    bytes: int


@dataclass
class ModelInfo:
    role: str  # "target" | "draft" | "model"
    arch: str
    num_parameters: int
    num_layers: int
    hidden_size: int
    vocab_size: int
    quant: str
    # ONNX graphs: "in place" (GroupQueryAttention writes into the runtime's cache, bundle.py
    # KV_LAYOUT_KEY) or "new nodes" (presents hold only the new nodes' K/V); "" for other files
    kv_layout: str = ""
    # per-layer shards for offloading: layers, shards per layer, the largest shard's data bytes
    # (what a streaming pool must hold at once); None without shards
    shards: dict[str, int] | None = None
    # Token Recycling's prior (bundle.RecyclePriorEntry): {"file", "k", "context"}; None without
    recycle_prior: dict[str, Any] | None = None
    files: dict[str, int] = field(default_factory=dict)  # path -> bytes on disk
    tensors: list[TensorInfo] = field(default_factory=list)

    @property
    def bytes_on_disk(self) -> int:
        return sum(self.files.values())


@dataclass
class InspectReport:
    path: Path
    kind: str  # "bundle" | "gguf" | "hf"
    models: list[ModelInfo]


def inspect_path(path: str | Path, tensors: bool = True) -> InspectReport:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir() and (path / "manifest.json").is_file():
        return _inspect_bundle(path, tensors)
    from .export.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    spec = ckpt.spec
    info = ModelInfo("model", spec.arch, spec.num_parameters(), spec.num_layers, spec.hidden_size,
                     spec.vocab_size, quant="source")
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    info.files = {p.name: p.stat().st_size for p in files}
    if tensors:  # described from the checkpoint's index: no weight is read
        w = ckpt.weights
        info.tensors = [TensorInfo(name, w.source_type(name), tuple(w.shape(name)), int(w.nbytes_on_disk(name)))
                        for name in w.names()]
    return InspectReport(path, ckpt.kind, [info])


def _inspect_bundle(path: Path, tensors: bool) -> InspectReport:
    from .bundle import load_manifest

    manifest = load_manifest(path, verify=False)
    models = []
    for role, entry in manifest.models.items():
        spec = entry.spec
        q = entry.quant
        quant = q.get("format", "?") + (f"/b{q.get('block_size')}" if q.get("format") in ("int4", "int8", "fp8") else "")
        info = ModelInfo(role, spec.arch, spec.num_parameters(), spec.num_layers, spec.hidden_size,
                         spec.vocab_size, quant=quant)
        info.files = {f.path: f.bytes for f in manifest.files if f.path.startswith(role + "/")}
        if entry.shards:
            info.shards = _shard_layout(entry.shards, info.files)
        if entry.recycle_prior:
            info.recycle_prior = entry.recycle_prior.to_dict()
        if entry.onnx and (path / entry.onnx).is_file():
            import onnx

            graph = onnx.load(str(path / entry.onnx), load_external_data=False)  # once for both
            info.kv_layout = _onnx_kv_layout(graph)
            if tensors:
                info.tensors = _onnx_initializers(graph)
        models.append(info)
    return InspectReport(path, "bundle", models)


def _shard_layout(shards: dict[str, Any], files: dict[str, int]) -> dict[str, int]:
    """Layers, shards per layer (the most any layer has) and the largest layer shard's data
    file, from the manifest's ``shards`` and file sizes."""
    layers = [[p] if isinstance(p, str) else list(p) for p in shards.get("layers") or []]
    sizes = [files.get(p + ".data", 0) for parts in layers for p in parts]
    return {"layers": len(layers), "shards_per_layer": max((len(x) for x in layers), default=0),
            "largest_shard_bytes": max(sizes, default=0)}


def _onnx_kv_layout(model: Any) -> str:
    """"in place" or "new nodes" for an ONNX ModelProto (bundle.kv_in_place)."""
    from .bundle import kv_in_place

    return "in place" if kv_in_place({p.key: p.value for p in model.metadata_props}) else "new nodes"


def _onnx_initializers(model: Any) -> list[TensorInfo]:
    """Initializers of an ONNX ModelProto, labelled by how the graph uses them (e.g. "int4
    MatMulNBits b32" for packed weights, "scales"), with their sizes in the external data file."""
    import onnx

    role: dict[str, str] = {}
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type not in ("MatMulNBits", "GatherBlockQuantized"):
            continue
        # MatMulNBits: A, B, scales, zero_points; GatherBlockQuantized: data, indices, scales, zero_points
        packed = node.input[1] if node.op_type == "MatMulNBits" else node.input[0]
        role.setdefault(packed, f"int{attrs.get('bits', 4)} {node.op_type} b{attrs.get('block_size', '?')}")
        for idx, kind in ((2, "scales"), (3, "zero_points")):
            if idx < len(node.input) and node.input[idx]:
                role.setdefault(node.input[idx], kind)
    out = []
    for init in model.graph.initializer:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
        n = 1
        for d in init.dims:
            n *= d
        size = n * dtype.itemsize
        for kv in init.external_data:
            if kv.key == "length":
                size = int(kv.value)
        fmt = role.get(init.name) or onnx.TensorProto.DataType.Name(init.data_type).lower()
        out.append(TensorInfo(init.name, fmt, tuple(init.dims), size))
    return out


def report_to_json(report: InspectReport) -> str:
    return json.dumps({
        "path": str(report.path), "kind": report.kind,
        "models": [{
            "role": m.role, "arch": m.arch, "num_parameters": m.num_parameters,
            "num_layers": m.num_layers, "hidden_size": m.hidden_size, "vocab_size": m.vocab_size,
            "quant": m.quant, "kv_layout": m.kv_layout, "shards": m.shards, "recycle_prior": m.recycle_prior,
            "bytes_on_disk": m.bytes_on_disk,
            "files": m.files,
            "tensors": [{"name": t.name, "format": t.format, "shape": list(t.shape), "bytes": t.bytes}
                        for t in m.tensors],
        } for m in report.models],
    }, indent=2)
