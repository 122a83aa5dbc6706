"""Continual-learning metrics: pure functions over the accuracy matrix.

R has rows for stages 0..T (row 0 = the base model before any training) and columns for tasks
1..T in the order they were trained. Missing evaluations are NaN. Definitions (used everywhere in
this project, also in the report):

    ACC = (1/T) Σ_j R[T, j]
    BWT = (1/(T-1)) Σ_{j<T} (R[T, j] - R[j, j])                    Lopez-Paz & Ranzato 2017
    FWT = (1/(T-1)) Σ_{j>=2} (R[j-1, j] - b_j),  b_j = R[0, j]      needs eval_scope: all
    F   = (1/(T-1)) Σ_{j<T} max_{l in 1..T-1} (R[l, j] - R[T, j])   Chaudhry et al. 2018

Stage 0 is not in the max of F; stages where task j was not evaluated are skipped. A metric
whose inputs are missing (T = 1, or FWT without the early evaluations) is None, never a guess.
Avalanche (first score instead of max), Mammoth (last row inside the max) and some repositories
(BWT divided by T) differ from these.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

DEFINITIONS = {
    "ACC": "ACC = (1/T) Σ_j R[T, j]: mean accuracy over all tasks after the last stage.",
    "BWT": "BWT = (1/(T-1)) Σ_{j<T} (R[T, j] − R[j, j]): how much training later tasks changed "
    "earlier ones (negative = forgetting; Lopez-Paz & Ranzato 2017).",
    "FWT": "FWT = (1/(T-1)) Σ_{j≥2} (R[j-1, j] − b_j), b_j = stage-0 score: how much earlier "
    "stages helped a task before it was trained (needs eval_scope: all).",
    "forgetting": "F = (1/(T-1)) Σ_{j<T} max_{l∈1..T-1} (R[l, j] − R[T, j]): mean drop from each "
    "task's best score to its final score (Chaudhry et al. 2018; stage 0 excluded from the max).",
}


def as_matrix(rows: Sequence[Sequence[float | None]]) -> np.ndarray:
    """Convert nested lists (None for 'not evaluated') to a float matrix with NaN."""
    return np.array([[np.nan if v is None else float(v) for v in row] for row in rows], dtype=float)


def _check(R: np.ndarray) -> int:
    if R.ndim != 2 or R.shape[0] != R.shape[1] + 1:
        raise ValueError(f"accuracy matrix must have T+1 rows (stages 0..T) and T columns, got {R.shape}")
    return R.shape[1]


def _mean_or_none(values: list[float]) -> float | None:
    if not values or any(math.isnan(v) for v in values):
        return None
    return float(sum(values) / len(values))


def acc(R: np.ndarray) -> float | None:
    """Average accuracy over all tasks after the final stage."""
    T = _check(R)
    return _mean_or_none([R[T, j] for j in range(T)])


def bwt(R: np.ndarray) -> float | None:
    """Backward transfer; None when T = 1 or a needed entry is missing."""
    T = _check(R)
    if T < 2:
        return None
    # Row index i (1-based stage) and column j (0-based task): R[j+1, j] is "right after its stage".
    return _mean_or_none([R[T, j] - R[j + 1, j] for j in range(T - 1)])


def fwt(R: np.ndarray) -> float | None:
    """Forward transfer against the base model; None unless tasks were evaluated one stage early."""
    T = _check(R)
    if T < 2:
        return None
    return _mean_or_none([R[j, j] - R[0, j] for j in range(1, T)])


def forgetting(R: np.ndarray) -> float | None:
    """Average forgetting (max over stages 1..T-1 of the drop to the final score)."""
    T = _check(R)
    if T < 2:
        return None
    drops = []
    for j in range(T - 1):
        seen = [R[l, j] for l in range(1, T) if not math.isnan(R[l, j])]
        if not seen or math.isnan(R[T, j]):
            return None
        drops.append(max(seen) - R[T, j])
    return _mean_or_none(drops)


def summarize(R: np.ndarray) -> dict[str, float | None]:
    """All four metrics as a dict with the names used in MLflow and summary.json."""
    return {"ACC": acc(R), "BWT": bwt(R), "FWT": fwt(R), "forgetting": forgetting(R)}
