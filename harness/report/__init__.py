"""Forgetting report: read an experiment's run folders, write a static HTML report.

`write_report(experiment, results_dir, tracking_uri)` writes `<results_dir>/<experiment>/report/`:
index.html (opens from disk, no network: figures are relative PNG files in the same folder, CSS is
inline), the figures as PNG, comparison.csv / comparison.json (ACC, BWT, FWT, forgetting per method,
mean and std over seeds and orders) and mean_matrices.json (the order-0 accuracy matrices averaged
over seeds). The figures are also logged to every finished parent run in MLflow under "report/".

The numbers come from the run folders (summary.json, matrix.json, diagnostics.json, documents.json,
state.json; merge folders' summary.json and config.yaml). MLflow is read only for what lives there
alone: each run's start time (the page's dates), how an unfinished run ended (KILLED, FAILED) and a
merge run's git commit. Without a store the report is written all the same and says so.

An experiment's `harness merge` runs give the Merging section: normalised accuracy and average drop per
method x combination (mean ± std over seeds, merging.csv and comparison.json "merging"), the per-task
single-vs-merged scores (merge_scores.png), the pairwise interference heatmaps when pairs were merged
(merge_interference.png), the merges whose ΔW has cross terms, and a verdict per combination. An
experiment may hold either kind of run, or both.

Methods, their display names and order come from harness.methods.METHODS. A reference method
(e.g. mtl) is a row marked reference: ACC only, never ranked, no curve. Only finished sequences
(a summary.json that verifies) are aggregated; interrupted ones (no summary, lock free) and running
ones (lock held) are listed apart, with how to resume the interrupted ones.

Verdicts come from paired bootstrap comparisons over seeds and test documents (harness.analysis.intervals;
docs/statistics.md); the older std rule is kept as a column (verdicts_std_rule).

Modules: read (one experiment) over folders (sequence folders), merge_folders and tracked (what only
MLflow has); the analysis is harness/analysis/ (aggregate, intervals, sensitivity, merging, general_ce:
pure functions over the runs); figures and merge_figures (every Matplotlib figure, on harness/heatmap.py),
tables, page and merge_page (the Merging section) + templates/report.html.j2 (index.html), dates (the run
dates), write (the folder).
"""

from harness.report.write import write_report

__all__ = ["write_report"]
