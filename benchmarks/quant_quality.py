"""Quantization quality: perplexity and top-1 agreement with fp32 on a fixed English text.

For every weight format / block size (or the bundles you name) the target graph of an
edgeinfer bundle scores ``benchmarks/data/eval_text.txt`` in non-overlapping windows; each
window starts with an empty cache, so the first token of a window is not scored. Top-1
agreement is the share of scored positions whose argmax equals the fp32 bundle's argmax.
onnxruntime-genai's own int4 (and fp32) models, made by its model builder, are scored on the
same token ids and windows. Export wall times of ours and of the genai builder are reported.

    .venv/bin/python benchmarks/quant_quality.py                       # every recipe, default model
    .venv/bin/python benchmarks/quant_quality.py --recipes fp32 int4-b32 int8-b64 --max-tokens 1024
    .venv/bin/python benchmarks/quant_quality.py --bundle path/to/bundle_a path/to/bundle_b

Bundles are exported into the model cache (``$EDGEINFER_CACHE/bench/<model>/quality/``) once.
Writes quant_quality.json and quant_quality.md into --out.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from edgeinfer.bench.prepare import prepare_anchors, resolve_source
from edgeinfer.bench.probe import weight_bytes
from edgeinfer.bundle import load_manifest
from edgeinfer.models import DEFAULT_MODEL, cache_dir
from edgeinfer.quant.recipe import QuantRecipe

TEXT = Path(__file__).parent / "data" / "eval_text.txt"
# name -> QuantRecipe keyword arguments; "fp32" is the reference.
RECIPES: dict[str, dict] = {"fp32": dict(format="fp32"), "fp16": dict(format="fp16")}
for _fmt in ("int8", "int4", "fp8"):
    for _b in (32, 64, 128):
        RECIPES[f"{_fmt}-b{_b}"] = dict(format=_fmt, block_size=_b)
RECIPES["int4-b32-asym"] = dict(format="int4", block_size=32, symmetric=False)
RECIPES["int8-b32-asym"] = dict(format="int8", block_size=32, symmetric=False)
for _fmt in ("int8", "int4"):
    RECIPES[f"{_fmt}-b32-affine"] = dict(format=_fmt, block_size=32, affine=True)
    # float32 activations inside MatMulNBits (accuracy_level 0): the weights' error alone
    RECIPES[f"{_fmt}-b32-affine-l0"] = dict(format=_fmt, block_size=32, affine=True,
                                            accuracy_level=0)
# int4 layers with the (Q8_0-sourced) tied embedding / LM head kept at int8
RECIPES["int4-b32-affine-head8"] = dict(format="int4", block_size=32, affine=True,
                                        keep=("lm_head.weight",), keep_format="int8")
RECIPES["int4-b32-affine-head8-l0"] = dict(format="int4", block_size=32, affine=True,
                                           keep=("lm_head.weight",), keep_format="int8",
                                           accuracy_level=0)
# --exact (quant/exact.py): exported through export_model(exact=True), which picks the recipe
RECIPES["exact"] = dict(format="fp32", block_size=32)
RECIPES["int4-b32-scale"] = dict(format="int4", block_size=32, outlier="scale")
RECIPES["int4-b32-reorder"] = dict(format="int4", block_size=32, outlier="reorder")


def log_softmax_stats(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(negative log-likelihood [m] float64, argmax [m]) of float32 logits [m, vocab]."""
    x = logits.astype(np.float64)
    mx = x.max(axis=1, keepdims=True)
    lse = np.log(np.exp(x - mx).sum(axis=1)) + mx[:, 0]
    return lse - x[np.arange(len(targets)), targets], logits.argmax(axis=1)


def windows(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i:i + size] for i in range(0, len(ids) - 1, size) if len(ids[i:i + size]) > 1]


def score_bundle(bundle: Path, ids: list[int], window: int, threads: int, chunk: int = 128):
    """NLL and argmax for every scored position, with the bundle's target graph."""
    from edgeinfer.runtime.session import ModelRunner

    m = load_manifest(bundle, verify=False)
    entry = m.models["target"]
    runner = ModelRunner(bundle / entry.onnx, entry.spec, threads=threads, max_context=window + 8)
    nll, top = [], []
    for w in windows(ids, window):
        runner.reset()
        logits = []
        for i in range(0, len(w) - 1, chunk):
            part = w[i:min(i + chunk, len(w) - 1)]
            logits.append(runner.forward(part))
            runner.commit(list(range(runner.num_scratch)))
        n, t = log_softmax_stats(np.concatenate(logits), np.asarray(w[1:]))
        nll.append(n)
        top.append(t)
    return np.concatenate(nll), np.concatenate(top), weight_bytes([bundle / entry.onnx])


def score_genai(model_dir: Path, ids: list[int], window: int, threads: int):
    """The same scores from an onnxruntime-genai model (logits of the prompt pass)."""
    import onnxruntime_genai as og

    cfg = og.Config(str(model_dir))
    cfg.clear_providers()
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(cfg)
    nll, top = [], []
    for w in windows(ids, window):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(w) + 1, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(np.asarray(w[:-1], dtype=np.int32))
        logits = np.asarray(gen.get_output("logits"), dtype=np.float32)
        logits = logits.reshape(-1, logits.shape[-1])  # [1, n, vocab] -> [n, vocab]
        if logits.shape[0] != len(w) - 1:
            raise RuntimeError(f"{model_dir}: genai returned logits for {logits.shape[0]} positions, "
                               f"expected {len(w) - 1}")
        n, t = log_softmax_stats(logits, np.asarray(w[1:]))
        nll.append(n)
        top.append(t)
        del gen
    return np.concatenate(nll), np.concatenate(top), weight_bytes([model_dir])


def export_recipe(source: Path, name: str, root: Path) -> tuple[Path, float | None]:
    from edgeinfer.export.pipeline import export_model

    out = root / name
    if (out / "manifest.json").is_file():
        return out, None
    t0 = time.perf_counter()
    export_model(source, QuantRecipe(**RECIPES[name]), out, overwrite=True, exact=name == "exact")
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="known model key, GGUF file or HF folder")
    ap.add_argument("--recipes", nargs="*", default=list(RECIPES), help=f"from {list(RECIPES)}")
    ap.add_argument("--bundle", nargs="*", type=Path, default=[],
                    help="score these bundles instead of exporting recipes (the first is the reference)")
    ap.add_argument("--genai", nargs="*", default=["int4", "fp32"], help="genai precisions to score")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=0, help="score only the first N tokens (0: all)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench_out"))
    args = ap.parse_args(argv)

    source, _ = resolve_source(args.model)
    root = cache_dir() / "bench" / (source.stem if source.is_file() else source.name) / "quality"
    root.mkdir(parents=True, exist_ok=True)
    bundles: list[tuple[str, Path, float | None]] = []
    if args.bundle:
        bundles = [(b.name, b, None) for b in args.bundle]
    else:
        names = ["fp32"] + [r for r in args.recipes if r != "fp32"]
        for name in tqdm(names, desc="export", unit="bundle"):
            try:
                path, secs = export_recipe(source, name, root)
                bundles.append((name, path, secs))
            except Exception as e:  # one recipe failing must not hide the others
                print(f"{name}: export failed: {type(e).__name__}: {e}", file=sys.stderr)
    if not bundles:
        print("nothing to score", file=sys.stderr)
        return 1
    from tokenizers import Tokenizer

    m0 = load_manifest(bundles[0][1], verify=False)
    tok = Tokenizer.from_file(str(bundles[0][1] / m0.tokenizer_file))
    ids = tok.encode(TEXT.read_text(), add_special_tokens=False).ids
    ids = ids[: args.max_tokens] if args.max_tokens else ids
    prep = prepare_anchors(args.model, [f"genai:{p}" for p in args.genai]) if args.genai else None

    rows, ref_top = [], None
    jobs = [("edgeinfer " + n, "bundle", p, s) for n, p, s in bundles]
    if prep is not None:
        jobs += [(f"genai {p}", "genai", Path(prep.artifacts[f"genai:{p}"]), prep.timings.get(f"genai:{p}"))
                 for p in args.genai if f"genai:{p}" in prep.artifacts]
    for name, kind, path, secs in tqdm(jobs, desc="score", unit="model"):
        t0 = time.perf_counter()
        fn = score_bundle if kind == "bundle" else score_genai
        nll, top, nbytes = fn(path, ids, args.window, args.threads)
        if ref_top is None:
            ref_top = top
        rows.append({"name": name, "path": str(path), "perplexity": float(np.exp(nll.mean())),
                     "top1_agreement_vs_ref": float((top == ref_top).mean()),
                     "scored_tokens": int(nll.size), "weight_bytes": nbytes,
                     "build_s": secs, "score_s": time.perf_counter() - t0})
    result = {"model": args.model, "text": TEXT.name, "tokens": len(ids), "window": args.window,
              "reference": rows[0]["name"], "rows": rows,
              "note": "build_s: our export wall time, or the genai builder's; None when cached from an "
                      "earlier run that did not record it"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quant_quality.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Quantization quality: {args.model}", "",
             f"{len(ids)} tokens of {TEXT.name}, windows of {args.window}; agreement vs {rows[0]['name']}.", "",
             "| model | perplexity | top-1 agreement | weights MB | build s |", "|---|---|---|---|---|"]
    for r in rows:
        b = "–" if r["build_s"] is None else f"{r['build_s']:.1f}"
        lines.append(f"| {r['name']} | {r['perplexity']:.3f} | {r['top1_agreement_vs_ref']:.4f} | "
                     f"{r['weight_bytes'] / 2**20:.1f} | {b} |")
    (args.out / "quant_quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
