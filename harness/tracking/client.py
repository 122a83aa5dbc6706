"""MLflow: one experiment per config, a parent run per sequence, a child run per stage.

The run folder is the source of truth; MLflow mirrors it. Every logging step here is idempotent
(a resumed sequence re-logs only what is missing), and runs are always terminated FINISHED,
FAILED, or KILLED when interrupted. Metric names (the dashboard's compare view reads them):
    parent: acc/<task> (step = stage), ACC, BWT, FWT, forgetting,
            trainable_params_effective, trainable_params_lora_equivalent
    child:  train/loss (step = optimizer step), stage_wall_s, train_s, eval_s, train_tok_s,
            eval/<task>, mask/density, mask/nnz, mask/overlap_with_earlier
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

from harness import distributed
from harness.errors import HarnessError, TrackingError
from harness.locking import is_locked

log = logging.getLogger(__name__)


def default_tracking_uri(results_dir: Path, explicit: str | None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else sqlite:///<results_dir>/mlflow.db."""
    if explicit:
        return explicit
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(results_dir / 'mlflow.db').resolve()}"


def is_local_sqlite(uri: str) -> bool:
    return uri.startswith("sqlite:///")


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast (TrackingError) on a tracking server that does not answer; writes nothing."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as r:
                if r.status != 200:
                    raise TrackingError(f"tracking server {uri} answered HTTP {r.status} on /health")
        except (urllib.error.URLError, OSError) as exc:
            raise TrackingError(
                f"tracking server {uri} is unreachable ({getattr(exc, 'reason', exc)}). Start it "
                "(`make dashboard` serves the local store), fix --tracking-uri / MLFLOW_TRACKING_URI, "
                "or omit them to use the embedded sqlite store under the results folder."
            ) from None
    elif is_local_sqlite(uri):
        db = Path(uri[len("sqlite:///") :])
        parent = db.parent if db.parent != Path("") else Path(".")
        probe = parent
        while not probe.exists():
            probe = probe.parent
        if not os.access(probe, os.W_OK):
            raise TrackingError(
                f"cannot write the MLflow store {db}: {probe} is not writable. Choose another --results-dir."
            )
    elif uri.startswith("file:"):
        pass
    elif "://" not in uri:
        raise TrackingError(
            f"tracking URI {uri!r} is not a URI: use sqlite:///ABS/path.db, http://host:port, or omit it"
        )


def redact_uri(uri: str) -> str:
    """Drop user:password from a URI before it is written into a report."""
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError:
        return uri
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return urllib.parse.urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))
    return uri


def local_store_path(uri: str) -> Path | None:
    """The file behind a sqlite URI (None for servers and other databases)."""
    if uri.startswith("sqlite:///"):
        rest = uri[len("sqlite:///") :].split("?", 1)[0]
        if rest in ("", ":memory:"):
            return None
        return Path(rest)  # sqlite:////abs/x.db -> /abs/x.db; sqlite:///rel/x.db -> rel/x.db
    return None


def check_store_exists(results_dir: Path, uri: str) -> None:
    """A missing sqlite file means nothing was run yet (and opening it would create an empty store)."""
    path = local_store_path(uri)
    if path is not None and not path.exists():
        raise HarnessError(f"no runs yet under {Path(results_dir)}: run `make run-sequence` first (no {path})")


# MLflow's client retries a dead server 7 times with exponential backoff and waits 120 s per request: minutes of
# silence per call. The run folder is the source of truth and the mirror catches up later, so fail within seconds.
BOUNDED_RETRIES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}


def bound_client_retries() -> None:
    """Bound the MLflow client's retries for a tracking server (values the user exported win)."""
    for key, value in BOUNDED_RETRIES.items():
        os.environ.setdefault(key, value)
    # One line per stage: no "🏃 View run" / "🧪 View experiment" from MLflow whenever a run ends (the scheduler
    # prints the parent run's address once).
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """For a local sqlite store: an exclusive POSIX lock on `<store>.lock` while held. Several processes opening a
    fresh store at once (`--jobs`, merge units, tests) would otherwise race on creating its schema and experiment."""
    path = local_store_path(uri)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)  # released when this process dies, however it dies
        yield
    finally:
        os.close(fd)


class Tracker:
    """Thin wrapper over MlflowClient with the project's run layout.

    optional=True (--tracking-optional): a store that cannot be opened leaves experiment_id None (open() later)
    instead of raising."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        artifact_root: Path | None = None,
        optional: bool = False,
        deferred: bool = False,
    ):
        from mlflow.tracking import (
            MlflowClient,  # lazy: MLflow loads in ~1 s; commands that only read folders need none of it
        )

        # The client only: mlflow.set_tracking_uri would export MLFLOW_TRACKING_URI to this process
        # (and its children), silently redirecting the next experiment run in the same process.
        self.uri, self.experiment, self.artifact_root = uri, experiment, artifact_root
        self.experiment_id: str | None = None
        self.open_error: str | None = None
        self.deferred = deferred  # a `--jobs` process: it never opens the store; its driver mirrors the run folder
        if deferred or not distributed.is_main():
            # Under a launcher rank 0 alone logs (the scheduler gates every call); the other ranks must not even open
            # the store: several processes creating a fresh sqlite store at once race on its schema.
            self.client = None
            return
        if uri.startswith(("http://", "https://")):
            bound_client_retries()
        try:
            with store_lock(uri):  # one process at a time creates a fresh store's schema and the experiment
                self.client = MlflowClient(tracking_uri=uri)
                self.open()
        except TrackingError as exc:
            if not optional:
                raise
            self.open_error = str(exc)

    def open(self) -> None:
        """Find (or create) the experiment; TrackingError when the store cannot be opened."""
        uri, experiment, artifact_root = self.uri, self.experiment, self.artifact_root
        try:
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                kwargs = {}
                if artifact_root is not None and not uri.startswith(("http://", "https://")):
                    kwargs["artifact_location"] = (artifact_root / experiment).resolve().as_uri()
                self.experiment_id = self.client.create_experiment(experiment, **kwargs)
            else:
                if exp.lifecycle_stage == "deleted":
                    self.client.restore_experiment(exp.experiment_id)
                self.experiment_id = exp.experiment_id
        except Exception as exc:  # MLflow raises many types for a bad store
            raise TrackingError(f"cannot open MLflow experiment {experiment!r} at {uri}: {exc}") from None

    # --- runs ------------------------------------------------------------------------------
    def create_parent(self, name: str, tags: dict[str, str], params: dict[str, Any], kind: str = "sequence") -> str:
        run = self.client.create_run(self.experiment_id, run_name=name, tags={**tags, "harness.kind": kind})
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def reopen(self, run_id: str, where: Path) -> None:
        """Mark a parent RUNNING again when a sequence resumes (same run, never a silent new one)."""
        try:
            run = self.client.get_run(run_id)
            if run.info.experiment_id != self.experiment_id or run.info.lifecycle_stage == "deleted":
                raise LookupError(
                    f"it is {'deleted' if run.info.lifecycle_stage == 'deleted' else 'in another experiment'}"
                )
            self.client.update_run(run_id, status="RUNNING")
            self.client.set_tag(run_id, "harness.interrupted", "false")
        except Exception as exc:  # MLflow raises many types for a missing run or a broken store
            raise TrackingError(
                f"{where}: names MLflow parent run {run_id}, which cannot be reopened in {redact_uri(self.uri)} ({exc}). "
                "Point --tracking-uri at the store this sequence was logged to; or, to log it as a new parent run, "
                f"delete {where} (the finished stages are kept and re-logged)."
            ) from None

    def create_stage(self, parent_id: str, stage: int, task: str, tags: dict[str, str]) -> str:
        return self.create_child(
            parent_id,
            f"stage-{stage}-{task}",
            {**tags, "harness.kind": "stage", "harness.stage": str(stage), "harness.task": task},
        )

    def create_child(self, parent_id: str, name: str, tags: dict[str, str]) -> str:
        return self.client.create_run(
            self.experiment_id, run_name=name, tags={**tags, "mlflow.parentRunId": parent_id}
        ).info.run_id

    def stage_children(self, parent_id: str) -> list:
        return self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=1000
        )

    def drop_unfinished_children(self, parent_id: str, finished_stage_runs: set[str]) -> int:
        """Delete child runs of stages that never finished (killed mid-stage), so no stage counts twice."""
        n = 0
        for r in self.stage_children(parent_id):
            if r.info.run_id not in finished_stage_runs:
                self.client.set_terminated(r.info.run_id, status="KILLED")
                self.client.delete_run(r.info.run_id)
                n += 1
        return n

    def delete(self, run_id: str) -> None:
        """End a run KILLED and delete it (a duplicate, or a piece of work a kill interrupted)."""
        self.client.set_terminated(run_id, status="KILLED")
        self.client.delete_run(run_id)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def mark_killed(self, run_id: str) -> None:
        mark_killed(self.client, run_id)

    def status(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.status

    # --- logging ---------------------------------------------------------------------------
    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param  # lazy: MLflow loads in ~1 s; commands that only read folders need none of it

        existing = self.client.get_run(run_id).data.params
        items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float | None], step: int = 0) -> None:
        from mlflow.entities import (
            Metric,  # lazy: MLflow loads in ~1 s; commands that only read folders need none of it
        )

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i : i + 500])

    def log_series(self, run_id: str, key: str, values: list[float]) -> None:
        from mlflow.entities import (
            Metric,  # lazy: MLflow loads in ~1 s; commands that only read folders need none of it
        )

        ts = int(time.time() * 1000)
        items = [Metric(key, float(v), ts, i + 1) for i, v in enumerate(values)]
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i : i + 500])

    def mirror_metrics(self, run_id: str, metrics: dict[str, float | None], step: int = 0) -> None:
        """Log only the keys the run does not have yet (re-mirroring a stage after a kill adds no duplicates)."""
        have = set(self.client.get_run(run_id).data.metrics)
        self.log_metrics(run_id, {k: v for k, v in metrics.items() if k not in have}, step=step)

    def log_series_once(self, run_id: str, key: str, values: list[float]) -> None:
        if not self.client.get_metric_history(run_id, key):
            self.log_series(run_id, key, values)

    def log_metric_once(self, run_id: str, key: str, value: float, step: int) -> None:
        """Log a point unless one already exists at this step (idempotent re-logging on resume)."""
        hist = self.client.get_metric_history(run_id, key)
        if any(m.step == step for m in hist):
            return
        self.log_metrics(run_id, {key: value}, step=step)

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_json(self, run_id: str, obj: Any, name: str) -> None:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / name
            p.write_text(json.dumps(obj, indent=2))
            self.client.log_artifact(run_id, str(p))


def open_tracker(cfg, uri: str, *, deferred: bool = False) -> Tracker:
    """The MLflow tracker of experiment config `cfg` (an ExperimentConfig): creates the experiment on first use, afterwards
    only looks it up. deferred: a tracker that never opens the store (a `--jobs` process; its driver mirrors the folder)."""
    return Tracker(
        uri,
        cfg.experiment_name,
        artifact_root=Path(cfg.results_dir) / "mlartifacts",
        optional=cfg.tracking_optional,
        deferred=deferred,
    )


def mark_killed(client, run_id: str) -> None:
    """An interrupted run: KILLED and tagged harness.interrupted (the report lists it with its resume command)."""
    client.set_tag(run_id, "harness.interrupted", "true")
    client.set_terminated(run_id, status="KILLED")


def mark_interrupted(uri: str, experiment: str | None) -> int:
    """Mark KILLED (tag harness.interrupted) every RUNNING sequence whose folder's lock nobody holds.

    A process killed with SIGKILL cannot mark its own runs; its lock died with it, so a RUNNING
    parent with a free lock is an interrupted sequence, which `harness resume` continues. Runs whose
    folder is not visible from here (another machine's disk) are left alone. Returns how many."""

    path = local_store_path(uri)
    if path is not None and not path.exists():
        return 0
    from mlflow.tracking import (
        MlflowClient,  # lazy: MLflow loads in ~1 s; commands that only read folders need none of it
    )

    client = MlflowClient(tracking_uri=uri)
    try:
        exps = [client.get_experiment_by_name(experiment)] if experiment else client.search_experiments()
        exp_ids = [e.experiment_id for e in exps if e is not None]
        if not exp_ids:
            return 0
        running = client.search_runs(
            exp_ids, "tags.`harness.kind` = 'sequence' and attributes.status = 'RUNNING'", max_results=1000
        )
    except Exception as exc:  # noqa: BLE001 - the report/dashboard itself says what is wrong with the store
        log.info("cannot look for interrupted runs in %s: %s", redact_uri(uri), exc)
        return 0
    n = 0
    for run in running:
        run_dir = run.data.tags.get("harness.run_dir")
        if not run_dir or is_locked(Path(run_dir)) is not False:
            continue
        children = client.search_runs(
            [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}' and attributes.status = 'RUNNING'"
        )
        for r in [*children, run]:
            mark_killed(client, r.info.run_id)
        n += 1
    return n
