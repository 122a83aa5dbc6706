"""The analysis as pure functions, against numbers worked out by hand: aggregation over seeds, the noise rule
and verdicts, the grid's variant choice, merging summaries, the general-text curves, and how a folder's matrix
and summary are read. No MLflow, no model, no figure."""

from __future__ import annotations

import math

import numpy as np
import pytest

from harness.analysis import over_seeds as OS
from harness.analysis.aggregate import aggregate, mean_std_n, method_matrices, noise_class, rank, verdicts
from harness.analysis.general_ce import curves
from harness.analysis.intervals import fmt_ci, general_ce_verdicts, paired_sentence
from harness.analysis.merging import summarize_merging
from harness.analysis.runs import INTERRUPTED, RUNNING, MergeRun, SequenceRun, UnfinishedRun
from harness.analysis.sensitivity import VariantRow, best_variants, selection_split
from harness.report.folders import _consistency_notes, _matrix

NAN = float("nan")


def run(
    method: str, seed: str, R, tasks=("a", "b"), metrics=None, order="0", summary=None, reference=False
) -> SequenceRun:
    R = np.array(R, dtype=float)
    return SequenceRun(
        run_id=f"{method}-{seed}",
        run_name=f"{method}/seed-{seed}",
        status="FINISHED",
        method=method,
        seed=seed,
        order=order,
        tasks=list(tasks),
        R=R,
        metrics=metrics or {},
        params_effective=100.0,
        params_lora_equivalent=400.0,
        diagnostics=None,
        summary=summary,
        tags={},
        params={},
        start_time_ms=None,
        matrix_source="matrix.json",
        reference=reference,
    )


def test_mean_std_n_is_the_sample_std_and_drops_nan():
    got = mean_std_n([0.2, 0.4, NAN, 0.9])
    assert got["n"] == 3 and got["mean"] == pytest.approx(0.5)
    # ((0.2-0.5)^2 + (0.4-0.5)^2 + (0.9-0.5)^2) / (3 - 1) = (0.09 + 0.01 + 0.16) / 2 = 0.13
    assert got["std"] == pytest.approx(math.sqrt(0.13))
    one = mean_std_n([0.7])
    assert (one["mean"], one["n"]) == (0.7, 1) and math.isnan(one["std"])


def test_mean_matrices_align_tasks_by_name_and_skip_unevaluated_cells():
    # Seed 1 trained the same tasks in the same columns order, but its cell R[1, b] was not evaluated.
    r0 = run("lora", "0", [[0.1, 0.2], [0.9, 0.3], [0.6, 0.8]])
    r1 = run("lora", "1", [[0.1, 0.2], [0.7, NAN], [0.4, 0.6]])
    columns, n_rows, [mm] = method_matrices({"lora": [r0, r1]})
    assert columns == ["a", "b"] and n_rows == 3 and mm.seeds == ["0", "1"]
    assert mm.mean[1, 0] == pytest.approx(0.8) and mm.std[1, 0] == pytest.approx(math.sqrt(0.02))  # (0.9, 0.7)
    assert mm.mean[1, 1] == pytest.approx(0.3) and mm.count[1, 1] == 1 and math.isnan(mm.std[1, 1])  # NaN skipped
    assert mm.mean[2, 1] == pytest.approx(0.7)


def test_a_method_trained_in_another_task_order_lands_in_the_same_columns():
    a = run("lora", "0", [[0.1, 0.2], [0.9, 0.3], [0.6, 0.8]], tasks=("a", "b"))
    b = run("lori-s", "0", [[0.2, 0.1], [0.5, 0.4], [0.7, 0.3]], tasks=("b", "a"))  # column 0 is task b
    columns, _, mms = method_matrices({"lora": [a], "lori-s": [b]})
    assert columns == ["a", "b"]
    lori = next(m for m in mms if m.method == "lori-s")
    assert lori.mean[2].tolist() == pytest.approx([0.3, 0.7])  # task a = 0.3, task b = 0.7


def test_aggregate_rows_are_the_mean_and_std_over_seeds():
    m = lambda acc: {"ACC": acc, "BWT": -0.1, "FWT": NAN, "forgetting": 0.2, "LA": 0.5}  # noqa: E731
    runs = [
        run("lora", "0", [[0, 0], [1, 0], [1, 1]], metrics=m(0.5)),
        run("lora", "1", [[0, 0], [1, 0], [1, 1]], metrics=m(0.7)),
    ]
    _, [row] = aggregate(runs)
    assert row["n_runs"] == 2 and row["seeds"] == ["0", "1"]
    assert row["ACC"]["mean"] == pytest.approx(0.6) and row["ACC"]["std"] == pytest.approx(math.sqrt(0.02))
    assert row["FWT"]["n"] == 0 and math.isnan(row["FWT"]["mean"])
    assert row["effective_fraction_of_lora"] == pytest.approx(0.25)  # 100 / 400


def row(method: str, mean: float, std: float, metric: str = "ACC", reference: bool = False) -> dict:
    return {"method": method, "reference": reference, metric: {"mean": mean, "std": std}}


def test_the_noise_rule_compares_the_gap_with_the_larger_std():
    best = row("lori-s", 0.80, 0.02)
    assert noise_class("ACC", best, row("lora", 0.75, 0.04)) == "beyond"  # 0.05 > max(0.02, 0.04)
    assert noise_class("ACC", best, row("lora", 0.78, 0.04)) == "within"  # 0.02 < 0.04
    assert noise_class("ACC", row("lori-s", 0.8, NAN), row("lora", 0.7, NAN)) == "unknown"
    assert noise_class("ACC", best, row("lora", 0.80, 0.04)) == "none"


def test_rank_orders_by_the_metric_direction():
    rows = [row("a", 0.2, 0.0, "forgetting"), row("b", 0.1, 0.0, "forgetting"), row("c", 0.3, 0.0, "forgetting")]
    assert [r["method"] for r in rank("forgetting", rows, higher_is_better=False)] == ["b", "a", "c"]


def test_verdicts_name_the_winner_and_never_rank_a_reference():
    rows = []
    for method, acc, ref in (("lora", 0.60, False), ("lori-s", 0.70, False), ("mtl", 0.95, True)):
        r = {"method": method, "reference": ref, "ACC": {"mean": acc, "std": 0.01}}
        r.update({m: {"mean": NAN, "std": NAN} for m in ("BWT", "FWT", "forgetting", "LA")})
        rows.append(r)
    v = verdicts(rows)
    assert v["ACC"] == (
        "ACC (higher is better): LoRI-S 0.700 ± 0.010 vs LoRA 0.600 ± 0.010: "
        "LoRI-S is better by 0.100, more than the std (0.010)."
    )
    assert "MTL" not in v["ACC"] and "it needs at least two tasks" in v["BWT"]


def test_a_verdict_is_decided_by_the_test_over_seeds_and_otherwise_says_how_many_seeds_it_needs():
    best = {"method": "lori-s", "ACC": {"mean": 0.8, "ci_low": 0.7, "ci_high": 0.9}}
    other = {"method": "lora", "ACC": {"mean": 0.6, "ci_low": 0.5, "ci_high": 0.7}}
    sig = OS.values_test(
        {"0": 0.80, "1": 0.82, "2": 0.78, "3": 0.81},
        {"0": 0.60, "1": 0.61, "2": 0.59, "3": 0.62},
        "ACC",
        ("lori-s", "lora"),
    )
    text = paired_sentence("ACC", best, other, sig)
    assert sig.decided and "LoRI-S is better by 0.198 (paired t over 4 seeds: LoRI-S − LoRA = +0.198" in text
    assert "these seeds detect" in text and "at 80% power" in text
    # The README's old headline: three positive differences, p = 0.20 over seeds: undecided, about 9 seeds.
    old = OS.values_test(
        {"0": 0.833, "1": 0.685, "2": 0.502}, {"0": 0.372, "1": 0.460, "2": 0.473}, "ACC", ("lori-s", "lora")
    )
    text = paired_sentence("ACC", best, other, old)
    assert not old.decided and "undecided: 3 seeds; the observed +0.238 with this spread needs about 9 seeds" in text
    two = OS.values_test({"0": 0.8, "1": 0.82}, {"0": 0.6, "1": 0.61}, "ACC", ("lori-s", "lora"))
    assert two.p is None and two.sd is not None and two.seeds_needed is not None  # a spread to plan with, no verdict
    assert "on 2 seed(s): undecided, a test over seeds needs at least 3 seeds" in paired_sentence(
        "ACC", best, other, two
    )
    assert fmt_ci(0.8, 0.7, 0.9) == "0.800 [0.700, 0.900]" and fmt_ci(0.8, None, None) == "0.800"


def variant(method: str, name: str, acc: float, val: float | None = None) -> VariantRow:
    return VariantRow(
        method,
        name,
        {"lr": name},
        ["0"],
        {"ACC": {"mean": acc, "std": NAN, "n": 1}},
        {"mean": val, "std": NAN, "n": 1} if val is not None else None,
    )


def test_each_method_is_compared_at_its_best_variant_on_the_selection_split():
    rows = [variant("lora", "1e-4", 0.6, 0.9), variant("lora", "1e-3", 0.7, 0.5), variant("lori-s", "1e-3", 0.8, 0.4)]
    assert selection_split(rows) == "validation"
    assert best_variants(rows, "test") == {"lora": "1e-3", "lori-s": "1e-3"}
    assert best_variants(rows, "validation") == {"lora": "1e-4", "lori-s": "1e-3"}  # validation ACC chose
    assert selection_split(rows + [variant("mtl", "1e-3", 0.9)]) == "test"  # one variant without validation


def merge_run(method: str, seed: str, na: float, error: float, cross: bool | None) -> MergeRun:
    entry = {
        "normalised_accuracy": na,
        "average_drop": 1 - na,
        "relative_error": error,
        "cross_terms": cross,
        "scores": {"a": na, "b": na},
        "chosen_weight": None,
    }
    return MergeRun(
        run_id=f"{method}{seed}",
        run_name="",
        status="FINISHED",
        method=method,
        seed=seed,
        tasks=["a", "b"],
        weights=[0.5, 0.5],
        single={"a": 1.0, "b": 1.0},
        merges={"linear": entry},
        interference={},
        tags={},
        params={},
        start_time_ms=None,
        source="summary.json",
    )


def test_merging_summary_means_over_seeds_and_flags_cross_terms_above_the_tolerance():
    ms = summarize_merging(
        [
            merge_run("lora", "0", 0.6, 0.3, None),
            merge_run("lora", "1", 0.8, 2e-5, False),
            merge_run("lori-s", "0", 0.9, 1e-6, False),
        ],
        [],
    )
    lora = next(c for c in ms.cells if c.method == "lora")
    assert lora.normalised_accuracy["mean"] == pytest.approx(0.7) and lora.normalised_accuracy["n"] == 2
    assert lora.relative_error_max == pytest.approx(0.3) and lora.cross_terms  # 0.3 > 1e-4, though not flagged
    assert [(c.method, c.combination) for c in ms.warnings] == [("lora", "linear")]
    assert ms.verdicts["linear"].startswith("linear: normalised accuracy (higher is better): LoRI-S 0.900 vs LoRA ")


def test_the_page_names_each_methods_chosen_merge_weight_per_seed():
    from harness.report.merge_page import _chosen_weights

    runs = [
        merge_run("lora", "0", 0.6, 0.3, None),
        merge_run("lora", "1", 0.8, 2e-5, False),
        merge_run("lori-s", "0", 0.9, 1e-6, False),
    ]
    assert _chosen_weights(runs) == ""  # no weight grid
    for r, w in zip(runs, (0.5, 1.0, 0.25)):
        r.merges["linear"]["chosen_weight"] = w
    assert _chosen_weights(runs) == "LoRA: linear 0.5/1 (seeds 0/1); LoRI-S: linear 0.25"
    assert _chosen_weights(runs[2:]) == "linear 0.25"


def test_general_curves_average_the_stages_over_seeds_and_leave_references_out():
    by = {
        "lora": [
            run("lora", "0", [[0]], summary={"general_ce": [2.0, 2.4]}),
            run("lora", "1", [[0]], summary={"general_ce": [2.0, 2.2]}),
        ],
        "mtl": [run("mtl", "0", [[0]], summary={"general_ce": [2.0, 3.0]}, reference=True)],
    }
    got = curves(by)
    assert list(got) == ["lora"]
    mean, std = got["lora"]
    assert mean.tolist() == pytest.approx([2.0, 2.3]) and std[1] == pytest.approx(math.sqrt(0.02))


def test_the_general_text_ce_rise_gets_a_verdict_from_the_test_over_seeds():
    rise = {"lori-s": [1.27, 1.29, 1.32, 1.30], "lora": [3.21, 3.02, 3.37, 3.10], "olora": [1.35, 1.21, 1.40, 1.25]}
    by = {
        m: [run(m, str(k), [[0]], summary={"general_ce_rise": v}) for k, v in enumerate(vals)]
        for m, vals in rise.items()
    }
    by["mtl"] = [run("mtl", "0", [[0]], summary={"general_ce_rise": 0.5}, reference=True)]  # never compared
    sentences, table = general_ce_verdicts(by, baseline="olora")
    assert [(c["a"], c["b"], c["role"]) for c in table] == [
        ("lori-s", "olora", "best"),
        ("lori-s", "lora", "best"),
        ("olora", "lori-s", "baseline"),
        ("olora", "lora", "baseline"),
    ]
    assert all(c["family_size"] == 4 and c["n_pairs"] == 4 for c in table)
    vs_lora = table[1]
    assert vs_lora["difference"] == pytest.approx(np.mean(rise["lori-s"]) - np.mean(rise["lora"]))
    assert vs_lora["decided"] and sentences[1].startswith("LoRI-S raises it less, by 1.88 nats (paired t over 4 seeds")
    assert sentences[0].startswith("LoRI-S vs O-LoRA: undecided: 4 seeds")


def test_a_reference_matrix_keeps_its_own_two_rows_and_a_sequence_gets_t_plus_one():
    ref = {"tasks": ["a", "b", "c"], "stages": [0, 1], "R": [[0.1, 0.2, 0.3], [0.9, 0.8, None]]}
    tasks, R = _matrix(ref, reference=True)
    assert tasks == ["a", "b", "c"] and R.shape == (2, 3) and math.isnan(R[1, 2])
    seq = {"tasks": ["a", "b"], "stages": [0, 2], "R": [[0.1, 0.2], [0.5, 0.6]]}  # stage 1 not evaluated
    _, R = _matrix(seq, reference=False)
    assert R.shape == (3, 2) and np.isnan(R[1]).all() and R[2].tolist() == [0.5, 0.6]


def test_a_summary_number_that_disagrees_with_the_matrix_is_noted():
    R = np.array([[0.1, 0.2], [0.9, 0.3], [0.8, 0.7]])
    # ACC = (0.8 + 0.7) / 2 = 0.75; BWT = 0.8 - 0.9 = -0.1; FWT = 0.3 - 0.2 = 0.1; forgetting = 0.9 - 0.8 = 0.1;
    # LA = (0.9 + 0.7) / 2 = 0.8.
    right = {"ACC": 0.75, "BWT": -0.1, "FWT": 0.1, "forgetting": 0.1, "LA": 0.8}
    assert _consistency_notes(right, R, reference=False) == []
    assert _consistency_notes({**right, "ACC": 0.7}, R, reference=False) == [
        "summary.json has ACC = 0.700000 but the matrix gives 0.750000"
    ]
    assert _consistency_notes({**right, "BWT": NAN}, R, reference=False) == [
        "BWT is not in summary.json but the matrix defines it"
    ]


def test_an_unfinished_run_offers_resume_only_when_nobody_runs_it():
    u = UnfinishedRun(None, "lora/seed-2/order-0", "KILLED", INTERRUPTED, "lora", "2", "0", "/r/a b", 1, 3, None)
    assert u.resume_command == "harness resume '/r/a b'" and u.progress == "1 of 3"
    running = UnfinishedRun(None, "x", "RUNNING", RUNNING, "lora", "2", "0", "/r/x", 0, 3, None)
    assert running.resume_command is None and running.progress == "0 of 3 (base model only)"
