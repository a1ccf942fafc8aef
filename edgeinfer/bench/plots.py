"""PNG plots of a BenchReport (matplotlib's object API: no pyplot, no global state).

* ``tokens_per_s.png``: decode tokens/s by method, median bar with a min–max whisker,
  anchors and edgeinfer in different colours, each method's bandwidth ceiling as a tick.
* ``tree_sweep.png``: acceptance rate, mean accepted length and decode tokens/s against the tree node budget, one
  line per drafter, the fastest anchor as a horizontal reference.
"""
from __future__ import annotations

import re
from pathlib import Path

from .report import BenchReport


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def plot_tokens_per_s(report: BenchReport, path: str | Path) -> Path | None:
    rows = [(n, s) for n, s in report.summary.items() if s["decode_tps"]["median"] is not None]
    if not rows:
        return None
    fig = _figure(8, 0.45 * len(rows) + 1.6)
    ax = fig.add_subplot(1, 1, 1)
    names = [n for n, _ in rows]
    med = [s["decode_tps"]["median"] for _, s in rows]
    lo = [m - s["decode_tps"]["min"] for m, (_, s) in zip(med, rows)]
    hi = [s["decode_tps"]["max"] - m for m, (_, s) in zip(med, rows)]
    colors = ["tab:gray" if s["is_anchor"] else "tab:blue" for _, s in rows]
    y = list(range(len(rows)))
    ax.barh(y, med, xerr=[lo, hi], color=colors, capsize=3)
    for i, (_, s) in enumerate(rows):
        if s.get("ceiling_tps"):
            ax.plot([s["ceiling_tps"]] * 2, [i - 0.4, i + 0.4], color="tab:red", lw=1.5)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("decode tokens/s (median, min–max); red tick: bandwidth ceiling")
    ax.set_title(f"{report.config['model']} — blue: edgeinfer, gray: anchors", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def plot_tree_sweep(report: BenchReport, path: str | Path) -> Path | None:
    groups: dict[str, list[tuple[int, dict]]] = {}
    for name, s in report.summary.items():
        if s.get("budget") is not None:
            key = re.sub(r"\s*@\d+$", "", name)
            groups.setdefault(key, []).append((s["budget"], s))
    if not groups:
        return None
    fig = _figure(12, 3.6)
    ax_rate, ax_acc, ax_tps = (fig.add_subplot(1, 3, i) for i in (1, 2, 3))
    for key, pts in sorted(groups.items()):
        pts.sort(key=lambda p: p[0])
        xs = [b for b, _ in pts]
        ax_rate.plot(xs, [s["acceptance_rate"]["median"] or 0 for _, s in pts], "o-", label=key)
        ax_acc.plot(xs, [s["mean_accepted_len"]["median"] or 0 for _, s in pts], "o-", label=key)
        ax_tps.plot(xs, [s["decode_tps"]["median"] or 0 for _, s in pts], "o-", label=key)
    fa = report.fastest_anchor
    if fa:
        ax_tps.axhline(report.summary[fa]["decode_tps"]["median"], color="tab:gray", ls="--",
                       label=f"fastest anchor ({fa})")
    for ax, label in ((ax_rate, "acceptance rate (accepted / proposed)"), (ax_acc, "mean accepted length (tokens / target pass)"),
                      (ax_tps, "decode tokens/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tree node budget")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_tps.legend(fontsize=7)
    fig.suptitle("Where speculation pays: tree budget sweep", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path
