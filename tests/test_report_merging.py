"""The report's Merging section against merge run folders and a real sqlite MLflow store, written as `harness merge`
writes them.

Each merge run is a folder results/<experiment>/merge/<method>/seed-<s>/ (config.yaml with its merge block,
state.json, single.json, merged.json, summary.json), which the report reads, and its MLflow copy
(harness.merging.protocol's contract: a FINISHED parent run per (method, seed) tagged harness.kind=merge with
metrics single/<task> and merged/<combination>/*, the artifacts, and child runs per task adapter and per merge),
from which the report takes only the run dates, statuses and git commit. Its scores are made-up test input; the expected table values are computed here by
hand from the formulas in harness.metrics.MERGE_DEFINITIONS. No model is trained.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import sys
from html import escape as html_escape
from pathlib import Path

import pytest
from scipy import stats as scipy_stats

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

from test_report import EXPERIMENT, build_fixture_store  # noqa: E402

from harness.errors import HarnessError  # noqa: E402
from harness.report import write_report  # noqa: E402

TASKS = ["arith", "capitals", "sentiment"]
COMBINATIONS = ["cat", "linear"]
DISPLAY = {"lora": "LoRA", "lori-s": "LoRI-S"}
# S[j, j] per (method, seed), and the merged scores m_j per (method, seed, combination). Test input, not results.
SINGLE = {
    ("lora", "0"): [0.90, 0.80, 0.70],
    ("lora", "1"): [0.92, 0.78, 0.72],
    ("lori-s", "0"): [0.88, 0.82, 0.74],
    ("lori-s", "1"): [0.86, 0.84, 0.70],
}
MERGED = {
    ("lora", "0", "cat"): [0.60, 0.50, 0.55],
    ("lora", "1", "cat"): [0.62, 0.48, 0.50],
    ("lora", "0", "linear"): [0.40, 0.35, 0.50],
    ("lora", "1", "linear"): [0.55, 0.40, 0.60],
    ("lori-s", "0", "cat"): [0.85, 0.80, 0.70],
    ("lori-s", "1", "cat"): [0.84, 0.81, 0.68],
    ("lori-s", "0", "linear"): [0.42, 0.38, 0.50],
    ("lori-s", "1", "linear"): [0.47, 0.33, 0.51],
}
# ‖ΔW − Σ w_i ΔW_i‖ / ‖Σ w_i ΔW_i‖: cat is exact, linear has cross terms (the A's differ).
REL_ERROR = {("lora", "cat"): 2e-7, ("lora", "linear"): 0.42, ("lori-s", "cat"): 3e-7, ("lori-s", "linear"): 0.013}
PAIRS = {"lori-s"}  # only LoRI-S's runs merged the pairs (interference)
WEIGHTS = {"lora": [1 / 3] * 3, "lori-s": [0.4] * 3}


def pair_scores(method: str, seed: str, combination: str, i: int, j: int) -> tuple[float, float]:
    """Scores on tasks i and j of the merge of adapters i and j (i < j): a little below S[i, i], S[j, j]."""
    d = SINGLE[(method, seed)]
    k = 0.01 * (1 + int(seed)) * (2 if combination == "linear" else 1)
    return round(d[i] - k * (1 + j), 6), round(d[j] - k * (2 + i), 6)


def hand(method: str, seed: str, combination: str) -> dict[str, float]:
    """MERGE_DEFINITIONS by hand: normalised accuracy = mean_j m_j / S[j, j], average drop = mean_j (S[j, j] - m_j)."""
    s, m = SINGLE[(method, seed)], MERGED[(method, seed, combination)]
    return {
        "normalised_accuracy": (m[0] / s[0] + m[1] / s[1] + m[2] / s[2]) / 3,
        "average_drop": ((s[0] - m[0]) + (s[1] - m[1]) + (s[2] - m[2])) / 3,
    }


def _interference(method: str, seed: str, combination: str) -> list[list[float | None]]:
    d = SINGLE[(method, seed)]
    I: list[list[float | None]] = [[None] * 3 for _ in range(3)]
    for i in range(3):
        for j in range(i + 1, 3):
            si, sj = pair_scores(method, seed, combination, i, j)
            I[i][j], I[j][i] = si - d[i], sj - d[j]
    return I


def _merge_rows(method: str, seed: str) -> list[dict]:
    rows = []
    for c in COMBINATIONS:
        m = MERGED[(method, seed, c)]
        rows.append(
            {
                "combination": c,
                "tasks": TASKS,
                "weights": WEIGHTS[method],
                "density": 0.5,
                "scores": dict(zip(TASKS, m)),
                "relative_error": REL_ERROR[(method, c)],
                "cross_terms": REL_ERROR[(method, c)] > 1e-4,
                "eval_s": 1.0,
                **hand(method, seed, c),
            }
        )
    for c in COMBINATIONS if method in PAIRS else []:
        for i, j in ((0, 1), (0, 2), (1, 2)):
            si, sj = pair_scores(method, seed, c, i, j)
            rows.append(
                {
                    "combination": c,
                    "tasks": [TASKS[i], TASKS[j]],
                    "weights": WEIGHTS[method][:2],
                    "density": 0.5,
                    "scores": {TASKS[i]: si, TASKS[j]: sj},
                    "relative_error": REL_ERROR[(method, c)],
                    "cross_terms": REL_ERROR[(method, c)] > 1e-4,
                    "eval_s": 1.0,
                }
            )
    return rows


def write_merge_folder(run_dir: Path, method: str, seed: str, run_id: str, files: dict) -> None:
    """A merge run folder: config.yaml (the knobs and the merge block), state.json, and the given JSON files."""
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "suite": "default",
        "model": "smollm2-135m",
        "merge_density": 0.5,
        "merge_masks": "independent",
        "merge_a": "per-task",
        "merge": {"method": method, "seed": int(seed), "tasks": TASKS},
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    for name, obj in {"state.json": {"mlflow_parent_run_id": run_id}, **files}.items():
        (run_dir / name).write_text(json.dumps(obj, indent=2))


def log_merge_run(
    client, exp_id: str, method: str, seed: str, experiment: str, results_dir: Path, status: str = "FINISHED"
) -> str:
    """One merge run (method, seed): its folder under results_dir, and its MLflow parent run with its children, as
    harness.merging.protocol writes them."""
    from mlflow.entities import Metric, Param

    ts = 1_760_100_000_000 + 1000 * int(seed)
    tags = {
        "harness.kind": "merge",
        "harness.protocol": "merge",
        "harness.method": method,
        "harness.seed": seed,
        "harness.suite": "default",
        "harness.model": "smollm2-135m",
        "harness.experiment": experiment,
        "harness.git_commit": "4567cdef",
        "harness.run_dir": f"/r/{experiment}/merge/{method}/seed-{seed}",
    }
    rid = client.create_run(exp_id, start_time=ts, tags=tags, run_name=f"merge/{method}/seed-{seed}").info.run_id
    params = {
        "method": method,
        "seed": seed,
        "tasks": ",".join(TASKS),
        "rank": "8",
        "alpha": "16",
        "targets": "q_proj,v_proj",
        "merge_methods": ",".join(COMBINATIONS),
        "merge_weights": str(WEIGHTS[method]),
        "merge_density": "0.5",
        "merge_masks": "independent",
        "merge_a": "per-task",
    }
    client.log_batch(rid, params=[Param(k, v) for k, v in params.items()])
    run_dir = results_dir / experiment / "merge" / method / f"seed-{seed}"
    if status != "FINISHED":
        write_merge_folder(run_dir, method, seed, rid, {})
        return rid
    for t in TASKS:
        kid = client.create_run(
            exp_id,
            start_time=ts,
            run_name=f"adapter-{t}",
            tags={"mlflow.parentRunId": rid, "harness.kind": "merge-adapter", "harness.task": t},
        ).info.run_id
        client.set_terminated(kid, "FINISHED")
    S = [[SINGLE[(method, seed)][i] if i == j else 0.3 for j in range(3)] for i in range(3)]
    rows = _merge_rows(method, seed)
    for r in rows:
        kid = client.create_run(
            exp_id,
            start_time=ts,
            run_name=f"{r['combination']}-{'+'.join(r['tasks'])}",
            tags={
                "mlflow.parentRunId": rid,
                "harness.kind": "merge-combination",
                "harness.combination": r["combination"],
            },
        ).info.run_id
        client.set_terminated(kid, "FINISHED")
    metrics = [Metric(f"single/{t}", S[j][j], ts, 0) for j, t in enumerate(TASKS)]
    metrics += [
        Metric(f"merged/{r['combination']}/{k}", r[k], ts, 0)
        for r in rows[:2]
        for k in ("normalised_accuracy", "average_drop", "relative_error")
    ]
    client.log_batch(rid, metrics=metrics)
    client.log_dict(rid, {"tasks": TASKS, "S": S}, "single.json")
    client.log_dict(rid, {"rows": rows}, "merged.json")
    client.log_text(rid, f"experiment: {experiment}\nmerge: {{method: {method}, seed: {seed}}}\n", "config.yaml")
    summary = {
        "protocol": "merge",
        "method": method,
        "seed": int(seed),
        "tasks": TASKS,
        "weights": WEIGHTS[method],
        "single_diagonal": dict(zip(TASKS, SINGLE[(method, seed)])),
        "merges": {
            r["combination"]: {
                k: r[k] for k in ("normalised_accuracy", "average_drop", "relative_error", "cross_terms", "scores")
            }
            for r in rows[:2]
        },
        "interference": {c: _interference(method, seed, c) for c in COMBINATIONS} if method in PAIRS else {},
        "mlflow_parent_run_id": rid,
        "complete": True,
    }
    client.log_dict(rid, summary, "summary.json")
    write_merge_folder(
        run_dir,
        method,
        seed,
        rid,
        {"single.json": {"tasks": TASKS, "S": S}, "merged.json": {"rows": rows}, "summary.json": summary},
    )
    client.set_terminated(rid, "FINISHED")
    return rid


def add_merge_runs(uri: str, exp_id: str, experiment: str, results_dir: Path) -> dict:
    """2 methods x 2 seeds FINISHED, plus one RUNNING merge run (no summary.json yet) the report must skip."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    parents = {
        (m, s): log_merge_run(client, exp_id, m, s, experiment, results_dir)
        for m in ("lora", "lori-s")
        for s in ("0", "1")
    }
    running = log_merge_run(client, exp_id, "lora", "2", experiment, results_dir, status="RUNNING")
    return {"parents": parents, "running": running}


def build_merge_only_store(results_dir: Path, experiment: str = "merge-only") -> dict:
    from mlflow.tracking import MlflowClient

    results_dir.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{results_dir / 'mlflow.db'}"
    artifacts = f"file://{results_dir / 'mlartifacts'}"
    exp_id = MlflowClient(tracking_uri=uri).create_experiment(experiment, artifact_location=artifacts)
    return {
        "uri": uri,
        "results_dir": results_dir,
        "experiment": experiment,
        **add_merge_runs(uri, exp_id, experiment, results_dir),
    }


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """The sequence fixture store of test_report plus the merge runs, in one experiment."""
    store = build_fixture_store(tmp_path_factory.mktemp("mixed"))
    merges = add_merge_runs(store["uri"], store["experiment_id"], EXPERIMENT, store["results_dir"])
    return {**store, "seq_parents": store["parents"], **merges, "index": write_report(None, store["results_dir"])}


@pytest.fixture(scope="module")
def merge_only(tmp_path_factory):
    store = build_merge_only_store(tmp_path_factory.mktemp("mergeonly").resolve())
    pyplot_before = "matplotlib.pyplot" in sys.modules
    index = write_report(None, store["results_dir"], log_to_mlflow=False)  # the only harness experiment is picked
    return {**store, "index": index, "pyplot_before": pyplot_before}


def section(text: str, start: str, end: str) -> str:
    return text[text.index(start) : text.index(end, text.index(start))]


def merging_html(index: Path) -> str:
    text = index.read_text(encoding="utf-8")
    return section(text, "<section id='merging'>", "</section>")


def stats(method: str, combination: str, key: str) -> tuple[float, float]:
    vals = [hand(method, s, combination)[key] for s in ("0", "1")]
    return statistics.mean(vals), statistics.stdev(vals)


def t_interval(vals: list[float]) -> tuple[float, float]:
    """The 95% t interval over seeds, by hand: mean ± t(0.975, n - 1) · sd / sqrt(n)."""
    half = scipy_stats.t.ppf(0.975, len(vals) - 1) * statistics.stdev(vals) / len(vals) ** 0.5
    return statistics.mean(vals) - half, statistics.mean(vals) + half


def seed_interval(method: str, combination: str, key: str) -> tuple[float, float] | None:
    """The 95% interval over seeds (the test over seeds' t interval): none from these fixtures' 2 seeds (it needs 3)."""
    vals = [hand(method, s, combination)[key] for s in ("0", "1")]
    return t_interval(vals) if len(vals) >= 3 else None


def test_hand_formulas_agree_with_harness_metrics():
    import numpy as np

    from harness.metrics import merge_summary

    for (method, seed, c), m in MERGED.items():
        got = merge_summary(np.diag(SINGLE[(method, seed)]), m)
        assert got == pytest.approx(hand(method, seed, c))


def test_merging_section_table_values(mixed):
    html = merging_html(mixed["index"])
    assert "<h2>Merging</h2>" in html and "<h3>Which method merges better</h3>" in html
    for method, display in DISPLAY.items():
        assert display in html
        for c in COMBINATIONS:
            na, ad = stats(method, c, "normalised_accuracy"), stats(method, c, "average_drop")
            ni, ai = seed_interval(method, c, "normalised_accuracy"), seed_interval(method, c, "average_drop")
            assert ni is None and ai is None
            cells = (
                f'<td class="l">{display}</td><td class="l">{c}</td><td>2</td>'
                f"<td>{na[0]:.3f} ± {na[1]:.3f}</td><td>{ad[0]:.3f} ± {ad[1]:.3f}</td>"
            )
            assert cells in html, cells
    assert "arith + capitals + sentiment" in html and "4567cdef" in html
    assert 'skipped (not FINISHED)</td><td class="l">1: merge/lora/seed-2 (RUNNING)' in html  # listed, not aggregated
    assert "<td>merge/lora/seed-2" not in html
    from harness.metrics import MERGE_DEFINITIONS

    assert f"<pre>{html_escape(MERGE_DEFINITIONS)}</pre>" in html  # printed as the sequence definitions are
    assert "Check: every normalised accuracy and average drop in summary.json matches" in html


def test_comparison_json_merging(mixed):
    rdir = mixed["index"].parent
    text, comp = mixed["index"].read_text(encoding="utf-8"), json.loads((rdir / "comparison.json").read_text())
    # The sequence sections and numbers are still there, around the Merging section.
    assert (
        text.index("<h2>Interference diagnostics (LoRI)</h2>")
        < text.index("<h2>Merging</h2>")
        < text.index("<h2>Metric definitions</h2>")
        and "<title>Forgetting report: " in text
    )
    assert [r["method"] for r in comp["methods"]] == ["lori-s", "lora"] and len(comp["runs"]) == 4
    merging = comp["merging"]
    assert merging["combinations"] == COMBINATIONS and merging["cross_term_tolerance"] == 1e-4
    assert list(merging["methods"]) == ["lori-s", "lora"]  # the method layer's order
    for method in DISPLAY:
        m = merging["methods"][method]
        assert m["display_name"] == DISPLAY[method] and m["seeds"] == ["0", "1"]
        for c in COMBINATIONS:
            cell = m["combinations"][c]
            for key in ("normalised_accuracy", "average_drop"):
                mean, std = stats(method, c, key)
                assert cell[key]["mean"] == pytest.approx(mean, abs=1e-12)
                assert cell[key]["std"] == pytest.approx(std, abs=1e-12)
                assert cell[key]["n"] == 2
                assert seed_interval(method, c, key) is None  # 2 seeds: no interval over seeds
                assert (cell[key]["ci_low"], cell[key]["ci_high"]) == (None, None)
                assert cell[key]["ci_resampled"] == "nothing"  # no documents.json: no measurement interval
            assert cell["relative_error"]["max"] == pytest.approx(REL_ERROR[(method, c)])
            assert cell["cross_terms"]["any"] is (c == "linear")
    assert [r["run_id"] for r in merging["skipped_runs"]] == [mixed["running"]]
    # Interference: only LoRI-S merged the pairs; the mean over seeds, null on the diagonal.
    assert list(merging["interference"]) == ["lori-s"] and list(merging["interference"]["lori-s"]) == COMBINATIONS
    cat = merging["interference"]["lori-s"]["cat"]
    assert cat["tasks"] == TASKS and cat["n"] == 2 and cat["mean"][1][1] is None
    want = statistics.mean(pair_scores("lori-s", s, "cat", 0, 2)[0] - SINGLE[("lori-s", s)][0] for s in "01")
    assert cat["mean"][0][2] == pytest.approx(want)
    import csv

    rows = {(r["method"], r["combination"]): r for r in csv.DictReader((rdir / "merging.csv").open())}
    assert set(rows) == {(m, c) for m in DISPLAY for c in COMBINATIONS}
    assert float(rows[("lora", "linear")]["normalised_accuracy_mean"]) == pytest.approx(
        stats("lora", "linear", "normalised_accuracy")[0], rel=1e-5
    )
    assert rows[("lora", "cat")]["cross_terms"] == "False" and rows[("lora", "linear")]["cross_terms"] == "True"


def test_cross_term_warnings_name_linear_not_cat(mixed):
    html = section(merging_html(mixed["index"]), "<h3>Cross terms</h3>", "<h3>Per-task scores</h3>")
    warnings = re.findall(r"<li>(.*?)</li>", html)
    assert warnings == [
        "LoRI-S · linear: relative error 1.30e-02 (ΔW up to 1.3% off Σ_i w_i s_i B_i A_i)",
        "LoRA · linear: relative error 4.20e-01 (ΔW up to 42% off Σ_i w_i s_i B_i A_i)",
    ]
    assert "cross terms B_i A_j" in html and "cat stacks the ranks and is exact" in html
    comp = json.loads((mixed["index"].parent / "comparison.json").read_text())["merging"]
    assert {(w["method"], w["combination"]) for w in comp["cross_term_warnings"]} == {
        ("lori-s", "linear"),
        ("lora", "linear"),
    }


def test_verdicts_come_from_the_paired_bootstrap_over_seeds(mixed):
    merging = json.loads((mixed["index"].parent / "comparison.json").read_text())["merging"]
    verdicts, paired = merging["verdicts"], {c["combination"]: c for c in merging["paired_comparisons"]}
    # cat: LoRI-S keeps far more of its single-adapter scores on both seeds; linear: the seeds disagree on the sign.
    gap = {
        c: [hand("lori-s", s, c)["normalised_accuracy"] - hand("lora", s, c)["normalised_accuracy"] for s in "01"]
        for c in COMBINATIONS
    }
    cat, lin = paired["cat"], paired["linear"]
    assert (cat["a"], cat["b"], lin["a"], lin["b"]) == ("lori-s", "lora", "lora", "lori-s")
    # 2 seeds: the spread is there to plan with, but no verdict (a test over seeds needs 3)
    assert cat["difference"] == pytest.approx(statistics.mean(gap["cat"])) and cat["sd"] == pytest.approx(
        statistics.stdev(gap["cat"])
    )
    assert cat["p"] is None and cat["low"] is None and not cat["significant"] and not lin["significant"]
    assert cat["test"] == "paired t over seeds" and cat["resampled"] == "nothing" and cat["std_rule"] == "beyond"
    assert verdicts["cat"].startswith("cat: normalised accuracy (higher is better): LoRI-S ")
    assert "LoRI-S is ahead by 0.290 on 2 seed(s): undecided, a test over seeds needs at least 3" in verdicts["cat"]
    # With a third seed the same gap is tested: t interval and p by hand (no documents, so the paired t-test).
    third = [*gap["cat"], statistics.mean(gap["cat"])]
    from harness.analysis import over_seeds as OS

    t = OS.values_test(dict(enumerate(third)), {k: 0.0 for k in range(3)}, "normalised_accuracy")
    assert (t.low, t.high) == tuple(pytest.approx(x) for x in t_interval(third))
    assert t.p == pytest.approx(scipy_stats.ttest_rel(third, [0.0] * 3).pvalue)
    html = merging_html(mixed["index"])
    assert all(f"<li>{html_escape(v)}</li>" in html for v in verdicts.values())


def test_figures_written_and_logged_to_every_parent(mixed):
    from mlflow.tracking import MlflowClient

    rdir = mixed["index"].parent
    assert {"merge_scores.png", "merge_interference.png"} <= {p.name for p in rdir.glob("*.png")}
    assert len(list(rdir.glob("*.png"))) == 8
    client = MlflowClient(tracking_uri=mixed["uri"])
    for rid in [*mixed["parents"].values(), *mixed["seq_parents"].values()]:
        names = {Path(a.path).name for a in client.list_artifacts(rid, "report")}
        assert {"merge_scores.png", "merge_interference.png", "cl_metrics.png"} <= names
    assert "logged to each of the 8 parent runs" in mixed["index"].read_text(encoding="utf-8")


def test_report_with_only_merge_runs(merge_only):
    index, rdir = merge_only["index"], merge_only["index"].parent
    assert rdir == merge_only["results_dir"] / "merge-only" / "report"
    text = index.read_text(encoding="utf-8")
    assert "<title>Merging report: merge-only</title>" in text and "<h2>Merging</h2>" in text
    for gone in (
        "<h2>What was run</h2>",
        "<h2>Which method is better</h2>",
        "<h2>Metric definitions</h2>",
        "<h2>Runs</h2>",
    ):
        assert gone not in text
    assert sorted(p.name for p in rdir.iterdir()) == [
        "comparison.json",
        "index.html",
        "merge_interference.png",
        "merge_scores.png",
        "merging.csv",
    ]
    comp = json.loads((rdir / "comparison.json").read_text())
    assert comp["methods"] == [] and comp["runs"] == [] and set(comp["merging"]["methods"]) == set(DISPLAY)
    assert "http://" not in text and "https://" not in text and "<script" not in text
    if not merge_only["pyplot_before"]:
        assert "matplotlib.pyplot" not in sys.modules  # the figures never touch pyplot's global state


def test_no_pairs_no_interference_figure_and_no_merges_no_section(tmp_path):
    from mlflow.tracking import MlflowClient

    PAIRS.discard("lori-s")
    try:
        store = build_merge_only_store(tmp_path / "nopairs")
    finally:
        PAIRS.add("lori-s")
    index = write_report("merge-only", store["results_dir"], log_to_mlflow=False)
    text = index.read_text(encoding="utf-8")
    assert not (index.parent / "merge_interference.png").exists() and (index.parent / "merge_scores.png").exists()
    assert "No pairs were merged" in text
    # Sequence runs only: no Merging section, no merging.csv, no "merging" key (the report as before).
    seq = build_fixture_store(tmp_path / "seq")
    index = write_report(None, seq["results_dir"], log_to_mlflow=False)
    assert "Merging" not in index.read_text(encoding="utf-8") and not (index.parent / "merging.csv").exists()
    assert "merging" not in json.loads((index.parent / "comparison.json").read_text())
    # Neither kind finished: the error says so.
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp_id = client.create_experiment("cut", artifact_location=f"file://{tmp_path / 'mlartifacts'}")
    log_merge_run(client, exp_id, "lora", "0", "cut", tmp_path, status="RUNNING")
    with pytest.raises(HarnessError, match=r"no FINISHED sequence runs .*nor FINISHED merge runs \(1 not finished"):
        write_report("cut", tmp_path, log_to_mlflow=False)


def close(a, b) -> bool:
    """Nested JSON equal, floats up to 1e-12 (recomputed from the scores rather than read back)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, abs=1e-12)
    return a == b


def test_the_merges_come_from_the_run_folders_not_from_mlflow(merge_only, tmp_path):
    """A copy whose MLflow artifacts are all gone: the folders give the same merging numbers."""
    from test_report import _copy_store

    copy = _copy_store(merge_only, tmp_path / "results")
    removed = list((copy / "mlartifacts").rglob("summary.json"))
    assert len(removed) == 4
    shutil.rmtree(copy / "mlartifacts")
    index = write_report("merge-only", copy, tracking_uri=f"sqlite:///{copy / 'mlflow.db'}", log_to_mlflow=False)
    got, want = (
        json.loads((i.parent / "comparison.json").read_text())["merging"] for i in (index, merge_only["index"])
    )
    assert got["verdicts"] == want["verdicts"] and got["cross_term_warnings"] == want["cross_term_warnings"]
    assert close(got["methods"], want["methods"]) and close(got["interference"], want["interference"])
    assert "4567cdef" in merging_html(index)  # the git commit, which only MLflow records


def test_a_merge_folder_without_its_summary_is_listed_not_aggregated(merge_only, tmp_path):
    """summary.json is written last: without it the run is not finished (rerunning `harness merge` resumes it)."""
    from test_report import _copy_store

    copy = _copy_store(merge_only, tmp_path / "results")
    (copy / "merge-only" / "merge" / "lora" / "seed-0" / "summary.json").unlink()
    index = write_report("merge-only", copy, tracking_uri=f"sqlite:///{copy / 'mlflow.db'}", log_to_mlflow=False)
    merging = json.loads((index.parent / "comparison.json").read_text())["merging"]
    assert merging["methods"]["lora"]["seeds"] == ["1"] and merging["methods"]["lori-s"]["seeds"] == ["0", "1"]
    assert sorted(r["run_id"] for r in merging["skipped_runs"]) == sorted(
        [merge_only["running"], merge_only["parents"][("lora", "0")]]
    )
    assert "merge/lora/seed-0 (INTERRUPTED)" in merging_html(
        index
    )  # the folder's state: MLflow's FINISHED copy is not it


def test_a_summary_number_that_disagrees_with_its_scores_is_noted(merge_only, tmp_path):
    from test_report import _copy_store

    copy = _copy_store(merge_only, tmp_path / "results")
    path = copy / "merge-only" / "merge" / "lora" / "seed-0" / "summary.json"
    summary = json.loads(path.read_text())
    summary["merges"]["linear"]["normalised_accuracy"] = 0.1
    path.write_text(json.dumps(summary))
    html = merging_html(
        write_report("merge-only", copy, tracking_uri=f"sqlite:///{copy / 'mlflow.db'}", log_to_mlflow=False)
    )
    want = hand("lora", "0", "linear")["normalised_accuracy"]
    assert f"linear: normalised_accuracy = 0.100000 but the per-task scores give {want:.6f}" in html


def _write_documents(run_dir: Path, method: str, seed: str) -> None:
    """documents.json for a merge folder of this file: 100 documents per task, the first round(100 x score) correct,
    so that every S[j, j] and m_j is recomputed exactly (k / 100 is the double nearest the two-decimal score)."""

    def docs(score: float) -> list[int]:
        k = round(100 * score)
        return [1] * k + [0] * (100 - k)

    single = SINGLE[(method, seed)]
    (run_dir / "documents.json").write_text(
        json.dumps(
            {
                "tasks": TASKS,
                "documents": {
                    t: {
                        "doc_ids": list(range(100)),
                        "single": docs(single[j]),
                        "merged": {c: docs(MERGED[(method, seed, c)][j]) for c in COMBINATIONS},
                    }
                    for j, t in enumerate(TASKS)
                },
            }
        )
    )


def test_merge_intervals_and_verdicts_resample_documents_when_every_run_kept_them(merge_only, tmp_path):
    from test_report import _copy_store

    copy = _copy_store(merge_only, tmp_path / "results")
    for method in DISPLAY:
        for seed in ("0", "1"):
            _write_documents(copy / "merge-only" / "merge" / method / f"seed-{seed}", method, seed)
    merging = json.loads(
        (
            write_report("merge-only", copy, tracking_uri=f"sqlite:///{copy / 'mlflow.db'}", log_to_mlflow=False).parent
            / "comparison.json"
        ).read_text()
    )["merging"]
    cat = next(c for c in merging["paired_comparisons"] if c["combination"] == "cat")
    assert cat["resampled"] == "documents" and cat["document_se"] > 0
    assert cat["test"] == "paired t over seeds, documents' sampling variance added"
    assert "a test over seeds needs at least 3" in merging["verdicts"]["cat"]
    cell = merging["methods"]["lora"]["combinations"]["linear"]["normalised_accuracy"]
    assert cell["ci_resampled"] == "documents" and cell["ci_low"] is None  # no interval over 2 seeds
    assert cell["measurement_low"] <= cell["mean"] <= cell["measurement_high"]

    # One score changed: the file no longer recomputes its run's numbers, so it is not used, and the page says so.
    path = copy / "merge-only" / "merge" / "lora" / "seed-0" / "documents.json"
    docs = json.loads(path.read_text())
    docs["documents"]["arith"]["merged"]["cat"][0] = 0
    path.write_text(json.dumps(docs))
    index = write_report("merge-only", copy, tracking_uri=f"sqlite:///{copy / 'mlflow.db'}", log_to_mlflow=False)
    merging = json.loads((index.parent / "comparison.json").read_text())["merging"]
    assert merging["methods"]["lora"]["combinations"]["cat"]["normalised_accuracy"]["ci_resampled"] == "nothing"
    assert "documents.json does not recompute merge &#x27;cat&#x27;" in merging_html(index)


@pytest.mark.parametrize("which", ["mixed", "merge_only"])
def test_merging_images_load_in_headless_chromium(which, request, tmp_path):
    from test_report import chromium_page

    index = request.getfixturevalue(which)["index"]
    with chromium_page(index) as (page, requests):
        merging = page.evaluate(
            "Array.from(document.querySelectorAll('section#merging img'))"
            ".map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])"
        )
        every = page.evaluate(
            "Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])"
        )
        page.locator("section#merging").screenshot(path=str(tmp_path / "merging.png"))
    assert sorted(src for src, _, _ in merging) == ["merge_interference.png", "merge_scores.png"]
    assert len(every) == len(list(index.parent.glob("*.png")))
    for src, complete, width in every:
        assert complete and width > 0, src
    assert all(u.startswith(("file://", "data:")) for u in requests), requests
    assert (tmp_path / "merging.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
