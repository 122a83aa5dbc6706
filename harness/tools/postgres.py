"""The tracking server's own PostgreSQL cluster (`harness tracking-server` without --backend-uri).

Under `<results_dir>/postgres`: data in `data/` (initdb on first use, beside then renamed), TCP on 127.0.0.1 only (no
unix socket), a free port, database and user `mlflow`, password auth (generated once into `password`). PostgreSQL
refuses root: as root, initdb and pg_ctl run via `runuser -u postgres --` and the folder belongs to that user. A lock
file keeps a second server off the folder; what a SIGKILLed server left running is stopped first. The binaries are
found by harness.tools.tracking_server (find_postgres_bin).
"""

from __future__ import annotations

import fcntl
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

from harness.errors import TrackingError
from harness.tools.dashboard import free_port

PG_USER = "postgres"  # the OS account PostgreSQL runs under when the harness runs as root
DB_NAME = DB_ROLE = "mlflow"
INSTALL_HINT = "install it (`apt-get install postgresql`, or `bash .ci/install-postgres.sh`) or pass --backend-uri"


class PostgresUnavailableError(TrackingError):
    """PostgreSQL's server binaries are not installed here (or cannot be used)."""


class TrackingServerError(TrackingError):
    """The tracking server cannot start: bad input, busy port, missing driver, failed backend."""


class LocalPostgres:
    """A private PostgreSQL cluster under <root> (= <results_dir>/postgres), on 127.0.0.1:<free port>."""

    def __init__(self, root: Path, bin_dir: Path):
        self.root = root
        self.data = root / "data"
        self.log = root / "server.log"
        self.password_file = root / "password"
        self.bin = bin_dir  # initdb, pg_ctl (find_postgres_bin)
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
