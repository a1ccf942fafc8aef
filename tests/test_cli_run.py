"""`edgeinfer run` on a tiny pair bundle: JSON output agrees with the plain reference decode,
speculative modes give the same tokens, bad generation options give one line and exit 1."""
from __future__ import annotations

import json

import pytest

from edgeinfer.bundle import load_manifest
from edgeinfer.cli import main
from edgeinfer.export.pipeline import DraftFromTarget, ExportConfig, export_bundle
from edgeinfer.runtime.reference_decode import greedy_decode_onnx


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "b"
    export_bundle(ExportConfig(out=out, target=tiny_checkpoint("llama"),
                               draft_from_target=DraftFromTarget.parse("int8")))
    return out


def run_json(capsys, *args):
    assert main(["run", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_run_json_matches_reference(bundle, capsys):
    plain = run_json(capsys, str(bundle), "the quick brown fox", "--raw", "--mode", "plain",
                     "--max-new-tokens", "12")
    assert set(plain) >= {"text", "tokens", "stats"} and plain["stats"]["mode"] == "plain"
    from tokenizers import Tokenizer

    m = load_manifest(bundle)
    ids = Tokenizer.from_file(str(bundle / "tokenizer.json")).encode("the quick brown fox").ids
    ref = greedy_decode_onnx(bundle / m.models["target"].onnx, m.models["target"].spec, ids, 12,
                             eos_ids=m.eos_token_ids)
    assert plain["tokens"] == [t for t in ref if t not in m.eos_token_ids]
    for mode, drafter in (("tree", "model"), ("chain", "model"), ("tree", "ngram,recycle")):
        spec = run_json(capsys, str(bundle), "the quick brown fox", "--raw", "--mode", mode,
                        "--drafter", drafter, "--max-new-tokens", "12")
        assert spec["tokens"] == plain["tokens"], (mode, drafter)
        if drafter == "model":  # n-gram / recycling may find nothing to propose in 12 tokens
            assert spec["stats"]["verifications"] > 0


@pytest.mark.parametrize("args,message", [
    (["--max-new-tokens", "0"], "max_new_tokens"),
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "1.5"], "top_p"),
    (["--top-p", "0"], "top_p"),
    (["--drafter", "nonsense"], "unknown drafter"),
])
def test_run_bad_options(bundle, capsys, args, message):
    assert main(["run", str(bundle), "hello", *args]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_run_empty_and_too_long_prompt(bundle, capsys):
    assert main(["run", str(bundle), "   "]) == 1
    assert "prompt: empty" in capsys.readouterr().err
    assert main(["run", str(bundle), "word " * 400, "--max-context", "64"]) == 1
    assert "context limit is 64 tokens" in capsys.readouterr().err


def test_run_stats_in_auto_mode_name_the_measured_setups(bundle, capsys):
    assert main(["run", str(bundle), "the quick brown fox", "--raw", "--max-new-tokens", "40",
                 "--stats"]) == 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert "mode auto (model)" in text and "decode" in text
    # auto mode (the default) reports its plain probe and the rounds of each setup it measured
    line = next(ln for ln in text.splitlines() if ln.startswith("auto mode:"))
    assert "plain steps" in line and "tree:model" in line, line
    js = run_json(capsys, str(bundle), "the quick brown fox", "--raw", "--max-new-tokens", "40")
    assert js["stats"]["auto_plain_steps"] >= 2 and "tree:model" in js["stats"]["auto_rounds"]



def test_run_draft_threads_flag(bundle, capsys):
    js = run_json(capsys, str(bundle), "the quick brown fox", "--raw", "--max-new-tokens", "8",
                  "--mode", "chain", "--drafter", "model", "--threads", "2", "--draft-threads", "1")
    assert js["stats"]["verifications"] > 0
    assert main(["run", str(bundle), "hi", "--draft-threads", "-1"]) == 1
    err = capsys.readouterr().err
    assert "draft_threads" in err and "Traceback" not in err


def test_run_draft_lookahead_flag(bundle, capsys):
    base = ["the quick brown fox the quick brown fox the quick", "--raw", "--max-new-tokens", "12",
            "--mode", "tree", "--drafter", "model"]
    off = run_json(capsys, str(bundle), *base)
    on = run_json(capsys, str(bundle), *base, "--draft-lookahead", "2")
    assert on["tokens"] == off["tokens"] and on["stats"]["verifications"] > 0
    assert main(["run", str(bundle), "hi", "--draft-lookahead", "-2"]) == 1
    err = capsys.readouterr().err
    assert "draft_lookahead" in err and "Traceback" not in err
