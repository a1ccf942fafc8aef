"""Pair export end to end on tiny checkpoints: bundle contents, draft derivation, tokenizer
checks, atomicity, and the CLI's error handling (one line, non-zero exit, nothing left behind)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edgeinfer.bundle import load_manifest
from edgeinfer.cli import main
from edgeinfer.errors import ConfigError, QuantizationError, TokenizerMismatchError
from edgeinfer.export.pipeline import DraftFromTarget, ExportConfig, export_bundle
from edgeinfer.quant.recipe import QuantRecipe, WeightFormat
from edgeinfer.runtime.reference_decode import greedy_decode_onnx


def test_draft_from_target_parse():
    d = DraftFromTarget.parse("layers=2,quant=int8,block=64")
    assert d.num_layers == 2 and d.recipe.format is WeightFormat.INT8 and d.recipe.block_size == 64
    assert d.recipe.embed_format is WeightFormat.INT8  # a tied head shares one quantized table
    assert DraftFromTarget.parse("int4").num_layers is None
    with pytest.raises(ConfigError, match="unknown key 'depth'"):
        DraftFromTarget.parse("depth=3")
    with pytest.raises(ConfigError, match="not an integer"):
        DraftFromTarget.parse("layers=x")
    with pytest.raises(QuantizationError, match="unknown format 'int3'"):
        DraftFromTarget.parse("int3")


def test_pair_export_with_derived_draft(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("llama")
    out = tmp_path / "bundle"
    stages = []
    report = export_bundle(ExportConfig(out=out, target=src, draft_from_target=DraftFromTarget.parse("layers=1,quant=int8"),
                                        formats=("onnx", "gguf")),
                           progress=lambda stage, done, total: stages.append(stage))
    m = load_manifest(out)  # verifies every checksum
    assert set(m.models) == {"target", "draft"}
    assert m.models["draft"].spec.num_layers == 1
    assert m.models["draft"].spec == m.models["target"].spec.truncated(1)
    assert m.models["draft"].quant["format"] == "int8"
    assert m.models["target"].gguf and (out / m.models["target"].gguf).is_file()
    assert {"target: onnx", "draft: onnx", "target: gguf"} <= set(stages)
    assert report.models["target"].files and not list(tmp_path.glob(".bundle.partial-*"))
    import onnx

    from edgeinfer.bundle import KV_IN_PLACE, KV_LAYOUT_KEY

    for role in ("target", "draft"):  # whole-model graphs: GQA writing into the bound cache
        g = onnx.load(str(out / m.models[role].onnx), load_external_data=False)
        assert {p.key: p.value for p in g.metadata_props}.get(KV_LAYOUT_KEY) == KV_IN_PLACE
        assert {n.op_type for n in g.graph.node} >= {"GroupQueryAttention"}
    # The exported fp32 target decodes like a graph built straight from the checkpoint would:
    # greedy tokens through the bundle equal transformers' greedy tokens.
    from tiny_models import load_reference_model
    import torch

    model = load_reference_model(src)
    prompt = [5, 17, 42, 7]
    ours = greedy_decode_onnx(out / m.models["target"].onnx, m.models["target"].spec, prompt, 8)
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == ref


def test_pair_export_with_separate_draft(tiny_checkpoint, tmp_path):
    target, draft = tiny_checkpoint("llama"), tiny_checkpoint("llama_tied")
    out = tmp_path / "pair"
    export_bundle(ExportConfig(out=out, target=target, draft=draft,
                               draft_recipe=QuantRecipe("int4", embed_format="int4")))
    m = load_manifest(out)
    assert m.models["draft"].spec.tie_word_embeddings and m.models["draft"].quant["format"] == "int4"
    assert m.models["draft"].source["name"] == draft.name


def test_tokenizer_mismatch_names_first_token(tiny_checkpoint, tmp_path):
    target = tiny_checkpoint("llama")
    draft = tmp_path / "draft"
    shutil.copytree(tiny_checkpoint("llama_tied"), draft)
    tok = json.loads((draft / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    victim = next(t for t, i in vocab.items() if i == 100)
    vocab["zz-renamed"] = vocab.pop(victim)
    (draft / "tokenizer.json").write_text(json.dumps(tok))
    out = tmp_path / "out"
    with pytest.raises(TokenizerMismatchError, match=r"differ at id 100: target .* has "):
        export_bundle(ExportConfig(out=out, target=target, draft=draft))
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_cli_errors_are_one_line_and_leave_nothing(tiny_checkpoint, tmp_path, capsys):
    src = tiny_checkpoint("llama")
    out = tmp_path / "o"
    # unknown quant name
    with pytest.raises(SystemExit) as e:
        main(["export", "--target", str(src), "--quant", "int3", "--out", str(out)])
    assert e.value.code == 2
    # folder without config.json
    assert main(["export", "--target", str(tmp_path), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "no config.json" in err and str(tmp_path) in err and "Traceback" not in err
    # an output path that cannot be written (its parent is a file)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["export", "--target", str(src), "--out", str(blocker / "bundle")]) == 1
    assert "cannot write output" in capsys.readouterr().err
    # unsupported architecture
    bert = tmp_path / "bert"
    shutil.copytree(src, bert)
    cfg = json.loads((bert / "config.json").read_text())
    cfg["model_type"] = "bert"
    cfg["architectures"] = ["BertModel"]
    (bert / "config.json").write_text(json.dumps(cfg))
    assert main(["export", "--target", str(bert), "--out", str(out)]) == 1
    assert "bert" in capsys.readouterr().err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert", "file"]


def test_cli_quantize_and_inspect(tiny_checkpoint, tmp_path, capsys):
    src = tiny_checkpoint("qwen2")
    out = tmp_path / "q"
    assert main(["quantize", str(src), "--quant", "int4", "--block-size", "16", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    (model,) = doc["models"]
    assert model["arch"] == "qwen2" and model["quant"] == "int4/b16"
    formats = {t["format"] for t in model["tensors"]}
    assert "int4 MatMulNBits b16" in formats
    assert model["bytes_on_disk"] == sum(model["files"].values()) > 0
    assert model["kv_layout"] == "in place"  # exported graphs write the KV cache in place
    assert main(["inspect", str(out)]) == 0
    assert "KV cache written in place" in capsys.readouterr().out
    # inspect of the source folder lists its tensors with their stored dtypes
    assert main(["inspect", str(src), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["kind"] == "hf" and len(doc["models"][0]["tensors"]) > 10
    # running a bundle whose file was tampered with fails with a clear line
    data = next((out / "target").glob("*.data"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert main(["run", str(out), "hello", "--max-new-tokens", "2"]) == 1
    assert "checksum mismatch" in capsys.readouterr().err


def test_cli_quantize_affine_bundle_runs_close_to_fp32(tiny_checkpoint, tmp_path):
    """--affine / --accuracy-level reach the manifest and the graph, whose logits track the fp32
    export's (measured: 2.8% of the largest logit on this tiny random model)."""
    import numpy as np

    from edgeinfer.runtime.session import ModelRunner

    src = tiny_checkpoint("llama")
    outs = {}
    for name, extra in (("fp32", ["--quant", "fp32"]),
                        ("affine", ["--quant", "int8", "--affine", "--accuracy-level", "0"])):
        assert main(["quantize", str(src), *extra, "--out", str(tmp_path / name), "--quiet"]) == 0
        m = load_manifest(tmp_path / name, verify=False)
        e = m.models["target"]
        outs[name] = ModelRunner(tmp_path / name / e.onnx, e.spec).forward([1, 5, 9, 2, 7])
    r = QuantRecipe.from_dict(load_manifest(tmp_path / "affine", verify=False).models["target"].quant)
    assert r.affine and r.accuracy_level == 0
    err = np.abs(outs["affine"] - outs["fp32"]).max() / np.abs(outs["fp32"]).max()
    assert 0 < err < 0.05
