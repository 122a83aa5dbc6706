"""`--launcher ray` on real components: a Ray head started as its own process, a PostgreSQL-backed MLflow server.

Four smoke sequences run in parallel and must give the matrices of a local run; a worker SIGKILLed
mid-stage is retried and resumes; Ctrl-C cancels the jobs and marks their runs KILLED (interrupted, resumable); a retry whose
previous process still holds the folder waits for it. Skipped, loudly, without PostgreSQL
(`bash .ci/install-postgres.sh`). Every wait is bounded; the Ray head is stopped by process id
(`ray stop` would end every Ray on the machine, other people's included).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import sigint_at_default
from test_crash_safety import wait_for
from test_sequence import read_matrix
from test_tracking_server import _kill_everything, _require_postgres, _server_processes, _start, _wait_ready

from harness.tools.dashboard import free_port

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"
# 2 tasks (3 stages with the base row), 4 optimizer steps, checkpoints every 2 steps, 8 test examples.
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
]
FOUR = ["--methods", "lori-s,lora", "--seeds", "0,1"]
SEQUENCES = [f"{m}/seed-{s}" for m in ("lori-s", "lora") for s in (0, 1)]
START_TIMEOUT_S, RUN_TIMEOUT_S = 120, 480


def cli(*args, env_extra=None, timeout=RUN_TIMEOUT_S):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def start_cli(*args, env_extra=None, log: Path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    with open(log, "wb") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "harness.cli", *args],
            cwd=ROOT,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            preexec_fn=sigint_at_default,
        )


# --- real servers ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tracking_server():
    """`harness tracking-server` (PostgreSQL + mlflow server) on a free port; its URI."""
    _require_postgres()
    base = Path(tempfile.mkdtemp(prefix="harness-launch-ts-"))
    base.chmod(0o711)  # the postgres user must reach its data folder
    results, log = base / "results", base / "server.log"
    proc, port = _start(results, log)
    try:
        _wait_ready(proc, port, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        seen = _server_processes(results)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        _kill_everything(proc, results, seen)
        shutil.rmtree(base, ignore_errors=True)


def _descendants(roots: set[int]) -> set[int]:
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                parent[int(d.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
            except (OSError, ValueError):
                pass
    found, grew = set(roots), True
    while grew:
        new = {p for p, pp in parent.items() if pp in found and p not in found}
        found |= new
        grew = bool(new)
    return {p for p in found if p in parent}


def _group(pgid: int) -> set[int]:
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getpgid(int(d.name)) == pgid:
                    out.add(int(d.name))
            except OSError:
                pass
    return out


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head as its own process group on 127.0.0.1 with 2 CPUs and token authentication.

    Yields the arguments and environment a driver needs: --ray-address, and the token as a Ray client
    gets it (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN). Stopped by process id afterwards."""
    import secrets

    tmp = Path(tempfile.mkdtemp(prefix="harness-ray-"))
    port = free_port()
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", **auth}
    started = subprocess.Popen(
        [
            str(RAY),
            "start",
            "--head",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(port),
            "--num-cpus",
            "2",
            "--include-dashboard",
            "false",
            "--disable-usage-stats",
            "--temp-dir",
            str(tmp),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = started.communicate(timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        started.kill()
        out = "(timed out)"
    pgid = started.pid
    try:
        if started.returncode != 0:
            pytest.fail(f"`ray start --head` failed ({started.returncode}):\n{out[-3000:]}")
        yield {"args": ["--launcher", "ray", "--ray-address", f"127.0.0.1:{port}"], "env": auth}
    finally:
        procs = _descendants(_group(pgid))
        for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            for pid in procs:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in procs):
                time.sleep(0.2)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    """The four sequences under the default launcher: the matrices every other launcher must reproduce."""
    results = tmp_path_factory.mktemp("local")
    t0 = time.monotonic()
    out = cli("run", *SMALL, *FOUR, "--no-progress", "--results-dir", str(results), "--experiment", "same")
    assert out.returncode == 0, out.stderr[-3000:]
    print(f"\nlocal launcher, 4 sequences: {time.monotonic() - t0:.1f} s wall")
    return {s: read_matrix(results / "same" / s / "matrix.csv")[1] for s in SEQUENCES}


# --- checks ------------------------------------------------------------------------------------------------------
def check_store(uri: str, experiment: str, seq_dirs: dict[str, Path], n_stages: int) -> None:
    """One FINISHED parent per sequence, its stage runs 1..S exactly once and FINISHED, acc/<task> without repeats."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name(experiment)
    parents = c.search_runs([exp.experiment_id], "tags.`harness.kind` = 'sequence'")
    by_dir = {}
    for p in parents:
        by_dir.setdefault(p.data.tags["harness.run_dir"], []).append(p)
    assert set(by_dir) == {str(d.resolve()) for d in seq_dirs.values()}
    for label, d in seq_dirs.items():
        (parent,) = by_dir[str(d.resolve())]
        assert parent.info.status == "FINISHED", label
        assert json.loads((d / "state.json").read_text())["mlflow_parent_run_id"] == parent.info.run_id
        children = c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert sorted(int(ch.data.tags["harness.stage"]) for ch in children) == list(range(1, n_stages + 1)), label
        assert all(ch.info.status == "FINISHED" for ch in children), label
        for t in json.loads((d / "summary.json").read_text())["tasks"]:
            assert [m.step for m in c.get_metric_history(parent.info.run_id, f"acc/{t}")] == list(
                range(n_stages + 1)
            ), label


def check_folder(d: Path, tasks: list[str]) -> None:
    summary = json.loads((d / "summary.json").read_text())
    assert summary["complete"] and summary["tasks"] == tasks
    assert sorted(p.name for p in (d / "stages").iterdir()) == [
        "0-base",
        *[f"{i + 1}-{t}" for i, t in enumerate(tasks)],
    ]
    assert not (d / "checkpoint").exists()


# --- tests -------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_four_sequences_in_parallel_on_ray_match_a_local_run(local_reference, tracking_server, ray_head, tmp_path):
    results = tmp_path / "r"
    t0 = time.monotonic()
    out = cli(
        "run",
        *SMALL,
        *FOUR,
        "--no-progress",
        "--results-dir",
        str(results),
        "--experiment",
        "par",
        *ray_head["args"],
        "--job-cpus",
        "1",
        "--tracking-uri",
        tracking_server,
        env_extra=ray_head["env"],
    )
    wall = time.monotonic() - t0
    assert out.returncode == 0, out.stderr[-4000:]
    exp = results / "par"
    dirs = {s: exp / s for s in SEQUENCES}
    for s, d in dirs.items():
        check_folder(d, ["parity", "weather"])
        np.testing.assert_array_equal(read_matrix(d / "matrix.csv")[1], local_reference[s], err_msg=s)
        assert (exp / "ray" / f"{s.replace('/', '_')}_order-0.log").is_file()
        # The driver showed every stage and every sequence as they finished.
        for line in (
            f"[{s}/order-0] stage 0 (base model)",
            f"[{s}/order-0] stage 1/2 parity",
            f"[{s}/order-0] stage 2/2 weather",
            f"[{s}/order-0] done: ACC",
        ):
            assert line in out.stderr, line
    check_store(tracking_server, "par", dirs, n_stages=2)
    assert (exp / "config.yaml").is_file()
    assert "lori-s" in out.stdout and "lora" in out.stdout  # the comparison table
    print(f"\nray launcher (2 CPUs, job_cpus 1), 4 sequences: {wall:.1f} s wall")


@pytest.mark.slow
def test_a_worker_killed_mid_stage_is_retried_and_resumes_to_the_same_matrix(
    local_reference, tracking_server, ray_head, tmp_path
):
    results = tmp_path / "r"
    seq = results / "kill" / "lori-s" / "seed-0"
    log = tmp_path / "driver.log"
    driver = start_cli(
        "run",
        *SMALL,
        "--methods",
        "lori-s",
        "--seeds",
        "0",
        "--no-progress",
        "--results-dir",
        str(results),
        "--experiment",
        "kill",
        *ray_head["args"],
        "--tracking-uri",
        tracking_server,
        env_extra={"HARNESS_FAULT_PAUSE": "mid-train:2", **ray_head["env"]},
        log=log,
    )
    try:
        wait_for(seq / ".paused-mid-train", driver, timeout=RUN_TIMEOUT_S)
        worker = int((seq / ".paused-mid-train").read_text())
        assert worker != driver.pid and json.loads((seq / ".lock").read_text())["pid"] == worker
        assert (seq / "checkpoint" / "state.json").exists()
        os.kill(worker, signal.SIGKILL)
        assert driver.wait(timeout=RUN_TIMEOUT_S) == 0, log.read_text()[-4000:]
    finally:
        if driver.poll() is None:
            driver.kill()
    text = log.read_text()
    assert "job died" in text and "retry 1/2" in text, text[-3000:]
    check_folder(seq, ["parity", "weather"])
    np.testing.assert_array_equal(read_matrix(seq / "matrix.csv")[1], local_reference["lori-s/seed-0"])
    train = json.loads(next((seq / "stages").glob("2-*/train.json")).read_text())
    assert train["resumed_from_step"] == 2 and train["steps"] == 4
    check_store(tracking_server, "kill", {"lori-s/seed-0": seq}, n_stages=2)


@pytest.mark.slow
def test_ctrl_c_cancels_the_jobs_and_marks_their_runs_killed(tracking_server, ray_head, tmp_path):
    from mlflow.tracking import MlflowClient

    from harness.locking import is_locked

    results = tmp_path / "r"
    seq = results / "cancel" / "lora" / "seed-0"
    log = tmp_path / "driver.log"
    driver = start_cli(
        "run",
        *SMALL,
        "--methods",
        "lora",
        "--seeds",
        "0",
        "--no-progress",
        "--results-dir",
        str(results),
        "--experiment",
        "cancel",
        *ray_head["args"],
        "--tracking-uri",
        tracking_server,
        env_extra={"HARNESS_FAULT_PAUSE": "eval:1", **ray_head["env"]},
        log=log,
    )
    try:
        wait_for(seq / ".paused-eval", driver, timeout=RUN_TIMEOUT_S)
        worker = int((seq / ".paused-eval").read_text())
        driver.send_signal(signal.SIGINT)
        assert driver.wait(timeout=180) == 130, log.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
    assert not Path(f"/proc/{worker}").exists() or "(Z)" in Path(f"/proc/{worker}/stat").read_text(), (
        "the job was not cancelled"
    )
    assert is_locked(seq) is False
    c = MlflowClient(tracking_uri=tracking_server)
    exp = c.get_experiment_by_name("cancel")
    (parent,) = c.search_runs([exp.experiment_id], "tags.`harness.kind` = 'sequence'")
    assert parent.info.status == "KILLED" and parent.data.tags.get("harness.interrupted") == "true"
    children = c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert children and all(ch.info.status == "KILLED" for ch in children)
    assert "interrupted" in log.read_text() and "harness resume" in log.read_text()


@pytest.mark.slow
def test_a_retry_waits_while_its_previous_process_still_holds_the_folder(tmp_path):
    """A job reported dead whose process still runs (node lost, process alive): the retry must not run a second copy."""
    from harness.config_loading import load_config
    from harness.launchers.job import payload, run_sequence_job
    from harness.run.planning import experiment_dir

    cfg = load_config(
        None,
        {
            "suite": "smoke",
            "model": "tiny-llama",
            "methods": ["lora"],
            "tasks": ["parity"],
            "max_steps": 2,
            "eval_limit": 4,
            "results_dir": str(tmp_path / "r"),
            "experiment": "wait",
        },
    )
    seq = experiment_dir(cfg) / "lora" / "seed-0"
    seq.mkdir(parents=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from harness.locking import SequenceLock; "
            "SequenceLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)",
            str(seq),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        first = run_sequence_job(payload(cfg, seq, attempt=1, label="lora/seed-0", log=tmp_path / "job1.log"))
        assert not first["ok"] and f"pid {holder.pid}" in first["error"], first
        result = {}
        retry = threading.Thread(
            target=lambda: result.update(
                run_sequence_job(payload(cfg, seq, attempt=2, label="lora/seed-0", log=tmp_path / "job2.log"))
            )
        )
        retry.start()
        log2, deadline = tmp_path / "job2.log", time.monotonic() + 120
        while not (log2.exists() and "waiting for" in log2.read_text(errors="replace")):
            assert time.monotonic() < deadline and retry.is_alive(), "the retry did not wait for the lock"
            time.sleep(0.2)
        time.sleep(3)  # it keeps waiting: nothing of the sequence runs while the first process lives
        assert retry.is_alive() and not (seq / "stages").exists() and not (seq / "state.json").exists()
        holder.kill()
        holder.wait(timeout=30)
        retry.join(timeout=300)
        assert not retry.is_alive() and result.get("ok"), result
    finally:
        if holder.poll() is None:
            holder.kill()
    assert f"pid {holder.pid}" in (tmp_path / "job2.log").read_text()
    check_folder(seq, ["parity"])


def test_an_unreachable_ray_address_is_refused_in_seconds_with_nothing_written(tracking_server, tmp_path):
    t0 = time.monotonic()
    out = cli(
        "run",
        *SMALL,
        "--methods",
        "lora",
        "--no-progress",
        "--results-dir",
        str(tmp_path / "r"),
        "--launcher",
        "ray",
        "--ray-address",
        f"127.0.0.1:{free_port()}",
        "--tracking-uri",
        tracking_server,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert "nothing answers there" in out.stderr and "Traceback" not in out.stderr
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "r").exists()
