"""Continual-learning metrics: pure functions over the accuracy matrix.

R has rows for stages 0..T (row 0 = the base model before any training) and columns for tasks
1..T in the order they were trained. Missing evaluations are NaN. The definitions (METRIC_DEFINITIONS below is the one text; the report prints it):
ACC, BWT (Lopez-Paz & Ranzato 2017), FWT, and forgetting F (Chaudhry et al. 2018).
A metric whose inputs are missing (T = 1, FWT without the early evaluations, a cell that was not
evaluated) is None, never a guess. LIBRARY_NOTE says how other libraries differ.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

METRIC_DEFINITIONS = """\
R[i, j] = score on task j after training stage i (i, j = 1..T); b_j = score on task j before any
training (the base model, "stage 0").
- ACC  = (1/T) Σ_j R[T, j]
- BWT  = (1/(T-1)) Σ_{j<T} (R[T, j] - R[j, j])                       (Lopez-Paz & Ranzato 2017)
- FWT  = (1/(T-1)) Σ_{j>=2} (R[j-1, j] - b_j)    needs future tasks evaluated one stage early
- Forgetting F = (1/(T-1)) Σ_{j<T} max_{l in 1..T-1} (R[l, j] - R[T, j])   (Chaudhry et al. 2018;
  stage 0, the untrained model, is not in the max; stages where j was not evaluated are skipped)"""

LIBRARY_NOTE = (
    "Popular continual-learning libraries define these differently: Avalanche's forgetting uses the "
    "first score instead of the max, Mammoth includes the last row in the max, and some repositories "
    "divide BWT by T. Numbers from those tools are not directly comparable with the ones here."
)


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
        # Every stage from the one that trained task j to T-1 must have been evaluated on it (eval_schedule
        # diagonal_final / every:K leave them out): a max over fewer stages would be a guess, so n/a.
        if any(math.isnan(R[l, j]) for l in range(j + 1, T)) or math.isnan(R[T, j]):
            return None
        seen = [R[l, j] for l in range(1, T) if not math.isnan(R[l, j])]
        drops.append(max(seen) - R[T, j])
    return _mean_or_none(drops)


def summarize(R: np.ndarray) -> dict[str, float | None]:
    """All four metrics as a dict with the names used in MLflow and summary.json."""
    return {"ACC": acc(R), "BWT": bwt(R), "FWT": fwt(R), "forgetting": forgetting(R)}


def summarize_reference(R: np.ndarray) -> dict[str, float | None]:
    """A reference row (multi-task training, one stage): ACC of its final row; BWT, FWT, forgetting do not apply."""
    final = [float(v) for v in R[-1]]
    return {"ACC": _mean_or_none(final), "BWT": None, "FWT": None, "forgetting": None}


MERGE_DEFINITIONS = """\
S[i, j] = score on task j of task i's adapter alone; m_j = score on task j of the merged model.
- drop_j = S[j, j] - m_j                     (the task's own adapter against the merge)
- average drop = (1/T) Σ_j (S[j, j] - m_j)
- normalised accuracy = (1/T) Σ_j m_j / S[j, j]   (tasks with S[j, j] = 0 are left out)
- interference I[i, j] = score on task i after merging adapters i and j - S[i, i]   (pairs only)"""


def merge_summary(S: np.ndarray, merged: Sequence[float]) -> dict[str, float | None]:
    """Average drop and normalised accuracy of one merge against the single-adapter diagonal."""
    diag = np.diag(S).astype(float)
    m = np.asarray(merged, dtype=float)
    if np.isnan(diag).any() or np.isnan(m).any():
        return {"average_drop": None, "normalised_accuracy": None}
    ok = diag > 0
    return {"average_drop": float(np.mean(diag - m)),
            "normalised_accuracy": float(np.mean(m[ok] / diag[ok])) if ok.any() else None}


def interference_matrix(S: np.ndarray, pair_scores: dict[tuple[int, int], tuple[float, float]]) -> list[list[float | None]]:
    """I[i][j] = score on task i of the merge of (i, j) minus S[i, i]; None on the diagonal and for pairs not run."""
    T = S.shape[0]
    out: list[list[float | None]] = [[None] * T for _ in range(T)]
    for (i, j), (si, sj) in pair_scores.items():
        out[i][j] = float(si - S[i, i])
        out[j][i] = float(sj - S[j, j])
    return out
