"""`--jobs N` with launcher local: N sequences at once on this machine, each in its own process.

The driver (driver.run_jobs, as for Ray and Slurm) plans, checks and dispatches; this backend starts up to N
`python -m harness.launchers.process_job` processes, each running one sequence through the same
run_experiment(only=<its folder>) as `harness resume`, with the machine's cores split between them (CPU) or one
GPU shared (CUDA). A job writes only its run folder: the default sqlite store takes one writing process, so the
driver mirrors each folder into MLflow when its job ends (mirror.sync_sequence, the code behind `harness sync`).
A job that dies loses nothing: its committed stages and mid-stage checkpoint stay, the driver retries it
(job_retries) and mirrors what was committed. Each job runs in its own session, so Ctrl-C reaches the driver
alone; the driver stops every job (SIGTERM: each keeps its finished stages) and prints one resume command. If the
driver itself dies, the kernel stops its jobs (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.io import atomic_write_json
from harness.models import memory as MEM
from harness.models.environment import cpu_cores, resolve_device

STOP_GRACE_S = 120.0  # how long a job may take to stop after SIGTERM (it finishes writing, then exits) before SIGKILL
PR_SET_PDEATHSIG = 1
# A CPU process holds more than the stage estimate counts (torch, lm-eval, the tokenizer, Python itself). SmolLM2-135M
# sequences on the default suite peaked at 1.82-1.98 GiB RSS (summary.json peak_memory, 2026-12-06); the estimate
# (1.5 GiB) plus this is 2.7 GiB: high by about 40%, so --jobs errs towards fewer processes, never towards swapping.
CPU_PROCESS_BYTES = int(1.2 * MEM.GiB)
MEMORY_MARGIN = 1.1  # a footprint is planned at 110% of what was measured or estimated


def _die_with_parent() -> (
    None
):  # runs in the child between fork and exec (Linux); elsewhere the job outlives a killed driver
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def measured_footprint(exp_dir: Path, device_type: str) -> int | None:
    """The largest peak memory a finished sequence of this experiment recorded on this kind of device (None: none yet)."""
    peaks = []
    for path in Path(exp_dir).rglob("summary.json"):
        try:
            peak = json.loads(path.read_text()).get("peak_memory") or {}
        except (OSError, ValueError):
            continue
        if peak.get("device") == device_type and peak.get("bytes"):
            peaks.append(int(peak["bytes"]))
    return max(peaks) if peaks else None


def plan_jobs(
    requested: int | str, n_sequences: int, *, device_type: str, footprint: int | None, free: int | None, how: str
) -> tuple[int, int]:
    """(jobs, threads per job) for `--jobs requested`; HarnessError (exit 2) when that many cannot fit in memory.

    footprint: one sequence's peak memory (measured, else estimated: `how` says which); free: the device's free memory
    (CPU: MemAvailable; CUDA: free GPU memory); either None where unknown (then memory decides nothing)."""
    n_cores = cpu_cores()
    fits = None if footprint is None or free is None else max(0, int(free // (footprint * MEMORY_MARGIN)))
    if requested == "auto":
        n = n_cores if device_type == "cpu" else (fits or 1)
        n = max(1, min(n, n_sequences, fits if fits is not None else n))
    else:
        n = min(int(requested), n_sequences)  # more processes than sequences would only wait
        if fits is not None and n > max(fits, 1):
            raise HarnessError(
                f"--jobs {requested}: {n} sequences at once need about {MEM.gib(n * footprint * MEMORY_MARGIN)} on {device_type} "
                f"({MEM.gib(footprint)} each, {how}, plus a 10% margin) and {MEM.gib(free)} is free; at most {max(fits, 1)} "
                f"fit. Pass --jobs {max(fits, 1)} or --jobs auto."
            )
    return max(1, n), max(1, n_cores // max(1, n))


class Handle:
    def __init__(self, index: int, p: dict[str, Any], folder: Path):
        self.index, self.payload = index, p
        stem = f"{index:03d}-{p['label'].replace('/', '_')}-attempt{p['attempt']}"
        self.payload_file, self.result_file = folder / f"{stem}.payload.json", folder / f"{stem}.result.json"
        self.log = folder / f"{p['label'].replace('/', '_')}.log"
        self.process: subprocess.Popen | None = None


class ProcessBackend:
    """Up to `jobs` sequence processes at once on this machine; the driver mirrors their folders (mirrors_in_driver)."""

    mirrors_in_driver = True

    def __init__(self, exp_dir: Path, jobs: int, threads: int, device: str):
        self.jobs, self.threads, self.device = jobs, threads, device
        self.folder = Path(exp_dir) / "jobs"
        self.queue: list[Handle] = []
        self.running: list[Handle] = []
        self.count = 0

    def describe(self) -> str:
        where = f"{self.threads} CPU thread(s) each" if self.device == "cpu" else f"sharing {self.device}"
        return f"{self.jobs} local process(es) at once ({where}); logs under {self.folder}"

    def submit(self, payloads: list[dict]) -> list[Handle]:
        self.folder.mkdir(parents=True, exist_ok=True)
        handles = []
        for p in payloads:
            p = {**p, "config": {**p["config"], "job_cpus": self.threads}, "tracking": "driver"}
            h = Handle(self.count, p, self.folder)
            self.count += 1
            h.payload["log"] = str(h.log)
            atomic_write_json(h.payload_file, h.payload)
            handles.append(h)
        self.queue.extend(handles)
        self._start()
        return handles

    def _start(self) -> None:
        while self.queue and len(self.running) < self.jobs:
            h = self.queue.pop(0)
            h.result_file.unlink(missing_ok=True)
            h.process = subprocess.Popen(
                [sys.executable, "-m", "harness.launchers.process_job", str(h.payload_file), str(h.result_file)],
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            self.running.append(h)

    def poll(self, handles: list[Handle]) -> list[tuple[Handle, str, Any]]:
        out = []
        for h in list(self.running):
            rc = h.process.poll()
            if rc is None:
                continue
            self.running.remove(h)
            if h.result_file.is_file():
                out.append((h, "ok", json.loads(h.result_file.read_text())))
            else:
                out.append(
                    (
                        h,
                        "died",
                        f"exit code {rc}" if rc >= 0 else f"killed by signal {-rc} ({signal.Signals(-rc).name})",
                    )
                )
        self._start()
        return out

    def cancel(self, handles: list[Handle]) -> None:
        """Queued jobs never start; running ones get SIGTERM (they keep finished stages), then SIGKILL after STOP_GRACE_S."""
        self.queue = [h for h in self.queue if h not in handles]
        stopping = [h for h in self.running if h in handles]
        for h in stopping:
            if h.process.poll() is None:
                h.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for h in stopping:
            try:
                h.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                h.process.kill()
                h.process.wait()
        self.running = [h for h in self.running if h not in stopping]

    def log_of(self, handle: Handle) -> str:
        return str(handle.log)

    def close(self) -> None:
        self.cancel(list(self.running) + list(self.queue))


def local_backend(cfg, exp_dir: Path, n_sequences: int, estimate: MEM.Estimate | None) -> ProcessBackend:
    """The backend for `--jobs`: how many at once and with how many threads, from the cores and the memory a sequence
    takes (measured by this experiment's finished sequences, else the memory preflight's estimate)."""
    device = resolve_device(cfg.device)
    footprint, how = measured_footprint(exp_dir, device.type), "measured by a finished sequence of this experiment"
    if footprint is None and estimate is not None:
        footprint = estimate.total + (CPU_PROCESS_BYTES if device.type == "cpu" else 0)
        how = "estimated" + (
            " (the memory preflight's estimate plus the process itself)" if device.type == "cpu" else ""
        )
    jobs, threads = plan_jobs(
        cfg.jobs, n_sequences, device_type=device.type, footprint=footprint, free=MEM.free_memory(device), how=how
    )
    return ProcessBackend(exp_dir, jobs, threads, str(device) if device.type == "cuda" else "cpu")
