"""Continual-learning metrics: pure functions over the accuracy matrix.

R has rows for stages 0..T (row 0 = the base model before any training) and columns for tasks
1..T in the order they were trained. Missing evaluations are NaN. The definitions (METRIC_DEFINITIONS below is the one text; the report prints it):
ACC, BWT (Lopez-Paz & Ranzato 2017), FWT, and forgetting F (Chaudhry et al. 2018).
A metric whose inputs are missing (T = 1, FWT without the early evaluations, a cell that was not
evaluated) is None, never a guess. LIBRARY_NOTE says how other libraries differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

METRIC_DEFINITIONS = """\
R[i, j] = score on task j after training stage i (i, j = 1..T); b_j = score on task j before any
training (the base model, "stage 0").
- ACC  = (1/T) Σ_j R[T, j]
- BWT  = (1/(T-1)) Σ_{j<T} (R[T, j] - R[j, j])                       (Lopez-Paz & Ranzato 2017)
- FWT  = (1/(T-1)) Σ_{j>=2} (R[j-1, j] - b_j)    needs future tasks evaluated one stage early
- Forgetting F = (1/(T-1)) Σ_{j<T} max_{l in 1..T-1} (R[l, j] - R[T, j])   (Chaudhry et al. 2018;
  stage 0, the untrained model, is not in the max; stages where j was not evaluated are skipped)
- LA   = (1/T) Σ_j R[j, j]      learning accuracy (Riemer et al. 2019): how well each task was learned at
  its own stage; a task whose R[j, j] does not clear b_j by the margin learn_margin is flagged as not learned"""

# A task is learned when R[j, j] - b_j >= this (the config knob learn_margin's default; folders that predate it use it).
LEARN_MARGIN = 0.05

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


def _stack(R) -> tuple[np.ndarray, int]:
    """(R as floats, T) for one matrix or a stack of them (..., T+1, T)."""
    R = np.asarray(R, dtype=float)
    if R.ndim < 2 or R.shape[-2] != R.shape[-1] + 1:
        raise ValueError(f"accuracy matrices must have T+1 rows (stages 0..T) and T columns, got {R.shape}")
    return R, R.shape[-1]


def _mean_or_none(values: list[float]) -> float | None:
    if not values or any(math.isnan(v) for v in values):
        return None
    return float(sum(values) / len(values))


def _scalar(v: np.ndarray) -> float | None:
    x = float(v)
    return None if math.isnan(x) else x


# The definitions, on one matrix or a stack (..., T+1, T) at once (a bootstrap evaluates thousands): NaN where
# a metric is undefined. The scalar functions below are these on one matrix, with None for NaN.
def acc_values(R) -> np.ndarray:
    R, T = _stack(R)
    return R[..., T, :].mean(axis=-1)


def bwt_values(R) -> np.ndarray:
    R, T = _stack(R)
    if T < 2:
        return np.full(R.shape[:-2], np.nan)
    j = np.arange(T - 1)  # R[j+1, j] is task j (0-based) right after its stage
    return (R[..., T, j] - R[..., j + 1, j]).mean(axis=-1)


def fwt_values(R) -> np.ndarray:
    R, T = _stack(R)
    if T < 2:
        return np.full(R.shape[:-2], np.nan)
    j = np.arange(1, T)
    return (R[..., j, j] - R[..., 0, j]).mean(axis=-1)


def forgetting_values(R) -> np.ndarray:
    R, T = _stack(R)
    if T < 2:
        return np.full(R.shape[:-2], np.nan)
    drops = []
    for j in range(T - 1):
        # Every stage from the one that trained task j to T must have been evaluated on it (eval_schedule
        # diagonal_final / every:K leave them out): a max over fewer stages would be a guess, so n/a.
        complete = ~np.isnan(R[..., j + 1 : T + 1, j]).any(axis=-1)
        best = np.fmax.reduce(R[..., 1:T, j], axis=-1)  # max over the evaluated stages 1..T-1
        drops.append(np.where(complete, best - R[..., T, j], np.nan))
    return np.stack(drops, axis=-1).mean(axis=-1)


def learning_accuracy_values(R) -> np.ndarray:
    R, T = _stack(R)
    j = np.arange(T)
    return R[..., j + 1, j].mean(axis=-1)


def acc(R: np.ndarray) -> float | None:
    """Average accuracy over all tasks after the final stage."""
    _check(R)
    return _scalar(acc_values(R))


def bwt(R: np.ndarray) -> float | None:
    """Backward transfer; None when T = 1 or a needed entry is missing."""
    _check(R)
    return _scalar(bwt_values(R))


def fwt(R: np.ndarray) -> float | None:
    """Forward transfer against the base model; None unless tasks were evaluated one stage early."""
    _check(R)
    return _scalar(fwt_values(R))


def forgetting(R: np.ndarray) -> float | None:
    """Average forgetting (max over stages 1..T-1 of the drop to the final score)."""
    _check(R)
    return _scalar(forgetting_values(R))


def learning_accuracy(R: np.ndarray) -> float | None:
    """LA (Riemer et al. 2019): the mean of each task's score right after its own stage, R[j, j]."""
    _check(R)
    return _scalar(learning_accuracy_values(R))


def reference_acc_values(R) -> np.ndarray:
    """A reference run's ACC (one multi-task stage: its matrix is the base row and the final row)."""
    return np.asarray(R, dtype=float)[..., -1, :].mean(axis=-1)


def learn_gains(R: np.ndarray) -> list[float | None]:
    """Per task: its score right after its own stage minus the base model's, R[j, j] - b_j (None where either is missing)."""
    T = _check(R)
    return [_scalar(R[j + 1, j] - R[0, j]) for j in range(T)]


def not_learned(R: np.ndarray, margin: float) -> list[int] | None:
    """Indices of the tasks whose own-stage score does not clear the base score by margin (R[j, j] - b_j < margin).

    A task that was never learned loses nothing afterwards that it had: its low final score is a training failure,
    not forgetting. None when no gain is known (no base row, e.g. eval_schedule diagonal_final)."""
    gains = learn_gains(R)
    if all(g is None for g in gains):
        return None
    return [j for j, g in enumerate(gains) if g is not None and g < margin]


MERGE_DEFINITIONS = """\
S[i, j] = score on task j of task i's adapter alone; m_j = score on task j of the merged model.
- drop_j = S[j, j] - m_j                     (the task's own adapter against the merge)
- average drop = (1/T) Σ_j (S[j, j] - m_j)
- normalised accuracy = (1/T) Σ_j m_j / S[j, j]   (tasks with S[j, j] = 0 are left out)
- interference I[i, j] = score on task i after merging adapters i and j - S[i, i]   (pairs only)"""


def average_drop_values(M) -> np.ndarray:
    """A merge's average drop (1/T) Σ (S[j, j] − m_j), on M = [S[j, j]; m_j] (2 x T) or a stack of them."""
    M = np.asarray(M, dtype=float)
    return (M[..., 0, :] - M[..., 1, :]).mean(axis=-1)


def normalised_accuracy_values(M) -> np.ndarray:
    """A merge's normalised accuracy, the mean of m_j / S[j, j] over the tasks with S[j, j] > 0 (NaN: none), on M as above."""
    M = np.asarray(M, dtype=float)
    diag, m = M[..., 0, :], M[..., 1, :]
    ok = diag > 0
    n = ok.sum(axis=-1)
    total = np.where(ok, m / np.where(ok, diag, 1.0), 0.0).sum(axis=-1)
    return np.where(n > 0, total / np.maximum(n, 1), np.nan)


# Merge metric name -> its definition on M = [S[j, j]; m_j] (2 x T) or a stack (..., 2, T): summary.json, the report.
MERGE_VALUES = {"average_drop": average_drop_values, "normalised_accuracy": normalised_accuracy_values}


def merge_summary(S: np.ndarray, merged: Sequence[float]) -> dict[str, float | None]:
    """Average drop and normalised accuracy of one merge against the single-adapter diagonal."""
    M = np.stack([np.diag(S).astype(float), np.asarray(merged, dtype=float)])
    if np.isnan(M).any():
        return {k: None for k in MERGE_VALUES}
    return {k: _scalar(fn(M)) for k, fn in MERGE_VALUES.items()}


def interference_matrix(
    S: np.ndarray, pair_scores: dict[tuple[int, int], tuple[float, float]]
) -> list[list[float | None]]:
    """I[i][j] = score on task i of the merge of (i, j) minus S[i, i]; None on the diagonal and for pairs not run."""
    T = S.shape[0]
    out: list[list[float | None]] = [[None] * T for _ in range(T)]
    for (i, j), (si, sj) in pair_scores.items():
        out[i][j] = float(si - S[i, i])
        out[j][i] = float(sj - S[j, j])
    return out


def general_ce_summary(per_stage: list[float | None]) -> dict[str, Any]:
    """summary.json's general-ability record: CE per stage (0 = the base model) and the base's (its rise: TABLE)."""
    return {"general_ce": per_stage, "general_ce_base": per_stage[0]}


def general_ce_rise_values(per_stage) -> np.ndarray:
    """The general-text cross-entropy after the last stage minus the base model's (stage 0); NaN if either is missing."""
    ce = np.asarray([np.nan if v is None else float(v) for v in per_stage], dtype=float)
    return np.asarray(ce[-1] - ce[0] if len(ce) else np.nan)


# --- the metric table: each metric declared once ------------------------------------------------------------------
@dataclass(frozen=True)
class Metric:
    """One metric, declared once. summary.json, MLflow, `harness verify`, the report and docs/metrics.md iterate TABLE,
    so a new metric is one entry (and a hand-computed test).

    `values` is the definition on one input or a stack of them (the bootstrap evaluates thousands at once), NaN where
    undefined; its input is the accuracy matrix R (`over="matrix"`) or the general-text CE per stage (`"general_ce"`)."""

    name: str  # the report's column, the comparisons' name and the MLflow metric on the parent run
    key: str  # summary.json's key
    values: Callable[[Any], np.ndarray]
    higher_is_better: bool
    definition: str  # the formula, as docs/metrics.md prints it
    undefined: str  # when it is None
    reference: Callable[[Any], np.ndarray] | None = None  # on a reference run's matrix (one multi-task stage)
    over: str = "matrix"

    def of(self, x, reference: bool = False) -> float | None:
        """The metric of one input (a reference run uses `reference`; None where that is not defined)."""
        fn = self.reference if reference else self.values
        if fn is None:
            return None
        if self.over == "matrix" and not reference:  # a reference run's matrix: its own stages (base, all tasks)
            _check(np.asarray(x, dtype=float))
        return _scalar(fn(x))


TABLE: list[Metric] = [
    Metric("ACC", "acc", acc_values, True, "(1/T) Σ_j R[T, j]", "never, once the final row is evaluated",
           reference=reference_acc_values),
    Metric("BWT", "bwt", bwt_values, True, "(1/(T-1)) Σ_{j<T} (R[T, j] - R[j, j])",
           "T = 1; a reference run (one multi-task stage)"),
    Metric("FWT", "fwt", fwt_values, True, "(1/(T-1)) Σ_{j>=2} (R[j-1, j] - b_j)",
           "T = 1; tasks not evaluated one stage early (eval_scope seen, eval_schedule diagonal_final or every:K)"),
    Metric("forgetting", "forgetting", forgetting_values, False,
           "(1/(T-1)) Σ_{j<T} max_{l in 1..T-1} (R[l, j] - R[T, j])",
           "T = 1; a stage from j's own to T not evaluated on j (eval_schedule diagonal_final or every:K)"),
    Metric("LA", "la", learning_accuracy_values, True, "(1/T) Σ_j R[j, j]", "a reference run (no per-task stage)"),
    Metric("general_ce_rise", "general_ce_rise", general_ce_rise_values, False,
           "general_ce after stage T - general_ce of the base model (nats/token, the fixed general text)",
           "general_ce_tokens = 0, or the base model's CE not measured", over="general_ce"),
]  # fmt: skip


def table(over: str | None = None) -> list[Metric]:
    """The metrics (over one input kind, or all), read at call time: a metric added to TABLE shows up everywhere."""
    return [m for m in TABLE if over is None or m.over == over]


def metric(name: str) -> Metric:
    return next(m for m in TABLE if m.name == name)


def metric_values(reference: bool = False) -> dict[str, Callable]:
    """Name -> definition on a stack of matrices (only the metrics a reference run defines, for one)."""
    return {m.name: (m.reference if reference else m.values) for m in table("matrix") if not reference or m.reference}


def summarize(R: np.ndarray, reference: bool = False) -> dict[str, float | None]:
    """Every matrix metric of R by name (a reference run: ACC of its final row; the others do not apply)."""
    return {m.name: m.of(R, reference) for m in table("matrix")}


def summary_values(R: np.ndarray, general_ce: list[float | None], reference: bool = False) -> dict[str, float | None]:
    """summary.json's metric keys: every metric in TABLE, from the matrix or the per-stage general-text CE."""
    inputs = {"matrix": R, "general_ce": general_ce}
    return {m.key: m.of(inputs[m.over], reference and m.over == "matrix") for m in TABLE}


def not_learned_tasks(R: np.ndarray, tasks: list[str], margin: float) -> list[str] | None:
    """summary.json's not_learned: the tasks whose own-stage score did not clear the base score by `margin` (None: not
    judged). Not for a reference run (one stage, every task at once): it has no per-task own stage."""
    flagged = not_learned(R, margin)
    return None if flagged is None else [tasks[j] for j in flagged]


def markdown_table() -> str:
    """docs/metrics.md's table of every metric (a test checks that the page holds it)."""
    rows = ["| metric | summary.json | MLflow | definition | better | None when |", "|---|---|---|---|---|---|"]
    rows += [f"| {m.name} | `{m.key}` | `{m.name}` | {m.definition} | {'higher' if m.higher_is_better else 'lower'} | "
             f"{m.undefined} |" for m in TABLE]  # fmt: skip
    return "\n".join(rows)
