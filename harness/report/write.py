"""The report folder: read the run folders, aggregate, write figures, tables and index.html, log the figures.

Sequence runs give comparison.csv, mean_matrices.json and the sequence figures; merge runs give
merging.csv, comparison.json's "merging" and the merge_*.png figures. A report of only one kind
has only its files (the other kind's files left from an earlier report are removed).
"""

from __future__ import annotations

import datetime as _dt
import json
import tempfile
from pathlib import Path

import pandas as pd

from harness.analysis.aggregate import aggregate, comparison_rows, diagnostic_matrices, method_matrices, verdicts
from harness.analysis.general_ce import curves as general_curves
from harness.analysis.intervals import (
    STATISTICS_NOTE,
    add_intervals,
    cell_intervals,
    general_ce_verdicts,
    not_learned_notes,
    paired_verdicts,
    units_by_method,
)
from harness.analysis.merging import MergingSummary, merging_json, merging_rows, summarize_merging
from harness.analysis.naming import HIGHER_IS_BETTER, METRICS, method_sort_key
from harness.analysis.numbers import json_clean
from harness.analysis.sensitivity import SELECTION_CRITERION, select_variants
from harness.analysis.statistics import LEVEL, N_BOOT, SEED
from harness.errors import HarnessError
from harness.io import atomic_write_bytes, atomic_write_text
from harness.report.figures import general_figure, method_colors, report_figures, sensitivity_figure
from harness.report.merge_figures import merge_figures
from harness.report.page import PageData, render_page
from harness.report.read import ExperimentRuns, read_experiment
from harness.report.tables import sensitivity_table
from harness.report.tracked import quiet_mlflow
from harness.tracking.client import default_tracking_uri, redact_uri

_STD_DEFINITION = (
    "sample standard deviation (ddof=1) over all finished runs (seeds x orders) of a method; "
    "null with fewer than 2 values"
)


def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(json_clean(obj), indent=2, allow_nan=False) + "\n")


def _write_figures(report_dir: Path, figures: dict[str, bytes]) -> None:
    """Write the PNGs and remove older ones this report no longer has (e.g. diagnostics gone)."""
    for name, data in figures.items():
        atomic_write_bytes(report_dir / name, data)
    for stale in report_dir.glob("*.png"):
        if stale.name not in figures:
            stale.unlink()


def _write_tables(
    report_dir: Path,
    exp: ExperimentRuns,
    df,
    rows,
    verdict,
    columns,
    n_rows,
    mms,
    now,
    merging: MergingSummary | None = None,
    grid: dict | None = None,
    stats: dict | None = None,
    cells: dict | None = None,
) -> None:
    """comparison.json, plus comparison.csv and mean_matrices.json (sequence runs) and merging.csv (merge runs)."""
    merge_part = {"merging": merging_json(merging)} if merging else {}
    _write_json(
        report_dir / "comparison.json",
        {
            "experiment": exp.name,
            "generated_at": now.isoformat(),
            "std_definition": _STD_DEFINITION,
            "units": "fractions in [-1, 1]",
            "higher_is_better": {m: HIGHER_IS_BETTER[m] for m in METRICS},
            "methods": rows,
            "verdicts": verdict,
            "runs": df.to_dict(orient="records") if df is not None else [],
            "skipped_runs": [{"run_id": i, "run_name": n, "status": s} for i, n, s in exp.skipped],
            # Not aggregated: killed sequences to resume, and sequences another process is running.
            "interrupted_runs": [u.as_json() for u in exp.interrupted],
            "running_runs": [u.as_json() for u in exp.running],
            # The rows of comparison.csv (one level, one per method; reference rows marked).
            "rows": comparison_rows(rows),
            # The verdicts' evidence (paired bootstrap), the older std-rule sentences, tasks a run did not learn.
            **(stats or {}),
            **merge_part,
            # A grid experiment: one row per method x variant, and which variant each method is compared at.
            **(grid or {}),
        },
    )
    _remove_stale(report_dir, ("comparison.csv", "mean_matrices.json") if not exp.runs else ())
    _remove_stale(report_dir, ("merging.csv",) if not merging else ())
    if merging:
        merging_csv = pd.DataFrame(merging_rows(merging)).to_csv(index=False, float_format="%.6g")
        atomic_write_text(report_dir / "merging.csv", merging_csv)
    if not exp.runs:
        return
    csv = pd.DataFrame(comparison_rows(rows)).to_csv(index=False, float_format="%.6g")
    atomic_write_text(report_dir / "comparison.csv", csv)
    _write_json(
        report_dir / "mean_matrices.json",
        {
            "columns": columns,
            "stages": list(range(n_rows)),
            "methods": {
                mm.method: {
                    "order": mm.order,
                    "seeds": mm.seeds,
                    "task_order": mm.tasks,
                    "reference": mm.reference,
                    "mean": mm.mean,
                    "std": mm.std,
                    "count": mm.count,
                    "ci_low": (cells or {}).get(mm.method, (None, None))[0],
                    "ci_high": (cells or {}).get(mm.method, (None, None))[1],
                }
                for mm in mms
            },
        },
    )


def _remove_stale(report_dir: Path, names) -> None:
    for name in names:
        (report_dir / name).unlink(missing_ok=True)


def _log_figures(exp: ExperimentRuns, figures: dict[str, bytes]) -> str:
    """Log the figures to every finished parent run under report/; return the page's note on it."""
    if exp.tracked.client is None:
        return f"the figures are not logged ({exp.tracked.problem})."
    failures = []
    parents = [r for r in [*exp.runs, *exp.merges] if r.run_id in exp.tracked.runs]
    with tempfile.TemporaryDirectory(prefix="harness-report-log-") as stage_dir:
        for name, data in figures.items():
            Path(stage_dir, name).write_bytes(data)
        for r in parents:
            try:
                exp.tracked.client.log_artifacts(r.run_id, stage_dir, artifact_path="report")
            except Exception as exc:  # noqa: BLE001 - the report on disk stays valid
                failures.append(f"{r.run_id}: {type(exc).__name__}: {exc}")
    if failures:
        return f"logging the figures to MLflow failed for {len(failures)} run(s): " + "; ".join(failures[:3])
    missing = len(exp.runs) + len(exp.merges) - len(parents)
    unknown = f" ({missing} finished run(s) not in MLflow yet: `harness sync <folder>` mirrors them)" if missing else ""
    return f"the figures are also logged to each of the {len(parents)} parent runs under report/{unknown}."


def _source(exp: ExperimentRuns) -> str:
    """Where the page's numbers come from: the folders, and MLflow for the run dates (or why it was not read)."""
    mlflow = redact_uri(exp.tracked.uri) if exp.tracked.problem is None else f"not read: {exp.tracked.problem}"
    return f"the run folders in {exp.folder} (MLflow, for the run dates: {mlflow})"


def write_report(
    experiment: str | None,
    results_dir: Path,
    tracking_uri: str | None = None,
    *,
    log_to_mlflow: bool = True,
    generated_at: _dt.datetime | None = None,
    baseline: str | None = None,
) -> Path:
    """Write the forgetting report of one experiment; return the path of its index.html.

    The numbers come from the run folders under results_dir/<experiment>/; MLflow gives only the run dates.
    experiment=None picks the only experiment folder with sequence or merge runs (HarnessError when there
    are none or several). The figures are also logged to every finished parent run under "report/"
    (log_to_mlflow=False skips that). generated_at (UTC, default now) is the time the page and
    comparison.json state. baseline (a method of the experiment's sequence runs; HarnessError otherwise) is
    also compared with every other method: comparison.json's "verdicts_baseline" and "paired_comparisons"
    rows with role "baseline", the page's "Against BASELINE" list. Prints nothing.
    """
    with quiet_mlflow():
        return _write_report(
            experiment, Path(results_dir).resolve(), tracking_uri, log_to_mlflow, generated_at, baseline
        )


def _write_report(experiment, results_dir: Path, tracking_uri, log_to_mlflow: bool, now, baseline: str | None) -> Path:
    uri = default_tracking_uri(results_dir, tracking_uri)
    exp = read_experiment(experiment, results_dir, uri)
    runs, vrows, chosen, grid = select_variants(exp.runs)  # variants are never averaged together
    methods = sorted({r.method for r in runs}, key=method_sort_key)
    if baseline is not None and baseline not in methods:  # refused before anything is written
        raise HarnessError(
            f"--baseline {baseline}: experiment {exp.name!r} has no finished sequence run of that method "
            f"(it has: {', '.join(methods) or 'none'}); pick one of those, or leave --baseline out"
        )
    report_dir = exp.folder / "report"
    report_dir.mkdir(parents=True, exist_ok=True)

    by_method = {m: [r for r in runs if r.method == m] for m in methods}
    # Only merge runs: no sequence aggregates, tables or figures (page: has_sequences is false).
    df, rows = aggregate(runs) if runs else (None, [])
    units = units_by_method(by_method)
    add_intervals(rows, units)
    std_verdict = verdicts(rows) if runs else {}
    paired_verdict, paired, against = paired_verdicts(rows, units, baseline)
    verdict = {**std_verdict, **paired_verdict}  # the std rule's sentence stays where nothing can be compared
    ce_sentences, ce_table = general_ce_verdicts(by_method, baseline)
    stats = {
        "verdicts_std_rule": std_verdict,
        "paired_comparisons": paired,
        "not_learned": not_learned_notes(runs),
        "verdicts_general_ce": ce_sentences,
        "general_ce_comparisons": ce_table,
        "baseline": baseline,
        "verdicts_baseline": against,
        "statistics": {"method": STATISTICS_NOTE.format(n=N_BOOT), "replicates": N_BOOT, "level": LEVEL, "seed": SEED},
    }
    columns, n_rows, mms = method_matrices(by_method) if runs else ([], 0, [])
    cells = {mm.method: cell_intervals(mm, by_method[mm.method], columns) for mm in mms}
    mask_diag = diagnostic_matrices(by_method, "mask_overlap")
    sub_diag = diagnostic_matrices(by_method, "subspace_overlap")
    merging = summarize_merging(exp.merges, exp.merge_skipped) if exp.merges else None

    figures = report_figures(methods, rows, columns, n_rows, mms, mask_diag, sub_diag) if runs else {}
    figures.update(merge_figures(merging) if merging else {})
    ce_png = general_figure(general_curves(by_method), method_colors(methods))
    if ce_png:
        figures["general_ce.png"] = ce_png
    sens_png = sensitivity_figure(vrows) if vrows else None
    if sens_png:
        figures["sensitivity.png"] = sens_png
    _write_figures(report_dir, figures)
    now = now or _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    _write_tables(report_dir, exp, df, rows, verdict, columns, n_rows, mms, now, merging, grid, stats, cells)
    log_note = _log_figures(exp, figures) if log_to_mlflow else "not logged to MLflow (log_to_mlflow=False)."

    page = PageData(
        exp.name,
        _source(exp),
        runs,
        exp.skipped,
        by_method,
        rows,
        verdict,
        mms,
        list(figures),
        mask_diag,
        sub_diag,
        now,
        log_note,
        exp.interrupted,
        exp.running,
        merging,
        sensitivity_table(vrows, chosen) if vrows else None,
        grid["verdicts_per_variant"] if grid else [],
        grid["recipe_verdict"] if grid else None,
        paired,
        grid["selection"]["criterion"] if grid else SELECTION_CRITERION,
        baseline,
        against,
        ce_sentences,
    )
    index = report_dir / "index.html"
    atomic_write_text(index, render_page(page))
    return index
