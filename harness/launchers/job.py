"""One job on a worker (a Ray task or a Slurm job): run or resume one sequence from its folder.

A job is described by a payload of plain data (config, folder, attempt, environment), so it
travels through Ray and through submitit's pickles alike and needs nothing of the driver's memory.
It imports the harness lazily: the environment (offline hub, cache folder, fault points) must be in
place before transformers or huggingface_hub read it at import time.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from harness.config import ExperimentConfig
from harness.errors import HarnessError
from harness.launchers.local import run_experiment
from harness.run.merge import run_merge

# What a job inherits from the driver's environment: where models are cached, offline switches,
# MLflow client settings (credentials too), fault points for tests. Ray workers are started by the
# cluster, not by the driver, so ray_launcher gives them these at process start (runtime_env); a
# Slurm job gets the driver's whole environment from sbatch. Never part of a payload: submitit
# keeps payloads as files in the results folder.
FORWARDED_PREFIXES = ("HARNESS_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "MLFLOW_", "TOKENIZERS_")
FORWARDED_NAMES = ("DO_NOT_TRACK", "XDG_CACHE_HOME")
FAULT_ENV = "HARNESS_FAULT_PAUSE"  # harness/faults.py's variable; read here without importing the harness


def forwarded_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    env = os.environ if environ is None else environ
    return {k: v for k, v in env.items() if k.startswith(FORWARDED_PREFIXES) or k in FORWARDED_NAMES}


def payload(cfg, run_dir: Path, *, attempt: int, label: str, log: Path | None = None) -> dict[str, Any]:
    """What a job needs, as plain data (no secrets). Paths are made absolute: a worker's working folder is not the driver's."""
    data = cfg.to_yaml_dict()
    data["results_dir"] = str(Path(cfg.results_dir).resolve())
    if cfg.cache_dir is not None:
        data["cache_dir"] = str(Path(cfg.cache_dir).resolve())
    return {
        "config": data,
        "run_dir": str(Path(run_dir).resolve()),
        "attempt": attempt,
        "label": label,
        "cwd": os.getcwd(),
        "log": str(log) if log else None,
    }


@contextlib.contextmanager
def _job_environment(p: dict[str, Any]) -> Iterator[None]:
    """The driver's working folder for the job's duration, and no fault point on a retry; restored afterwards."""
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    if p["attempt"] > 1:
        # A fault injected for a test stops the first attempt only; the retry shows the recovery.
        os.environ.pop(FAULT_ENV, None)
    if os.path.isdir(p["cwd"]):  # relative suite paths resolve as they did for the driver
        os.chdir(p["cwd"])
    try:
        yield
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)


@contextlib.contextmanager
def _output_to(log: str | None) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors, so C libraries too) to the job's log file."""
    if not log:
        yield
        return
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    # Python's sys.stdout/sys.stderr too: where something (pytest's capture, a notebook) replaced them, they no longer
    # write to file descriptors 1 and 2.
    with open(log, "ab", buffering=0) as f, open(log, "a", buffering=1, encoding="utf-8", errors="replace") as text:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def run_sequence_job(p: dict[str, Any]) -> dict[str, Any]:
    """Run (resume) the sequence in p["run_dir"]; {"ok": True, "summary"} or {"ok": False, "error"} for bad input.

    Other exceptions propagate: the launcher reports them as a failed job. A retry (attempt > 1)
    waits for the folder's lock instead of refusing: when a node is reported lost while its process
    still runs, the retry must not start a second copy, and it continues once the first is gone."""
    with _output_to(p.get("log")), _job_environment(p):
        print(
            f"=== {p['label']}: attempt {p['attempt']}, pid {os.getpid()}, host {os.uname().nodename}, "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')} (t={time.time():.3f})",
            file=sys.stderr,
            flush=True,
        )

        data = dict(p["config"])
        if p["attempt"] > 1:
            data["wait_for_lock"] = True
        try:
            cfg = ExperimentConfig(**data)
            summary = run_experiment(
                cfg,
                progress=False,
                only=Path(p["run_dir"]),
                preflight=False,
                threads=cfg.job_cpus,
                tracking_by_driver=p.get("tracking") == "driver",
            )[0]
        except HarnessError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return {"ok": False, "error": str(exc)}
        return {"ok": True, "summary": summary}


def run_merge_job(p: dict[str, Any]) -> dict[str, Any]:
    """`harness merge --jobs`: run (resume) the one (method, seed) unit of p["config"]; {"ok", "summary"} or {"ok": False, "error"}."""
    with _output_to(p.get("log")), _job_environment(p):
        print(
            f"=== {p['label']}: attempt {p['attempt']}, pid {os.getpid()}, {time.strftime('%Y-%m-%d %H:%M:%S')}",
            file=sys.stderr,
            flush=True,
        )
        try:
            cfg = ExperimentConfig(**{**p["config"], **({"wait_for_lock": True} if p["attempt"] > 1 else {})})
            summary = run_merge(cfg, progress=False, threads=cfg.job_cpus)[0]
        except HarnessError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return {"ok": False, "error": str(exc)}
        return {"ok": True, "summary": summary}
