"""Bytes of weights one plain decoding step reads, per model format.

Plain decoding of one token multiplies by every weight matrix once, but an embedding table
used only as a lookup (ONNX ``Gather``) touches one row: its bytes are not counted. A tied
embedding (also the output projection) is read in full. Metadata (tokenizer vocabularies in
a GGUF, ONNX graph protos) is not counted either. Only headers are read, never weights.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Iterable

from .probe import weight_bytes


def onnx_bytes_per_token(path: Path) -> int:
    """Initializer bytes of an ONNX model, minus initializers consumed only by Gather (data)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path), load_external_data=False)
    packed = {TensorProto.INT4, TensorProto.UINT4}
    if hasattr(TensorProto, "FLOAT4E2M1"):
        packed.add(TensorProto.FLOAT4E2M1)
    sizes: dict[str, int] = {}
    uses: dict[str, list[tuple[str, int]]] = defaultdict(list)

    def walk(graph: "onnx.GraphProto") -> None:
        for t in graph.initializer:
            n = int(np.prod(t.dims)) if len(t.dims) else 1
            if t.data_type in packed:
                sizes[t.name] = (n + 1) // 2
            else:
                sizes[t.name] = n * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        for node in graph.node:
            for i, name in enumerate(node.input):
                uses[name].append((node.op_type, i))
            for attr in node.attribute:
                for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                    walk(g)

    walk(model.graph)
    lookup_only = [n for n in sizes if uses[n] and all(op == "Gather" and i == 0 for op, i in uses[n])]
    return sum(sizes.values()) - sum(sizes[n] for n in lookup_only)


def gguf_bytes_per_token(path: Path) -> int:
    """Tensor bytes of a GGUF; ``token_embd`` is left out when a separate ``output`` exists."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    total = sum(tensors.values())
    if "output.weight" in tensors and "token_embd.weight" in tensors:
        total -= tensors["token_embd.weight"]
    return total


def safetensors_bytes_per_token(folder: Path) -> int:
    """Tensor bytes of a Hugging Face folder; the input embedding left out unless tied."""
    from safetensors import safe_open

    cfg = folder / "config.json"
    tied = json.loads(cfg.read_text()).get("tie_word_embeddings", True) if cfg.is_file() else True
    total = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="np") as st:
            for name in st.keys():
                sl = st.get_slice(name)
                n = 1
                for d in sl.get_shape():
                    n *= int(d)
                size = n * _ST_ITEMSIZE.get(sl.get_dtype(), 4)
                if not (name.endswith("embed_tokens.weight") and not tied):
                    total += size
    return total


_ST_ITEMSIZE = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def bytes_per_token(paths: Iterable[str | Path]) -> int:
    """Bytes read per plain decode step for model files / folders (file sizes as a fallback)."""
    total = 0
    for p in map(Path, paths):
        if p.is_dir():
            onnx_files = sorted(p.glob("*.onnx"))
            if onnx_files:
                total += sum(onnx_bytes_per_token(f) for f in onnx_files)
            elif any(p.glob("*.safetensors")):
                total += safetensors_bytes_per_token(p)
            else:
                total += weight_bytes([p])
        elif p.suffix == ".onnx":
            total += onnx_bytes_per_token(p)
        elif p.suffix == ".gguf":
            total += gguf_bytes_per_token(p)
        else:
            total += weight_bytes([p])
    return total
