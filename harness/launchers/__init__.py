"""Where sequences run: in this process (local), as Ray tasks (ray) or as a Slurm job array (slurm).

    local   run_experiment: one sequence after another in this process (the default, --jobs 1)
    local with --jobs N   driver.run_jobs + processes.ProcessBackend: N sequence processes at once on this machine
    ray     driver.run_jobs + ray_launcher.RayBackend: one Ray task per sequence
    slurm   driver.run_jobs + slurm_launcher.SlurmBackend: one Slurm array job per sequence (submitit)

Whatever runs it, a sequence is the same computation (run_experiment(only=<its folder>)), gives the
same folder and the same matrix, and is resumed the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.launchers.driver import run_jobs
from harness.launchers.local import run_experiment
from harness.run.suite_knobs import with_suite_knobs
from harness.suites import load_suite


def run_sequences(cfg, *, progress: bool = True, only: Path | None = None) -> list[dict[str, Any]]:
    """Every sequence of the experiment (or the one in folder `only`) on cfg.launcher; their summaries.

    The suite's method_knobs are filled in here, once, before anything is written or sent: the experiment's
    config.yaml records the strengths its sequences run at, and a job (a --jobs process, a Ray task, a Slurm job)
    re-plans from a config that already holds them (a config that left them unset was dumped with every knob at
    its default, which then read as the experiment's own value: every baseline of a --jobs run ran untuned)."""
    cfg = with_suite_knobs(cfg, load_suite(cfg.suite))
    if cfg.launcher == "local" and cfg.jobs == 1:
        return run_experiment(cfg, progress=progress, only=only)

    return run_jobs(cfg, progress=progress, only=only)
