"""Lazy, validated access to the ``*.safetensors`` files of a Hugging Face folder.

Each file's header is checked by us before the ``safetensors`` library touches the data:
the header length must fit the file, every tensor's byte span must lie inside the data
section and equal dtype size x number of elements. A file that lies fails with a
CheckpointError naming the file and the tensor. Tensor data is read one tensor (or one row
range) at a time through ``safe_open`` (memory-mapped), so opening a checkpoint loads no
weights. BF16/FP8 go through ``ml_dtypes``, which teaches NumPy those types.
"""
from __future__ import annotations

import json
import math
import struct
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16 / float8 with NumPy for safe_open)
import numpy as np
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError

DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
               "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1,
               "BOOL": 1}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and validate one file's header. Raises CheckpointError naming file and tensor."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: file is {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > MAX_HEADER:
                raise CheckpointError(f"{path}: header length {n} exceeds the file size {size} "
                                      "(truncated or not a safetensors file)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header must be a JSON object")
    data_size = size - 8 - n
    out: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        out[name] = _check_entry(path, name, info, data_size)
    return out


def _check_entry(path: Path, name: str, info: object, data_size: int) -> TensorEntry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise CheckpointError(f"{where}: header entry must be an object")
    dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise CheckpointError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: shape {shape!r} must be a list of non-negative ints")
    if (not isinstance(offs, list) or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
        raise CheckpointError(f"{where}: data_offsets {offs!r} must be [begin, end]")
    begin, end = offs
    if not 0 <= begin <= end <= data_size:
        raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] lie outside the "
                              f"{data_size}-byte data section (file truncated or header corrupt)")
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise CheckpointError(f"{where}: {dtype} x {shape} needs {expected} bytes but "
                              f"data_offsets span {end - begin}")
    return TensorEntry(dtype, tuple(shape), expected)


class SafetensorsFiles:
    """The tensors of one folder's safetensors files (single or sharded), read lazily."""

    def __init__(self, folder: Path, files: dict[str, Path], entries: dict[str, TensorEntry]):
        self.path = folder
        self._files = files  # tensor name -> file
        self._entries = entries
        self._handles: dict[Path, object] = {}

    @classmethod
    def open(cls, folder: Path) -> "SafetensorsFiles":
        index = folder / INDEX_NAME
        if index.is_file():
            shard_of = _read_index(index, folder)
            shards = sorted(set(shard_of.values()))
        else:
            shards = sorted(folder.glob("*.safetensors"))
            shard_of = None
        if not shards:
            pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickled:
                raise CheckpointError(
                    f"{folder}: only pickled weights found ({', '.join(pickled)}); edgeinfer never "
                    "unpickles files. Convert them to *.safetensors first (e.g. load the model "
                    "in transformers and call save_pretrained(safe_serialization=True)).")
            raise CheckpointError(f"{folder}: no *.safetensors weight files")
        files: dict[str, Path] = {}
        entries: dict[str, TensorEntry] = {}
        for shard in shards:
            for name, entry in read_header(shard).items():
                if shard_of is not None and shard_of.get(name) != shard:
                    continue  # the index says another shard owns this tensor
                if name in files:
                    raise CheckpointError(f"{shard}: tensor {name!r} also appears in {files[name]}")
                files[name], entries[name] = shard, entry
        if shard_of is not None:
            missing = sorted(set(shard_of) - set(files))
            if missing:
                raise CheckpointError(f"{index}: tensors {missing[:5]} are not in the shards it names")
        return cls(folder, files, entries)

    # -- the RawTensors interface used by checkpoint.WeightSource ---------------------------
    def names(self) -> Collection[str]:
        return self._entries.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def dtype_name(self, name: str) -> str:
        return self._entries[name].dtype

    def nbytes(self, name: str) -> int:
        return self._entries[name].nbytes

    def where(self, name: str) -> str:
        return str(self._files[name])

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Tensor ``name`` (optionally rows [a, b) of it) as float32."""
        entry, path = self._entries[name], self._files[name]
        if entry.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {entry.dtype}; expected one "
                                  f"of {', '.join(FLOAT_DTYPES)} (FP8/integer checkpoints are not supported)")
        try:
            handle = self._handles.get(path)
            if handle is None:
                handle = self._handles[path] = safe_open(str(path), framework="numpy")
            if rows is None:
                arr = handle.get_tensor(name)
            else:
                arr = handle.get_slice(name)[rows[0]:rows[1]]
        except (SafetensorError, OSError, ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: cannot read tensor {name!r} ({e})") from None
        return np.asarray(arr).astype(np.float32)


def _read_index(index: Path, folder: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: 'weight_map' must be an object")
    out: dict[str, Path] = {}
    for name, fname in weight_map.items():
        if not isinstance(fname, str) or Path(fname).name != fname or not fname.endswith(".safetensors"):
            raise CheckpointError(f"{index}: tensor {name!r} maps to {fname!r}, expected a "
                                  "*.safetensors file name inside the folder")
        if not (folder / fname).is_file():
            raise CheckpointError(f"{index}: shard {fname!r} (for tensor {name!r}) is missing")
        out[name] = folder / fname
    return out
