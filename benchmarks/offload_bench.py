"""Offloading benchmark: decoding inside real cgroup memory caps (needs root, cgroup memory).

    .venv/bin/python benchmarks/offload_bench.py            # prepare, measure, print the table
    .venv/bin/python benchmarks/offload_bench.py --repeat 3 # each method 3 times, interleaved: medians

Target: SmolLM2-135M-Instruct at fp32 (the GGUF's Q4_1 weights dequantized; 540 MB), the same
weights for every method. Caps: about half and a quarter of the target (2x and 4x). Each run is
a fresh process inside a fresh cgroup (page cache counted), caches dropped before it starts:

* llama.cpp  - llama-cpp-python, F32 GGUF of the same weights, default mmap, 2 threads
* plain      - edgeinfer plain greedy decoding, target streamed from per-layer shards
* tree       - edgeinfer token-tree speculation (resident draft, ``--draft`` spec, default the
               int4 affine copy with an int8 head; Token Recycling where it does not fit)
               with streaming and the compute-IO pipeline (the draft keeps drafting while the
               target verifies)

Reported: decode tokens/s and ratios, cgroup peak vs cap, OOM kills, tokens per verification,
bytes streamed per pass, I/O vs compute time per pass, resident layers, agreement with plain
greedy (near-tie rule), and the disk's read bandwidth measured with caches dropped.
Artifacts (bundle with shards, F32 GGUF) are built once under --work.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a "
                                      "message in a bottle. Describe the sea, the weather and the keeper's "
                                      "thoughts."}]
MiB = 2**20


# -- preparation (outside any cap) ----------------------------------------------------------

def prepare(work: Path, draft_spec: str = "int4,affine,head=int8", split: str = "matrix") -> dict:
    from edgeinfer.bundle import load_manifest
    from edgeinfer.models import BUNDLE_LAYOUT_REVISION, default_model_path

    work.mkdir(parents=True, exist_ok=True)
    # named with the layout revision: bundles of an older graph layout are rebuilt, not reused
    bundle = work / (f"bundle{BUNDLE_LAYOUT_REVISION}-" + "".join(c if c.isalnum() else "_" for c in draft_spec)
                     + ("" if split == "layer" else f"-{split}"))
    if not (bundle / "manifest.json").is_file():
        from edgeinfer.export.pipeline import DraftFromTarget, ExportConfig, export_bundle
        from edgeinfer.quant.recipe import QuantRecipe, WeightFormat

        # the draft: the target's weights in int4 (embedding/head too, so that it stays small)
        draft = DraftFromTarget.parse(draft_spec)
        config = ExportConfig(out=bundle, target=default_model_path(), draft_from_target=draft,
                              target_recipe=QuantRecipe(WeightFormat.FP32), shards=True, shard_split=split,
                              overwrite=True, recycle_prior=True)
        try:
            export_bundle(config)
        except ImportError:  # an exporter that cannot write shards yet: add them here
            export_bundle(dataclasses.replace(config, shards=False))
            _add_shards(bundle, split)
    manifest = load_manifest(bundle, verify=False)
    if not manifest.models["target"].shards:
        raise SystemExit(f"{bundle}: the bundle has no target shards (export with shards=True)")
    if "stream_index" not in manifest.models["target"].shards:  # exported before the index existed
        _add_stream_index(bundle)
        manifest = load_manifest(bundle, verify=False)
    gguf = work / "smollm2-135m-f32.gguf"
    if not gguf.is_file():
        import ctypes

        import llama_cpp

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32  # Q4_1 -> f32: exactly the dequantized weights
        params.allow_requantize = True
        tmp = gguf.with_suffix(".tmp")
        saved = os.dup(2)  # llama.cpp logs every tensor to stderr
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        try:
            rc = llama_cpp.llama_model_quantize(str(default_model_path()).encode(), str(tmp).encode(),
                                                ctypes.byref(params))
        finally:
            os.dup2(saved, 2)
        if rc != 0:
            raise SystemExit("llama_model_quantize failed")
        os.replace(tmp, gguf)
    from edgeinfer.runtime.tokenizer import Tokenizer

    ids = Tokenizer.from_bundle(bundle, manifest).encode_chat(PROMPT)
    return {"bundle": str(bundle), "gguf": str(gguf), "prompt": ids,
            "target_bytes": gguf.stat().st_size}


def _add_shards(bundle: Path, split: str) -> None:
    from edgeinfer.bundle import file_entries, load_manifest, write_manifest
    from edgeinfer.export.checkpoint import load_checkpoint
    from edgeinfer.export.onnx_shards import build_layer_shards
    from edgeinfer.models import default_model_path
    from edgeinfer.quant.recipe import QuantRecipe, WeightFormat

    ckpt = load_checkpoint(default_model_path())
    info = build_layer_shards(ckpt.spec, ckpt.weights.get, QuantRecipe(WeightFormat.FP32),
                              bundle / "target" / "layers", split=split)
    m = load_manifest(bundle, verify=False)
    target = dataclasses.replace(m.models["target"], shards=info.to_manifest(bundle))
    write_manifest(bundle, dataclasses.replace(m, models={**m.models, "target": target},
                                               files=file_entries(bundle)))


def _add_stream_index(bundle: Path) -> None:
    """Write the stream index (runtime/shard_graphs.py) of an existing sharded bundle, as the
    export now does, so that the streamed runs need no onnx import."""
    from edgeinfer.bundle import file_entries, load_manifest, write_manifest
    from edgeinfer.runtime.shard_graphs import write_stream_index
    from edgeinfer.runtime.streaming import ShardPaths

    m = load_manifest(bundle, verify=False)
    t = m.models["target"]
    paths = ShardPaths.from_manifest(bundle, t.shards)
    rel = write_stream_index(bundle, paths.embed, list(paths.layer_files), paths.head,
                             bundle / "target" / "layers" / "stream")
    target = dataclasses.replace(t, shards={**t.shards, "stream_index": rel})
    write_manifest(bundle, dataclasses.replace(m, models={**m.models, "target": target},
                                               files=file_entries(bundle)))


def disk_bandwidth(bundle: Path) -> dict:
    """Sequential read of the target's layer shards with caches dropped: O_DIRECT (how the
    runner reads) and buffered."""
    import mmap

    from edgeinfer.runtime.cgroup import drop_caches
    from edgeinfer.runtime.shard_io import WeightReader

    files = sorted((bundle / "target").rglob("layer_*.onnx.data"))
    out = {}
    for label, direct in (("o_direct", True), ("buffered", False)):
        drop_caches()
        reader = WeightReader(direct=direct)
        buf = mmap.mmap(-1, max(f.stat().st_size for f in files) + 4096)
        t0 = time.perf_counter()
        for f in files:
            reader.read(f, 0, f.stat().st_size, buf)
        out[label + "_MBps"] = reader.bytes_read / (time.perf_counter() - t0) / 1e6
    return out


# -- workers (inside a cap) -----------------------------------------------------------------

def _gap(row) -> float:
    import numpy as np

    top2 = np.sort(row)[-2:]
    return float(top2[1] - top2[0]) / max(1.0, abs(float(top2[1])))


def work_llama(a: argparse.Namespace, prompt: list[int]) -> dict:
    import llama_cpp
    import numpy as np

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(a.gguf, n_ctx=a.ctx, n_threads=a.threads, n_batch=64, use_mmap=True,
                          use_mlock=False, n_gpu_layers=0, verbose=False)
    llm.eval(prompt)
    vocab = llm.n_vocab()
    tokens, t_first = [], time.perf_counter()
    for _ in range(a.tokens):
        tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))
        tokens.append(tok)
        if len(tokens) == 1:
            t_first = time.perf_counter()
        llm.eval([tok])
    t_end = time.perf_counter()
    return {"tokens": tokens, "decode_tps": (len(tokens) - 1) / (t_end - t_first),
            "prefill_s": t_first - t0}


def _pass_stats(runner, skip: int = 1) -> dict:
    ps = runner.passes[skip:]
    if not ps:
        return {}
    n = len(ps)
    return {"passes": n, "streamed_MB_per_pass": sum(p.streamed_bytes for p in ps) / n / 1e6,
            "io_s_per_pass": sum(p.io_seconds for p in ps) / n,
            "compute_s_per_pass": sum(p.compute_seconds for p in ps) / n,
            "stall_s_per_pass": sum(p.stall_seconds for p in ps) / n,
            "wall_s_per_pass": sum(p.wall_seconds for p in ps) / n,
            "nodes_per_pass": sum(p.nodes for p in ps) / n,
            "max_usage_MiB": max(p.usage_after for p in runner.passes) / MiB, "budget_MiB": runner.budget.bytes / MiB,
            "resident": list(runner.plan.resident), "plan": runner.plan.describe()}


def work_plain(a: argparse.Namespace, prompt: list[int]) -> dict:
    """Loaded as the tree runs are (``edgeinfer.load(memory_budget=...)``, its tokenizer
    included, no draft model), then decoded on the streamed target runner itself, so that the
    margin of every greedy choice is known (the near-tie rule)."""
    import numpy as np

    import edgeinfer

    t0 = time.perf_counter()
    engine = edgeinfer.load(a.bundle, memory_budget=a.budget or "auto", max_context=a.ctx, threads=a.threads,
                            offload_tree_nodes=a.nodes, verify_checksums=False, drafters=())
    runner = engine.target
    logits = runner.forward(prompt, logits_index=[len(prompt) - 1])
    runner.commit(np.arange(len(prompt)))
    tokens, gaps, t_first = [], [], time.perf_counter()
    for _ in range(a.tokens):
        row = logits[-1]
        tokens.append(int(np.argmax(row)))
        gaps.append(_gap(row))
        if len(tokens) == 1:
            t_first = time.perf_counter()
        if len(tokens) == a.tokens:
            break
        logits = runner.forward([tokens[-1]])
        runner.commit([0])
    t_end = time.perf_counter()
    return {"tokens": tokens, "gaps": gaps, "decode_tps": (len(tokens) - 1) / (t_end - t_first),
            "prefill_s": t_first - t0, **_pass_stats(runner)}


def work_tree(a: argparse.Namespace, prompt: list[int]) -> dict:
    """Through the public API: ``edgeinfer.load(memory_budget=...)`` loads the draft first (it
    stays resident), checks the budget and plans the streamed target from what is left."""
    import edgeinfer
    from edgeinfer.runtime.config import FallbackConfig, TreeBudget

    t0 = time.perf_counter()
    engine = edgeinfer.load(a.bundle, memory_budget=a.budget or "auto", max_context=a.ctx, threads=a.threads,
                            draft_threads=a.draft_threads, offload_tree_nodes=a.nodes, verify_checksums=False,
                            pipeline_max_ahead=a.ahead, drafters=tuple(a.drafter.split(",")))
    t_load = time.perf_counter() - t0
    fallback = FallbackConfig(enabled=a.policy != "fixed", policy="auto" if a.policy == "fixed" else a.policy)
    result = engine.generate(prompt, max_new_tokens=a.tokens, mode="tree", ignore_eos=True,
                             tree=TreeBudget(max_nodes=a.nodes, max_depth=a.depth, branch_threshold=a.branch),
                             fallback=fallback)
    s = result.stats
    steps = max(1, s.verifications)
    return {"tokens": list(result.tokens), "decode_tps": (len(result.tokens) - 1) / s.decode_seconds,
            "prefill_s": t_load + s.prefill_seconds, "verifications": s.verifications,
            "tokens_per_verification": (s.accepted_tokens + steps) / steps,
            "acceptance": s.acceptance_rate, "draft_s": s.draft_seconds, "target_s": s.target_seconds,
            **_pass_stats(engine.target)}


def worker(a: argparse.Namespace) -> None:
    from edgeinfer.runtime.memory import process_peak_rss

    prompt = json.loads(a.prompt)
    try:
        out = {"llama": work_llama, "plain": work_plain, "tree": work_tree}[a.method](a, prompt)
    except Exception as e:  # reported in the table (e.g. MemoryBudgetError)
        out = {"error": f"{type(e).__name__}: {e}"}
    out["peak_rss_MiB"] = process_peak_rss() / MiB
    print("RESULT " + json.dumps(out), flush=True)


# -- orchestration --------------------------------------------------------------------------

def same_or_near_tie(got: list[int], ref: list[int], gaps: list[float], tol: float = 1e-3) -> str:
    for i, (x, y) in enumerate(zip(got, ref)):
        if x != y:
            return f"near-tie at {i}" if gaps[i] <= tol else f"DIFFERS at {i}"
    return "identical" if len(got) == len(ref) else "length differs"


def run_one(method: str, cap: int, info: dict, a: argparse.Namespace, **extra) -> dict:
    from edgeinfer.runtime.cgroup import run_capped

    cmd = [sys.executable, str(Path(__file__).resolve()), "worker", "--method", method,
           "--bundle", info["bundle"], "--gguf", info["gguf"], "--prompt", json.dumps(info["prompt"]),
           "--tokens", str(a.tokens), "--ctx", str(a.ctx), "--threads", str(a.threads),
           "--nodes", str(extra.get("nodes", a.nodes)), "--depth", str(extra.get("depth", a.depth)),
           "--ahead", str(a.ahead),
           "--branch", str(a.branch), "--policy", a.policy,
           "--drafter", extra.get("drafter", "model")]
    if a.draft_threads is not None:
        cmd += ["--draft-threads", str(a.draft_threads)]
    r = run_capped(cmd, cap, timeout=a.timeout, cwd=ROOT)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    out = json.loads(line[7:]) if line else {"error": (r.stderr.strip().splitlines() or ["no output"])[-1]}
    out.update(method=method, cap_MiB=cap / MiB, cg_peak_MiB=(r.peak or 0) / MiB, oom_kills=r.oom_kills,
               returncode=r.returncode, timed_out=r.timed_out, **{k: v for k, v in extra.items()})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="all", choices=["all", "worker"])
    p.add_argument("--work", type=Path, default=None, help="artifact directory (default: model cache/bench/offload)")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default: WORK/results.json)")
    p.add_argument("--caps", default="2,4", help="target size / cap ratios")
    p.add_argument("--methods", default="llama,plain,tree")
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--ctx", type=int, default=192, help="context size (prompt ~60 + 48 tokens + a tree fit)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--nodes", type=int, default=24, help="tree size cap (tree method)")
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--branch", type=float, default=0.15, help="draft probability that opens a branch")
    p.add_argument("--ahead", type=int, default=16, help="draft steps speculated during a verification")
    p.add_argument("--policy", default="cost", choices=["cost", "llmcad", "fixed"],
                   help="when to verify: cost-aware (default), LLMCad's alpha fallback, or a fixed tree budget")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds of all methods per cap, interleaved (llama, plain, tree, llama, ...); each "
                        "method's median run is reported, with the range over the rounds (the disk's speed "
                        "drifts between runs: interleaving spreads that over all methods)")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--draft", default="int4,affine,head=int8",
                   help="--draft-from-target spec of the resident draft (default: the default pair's; 'int4' "
                        "is 30 MiB smaller and agrees far less)")
    p.add_argument("--cap-draft", action="append", default=[], metavar="RATIO=SPEC",
                   help="another draft for one cap ratio (repeatable), e.g. 1.6=int4,affine,head=int8")
    p.add_argument("--shard-split", choices=("layer", "block", "matrix"), default="matrix",
                   help="how the target's shards cut each layer (export --shard-split; default matrix)")
    # worker arguments
    p.add_argument("--method")
    p.add_argument("--bundle")
    p.add_argument("--gguf")
    p.add_argument("--prompt")
    p.add_argument("--budget", default=None)
    p.add_argument("--drafter", default="model")
    p.add_argument("--fallback-drafter", default="recycle,ngram",
                   help="drafters (comma list, merged into one tree) of the tree method where the draft "
                        "model does not fit (default: Token Recycling with prompt lookup, the streamed "
                        "engine's own default then)")
    p.add_argument("--prompt-key", default="story", choices=["story", "chat", "code", "summary", "longform"],
                   help="the prompt: a short story (default) or one of edgeinfer bench's prompts")
    p.add_argument("--draft-threads", type=int, default=None,
                   help="intra-op threads of the resident draft (default: edgeinfer's own choice)")
    a = p.parse_args(argv)
    if a.mode == "worker":
        worker(a)
        return 0
    from edgeinfer.models import cache_dir

    work = a.work or cache_dir() / "bench" / "offload"
    cap_drafts = {}
    for item in a.cap_draft:
        ratio, sep, spec = item.partition("=")
        if not sep:
            raise SystemExit(f"--cap-draft {item!r}: expected RATIO=SPEC, e.g. 1.6=int4,affine,head=int8")
        cap_drafts[float(ratio)] = spec
    infos = {spec: prepare(work, spec, a.shard_split) for spec in {a.draft, *cap_drafts.values()}}
    if a.prompt_key != "story":
        from edgeinfer.bench.prompts import PROMPTS
        from edgeinfer.bundle import load_manifest
        from edgeinfer.runtime.tokenizer import Tokenizer

        for i in infos.values():
            root = Path(i["bundle"])
            i["prompt"] = Tokenizer.from_bundle(root, load_manifest(root, verify=False)).encode_chat(
                [{"role": "user", "content": PROMPTS[a.prompt_key].text}])
    info = infos[a.draft]
    bw = disk_bandwidth(Path(info["bundle"]))
    print(f"disk read bandwidth (caches dropped): O_DIRECT {bw['o_direct_MBps']:.0f} MB/s, "
          f"buffered {bw['buffered_MBps']:.0f} MB/s; target {info['target_bytes'] / 1e6:.0f} MB", flush=True)
    if a.repeat < 1:
        raise SystemExit("--repeat must be at least 1")
    rows = []
    for ratio in (float(x) for x in a.caps.split(",")):
        info = infos[cap_drafts.get(ratio, a.draft)]
        cap = int(info["target_bytes"] / ratio) // MiB * MiB
        runs: dict[str, list[dict]] = {}
        refused: str | None = None
        for _ in range(a.repeat):
            for method in a.methods.split(","):
                if method == "tree" and refused is not None:  # known not to fit: straight to the fallback
                    r = _fallback_run(method, cap, info, a, refused)
                else:
                    r = run_one(method, cap, info, a)
                if method == "tree" and "MemoryBudgetError" in r.get("error", ""):
                    refused = r["error"]
                    print(f"  {ratio:g}x cap {cap // MiB} MiB tree  : the draft does not fit ({refused}); "
                          f"{a.fallback_drafter} instead", flush=True)
                    r = _fallback_run(method, cap, info, a, refused)
                r["ratio"] = ratio
                if method == "tree" and r.get("drafter", "model") == "model":
                    r["draft"] = cap_drafts.get(ratio, a.draft)
                runs.setdefault(method, []).append(r)
                print(f"  {ratio:g}x cap {cap // MiB} MiB {method:6s}: " + (
                    f"{r['decode_tps']:.2f} tok/s, peak {r['cg_peak_MiB']:.0f} MiB, oom {r['oom_kills']}"
                    if "decode_tps" in r else f"ERROR {r.get('error')}"), flush=True)
        by = {method: _median_run(rs) for method, rs in runs.items()}
        rows.extend(by.values())
        ref = by.get("plain")
        for r in by.values():
            if ref and "tokens" in r and "tokens" in ref:
                r["agreement_vs_plain"] = same_or_near_tie(r["tokens"], ref["tokens"], ref["gaps"])
            for base in ("llama", "plain"):
                if "decode_tps" in r and "decode_tps" in by.get(base, {}):
                    r[f"x_{base}"] = r["decode_tps"] / by[base]["decode_tps"]
    print_table(rows, bw)
    a.out = a.out or work / "results.json"
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"disk": bw, "target_bytes": info["target_bytes"], "runs": rows}, indent=1))
    print(f"results: {a.out}")
    return 0


def _fallback_run(method: str, cap: int, info: dict, a: argparse.Namespace, why: str) -> dict:
    """The tree method with the training-free drafters, in trees as large as the streamed
    engine's default without a draft model."""
    r = run_one(method, cap, info, a, drafter=a.fallback_drafter, nodes=max(a.nodes, 64), depth=max(a.depth, 16))
    r["draft_refused"] = why
    return r


def _median_run(runs: list[dict]) -> dict:
    """The run with the median decode speed (the lower middle one of an even count), with every
    run's speed attached (``tps_runs``); a failed run only when all failed."""
    ok = sorted((r for r in runs if "decode_tps" in r), key=lambda r: r["decode_tps"])
    if not ok:
        return runs[-1]
    med = dict(ok[(len(ok) - 1) // 2])
    med["tps_runs"] = [r["decode_tps"] for r in runs if "decode_tps" in r]
    return med


def print_table(rows: list[dict], bw: dict) -> None:
    head = ("cap", "method", "tok/s", "x llama", "x plain", "cgroup peak/cap MiB", "held MiB", "OOM", "tok/verif",
            "MB/pass", "io s/pass", "comp s/pass", "resident", "agreement")
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        if "decode_tps" not in r:
            print(f"| {r['ratio']:g}x {r['cap_MiB']:.0f} | {r['method']} | error: {r.get('error', '')[:80]} |")
            continue
        res = r.get("resident")
        layers = [x for x in (res or []) if x.startswith("layer.")]
        parts = any(x.count(".") == 2 for x in layers)  # layer.{i}.{j}: parts of split layers
        print("| " + " | ".join([
            f"{r['ratio']:g}x {r['cap_MiB']:.0f}", r["method"] + (f" ({r['drafter']})" if "drafter" in r else f" ({r['draft']})" if "draft" in r else ""),
            f"{r['decode_tps']:.2f}" + (f" ({min(r['tps_runs']):.2f}-{max(r['tps_runs']):.2f})"
                                        if len(r.get("tps_runs", ())) > 1 else ""),
            f"{r.get('x_llama', float('nan')):.1f}", f"{r.get('x_plain', float('nan')):.1f}",
            f"{r['cg_peak_MiB']:.0f}/{r['cap_MiB']:.0f}",
            f"{r['max_usage_MiB']:.0f}" if "max_usage_MiB" in r else "-", str(r["oom_kills"]),
            f"{r.get('tokens_per_verification', 1.0):.2f}" if r["method"] != "llama" else "1",
            f"{r.get('streamed_MB_per_pass', float('nan')):.0f}", f"{r.get('io_s_per_pass', float('nan')):.3f}",
            f"{r.get('compute_s_per_pass', float('nan')):.3f}",
            "-" if res is None else f"{len(layers)} layer{' parts' if parts else 's'}" + (", head" if any(x.startswith("head") for x in res) else ""),
            r.get("agreement_vs_plain", "-")]) + " |")
    print(f"\ndisk: O_DIRECT {bw['o_direct_MBps']:.0f} MB/s, buffered {bw['buffered_MBps']:.0f} MB/s. "
          "cgroup peak: the cap's high-water mark (page cache fills any free room); held: the largest "
          "working set (charge minus inactive page cache) after a pass, to compare with the budget")


if __name__ == "__main__":
    sys.exit(main())
