"""The benchmark report: raw runs -> per-method summary, ratios, Markdown and JSON.

Summary statistics are over every timed run of a method (all prompts x repetitions): the
median with min and max. Ratios divide a method's median by the median of the *fastest
anchor* (highest median decode tokens/s among the anchors measured in this invocation).
Agreement compares a method's greedy tokens with the reference's (edgeinfer plain decode of
the same target) on the same prompt, up to and including the reference's first
end-of-sequence token: the share of that span matched before the first difference.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

METRICS = ("decode_tps", "prefill_tps", "ttft_s", "acceptance_rate", "mean_accepted_len",
           "agreement", "draft_bound_tps")
HIGHER_IS_BETTER = {"decode_tps": True, "prefill_tps": True, "ttft_s": False,
                    "peak_rss_bytes": False}
# The agreement reference: edgeinfer's plain decode of the target, else a float anchor.
REFERENCE_ORDER = ("edgeinfer plain", "transformers fp32", "genai fp32", "llama.cpp F16")
SUMMARY_FIELDS = METRICS + ("peak_rss_bytes", "exact_match_rate")


def agreement(tokens: Sequence[int], reference: Sequence[int], eos_ids: Sequence[int] = ()) -> tuple[float, bool]:
    """(matched share of the reference span, exact match) — see the module docstring."""
    ref = list(reference)
    for i, t in enumerate(ref):
        if t in eos_ids:
            ref = ref[: i + 1]
            break
    if not ref:
        return 1.0, True
    got = list(tokens[: len(ref)])
    n = 0
    for a, b in zip(got, ref):
        if a != b:
            break
        n += 1
    return n / len(ref), got == ref


def spread(values: Sequence[float | None]) -> dict[str, float | None]:
    """{"median", "min", "max", "n"} of the non-None values (all None when there are none)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


@dataclass
class BenchReport:
    config: dict[str, Any]
    environment: dict[str, Any]
    bandwidth: dict[str, Any]
    prepared: dict[str, Any]
    prompts: dict[str, dict[str, Any]]  # key -> {"kind", "prompt_tokens"}
    methods: list[dict[str, Any]]  # MethodSpec dict + status, note, setup_s, info, weight_bytes ...
    runs: list[dict[str, Any]]  # every run, warm-up included (flagged)
    reference: str | None = None
    fastest_anchor: str | None = None
    summary: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def ok_methods(self) -> list[dict[str, Any]]:
        return [m for m in self.methods if m["status"] == "ok"]

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (
            "config", "environment", "bandwidth", "prepared", "prompts", "reference",
            "fastest_anchor", "summary", "methods", "runs", "notes", "wall_s")}


def summarize(report: BenchReport, eos_ids: Sequence[int] = ()) -> None:
    """Fill agreement per run, ``report.summary``, ``reference`` and ``fastest_anchor``."""
    timed = [r for r in report.runs if not r["warmup"] and r.get("result")]
    names = [m["name"] for m in report.ok_methods()]
    ref = next((n for n in REFERENCE_ORDER if n in names), names[0] if names else None)
    report.reference = ref
    ref_tokens = {r["prompt"]: r["result"]["tokens"] for r in timed if r["method"] == ref}
    for r in timed:
        rt = ref_tokens.get(r["prompt"])
        a, exact = agreement(r["result"]["tokens"], rt, eos_ids) if rt is not None else (None, None)
        r["agreement"], r["exact_match"] = a, exact
    by_method: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in timed:
        by_method.setdefault(r["method"], []).append(r)
    summary: dict[str, dict[str, Any]] = {}
    for m in report.ok_methods():
        runs = by_method.get(m["name"], [])
        s: dict[str, Any] = {k: spread([r["result"].get(k) if k in r["result"] else r.get(k)
                                        for r in runs]) for k in METRICS}
        s["peak_rss_bytes"] = spread([m.get("peak_rss_bytes")])
        exact = [r["exact_match"] for r in runs if r.get("exact_match") is not None]
        s["exact_match_rate"] = spread([sum(exact) / len(exact)] if exact else [])
        s["by_prompt"] = {p: spread([r["result"]["decode_tps"] for r in runs if r["prompt"] == p])
                          for p in sorted({r["prompt"] for r in runs})}
        s["family"], s["is_anchor"], s["budget"] = m["family"], m["is_anchor"], m.get("budget")
        s["speculative"] = bool(m.get("speculative"))
        s["ceiling_tps"] = m.get("ceiling_tps")
        s["weight_bytes"] = m.get("weight_bytes")
        s["bytes_per_token"] = m.get("bytes_per_token")
        summary[m["name"]] = s
    anchors = [(s["decode_tps"]["median"], n) for n, s in summary.items()
               if s["is_anchor"] and s["decode_tps"]["median"] is not None]
    report.fastest_anchor = max(anchors)[1] if anchors else None
    for name, s in summary.items():
        ratios: dict[str, float | None] = {}
        for k in HIGHER_IS_BETTER:
            base = summary[report.fastest_anchor][k]["median"] if report.fastest_anchor else None
            v = s[k]["median"]
            ratios[k] = v / base if v is not None and base else None
        s["ratio_to_fastest_anchor"] = ratios
    report.summary = summary


def _fmt(v: float | None, spec: str = ".1f", scale: float = 1.0) -> str:
    return "–" if v is None else format(v * scale, spec)


def _cell(st: dict[str, Any], spec: str = ".1f", scale: float = 1.0) -> str:
    if st["median"] is None:
        return "–"
    if st["n"] <= 1 or st["min"] == st["max"]:
        return _fmt(st["median"], spec, scale)
    return f"{_fmt(st['median'], spec, scale)} ({_fmt(st['min'], spec, scale)}–{_fmt(st['max'], spec, scale)})"


def to_markdown(report: BenchReport) -> str:
    cfg, bw = report.config, report.bandwidth
    lines = [f"# edgeinfer benchmark: {cfg['model']}", "",
             f"{len(report.prompts)} prompt(s) ({', '.join(report.prompts)}), "
             f"{cfg['max_new_tokens']} greedy tokens, {cfg['repetitions']} repetition(s) after "
             f"{cfg['warmup']} warm-up, runs interleaved across methods, {cfg['threads'] or 'all'} "
             f"thread(s). Median (min–max) over prompts × repetitions.", "",
             f"Ratios (×) are to the fastest anchor: **{report.fastest_anchor or 'none measured'}**. "
             f"Agreement is with **{report.reference}** greedy output.", ""]
    if bw:
        lines += [f"Memory bandwidth probe: read {bw['read_gbps']:.1f} GB/s, copy {bw['copy_gbps']:.1f} "
                  f"GB/s ({bw['threads']} thread(s)); ceiling = best bandwidth ÷ weight bytes read per "
                  "token (plain decoding).", ""]
    lines += ["Draft-bound = tokens per second of the draft model's own forward passes: what a "
              "speculative method could reach if verifying cost nothing.", ""]
    env = report.environment
    lines += [f"Load average at start/end: {env.get('loadavg_start')} / {env.get('loadavg_end')} "
              f"on {env.get('cpu_count')} CPU(s) — a busy machine makes every figure noisy.", "",
              "| method | decode tok/s | × | prefill tok/s | × | TTFT ms | × | peak RSS MB | × "
              "| accept rate | mean accepted len | agreement | ceiling tok/s | draft-bound tok/s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in report.summary.items():
        r = s["ratio_to_fastest_anchor"]
        lines.append("| " + " | ".join([
            name, _cell(s["decode_tps"]), _fmt(r["decode_tps"], ".2f"), _cell(s["prefill_tps"], ".0f"),
            _fmt(r["prefill_tps"], ".2f"), _cell(s["ttft_s"], ".0f", 1e3), _fmt(r["ttft_s"], ".2f"),
            _fmt(s["peak_rss_bytes"]["median"], ".0f", 1 / 2**20), _fmt(r["peak_rss_bytes"], ".2f"),
            _cell(s["acceptance_rate"], ".2f"), _cell(s["mean_accepted_len"], ".2f"),
            _cell(s["agreement"], ".2f"), _fmt(s["ceiling_tps"], ".0f"),
            _cell(s["draft_bound_tps"], ".0f")]) + " |")
    above = [n for n, s in report.summary.items() if s["ceiling_tps"] and s["decode_tps"]["median"]
             and not s["speculative"] and s["decode_tps"]["median"] > s["ceiling_tps"]]
    if above:
        lines += ["", f"Above the probe's ceiling: {', '.join(above)} (the NumPy probe reaches less "
                  "bandwidth than these engines' kernels; the ceiling is a yardstick, not a bound)."]
    prompts = list(report.prompts)
    if len(prompts) > 1:
        lines += ["", "## Decode tok/s by prompt (median)", "",
                  "| method | " + " | ".join(prompts) + " |", "|---" * (len(prompts) + 1) + "|"]
        for name, s in report.summary.items():
            bp = s.get("by_prompt", {})
            lines.append(f"| {name} | " + " | ".join(
                _fmt(bp[p]["median"]) if p in bp else "–" for p in prompts) + " |")
    sweep = sorted(((n.rsplit(" @", 1)[0], s["budget"]), n) for n, s in report.summary.items()
                   if s["budget"] is not None)
    if sweep:
        lines += ["", "## Tree budget sweep", "", "| method | node budget | decode tok/s | × | accept rate "
                  "| mean accepted len |", "|---|---|---|---|---|---|"]
        for (_, b), n in sweep:
            s = report.summary[n]
            lines.append(f"| {n} | {b} | {_cell(s['decode_tps'])} | "
                         f"{_fmt(s['ratio_to_fastest_anchor']['decode_tps'], '.2f')} | "
                         f"{_cell(s['acceptance_rate'], '.2f')} | {_cell(s['mean_accepted_len'], '.2f')} |")
    prep = report.prepared
    if prep.get("timings"):
        lines += ["", "## Preparation wall times (s)", ""]
        lines += [f"- {k}: {v:.1f}" for k, v in sorted(prep["timings"].items())]
    skipped = [m for m in report.methods if m["status"] != "ok"]
    if skipped or report.notes:
        lines += ["", "## Notes", ""]
        lines += [f"- {m['name']}: skipped — {m.get('note')}" for m in skipped]
        lines += [f"- {n}" for n in report.notes]
    return "\n".join(lines) + "\n"


def write_json(report: BenchReport, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report.to_dict(), indent=1))
    tmp.replace(path)
    return path


def write_markdown(report: BenchReport, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_markdown(report))
    return path
