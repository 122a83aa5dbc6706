"""Bootstrap intervals and paired comparisons on synthetic accuracy matrices with known noise.

Each synthetic sequence scores the same n documents of every task at every stage: document d of task j
is right at stage i when U < P[i, j], with U the document's own uniform draw (shared by every stage,
seed and method, as a test document is) with probability RHO and a fresh one otherwise, so every cell is
unbiased for P[i, j] and cells of the same documents are correlated, as in real runs. A seed shifts each
cell by Gaussian noise. The true value of a metric is its definition applied to P.
"""

from __future__ import annotations

import numpy as np
import pytest

from harness import metrics as MX
from harness.analysis import over_seeds as OS
from harness.analysis import statistics as ST
from harness.analysis.documents import cell_score, check_documents, gather, matrix_from_documents, sample_scores

TASKS = ["a", "b", "c"]
# True accuracies: stage 0 = base; clear maxima so that forgetting's max is well defined.
P = np.array([[0.30, 0.35, 0.40], [0.85, 0.40, 0.45], [0.65, 0.85, 0.45], [0.55, 0.70, 0.85]])
RHO = 0.7
METRICS = ("ACC", "BWT", "FWT", "forgetting", "LA")


def truth(P: np.ndarray) -> dict[str, float]:
    return {m: float(MX.metric_values()[m](P)) for m in METRICS}


def synthetic_units(rng, P, *, n_seeds: int, n_docs: int, seed_sd: float, shared=None, keys=None) -> list[ST.Unit]:
    shared = shared if shared is not None else {t: rng.random(n_docs) for t in TASKS}
    units = []
    for k in range(n_seeds):
        Pk = P + rng.normal(0.0, seed_sd, P.shape)
        scores = {}
        for j, t in enumerate(TASKS):
            A = np.empty((P.shape[0], n_docs))
            for i in range(P.shape[0]):
                U = np.where(rng.random(n_docs) < RHO, shared[t], rng.random(n_docs))
                A[i] = (U < Pk[i, j]).astype(float)
            scores[t] = A
        R = np.stack([scores[t].mean(axis=1) for t in TASKS], axis=1)
        units.append(
            ST.Unit(
                key=str(keys[k] if keys else k),
                tasks=TASKS,
                R=R,
                scores=scores,
                doc_ids={t: list(range(n_docs)) for t in TASKS},
            )
        )
    return units


def coverage(n_seeds: int, seed_sd: float, n_rep: int = 200, n_boot: int = 400) -> dict[str, float]:
    """One seed: the documents' measurement interval; several: the interval over seeds (over_seeds.seed_interval)."""
    rng = np.random.default_rng(12345)
    true = truth(P)
    hits = {m: 0 for m in METRICS} | {"cell": 0}
    for rep in range(n_rep):
        units = synthetic_units(rng, P, n_seeds=n_seeds, n_docs=100, seed_sd=seed_sd)
        for m in METRICS:
            e = (
                ST.estimate(units, m, n_boot=n_boot, seed=rep)
                if n_seeds == 1
                else OS.seed_interval(units, m, n_boot=n_boot)
            )
            hits[m] += e.low <= true[m] <= e.high
        low, high, _ = ST.cell_intervals(units, TASKS, P.shape[0], n_boot=n_boot, seed=rep, resample_seeds=n_seeds > 1)
        hits["cell"] += low[3, 1] <= P[3, 1] <= high[3, 1]
    return {m: h / n_rep for m, h in hits.items()}


def test_document_bootstrap_intervals_cover_the_true_value_at_about_the_nominal_rate():
    cov = coverage(n_seeds=1, seed_sd=0.0)
    for m, c in cov.items():
        assert 0.90 <= c <= 0.99, f"{m}: 95% interval covered the truth in {c:.0%} of 200 replicates"


def test_the_interval_over_seeds_covers_the_true_value():
    cov = coverage(n_seeds=5, seed_sd=0.04)
    for m, c in cov.items():
        assert 0.90 <= c <= 0.99, f"{m}: 95% interval covered the truth in {c:.0%} of 200 replicates"


def test_a_measurement_without_per_document_scores_has_no_interval():
    rng = np.random.default_rng(0)
    units = [ST.Unit(u.key, u.tasks, u.R) for u in synthetic_units(rng, P, n_seeds=3, n_docs=50, seed_sd=0.05)]
    fixed = ST.estimate(units, "ACC", n_boot=500)
    assert fixed.low is None and fixed.resampled == "nothing"  # the seeds fixed and no documents: nothing to draw
    e = ST.estimate(units, "ACC", n_boot=500, resample_seeds=True)
    vals = [MX.acc(u.R) for u in units]
    assert e.resampled == "seeds" and e.mean == pytest.approx(np.mean(vals))
    assert min(vals) <= e.low <= e.high <= max(vals)  # a mean of resampled seeds stays within them
    one = ST.estimate(units[:1], "ACC")
    assert one.low is None and one.high is None and one.resampled == "nothing"


def test_paired_bootstrap_finds_a_planted_difference():
    rng = np.random.default_rng(7)
    shared = {t: rng.random(100) for t in TASKS}  # the same test documents for both methods
    worse = P.copy()
    worse[3] -= 0.10  # method b forgets more: ACC lower by 0.10
    a = synthetic_units(rng, P, n_seeds=3, n_docs=100, seed_sd=0.02, shared=shared)
    b = synthetic_units(rng, worse, n_seeds=3, n_docs=100, seed_sd=0.02, shared=shared)
    c = ST.paired_difference(a, b, "ACC", ("a", "b"), n_boot=1000)
    assert c.resampled == "documents" and c.n_units == 3  # a measurement: the seeds held fixed
    assert c.p < 0.01 and c.low > 0
    assert c.low <= 0.10 <= c.high


def test_a_method_measured_against_itself_differs_by_nothing():
    rng = np.random.default_rng(8)
    a = synthetic_units(rng, P, n_seeds=3, n_docs=100, seed_sd=0.02)
    same = ST.paired_difference(a, [ST.Unit(u.key, u.tasks, u.R.copy(), dict(u.scores), u.doc_ids) for u in a], "BWT")
    assert same.difference == 0 and same.low == 0 and same.high == 0 and same.p == 1.0
    # Whether it calls different methods different at the stated rate is over_seeds' job: tests/test_over_seeds.py.


def test_paired_units_are_matched_by_seed_and_order():
    rng = np.random.default_rng(9)
    a = synthetic_units(rng, P, n_seeds=3, n_docs=20, seed_sd=0.0, keys=["0/0", "1/0", "2/0"])
    b = synthetic_units(rng, P, n_seeds=2, n_docs=20, seed_sd=0.0, keys=["2/0", "1/0"])
    ua, ub = ST.pair_units(a, b)
    assert [u.key for u in ua] == [u.key for u in ub] == ["1/0", "2/0"]
    assert ST.paired_difference(a, b, "ACC").n_units == 2


def test_bootstrap_p_is_never_zero_and_at_most_one():
    assert ST.bootstrap_p(np.ones(999)) == pytest.approx(2 / 1000)
    assert ST.bootstrap_p(np.zeros(10)) == 1.0
    assert ST.bootstrap_p(np.array([-1.0, 1.0, 2.0, 3.0])) == pytest.approx(2 * 2 / 5)


def test_batched_metric_definitions_equal_the_scalar_ones():
    rng = np.random.default_rng(3)
    Rs = rng.random((50, 5, 4))
    Rs[rng.random(Rs.shape) < 0.1] = np.nan  # cells not evaluated
    for fn, scalar in (
        (MX.acc_values, MX.acc),
        (MX.bwt_values, MX.bwt),
        (MX.fwt_values, MX.fwt),
        (MX.forgetting_values, MX.forgetting),
        (MX.learning_accuracy_values, MX.learning_accuracy),
    ):
        batch = fn(Rs)
        for R, v in zip(Rs, batch):
            s = scalar(R)
            assert (s is None and np.isnan(v)) or s == pytest.approx(v, abs=1e-12)


def test_per_document_scores_take_the_primary_metrics_filter():
    samples = [
        {"doc_id": 1, "filter": "strip", "exact_match": 1.0},
        {"doc_id": 0, "filter": "strip", "exact_match": 0.0},
        {"doc_id": 0, "filter": "raw", "exact_match": 1.0},
        {"doc_id": 1, "filter": "raw", "exact_match": 1.0},
    ]
    assert sample_scores(samples, "exact_match,strip") == {
        "metric": "exact_match,strip",
        "doc_ids": [0, 1],
        "scores": [0, 1],
    }
    assert cell_score([0, 1, 1]) == 2 / 3


def test_gathered_documents_recompute_the_matrix_and_refuse_other_documents():
    stage = {
        0: {"tasks": {"x": {"doc_ids": [3, 5], "scores": [0, 1]}}},
        1: {"tasks": {"x": {"doc_ids": [3, 5], "scores": [1, 1]}, "y": {"doc_ids": [0], "scores": [1]}}},
    }
    docs = gather(stage, ["x", "y"], 2)
    R = matrix_from_documents(docs)
    assert R[0, 0] == 0.5 and R[1, 0] == 1.0 and np.isnan(R[0, 1]) and R[1, 1] == 1.0
    assert check_documents(docs, R) == []
    stage[1]["tasks"]["x"]["doc_ids"] = [3, 6]
    with pytest.raises(ValueError, match="other documents"):
        gather(stage, ["x", "y"], 2)
