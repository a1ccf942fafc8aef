"""edgeinfer.load on a bundle built here (byte BPE tokenizer, ChatML template, random target
and a first-layer draft), and the bundle errors users can hit."""
import json
import subprocess
import sys

import pytest

import edgeinfer
from edgeinfer.errors import BundleError, ConfigError, ContextLimitError

from runtime_models import make_bundle, raw_greedy, same_or_near_tie, tiny_spec


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("api") / "bundle", tiny_spec(layers=2, vocab=320), draft_layers=1)


@pytest.fixture(scope="module")
def engine(bundle):
    return edgeinfer.load(bundle, providers=["qnn", "cpu"], threads=1, max_context=96)


def test_generate_text_prompt_matches_independent_greedy(bundle, engine):
    spec = engine.target.spec
    ids = engine.tokenizer.encode("The quick brown fox")
    ref, gaps = raw_greedy(bundle / "target" / "model.onnx", spec, ids, 24)
    for mode in ("plain", "tree", "chain"):
        r = engine.generate("The quick brown fox", max_new_tokens=24, mode=mode, ignore_eos=True)
        assert same_or_near_tie(r.tokens, ref, gaps) and r.prompt_ids == ids
        assert r.text == engine.tokenizer.decode(r.tokens)
    assert r.stats.drafters == ("model",)  # the bundle's draft is the default drafter


def test_chat_messages_use_the_template(engine):
    msgs = [{"role": "user", "content": "你好 😀"}]
    r = engine.generate(msgs, max_new_tokens=4, ignore_eos=True)
    rendered = engine.tokenizer.render_chat(msgs)
    assert rendered.startswith("<|im_start|>user\n你好 😀<|im_end|>")
    assert r.prompt_ids == engine.tokenizer.encode(rendered)
    assert "".join(engine.stream(msgs, max_new_tokens=4, ignore_eos=True)) == r.text


def test_provider_fallback_is_reported(engine):
    rep = engine.runners["target"].report
    assert rep.chosen == "CPUExecutionProvider"
    assert rep.skipped[0].provider == "QNNExecutionProvider" and "not installed" in rep.skipped[0].reason
    stats = engine.generate("hello", max_new_tokens=2).stats
    assert stats.providers["target"] == "CPUExecutionProvider" and "QNN" in stats.provider_notes["target"]
    assert engine.providers() == {"target": "CPUExecutionProvider", "draft": "CPUExecutionProvider"}


def test_separate_draft_providers_and_drafter_choice(bundle):
    eng = edgeinfer.load(bundle, draft_providers=["xnnpack"], drafters=["ngram"], max_context=64)
    assert eng.runners["target"].report.skipped == ()
    assert eng.runners["draft"].report.skipped[0].provider == "XnnpackExecutionProvider"
    r = eng.generate("hello hello hello", max_new_tokens=6, ignore_eos=True)
    assert r.stats.drafters == ("ngram",)


def test_bad_input_errors(engine):
    with pytest.raises(ConfigError, match="prompt: empty"):
        engine.generate("")
    with pytest.raises(ConfigError, match="max_new_tokens"):
        engine.generate("hi", max_new_tokens=0)
    with pytest.raises(ConfigError, match="temperature"):
        engine.generate("hi", temperature=-0.5)
    with pytest.raises(ConfigError, match="top_p"):
        engine.generate("hi", top_p=1.01)
    with pytest.raises(ContextLimitError, match="context limit is 96 tokens"):
        engine.generate("hello " * 200, max_new_tokens=4)
    with pytest.raises(ContextLimitError, match=r"max_new_tokens=90"):
        engine.generate("hello world", max_new_tokens=90)
    with pytest.raises(TypeError, match="unknown option"):
        edgeinfer.load("x", thread=2)


def copy_bundle(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_bundle_errors(bundle, tmp_path):
    with pytest.raises(BundleError, match="not a bundle directory"):
        edgeinfer.load(tmp_path / "nothing")
    b = copy_bundle(bundle, tmp_path / "missing")
    (b / "draft" / "model.onnx.data").unlink()
    with pytest.raises(BundleError, match=r"model.onnx.data: missing from the bundle"):
        edgeinfer.load(b)
    b = copy_bundle(bundle, tmp_path / "corrupt")
    weights = b / "target" / "model.onnx.data"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 1  # one bit of one float weight: same size, still a loadable model
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"target/model.onnx.data: checksum mismatch"):
        edgeinfer.load(b)
    edgeinfer.load(b, verify_checksums=False, max_context=32)  # sizes are still checked, hashes not
    b = copy_bundle(bundle, tmp_path / "version")
    m = json.loads((b / "manifest.json").read_text())
    m["version"] = 99
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="unknown manifest version 99"):
        edgeinfer.load(b)


def test_import_is_lazy():
    code = ("import sys, edgeinfer; c = edgeinfer.GenerationConfig(max_new_tokens=3); "
            "bad = [m for m in ('onnx', 'onnxruntime', 'torch', 'transformers') if m in sys.modules]; "
            "print(bad); assert not bad")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert edgeinfer.GenerationConfig is edgeinfer.runtime.config.GenerationConfig


def test_runtime_does_not_import_torch_or_onnx(bundle):
    code = (f"import sys, edgeinfer; e = edgeinfer.load({str(bundle)!r}, max_context=32); "
            "e.generate('hi', max_new_tokens=2, mode='tree'); "
            "bad = [m for m in ('onnx', 'torch', 'transformers') if m in sys.modules]; "
            "print(bad); assert not bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_draft_threads_follow_the_target_unless_it_runs_beside_a_pass(bundle):
    def threads(engine, name):
        so = engine.runners[name].session.get_session_options()
        assert so.get_session_config_entry("session.force_spinning_stop") == "1"  # no spinning after a run
        return so.intra_op_num_threads

    turns = edgeinfer.load(bundle, threads=2)
    assert threads(turns, "target") == 2 and threads(turns, "draft") == 2
    beside = edgeinfer.load(bundle, threads=2, pipeline=True)  # drafts while the target verifies
    assert threads(beside, "draft") == 1
    assert threads(edgeinfer.load(bundle, threads=2, draft_threads=3), "draft") == 3


def test_draft_lookahead_option_is_lossless_and_runs_guesses(bundle):
    eng = edgeinfer.load(bundle, threads=1, max_context=160, draft_lookahead=3)
    drafter = eng.drafters["model"]
    assert drafter.lookahead is not None and drafter.lookahead.max_guesses == 3
    assert edgeinfer.load(bundle, max_context=32).drafters["model"].lookahead is None  # off by default
    drafter.lookahead.cost_ratio, drafter.lookahead.adapt_cost = 0.0, False  # feed every guess found
    prompt = "ab ab ab ab ab ab ab ab"  # repetitive: prompt lookup always finds a continuation
    ids = eng.tokenizer.encode(prompt)
    ref, gaps = raw_greedy(bundle / "target" / "model.onnx", eng.target.spec, ids, 40)
    for mode in ("tree", "chain"):
        r = eng.generate(prompt, max_new_tokens=40, mode=mode, ignore_eos=True)
        assert same_or_near_tie(r.tokens, ref, gaps)
    assert drafter.lookahead.stats["fed"] > 0
