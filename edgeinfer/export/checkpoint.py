"""A checkpoint read into the canonical form: spec + lazy canonical weights + tokenizer.

    ckpt = load_checkpoint("path/to/hf_folder")          # or "model.gguf"
    ckpt.spec                                             # ModelSpec
    ckpt.weights.get("layers.0.attn.q_proj.weight")       # float32 [heads*head_dim, hidden]
    ckpt.weights.source_type("layers.0.attn.q_proj.weight")   # "BF16", "Q4_1", ...
    ckpt.tokenizer.tokenizer_json                          # a `tokenizers` JSON document

Opening a checkpoint parses headers/metadata and checks every tensor's presence and shape
against the spec, but reads no weight data: files are memory-mapped and each ``get`` reads
(and dequantizes) just that tensor.
"""
from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from ..errors import CheckpointError
from ..spec import ModelSpec, TokenizerInfo
from .adapters.base import TensorRef


class RawTensors(Protocol):
    """The tensors of a file (set) under their stored names; implemented per format."""

    path: Path

    def names(self) -> Collection[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...  # NumPy order: [rows, cols]
    def dtype_name(self, name: str) -> str: ...  # "F32", "BF16", "Q4_1", ...
    def nbytes(self, name: str) -> int: ...  # bytes the stored tensor occupies
    def where(self, name: str) -> str: ...  # the file holding it, for messages
    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray: ...  # float32


def canonical_shape(spec: ModelSpec, name: str) -> tuple[int, ...]:
    """The shape ``spec`` implies for canonical tensor ``name``."""
    h, hd, it = spec.hidden_size, spec.head_dim, spec.intermediate_size
    q, kv = spec.num_heads * hd, spec.num_kv_heads * hd
    leaf = name.split(".", 2)[-1] if name.startswith("layers.") else name
    shapes = {
        "embed_tokens.weight": (spec.vocab_size, h), "lm_head.weight": (spec.vocab_size, h),
        "norm.weight": (h,), "input_norm.weight": (h,), "post_attn_norm.weight": (h,),
        "pre_mlp_norm.weight": (h,), "post_mlp_norm.weight": (h,),
        "attn.q_proj.weight": (q, h), "attn.q_proj.bias": (q,),
        "attn.k_proj.weight": (kv, h), "attn.k_proj.bias": (kv,),
        "attn.v_proj.weight": (kv, h), "attn.v_proj.bias": (kv,),
        "attn.o_proj.weight": (h, q), "attn.q_norm.weight": (hd,), "attn.k_norm.weight": (hd,),
        "mlp.gate_proj.weight": (it, h), "mlp.up_proj.weight": (it, h),
        "mlp.down_proj.weight": (h, it),
    }
    if leaf not in shapes:
        raise CheckpointError(f"{name!r} is not a canonical tensor name")
    return shapes[leaf]


class WeightSource:
    """Canonical tensors of one checkpoint, produced on demand from the stored ones."""

    def __init__(self, raw: RawTensors, refs: dict[str, TensorRef]):
        self.raw = raw
        self._refs = refs

    def names(self) -> list[str]:
        return list(self._refs)

    def __contains__(self, name: object) -> bool:
        return name in self._refs

    def __iter__(self) -> Iterator[str]:
        return iter(self._refs)

    def __len__(self) -> int:
        return len(self._refs)

    def ref(self, name: str) -> TensorRef:
        try:
            return self._refs[name]
        except KeyError:
            raise CheckpointError(f"{self.raw.path}: no canonical tensor {name!r}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        ref = self.ref(name)
        return ref.out_shape(self.raw.shape(ref.source))

    def get(self, name: str) -> np.ndarray:
        """Canonical tensor ``name`` as a new float32 array (see ``edgeinfer.spec``)."""
        ref = self.ref(name)
        return ref.finish(self.raw.read(ref.source, ref.rows))

    def source_type(self, name: str) -> str:
        """How the tensor is stored: "F32", "F16", "BF16", "Q4_1", "Q6_K", ..."""
        return self.raw.dtype_name(self.ref(name).source)

    def source_name(self, name: str) -> str:
        return self.ref(name).source

    def nbytes_on_disk(self, name: str) -> int:
        """Stored bytes of this tensor (its share, for a row range of a fused tensor)."""
        ref = self.ref(name)
        total = self.raw.nbytes(ref.source)
        if ref.rows is None:
            return total
        return total * (ref.rows[1] - ref.rows[0]) // self.raw.shape(ref.source)[0]

    def validate(self, spec: ModelSpec) -> None:
        """Every tensor the spec needs exists with the right shape; raises CheckpointError."""
        present = self.raw.names()
        for name in spec.tensor_names():
            if name not in self._refs:
                raise CheckpointError(f"{self.raw.path}: no mapping for canonical tensor {name!r}")
            ref = self._refs[name]
            if ref.source not in present:
                raise CheckpointError(
                    f"{self.raw.path}: tensor {ref.source!r} (canonical {name!r}) is missing")
            src_shape = self.raw.shape(ref.source)
            if ref.rows is not None and not 0 <= ref.rows[0] < ref.rows[1] <= (src_shape or (0,))[0]:
                raise CheckpointError(f"{self.raw.where(ref.source)}: tensor {ref.source!r} has shape "
                                      f"{src_shape}, too small for rows {ref.rows} ({name!r})")
            got, want = ref.out_shape(src_shape), canonical_shape(spec, name)
            if got != want:
                raise CheckpointError(f"{self.raw.where(ref.source)}: tensor {ref.source!r} "
                                      f"(canonical {name!r}) has shape {got}, expected {want}")


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    kind: Literal["hf", "gguf"]
    spec: ModelSpec
    weights: WeightSource
    tokenizer: TokenizerInfo


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a Hugging Face folder or a ``.gguf`` file (lazily; see module doc)."""
    p = Path(path)
    if p.is_dir():
        from .hf_reader import read_hf_folder
        return read_hf_folder(p)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder")
    if p.suffix.lower() == ".gguf" or _has_gguf_magic(p):
        from .gguf_reader import read_gguf
        return read_gguf(p)
    if p.suffix == ".safetensors" or p.name == "config.json":
        raise CheckpointError(f"{p}: pass the folder that holds config.json and the "
                              "*.safetensors files, not one file")
    raise CheckpointError(f"{p}: expected a Hugging Face model folder or a .gguf file")


def _has_gguf_magic(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False
