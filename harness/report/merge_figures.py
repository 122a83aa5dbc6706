"""The report's merging figures: per-task scores of the adapters alone and merged, and the interference heatmaps.

Object-oriented Matplotlib on the Agg canvas through figures.py's _new_figure and _png_bytes, as
every other report figure: no pyplot, nothing left in a global figure registry.
"""

from __future__ import annotations

import math

import matplotlib
import numpy as np

from harness.analysis.merging import MergingSummary, MethodScores
from harness.analysis.naming import display_name
from harness.heatmap import new_figure, png_bytes

_SINGLE_COLOR = "#9e9e9e"
_PANELS_PER_LINE = 3
_MAX_LABELLED_BARS = 16  # more bars than this in a panel: no value labels


def _seeds(n: int) -> str:
    return f"mean of {n} seeds" if n > 1 else "1 seed"


def _combination_colors(combinations: list[str]) -> dict:
    cmap = matplotlib.colormaps["Dark2"]  # not tab10: the sequence figures colour methods with it
    return {c: cmap(i % 8) for i, c in enumerate(combinations)}


def _score_panel(ax, ms: MethodScores, combinations: list[str], colors: dict) -> None:
    """One method: per task, the adapter alone and each merge, error bars = std over seeds (2 or more)."""
    bars = [("single adapter S[j, j]", ms.single, _SINGLE_COLOR)]
    bars += [(f"merged: {c}", ms.merged[c], colors[c]) for c in combinations if c in ms.merged]
    x = np.arange(len(ms.tasks))
    width = 0.8 / len(bars)
    labelled = len(bars) * len(ms.tasks) <= _MAX_LABELLED_BARS
    for k, (label, (mean, std, count), color) in enumerate(bars):
        pos = x - 0.4 + width * (k + 0.5)
        ok = np.isfinite(mean)
        err = np.where(count > 1, std, np.nan)[ok]
        ax.bar(
            pos[ok],
            mean[ok],
            width * 0.92,
            color=color,
            label=label,
            capsize=3,
            error_kw={"linewidth": 1},
            yerr=err if np.isfinite(err).any() else None,
        )
        for p, v, sd in zip(pos[ok], mean[ok], np.nan_to_num(err, nan=0.0)) if labelled else ():
            ax.annotate(f"{v:.2f}", (p, v + sd), textcoords="offset points", xytext=(0, 2), ha="center", fontsize=6)
    rotate = max(map(len, ms.tasks), default=0) > 8
    ax.set_xticks(x, ms.tasks, fontsize=8, rotation=30 if rotate else 0, ha="right" if rotate else "center")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("score", fontsize=8)
    ax.tick_params(axis="y", labelsize=8)
    ax.set_title(f"{display_name(ms.method)} ({_seeds(ms.n_runs)})", fontsize=10)
    ax.grid(axis="y", alpha=0.3)


def _fig_scores(ms: MergingSummary, colors: dict):
    panels = ms.scores
    n = len(panels)
    per_line = min(n, _PANELS_PER_LINE)
    lines = math.ceil(n / per_line)
    n_bars = 1 + len(ms.combinations)
    width = max(3.6, 0.3 * max(len(p.tasks) for p in panels) * n_bars + 1.4)
    fig = new_figure(per_line * width + 0.4, 3.0 * lines + 1.0)
    grid = fig.subplots(lines, per_line, squeeze=False)
    for k, panel in enumerate(panels):
        _score_panel(grid[k // per_line][k % per_line], panel, ms.combinations, colors)
    for k in range(n, lines * per_line):
        grid[k // per_line][k % per_line].set_visible(False)
    legend: dict = {}
    for ax in (a for row in grid for a in row):
        for h, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, h)
    fig.legend(list(legend.values()), list(legend), loc="outside lower center", fontsize=8, ncols=min(len(legend), 6))
    fig.suptitle(
        "Per-task score: each task's adapter alone S[j, j] vs the merged model m_j (mean over seeds, error bars ± std)",
        fontsize=10,
    )
    return fig


def _interference_panel(ax, tasks: list[str], M: np.ndarray, lim: float, title: str, fontsize: float):
    cmap = matplotlib.colormaps["RdBu"].with_extremes(bad="#d9d9d9")
    im = ax.imshow(np.ma.masked_invalid(M), cmap=cmap, vmin=-lim, vmax=lim, aspect="auto")
    rotate = max(map(len, tasks), default=0) > 6
    ax.set_xticks(
        range(len(tasks)), tasks, rotation=35 if rotate else 0, ha="right" if rotate else "center", fontsize=8
    )
    ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
    ax.set_title(title, fontsize=10)
    for i in range(M.shape[0]):
        for j in range(M.shape[1]):
            v = M[i, j]
            if np.isfinite(v):
                ax.text(
                    j,
                    i,
                    f"{v:+.2f}",
                    ha="center",
                    va="center",
                    fontsize=fontsize,
                    color="white" if abs(v) > 0.6 * lim else "black",
                )
            else:
                ax.text(
                    j, i, "—" if i == j else "n/a", ha="center", va="center", fontsize=fontsize - 1, color="#555555"
                )
    return im


def _fig_interference(ms: MergingSummary):
    """One heatmap per method (rows) x combination (columns), one shared symmetric colour scale."""
    methods = list(dict.fromkeys(m for m, *_ in ms.interference))
    combos = [c for c in ms.combinations if any(c == x for _, x, *_ in ms.interference)]
    T = max(len(t) for _, _, t, _, _ in ms.interference)
    peak = max([float(np.nanmax(np.abs(M))) for *_, M, _ in ms.interference if np.isfinite(M).any()] + [0.0])
    lim = max(0.05, math.ceil(peak * 20) / 20)
    cell = 0.62 if T <= 8 else 0.45
    fig = new_figure(max(4.0, len(combos) * (T * cell + 1.6) + 1.2), len(methods) * (T * cell * 0.9 + 1.5) + 0.9)
    grid = fig.subplots(len(methods), len(combos), squeeze=False)
    used, im = set(), None
    for m, c, tasks, M, n in ms.interference:
        i, j = methods.index(m), combos.index(c)
        im = _interference_panel(
            grid[i][j], tasks, M, lim, f"{display_name(m)} · {c} ({_seeds(n)})", 9 if T <= 6 else (7 if T <= 10 else 5)
        )
        grid[i][j].set_xlabel("merged with task j", fontsize=8)
        if j == 0:
            grid[i][j].set_ylabel("task i (scored)", fontsize=8)
        used.add((i, j))
    for i in range(len(methods)):
        for j in range(len(combos)):
            if (i, j) not in used:
                grid[i][j].set_visible(False)
    cbar = fig.colorbar(
        im, ax=[a for row in grid for a in row], shrink=0.9 if len(methods) == 1 else 0.6, fraction=0.05
    )
    cbar.set_label("I[i, j]: score change", fontsize=9)
    fig.suptitle(
        "Pairwise interference I[i, j] = score on task i after merging adapters i and j − S[i, i] "
        "(red: the merge loses)",
        fontsize=10,
    )
    return fig


def merge_figures(ms: MergingSummary) -> dict[str, bytes]:
    """The merging figures as {file name: PNG bytes}; each only when there is data for it."""
    figures: dict[str, bytes] = {}
    if any(np.isfinite(s.single[0]).any() or s.merged for s in ms.scores):
        figures["merge_scores.png"] = png_bytes(_fig_scores(ms, _combination_colors(ms.combinations)))
    if ms.interference:
        figures["merge_interference.png"] = png_bytes(_fig_interference(ms))
    return figures
