"""Forgetting report: read the sequences an experiment logged to MLflow, write a static HTML report.

`write_report(experiment, results_dir, tracking_uri)` writes `<results_dir>/<experiment>/report/`:
index.html (opens from disk, no network: figures are relative PNG files in the same folder, CSS is
inline), the figures as PNG, comparison.csv / comparison.json (ACC, BWT, FWT, forgetting per method,
mean and std over seeds and orders) and mean_matrices.json (the order-0 accuracy matrices averaged
over seeds). The figures are also logged to every finished parent run under "report/".

It reads exactly what the scheduler logs (see the MLflow contract): parent runs tagged
harness.kind=sequence, their final ACC/BWT/FWT/forgetting metrics and trainable-parameter counts,
and the artifacts matrix.json, summary.json and diagnostics.json. When matrix.json cannot be
downloaded the matrix is rebuilt from the `acc/<task>` metric histories (step = stage).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import html
import io
import json
import math
import os
import re
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harness.io import atomic_write_bytes, atomic_write_text
from harness.metrics import summarize
from harness.tracking import default_tracking_uri
from harness.errors import HarnessError, TrackingError
from harness.metrics import LIBRARY_NOTE, METRIC_DEFINITIONS
from harness.tracking import local_store_path, check_store_exists, redact_uri

METRICS = ("ACC", "BWT", "FWT", "forgetting")
# Higher is better for ACC/BWT/FWT, lower is better for forgetting.
HIGHER_IS_BETTER = {"ACC": True, "BWT": True, "FWT": True, "forgetting": False}
METHOD_ORDER = ("lori-s", "lori-d", "lora")
DISPLAY_NAMES = {"lori-s": "LoRI-S", "lori-d": "LoRI-D", "lora": "LoRA"}
SEQUENCE_FILTER = "tags.`harness.kind` = 'sequence'"
_CONSISTENCY_TOL = 1e-6



# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def display_name(method: str) -> str:
    return DISPLAY_NAMES.get(method, method)


def _method_sort_key(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def _num_sort_key(value: str) -> tuple[int, Any]:
    try:
        return (0, int(value))
    except (TypeError, ValueError):
        return (1, str(value))


def _safe_dirname(name: str) -> str:
    """An experiment name as one safe path component (MLflow allows '/' and spaces in names)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return cleaned or "experiment"


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float, np.floating, np.integer)) and math.isfinite(float(x))


def _json_clean(obj: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python, recursively (json.dumps(allow_nan=False) safe)."""
    if isinstance(obj, dict):
        return {str(k): _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _json_clean(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    return obj


def _fmt(x: Any, digits: int = 3) -> str:
    return f"{float(x):.{digits}f}" if _finite(x) else "—"


def _fmt_pm(mean: Any, std: Any, digits: int = 3) -> str:
    if not _finite(mean):
        return "—"
    if _finite(std):
        return f"{float(mean):.{digits}f} ± {float(std):.{digits}f}"
    return f"{float(mean):.{digits}f}"


def _fmt_count(x: Any) -> str:
    if not _finite(x):
        return "—"
    x = float(x)
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.0f}"


# --------------------------------------------------------------------------------------------
# Continual-learning metrics (used to cross-check what the scheduler logged)
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Reading the store
# --------------------------------------------------------------------------------------------


@dataclass
class SequenceRun:
    run_id: str
    run_name: str
    status: str
    method: str
    seed: str
    order: str
    tasks: list[str]
    R: np.ndarray  # (T+1, T), NaN where not evaluated
    metrics: dict[str, float]  # logged ACC/BWT/FWT/forgetting, NaN when not logged
    params_effective: float
    params_lora_equivalent: float
    diagnostics: dict | None
    summary: dict | None
    tags: dict[str, str]
    params: dict[str, str]
    start_time_ms: int | None
    matrix_source: str
    notes: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _quiet_mlflow():
    """No tqdm progress bars from artifact downloads/uploads (write_report prints nothing)."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _client(uri: str):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _search_all_runs(client, experiment_id: str, filter_string: str, max_total: int | None = None) -> list:
    from mlflow.entities import ViewType

    runs: list = []
    token = None
    while True:
        page = client.search_runs(
            experiment_ids=[experiment_id],
            filter_string=filter_string,
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=min(1000, max_total or 1000),
            order_by=["attributes.start_time ASC"],
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token or (max_total and len(runs) >= max_total):
            return runs


def _harness_experiments(client) -> list:
    from mlflow.entities import ViewType

    found = []
    for exp in client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=1000):
        if _search_all_runs(client, exp.experiment_id, SEQUENCE_FILTER, max_total=1):
            found.append(exp)
    return found


def _pick_experiment(client, experiment: str | None, uri: str):
    harness_exps = _harness_experiments(client)
    names = sorted(e.name for e in harness_exps)
    listing = ", ".join(names) if names else "(none)"
    if experiment is None:
        if len(harness_exps) == 1:
            return harness_exps[0]
        if not harness_exps:
            raise HarnessError(f"no harness sequence runs in {redact_uri(uri)}: run `make run-sequence` first")
        raise HarnessError(
            f"{len(harness_exps)} harness experiments in {redact_uri(uri)}: {listing}; pick one with --experiment NAME"
        )
    exp = client.get_experiment_by_name(experiment)
    if exp is None or exp.lifecycle_stage != "active":
        raise HarnessError(f"no experiment named {experiment!r} in {redact_uri(uri)}; harness experiments: {listing}")
    return exp


def _download_json(client, run_id: str, name: str, available: set[str], dst: Path) -> tuple[Any, str | None]:
    """(parsed JSON or None, a note when it was expected but unreadable)."""
    if name not in available:
        return None, None
    try:
        local = client.download_artifacts(run_id, name, str(dst))
        with open(local, encoding="utf-8") as fh:
            return json.load(fh), None
    except Exception as exc:  # noqa: BLE001 - any download/parse failure falls back, with a note
        return None, f"{name} could not be read ({type(exc).__name__}: {exc})"


def _matrix_from_metrics(client, run, tasks: list[str]) -> np.ndarray:
    T = len(tasks)
    R = np.full((T + 1, T), np.nan)
    for j, task in enumerate(tasks):
        for m in client.get_metric_history(run.info.run_id, f"acc/{task}"):
            if 0 <= m.step <= T:
                R[m.step, j] = m.value
    return R


def _matrix_from_json(matrix: dict) -> tuple[list[str], np.ndarray]:
    tasks = [str(t) for t in matrix["tasks"]]
    rows = matrix["R"]
    T = len(tasks)
    stages = matrix.get("stages") or list(range(len(rows)))
    R = np.full((max(T + 1, len(rows)), T), np.nan)
    for stage, row in zip(stages, rows):
        for j, v in enumerate(row[:T]):
            if v is not None:
                R[int(stage), j] = float(v)
    return tasks, R[: T + 1]


def _load_run(client, run, tmp: Path) -> SequenceRun:
    info, data = run.info, run.data
    tags, params, metrics = dict(data.tags), dict(data.params), dict(data.metrics)
    run_id = info.run_id
    notes: list[str] = []
    try:
        available = {a.path for a in client.list_artifacts(run_id)}
    except Exception as exc:  # noqa: BLE001
        available = set()
        notes.append(f"artifacts could not be listed ({type(exc).__name__}: {exc})")
    dst = tmp / run_id
    dst.mkdir(parents=True, exist_ok=True)
    matrix, note = _download_json(client, run_id, "matrix.json", available, dst)
    if note:
        notes.append(note)
    summary, note = _download_json(client, run_id, "summary.json", available, dst)
    if note:
        notes.append(note)
    diagnostics, note = _download_json(client, run_id, "diagnostics.json", available, dst)
    if note:
        notes.append(note)

    tasks: list[str] | None = None
    R = None
    source = "matrix.json"
    if isinstance(matrix, dict) and "tasks" in matrix and "R" in matrix:
        try:
            tasks, R = _matrix_from_json(matrix)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            notes.append(f"matrix.json is malformed ({exc}); rebuilt from acc/<task> metrics")
    if R is None:
        order_str = params.get("task_order") or ",".join((summary or {}).get("tasks") or [])
        tasks = [t for t in order_str.split(",") if t]
        if not tasks:
            tasks = sorted(k[len("acc/"):] for k in metrics if k.startswith("acc/"))
        R = _matrix_from_metrics(client, run, tasks)
        source = "acc/<task> metrics"
        if "matrix.json" not in available:
            notes.append("no matrix.json artifact; matrix rebuilt from acc/<task> metrics")

    summary = summary if isinstance(summary, dict) else None
    method = tags.get("harness.method") or params.get("method") or (summary or {}).get("method") or "unknown"
    seed = tags.get("harness.seed") or params.get("seed") or str((summary or {}).get("seed", "?"))
    order = tags.get("harness.order") or params.get("order_index") or str((summary or {}).get("order_index", "?"))

    def metric(name: str, summary_key: str) -> float:
        if name in metrics:
            return float(metrics[name])
        v = (summary or {}).get(summary_key)
        return float(v) if _finite(v) else float("nan")

    logged = {
        "ACC": metric("ACC", "acc"),
        "BWT": metric("BWT", "bwt"),
        "FWT": metric("FWT", "fwt"),
        "forgetting": metric("forgetting", "forgetting"),
    }
    # The scheduler's own definitions (harness.metrics); a malformed matrix defines nothing.
    try:
        recomputed = summarize(np.asarray(R, dtype=float))
    except ValueError:
        recomputed = {m: None for m in METRICS}
    for m in METRICS:
        lv, rv = logged[m], recomputed[m]
        if _finite(lv) and rv is not None and abs(lv - rv) > _CONSISTENCY_TOL:
            notes.append(f"logged {m} = {lv:.6f} but the matrix gives {rv:.6f}")
        elif _finite(lv) != (rv is not None):
            notes.append(
                f"{m} is {'logged' if _finite(lv) else 'not logged'} but the matrix "
                f"{'defines' if rv is not None else 'does not define'} it"
            )

    return SequenceRun(
        run_id=run_id,
        run_name=info.run_name or run_id,
        status=info.status,
        method=str(method),
        seed=str(seed),
        order=str(order),
        tasks=list(tasks or []),
        R=R,
        metrics=logged,
        params_effective=metric("trainable_params_effective", "trainable_params_effective"),
        params_lora_equivalent=metric("trainable_params_lora_equivalent", "trainable_params_lora_equivalent"),
        diagnostics=diagnostics if isinstance(diagnostics, dict) else None,
        summary=summary,
        tags=tags,
        params=params,
        start_time_ms=info.start_time,
        matrix_source=source,
        notes=notes,
    )


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------


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


@dataclass
class MethodMatrix:
    method: str
    order: str
    seeds: list[str]
    tasks: list[str]  # this method's training order (of the chosen order)
    mean: np.ndarray  # aligned to the global columns
    std: np.ndarray
    count: np.ndarray


def _heatmap_order(runs: list[SequenceRun]) -> str:
    orders = sorted({r.order for r in runs}, key=_num_sort_key)
    return "0" if "0" in orders else orders[0]


def _method_matrices(by_method: dict[str, list[SequenceRun]]) -> tuple[list[str], int, list[MethodMatrix]]:
    columns: list[str] = []
    chosen: dict[str, list[SequenceRun]] = {}
    for method, runs in by_method.items():
        order = _heatmap_order(runs)
        chosen[method] = sorted((r for r in runs if r.order == order), key=lambda r: _num_sort_key(r.seed))
        for r in chosen[method]:
            for t in r.tasks:
                if t not in columns:
                    columns.append(t)
    n_rows = max((r.R.shape[0] for rs in chosen.values() for r in rs), default=1)
    out = []
    for method, runs in chosen.items():
        stack = _align([(r.tasks, r.R) for r in runs], columns, n_rows)
        mean, std, count = _nanmean_std(stack)
        out.append(
            MethodMatrix(method, runs[0].order, [r.seed for r in runs], list(runs[0].tasks), mean, std, count)
        )
    return columns, n_rows, out


def _diagnostic_matrices(by_method: dict[str, list[SequenceRun]], key: str) -> list[tuple[str, list[str], np.ndarray, int]]:
    """Per method: (method, tasks, mean matrix over the heatmap order's seeds, n) for one diagnostic."""
    out = []
    for method, runs in by_method.items():
        order = _heatmap_order(runs)
        mats = []
        for r in runs:
            if r.order != order or not r.diagnostics:
                continue
            d = r.diagnostics.get(key)
            if not isinstance(d, dict) or not d.get("tasks") or d.get("matrix") is None:
                continue
            try:
                M = np.array([[np.nan if v is None else float(v) for v in row] for row in d["matrix"]], dtype=float)
            except (TypeError, ValueError):
                continue
            tasks = [str(t) for t in d["tasks"]]
            if M.shape != (len(tasks), len(tasks)):
                continue
            mats.append((tasks, M))
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


def _aggregate(runs: list[SequenceRun]):
    import pandas as pd

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
            }
            for r in runs
        ]
    )
    grouped = df.groupby("method", sort=False)
    rows = []
    for method in sorted(df["method"].unique(), key=_method_sort_key):
        g = grouped.get_group(method)
        row: dict[str, Any] = {
            "method": method,
            "display_name": display_name(method),
            "n_runs": int(len(g)),
            "seeds": sorted(g["seed"].unique().tolist(), key=_num_sort_key),
            "orders": sorted(g["order"].unique().tolist(), key=_num_sort_key),
        }
        for m in METRICS:
            vals = g[m].dropna()
            row[m] = {
                "mean": float(vals.mean()) if len(vals) else float("nan"),
                # Sample standard deviation (ddof=1) over seeds and orders; undefined for one run.
                "std": float(vals.std(ddof=1)) if len(vals) > 1 else float("nan"),
                "n": int(len(vals)),
            }
        for p in ("trainable_params_effective", "trainable_params_lora_equivalent"):
            vals = g[p].dropna()
            row[p] = float(vals.mean()) if len(vals) else float("nan")
        eff, lora = row["trainable_params_effective"], row["trainable_params_lora_equivalent"]
        row["effective_fraction_of_lora"] = eff / lora if _finite(eff) and _finite(lora) and lora else float("nan")
        rows.append(row)
    return df, rows


def _verdicts(rows: list[dict]) -> dict[str, str]:
    out = {}
    for m in METRICS:
        direction = "higher" if HIGHER_IS_BETTER[m] else "lower"
        cands = [r for r in rows if _finite(r[m]["mean"])]
        if len(cands) < 2:
            if cands:
                out[m] = f"{m} ({direction} is better): defined for {display_name(cands[0]['method'])} only; nothing to compare."
            else:
                out[m] = f"{m} ({direction} is better): not defined for any method (e.g. a single task, T = 1)."
            continue
        cands.sort(key=lambda r: r[m]["mean"], reverse=HIGHER_IS_BETTER[m])
        best = cands[0]
        parts = []
        for other in cands[1:]:
            diff = abs(best[m]["mean"] - other[m]["mean"])
            stds = [s for s in (best[m]["std"], other[m]["std"]) if _finite(s)]
            a, b = display_name(best["method"]), display_name(other["method"])
            vs = f"{a} {_fmt_pm(best[m]['mean'], best[m]['std'])} vs {b} {_fmt_pm(other[m]['mean'], other[m]['std'])}"
            d = f"{diff:.3f}" if diff >= 0.001 else f"{diff:.1e}"
            if diff < 1e-9:
                parts.append(f"{vs}: no difference")
            elif not stds:
                parts.append(f"{vs}: {a} is better by {d} (one run each, no noise estimate)")
            elif diff < max(stds):
                parts.append(f"{vs}: the difference {d} is within noise (std up to {max(stds):.3f})")
            else:
                parts.append(f"{vs}: {a} is better by {d}, more than the std ({max(stds):.3f})")
        out[m] = f"{m} ({direction} is better): " + "; ".join(parts) + "."
    return out


# --------------------------------------------------------------------------------------------
# Figures (object-oriented Matplotlib on the Agg canvas: no pyplot, no global backend switch)
# --------------------------------------------------------------------------------------------


def _new_figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _method_colors(methods: list[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def _annotated_heatmaps(panels, row_labels_per_panel, col_labels_per_panel, title, xlabel, ylabel, highlight=None):
    """Side-by-side heatmaps with one shared 0..1 colour scale and the value in every cell."""
    import matplotlib

    n = len(panels)
    n_rows = max(p[1].shape[0] for p in panels)
    n_cols = max(p[1].shape[1] for p in panels)
    cell = 0.62 if n_cols <= 8 else 0.45
    fig = _new_figure(max(4.0, n * (n_cols * cell + 1.4) + 1.2), max(2.6, n_rows * cell * 0.9 + 1.9))
    axes = fig.subplots(1, n, squeeze=False)[0]
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9")
    fontsize = 9 if n_cols <= 6 else (7 if n_cols <= 10 else 5)
    im = None
    for k, (ax, (name, M)) in enumerate(zip(axes, panels)):
        im = ax.imshow(np.ma.masked_invalid(M), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
        cols = col_labels_per_panel[k]
        ax.set_xticks(range(M.shape[1]), cols, rotation=35 if max(map(len, cols), default=0) > 6 else 0, ha="right" if max(map(len, cols), default=0) > 6 else "center", fontsize=8)
        ax.set_yticks(range(M.shape[0]), row_labels_per_panel[k][: M.shape[0]], fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=9)
        if k == 0:
            ax.set_ylabel(ylabel, fontsize=9)
        for i in range(M.shape[0]):
            for j in range(M.shape[1]):
                v = M[i, j]
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=fontsize,
                            color="white" if v < 0.55 else "black")
                else:
                    ax.text(j, i, "n/a", ha="center", va="center", fontsize=fontsize - 1, color="#555555")
        if highlight:
            from matplotlib.patches import Rectangle

            for (i, j) in highlight[k]:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#e4572e", linewidth=1.8))
    cbar = fig.colorbar(im, ax=list(axes), shrink=0.9, fraction=0.05)
    cbar.set_label("accuracy" if "ccuracy" in title else "overlap", fontsize=9)
    fig.suptitle(title, fontsize=11)
    return fig


def _fig_accuracy_matrices(columns, n_rows, mms: list[MethodMatrix]):
    panels, highlight = [], []
    for mm in mms:
        seeds = f"mean of {len(mm.seeds)} seeds" if len(mm.seeds) > 1 else f"seed {mm.seeds[0]}"
        panels.append((f"{display_name(mm.method)} ({seeds}, order {mm.order})", mm.mean))
        # Outline the cell of the task trained at each stage (R[t, t]).
        highlight.append([(t + 1, columns.index(task)) for t, task in enumerate(mm.tasks) if task in columns])
    stage_labels = ["0 (base)"] + [str(i) for i in range(1, n_rows)]
    return _annotated_heatmaps(
        panels, [stage_labels] * len(panels), [columns] * len(panels),
        "Accuracy matrix R[stage, task] (outlined: task trained at that stage)",
        "task (evaluated)", "stage (after training task #)", highlight,
    )


def _fig_curves(columns, n_rows, mms: list[MethodMatrix], colors):
    n = len(columns)
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig = _new_figure(3.2 * ncols + 0.6, 2.6 * nrows + 0.8)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    stages = np.arange(n_rows)
    for idx, task in enumerate(columns):
        ax = axes[idx // ncols][idx % ncols]
        j = columns.index(task)
        trained_at = {mm.tasks.index(task) + 1 for mm in mms if task in mm.tasks}
        for t in sorted(trained_at):
            ax.axvline(t, color="#999999", linestyle=":", linewidth=1)
        for mm in mms:
            y, s, c = mm.mean[:, j], mm.std[:, j], mm.count[:, j]
            ok = np.isfinite(y)
            if not ok.any():
                continue
            label = display_name(mm.method)
            ax.plot(stages[ok], y[ok], marker="o", markersize=4, color=colors[mm.method], label=label)
            band = ok & np.isfinite(s) & (c > 1)
            if band.any():
                ax.fill_between(stages[band], (y - s)[band], (y + s)[band], color=colors[mm.method], alpha=0.18, linewidth=0)
        ax.set_title(task + (f"  (trained at stage {', '.join(map(str, sorted(trained_at)))})" if trained_at else ""), fontsize=9)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xticks(stages)
        ax.set_xlabel("stage", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for idx in range(n, nrows * ncols):
        axes[idx // ncols][idx % ncols].set_visible(False)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", fontsize=8, ncols=min(len(labels), 6))
    fig.suptitle("Per-task accuracy over stages (mean over seeds, shaded ± std; dotted: stage the task was trained)", fontsize=10)
    return fig


def _fig_metrics(rows, colors):
    fig = _new_figure(min(11.0, max(6.0, 0.9 * len(METRICS) * max(1, len(rows)) + 2)), 3.8)
    ax = fig.subplots()
    width = 0.8 / max(1, len(rows))
    x = np.arange(len(METRICS))
    for k, r in enumerate(rows):
        means = np.array([r[m]["mean"] for m in METRICS], dtype=float)
        stds = np.array([r[m]["std"] for m in METRICS], dtype=float)
        pos = x - 0.4 + width * (k + 0.5)
        ok = np.isfinite(means)
        ax.bar(pos[ok], means[ok], width * 0.92, color=colors[r["method"]], label=display_name(r["method"]),
               yerr=np.nan_to_num(stds[ok], nan=0.0), capsize=3, error_kw={"linewidth": 1})
        for p, v, sd in zip(pos[ok], means[ok], np.nan_to_num(stds[ok], nan=0.0)):
            tip = v + sd if v >= 0 else v - sd
            ax.annotate(f"{v:.2f}", (p, tip), textcoords="offset points", xytext=(0, 3 if v >= 0 else -10),
                        ha="center", fontsize=7)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, [f"{m}\n({'higher' if HIGHER_IS_BETTER[m] else 'lower'} is better)" for m in METRICS], fontsize=8)
    ax.set_ylabel("fraction", fontsize=9)
    ax.set_title("Continual-learning metrics per method (mean ± std over seeds and orders)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _fig_params(rows, colors):
    fig = _new_figure(max(4.5, 1.3 * len(rows) + 2.5), 3.2)
    ax = fig.subplots()
    x = np.arange(len(rows))
    for off, key, label, hatch in ((-0.2, "trainable_params_effective", "effective (mask non-zeros)", None),
                                   (0.2, "trainable_params_lora_equivalent", "LoRA-equivalent", "//")):
        vals = np.array([r[key] for r in rows], dtype=float)
        ok = np.isfinite(vals) & (vals > 0)
        ax.bar(x[ok] + off, vals[ok], 0.38, color=[colors[r["method"]] for r, o in zip(rows, ok) if o],
               hatch=hatch, edgecolor="black", linewidth=0.5, alpha=1.0 if hatch is None else 0.45, label=label)
        for p, v in zip(x[ok] + off, vals[ok]):
            ax.annotate(_fmt_count(v), (p, v), textcoords="offset points", xytext=(0, 2), ha="center", fontsize=7)
    ax.set_yscale("log")
    positive = [r[k] for r in rows for k in ("trainable_params_effective", "trainable_params_lora_equivalent")
                if _finite(r[k]) and r[k] > 0]
    if positive:
        ax.set_ylim(min(positive) / 5, max(positive) * 3)
    ax.set_xticks(x, [display_name(r["method"]) for r in rows], fontsize=9)
    ax.set_ylabel("parameters (log)", fontsize=9)
    ax.set_title("Trainable parameters: effective vs LoRA-equivalent", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3, which="both")
    return fig


def _fig_diagnostic(diag, title):
    panels = [(f"{display_name(m)} ({'mean of %d seeds' % n if n > 1 else '1 seed'})", M) for m, _, M, n in diag]
    cols = [tasks for _, tasks, _, _ in diag]
    n_max = max(len(c) for c in cols)
    return _annotated_heatmaps(panels, cols, cols, title, "task j", "task i", None) if n_max else None


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------

_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;margin:1.5em auto;max-width:1200px;
color:#222;padding:0 1em;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}img{max-width:100%;height:auto;border:1px solid #eee;margin:.4em 0}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.85em}.note{color:#8a4b00;background:#fff6e5;padding:.4em .7em;
border-left:3px solid #f0a020}.muted{color:#666;font-size:.9em}code{background:#f3f3f3;padding:0 .2em}
"""


def _table(headers: list[str] | None, rows: list[list[str]], left_cols: int = 1) -> str:
    e = html.escape
    head = "".join(f'<th class="l">{e(h)}</th>' if i < left_cols else f"<th>{e(h)}</th>" for i, h in enumerate(headers or []))
    thead = f"<thead><tr>{head}</tr></thead>" if headers else ""
    body = "".join(
        "<tr>" + "".join(f'<td class="l">{e(str(c))}</td>' if i < left_cols else f"<td>{e(str(c))}</td>" for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table>{thead}<tbody>{body}</tbody></table>"


def _img(name: str, alt: str) -> str:
    return f'<p><img src="{html.escape(name)}" alt="{html.escape(alt)}"></p>'


def _uniq(values) -> list[str]:
    return sorted({str(v) for v in values if v not in (None, "")}, key=_num_sort_key)


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------


def write_report(
    experiment: str | None,
    results_dir: Path,
    tracking_uri: str | None = None,
    *,
    log_to_mlflow: bool = True,
) -> Path:
    """Write the forgetting report of one experiment; return the path of its index.html.

    experiment=None picks the only harness experiment in the store (HarnessError when there are
    none or several). The figures are also logged to every finished parent run under "report/"
    (log_to_mlflow=False skips that). Prints nothing.
    """
    with _quiet_mlflow():
        return _write_report(experiment, results_dir, tracking_uri, log_to_mlflow)


def _write_report(experiment: str | None, results_dir: Path, tracking_uri: str | None, log_to_mlflow: bool) -> Path:
    results_dir = Path(results_dir).resolve()
    uri = default_tracking_uri(results_dir, tracking_uri)
    check_store_exists(results_dir, uri)
    from mlflow.exceptions import MlflowException

    try:
        client = _client(uri)
        exp = _pick_experiment(client, experiment, uri)
        all_runs = _search_all_runs(client, exp.experiment_id, SEQUENCE_FILTER)
    except HarnessError:
        raise
    except (MlflowException, OSError) as exc:
        raise TrackingError(f"cannot read the tracking store {redact_uri(uri)}: {exc}") from exc

    finished = [r for r in all_runs if r.info.status == "FINISHED"]
    skipped = [(r.info.run_id, r.info.run_name, r.info.status) for r in all_runs if r.info.status != "FINISHED"]
    if not finished:
        raise HarnessError(
            f"experiment {exp.name!r} has no FINISHED sequence runs ({len(skipped)} running/failed skipped): "
            "wait for `make run-sequence` to finish"
        )
    try:
        with tempfile.TemporaryDirectory(prefix="harness-report-") as tmp:
            runs = [_load_run(client, r, Path(tmp)) for r in finished]
    except (MlflowException, OSError) as exc:
        raise TrackingError(f"cannot read runs of {exp.name!r} from {redact_uri(uri)}: {exc}") from exc

    report_dir = results_dir / _safe_dirname(exp.name) / "report"
    report_dir.mkdir(parents=True, exist_ok=True)

    methods = sorted({r.method for r in runs}, key=_method_sort_key)
    by_method = {m: [r for r in runs if r.method == m] for m in methods}
    colors = _method_colors(methods)
    df, rows = _aggregate(runs)
    verdicts = _verdicts(rows)
    columns, n_rows, mms = _method_matrices(by_method)
    mask_diag = _diagnostic_matrices(by_method, "mask_overlap")
    sub_diag = _diagnostic_matrices(by_method, "subspace_overlap")

    # ---- figures
    figures: dict[str, bytes] = {}
    figures["accuracy_matrices.png"] = _png_bytes(_fig_accuracy_matrices(columns, n_rows, mms))
    figures["forgetting_curves.png"] = _png_bytes(_fig_curves(columns, n_rows, mms, colors))
    figures["cl_metrics.png"] = _png_bytes(_fig_metrics(rows, colors))
    if any(_finite(r["trainable_params_effective"]) or _finite(r["trainable_params_lora_equivalent"]) for r in rows):
        figures["trainable_params.png"] = _png_bytes(_fig_params(rows, colors))
    if mask_diag:
        figures["mask_overlap.png"] = _png_bytes(_fig_diagnostic(
            mask_diag, "LoRI mask overlap |M_i ∧ M_j| / |M_j| (row i, column j)"))
    if sub_diag:
        figures["subspace_overlap.png"] = _png_bytes(_fig_diagnostic(
            sub_diag, "A-subspace overlap ||A_i A_jᵀ||_F / (||A_i||_F ||A_j||_F)"))
    for name, data in figures.items():
        atomic_write_bytes(report_dir / name, data)
    for stale in report_dir.glob("*.png"):
        if stale.name not in figures:
            stale.unlink()

    # ---- tables
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    comparison = {
        "experiment": exp.name,
        "generated_at": now.isoformat(),
        "std_definition": "sample standard deviation (ddof=1) over all finished runs (seeds x orders) of a method; null with fewer than 2 values",
        "units": "fractions in [-1, 1]",
        "higher_is_better": HIGHER_IS_BETTER,
        "methods": rows,
        "verdicts": verdicts,
        "runs": df.to_dict(orient="records"),
        "skipped_runs": [{"run_id": i, "run_name": n, "status": s} for i, n, s in skipped],
    }
    atomic_write_text(report_dir / "comparison.json", json.dumps(_json_clean(comparison), indent=2, allow_nan=False) + "\n")
    import pandas as pd

    flat = []
    for r in rows:
        d = {"method": r["method"], "display_name": r["display_name"], "n_runs": r["n_runs"],
             "seeds": " ".join(r["seeds"]), "orders": " ".join(r["orders"])}
        for m in METRICS:
            d[f"{m}_mean"], d[f"{m}_std"], d[f"{m}_n"] = r[m]["mean"], r[m]["std"], r[m]["n"]
        for p in ("trainable_params_effective", "trainable_params_lora_equivalent", "effective_fraction_of_lora"):
            d[p] = r[p]
        flat.append(d)
    atomic_write_text(report_dir / "comparison.csv", pd.DataFrame(flat).to_csv(index=False, float_format="%.6g"))
    mean_matrices = {
        "columns": columns,
        "stages": list(range(n_rows)),
        "methods": {
            mm.method: {"order": mm.order, "seeds": mm.seeds, "task_order": mm.tasks,
                        "mean": mm.mean, "std": mm.std, "count": mm.count}
            for mm in mms
        },
    }
    atomic_write_text(report_dir / "mean_matrices.json", json.dumps(_json_clean(mean_matrices), indent=2, allow_nan=False) + "\n")

    # ---- log the figures to every finished parent run
    log_note = "not logged to MLflow (log_to_mlflow=False)."
    if log_to_mlflow:
        failures = []
        with tempfile.TemporaryDirectory(prefix="harness-report-log-") as stage_dir:
            for name, data in figures.items():
                Path(stage_dir, name).write_bytes(data)
            for r in runs:
                try:
                    client.log_artifacts(r.run_id, stage_dir, artifact_path="report")
                except Exception as exc:  # noqa: BLE001 - the report on disk stays valid
                    failures.append(f"{r.run_id}: {type(exc).__name__}: {exc}")
        if failures:
            log_note = f"logging the figures to MLflow failed for {len(failures)} run(s): " + "; ".join(failures[:3])
        else:
            log_note = f"the figures are also logged to each of the {len(runs)} parent runs under report/."

    html_text = _render_html(exp, uri, runs, skipped, rows, verdicts, columns, mms, figures,
                             mask_diag, sub_diag, by_method, now, log_note)
    index = report_dir / "index.html"
    atomic_write_text(index, html_text)
    return index


def _render_html(exp, uri, runs, skipped, rows, verdicts, columns, mms, figures, mask_diag, sub_diag,
                 by_method, now, log_note) -> str:
    e = html.escape
    out: list[str] = []
    add = out.append

    def tagvals(key: str, param: str | None = None) -> str:
        vals = _uniq([r.tags.get(key) or (r.params.get(param) if param else None) for r in runs])
        return ", ".join(vals) if vals else "—"

    starts = [r.start_time_ms for r in runs if r.start_time_ms]
    if starts:
        fmt = lambda ms: _dt.datetime.fromtimestamp(ms / 1000, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")  # noqa: E731
        date = fmt(min(starts)) if fmt(min(starts)) == fmt(max(starts)) else f"{fmt(min(starts))} – {fmt(max(starts))}"
    else:
        date = "—"

    add("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>")
    add("<meta name='viewport' content='width=device-width, initial-scale=1'>")
    add(f"<title>Forgetting report: {e(exp.name)}</title><style>{_CSS}</style></head><body>")
    add(f"<h1>Forgetting report: {e(exp.name)}</h1>")
    add(f"<p class='muted'>Generated {e(now.strftime('%Y-%m-%d %H:%M UTC'))} from {e(redact_uri(uri))}. "
        f"All scores are fractions (0..1); metrics are in [-1, 1].</p>")

    # What was run
    add("<h2>What was run</h2>")
    orders_rows = []
    for order in _uniq(r.order for r in runs):
        seqs = _uniq(",".join(r.tasks) for r in runs if r.order == order)
        orders_rows.append(f"order {order}: " + " | ".join(s.replace(",", " → ") for s in seqs))
    info = [
        ["experiment", exp.name],
        ["model", tagvals("harness.model", "model")],
        ["suite", tagvals("harness.suite", "suite")],
        ["methods", ", ".join(f"{display_name(m)} ({len(by_method[m])} runs)" for m in by_method)],
        ["seeds", ", ".join(_uniq(r.seed for r in runs))],
        ["task orders", "; ".join(orders_rows)],
        ["git commit", tagvals("harness.git_commit")],
        ["date (run starts)", date],
        ["finished sequence runs", str(len(runs))],
        ["skipped (not FINISHED)", (f"{len(skipped)}: " + ", ".join(f"{n or i} ({s})" for i, n, s in skipped)) if skipped else "0"],
    ]
    add(_table(None, info, left_cols=2))
    knobs = ["rank", "alpha", "targets", "mask_strategy", "mask_density", "overlap_policy", "a_mode"]
    krows = [[display_name(m)] + [", ".join(_uniq(r.params.get(k) for r in by_method[m])) or "—" for k in knobs] for m in by_method]
    add("<p>Adapter settings per method (from the run parameters):</p>")
    add(_table(["method"] + knobs, krows, left_cols=len(knobs) + 1))

    # Verdict
    add("<h2>Which method is better</h2><ul>")
    for m in METRICS:
        add(f"<li>{e(verdicts[m])}</li>")
    add("</ul><p class='muted'>Mean ± sample standard deviation over seeds and task orders. "
        "A difference smaller than the larger of the two standard deviations is called within noise.</p>")

    # Metrics
    add("<h2>Continual-learning metrics</h2>")
    mrows = [[display_name(r["method"]), r["n_runs"]] + [_fmt_pm(r[m]["mean"], r[m]["std"]) for m in METRICS] for r in rows]
    add(_table(["method", "runs"] + [f"{m} ({'↑' if HIGHER_IS_BETTER[m] else '↓'})" for m in METRICS], mrows))
    add(_img("cl_metrics.png", "ACC, BWT, FWT and forgetting per method with error bars"))
    add("<p class='muted'>Also in <a href='comparison.csv'>comparison.csv</a> and <a href='comparison.json'>comparison.json</a>.</p>")

    # Matrices
    add("<h2>Accuracy matrices</h2>")
    add("<p>Rows are stages (0 = base model before any training, t = after training the t-th task), columns are "
        "tasks (aligned by name), one shared colour scale 0..1. "
        + ("Several seeds are averaged. " if any(len(mm.seeds) > 1 for mm in mms) else "")
        + ("order 0 is shown (other task orders enter the metric table only). "
           if len({r.order for r in runs}) > 1 else "")
        + "Grey cells were not evaluated.</p>")
    add(_img("accuracy_matrices.png", "accuracy matrix heatmaps per method"))
    add("<h2>Forgetting curves</h2>")
    add(_img("forgetting_curves.png", "per-task accuracy over stages, methods overlaid"))

    # Params
    add("<h2>Trainable parameters</h2>")
    prows = [[display_name(r["method"]), f"{r['trainable_params_effective']:,.0f}" if _finite(r["trainable_params_effective"]) else "—",
              f"{r['trainable_params_lora_equivalent']:,.0f}" if _finite(r["trainable_params_lora_equivalent"]) else "—",
              f"{100 * r['effective_fraction_of_lora']:.2f}%" if _finite(r["effective_fraction_of_lora"]) else "—"] for r in rows]
    add(_table(["method", "effective (counting masks)", "LoRA-equivalent", "effective / LoRA"], prows))
    if "trainable_params.png" in figures:
        add(_img("trainable_params.png", "trainable parameters per method, log scale"))
    else:
        add("<p class='note'>No trainable-parameter counts were logged.</p>")

    # Diagnostics
    add("<h2>Interference diagnostics (LoRI)</h2>")
    if mask_diag:
        add("<p>Mask overlap |M_i ∧ M_j| / |M_j|: the fraction of task j's trainable positions also used by task i "
            f"(methods: {e(', '.join(display_name(m) for m, *_ in mask_diag))}).</p>")
        add(_img("mask_overlap.png", "mask overlap between tasks"))
    else:
        add("<p class='note'>No mask-overlap diagnostics were logged (diagnostics.json absent or null, e.g. for LoRA).</p>")
    if sub_diag:
        add("<p>Subspace overlap ||A_i A_jᵀ||_F / (||A_i||_F ||A_j||_F) between the tasks' frozen projections "
            f"(1 = same A; methods: {e(', '.join(display_name(m) for m, *_ in sub_diag))}).</p>")
        add(_img("subspace_overlap.png", "A-subspace overlap between tasks"))
    else:
        add("<p class='note'>No A-subspace-overlap diagnostics were logged (diagnostics.json absent or null).</p>")

    # Definitions
    add("<h2>Metric definitions</h2>")
    add(f"<pre>{e(METRIC_DEFINITIONS)}</pre>")
    add(f"<p>{e(LIBRARY_NOTE)}</p>")
    add("<p class='muted'>Undefined metrics (e.g. BWT, FWT and forgetting when T = 1) are not logged and appear as —.</p>")

    # Runs
    add("<h2>Runs</h2>")
    rrows = [[r.run_name, r.run_id, display_name(r.method), r.seed, r.order, " → ".join(r.tasks)]
             + [_fmt(r.metrics[m]) for m in METRICS] + [r.matrix_source] for r in sorted(
                 runs, key=lambda r: (_method_sort_key(r.method), _num_sort_key(r.order), _num_sort_key(r.seed)))]
    add(_table(["run", "run id", "method", "seed", "order", "tasks"] + list(METRICS) + ["matrix from"], rrows, left_cols=6))
    problems = [(r, n) for r in runs for n in r.notes]
    if problems:
        add("<h3>Checks</h3><ul class='note'>")
        for r, n in problems:
            add(f"<li>{e(r.run_name)} ({e(display_name(r.method))}, seed {e(r.seed)}, order {e(r.order)}): {e(n)}</li>")
        add("</ul>")
    else:
        add("<p class='muted'>Check: every logged ACC/BWT/FWT/forgetting matches the value recomputed from its matrix.</p>")
    add(f"<p class='muted'>MLflow: {e(log_note)}</p>")
    add("</body></html>\n")
    return "\n".join(out)
