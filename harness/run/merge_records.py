"""What a merge folder's result files hold: single.json/.csv (S[i, j], adapter i alone on task j), merged.json/.csv (a
row per merge), documents.json and summary.json. harness/run/merge.py decides when they are written; this module what
they hold (the folder layout: harness/run/merge.py's docstring)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Callable

import numpy as np

from harness import metrics as MX
from harness.analysis.documents import DOCUMENTS_FILE, merge_documents
from harness.integrity import HASHES, file_hashes
from harness.io import atomic_write_json, atomic_write_text, read_json

MERGE_RESULT_FILES = ["single.json", "single.csv", "merged.json", "merged.csv", "documents.json"]  # hashed in summary
SUMMARY_KEYS = ("combination", "protocol", "normalised_accuracy", "average_drop", "relative_error", "cross_terms")


def _csv(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow([f"{v:.6f}" if isinstance(v, float) else v for v in r])
    return buf.getvalue()


def write_single(folder: Path, tasks: list[str], S: np.ndarray, docs: dict) -> None:
    """single.json (S and the diagonal's documents: what normalised accuracy divides by), then single.csv."""
    atomic_write_json(folder / "single.json", {"tasks": tasks, "S": S.tolist(), "documents": docs})
    rows = [[t, *row] for t, row in zip(tasks, S.tolist())]
    atomic_write_text(folder / "single.csv", _csv(["adapter", *tasks], rows))


def write_merged(folder: Path, tasks: list[str], rows: list[dict], label: Callable[[dict], str]) -> None:
    """merged.json (every row so far), then merged.csv."""
    atomic_write_json(folder / "merged.json", {"rows": rows})
    header = ["combination", "tasks", *tasks, "average_drop", "normalised_accuracy", "relative_error"]
    table = [
        [label(r), "+".join(r["tasks"]), *[r["scores"].get(t, "") for t in tasks]]
        + [r.get("average_drop", ""), r.get("normalised_accuracy", ""), r["relative_error"]]
        for r in rows
    ]
    atomic_write_text(folder / "merged.csv", _csv(header, table))


def merge_row(combination: str, protocol: str, subset: list[str], weights: list[float], ev, **facts: Any) -> dict:
    """One merged.json row: the merge's scores on each task and what it was (facts: density, relative_error,
    cross_terms, mlflow_run_id, weight_selection)."""
    return {
        "combination": combination,
        "protocol": protocol,
        "tasks": subset,
        "weights": weights,
        "density": facts["density"],
        "scores": ev.scores,
        "relative_error": facts["relative_error"],
        "cross_terms": facts["cross_terms"],
        "eval_s": ev.wall_s,
        "mlflow_run_id": facts["mlflow_run_id"],
        "weight_selection": facts["weight_selection"],
        "documents": ev.documents,
    }


def merge_summary(folder: Path, spec, S: np.ndarray, rows: list[dict], label: Callable[[dict], str], **facts) -> dict:
    """summary.json of a finished merge (facts: protocols, weights, pairs, parent_id); writes documents.json first."""
    tasks, full = spec.tasks, [r for r in rows if len(r["tasks"]) == len(spec.tasks)]
    protocols, weights = facts["protocols"], facts["weights"]
    summary: dict[str, Any] = {
        "protocol": "merge",
        "method": spec.method,
        "seed": spec.seed,
        "tasks": tasks,
        "weights": weights[protocols[0]],
        "merge_protocols": protocols,
        "protocol_weights": weights,
        "single_diagonal": {t: float(S[i, i]) for i, t in enumerate(tasks)},
        "merges": {
            label(r): {k: r.get(k) for k in (*SUMMARY_KEYS, "weights", "weight_selection")} | {"scores": r["scores"]}
            for r in full
        },
        "interference": {},
        "mlflow_parent_run_id": facts["parent_id"],
        "complete": True,
    }
    for name in summary["merges"] if facts["pairs"] else []:
        pairs = {
            (tasks.index(r["tasks"][0]), tasks.index(r["tasks"][1])): (
                r["scores"][r["tasks"][0]],
                r["scores"][r["tasks"][1]],
            )
            for r in rows
            if label(r) == name and len(r["tasks"]) == 2
        }
        summary["interference"][name] = MX.interference_matrix(S, pairs)
    single_docs = read_json(folder / "single.json").get("documents")
    if single_docs and all(r.get("documents") for r in full):  # folders begun before documents were kept have none
        merged = {label(r): r["documents"] for r in full}
        atomic_write_json(folder / DOCUMENTS_FILE, merge_documents(tasks, single_docs, merged))
    summary[HASHES] = file_hashes(folder, MERGE_RESULT_FILES)  # harness verify checks them (tools/verify_merge.py)
    return summary
