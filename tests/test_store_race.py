"""Several processes opening one fresh sqlite MLflow store at the same moment (`--jobs`, merge units, a sweep's first
sequences) all get the same experiment. Without harness.tracking.client.store_lock this fails: with the lock's
`lockf` call removed, 6 processes started together failed 4 and 5 times in two tries (alembic "Online migration
expected to match one row", "table ... already exists"), 2026-12-06."""

import os
import subprocess
import sys
import time
from pathlib import Path

RACER = """
import sys, time
from harness.tracking.client import Tracker
start = float(sys.argv[2])
while time.time() < start:
    time.sleep(0.001)
print("experiment", Tracker(sys.argv[1], "race").experiment_id)
"""


def test_processes_creating_a_fresh_store_at_once_all_get_one_experiment(tmp_path):
    uri = f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    start = time.time() + 6  # every process has imported MLflow by then, and they open the store together
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, uri, str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(6)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    failed = [err[-800:] for p, (_, err) in zip(procs, outs) if p.returncode != 0]
    assert not failed, "\n---\n".join(failed)
    ids = {line for out, _ in outs for line in out.splitlines() if line.startswith("experiment ")}
    assert len(ids) == 1, ids
    assert Path(tmp_path / "mlflow.db").is_file()
