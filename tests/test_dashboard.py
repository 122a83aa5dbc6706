"""The dashboard: a real `mlflow server` over the report fixture's sqlite store, queried over REST."""

from __future__ import annotations

import importlib.util
import json
import os
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

from harness.errors import HarnessError  # noqa: E402
from harness.tools.dashboard import free_port, serve_dashboard, start_server, stop_server, wait_healthy  # noqa: E402


def _fixture_module():
    """tests/test_report.py holds the store builder (loaded by path: works in any pytest import mode)."""
    spec = importlib.util.spec_from_file_location("_report_fixture", Path(__file__).with_name("test_report.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def test_missing_store_is_a_user_error(tmp_path):
    with pytest.raises(HarnessError, match=r"no runs yet under .*make run-sequence"):
        serve_dashboard(tmp_path / "nothing", port=free_port())
    assert not (tmp_path / "nothing" / "mlflow.db").exists()
    with pytest.raises(HarnessError, match="tracking server already"):
        start_server(tmp_path, tracking_uri="http://127.0.0.1:1")


def test_server_serves_the_parent_runs(tmp_path):
    fx = _fixture_module()
    store = fx.build_fixture_store(tmp_path / "results")
    port = free_port()
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        proc, url = start_server(store["results_dir"], port=port, log=log)
        try:
            assert url == f"http://127.0.0.1:{port}"
            wait_healthy(url, timeout=90, proc=proc)
            with pytest.raises(HarnessError, match=f"port {port} .* in use"):
                start_server(store["results_dir"], port=port)
            found = _post(
                f"{url}/api/2.0/mlflow/runs/search",
                {
                    "experiment_ids": [store["experiment_id"]],
                    "filter": "tags.`harness.kind` = 'sequence' and attributes.status = 'FINISHED'",
                    "max_results": 100,
                },
            )
            runs = found["runs"]
            assert {r["info"]["run_id"] for r in runs} == set(store["parents"].values())
            for r in runs:
                metrics = {m["key"]: m["value"] for m in r["data"]["metrics"]}
                tags = {t["key"]: t["value"] for t in r["data"]["tags"]}
                R = fx.MATRICES[(tags["harness.method"], tags["harness.seed"])]
                assert metrics["ACC"] == pytest.approx(fx.hand_metrics(R)["ACC"])
                assert {"BWT", "FWT", "forgetting", "acc/arith", "trainable_params_effective"} <= set(metrics)
            # The per-stage history and an artifact come through the server too.
            rid = store["parents"][("lora", "0")]
            with urllib.request.urlopen(
                f"{url}/api/2.0/mlflow/metrics/get-history?run_id={rid}&metric_key=acc/arith", timeout=10
            ) as resp:
                hist = json.load(resp)["metrics"]
            assert sorted((m["step"], m["value"]) for m in hist) == [
                (s, row[0]) for s, row in enumerate(fx.MATRICES[("lora", "0")])
            ]
            with urllib.request.urlopen(f"{url}/get-artifact?path=matrix.json&run_uuid={rid}", timeout=10) as resp:
                assert json.load(resp)["tasks"] == fx.TASKS
        finally:
            code = stop_server(proc)
    assert proc.poll() is not None, "server still running"
    assert code is not None
    # Nothing of its process group is left.
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)


def test_serve_dashboard_stops_cleanly_on_ctrl_c(tmp_path):
    """The user path: `harness dashboard` prints the address, Ctrl-C (SIGINT) stops server and workers."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import sigint_at_default

    fx = _fixture_module()
    store = fx.build_fixture_store(tmp_path / "results")
    port = free_port()
    code = f"import sys\nfrom harness.tools.dashboard import serve_dashboard\nsys.exit(serve_dashboard({str(store['results_dir'])!r}, port={port}))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        preexec_fn=sigint_at_default,
    )
    try:
        deadline = time.monotonic() + 90
        line = ""
        while time.monotonic() < deadline and "MLflow dashboard" not in line:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
        assert f"MLflow dashboard: http://127.0.0.1:{port}" in line
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
            assert resp.status == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=40) == 0
        assert "dashboard stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The server (own process group) is gone too: the port is free again.
    from harness.tools.dashboard import port_is_free

    assert port_is_free("127.0.0.1", port)
    left = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if f"--port\x00{port}\x00".encode() in cmdline.read_bytes() + b"\x00":
                left.append(cmdline.parent.name)
        except OSError:
            pass
    assert not left, f"server processes left: {left}"
