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


def run_sequences(cfg, *, progress: bool = True, only: Path | None = None) -> list[dict[str, Any]]:
    """Every sequence of the experiment (or the one in folder `only`) on cfg.launcher; their summaries."""
    if cfg.launcher == "local" and cfg.jobs == 1:
        return run_experiment(cfg, progress=progress, only=only)

    return run_jobs(cfg, progress=progress, only=only)
