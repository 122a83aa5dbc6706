"""Crash safety: SIGKILL anywhere, resume gives the uninterrupted matrix; locks; interrupted runs; resume layout.

Kills land at points the run exposes (HARNESS_FAULT_PAUSE writes `.paused-<point>` and waits), never
after a guessed sleep.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_sequence import mlflow_client, read_matrix

ROOT = Path(__file__).resolve().parents[1]
# Enough steps per stage for several mid-stage checkpoints (smoke: 64 examples, batch 8).
RUN = [
    "--suite",
    "smoke",
    "--model",
    "tiny-llama",
    "--seeds",
    "0",
    "--no-progress",
    "--no-report",
    "--methods",
    "lori-s",
    "--epochs",
    "3",
    "--checkpoint-every",
    "5",
]


def cli(*args, env_extra=None, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *args], env=env, cwd=ROOT, capture_output=True, text=True, **kw
    )


def start(*args, pause: str | None = None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if pause:
        env["HARNESS_FAULT_PAUSE"] = pause
    return subprocess.Popen(
        [sys.executable, "-m", "harness.cli", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, proc, timeout=300):
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out = proc.stderr.read()[-2000:] if proc.stderr else "(its output went to a log file)"
            raise AssertionError(f"run ended (rc {proc.returncode}) before {path.name} appeared: {out}")
        assert time.time() < deadline, f"{path} did not appear within {timeout}s"
        time.sleep(0.05)


def kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def check_mlflow(results: Path, experiment: str, seq_dir: Path, n_stages: int):
    c = mlflow_client(results)
    exp = c.get_experiment_by_name(experiment)
    parents = c.search_runs([exp.experiment_id], "tags.`harness.kind` = 'sequence'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert sorted(int(ch.data.tags["harness.stage"]) for ch in children) == list(range(1, n_stages + 1))
    assert all(ch.info.status == "FINISHED" for ch in children)
    for t in json.loads((seq_dir / "summary.json").read_text())["tasks"]:
        steps = [m.step for m in c.get_metric_history(parents[0].info.run_id, f"acc/{t}")]
        assert steps == list(range(n_stages + 1)), f"acc/{t} logged at steps {steps}"
    # MLflow 3 lineage (harness/run/lineage.py): one READY model per stage, each dataset input once, whatever was killed.
    models = c.search_logged_models([exp.experiment_id])
    assert sorted(int(m.params["stage"]) for m in models) == list(range(1, n_stages + 1))
    assert all(str(m.status) == "READY" for m in models)
    inputs = [(d.dataset.name, d.dataset.digest) for d in parents[0].inputs.dataset_inputs]
    assert len(inputs) == len(set(inputs)) == 2 * len(json.loads((seq_dir / "summary.json").read_text())["tasks"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    results = tmp_path_factory.mktemp("ref")
    out = cli("run", *RUN, "--results-dir", str(results), "--experiment", "crash")
    assert out.returncode == 0, out.stderr[-2000:]
    return read_matrix(results / "crash" / "lori-s" / "seed-0" / "matrix.csv")[1]


# One sequence killed at every point in turn, each resume running on to the next point: every kill resumes from a
# state some earlier kill and resume left, and the last resume must give the uninterrupted matrix. Order: each point
# must still lie ahead after the previous resume. checkpoint-write:2 before mid-train:2, so stage 2 finally resumes
# from its first complete checkpoint (step 5); eval and mlflow on the last stage (its resume also finishes the sequence).
KILL_POINTS = ["between-stages:1", "checkpoint-write:2", "mid-train:2", "eval:3", "mlflow:3"]


def _kill_at(point: str, seq: Path, results: Path, proc) -> None:
    wait_for(seq / f".paused-{point.split(':')[0]}", proc)
    kill(proc)
    if point.startswith("mid-train"):
        assert (seq / "checkpoint" / "state.json").exists(), "a mid-stage checkpoint was written before the kill"
    # Killed runs stay RUNNING until someone looks: the report marks them interrupted (lock free).
    from harness.tracking.client import mark_interrupted

    assert mark_interrupted(f"sqlite:///{results / 'mlflow.db'}", "crash") == 1, point
    client = mlflow_client(results)
    parent = client.search_runs(
        [client.get_experiment_by_name("crash").experiment_id], "tags.`harness.kind` = 'sequence'"
    )[0]
    assert parent.info.status == "KILLED" and parent.data.tags["harness.interrupted"] == "true", point


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(reference, tmp_path):
    results = tmp_path / "r"
    seq = results / "crash" / "lori-s" / "seed-0"
    proc = start("run", *RUN, "--results-dir", str(results), "--experiment", "crash", pause=KILL_POINTS[0])
    _kill_at(KILL_POINTS[0], seq, results, proc)
    for point in KILL_POINTS[1:]:
        proc = start("resume", str(seq), "--no-report", "--no-progress", pause=point)
        _kill_at(point, seq, results, proc)

    out = cli("resume", str(seq), "--no-report", "--no-progress")
    assert out.returncode == 0, out.stderr[-2000:]
    np.testing.assert_array_equal(read_matrix(seq / "matrix.csv")[1], reference)
    check_mlflow(results, "crash", seq, n_stages=3)
    assert not (seq / "checkpoint").exists(), "the last stage committed: no checkpoint is left behind"
    train = json.loads(next((seq / "stages").glob("2-*/train.json")).read_text())
    assert train["resumed_from_step"] == 5 and train["steps"] == 24, "stage 2 resumed from its step-5 checkpoint"


@pytest.mark.slow
def test_second_process_on_a_sequence_refuses_or_waits(reference, tmp_path):
    results = tmp_path / "r"
    seq = results / "crash" / "lori-s" / "seed-0"
    holder = start("run", *RUN, "--results-dir", str(results), "--experiment", "crash", pause="mid-train:1")
    wait_for(seq / ".paused-mid-train", holder)
    try:
        out = cli("run", *RUN, "--results-dir", str(results), "--experiment", "crash", timeout=120)
        assert out.returncode == 2, out.stderr[-2000:]
        assert f"pid {holder.pid}" in out.stderr and "another process" in out.stderr
        assert "Traceback" not in out.stderr
        waiter = start("run", *RUN, "--results-dir", str(results), "--experiment", "crash", "--wait-for-lock", "true")
        seen = ""
        deadline = time.time() + 120
        while "waiting for" not in seen:  # the waiter says it is blocked on the lock before we free it
            line = waiter.stderr.readline()
            assert line and time.time() < deadline, f"waiter never waited: {seen[-2000:]}"
            seen += line
        assert f"pid {holder.pid}" in seen
    finally:
        kill(holder)
    _, err = waiter.communicate(timeout=300)
    assert waiter.returncode == 0, err[-2000:]
    np.testing.assert_array_equal(read_matrix(seq / "matrix.csv")[1], reference)
    check_mlflow(results, "crash", seq, n_stages=3)


@pytest.mark.slow
def test_resume_one_sequence_of_a_multi_order_experiment_keeps_its_folder_and_the_experiment(tmp_path):
    results = tmp_path / "r"
    args = [
        "--suite",
        "smoke",
        "--model",
        "tiny-llama",
        "--seeds",
        "0",
        "--methods",
        "lora",
        "--orders",
        "0,1",
        "--tasks",
        "parity,weather",
        "--no-progress",
        "--no-report",
        "--results-dir",
        str(results),
        "--experiment",
        "orders",
    ]
    seq0 = results / "orders" / "lora" / "seed-0" / "order-0"
    proc = start("run", *args, pause="eval:2")
    wait_for(seq0 / ".paused-eval", proc)
    kill(proc)
    exp_cfg = (results / "orders" / "config.yaml").read_text()

    out = cli("resume", str(seq0), "--no-report", "--no-progress")
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((seq0 / "summary.json").read_text())["complete"]
    assert not (results / "orders" / "lora" / "seed-0" / "stages").exists(), "resumed into the wrong folder"
    assert not (results / "orders" / "lora" / "seed-0" / "order-1").exists(), "resuming one sequence ran another"
    assert (results / "orders" / "config.yaml").read_text() == exp_cfg
    assert yaml.safe_load(exp_cfg)["orders"] == [0, 1]

    out = cli("resume", str(results / "orders"), "--no-report", "--no-progress")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "order-0] already complete" in out.stderr
    assert json.loads((results / "orders" / "lora" / "seed-0" / "order-1" / "summary.json").read_text())["complete"]


def test_a_parent_run_that_cannot_be_reopened_is_an_error_not_a_new_run(tmp_path):
    results = tmp_path / "r"
    args = [
        "--suite",
        "smoke",
        "--model",
        "tiny-llama",
        "--seeds",
        "0",
        "--methods",
        "lora",
        "--tasks",
        "parity",
        "--no-progress",
        "--no-report",
        "--results-dir",
        str(results),
        "--experiment",
        "reopen",
    ]
    seq = results / "reopen" / "lora" / "seed-0"
    proc = start("run", *args, pause="eval:1")
    wait_for(seq / ".paused-eval", proc)
    kill(proc)
    other = tmp_path / "other.db"
    out = cli("resume", str(seq), "--tracking-uri", f"sqlite:///{other}", "--no-report", "--no-progress")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "cannot be reopened" in out.stderr and "Traceback" not in out.stderr
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(tracking_uri=f"sqlite:///{other}").get_experiment_by_name("reopen")
    assert exp is None or not MlflowClient(tracking_uri=f"sqlite:///{other}").search_runs([exp.experiment_id])


def test_adapter_is_active_at_evaluation_and_disabling_it_gives_the_base_score(tmp_path):
    """A learnable smoke task: the score after its stage beats the base; the same model with the adapter off scores the base."""
    from harness.config import ExperimentConfig
    from harness.methods import METHODS
    from harness.models import load_model
    from harness.run.evaluate import Evaluator
    from harness.suites import load_suite

    results = tmp_path / "r"
    out = cli(
        "run",
        "--suite",
        "smoke",
        "--model",
        "tiny-llama",
        "--methods",
        "lora",
        "--tasks",
        "weather",
        "--epochs",
        "10",
        "--lr-lora",
        "1e-2",
        "--no-progress",
        "--no-report",
        "--results-dir",
        str(results),
        "--experiment",
        "active",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    seq = results / "active" / "lora" / "seed-0"
    _, R = read_matrix(seq / "matrix.csv")
    assert R[1, 0] >= R[0, 0] + 0.1, f"weather did not learn: base {R[0, 0]}, after stage 1 {R[1, 0]}"

    model, tok = load_model("tiny-llama")
    method = METHODS["lora"](ExperimentConfig(model="tiny-llama"), seed=0, tasks=["weather"], base_model=model)
    method.restore({1: next((seq / "stages").glob("1-*"))})
    ev = Evaluator(load_suite("smoke"), tok)
    assert ev.evaluate(method.model, ["weather"]).scores["weather"] == pytest.approx(R[1, 0])
    with method.model.disable_adapter():
        assert ev.evaluate(method.model, ["weather"]).scores["weather"] == pytest.approx(R[0, 0])


def test_results_dir_that_cannot_be_created_is_one_message(tmp_path, capsys):
    from harness.cli import main

    rc = main(
        [
            "run",
            "--suite",
            "smoke",
            "--model",
            "tiny-llama",
            "--methods",
            "lora",
            "--results-dir",
            "/proc/harness-no/results",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "not writable" in err and "Traceback" not in err


def test_eval_schedule_diagonal_final_evaluates_2T_minus_1_cells_and_reports_na(tmp_path):
    results = tmp_path / "r"
    out = cli(
        "run",
        "--suite",
        "smoke",
        "--model",
        "tiny-llama",
        "--methods",
        "lora",
        "--eval-schedule",
        "diagonal_final",
        "--no-progress",
        "--no-report",
        "--results-dir",
        str(results),
        "--experiment",
        "sched",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    seq = results / "sched" / "lora" / "seed-0"
    _, R = read_matrix(seq / "matrix.csv")
    assert int((~np.isnan(R)).sum()) == 2 * 3 - 1
    assert np.isnan(R[0]).all() and not np.isnan(R[3]).any() and not np.isnan(np.diag(R[1:])).any()
    summary = json.loads((seq / "summary.json").read_text())
    assert summary["acc"] is not None and summary["bwt"] is not None and summary["fwt"] is None
    # no task is evaluated at stage 0, yet the base model's general-text CE is: its rise is defined
    assert summary["general_ce_base"] is not None and summary["general_ce_rise"] is not None
    assert "Running loglikelihood requests" not in out.stderr  # lm-eval's own bars only with -v


def test_the_plan_says_what_each_stage_evaluates_and_the_progress_display_counts_it(tmp_path):
    """The schedule is resolved once, in the plan: the runner evaluates it and the driver's bar counts it (stage 0 is
    committed under diagonal_final too when the base model's general-text CE is measured)."""
    from harness.config import ExperimentConfig
    from harness.launchers.progress import StageMonitor
    from harness.run.planning import plan
    from harness.suites import load_suite

    suite = load_suite("smoke")
    cfg = ExperimentConfig(model="tiny-llama", suite="smoke", methods=["lora"], results_dir=str(tmp_path))
    [full] = plan(cfg, suite)
    assert full.schedule.tasks == (("parity", "weather", "copy"),) * 4 and full.schedule.base_stage
    diagonal = cfg.model_copy(update={"eval_schedule": "diagonal_final"})
    [spec] = plan(diagonal, suite)
    assert spec.schedule.tasks == ((), ("parity",), ("weather",), ("parity", "weather", "copy"))
    assert spec.schedule.base_stage and StageMonitor([spec], progress=False).total == 4
    [no_ce] = plan(diagonal.model_copy(update={"general_ce_tokens": 0}), suite)
    assert not no_ce.schedule.base_stage and StageMonitor([no_ce], progress=False).total == 3


def test_eval_limit_draws_the_same_seeded_subset_at_every_stage():
    from harness.run.evaluate import Evaluator
    from harness.suites import load_suite

    suite = load_suite("smoke")
    a, b = Evaluator(suite, None, limit=10), Evaluator(suite, None, limit=10)
    for task in ("parity", "weather"):
        ia = a.subset(task)
        assert ia == b.subset(task)  # same documents for every stage, method and seed
        (idx,) = ia.values()
        assert len(idx) == 10 and len(set(idx)) == 10 and idx != list(range(10))  # seeded, not lm-eval's first N
    assert Evaluator(suite, None, limit=1000).subset("parity") is None


def test_eval_limit_draws_from_the_documents_a_data_override_holds():
    """A data override may be a small sample: the subset comes from its documents, not from sizes.test (dbpedia
    declares 7000, the hub-schema fixture holds 14; indices past 13 crashed lm-eval after the first stage)."""
    from harness.run.evaluate import Evaluator
    from harness.suites import load_suite

    fixtures = Path(__file__).resolve().parent / "data" / "hub_schema"
    ev = Evaluator(load_suite("olora-standard", data_overrides=fixtures), None, limit=8)
    (idx,) = ev.subset("dbpedia").values()
    assert len(idx) == 8 and len(set(idx)) == 8 and max(idx) < 14
    assert ev.subset("agnews") is None  # 4 documents, limit 8: all of them


def test_a_folder_made_before_a_knob_existed_resumes_when_the_knob_is_at_its_default(tmp_path):
    """Upgrading the harness must not strand run folders: a knob missing from their config.yaml means its default."""
    import yaml as _yaml

    from harness.config_loading import load_config
    from harness.errors import ConfigError
    from harness.run.folder import check_same_config

    resolved = load_config(None, {"suite": "smoke", "model": "tiny-llama"}).to_yaml_dict()
    old = {k: v for k, v in resolved.items() if k not in ("eval_merged", "eval_bf16")}  # written by an older harness
    (tmp_path / "config.yaml").write_text(_yaml.safe_dump(old))
    check_same_config(tmp_path / "config.yaml", resolved, "lora")  # defaults: the same computation, no refusal
    with pytest.raises(ConfigError, match="eval_bf16"):
        check_same_config(tmp_path / "config.yaml", {**resolved, "eval_bf16": True}, "lora")


def test_a_folder_made_before_completion_eos_existed_trained_with_eos_always(tmp_path):
    """The default became auto after the ablation; a folder without the knob was trained with EOS always."""
    import yaml as _yaml

    from harness.config_loading import load_config
    from harness.errors import ConfigError
    from harness.run.folder import check_same_config

    resolved = load_config(None, {"suite": "smoke", "model": "tiny-llama"}).to_yaml_dict()
    assert resolved["completion_eos"] == "auto"
    (tmp_path / "config.yaml").write_text(_yaml.safe_dump({k: v for k, v in resolved.items() if k != "completion_eos"}))
    with pytest.raises(ConfigError, match="completion_eos: folder 'always', now 'auto'.*--completion-eos always"):
        check_same_config(tmp_path / "config.yaml", resolved, "lora")
    check_same_config(tmp_path / "config.yaml", {**resolved, "completion_eos": "always"}, "lora")


@pytest.mark.slow
def test_ctrl_c_prints_the_real_resume_command_marks_runs_killed_and_timings_add_up_after_it(reference, tmp_path):
    from conftest import sigint_at_default

    results = tmp_path / "r"
    seq = results / "crash" / "lori-s" / "seed-0"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HARNESS_FAULT_PAUSE": "mid-train:2"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "run", *RUN, "--results-dir", str(results), "--experiment", "crash"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_at_default,
    )
    wait_for(seq / ".paused-mid-train", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert f"continue with `harness resume {seq}`" in err and "()" not in err and "Traceback" not in err
    c = mlflow_client(results)
    runs = c.search_runs([c.get_experiment_by_name("crash").experiment_id])
    killed = {
        r.data.tags.get("harness.kind")
        for r in runs
        if r.info.status == "KILLED" and r.data.tags.get("harness.interrupted") == "true"
    }
    assert killed == {"sequence", "stage"}, [(r.info.status, r.data.tags.get("harness.kind")) for r in runs]

    command = err.split("continue with `", 1)[1].split("`", 1)[0].split()
    assert command[:2] == ["harness", "resume"]
    out = cli(*command[1:], "--no-report", "--no-progress")
    assert out.returncode == 0, out.stderr[-2000:]
    np.testing.assert_array_equal(read_matrix(seq / "matrix.csv")[1], reference)
    check_mlflow(results, "crash", seq, n_stages=3)
    info = json.loads(next((seq / "stages").glob("2-*/stage.json")).read_text())
    assert info["resumed_train_s"] > 0 and info["overhead_s"] >= 0
    assert info["wall_s"] >= info["train_s"] + info["eval_s"]
    assert " other -" not in out.stderr
