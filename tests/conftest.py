"""Test-wide settings: offline, telemetry off, one model cache per checkout (built once, reused)."""

import os
import signal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "true"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("HARNESS_CACHE_DIR", str(ROOT / ".cache" / "models"))
os.environ.pop("MLFLOW_TRACKING_URI", None)
# Several test workers share the cores: each gets its share of torch threads (harness.models.set_torch_threads reads
# the cap; its subprocesses inherit it). Threads beyond the cores made the suite ~40% slower on 2 cores.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // _workers)))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in-process tests that never call set_torch_threads


def sigint_at_default() -> None:
    """preexec_fn for a child that a test will Ctrl-C: a terminal's foreground process has SIGINT at its default,
    but a shell without job control starts background commands (CI run with `&`) with it ignored, and that is inherited."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
