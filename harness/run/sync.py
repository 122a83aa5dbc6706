"""`harness sync` and the report's catch-up: every sequence and merge folder under a path brought level in MLflow.

Each folder is mirrored by the function that knows its kind (harness/run/mirror.py for a sequence,
harness/run/merge_mirror.py for a merge); both read only the folder and are idempotent."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from harness.errors import HarnessError
from harness.locking import is_locked
from harness.run.folder import committed_stages, experiment_of, merge_folders, sequence_folders
from harness.run.merge_mirror import merge_experiment, sync_merge
from harness.run.mirror import STATE, is_behind, read_state, sync_sequence, update_state
from harness.tracking.client import Tracker, check_reachable, redact_uri


def sync_folder(run_dir: Path, experiment: str, uri: str | None = None, sync: Callable | None = None) -> str:
    """`harness sync`: mirror one sequence folder (or, with sync=sync_merge, a merge folder) into the store it was logged
    to (or `uri`); returns a line saying so."""

    if is_locked(run_dir):  # its own process mirrors it (and must keep its stage run in progress)
        return f"{run_dir}: skipped: a process is running it; it catches MLflow up itself"
    state = read_state(run_dir)
    uri = uri or state.get("mlflow_tracking_uri")
    if not uri:
        raise HarnessError(f"{Path(run_dir) / STATE}: no tracking URI recorded; pass --tracking-uri")
    check_reachable(uri)
    tracker = Tracker(uri, experiment)
    parent_id = (sync or sync_sequence)(tracker, run_dir)
    update_state(run_dir, mirror_behind=None)
    if sync is None:
        runs = f"{len([t for t in committed_stages(run_dir) if t > 0])} stage run(s)"
    else:
        runs = f"{len(tracker.stage_children(parent_id))} child run(s)"
    return (
        f"{run_dir}: MLflow at {redact_uri(uri)} holds parent run {parent_id} ({tracker.status(parent_id)}) and {runs}"
    )


def sync_path(path: Path, uri: str | None = None) -> list[str]:
    """`harness sync PATH`: every sequence and merge folder at or under path; one line per folder."""
    folders, merges = sequence_folders(path), merge_folders(path)
    if not folders and not merges:
        raise HarnessError(
            f"{path}: no sequence or merge folder here; pass results/<experiment>/<method>/seed-<s>, "
            "results/<experiment>/merge/<method>/seed-<s> or results/<experiment>."
        )
    lines = [sync_folder(folder, experiment_of(folder), uri) for folder in folders]
    return lines + [sync_folder(f, merge_experiment(f), uri, sync=sync_merge) for f in merges]


def catch_up_folders(root: Path) -> list[str]:
    """Before a report: mirror the folders whose MLflow lags (the report reads MLflow); a line per folder, warnings too."""
    lines = []
    behind = [(f, experiment_of(f), None) for f in sequence_folders(root) if is_behind(f)]
    behind += [(f, merge_experiment(f), sync_merge) for f in merge_folders(root) if is_behind(f)]
    for folder, experiment, sync in behind:
        try:
            lines.append(sync_folder(folder, experiment, sync=sync))
        except HarnessError as exc:
            lines.append(f"warning: {folder} is not in MLflow yet, so not in this report ({exc})")
    return lines
