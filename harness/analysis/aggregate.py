"""Aggregation over seeds and task orders: mean matrices, per-method metric rows, verdicts.

Standard deviations are sample standard deviations (ddof=1) and undefined (NaN) for fewer than
two values. Matrices of different runs are aligned by task name, never by position. A reference
method (e.g. multi-task training) gets a row like any method, marked reference, but is never
ranked: the verdicts compare the sequence methods only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from harness.analysis.naming import HIGHER_IS_BETTER, METRICS, display_name, method_sort_key, num_sort_key
from harness.analysis.numbers import finite, fmt_pm
from harness.analysis.runs import SequenceRun

PARAM_KEYS = ("trainable_params_effective", "trainable_params_lora_equivalent")


@dataclass
class MethodMatrix:
    """One method's accuracy matrix, averaged over the seeds of the order shown in the heatmaps."""

    method: str
    order: str
    seeds: list[str]
    tasks: list[str]  # this method's training order (of the chosen order)
    mean: np.ndarray  # aligned to the global columns; a reference keeps its own rows (base, all tasks)
    std: np.ndarray
    count: np.ndarray
    reference: bool = False


def _align(matrices: list[tuple[list[str], np.ndarray]], columns: list[str], n_rows: int) -> np.ndarray:
    """Stack matrices (tasks, M) into (n, n_rows, len(columns)) aligned by task name; NaN padding."""
    out = np.full((len(matrices), n_rows, len(columns)), np.nan)
    for k, (tasks, M) in enumerate(matrices):
        for j, task in enumerate(tasks):
            if task in columns:
                rows = min(n_rows, M.shape[0])
                out[k, :rows, columns.index(task)] = M[:rows, j]
    return out


def _nanmean_std(stack: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, sample std (NaN where fewer than 2 values) and count along axis 0, ignoring NaN."""
    count = np.sum(np.isfinite(stack), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        total = np.nansum(stack, axis=0)
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        dev = np.where(np.isfinite(stack), stack - mean, 0.0)
        var = np.sum(dev**2, axis=0) / np.maximum(count - 1, 1)
        std = np.where(count > 1, np.sqrt(var), np.nan)
    return mean, std, count


def _heatmap_order(runs: list[SequenceRun]) -> str:
    """The task order the heatmaps show: order 0 when it was run, else the first one."""
    orders = sorted({r.order for r in runs}, key=num_sort_key)
    return "0" if "0" in orders else orders[0]


def method_matrices(by_method: dict[str, list[SequenceRun]]) -> tuple[list[str], int, list[MethodMatrix]]:
    """(task columns in first-seen training order, number of stages, one MethodMatrix per method)."""
    columns: list[str] = []
    chosen: dict[str, list[SequenceRun]] = {}
    for method, runs in by_method.items():
        order = _heatmap_order(runs)
        chosen[method] = sorted((r for r in runs if r.order == order), key=lambda r: num_sort_key(r.seed))
        for r in chosen[method]:
            for t in r.tasks:
                if t not in columns:
                    columns.append(t)
    n_rows = max((r.R.shape[0] for rs in chosen.values() for r in rs), default=1)
    out = []
    for method, runs in chosen.items():
        reference = any(r.reference for r in runs)
        rows = max(r.R.shape[0] for r in runs) if reference else n_rows
        stack = _align([(r.tasks, r.R) for r in runs], columns, rows)
        mean, std, count = _nanmean_std(stack)
        out.append(
            MethodMatrix(
                method, runs[0].order, [r.seed for r in runs], list(runs[0].tasks), mean, std, count, reference
            )
        )
    return columns, n_rows, out


def _diagnostic_matrix(run: SequenceRun, key: str) -> tuple[list[str], np.ndarray] | None:
    """(tasks, square matrix) of one diagnostic of one run; None when absent or malformed."""
    d = run.diagnostics.get(key)
    if not isinstance(d, dict) or not d.get("tasks") or d.get("matrix") is None:
        return None
    try:
        M = np.array([[np.nan if v is None else float(v) for v in row] for row in d["matrix"]], dtype=float)
    except (TypeError, ValueError):
        return None
    tasks = [str(t) for t in d["tasks"]]
    if M.shape != (len(tasks), len(tasks)):
        return None
    return tasks, M


def diagnostic_matrices(
    by_method: dict[str, list[SequenceRun]], key: str
) -> list[tuple[str, list[str], np.ndarray, int]]:
    """Per method: (method, tasks, mean matrix over the heatmap order's seeds, n) for one diagnostic."""
    out = []
    for method, runs in by_method.items():
        order = _heatmap_order(runs)
        mats = [_diagnostic_matrix(r, key) for r in runs if r.order == order and r.diagnostics]
        mats = [m for m in mats if m is not None]
        if not mats:
            continue
        tasks = list(mats[0][0])
        for t, _ in mats[1:]:
            tasks += [x for x in t if x not in tasks]
        # Align rows and columns by name.
        stack = np.full((len(mats), len(tasks), len(tasks)), np.nan)
        for k, (t, M) in enumerate(mats):
            idx = [tasks.index(x) for x in t]
            stack[k][np.ix_(idx, idx)] = M
        mean, _, _ = _nanmean_std(stack)
        out.append((method, tasks, mean, len(mats)))
    return out


def mean_std_n(values) -> dict[str, float | int]:
    """{mean, std, n} of the finite values (a pandas Series or a list; NaN dropped)."""
    vals = pd.Series(values, dtype=float).dropna()
    return {
        "mean": float(vals.mean()) if len(vals) else float("nan"),
        # Sample standard deviation (ddof=1) over seeds (and orders); undefined for one run.
        "std": float(vals.std(ddof=1)) if len(vals) > 1 else float("nan"),
        "n": int(len(vals)),
    }


def _method_row(method: str, g) -> dict[str, Any]:
    """One method's summary over its runs (g: its rows of the runs table)."""
    row: dict[str, Any] = {
        "method": method,
        "display_name": display_name(method),
        "n_runs": int(len(g)),
        "seeds": sorted(g["seed"].unique().tolist(), key=num_sort_key),
        "orders": sorted(g["order"].unique().tolist(), key=num_sort_key),
        # A reference row (multi-task training, one stage): only ACC applies, never ranked.
        "reference": bool(g["reference"].any()),
    }
    for m in METRICS:
        row[m] = mean_std_n(g[m])
    row["general_ce_rise"] = mean_std_n(g["general_ce_rise"])  # cross-entropy on the general text: last stage − base
    for p in PARAM_KEYS:
        vals = g[p].dropna()
        row[p] = float(vals.mean()) if len(vals) else float("nan")
    eff, lora = row["trainable_params_effective"], row["trainable_params_lora_equivalent"]
    row["effective_fraction_of_lora"] = eff / lora if finite(eff) and finite(lora) and lora else float("nan")
    return row


def aggregate(runs: list[SequenceRun]):
    """(runs table as a DataFrame, one summary row per method in the method layer's order)."""
    df = pd.DataFrame(
        [
            {
                "run_id": r.run_id,
                "method": r.method,
                "seed": r.seed,
                "order": r.order,
                **{m: r.metrics[m] for m in METRICS},
                "trainable_params_effective": r.params_effective,
                "trainable_params_lora_equivalent": r.params_lora_equivalent,
                "reference": r.reference,
                "general_ce_rise": (r.summary or {}).get("general_ce_rise"),
            }
            for r in runs
        ]
    )
    grouped = df.groupby("method", sort=False)
    rows = [
        _method_row(method, grouped.get_group(method)) for method in sorted(df["method"].unique(), key=method_sort_key)
    ]
    return df, rows


def comparison_rows(rows: list[dict]) -> list[dict]:
    """The method rows flattened to one level (the columns of comparison.csv)."""
    flat = []
    for r in rows:
        d = {
            "method": r["method"],
            "display_name": r["display_name"],
            "n_runs": r["n_runs"],
            "seeds": " ".join(r["seeds"]),
            "orders": " ".join(r["orders"]),
        }
        for m in METRICS:
            d[f"{m}_mean"], d[f"{m}_std"], d[f"{m}_n"] = r[m]["mean"], r[m]["std"], r[m]["n"]
            d[f"{m}_ci_low"], d[f"{m}_ci_high"] = r[m].get("ci_low"), r[m].get("ci_high")
        g = r.get("general_ce_rise") or {}
        d["general_ce_rise_mean"], d["general_ce_rise_std"], d["general_ce_rise_n"] = (
            g.get("mean"),
            g.get("std"),
            g.get("n"),
        )
        for p in (*PARAM_KEYS, "effective_fraction_of_lora"):
            d[p] = r[p]
        d["reference"] = r["reference"]
        flat.append(d)
    return flat


def noise_class(m: str, best: dict, other: dict) -> str:
    """How the best row's lead over another on metric m compares with the noise: "none" (no difference),
    "unknown" (one run each), "within" (the gap is smaller than the larger of the two stds) or "beyond"."""
    diff = abs(best[m]["mean"] - other[m]["mean"])
    stds = [s for s in (best[m]["std"], other[m]["std"]) if finite(s)]
    if diff < 1e-9:
        return "none"
    if not stds:
        return "unknown"
    return "within" if diff < max(stds) else "beyond"


def _compare(m: str, best: dict, other: dict) -> str:
    """One pairwise verdict: the best method against another, on metric m."""
    diff = abs(best[m]["mean"] - other[m]["mean"])
    std = max([s for s in (best[m]["std"], other[m]["std"]) if finite(s)], default=float("nan"))
    a, b = display_name(best["method"]), display_name(other["method"])
    vs = f"{a} {fmt_pm(best[m]['mean'], best[m]['std'])} vs {b} {fmt_pm(other[m]['mean'], other[m]['std'])}"
    d = f"{diff:.3f}" if diff >= 0.001 else f"{diff:.1e}"
    return {
        "none": f"{vs}: no difference",
        "unknown": f"{vs}: {a} is better by {d} (one run each, no noise estimate)",
        "within": f"{vs}: the difference {d} is within noise (std up to {std:.3f})",
        "beyond": f"{vs}: {a} is better by {d}, more than the std ({std:.3f})",
    }[noise_class(m, best, other)]


# Why a metric can be undefined for every run: the task count, or the cells an eval_schedule leaves out.
UNDEFINED_BECAUSE = {
    "ACC": "no sequence has its final row",
    "BWT": "it needs at least two tasks",
    "FWT": "it needs the base row and each task scored one stage before its own, which eval_schedule diagonal_final and "
    "every:K (and eval_scope seen) leave out; a single task has none",
    "forgetting": "it needs each task's score after every earlier stage, which eval_schedule diagonal_final and every:K leave "
    "out; a single task has none",
    "LA": "no task was scored right after its own stage",
}


def verdicts(rows: list[dict]) -> dict[str, str]:
    """Per metric, one sentence: which method wins, and whether by more than the noise.

    Reference rows are left out: they are not sequences and never ranked (see page: reference note).
    """
    out = {}
    for m in METRICS:
        direction = "higher" if HIGHER_IS_BETTER[m] else "lower"
        cands = [r for r in rows if finite(r[m]["mean"]) and not r.get("reference")]
        if len(cands) < 2:
            if cands:
                out[m] = (
                    f"{m} ({direction} is better): defined for {display_name(cands[0]['method'])} only; nothing to compare."
                )
            elif all(r.get("reference") for r in rows):
                out[m] = f"{m} ({direction} is better): only reference rows finished; they are not ranked."
            else:
                out[m] = f"{m} ({direction} is better): not defined for any method: {UNDEFINED_BECAUSE[m]}."
            continue
        out[m] = f"{m} ({direction} is better): " + ranked_comparisons(m, cands, HIGHER_IS_BETTER[m]) + "."
    return out


def ranked_comparisons(key: str, cands: list[dict], higher_is_better: bool) -> str:
    """The best of cands (by row[key]["mean"]) against each other one, "; "-joined, by the within-noise rule of _compare.

    cands: at least two rows with "method" and key -> {mean, std}; the std-rule verdicts (kept beside the paired
    bootstrap's) and the grid's per-variant lines use it, so both call a difference within noise the same way.
    """
    ranked = rank(key, cands, higher_is_better)
    return "; ".join(_compare(key, ranked[0], other) for other in ranked[1:])


def rank(key: str, cands: list[dict], higher_is_better: bool) -> list[dict]:
    """cands best first by row[key]["mean"]."""
    return sorted(cands, key=lambda r: r[key]["mean"], reverse=higher_is_better)
