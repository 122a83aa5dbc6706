"""Reading an experiment's merge runs (`harness merge`) from their folders: results/<experiment>/merge/<method>/seed-<s>/.

A merge run is finished when its summary.json says complete (harness/run/merge.py writes it last): per
combination the normalised accuracy, average drop, ΔW relative error, cross terms and per-task scores, the
single-adapter diagonal S[j, j], the weights and the interference matrices. The knobs come from its config.yaml;
from MLflow (tracked.py) only the run's status, start time and git commit (the folder does not record it).
A merge folder without a finished summary is listed apart (rerunning `harness merge` resumes it). Where a
combination's numbers disagree with those recomputed from its per-task scores (harness.metrics), the run gets a note.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from harness import metrics as MX
from harness.analysis.documents import DOCUMENTS_FILE, merge_matrix
from harness.analysis.numbers import finite
from harness.analysis.runs import MergeRun
from harness.io import read_json
from harness.report.folders import finished_summary, parent_record, run_folders, unfinished_run
from harness.report.tracked import Tracked

MERGE_KEYS = ("normalised_accuracy", "average_drop", "relative_error")
# The knobs the page shows, from the folder's config.yaml, under the names of the MLflow parameters.
CONFIG_PARAMS = ("model", "suite", "merge_density", "merge_a", "merge_masks")
_CONSISTENCY_TOL = 1e-6


def _num(v) -> float:
    try:
        return float(v) if v is not None and finite(float(v)) else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def _merge_entry(values: dict, tasks: list[str]) -> dict:
    scores = values.get("scores") if isinstance(values.get("scores"), dict) else {}
    entry = {k: _num(values.get(k)) for k in MERGE_KEYS}
    entry["cross_terms"] = values.get("cross_terms") if isinstance(values.get("cross_terms"), bool) else None
    entry["scores"] = {t: _num(scores[t]) for t in tasks if t in scores}
    selection = values.get("weight_selection") if isinstance(values.get("weight_selection"), dict) else {}
    entry["chosen_weight"] = _num(selection.get("chosen")) if selection else None  # merge_weight_grid's pick
    entry["at_grid_end"] = (
        bool(selection.get("at_grid_end")) if selection else False
    )  # the pick is the lowest or highest tried
    return entry


def _interference(summary: dict, T: int) -> dict[str, np.ndarray]:
    """combination -> I (T x T) as summary.json records it (null: NaN)."""
    out = {}
    for c, M in (summary.get("interference") or {}).items():
        arr = np.array([[_num(v) for v in row] for row in M], dtype=float)
        if arr.shape == (T, T):
            out[str(c)] = arr
    return out


def _consistency_notes(merges: dict[str, dict], diag: dict[str, float], tasks: list[str]) -> list[str]:
    """Where a merge's numbers disagree with harness.metrics on its per-task scores."""
    notes = []
    for c, e in merges.items():
        if len(e["scores"]) != len(tasks) or not all(finite(diag[t]) for t in tasks):
            continue
        recomputed = MX.merge_summary(np.diag([diag[t] for t in tasks]), [e["scores"][t] for t in tasks])
        for k, v in recomputed.items():
            if v is not None and finite(e[k]) and abs(v - e[k]) > _CONSISTENCY_TOL:
                notes.append(f"{c}: {k} = {e[k]:.6f} but the per-task scores give {v:.6f}")
    return notes


def _documents(
    folder: Path, merges: dict[str, dict], diag: dict[str, float], tasks: list[str]
) -> tuple[dict | None, list[str]]:
    """(documents.json when it recomputes S[j, j] and every merge's m_j exactly, else None; a note when it does not)."""
    path = folder / DOCUMENTS_FILE
    if not path.is_file():
        return None, []  # merge runs begun before documents were kept: intervals over seeds only
    docs = read_json(path)
    if list(docs.get("tasks") or []) != tasks:
        return None, [f"documents.json lists tasks {docs.get('tasks')}, the run {tasks}; intervals resample seeds only"]
    for c, e in merges.items():
        M = merge_matrix(docs, c)
        want = np.array([[diag[t] for t in tasks], [e["scores"].get(t, np.nan) for t in tasks]])
        if M is None or not np.array_equal(M, want):
            return None, [
                f"documents.json does not recompute merge {c!r} and the single adapters' scores exactly; "
                "intervals resample seeds only"
            ]
    return docs, []


def load_merge(folder: Path, summary: dict, config: dict, tracked: Tracked) -> MergeRun:
    """One finished merge run from its folder's summary.json and config.yaml."""
    tasks = [str(t) for t in summary["tasks"]]
    diag = {t: _num((summary.get("single_diagonal") or {}).get(t)) for t in tasks}
    merges = {str(c): _merge_entry(v, tasks) for c, v in (summary.get("merges") or {}).items() if isinstance(v, dict)}
    run_id = summary.get("mlflow_parent_run_id") or parent_record(folder).get("mlflow_parent_run_id") or ""
    commit = tracked.tag(run_id, "harness.git_commit")
    docs, doc_notes = _documents(folder, merges, diag, tasks)
    return MergeRun(
        run_id=run_id,
        run_name=f"merge/{summary['method']}/seed-{summary['seed']}",
        status="FINISHED",
        method=str(summary["method"]),
        seed=str(summary["seed"]),
        tasks=tasks,
        weights=[w for w in (_num(x) for x in summary.get("weights") or []) if finite(w)],
        single=diag,
        merges=merges,
        interference=_interference(summary, len(tasks)),
        tags={
            "harness.model": str(config.get("model")),
            "harness.suite": str(config.get("suite")),
            **({"harness.git_commit": commit} if commit else {}),
        },
        params={
            **{k: str(config[k]) for k in CONFIG_PARAMS if config.get(k) is not None},
            **({"merge_protocol": ",".join(summary["merge_protocols"])} if summary.get("merge_protocols") else {}),
        },
        start_time_ms=tracked.start_ms(run_id),
        source="summary.json",
        notes=_consistency_notes(merges, diag, tasks) + doc_notes,
        documents=docs,
    )


def read_merges(exp_dir: Path, tracked: Tracked) -> tuple[list[MergeRun], list[tuple[str, str, str]]]:
    """(finished merge runs, (run id, run name, status) of the unfinished ones)."""
    finished, skipped = [], []
    for folder, config in run_folders(exp_dir, "merge"):
        block = config["merge"]
        summary = finished_summary(folder)
        if summary is not None:
            finished.append(load_merge(folder, summary, config, tracked))
            continue
        u = unfinished_run(folder, f"merge/{block.get('method')}/seed-{block.get('seed')}", block, tracked)
        skipped.append((u.run_id or str(folder), u.run_name, u.status))
    return finished, skipped
