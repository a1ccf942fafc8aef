"""Token Recycling's prior (runtime/recycle_prior.py): computed at export from the target, stored
in the bundle, checked on load, and drafting from the first token of a generation, losslessly."""
from __future__ import annotations

import json

import numpy as np
import pytest

import edgeinfer
from edgeinfer.bundle import load_manifest
from edgeinfer.cli import main as cli_main
from edgeinfer.errors import BundleError, ConfigError
from edgeinfer.export.pipeline import ExportConfig, export_bundle
from edgeinfer.runtime.drafters.base import TreeBudget
from edgeinfer.runtime.drafters.recycle import RecyclingDrafter
from edgeinfer.runtime.recycle_prior import PRIOR_DTYPE, load_bundle_prior, load_prior, prior_context
from edgeinfer.runtime.tokenizer import Tokenizer

PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def bundles(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("prior")
    src = tiny_checkpoint("llama")
    with_prior, without = root / "with", root / "without"
    export_bundle(ExportConfig(out=with_prior, target=src, recycle_prior=True))
    export_bundle(ExportConfig(out=without, target=src))
    return src, with_prior, without


def test_prior_rows_are_the_targets_topk_after_the_context(bundles):
    """Every row against transformers' logits for context + [token] (ties between neighbouring
    ranks allowed: a batched tree pass rounds differently from a single forward)."""
    import torch

    from tiny_models import load_reference_model

    src, root, _ = bundles
    m = load_manifest(root)
    entry = m.models["target"].recycle_prior
    assert entry is not None and entry.k == 8 and entry.file in {f.path for f in m.files}
    tok = Tokenizer.from_bundle(root, m)
    # the tiny chat template's generation prompt, as text after the messages
    assert list(entry.context) == tok.encode("<|im_start|>assistant\n", add_bos=False) == prior_context(tok)
    table = load_bundle_prior(root, m)
    vocab = m.models["target"].spec.vocab_size
    assert table.shape == (vocab, 8) and table.dtype == PRIOR_DTYPE
    model = load_reference_model(src)
    ids = torch.tensor([[*entry.context, v] for v in range(vocab)])
    with torch.no_grad():
        ref = model(ids).logits[:, -1].numpy()
    for v in range(vocab):
        row = ref[v]
        want = np.sort(row)[::-1][:8]
        got = row[table[v]]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"token {v}")
        assert len(set(table[v].tolist())) == 8


def test_drafter_starts_from_the_prior_and_observations_replace_it():
    prior = np.tile(np.arange(3, dtype=np.int32), (10, 1)) + np.arange(10, dtype=np.int32)[:, None] % 7
    d = RecyclingDrafter(vocab_size=10, k=3, shape_nodes=4, shape_depth=2, rank_weights=(0.6, 0.2, 0.1),
                         prior=prior)
    np.testing.assert_array_equal(d.adj, prior)
    assert d.propose([4], TreeBudget(max_nodes=1)).tokens == [int(prior[4, 0])]
    d.update(np.array([4]), np.array([[9, 8, 7]]))
    assert d.propose([4], TreeBudget(max_nodes=1)).tokens == [9]
    assert (prior[4] == [4, 5, 6]).all()  # the prior itself is not written
    d.forget()
    np.testing.assert_array_equal(d.adj, prior)
    with pytest.raises(ConfigError, match="prior"):
        RecyclingDrafter(vocab_size=11, k=3, rank_weights=(0.6, 0.2, 0.1), prior=prior)


def test_engine_drafts_from_the_prior_and_stays_lossless(bundles):
    """Same tokens as plain decoding, in trees and chains; more verified trees than without the
    prior (a token the table has not seen drafts its prior row instead of nothing)."""
    _, root, without = bundles
    cold = edgeinfer.load(without)
    ref = cold.generate(PROMPT, max_new_tokens=24, mode="plain")
    assert (cold.drafters["recycle"].adj == -1).all()
    eng = edgeinfer.load(root)
    rec = eng.drafters["recycle"]
    np.testing.assert_array_equal(rec.adj, load_bundle_prior(root, load_manifest(root)))
    for mode in ("tree", "chain"):
        rec.forget()
        cold.drafters["recycle"].forget()
        r = eng.generate(PROMPT, max_new_tokens=24, mode=mode, drafter="recycle")
        c = cold.generate(PROMPT, max_new_tokens=24, mode=mode, drafter="recycle")
        assert r.tokens == c.tokens == ref.tokens, mode
        assert r.stats.verifications > c.stats.verifications, mode


def test_streamed_engine_uses_the_prior(tiny_checkpoint, tmp_path):
    out = tmp_path / "b"
    export_bundle(ExportConfig(out=out, target=tiny_checkpoint("llama"), shards=True, recycle_prior=True))
    ref = edgeinfer.load(out).generate(PROMPT, max_new_tokens=16, mode="plain")
    from edgeinfer.runtime.memory import current_usage

    # above whatever this test process already holds (torch, transformers, earlier engines)
    eng = edgeinfer.load(out, memory_budget=current_usage() + 2**30)
    np.testing.assert_array_equal(eng.drafters["recycle"].adj, load_bundle_prior(out, load_manifest(out)))
    r = eng.generate(PROMPT, max_new_tokens=16, mode="tree", drafter="recycle")
    assert r.tokens == ref.tokens


def test_bad_prior_files_are_clear_errors(bundles, tmp_path):
    import shutil

    _, root, _ = bundles
    m = load_manifest(root)
    entry = m.models["target"].recycle_prior
    vocab = m.models["target"].spec.vocab_size
    bad = tmp_path / "prior.i32"
    np.zeros((vocab, 4), dtype=PRIOR_DTYPE).tofile(bad)
    with pytest.raises(BundleError, match=r"prior\.i32.*bytes.*\[\d+, 8\]"):
        load_prior(bad, vocab, 8)
    np.full((vocab, 8), vocab, dtype=PRIOR_DTYPE).tofile(bad)
    with pytest.raises(BundleError, match="token ids must lie in"):
        load_prior(bad, vocab, 8)
    with pytest.raises(BundleError, match="cannot read"):
        load_prior(tmp_path / "missing.i32", vocab, 8)
    # a bundle whose prior was rewritten fails the checksum; a malformed manifest entry names its field
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    table = np.fromfile(copy / entry.file, dtype=PRIOR_DTYPE)
    table[0] = (table[0] + 1) % vocab
    table.tofile(copy / entry.file)
    with pytest.raises(BundleError, match="checksum"):
        edgeinfer.load(copy)
    doc = json.loads((copy / "manifest.json").read_text())
    doc["models"]["target"]["recycle_prior"]["k"] = 0
    (copy / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match=r"recycle_prior\.k"):
        load_manifest(copy, verify=False)


def test_cli_export_flag_and_inspect(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli_main(["export", "--target", str(tiny_checkpoint("llama")), "--out", str(out), "--recycle-prior",
                     "--quiet"]) == 0
    entry = load_manifest(out).models["target"].recycle_prior
    assert entry is not None
    capsys.readouterr()
    assert cli_main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    vocab = load_manifest(out).models["target"].spec.vocab_size
    assert f"Token Recycling prior: the target's top-8 after each of its {vocab} tokens" in text
    assert "target/recycle_prior.i32" in text
    assert cli_main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["models"][0]["recycle_prior"]["k"] == 8
    with pytest.raises(ConfigError, match="recycle_prior"):
        ExportConfig(out=tmp_path / "g", target=tiny_checkpoint("llama"), formats=("gguf",), recycle_prior=True)
    out2 = tmp_path / "cli2"
    assert cli_main(["export", "--target", str(tiny_checkpoint("llama")), "--out", str(out2), "--quiet"]) == 0
    assert load_manifest(out2).models["target"].recycle_prior is None
