"""`harness tracking-server`: a real PostgreSQL + `mlflow server` pair, several writers at once, clean stops.

The end-to-end test starts the CLI as a subprocess in its own process group, writes from 8 processes
x 4 threads (32 writers) through MlflowClient, stops it with SIGTERM, checks nothing of it is left running, and
starts it again on the same folder (the data survive). It is skipped, loudly, where PostgreSQL's
server binaries are missing: `bash .ci/install-postgres.sh` installs them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from harness.cli import main  # noqa: E402
from harness.tools import tracking_server as ts  # noqa: E402
from harness.tools.dashboard import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N_PROCS, N_THREADS, N_STEPS = 8, 4, 25  # 32 concurrent writers
HEALTH_TIMEOUT_S, STOP_TIMEOUT_S, WRITE_TIMEOUT_S = 90, 60, 600

WRITER = r"""
import json, os, sys, tempfile, threading
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
uri, eid, proc_i, n_threads, n_steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
out, errors = {}, []
def write(t):
    try:
        c = MlflowClient(tracking_uri=uri)
        run = c.create_run(eid, run_name=f"w{proc_i}-{t}", tags={"writer": f"{proc_i}-{t}"})
        rid = run.info.run_id
        c.log_param(rid, "writer", f"{proc_i}-{t}")
        for s in range(n_steps):
            c.log_metric(rid, "loss", 100 * proc_i + 10 * t + s / 1000, step=s)
        c.log_batch(rid, metrics=[Metric("acc", s / n_steps, 0, s) for s in range(n_steps)])
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "who.json")
            open(p, "w").write(json.dumps({"writer": f"{proc_i}-{t}"}))
            c.log_artifact(rid, p)
        c.set_terminated(rid)
        out[f"{proc_i}-{t}"] = rid
    except Exception as exc:
        errors.append(f"{proc_i}-{t}: {type(exc).__name__}: {exc}")
threads = [threading.Thread(target=write, args=(t,)) for t in range(n_threads)]
[th.start() for th in threads]
[th.join(120) for th in threads]
print(json.dumps({"runs": out, "errors": errors}))
"""


def _require_postgres() -> None:
    try:
        ts.find_postgres_bin()
    except ts.PostgresUnavailableError as exc:
        pytest.skip(f"!!! tracking-server end-to-end test NOT RUN: {exc}. Run `bash .ci/install-postgres.sh` first !!!")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip(
            "!!! tracking-server end-to-end test NOT RUN: psycopg is not installed (pip install 'psycopg[binary]', "
            "pinned in requirements.lock) !!!"
        )


@pytest.fixture
def results_dir():
    """Under /tmp, enterable by the `postgres` user (pytest's tmp_path is 0700 under root's folder)."""
    base = Path(tempfile.mkdtemp(prefix="harness-ts-"))
    base.chmod(0o711)
    try:
        yield base / "results"
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- processes -----------------------------------------------------------------------------------------
def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, pgid, start time) of a live process, None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    f = raw[raw.rindex(")") + 2 :].split()
    return f[0], int(f[1]), int(f[2]), int(f[19])


def _alive(ident: tuple[int, int]) -> bool:
    st = _stat(ident[0])
    return st is not None and st[3] == ident[1] and st[0] != "Z"


def _server_processes(results: Path) -> set[tuple[int, int]]:
    """(pid, start time) of the PostgreSQL postmaster and its children, and of the MLflow server's group."""
    table = {int(d.name): _stat(int(d.name)) for d in Path("/proc").iterdir() if d.name.isdigit()}
    table = {p: s for p, s in table.items() if s is not None}
    found = set()
    pidfile = results / "postgres" / "data" / "postmaster.pid"
    if pidfile.exists():
        post = int(pidfile.read_text().split()[0])
        found |= {p for p, s in table.items() if p == post or s[1] == post}
    marker = str(results / "mlartifacts").encode()
    groups = set()
    for p in table:
        try:
            if marker in Path(f"/proc/{p}/cmdline").read_bytes():
                groups.add(table[p][2])
        except OSError:
            pass
    found |= {p for p, s in table.items() if s[2] in groups}
    return {(p, table[p][3]) for p in found}


def _kill_everything(proc: subprocess.Popen, results: Path, seen: set[tuple[int, int]]) -> None:
    """Last resort (finally): the CLI's group, the MLflow server's group, PostgreSQL (SIGQUIT = immediate)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    seen = seen | _server_processes(results)
    pidfile = results / "postgres" / "data" / "postmaster.pid"
    if pidfile.exists():
        try:
            os.kill(int(pidfile.read_text().split()[0]), signal.SIGQUIT)
        except (ProcessLookupError, ValueError):
            pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(i) for i in seen):
        time.sleep(0.2)
    for pid, _ in (i for i in seen if _alive(i)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _start(results: Path, log_path: Path, extra: tuple[str, ...] | list[str] = ()) -> tuple[subprocess.Popen, int]:
    port = free_port()
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "harness.cli",
            "tracking-server",
            "--results-dir",
            str(results),
            "--port",
            str(port),
            *extra,
        ],
        cwd=str(ROOT),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    log.close()
    return proc, port


def _wait_ready(proc: subprocess.Popen, port: int, log_path: Path) -> float:
    """Seconds until /health answers and the banner is printed; fails (never hangs) past HEALTH_TIMEOUT_S."""
    t0 = time.monotonic()
    healthy = None
    while time.monotonic() - t0 < HEALTH_TIMEOUT_S:
        if proc.poll() is not None:
            pytest.fail(
                f"tracking server exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-4000:]}"
            )
        if healthy is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        healthy = time.monotonic() - t0
            except OSError:
                pass
        if healthy is not None and "Ctrl-C to stop" in log_path.read_text(errors="replace"):
            return healthy
        time.sleep(0.25)
    pytest.fail(f"no /health within {HEALTH_TIMEOUT_S} s:\n{log_path.read_text(errors='replace')[-4000:]}")


def _stop(proc: subprocess.Popen, results: Path, running: set[tuple[int, int]], log_path: Path) -> float:
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    try:
        code = proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"tracking server still running {STOP_TIMEOUT_S} s after SIGTERM")
    took = time.monotonic() - t0
    assert code == 0, log_path.read_text(errors="replace")[-3000:]
    assert "tracking server stopped" in log_path.read_text(errors="replace")
    deadline = time.monotonic() + 10  # orphaned workers are reaped by init a moment later
    while time.monotonic() < deadline and any(_alive(i) for i in running):
        time.sleep(0.2)
    assert not [i for i in running if _alive(i)], "processes of the tracking server left running"
    assert not (results / "postgres" / "data" / "postmaster.pid").exists(), "PostgreSQL was not shut down cleanly"
    return took


def _write_concurrently(uri: str, eid: str) -> tuple[dict, float]:
    t0 = time.monotonic()
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, uri, eid, str(i), str(N_THREADS), str(N_STEPS)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(N_PROCS)
    ]
    runs, errors = {}, []
    try:
        for w in writers:
            out, err = w.communicate(timeout=max(1.0, WRITE_TIMEOUT_S - (time.monotonic() - t0)))
            assert w.returncode == 0, err[-3000:]
            res = json.loads(out.strip().splitlines()[-1])
            runs.update(res["runs"])
            errors += res["errors"]
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
    assert not errors, errors
    return runs, time.monotonic() - t0


def _check_runs(uri: str, eid: str, runs: dict, artifacts: bool = True) -> None:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    found = c.search_runs([eid], max_results=100)
    assert {r.info.run_id for r in found} == set(runs.values())
    assert all(r.info.status == "FINISHED" for r in found)
    for writer, rid in runs.items():
        p, t = map(int, writer.split("-"))
        loss = sorted((m.step, m.value) for m in c.get_metric_history(rid, "loss"))
        assert loss == [(s, pytest.approx(100 * p + 10 * t + s / 1000)) for s in range(N_STEPS)]
        assert sorted(m.step for m in c.get_metric_history(rid, "acc")) == list(range(N_STEPS))
        assert c.get_run(rid).data.params == {"writer": writer}
        if not artifacts:
            continue
        with tempfile.TemporaryDirectory() as d:
            assert json.loads(Path(c.download_artifacts(rid, "who.json", d)).read_text()) == {"writer": writer}


def _check_external_backend(results: Path, eid: str, runs: dict) -> None:
    """--backend-uri: a second MLflow server over the first one's PostgreSQL starts nothing else."""
    pg_port = re.search(r"127\.0\.0\.1:(\d+), database", (results.parent / "first.log").read_text()).group(1)
    password = (results / "postgres" / "password").read_text().strip()
    other = results.parent / "other"
    proc, port = _start(
        other,
        results.parent / "other.log",
        ["--backend-uri", f"postgresql://mlflow:{password}@127.0.0.1:{pg_port}/mlflow"],
    )
    try:
        _wait_ready(proc, port, results.parent / "other.log")
        out = (results.parent / "other.log").read_text()
        assert "(not started here)" in out and password not in out
        assert not (other / "postgres").exists()
        # Same database; artifacts live where each server's --artifacts-destination is (another folder here).
        _check_runs(f"http://127.0.0.1:{port}", eid, runs, artifacts=False)
        _stop(proc, other, _server_processes(other), results.parent / "other.log")
    finally:
        _kill_everything(proc, other, set())


def test_tracking_server_postgres_concurrent_writers_and_restart(results_dir, monkeypatch):
    _require_postgres()
    # MlflowClient retries a dead server for minutes by default: fail fast instead (writers inherit this).
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    from mlflow.tracking import MlflowClient

    logs = results_dir.parent
    proc, port = _start(results_dir, logs / "first.log")
    seen: set[tuple[int, int]] = set()
    try:
        fresh_s = _wait_ready(proc, port, logs / "first.log")
        out = (logs / "first.log").read_text()
        uri = f"http://127.0.0.1:{port}"
        assert "PostgreSQL" in out and str(results_dir / "postgres" / "data") in out
        assert f"--tracking-uri {uri}" in out
        seen = _server_processes(results_dir)
        assert len(seen) >= 3, "expected PostgreSQL and MLflow processes"
        # A second server on the same folder is refused (exit 2, one message) and the first keeps going.
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "harness.cli",
                "tracking-server",
                "--results-dir",
                str(results_dir),
                "--port",
                str(free_port()),
            ],
            cwd=str(ROOT),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 2 and "another `harness tracking-server`" in second.stderr, second.stderr
        eid = MlflowClient(tracking_uri=uri).create_experiment("concurrent")
        runs, write_s = _write_concurrently(uri, eid)
        assert len(runs) == N_PROCS * N_THREADS
        _check_runs(uri, eid, runs)
        seen |= _server_processes(results_dir)
        _check_external_backend(results_dir, eid, runs)
        stop_s = _stop(proc, results_dir, seen, logs / "first.log")

        proc, port = _start(results_dir, logs / "second.log")
        existing_s = _wait_ready(proc, port, logs / "second.log")
        uri = f"http://127.0.0.1:{port}"
        seen = _server_processes(results_dir)
        exp = MlflowClient(tracking_uri=uri).get_experiment_by_name("concurrent")
        assert exp is not None and exp.experiment_id == eid, "the experiment did not survive a restart"
        _check_runs(uri, eid, runs)
        _stop(proc, results_dir, seen | _server_processes(results_dir), logs / "second.log")
        print(
            f"\n/health: fresh data folder {fresh_s:.1f} s, existing {existing_s:.1f} s; "
            f"{N_PROCS}x{N_THREADS} writers x {2 * N_STEPS} metrics + artifact: {write_s:.1f} s; stop {stop_s:.1f} s"
        )
    finally:
        _kill_everything(proc, results_dir, seen)


# --- fast: bad input is refused with exit 2 and one message, nothing started or created ------------------
@pytest.mark.parametrize(
    "uri,message",
    [
        ("sqlite:///x.db", "needs PostgreSQL"),
        ("mysql://u:p@127.0.0.1/db", "must be a PostgreSQL database"),
        ("http://127.0.0.1:5000", "is a tracking server already"),
        ("postgresql+psycopg://u:secret@/", "needs a host and a database"),
    ],
)
def test_bad_backend_uri_is_refused(tmp_path, capsys, uri, message):
    code = main(
        ["tracking-server", "--results-dir", str(tmp_path / "r"), "--port", str(free_port()), "--backend-uri", uri]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err
    assert err.count("error:") == 1 and len(err.strip().splitlines()) == 1
    assert "secret" not in err
    assert not (tmp_path / "r").exists() and not Path("x.db").exists()


def test_unreachable_backend_and_busy_port_are_refused(tmp_path, capsys):
    pytest.importorskip("psycopg")
    closed = free_port()
    code = main(
        [
            "tracking-server",
            "--results-dir",
            str(tmp_path / "r"),
            "--port",
            str(free_port()),
            "--backend-uri",
            f"postgresql://u:secret@127.0.0.1:{closed}/db",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "cannot connect to the PostgreSQL backend" in err and "secret" not in err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        assert (
            main(
                [
                    "tracking-server",
                    "--results-dir",
                    str(tmp_path / "r"),
                    "--port",
                    str(busy),
                    "--backend-uri",
                    f"postgresql+psycopg://u@127.0.0.1:{closed}/db",
                ]
            )
            == 2
        )
    assert f"port {busy} on 127.0.0.1 is in use" in capsys.readouterr().err
    assert main(["tracking-server", "--results-dir", str(tmp_path / "r"), "--port", "70000"]) == 2
    assert "not a TCP port" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_missing_postgres_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ts, "PG_ROOT", tmp_path / "no-postgresql")
    monkeypatch.setattr(ts.shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "psycopg", sys.modules.get("psycopg") or object())
    code = main(["tracking-server", "--results-dir", str(tmp_path / "r"), "--port", str(free_port())])
    err = capsys.readouterr().err
    assert code == 2 and "apt-get install postgresql" in err and "--backend-uri" in err
    assert not (tmp_path / "r").exists()


def test_a_network_address_without_auth_is_refused(tmp_path, capsys):
    code = main(
        ["tracking-server", "--results-dir", str(tmp_path / "r"), "--port", str(free_port()), "--host", "0.0.0.0"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--host 0.0.0.0" in err and "--auth" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_auth_refuses_anonymous_requests_and_a_run_with_the_runs_credentials_logs_normally(results_dir):
    _require_postgres()
    pytest.importorskip(
        "flask_wtf", reason="!!! auth test NOT RUN: Flask-WTF missing (pip install -r requirements.lock) !!!"
    )
    from harness.tracking.auth import CREDENTIALS_ENV, read_credentials

    log = results_dir.parent / "auth.log"
    proc, port = _start(results_dir, log, ["--host", "127.0.0.1", "--auth"])
    seen: set[tuple[int, int]] = set()
    try:
        _wait_ready(proc, port, log)
        seen = _server_processes(results_dir)
        uri, creds = f"http://127.0.0.1:{port}", results_dir / "auth" / "runs-credentials"
        assert {oct(p.stat().st_mode & 0o777) for p in (creds, results_dir / "auth" / "admin-password")} == {"0o600"}
        user, password = read_credentials(creds)
        assert user == "runs" and password not in log.read_text() and str(creds) in log.read_text()
        with pytest.raises(urllib.error.HTTPError) as anonymous:
            urllib.request.urlopen(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=30)
        assert anonymous.value.code == 401

        env = {**os.environ, CREDENTIALS_ENV: str(creds), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"}
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "harness.cli",
                "run",
                "--suite",
                "smoke",
                "--model",
                "tiny-llama",
                "--methods",
                "lora",
                "--tasks",
                "parity,weather",
                "--epochs",
                "1",
                "--no-progress",
                "--no-report",
                "--results-dir",
                str(results_dir.parent / "runs"),
                "--experiment",
                "authed",
                "--tracking-uri",
                uri,
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0 and "tracking is behind" not in run.stderr, run.stderr[-3000:]
        verify = subprocess.run(
            [sys.executable, "-m", "harness.cli", "verify", str(results_dir.parent / "runs" / "authed")],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert verify.returncode == 0 and "mlflow   ok" in verify.stdout, verify.stdout + verify.stderr
        seen |= _server_processes(results_dir)
        _stop(proc, results_dir, seen, log)
    finally:
        _kill_everything(proc, results_dir, seen)
