"""Sequence runs that did not finish: interrupted ones (to resume) and running ones (someone is on them).

An interrupted sequence is a parent run with MLflow status KILLED and tag harness.interrupted=true:
a process killed outright cannot mark its own runs, so the CLI marks every RUNNING parent whose
folder lock nobody holds (harness.tracking.client.mark_interrupted) before it writes the report. A parent
still RUNNING after that belongs to a live process. Neither kind is aggregated: the report lists
them, each with the last stage it evaluated (the highest step of its acc/<task> metrics) and, for
an interrupted one, the command that continues it from its folder (tag harness.run_dir).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

INTERRUPTED, RUNNING = "interrupted", "running"


@dataclass
class UnfinishedRun:
    """One parent run the report lists but does not aggregate."""

    run_id: str
    run_name: str
    status: str  # MLflow status: KILLED (interrupted) or RUNNING
    state: str  # INTERRUPTED or RUNNING
    method: str
    seed: str
    order: str
    run_dir: str | None  # the sequence folder (tag harness.run_dir), when logged
    last_stage: int | None  # highest step of its acc/<task> metrics (0 = only the base model evaluated)
    n_stages: int | None  # training stages the sequence has (1 for a reference run), when known
    start_time_ms: int | None

    @property
    def resume_command(self) -> str | None:
        """`harness resume <folder>`, or None when the run did not log its folder."""
        return f"harness resume {shlex.quote(self.run_dir)}" if self.run_dir else None

    @property
    def progress(self) -> str:
        """The last evaluated stage as text: "2 of 3", "0 of 3 (base model only)", "—" when unknown."""
        if self.last_stage is None:
            return "—"
        of = f" of {self.n_stages}" if self.n_stages else ""
        return f"{self.last_stage}{of}" + (" (base model only)" if self.last_stage == 0 else "")

    def as_json(self) -> dict:
        return {"run_id": self.run_id, "run_name": self.run_name, "status": self.status, "method": self.method,
                "seed": self.seed, "order": self.order, "run_dir": self.run_dir, "last_stage": self.last_stage,
                "n_stages": self.n_stages, "resume_command": self.resume_command}


def is_interrupted(run) -> bool:
    return run.info.status == "KILLED" and run.data.tags.get("harness.interrupted", "").strip().lower() == "true"


def _last_stage(client, run) -> int | None:
    """The highest stage at which any acc/<task> metric was logged (step = stage), None when none was."""
    steps = [m.step for key in run.data.metrics if key.startswith("acc/")
             for m in client.get_metric_history(run.info.run_id, key)]
    return max(steps) if steps else None


def _n_stages(run) -> int | None:
    tags, params = run.data.tags, run.data.params
    if tags.get("harness.reference", "").strip().lower() == "true":
        return 1
    tasks = [t for t in (params.get("task_order") or "").split(",") if t]
    return len(tasks) or None


def _unfinished(client, run, state: str) -> UnfinishedRun:
    tags, params, info = run.data.tags, run.data.params, run.info
    return UnfinishedRun(
        run_id=info.run_id,
        run_name=info.run_name or info.run_id,
        status=info.status,
        state=state,
        method=str(tags.get("harness.method") or params.get("method") or "unknown"),
        seed=str(tags.get("harness.seed") or params.get("seed") or "?"),
        order=str(tags.get("harness.order") or params.get("order_index") or "?"),
        run_dir=tags.get("harness.run_dir") or None,
        last_stage=_last_stage(client, run),
        n_stages=_n_stages(run),
        start_time_ms=info.start_time,
    )


def classify_runs(client, runs: list) -> tuple[list, list[UnfinishedRun], list[UnfinishedRun]]:
    """(FINISHED MLflow runs, interrupted runs, running runs); FAILED and other statuses are in none."""
    finished = [r for r in runs if r.info.status == "FINISHED"]
    interrupted = [_unfinished(client, r, INTERRUPTED) for r in runs if is_interrupted(r)]
    running = [_unfinished(client, r, RUNNING) for r in runs if r.info.status == "RUNNING"]
    return finished, interrupted, running


def no_finished_message(experiment: str, skipped: list, interrupted: list[UnfinishedRun],
                        running: list[UnfinishedRun]) -> str:
    """The error when an experiment has nothing to report yet: what there is, and what to do."""
    msg = f"experiment {experiment!r} has no FINISHED sequence runs ({len(skipped)} not finished skipped"
    if interrupted or running:
        msg += f": {len(interrupted)} interrupted, {len(running)} running"
    msg += "): wait for `make run-sequence` to finish"
    hints = [u.resume_command for u in interrupted if u.resume_command]
    if hints:
        msg += "; continue the interrupted ones with " + ", ".join(f"`{h}`" for h in hints[:5])
        msg += f" (and {len(hints) - 5} more)" if len(hints) > 5 else ""
    return msg
