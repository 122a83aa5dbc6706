"""The report's uncertainty: bootstrap intervals per method and cell, and verdicts from paired comparisons.

The statistics are harness.analysis.statistics (docs/statistics.md): documents and seeds resampled
together when every run of the compared methods logged its per-document scores (documents.json), seeds
only otherwise, and the sentence says which. A verdict compares the best method on a metric with each
other one by a paired bootstrap on the seeds (and task orders) both ran: the difference, its 95%
interval and p; `harness report --baseline METHOD` also compares METHOD with every other method.
A difference is called significant when the interval excludes 0. The older rule (a gap
larger than the larger of the two stds) is kept beside it as a column, not as the verdict.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from harness.analysis import statistics as ST
from harness.analysis.documents import score_arrays
from harness.analysis.aggregate import MethodMatrix, noise_class, rank
from harness.analysis.naming import HIGHER_IS_BETTER, METRICS, display_name
from harness.analysis.numbers import finite
from harness.analysis.runs import SequenceRun

STATISTICS_NOTE = (
    "95% percentile bootstrap intervals ({n} replicates). Each replicate draws the seeds (and task orders) with "
    "replacement and, when every run logged its per-document scores, the test documents of every task with replacement, "
    "the same documents in every cell and for every method; differences are paired on the seeds both methods ran. p is "
    "the two-sided bootstrap p-value of no difference. See docs/statistics.md."
)


def unit(run: SequenceRun) -> ST.Unit:
    """A finished run as the statistics see it (per-document scores when its documents.json was usable)."""
    docs = run.documents
    scores = score_arrays(docs) if docs else None
    ids = {t: list(docs["documents"][t]["doc_ids"]) for t in docs["tasks"]} if docs else None
    return ST.Unit(key=f"{run.seed}/{run.order}", tasks=list(run.tasks), R=np.asarray(run.R, dtype=float), scores=scores,
                   doc_ids=ids, reference=run.reference)


def units_by_method(by_method: dict[str, list[SequenceRun]]) -> dict[str, list[ST.Unit]]:
    return {m: [unit(r) for r in runs] for m, runs in by_method.items()}


def add_intervals(rows: list[dict], units: dict[str, list[ST.Unit]]) -> None:
    """Each method row's metric entries get ci_low, ci_high and ci_resampled (what the bootstrap drew)."""
    for r in rows:
        ests = ST.estimates(units.get(r["method"], []), METRICS)
        for m in METRICS:
            e = ests.get(m)
            r[m].update({"ci_low": e.low if e else None, "ci_high": e.high if e else None,
                         "ci_resampled": e.resampled if e else "nothing"})


def cell_intervals(mm: MethodMatrix, runs: list[SequenceRun], columns: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) of every cell of a method's mean matrix (its heatmap order's runs), aligned to the columns."""
    us = [unit(r) for r in runs if r.order == mm.order]
    low, high, _ = ST.cell_intervals(us, columns, mm.mean.shape[0])
    return low, high


def fmt_ci(mean: Any, low: Any, high: Any) -> str:
    """0.812 [0.750, 0.870]; the mean alone without an interval."""
    if not finite(mean):
        return "—"
    return f"{float(mean):.3f} [{float(low):.3f}, {float(high):.3f}]" if finite(low) and finite(high) else f"{float(mean):.3f}"


def fmt_p(p: float | None) -> str:
    return "—" if p is None else ("p < 0.001" if p < 0.001 else f"p = {p:.3f}")


def significant(c: ST.Comparison) -> bool:
    return c.low is not None and c.high is not None and not (c.low <= 0 <= c.high)


def _how(c: ST.Comparison) -> str:
    what = {"documents and seeds": f"{c.n_units} seeds and the test documents", "documents": "the test documents (one seed)",
            "seeds": f"{c.n_units} seeds; seed-level only: these runs have no per-document results"}[c.resampled]
    return (f"paired bootstrap over {what}: {display_name(c.a)} − {display_name(c.b)} = {c.difference:+.3f}, "
            f"95% CI [{c.low:+.3f}, {c.high:+.3f}], {fmt_p(c.p)}")


def paired_sentence(m: str, a_row: dict, b_row: dict, c: ST.Comparison, higher: bool | None = None) -> str:
    """One verdict: row a against row b on metric m, from their paired comparison (a − b); the better one is named.

    higher: whether higher is better (default: the continual-learning metric's own direction)."""
    a, b = display_name(a_row["method"]), display_name(b_row["method"])
    vs = (f"{a} {fmt_ci(a_row[m]['mean'], a_row[m].get('ci_low'), a_row[m].get('ci_high'))} vs "
          f"{b} {fmt_ci(b_row[m]['mean'], b_row[m].get('ci_low'), b_row[m].get('ci_high'))}")
    if c.difference is None:
        return f"{vs}: not compared (no seed and task order that both ran)"
    d = abs(c.difference)
    d_txt = f"{d:.3f}" if d >= 0.001 else f"{d:.1e}"
    if d < 1e-9:
        return f"{vs}: no difference"
    better = a if (c.difference > 0) == (HIGHER_IS_BETTER[m] if higher is None else higher) else b
    if c.low is None:
        return f"{vs}: {better} is better by {d_txt} (one run each, no noise estimate)"
    if significant(c):
        return f"{vs}: {better} is better by {d_txt} ({_how(c)})"
    return f"{vs}: the difference {d_txt} is not significant ({_how(c)})"


def compare(m: str, a: dict, b: dict, ua: list[ST.Unit], ub: list[ST.Unit], *, higher: bool | None = None,
            **fields) -> tuple[str, dict]:
    """(verdict sentence, comparison.json entry) of row a against row b on metric m, by the paired bootstrap of
    their units; the entry also keeps the std rule's class and the given fields (role, combination)."""
    c = ST.paired_difference(ua, ub, m, (a["method"], b["method"]))
    return paired_sentence(m, a, b, c, higher), {**c.as_json(), "significant": significant(c),
                                                 "std_rule": noise_class(m, a, b), **fields}


def paired_verdicts(rows: list[dict], units: dict[str, list[ST.Unit]],
                    baseline: str | None = None) -> tuple[dict[str, str], list[dict], dict[str, str]]:
    """(metric -> verdict sentence, comparison.json's "paired_comparisons", metric -> baseline sentence).

    Per metric the best method is compared with each other one (role "best", a = the best). With a baseline
    (a method of these runs) that is not the best, it is also compared with every other method (role
    "baseline", a = the baseline), and the third dict says how it stands against each of them.
    Like aggregate.verdicts (whose sentences these replace): reference rows are never ranked or compared."""
    sentences, table, against = {}, [], {}
    for m in METRICS:
        direction = "higher" if HIGHER_IS_BETTER[m] else "lower"
        cands = [r for r in rows if finite(r[m]["mean"]) and not r.get("reference")]
        if len(cands) < 2:
            continue  # aggregate.verdicts' sentence for this case stands
        ranked = rank(m, cands, HIGHER_IS_BETTER[m])
        base = next((r for r in cands if r["method"] == baseline), None)
        said: dict[str, list[str]] = {"best": [], "baseline": []}
        for a, role in ((ranked[0], "best"), (base, "baseline")):
            if a is None or (role == "baseline" and a is ranked[0]):
                continue  # no baseline, or it is the best: the verdict's sentences are its own
            for other in (r for r in ranked if r is not a):
                sentence, entry = compare(m, a, other, units[a["method"]], units[other["method"]], role=role)
                said[role].append(sentence)
                table.append(entry)
        sentences[m] = f"{m} ({direction} is better): " + "; ".join(said["best"]) + "."
        if base is not None:
            against[m] = (f"{m} ({direction} is better), {display_name(baseline)} against each method: "
                          + "; ".join(said["baseline"] or said["best"]) + ".")
    return sentences, table, against


def not_learned_notes(runs: list[SequenceRun]) -> list[dict]:
    """comparison.json's "not_learned": per run, the tasks it did not learn at their own stage."""
    return [{"method": r.method, "seed": r.seed, "order": r.order, "tasks": r.not_learned, "margin": r.learn_margin}
            for r in runs if r.not_learned]


