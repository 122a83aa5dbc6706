"""A shared MLflow tracking server on PostgreSQL (`harness tracking-server`), for many writers at once.

Without --backend-uri it runs its own PostgreSQL (harness/tools/postgres.py; Debian's /usr/lib/postgresql/<v>/bin) over
`<results_dir>/postgres/data`: initdb on first use, TCP on 127.0.0.1 only (no unix socket), a free
port, database and user `mlflow`, password auth (generated once into `<results_dir>/postgres/password`,
given to MLflow as PGPASSWORD, never on a command line). PostgreSQL refuses root: as root, initdb and
pg_ctl run via `runuser -u postgres --` and `<results_dir>/postgres` belongs to that user. A lock file
keeps a second server off the folder; what a SIGKILLed server left running is stopped first.
`mlflow server` (harness.tools.dashboard.start_server) then serves <host>:<port> (127.0.0.1 by default), artifacts
proxied from `<results_dir>/mlartifacts`. Any other address needs --auth: MLflow's basic-auth app, with the
credentials of harness/tracking/auth.py; it is refused without. Ctrl-C / SIGTERM / SIGHUP stop MLflow, then
PostgreSQL (pg_ctl -m fast).
"""

from __future__ import annotations

import importlib.util
import shutil
import signal
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from harness.tools.dashboard import is_loopback, port_is_free, start_server, stop_server, wait_healthy
from harness.tools.postgres import DB_NAME, INSTALL_HINT, LocalPostgres, PostgresUnavailableError, TrackingServerError
from harness.tracking.auth import CREDENTIALS_ENV, RUNS_USER, ServerAuth, allowed_hosts
from harness.tracking.client import redact_uri

PG_ROOT = Path("/usr/lib/postgresql")


def find_postgres_bin() -> Path:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb and pg_ctl (else those on PATH)."""
    versions = sorted(
        (p for p in PG_ROOT.glob("*/bin") if (p / "initdb").is_file() and (p / "pg_ctl").is_file()),
        key=lambda p: [int(x) if x.isdigit() else 0 for x in p.parent.name.split(".")],
    )
    if versions:
        return versions[-1]
    on_path = shutil.which("pg_ctl")
    if on_path and (Path(on_path).parent / "initdb").is_file():
        return Path(on_path).parent
    raise PostgresUnavailableError(
        f"PostgreSQL is not installed (no initdb/pg_ctl under {PG_ROOT}/*/bin): {INSTALL_HINT}"
    )


def require_psycopg() -> None:
    try:
        import psycopg  # noqa: F401  # lazy: only a PostgreSQL backend needs it (0.05 s)
    except ImportError as exc:
        raise TrackingServerError(
            f"the PostgreSQL driver is missing ({exc}): pip install 'psycopg[binary]' in this "
            "environment (`make setup` installs the pinned version)"
        ) from None


def normalize_backend_uri(uri: str) -> str:
    """postgresql+psycopg://... as given; postgres:// and postgresql:// get the psycopg 3 driver (SQLAlchemy
    would pick psycopg2). Anything else is refused: a store for many writers needs PostgreSQL."""
    from sqlalchemy.engine import make_url  # lazy: SQLAlchemy loads in ~0.1 s; only a PostgreSQL backend needs it
    from sqlalchemy.exc import ArgumentError  # lazy: SQLAlchemy loads in ~0.1 s; only a PostgreSQL backend needs it

    shown = redact_uri(uri)
    if uri.startswith(("http://", "https://")):
        raise TrackingServerError(
            f"--backend-uri {shown} is a tracking server already: pass it to `harness run --tracking-uri`"
        )
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if scheme not in ("postgres", "postgresql", "postgresql+psycopg"):
        raise TrackingServerError(
            f"--backend-uri must be a PostgreSQL database (postgresql+psycopg://USER:PW@HOST:PORT/DB), "
            f"got {shown}: a tracking server for several writers needs PostgreSQL (sqlite locks "
            "under concurrent writers; for one process `harness run` uses sqlite itself)"
        )
    uri = "postgresql+psycopg://" + uri.split("://", 1)[1]
    try:
        url = make_url(uri)
    except ArgumentError as exc:
        raise TrackingServerError(f"--backend-uri {shown} is not a valid database URI: {exc}") from None
    if not url.host or not url.database:
        raise TrackingServerError(
            f"--backend-uri {shown} needs a host and a database: postgresql+psycopg://USER:PW@HOST:PORT/DB"
        )
    return uri


def check_backend(uri: str, timeout_s: int = 10) -> None:
    """Connect once with psycopg so a wrong host/password/database fails here with one clear message."""
    import psycopg  # lazy: only a PostgreSQL backend needs it (0.05 s)
    from sqlalchemy.engine import make_url  # lazy: SQLAlchemy loads in ~0.1 s; only a PostgreSQL backend needs it

    conninfo = make_url(uri).set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        with psycopg.connect(conninfo, connect_timeout=timeout_s) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrackingServerError(f"cannot connect to the PostgreSQL backend {redact_uri(uri)}: {first}") from None


def _check_port(port: int, host: str) -> None:
    if not port_is_free(host, port):
        raise TrackingServerError(f"port {port} on {host} is in use: pick another with --port")


def _raise_interrupt(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt


@contextmanager
def _stop_signals():
    """SIGTERM/SIGHUP end the server like Ctrl-C (KeyboardInterrupt), so every cleanup runs."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, _raise_interrupt)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve(
    results_dir: Path, port: int, backend: str, pg: LocalPostgres | None, host: str, auth: ServerAuth | None
) -> int:
    env = {"PGPASSWORD": pg.password()} if pg is not None else {}  # secrets reach MLflow by its environment only
    extra: tuple[str, ...] = ()
    if auth is not None:
        env.update(auth.prepare())
        extra += ("--app-name", "basic-auth")
    if not is_loopback(host):
        extra += ("--allowed-hosts", allowed_hosts(host))
    proc, url = start_server(results_dir, port=port, host=host, tracking_uri=backend, workers=2, extra=extra, env=env)
    pid_file = pg.root / "mlflow.pid" if pg else None
    if pid_file:
        pid_file.write_text(f"{proc.pid}\n")  # lets the next start stop it if this process is SIGKILLed
    try:
        wait_healthy(url, timeout=180, proc=proc)
        if auth is not None:
            auth.ensure_runs_user(url)
        shown = url if is_loopback(host) else f"http://{socket.getfqdn() if host in ('0.0.0.0', '::') else host}:{port}"
        print(f"MLflow tracking server: {shown}  (artifacts: {results_dir / 'mlartifacts'})")
        print(
            f"  tracking URI: {shown}   ->  harness run --tracking-uri {shown} ...  (or export MLFLOW_TRACKING_URI={shown})"
        )
        if auth is not None:
            print(
                f"  authentication on: clients log in as `{RUNS_USER}`: export {CREDENTIALS_ENV}={auth.runs_file} (mode 600; or "
                f"MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD); the admin's password is in {auth.admin_file}"
            )
        print("  Ctrl-C to stop", flush=True)
        while proc.poll() is None:
            if pg is not None and not pg.running():
                print(f"error: PostgreSQL (pid {pg.pid}) died; see {pg.log}", file=sys.stderr, flush=True)
                return 1
            try:
                proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                continue
        print(f"error: the MLflow server exited on its own (code {proc.returncode})", file=sys.stderr, flush=True)
        return proc.returncode or 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop_server(proc)
        if pid_file:
            pid_file.unlink(missing_ok=True)


def serve_tracking_server(
    results_dir: Path, port: int = 5001, backend_uri: str | None = None, host: str = "127.0.0.1", auth: bool = False
) -> int:
    """Run PostgreSQL (unless backend_uri) and an MLflow tracking server on host:port until Ctrl-C or SIGTERM; stop both
    on the way out. 0 after a clean stop, non-zero when MLflow died on its own. A host other than loopback needs auth."""
    results_dir = Path(results_dir).resolve()
    if not is_loopback(host) and not auth:
        raise TrackingServerError(
            f"--host {host}: the server would take writes from anyone who can reach that address. Add --auth "
            "(MLflow's basic-auth: an admin password generated once, a `runs` user for the jobs), or "
            "bind --host 127.0.0.1"
        )
    backend = normalize_backend_uri(backend_uri) if backend_uri else None
    if not 1 <= port <= 65535:
        raise TrackingServerError(f"--port {port} is not a TCP port (1-65535)")
    require_psycopg()
    if auth and importlib.util.find_spec("flask_wtf") is None:
        raise TrackingServerError(
            "--auth: MLflow's basic-auth app needs Flask-WTF, missing here: pip install 'mlflow[auth]' "
            "(`make setup` installs the pinned version)"
        )
    pg = None if backend else LocalPostgres(results_dir / "postgres", find_postgres_bin())
    with _stop_signals():
        try:
            if pg is None:
                _check_port(port, host)
                check_backend(backend)
                print(f"backend: PostgreSQL at {redact_uri(backend)} (not started here)", flush=True)
            else:
                pg.claim()  # before the port check: an orphaned MLflow server of this folder may hold the port
                _check_port(port, host)
                backend = pg.start()
                print(
                    f"backend: PostgreSQL ({pg.bin}) started here: data in {pg.data}, "
                    f"127.0.0.1:{pg.port}, database/user {DB_NAME}, password in {pg.password_file}",
                    flush=True,
                )
            code = _serve(results_dir, port, backend, pg, host, ServerAuth(results_dir) if auth else None)
        except KeyboardInterrupt:
            code = 0
        finally:
            if pg is not None:
                pg.stop()
                pg.release()
    print("tracking server stopped", flush=True)
    return code
