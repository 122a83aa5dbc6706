"""Merging results over seeds: a row per (method, combination), mean per-task scores, interference, verdicts.

Means and standard deviations use the sequence tables' definitions (aggregate.mean_std_n: sample
std, ddof=1, undefined for fewer than 2 seeds). Intervals and verdicts use the sequences' statistics: a merge
run is a unit whose matrix is [S[j, j]; m_j] (2 x T) and whose metrics are harness.metrics.MERGE_VALUES. The
interval over seeds and the verdicts come from harness.analysis.over_seeds (paired t over the seeds both ran,
the documents' shared noise added when every run kept its documents.json; one Holm family per combination);
the measurement interval from the documents' bootstrap (harness.analysis.statistics). The older within-noise
rule is kept as a column.
Per-task scores and interference matrices of different seeds are aligned by task name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from harness import metrics as MX
from harness.analysis import over_seeds as OS
from harness.analysis import statistics as ST
from harness.analysis.aggregate import _nanmean_std, mean_std_n, rank
from harness.analysis.documents import merge_score_arrays
from harness.analysis.intervals import compare_family
from harness.analysis.naming import display_name, method_sort_key, num_sort_key
from harness.analysis.numbers import finite
from harness.analysis.runs import MergeRun

NORM, DROP = "normalised_accuracy", "average_drop"
STD_DEFINITION = (
    "sample standard deviation (ddof=1) over the finished merge runs (seeds) of a method; null with fewer than 2"
)


CROSS_TERM_TOL = 1e-4  # relative ΔW error above which a merge is reported as having cross terms (run/merge.py)


def cross_term_tolerance() -> float:
    """The relative ΔW error above which the merge protocol reports cross terms."""
    return float(CROSS_TERM_TOL)


@dataclass
class MergeCell:
    """One method's merges with one combination, over its seeds."""

    method: str
    combination: str
    seeds: list[str]
    normalised_accuracy: dict  # mean, std, n
    average_drop: dict
    relative_error_max: float  # NaN when not logged
    cross_terms: bool  # any seed's merge above the tolerance

    def __getitem__(self, key: str):  # rows for aggregate.ranked_comparisons
        return getattr(self, key)


@dataclass
class MethodScores:
    """One method's per-task scores over seeds: the adapters alone (S[j, j]) and each merge (m_j); (mean, std, count)."""

    method: str
    tasks: list[str]
    n_runs: int
    single: tuple[np.ndarray, np.ndarray, np.ndarray]
    merged: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]


@dataclass
class MergingSummary:
    runs: list[MergeRun]  # finished merge runs, by method then seed
    skipped: list[tuple[str, str, str]]  # merge runs not FINISHED: (run id, run name, status)
    methods: list[str]
    combinations: list[str]
    cells: list[MergeCell]
    verdicts: dict[str, str]  # combination -> sentence
    paired: list[dict]  # the verdicts' evidence: comparison.json's merging "paired_comparisons"
    tolerance: float
    scores: list[MethodScores]
    interference: list[tuple[str, str, list[str], np.ndarray, int]]  # (method, combination, tasks, mean I, n seeds)
    warnings: list[MergeCell] = field(default_factory=list)  # cells whose relative error exceeds the tolerance


def _stack(rows: list[dict[str, float]], tasks: list[str]) -> np.ndarray:
    return np.array([[row.get(t, np.nan) for t in tasks] for row in rows], dtype=float).reshape(len(rows), len(tasks))


def _cell(method: str, combination: str, runs: list[MergeRun], tol: float) -> MergeCell:
    entries = [r.merges[combination] for r in runs if combination in r.merges]
    errors = [e["relative_error"] for e in entries if finite(e["relative_error"])]
    cross = any(e["cross_terms"] for e in entries) or any(v > tol for v in errors)
    return MergeCell(
        method,
        combination,
        [r.seed for r in runs if combination in r.merges],
        mean_std_n([e[NORM] for e in entries]),
        mean_std_n([e[DROP] for e in entries]),
        max(errors) if errors else float("nan"),
        cross,
    )


def _method_scores(method: str, runs: list[MergeRun], combinations: list[str]) -> MethodScores:
    tasks = list(dict.fromkeys(t for r in runs for t in r.tasks))
    merged = {
        c: _nanmean_std(_stack([r.merges[c]["scores"] for r in runs if c in r.merges], tasks))
        for c in combinations
        if any(c in r.merges and r.merges[c]["scores"] for r in runs)
    }
    return MethodScores(method, tasks, len(runs), _nanmean_std(_stack([r.single for r in runs], tasks)), merged)


def _interference(method: str, runs: list[MergeRun], combinations: list[str]) -> list:
    out = []
    for c in combinations:
        mats = [(r.tasks, r.interference[c]) for r in runs if c in r.interference]
        if not mats:
            continue
        tasks = list(dict.fromkeys(t for ts, _ in mats for t in ts))
        stack = np.full((len(mats), len(tasks), len(tasks)), np.nan)
        for k, (ts, M) in enumerate(mats):
            idx = [tasks.index(t) for t in ts]
            stack[k][np.ix_(idx, idx)] = M
        out.append((method, c, tasks, _nanmean_std(stack)[0], len(mats)))
    return out


def merge_unit(run: MergeRun, combination: str) -> ST.Unit:
    """One merge run's result with one combination as the statistics see it: R = [S[j, j]; m_j]."""
    e = run.merges[combination]
    R = np.array([[run.single.get(t, np.nan) for t in run.tasks], [e["scores"].get(t, np.nan) for t in run.tasks]])
    scores = merge_score_arrays(run.documents, combination) if run.documents else None
    ids = {t: list(run.documents["documents"][t]["doc_ids"]) for t in run.tasks} if scores else None
    return ST.Unit(key=run.seed, tasks=list(run.tasks), R=R, scores=scores, doc_ids=ids, functions=MX.MERGE_VALUES)


def _add_intervals(cell: MergeCell, units: list[ST.Unit]) -> None:
    """The cell's normalised accuracy and average drop get ci_low/ci_high (over seeds: the t interval) and
    measurement_low/high with ci_resampled (the documents' bootstrap, seeds fixed)."""
    for key, e in ST.estimates(units, (NORM, DROP)).items():
        s = OS.seed_interval(units, key)
        getattr(cell, key).update(
            {
                "ci_low": s.low,
                "ci_high": s.high,
                "measurement_low": e.low,
                "measurement_high": e.high,
                "ci_resampled": e.resampled,
            }
        )


def _verdict(combination: str, cells: list[MergeCell], units: dict) -> tuple[str, list[dict]]:
    """(sentence, paired comparisons): the best method's normalised accuracy with this combination against each other."""
    head = f"{combination}: normalised accuracy (higher is better)"
    cands = [c for c in cells if c.combination == combination and finite(c.normalised_accuracy["mean"])]
    if len(cands) < 2:
        who = f"defined for {display_name(cands[0].method)} only" if cands else "not defined for any method"
        return f"{head}: {who}; nothing to compare.", []
    ranked = rank(NORM, cands, True)
    best = ranked[0]
    pairs = compare_family(
        NORM,
        [
            (
                best,
                other,
                units[best.method, combination],
                units[other.method, combination],
                {"combination": combination},
            )
            for other in ranked[1:]
        ],
        higher=True,
    )
    return f"{head}: " + "; ".join(s for s, _ in pairs) + ".", [entry for _, entry in pairs]


def summarize_merging(merges: list[MergeRun], skipped: list[tuple[str, str, str]]) -> MergingSummary:
    runs = sorted(merges, key=lambda r: (method_sort_key(r.method), num_sort_key(r.seed)))
    methods = list(dict.fromkeys(r.method for r in runs))
    combinations = list(dict.fromkeys(c for r in runs for c in r.merges))
    tol = cross_term_tolerance()
    by_method = {m: [r for r in runs if r.method == m] for m in methods}
    cells = [
        _cell(m, c, by_method[m], tol)
        for m in methods
        for c in combinations
        if any(c in r.merges for r in by_method[m])
    ]
    units = {
        (c.method, c.combination): [
            merge_unit(r, c.combination) for r in by_method[c.method] if c.combination in r.merges
        ]
        for c in cells
    }
    for c in cells:
        _add_intervals(c, units[c.method, c.combination])
    verdicts = {c: _verdict(c, cells, units) for c in combinations}
    return MergingSummary(
        runs=runs,
        skipped=list(skipped),
        methods=methods,
        combinations=combinations,
        cells=cells,
        verdicts={c: v[0] for c, v in verdicts.items()},
        paired=[row for v in verdicts.values() for row in v[1]],
        tolerance=tol,
        scores=[_method_scores(m, by_method[m], combinations) for m in methods],
        interference=[x for m in methods for x in _interference(m, by_method[m], combinations)],
        warnings=[c for c in cells if c.cross_terms],
    )


def merging_json(ms: MergingSummary) -> dict:
    """comparison.json's "merging": per method and combination, mean/std/n, largest ΔW error, cross terms."""
    return {
        "std_definition": STD_DEFINITION,
        "cross_term_tolerance": ms.tolerance,
        "combinations": ms.combinations,
        "methods": {
            m: {
                "display_name": display_name(m),
                "seeds": [r.seed for r in ms.runs if r.method == m],
                "combinations": {
                    c.combination: {
                        NORM: c.normalised_accuracy,
                        DROP: c.average_drop,
                        "relative_error": {"max": c.relative_error_max},
                        "cross_terms": {"any": c.cross_terms},
                    }
                    for c in ms.cells
                    if c.method == m
                },
            }
            for m in ms.methods
        },
        "verdicts": ms.verdicts,
        # The verdicts' evidence: the best method against each other one per combination (paired bootstrap).
        "paired_comparisons": ms.paired,
        # I[i][j] averaged over seeds (rows, columns: tasks); null on the diagonal and for pairs not merged.
        "interference": {
            m: {c: {"tasks": tasks, "mean": M, "n": n} for mm, c, tasks, M, n in ms.interference if mm == m}
            for m in dict.fromkeys(x[0] for x in ms.interference)
        },
        "cross_term_warnings": [
            {"method": c.method, "combination": c.combination, "relative_error": c.relative_error_max}
            for c in ms.warnings
        ],
        "runs": [
            {
                "run_id": r.run_id,
                "method": r.method,
                "seed": r.seed,
                "tasks": r.tasks,
                "single": r.single,
                "merges": r.merges,
            }
            for r in ms.runs
        ],
        "skipped_runs": [{"run_id": i, "run_name": n, "status": s} for i, n, s in ms.skipped],
    }


def merging_rows(ms: MergingSummary) -> list[dict]:
    """The rows of merging.csv: one per (method, combination)."""
    return [
        {
            "method": c.method,
            "display_name": display_name(c.method),
            "combination": c.combination,
            "seeds": " ".join(c.seeds),
            **{
                f"{k}_{s}": getattr(c, k).get(s)
                for k in (NORM, DROP)
                for s in ("mean", "std", "n", "ci_low", "ci_high")
            },
            "relative_error_max": c.relative_error_max,
            "cross_terms": c.cross_terms,
        }
        for c in ms.cells
    ]
