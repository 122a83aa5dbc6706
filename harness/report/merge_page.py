"""The Merging section of the report's index.html: its rows and sentences, rendered by templates/report.html.j2.

What was merged and how (methods, combinations, weight protocol, the weights chosen on validation), normalised
accuracy and average drop per method x combination, the merges whose ΔW is off Σ_i w_i s_i B_i A_i, and one row per
merge of every finished merge run. The numbers are harness.analysis.merging's; page.py puts this section in the page.
"""

from __future__ import annotations

from harness.analysis.merging import DROP, NORM, MergingSummary
from harness.analysis.naming import display_name, uniq
from harness.analysis.numbers import finite, fmt
from harness.analysis.runs import MergeRun
from harness.report.dates import run_dates
from harness.report.tables import fmt_metric

CROSS_TERMS_EXPLAINED = (
    "linear, ties and dare_* (dare_linear, dare_ties; also magnitude_prune) combine the A's and the B's separately, "
    "ΔW = (Σ_i √(w_i s_i) B_i)(Σ_j √(w_j s_j) A_j), so cross terms B_i A_j (i ≠ j) appear whenever the tasks' A's "
    "differ (LoRA's trained A's, LoRI's per-task A's). cat stacks the ranks and is exact: ΔW = Σ_i w_i s_i B_i A_i."
)


def _per_method(runs: list[MergeRun], of_runs) -> str:
    """of_runs(a method's runs) per method ("LoRA: x; LoRI-S: y"), or just the value when every method has the same."""
    per = {m: of_runs([r for r in runs if r.method == m]) or "—" for m in dict.fromkeys(r.method for r in runs)}
    if len(set(per.values())) == 1:
        return next(iter(per.values()))
    return "; ".join(f"{display_name(m)}: {v}" for m, v in per.items())


def _by_method(runs: list[MergeRun], value) -> str:
    """value(run) per method, its distinct values joined, as _per_method shows them."""
    return _per_method(runs, lambda rs: ", ".join(uniq(value(r) for r in rs)))


def _chosen_weights(runs: list[MergeRun]) -> str:
    """merge_weight_grid: the weight each combination was merged at, per method over its seeds
    ("LoRA: cat 0.5/0.75, ties 1/1 (seeds 0/1); LoRI-S: ..."; one seed: no seeds); empty without a grid. A weight with
    a * is the lowest or highest weight tried (after merge_grid_extend): the best may lie beyond it."""

    def weights(rs: list[MergeRun]) -> str:
        combos = dict.fromkeys(c for r in rs for c, e in r.merges.items() if e.get("chosen_weight") is not None)
        picks = {
            c: "/".join(
                _fmt_weight(r.merges.get(c, {}).get("chosen_weight"))
                + ("*" if r.merges.get(c, {}).get("at_grid_end") else "")
                for r in rs
            )
            for c in combos
        }
        seeds = f" (seeds {'/'.join(r.seed for r in rs)})" if len(rs) > 1 and picks else ""
        return ", ".join(f"{c} {w}" for c, w in picks.items()) + seeds

    return (
        _per_method(runs, weights)
        if any(e.get("chosen_weight") is not None for r in runs for e in r.merges.values())
        else ""
    )


def _fmt_weight(w: float | None) -> str:
    return "—" if w is None else f"{w:g}"


def _merge_info_rows(ms: MergingSummary) -> list[list[str]]:
    runs = ms.runs

    def vals(tag: str | None, param: str | None = None) -> str:
        found = uniq((r.tags.get(tag) if tag else None) or (r.params.get(param) if param else None) for r in runs)
        return ", ".join(found) if found else "—"

    skipped = ", ".join(f"{n or i} ({s})" for i, n, s in ms.skipped)
    chosen = _chosen_weights(runs)
    return [
        ["methods", ", ".join(f"{display_name(m)} ({sum(r.method == m for r in runs)} runs)" for m in ms.methods)],
        ["seeds", ", ".join(uniq(r.seed for r in runs))],
        ["tasks merged", _by_method(runs, lambda r: " + ".join(r.tasks))],
        ["combinations", ", ".join(ms.combinations) or "—"],
        [
            "weight protocol (docs/merging.md: paper = the LoRI paper's weights, tuned = chosen on validation)",
            vals(None, "merge_protocol")
            if any(r.params.get("merge_protocol") for r in runs)
            else "— (before protocols)",
        ],
        ["pairs merged (interference)", _by_method(runs, lambda r: ", ".join(r.interference) or "none")],
        [
            "weights w_i (per task; the first protocol)",
            _by_method(runs, lambda r: ", ".join(f"{w:.3g}" for w in r.weights) or "—"),
        ],
        *(
            [
                [
                    "weight chosen on the validation split (per combination)",
                    chosen
                    + (
                        " (*: the lowest or highest weight tried, after extending the grid: the best may lie beyond it)"
                        if "*" in chosen
                        else ""
                    ),
                ]
            ]
            if chosen
            else []
        ),
        ["merge density (ties, dare)", vals(None, "merge_density")],
        ["A per task / masks", f"{vals(None, 'merge_a')} / {vals(None, 'merge_masks')}"],
        ["model", vals("harness.model", "model")],
        ["suite", vals("harness.suite", "suite")],
        ["git commit", vals("harness.git_commit")],
        ["date (run starts)", run_dates(runs)],
        ["finished merge runs", str(len(runs))],
        ["skipped (not FINISHED)", f"{len(ms.skipped)}: {skipped}" if ms.skipped else "0"],
    ]


def _fmt_err(x) -> str:
    return f"{float(x):.2e}" if finite(x) else "—"


def _merge_run_rows(ms: MergingSummary) -> list[list[str]]:
    return [
        [
            r.run_name,
            r.run_id,
            display_name(r.method),
            r.seed,
            c,
            fmt(e[NORM]),
            fmt(e[DROP]),
            _fmt_err(e["relative_error"]),
            " ".join(f"{t}={e['scores'][t]:.2f}" for t in r.tasks if t in e["scores"]) or "—",
            r.source,
        ]
        for r in ms.runs
        for c, e in r.merges.items()
    ]


def merging_context(ms: MergingSummary) -> dict:
    return {
        "info_rows": _merge_info_rows(ms),
        "verdicts": [ms.verdicts[c] for c in ms.combinations],
        "headers": [
            "method",
            "combination",
            "seeds",
            "normalised accuracy (↑)",
            "average drop (↓)",
            "max ΔW rel. error",
            "cross terms",
        ],
        "rows": [
            [
                display_name(c.method),
                c.combination,
                len(c.seeds),
                fmt_metric(c, "normalised_accuracy"),
                fmt_metric(c, "average_drop"),
                _fmt_err(c.relative_error_max),
                "yes" if c.cross_terms else "no",
            ]
            for c in ms.cells
        ],
        "tolerance": f"{ms.tolerance:g}",
        "cross_terms_explained": CROSS_TERMS_EXPLAINED,
        "warnings": [
            f"{display_name(c.method)} · {c.combination}: relative error {_fmt_err(c.relative_error_max)}"
            + (
                f" (ΔW up to {100 * c.relative_error_max:.3g}% off Σ_i w_i s_i B_i A_i)"
                if finite(c.relative_error_max)
                else ""
            )
            for c in ms.warnings
        ],
        "run_headers": [
            "run",
            "run id",
            "method",
            "seed",
            "combination",
            "normalised accuracy",
            "average drop",
            "ΔW rel. error",
            "merged scores m_j",
            "from",
        ],
        "run_rows": _merge_run_rows(ms),
        "problems": [(r, display_name(r.method), n) for r in ms.runs for n in r.notes],
    }
