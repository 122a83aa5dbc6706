"""The report's sequence figures as PNG bytes: accuracy matrices, curves, metrics, parameters, diagnostics,
general CE and the grid's sensitivity figure (merge_figures.py draws the merging ones).

Object-oriented Matplotlib on the Agg canvas (harness/heatmap.py: no pyplot). The report's heatmap panels are
drawn by the same `draw_heatmap` as each run's `matrix_heatmap.png`; they differ only in the HeatmapStyle and
the layout around it.
"""

from __future__ import annotations

import math
from typing import Any

import matplotlib
import numpy as np
from matplotlib.patches import Rectangle

from harness.analysis.aggregate import PARAM_KEYS, MethodMatrix
from harness.analysis.naming import HIGHER_IS_BETTER, METRICS, display_name, num_sort_key
from harness.analysis.numbers import finite, fmt_count
from harness.analysis.sensitivity import VariantRow
from harness.heatmap import HeatmapStyle, draw_heatmap, fit_title, new_figure, png_bytes

# The report's panels: grey "n/a" cells, so a gap is visibly not a zero.
REPORT_STYLE = HeatmapStyle("#d9d9d9", "n/a", 0.55, 6, 35, 8, 10)


# More than 3 side-by-side heatmaps (methods) wrap onto new lines: at most this many per line, and
# no wider than _MAX_WIDTH inches, so the cells stay readable in the page.
_PANELS_PER_LINE = 4
_MAX_WIDTH = 16.0


def _heatmap_panels(
    panels, row_labels_per_panel, col_labels_per_panel, title, xlabel, ylabel, highlight=None, short_notes=None
):
    """Heatmaps side by side (wrapped beyond 3, see _PANELS_PER_LINE) with one shared 0..1 colour scale and the
    value in every cell. A panel with a short note (short_notes[k], a reference run) and fewer rows keeps
    the others' cell height and shows the note in the space below its rows."""
    n = len(panels)
    n_rows = max(p[1].shape[0] for p in panels)
    n_cols = max(p[1].shape[1] for p in panels)
    cell = 0.62 if n_cols <= 8 else 0.45
    fit = int((_MAX_WIDTH - 1.2) // (n_cols * cell + 1.4))
    per_line = n if n <= 3 else min(n, _PANELS_PER_LINE, max(2, fit))
    lines = math.ceil(n / per_line)
    height = max(2.6, n_rows * cell * 0.9 + 1.9) if lines == 1 else lines * (n_rows * cell * 0.9 + 1.6) + 0.6
    fig = new_figure(max(4.0, per_line * (n_cols * cell + 1.4) + 1.2), height)
    grid = fig.subplots(lines, per_line, squeeze=False)
    axes = [grid[k // per_line][k % per_line] for k in range(n)]
    for k in range(n, lines * per_line):
        grid[k // per_line][k % per_line].set_visible(False)
    fontsize = 9 if n_cols <= 6 else (7 if n_cols <= 10 else 5)
    im = None
    for k, (ax, (name, M)) in enumerate(zip(axes, panels)):
        im = draw_heatmap(ax, M, row_labels_per_panel[k], col_labels_per_panel[k], name, REPORT_STYLE, fontsize)
        note = short_notes[k] if short_notes else None
        if note and M.shape[0] < n_rows:  # same cell height as the other panels, the note below
            ax.set_ylim(n_rows - 0.5, -0.5)
            ax.text(
                (M.shape[1] - 1) / 2,
                (M.shape[0] + n_rows - 1) / 2,
                note,
                ha="center",
                va="center",
                fontsize=9,
                color="#555555",
            )
        ax.set_xlabel(xlabel, fontsize=9)
        if k % per_line == 0:
            ax.set_ylabel(ylabel, fontsize=9)
        for i, j in highlight[k] if highlight else ():
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#e4572e", linewidth=1.8))
    cbar = fig.colorbar(im, ax=[a for row in grid for a in row], shrink=0.9 if lines == 1 else 0.6, fraction=0.05)
    cbar.set_label("accuracy" if "ccuracy" in title else "overlap", fontsize=9)
    fig.suptitle(fit_title(title, fig.get_figwidth(), 11), fontsize=11)
    return fig


def _fig_accuracy_matrices(columns: list[str], n_rows: int, mms: list[MethodMatrix]):
    panels, highlight, row_labels = [], [], []
    stage_labels = ["0 (base)"] + [str(i) for i in range(1, n_rows)]
    for mm in mms:
        seeds = f"mean of {len(mm.seeds)} seeds" if len(mm.seeds) > 1 else f"seed {mm.seeds[0]}"
        if mm.reference:
            # One multi-task stage: row 1 is after training on all tasks together, every one outlined.
            panels.append((f"{display_name(mm.method)} (reference, {seeds})", mm.mean))
            highlight.append([(1, columns.index(task)) for task in mm.tasks if task in columns])
            row_labels.append(["0 (base)"] + ["all tasks"] * (mm.mean.shape[0] - 1))
            continue
        panels.append((f"{display_name(mm.method)} ({seeds}, order {mm.order})", mm.mean))
        # Outline the cell of the task trained at each stage (R[t, t]).
        highlight.append([(t + 1, columns.index(task)) for t, task in enumerate(mm.tasks) if task in columns])
        row_labels.append(stage_labels)
    return _heatmap_panels(
        panels,
        row_labels,
        [columns] * len(panels),
        "Accuracy matrix R[stage, task] (outlined: task trained at that stage)",
        "task (evaluated)",
        "stage (after training task #)",
        highlight,
        short_notes=["reference: one stage,\nall tasks trained together" if mm.reference else None for mm in mms],
    )


def _curve_panel(ax, task: str, j: int, stages: np.ndarray, mms: list[MethodMatrix], colors) -> None:
    """One task's accuracy over stages, one line (± std band) per method."""
    trained_at = {mm.tasks.index(task) + 1 for mm in mms if task in mm.tasks}
    for t in sorted(trained_at):
        ax.axvline(t, color="#999999", linestyle=":", linewidth=1)
    for mm in mms:
        y, s, c = mm.mean[:, j], mm.std[:, j], mm.count[:, j]
        ok = np.isfinite(y)
        if not ok.any():
            continue
        ax.plot(stages[ok], y[ok], marker="o", markersize=4, color=colors[mm.method], label=display_name(mm.method))
        band = ok & np.isfinite(s) & (c > 1)
        if band.any():
            ax.fill_between(
                stages[band], (y - s)[band], (y + s)[band], color=colors[mm.method], alpha=0.18, linewidth=0
            )
    ax.set_title(
        task + (f"  (trained at stage {', '.join(map(str, sorted(trained_at)))})" if trained_at else ""), fontsize=9
    )
    ax.set_ylim(-0.03, 1.03)
    ax.set_xticks(stages)
    ax.set_xlabel("stage", fontsize=8)
    ax.set_ylabel("accuracy", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)


def _fig_curves(columns: list[str], n_rows: int, mms: list[MethodMatrix], colors):
    mms = [mm for mm in mms if not mm.reference]  # one multi-task stage: no curve over stages
    n = len(columns)
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig = new_figure(3.2 * ncols + 0.6, 2.6 * nrows + 0.8)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    stages = np.arange(n_rows)
    for idx, task in enumerate(columns):
        _curve_panel(axes[idx // ncols][idx % ncols], task, columns.index(task), stages, mms, colors)
    for idx in range(n, nrows * ncols):
        axes[idx // ncols][idx % ncols].set_visible(False)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", fontsize=8, ncols=min(len(labels), 6))
    fig.suptitle(
        "Per-task accuracy over stages (mean over seeds, shaded ± std; dotted: stage the task was trained)", fontsize=10
    )
    return fig


def _legend_label(row: dict) -> str:
    return display_name(row["method"]) + (" (reference)" if row.get("reference") else "")


# More methods than this: the metric bars get vertical value labels and the legend moves outside.
_MANY_METHODS = 4


def _fig_metrics(rows: list[dict], colors):
    many = len(rows) > _MANY_METHODS
    fig = new_figure(min(13.0 if many else 11.0, max(6.0, 0.9 * len(METRICS) * max(1, len(rows)) + 2)), 3.8)
    ax = fig.subplots()
    width = 0.8 / max(1, len(rows))
    x = np.arange(len(METRICS))
    for k, r in enumerate(rows):
        means = np.array([r[m]["mean"] for m in METRICS], dtype=float)
        stds = np.array([r[m]["std"] for m in METRICS], dtype=float)
        pos = x - 0.4 + width * (k + 0.5)
        ok = np.isfinite(means)
        ax.bar(
            pos[ok],
            means[ok],
            width * 0.92,
            color=colors[r["method"]],
            label=_legend_label(r),
            yerr=np.nan_to_num(stds[ok], nan=0.0),
            capsize=3 if not many else 2,
            error_kw={"linewidth": 1},
            **({"hatch": "..", "edgecolor": "white", "linewidth": 0} if r.get("reference") else {}),
        )
        for p, v, sd in zip(pos[ok], means[ok], np.nan_to_num(stds[ok], nan=0.0)):
            tip = v + sd if v >= 0 else v - sd
            if many:  # vertical labels never run into their neighbours
                ax.annotate(
                    f"{v:.2f}",
                    (p, tip),
                    textcoords="offset points",
                    xytext=(0, 2 if v >= 0 else -2),
                    ha="center",
                    va="bottom" if v >= 0 else "top",
                    rotation=90,
                    fontsize=7,
                )
            else:
                ax.annotate(
                    f"{v:.2f}",
                    (p, tip),
                    textcoords="offset points",
                    xytext=(0, 3 if v >= 0 else -10),
                    ha="center",
                    fontsize=7,
                )
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, [f"{m}\n({'higher' if HIGHER_IS_BETTER[m] else 'lower'} is better)" for m in METRICS], fontsize=8)
    ax.set_ylabel("fraction", fontsize=9)
    ax.set_title("Continual-learning metrics per method (mean ± std over seeds and orders)", fontsize=10)
    if many:
        ax.margins(y=0.18)  # room for the vertical labels
        fig.legend(fontsize=8, loc="outside right upper")
    else:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _fig_params(rows: list[dict], colors):
    fig = new_figure(max(4.5, 1.3 * len(rows) + 2.5), 3.2)
    ax = fig.subplots()
    x = np.arange(len(rows))
    for off, key, label, hatch in (
        (-0.2, "trainable_params_effective", "effective (mask non-zeros)", None),
        (0.2, "trainable_params_lora_equivalent", "LoRA-equivalent", "//"),
    ):
        vals = np.array([r[key] for r in rows], dtype=float)
        ok = np.isfinite(vals) & (vals > 0)
        ax.bar(
            x[ok] + off,
            vals[ok],
            0.38,
            color=[colors[r["method"]] for r, o in zip(rows, ok) if o],
            hatch=hatch,
            edgecolor="black",
            linewidth=0.5,
            alpha=1.0 if hatch is None else 0.45,
            label=label,
        )
        for p, v in zip(x[ok] + off, vals[ok]):
            ax.annotate(fmt_count(v), (p, v), textcoords="offset points", xytext=(0, 2), ha="center", fontsize=7)
    ax.set_yscale("log")
    positive = [r[k] for r in rows for k in PARAM_KEYS if finite(r[k]) and r[k] > 0]
    if positive:
        ax.set_ylim(min(positive) / 5, max(positive) * 3)
    ax.set_xticks(
        x, [display_name(r["method"]) + ("\n(reference)" if r.get("reference") else "") for r in rows], fontsize=9
    )
    ax.set_ylabel("parameters (log)", fontsize=9)
    ax.set_title("Trainable parameters: effective vs LoRA-equivalent", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3, which="both")
    return fig


def _fig_diagnostic(diag, title: str):
    panels = [(f"{display_name(m)} ({'mean of %d seeds' % n if n > 1 else '1 seed'})", M) for m, _, M, n in diag]
    cols = [tasks for _, tasks, _, _ in diag]
    return _heatmap_panels(panels, cols, cols, title, "task j", "task i", None)


def method_colors(methods: list[str]) -> dict[str, Any]:
    """A distinct colour per method: tab10's for the first 10, then tab20's lighter companions, then evenly spaced
    turbo hues (the harness has 11 methods: a colour reused modulo 10 made the 11th look like the first)."""
    n = len(methods)
    if n > 20:
        turbo = matplotlib.colormaps["turbo"]
        return {m: turbo(i / (n - 1)) for i, m in enumerate(methods)}
    tab20 = matplotlib.colormaps["tab20"]  # even indices are tab10's colours, odd ones their lighter companions
    return {m: tab20(2 * i if i < 10 else 2 * (i - 10) + 1) for i, m in enumerate(methods)}


def report_figures(methods, rows, columns, n_rows, mms, mask_diag, sub_diag) -> dict[str, bytes]:
    """The report's figures as {file name: PNG bytes}; optional ones only when there is data."""
    colors = method_colors(methods)
    figures: dict[str, bytes] = {}
    figures["accuracy_matrices.png"] = png_bytes(_fig_accuracy_matrices(columns, n_rows, mms))
    figures["forgetting_curves.png"] = png_bytes(_fig_curves(columns, n_rows, mms, colors))
    figures["cl_metrics.png"] = png_bytes(_fig_metrics(rows, colors))
    if any(finite(r[k]) for r in rows for k in PARAM_KEYS):
        figures["trainable_params.png"] = png_bytes(_fig_params(rows, colors))
    if mask_diag:
        figures["mask_overlap.png"] = png_bytes(
            _fig_diagnostic(mask_diag, "LoRI mask overlap |M_i ∧ M_j| / |M_j| (row i, column j)")
        )
    if sub_diag:
        figures["subspace_overlap.png"] = png_bytes(
            _fig_diagnostic(sub_diag, "A-subspace overlap ||A_i A_jᵀ||_F / (||A_i||_F ||A_j||_F)")
        )
    return figures


def general_figure(cs: dict[str, tuple[np.ndarray, np.ndarray]], colors) -> bytes | None:
    """general_ce.png: one line per method over stages (0 = base model), error bars = std over seeds."""
    if not cs:
        return None
    fig = new_figure(6.5, 3.6)
    ax = fig.subplots()
    for method, (mean, std) in cs.items():
        x = np.arange(len(mean))
        ax.errorbar(
            x,
            mean,
            yerr=np.where(np.isfinite(std), std, 0.0),
            marker="o",
            capsize=3,
            label=display_name(method),
            color=colors.get(method),
        )
    ax.set_xlabel("stage (0 = base model)")
    ax.set_ylabel("cross-entropy on the general text (nats/token)")
    ax.set_title("General-ability forgetting: higher = more of the base model's general ability lost", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png_bytes(fig)


def sensitivity_figure(rows: list[VariantRow], metrics: tuple[str, ...] = ("ACC", "BWT")) -> bytes | None:
    """Each metric (rows of panels) against each swept knob (columns), per method, error bars = std over seeds.

    A panel's lines are one per method and combination of the OTHER knobs, so no two variants are averaged."""
    knobs = sorted({k for v in rows for k in v.values})
    if not knobs:
        return None
    fig = new_figure(4.2 * len(knobs), 3.0 * len(metrics))
    axes = fig.subplots(len(metrics), len(knobs), squeeze=False)
    for j, knob in enumerate(knobs):
        xs = sorted({v.values.get(knob, "") for v in rows}, key=num_sort_key)
        lines: dict[tuple[str, str], list[VariantRow]] = {}
        for v in rows:
            others = ", ".join(f"{k}={x}" for k, x in v.values.items() if k != knob)
            lines.setdefault((v.method, others), []).append(v)
        for i, metric in enumerate(metrics):
            ax = axes[i][j]
            for k, ((method, others), vs) in enumerate(lines.items()):
                vs = sorted(vs, key=lambda v: xs.index(v.values.get(knob, "")))
                pos = (
                    np.array([xs.index(v.values.get(knob, "")) for v in vs], dtype=float) + (k - len(lines) / 2) * 0.03
                )
                mean = [v.metrics[metric]["mean"] for v in vs]
                std = [v.metrics[metric]["std"] if finite(v.metrics[metric]["std"]) else 0.0 for v in vs]
                label = display_name(method) + (f" ({others})" if others else "")
                ax.errorbar(pos, mean, yerr=std, marker="o", capsize=3, label=label)
            ax.set_xticks(range(len(xs)), xs)
            ax.set_xlabel(knob)
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    return png_bytes(fig)
