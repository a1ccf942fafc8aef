"""The exact (lossless) target recipe: affine int4 blocks with float32 activations for linear
weights on a 4-bit block grid, fp32 for the rest. Checked against the fp32 export of the same
checkpoint: same logits up to float summation order, same greedy tokens."""
from __future__ import annotations

import numpy as np
import pytest

from edgeinfer.errors import ConfigError
from edgeinfer.export.checkpoint import load_checkpoint
from edgeinfer.export.pipeline import ExportConfig, export_bundle
from edgeinfer.quant.exact import exact_recipe, holds_exactly
from edgeinfer.quant.recipe import QuantRecipe, WeightFormat
from edgeinfer.runtime import reference_decode as rd

from test_quant_affine import q41_grid


def test_holds_exactly_only_4_bit_block_grids():
    rng = np.random.default_rng(0)
    assert holds_exactly(q41_grid(rng, 8, 96))
    assert holds_exactly(q41_grid(rng, 8, 100, levels=[1, 9]))  # ragged last block, few levels
    assert not holds_exactly(rng.standard_normal((8, 96)).astype(np.float32))
    q8 = (rng.integers(-127, 128, (8, 96)) * 0.01).astype(np.float32)  # a Q8_0-like grid: 255 levels
    assert not holds_exactly(q8)
    assert holds_exactly(np.zeros((4, 64), np.float32))


def test_exact_recipe_keeps_what_int4_cannot_hold():
    rng = np.random.default_rng(1)
    w = {"layers.0.attn.q_proj.weight": q41_grid(rng, 8, 64),
         "layers.0.mlp.down_proj.weight": rng.standard_normal((8, 64)).astype(np.float32),
         "layers.0.input_norm.weight": np.ones(64, np.float32), "embed_tokens.weight": q41_grid(rng, 16, 64)}
    seen = []
    recipe, report = exact_recipe(list(w), w.__getitem__, progress=lambda d, t: seen.append((d, t)))
    assert report.exact == ("layers.0.attn.q_proj.weight",)
    assert report.kept == ("layers.0.mlp.down_proj.weight",)
    assert seen == [(1, 2), (2, 2)]  # only linear weights are examined
    assert recipe.format_for("layers.0.attn.q_proj.weight") is WeightFormat.INT4
    for name in ("layers.0.mlp.down_proj.weight", "lm_head.weight", "embed_tokens.weight"):
        assert recipe.format_for(name) is WeightFormat.FP32
    assert recipe.affine and recipe.accuracy_level == 0


def test_exact_target_equals_the_fp32_export(tmp_path, tiny_checkpoint):
    """A Q4_1 GGUF of a tiny llama (written by us) exported exact and fp32: every linear weight
    held as int4, the graphs agree to float rounding, greedy tokens identical."""
    from edgeinfer.export.gguf_writer import write_gguf

    hf = load_checkpoint(tiny_checkpoint("llama"))
    gguf = write_gguf(hf.spec, hf.weights.get, hf.tokenizer, QuantRecipe(WeightFormat.INT4, affine=True),
                      tmp_path / "q4_1.gguf").path
    ckpt = load_checkpoint(gguf)
    exact = export_bundle(ExportConfig(out=tmp_path / "exact", target=gguf, target_exact=True))
    fp32 = export_bundle(ExportConfig(out=tmp_path / "fp32", target=gguf))
    m = exact.models["target"]
    assert m.recipe.format is WeightFormat.INT4 and m.recipe.keep == ("lm_head.weight",)
    assert any("of" in n and "affine int4" in n for n in m.notes)
    assert sum(m.files.values()) < 0.8 * sum(fp32.models["target"].files.values())
    sessions = [rd.make_session(tmp_path / b / "target" / "model.onnx", threads=1) for b in ("exact", "fp32")]
    ids = [1, 5, 9, 33, 2, 17, 40, 8]
    logits = [rd.run_tree(s, ckpt.spec, rd.empty_kv(ckpt.spec), ids, list(range(-1, len(ids) - 1)), 0).logits
              for s in sessions]
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-4, atol=1e-4 * np.abs(logits[1]).max())
    greedy = [rd.greedy_decode_session(s, ckpt.spec, ids, 16, ()) for s in sessions]
    assert greedy[0] == greedy[1]


def test_exact_of_a_float_checkpoint_keeps_everything(tmp_path, tiny_checkpoint):
    report = export_bundle(ExportConfig(out=tmp_path / "b", target=tiny_checkpoint("llama"), target_exact=True))
    m = report.models["target"]
    assert all(m.recipe.format_for(n) is WeightFormat.FP32 for n in m.spec.tensor_names())
    assert any("kept at fp32" in n for n in m.notes)


def test_exact_and_a_quant_format_conflict(tmp_path):
    with pytest.raises(ConfigError, match="exact"):
        ExportConfig(out=tmp_path / "b", target_exact=True, target_recipe=QuantRecipe(WeightFormat.INT8))


def test_cli_exact(tiny_checkpoint, tmp_path, capsys):
    from edgeinfer.bundle import load_manifest
    from edgeinfer.cli import main

    src = tiny_checkpoint("llama")
    assert main(["quantize", str(src), "--exact", "--out", str(tmp_path / "q"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "exact: 0 of" in out and "kept at fp32" in out  # random float weights are on no grid
    recipe = QuantRecipe.from_dict(load_manifest(tmp_path / "q", verify=False).models["target"].quant)
    assert recipe.accuracy_level == 0 and "lm_head.weight" in recipe.keep
    assert main(["quantize", str(src), "--out", str(tmp_path / "r"), "--quiet"]) == 1
    assert "--quant FORMAT or --exact" in capsys.readouterr().err
    assert main(["export", "--target", str(src), "--exact", "--quant", "int8", "--out", str(tmp_path / "e"),
                 "--quiet"]) == 1
    assert "exact" in capsys.readouterr().err and not (tmp_path / "e").exists()
