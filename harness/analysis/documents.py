"""Per-document results: every evaluated cell's score on each test document, so any cell can be recomputed.

Each stage folder holds `documents.json` (written inside the stage's atomic commit):

    {"stage": t, "tasks": {task: {"metric": "acc,none", "doc_ids": [...], "scores": [0, 1, ...]}}}

`scores[k]` is lm-eval's per-sample value of the task's primary metric on document `doc_ids[k]` (0/1
for acc and exact_match; a float otherwise), the cell is their mean. A finished sequence gathers them
into `<sequence>/documents.json` (also an MLflow artifact of the parent run):

    {"tasks": [...], "stages": [0, ..., S], "documents": {task: {"doc_ids": [...], "scores": [row per stage or null]}}}

Rows of a task line up by document id, so the same document sits in the same column at every stage:
what a bootstrap needs to resample the same documents in every cell (harness.analysis.statistics).

A merge run (`harness merge`) keeps the same facts for its two kinds of evaluation in its own documents.json:

    {"tasks": [...], "documents": {task: {"doc_ids": [...], "single": [...], "merged": {combination: [...]}}}}

`single` is task j's adapter alone on task j (the cell S[j, j]), `merged[c]` the merge of all tasks with
combination c on task j (m_j). merge_matrix stacks them as a 2 x T matrix, the form the merge metrics
(harness.metrics.MERGE_VALUES) and the bootstrap take.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from harness.io import read_json

DOCUMENTS_FILE = "documents.json"


def compact(v: float) -> int | float:
    """0.0 / 1.0 as 0 / 1 (most metrics are 0/1 per document), anything else unchanged."""
    f = float(v)
    return int(f) if f.is_integer() else f


def sample_scores(samples: list[dict], metric_key: str) -> dict[str, Any]:
    """One task's lm-eval samples (log_samples output) -> {"metric", "doc_ids", "scores"}, in doc_id order.

    metric_key is "<metric>,<filter>" as in lm-eval's results; a task with several filters logs one sample per
    (document, filter): only the primary metric's filter counts."""
    metric, _, filt = metric_key.partition(",")
    rows = sorted((s for s in samples if not filt or s.get("filter", filt) == filt), key=lambda s: s["doc_id"])
    return {
        "metric": metric_key,
        "doc_ids": [int(s["doc_id"]) for s in rows],
        "scores": [compact(s[metric]) for s in rows],
    }


def cell_score(scores: list[float]) -> float:
    """A cell from its documents, as lm-eval's `mean` aggregation computes it (sum / count)."""
    return sum(scores) / len(scores) if scores else float("nan")


def stage_documents(stage: int, documents: dict[str, dict]) -> dict[str, Any]:
    """The content of a stage folder's documents.json."""
    return {"stage": stage, "tasks": documents}


def gather(stage_files: dict[int, dict], tasks: list[str], n_stages: int) -> dict[str, Any]:
    """The sequence's documents.json from its stages' documents.json contents (stage -> content).

    ValueError when a task's documents differ between stages (a cell would not mean the same documents)."""
    out: dict[str, dict] = {}
    for task in tasks:
        rows: list[list | None] = [None] * n_stages
        ids = None
        for stage, content in sorted(stage_files.items()):
            entry = (content.get("tasks") or {}).get(task)
            if entry is None or stage >= n_stages:
                continue
            if ids is None:
                ids = list(entry["doc_ids"])
            elif list(entry["doc_ids"]) != ids:
                raise ValueError(f"task {task!r}: stage {stage} scored other documents than earlier stages")
            rows[stage] = list(entry["scores"])
        out[task] = {"doc_ids": ids or [], "scores": rows}
    return {"tasks": list(tasks), "stages": list(range(n_stages)), "documents": out}


def read_stage_documents(stages: dict[int, Path]) -> dict[int, dict]:
    """stage -> its documents.json content, for the committed stages that have one (older folders have none)."""
    return {t: read_json(d / DOCUMENTS_FILE) for t, d in stages.items() if (Path(d) / DOCUMENTS_FILE).exists()}


def score_arrays(docs: dict[str, Any]) -> dict[str, np.ndarray]:
    """task -> (stages, documents) array of per-document scores, NaN rows where the task was not evaluated."""
    n_stages = len(docs["stages"])
    out = {}
    for task in docs["tasks"]:
        entry = docs["documents"][task]
        A = np.full((n_stages, len(entry["doc_ids"])), np.nan)
        for i, row in enumerate(entry["scores"]):
            if row is not None:
                A[i] = row
        out[task] = A
    return out


def matrix_from_documents(docs: dict[str, Any]) -> np.ndarray:
    """The accuracy matrix R (stages x tasks, NaN where not evaluated) recomputed from per-document scores."""
    tasks = docs["tasks"]
    R = np.full((len(docs["stages"]), len(tasks)), np.nan)
    for j, task in enumerate(tasks):
        for i, row in enumerate(docs["documents"][task]["scores"]):
            if row is not None:
                R[i, j] = cell_score(row)
    return R


def merge_documents(tasks: list[str], single: dict[str, dict], merged: dict[str, dict[str, dict]]) -> dict[str, Any]:
    """A merge run's documents.json from its evaluations' per-document scores (sample_scores dicts).

    single: task -> its own adapter's scores on it; merged: combination -> task -> the merge's scores on it.
    ValueError when two evaluations of a task scored different documents."""
    out = {}
    for task in tasks:
        ids = list(single[task]["doc_ids"])
        for c, per_task in merged.items():
            if list(per_task[task]["doc_ids"]) != ids:
                raise ValueError(f"task {task!r}: merge {c!r} scored other documents than the task's own adapter")
        out[task] = {
            "doc_ids": ids,
            "single": list(single[task]["scores"]),
            "merged": {c: list(per_task[task]["scores"]) for c, per_task in merged.items()},
        }
    return {"tasks": list(tasks), "documents": out}


def merge_score_arrays(docs: dict[str, Any], combination: str) -> dict[str, np.ndarray] | None:
    """task -> (2, documents): the own adapter's and the merge's scores per document (None: combination not kept)."""
    entries = docs["documents"]
    if any(combination not in entries[t]["merged"] for t in docs["tasks"]):
        return None
    return {t: np.array([entries[t]["single"], entries[t]["merged"][combination]], dtype=float) for t in docs["tasks"]}


def merge_matrix(docs: dict[str, Any], combination: str) -> np.ndarray | None:
    """The 2 x T matrix [S[j, j]; m_j] of one combination, recomputed from per-document scores."""
    entries, tasks = docs["documents"], docs["tasks"]
    if any(combination not in entries[t]["merged"] for t in tasks):
        return None
    return np.array(
        [
            [cell_score(entries[t]["single"]) for t in tasks],
            [cell_score(entries[t]["merged"][combination]) for t in tasks],
        ],
        dtype=float,
    )


def check_documents(docs: dict[str, Any], R: np.ndarray) -> list[str]:
    """Cells where the per-document scores do not give the recorded matrix exactly (empty: all agree)."""
    got = matrix_from_documents(docs)
    problems = []
    if got.shape != R.shape:
        return [f"documents give a {got.shape} matrix, the recorded one is {R.shape}"]
    for i, j in np.ndindex(R.shape):
        a, b = got[i, j], R[i, j]
        if not (math.isnan(a) and math.isnan(b)) and a != b:
            problems.append(f"stage {i}, task {docs['tasks'][j]}: documents give {a!r}, the matrix holds {b!r}")
    return problems
