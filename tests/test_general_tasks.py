"""general_tasks: lm-eval's registered (or the user's own) tasks on the base model and after the last stage.

Offline: tests/data/general holds a small multiple-choice lm-eval task of everyday facts (harness_general_facts, eight
documents read from a jsonl file beside its YAML), passed with --general-include.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.analysis.naming import display_name
from harness.analysis.runs import SequenceRun
from harness.cli import main
from harness.config_loading import load_config
from harness.report.tables import general_task_rows
from harness.run import general_eval as GEN
from harness.run.sync import sync_folder

ROOT = Path(__file__).resolve().parents[1]
OWN = ROOT / "tests" / "data" / "general"
TASK = "harness_general_facts"
RUN = [
    "--suite",
    "smoke",
    "--model",
    "tiny-llama",
    "--tasks",
    "parity,weather",
    "--max-steps",
    "4",
    "--eval-limit",
    "8",
    "--no-report",
    "--no-progress",
    "--methods",
    "lora",
    "--seeds",
    "0",
    "--checkpoint-every",
    "0",
    "--experiment",
    "g",
]


def _metric_history(uri: str, experiment: str, key: str):
    """The sequence's parent run: (step -> value of the metric key, the run)."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name(experiment)
    parents = [r for r in c.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    return {m.step: m.value for m in c.get_metric_history(parents[0].info.run_id, key)}, parents[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    results = tmp_path_factory.mktemp("general")
    env = {k: v for k, v in os.environ.items() if k != "HARNESS_FAULT_PAUSE"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness.cli",
            "run",
            *RUN,
            "--results-dir",
            str(results),
            "--general-tasks",
            TASK,
            "--general-include",
            str(OWN),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return results


@pytest.mark.slow
def test_a_run_scores_general_tasks_on_the_base_model_and_after_the_last_stage(finished):
    seq = finished / "g" / "lora" / "seed-0"
    evals = {
        t: json.loads((seq / "stages" / name / "eval.json").read_text())
        for t, name in ((0, "0-base"), (1, "1-parity"), (2, "2-weather"))
    }
    assert "general" not in evals[1]  # neither the base model nor the last stage: not scored (general_every unset)
    for t in (0, 2):
        assert evals[t]["general_metric"] == {TASK: "acc,none"} and evals[t]["general_n"] == {TASK: 8}
        assert 0.0 <= evals[t]["general"][TASK] <= 1.0
    base, final = evals[0]["general"][TASK], evals[2]["general"][TASK]
    assert 0 < base < 1  # the documents are such that the tiny model gets some right and some wrong
    summary = json.loads((seq / "summary.json").read_text())
    assert summary["general_tasks"] == {TASK: {"base": base, "final": final, "change": final - base}}
    cached = json.loads(next((finished / "g" / "base-eval").glob("*.json")).read_text())
    assert cached["general"]["general"] == {TASK: base} and cached["key"]["general_include"]
    history, parent = _metric_history(f"sqlite:///{finished / 'mlflow.db'}", "g", f"general/{TASK}")
    assert history == {0: base, 2: final}
    assert parent.data.metrics[f"general_change/{TASK}"] == pytest.approx(final - base)


@pytest.mark.slow
def test_the_mirror_catches_general_tasks_up_from_the_folder_alone(finished, tmp_path):
    """A store that missed the whole run (an outage): `harness sync` logs general/<task> at every scored stage."""
    seq = finished / "g" / "lora" / "seed-0"
    state = json.loads((seq / "state.json").read_text())
    (seq / "state.json").write_text(json.dumps({k: v for k, v in state.items() if k != "mlflow_parent_run_id"}))
    try:
        uri = f"sqlite:///{tmp_path / 'other.db'}"
        sync_folder(seq, "g", uri)
        history, _ = _metric_history(uri, "g", f"general/{TASK}")
        evals = [
            json.loads((seq / "stages" / n / "eval.json").read_text())["general"][TASK] for n in ("0-base", "2-weather")
        ]
        assert history == {0: evals[0], 2: evals[1]}
        assert set(_metric_history(uri, "g", "general_ce")[0]) == {0, 1, 2}
    finally:
        (seq / "state.json").write_text(json.dumps(state))


@pytest.mark.slow  # lm-eval indexes its ~14,700 built-in task names (~20 s)
def test_a_misspelled_general_task_exits_2_naming_close_matches_and_writes_nothing(tmp_path, capsys):
    results = tmp_path / "results"
    code = main(
        [
            "run",
            *RUN,
            "--results-dir",
            str(results),
            "--general-tasks",
            f"hellaswg,{TASK[:-1]}",
            "--general-include",
            str(OWN),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "'hellaswg' (close: hellaswag" in err and f"'{TASK[:-1]}' (close: {TASK}" in err
    assert "--general-include" in err and "Traceback" not in err
    assert not results.exists()


def test_a_general_include_that_is_not_a_folder_exits_2(tmp_path, capsys):
    code = main(
        [
            "validate",
            *RUN[:4],
            "--results-dir",
            str(tmp_path / "r"),
            "--general-tasks",
            TASK,
            "--general-include",
            str(tmp_path / "nowhere"),
        ]
    )
    assert code == 2 and "no such folder" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_schedule_primary_metric_and_summary():
    cfg = load_config(None, {"general_tasks": [TASK], "general_every": 2})
    assert [t for t in range(6) if GEN.due(cfg, t, 5)] == [0, 2, 4, 5]
    assert not GEN.due(load_config(None, {}), 0, 5)
    result = {"alias": "x", "sample_len": 8, "acc_stderr,none": "N/A", "acc,none": 0.5, "brier_score,none": 0.9}
    assert GEN.primary(result) == "acc,none"
    evals = {0: {"general": {TASK: 0.25}}, 1: {}, 2: {"general": {TASK: 0.75}}}
    assert GEN.summary(evals, 2) == {"general_tasks": {TASK: {"base": 0.25, "final": 0.75, "change": 0.5}}}
    assert GEN.summary({0: {"general": {}}, 2: {}}, 2) == {}


def test_the_report_table_gives_the_mean_change_and_an_interval_from_three_seeds():
    def run(seed, change):
        return SequenceRun(
            "r",
            "n",
            "FINISHED",
            "lora",
            str(seed),
            "0",
            [],
            None,
            {},
            0,
            0,
            None,
            {"general_tasks": {TASK: {"base": 0.5, "final": 0.5 + change, "change": change}}},
            {},
            {},
            None,
            "",
        )

    two = general_task_rows({"lora": [run(0, -0.1), run(1, -0.3)]})
    assert [row[:3] + row[4:] for row in two] == [[display_name("lora"), TASK, "2", "-0.200", "— (under 3 runs)"]]
    assert float(two[0][3]) == 0.5
    three = general_task_rows({"lora": [run(0, -0.1), run(1, -0.3), run(2, -0.2)]})[0]
    low, high = (float(x) for x in three[5].strip("[]").split(","))
    assert three[4] == "-0.200" and low < -0.2 < high
