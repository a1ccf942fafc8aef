"""Unit tests of the benchmark suite's pieces (no real model needed, seconds)."""
from __future__ import annotations

import json
import statistics
import struct

import numpy as np
import pytest

from edgeinfer.bench.config import BenchConfig, MethodSpec, RunResult
from edgeinfer.bench.methods import candidates
from edgeinfer.bench.probe import decode_ceiling_tps, measure_bandwidth, weight_bytes
from edgeinfer.bench.prompts import PROMPTS, encode_prompts, render_chat, select_prompts
from edgeinfer.bench.report import BenchReport, agreement, spread, summarize, to_markdown
from edgeinfer.errors import ConfigError


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="max_new_tokens"):
        BenchConfig(max_new_tokens=0)
    with pytest.raises(ConfigError, match="gguf_precisions"):
        BenchConfig(gguf_precisions=("Q5_K",))
    with pytest.raises(ConfigError, match="tree_budgets"):
        BenchConfig(tree_budgets=(0,))
    with pytest.raises(ConfigError, match="unknown prompt"):
        select_prompts(("nope",))
    q = BenchConfig.quick()
    assert q.repetitions == 1 and q.prompts == ("chat",) and q.max_new_tokens <= 16


def test_prompt_set_covers_the_four_kinds():
    assert {p.kind for p in PROMPTS.values()} == {"chat", "code", "summary", "longform"}
    assert len(PROMPTS["summary"].text.split()) > 150  # a real pasted text to summarize


def test_run_result_metrics_from_known_numbers():
    r = RunResult(tokens=list(range(11)), prompt_tokens=50, ttft_s=0.25, prefill_s=0.25,
                  decode_s=0.5, steps=4, proposed=20, accepted=6, draft_forwards=12, draft_forward_s=0.4)
    assert r.decode_tps == pytest.approx(20.0)  # 10 tokens after the first in 0.5 s
    assert r.draft_bound_tps == pytest.approx(25.0)  # 10 tokens per 0.4 s of draft forwards
    assert r.prefill_tps == pytest.approx(200.0)
    assert r.acceptance_rate == pytest.approx(0.3)
    assert r.mean_accepted_len == pytest.approx(2.5)
    back = RunResult.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back == r
    plain = RunResult(tokens=[5], prompt_tokens=3, ttft_s=0.1, prefill_s=0.1, decode_s=0.0)
    assert plain.decode_tps is None and plain.acceptance_rate is None and plain.draft_bound_tps is None


def test_agreement_stops_at_reference_eos():
    assert agreement([1, 2, 3, 9], [1, 2, 3, 4]) == (0.75, False)
    assert agreement([1, 2, 3, 4], [1, 2, 3, 4]) == (1.0, True)
    # the reference ends at EOS (7): what follows it does not count
    assert agreement([1, 7, 5, 5], [1, 7, 8, 8], eos_ids=(7,)) == (1.0, True)
    assert agreement([2, 7], [1, 7, 8], eos_ids=(7,)) == (0.0, False)


def test_spread_is_median_min_max():
    vals = [3.0, 1.0, 4.0, 1.5, None]
    s = spread(vals)
    assert s == {"median": statistics.median([3.0, 1.0, 4.0, 1.5]), "min": 1.0, "max": 4.0, "n": 4}
    assert spread([None])["median"] is None


def _run(method, prompt, tokens, tps, warm=False):
    n = len(tokens)
    r = RunResult(tokens=tokens, prompt_tokens=10, ttft_s=0.1, prefill_s=0.1,
                  decode_s=(n - 1) / tps, steps=n - 1)
    return {"method": method, "prompt": prompt, "rep": 0, "warmup": warm, "result": r.to_dict()}


def test_summary_ratios_are_to_the_fastest_anchor():
    def m(name, family):
        return {"name": name, "family": family, "is_anchor": family != "edgeinfer", "status": "ok",
                "budget": None, "peak_rss_bytes": 100 << 20, "ceiling_tps": 50.0}

    methods = [m("edgeinfer plain", "edgeinfer"), m("llama.cpp Q8_0", "llama.cpp"),
               m("genai int4", "onnxruntime-genai")]
    runs = [_run("edgeinfer plain", "chat", [1, 2, 3, 4, 5], 30.0),
            _run("llama.cpp Q8_0", "chat", [1, 2, 3, 9, 9], 60.0),
            _run("llama.cpp Q8_0", "chat", [1, 2, 3, 9, 9], 1000.0, warm=True),  # excluded
            _run("genai int4", "chat", [1, 2, 3, 4, 5], 40.0)]
    rep = BenchReport(config=BenchConfig().to_dict(), environment={}, bandwidth={}, prepared={},
                      prompts={"chat": {"kind": "chat", "prompt_tokens": 10}}, methods=methods, runs=runs)
    summarize(rep)
    assert rep.reference == "edgeinfer plain" and rep.fastest_anchor == "llama.cpp Q8_0"
    s = rep.summary
    assert s["llama.cpp Q8_0"]["decode_tps"]["median"] == pytest.approx(60.0)
    assert s["edgeinfer plain"]["ratio_to_fastest_anchor"]["decode_tps"] == pytest.approx(0.5)
    assert s["genai int4"]["ratio_to_fastest_anchor"]["decode_tps"] == pytest.approx(40 / 60)
    assert s["llama.cpp Q8_0"]["agreement"]["median"] == pytest.approx(0.6)
    assert s["genai int4"]["exact_match_rate"]["median"] == 1.0
    md = to_markdown(rep)
    for name in ("edgeinfer plain", "llama.cpp Q8_0", "genai int4"):
        assert name in md


def test_method_names_and_patterns():
    cfg = BenchConfig(gguf_precisions=("F16", "Q8_0"), tree_budgets=(4, 16))
    names = [c.name for c in candidates(cfg, ("ngram",))]
    assert "edgeinfer tree ngram @16" in names and "llama.cpp Q8_0 +lookup" in names
    assert "edgeinfer auto" in names
    assert "transformers fp32 +lookup" in names and "genai int4" in names
    assert len(names) == len(set(names))
    quick = [c.name for c in candidates(BenchConfig.quick(), ("ngram",))]
    assert quick == ["edgeinfer plain", "edgeinfer tree ngram", "llama.cpp source"]
    with_model = [c for c in candidates(cfg, ("model",)) if "lookahead" in c.name]
    assert [c.name for c in with_model] == ["edgeinfer lookahead chain model", "edgeinfer lookahead tree model"]
    assert all(dict(c.options)["lookahead"] > 0 for c in with_model)
    assert [c.name for c in candidates(BenchConfig.quick(), ("model",))] == [
        "edgeinfer plain", "edgeinfer tree model", "llama.cpp source"]  # the CI preset stays small
    spec = MethodSpec("x", "llama.cpp", "llama_cpp", {"model_path": "m.gguf"}, ("m.gguf",))
    assert MethodSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_weight_bytes_counts_onnx_external_data(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"x" * 1000)
    (tmp_path / "model.onnx.data").write_bytes(b"y" * 5000)
    (tmp_path / "notes.txt").write_bytes(b"z" * 77)
    assert weight_bytes([tmp_path / "model.onnx"]) == 6000
    assert weight_bytes([tmp_path]) == 6000
    assert decode_ceiling_tps(6.0, 3 * 10**9) == pytest.approx(2.0)


def test_bandwidth_probe_is_sane():
    bw = measure_bandwidth(array_mb=32, threads=1, passes=2)
    # Any machine this runs on streams between 0.3 GB/s and 2 TB/s.
    assert 0.3 < bw.read_gbps < 2000 and 0.3 < bw.copy_gbps < 2000
    assert bw.best_gbps == max(bw.read_gbps, bw.copy_gbps)


def _tiny_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<s>", "<|u|>", "hello", "world", "!", "<unk>"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "<|u|>"])
    tok.save(str(path))


def test_encode_prompts_renders_template_once(tmp_path):
    _tiny_tokenizer(tmp_path / "tok.json")
    template = "{% for m in messages %}<|u|> {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} !{% endif %}"
    assert render_chat(template, "hello world") == "<|u|> hello world !"
    assert render_chat(None, "hello") == "hello"

    class P:
        key, kind, text = "k", "chat", "hello world"

    ids = encode_prompts(tmp_path / "tok.json", template, [P()], bos_token_id=0, add_bos=True)
    assert ids == {"k": [0, 1, 2, 3, 4]}


def test_png_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    from edgeinfer.bench.plots import plot_tokens_per_s, plot_tree_sweep

    def s(tps, anchor, budget=None):
        st = {"median": tps, "min": tps * 0.9, "max": tps * 1.1, "n": 3}
        acc = {"median": 0.5, "min": 0.5, "max": 0.5, "n": 1}
        return {"decode_tps": st, "acceptance_rate": acc, "mean_accepted_len": acc,
                "is_anchor": anchor, "budget": budget, "ceiling_tps": 80.0}

    rep = BenchReport(config={"model": "m"}, environment={}, bandwidth={}, prepared={}, prompts={},
                      methods=[], runs=[], fastest_anchor="a",
                      summary={"a": s(50, True), "edgeinfer tree d @4": s(40, False, 4),
                               "edgeinfer tree d @8": s(45, False, 8)})
    for fn, name in ((plot_tokens_per_s, "a.png"), (plot_tree_sweep, "b.png")):
        p = fn(rep, tmp_path / name)
        head = p.read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n"
        w, h = struct.unpack(">II", head[16:24])
        assert w > 300 and h > 150
    assert np.isfinite(rep.summary["a"]["decode_tps"]["median"])


def test_worker_reports_errors_and_keeps_serving(tmp_path):
    from edgeinfer.bench.worker import Worker, WorkerError

    w = Worker(tmp_path / "w.log", timeout_s=60, threads=1)
    try:
        with pytest.raises(WorkerError, match="unknown adapter 'nope'"):
            w.setup(MethodSpec("x", "llama.cpp", "nope"))
        with pytest.raises(WorkerError, match="generate before setup"):
            w.generate([1, 2, 3], 4)
        reply = w.close()
        assert reply["ok"] and reply["peak_rss_bytes"] >= reply["rss_bytes"] > 0
        assert w.proc.returncode == 0
    finally:
        w.kill()
    assert "unknown adapter" in (tmp_path / "w.log").read_text()  # traceback in the log


def test_method_groups_fit_the_memory_budget_and_split_the_sweep():
    from edgeinfer.bench.runner import method_groups

    def item(name, est, budget=None, drafter=None):
        spec = MethodSpec(name, "edgeinfer", "edgeinfer", {"drafter": drafter}, budget=budget)
        return ({"name": name}, spec, est)

    runnable = [item("a", 4), item("b", 4), item("c", 4), item("t@4", 9, 4, "ngram"),
                item("u@4", 9, 4, "model"), item("t@8", 9, 8, "ngram"), item("d", 1)]
    groups = [[spec.name for _, spec in g] for g in method_groups(runnable, budget=9)]
    assert groups == [["a", "b"], ["c", "d"], ["t@4", "t@8"], ["u@4"]]


def test_cli_flags_build_the_config():
    import argparse

    from edgeinfer.bench import add_bench_arguments, config_from_args

    ap = argparse.ArgumentParser()
    add_bench_arguments(ap)
    cfg = config_from_args(ap.parse_args(["--methods", "llama.cpp *", "--gguf", "F16", "Q8_0",
                                          "--no-sweep", "--max-new-tokens", "5", "--out", "o"]))
    assert cfg == BenchConfig(methods=("llama.cpp *",), gguf_precisions=("F16", "Q8_0"), sweep=False,
                              max_new_tokens=5, out_dir="o")
    quick = config_from_args(ap.parse_args(["--quick", "--threads", "1"]))
    assert quick == BenchConfig.quick(threads=1)
    with pytest.raises(SystemExit):
        ap.parse_args(["--gguf", "Q5_K"])


def test_bytes_per_token_skips_lookup_only_embeddings(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from edgeinfer.bench.weights import bytes_per_token

    emb = np.zeros((100, 8), np.float32)  # 3200 bytes, looked up only (untied)
    w = np.zeros((8, 100), np.float32)  # 3200 bytes, read every step
    w4 = helper.make_tensor("w4", TensorProto.INT4, [8, 5], np.zeros(40, np.int8).tolist())  # 20 bytes
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["h"]),
             helper.make_node("MatMul", ["h", "w"], ["y"]),
             helper.make_node("Identity", ["w4"], ["z"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 100]),
                           helper.make_tensor_value_info("z", TensorProto.INT4, [8, 5])],
                          [numpy_helper.from_array(emb, "emb"), numpy_helper.from_array(w, "w"), w4])
    onnx.save(helper.make_model(g), tmp_path / "untied.onnx")
    assert bytes_per_token([tmp_path / "untied.onnx"]) == 3200 + 20
    # tied: the same table is the output projection too, so it is read in full
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["h"]),
             helper.make_node("Transpose", ["emb"], ["embT"]),
             helper.make_node("MatMul", ["h", "embT"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 100])],
                          [numpy_helper.from_array(emb, "emb")])
    onnx.save(helper.make_model(g), tmp_path / "tied.onnx")
    assert bytes_per_token([tmp_path / "tied.onnx"]) == 3200


def test_bytes_per_token_gguf_and_safetensors(tmp_path):
    gguf = pytest.importorskip("gguf")
    from safetensors.numpy import save_file

    from edgeinfer.bench.weights import bytes_per_token

    def write(path, names):
        wr = gguf.GGUFWriter(str(path), "llama")
        for n in names:
            wr.add_tensor(n, np.zeros((16, 32), np.float32))  # 2048 bytes each
        wr.write_header_to_file()
        wr.write_kv_data_to_file()
        wr.write_tensors_to_file()
        wr.close()

    write(tmp_path / "tied.gguf", ["token_embd.weight", "blk.0.ffn_up.weight"])
    write(tmp_path / "untied.gguf", ["token_embd.weight", "blk.0.ffn_up.weight", "output.weight"])
    assert bytes_per_token([tmp_path / "tied.gguf"]) == 2 * 2048
    assert bytes_per_token([tmp_path / "untied.gguf"]) == 2 * 2048

    hf = tmp_path / "hf"
    hf.mkdir()
    save_file({"model.embed_tokens.weight": np.zeros((10, 4), np.float32),
               "lm_head.weight": np.zeros((10, 4), np.float16)}, str(hf / "model.safetensors"))
    (hf / "config.json").write_text(json.dumps({"tie_word_embeddings": False}))
    assert bytes_per_token([hf]) == 80
    (hf / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    assert bytes_per_token([hf]) == 160 + 80
