"""MLflow 3 lineage of a sequence: its datasets (with digests), a LoggedModel per committed stage, system metrics.

What MLflow 3 users look for beside the runs:
- Datasets. Each task's train and test data is a dataset (name `<suite>/<task>/<split>`, a digest of the file's bytes,
  its source); `dataset_records` computes them from the suite when a sequence starts and state.json keeps them, so a
  later mirror (resume, `harness sync`) reads only the folder. The parent run gets every one as an input (context
  `training` or `evaluation`); a stage run gets the train data it trained on and the test data it was scored on.
  Every acc/<task> point carries its task's test dataset.
- Models. Each committed training stage is a LoggedModel whose artifacts are the stock PEFT folder of `harness export`,
  with params method, stage, task, rank, mask_density, seed and the stage's acc/<task> metrics (logged on the parent
  run with model_id=). It is found by its tag `harness.model_key` (<parent run id>/<stage>) before anything is created,
  so a resume or a sync never makes a second one.
- System metrics (knob system_metrics): MLflow's monitor on the parent run while the sequence runs.
- `harness export --register NAME`: the stage's LoggedModel as a version of registered model NAME, linked to the
  sequence's parent run.

Everything here is called through the Mirror (harness/run/mirror.py), so a tracking server that does not answer puts
tracking behind instead of failing the run. Logging is idempotent: what the store already has is not sent again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelOutput, Metric
from mlflow.exceptions import MlflowException
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from harness.errors import HarnessError
from harness.io import read_json
from harness.run.export import export_adapter
from harness.run.folder import committed_stages
from harness.suites.data import test_file, train_file
from harness.tracking.client import Tracker, check_reachable, redact_uri

log = logging.getLogger(__name__)

MODEL_KEY = "harness.model_key"  # <parent run id>/<stage>: the one LoggedModel of that stage of that sequence
MODEL_TYPE = "peft-adapter"
EXPERIMENT_KIND = "mlflow.experimentKind"  # the UI's GenAI vs model-training views
CONTEXT = {"train": "training", "test": "evaluation"}
DIGEST_CHARS = 16  # MLflow stores dataset digests in 36 characters


# --- datasets ------------------------------------------------------------------------------------------
def digest_file(path: Path) -> str:
    """sha256 of the file's bytes (first DIGEST_CHARS hex digits): one changed byte gives another digest."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:DIGEST_CHARS]


def _digest_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:DIGEST_CHARS]


def _record(suite_name: str, task: str, split: str, path: Path | None, hub: dict | None) -> dict[str, Any]:
    rec = {"task": task, "split": split, "name": f"{suite_name}/{task}/{split}", "context": CONTEXT[split]}
    if path is not None:
        data = path.read_bytes()
        rows = sum(1 for line in data.splitlines() if line.strip()) - (1 if path.suffix.lower() == ".csv" else 0)
        return {
            **rec,
            "digest": digest_file(path),
            "source_type": "local",
            "source": {"uri": path.resolve().as_uri()},
            "profile": {"rows": rows, "bytes": len(data)},
        }
    return {**rec, "digest": _digest_json(hub), "source_type": "hugging_face", "source": hub, "profile": {}}


def dataset_records(suite, tasks: list[str]) -> list[dict[str, Any]]:
    """The train and test data of `tasks` as dataset records (JSON, kept in state.json)."""
    out = []
    for name in tasks:
        task = suite.task(name)
        hf = task.train.hf
        train_hub = (
            None if hf is None else {"path": hf.path, "name": hf.name, "split": hf.split, "revision": hf.revision}
        )
        out.append(_record(suite.name, name, "train", train_file(task), train_hub))
        path = test_file(task)
        cfg = {} if path is not None else task.lm_eval_config()
        test_hub = None if path is not None else {k: cfg.get(k) for k in ("dataset_path", "dataset_name", "test_split")}
        out.append(_record(suite.name, name, "test", path, test_hub))
    return out


def _entity(rec: dict[str, Any]) -> DatasetInput:
    ds = Dataset(
        rec["name"], rec["digest"], rec["source_type"], json.dumps(rec["source"]), profile=json.dumps(rec["profile"])
    )
    return DatasetInput(ds, [InputTag(MLFLOW_DATASET_CONTEXT, rec["context"])])


def log_inputs(tracker, run_id: str, records: list[dict[str, Any]]) -> int:
    """Log the records the run does not have yet as its inputs (by name, digest and context); returns how many."""
    have = {
        (d.dataset.name, d.dataset.digest, {t.key: t.value for t in d.tags}.get(MLFLOW_DATASET_CONTEXT))
        for d in tracker.client.get_run(run_id).inputs.dataset_inputs
    }
    new = [r for r in records if (r["name"], r["digest"], r["context"]) not in have]
    if new:
        tracker.client.log_inputs(run_id, datasets=[_entity(r) for r in new])
    return len(new)


def stage_inputs(records: list[dict[str, Any]], trained: list[str], evaluated: list[str]) -> list[dict[str, Any]]:
    """A stage run's inputs: the train data of the tasks it trained, the test data of the tasks it was scored on."""
    return [
        r
        for r in records
        if (r["split"] == "train" and r["task"] in trained) or (r["split"] == "test" and r["task"] in evaluated)
    ]


def eval_datasets(records: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """task -> the dataset_name / dataset_digest its acc/<task> points carry."""
    return {
        r["task"]: {"dataset_name": r["name"], "dataset_digest": r["digest"]} for r in records if r["split"] == "test"
    }


# --- acc/<task> points, tied to their dataset and model ----------------------------------------------------
def log_acc(
    tracker,
    parent_id: str,
    scores: dict[str, float],
    step: int,
    records: list[dict[str, Any]] | None,
    model_id: str | None = None,
    *,
    once: bool = False,
) -> None:
    """acc/<task> at `step` on the parent run, each with its test dataset and the stage's model (when known).

    once=True: only the points the run lacks at that step (a resume or a sync sends nothing twice)."""
    if once:
        scores = {
            task: v
            for task, v in scores.items()
            if not any(m.step == step for m in tracker.client.get_metric_history(parent_id, f"acc/{task}"))
        }
    _log_linked(tracker, parent_id, scores, step, records, model_id)


def backfill_model_acc(
    tracker, model_id: str, stage_run_id: str, scores: dict[str, float], step: int, records: list[dict[str, Any]] | None
) -> int:
    """The acc/<task> points a model lacks, logged on its stage run with model_id (the parent run had them before the
    model existed: a store from before lineage). Returns how many."""
    have = {m.key for m in tracker.client.get_logged_model(model_id).metrics or []}
    missing = {task: v for task, v in scores.items() if f"acc/{task}" not in have}
    _log_linked(tracker, stage_run_id, missing, step, records, model_id)
    return len(missing)


def _log_linked(
    tracker,
    run_id: str,
    scores: dict[str, float],
    step: int,
    records: list[dict[str, Any]] | None,
    model_id: str | None,
) -> None:
    links = eval_datasets(records or [])
    ts = int(time.time() * 1000)
    items = [
        Metric(f"acc/{task}", float(v), ts, step, model_id=model_id, **links.get(task, {}))
        for task, v in scores.items()
        if v is not None
    ]
    if items:
        tracker.client.log_batch(run_id, metrics=items)


# --- a LoggedModel per committed stage ------------------------------------------------------------------------
def model_key(parent_id: str, stage: int) -> str:
    return f"{parent_id}/{stage}"


def find_model(tracker, parent_id: str, stage: int):
    """The LoggedModel of this stage of this sequence (READY ones first), or None."""
    found = tracker.client.search_logged_models(
        [tracker.experiment_id], filter_string=f"tags.`{MODEL_KEY}` = '{model_key(parent_id, stage)}'"
    )
    return sorted(found, key=lambda m: (str(m.status) != "READY", m.creation_timestamp))[0] if found else None


def model_params(run_dir: Path, info: dict[str, Any]) -> dict[str, str]:
    """method, stage, task, rank, mask_density, seed of a committed stage (the folder's config.yaml and stage.json).

    mask_density is the stage's measured mask density (LoRI-S), 1.0 for a dense adapter."""
    cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {}
    seq = cfg.get("sequence") or {}
    return {
        "method": str(seq.get("method")),
        "stage": str(info["stage"]),
        "task": str(info.get("task")),
        "rank": str(cfg.get("rank")),
        "mask_density": str(info.get("mask/density", 1.0)),
        "seed": str(seq.get("seed")),
    }


def stage_model(tracker, parent_id: str, source_run_id: str | None, stage_dir: Path) -> str | None:
    """The id of stage `stage_dir`'s LoggedModel: found by its key, else created with the exported PEFT folder as its
    artifacts (a model a kill left PENDING gets its artifacts again). None when the stage cannot be exported here."""
    stage_dir = Path(stage_dir)
    run_dir, info = stage_dir.parent.parent, read_json(stage_dir / "stage.json")
    t = int(info["stage"])
    model = find_model(tracker, parent_id, t)
    if model is not None and str(model.status) == "READY":
        return model.model_id
    with tempfile.TemporaryDirectory() as tmp:
        try:
            folder = export_adapter(run_dir, Path(tmp) / "adapter", t)
        except HarnessError as exc:  # e.g. the model's config is not readable here: no model, the run goes on
            log.warning("stage %s of %s: no MLflow model (%s)", t, run_dir, exc)
            return None
        if model is None:
            params = model_params(run_dir, info)
            name = "-".join(p for p in (params["method"], f"seed{params['seed']}", stage_dir.name) if p)
            tags = {
                MODEL_KEY: model_key(parent_id, t),
                "harness.run_dir": str(run_dir.resolve()),
                "harness.stage": str(t),
                "harness.task": params["task"],
                "harness.parent_run_id": parent_id,
            }
            model = tracker.client.create_logged_model(
                tracker.experiment_id,
                name=name,
                source_run_id=source_run_id,
                tags=tags,
                params=params,
                model_type=MODEL_TYPE,
            )
            if source_run_id:
                tracker.client.log_outputs(source_run_id, [LoggedModelOutput(model.model_id, t)])
        tracker.client.log_model_artifacts(model.model_id, str(folder))
    tracker.client.finalize_logged_model(model.model_id, "READY")
    return model.model_id


def mirror_stage_lineage(
    tracker,
    parent_id: str,
    child_id: str,
    stage_dir: Path,
    records: list[dict[str, Any]] | None,
    scores: dict[str, float],
) -> str | None:
    """A committed stage's model and its run's inputs (idempotent); returns the model id for its acc/<task> points."""
    info = read_json(Path(stage_dir) / "stage.json")
    if records:
        tasks = {r["task"] for r in records}
        trained = [info.get("task")] if info.get("task") in tasks else sorted(tasks)  # "all": a stage on every task
        log_inputs(tracker, child_id, stage_inputs(records, trained, list(scores)))
    return stage_model(tracker, parent_id, child_id, stage_dir)


# --- system metrics, the run's address ------------------------------------------------------------------------
def system_metrics_wanted(knob: bool | None, device) -> bool:
    """The knob system_metrics, or by default: on CUDA yes, on CPU no."""
    return bool(knob) if knob is not None else getattr(device, "type", str(device)) == "cuda"


def start_system_metrics(tracker, parent_id: str) -> SystemMetricsMonitor:
    """MLflow's CPU / memory / disk / network (and, with nvidia-ml-py and a GPU, GPU) monitor on the parent run.

    It runs in a thread, stops by itself when the run ends, and only logs a warning when the store does not answer."""
    monitor = SystemMetricsMonitor(parent_id, resume_logging=True, tracking_uri=tracker.uri)
    monitor.start()
    return monitor


def run_url(uri: str, experiment_id: str, run_id: str) -> str | None:
    """The MLflow UI's page of a run on a tracking server (None for a local store: `make dashboard` serves it)."""
    if not uri.startswith(("http://", "https://")):
        return None
    return f"{redact_uri(uri).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def mark_model_training(tracker) -> None:
    """Tag the experiment as model training (unless it says otherwise): MLflow 3's UI then opens it on training runs
    and a Models tab with metric columns, instead of its GenAI views."""
    exp = tracker.client.get_experiment(tracker.experiment_id)
    if EXPERIMENT_KIND not in exp.tags:
        tracker.client.set_experiment_tag(tracker.experiment_id, EXPERIMENT_KIND, "custom_model_development")


def begin_sequence(
    mirror, records: list[dict[str, Any]], system_metrics: bool
) -> tuple[str | None, SystemMetricsMonitor | None]:
    """A sequence's start, once its parent run exists: its datasets as the parent's inputs, the parent's UI address
    (None for a local store) and, if wanted, the system-metrics monitor (None while tracking is behind)."""
    tracker, parent_id = mirror.tracker, mirror.parent_id
    if not parent_id or mirror.behind:
        return None, None
    mirror.call(mark_model_training, tracker)
    mirror.call(log_inputs, tracker, parent_id, records)
    url = run_url(tracker.uri, tracker.experiment_id, parent_id)
    monitor = mirror.call(start_system_metrics, tracker, parent_id) if system_metrics else None
    return url, monitor


# --- harness export --register ------------------------------------------------------------------------------------
def registration_target(run_dir: Path, uri: str | None) -> tuple[str, str]:
    """(tracking URI, parent run id) to register a stage of `run_dir` with; HarnessError (nothing written) when the
    folder's MLflow mirror is not complete or the store does not answer."""
    state = read_json(Path(run_dir) / "state.json") if (Path(run_dir) / "state.json").is_file() else {}
    uri = uri or state.get("mlflow_tracking_uri")
    parent_id = state.get("mlflow_parent_run_id")
    if not uri or not parent_id or state.get("mirror_behind"):
        raise HarnessError(
            f"{run_dir}: its MLflow mirror is not complete (no parent run, or tracking behind): run "
            f"`harness sync {run_dir}` first, then export with --register again."
        )
    check_reachable(uri)
    return uri, parent_id


def register_export(run_dir: Path, stage: int | None, name: str, experiment: str, uri: str | None) -> str:
    """Register stage `stage` (default: the last committed) of sequence `run_dir` as a new version of model `name`.

    The version's source is the stage's LoggedModel (created now if the store has none) and it links to the
    sequence's parent run. Registering the same stage again returns its existing version. Returns a line saying so."""
    run_dir = Path(run_dir)
    uri, parent_id = registration_target(run_dir, uri)
    tracker = Tracker(uri, experiment)
    stages = {t: p for t, p in committed_stages(run_dir).items() if t > 0}
    t = max(stages, default=0) if stage is None else stage
    if t not in stages:
        raise HarnessError(f"--stage {t}: not a committed training stage of {run_dir}")
    source_run = read_json(stages[t] / "stage.json").get("mlflow_run_id")
    model_id = stage_model(tracker, parent_id, source_run, stages[t])
    if model_id is None:
        raise HarnessError(
            f"stage {t} of {run_dir} cannot be exported here (see the warning above); nothing registered"
        )
    try:
        tracker.client.create_registered_model(
            name, description="PEFT adapters registered by `harness export --register`"
        )
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    for mv in tracker.client.search_model_versions(f"name = '{name}'"):
        if mv.tags.get("harness.model_id") == model_id:
            return f"registered: {name} version {mv.version} already holds stage {t} of {run_dir} (model {model_id})"
    # The source is the model's artifact location, not models:/<id>: a local store resolves that through the
    # process-wide default tracking URI (MLflow 3.17), not this client's. The registry keeps no model_id: a tag does.
    source = tracker.client.get_logged_model(model_id).artifact_location
    tags = {"harness.run_dir": str(run_dir.resolve()), "harness.stage": str(t), "harness.model_id": model_id}
    mv = tracker.client.create_model_version(
        name,
        source,
        run_id=parent_id,
        model_id=model_id,
        tags=tags,
        run_link=run_url(uri, tracker.experiment_id, parent_id),
        description=f"stage {t} of {run_dir.resolve()}",
    )
    return f"registered: {name} version {mv.version} = stage {t} of {run_dir} (model {model_id}, run {parent_id})"
