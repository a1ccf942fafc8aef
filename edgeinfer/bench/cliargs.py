"""Command-line flags of the benchmark, shared by ``edgeinfer bench`` and benchmarks/run_bench.py.

    parser = argparse.ArgumentParser(); add_bench_arguments(parser)
    config = config_from_args(parser.parse_args())
"""
from __future__ import annotations

import argparse

from .config import GENAI_PRECISIONS, GGUF_PRECISIONS, BenchConfig

_KEYS = ("model", "bundle", "methods", "prompts", "max_new_tokens", "repetitions", "warmup",
         "threads", "gguf_precisions", "genai_precisions", "drafters", "tree_budgets", "anchors",
         "sweep", "out_dir", "memory_budget_mb")


def add_bench_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true",
                    help="CI preset: one prompt, 12 tokens, edgeinfer plain + tree and llama.cpp")
    ap.add_argument("--model", help="known model key, GGUF file or Hugging Face folder")
    ap.add_argument("--bundle", help="edgeinfer bundle (default: export one into the model cache)")
    ap.add_argument("--methods", nargs="*", help='fnmatch patterns on method names, e.g. "llama.cpp *"')
    ap.add_argument("--prompts", nargs="*", help="prompt keys: chat code summary longform")
    ap.add_argument("--max-new-tokens", type=int, help="tokens per run (fixed: EOS does not stop)")
    ap.add_argument("--repetitions", type=int, help="timed runs per method and prompt")
    ap.add_argument("--warmup", type=int, help="untimed runs per method first")
    ap.add_argument("--threads", type=int, help="threads per method (0: all cores)")
    ap.add_argument("--gguf", nargs="*", dest="gguf_precisions", choices=GGUF_PRECISIONS,
                    help="llama.cpp precisions")
    ap.add_argument("--genai", nargs="*", dest="genai_precisions", choices=GENAI_PRECISIONS,
                    help="onnxruntime-genai precisions")
    ap.add_argument("--drafters", nargs="*", help="edgeinfer drafters (model ngram recycle, a+b)")
    ap.add_argument("--tree-budgets", nargs="*", type=int, help="node budgets of the tree sweep")
    ap.add_argument("--no-anchors", dest="anchors", action="store_false", default=None)
    ap.add_argument("--no-sweep", dest="sweep", action="store_false", default=None)
    ap.add_argument("--memory-budget-mb", type=int,
                    help="memory of the workers alive at once (default: half the available)")
    ap.add_argument("--out", dest="out_dir", help="output folder (default bench_out)")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """A BenchConfig from parsed flags: unset flags keep the defaults (or the quick preset's)."""
    d = vars(args)
    overrides = {k: (tuple(d[k]) if isinstance(d[k], list) else d[k])
                 for k in _KEYS if d.get(k) is not None}
    return BenchConfig.quick(**overrides) if d.get("quick") else BenchConfig(**overrides)
