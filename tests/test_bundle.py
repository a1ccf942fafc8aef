"""Bundle manifest: round trip, validation errors, atomic staging."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeinfer.bundle import (Manifest, ModelEntry, file_entries, load_manifest, staging_dir,
                              write_manifest)
from edgeinfer.errors import BundleError
from edgeinfer.quant.recipe import QuantRecipe
from edgeinfer.spec import ModelSpec, RopeSpec

SPEC = ModelSpec(arch="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, max_position=512,
                 rope=RopeSpec(theta=10000.0, rotary_dim=16), tie_word_embeddings=True)


def make_bundle(root: Path) -> Path:
    with staging_dir(root) as stage:
        (stage / "target").mkdir()
        (stage / "target" / "model.onnx").write_bytes(b"not really onnx, but bytes with a checksum")
        (stage / "tokenizer.json").write_text("{}")
        m = Manifest(models={"target": ModelEntry(SPEC, QuantRecipe().to_dict(), "target/model.onnx")},
                     eos_token_ids=(2,), files=file_entries(stage))
        write_manifest(stage, m)
    return root


def test_round_trip(tmp_path):
    root = make_bundle(tmp_path / "b")
    m = load_manifest(root)
    assert m.models["target"].spec == SPEC
    assert m.eos_token_ids == (2,)
    assert {f.path for f in m.files} == {"target/model.onnx", "tokenizer.json"}
    assert not list(tmp_path.glob(".b.partial-*"))


def test_wrong_checksum(tmp_path):
    root = make_bundle(tmp_path / "b")
    p = root / "target" / "model.onnx"
    data = bytearray(p.read_bytes())
    data[0] ^= 1
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum mismatch"):
        load_manifest(root)


def test_missing_file(tmp_path):
    root = make_bundle(tmp_path / "b")
    (root / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="tokenizer.json: missing"):
        load_manifest(root)


def test_unknown_version(tmp_path):
    root = make_bundle(tmp_path / "b")
    d = json.loads((root / "manifest.json").read_text())
    d["version"] = 99
    (root / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(BundleError, match="unknown manifest version 99"):
        load_manifest(root)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="manifest.json: missing"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{ not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_manifest(tmp_path)


def test_staging_removed_on_failure(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staging_dir(final) as stage:
            (stage / "half-written").write_text("x")
            raise RuntimeError("interrupted")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path):
    root = make_bundle(tmp_path / "b")
    with pytest.raises(BundleError, match="already exists"):
        with staging_dir(root):
            pass
    make_bundle_overwrite = staging_dir(root, overwrite=True)
    with make_bundle_overwrite as stage:
        (stage / "new").write_text("y")
    assert (root / "new").exists() and not (root / "manifest.json").exists()
