"""Mirroring a sequence folder into MLflow. The folder is the source of truth; MLflow is a mirror that may fall behind.

A tracking server that stops answering must neither stall a run nor lose it. While a sequence runs, its
Mirror sends each MLflow call; when one fails because the store cannot be reached, the Mirror says once that
tracking is behind, records it in state.json (`mirror_behind`) and sends nothing more. Training, evaluation
and stage commits go on. At every stage boundary it asks the server's /health (a few seconds at most) and,
once it answers, `sync_sequence` brings MLflow level with the folder and the Mirror says once that it caught
up. `harness resume`, `harness report` and `harness sync RUN_DIR` run the same `sync_sequence`.

sync_sequence is idempotent, and reads only the folder: it creates the parent run if the sequence started
while the store was down (from the name, tags and params kept in state.json), logs each committed stage's
missing acc/<task>, general_ce and general/<task> points and stage-run metrics (a FINISHED stage run per committed stage,
other runs of that stage deleted), and, for a finished sequence, the final metrics and artifacts, then marks the parent FINISHED.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from harness import metrics as MX
from harness.errors import HarnessError
from harness.io import atomic_write_json, is_disk_full, read_json
from harness.run import lineage
from harness.run.folder import STAGE_MARKER, committed_stages
from harness.tracking.client import check_reachable, redact_uri

STATE = "state.json"
RESULT_ARTIFACTS = (
    "matrix.csv",
    "matrix.json",
    "diagnostics.json",
    "matrix_heatmap.png",
    "config.yaml",
    "documents.json",
)
DEFERRED = "mirrored by the driver of --jobs when this sequence's process ends"


def read_state(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / STATE
    return read_json(path) if path.is_file() else {}


def update_state(run_dir: Path, **changes: Any) -> None:
    """state.json with `changes` applied (a value of None removes the key)."""
    state = {**read_state(run_dir), **changes}
    atomic_write_json(Path(run_dir) / STATE, {k: v for k, v in state.items() if v is not None})


def is_behind(run_dir: Path) -> bool:
    return bool(read_state(run_dir).get("mirror_behind"))


# --- what a stage and a finished sequence put into MLflow ---------------------------------------------
def mirror_stage(tracker, parent_id: str, child_id: str, stage_dir: Path, *, fresh: bool, on_half=None) -> None:
    """Copy a committed stage's files into its stage run and the parent's acc/<task> points, then mark it FINISHED.

    A fresh stage logs in batches; otherwise the store is asked what it has first, so nothing is logged twice. The
    stage's model, its run's inputs and the acc points' links to them: harness/run/lineage.py."""
    info, ev, tr = (read_json(stage_dir / f) for f in (STAGE_MARKER, "eval.json", "train.json"))
    t = info["stage"]
    stage_metrics = {
        k: v for k, v in info.items() if k not in ("stage", "task", "mlflow_run_id") and isinstance(v, (int, float))
    }
    evals = {f"eval/{k}": v for k, v in ev["scores"].items()}
    if fresh:
        tracker.log_series(child_id, "train/loss", tr["losses"])
        tracker.log_metrics(child_id, stage_metrics)
        if on_half is not None:
            on_half()  # a test's fault point: the stage is half mirrored
        tracker.log_metrics(child_id, evals)
    else:
        tracker.log_series_once(child_id, "train/loss", tr["losses"])
        tracker.mirror_metrics(child_id, {**stage_metrics, **evals})
    records = read_state(stage_dir.parent.parent).get("mlflow_datasets")  # a folder from before lineage has none
    model_id = lineage.mirror_stage_lineage(tracker, parent_id, child_id, stage_dir, records, ev["scores"])
    lineage.log_acc(tracker, parent_id, ev["scores"], t, records, model_id, once=not fresh)
    if model_id and not fresh:
        lineage.backfill_model_acc(tracker, model_id, child_id, ev["scores"], t, records)
    log_general(tracker, parent_id, ev, t, fresh=fresh)
    tracker.finish(child_id, "FINISHED")


def general_metrics(ev: dict[str, Any]) -> dict[str, float]:
    """What a stage's eval.json gives its parent run at that step: general_ce and general/<task> (general_tasks)."""
    out = {f"general/{task}": v for task, v in (ev.get("general") or {}).items()}
    return {"general_ce": ev["general_ce"], **out} if ev.get("general_ce") is not None else out


def log_general(tracker, parent_id: str, ev: dict[str, Any], t: int, *, fresh: bool) -> None:
    """A stage's general metrics on the parent run at step t: in one batch when fresh, else each point once."""
    metrics = general_metrics(ev)
    if fresh and metrics:
        tracker.log_metrics(parent_id, metrics, step=t)
    for key, value in ({} if fresh else metrics).items():
        tracker.log_metric_once(parent_id, key, value, t)


def log_results(tracker, parent_id: str, run_dir: Path, summary: dict[str, Any], *, fresh: bool) -> None:
    """A finished sequence's final metrics and result files on its parent run, then FINISHED."""
    final = {m.name: summary.get(m.key) for m in MX.TABLE}  # every metric of the table, None included
    final.update({k: v for k, v in summary.items() if k.startswith("trainable_params")})
    val = summary.get("validation") or {}  # the final model on the validation split (grid selection reads val_ACC)
    final.update({"val_ACC": val.get("acc"), **{f"val/{t}": v for t, v in (val.get("scores") or {}).items()}})
    final.update({f"general_change/{t}": g["change"] for t, g in (summary.get("general_tasks") or {}).items()})
    final = {k: v for k, v in final.items() if k in {m.name for m in MX.TABLE} or v is not None}
    (tracker.log_metrics if fresh else tracker.mirror_metrics)(parent_id, final)
    for name in RESULT_ARTIFACTS:
        if (Path(run_dir) / name).is_file():
            tracker.log_artifact(parent_id, Path(run_dir) / name)
    tracker.log_json(parent_id, summary, "summary.json")  # fresh: logged before the file is written, as its last step
    tracker.finish(parent_id, "FINISHED")


def sync_sequence(tracker, run_dir: Path) -> str:
    """Bring MLflow level with the folder (see the module docstring); returns the parent run id."""
    run_dir = Path(run_dir)
    state = read_state(run_dir)
    parent_id = state.get("mlflow_parent_run_id")
    if parent_id is None:
        spec = state.get("mlflow_parent")
        if spec is None:
            raise HarnessError(
                f"{run_dir / STATE}: no MLflow parent run and no record of one to create; "
                "this folder was not made by `harness run`."
            )
        parent_id = tracker.create_parent(spec["name"], spec["tags"], spec["params"])
        update_state(run_dir, mlflow_parent_run_id=parent_id)
    ptags = (state.get("mlflow_parent") or {}).get("tags", {})
    stage_tags = {k: ptags[k] for k in ("harness.method", "harness.seed") if k in ptags}
    by_stage: dict[int, list] = {}
    for r in tracker.stage_children(parent_id):
        by_stage.setdefault(int(r.data.tags.get("harness.stage", "-1")), []).append(r)
    keep = set()
    records = state.get("mlflow_datasets")
    if records:
        lineage.log_inputs(tracker, parent_id, records)
    for t, d in sorted(committed_stages(run_dir).items()):
        if t == 0:
            lineage.log_acc(tracker, parent_id, read_json(d / "eval.json")["scores"], 0, records, once=True)
            log_general(tracker, parent_id, read_json(d / "eval.json"), 0, fresh=False)
            continue
        child = _stage_run(tracker, parent_id, t, read_json(d / STAGE_MARKER), by_stage.get(t, []), stage_tags)
        keep.add(child)
        mirror_stage(tracker, parent_id, child, d, fresh=False)
    for runs in by_stage.values():  # runs of interrupted stages, and duplicates: no stage counts twice
        for r in runs:
            if r.info.run_id not in keep:
                tracker.delete(r.info.run_id)
    summary = read_json(run_dir / "summary.json") if (run_dir / "summary.json").is_file() else {}
    if summary.get("complete"):
        log_results(tracker, parent_id, run_dir, summary, fresh=False)
    return parent_id


def _stage_run(tracker, parent_id: str, t: int, info: dict, runs: list, tags: dict[str, str]) -> str:
    """The stage run to mirror stage t into: the one its stage.json names, else a FINISHED one of that stage, else a new one."""
    ids = {r.info.run_id: r for r in runs}
    if info.get("mlflow_run_id") in ids:
        return info["mlflow_run_id"]
    finished = [r.info.run_id for r in runs if r.info.status == "FINISHED"]
    if finished:
        return finished[0]
    return tracker.create_stage(parent_id, t, info.get("task") or "stage", {**tags, "harness.caught_up": "true"})


# --- a running sequence's mirror ----------------------------------------------------------------------
class Mirror:
    """One running sequence's (or merge's) MLflow calls: sent while the store answers, skipped (and caught up later,
    by `sync`, which reads only the folder) while it does not."""

    def __init__(self, tracker, run_dir: Path, label: str, say: Callable[[str], None], sync: Callable | None = None):
        self.tracker, self.run_dir, self.label, self.say = tracker, Path(run_dir), label, say
        self.sync_fn = sync or sync_sequence  # (tracker, run_dir) -> parent run id: the folder into MLflow
        self.hint = (  # when MLflow catches up
            "at the next stage, `harness resume`, `harness report`, or `harness sync RUN_DIR`"
            if sync is None
            else "after the next piece, the same command run again, `harness report`, or `harness sync RUN_DIR`"
        )
        self.remote = tracker.uri.startswith(("http://", "https://"))
        state = read_state(run_dir)
        self.behind: str | None = state.get("mirror_behind")
        self.parent_id: str | None = state.get("mlflow_parent_run_id")
        self.deferred = bool(getattr(tracker, "deferred", False))
        if self.deferred:  # a `--jobs` process: behind by design and quietly; its driver syncs the folder when it ends
            self.behind = DEFERRED
            update_state(self.run_dir, mirror_behind=DEFERRED)
        elif tracker.experiment_id is None:  # --tracking-optional and the store did not answer at the start
            self._fall_behind(tracker.open_error or "it did not answer at the start")

    def call(self, fn: Callable, *args, **kw):
        """fn(*args, **kw) unless tracking is behind; a store that cannot be reached puts it behind (returns None)."""
        if self.behind:
            return None
        try:
            return fn(*args, **kw)
        except Exception as exc:  # noqa: BLE001 - MLflow raises many types for an unreachable store
            if not self._unreachable(exc):
                raise
            self._fall_behind(exc)
            return None

    def _unreachable(self, exc: Exception) -> bool:
        """Whether exc means the store cannot be reached now (then the run goes on), not that the call was wrong."""
        if self.remote:
            if not isinstance(exc, HarnessError):
                return True
            try:
                check_reachable(self.tracker.uri, timeout_s=3)
                return False  # the server answers: the harness's own error stands
            except HarnessError:
                return True
        return is_disk_full(exc) or "database is locked" in str(exc)

    def _fall_behind(self, why) -> None:
        reason = str(why).strip().splitlines()[0][:200] if str(why).strip() else type(why).__name__
        if not self.behind:
            self.say(
                f"[{self.label}] tracking is behind: {redact_uri(self.tracker.uri)} does not answer ({reason}). Training "
                f"goes on and the run folder keeps everything; MLflow catches up when the server is back ({self.hint})."
            )
        self.behind = reason
        update_state(self.run_dir, mirror_behind=reason)

    def sync(self) -> None:
        """Bring MLflow level with the folder now (a resume's start: what a kill or an outage kept from it)."""
        if self.behind:
            self.catch_up()
        elif (parent_id := self.call(self.sync_fn, self.tracker, self.run_dir)) is not None:
            self.parent_id = parent_id

    def observe(self) -> None:
        """After a commit: MLflow follows the folder (a merge's pieces: harness/run/merge_mirror.py)."""
        self.sync()

    def settle(self) -> None:
        """The end of the work: one more sync, and if the store is still away, how to mirror the folder later."""
        self.sync()
        if self.behind and not self.deferred:
            self.say(
                f"[{self.label}] tracking is still behind at the end: the run folder is complete; once "
                f"{redact_uri(self.tracker.uri)} answers, `harness sync {self.run_dir}` mirrors it"
            )

    def finish(self, summary: dict[str, Any], write_summary: Callable[[], None]) -> None:
        """The finished sequence: results to the parent run (FINISHED), then summary.json, the folder's last word."""
        if not self.behind:
            self.call(log_results, self.tracker, self.parent_id, self.run_dir, summary, fresh=True)
        write_summary()
        if self.behind and not self.catch_up() and not self.deferred:
            self.say(
                f"[{self.label}] tracking is still behind at the end: the run folder is complete; once "
                f"{redact_uri(self.tracker.uri)} answers, `harness sync {self.run_dir}` (or `harness report`) mirrors it"
            )

    def catch_up(self) -> bool:
        """If behind and the store answers again: sync the whole folder and say so once. True when MLflow is level."""
        if not self.behind:
            return True
        if self.deferred:
            return False
        try:
            check_reachable(self.tracker.uri, timeout_s=3)
            if self.tracker.experiment_id is None:
                self.tracker.open()
            self.parent_id = self.sync_fn(self.tracker, self.run_dir)
        except Exception as exc:  # noqa: BLE001 - still unreachable (or failing again): stay behind, quietly
            self.behind = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            return False
        self.behind = None
        update_state(self.run_dir, mirror_behind=None)
        self.say(
            f"[{self.label}] tracking caught up: MLflow at {redact_uri(self.tracker.uri)} holds every committed stage again"
        )
        return True


def parent_record(name: str, tags: dict[str, str], params: dict[str, Any]) -> dict[str, Any]:
    """What state.json keeps to create the parent run later (params as MLflow stores them: strings)."""
    return {"name": name, "tags": tags, "params": json.loads(json.dumps({k: str(v) for k, v in params.items()}))}
