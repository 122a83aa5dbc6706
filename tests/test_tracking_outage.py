"""The tracking server is a mirror, not a single point of failure: a real `mlflow server` stopped mid-sequence and
restarted before the end, and one that is down when a run with --tracking-optional starts.

The run goes on while the server is away (the folders commit as usual), says once that tracking is behind and once
that it caught up; afterwards MLflow holds exactly one FINISHED parent and one FINISHED stage run per stage, with the
folder's metrics (`harness verify` compares them)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from harness.tools.dashboard import free_port, start_server, stop_server, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
RUN = [
    "--suite",
    "smoke",
    "--model",
    "tiny-llama",
    "--seeds",
    "0",
    "--methods",
    "lori-s",
    "--epochs",
    "1",
    "--no-progress",
]


class Server:
    """`mlflow server` over a sqlite store in tmp_path, on a fixed port, stopped and started at will."""

    def __init__(self, tmp_path: Path):
        self.dir, self.port = tmp_path / "server", free_port()
        self.dir.mkdir()
        self.store = f"sqlite:///{self.dir / 'mlflow.db'}"
        MlflowClient(tracking_uri=self.store).search_experiments()  # create the store once, before any server
        self.url, self.proc = f"http://127.0.0.1:{self.port}", None

    def start(self) -> None:
        self.proc, _ = start_server(self.dir, port=self.port, tracking_uri=self.store, log=open(self.dir / "log", "ab"))
        wait_healthy(self.url, timeout=180, proc=self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            stop_server(self.proc)
            self.proc = None


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path)
    try:
        yield s
    finally:
        s.stop()


def cli(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        **kw,
    )


def wait_paused(marker: Path, proc, timeout=300) -> None:
    deadline = time.time() + timeout
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, f"{marker} did not appear"
        time.sleep(0.05)


def check_mirrored(server: Server, seq: Path, experiment: str) -> None:
    """One FINISHED parent, one FINISHED stage run per stage, metrics equal to the folder."""
    c = MlflowClient(tracking_uri=server.url)
    exp = c.get_experiment_by_name(experiment)
    parents = c.search_runs([exp.experiment_id], "tags.`harness.kind` = 'sequence'")
    assert [p.info.status for p in parents] == ["FINISHED"]
    children = c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert sorted((int(ch.data.tags["harness.stage"]), ch.info.status) for ch in children) == [
        (t, "FINISHED") for t in (1, 2, 3)
    ]
    models = c.search_logged_models([exp.experiment_id])  # harness/run/lineage.py: caught up like the runs, none twice
    assert sorted((int(m.params["stage"]), len(m.metrics)) for m in models) == [(t, 3) for t in (1, 2, 3)]
    out = cli("verify", str(seq))
    assert out.returncode == 0 and "mlflow   ok" in out.stdout, out.stdout + out.stderr


@pytest.mark.slow
def test_a_server_stopped_after_stage_1_and_restarted_before_the_end_misses_nothing(server, tmp_path):
    server.start()
    results = tmp_path / "r"
    seq = results / "outage" / "lori-s" / "seed-0"
    pause = seq / ".paused-between-stages"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "harness.cli",
            "run",
            *RUN,
            "--no-report",
            "--results-dir",
            str(results),
            "--experiment",
            "outage",
            "--tracking-uri",
            server.url,
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "HARNESS_FAULT_PAUSE": "between-stages:1,between-stages:2"},
    )
    try:
        wait_paused(pause, proc)
        server.stop()
        pause.unlink()  # stage 2 runs with the server away
        wait_paused(pause, proc)
        assert (next((seq / "stages").glob("2-*")) / "stage.json").exists(), (
            "stage 2 was committed while the server was away"
        )
        server.start()
        pause.unlink()
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert err.count("tracking is behind") == 1 and err.count("tracking caught up") == 1, err[-3000:]
    assert "Traceback" not in err
    assert json.loads((seq / "summary.json").read_text())["complete"]
    check_mirrored(server, seq, "outage")
    s1, s2 = (json.loads(next((seq / "stages").glob(f"{t}-*/stage.json")).read_text()) for t in (1, 2))
    print(
        f"\nstage 1 (server up): other {s1['overhead_s']:.1f}s of {s1['wall_s']:.1f}s; "
        f"stage 2 (server down): other {s2['overhead_s']:.1f}s of {s2['wall_s']:.1f}s"
    )


@pytest.mark.slow
def test_tracking_optional_starts_without_the_server_and_report_or_sync_mirror_the_folder_later(server, tmp_path):
    results = tmp_path / "r"
    args = ["run", *RUN, "--results-dir", str(results), "--experiment", "offline", "--tracking-uri", server.url]
    refused = cli(*args, "--no-report")
    assert refused.returncode == 2 and "unreachable" in refused.stderr and not (results / "offline").exists()

    out = cli(*args, "--tracking-optional", "true")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count("tracking is behind") == 1 and "still behind at the end" in out.stderr
    assert "report: not written now" in out.stdout
    seq = results / "offline" / "lori-s" / "seed-0"
    assert json.loads((seq / "summary.json").read_text())["complete"]

    server.start()
    report = cli(
        "report", "offline", "--results-dir", str(results), "--tracking-uri", server.url
    )  # catches MLflow up first
    assert report.returncode == 0 and "(FINISHED) and 3 stage run(s)" in report.stderr, report.stdout + report.stderr
    check_mirrored(server, seq, "offline")
    again = cli("sync", str(results / "offline"))  # on demand, and idempotent: nothing is logged twice
    assert again.returncode == 0 and "(FINISHED) and 3 stage run(s)" in again.stdout, again.stdout + again.stderr
    check_mirrored(server, seq, "offline")


@pytest.mark.slow
def test_a_server_stopped_during_a_merge_leaves_mlflow_complete_after_sync(server, tmp_path, capsys):
    """`harness merge` survives an outage as a sequence does: the merge finishes from the folder, says once that
    tracking is behind, and `harness sync` on the merge folder, once the server is back, completes MLflow."""
    server.start()
    results = tmp_path / "r"
    folder = results / "mo" / "merge" / "lora" / "seed-0"
    pause = folder / ".paused-between-stages"
    args = ["--suite", "smoke", "--model", "tiny-llama", "--methods", "lora", "--seeds", "0", "--no-progress"]
    args += ["--tasks", "parity,weather", "--max-steps", "1", "--merge-methods", "cat", "--experiment", "mo"]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "harness.cli",
            "merge",
            *args,
            "--results-dir",
            str(results),
            "--tracking-uri",
            server.url,
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "HARNESS_FAULT_PAUSE": "between-stages:1"},
    )
    try:
        wait_paused(pause, proc)  # the first adapter is committed and mirrored
        server.stop()
        pause.unlink()  # the second adapter, the single matrix and the merge run with the server away
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert err.count("tracking is behind") == 1 and "still behind at the end" in err and "Traceback" not in err
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["complete"]

    server.start()
    from harness.cli import main  # in this process: a second interpreter would only add its start-up

    capsys.readouterr()
    assert main(["sync", str(folder)]) == 0
    assert "(FINISHED) and 3 child run(s)" in capsys.readouterr().out
    c = MlflowClient(tracking_uri=server.url)
    exp = c.get_experiment_by_name("mo")
    [parent] = c.search_runs([exp.experiment_id], "tags.`harness.kind` = 'merge'")
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["merged/cat/normalised_accuracy"] == pytest.approx(
        summary["merges"]["cat"]["normalised_accuracy"]
    )
    kids = {
        k.info.run_name: k
        for k in c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    }
    assert sorted(kids) == ["adapter-parity", "adapter-weather", "cat-parity+weather"]
    assert all(k.info.status == "FINISHED" for k in kids.values())
    [row] = json.loads((folder / "merged.json").read_text())["rows"]
    assert {t: kids["cat-parity+weather"].data.metrics[f"eval/{t}"] for t in row["scores"]} == pytest.approx(
        row["scores"]
    )
    for task in ("parity", "weather"):
        steps = json.loads((folder / "adapters" / task / "train.json").read_text())["steps"]
        assert kids[f"adapter-{task}"].data.metrics["train_steps"] == steps
    assert main(["sync", str(folder)]) == 0  # idempotent: nothing twice
    assert len(c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")) == 3
