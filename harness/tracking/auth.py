"""Authentication for a shared tracking server (`harness tracking-server --auth`): MLflow's basic-auth app.

`<results_dir>/auth/` (mode 700) holds what is made once and kept:
    admin-password     the admin's password (mode 600), generated on first use; MLflow's auth app creates its
                       admin from it (given to the server in its environment, never on a command line)
    runs-credentials   the `runs` user's name and password (mode 600), in MLflow's own credentials-file format
    flask-secret-key   the key MLflow's web app signs its CSRF tokens with (mode 600; one key, so every worker agrees)
    basic_auth.ini     MLflow's auth config: user store users.db beside it, default permission READ (no secret)
The server creates the `runs` user (the identity every job logs as) once it answers. Clients authenticate with
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, or HARNESS_TRACKING_CREDENTIALS=<path to runs-credentials>,
which `harness` reads at start (a shared folder, or a copy with mode 600 on each node), or MLflow's own
~/.mlflow/credentials (the same format).
"""

from __future__ import annotations

import base64
import configparser
import json
import os
import secrets
import socket
import urllib.error
import urllib.request
from pathlib import Path

from harness.errors import HarnessError, TrackingError

ADMIN_USER, RUNS_USER = "admin", "runs"
CREDENTIALS_ENV = "HARNESS_TRACKING_CREDENTIALS"
_SECTION, _USER_KEY, _PASSWORD_KEY = "mlflow", "mlflow_tracking_username", "mlflow_tracking_password"


def _private_file(path: Path, make) -> str:
    """The file's text; created with mode 600 by make() when missing (never rewritten, so a password stays the same)."""
    if not path.exists():
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(make())
    os.chmod(path, 0o600)
    return path.read_text()


def credentials_text(username: str, password: str) -> str:
    return f"[{_SECTION}]\n{_USER_KEY} = {username}\n{_PASSWORD_KEY} = {password}\n"


def read_credentials(path: Path) -> tuple[str, str]:
    """(username, password) from a credentials file; HarnessError saying what is wrong with it."""
    cp = configparser.ConfigParser(interpolation=None)
    try:
        cp.read_string(Path(path).read_text())
        return cp[_SECTION][_USER_KEY].strip(), cp[_SECTION][_PASSWORD_KEY].strip()
    except (OSError, KeyError, configparser.Error) as exc:
        raise HarnessError(
            f"{CREDENTIALS_ENV}={path}: cannot read tracking credentials from it ({exc}). It must be the "
            f"`runs-credentials` file `harness tracking-server --auth` wrote ([{_SECTION}] with "
            f"{_USER_KEY} and {_PASSWORD_KEY})."
        ) from None


def load_client_credentials() -> None:
    """Where HARNESS_TRACKING_CREDENTIALS names a credentials file, give its user to MLflow's client (the
    MLFLOW_TRACKING_USERNAME / PASSWORD a user exported win)."""
    path = os.environ.get(CREDENTIALS_ENV)
    if not path:
        return
    username, password = read_credentials(Path(path))
    os.environ.setdefault("MLFLOW_TRACKING_USERNAME", username)
    os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", password)


class ServerAuth:
    """The auth folder of one results folder: files for the server, and the runs user once it answers."""

    def __init__(self, results_dir: Path):
        self.root = Path(results_dir) / "auth"
        self.ini, self.admin_file, self.runs_file = (
            self.root / "basic_auth.ini",
            self.root / "admin-password",
            self.root / "runs-credentials",
        )

    def prepare(self) -> dict[str, str]:
        """Make the files (once); returns the environment the server needs."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            os.chmod(self.root, 0o700)
            admin = _private_file(self.admin_file, lambda: secrets.token_urlsafe(24) + "\n").strip()
            _private_file(self.runs_file, lambda: credentials_text(RUNS_USER, secrets.token_urlsafe(24)))
            key = _private_file(self.root / "flask-secret-key", lambda: secrets.token_urlsafe(32) + "\n").strip()
            self.ini.write_text(
                f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{(self.root / 'users.db').resolve()}\n"
                f"admin_username = {ADMIN_USER}\n"
                "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            )
        except OSError as exc:
            raise TrackingError(f"cannot prepare the tracking server's credentials in {self.root}: {exc}") from None
        return {
            "MLFLOW_AUTH_CONFIG_PATH": str(self.ini),
            "MLFLOW_AUTH_ADMIN_PASSWORD": admin,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": key,
        }

    def ensure_runs_user(self, url: str) -> None:
        """Create the runs user as the admin (or set its password to the file's when it exists already)."""
        username, password = read_credentials(self.runs_file)
        body = {"username": username, "password": password}
        try:
            self._admin_request(url, "POST", "/api/2.0/mlflow/users/create", body)
        except urllib.error.HTTPError as exc:
            if "RESOURCE_ALREADY_EXISTS" not in exc.read().decode(errors="replace"):
                raise TrackingError(
                    f"the tracking server at {url} refused to create the `{username}` user (HTTP {exc.code})"
                ) from None
            self._admin_request(url, "PATCH", "/api/2.0/mlflow/users/update-password", body)

    def _admin_request(self, url: str, method: str, path: str, body: dict) -> None:
        token = base64.b64encode(f"{ADMIN_USER}:{self.admin_file.read_text().strip()}".encode()).decode()
        req = urllib.request.Request(
            url.rstrip("/") + path,
            data=json.dumps(body).encode(),
            method=method,
            headers={"Content-Type": "application/json", "Authorization": f"Basic {token}"},
        )
        with urllib.request.urlopen(req, timeout=30):
            pass


def allowed_hosts(host: str) -> str:
    """--allowed-hosts for a server bound to a network address: the names clients use for this machine, plus
    MLflow's own defaults (localhost, private networks), each with any port."""
    names = {host, socket.gethostname(), socket.getfqdn(), "localhost", "127.0.0.1"} - {"0.0.0.0", "::", ""}
    patterns = sorted(names) + [f"{n}:*" for n in sorted(names)] + ["10.*", "172.*", "192.168.*"]
    return ",".join(patterns)
