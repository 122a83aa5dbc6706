"""The driver of a Ray or Slurm sweep: the `harness run` process, which plans, dispatches and gathers.

Order matters, so bad input costs nothing: the whole preflight of a local run (planning.validate:
suite, model shapes, capacity, tracking server; and no sequence folder held by another process)
runs first; then the cluster is reached; only then are the experiment's config.yaml and its MLflow
experiment written, once, here (several jobs creating one experiment at the same moment race in
MLflow). Each job runs one sequence through the same run_experiment(only=<folder>) as
`harness resume`, so a job that dies is retried and continues from its last committed stage or
mid-stage checkpoint. A backend (ray_launcher.RayBackend, slurm_launcher.SlurmBackend) only
submits, polls and cancels.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from harness.errors import HarnessError, Interrupted
from harness.io import read_json
from harness.launchers.job import payload
from harness.launchers.local import planned_sequences, write_experiment_files
from harness.launchers.processes import local_backend
from harness.launchers.progress import StageMonitor
from harness.launchers.ray_launcher import RayBackend
from harness.launchers.slurm_launcher import SlurmBackend
from harness.locking import is_locked, refuse_if_held
from harness.models import load_model, module_shapes
from harness.run.mirror import sync_sequence, update_state
from harness.run.planning import SequenceSpec, experiment_dir, preflight_methods, sequence_memory
from harness.tracking.client import open_tracker

POLL_S = 1.0  # how often the driver looks at jobs and run folders
LOCK_RELEASE_S = 120.0  # how long a cancelled job may take to let go of its folder before runs are marked anyway


class JobsFailed(HarnessError):
    """Some sequences did not finish; exit 2 when all of them failed on input the user can fix, else 1."""

    def __init__(self, message: str, user_errors_only: bool):
        super().__init__(message)
        self.exit_code = 2 if user_errors_only else 1


@dataclass
class Job:
    spec: SequenceSpec
    attempt: int = 1


class Backend(Protocol):
    def describe(self) -> str: ...
    def submit(self, payloads: list[dict]) -> list[Any]: ...
    def poll(self, handles: list[Any]) -> list[tuple[Any, str, Any]]: ...
    def cancel(self, handles: list[Any]) -> None: ...
    def log_of(self, handle: Any) -> str: ...
    def close(self) -> None: ...


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check_free(specs: list[SequenceSpec], wait: bool) -> None:
    """Refuse (exit 2), as a local run does, when another process holds a sequence folder; unless asked to wait."""

    if wait:
        return
    for spec in specs:
        refuse_if_held(spec.run_dir)


def make_backend(cfg, exp_dir: Path, suite, specs: list[SequenceSpec]) -> Backend:
    if cfg.launcher == "ray":
        return RayBackend(cfg, exp_dir)

    if cfg.launcher == "slurm":
        return SlurmBackend(cfg, exp_dir)

    return local_backend(cfg, exp_dir, len(specs), sequence_memory(cfg, suite, specs))


def run_jobs(cfg, *, progress: bool = True, only: Path | None = None) -> list[dict[str, Any]]:
    """Preflight, dispatch one job per sequence, follow the run folders, gather each summary.json (spec order)."""
    suite, specs, uri, shapes_checked = planned_sequences(cfg, only)
    if not shapes_checked:  # the model's config is unreadable without weights: check capacity on the loaded model
        model, _ = load_model(
            cfg.model,
            seed=0,
            device="cpu",
            dtype="fp32",
            cache_dir=cfg.cache_dir,
            trust_remote_code=cfg.trust_remote_code,
        )
        preflight_methods(cfg, specs, module_shapes(model))
        del model
    check_free(specs, cfg.wait_for_lock)
    backend = make_backend(
        cfg, experiment_dir(cfg), suite, specs
    )  # reaches the cluster, or plans --jobs; writes nothing
    try:
        write_experiment_files(cfg, only=only)
        tracker = open_tracker(cfg, uri)  # the experiment is created here, once; jobs only look it up
        say(f"{len(specs)} sequence(s) on {backend.describe()}; tracking {uri}")
        return _follow(cfg, backend, tracker, specs, progress)
    finally:
        backend.close()


def _follow(cfg, backend: Backend, tracker, specs: list[SequenceSpec], progress: bool) -> list[dict[str, Any]]:
    monitor = StageMonitor(specs, progress=progress)
    summaries: dict[Path, dict] = {}
    failures: list[tuple[str, str, bool]] = []  # (label, message, user error)
    pending: dict[Any, Job] = {}
    in_driver = getattr(backend, "mirrors_in_driver", False)  # --jobs: the jobs write folders, this process MLflow

    def submit(jobs: list[Job]) -> None:
        payloads = [payload(cfg, j.spec.run_dir, attempt=j.attempt, label=j.spec.label) for j in jobs]
        for job, handle in zip(jobs, backend.submit(payloads)):
            pending[handle] = job

    try:
        submit([Job(s) for s in specs])
        while pending:
            for handle, kind, value in backend.poll(list(pending)):
                job = pending.pop(handle)
                if in_driver:  # before a retry starts: the folder is this process's alone now
                    mirror_folder(tracker, job.spec, monitor.say)
                if kind == "ok" and value.get("ok"):
                    summaries[job.spec.run_dir] = gathered(job.spec)
                    monitor.sequence_done(job.spec, summaries[job.spec.run_dir])
                elif kind == "ok":
                    failures.append((job.spec.label, value.get("error", "?"), True))
                    monitor.say(f"[{job.spec.label}] failed: {value.get('error')}")
                elif kind == "died" and job.attempt <= cfg.job_retries:
                    monitor.say(
                        f"[{job.spec.label}] job died ({value}); retry {job.attempt}/{cfg.job_retries}: "
                        "it continues from the last committed stage or checkpoint"
                    )
                    submit([Job(job.spec, job.attempt + 1)])
                else:
                    what = "died" if kind == "died" else "failed"
                    failures.append(
                        (
                            job.spec.label,
                            f"{what} (attempt {job.attempt}): {value}\n  log: {backend.log_of(handle)}",
                            False,
                        )
                    )
                    monitor.say(f"[{job.spec.label}] {what} (attempt {job.attempt}); log: {backend.log_of(handle)}")
            monitor.poll()
            if pending:
                time.sleep(POLL_S)
    except BaseException as exc:  # Ctrl-C, SIGTERM, or the driver itself failing: its jobs go with it
        monitor.close()
        interrupted = isinstance(exc, KeyboardInterrupt)
        if pending:
            why = "interrupted" if interrupted else f"driver stopped ({type(exc).__name__})"
            say(f"{why}: stopping {len(pending)} job(s)")
            backend.cancel(list(pending))
            stopped = [j.spec for j in pending.values()]
            if in_driver:
                for spec in stopped:
                    mirror_folder(tracker, spec, say)
            mark_stopped(tracker, stopped, interrupted=interrupted)
        if interrupted:
            raise Interrupted(getattr(exc, "why", None) or str(exc) or "Ctrl-C", experiment_dir(cfg)) from None
        raise
    monitor.close()
    if failures:
        lines = "\n".join(f"  [{label}] {msg}" for label, msg, _ in failures)
        raise JobsFailed(
            f"{len(failures)} of {len(specs)} sequence(s) did not finish:\n{lines}\n"
            "Finished stages are kept: fix the cause and run the same command again (finished work is skipped).",
            user_errors_only=all(user for _, _, user in failures),
        )
    return [summaries[s.run_dir] for s in specs]


def mirror_folder(tracker, spec: SequenceSpec, say_) -> None:
    """--jobs: bring MLflow level with a sequence folder whose process has ended (what `harness sync` does)."""
    if not (spec.run_dir / "state.json").is_file():
        return  # the job stopped before it wrote anything
    try:
        sync_sequence(tracker, spec.run_dir)
        update_state(spec.run_dir, mirror_behind=None)
    except Exception as exc:  # noqa: BLE001 - the folder keeps everything; MLflow can be caught up later
        say_(
            f"[{spec.label}] MLflow not updated ({str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__}); "
            f"the folder is complete as far as it got: `harness sync {spec.run_dir}` mirrors it"
        )


def gathered(spec: SequenceSpec) -> dict[str, Any]:
    """The sequence's summary.json: the folder is the source of truth, and the driver must be able to see it."""
    path = spec.run_dir / "summary.json"
    deadline = time.monotonic() + 30  # a shared filesystem may show a file written elsewhere a moment late
    while True:
        try:
            summary = json.loads(path.read_text())
            if summary.get("complete"):
                return summary
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise HarnessError(
                f"[{spec.label}] its job finished but {path} is missing or incomplete here: the results folder must be "
                "on a filesystem that the driver and every worker share (same path)."
            )
        time.sleep(0.5)


def mark_stopped(tracker, specs: list[SequenceSpec], *, interrupted: bool) -> None:
    """Stopped sequences: once their job has let go of the folder, RUNNING parent and stage runs become KILLED (Ctrl-C,
    SIGTERM: tagged interrupted, as a local run's; resumable) or FAILED (the driver itself failed)."""
    end = tracker.mark_killed if interrupted else (lambda run_id: tracker.finish(run_id, "FAILED"))
    deadline = time.monotonic() + LOCK_RELEASE_S
    for spec in specs:
        state = spec.run_dir / "state.json"
        if not state.exists():
            continue  # the job never got as far as opening its MLflow run
        while is_locked(spec.run_dir) and time.monotonic() < deadline:
            time.sleep(0.5)
        if is_locked(spec.run_dir):
            say(f"[{spec.label}] still held by its job: not marked (harness report marks it when it has stopped)")
            continue
        parent = read_json(state).get("mlflow_parent_run_id")
        if parent is None:
            continue  # its store never answered: no run to mark
        try:
            if tracker.status(parent) != "RUNNING":
                continue
            for child in tracker.stage_children(parent):
                if child.info.status == "RUNNING":
                    end(child.info.run_id)
            end(parent)
        except Exception as exc:  # noqa: BLE001 - a store problem must not hide the interruption itself
            say(f"[{spec.label}] could not mark MLflow run {parent} stopped: {exc}")
