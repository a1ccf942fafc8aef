"""``run_benchmark``: prepare, start one worker per method, run interleaved, summarize.

Order of work: prepare the artifacts (cached), encode the prompts once, probe memory
bandwidth, set up every method in its own worker process, run the warm-up (untimed,
excluded), then for each prompt and repetition run every method once in turn (A, B, C, A,
B, C, ...), so that slow drifts of machine load hit every method alike. A method whose
artifact, package or worker fails is skipped with a note; the others go on.
"""
from __future__ import annotations

import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError
from .config import BenchConfig, MethodSpec
from .methods import candidates, to_spec
from .prepare import prepare_anchors
from .probe import decode_ceiling_tps, measure_bandwidth, weight_bytes
from .prompts import encode_prompts, select_prompts
from .report import BenchReport, summarize
from .weights import bytes_per_token
from .worker import Worker, WorkerError

Progress = Callable[[int, int], None]
_PACKAGES = ("onnxruntime", "onnxruntime-genai", "llama_cpp_python", "transformers", "torch",
             "numpy", "tokenizers")


def environment() -> dict[str, Any]:
    versions = {}
    for p in _PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = None
    return {"python": sys.version.split()[0], "platform": platform.platform(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(), "versions": versions,
            "loadavg_start": _loadavg()}


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


class _Tally:
    """Progress over the whole invocation: prepare steps, set-ups and runs."""

    def __init__(self, progress: Progress | None):
        self.progress, self.done, self.total = progress, 0, 0

    def add(self, n: int) -> None:
        self.total += n
        self.tick(0)

    def tick(self, n: int = 1) -> None:
        self.done += n
        if self.progress:
            self.progress(self.done, self.total)


def run_benchmark(config: BenchConfig, progress: Progress | None = None) -> BenchReport:
    """Run every method of ``config`` and return the report. Only the workers' logs are
    written (``<out_dir>/logs``); ``write_outputs`` writes the results."""
    t_start = time.perf_counter()
    env = environment()
    tally = _Tally(progress)
    from .edgeinfer_method import available_drafters

    drafters = config.drafters or available_drafters(config.bundle)
    cands = candidates(config, drafters)
    if not cands:
        raise ConfigError(f"bench config: methods {list(config.methods)} match no method")
    prompts = select_prompts(config.prompts)  # a bad key fails before any preparation
    needs = sorted({c.needs for c in cands})
    tally.add(len(needs))
    base = tally.done
    prep = prepare_anchors(config.model, needs, config.bundle,
                           progress=lambda d, t: tally.tick(base + d - tally.done))
    tok = prep.tokenizer
    prompt_ids = encode_prompts(tok["tokenizer_json"], tok.get("chat_template"), prompts,
                                tok.get("bos_token_id"), bool(tok.get("add_bos_token")))
    n_ctx = -(-(max(len(v) for v in prompt_ids.values()) + config.max_new_tokens + 64) // 256) * 256
    bw = measure_bandwidth(config.probe_mb, threads=config.num_threads)

    out_dir = Path(config.out_dir)
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    methods: list[dict[str, Any]] = []
    runnable: list[tuple[dict[str, Any], MethodSpec, int]] = []  # record, spec, memory estimate
    for c in cands:
        spec = to_spec(c, prep, n_ctx)
        rec: dict[str, Any] = {"name": c.name, "family": c.family, "is_anchor": c.family != "edgeinfer",
                               "budget": c.budget, "speculative": c.speculative, "needs": c.needs}
        methods.append(rec)
        if isinstance(spec, str):
            rec.update(status="skipped", note=spec)
            continue
        rec.update(spec.to_dict(), status="ok")
        rec["weight_bytes"] = weight_bytes(spec.weight_files)  # on disk
        try:
            rec["bytes_per_token"] = bytes_per_token(spec.weight_files)
        except Exception as e:  # an unreadable header: fall back to the file sizes, say so
            rec["bytes_per_token"] = rec["weight_bytes"]
            rec["bytes_per_token_note"] = f"{type(e).__name__}: {e}"
        rec["ceiling_tps"] = decode_ceiling_tps(bw.best_gbps, rec["bytes_per_token"])
        runnable.append((rec, spec, weight_bytes([prep.artifacts[c.needs]]) + (200 << 20)))
    runs: list[dict[str, Any]] = []
    prompt_list = [(p.key, prompt_ids[p.key]) for p in prompts]
    groups = method_groups(runnable, config.memory_budget_mb << 20 if config.memory_budget_mb
                           else _default_memory_budget())
    n_sched = config.warmup + config.repetitions * len(prompts)
    tally.add(len(runnable) * (1 + n_sched))
    for group in groups:
        _run_group(group, prompt_list, config, out_dir, runs, tally)
    env["loadavg_end"] = _loadavg()
    notes = list(prep.notes)
    if len(groups) > 1:
        notes.append("methods ran in groups (interleaved within each group only): "
                     + "; ".join(", ".join(spec.name for _, spec in g) for g in groups))
    if not any(m["is_anchor"] and m["status"] == "ok" for m in methods):
        notes.append("no anchor was measured: ratios are empty")
    report = BenchReport(
        config=config.to_dict(), environment=env, bandwidth=bw.to_dict(), prepared=prep.to_dict(),
        prompts={p.key: {"kind": p.kind, "prompt_tokens": len(prompt_ids[p.key]),
                         "prompt_ids": prompt_ids[p.key]} for p in prompts},
        methods=methods, runs=runs, notes=notes)
    summarize(report, eos_ids=tuple(tok.get("eos_token_ids") or ()))
    report.wall_s = time.perf_counter() - t_start
    return report


def _default_memory_budget() -> int:
    """Half of MemAvailable (bytes); 8 GiB when /proc/meminfo cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return 8 << 30


def method_groups(runnable: list[tuple[dict[str, Any], MethodSpec, int]], budget: int):
    """Methods whose workers live (and interleave) together: the main methods in order,
    split so that each group's estimated memory fits ``budget``; then one group per swept
    drafter (its budgets interleave with each other)."""
    groups: list[list[tuple[dict[str, Any], MethodSpec]]] = []
    cur: list[tuple[dict[str, Any], MethodSpec]] = []
    used = 0
    for rec, spec, est in runnable:
        if spec.budget is not None:
            continue
        if cur and used + est > budget:
            groups.append(cur)
            cur, used = [], 0
        cur.append((rec, spec))
        used += est
    if cur:
        groups.append(cur)
    sweep: dict[str, list[tuple[dict[str, Any], MethodSpec]]] = {}
    for rec, spec, _ in runnable:
        if spec.budget is not None:
            sweep.setdefault(str(spec.options.get("drafter")), []).append((rec, spec))
    return groups + list(sweep.values())


def _run_group(group, prompt_list, config: BenchConfig, out_dir: Path,
               runs: list[dict[str, Any]], tally: _Tally) -> None:
    """Set up every method of ``group`` in its worker, warm up, run interleaved, close."""
    workers: dict[str, tuple[Worker, dict[str, Any]]] = {}
    try:
        for rec, spec in group:
            safe = "".join(ch if ch.isalnum() else "_" for ch in spec.name)
            w = Worker(out_dir / "logs" / f"{safe}.log", config.timeout_s, config.num_threads)
            try:
                reply = w.setup(spec)
                rec.update(setup_s=reply["setup_s"], info=reply.get("info", {}),
                           rss_after_setup_bytes=reply["rss_bytes"], peak_rss_bytes=reply["peak_rss_bytes"])
                workers[spec.name] = (w, rec)
            except WorkerError as e:
                w.close()
                rec.update(status="skipped", note=f"setup failed: {e}")
                tally.tick(config.warmup + config.repetitions * len(prompt_list))
            tally.tick()
        schedule = [(prompt_list[0], -1 - i, True) for i in range(config.warmup)]
        schedule += [(p, rep, False) for p in prompt_list for rep in range(config.repetitions)]
        for i, ((key, ids), rep, warm) in enumerate(schedule):
            for name in list(workers):
                w, rec = workers[name]
                try:
                    res, reply = w.generate(ids, config.max_new_tokens)
                except WorkerError as e:
                    rec.update(status="failed", note=f"generate failed: {e}")
                    w.close()
                    del workers[name]
                    tally.tick(len(schedule) - i)
                    continue
                rec["peak_rss_bytes"] = max(rec.get("peak_rss_bytes") or 0, reply["peak_rss_bytes"])
                runs.append({"method": name, "prompt": key, "rep": rep, "warmup": warm,
                             "result": res.to_dict(), "rss_bytes": reply["rss_bytes"],
                             "loadavg": _loadavg()})
                tally.tick()
    finally:
        for w, rec in workers.values():
            reply = w.close()
            if reply.get("peak_rss_bytes"):
                rec["peak_rss_bytes"] = max(rec.get("peak_rss_bytes") or 0, reply["peak_rss_bytes"])


def write_outputs(report: BenchReport, out_dir: str | Path | None = None) -> dict[str, str]:
    """results.json (every raw run), results.md (the table) and the PNG plots."""
    from .plots import plot_tokens_per_s, plot_tree_sweep
    from .report import write_json, write_markdown

    out = Path(out_dir or report.config["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": str(write_json(report, out / "results.json")),
             "markdown": str(write_markdown(report, out / "results.md"))}
    try:
        for key, fn in (("plot_tokens_per_s", plot_tokens_per_s), ("plot_tree_sweep", plot_tree_sweep)):
            p = fn(report, out / f"{key[5:]}.png")
            if p is not None:
                files[key] = str(p)
    except ImportError as e:  # matplotlib is in the bench extra; plots are optional
        report.notes.append(f"plots skipped: {e}")
        write_json(report, out / "results.json")
    return files
