"""The report's uncertainty: intervals per method and cell, and verdicts from tests that generalise over seeds.

Two kinds of interval, named as what they are:
- over seeds (ci_low, ci_high; the verdicts): harness.analysis.over_seeds, a t interval over the seeds (and
  task orders) with the documents' shared sampling variance added. It says where the next seed's value is
  expected: what "LoRI-S forgets less than LoRA" means to a reader.
- measurement (measurement_low, measurement_high; description only): harness.analysis.statistics, a
  bootstrap over the test documents with these seeds fixed. It says how precisely these runs are known.

A verdict compares the best method on a metric with each other one (and, with `harness report --baseline
METHOD`, METHOD with each other one) by the paired t-test over the seeds both ran. The comparisons of one
metric are a family: their p-values are Holm-adjusted, and a difference is decided when its Holm p < 0.05.
An undecided comparison says how many seeds the observed difference and spread would need.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from harness.analysis import over_seeds as OS
from harness.analysis import statistics as ST
from harness.analysis.aggregate import MethodMatrix, noise_class, rank
from harness.analysis.documents import score_arrays
from harness.analysis.naming import HIGHER_IS_BETTER, METRICS, display_name
from harness.analysis.numbers import finite
from harness.analysis.runs import SequenceRun

STATISTICS_NOTE = (
    "Verdicts: a paired t-test over the seeds (and task orders) both methods ran, on the per-seed differences, with "
    "the test documents' shared sampling variance added when every run logged its per-document scores; 95% intervals "
    "over seeds. The comparisons of one metric are one family: p-values are Holm-adjusted within it, and a difference "
    "is decided when its Holm p is below 0.05. 'Detectable' is the smallest difference these seeds find with 80% power "
    "at 5%; 'seeds needed', how many seeds the observed difference and spread would need. Measurement intervals "
    "({n} bootstrap draws of the test documents, these seeds fixed) describe the runs and decide nothing. See "
    "docs/statistics.md."
)


def unit(run: SequenceRun) -> ST.Unit:
    """A finished run as the statistics see it (per-document scores when its documents.json was usable)."""
    docs = run.documents
    scores = score_arrays(docs) if docs else None
    ids = {t: list(docs["documents"][t]["doc_ids"]) for t in docs["tasks"]} if docs else None
    return ST.Unit(
        key=f"{run.seed}/{run.order}",
        tasks=list(run.tasks),
        R=np.asarray(run.R, dtype=float),
        scores=scores,
        doc_ids=ids,
        reference=run.reference,
    )


def units_by_method(by_method: dict[str, list[SequenceRun]]) -> dict[str, list[ST.Unit]]:
    return {m: [unit(r) for r in runs] for m, runs in by_method.items()}


def add_intervals(rows: list[dict], units: dict[str, list[ST.Unit]]) -> None:
    """Each method row's metric entries get ci_low/ci_high (over seeds, the t interval) and measurement_low/high
    (the documents' bootstrap, seeds fixed); ci_resampled says what the measurement drew."""
    for r in rows:
        us = units.get(r["method"], [])
        ests = ST.estimates(us, METRICS)
        for m in METRICS:
            e = ests.get(m)
            s = OS.seed_interval(us, m) if e else None
            r[m].update(
                {
                    "ci_low": s.low if s else None,
                    "ci_high": s.high if s else None,
                    "ci_kind": "t over seeds" + (", documents added" if s and s.document_se is not None else ""),
                    "measurement_low": e.low if e else None,
                    "measurement_high": e.high if e else None,
                    "ci_resampled": e.resampled if e else "nothing",
                }
            )


def cell_intervals(mm: MethodMatrix, runs: list[SequenceRun], columns: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) of every cell of a method's mean matrix (its heatmap order's runs), aligned to the columns."""
    us = [unit(r) for r in runs if r.order == mm.order]
    low, high, _ = ST.cell_intervals(us, columns, mm.mean.shape[0])
    return low, high


def fmt_ci(mean: Any, low: Any, high: Any) -> str:
    """0.812 [0.750, 0.870]; the mean alone without an interval."""
    if not finite(mean):
        return "—"
    return (
        f"{float(mean):.3f} [{float(low):.3f}, {float(high):.3f}]"
        if finite(low) and finite(high)
        else f"{float(mean):.3f}"
    )


def fmt_p(p: float | None) -> str:
    return "—" if p is None else ("p < 0.001" if p < 0.001 else f"p = {p:.3f}")


def fmt_seed_ci(s: OS.SeedInterval | OS.SeedTest, signed: bool = False) -> str:
    """A mean (or a difference, signed) with its interval over seeds, as the published tables print it."""
    f = "{:+.3f}" if signed else "{:.3f}"
    mean = s.mean if isinstance(s, OS.SeedInterval) else s.difference
    if mean is None:
        return "—"
    text = f.format(mean) if s.low is None else f"{f.format(mean)} [{f.format(s.low)}, {f.format(s.high)}]"
    return text.replace("-", "−")


def fmt_needed(t: OS.SeedTest) -> str:
    """How many seeds the observed difference and spread need (80% power at 5%). An undecided test whose estimate
    is no more than the seeds it has (80% power still misses one time in five, and Holm's correction is not in the
    estimate) needs more than it has."""
    if t.seeds_needed is not None and not t.decided and t.p is not None and t.seeds_needed <= t.n_pairs:
        return f"more than {t.n_pairs} seeds"
    if t.seeds_needed is not None:
        return f"about {t.seeds_needed} seeds"
    if OS.documents_limit(t):
        return "more test documents: no number of seeds decides it (the documents' shared noise is larger than the gap)"
    return f"more than {OS.MAX_SEEDS} seeds"


def fmt_holm_verdict(t: OS.SeedTest) -> str:
    """A table cell: the difference with its interval over seeds, the Holm p, decided or the seeds it needs."""
    if t.p is None:
        return f"— (fewer than {OS.MIN_SEEDS} paired seeds)"
    word = "decided" if t.decided else f"undecided, needs {fmt_needed(t)}"
    return f"{fmt_seed_ci(t, True)}, Holm {fmt_p(t.p_adjusted if t.p_adjusted is not None else t.p)}: {word}"


def _how(t: OS.SeedTest) -> str:
    holm = f", Holm {fmt_p(t.p_adjusted)} over {t.family} comparisons" if t.family > 1 else ""
    return (
        f"paired t over {t.n_pairs} seeds: {display_name(t.a)} − {display_name(t.b)} = {t.difference:+.3f}, "
        f"95% CI [{t.low:+.3f}, {t.high:+.3f}], {fmt_p(t.p)}{holm}; these seeds detect {t.detectable:.3f} "
        f"at 80% power"
    )


def paired_sentence(m: str, a_row: dict, b_row: dict, t: OS.SeedTest, higher: bool | None = None) -> str:
    """One verdict: row a against row b on metric m, from their test over seeds (a − b); the better one is named,
    or the comparison is called undecided with the seeds it would need."""
    a, b = display_name(a_row["method"]), display_name(b_row["method"])
    vs = (
        f"{a} {fmt_ci(a_row[m]['mean'], a_row[m].get('ci_low'), a_row[m].get('ci_high'))} vs "
        f"{b} {fmt_ci(b_row[m]['mean'], b_row[m].get('ci_low'), b_row[m].get('ci_high'))}"
    )
    if t.difference is None:
        return f"{vs}: not compared (no seed and task order that both ran)"
    d = abs(t.difference)
    d_txt = f"{d:.3f}" if d >= 0.001 else f"{d:.1e}"
    if d < 1e-9 and (t.sd or 0.0) < 1e-12:
        return f"{vs}: no difference"
    better = a if (t.difference > 0) == (HIGHER_IS_BETTER[m] if higher is None else higher) else b
    if t.p is None:
        return (
            f"{vs}: {better} is ahead by {d_txt} on {t.n_pairs} seed(s): undecided, a test over seeds needs "
            f"at least {OS.MIN_SEEDS} seeds of each"
        )
    if t.decided:
        return f"{vs}: {better} is better by {d_txt} ({_how(t)})"
    return (
        f"{vs}: undecided: {t.n_pairs} seeds; the observed {t.difference:+.3f} with this spread needs "
        f"{fmt_needed(t)} ({_how(t)})"
    )


def comparison_entry(t: OS.SeedTest, a: dict, b: dict, ua: list[ST.Unit], ub: list[ST.Unit], m: str, **fields) -> dict:
    """comparison.json's row for one test: the test over seeds, the measurement interval, the std rule's class."""
    meas = ST.paired_difference(ua, ub, m, (a["method"], b["method"]))
    return {
        **t.as_json(),
        "significant": t.decided,
        "resampled": meas.resampled,
        "measurement_low": meas.low,
        "measurement_high": meas.high,
        "std_rule": noise_class(m, a, b),
        **fields,
    }


def compare_family(
    m: str, pairs: list[tuple[dict, dict, list[ST.Unit], list[ST.Unit], dict]], *, higher: bool | None = None
) -> list[tuple[str, dict]]:
    """(sentence, comparison.json entry) for each (a row, b row, a units, b units, extra fields) of one family:
    each pair's test over seeds, the family's p-values Holm-adjusted together."""
    tests = [OS.seed_test(ua, ub, m, (a["method"], b["method"])) for a, b, ua, ub, _ in pairs]
    OS.holm_adjust(tests)
    return [
        (paired_sentence(m, a, b, t, higher), comparison_entry(t, a, b, ua, ub, m, **extra))
        for t, (a, b, ua, ub, extra) in zip(tests, pairs)
    ]


def paired_verdicts(
    rows: list[dict], units: dict[str, list[ST.Unit]], baseline: str | None = None
) -> tuple[dict[str, str], list[dict], dict[str, str]]:
    """(metric -> verdict sentence, comparison.json's "paired_comparisons", metric -> baseline sentence).

    Per metric the best method is compared with each other one (role "best", a = the best). With a baseline
    (a method of these runs) that is not the best, it is also compared with every other method (role
    "baseline", a = the baseline), and the third dict says how it stands against each of them. All of one
    metric's comparisons are one Holm family. Reference rows are never ranked or compared."""
    sentences, table, against = {}, [], {}
    for m in METRICS:
        direction = "higher" if HIGHER_IS_BETTER[m] else "lower"
        cands = [r for r in rows if finite(r[m]["mean"]) and not r.get("reference")]
        if len(cands) < 2:
            continue  # aggregate.verdicts' sentence for this case stands
        ranked = rank(m, cands, HIGHER_IS_BETTER[m])
        base = next((r for r in cands if r["method"] == baseline), None)
        pairs, roles = [], []
        for a, role in ((ranked[0], "best"), (base, "baseline")):
            if a is None or (role == "baseline" and a is ranked[0]):
                continue  # no baseline, or it is the best: the verdict's sentences are its own
            for other in (r for r in ranked if r is not a):
                pairs.append((a, other, units[a["method"]], units[other["method"]], {"role": role}))
                roles.append(role)
        said: dict[str, list[str]] = {"best": [], "baseline": []}
        for role, (sentence, entry) in zip(roles, compare_family(m, pairs)):
            said[role].append(sentence)
            table.append(entry)
        sentences[m] = f"{m} ({direction} is better): " + "; ".join(said["best"]) + "."
        if base is not None:
            against[m] = (
                f"{m} ({direction} is better), {display_name(baseline)} against each method: "
                + "; ".join(said["baseline"] or said["best"])
                + "."
            )
    return sentences, table, against


GENERAL_CE = "general_ce_rise"


def _rise(runs: list[SequenceRun]) -> dict[str, float]:
    return {
        f"{r.seed}/{r.order}": float(r.summary[GENERAL_CE])
        for r in runs
        if r.summary and finite(r.summary.get(GENERAL_CE))
    }


def general_ce_verdicts(
    by_method: dict[str, list[SequenceRun]], baseline: str | None = None
) -> tuple[list[str], list[dict]]:
    """(sentences, comparison.json's "general_ce_comparisons"): the general-text CE rise (lower is better) of the
    method with the lowest mean against each other one, and of the baseline against each; one Holm family. The text
    is fixed, so the seeds are its only noise: a paired t-test over them (over_seeds.values_test)."""
    rises = {m: _rise(runs) for m, runs in by_method.items() if not any(r.reference for r in runs) and _rise(runs)}
    if len(rises) < 2:
        return [], []
    ranked = sorted(rises, key=lambda m: float(np.mean(list(rises[m].values()))))
    pairs = [(ranked[0], o, "best") for o in ranked[1:]]
    if baseline in rises and baseline != ranked[0]:
        pairs += [(baseline, o, "baseline") for o in ranked if o != baseline]
    tests = [OS.values_test(rises[a], rises[b], GENERAL_CE, (a, b)) for a, b, _ in pairs]
    OS.holm_adjust(tests)
    sentences = []
    for t in tests:
        a, b = display_name(t.a), display_name(t.b)
        if t.p is None:
            sentences.append(f"{a} vs {b}: {t.n_pairs} shared seed(s): a test over seeds needs at least {OS.MIN_SEEDS}")
        elif t.decided:
            better = a if t.difference < 0 else b
            sentences.append(f"{better} raises it less, by {abs(t.difference):.2f} nats ({_how(t)})")
        else:
            sentences.append(
                f"{a} vs {b}: undecided: {t.n_pairs} seeds; the observed {t.difference:+.2f} with this "
                f"spread needs {fmt_needed(t)} ({_how(t)})"
            )
    return sentences, [{**t.as_json(), "significant": t.decided, "role": role} for t, (_, _, role) in zip(tests, pairs)]


def not_learned_notes(runs: list[SequenceRun]) -> list[dict]:
    """comparison.json's "not_learned": per run, the tasks it did not learn at their own stage."""
    return [
        {"method": r.method, "seed": r.seed, "order": r.order, "tasks": r.not_learned, "margin": r.learn_margin}
        for r in runs
        if r.not_learned
    ]
