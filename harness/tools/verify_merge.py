"""`harness verify` on a merge folder (results/<experiment>/merge/<method>/seed-<s>): what a careful reader would check.

    hashes   every task adapter's files against the SHA-256 its train.json recorded, and the merge's results
             (single.json/.csv, merged.json/.csv, documents.json) against those summary.json recorded
    metrics  the single-adapter diagonal equals single.json's; each merge's normalised accuracy and average drop,
             recomputed from its per-document scores (documents.json) and from merged.json's scores, equal summary.json
    mlflow   not compared for merge folders (the folder is the record; `harness sync` mirrors it)

Reads only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from harness import metrics as MX
from harness.analysis import documents as DOCS
from harness.checks import FAIL, OK, SKIP, Check
from harness.integrity import HASHES, mismatches
from harness.io import read_json

_TOL = 1e-9


def check_hashes(folder: Path) -> Check:
    bad, files = [], 0
    markers = sorted(folder.glob("adapters/*/train.json"))
    for marker in markers:
        recorded = read_json(marker).get(HASHES) or {}
        files += len(recorded)
        bad += [f"{p} {what}" for p, what in mismatches(marker.parent, recorded)]
    summary = folder / "summary.json"
    results = read_json(summary).get(HASHES) if summary.is_file() else None
    if results:
        files += len(results)
        bad += [f"{p} {what}" for p, what in mismatches(folder, results)]
    if bad:
        return Check("hashes", FAIL, "; ".join(bad))
    if not files:
        return Check("hashes", SKIP, "no hashes recorded")
    note = "" if results else "; results: no hashes recorded (finished before the harness recorded them, or unfinished)"
    return Check("hashes", OK, f"{len(markers)} adapter(s), {files} file(s) match the SHA-256 recorded at commit{note}")


def _close(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(np.isclose(float(a), float(b), rtol=_TOL, atol=_TOL))


def check_metrics(folder: Path) -> Check:
    if not (folder / "summary.json").is_file():
        return Check("metrics", SKIP, "unfinished: no summary.json yet")
    try:
        return _metrics(folder)
    except (ValueError, KeyError, TypeError, OSError) as exc:  # a damaged file: say which, never a traceback
        return Check("metrics", FAIL, f"cannot recompute: {type(exc).__name__}: {exc}")


def _metrics(folder: Path) -> Check:
    summary, single = read_json(folder / "summary.json"), read_json(folder / "single.json")
    tasks, S = summary["tasks"], np.array(single["S"], dtype=float)
    bad = [
        f"single_diagonal[{t}] {summary['single_diagonal'][t]} != single.json {S[i, i]}"
        for i, t in enumerate(tasks)
        if not _close(summary["single_diagonal"][t], S[i, i])
    ]
    docs = read_json(folder / DOCS.DOCUMENTS_FILE) if (folder / DOCS.DOCUMENTS_FILE).is_file() else None
    rows = read_json(folder / "merged.json")["rows"]
    for name, entry in summary["merges"].items():
        recomputed = {"merged.json": MX.merge_summary(S, [entry["scores"][t] for t in tasks])}
        matrix = DOCS.merge_matrix(docs, name) if docs else None
        if matrix is not None:
            recomputed["documents.json"] = MX.merge_summary(np.diag(matrix[0]), list(matrix[1]))
        bad += [
            f"{name}: {k} {entry.get(k)} != {src} {v[k]}"
            for src, v in recomputed.items()
            for k in ("normalised_accuracy", "average_drop")
            if not _close(entry.get(k), v[k])
        ]
        full = [r for r in rows if len(r["tasks"]) == len(tasks) and r["scores"] == entry["scores"]]
        if not full:
            bad.append(f"{name}: no merged.json row has summary.json's scores")
    if bad:
        return Check("metrics", FAIL, "; ".join(bad))
    source = "documents.json and merged.json" if docs else "merged.json (no documents.json)"
    return Check(
        "metrics",
        OK,
        f"{len(summary['merges'])} merge(s): normalised accuracy and average drop recomputed from "
        f"{source} equal summary.json; the single diagonal equals single.json",
    )


def verify_merge(folder: Path) -> list[Check]:
    return [check_hashes(folder), check_metrics(folder), Check("mlflow", SKIP, "not compared for merge folders")]
