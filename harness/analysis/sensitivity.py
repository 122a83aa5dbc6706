"""Grid experiments in the report: one row per method x variant, each method's best variant, the sensitivity figure.

A variant is one combination of the swept knobs (`--grid`); its runs carry the tag harness.variant and
the knob values as params grid.<knob> (harness.scheduler). Runs of different variants of a method are
never averaged together. The report's headline comparison uses each method's best variant, chosen by
SELECTION_CRITERION, and says so on the page and in comparison.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from harness.analysis import over_seeds as OS
from harness.analysis.aggregate import mean_std_n
from harness.analysis.naming import HIGHER_IS_BETTER, METRICS, display_name, method_sort_key, num_sort_key
from harness.analysis.numbers import finite
from harness.analysis.runs import SequenceRun

SELECTION_METRIC = "ACC"
SELECTION_CRITERION = (
    "each method at its variant with the highest mean ACC over seeds and orders. The harness evaluates on the "
    "suite's test split only, so this choice is made on the same data it is reported on and is optimistic for "
    "every method alike; read the sensitivity figure for how much the choice matters."
)
# When every task of the suite has a validation split (suite.yaml `validation:`), the choice is made there instead.
SELECTION_CRITERION_VALIDATION = (
    "each method at its variant with the highest mean ACC on the suite's validation split (records carved from the "
    "training data with a fixed seed, never trained on, disjoint from the test documents), over seeds and orders. "
    "The test split did not choose: the numbers below are not optimistic from the selection."
)


def validation_acc(run: SequenceRun) -> float:
    """ACC of the run's final model on the validation split of every task (NaN without one for every task)."""
    val = (run.summary or {}).get("validation") or {}
    return float(val["acc"]) if val.get("complete") and finite(val.get("acc")) else float("nan")


def variant_of(run: SequenceRun) -> str | None:
    return run.tags.get("harness.variant") or None


def knob_values(run: SequenceRun) -> dict[str, str]:
    """The swept knobs of a run's variant, from its grid.<knob> params (as logged: strings)."""
    return {k[len("grid.") :]: v for k, v in sorted(run.params.items()) if k.startswith("grid.")}


@dataclass
class VariantRow:
    method: str
    variant: str
    values: dict[str, str]
    seeds: list[str]
    metrics: dict[str, dict[str, float | int]]  # metric -> {mean, std, n}
    validation: dict[str, float | int] | None = None  # {mean, std, n} of validation ACC (None: no validation split)
    per_seed: dict[str, float] = field(default_factory=dict)  # "<seed>/<order>" -> ACC: what the test over seeds pairs

    def as_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "display_name": display_name(self.method),
            "variant": self.variant,
            "values": self.values,
            "seeds": self.seeds,
            **self.metrics,
            "validation_ACC": self.validation,
        }

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.values.items()) or "no grid knobs"


def has_variants(runs: list[SequenceRun]) -> bool:
    return any(variant_of(r) for r in runs)


def variant_rows(runs: list[SequenceRun]) -> list[VariantRow]:
    """One row per (method, variant), methods in the method layer's order, variants by their knob values."""
    groups: dict[tuple[str, str], list[SequenceRun]] = {}
    for r in runs:
        groups.setdefault((r.method, variant_of(r) or "-"), []).append(r)
    rows = []
    for (method, variant), rs in groups.items():
        val = mean_std_n([validation_acc(r) for r in rs])
        rows.append(
            VariantRow(
                method,
                variant,
                knob_values(rs[0]),
                sorted({r.seed for r in rs}, key=num_sort_key),
                {m: mean_std_n([r.metrics[m] for r in rs]) for m in METRICS},
                val if val["n"] == len(rs) else None,
                {f"{r.seed}/{r.order}": r.metrics[SELECTION_METRIC] for r in rs},
            )
        )
    return sorted(rows, key=lambda v: (method_sort_key(v.method), [num_sort_key(x) for x in v.values.values()]))


def selection_split(rows: list[VariantRow]) -> str:
    """ "validation" when every variant row has validation ACC for all its runs, else "test"."""
    return "validation" if rows and all(v.validation is not None for v in rows) else "test"


def _score(v: VariantRow, split: str) -> float:
    return v.validation["mean"] if split == "validation" else v.metrics[SELECTION_METRIC]["mean"]


def best_variants(rows: list[VariantRow], split: str = "test") -> dict[str, str]:
    """method -> its variant with the best mean of SELECTION_METRIC on the split (first in knob order on a tie)."""
    sign = 1.0 if HIGHER_IS_BETTER[SELECTION_METRIC] else -1.0
    best: dict[str, VariantRow] = {}
    for v in rows:
        score = _score(v, split)
        if not finite(score):
            continue
        cur = best.get(v.method)
        if cur is None or sign * score > sign * _score(cur, split):
            best[v.method] = v
    return {m: v.variant for m, v in best.items()}


def select_variants(runs: list[SequenceRun]) -> tuple[list[SequenceRun], list[VariantRow], dict[str, str], dict | None]:
    """(the runs the headline compares, per-variant rows, method -> chosen variant, comparison.json's grid part).

    Without a grid: every run, no rows, no choice, None. With one: each method's runs at its best variant."""
    if not has_variants(runs):
        return runs, [], {}, None
    vrows = variant_rows(runs)
    split = selection_split(vrows)
    chosen = best_variants(vrows, split)
    lines, summary = recipe_verdicts(vrows)
    criterion = SELECTION_CRITERION_VALIDATION if split == "validation" else SELECTION_CRITERION
    grid = {
        "variants": [v.as_json() for v in vrows],
        "selection": {"criterion": criterion, "chosen": chosen, "split": split},
        "verdicts_per_variant": lines,
        "recipe_verdict": summary,
    }
    return selected_runs(runs, chosen), vrows, chosen, grid


def _variant_line(label: str, ranked: list[VariantRow]) -> tuple[str, bool]:
    """(the sentence, whether the leader's lead over the runner-up is decided): the leader against each other method by
    the test over seeds on the seeds both ran, Holm within the variant."""
    lead = ranked[0]
    tests = [OS.values_test(lead.per_seed, o.per_seed, SELECTION_METRIC, (lead.method, o.method)) for o in ranked[1:]]
    OS.holm_adjust(tests)
    parts = []
    for t in tests:
        if t.p is None:
            parts.append(
                f"ahead of {display_name(t.b)} by {t.difference or 0.0:+.3f} (fewer than {OS.MIN_SEEDS} shared seeds: no test)"
            )
        else:
            word = "decided" if t.decided else f"undecided, about {t.seeds_needed or 'more than 1000'} seeds needed"
            parts.append(
                f"ahead of {display_name(t.b)} by {t.difference:+.3f} (paired t over {t.n_pairs} seeds, "
                f"p = {t.p:.3f}{f', Holm {t.p_adjusted:.3f}' if t.family > 1 else ''}: {word})"
            )
    return f"{label}: {display_name(lead.method)} leads on {SELECTION_METRIC}, " + "; ".join(parts), tests[0].decided


def recipe_verdicts(rows: list[VariantRow]) -> tuple[list[str], str | None]:
    """(one ACC verdict per variant with two or more methods, one sentence on whether they agree).

    The methods are compared within each variant by the test over seeds (harness.analysis.over_seeds: paired t on
    the per-seed ACC, Holm within the variant). The verdict depends on the recipe when the ACC leader, or whether
    its lead over the runner-up is decided, changes between variants; the page and comparison.json say so."""
    by_variant: dict[str, list[VariantRow]] = {}
    for v in rows:
        by_variant.setdefault(v.variant, []).append(v)
    lines, outcomes = [], set()
    for vs in by_variant.values():
        cands = [v for v in vs if finite(v.metrics[SELECTION_METRIC]["mean"])]
        if len(cands) < 2:
            continue
        ranked = sorted(
            cands, key=lambda v: v.metrics[SELECTION_METRIC]["mean"], reverse=HIGHER_IS_BETTER[SELECTION_METRIC]
        )
        line, decided = _variant_line(vs[0].label, ranked)
        lines.append(line)
        outcomes.add((ranked[0].method, decided))
    if len(lines) < 2:
        return lines, None
    if len(outcomes) > 1:
        return lines, (
            f"The verdict depends on the recipe: the {SELECTION_METRIC} leader, or whether its lead over the "
            f"runner-up is decided by the test over seeds, changes between the variants below."
        )
    ((leader, decided),) = outcomes
    how = "decided by the test over seeds" if decided else "but undecided by the test over seeds"
    return (
        lines,
        f"The verdict is the same at every variant: {display_name(leader)} leads on {SELECTION_METRIC}, {how}.",
    )


def selected_runs(runs: list[SequenceRun], chosen: dict[str, str]) -> list[SequenceRun]:
    """The runs of each method's chosen variant (methods with no finite ACC anywhere keep none)."""
    return [r for r in runs if chosen.get(r.method) == (variant_of(r) or "-")]
