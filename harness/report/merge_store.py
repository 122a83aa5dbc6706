"""Reading the merge protocol's parent runs (`harness merge`) from the MLflow store.

It reads what harness.merging.protocol logs per (method, seed): a parent run tagged
harness.kind=merge (tags harness.method, harness.seed), the metrics single/<task> and
merged/<combination>/{normalised_accuracy, average_drop, relative_error}, and the artifacts
summary.json, single.json and merged.json. summary.json is the primary source; without it the
numbers are rebuilt from merged.json and single.json with harness.metrics' definitions, else taken
from the metrics (then without per-task scores). Only FINISHED parents are loaded (store.py lists
the others as skipped); the child runs (harness.kind=merge-adapter / merge-combination) are not read.
Where a logged number disagrees with the one recomputed from the per-task scores, the run gets a note.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness import metrics as MX
from harness.report.artifacts import download_jsons
from harness.report.numbers import finite

MERGE_FILTER = "tags.`harness.kind` = 'merge'"
MERGE_KEYS = ("normalised_accuracy", "average_drop", "relative_error")
_CONSISTENCY_TOL = 1e-6


@dataclass
class MergeRun:
    """One finished merge parent run (one method, one seed) as the report needs it."""

    run_id: str
    run_name: str
    status: str
    method: str
    seed: str
    tasks: list[str]
    weights: list[float]  # per task, as merged; empty when not logged
    single: dict[str, float]  # S[j, j]: task j's adapter alone on task j (NaN when unknown)
    merges: dict[str, dict]  # combination -> normalised_accuracy, average_drop, relative_error, cross_terms, scores
    interference: dict[str, np.ndarray]  # combination -> (T, T) I[i, j]; NaN on the diagonal and for pairs not run
    tags: dict[str, str]
    params: dict[str, str]
    start_time_ms: int | None
    source: str  # where the merge numbers came from
    notes: list[str] = field(default_factory=list)


def _num(v) -> float:
    try:
        return float(v) if v is not None and finite(float(v)) else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def _tasks(summary: dict, single: dict, params: dict, metrics: dict) -> list[str]:
    for tasks in (summary.get("tasks"), single.get("tasks"), (params.get("tasks") or "").split(",")):
        if isinstance(tasks, list) and [t for t in tasks if t]:
            return [str(t) for t in tasks if t]
    return sorted(k[len("single/"):] for k in metrics if k.startswith("single/"))


def _single_matrix(single: dict, T: int, notes: list[str]) -> np.ndarray | None:
    """single.json's S as a (T, T) float matrix, None when absent or malformed."""
    if "S" not in single:
        return None
    try:
        S = np.array([[_num(v) for v in row] for row in single["S"]], dtype=float)
    except TypeError:
        S = None
    if S is None or S.shape != (T, T):
        notes.append("single.json is malformed (S is not tasks x tasks); ignored")
        return None
    return S


def _diagonal(summary: dict, S: np.ndarray | None, metrics: dict, tasks: list[str]) -> dict[str, float]:
    """S[j, j] per task: summary.json, else single.json, else the single/<task> metrics."""
    diag = summary.get("single_diagonal")
    if isinstance(diag, dict):
        return {t: _num(diag.get(t)) for t in tasks}
    if S is not None:
        return {t: float(S[j, j]) for j, t in enumerate(tasks)}
    return {t: _num(metrics.get(f"single/{t}")) for t in tasks}


def _merge_entry(values: dict, tasks: list[str]) -> dict:
    scores = values.get("scores") if isinstance(values.get("scores"), dict) else {}
    entry = {k: _num(values.get(k)) for k in MERGE_KEYS}
    entry["cross_terms"] = values.get("cross_terms") if isinstance(values.get("cross_terms"), bool) else None
    entry["scores"] = {t: _num(scores[t]) for t in tasks if t in scores}
    selection = values.get("weight_selection") if isinstance(values.get("weight_selection"), dict) else {}
    entry["chosen_weight"] = _num(selection.get("chosen")) if selection else None  # merge_weight_grid's pick
    return entry


def _merges(summary: dict, rows: list | None, diag: dict[str, float], metrics: dict, tasks: list[str],
            notes: list[str]) -> tuple[dict[str, dict], str]:
    """(combination -> merge entry over all tasks, where it came from)."""
    if isinstance(summary.get("merges"), dict):
        return {str(c): _merge_entry(v, tasks) for c, v in summary["merges"].items() if isinstance(v, dict)}, "summary.json"
    if rows:
        out = {}
        D = np.diag([diag[t] for t in tasks])
        for r in rows:
            if not isinstance(r, dict) or sorted(r.get("tasks") or []) != sorted(tasks):
                continue
            entry = _merge_entry(r, tasks)
            if len(entry["scores"]) == len(tasks):
                entry.update({k: _num(v) for k, v in MX.merge_summary(D, [entry["scores"][t] for t in tasks]).items()})
            out[str(r.get("combination"))] = entry
        notes.append("no usable summary.json; merges rebuilt from merged.json and the single-adapter scores")
        return out, "merged.json"
    combos = list(dict.fromkeys(k.split("/")[1] for k in metrics if k.startswith("merged/") and k.count("/") == 2))
    notes.append("no summary.json or merged.json; merges from the merged/<combination>/* metrics (no per-task scores)")
    return {c: _merge_entry({k: metrics.get(f"merged/{c}/{k}") for k in MERGE_KEYS}, tasks) for c in combos}, "metrics"


def _interference(summary: dict, rows: list | None, S: np.ndarray | None, tasks: list[str]) -> dict[str, np.ndarray]:
    """combination -> I (T x T): summary.json's, else rebuilt from merged.json's pair rows and S."""
    T, out = len(tasks), {}
    if isinstance(summary.get("interference"), dict):
        for c, M in summary["interference"].items():
            try:
                arr = np.array([[_num(v) for v in row] for row in M], dtype=float)
            except TypeError:
                continue
            if arr.shape == (T, T):
                out[str(c)] = arr
        return out
    if not rows or S is None:
        return out
    pair_rows = [r for r in rows if isinstance(r, dict) and len(r.get("tasks") or []) == 2 and isinstance(r.get("scores"), dict)]
    for c in dict.fromkeys(r.get("combination") for r in pair_rows):
        pairs = {}
        for r in pair_rows:
            a, b = r["tasks"]
            if r.get("combination") == c and all(t in tasks and t in r["scores"] for t in (a, b)):
                pairs[(tasks.index(a), tasks.index(b))] = (r["scores"][a], r["scores"][b])
        if pairs:
            out[str(c)] = np.array([[_num(v) for v in row] for row in MX.interference_matrix(S, pairs)], dtype=float)
    return out


def _consistency_notes(merges: dict[str, dict], diag: dict[str, float], metrics: dict, tasks: list[str]) -> list[str]:
    """Where a merge's numbers disagree with its logged metrics or with harness.metrics on its per-task scores."""
    notes = []
    for c, e in merges.items():
        for k in MERGE_KEYS:
            logged = metrics.get(f"merged/{c}/{k}")
            if logged is not None and finite(e[k]) and abs(float(logged) - e[k]) > _CONSISTENCY_TOL:
                notes.append(f"{c}: logged merged/{c}/{k} = {float(logged):.6f} but the artifacts give {e[k]:.6f}")
        if len(e["scores"]) != len(tasks) or not all(finite(diag[t]) for t in tasks):
            continue
        recomputed = MX.merge_summary(np.diag([diag[t] for t in tasks]), [e["scores"][t] for t in tasks])
        for k, v in recomputed.items():
            if v is not None and finite(e[k]) and abs(v - e[k]) > _CONSISTENCY_TOL:
                notes.append(f"{c}: {k} = {e[k]:.6f} but the per-task scores give {v:.6f}")
    return notes


def _weights(summary: dict, params: dict) -> list[float]:
    w = summary.get("weights")
    if not isinstance(w, list):  # the parameter is logged as the list's text, e.g. "[0.4, 0.4, 0.4]"
        w = (params.get("merge_weights") or "").strip("[] ").split(",")
    return [v for v in (_num(x) for x in w if str(x).strip()) if finite(v)]


def load_merge_run(client, run, tmp: Path) -> MergeRun:
    info, data = run.info, run.data
    tags, params, metrics = dict(data.tags), dict(data.params), dict(data.metrics)
    notes: list[str] = []
    _, parsed = download_jsons(client, info.run_id, ("summary.json", "single.json", "merged.json"), tmp / info.run_id, notes)
    summary, single = (p if isinstance(p, dict) else {} for p in parsed[:2])
    rows = parsed[2].get("rows") if isinstance(parsed[2], dict) and isinstance(parsed[2].get("rows"), list) else None
    tasks = _tasks(summary, single, params, metrics)
    S = _single_matrix(single, len(tasks), notes)
    diag = _diagonal(summary, S, metrics, tasks)
    merges, source = _merges(summary, rows, diag, metrics, tasks, notes)
    notes.extend(_consistency_notes(merges, diag, metrics, tasks))
    return MergeRun(
        run_id=info.run_id,
        run_name=info.run_name or info.run_id,
        status=info.status,
        method=str(tags.get("harness.method") or params.get("method") or summary.get("method") or "unknown"),
        seed=str(tags.get("harness.seed") or params.get("seed") or summary.get("seed", "?")),
        tasks=tasks,
        weights=_weights(summary, params),
        single=diag,
        merges=merges,
        interference=_interference(summary, rows, S, tasks),
        tags=tags,
        params=params,
        start_time_ms=info.start_time,
        source=source,
        notes=notes,
    )
