"""The verdicts' test over seeds: its error rate and power proved by simulation, and its parts by hand.

Simulations (tests/simulate_cl.py): two methods on the same 100 documents of each of 4 tasks, each seed with
its own training luck, from none to a seed that loses a whole task. 400 experiments per setting, so a rate's
Monte-Carlo standard error is about 0.011 at 5%; "at most 5%" is checked as at most 5% + 2 of those.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from simulate_cl import SEED_EFFECTS, P, SeedEffect, experiment, mc_error

from harness.analysis import over_seeds as OS
from harness.analysis import statistics as ST

N_EXPERIMENTS = 400
N_BOOT = 200  # document draws behind V_doc in the simulations (the report uses 400)
BOUND = 0.05 + 2 * mc_error(0.05, N_EXPERIMENTS)


def rejection_rate(n_seeds: int, effect: SeedEffect, gap: float = 0.0, test=None, seed: int = 0) -> float:
    rng = np.random.default_rng([seed, n_seeds, SEED_EFFECTS.index(effect)])
    test = test or (lambda a, b: OS.seed_test(a, b, "ACC", n_boot=N_BOOT).p)
    return float(np.mean([test(*experiment(rng, n_seeds, effect, gap)) < 0.05 for _ in range(N_EXPERIMENTS)]))


@pytest.mark.slow
@pytest.mark.parametrize("effect", SEED_EFFECTS, ids=[e.name for e in SEED_EFFECTS])
@pytest.mark.parametrize("n_seeds", [3, 5, 10])
def test_identical_methods_are_called_different_at_most_5_percent_of_the_time(n_seeds, effect):
    rate = rejection_rate(n_seeds, effect)
    assert rate <= BOUND, f"{effect.name}, {n_seeds} seeds: identical methods called different in {rate:.1%}"


@pytest.mark.slow
def test_the_seed_bootstrap_the_report_used_fails_the_same_simulation():
    large = next(e for e in SEED_EFFECTS if e.name == "large")
    old = rejection_rate(
        3, large, test=lambda a, b: ST.paired_difference(a, b, "ACC", n_boot=400, resample_seeds=True).p
    )
    assert old > BOUND, f"the seeds-and-documents bootstrap rejected a true null in only {old:.1%}"


@pytest.mark.slow
def test_a_planted_gap_is_found_with_the_power_the_report_states():
    """Plant the difference the report says 10 seeds detect with 80% power; it is found about 80% of the time."""
    moderate = next(e for e in SEED_EFFECTS if e.name == "moderate")
    rng = np.random.default_rng(99)
    # The report states it from each experiment's own spread; over experiments its root mean square is the
    # design's (s² is unbiased for the variance, s is not).
    stated = np.sqrt(
        np.mean(
            [OS.seed_test(*experiment(rng, 10, moderate), "ACC", n_boot=N_BOOT).detectable ** 2 for _ in range(100)]
        )
    )
    power = rejection_rate(10, moderate, gap=float(stated), seed=1)
    assert abs(power - OS.POWER) <= 3 * mc_error(OS.POWER, N_EXPERIMENTS), (
        f"gap {stated:.3f}: found in {power:.1%} of experiments, stated {OS.POWER:.0%}"
    )


def test_the_t_test_over_seeds_is_the_paired_t_test_without_documents():
    d = np.array([0.461, 0.225, 0.029])  # LoRI-S - LoRA on the default suite, seeds 0-2 (the example)
    mean, se, low, high, p = OS.t_test(d)
    ref = stats.ttest_rel(d, np.zeros(3))
    assert p == pytest.approx(ref.pvalue) and p == pytest.approx(0.20, abs=0.01)
    assert low < 0 < high and mean == pytest.approx(d.mean()) and se == pytest.approx(d.std(ddof=1) / np.sqrt(3))


def test_document_noise_the_seeds_share_widens_the_interval():
    d = np.array([0.10, 0.12, 0.08, 0.11])
    _, se0, lo0, hi0, p0 = OS.t_test(d)
    _, se1, lo1, hi1, p1 = OS.t_test(d, doc_var=0.02**2)
    assert se1 == pytest.approx(np.sqrt(se0**2 + 0.02**2)) and lo1 < lo0 and hi1 > hi0
    # The documents' part is known from hundreds of documents: its degrees of freedom are many (Welch-Satterthwaite)
    assert OS.degrees_of_freedom(np.std(d, ddof=1), 4, 0.02**2) > 3 == OS.degrees_of_freedom(np.std(d, ddof=1), 4)


def test_power_is_alpha_at_no_difference_and_80_percent_at_the_detectable_difference():
    assert OS.power(0.0, 5, 0.1) == pytest.approx(0.05)
    mde = OS.detectable_difference(5, 0.1)
    assert OS.power(mde, 5, 0.1) == pytest.approx(0.80, abs=1e-6)
    # Normal approximation: (z_0.975 + z_0.8) * sd / sqrt(n) is a lower bound with few seeds.
    assert mde > (1.96 + 0.8416) * 0.1 / np.sqrt(5)


def test_seeds_needed_is_the_fewest_seeds_with_80_percent_power():
    n = OS.seeds_needed(0.238, 0.216)  # the default suite's observed ACC gap and spread over 3 seeds
    assert OS.power(0.238, n, 0.216) >= 0.8 > OS.power(0.238, n - 1, 0.216)
    assert 6 <= n <= 12
    assert OS.seeds_needed(0.0, 0.1) is None
    # The shared part of the documents' noise does not shrink with seeds: a gap below it is never decided.
    assert OS.seeds_needed(0.01, 0.05, doc_var=0.02**2) is None


def test_holm_adjusts_in_step_down_order():
    assert OS.holm([0.01, 0.04, 0.03, None]) == pytest.approx([0.03, 0.06, 0.06, None])
    assert OS.holm([0.5]) == [0.5]


def test_the_document_variance_is_what_the_seeds_share():
    """Documents shared by all seeds: V_doc is about their whole variance; independent per seed: about 0."""
    rng = np.random.default_rng(5)
    effect = SeedEffect("none", 0.0, 0.0)
    a, b = experiment(rng, 5, effect)
    copy = [ST.Unit(u.key, u.tasks, u.R, u.scores, u.doc_ids) for u in a]
    alone = OS.document_variance(a, None, "ACC", n_boot=N_BOOT)
    own = np.mean([OS.document_variance([u], None, "ACC", n_boot=N_BOOT) for u in a])
    assert 0 < alone <= own  # the documents' errors of different seeds correlate (shared items) but not fully
    assert OS.document_variance(a, copy, "ACC") == 0.0  # a method against itself: nothing to share


def test_a_seed_test_reports_the_difference_interval_power_and_seeds_needed():
    rng = np.random.default_rng(11)
    moderate = next(e for e in SEED_EFFECTS if e.name == "moderate")
    a, b = experiment(rng, 5, moderate, gap=0.15)
    t = OS.seed_test(a, b, "ACC", ("lori-s", "lora"))
    assert t.n_pairs == 5 and len(t.per_seed) == 5 and t.difference == pytest.approx(np.mean(t.per_seed))
    assert t.low < t.difference < t.high and 0 < t.p < 1 and t.document_se > 0
    assert t.detectable > 0 and t.seeds_needed >= 2
    one = OS.seed_test(a[:1], b[:1], "ACC")
    assert one.p is None and one.low is None and one.difference is not None


def test_the_seed_interval_covers_the_true_value_over_seeds():
    from harness import metrics as MX

    rng = np.random.default_rng(2)
    moderate = next(e for e in SEED_EFFECTS if e.name == "moderate")
    # The truth is the expected ACC over seeds: estimated once from many seeds' true matrices.
    from simulate_cl import seed_matrix

    truth = np.mean([MX.acc(seed_matrix(rng, P, moderate)) for _ in range(20000)])
    hits = 0
    for _ in range(200):
        a, _ = experiment(rng, 5, moderate)
        e = OS.seed_interval(a, "ACC", n_boot=N_BOOT)
        hits += e.low <= truth <= e.high
    assert 0.90 <= hits / 200 <= 0.99


def test_an_undecided_test_never_says_it_needs_no_more_seeds_than_it_has():
    from harness.analysis.intervals import fmt_needed

    t = OS.SeedTest("a", "b", "ACC", 3, difference=0.16, p=0.03, seeds_needed=3, p_adjusted=0.053, family=2)
    assert not t.decided and fmt_needed(t) == "more than 3 seeds"
    t.p_adjusted = 0.03  # decided: the planning estimate stands
    assert t.decided and fmt_needed(t) == "about 3 seeds"
    assert fmt_needed(OS.SeedTest("a", "b", "ACC", 3, difference=0.1, p=0.4, seeds_needed=9)) == "about 9 seeds"
    noisy = OS.SeedTest("a", "b", "ACC", 3, difference=0.01, p=0.4, document_se=0.05)  # no seed count decides it
    assert fmt_needed(noisy).startswith("more test documents: no number of seeds decides it")
