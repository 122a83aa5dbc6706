"""Reading an experiment's run folders: its finished sequences, the unfinished ones, and (merge_folders.py) its merges.

results/<experiment>/ holds one folder per sequence ([variant-<id>/]<method>/seed-<s>/[order-<k>/], its config.yaml with
a `sequence:` block) and one per merge run (merge/<method>/seed-<s>/, a `merge:` block): the README's "Results folder".
A sequence is finished when its summary.json says complete and its matrix, diagnostics and heatmap match the hashes
summary.json records (a mismatch is an IntegrityError, exit 2: the report must not rest on a damaged folder). A
sequence without that summary is running while a process holds its folder's lock (harness/locking.py), else
interrupted: its committed stages are kept and `harness resume <folder>` continues it. Neither is aggregated.
The run's name, tags and parameters come from its state.json (the record its MLflow parent run was made from);
from MLflow (tracked.py) come only its status and start time.

A reference run (summary.json "reference": true, e.g. multi-task training) has one training stage: its matrix has
2 rows (base, after training on all tasks) and only ACC is defined.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml

from harness.analysis.documents import DOCUMENTS_FILE, check_documents
from harness.analysis.naming import METRICS, method_sort_key, num_sort_key
from harness.analysis.numbers import finite
from harness.analysis.runs import INTERRUPTED, RUNNING, SequenceRun, UnfinishedRun
from harness.errors import HarnessError
from harness.io import read_json
from harness.locking import is_locked
from harness.metrics import LEARN_MARGIN, metric, not_learned, summarize
from harness.report.tracked import Tracked
from harness.run.folder import committed_stages, verify_results

# Where run folders sit under an experiment folder (a sequence's order-<k>/ only with several orders).
RUN_GLOBS = ("*/seed-*", "*/seed-*/order-*", "variant-*/*/seed-*", "variant-*/*/seed-*/order-*", "merge/*/seed-*")
# summary.json's number and the one recomputed from its matrix agree up to float noise.
_CONSISTENCY_TOL = 1e-6


def run_folders(exp_dir: Path, kind: str) -> list[tuple[Path, dict]]:
    """(folder, its config.yaml) of every sequence (kind "sequence") or merge run ("merge") of an experiment folder."""
    out = []
    for folder in sorted({p for g in RUN_GLOBS for p in Path(exp_dir).glob(g) if (p / "config.yaml").is_file()}):
        data = yaml.safe_load((folder / "config.yaml").read_text()) or {}
        if isinstance(data.get(kind), dict):
            out.append((folder, data))
    return out


def experiment_names(results_dir: Path) -> list[str]:
    """The folders under results_dir that hold sequence or merge runs."""
    root = Path(results_dir)
    dirs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    return [d.name for d in dirs if any(run_folders(d, kind) for kind in ("sequence", "merge"))]


def experiment_folder(results_dir: Path, experiment: str | None) -> Path:
    """results_dir/<experiment>, or the only experiment folder there; HarnessError names the choices."""
    names = experiment_names(results_dir)
    listing = ", ".join(names) if names else "(none)"
    if experiment is None:
        if len(names) == 1:
            return Path(results_dir) / names[0]
        if not names:
            raise HarnessError(f"no runs yet under {results_dir}: run `make run-sequence` (or `harness merge`) first")
        raise HarnessError(
            f"{len(names)} harness experiments under {results_dir}: {listing}; pick one with --experiment NAME"
        )
    if experiment not in names:
        raise HarnessError(f"no experiment named {experiment!r} under {results_dir}; harness experiments: {listing}")
    return Path(results_dir) / experiment


def finished_summary(folder: Path) -> dict | None:
    """summary.json when it says complete and its results match their hashes (IntegrityError when not); else None."""
    path = folder / "summary.json"
    if not path.is_file():
        return None
    summary = read_json(path)
    if not summary.get("complete"):
        return None
    verify_results(folder, summary)
    return summary


def parent_record(folder: Path) -> dict[str, Any]:
    """state.json: the MLflow parent run id and, for sequences, the name, tags and params it was made with."""
    path = folder / "state.json"
    return read_json(path) if path.is_file() else {}


def unfinished_run(folder: Path, label: str, block: dict, tracked: Tracked) -> UnfinishedRun:
    """A run folder without a finished summary: running while its lock is held, else interrupted."""
    state = parent_record(folder)
    run_id = state.get("mlflow_parent_run_id")
    kind = RUNNING if is_locked(folder) else INTERRUPTED
    # How it ended (killed, failed) only MLflow knows; a FINISHED MLflow copy does not make the folder finished.
    ended = tracked.status(run_id)
    status = ended if ended in ("KILLED", "FAILED", "RUNNING") else kind.upper()
    stages = committed_stages(folder)
    tags = (state.get("mlflow_parent") or {}).get("tags") or {}
    tasks = block.get("tasks") or []
    reference = str(tags.get("harness.reference", "")).strip().lower() == "true"
    return UnfinishedRun(
        run_id=run_id,
        run_name=(state.get("mlflow_parent") or {}).get("name") or label,
        status=status,
        state=kind,
        method=str(block.get("method", "unknown")),
        seed=str(block.get("seed", "?")),
        order=str(block.get("order_index", "?")),
        run_dir=str(folder),
        last_stage=max(stages) if stages else None,
        n_stages=1 if reference else (len(tasks) or None),
        start_time_ms=tracked.start_ms(run_id),
    )


def _matrix(matrix: dict, reference: bool) -> tuple[list[str], np.ndarray]:
    """(tasks, R) of matrix.json: T+1 rows for a sequence; a reference keeps its own stages (2 rows: base, all tasks)."""
    tasks = [str(t) for t in matrix["tasks"]]
    rows = matrix["R"]
    T = len(tasks)
    stages = matrix.get("stages") or list(range(len(rows)))
    n_rows = max([1] + [int(s) for s in stages]) + 1 if reference else T + 1
    R = np.full((max(n_rows, len(rows)), T), np.nan)
    for stage, row in zip(stages, rows):
        for j, v in enumerate(row[:T]):
            if v is not None:
                R[int(stage), j] = float(v)
    return tasks, R[:n_rows]


def _num(v: Any) -> float:
    return float(v) if finite(v) else float("nan")


def _consistency_notes(recorded: dict[str, float], R: np.ndarray, reference: bool) -> list[str]:
    """Where summary.json's metric disagrees with harness.metrics' definitions on the sequence's own matrix."""
    try:
        recomputed = summarize(R, reference)
    except ValueError:  # a malformed matrix defines nothing
        recomputed = {m: None for m in METRICS}
    notes = []
    for m in METRICS:
        lv, rv = recorded[m], recomputed[m]
        if finite(lv) and rv is not None and abs(lv - rv) > _CONSISTENCY_TOL:
            notes.append(f"summary.json has {m} = {lv:.6f} but the matrix gives {rv:.6f}")
        elif finite(lv) != (rv is not None):
            notes.append(
                f"{m} is {'in' if finite(lv) else 'not in'} summary.json but the matrix "
                f"{'defines' if rv is not None else 'does not define'} it"
            )
    return notes


def _documents(folder: Path, tasks: list[str], R: np.ndarray, notes: list[str]) -> dict | None:
    """documents.json when it recomputes every cell of R exactly; otherwise None, with a note (absent: no note)."""
    path = folder / DOCUMENTS_FILE
    if not path.is_file():
        return None
    try:
        docs = read_json(path)
        problems = (
            check_documents(docs, R) if list(docs["tasks"]) == list(tasks) else ["its tasks differ from the matrix's"]
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        problems = [f"malformed ({type(exc).__name__}: {exc})"]
    if problems:
        notes.append(f"documents.json does not recompute the matrix ({problems[0]}); intervals resample seeds only")
        return None
    return docs


def _not_learned(summary: dict, R: np.ndarray, margin: float, tasks: list[str], reference: bool) -> list[str] | None:
    """summary.json's not_learned, else (summaries written before it existed) from the matrix; None for references
    and when not judged."""
    if reference:
        return None
    if "not_learned" in summary:
        return summary["not_learned"]
    flagged = not_learned(R, margin)
    return None if flagged is None else [tasks[j] for j in flagged]


def _optional_json(path: Path) -> dict | None:
    return read_json(path) if path.is_file() else None


COST_KEYS = ("train_s", "method_setup_s", "method_teardown_s", "calibration_s", "eval_s")


def _stage_costs(folder: Path) -> list[dict]:
    """Per committed trained stage (1..S): its stage.json seconds (COST_KEYS; absent keys, from older runs: 0)."""
    return [
        {k: float(info.get(k) or 0.0) for k in COST_KEYS}
        for t, d in sorted(committed_stages(folder).items())
        if t > 0 and (info := read_json(d / "stage.json"))
    ]


def load_sequence(folder: Path, summary: dict, label: str, tracked: Tracked) -> SequenceRun:
    """One finished sequence from its folder: summary.json, matrix.json, diagnostics.json, documents.json, state.json."""
    state = parent_record(folder)
    parent = state.get("mlflow_parent") or {}
    reference = bool(summary.get("reference"))
    tasks, R = _matrix(read_json(folder / "matrix.json"), reference)
    # A metric the summary predates (LA before it was recorded, a metric added to the table since): from the matrix.
    recorded = {
        m: _num(summary[metric(m).key] if metric(m).key in summary else metric(m).of(R, reference)) for m in METRICS
    }
    notes = _consistency_notes(recorded, R, reference)
    run_id = summary.get("mlflow_parent_run_id") or state.get("mlflow_parent_run_id") or ""
    margin = float(summary.get("learn_margin") or LEARN_MARGIN)
    return SequenceRun(
        run_id=run_id,
        run_name=parent.get("name") or label,
        status="FINISHED",
        method=str(summary["method"]),
        seed=str(summary["seed"]),
        order=str(summary.get("order_index", 0)),
        tasks=tasks,
        R=R,
        metrics=recorded,
        params_effective=_num(summary.get("trainable_params_effective")),
        params_lora_equivalent=_num(summary.get("trainable_params_lora_equivalent")),
        diagnostics=_optional_json(folder / "diagnostics.json"),
        summary=summary,
        tags={str(k): str(v) for k, v in (parent.get("tags") or {}).items()},
        params={str(k): str(v) for k, v in (parent.get("params") or {}).items()},
        start_time_ms=tracked.start_ms(run_id),
        matrix_source="matrix.json",
        notes=notes,
        reference=reference,
        documents=_documents(folder, tasks, R, notes),
        not_learned=_not_learned(summary, R, margin, tasks, reference),
        learn_margin=margin,
        stage_costs=_stage_costs(folder),
    )


def _sequence_label(block: dict) -> str:
    v = f"variant-{block['variant']}/" if block.get("variant") else ""
    return f"{v}{block.get('method')}/seed-{block.get('seed')}/order-{block.get('order_index')}"


def _sort_key(method: str, seed: str, order: str, name: str):
    return (method_sort_key(method), num_sort_key(seed), num_sort_key(order), name)


def read_sequences(exp_dir: Path, tracked: Tracked) -> tuple[list[SequenceRun], list[UnfinishedRun]]:
    """(finished sequences, unfinished ones), each in method, seed, order order."""
    finished, unfinished = [], []
    for folder, data in run_folders(exp_dir, "sequence"):
        block, label = data["sequence"], _sequence_label(data["sequence"])
        summary = finished_summary(folder)
        if summary is not None:
            finished.append(load_sequence(folder, summary, label, tracked))
        else:
            unfinished.append(unfinished_run(folder, label, block, tracked))
    finished.sort(key=lambda r: _sort_key(r.method, r.seed, r.order, r.run_name))
    unfinished.sort(key=lambda u: _sort_key(u.method, u.seed, u.order, u.run_name))
    return finished, unfinished


def no_finished_message(experiment: str, unfinished: list[UnfinishedRun]) -> str:
    """The error when an experiment has nothing to report yet: what there is, and what to do."""
    interrupted = [u for u in unfinished if u.state == INTERRUPTED]
    msg = f"experiment {experiment!r} has no FINISHED sequence runs ({len(unfinished)} not finished skipped"
    if unfinished:
        msg += f": {len(interrupted)} interrupted, {len(unfinished) - len(interrupted)} running"
    msg += "): wait for `make run-sequence` to finish"
    hints = [u.resume_command for u in interrupted if u.resume_command]
    if hints:
        msg += "; continue the interrupted ones with " + ", ".join(f"`{h}`" for h in hints[:5])
        msg += f" (and {len(hints) - 5} more)" if len(hints) > 5 else ""
    return msg
