"""Reading the MLflow store: the experiment, its finished sequence (and merge) runs, their matrices and artifacts.

It reads exactly what the scheduler logs (see the MLflow contract in harness.tracking): parent runs
tagged harness.kind=sequence, their final ACC/BWT/FWT/forgetting metrics and trainable-parameter
counts, and the artifacts matrix.json, summary.json and diagnostics.json. When matrix.json cannot
be downloaded the matrix is rebuilt from the `acc/<task>` metric histories (step = stage).

Which parent runs count (by MLflow status): FINISHED runs are loaded and reported. KILLED runs
tagged harness.interrupted=true (a sequence killed outright; the CLI marks them before the report)
are listed as interrupted, with how to resume them, and RUNNING runs as running (another process
is working on them); neither enters any aggregate. Every run that is not FINISHED (those two and
FAILED ones) is also listed as skipped.

A reference run (tag harness.reference=true, e.g. multi-task training) has one training stage:
its matrix has 2 rows (base, after training on all tasks) and only ACC is defined.

An experiment may also (or only) hold `harness merge` parent runs (harness.kind=merge): the
FINISHED ones are loaded by merge_store, the others listed apart (merge_skipped). The report
needs finished runs of at least one kind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harness.errors import HarnessError, TrackingError
from harness.analysis.documents import check_documents
from harness.metrics import LEARN_MARGIN, learning_accuracy, not_learned, summarize, summarize_reference
from harness.report.artifacts import download_jsons
from harness.report.merge_store import MERGE_FILTER, MergeRun, load_merge_run
from harness.report.naming import METRICS, is_reference_method
from harness.report.numbers import finite
from harness.report.unfinished import UnfinishedRun, classify_runs, no_finished_message
from harness.tracking.client import check_store_exists, redact_uri

SEQUENCE_FILTER = "tags.`harness.kind` = 'sequence'"
# A logged metric and the one recomputed from the matrix agree up to float noise of the logging path.
_CONSISTENCY_TOL = 1e-6


@dataclass
class SequenceRun:
    """One finished parent run (a whole task sequence) as the report needs it."""

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
    reference: bool = False  # a reference row (one multi-task stage), never ranked
    documents: dict | None = None  # documents.json (per-document scores) when logged and consistent with R
    not_learned: list[str] | None = None  # tasks whose own-stage score did not clear base + learn_margin (None: not judged)
    learn_margin: float = LEARN_MARGIN


@dataclass
class ExperimentRuns:
    """What the report reads from one experiment: the loaded finished runs and the skipped ones."""

    client: Any
    name: str
    runs: list[SequenceRun]
    skipped: list[tuple[str, str, str]]  # (run id, run name, status) of runs not FINISHED
    interrupted: list[UnfinishedRun] = field(default_factory=list)  # KILLED + harness.interrupted
    running: list[UnfinishedRun] = field(default_factory=list)  # RUNNING: another process works on them
    merges: list[MergeRun] = field(default_factory=list)  # finished `harness merge` parents
    merge_skipped: list[tuple[str, str, str]] = field(default_factory=list)  # merge parents not FINISHED


@contextlib.contextmanager
def quiet_mlflow():
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
    """Every active run matching filter_string, oldest first, following the page tokens."""
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
        if any(_search_all_runs(client, exp.experiment_id, f, max_total=1) for f in (SEQUENCE_FILTER, MERGE_FILTER)):
            found.append(exp)
    return found


def _pick_experiment(client, experiment: str | None, uri: str):
    """The named experiment, or the only one with sequence or merge runs; HarnessError lists the choices."""
    harness_exps = _harness_experiments(client)
    names = sorted(e.name for e in harness_exps)
    listing = ", ".join(names) if names else "(none)"
    if experiment is None:
        if len(harness_exps) == 1:
            return harness_exps[0]
        if not harness_exps:
            raise HarnessError(f"no harness sequence runs (nor merge runs) in {redact_uri(uri)}: "
                               "run `make run-sequence` (or `harness merge`) first")
        raise HarnessError(
            f"{len(harness_exps)} harness experiments in {redact_uri(uri)}: {listing}; pick one with --experiment NAME"
        )
    exp = client.get_experiment_by_name(experiment)
    if exp is None or exp.lifecycle_stage != "active":
        raise HarnessError(f"no experiment named {experiment!r} in {redact_uri(uri)}; harness experiments: {listing}")
    return exp


def read_experiment(experiment: str | None, results_dir: Path, uri: str) -> ExperimentRuns:
    """Load the FINISHED sequence and merge runs of one experiment (and list the unfinished ones); HarnessError when
    there are none of either kind.

    experiment=None picks the only harness experiment in the store. Store failures become
    TrackingError naming the (redacted) URI.
    """
    check_store_exists(results_dir, uri)
    from mlflow.exceptions import MlflowException

    try:
        client = _client(uri)
        exp = _pick_experiment(client, experiment, uri)
        all_runs = _search_all_runs(client, exp.experiment_id, SEQUENCE_FILTER)
        merge_runs = _search_all_runs(client, exp.experiment_id, MERGE_FILTER)
    except HarnessError:
        raise
    except (MlflowException, OSError) as exc:
        raise TrackingError(f"cannot read the tracking store {redact_uri(uri)}: {exc}") from exc

    try:
        finished, interrupted, running = classify_runs(client, all_runs)
    except (MlflowException, OSError) as exc:
        raise TrackingError(f"cannot read runs of {exp.name!r} from {redact_uri(uri)}: {exc}") from exc
    skipped = [(r.info.run_id, r.info.run_name, r.info.status) for r in all_runs if r.info.status != "FINISHED"]
    merge_finished = [r for r in merge_runs if r.info.status == "FINISHED"]
    merge_skipped = [(r.info.run_id, r.info.run_name, r.info.status) for r in merge_runs if r.info.status != "FINISHED"]
    if not finished and not merge_finished:
        msg = no_finished_message(exp.name, skipped, interrupted, running)
        if merge_runs:
            msg += f"; nor FINISHED merge runs ({len(merge_runs)} not finished: rerun `harness merge`, it resumes)"
        raise HarnessError(msg)
    try:
        with tempfile.TemporaryDirectory(prefix="harness-report-") as tmp:
            runs = [_load_run(client, r, Path(tmp)) for r in finished]
            merges = [load_merge_run(client, r, Path(tmp)) for r in merge_finished]
    except (MlflowException, OSError) as exc:
        raise TrackingError(f"cannot read runs of {exp.name!r} from {redact_uri(uri)}: {exc}") from exc
    return ExperimentRuns(client, exp.name, runs, skipped, interrupted, running, merges, merge_skipped)


def _download_artifacts(client, run_id: str, dst: Path, notes: list[str]) -> tuple[set[str], Any, Any, Any, Any]:
    """(artifact names, matrix.json, summary.json, diagnostics.json, documents.json); problems are appended to notes."""
    names = ("matrix.json", "summary.json", "diagnostics.json", "documents.json")
    available, parsed = download_jsons(client, run_id, names, dst, notes)
    return available, parsed[0], parsed[1], parsed[2], parsed[3]


def _usable_documents(docs: Any, tasks: list[str], R: np.ndarray, notes: list[str]) -> dict | None:
    """documents.json when it recomputes every cell of R exactly; otherwise None, with a note (absent: no note)."""
    if docs is None:
        return None
    try:
        problems = check_documents(docs, R) if list(docs["tasks"]) == list(tasks) else ["its tasks differ from the matrix's"]
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        problems = [f"malformed ({type(exc).__name__}: {exc})"]
    if problems:
        notes.append(f"documents.json does not recompute the matrix ({problems[0]}); intervals resample seeds only")
        return None
    return docs


def _matrix_from_metrics(client, run, tasks: list[str], reference: bool) -> np.ndarray:
    """R from the acc/<task> histories: stages 0..T of a sequence, 0..last logged (at least 1) of a reference."""
    T = len(tasks)
    values = [(m.step, j, m.value) for j, task in enumerate(tasks)
              for m in client.get_metric_history(run.info.run_id, f"acc/{task}")]
    n_rows = max([1] + [s for s, _, _ in values if s >= 0]) + 1 if reference else T + 1
    R = np.full((n_rows, T), np.nan)
    for step, j, value in values:
        if 0 <= step < n_rows:
            R[step, j] = value
    return R


def _matrix_from_json(matrix: dict, reference: bool) -> tuple[list[str], np.ndarray]:
    """(tasks, R): T+1 rows for a sequence; a reference keeps its own stages (2 rows: base, all tasks)."""
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


def _accuracy_matrix(client, run, available, matrix, summary, notes, reference) -> tuple[list[str], np.ndarray, str]:
    """(tasks, R, where R came from): matrix.json when usable, else the acc/<task> histories."""
    if isinstance(matrix, dict) and "tasks" in matrix and "R" in matrix:
        try:
            tasks, R = _matrix_from_json(matrix, reference)
            return tasks, R, "matrix.json"
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            notes.append(f"matrix.json is malformed ({exc}); rebuilt from acc/<task> metrics")
    params, metrics = run.data.params, run.data.metrics
    order_str = params.get("task_order") or ",".join((summary or {}).get("tasks") or [])
    tasks = [t for t in order_str.split(",") if t]
    if not tasks:
        tasks = sorted(k[len("acc/"):] for k in metrics if k.startswith("acc/"))
    R = _matrix_from_metrics(client, run, tasks, reference)
    if "matrix.json" not in available:
        notes.append("no matrix.json artifact; matrix rebuilt from acc/<task> metrics")
    return tasks, R, "acc/<task> metrics"


def _logged(metrics: dict, summary: dict | None, name: str, summary_key: str) -> float:
    """The run's metric, else summary.json's value, else NaN."""
    if name in metrics:
        return float(metrics[name])
    v = (summary or {}).get(summary_key)
    return float(v) if finite(v) else float("nan")


def _consistency_notes(logged: dict[str, float], R: np.ndarray, reference: bool = False) -> list[str]:
    """Where a logged metric disagrees with the scheduler's own definitions (harness.metrics) on R."""
    try:
        R = np.asarray(R, dtype=float)
        recomputed = {**summarize_reference(R), "LA": None} if reference else {**summarize(R), "LA": learning_accuracy(R)}
    except ValueError:  # a malformed matrix defines nothing
        recomputed = {m: None for m in METRICS}
    notes = []
    for m in METRICS:
        lv, rv = logged[m], recomputed[m]
        if finite(lv) and rv is not None and abs(lv - rv) > _CONSISTENCY_TOL:
            notes.append(f"logged {m} = {lv:.6f} but the matrix gives {rv:.6f}")
        elif finite(lv) != (rv is not None):
            notes.append(
                f"{m} is {'logged' if finite(lv) else 'not logged'} but the matrix "
                f"{'defines' if rv is not None else 'does not define'} it"
            )
    return notes


def _load_run(client, run, tmp: Path) -> SequenceRun:
    info, data = run.info, run.data
    tags, params, metrics = dict(data.tags), dict(data.params), dict(data.metrics)
    notes: list[str] = []
    available, matrix, summary, diagnostics, documents = _download_artifacts(client, info.run_id, tmp / info.run_id, notes)
    summary = summary if isinstance(summary, dict) else None
    method = tags.get("harness.method") or params.get("method") or (summary or {}).get("method") or "unknown"
    reference = _is_reference(tags, summary, str(method))
    tasks, R, source = _accuracy_matrix(client, run, available, matrix, summary, notes, reference)
    seed = tags.get("harness.seed") or params.get("seed") or str((summary or {}).get("seed", "?"))
    order = tags.get("harness.order") or params.get("order_index") or str((summary or {}).get("order_index", "?"))
    logged = {
        "ACC": _logged(metrics, summary, "ACC", "acc"),
        "BWT": _logged(metrics, summary, "BWT", "bwt"),
        "FWT": _logged(metrics, summary, "FWT", "fwt"),
        "forgetting": _logged(metrics, summary, "forgetting", "forgetting"),
        "LA": _logged(metrics, summary, "LA", "la"),
    }
    if not finite(logged["LA"]) and not reference:  # logged since LA existed; older runs: from the matrix
        logged["LA"] = _float_or_nan(_safe(learning_accuracy, R))
    notes.extend(_consistency_notes(logged, R, reference))
    margin = float((summary or {}).get("learn_margin") or LEARN_MARGIN)
    return SequenceRun(
        run_id=info.run_id,
        run_name=info.run_name or info.run_id,
        status=info.status,
        method=str(method),
        seed=str(seed),
        order=str(order),
        tasks=list(tasks or []),
        R=R,
        metrics=logged,
        params_effective=_logged(metrics, summary, "trainable_params_effective", "trainable_params_effective"),
        params_lora_equivalent=_logged(
            metrics, summary, "trainable_params_lora_equivalent", "trainable_params_lora_equivalent"
        ),
        diagnostics=diagnostics if isinstance(diagnostics, dict) else None,
        summary=summary,
        tags=tags,
        params=params,
        start_time_ms=info.start_time,
        matrix_source=source,
        notes=notes,
        reference=reference,
        documents=_usable_documents(documents, list(tasks or []), R, notes),
        not_learned=_not_learned(summary, R, margin, tasks, reference),
        learn_margin=margin,
    )


def _safe(fn, R):
    try:
        return fn(np.asarray(R, dtype=float))
    except ValueError:  # a malformed matrix defines nothing
        return None


def _float_or_nan(v) -> float:
    return float("nan") if v is None else float(v)


def _not_learned(summary: dict | None, R: np.ndarray, margin: float, tasks: list[str], reference: bool) -> list[str] | None:
    """summary.json's not_learned, else (older runs) recomputed from the matrix; None for references and when not judged."""
    if reference:
        return None
    if summary is not None and "not_learned" in summary:
        return summary["not_learned"]
    flagged = _safe(lambda M: not_learned(M, margin), R)
    return None if flagged is None else [tasks[j] for j in flagged]


def _is_reference(tags: dict, summary: dict | None, method: str) -> bool:
    """The run's harness.reference tag, else summary.json's "reference", else what the method layer says."""
    tag = tags.get("harness.reference")
    if tag is not None:
        return str(tag).strip().lower() == "true"
    if summary is not None and isinstance(summary.get("reference"), bool):
        return summary["reference"]
    return is_reference_method(method)
