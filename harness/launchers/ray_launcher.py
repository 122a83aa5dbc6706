"""Sequences as Ray tasks: on an existing cluster (ray_address) or on a Ray started for the run on this machine.

Each job is one task with num_cpus=job_cpus, num_gpus=job_gpus and a fresh worker process
(max_calls=1: a sequence's model and memory go with its process, and GPU memory is released).
Ray's own retries are off: the driver retries a task whose worker or node died (see driver.py),
so it can say so and count. Output of each task goes to results/<experiment>/ray/<sequence>.log.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.launchers.job import forwarded_environment, run_sequence_job

LOOPBACK = ("127.", "localhost", "::1", "[::1]")
CONNECT_TIMEOUT_S = 10.0


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a plain "host:port" address; None for ray://, "auto" and the like."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _check_reachable(address: str) -> None:
    """Fail in seconds, not after Ray's minutes of retries, when nothing listens at the head's address."""
    hp = _host_port(address)
    if hp is None:
        return
    try:
        socket.create_connection(hp, timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise HarnessError(
            f"--ray-address {address}: nothing answers there ({exc.strerror or exc}). Start the head "
            "(`ray start --head --port PORT`) or fix the address; omit it to start Ray here."
        ) from None


def _import_ray(loopback: bool):
    if loopback:
        # Ray on this machine only stays on the loopback interface (no ports on the network), and a driver
        # must then not rewrite 127.0.0.1 into the machine's network address. Ray reads this switch at
        # import; it is the mode Ray uses on laptops (macOS/Windows): node address 127.0.0.1.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray  # lazy: Ray loads in ~0.3 s; only --launcher ray needs it
    except ImportError:
        raise HarnessError(
            "--launcher ray needs the `ray` package: pip install ray (the pinned version is in requirements.lock)"
        ) from None
    return ray


class RayBackend:
    def __init__(self, cfg, exp_dir: Path):
        self.cfg, self.address, self.exp_dir = cfg, cfg.ray_address, exp_dir
        if self.address:
            _check_reachable(self.address)
        loopback = self.address is None or (_host_port(self.address) or ("",))[0].startswith(LOOPBACK)
        ray = self.ray = _import_ray(loopback)
        kw = dict(log_to_driver=False, logging_level=logging.ERROR)
        try:
            if self.address:
                ray.init(address=self.address, **kw)
            else:
                ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", **kw)
        except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError, ...
            where = f"the Ray cluster at {self.address}" if self.address else "a local Ray"
            raise HarnessError(
                f"--launcher ray: cannot start or reach {where}: {exc}. Check --ray-address "
                "(host:port of `ray start --head`, or ray://host:10001), or omit it to start Ray here."
            ) from None
        self._check_fits()

        # The driver's settings (cache folder, offline hub, MLflow credentials) in the worker's environment
        # from its start, before anything is imported there.
        self.remote = ray.remote(
            num_cpus=cfg.job_cpus, num_gpus=cfg.job_gpus, max_retries=0, retry_exceptions=False, max_calls=1
        )(run_sequence_job).options(name="harness-sequence", runtime_env={"env_vars": forwarded_environment()})
        self.logs: dict[Any, str] = {}

    def _check_fits(self) -> None:
        """A task no node can hold stays pending forever in Ray: refuse it now instead."""
        nodes = [n.get("Resources", {}) for n in self.ray.nodes() if n.get("Alive")]
        if not any(r.get("CPU", 0) >= self.cfg.job_cpus and r.get("GPU", 0) >= self.cfg.job_gpus for r in nodes):
            biggest = ", ".join(f"{r.get('CPU', 0):g} CPU/{r.get('GPU', 0):g} GPU" for r in nodes) or "no live node"
            self.close()
            raise HarnessError(
                f"--job-cpus {self.cfg.job_cpus} --job-gpus {self.cfg.job_gpus}: no node of the Ray cluster has that "
                f"much ({biggest}). Lower them or add nodes."
            )

    def describe(self) -> str:
        res = self.ray.cluster_resources()
        where = f"the Ray cluster at {self.address}" if self.address else "a local Ray on 127.0.0.1"
        return (
            f"{where} ({res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs; each job {self.cfg.job_cpus} CPU(s), "
            f"{self.cfg.job_gpus:g} GPU(s), up to {self.cfg.job_retries} retries)"
        )

    def submit(self, payloads: list[dict]) -> list[Any]:
        refs = []
        for p in payloads:  # a Ray job's output goes to results/<experiment>/ray/<label>.log
            p = {**p, "log": str(Path(self.exp_dir).resolve() / "ray" / f"{p['label'].replace('/', '_')}.log")}
            ref = self.remote.remote(p)
            self.logs[ref] = p["log"]
            refs.append(ref)
        return refs

    def poll(self, handles: list[Any]) -> list[tuple[Any, str, Any]]:
        """Finished tasks: ("ok", the job's dict), ("failed", traceback) for an exception, ("died", why) for a lost worker."""
        ray = self.ray
        from ray import exceptions as rex  # lazy: Ray loads in ~0.3 s; only --launcher ray needs it

        ready, _ = ray.wait(handles, num_returns=len(handles), timeout=0)
        out = []
        for ref in ready:
            try:
                out.append((ref, "ok", ray.get(ref)))
            except rex.RayTaskError as exc:  # the job raised: a bug or a broken environment, not a lost worker
                out.append((ref, "failed", str(exc)))
            except rex.RuntimeEnvSetupError as exc:
                out.append((ref, "failed", f"the worker's environment could not be set up: {exc}"))
            except rex.RayError as exc:  # worker crashed or killed, node died, out of memory, object lost
                out.append(
                    (
                        ref,
                        "died",
                        f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
                    )
                )
        return out

    def cancel(self, handles: list[Any]) -> None:
        for ref in handles:
            try:
                self.ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - already finished or its worker already gone
                pass

    def log_of(self, handle: Any) -> str:
        return self.logs.get(handle) or "the Ray worker logs"

    def close(self) -> None:
        """Disconnect (an existing cluster keeps running); a Ray started for the run stops with it."""
        if self.ray.is_initialized():
            self.ray.shutdown()
