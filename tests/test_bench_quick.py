"""The benchmark's quick mode end to end on the real default model, and the anchors' harness.

Quick mode (BenchConfig.quick): one prompt, a few tokens, edgeinfer plain + tree (each
drafter) + llama.cpp on the source GGUF. The JSON must hold every field for every method,
with sane values. Needs the SmolLM2 GGUF in the model cache (scripts/fetch_models.sh); the
bundle is exported into the cache on first use.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeinfer.bench import BenchConfig, run_benchmark, write_outputs
from edgeinfer.bench.report import SUMMARY_FIELDS

pytestmark = pytest.mark.slow

TOP_LEVEL = ("config", "environment", "bandwidth", "prepared", "prompts", "reference",
             "fastest_anchor", "summary", "methods", "runs", "notes", "wall_s")


def _model_or_skip():
    from edgeinfer.errors import CheckpointError
    from edgeinfer.models import default_model_path

    try:
        return default_model_path()
    except CheckpointError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    _model_or_skip()
    pytest.importorskip("llama_cpp")
    out = tmp_path_factory.mktemp("bench")
    cfg = BenchConfig.quick(out_dir=str(out))
    report = run_benchmark(cfg)
    files = write_outputs(report)
    return cfg, json.loads(Path(files["json"]).read_text()), files


def test_quick_runs_edgeinfer_plain_tree_and_an_anchor(quick):
    _, data, _ = quick
    status = {m["name"]: (m["status"], m.get("note")) for m in data["methods"]}
    assert status["edgeinfer plain"][0] == "ok", status
    assert status["llama.cpp source"][0] == "ok", status
    trees = [n for n in status if n.startswith("edgeinfer tree")]
    assert trees and all(status[n][0] == "ok" for n in trees), status
    assert data["reference"] == "edgeinfer plain" and data["fastest_anchor"] == "llama.cpp source"


def test_quick_json_has_every_field_with_sane_values(quick):
    cfg, data, _ = quick
    for key in TOP_LEVEL:
        assert key in data, key
    assert 0.1 < data["bandwidth"]["best_gbps"] < 2000
    ok = [m for m in data["methods"] if m["status"] == "ok"]
    for m in ok:
        name = m["name"]
        s = data["summary"][name]
        for f in SUMMARY_FIELDS:
            assert set(s[f]) == {"median", "min", "max", "n"}, (name, f)
        assert 0 < s["decode_tps"]["median"] < 10_000, name
        assert 0 < s["prefill_tps"]["median"] < 1_000_000, name
        assert 0 < s["ttft_s"]["median"] < 120, name
        assert 20 * 2**20 < s["peak_rss_bytes"]["median"] < 16 * 2**30, name
        assert 0 <= s["agreement"]["median"] <= 1, name
        assert s["weight_bytes"] > 50 * 2**20 and s["ceiling_tps"] > 0, name
        assert set(s["ratio_to_fastest_anchor"]) == {"decode_tps", "prefill_tps", "ttft_s", "peak_rss_bytes"}
        runs = [r for r in data["runs"] if r["method"] == name]
        if m["speculative"] and any(r["result"]["proposed"] for r in runs if not r["warmup"]):
            assert 0 <= s["acceptance_rate"]["median"] <= 1, name
            assert s["mean_accepted_len"]["median"] >= 1, name
        elif m["speculative"]:  # Token Recycling, reset before each run, has nothing to draft
            assert name.endswith("recycle") and s["acceptance_rate"]["median"] is None, name  # in 12 tokens
        else:
            assert s["acceptance_rate"]["median"] is None, name
            assert s["mean_accepted_len"]["median"] == pytest.approx(1.0), name
        if name == "edgeinfer tree model":  # the draft's own forwards bound the decode rate
            assert s["draft_bound_tps"]["median"] >= s["decode_tps"]["median"], name
        else:  # no draft model ran
            assert s["draft_bound_tps"]["median"] is None, name
        runs = [r for r in data["runs"] if r["method"] == name]
        assert sum(r["warmup"] for r in runs) == cfg.warmup
        assert sum(not r["warmup"] for r in runs) == cfg.repetitions * len(cfg.prompts)
        for r in runs:  # fixed output length: EOS does not stop a run
            assert len(r["result"]["tokens"]) == cfg.max_new_tokens, name
    fa = data["fastest_anchor"]
    assert data["summary"][fa]["ratio_to_fastest_anchor"]["decode_tps"] == pytest.approx(1.0)


def test_speculative_greedy_output_equals_plain(quick):
    # DESIGN.md section 5: greedy speculation is lossless; agreement is with edgeinfer plain.
    _, data, _ = quick
    for name, s in data["summary"].items():
        if name.startswith("edgeinfer tree"):
            assert s["agreement"]["median"] == 1.0, name


def test_quick_writes_markdown_and_png(quick):
    _, data, files = quick
    md = Path(files["markdown"]).read_text()
    for m in data["methods"]:
        assert m["name"] in md
    png = Path(files["plot_tokens_per_s"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_prompt_ids_equal_transformers_chat_template(quick):
    """Our rendering of the GGUF's chat template + tokenizer.json gives the ids transformers
    gives for the same chat (its tokenizer read straight from the GGUF)."""
    transformers = pytest.importorskip("transformers")
    path = _model_or_skip()
    _, data, _ = quick
    from edgeinfer.bench.prompts import PROMPTS

    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for key, p in data["prompts"].items():
        want = tok.apply_chat_template([{"role": "user", "content": PROMPTS[key].text}],
                                       add_generation_prompt=True, tokenize=True)
        if isinstance(want, dict) or hasattr(want, "input_ids"):
            want = want["input_ids"]
        assert p["prompt_ids"] == list(want), key


@pytest.mark.llama
def test_llama_cpp_lookup_is_lossless_and_reprefills(tmp_path):
    """The llama.cpp adapter: prompt lookup gives the plain greedy tokens, its acceptance
    counts are consistent, and a repeated run pays its prefill again (no prompt cache)."""
    pytest.importorskip("llama_cpp")
    path = _model_or_skip()
    from edgeinfer.bench.config import MethodSpec
    from edgeinfer.bench.prepare import gguf_tokenizer_meta
    from edgeinfer.bench.prompts import PROMPTS, render_chat
    from edgeinfer.bench.worker import Worker

    # ids from llama.cpp's own tokenizer: this test needs no bundle or HF folder
    from llama_cpp import Llama

    vocab_only = Llama(model_path=str(path), vocab_only=True, verbose=False)
    text = render_chat(gguf_tokenizer_meta(path)["chat_template"], PROMPTS["summary"].text)
    ids = vocab_only.tokenize(text.encode(), add_bos=False, special=True)
    vocab_only.close()
    results = {}
    for name, opts in (("plain", {}), ("lookup", {"lookup": 8})):
        spec = MethodSpec(name, "llama.cpp", "llama_cpp",
                          {"model_path": str(path), "n_ctx": 1024, **opts}, (str(path),))
        w = Worker(tmp_path / f"{name}.log", 300, 1)  # 1 thread: robust on a busy machine
        try:
            w.setup(spec)
            results[name] = [w.generate(ids, 24)[0] for _ in range(2)]
        finally:
            w.close()
    plain, lookup = results["plain"], results["lookup"]
    assert plain[0].tokens == plain[1].tokens == lookup[0].tokens == lookup[1].tokens
    assert len(plain[0].tokens) == 24
    # each run re-evaluates the whole prompt: TTFT stays a prefill, not a cache hit
    assert plain[1].ttft_s > 0.2 * plain[0].ttft_s
    r = lookup[1]
    assert r.proposed >= r.accepted >= 0 and r.steps >= 1
    assert r.steps + r.accepted == len(r.tokens) - 1  # each pass yields accepted + 1
