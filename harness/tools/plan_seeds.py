"""`harness plan-seeds EXPERIMENT --methods A,B`: how many seeds this pair needs, from the runs that exist.

For every metric: the paired test over the seeds both methods finished (harness.analysis.over_seeds), the
smallest difference those seeds detect with 80% power at 5%, the seeds the observed difference and spread
would need, and what 5, 10 and 20 seeds would detect with the same spread. A plan rests on the spread seen
so far, so it needs at least 2 finished seeds of each method.
"""

from __future__ import annotations

from pathlib import Path

from harness.analysis import over_seeds as OS
from harness.analysis.intervals import fmt_needed, fmt_p, units_by_method
from harness.analysis.naming import HIGHER_IS_BETTER, METRICS, display_name
from harness.analysis.sensitivity import select_variants
from harness.errors import HarnessError
from harness.report.read import read_experiment
from harness.report.tracked import quiet_mlflow
from harness.tracking.client import default_tracking_uri

HORIZONS = (5, 10, 20)


def _refuse_too_few(experiment: str, methods: tuple[str, str], by_method: dict) -> None:
    have = {m: sorted({r.seed for r in by_method.get(m, [])}) for m in methods}
    missing = [m for m in methods if m not in by_method]
    if missing:
        raise HarnessError(
            f"plan-seeds: experiment {experiment!r} has no finished sequence of {', '.join(missing)} "
            f"(it has: {', '.join(sorted(by_method)) or 'none'}); name two of those with --methods A,B"
        )
    few = [f"{m} has {len(s)} ({', '.join(s) or 'none'})" for m, s in have.items() if len(s) < 2]
    if few:
        raise HarnessError(
            f"plan-seeds: a plan needs the spread over at least 2 finished seeds of each method; "
            f"{'; '.join(few)}. Run more seeds first, e.g. `harness run --seeds 0,1,2 ...` "
            f"with the experiment's config"
        )


def plan(experiment: str, results_dir: Path, methods: tuple[str, str], tracking_uri: str | None = None) -> list[dict]:
    """One row per metric: the test over the shared seeds and the seed plan (a = methods[0], b = methods[1])."""
    with quiet_mlflow():
        exp = read_experiment(
            experiment, Path(results_dir).resolve(), default_tracking_uri(Path(results_dir).resolve(), tracking_uri)
        )
    runs, _, _, _ = select_variants(exp.runs)
    by_method = {m: [r for r in runs if r.method == m] for m in {r.method for r in runs}}
    _refuse_too_few(exp.name, methods, by_method)
    units = units_by_method({m: by_method[m] for m in methods})
    rows = []
    for m in METRICS:
        t = OS.seed_test(units[methods[0]], units[methods[1]], m, methods)
        if t.sd is None:
            continue  # undefined for these runs (FWT without a full schedule, a reference method)
        doc_var = (t.document_se or 0.0) ** 2
        rows.append(
            {
                "metric": m,
                "higher_is_better": HIGHER_IS_BETTER[m],
                **t.as_json(),
                "needed_words": fmt_needed(t),
                "detectable_at": {n: OS.detectable_difference(n, t.sd, doc_var) for n in HORIZONS},
            }
        )
    if not rows:
        raise HarnessError(
            f"plan-seeds: {methods[0]} and {methods[1]} share fewer than 2 seeds (and task orders) in "
            f"experiment {exp.name!r}; run the same seeds for both"
        )
    return rows


def format_plan(methods: tuple[str, str], rows: list[dict]) -> str:
    a, b = display_name(methods[0]), display_name(methods[1])
    head = (
        f"{a} − {b}, paired t over the seeds both ran (80% power at a two-sided 5%; one comparison, no "
        f"correction for others)"
    )
    cols = [
        "metric",
        "seeds",
        "difference",
        "95% CI",
        "p",
        "detectable now",
        *(f"at {n}" for n in HORIZONS),
        "seeds needed for the observed difference",
    ]
    lines = [head, "  ".join(cols)]
    for r in rows:
        decided = "decided" if r["decided"] else "undecided"
        lines.append(
            "  ".join(
                [
                    r["metric"],
                    str(r["n_pairs"]),
                    f"{r['difference']:+.3f}",
                    f"[{r['low']:+.3f}, {r['high']:+.3f}]" if r["low"] is not None else "—",
                    f"{fmt_p(r['p'])} ({decided})" if r["p"] is not None else f"(no test under {OS.MIN_SEEDS} seeds)",
                    f"{r['detectable_difference']:.3f}",
                    *(f"{r['detectable_at'][n]:.3f}" for n in HORIZONS),
                    r["needed_words"],
                ]
            )
        )
    return "\n".join(lines)
