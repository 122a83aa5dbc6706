"""What a sequence folder holds on disk, and how to read it back (the folder is the source of truth).

<sequence>/config.yaml   resolved experiment config + this sequence (method, seed, order, tasks)
<sequence>/state.json    MLflow parent run id (what resume needs besides the stages)
<sequence>/precision.json  base/adapter dtypes, TF32, device type the stages ran under (harness/precision.py)
<sequence>/.lock         held while a process works on the folder (harness/locking.py)
<sequence>/checkpoint/   the stage in progress (harness/run/checkpoint.py), removed on commit
<sequence>/stages/0-base/eval.json, documents.json
<sequence>/stages/<t>-<task>/  adapter/ (PEFT safetensors), masks.safetensors (lori-s),
                         replay.json (replay), eval.json, documents.json (each document's score,
                         harness/analysis/documents.py), train.json, stage.json (written last, with
                         the SHA-256 of every other file of the folder; the folder appears by atomic
                         rename; under a launcher it also records world_size, distributed, state_hash,
                         rank0_trainable_elements)
<sequence>/matrix.csv, matrix.json, diagnostics.json, matrix_heatmap.png, documents.json (every stage's
                         per-document scores, gathered), summary.json (written last, with the SHA-256 of
                         the other four)
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from harness.config import BEFORE_KNOB_EXISTED, LAUNCH_KEYS, ExperimentConfig, section_users
from harness.config_loading import load_config
from harness.errors import ConfigError
from harness.integrity import HASHES, check_recorded, file_hashes, folder_hashes, redo_hint
from harness.io import atomic_write_json, atomic_write_text, read_json
from harness.legacy_keys import upgrade_flat_keys
from harness.methods import METHODS

STAGE_MARKER = "stage.json"
PRECISION = "precision.json"  # what the stages' numbers depend on besides the config (harness/precision.py)
RESULT_FILES = ["matrix.csv", "matrix.json", "diagnostics.json", "matrix_heatmap.png"]  # hashed in summary.json
# Keys that say where results go and how they are tracked, or how a process behaves, not what a stage computes.
NOT_COMPARED = {
    "grid",
    "results_dir",
    "tracking_uri",
    "tracking_optional",
    "cache_dir",
    "methods",
    "seeds",
    "orders",
    "experiment",
    "system_metrics",
    "wait_for_lock",
    "learn_margin",
    *section_users(),
    "merge_methods",
    "merge_weights",
    "merge_density",
    "merge_masks",
    "merge_a",
    "merge_pairs",
    "merge_weight_grid",
} | LAUNCH_KEYS


def comparable(d: dict[str, Any], method: str | None = None) -> dict[str, Any]:
    out = {k: v for k, v in d.items() if k not in NOT_COMPARED}
    if method is not None:  # a method's own section does change what its stages compute
        section = METHODS[method].section
        if section:
            out[section] = d.get(section)
    return out


def check_same_config(cfg_path: Path, resolved: dict[str, Any], method: str) -> None:
    """Refuse to continue a folder made with a different config (its stages would not belong together)."""
    if not cfg_path.exists():
        return
    old = comparable(
        upgrade_flat_keys(yaml.safe_load(cfg_path.read_text()) or {}, note=False), method
    )  # older folders: flat LoRI keys
    new = comparable(resolved, method)
    # A knob added after the folder was made did not exist then: the old code behaved as the knob's default
    # does, or as BEFORE_KNOB_EXISTED says where a default has changed since.
    defaults = {**ExperimentConfig().model_dump(mode="json"), **BEFORE_KNOB_EXISTED}
    for k in set(new) - set(old):
        if k in defaults:
            old[k] = defaults[k]
    for k, v in new.items():  # a section's knob added after the folder was made: the same rule
        if isinstance(v, dict) and isinstance(old.get(k), dict) and isinstance(defaults.get(k), dict):
            old[k] = {**defaults[k], **old[k]}
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        was = "; ".join(f"{k}: folder {old.get(k)!r}, now {new.get(k)!r}" for k in diff)
        raise ConfigError(
            f"{cfg_path}: this run folder was made with a different config ({was}). To continue it, pass the "
            "folder's values (a default may have changed since, e.g. --completion-eos always); otherwise use "
            "another --results-dir or experiment name, or delete the folder to start over."
        )


def clean_partial_writes(run_dir: Path) -> None:
    """Temp folders of writes a kill interrupted (stage commits, checkpoints): never taken as finished."""
    for parent in (run_dir, run_dir / "stages"):
        if parent.is_dir():
            for p in parent.glob(".tmp-*"):
                shutil.rmtree(p, ignore_errors=True)
    for p in run_dir.glob(".paused-*"):
        p.unlink(missing_ok=True)


def stage_markers(committed: dict[int, Path]) -> list[dict]:
    """The committed stages' stage.json, in stage order (read once for summary.json's totals below)."""
    return [read_json(committed[t] / STAGE_MARKER) for t in sorted(committed)]


def method_seconds(markers: list[dict]) -> dict[str, float]:
    """summary.json's totals of the seconds the committed stages spent in the method's own setup and teardown."""
    return {k: sum(m.get(k, 0.0) for m in markers) for k in ("method_setup_s", "method_teardown_s")}


def code_commits(markers: list[dict]) -> list[str]:
    """The harness commits that trained the committed stages (stage.json git_commit), distinct, in stage order: more
    than one when a resume ran other code than the stages before it."""
    return list(dict.fromkeys(m["git_commit"] for m in markers if m.get("git_commit")))


def committed_stages(run_dir: Path) -> dict[int, Path]:
    """Stage folders (`<t>-<name>`, stage 0 included) whose commit marker exists, by index; read only."""
    sdir = Path(run_dir) / "stages"
    out = {}
    for p in sdir.iterdir() if sdir.is_dir() else []:
        head = p.name.split("-", 1)[0]
        if head.isdigit() and (p / STAGE_MARKER).exists():
            out[int(head)] = p
    return out


def finished_stages(run_dir: Path) -> dict[int, Path]:
    """Committed stages by index; a stage folder without its marker is deleted (it is redone)."""
    out = committed_stages(run_dir)
    sdir = Path(run_dir) / "stages"
    for p in sdir.iterdir() if sdir.is_dir() else []:
        if p.is_dir() and p not in out.values():
            shutil.rmtree(p, ignore_errors=True)
    return out


def write_stage_marker(folder: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Write stage.json last, with the SHA-256 of every other file of the (temporary) stage folder; returns it."""
    info = {**info, HASHES: folder_hashes(folder, exclude=frozenset({STAGE_MARKER}))}
    atomic_write_json(Path(folder) / STAGE_MARKER, info)
    return info


def verify_stages(run_dir: Path, done: dict[int, Path], last: int | None = None) -> int:
    """Check committed stages against the hashes of their stage.json: IntegrityError (exit 2) naming the first damaged
    file and how to redo the stage; returns how many stages had hashes (folders from before hashes have none).

    last: the sequence's last committed stage (default: the last of `done`), the one a resume can simply redo."""
    last = max(done, default=None) if last is None else last
    return sum(
        check_recorded(d, read_json(d / STAGE_MARKER).get(HASHES), d / STAGE_MARKER, redo_hint(run_dir, d, t == last))
        for t, d in sorted(done.items())
    )


def result_hashes(run_dir: Path) -> dict[str, str]:
    return file_hashes(run_dir, RESULT_FILES)


def verify_results(run_dir: Path, summary: dict[str, Any]) -> bool:
    """A finished sequence's matrix, diagnostics and heatmap against the hashes in its summary.json."""
    return check_recorded(
        run_dir,
        summary.get(HASHES),
        Path(run_dir) / "summary.json",
        f"Delete {Path(run_dir) / 'summary.json'} and `harness resume {run_dir}` rewrites them from the stages.",
    )


def config_knobs(cfg_path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A config.yaml as knobs only, and its sequence block (None in an experiment folder)."""
    data = yaml.safe_load(Path(cfg_path).read_text()) or {}
    seq = data.pop("sequence", None)
    return upgrade_flat_keys(
        data, absent_methods_run=False, note=False
    ), seq  # an older folder's flat LoRI keys, silently


def check_same_precision(run_dir: Path, record: dict[str, Any]) -> None:
    """Refuse to continue a folder whose stages were computed under another precision (dtypes, TF32, device type).

    A folder made before precision.json existed has nothing to compare with and continues."""
    path = Path(run_dir) / PRECISION
    if not path.is_file():
        return
    old = read_json(path)
    if old != record:
        was = "; ".join(
            f"{k}: folder {old.get(k)!r}, now {record.get(k)!r}"
            for k in sorted(set(old) | set(record))
            if old.get(k) != record.get(k)
        )
        raise ConfigError(
            f"{path}: this folder's stages were computed under another precision ({was}). Resume on the "
            "folder's device type with its --dtype, --adapter-dtype and --tf32, or use another --results-dir."
        )


def experiment_of(run_dir: Path) -> str:
    """The experiment name a sequence folder's config.yaml gives."""

    data, _ = config_knobs(Path(run_dir) / "config.yaml")
    return load_config(None, {**data, "results_dir": "."}).experiment_name


def is_merge_folder(folder: Path) -> bool:
    """A `harness merge` folder (results/<experiment>/merge/<method>/seed-<s>): task adapters and a config.yaml."""
    return (Path(folder) / "adapters").is_dir() and (Path(folder) / "config.yaml").is_file()


def merge_folders(path: Path) -> list[Path]:
    """Every merge folder at or under path, sorted."""
    path = Path(path)
    if is_merge_folder(path):
        return [path]
    found = {p.parent.parent.parent for p in path.rglob("adapters/*/train.json")}
    return sorted(f for f in found if is_merge_folder(f))


def sequence_folders(root: Path) -> list[Path]:
    """Every sequence folder at or under root (a folder with config.yaml and stages/), sorted."""
    root = Path(root)
    return sorted(p.parent for p in root.rglob("stages") if p.is_dir() and (p.parent / "config.yaml").is_file())


def verify_folder(run_dir: Path) -> int:
    """A sequence folder as a reader finds it: committed stages and, when finished, its results (IntegrityError on damage).
    Reads only. Returns how many files were checked against a recorded hash."""
    done = committed_stages(run_dir)
    verify_stages(run_dir, done)
    n = sum(len(read_json(d / STAGE_MARKER).get(HASHES) or {}) for d in done.values())
    summary_path = Path(run_dir) / "summary.json"
    if summary_path.is_file():
        summary = read_json(summary_path)
        n += len(summary.get(HASHES) or {}) if verify_results(run_dir, summary) else 0
    return n


def write_matrix_files(run_dir: Path, R: np.ndarray, tasks: list[str]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["stage", *tasks])
    for i in range(R.shape[0]):
        w.writerow([i, *["" if math.isnan(v) else f"{v:.6f}" for v in R[i]]])
    atomic_write_text(run_dir / "matrix.csv", buf.getvalue())
    atomic_write_json(
        run_dir / "matrix.json",
        {
            "tasks": tasks,
            "stages": list(range(R.shape[0])),
            "R": [[None if math.isnan(v) else float(v) for v in row] for row in R],
        },
    )


def write_documents(path: Path, content: dict) -> None:
    """A documents.json (harness/analysis/documents.py), compact: one line, 0/1 scores as integers."""
    atomic_write_text(path, json.dumps(content, separators=(",", ":")) + "\n")


def learn_check(tasks: list[str], scores: dict[str, float], base: dict[str, float], margin: float) -> dict:
    """stage.json's "learn_check": which of the stage's own tasks did not beat the base model by margin.

    A task without a base score (eval_schedule diagonal_final evaluates no base row) is not judged."""
    flagged = [
        {"task": t, "score": scores[t], "base": base[t]}
        for t in tasks
        if t in scores and base.get(t) is not None and not math.isnan(base[t]) and scores[t] - base[t] < margin
    ]
    return {
        "margin": margin,
        "judged": [t for t in tasks if t in scores and base.get(t) is not None and not math.isnan(base[t])],
        "not_learned": flagged,
    }
