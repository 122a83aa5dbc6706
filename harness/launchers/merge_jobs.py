"""`harness merge --jobs N`: the (method, seed) units of a merge experiment, N at a time, each in its own process.

Everything is checked first, in this process (run.merge's plan and the preflight; bad input writes nothing); the
experiment's MLflow store and experiment are created here, once; then each unit runs as `harness merge` of its one
method and seed (job.run_merge_job through processes.ProcessBackend), with the cores split between the units. A merge
unit logs to MLflow itself, a handful of calls per adapter and per merge, so N units share the store as N writers
whose writes sqlite serialises (the store already exists, so the schema race of a fresh store cannot happen). A unit
that dies is retried (job_retries) and resumes: trained adapters, the single-adapter matrix and finished merge rows
are skipped. Ctrl-C stops every unit; the same command continues.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from harness.errors import HarnessError, Interrupted
from harness.io import read_json
from harness.launchers.local import write_experiment_files
from harness.launchers.processes import ProcessBackend, local_backend
from harness.run.merge_plan import MergeSpec, merge_config, plan_merge
from harness.run.planning import experiment_dir, sequence_memory, validate
from harness.tracking.client import open_tracker

POLL_S = 1.0


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _payload(cfg, spec: MergeSpec, attempt: int) -> dict[str, Any]:
    unit = cfg.model_copy(update={"methods": [spec.method], "seeds": [spec.seed], "jobs": 1})  # its own sections only
    data = {
        **unit.to_yaml_dict(),
        "experiment": cfg.experiment_name,
        "results_dir": str(Path(cfg.results_dir).resolve()),
    }
    return {
        "kind": "merge",
        "config": data,
        "run_dir": str(spec.run_dir.resolve()),
        "attempt": attempt,
        "label": spec.label,
        "cwd": os.getcwd(),
        "log": None,
    }


def run_merge_jobs(cfg) -> list[dict[str, Any]]:
    """Every (method, seed) merge unit, cfg.jobs at a time; their summaries in plan order."""
    mcfg = merge_config(cfg)
    suite, seq_specs, uri, _ = validate(mcfg)
    specs = plan_merge(cfg, suite)
    backend = local_backend(cfg, experiment_dir(cfg), len(specs), sequence_memory(mcfg, suite, seq_specs[:1]))
    write_experiment_files(cfg)
    open_tracker(cfg, uri)  # the store and the experiment, created once before the units look them up
    say(f"{len(specs)} merge unit(s) on {backend.describe()}; tracking {uri}")
    try:
        return _follow(cfg, backend, specs)
    finally:
        backend.close()


def _follow(cfg, backend: ProcessBackend, specs: list[MergeSpec]) -> list[dict[str, Any]]:
    pending = dict(zip(backend.submit([_payload(cfg, s, 1) for s in specs]), [(s, 1) for s in specs]))
    summaries: dict[Path, dict] = {}
    failures: list[str] = []
    try:
        while pending:
            for handle, kind, value in backend.poll(list(pending)):
                spec, attempt = pending.pop(handle)
                if kind == "ok" and value.get("ok"):
                    summaries[spec.run_dir] = read_json(spec.run_dir / "summary.json")
                    say(f"[{spec.label}] done ({len(summaries)} of {len(specs)})")
                elif kind == "died" and attempt <= cfg.job_retries:
                    say(
                        f"[{spec.label}] job died ({value}); retry {attempt}/{cfg.job_retries}: it resumes where it stopped"
                    )
                    (h,) = backend.submit([_payload(cfg, spec, attempt + 1)])
                    pending[h] = (spec, attempt + 1)
                else:
                    failures.append(
                        f"  [{spec.label}] {value.get('error') if kind == 'ok' else value}; log: {backend.log_of(handle)}"
                    )
            if pending:
                time.sleep(POLL_S)
    except KeyboardInterrupt as exc:
        say(f"interrupted: stopping {len(pending)} merge unit(s)")
        backend.cancel(list(pending))
        raise Interrupted(getattr(exc, "why", None) or str(exc) or "Ctrl-C") from None
    if failures:
        raise HarnessError(
            f"{len(failures)} of {len(specs)} merge unit(s) did not finish:\n"
            + "\n".join(failures)
            + "\nFinished adapters and merges are kept: fix the cause and run the same command again."
        )
    return [summaries[s.run_dir] for s in specs]
