"""Synthetic continual-learning experiments with known truth, for checking a test's error rate and power.

A sequence is a (T+1) x T matrix of per-document 0/1 scores: document d of task j is right at stage i when
U < P_k[i, j], where U is the document's own uniform draw (shared by every stage, seed and method, as a test
document is) with probability RHO and a fresh one otherwise; so every cell is unbiased for P_k[i, j] and cells
of the same documents are correlated, as in real runs. P_k is the method's true matrix shifted by the seed's
own training luck: Gaussian noise of sd `seed_sd` on every trained cell and, with probability `lose`, one
earlier task lost entirely at the end (its final score falls back to the base model's), as LoRI-S's seed 2
lost `dates` on the default suite.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from harness.analysis import statistics as ST

TASKS = ["a", "b", "c", "d"]
# True accuracies of a 4-task sequence: stage 0 = base; each task learned at its stage, partly forgotten later.
P = np.array(
    [
        [0.30, 0.35, 0.40, 0.25],
        [0.90, 0.40, 0.45, 0.30],
        [0.75, 0.90, 0.45, 0.30],
        [0.65, 0.80, 0.90, 0.35],
        [0.60, 0.72, 0.80, 0.90],
    ]
)
RHO = 0.7
N_DOCS = 100


@dataclass(frozen=True)
class SeedEffect:
    name: str
    sd: float  # per-cell Gaussian shift of a seed's true matrix
    lose: float  # probability that a seed loses one earlier task entirely


SEED_EFFECTS = (
    SeedEffect("none", 0.0, 0.0),
    SeedEffect("moderate", 0.08, 0.0),
    SeedEffect("large", 0.15, 0.0),
    SeedEffect("loses a task", 0.05, 0.3),
)


def seed_matrix(rng: np.random.Generator, P: np.ndarray, effect: SeedEffect) -> np.ndarray:
    """One seed's true matrix: P with its training luck."""
    Pk = P.copy()
    Pk[1:] += rng.normal(0.0, effect.sd, Pk[1:].shape)
    if effect.lose and rng.random() < effect.lose:
        j = int(rng.integers(0, P.shape[1] - 1))  # an earlier task, lost by the end of the sequence
        Pk[-1, j] = P[0, j]
    return np.clip(Pk, 0.0, 1.0)


def units(rng: np.random.Generator, P: np.ndarray, n_seeds: int, effect: SeedEffect, shared: dict) -> list[ST.Unit]:
    """n_seeds sequences of one method on the shared documents."""
    out = []
    for k in range(n_seeds):
        Pk = seed_matrix(rng, P, effect)
        scores = {}
        for j, t in enumerate(TASKS):
            own = rng.random((P.shape[0], N_DOCS))
            U = np.where(rng.random((P.shape[0], N_DOCS)) < RHO, shared[t][None, :], own)
            scores[t] = (U < Pk[:, j : j + 1]).astype(float)
        R = np.stack([scores[t].mean(axis=1) for t in TASKS], axis=1)
        out.append(
            ST.Unit(key=str(k), tasks=TASKS, R=R, scores=scores, doc_ids={t: list(range(N_DOCS)) for t in TASKS})
        )
    return out


def experiment(rng: np.random.Generator, n_seeds: int, effect: SeedEffect, gap: float = 0.0):
    """Two methods on the same documents, independent seeds; method b's final row lower by `gap` (ACC lower by gap)."""
    shared = {t: rng.random(N_DOCS) for t in TASKS}
    worse = P.copy()
    worse[-1] -= gap
    return units(rng, P, n_seeds, effect, shared), units(rng, worse, n_seeds, effect, shared)


def mc_error(rate: float, n: int) -> float:
    """The Monte-Carlo standard error of a rate estimated from n experiments."""
    return float(np.sqrt(rate * (1 - rate) / n))


def table(n_experiments: int = 400, gap: float = 0.10) -> list[str]:
    """Markdown rows: seed effect x seeds -> rejection rate of identical methods (the test over seeds, and the
    seed bootstrap it replaced) and the power at a planted ACC gap, measured and as the test states it."""
    from harness.analysis import over_seeds as OS

    rows = [
        "| seed effect | seeds | identical methods called different: test over seeds | same: old seed bootstrap "
        f"| planted gap {gap:.2f} found | power stated for it (median) |",
        "|---|---|---|---|---|---|",
    ]
    for effect in SEED_EFFECTS:
        for n in (3, 5, 10):
            rng = np.random.default_rng([7, n, SEED_EFFECTS.index(effect)])
            new = old = found = 0
            stated = []
            for _ in range(n_experiments):
                a, b = experiment(rng, n, effect)
                new += OS.seed_test(a, b, "ACC", n_boot=200).p < 0.05
                old += ST.paired_difference(a, b, "ACC", n_boot=400, resample_seeds=True).p < 0.05
                t = OS.seed_test(*experiment(rng, n, effect, gap), "ACC", n_boot=200)
                found += t.p < 0.05
                stated.append(OS.power(gap, n, t.sd, (t.document_se or 0.0) ** 2))
            e = mc_error(0.05, n_experiments)
            rows.append(
                f"| {effect.name} | {n} | {new / n_experiments:.1%} | {old / n_experiments:.1%} "
                f"| {found / n_experiments:.1%} | {float(np.median(stated)):.1%} |"
            )
    rows.append(f"\n{n_experiments} experiments per row; a rate's Monte-Carlo standard error at 5% is {e:.1%}.")
    return rows


if __name__ == "__main__":  # the table in docs/statistics.md: python tests/simulate_cl.py [N_EXPERIMENTS]
    import sys

    print("\n".join(table(int(sys.argv[1]) if len(sys.argv) > 1 else 400)))
