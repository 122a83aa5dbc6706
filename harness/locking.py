"""One process per sequence folder: a POSIX record lock on `<sequence>/.lock`.

fcntl.lockf (POSIX byte-range locks) is used rather than flock: Linux NFS clients implement POSIX
locks through the server (NFSv4, or lockd for v3), so two machines sharing a results folder see
each other's locks. The kernel drops the lock when its process dies, however it dies, so "the
folder's lock is not held" is exactly "nobody is working on it": a RUNNING MLflow run whose
folder is not locked was interrupted (SIGKILL, node lost) and can be resumed.

The lock file also records who holds it (host, pid, since) so a refusal can name the holder. Under
torchrun / accelerate launch rank 0 alone takes the lock, for all ranks of the launch (harness/run/sequence.py).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from harness.errors import HarnessError

LOCK_NAME = ".lock"


class SequenceLockedError(HarnessError):
    """Another process works on this sequence folder."""


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"])) if "since" in info else "?"
        return f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, since {since}"
    except (OSError, ValueError):
        return "an unknown process"


def _locked(run_dir: Path, holder: str) -> SequenceLockedError:
    return SequenceLockedError(
        f"{run_dir} is being run by another process ({holder}). Wait for it to finish, "
        "pass --wait-for-lock true to wait here, or stop that process first."
    )


def refuse_if_held(run_dir: Path) -> None:
    """SequenceLockedError naming the holder when another process holds the folder's lock (a probe, as is_locked)."""
    if not is_locked(run_dir):
        return
    try:
        fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        raise _locked(run_dir, "an unknown process") from None
    try:
        holder = _holder(fd)
    finally:
        os.close(fd)
    raise _locked(run_dir, holder)


class SequenceLock:
    """Hold the lock of one sequence folder for the life of a `with` block (or until release())."""

    def __init__(self, run_dir: Path, *, wait: bool = False, poll_s: float = 2.0):
        self.path = Path(run_dir) / LOCK_NAME
        self.wait, self.poll_s = wait, poll_s
        self.fd: int | None = None

    def acquire(self, on_wait=None) -> "SequenceLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        announced = False
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                holder = _holder(fd)
                if not self.wait:
                    os.close(fd)
                    raise _locked(self.path.parent, holder) from None
                if not announced and on_wait is not None:
                    on_wait(holder)
                    announced = True
                time.sleep(self.poll_s)
        info = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "SequenceLock":
        return self.acquire() if self.fd is None else self

    def __exit__(self, *exc) -> None:
        self.release()


def is_locked(run_dir: Path) -> bool | None:
    """Whether some process holds the folder's lock; None when the folder cannot be inspected here."""
    path = Path(run_dir) / LOCK_NAME
    if not Path(run_dir).is_dir():
        return None
    if not path.exists():
        return False
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        # A probe lock from THIS process succeeds if no other process holds one. POSIX locks are
        # per process: callers must not probe a folder they hold themselves.
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.lockf(fd, fcntl.LOCK_UN)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)
