"""What a sequence folder holds on disk, and how to read it back (the folder is the source of truth).

    <sequence>/config.yaml   resolved experiment config + this sequence (method, seed, order, tasks)
    <sequence>/state.json    MLflow parent run id (what resume needs besides the stages)
    <sequence>/.lock         held while a process works on the folder (harness/locking.py)
    <sequence>/checkpoint/   the stage in progress (harness/checkpoint.py), removed on commit
    <sequence>/stages/0-base/eval.json
    <sequence>/stages/<t>-<task>/  adapter/ (PEFT safetensors), masks.safetensors (lori-s),
                             replay.json (replay), eval.json, train.json, stage.json (written last;
                             the folder appears by atomic rename; under a launcher it also records
                             world_size, distributed, state_hash, rank0_trainable_elements)
    <sequence>/matrix.csv, matrix.json, summary.json, diagnostics.json, matrix_heatmap.png
"""

from __future__ import annotations

import csv
import io
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from harness.config import BEFORE_KNOB_EXISTED, LAUNCH_KEYS, ExperimentConfig
from harness.errors import ConfigError
from harness.io import atomic_write_json, atomic_write_text

STAGE_MARKER = "stage.json"
# Keys that say where results go and how they are tracked, or how a process behaves, not what a stage computes.
NOT_COMPARED = {"grid", "results_dir", "tracking_uri", "cache_dir", "methods", "seeds", "orders", "experiment", "wait_for_lock",
                "olora", "replay", "nlora", "inflora", "ewc", "migu", "merge_methods", "merge_weights", "merge_density", "merge_masks", "merge_a",
                "merge_pairs"} | LAUNCH_KEYS


def comparable(d: dict[str, Any], method: str | None = None) -> dict[str, Any]:
    out = {k: v for k, v in d.items() if k not in NOT_COMPARED}
    if method is not None:  # a method's own section does change what its stages compute
        from harness.methods import METHODS

        section = METHODS[method].section
        if section:
            out[section] = d.get(section)
    return out


def check_same_config(cfg_path: Path, resolved: dict[str, Any], method: str) -> None:
    """Refuse to continue a folder made with a different config (its stages would not belong together)."""
    if not cfg_path.exists():
        return
    old, new = comparable(yaml.safe_load(cfg_path.read_text()) or {}, method), comparable(resolved, method)
    # A knob added after the folder was made did not exist then: the old code behaved as the knob's default
    # does, or as BEFORE_KNOB_EXISTED says where a default has changed since.
    defaults = {**ExperimentConfig().model_dump(mode="json"), **BEFORE_KNOB_EXISTED}
    for k in set(new) - set(old):
        if k in defaults:
            old[k] = defaults[k]
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


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def write_matrix_files(run_dir: Path, R: np.ndarray, tasks: list[str]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["stage", *tasks])
    for i in range(R.shape[0]):
        w.writerow([i, *["" if math.isnan(v) else f"{v:.6f}" for v in R[i]]])
    atomic_write_text(run_dir / "matrix.csv", buf.getvalue())
    atomic_write_json(run_dir / "matrix.json", {
        "tasks": tasks, "stages": list(range(R.shape[0])),
        "R": [[None if math.isnan(v) else float(v) for v in row] for row in R],
    })


def _signed(v) -> str:
    return "n/a" if v is None else f"{v:+.3f}"


def stage_line(label: str, n_stages: int, info: dict, ev: dict, tr: dict | None = None) -> str:
    """The one line a finished stage gets, from its stage.json, eval.json and train.json contents.

    The scheduler prints it as it commits a stage; a launcher's driver rebuilds it from the committed files."""
    scores = " ".join(f"{k}={v:.2f}" for k, v in ev.get("scores", {}).items())
    if info.get("stage") == 0:
        return f"[{label}] stage 0 (base model) {scores}  eval {ev.get('wall_s', 0):.1f}s"
    losses = (tr or {}).get("losses") or []
    loss = f"loss {losses[0]:.3f}->{losses[-1]:.3f} " if losses else ""
    other = f" other {info['overhead_s']:.1f}s ({100 * info['overhead_frac']:.1f}%)" if "overhead_s" in info else ""
    return (f"[{label}] stage {info['stage']}/{n_stages} {info.get('task')}: {loss}{info.get('train_steps', 0)} steps "
            f"{info.get('train_tok_s', 0):.0f} tok/s | train {info.get('train_s', 0):.1f}s eval {info.get('eval_s', 0):.1f}s"
            f"{other} | {scores}")


def done_line(label: str, summary: dict) -> str:
    """The line a finished sequence gets, from its summary.json contents."""
    return (f"[{label}] done: ACC {_signed(summary.get('acc'))} BWT {_signed(summary.get('bwt'))} FWT {_signed(summary.get('fwt'))} "
            f"forgetting {_signed(summary.get('forgetting'))}  trainable {summary.get('trainable_params_effective', 0):,}")
