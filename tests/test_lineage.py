"""MLflow 3 lineage: a LoggedModel per committed stage, datasets with digests, system metrics, `export --register`.

The end-to-end tests run a smoke sequence against a real tracking server (`mlflow server` over sqlite, and
`harness tracking-server` over PostgreSQL), SIGKILL it between stages 1 and 2, resume it, and read back what
MLflow 3 users search for: one model per stage with its acc/<task> metrics tied to the test data, the datasets as
run inputs with their digests (nothing twice), a quiet console, and a registered version that stock PEFT loads.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from peft import PeftModel
from safetensors.torch import load_file

from harness.cli import main
from harness.models import load_model
from harness.run import lineage
from harness.suites import load_suite

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["parity", "weather", "copy"]
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
    "--no-report",
    "--system-metrics",
    "true",
]
X = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 311]])


# --- fast ---------------------------------------------------------------------------------------------------------
def test_a_data_file_edited_by_one_byte_gets_another_digest_and_only_it(tmp_path):
    suite_dir = tmp_path / "smoke"
    shutil.copytree(ROOT / "task_suites" / "smoke", suite_dir)
    before = {(r["name"], r["context"]): r["digest"] for r in lineage.dataset_records(load_suite(suite_dir), TASKS)}
    data = suite_dir / "data" / "parity.train.jsonl"
    raw = bytearray(data.read_bytes())
    i = raw.index(b'"number": ') + len(b'"number": ')
    raw[i] = ord("1") if raw[i] != ord("1") else ord("2")  # one byte: the first number's first digit; still valid JSON
    data.write_bytes(bytes(raw))
    after = {(r["name"], r["context"]): r["digest"] for r in lineage.dataset_records(load_suite(suite_dir), TASKS)}
    assert set(before) == set(after) and len(before) == 2 * len(TASKS)
    assert {k for k in before if before[k] != after[k]} == {("smoke/parity/train", "training")}
    assert after[("smoke/parity/test", "evaluation")] == lineage.digest_file(suite_dir / "data" / "parity.test.jsonl")


def test_system_metrics_default_on_cuda_off_on_cpu_and_the_knob_wins():
    assert lineage.system_metrics_wanted(None, torch.device("cpu")) is False
    assert lineage.system_metrics_wanted(None, torch.device("cuda", 0)) is True
    assert lineage.system_metrics_wanted(True, torch.device("cpu")) is True
    assert lineage.system_metrics_wanted(False, torch.device("cuda", 0)) is False


def test_register_without_a_mirrored_parent_run_is_one_message_and_writes_nothing(tmp_path, capsys):
    seq = tmp_path / "seq"
    (seq / "stages").mkdir(parents=True)
    (seq / "state.json").write_text(json.dumps({"mlflow_tracking_uri": f"sqlite:///{tmp_path / 'm.db'}"}))
    assert main(["export", str(seq), str(tmp_path / "out"), "--register", "adapters"]) == 2
    err = capsys.readouterr().err
    assert f"harness sync {seq}" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.db").exists()


# --- end to end on a real tracking server ---------------------------------------------------------------------------
def _popen(args: list[str], log: Path, pause: str | None = None) -> subprocess.Popen:
    # MLflow's monitor publishes once per sampling interval (10 s by default) and drops a shorter tail: a smoke
    # sequence's resumed part can be shorter than that, so sample every second here.
    env = {
        **{k: v for k, v in os.environ.items() if k != "HARNESS_FAULT_PAUSE"},
        "PYTHONUNBUFFERED": "1",
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1",
    }
    if pause:
        env["HARNESS_FAULT_PAUSE"] = pause
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "harness.cli", *args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def _wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended (rc {proc.returncode}) before {path.name}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.05)


def run_killed_and_resumed(url: str, results: Path, experiment: str) -> tuple[Path, str]:
    """A smoke sequence SIGKILLed between stages 1 and 2, then resumed; (its folder, everything both processes printed)."""
    seq = results / experiment / "lori-s" / "seed-0"
    first, second = results.parent / "first.log", results.parent / "resume.log"
    proc = _popen(
        ["run", *RUN, "--results-dir", str(results), "--experiment", experiment, "--tracking-uri", url],
        first,
        pause="between-stages:1",
    )
    try:
        _wait_for(seq / ".paused-between-stages", proc, first)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    resumed = _popen(["resume", str(seq), "--tracking-uri", url, "--no-report", "--no-progress"], second)
    assert resumed.wait(timeout=900) == 0, second.read_text()[-3000:]
    return seq, first.read_text() + second.read_text()


def check_lineage(url: str, seq: Path, experiment: str, output: str) -> None:
    c = MlflowClient(tracking_uri=url)
    exp = c.get_experiment_by_name(experiment)
    (parent,) = c.search_runs([exp.experiment_id], "tags.`harness.kind` = 'sequence'")
    assert parent.info.status == "FINISHED"
    state = json.loads((seq / "state.json").read_text())
    suite_dir = ROOT / "task_suites" / "smoke" / "data"
    digests = {
        f"smoke/{t}/{s}": lineage.digest_file(suite_dir / f"{t}.{s}.jsonl") for t in TASKS for s in ("train", "test")
    }
    assert {r["name"]: r["digest"] for r in state["mlflow_datasets"]} == digests

    # Inputs: every task's train (training) and test (evaluation) data once, with the files' digests.
    inputs = [
        (d.dataset.name, d.dataset.digest, {t.key: t.value for t in d.tags}["mlflow.data.context"])
        for d in parent.inputs.dataset_inputs
    ]
    assert sorted(inputs) == sorted(
        (n, d, "training" if n.endswith("/train") else "evaluation") for n, d in digests.items()
    )
    stages = {int(p.name.split("-")[0]): p for p in (seq / "stages").iterdir() if p.name[0] != "0"}
    for child in c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"):
        task = child.data.tags["harness.task"]
        names = sorted(d.dataset.name for d in child.inputs.dataset_inputs)
        assert names == sorted([f"smoke/{task}/train"] + [f"smoke/{t}/test" for t in TASKS]), names

    # Models: one per stage (none twice after the kill), READY, the export's PEFT files, params, acc/<task> with datasets.
    models = c.search_logged_models([exp.experiment_id])
    assert sorted(int(m.params["stage"]) for m in models) == [1, 2, 3]
    for m in models:
        t = int(m.params["stage"])
        info, scores = (json.loads((stages[t] / f).read_text()) for f in ("stage.json", "eval.json"))
        assert str(m.status) == "READY" and m.source_run_id == info["mlflow_run_id"]
        assert {k: m.params[k] for k in ("method", "task", "rank", "seed")} == {
            "method": "lori-s",
            "task": TASKS[t - 1],
            "rank": "8",
            "seed": "0",
        }
        assert float(m.params["mask_density"]) == pytest.approx(info["mask/density"]) and 0 < info["mask/density"] < 0.2
        got = {x.key: (x.value, x.step, x.dataset_name, x.dataset_digest) for x in m.metrics}
        assert got == {
            f"acc/{task}": (pytest.approx(v), t, f"smoke/{task}/test", digests[f"smoke/{task}/test"])
            for task, v in scores["scores"].items()
        }
        assert sorted(a.path for a in c.list_logged_model_artifacts(m.model_id)) == [
            "adapter_config.json",
            "adapter_model.safetensors",
        ]
    parity = lambda m: next(x.value for x in m.metrics if x.key == "acc/parity")  # noqa: E731
    ranked = c.search_logged_models(
        [exp.experiment_id], order_by=[{"field_name": "metrics.acc/parity", "ascending": False}]
    )
    assert [parity(m) for m in ranked] == sorted((parity(m) for m in models), reverse=True)  # the Models view's ranking

    # System metrics on the parent; a quiet console with the parent's address, once per process.
    assert "system/cpu_utilization_percentage" in parent.data.metrics
    assert "View run" not in output and "View experiment" not in output
    assert output.count(f"MLflow run: {url}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}") == 2


def check_an_older_store_gets_its_models_once(url: str, seq: Path, experiment: str) -> None:
    """A store from before lineage (acc points, no models): a sync adds one model per stage with its metrics, once."""
    c = MlflowClient(tracking_uri=url)
    eid = c.get_experiment_by_name(experiment).experiment_id
    for m in c.search_logged_models([eid]):
        c.delete_logged_model(m.model_id)
    parent_id = json.loads((seq / "state.json").read_text())["mlflow_parent_run_id"]
    for _ in range(2):
        assert main(["sync", str(seq), "--tracking-uri", url]) == 0
        models = c.search_logged_models([eid])
        assert sorted(int(m.params["stage"]) for m in models) == [1, 2, 3]
        assert all(sorted(x.key for x in m.metrics) == sorted(f"acc/{t}" for t in TASKS) for m in models)
        for t in TASKS:  # the parent's points are not logged again
            assert [m.step for m in c.get_metric_history(parent_id, f"acc/{t}")] == [0, 1, 2, 3]


def check_register(url: str, seq: Path, tmp: Path, monkeypatch) -> None:
    out = tmp / "export"
    assert main(["export", str(seq), str(out), "--stage", "2", "--register", "smoke-adapter"]) == 0
    c = MlflowClient(tracking_uri=url)
    (mv,) = c.search_model_versions("name = 'smoke-adapter'")
    model = c.get_logged_model(mv.tags["harness.model_id"])
    assert model.params["stage"] == "2" and mv.run_id == model.tags["harness.parent_run_id"]
    assert mv.run_id == json.loads((seq / "state.json").read_text())["mlflow_parent_run_id"]
    assert main(["export", str(seq), str(tmp / "again"), "--stage", "2", "--register", "smoke-adapter"]) == 0
    assert len(c.search_model_versions("name = 'smoke-adapter'")) == 1, "the same stage registered twice"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)  # models:/NAME/VERSION resolves through the registry
    got = Path(mlflow.artifacts.download_artifacts(f"models:/smoke-adapter/{mv.version}", dst_path=str(tmp / "dl")))
    assert (
        load_file(str(got / "adapter_model.safetensors")).keys()
        == load_file(str(out / "adapter_model.safetensors")).keys()
    )
    base = load_model("tiny-llama")[0]
    registered = PeftModel.from_pretrained(base, str(got)).eval()
    exported = PeftModel.from_pretrained(load_model("tiny-llama")[0], str(out)).eval()
    with torch.no_grad():
        assert torch.equal(registered(input_ids=X).logits, exported(input_ids=X).logits)


@pytest.mark.slow
def test_sqlite_server_one_model_per_stage_inputs_with_digests_after_a_kill_and_a_registered_version(
    tmp_path, monkeypatch
):
    from test_tracking_outage import Server

    server = Server(tmp_path)
    try:
        server.start()
        seq, output = run_killed_and_resumed(server.url, tmp_path / "r", "lineage")
        check_lineage(server.url, seq, "lineage", output)
        check_an_older_store_gets_its_models_once(server.url, seq, "lineage")
        check_register(server.url, seq, tmp_path, monkeypatch)
    finally:
        server.stop()


@pytest.mark.slow
def test_postgres_server_one_model_per_stage_inputs_with_digests_after_a_kill_and_a_registered_version(monkeypatch):
    from test_tracking_server import _kill_everything, _require_postgres, _server_processes, _start, _stop, _wait_ready

    _require_postgres()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    base = Path(tempfile.mkdtemp(prefix="harness-lineage-"))
    base.chmod(0o711)  # the postgres user enters it
    server_dir = base / "server"
    proc, port = _start(server_dir, base / "server.log")
    seen: set = set()
    try:
        _wait_ready(proc, port, base / "server.log")
        seen = _server_processes(server_dir)
        url = f"http://127.0.0.1:{port}"
        seq, output = run_killed_and_resumed(url, base / "r", "lineage-pg")
        check_lineage(url, seq, "lineage-pg", output)
        check_an_older_store_gets_its_models_once(url, seq, "lineage-pg")
        check_register(url, seq, base, monkeypatch)
        _stop(proc, server_dir, seen | _server_processes(server_dir), base / "server.log")
    finally:
        _kill_everything(proc, server_dir, seen)
        shutil.rmtree(base, ignore_errors=True)
