"""`--launcher slurm` on a real single-node Slurm cluster (slurmctld + slurmd + munge on 127.0.0.1) through submitit.

`.ci/install-slurm.sh` installs Debian's slurm-wlm and starts the daemons; without a cluster that
answers here the test is skipped, saying why. A two-sequence smoke sweep runs as one job array, logs
to a PostgreSQL-backed MLflow server, and must give the matrices of a local run. Every wait is bounded.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import numpy as np
import pytest
import test_launcher_ray
from test_crash_safety import wait_for
from test_launcher_ray import SMALL, check_folder, check_store, cli, start_cli
from test_sequence import read_matrix

TWO = ["--methods", "lori-s,lora", "--seeds", "0"]
SEQUENCES = ["lori-s/seed-0", "lora/seed-0"]
tracking_server = test_launcher_ray.tracking_server  # the same module-scoped fixture: a PostgreSQL-backed MLflow server


def _require_slurm() -> None:
    why = None
    if shutil.which("sbatch") is None or shutil.which("squeue") is None:
        why = "no sbatch/squeue on PATH"
    else:
        try:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=20)
            states = out.stdout.split()
            if out.returncode != 0:
                why = f"sinfo failed: {(out.stderr or out.stdout).strip()[:300]}"
            elif not any(s.rstrip("*~#") in ("idle", "mixed", "allocated") for s in states):
                why = f"no usable node (states: {' '.join(states) or 'none'})"
        except (OSError, subprocess.TimeoutExpired) as exc:
            why = f"sinfo did not answer: {exc}"
    if why:
        pytest.skip(f"!!! Slurm launcher test NOT RUN: {why}. Run `bash .ci/install-slurm.sh` (as root) first !!!")


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    """The two sequences under the default launcher (skipped first where there is no cluster to compare with)."""
    _require_slurm()
    local = tmp_path_factory.mktemp("local")
    out = cli("run", *SMALL, *TWO, "--no-progress", "--results-dir", str(local), "--experiment", "ref")
    assert out.returncode == 0, out.stderr[-3000:]
    return {s: read_matrix(local / "ref" / s / "matrix.csv")[1] for s in SEQUENCES}


@pytest.mark.slow
def test_two_sequences_as_a_slurm_job_array_match_a_local_run(local_reference, tracking_server, tmp_path):
    results = tmp_path / "r"
    t0 = time.monotonic()
    out = cli(
        "run",
        *SMALL,
        *TWO,
        "--no-progress",
        "--results-dir",
        str(results),
        "--experiment",
        "arr",
        "--launcher",
        "slurm",
        "--job-cpus",
        "1",
        "--slurm-time",
        "10",
        "--tracking-uri",
        tracking_server,
    )
    wall = time.monotonic() - t0
    assert out.returncode == 0, out.stderr[-4000:]
    exp = results / "arr"
    dirs = {s: exp / s for s in SEQUENCES}
    for s, d in dirs.items():
        check_folder(d, ["parity", "weather"])
        np.testing.assert_array_equal(read_matrix(d / "matrix.csv")[1], local_reference[s], err_msg=s)
        assert f"[{s}/order-0] stage 2/2 weather" in out.stderr and f"[{s}/order-0] done: ACC" in out.stderr
    check_store(tracking_server, "arr", dirs, n_stages=2)
    # One array of two tasks; each task's output sits under results/<experiment>/slurm/.
    logs = sorted(p.name for p in (exp / "slurm").rglob("*_log.err"))
    assert len(logs) == 2 and len({name.split("_")[0] for name in logs}) == 1, logs
    job_lines = "".join(p.read_text() for p in (exp / "slurm").rglob("*_log.err"))
    assert all(f"=== {s}/order-0: attempt 1" in job_lines for s in SEQUENCES)
    assert json.loads((dirs["lora/seed-0"] / "summary.json").read_text())["complete"]
    print(f"\nslurm launcher (single node, 2 CPUs), 2 sequences: {wall:.1f} s wall")


@pytest.mark.slow
def test_a_slurm_job_killed_mid_stage_is_resubmitted_and_resumes(local_reference, tracking_server, tmp_path):
    import os
    import signal

    results = tmp_path / "r"
    seq = results / "die" / "lora" / "seed-0"
    log = tmp_path / "driver.log"
    args = [*SMALL, "--methods", "lora", "--seeds", "0", "--no-progress", "--experiment", "die"]
    driver = start_cli(
        "run",
        *args,
        "--results-dir",
        str(results),
        "--launcher",
        "slurm",
        "--slurm-time",
        "10",
        "--tracking-uri",
        tracking_server,
        env_extra={"HARNESS_FAULT_PAUSE": "mid-train:2"},
        log=log,
    )
    try:
        wait_for(seq / ".paused-mid-train", driver, timeout=300)
        os.kill(
            int((seq / ".paused-mid-train").read_text()), signal.SIGKILL
        )  # the job's process dies; Slurm says FAILED
        assert driver.wait(timeout=300) == 0, log.read_text()[-4000:]
    finally:
        if driver.poll() is None:
            driver.kill()
    text = log.read_text()
    assert "job died (Slurm job" in text and "retry 1/2" in text, text[-3000:]
    check_folder(seq, ["parity", "weather"])
    np.testing.assert_array_equal(read_matrix(seq / "matrix.csv")[1], local_reference["lora/seed-0"])
    assert json.loads(next((seq / "stages").glob("2-*/train.json")).read_text())["resumed_from_step"] == 2
    check_store(tracking_server, "die", {"lora/seed-0": seq}, n_stages=2)
