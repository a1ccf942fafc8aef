"""Damaged or unsupported checkpoints fail with a CheckpointError that names the file (and
tensor / field) and says what is wrong -- never a crash, a hang or garbage weights."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from tiny_models import write_tiny_gguf

from edgeinfer.errors import CheckpointError, UnsupportedArchitectureError
from edgeinfer.export.adapters import get_adapter
from edgeinfer.export.checkpoint import load_checkpoint


@pytest.fixture
def llama_copy(tiny_checkpoint, tmp_path) -> Path:
    dst = tmp_path / "llama"
    shutil.copytree(tiny_checkpoint("llama"), dst)
    return dst


@pytest.fixture(scope="module")
def tiny_gguf(tiny_checkpoint, tmp_path_factory) -> Path:
    return write_tiny_gguf("llama", tiny_checkpoint("llama"), tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write(path: Path, header: dict, data: bytes) -> None:
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def test_missing_config_names_folder(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path}.*no config.json"):
        load_checkpoint(tmp_path)


def test_missing_path():
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint("/nonexistent/model")


def test_unsupported_architecture_lists_supported(llama_copy):
    cfg = json.loads((llama_copy / "config.json").read_text())
    (llama_copy / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(UnsupportedArchitectureError) as e:
        load_checkpoint(llama_copy)
    msg = str(e.value)
    assert "'bert'" in msg and "config.json" in msg
    for name in ("llama", "qwen2", "qwen3", "gemma3", "phi3", "mistral"):
        assert name in msg
    with pytest.raises(UnsupportedArchitectureError, match="'gpt_neox'"):
        get_adapter("gpt_neox")


def test_bin_only_folder_is_refused(llama_copy):
    (llama_copy / "model.safetensors").unlink()
    (llama_copy / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*never unpickles"):
        load_checkpoint(llama_copy)


def test_missing_tokenizer(llama_copy):
    (llama_copy / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json is missing"):
        load_checkpoint(llama_copy)


@pytest.mark.parametrize("damage, message", [
    ("offset_past_end", r"data_offsets \[\d+, \d+\] lie outside"),
    ("span_mismatch", r"F32 x \[64, 64\] needs 16384 bytes but data_offsets span"),
    ("header_too_long", "header length .* exceeds the file size"),
    ("truncated_data", "lie outside"),
    ("bad_dtype", "unknown dtype 'F99'"),
    ("not_json", "header is not valid JSON"),
])
def test_lying_safetensors_header(llama_copy, damage, message):
    st = llama_copy / "model.safetensors"
    header, data = _header(st)
    victim = "model.layers.1.self_attn.q_proj.weight"
    entry = header[victim]
    if damage == "offset_past_end":
        entry["data_offsets"] = [len(data) - 8, len(data) + 16376]
    elif damage == "span_mismatch":
        entry["data_offsets"][1] -= 4
    elif damage == "bad_dtype":
        entry["dtype"] = "F99"
    elif damage == "truncated_data":
        last = max(header, key=lambda k: header[k]["data_offsets"][1] if k != "__metadata__" else -1)
        victim, data = last, data[: header[last]["data_offsets"][0] + 10]
    if damage == "header_too_long":
        st.write_bytes(struct.pack("<Q", 10 ** 9) + b"{}")
    elif damage == "not_json":
        st.write_bytes(struct.pack("<Q", 8) + b"{nope!!}")
    else:
        _write(st, header, data)
    with pytest.raises(CheckpointError, match=message) as e:
        load_checkpoint(llama_copy)
    assert "model.safetensors" in str(e.value)
    if damage not in ("header_too_long", "not_json"):
        assert victim in str(e.value)


def test_shape_disagreeing_with_config(llama_copy):
    cfg = json.loads((llama_copy / "config.json").read_text())
    (llama_copy / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(CheckpointError,
                       match=r"model.layers.0.mlp.gate_proj.weight.*\(128, 64\), expected \(96, 64\)"):
        load_checkpoint(llama_copy)


def test_unsupported_rope_scaling(llama_copy):
    cfg = json.loads((llama_copy / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (llama_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json.*'yarn' is not supported"):
        load_checkpoint(llama_copy)


def test_sharded_index_pointing_to_missing_shard(tiny_checkpoint, tmp_path):
    dst = tmp_path / "qwen3"
    shutil.copytree(tiny_checkpoint("qwen3"), dst)
    shard = sorted(dst.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"model.safetensors.index.json.*{shard.name}.*missing"):
        load_checkpoint(dst)


@pytest.mark.parametrize("cut, message", [
    (0.999, r"tensor '[\w.]+' needs bytes \d+\.\.\d+ but the file has {size}: truncated"),
    (0.5, r"tensor '[\w.]+' needs bytes \d+\.\.\d+ but the file has {size}: truncated"),
    (0.01, r"metadata '[\w.]+' runs past the end of the file \({size} bytes\): truncated"),
    (0.0, r"magic runs past the end of the file \(0 bytes\)"),
])
def test_truncated_gguf(tiny_gguf, tmp_path, cut, message):
    raw = tiny_gguf.read_bytes()
    bad = tmp_path / "truncated.gguf"
    size = int(len(raw) * cut)
    bad.write_bytes(raw[:size])
    with pytest.raises(CheckpointError, match="truncated.gguf: " + message.format(size=size)):
        load_checkpoint(bad)


def test_corrupted_gguf_magic(tiny_gguf, tmp_path):
    bad = tmp_path / "magic.gguf"
    bad.write_bytes(b"GGUX" + tiny_gguf.read_bytes()[4:])
    with pytest.raises(CheckpointError,
                       match=r"magic.gguf: not a GGUF file \(magic b'GGUX', expected b'GGUF'\)"):
        load_checkpoint(bad)


def test_gguf_tensor_offset_past_end(tiny_gguf, tmp_path):
    """A tensor whose data offset points past the end of the file."""
    from gguf import GGUFReader

    raw = bytearray(tiny_gguf.read_bytes())
    reader = GGUFReader(tiny_gguf)
    last = max(reader.tensors, key=lambda t: t.data_offset)
    field = last.field  # parts: name_len, name, n_dims, dims, type, offset
    pos = field.offset + sum(p.nbytes for p in field.parts[:-1])
    raw[pos:pos + 8] = struct.pack("<Q", len(raw))  # relative to the data section: far past the end
    bad = tmp_path / "offset.gguf"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError,
                       match=f"offset.gguf: tensor '{last.name}' needs bytes .* but the file has {len(raw)}"):
        load_checkpoint(bad)


def test_gguf_unsupported_architecture(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "bert.gguf"
    w = gguf.GGUFWriter(str(path), "bert")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedArchitectureError, match="bert.gguf.*'bert' is not supported.*gemma3"):
        load_checkpoint(path)


def test_gguf_corrupted_header_fields(tiny_gguf, tmp_path):
    from gguf import GGUFReader

    raw = bytearray(tiny_gguf.read_bytes())
    huge_key = bytearray(raw)
    huge_key[24:32] = struct.pack("<Q", 2 ** 40)  # length of the first metadata key
    (tmp_path / "key.gguf").write_bytes(bytes(huge_key))
    with pytest.raises(CheckpointError, match="key.gguf: metadata key #0 runs past the end"):
        load_checkpoint(tmp_path / "key.gguf")
    field = GGUFReader(tiny_gguf).tensors[0].field  # parts: name_len, name, n_dims, dims, type, offset
    pos = field.offset + sum(p.nbytes for p in field.parts[:4])
    raw[pos:pos + 4] = struct.pack("<I", 99)
    (tmp_path / "type.gguf").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="type.gguf: tensor '[\\w.]+' has unknown ggml type 99"):
        load_checkpoint(tmp_path / "type.gguf")
