"""`harness bench --profile`: where a training step's time goes (torch.profiler), the same on CPU and CUDA.

Per step: operator calls (aten ops as dispatched, nested ones included), kernels launched (CUDA), host
time (the step's wall clock on the CPU side), device time (the sum of kernel times; on CPU there is none:
the host does the arithmetic), and host-device synchronisations (a tensor read on the host:
aten::_local_scalar_dense / .item(); cudaStreamSynchronize / cudaDeviceSynchronize). A step whose device
time is far below its host time is launch-bound: the GPU waits for Python and the dispatcher.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

SYNC_EVENTS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize")


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_step(step: Callable[[], object], device: torch.device, *, steps: int = 5, top: int = 8) -> dict:
    """Profile `steps` calls of `step` (after one untimed call) and summarise them per step."""
    step()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        host_s = (time.perf_counter() - t0) / steps  # launches only: the device may still be working
        sync(device)
        wall_s = (time.perf_counter() - t0) / steps
    events = prof.events()
    names = Counter(e.name for e in events)
    aten = sum(n for k, n in names.items() if k.startswith("aten::"))
    kernels = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    device_s = sum(e.device_time for e in kernels) / 1e6 / steps if kernels else None  # device_time in microseconds
    self_cpu = Counter()
    for e in events:
        if e.name.startswith("aten::"):
            self_cpu[e.name] += e.self_cpu_time_total / 1e6 / steps
    return {
        "steps": steps,
        "wall_s": wall_s,
        "host_s": host_s,
        "device_s": device_s,
        "device_busy_frac": device_s / wall_s if device_s is not None else None,
        "aten_ops": aten / steps,
        "kernels": len(kernels) / steps if device.type == "cuda" else None,
        "syncs": sum(names[k] for k in SYNC_EVENTS) / steps,
        "top_ops_self_cpu_s": dict(self_cpu.most_common(top)),
    }


def format_profile(name: str, p: dict) -> str:
    dev = (
        f"device {p['device_s'] * 1e3:.1f} ms ({100 * p['device_busy_frac']:.0f}% busy), {p['kernels']:.0f} kernels"
        if p["device_s"] is not None
        else "device: none (CPU)"
    )
    top = ", ".join(f"{k.removeprefix('aten::')} {v * 1e3:.1f}" for k, v in list(p["top_ops_self_cpu_s"].items())[:5])
    return (
        f"{name:<22} wall {p['wall_s'] * 1e3:8.1f} ms  host {p['host_s'] * 1e3:8.1f} ms  {dev}  "
        f"{p['aten_ops']:.0f} aten ops  {p['syncs']:.1f} syncs/step\n{'':<22} self-CPU ms: {top}"
    )
