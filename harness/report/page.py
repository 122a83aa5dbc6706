"""The report's index.html: the table rows and sentences it needs, rendered by templates/report.html.j2.

The sequence sections appear when the experiment has finished sequence runs, the Merging section
(harness/report/merge_page.py) when it has finished merge runs (either or both).

The page opens from disk with no network: figures are relative PNG files in the same folder and
the CSS is inline in the template.
"""

from __future__ import annotations

import datetime as _dt
import html
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
from markupsafe import Markup, escape

from harness.analysis.aggregate import MethodMatrix
from harness.analysis.intervals import STATISTICS_NOTE
from harness.analysis.merging import MergingSummary
from harness.analysis.naming import (
    HIGHER_IS_BETTER,
    METRICS,
    REFERENCE_LABEL,
    display_name,
    method_sort_key,
    num_sort_key,
    uniq,
)
from harness.analysis.numbers import finite, fmt, fmt_pm
from harness.analysis.runs import SequenceRun, UnfinishedRun
from harness.analysis.sensitivity import SELECTION_CRITERION
from harness.analysis.statistics import N_BOOT
from harness.metrics import LIBRARY_NOTE, MERGE_DEFINITIONS, METRIC_DEFINITIONS
from harness.report.dates import run_dates
from harness.report.merge_page import merging_context
from harness.report.tables import (
    COST_HEADERS,
    GENERAL_HEADERS,
    GENERAL_TASK_HEADERS,
    PAIRED_HEADERS,
    STRENGTH_HEADERS,
    cost_rows,
    fmt_metric,
    general_rows,
    general_task_rows,
    not_learned_sentences,
    paired_table_rows,
    strength_rows,
)

_TEMPLATES = Path(__file__).with_name("templates")
# The adapter settings shown per method, from the run parameters.
_KNOBS = ["rank", "alpha", "targets", "mask_strategy", "mask_density", "overlap_policy", "a_mode"]


@dataclass
class PageData:
    """Everything index.html shows, as computed by the rest of the report."""

    experiment: str
    source: str  # where the numbers were read: the run folders (and the MLflow store, for what lives only there)
    runs: list[SequenceRun]
    skipped: list[tuple[str, str, str]]
    by_method: dict[str, list[SequenceRun]]
    rows: list[dict]
    verdicts: dict[str, str]
    mms: list[MethodMatrix]
    figures: list[str]  # names of the PNG files written
    mask_diag: list
    sub_diag: list
    now: _dt.datetime
    log_note: str
    interrupted: list[UnfinishedRun] = field(default_factory=list)
    running: list[UnfinishedRun] = field(default_factory=list)
    merging: MergingSummary | None = None  # None: no finished merge runs
    sensitivity: tuple[list[str], list[list[str]], int] | None = (
        None  # a grid: (headers, rows per method x variant, text columns)
    )
    variant_verdicts: list[str] = field(default_factory=list)  # a grid: the methods compared within each variant
    recipe_verdict: str | None = None  # a grid: whether those verdicts agree across variants
    paired: list[dict] = field(default_factory=list)  # comparison.json's paired_comparisons (the verdicts' evidence)
    selection_criterion: str = SELECTION_CRITERION  # a grid: how each method's variant was chosen, and on which split
    baseline: str | None = None  # `harness report --baseline`: the method also compared with every other one
    baseline_verdicts: dict[str, str] = field(default_factory=dict)  # metric -> how the baseline stands against each
    general_ce_verdicts: list[str] = field(default_factory=list)  # the CE rise's tests over seeds (one Holm family)


def _escape(value):
    """Autoescape every {{ }} with html.escape (&#x27; for '), not markupsafe's (&#39;).

    Both are correct HTML; html.escape keeps the page byte-identical to the reports written
    before the template existed. Markup (a macro's output) is already escaped.
    """
    if hasattr(value, "__html__"):
        return value
    return Markup(html.escape(str(value)))


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(_TEMPLATES),
        autoescape=True,
        finalize=_escape,
        undefined=jinja2.StrictUndefined,
        # Block tags on their own line leave nothing behind: one template line = one page line.
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def _what_was_run(d: PageData) -> list[list[str]]:
    runs = d.runs

    def tagvals(key: str, param: str | None = None) -> str:
        vals = uniq([r.tags.get(key) or (r.params.get(param) if param else None) for r in runs])
        return ", ".join(vals) if vals else "—"

    orders = []
    for order in uniq(r.order for r in runs):
        seqs = uniq(",".join(r.tasks) for r in runs if r.order == order)
        orders.append(f"order {order}: " + " | ".join(s.replace(",", " → ") for s in seqs))
    skipped = ", ".join(f"{n or i} ({s})" for i, n, s in d.skipped)
    return [
        ["experiment", d.experiment],
        ["model", tagvals("harness.model", "model")],
        ["suite", tagvals("harness.suite", "suite")],
        [
            "methods",
            ", ".join(
                f"{display_name(m)} ({'reference, ' if any(r.reference for r in d.by_method[m]) else ''}"
                f"{len(d.by_method[m])} runs)"
                for m in d.by_method
            ),
        ],
        ["seeds", ", ".join(uniq(r.seed for r in runs))],
        ["task orders", "; ".join(orders)],
        ["precision", ", ".join(uniq(_precision_text(r.params) for r in runs))],
        ["git commit", tagvals("harness.git_commit")],
        ["date (run starts)", run_dates(runs)],
        ["finished sequence runs", str(len(runs))],
        ["skipped (not FINISHED)", f"{len(d.skipped)}: {skipped}" if d.skipped else "0"],
    ]


def _precision_text(params: dict) -> str:
    """One run's numerics as recorded (harness/precision.py); older runs did not record them."""
    if "precision.base_dtype" not in params:
        return "not recorded (before 2026-12)"
    tf32 = "TF32 in training" if str(params.get("precision.tf32_train")).lower() == "true" else "no TF32"
    return (
        f"{params.get('precision.device_type')}: base {params['precision.base_dtype']}, adapters and AdamW "
        f"{params.get('precision.adapter_dtype')}, {tf32}"
    )


def _method_cell(method: str, reference: bool):
    """The method's display name; a reference row says so visibly."""
    if not reference:
        return display_name(method)
    return Markup(f"{escape(display_name(method))} <em>{escape(REFERENCE_LABEL)}</em>")


def _metric_cell(value: str, metric: str, reference: bool) -> str:
    """A reference row defines ACC only: its other metrics do not apply (n/a), they are not missing (—)."""
    return "n/a" if reference and metric != "ACC" and value == "—" else value


def _metric_row(r: dict) -> list:
    ref = r["reference"]
    return [_method_cell(r["method"], ref), r["n_runs"]] + [_metric_cell(fmt_metric(r, m), m, ref) for m in METRICS]


def _reference_notes(rows: list[dict]) -> list[str]:
    """One sentence per reference method: what it is and its ACC, outside the verdicts (it is not ranked)."""
    return [
        f"{display_name(r['method'])} is a reference (upper bound), not ranked: trained on all tasks together in a "
        f"single stage, so only ACC applies ({fmt_pm(r['ACC']['mean'], r['ACC']['std'])}); "
        "BWT, FWT and forgetting are n/a."
        for r in rows
        if r["reference"]
    ]


def _unfinished_cells(u: UnfinishedRun) -> list:
    cmd = Markup(f"<code>{escape(u.resume_command)}</code>") if u.resume_command else "— (no harness.run_dir tag)"
    return [display_name(u.method), u.seed, u.order, u.run_name, u.progress, cmd]


def _param_cells(row: dict) -> list[str]:
    eff, lora, frac = (
        row[k] for k in ("trainable_params_effective", "trainable_params_lora_equivalent", "effective_fraction_of_lora")
    )
    return [
        _method_cell(row["method"], row["reference"]),
        f"{eff:,.0f}" if finite(eff) else "—",
        f"{lora:,.0f}" if finite(lora) else "—",
        f"{100 * frac:.2f}%" if finite(frac) else "—",
    ]


def _run_cells(r: SequenceRun) -> list[str]:
    tasks = " + ".join(r.tasks) + " (together)" if r.reference else " → ".join(r.tasks)
    return (
        [r.run_name, r.run_id, _method_cell(r.method, r.reference), r.seed, r.order, tasks]
        + [_metric_cell(fmt(r.metrics[m]), m, r.reference) for m in METRICS]
        + [r.matrix_source]
    )


def _context(d: PageData) -> dict:
    common = {
        "experiment": d.experiment,
        "generated": d.now.strftime("%Y-%m-%d %H:%M UTC"),
        "source": d.source,
        "has_sequences": bool(d.runs),
        "unfinished_headers": ["method", "seed", "order", "run", "last finished stage", "continue with"],
        "interrupted_rows": [_unfinished_cells(u) for u in d.interrupted],
        "running_rows": [_unfinished_cells(u)[:5] for u in d.running],
        "figures": d.figures,
        "merging": merging_context(d.merging) if d.merging else None,
        "merge_definitions": MERGE_DEFINITIONS,
        "log_note": d.log_note,
        "sensitivity": d.sensitivity,
        "variant_verdicts": d.variant_verdicts,
        "recipe_verdict": d.recipe_verdict,
        "selection_criterion": d.selection_criterion,
    }
    return {**common, **(_sequence_context(d) if d.runs else {})}


def _sequence_context(d: PageData) -> dict:
    runs = sorted(d.runs, key=lambda r: (method_sort_key(r.method), num_sort_key(r.order), num_sort_key(r.seed)))
    return {
        "info_rows": _what_was_run(d),
        "knob_headers": ["method"] + _KNOBS,
        "knob_rows": [
            [display_name(m)] + [", ".join(uniq(r.params.get(k) for r in d.by_method[m])) or "—" for k in _KNOBS]
            for m in d.by_method
        ],
        "verdicts": [d.verdicts[m] for m in METRICS],
        "baseline": display_name(d.baseline) if d.baseline else None,
        "baseline_verdicts": [d.baseline_verdicts[m] for m in METRICS if m in d.baseline_verdicts],
        "paired_headers": PAIRED_HEADERS,
        "paired_rows": paired_table_rows(d.paired),
        "statistics_note": STATISTICS_NOTE.format(n=N_BOOT),
        "not_learned": not_learned_sentences(d.runs),
        "general_headers": GENERAL_HEADERS,
        "general_rows": general_rows(d.by_method),
        "general_task_headers": GENERAL_TASK_HEADERS,
        "general_task_rows": general_task_rows(d.by_method),
        "general_ce_verdicts": d.general_ce_verdicts,
        "metric_headers": ["method", "runs"] + [f"{m} ({'↑' if HIGHER_IS_BETTER[m] else '↓'})" for m in METRICS],
        "metric_rows": [_metric_row(r) for r in d.rows],
        "reference_notes": _reference_notes(d.rows),
        "reference_names": ", ".join(display_name(r["method"]) for r in d.rows if r["reference"]),
        "several_seeds": any(len(mm.seeds) > 1 for mm in d.mms),
        "several_orders": len({r.order for r in d.runs}) > 1,
        "param_rows": [_param_cells(r) for r in d.rows],
        "cost_headers": COST_HEADERS,
        "cost_rows": cost_rows(d.by_method),
        "strength_headers": STRENGTH_HEADERS,
        "strength_rows": strength_rows(d.by_method),
        "has_mask_overlap": bool(d.mask_diag),
        "has_subspace_overlap": bool(d.sub_diag),
        "mask_methods": ", ".join(display_name(m) for m, *_ in d.mask_diag),
        "subspace_methods": ", ".join(display_name(m) for m, *_ in d.sub_diag),
        "metric_definitions": METRIC_DEFINITIONS,
        "library_note": LIBRARY_NOTE,
        "run_headers": ["run", "run id", "method", "seed", "order", "tasks"] + list(METRICS) + ["matrix from"],
        "run_rows": [_run_cells(r) for r in runs],
        "problems": [(r, display_name(r.method), n) for r in d.runs for n in r.notes],
    }


def render_page(data: PageData) -> str:
    """The report's index.html as text."""
    return _environment().get_template("report.html.j2").render(_context(data))
