"""Mirroring a merge folder into MLflow, as harness/run/mirror.py mirrors a sequence: the folder is the record, MLflow
follows it and may fall behind.

`sync_merge` reads only the folder and is idempotent. It creates the parent run if the merge started while the store
was down (from the record state.json keeps), then gives each committed piece its FINISHED child run with its metrics:
a task adapter (adapters/<task>/train.json: `train/loss`, `train_s`, `train_steps`, the method's statistics), each
merge row of merged.json (`relative_error`, `eval/<task>`, `average_drop`, `normalised_accuracy`). single.json gives the
parent `single/<task>`. Other child runs (a piece a kill interrupted, duplicates) are deleted, so nothing counts twice.
A finished merge (summary.json complete) also gets its `merged/<combination>[/<protocol>]/<metric>` metrics, its files
as artifacts, and FINISHED. `harness merge` calls it after every commit (through its Mirror), `harness sync` and a
resume call it too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from harness.analysis.documents import DOCUMENTS_FILE
from harness.errors import HarnessError
from harness.io import read_json
from harness.run import merge_weights as MW
from harness.run.mirror import STATE, read_state, update_state

MERGE_ARTIFACTS = ("single.json", "merged.json", "config.yaml", DOCUMENTS_FILE)
ROW_METRICS = ("average_drop", "normalised_accuracy")
_NOT_METRICS = {"task", "steps", "wall_s", "losses", "budget", "mlflow_run_id", "sha256"}


def merge_experiment(folder: Path) -> str:
    """The experiment of results/<experiment>/merge/<method>/seed-<s>."""
    return Path(folder).resolve().parent.parent.parent.name


def protocols_of(folder: Path) -> list[str]:
    """The merge's protocols, as its config.yaml records them (rows before protocols existed: one, `paper`)."""
    data = yaml.safe_load((Path(folder) / "config.yaml").read_text()) or {}
    return list((data.get("merge") or {}).get("protocols") or ["paper"])


def row_name(row: dict[str, Any], protocols: list[str]) -> str:
    """A merge row's child run name: its combination (@protocol with several) and its tasks."""
    return f"{MW.label(row['combination'], row.get('protocol', protocols[0]), protocols)}-{'+'.join(row['tasks'])}"


def _child(tracker, parent_id: str, name: str, runs: dict[str, list], recorded: str | None, tags: dict) -> str:
    """The child run for a committed piece: the one its file names, else a FINISHED one of that name, else a new one."""
    mine = runs.get(name, [])
    if recorded in {r.info.run_id for r in mine}:
        return recorded
    finished = [r.info.run_id for r in mine if r.info.status == "FINISHED"]
    if finished:
        return finished[0]
    return tracker.create_child(parent_id, name, {**tags, "harness.caught_up": "true"})


def _parent(tracker, run_dir: Path) -> str:
    state = read_state(run_dir)
    if state.get("mlflow_parent_run_id"):
        return state["mlflow_parent_run_id"]
    spec = state.get("mlflow_parent")
    if spec is None:
        raise HarnessError(f"{run_dir / STATE}: no MLflow parent run and no record of one to create")
    parent_id = tracker.create_parent(spec["name"], spec["tags"], spec["params"], kind="merge")
    update_state(run_dir, mlflow_parent_run_id=parent_id)
    return parent_id


def sync_merge(tracker, run_dir: Path) -> str:
    """Bring MLflow level with a merge folder (see the module docstring); returns the parent run id."""
    run_dir = Path(run_dir)
    parent_id = _parent(tracker, run_dir)
    runs: dict[str, list] = {}
    for r in tracker.stage_children(parent_id):
        runs.setdefault(r.data.tags.get("mlflow.runName", ""), []).append(r)
    keep = set()
    for marker in sorted(run_dir.glob("adapters/*/train.json")):
        tr, task = read_json(marker), marker.parent.name
        tags = {"harness.kind": "merge-adapter", "harness.task": task}
        child = _child(tracker, parent_id, f"adapter-{task}", runs, tr.get("mlflow_run_id"), tags)
        keep.add(child)
        tracker.log_series_once(child, "train/loss", tr["losses"])
        stats = {k: v for k, v in tr.items() if k not in _NOT_METRICS and isinstance(v, (int, float))}
        tracker.mirror_metrics(child, {"train_s": tr["wall_s"], "train_steps": tr["steps"], **stats})
        tracker.finish(child, "FINISHED")
    if (run_dir / "single.json").is_file():
        single = read_json(run_dir / "single.json")
        S, tasks = single["S"], single["tasks"]
        tracker.mirror_metrics(parent_id, {f"single/{t}": S[i][i] for i, t in enumerate(tasks)})
    protocols = protocols_of(run_dir)
    rows = read_json(run_dir / "merged.json")["rows"] if (run_dir / "merged.json").is_file() else []
    for row in rows:
        tags = {"harness.kind": "merge-combination", "harness.combination": row["combination"]}
        child = _child(tracker, parent_id, row_name(row, protocols), runs, row.get("mlflow_run_id"), tags)
        keep.add(child)
        metrics = {"relative_error": row["relative_error"], **{f"eval/{t}": v for t, v in row["scores"].items()}}
        tracker.mirror_metrics(child, {**metrics, **{k: row.get(k) for k in ROW_METRICS}})
        tracker.finish(child, "FINISHED")
    for named in runs.values():  # pieces a kill interrupted, and duplicates: nothing counts twice
        for r in named:
            if r.info.run_id not in keep:
                tracker.delete(r.info.run_id)
    summary = read_json(run_dir / "summary.json") if (run_dir / "summary.json").is_file() else {}
    if summary.get("complete"):
        _log_results(tracker, parent_id, run_dir, summary)
    return parent_id


def _log_results(tracker, parent_id: str, run_dir: Path, summary: dict[str, Any]) -> None:
    """A finished merge: its per-merge metrics, files and summary on the parent run, then FINISHED."""
    final = {}
    for label, entry in summary["merges"].items():
        final.update({f"merged/{label.replace('@', '/')}/{k}": entry.get(k) for k in (*ROW_METRICS, "relative_error")})
    tracker.mirror_metrics(parent_id, final)
    for name in MERGE_ARTIFACTS:
        if (run_dir / name).is_file():
            tracker.log_artifact(parent_id, run_dir / name)
    tracker.log_json(parent_id, summary, "summary.json")
    tracker.finish(parent_id, "FINISHED")
