"""Where a result came from besides its config: the harness code's git commit."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path


@functools.cache
def git_commit() -> str:
    """The checkout's commit, read once per process: the code in memory is the code of its first read (a commit made
    while a run goes on is not what it runs), and a stage record needs no git process each."""
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=Path(__file__).parent,
            ).stdout.strip()
            or "unknown"
        )
    except Exception:
        return "unknown"
