"""A shared MLflow tracking server on PostgreSQL (`harness tracking-server`), for many writers at once.

Without --backend-uri it runs its own PostgreSQL (Debian's /usr/lib/postgresql/<v>/bin) over
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

import fcntl
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from harness.errors import TrackingError
from harness.tools.dashboard import free_port, is_loopback, port_is_free, start_server, stop_server, wait_healthy
from harness.tracking.auth import CREDENTIALS_ENV, RUNS_USER, ServerAuth, allowed_hosts
from harness.tracking.client import redact_uri

PG_ROOT = Path("/usr/lib/postgresql")
PG_USER = "postgres"  # the OS account PostgreSQL runs under when the harness runs as root
DB_NAME = DB_ROLE = "mlflow"
INSTALL_HINT = "install it (`apt-get install postgresql`, or `bash .ci/install-postgres.sh`) or pass --backend-uri"


class PostgresUnavailableError(TrackingError):
    """PostgreSQL's server binaries are not installed here (or cannot be used)."""


class TrackingServerError(TrackingError):
    """The tracking server cannot start: bad input, busy port, missing driver, failed backend."""


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


class LocalPostgres:
    """A private PostgreSQL cluster under <root> (= <results_dir>/postgres), on 127.0.0.1:<free port>."""

    def __init__(self, root: Path):
        self.root = root
        self.data = root / "data"
        self.log = root / "server.log"
        self.password_file = root / "password"
        self.bin = find_postgres_bin()
        self.as_root = os.geteuid() == 0
        self.port: int | None = None
        self.pid: int | None = None  # the postmaster's
        self._lock = None

    def _run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [str(self.bin / argv[0]), *argv[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", PG_USER, "--", *cmd]
        try:
            return subprocess.run(
                cmd,
                cwd=str(self.root),
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "LC_ALL": "C"},
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PostgresUnavailableError(f"{argv[0]} failed: {exc}") from None

    def _fail(self, what: str, proc: subprocess.CompletedProcess) -> PostgresUnavailableError:
        lines = (proc.stderr or proc.stdout or "").strip().splitlines()
        if what.startswith("pg_ctl") and self.log.is_file():
            lines += self.log.read_text(errors="replace").strip().splitlines()[-5:]
        detail = " | ".join(line.strip() for line in lines[-6:] if line.strip()) or f"exit code {proc.returncode}"
        return PostgresUnavailableError(f"{what} failed for {self.data}: {detail}")

    def claim(self) -> None:
        """Folder, lock, password, ownership; stop what a killed server left running (as the invoking user)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.root / ".lock", "a")
        except OSError as exc:
            raise TrackingServerError(f"cannot use {self.root}: {exc}") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.release()  # not ours: stop() must not touch the other server's PostgreSQL
            raise TrackingServerError(
                f"another `harness tracking-server` is using {self.root}: stop it first, or pass another --results-dir"
            ) from None
        if not self.password_file.exists():
            with os.fdopen(os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
                f.write(secrets.token_urlsafe(24) + "\n")
        if self.as_root:
            try:
                pg = pwd.getpwnam(PG_USER)
            except KeyError:
                raise PostgresUnavailableError(
                    f"there is no `{PG_USER}` user to run PostgreSQL as (root cannot): {INSTALL_HINT}"
                ) from None
            for path in [self.root, *self.root.iterdir()]:
                os.chown(path, pg.pw_uid, pg.pw_gid, follow_symlinks=False)
            probe = subprocess.run(["runuser", "-u", PG_USER, "--", "test", "-w", str(self.root)], capture_output=True)
            if probe.returncode != 0:
                raise PostgresUnavailableError(
                    f"PostgreSQL runs as the `{PG_USER}` user (it refuses root), which cannot reach {self.root}: "
                    f"choose a --results-dir that user can enter (every parent folder needs o+x), e.g. under /srv or /tmp"
                )
        self._reap_orphans()

    def _reap_orphans(self) -> None:
        """The lock is free, so whatever runs on this folder was left by a server killed with SIGKILL."""
        try:
            pid = int((self.root / "mlflow.pid").read_text())
            if str(self.root.parent / "mlartifacts").encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                print(f"stopping an MLflow server (pid {pid}) left running by an earlier tracking server", flush=True)
                _kill_group(pid)
        except (OSError, ValueError):
            pass
        if (self.data / "postmaster.pid").exists() and self._run(
            "pg_ctl", "status", "-D", str(self.data)
        ).returncode == 0:
            print(f"stopping a PostgreSQL left running on {self.data} by an earlier tracking server", flush=True)
            self.stop()

    def start(self) -> str:
        """Start (initdb first if new); return the backend URI (no password: MLflow gets PGPASSWORD)."""
        if not (
            self.data / "PG_VERSION"
        ).exists():  # initdb beside, then rename: an interrupted one leaves no half cluster
            fresh = self.root / "data.initdb"
            shutil.rmtree(fresh, ignore_errors=True)
            proc = self._run(
                "initdb",
                "-D",
                str(fresh),
                "-U",
                DB_ROLE,
                f"--pwfile={self.password_file}",
                "--auth-host=scram-sha-256",
                "--auth-local=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
            )
            if proc.returncode != 0:
                raise self._fail("initdb", proc)
            try:
                fresh.rename(self.data)
            except OSError as exc:
                raise PostgresUnavailableError(
                    f"{self.data} exists but is no PostgreSQL data folder ({exc}): remove it"
                ) from None
        self.port = free_port()
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories=''"
        proc = self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.log), "-o", opts)
        if proc.returncode != 0:
            raise self._fail("pg_ctl start", proc)
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])
        self._ensure_database()
        return f"postgresql+psycopg://{DB_ROLE}@127.0.0.1:{self.port}/{DB_NAME}"

    def password(self) -> str:
        return self.password_file.read_text().strip()

    def running(self) -> bool:
        return Path(f"/proc/{self.pid}").exists()

    def _ensure_database(self) -> None:
        import psycopg  # lazy: only a PostgreSQL backend needs it (0.05 s)

        try:
            with psycopg.connect(
                host="127.0.0.1",
                port=self.port,
                user=DB_ROLE,
                password=self.password(),
                dbname="postgres",
                autocommit=True,
                connect_timeout=10,
            ) as conn:
                if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,)).fetchone() is None:
                    conn.execute(f'CREATE DATABASE "{DB_NAME}"')
        except psycopg.Error as exc:
            raise PostgresUnavailableError(f"cannot create the `{DB_NAME}` database in {self.data}: {exc}") from None

    def stop(self) -> None:
        """pg_ctl stop -m fast (immediate if that does not finish); only while holding the folder's lock."""
        if self._lock is None or not (self.data / "postmaster.pid").exists():
            return
        if self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w", "-t", "30").returncode != 0:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30")

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _kill_group(pgid: int, timeout: float = 20.0) -> None:
    """SIGTERM a process group that is not our child (an orphaned MLflow server), SIGKILL what is left."""
    try:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            os.killpg(pgid, sig)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                os.killpg(pgid, 0)  # ProcessLookupError once the whole group is gone
                time.sleep(0.2)
    except ProcessLookupError:
        pass


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
    pg = None if backend else LocalPostgres(results_dir / "postgres")
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
