"""Dashboard: the MLflow UI over the results folder's store (`harness dashboard`).

`serve_dashboard` starts `python -m mlflow server` (the venv's MLflow, via sys.executable) on
127.0.0.1 over `sqlite:///<results_dir>/mlflow.db` (or the database URI given / in
MLFLOW_TRACKING_URI), artifacts served from `<results_dir>/mlartifacts`, prints the address and
waits; Ctrl-C stops the server and its workers. `start_server` / `wait_healthy` / `stop_server`
are the building blocks (tests use them).
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

from harness.errors import HarnessError, TrackingError
from harness.tracking.client import check_store_exists, default_tracking_uri, redact_uri

_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url(host: str, port: int) -> str:
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could bind host:port right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # As the server does: connections in TIME_WAIT from a previous server do not block it.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free on host right now (the OS picks it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _server_env() -> dict[str, str]:
    env = dict(os.environ)
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["DO_NOT_TRACK"] = "true"
    env.setdefault("PYTHONUNBUFFERED", "1")
    # MLflow 3's server otherwise starts a job runner with ~7 huey consumer processes (GenAI jobs,
    # trace rollups): not needed to browse runs, and slow to start and stop on a small machine.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return env


def server_command(
    backend_uri: str, artifacts_dir: Path, host: str, port: int, workers: int = 1, extra: tuple[str, ...] = ()
) -> list[str]:
    """The `mlflow server` command line, run by this interpreter so it is the venv's MLflow (extra: more options)."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        backend_uri,
        "--artifacts-destination",
        str(artifacts_dir),
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
        *extra,
    ]


def _backend_uri(results_dir: Path, tracking_uri: str | None) -> str:
    uri = default_tracking_uri(results_dir, tracking_uri)
    if uri.startswith(("http://", "https://", "databricks")):
        raise HarnessError(
            f"the runs are on a tracking server already ({redact_uri(uri)}): open it in a browser instead of "
            "starting a dashboard"
        )
    if not (uri.startswith(("sqlite:", "postgresql", "mysql", "mssql"))):
        raise HarnessError(
            f"the dashboard needs a database tracking URI (sqlite:///..., postgresql://...), got {redact_uri(uri)}"
        )
    check_store_exists(results_dir, uri)
    return uri


def start_server(
    results_dir: Path,
    port: int = 5000,
    host: str = "127.0.0.1",
    tracking_uri: str | None = None,
    log: IO | int | None = None,
    workers: int = 1,
    extra: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen, str]:
    """Start `mlflow server` over the results folder's store; return (process, base URL) at once.

    The server answers /health some 10-13 s later: see wait_healthy. log: where its output goes
    (a file object, subprocess.DEVNULL, or None = this process's stdout/stderr). extra: more `mlflow server`
    options; env: more environment for it (secrets go there, never on its command line).
    """
    results_dir = Path(results_dir).resolve()
    backend = _backend_uri(results_dir, tracking_uri)
    if not port_is_free(host, port):
        raise HarnessError(f"port {port} on {host} is in use: pick another with --port")
    artifacts = results_dir / "mlartifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.Popen(
            server_command(backend, artifacts, host, port, workers, extra),
            cwd=str(results_dir),
            env={**_server_env(), **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT if log is not None else None,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stop_server ends the workers too
        )
    except OSError as exc:
        raise TrackingError(f"cannot start the MLflow server: {exc}") from exc
    return proc, _url(host, port)


def wait_healthy(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    """Poll <url>/health until it answers 200; TrackingError on timeout or when proc exits first."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise TrackingError(f"the MLflow server exited with code {proc.returncode} before answering {url}/health")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(getattr(exc, "reason", exc))
        time.sleep(0.5)
    raise TrackingError(f"the MLflow server at {url} did not become healthy within {timeout:.0f} s ({last})")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_server(proc: subprocess.Popen, timeout: float = 20.0) -> int:
    """Stop the server and every process it started; return the server's exit code.

    SIGTERM to its process group, SIGKILL to what is left after timeout.
    """
    pgid = proc.pid  # start_new_session=True: the server leads its own group
    deadline = time.monotonic() + timeout
    if proc.poll() is None or _group_alive(pgid):
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    while time.monotonic() < deadline and (proc.poll() is None or _group_alive(pgid)):
        time.sleep(0.2)
    if proc.poll() is None or _group_alive(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
        for _ in range(50):
            if not _group_alive(pgid):
                break
            time.sleep(0.1)
    return proc.returncode


def _raise_interrupt(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt


def serve_dashboard(
    results_dir: Path, port: int = 5000, host: str = "127.0.0.1", tracking_uri: str | None = None
) -> int:
    """Run the MLflow UI over the results folder until Ctrl-C or SIGTERM/SIGHUP.

    Returns 0 after a clean stop, the server's exit code if it died on its own.
    """
    if not is_loopback(host):
        print(
            f"warning: binding {host}: the MLflow UI has no authentication and is reachable from the network. "
            "Requests with another Host header are refused unless mlflow's --allowed-hosts is set.",
            file=sys.stderr,
        )
    proc, url = start_server(results_dir, port=port, host=host, tracking_uri=tracking_uri)
    # The server runs in its own session (so a terminal's Ctrl-C reaches only this process, which
    # then stops it cleanly). SIGTERM/SIGHUP to this process stop it the same way.
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, _raise_interrupt)
    try:
        try:
            wait_healthy(url, timeout=120, proc=proc)
        except TrackingError:
            stop_server(proc)
            raise
        print(
            f"MLflow dashboard: {url}  (store: {redact_uri(default_tracking_uri(Path(results_dir).resolve(), tracking_uri))}); Ctrl-C to stop",
            flush=True,
        )
        while proc.poll() is None:
            try:
                proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                continue
        return proc.returncode or 0
    except KeyboardInterrupt:
        stop_server(proc)
        print("dashboard stopped", flush=True)
        return 0
    finally:
        if proc.poll() is None:
            stop_server(proc)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
