"""Sequences as a Slurm job array through submitit: one array task per sequence.

Each task asks for job_cpus CPUs, job_gpus GPUs and slurm_time minutes on slurm_partition; its
stdout/stderr and submitit's pickles live in results/<experiment>/slurm/<job id>/. A finished task
leaves a result pickle. One that leaves the queue without it (killed, node failure, preemption,
time limit) died, and the driver submits a retry, which resumes from the folder's checkpoints.
submitit's own requeueing is off (max_num_timeout=0) so every retry is counted in one place.

Job states come from `squeue`, not from submitit's watcher: the watcher asks `sacct`, which needs
Slurm's accounting database, and without one it never learns that a job died (clusters without
slurmdbd exist; so does the single-node cluster of the tests).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError

from harness.errors import HarnessError
from harness.launchers.job import run_sequence_job

# squeue states of a job that may still write its result; anything else (or absence) means it ended.
ACTIVE = {
    "PENDING",
    "RUNNING",
    "CONFIGURING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESIZING",
    "SUSPENDED",
    "SIGNALING",
    "STAGE_OUT",
    "STOPPED",
    "RESV_DEL_HOLD",
}
SQUEUE_EVERY_S = 5.0  # one squeue call per poll period for all jobs, not one per job
RESULT_GRACE_S = 20.0  # a result pickle written just before the job ended may show up late on a shared filesystem
COMMAND_TIMEOUT_S = 60


def _slurm(*args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(args), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(list(args), 1, "", str(exc))


class SlurmBackend:
    def __init__(self, cfg, exp_dir: Path):
        self.cfg = cfg
        self.name = f"harness-{cfg.experiment_name}"
        info = _slurm("sinfo", "-h", "-o", "%P %a", *(["-p", cfg.slurm_partition] if cfg.slurm_partition else []))
        if info.returncode != 0:
            raise HarnessError(
                f"--launcher slurm: cannot reach the Slurm controller (sinfo: {info.stderr.strip() or info.stdout.strip()})."
            )
        if cfg.slurm_partition and not info.stdout.strip():
            raise HarnessError(
                f"--slurm-partition {cfg.slurm_partition}: no such partition (`sinfo` lists the partitions)."
            )
        self.partitions = " ".join(line.split()[0] for line in info.stdout.splitlines() if line.strip())
        self.executor = submitit.SlurmExecutor(folder=Path(exp_dir).resolve() / "slurm" / "%j", max_num_timeout=0)
        self.executor.update_parameters(
            job_name=self.name,
            partition=cfg.slurm_partition,
            time=cfg.slurm_time,
            nodes=1,
            ntasks_per_node=1,
            cpus_per_task=cfg.job_cpus,
            gpus_per_node=int(cfg.job_gpus) or None,
        )
        self.states: dict[str, str] = {}
        self.last_squeue = 0.0
        self.ended_at: dict[str, float] = {}
        self.submitted_at: dict[str, float] = {}

    def describe(self) -> str:
        part = self.cfg.slurm_partition or f"the default partition (of {self.partitions})"
        return (
            f"Slurm, {part} (each job {self.cfg.job_cpus} CPU(s), {int(self.cfg.job_gpus)} GPU(s), {self.cfg.slurm_time} min, "
            f"up to {self.cfg.job_retries} retries; logs under {Path(self.executor.folder).parent})"
        )

    def submit(self, payloads: list[dict]) -> list[Any]:
        self.executor.update_parameters(array_parallelism=len(payloads))
        try:
            jobs = self.executor.map_array(run_sequence_job, payloads)
        except Exception as exc:  # noqa: BLE001 - submitit raises FailedSubmissionError, CalledProcessError, ...
            raise HarnessError(f"--launcher slurm: sbatch refused the jobs: {exc}") from None
        now = time.monotonic()
        self.submitted_at.update({job.job_id: now for job in jobs})
        self.last_squeue = 0.0  # read the queue again at the next poll
        return jobs

    def _refresh_states(self) -> None:
        if time.monotonic() - self.last_squeue < SQUEUE_EVERY_S:
            return
        out = _slurm("squeue", "-h", "-r", "-t", "all", "-n", self.name, "-o", "%i|%T")
        if out.returncode == 0:  # a failed call (controller busy) changes nothing: ask again next time
            self.states = dict(line.split("|", 1) for line in out.stdout.split() if "|" in line)
            self.last_squeue = time.monotonic()

    def poll(self, handles: list[Any]) -> list[tuple[Any, str, Any]]:
        """("ok", the job's dict) with a result pickle; ("failed", trace) if it raised; ("died", state) if it ended without one."""
        self._refresh_states()
        out = []
        for job in handles:
            if job.paths.result_pickle.exists():
                try:
                    out.append((job, "ok", job.result()))
                except (FailedJobError, UncompletedJobError) as exc:
                    out.append((job, "failed", str(exc)))
                continue
            state = self.states.get(job.job_id)
            if self.last_squeue < self.submitted_at.get(job.job_id, 0.0) + 1.0:
                continue  # the queue was last read before this job was in it
            if state in ACTIVE:
                self.ended_at.pop(job.job_id, None)  # requeued
                continue
            first = self.ended_at.setdefault(job.job_id, time.monotonic())
            if time.monotonic() - first <= RESULT_GRACE_S:
                continue
            if (state or "").startswith("CANCELLED"):  # someone ran scancel: stopping it was meant, not retried
                out.append((job, "failed", f"Slurm job {job.job_id} was cancelled (scancel)"))
            else:  # FAILED (process killed), NODE_FAIL, PREEMPTED, TIMEOUT, OUT_OF_MEMORY, BOOT_FAIL, purged from the queue
                out.append(
                    (job, "died", f"Slurm job {job.job_id} ended {state or 'and left the queue'} without a result")
                )
        return out

    def cancel(self, handles: list[Any]) -> None:
        if handles:
            _slurm("scancel", *(job.job_id for job in handles))

    def log_of(self, handle: Any) -> str:
        return f"{handle.paths.stderr} (stdout: {handle.paths.stdout})"

    def close(self) -> None:
        pass
