"""Measurement intervals over test documents, as pure functions: how precisely these runs' numbers are known.

A method's evidence is its finished sequences (units: one per seed and task order), each an accuracy matrix
whose cells are means over test documents. One bootstrap replicate draws the documents of every task with
replacement; the same document draw is used in every cell of every sequence (a document that is easy after
stage 1 stays the same document after stage 4, and for the other method), and each resampled matrix goes
through the metric definitions of harness.metrics. Intervals are percentile intervals of the replicates.
The seeds are held fixed: these intervals describe the runs that were made, and no verdict uses them.
What another seed would give is the question of harness.analysis.over_seeds (paired t over seeds), which
takes its documents' part (V_doc) from unit_replicates here.

resample_seeds=True also draws the seeds with replacement, as the report did until 2026-12. With 3 seeds
that cannot produce a value outside their range, and its paired p called identical methods different
17-20% of the time under a realistic seed effect; it stays only so that tests/test_over_seeds.py can
keep that failure measured. docs/statistics.md describes both for readers of the report.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from harness import metrics as MX

N_BOOT = 2000  # replicates: the 2.5% tail rests on 50 of them
LEVEL = 0.95
SEED = 0  # the bootstrap's own RNG seed: a report is the same every time it is written


@dataclass
class Unit:
    """One finished sequence: its key (pairs it with another method's), matrix and per-document scores."""

    key: str  # "<seed>/<order>"
    tasks: list[str]  # the matrix's columns (training order)
    R: np.ndarray  # (stages, T) as recorded
    scores: dict[str, np.ndarray] | None = None  # task -> (stages, documents); None without per-document files
    doc_ids: dict[str, list[int]] | None = None
    reference: bool = False
    # metric name -> definition on a stack of matrices; None: the continual-learning metrics (merge runs pass
    # harness.metrics.MERGE_VALUES, their R being the 2 x T [S[j, j]; m_j])
    functions: dict | None = None
    # resampled matrices per document draw (a report asks for them once per metric and comparison)
    _resampled: dict = field(default_factory=dict, repr=False, compare=False)


@dataclass
class Estimate:
    """A metric's mean over units and its bootstrap interval (None where it cannot be estimated)."""

    mean: float | None
    low: float | None
    high: float | None
    n_units: int
    resampled: str  # "documents and seeds", "documents", "seeds" or "nothing"

    def as_json(self) -> dict[str, Any]:
        return {
            "mean": self.mean,
            "low": self.low,
            "high": self.high,
            "n_units": self.n_units,
            "resampled": self.resampled,
        }


@dataclass
class Comparison:
    """A paired difference a - b of one metric, its interval and p-value."""

    a: str
    b: str
    metric: str
    difference: float | None
    low: float | None
    high: float | None
    p: float | None
    n_units: int
    resampled: str

    def as_json(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "metric": self.metric,
            "difference": self.difference,
            "low": self.low,
            "high": self.high,
            "p": self.p,
            "n_pairs": self.n_units,
            "resampled": self.resampled,
        }


def metric_functions(reference: bool) -> dict:
    return MX.metric_values(reference)


def unit_functions(unit: Unit) -> dict:
    """The metric definitions that apply to a unit."""
    return unit.functions if unit.functions is not None else metric_functions(unit.reference)


def has_documents(units: list[Unit]) -> bool:
    """Every unit has per-document scores, and every task the same documents in all of them."""
    if not units or any(u.scores is None or u.doc_ids is None for u in units):
        return False
    first = units[0].doc_ids
    return all(set(u.doc_ids) == set(first) and all(u.doc_ids[t] == first[t] for t in first) for u in units)


def document_weights(rng: np.random.Generator, n: int, n_boot: int) -> np.ndarray:
    """(n_boot, n): how often each of n documents is drawn in each replicate, divided by n (rows sum to 1)."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot) / n  # n draws with replacement, as counts


def document_draws(seed: int, units: list[Unit], n_boot: int) -> dict[str, np.ndarray]:
    """task -> document weights, one draw per task shared by every unit (tasks in sorted order: reproducible)."""
    return _draws(seed, tuple(sorted((t, len(ids)) for t, ids in units[0].doc_ids.items())), n_boot)


@functools.lru_cache(maxsize=8)
def _draws(seed: int, sizes: tuple[tuple[str, int], ...], n_boot: int) -> dict[str, np.ndarray]:
    """The draws are a function of (seed, task sizes, n_boot) alone: made once, shared by every estimate and comparison."""
    rng = np.random.default_rng([seed, 0])
    return {t: document_weights(rng, n, n_boot) for t, n in sizes}


def resampled_matrices(unit: Unit, draws: dict[str, np.ndarray]) -> np.ndarray:
    """(n_boot, stages, T): the unit's matrix recomputed on each replicate's documents (NaN where not evaluated)."""
    cached = unit._resampled.get(id(draws))
    if cached is not None and cached[0] is draws:  # holding the draws keeps their id from being reused
        return cached[1]
    n_boot = next(iter(draws.values())).shape[0]
    out = np.full((n_boot, unit.R.shape[0], len(unit.tasks)), np.nan)
    for j, task in enumerate(unit.tasks):
        A = unit.scores[task]  # (stages, documents); a row not evaluated is all NaN and stays NaN
        out[:, :, j] = draws[task] @ np.nan_to_num(A).T
        out[:, np.isnan(A).any(axis=1), j] = np.nan
    unit._resampled[id(draws)] = (draws, out)
    return out


def unit_replicates(units: list[Unit], metric: str, draws: dict[str, np.ndarray] | None, n_boot: int) -> np.ndarray:
    """(units, n_boot) values of the metric: on resampled documents, or the observed value in every replicate."""
    out = np.empty((len(units), n_boot))
    for k, u in enumerate(units):
        fn = unit_functions(u)[metric]
        out[k] = fn(resampled_matrices(u, draws)) if draws is not None else fn(u.R)
    return out


def _seed_mean(values: np.ndarray, seed_idx: np.ndarray) -> np.ndarray:
    """(n_boot,): replicate b's mean over its drawn units (values: units x n_boot, seed_idx: n_boot x units)."""
    return np.take_along_axis(values.T, seed_idx, axis=1).mean(axis=1)


def _interval(reps: np.ndarray, level: float) -> tuple[float | None, float | None]:
    if not np.isfinite(reps).all():
        return None, None
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _resampled_label(documents: bool, n_units: int) -> str:
    if documents:
        return "documents and seeds" if n_units > 1 else "documents"
    return "seeds" if n_units > 1 else "nothing"


def _setup(
    units: list[Unit], n_units: int, n_boot: int, seed: int, resample_seeds: bool
) -> tuple[dict | None, np.ndarray, bool, str]:
    """(document draws or None, seed draws (n_boot, n_units), whether anything is resampled, its label).

    Without resample_seeds every replicate takes every unit once: the seeds are held fixed (a measurement)."""
    docs = has_documents(units)
    draws = document_draws(seed, units, n_boot) if docs else None
    seeds = resample_seeds and n_units > 1
    idx = (
        np.random.default_rng([seed, 1]).integers(0, n_units, size=(n_boot, n_units))
        if seeds
        else np.broadcast_to(np.arange(n_units), (n_boot, n_units))
    )
    return draws, idx, docs or seeds, _resampled_label(docs, n_units if seeds else 1)


def estimate(
    units: list[Unit],
    metric: str,
    *,
    n_boot: int = N_BOOT,
    seed: int = SEED,
    level: float = LEVEL,
    resample_seeds: bool = False,
) -> Estimate:
    """Mean over units of one metric and its percentile interval over the documents (when present), the seeds fixed.

    That is a measurement interval: how precisely these runs' values are known, not what another seed would
    give (harness.analysis.over_seeds). resample_seeds=True also draws the seeds (the pre-2026-12 interval)."""
    if not units:
        return Estimate(None, None, None, 0, "nothing")
    observed = np.array([unit_functions(u)[metric](u.R) for u in units], dtype=float)
    mean = float(observed.mean()) if np.isfinite(observed).all() else None
    draws, seed_idx, anything, label = _setup(units, len(units), n_boot, seed, resample_seeds)
    if mean is None or not anything:
        return Estimate(mean, None, None, len(units), label if mean is not None else "nothing")
    reps = _seed_mean(unit_replicates(units, metric, draws, n_boot), seed_idx)
    return Estimate(mean, *_interval(reps, level), len(units), label)


def estimates(units: list[Unit], metrics, **kw) -> dict[str, Estimate]:
    """estimate() for each metric that applies to the units (a reference run defines ACC only)."""
    fns = unit_functions(units[0]) if units else MX.metric_values()
    return {m: estimate(units, m, **kw) for m in metrics if m in fns}


def cell_intervals(
    units: list[Unit],
    columns: list[str],
    n_rows: int,
    *,
    n_boot: int = N_BOOT,
    seed: int = SEED,
    level: float = LEVEL,
    resample_seeds: bool = False,
) -> tuple[np.ndarray, np.ndarray, str]:
    """(low, high, what was resampled): a measurement interval for every cell of the mean matrix, by task name.

    NaN where a cell was not evaluated or cannot be estimated (no per-document scores)."""
    low, high = np.full((n_rows, len(columns)), np.nan), np.full((n_rows, len(columns)), np.nan)
    if not units:
        return low, high, "nothing"
    draws, seed_idx, anything, label = _setup(units, len(units), n_boot, seed, resample_seeds)
    if not anything:
        return low, high, label
    stack = np.full((len(units), n_boot, n_rows, len(columns)), np.nan)
    for k, u in enumerate(units):
        M = resampled_matrices(u, draws) if draws is not None else np.broadcast_to(u.R, (n_boot, *u.R.shape))
        rows = min(n_rows, M.shape[1])
        for j, task in enumerate(u.tasks):
            if task in columns:
                stack[k, :, :rows, columns.index(task)] = M[:, :rows, j]
    picked = stack[seed_idx.T, np.arange(n_boot)[None, :]]  # (units drawn, n_boot, rows, cols)
    reps = picked.mean(axis=0)
    ok = np.isfinite(reps).all(axis=0)
    q = np.quantile(np.where(np.isfinite(reps), reps, 0.0), [(1 - level) / 2, (1 + level) / 2], axis=0)
    low[ok], high[ok] = q[0][ok], q[1][ok]
    return low, high, label


def pair_units(a: list[Unit], b: list[Unit]) -> tuple[list[Unit], list[Unit]]:
    """The units of a and b that share a key (seed and order), in key order."""
    keys = sorted({u.key for u in a} & {u.key for u in b})
    by_a, by_b = {u.key: u for u in a}, {u.key: u for u in b}
    return [by_a[k] for k in keys], [by_b[k] for k in keys]


def bootstrap_p(diffs: np.ndarray) -> float:
    """Two-sided bootstrap p-value of "no difference": 2 · min(#(d <= 0) + 1, #(d >= 0) + 1) / (n + 1), at most 1."""
    n = len(diffs)
    return float(min(1.0, 2 * min(np.sum(diffs <= 0) + 1, np.sum(diffs >= 0) + 1) / (n + 1)))


def paired_difference(
    a: list[Unit],
    b: list[Unit],
    metric: str,
    names: tuple[str, str] = ("a", "b"),
    *,
    n_boot: int = N_BOOT,
    seed: int = SEED,
    level: float = LEVEL,
    resample_seeds: bool = False,
) -> Comparison:
    """Mean of metric(a) - metric(b) over the paired units, its measurement interval over documents (seeds fixed).

    Never a verdict: verdicts come from harness.analysis.over_seeds. With resample_seeds=True this is the
    bootstrap the report's verdicts used until 2026-12; with 3 seeds and a realistic seed effect it calls two
    identical methods different 17-20% of the time (tests/test_over_seeds.py keeps that measured)."""
    ua, ub = pair_units(a, b)
    none = Comparison(names[0], names[1], metric, None, None, None, None, len(ua), "nothing")
    if not ua:
        return none
    fa, fb = unit_functions(ua[0]), unit_functions(ub[0])
    if metric not in fa or metric not in fb:
        return none
    d_obs = np.array([fa[metric](x.R) - fb[metric](y.R) for x, y in zip(ua, ub)], dtype=float)
    if not np.isfinite(d_obs).all():
        return none
    draws, seed_idx, anything, label = _setup(ua + ub, len(ua), n_boot, seed, resample_seeds)
    diff = float(d_obs.mean())
    if not anything:
        return Comparison(names[0], names[1], metric, diff, None, None, None, len(ua), "nothing")
    d = unit_replicates(ua, metric, draws, n_boot) - unit_replicates(ub, metric, draws, n_boot)
    reps = _seed_mean(d, seed_idx)
    lo, hi = _interval(reps, level)
    return Comparison(names[0], names[1], metric, diff, lo, hi, bootstrap_p(reps), len(ua), label)
