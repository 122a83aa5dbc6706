"""Verdicts that generalise over seeds: a paired t-test over per-seed differences, its power, and seed planning.

The unit of replication is a finished sequence (one seed and task order). A reader of "LoRI-S forgets less
than LoRA" means: on the next seed too, and on other documents of the same tasks. So the test treats the seeds
as a sample from the population of training runs, and the test documents as a second, nested sample:

    d_k   = metric(a, seed k) - metric(b, seed k)            one paired difference per seed (and order)
    SE²   = s_d² / n + V_doc                                  s_d: their standard deviation over the n seeds;
                                                              V_doc: the variance of mean(d) over bootstrap draws
                                                              of the test documents, the seeds held fixed
    t     = mean(d) / SE,  df degrees of freedom;  95% interval mean(d) ± t_0.975 · SE
    df    = (n - 1) · (SE² / (s_d²/n))²                       Welch-Satterthwaite, V_doc taken as known (it rests
                                                              on hundreds of documents): n - 1 when the seeds'
                                                              spread dominates, larger when the documents' does

V_doc is 0 without per-document scores. Since every seed scores the same documents, the part of the
documents' sampling error that the seeds share does not shrink with more seeds, and s_d cannot see it: V_doc
is that part (the mean covariance over seeds of their document errors, document_variance), so more seeds
cannot decide a difference smaller than the documents can resolve. Chosen by simulation (tests/test_over_seeds.py,
docs/statistics.md): at 3, 5 and 10 seeds, with seed effects from none to a run that loses a whole task, it
calls identical methods different at most 5% of the time; the bootstrap over seeds it replaces did so 17-20%.

Power (80% at a 5% two-sided level) comes from the noncentral t with the same SE formula, so "the smallest
difference these seeds can detect" and "the seeds this difference needs" use the spread observed so far.
Many comparisons at once: holm() adjusts a family's p-values (the report's family: one metric's comparisons).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import optimize, stats

from harness.analysis import statistics as ST

ALPHA = 0.05
POWER = 0.80
LEVEL = 0.95
MIN_SEEDS = 3  # a verdict or an interval over seeds needs this many: at 2 seeds the test called identical methods
# different in 7.5-9.2% of simulated experiments (docs/statistics.md); 2 seeds still give a spread to plan with
MAX_SEEDS = 1000  # "needs more than this": in practice, more seeds cannot decide it (the documents limit it)
MAX_DF = 1000.0  # beyond this t is the normal distribution to 3 digits (and scipy's noncentral t turns NaN)
DOC_BOOT = 400  # document draws behind V_doc (its relative error is about 1/sqrt(2 * 400/2), 7%)


@dataclass
class SeedTest:
    """a - b on one metric over the seeds both ran: the paired t-test, its interval, power and seed planning."""

    a: str
    b: str
    metric: str
    n_pairs: int
    per_seed: list[float] = field(default_factory=list)
    difference: float | None = None
    low: float | None = None
    high: float | None = None
    p: float | None = None
    sd: float | None = None  # standard deviation of the per-seed differences
    document_se: float | None = None  # sqrt(V_doc); None without per-document scores
    se: float | None = None
    detectable: float | None = None  # smallest |difference| these seeds detect with 80% power at 5%
    seeds_needed: int | None = None  # seeds the observed difference and spread need; None: more than MAX_SEEDS
    p_adjusted: float | None = None  # Holm within the comparison's family (holm_adjust); p when alone
    family: int = 1

    @property
    def decided(self) -> bool:
        p = self.p_adjusted if self.p_adjusted is not None else self.p
        return p is not None and p < ALPHA and self.difference not in (None, 0.0)

    def as_json(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "metric": self.metric,
            "difference": self.difference,
            "low": self.low,
            "high": self.high,
            "p": self.p,
            "p_holm": self.p_adjusted,
            "family_size": self.family,
            "n_pairs": self.n_pairs,
            "per_seed": self.per_seed,
            "sd": self.sd,
            "se": self.se,
            "document_se": self.document_se,
            "detectable_difference": self.detectable,
            "seeds_needed": self.seeds_needed,
            "decided": self.decided,
            "test": "paired t over seeds"
            + (", documents' sampling variance added" if self.document_se is not None else ""),
        }


def standard_error(sd: float, n: int, doc_var: float = 0.0) -> float:
    return math.sqrt(sd * sd / n + doc_var)


def degrees_of_freedom(sd: float, n: int, doc_var: float = 0.0) -> float:
    """Welch-Satterthwaite for s²/n (n - 1 df) plus a known V_doc; n - 1 without documents."""
    seeds = sd * sd / n
    if doc_var <= 0.0:
        return float(n - 1)
    return MAX_DF if seeds == 0.0 else min(MAX_DF, (n - 1) * ((seeds + doc_var) / seeds) ** 2)


def t_test(d: np.ndarray, doc_var: float = 0.0, level: float = LEVEL) -> tuple[float, float, float, float, float]:
    """(mean, SE, low, high, two-sided p) of the paired differences d over n >= 2 seeds, V_doc = doc_var."""
    n = len(d)
    if n < 2:
        raise ValueError("a test over seeds needs at least 2 seeds")
    sd = float(np.std(d, ddof=1))
    mean, se, df = float(np.mean(d)), standard_error(sd, n, doc_var), degrees_of_freedom(sd, n, doc_var)
    q = float(stats.t.ppf((1 + level) / 2, df))
    if se == 0.0:  # every seed gave the same difference and no document noise: nothing to be unsure about
        return mean, 0.0, mean, mean, (1.0 if mean == 0.0 else 0.0)
    p = float(2 * stats.t.sf(abs(mean) / se, df))
    return mean, se, mean - q * se, mean + q * se, p


def power(delta: float, n: int, sd: float, doc_var: float = 0.0, alpha: float = ALPHA) -> float:
    """Probability that the two-sided t-test at level alpha over n seeds rejects when the true difference is delta."""
    se = standard_error(sd, n, doc_var)
    if se == 0.0:
        return 1.0 if delta != 0 else alpha
    df, ncp = degrees_of_freedom(sd, n, doc_var), abs(delta) / se
    crit = stats.t.ppf(1 - alpha / 2, df)
    upper, lower = stats.nct.sf(crit, df, ncp), stats.nct.cdf(-crit, df, ncp)
    # scipy's noncentral t returns NaN far in its tails: there the normal approximation is exact enough
    upper = upper if np.isfinite(upper) else stats.norm.sf(crit - ncp)
    lower = lower if np.isfinite(lower) else stats.norm.cdf(-crit - ncp)
    return float(min(1.0, upper + lower))


def detectable_difference(
    n: int, sd: float, doc_var: float = 0.0, *, target: float = POWER, alpha: float = ALPHA
) -> float:
    """The smallest |difference| that n seeds detect with probability `target` (the minimum detectable effect)."""
    se = standard_error(sd, n, doc_var)
    if se == 0.0:
        return 0.0
    hi = se
    while power(hi, n, sd, doc_var, alpha) < target:
        hi *= 2
    return float(optimize.brentq(lambda x: power(x, n, sd, doc_var, alpha) - target, 0.0, hi, xtol=1e-9 * se + 1e-15))


def seeds_needed(
    delta: float,
    sd: float,
    doc_var: float = 0.0,
    *,
    target: float = POWER,
    alpha: float = ALPHA,
    limit: int = MAX_SEEDS,
) -> int | None:
    """The fewest seeds (>= 2) whose test detects delta with probability `target`; None when more than `limit`."""
    if delta == 0 or power(delta, limit, sd, doc_var, alpha) < target:
        return None
    lo, hi = 1, 2  # power(lo) < target <= power(hi), growing hi by doubling, then bisecting
    while power(delta, hi, sd, doc_var, alpha) < target:
        lo, hi = hi, min(2 * hi, limit)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if power(delta, mid, sd, doc_var, alpha) >= target else (mid, hi)
    return max(hi, 2)


def holm(ps: list[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (family-wise error at most alpha for any alpha); None stays None."""
    idx = [i for i, p in enumerate(ps) if p is not None]
    order = sorted(idx, key=lambda i: ps[i])
    out: list[float | None] = [None] * len(ps)
    running, m = 0.0, len(idx)
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        out[i] = running
    return out


def holm_adjust(tests: list[SeedTest]) -> None:
    """Set p_adjusted and family on a family of tests (Holm)."""
    for t, q in zip(tests, holm([t.p for t in tests])):
        t.p_adjusted, t.family = q, len(tests)


def _values(units: list[ST.Unit], metric: str) -> np.ndarray:
    return np.array([ST.unit_functions(u)[metric](u.R) for u in units], dtype=float)


def document_variance(
    a: list[ST.Unit], b: list[ST.Unit] | None, metric: str, *, n_boot: int = DOC_BOOT, seed: int = ST.SEED
) -> float | None:
    """V_doc: the part of the documents' sampling variance that the seeds share, so that s²/n + V_doc is the
    variance of the mean over seeds and document draws. None without per-document scores in every unit.

    Over bootstrap draws of the documents (seeds fixed), with delta_k seed k's value (or paired difference):
    Var(mean delta) = v/n + (n-1)/n · c, v the mean of each seed's own variance, c their mean covariance. s²
    already holds v - c, so V_doc = c = (Var(mean delta) - v/n) · n/(n-1), at least 0; with one unit, Var(delta)."""
    every = a + (b or [])
    if not ST.has_documents(every):
        return None
    draws = ST.document_draws(seed, every, n_boot)
    reps = ST.unit_replicates(a, metric, draws, n_boot)  # (units, n_boot)
    if b:
        reps = reps - ST.unit_replicates(b, metric, draws, n_boot)
    if not np.isfinite(reps).all():
        return None
    n = reps.shape[0]
    var_mean = float(np.var(reps.mean(axis=0), ddof=1))
    if n == 1:
        return var_mean
    own = float(np.var(reps, axis=1, ddof=1).mean())
    return max(0.0, (var_mean - own / n) * n / (n - 1))


def _fill(out: SeedTest, d: np.ndarray, doc_var: float | None) -> SeedTest:
    """The test's numbers from the per-seed differences d and V_doc (None: no per-document scores)."""
    out.per_seed, out.difference = [float(x) for x in d], float(d.mean())
    if len(d) < 2:
        return out
    v = doc_var or 0.0
    out.document_se = math.sqrt(doc_var) if doc_var is not None else None
    out.sd = float(np.std(d, ddof=1))
    out.se = standard_error(out.sd, len(d), v)
    out.detectable = detectable_difference(len(d), out.sd, v)
    out.seeds_needed = seeds_needed(out.difference, out.sd, v)
    if len(d) >= MIN_SEEDS:  # the planning numbers above come from 2 seeds on; a verdict needs MIN_SEEDS
        out.difference, out.se, out.low, out.high, out.p = t_test(d, v)
    return out


def seed_test(
    a: list[ST.Unit],
    b: list[ST.Unit],
    metric: str,
    names: tuple[str, str] = ("a", "b"),
    *,
    n_boot: int = DOC_BOOT,
    seed: int = ST.SEED,
) -> SeedTest:
    """The paired t-test of metric(a) - metric(b) over the seeds (and orders) both ran; fields None where undefined."""
    ua, ub = ST.pair_units(a, b)
    out = SeedTest(names[0], names[1], metric, len(ua))
    if not ua or metric not in ST.unit_functions(ua[0]) or metric not in ST.unit_functions(ub[0]):
        return out
    d = _values(ua, metric) - _values(ub, metric)
    if not np.isfinite(d).all():
        return out
    return _fill(out, d, document_variance(ua, ub, metric, n_boot=n_boot, seed=seed) if len(d) > 1 else None)


def values_test(a: dict[str, float], b: dict[str, float], metric: str, names: tuple[str, str] = ("a", "b")) -> SeedTest:
    """The same test on one number per seed (key -> value) with no per-document scores, e.g. the general-text CE
    rise: its text is fixed, so the seeds are its only noise."""
    keys = sorted(set(a) & set(b))
    out = SeedTest(names[0], names[1], metric, len(keys))
    d = np.array([a[k] - b[k] for k in keys], dtype=float)
    if not keys or not np.isfinite(d).all():
        return out
    return _fill(out, d, None)


def documents_limit(t: SeedTest) -> bool:
    """Whether the documents' shared noise alone keeps the observed difference from being decided by any seeds."""
    if t.difference is None or t.document_se is None:
        return False
    return power(t.difference, MAX_SEEDS, 0.0, t.document_se**2) < POWER


@dataclass
class SeedInterval:
    """A method's mean of one metric over its seeds with the t interval that generalises over seeds."""

    mean: float | None
    low: float | None
    high: float | None
    n_units: int
    document_se: float | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "mean": self.mean,
            "low": self.low,
            "high": self.high,
            "n_units": self.n_units,
            "document_se": self.document_se,
        }


def seed_interval(
    units: list[ST.Unit], metric: str, *, level: float = LEVEL, n_boot: int = DOC_BOOT, seed: int = ST.SEED
) -> SeedInterval:
    """Mean ± t · sqrt(s²/n + V_doc) over the units (seeds); no interval from fewer than MIN_SEEDS seeds."""
    if not units or metric not in ST.unit_functions(units[0]):
        return SeedInterval(None, None, None, len(units))
    x = _values(units, metric)
    if not np.isfinite(x).all():
        return SeedInterval(None, None, None, len(units))
    v = document_variance(units, None, metric, n_boot=n_boot, seed=seed) if len(x) >= MIN_SEEDS else None
    return values_interval(x, v, level)


def values_interval(x, doc_var: float | None = None, level: float = LEVEL) -> SeedInterval:
    """The interval over seeds of plain per-seed values (V_doc = doc_var, None: no per-document scores)."""
    x = np.asarray(x, dtype=float)
    if len(x) < MIN_SEEDS:
        return SeedInterval(float(x.mean()) if len(x) else None, None, None, len(x))
    mean, _, low, high, _ = t_test(x, doc_var or 0.0, level)
    return SeedInterval(mean, low, high, len(x), math.sqrt(doc_var) if doc_var is not None else None)
