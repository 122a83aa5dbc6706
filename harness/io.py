"""Atomic file writes: a file that matters is either complete or absent (temp file + rename).

A full disk (ENOSPC, a quota) while writing one is raised as DiskFullError (exit 2): how much was needed,
where, and what to do; the temporary file or folder is removed, so nothing is half-committed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import yaml

from harness.errors import DiskFullError

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# safetensors (Rust) reports the OS error in its message, not as an OSError; sqlite says "database or disk is full".
_FULL_TEXT = ("os error 28", "No space left on device", "Disk quota exceeded", "database or disk is full")


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
        return True
    return any(text in str(exc) for text in _FULL_TEXT)


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def tree_size(path: Path) -> int:
    """Bytes of the files under path (0 if it does not exist)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def disk_full(where: Path, needed: int | None, what: str) -> DiskFullError:
    """The one message for a full disk: what was being written, how much it needed, what is free where, what to do."""
    probe = Path(where)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = f"{human_bytes(shutil.disk_usage(probe).free)} free"
    except OSError:
        free = "free space unknown"
    need = f"about {human_bytes(needed)}" if needed else "more than was left"
    return DiskFullError(
        f"no space left on the disk of {where} ({free}) while writing {what}, which needs {need}. "
        "Free space there (or use a --results-dir on a larger disk) and run the command again: "
        "what was committed before is intact, nothing was half-written."
    )


def disk_full_error(exc: BaseException) -> DiskFullError | None:
    """The one message for exc if it is a full disk (e.g. a figure written in place), else None."""
    if not is_disk_full(exc):
        return None
    where = Path(getattr(exc, "filename", None) or ".")
    return disk_full(where.parent if where.suffix else where, None, where.name or str(where))


def check_free_space(where: Path, needed: int, what: str) -> None:
    """Refuse (DiskFullError) before writing `needed` bytes under `where` when the disk has less free."""
    probe = Path(where)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if shutil.disk_usage(probe).free < needed:
        raise disk_full(where, needed, what)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full(path.parent, len(data), path.name) from None
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if is_disk_full(exc):
            raise disk_full(path.parent, len(data), path.name) from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_yaml(path: Path, obj: Any) -> None:
    atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False))


@contextlib.contextmanager
def atomic_dir(final: Path, need: int | None = None) -> Iterator[Path]:
    """Build a folder under a temporary name and rename it into place only if the block succeeds.

    need: about how many bytes the folder takes, for the message when the disk fills up (DiskFullError)."""
    final = Path(final)
    tmp = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name}-"))
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except Exception as exc:
        if not (isinstance(exc, DiskFullError) or is_disk_full(exc)):
            raise
        written = tree_size(tmp) if tmp is not None else 0
        raise disk_full(final.parent, max(need or 0, written), f"{final.name}/") from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())
