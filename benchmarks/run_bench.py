"""Run the benchmark suite from a checkout (the same thing ``edgeinfer bench`` does).

    .venv/bin/python benchmarks/run_bench.py                      # everything, default model
    .venv/bin/python benchmarks/run_bench.py --quick              # the CI preset
    .venv/bin/python benchmarks/run_bench.py --methods "llama.cpp *" "genai *" --prompts chat \
        --max-new-tokens 64 --repetitions 3
    .venv/bin/python benchmarks/run_bench.py --model path/to/model.gguf --bundle path/to/bundle

Writes results.json (every raw run), results.md (the table) and PNG plots into --out.
"""
from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from edgeinfer.bench import BenchConfig, run_benchmark, to_markdown, write_outputs
from edgeinfer.bench.cliargs import add_bench_arguments, config_from_args
from edgeinfer.errors import EdgeInferError


def build_config(argv: list[str] | None = None) -> BenchConfig:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_bench_arguments(ap)
    return config_from_args(ap.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    try:
        config = build_config(argv)
        bar = tqdm(total=0, unit="step", desc="bench")

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        try:
            report = run_benchmark(config, progress=progress)
        finally:
            bar.close()
        files = write_outputs(report)
    except EdgeInferError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(to_markdown(report))
    for kind, path in files.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
