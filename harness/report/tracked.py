"""What the report reads from MLflow: only what lives there and not in the run folders.

That is each parent run's status and start time (the page's run dates), a merge run's git commit (merge
folders do not record it), and the client the report's figures are logged with. Everything else comes
from the folders (harness/report/folders.py). The store is optional: without one (nothing mirrored yet,
a server away) the report is written all the same, and the page says what is missing.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from harness.errors import HarnessError
from harness.tracking.client import local_store_path, redact_uri

PARENT_FILTERS = ("tags.`harness.kind` = 'sequence'", "tags.`harness.kind` = 'merge'")


@dataclass
class Tracked:
    """The experiment's parent runs in MLflow by run id; client None (and a problem) when the store was not read."""

    client: Any
    uri: str
    runs: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None

    def status(self, run_id: str | None) -> str | None:
        run = self.runs.get(run_id or "")
        return run.info.status if run is not None else None

    def start_ms(self, run_id: str | None) -> int | None:
        run = self.runs.get(run_id or "")
        return run.info.start_time if run is not None else None

    def tag(self, run_id: str | None, key: str) -> str | None:
        run = self.runs.get(run_id or "")
        return run.data.tags.get(key) if run is not None else None


@contextlib.contextmanager
def quiet_mlflow():
    """No tqdm progress bars from artifact uploads (write_report prints nothing)."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _search_all_runs(client, experiment_id: str, filter_string: str) -> list:
    """Every active run matching filter_string, following the page tokens."""
    runs: list = []
    token = None
    while True:
        page = client.search_runs(
            experiment_ids=[experiment_id],
            filter_string=filter_string,
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def read_tracked(experiment: str, uri: str) -> Tracked:
    """The experiment's sequence and merge parent runs; a Tracked with a problem (never an error) when unreadable."""
    path = local_store_path(uri)
    if path is not None and not path.exists():  # opening it would create an empty store
        return Tracked(None, uri, problem=f"no MLflow store at {path}")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    try:
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None or exp.lifecycle_stage != "active":
            return Tracked(client, uri, problem=f"no experiment {experiment!r} in {redact_uri(uri)}")
        runs = [r for f in PARENT_FILTERS for r in _search_all_runs(client, exp.experiment_id, f)]
    except (MlflowException, OSError, HarnessError) as exc:
        return Tracked(None, uri, problem=f"cannot read {redact_uri(uri)} ({type(exc).__name__}: {exc})")
    return Tracked(client, uri, {r.info.run_id: r for r in runs})
