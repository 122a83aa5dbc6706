"""Where and how models run: cache folder, torch threads, device and dtype, hub access, cache entries."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from filelock import FileLock  # a dependency of huggingface_hub and transformers

from harness.errors import HarnessError
from harness.parsing import parse_bool

# One logger for the whole package, named as before the split into submodules.
logger = logging.getLogger("harness.models")

# Written last into a cache entry (before the atomic rename); an entry without it is garbage.
COMPLETE_MARKER = ".complete.json"


def default_cache_dir() -> Path:
    """Where converted models and trained tokenizers live.

    ``$HARNESS_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/lori-harness``, else
    ``~/.cache/lori-harness``.
    """
    explicit = os.environ.get("HARNESS_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lori-harness"


def cpu_cores() -> int:
    """The CPUs this process may run on.

    ``os.cpu_count()`` counts the whole machine, which oversubscribes a CPU-limited container
    (taskset / cgroup cpusets); the affinity mask is what we actually get.
    """
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no sched_getaffinity
        return os.cpu_count() or 1


def set_torch_threads(n: int | None = None) -> int:
    """Give torch n CPU threads (default: every core this process may use); returns the number.

    OMP_NUM_THREADS, when the environment sets it, caps the number, as it caps torch's own default: several processes
    sharing a machine (a test suite's workers, a user's own jobs) each set it to their share, because threads beyond
    the cores make every process slower (two 2-thread tiny-model runs on 2 cores took 46 s, two 1-thread runs 27 s).
    """
    n = cpu_cores() if n is None else n
    cap = os.environ.get("OMP_NUM_THREADS", "").strip()
    if cap.isdigit() and int(cap) > 0:
        n = min(n, int(cap))
    torch.set_num_threads(max(1, n))
    return max(1, n)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn ``"auto" | "cpu" | "cuda" | "cuda:N"`` into a usable torch.device.

    ``auto`` picks CUDA when available, else CPU (MPS is deliberately not auto-selected: bf16
    and some kernels used in training are incomplete there). Asking for CUDA where there is
    none raises HarnessError instead of failing later inside a kernel.
    """
    text = str(device).strip().lower()
    if text == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match:
        if not torch.cuda.is_available():
            raise HarnessError(
                f"device '{device}' was requested but CUDA is not available here "
                f"(torch {torch.__version__}, built for CUDA: {torch.version.cuda or 'no'}). "
                "Use device 'cpu' or 'auto', or install a CUDA build of torch on a GPU machine."
            )
        index = match.group(1)
        if index is not None and int(index) >= torch.cuda.device_count():
            raise HarnessError(
                f"device '{device}' was requested but only {torch.cuda.device_count()} CUDA "
                f"device(s) are visible (cuda:0..cuda:{torch.cuda.device_count() - 1})."
            )
        return torch.device(text)
    raise HarnessError(f"unknown device '{device}': use 'auto', 'cpu', 'cuda' or 'cuda:N'.")


_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


AUTO_DTYPE = torch.float32  # what dtype auto means for a model of up to AUTO_BF16_ABOVE parameters, on CPU and CUDA
AUTO_BF16_ABOVE = 1_000_000_000  # parameters; above, auto is bf16 (docs/precision.md: "dtype: auto by size")


def resolve_dtype(
    dtype: str | torch.dtype, device: str | torch.device = "cpu", params: int | None = None
) -> torch.dtype:
    """Turn a dtype name into a torch.dtype for weights on ``device``.

    ``auto`` is float32 up to AUTO_BF16_ABOVE parameters (README "Precision": on the H200 a bf16 base was slower for
    the default model) and bfloat16 above it, where fp32 weights alone are 4 bytes a parameter (32 GB for an 8B model)
    and a bf16 base with fp32 adapters kept LoRI-S's result within the seed spread (docs/precision.md). ``params``
    unknown: float32. Accepts bf16/bfloat16, fp16/float16, fp32/float32.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    text = str(dtype).strip().lower()
    if text == "auto":
        return torch.bfloat16 if params is not None and params > AUTO_BF16_ABOVE else AUTO_DTYPE
    if text in _DTYPES:
        return _DTYPES[text]
    raise HarnessError(f"unknown dtype '{dtype}': use 'auto', 'bf16' (bfloat16), 'fp16' (float16) or 'fp32' (float32).")


def downloads_allowed() -> bool:
    """Whether hub downloads are allowed: off unless explicitly turned on.

    - ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``): off, always.
    - ``HF_HUB_OFFLINE=0`` or ``HARNESS_ALLOW_DOWNLOADS=1``: on (GPU users with hub access).
    - neither set: off. The harness must never hang on a network it does not have, and a run
      should not silently fetch 16 GB; models come from the local HF cache or a local path.
    """
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if parse_bool(os.environ.get(var, "")) is True:
            return False
    if parse_bool(os.environ.get("HF_HUB_OFFLINE", "")) is False:
        return True
    return parse_bool(os.environ.get("HARNESS_ALLOW_DOWNLOADS", "")) is True


def _hf_hub_cache() -> Path:
    """The HF hub cache folder, read from the environment NOW.

    huggingface_hub freezes its constants at import time; reading the variables at call time
    lets tests (and callers) point HF_HOME elsewhere after import.
    """
    env = os.environ
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            return Path(os.path.expandvars(env[var])).expanduser()
    if env.get("HF_HOME"):
        return Path(os.path.expandvars(env["HF_HOME"])).expanduser() / "hub"
    xdg = env.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


# --------------------------------------------------------------------------- atomic cache entries


def _is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


def _build_atomically(final: Path, build: Callable[[Path], dict], what: str) -> Path:
    """Make sure ``final`` holds a finished cache entry, building it with ``build(tmp_dir)``.

    The entry is built in a temp dir beside ``final``, the marker is written last, and the temp
    dir is renamed into place, so a killed process never leaves a ``final`` that looks finished.
    A file lock keeps concurrent runs from converting twice; because a dead process releases its
    lock, any temp dir found while holding the lock is a leftover and is removed.
    """
    if _is_complete(final):
        return final

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = f".{final.name}.tmp-"
    with FileLock(str(final.parent / f".{final.name}.lock")):
        if _is_complete(final):  # another process finished while we waited
            return final
        for leftover in final.parent.glob(tmp_prefix + "*"):
            logger.info("removing leftover of an interrupted %s: %s", what, leftover)
            shutil.rmtree(leftover, ignore_errors=True)
        if final.exists():
            logger.info("removing unfinished %s (no %s): %s", what, COMPLETE_MARKER, final)
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix, dir=final.parent))
        try:
            info = build(tmp)
            (tmp / COMPLETE_MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
            tmp.chmod(0o755)  # mkdtemp makes it private (0700); a cache may be shared
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def device_name(device: torch.device) -> str:
    """What a measurement ran on, in words (the GPU's name, or the CPU's thread count)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"
