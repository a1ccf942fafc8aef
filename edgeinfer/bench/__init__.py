"""Benchmark suite: edgeinfer (plain, chain, tree; each drafter) beside the anchors
(llama-cpp-python, onnxruntime-genai, transformers) on the same prompt token ids.

Python API (the ``edgeinfer bench`` command and ``benchmarks/run_bench.py`` call it)::

    from edgeinfer.bench import BenchConfig, run_benchmark, write_outputs
    report = run_benchmark(BenchConfig.quick(), progress=lambda done, total: ...)
    files = write_outputs(report)          # results.json, results.md, *.png in config.out_dir

CLI flags (``edgeinfer bench``): ``add_bench_arguments(parser)`` then ``config_from_args(args)``.
"""
from __future__ import annotations

from .cliargs import add_bench_arguments, config_from_args
from .config import BenchConfig, MethodSpec, RunResult
from .prepare import Prepared, prepare_anchors
from .probe import BandwidthResult, decode_ceiling_tps, measure_bandwidth
from .prompts import PROMPTS
from .report import BenchReport, to_markdown, write_json, write_markdown
from .runner import run_benchmark, write_outputs

__all__ = ["BenchConfig", "MethodSpec", "RunResult", "BenchReport", "Prepared", "PROMPTS",
           "BandwidthResult", "run_benchmark", "write_outputs", "prepare_anchors",
           "measure_bandwidth", "decode_ceiling_tps", "to_markdown", "write_json", "write_markdown",
           "add_bench_arguments", "config_from_args"]
