"""`harness run --jobs N`: several sequences at once on this machine, each in its own process, and the base model
evaluated once per experiment (harness/launchers/processes.py, harness/run/base_eval.py).

The jobs must give the matrices and the MLflow contents of `--jobs 1`; a job SIGKILLed mid-stage, then `harness resume`,
the same matrices; Ctrl-C stops every job, marks the runs KILLED and prints one resume command; more jobs than memory
holds are refused before anything is written. The base-evaluation cache must change no matrix, and any change of what
it depends on must recompute it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import sigint_at_default
from test_crash_safety import wait_for

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "--suite",
    "smoke",
    "--model",
    "tiny-llama",
    "--tasks",
    "parity,weather",
    "--max-steps",
    "4",
    "--checkpoint-every",
    "2",
    "--eval-limit",
    "8",
    "--no-report",
    "--no-progress",
    "--methods",
    "lori-s,lora",
    "--seeds",
    "0",
]
SEQUENCES = ("lori-s/seed-0", "lora/seed-0")
COMPARED_METRICS = ("acc", "eval/", "ACC", "BWT", "FWT", "forgetting", "LA", "general_ce")


def cli(*args, env_extra=None, check=True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HARNESS_FAULT_PAUSE"} | (env_extra or {})
    out = subprocess.run(
        [sys.executable, "-m", "harness.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    if check:
        assert out.returncode == 0, out.stderr[-4000:]
    return out


def matrices(exp: Path) -> dict[str, list]:
    return {s: json.loads((exp / s / "matrix.json").read_text()) for s in SEQUENCES}


def mlflow_contents(results: Path, experiment: str) -> dict:
    """Each run (by kind, name and stage): status, its non-launch params, its score metrics. Times and ids differ by nature."""
    from mlflow.tracking import MlflowClient

    from harness.config import LAUNCH_KEYS

    c = MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    exp = c.get_experiment_by_name(experiment)
    out, runs = {}, c.search_runs([exp.experiment_id], max_results=1000)
    names = {r.info.run_id: r.info.run_name for r in runs}
    for r in runs:
        parent = names.get(r.data.tags.get("mlflow.parentRunId"))
        key = (r.data.tags.get("harness.kind"), parent, r.info.run_name, r.data.tags.get("harness.stage"))
        assert key not in out, f"two runs for {key}"
        params = {k: v for k, v in r.data.params.items() if k not in LAUNCH_KEYS and str(results) not in v}
        metrics = {
            k: round(v, 9) for k, v in r.data.metrics.items() if k.startswith(COMPARED_METRICS) and not k.endswith("_s")
        }
        out[key] = (r.info.status, params, metrics)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Two sequences one after another in one process (--jobs 1), each evaluating the base model itself (no cache): the
    matrices and MLflow runs every other path must give."""
    results = tmp_path_factory.mktemp("jobs1")
    cli(
        "run",
        *SMALL,
        "--results-dir",
        str(results),
        "--experiment",
        "jobs",
        "--jobs",
        "1",
        "--base-eval-cache",
        "false",
    )
    assert not (results / "jobs" / "base-eval").exists()
    return results


@pytest.mark.slow
def test_two_jobs_sharing_the_base_evaluation_give_the_matrices_and_mlflow_runs_of_one_without(reference, tmp_path):
    out = cli("run", *SMALL, "--results-dir", str(tmp_path), "--experiment", "jobs", "--jobs", "2")
    assert "2 local process(es) at once" in out.stderr
    assert matrices(tmp_path / "jobs") == matrices(reference / "jobs")
    ours, theirs = mlflow_contents(tmp_path, "jobs"), mlflow_contents(reference, "jobs")
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert ours[key] == theirs[key], key
    assert all(status == "FINISHED" for status, _, _ in ours.values())
    # The base model was evaluated once: the second sequence read the first one's entry.
    cached = [
        json.loads((tmp_path / "jobs" / s / "stages" / "0-base" / "eval.json").read_text())["base_eval"]
        for s in SEQUENCES
    ]
    assert cached[0]["digest"] == cached[1]["digest"] and sorted(c["cached"] for c in cached) == [False, True]
    # No folder is left marked behind: the driver mirrored every folder when its job ended.
    assert not any("mirror_behind" in json.loads((tmp_path / "jobs" / s / "state.json").read_text()) for s in SEQUENCES)


@pytest.mark.slow
def test_a_sigkilled_job_then_resume_gives_the_same_matrices(reference, tmp_path):
    exp = tmp_path / "jobs"
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "harness.cli",
            "run",
            *SMALL,
            "--results-dir",
            str(tmp_path),
            "--experiment",
            "jobs",
            "--jobs",
            "2",
            "--job-retries",
            "0",
        ],
        cwd=ROOT,
        env={**os.environ, "HARNESS_FAULT_PAUSE": "mid-train:2"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for s in SEQUENCES:
            wait_for(exp / s / ".paused-mid-train", driver, timeout=300)
        os.kill(int((exp / "lori-s/seed-0/.paused-mid-train").read_text()), signal.SIGKILL)
        (exp / "lora/seed-0/.paused-mid-train").unlink()  # the other job goes on
        _, err = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 1, err[-3000:]
    assert "1 of 2 sequence(s) did not finish" in err and "killed by signal 9" in err
    assert (exp / "lora/seed-0/summary.json").is_file() and not (exp / "lori-s/seed-0/summary.json").exists()
    cli("resume", str(exp), "--no-progress", "--no-report")
    assert matrices(exp) == matrices(reference / "jobs")
    assert mlflow_contents(tmp_path, "jobs") == mlflow_contents(reference, "jobs")


@pytest.mark.slow
def test_ctrl_c_stops_every_job_marks_their_runs_killed_and_prints_one_resume_command(tmp_path):
    from mlflow.tracking import MlflowClient

    from harness.locking import is_locked

    exp = tmp_path / "jobs"
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "harness.cli",
            "run",
            *SMALL,
            "--results-dir",
            str(tmp_path),
            "--experiment",
            "jobs",
            "--jobs",
            "2",
        ],
        cwd=ROOT,
        env={**os.environ, "HARNESS_FAULT_PAUSE": "eval:2"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_at_default,
    )
    try:
        for s in SEQUENCES:
            wait_for(exp / s / ".paused-eval", driver, timeout=300)
        pids = [int((exp / s / ".paused-eval").read_text()) for s in SEQUENCES]
        driver.send_signal(signal.SIGINT)
        _, err = driver.communicate(timeout=200)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 130, err[-3000:]
    assert err.count("harness resume") == 1 and f"harness resume {exp}" in err, err[-2000:]
    assert not any(Path(f"/proc/{p}").exists() and "(Z)" not in Path(f"/proc/{p}/stat").read_text() for p in pids)
    assert not any(is_locked(exp / s) for s in SEQUENCES)
    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    parents = c.search_runs([c.get_experiment_by_name("jobs").experiment_id], "tags.`harness.kind` = 'sequence'")
    assert len(parents) == 2 and all(p.info.status == "KILLED" for p in parents)
    assert all(p.data.tags.get("harness.interrupted") == "true" for p in parents)
    # Stage 1 was committed before the stop: MLflow holds it (the driver mirrored the folders it stopped).
    for p in parents:
        stages = c.search_runs([p.info.experiment_id], f"tags.mlflow.parentRunId = '{p.info.run_id}'")
        assert [r.data.tags.get("harness.stage") for r in stages if r.info.status == "FINISHED"] == ["1"]


def test_more_jobs_than_memory_holds_are_refused_with_nothing_written(tmp_path):
    import torch

    from harness.launchers.processes import CPU_PROCESS_BYTES, MEMORY_MARGIN
    from harness.models.memory import free_memory

    free = free_memory(torch.device("cpu"))
    n = 200
    if free is None or free > n * CPU_PROCESS_BYTES * MEMORY_MARGIN:
        pytest.skip(f"this machine has {free} bytes available: {n} jobs would fit, so the refusal cannot be shown")
    seeds = ",".join(map(str, range(n)))
    out = cli(
        "run",
        *SMALL[:-4],
        "--methods",
        "lora",
        "--seeds",
        seeds,
        "--results-dir",
        str(tmp_path / "r"),
        "--experiment",
        "jobs",
        "--jobs",
        str(n),
        check=False,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"--jobs {n}:" in out.stderr and "at most" in out.stderr and "Pass --jobs" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "r").exists()


def test_jobs_auto_takes_one_job_per_core_and_no_more_than_memory_or_sequences_allow(monkeypatch):
    from harness.errors import HarnessError
    from harness.launchers import processes as P

    monkeypatch.setattr(P, "cpu_cores", lambda: 8)
    gib = P.MEM.GiB
    assert P.plan_jobs("auto", 20, device_type="cpu", footprint=gib, free=100 * gib, how="estimated") == (8, 1)
    assert P.plan_jobs("auto", 3, device_type="cpu", footprint=gib, free=100 * gib, how="estimated") == (3, 2)
    assert P.plan_jobs("auto", 20, device_type="cpu", footprint=10 * gib, free=50 * gib, how="estimated") == (4, 2)
    assert P.plan_jobs("auto", 20, device_type="cuda", footprint=10 * gib, free=75 * gib, how="measured") == (6, 1)
    assert P.plan_jobs(4, 2, device_type="cpu", footprint=gib, free=100 * gib, how="estimated") == (2, 4)
    with pytest.raises(HarnessError, match="at most 4 fit"):
        P.plan_jobs(5, 20, device_type="cpu", footprint=10 * gib, free=50 * gib, how="estimated")
    assert P.plan_jobs(5, 20, device_type="cpu", footprint=None, free=None, how="estimated") == (5, 1)


def test_jobs_are_for_launcher_local():
    from harness.config_loading import load_config
    from harness.errors import ConfigError

    with pytest.raises(ConfigError, match="launcher ray places one job per sequence"):
        load_config(None, {"jobs": "2", "launcher": "ray"})
    with pytest.raises(ConfigError, match="give 1 or more"):
        load_config(None, {"jobs": "0"})


# --- the base-evaluation cache -----------------------------------------------------------------------------------
def _key_inputs(tmp_path):
    import shutil

    from harness.config_loading import load_config
    from harness.models import load_model
    from harness.suites import load_suite

    suite_dir = tmp_path / "smoke"
    shutil.copytree(ROOT / "task_suites" / "smoke", suite_dir)
    model, _ = load_model("tiny-llama")
    return load_config(None, {"suite": str(suite_dir), "model": "tiny-llama"}), load_suite(suite_dir), model, suite_dir


def test_the_base_evaluation_key_changes_with_everything_it_depends_on(tmp_path, monkeypatch):
    import torch

    from harness.run import base_eval as BE
    from harness.suites import load_suite

    cfg, suite, model, suite_dir = _key_inputs(tmp_path)
    tasks = ["parity", "weather"]
    digest = BE.digest_of(BE.cache_key(cfg, suite, model, tasks))
    assert BE.digest_of(BE.cache_key(cfg, suite, model, tasks)) == digest, "the key must be a function of its inputs"
    changed = {}
    for knob, value in [
        ("eval_limit", 7),
        ("eval_batch_size", 3),
        ("eval_max_length", 64),
        ("eval_bf16", True),
        ("bf16_autocast", True),
        ("general_ce_tokens", 128),
        ("model", "other-model"),
    ]:
        changed[knob] = BE.cache_key(cfg.model_copy(update={knob: value}), suite, model, tasks)
    changed["tasks"] = BE.cache_key(cfg, suite, model, ["parity"])
    with torch.no_grad():
        p = next(model.parameters())
        p.view(-1)[0] += 1.0  # one weight of the model (a sampled one: the first of the first tensor)
    changed["weights"] = BE.cache_key(cfg, suite, model, tasks)
    p.data.view(-1)[0] -= 1.0
    changed["dtype"] = BE.cache_key(cfg, suite, model.to(torch.bfloat16), tasks)
    model.to(torch.float32)
    data = next(suite_dir.glob("data/weather.test.jsonl"))
    data.write_text(data.read_text().replace("\n", " \n", 1))  # one document, one space
    changed["documents"] = BE.cache_key(cfg, load_suite(suite_dir), model, tasks)
    monkeypatch.setattr(BE, "__version__", "9.9.9")
    changed["harness version"] = BE.cache_key(cfg, suite, model, tasks)
    for what, key in changed.items():
        assert BE.digest_of(key) != digest, f"changing {what} must recompute the base evaluation"
    assert len({BE.digest_of(k) for k in changed.values()}) == len(changed)


def test_the_cache_computes_once_across_processes_sharing_the_folder_and_recomputes_on_a_new_key(tmp_path):
    from harness.run.base_eval import BaseEval, BaseEvalCache
    from harness.run.evaluate import EvalResult

    calls = []

    def compute(score):
        def run():
            calls.append(score)
            docs = {"t": {"metric": "acc,none", "doc_ids": [0, 1], "scores": [score, 1.0]}}
            return BaseEval(
                EvalResult({"t": (score + 1) / 2}, {"t": {"acc,none": 0.5}}, 1.0, {"t": 2}, documents=docs), 7.25
            )

        return run

    key = {"model": "m", "weights": "w"}
    first = BaseEvalCache(tmp_path / "base-eval").get(key, compute(0.0))
    second = BaseEvalCache(tmp_path / "base-eval").get(key, compute(0.0))  # another process: a fresh cache, same folder
    assert calls == [0.0] and not first.cached and second.cached
    assert second.result.scores == first.result.scores and second.result.documents == first.result.documents
    assert second.general_ce == 7.25
    third = BaseEvalCache(tmp_path / "base-eval").get({**key, "weights": "v"}, compute(1.0))
    assert calls == [0.0, 1.0] and not third.cached and third.result.scores == {"t": 1.0}
    off = BaseEvalCache(None)
    off.get(key, compute(0.0)), off.get(key, compute(0.0))
    assert calls == [0.0, 1.0, 0.0, 0.0], "with the cache off every sequence evaluates the base model itself"


OPEN_STORE = """
import sys, time
from pathlib import Path
from harness.tracking.client import Tracker
start = float(sys.argv[2])
while time.time() < start:  # every process opens the fresh store at the same moment
    time.sleep(0.001)
t = Tracker(f"sqlite:///{sys.argv[1]}", "race", artifact_root=Path(sys.argv[1]).parent / "mlartifacts")
run = t.create_parent(f"p{sys.argv[3]}", {}, {"x": 1})
print(t.experiment_id, run)
"""


def test_processes_creating_a_fresh_sqlite_store_at_once_all_succeed(tmp_path):
    import time

    db = tmp_path / "mlflow.db"
    start = time.time() + 8  # after every interpreter has imported MLflow
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_STORE, str(db), str(start), str(i)],
            cwd=ROOT,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(4)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(err[-1500:] for _, err in outs)
    experiments = {out.split()[0] for out, _ in outs}
    assert len(experiments) == 1, f"one experiment, created once: {experiments}"
