"""The page's tables as text cells: paired comparisons, not-learned sentences, metric cells, variants, general ability.

The numbers come from harness.analysis; this module only formats them for index.html (harness/report/page.py).
"""

from __future__ import annotations

from harness.analysis.aggregate import mean_std_n
from harness.analysis.intervals import fmt_p
from harness.analysis.naming import METRICS, display_name, num_sort_key
from harness.analysis.numbers import finite, fmt, fmt_pm
from harness.analysis.over_seeds import MIN_SEEDS, values_interval
from harness.analysis.runs import SequenceRun
from harness.analysis.sensitivity import VariantRow
from harness.run.suite_knobs import SOURCES

GENERAL_HEADERS = ["method", "runs", "base model CE", "CE after the last stage", "rise (↓)"]
COST_HEADERS = [
    "method",
    "stages",
    "training s",
    "method s (setup + teardown)",
    "calibration s",
    "evaluation s",
    "method / training",
]
STRENGTH_HEADERS = ["method", "strength knob", "value(s)", "runs", "how the value was chosen"]
GENERAL_TASK_HEADERS = [
    "method",
    "task (general_tasks)",
    "runs",
    "base model",
    "change after the last stage (mean)",
    "95% interval over seeds",
]


def _interval(low, high) -> str:
    return f"[{low:+.3f}, {high:+.3f}]" if low is not None and high is not None else "—"


def paired_table_rows(table: list[dict]) -> list[list[str]]:
    """The page's table of paired comparisons: the test over seeds, its power, the measurement, the std rule."""
    std_words = {
        "beyond": "beyond the std",
        "within": "within the std",
        "unknown": "one run each",
        "none": "no difference",
    }
    out = []
    for c in table:
        diff = f"{c['difference']:+.3f}" if c["difference"] is not None else "—"
        decided = "yes" if c["decided"] else ("undecided" if c["p"] is not None else "—")
        needed = str(c["seeds_needed"]) if c["seeds_needed"] is not None else ("—" if c["p"] is None else "more")
        out.append(
            [
                c["metric"],
                f"{display_name(c['a'])} ({c.get('role', 'best')})",
                display_name(c["b"]),
                diff,
                _interval(c["low"], c["high"]),
                fmt_p(c["p"]),
                fmt_p(c["p_holm"]) if c["family_size"] > 1 else "—",
                decided,
                str(c["n_pairs"]),
                fmt(c["detectable_difference"]),
                needed,
                _interval(c["measurement_low"], c["measurement_high"]),
                std_words[c["std_rule"]],
            ]
        )
    return out


PAIRED_HEADERS = [
    "metric",
    "method (best or baseline)",
    "against",
    "difference (method − other)",
    "95% CI over seeds",
    "p",
    "Holm p (this metric)",
    "decided",
    "seeds",
    "detectable (80%)",
    "seeds needed",
    "measurement CI (documents)",
    "std rule (old verdict)",
]


def not_learned_sentences(runs: list[SequenceRun]) -> list[str]:
    return [
        f"{display_name(r.method)} seed {r.seed} order {r.order}: {', '.join(r.not_learned)} did not beat the base model by "
        f"{r.learn_margin:g} right after its own stage: its low final score is a training failure, not forgetting "
        f"(it counts in ACC and BWT all the same; LA shows it)."
        for r in runs
        if r.not_learned
    ]


def fmt_metric(r: dict, m: str) -> str:
    """A metric cell of the page's table: mean ± std, then the interval."""
    base = fmt_pm(r[m]["mean"], r[m]["std"])
    lo, hi = r[m].get("ci_low"), r[m].get("ci_high")
    return f"{base} [{fmt(lo)}, {fmt(hi)}]" if finite(lo) and finite(hi) else base


def sensitivity_table(rows: list[VariantRow], chosen: dict[str, str]) -> tuple[list[str], list[list[str]], int]:
    """(headers, rows, left-aligned columns) of the page's per-variant table; the chosen variant is marked."""
    knobs = sorted({k for v in rows for k in v.values})
    val = any(v.validation is not None for v in rows)
    headers = ["method", *knobs, "seeds", *METRICS, *(["validation ACC"] if val else []), "chosen"]
    out = []
    for v in rows:
        out.append(
            [
                display_name(v.method),
                *(v.values.get(k, "") for k in knobs),
                str(len(v.seeds)),
                *(fmt_pm(v.metrics[m]["mean"], v.metrics[m]["std"]) for m in METRICS),
                *([fmt_pm(v.validation["mean"], v.validation["std"]) if v.validation else "—"] if val else []),
                ("best validation ACC" if v.validation else "best ACC") if chosen.get(v.method) == v.variant else "",
            ]
        )
    return headers, out, 1 + len(knobs)  # method and the knobs are text


def general_rows(by_method: dict[str, list[SequenceRun]]) -> list[list[str]]:
    """The page's table: per method, mean ± std over runs of the base CE, the final CE and their difference."""
    out = []
    for method, runs in by_method.items():
        got = [r.summary for r in runs if r.summary and r.summary.get("general_ce_rise") is not None]
        if not got:
            continue
        base = mean_std_n([s.get("general_ce_base") for s in got])
        final = mean_std_n([s["general_ce_base"] + s["general_ce_rise"] for s in got])
        rise = mean_std_n([s["general_ce_rise"] for s in got])
        out.append(
            [
                display_name(method),
                str(len(got)),
                fmt(base["mean"]),
                fmt_pm(final["mean"], final["std"]),
                fmt_pm(rise["mean"], rise["std"]),
            ]
        )
    return out


def general_task_rows(by_method: dict[str, list[SequenceRun]]) -> list[list[str]]:
    """The page's general_tasks table: per method and task, the base score and the change after the last stage (summary.json
    general_tasks), mean over runs, with the t interval over seeds (over_seeds.values_interval) from MIN_SEEDS runs on."""
    out = []
    for method, runs in by_method.items():
        got = [r.summary["general_tasks"] for r in runs if r.summary and r.summary.get("general_tasks")]
        for task in sorted({t for g in got for t in g}):
            changes = [g[task]["change"] for g in got if task in g]
            base = mean_std_n([g[task]["base"] for g in got if task in g])["mean"]
            iv = values_interval(changes)
            interval = _interval(iv.low, iv.high) if len(changes) >= MIN_SEEDS else f"— (under {MIN_SEEDS} runs)"
            out.append([display_name(method), task, str(len(changes)), fmt(base), f"{iv.mean:+.3f}", interval])
    return out


def cost_rows(by_method: dict[str, list[SequenceRun]]) -> list[list[str]]:
    """The page's cost table: per method, the mean over its trained stages (all runs) of the seconds each stage spent
    training, in the method's own stage hooks (InfLoRA's subspace, EWC's Fisher, a mask: stage.json method_setup_s +
    method_teardown_s), in a magnitude mask's calibration run and evaluating, and the method's share of training."""
    out = []
    for method, runs in by_method.items():
        stages = [c for r in runs for c in (r.stage_costs or [])]
        if not stages:
            continue
        mean = lambda key: sum(key(c) for c in stages) / len(stages)  # noqa: E731
        train, own = mean(lambda c: c["train_s"]), mean(lambda c: c["method_setup_s"] + c["method_teardown_s"])
        out.append(
            [
                display_name(method),
                str(len(stages)),
                f"{train:.1f}",
                f"{own:.1f}",
                f"{mean(lambda c: c['calibration_s']):.1f}",
                f"{mean(lambda c: c['eval_s']):.1f}",
                f"{100 * own / train:.1f}%" if train > 0 else "—",
            ]
        )
    return out


def strength_rows(by_method: dict[str, list[SequenceRun]]) -> list[list[str]]:
    """Per baseline with a strength knob: the value(s) its runs used and where each came from (summary.json
    `strength`: tuned on the suite's validation split, the knob's untuned default, or set by the experiment)."""
    out = []
    for method, runs in by_method.items():
        records = [r.summary.get("strength") for r in runs if r.summary and r.summary.get("strength")]
        if not records:
            continue
        values = sorted({str(s["value"]) for s in records}, key=num_sort_key)
        sources = sorted({SOURCES.get(s["source"], s["source"]) for s in records})
        out.append([display_name(method), records[0]["knob"], ", ".join(values), str(len(records)), "; ".join(sources)])
    return out
