"""Forgetting report: read the sequences an experiment logged to MLflow, write a static HTML report.

`write_report(experiment, results_dir, tracking_uri)` writes `<results_dir>/<experiment>/report/`:
index.html (opens from disk, no network: figures are relative PNG files in the same folder, CSS is
inline), the figures as PNG, comparison.csv / comparison.json (ACC, BWT, FWT, forgetting per method,
mean and std over seeds and orders) and mean_matrices.json (the order-0 accuracy matrices averaged
over seeds). The figures are also logged to every finished parent run under "report/".

An experiment's `harness merge` runs (harness.kind=merge) give the Merging section: normalised
accuracy and average drop per method x combination (mean ± std over seeds, merging.csv and
comparison.json "merging"), the per-task single-vs-merged scores (merge_scores.png), the pairwise
interference heatmaps when pairs were merged (merge_interference.png), the merges whose ΔW has
cross terms, and a verdict per combination. An experiment may hold either kind of run, or both.

Methods, their display names and order come from harness.methods.METHODS. A reference method
(e.g. mtl, tag harness.reference) is a row marked reference: ACC only, never ranked, no curve.
Only FINISHED sequences are aggregated; interrupted (KILLED + harness.interrupted) and RUNNING
ones are listed apart, with how to resume the interrupted ones.

Verdicts come from paired bootstrap comparisons over seeds and test documents (intervals: each method's
metrics and every cell; docs/statistics.md); the older std rule is kept as a column (verdicts_std_rule).

Modules: store (reading MLflow), aggregate (over seeds), intervals (bootstrap intervals and the verdicts),
general (cross-entropy on the general text), figures (every Matplotlib figure, also the
scheduler's per-run heatmap), page + templates/report.html.j2 (index.html), write (the folder);
for merge runs merge_store (reading), merging (over seeds), merge_figures; artifacts (JSON downloads).
"""

from harness.report.write import write_report

__all__ = ["write_report"]
