"""Fault injection for crash tests: stop dead at a named point so a test can SIGKILL the run there.

HARNESS_FAULT_PAUSE=<point>[:<stage>][,<point>[:<stage>]...] makes the run, on reaching one of those
points (of that stage, if given), write `<sequence>/.paused-<point>` and wait until it is killed, or
until the test deletes that file (then the run goes on: a test can stop a server or fill the disk
while the run waits). Tests wait for the file instead of guessing with sleeps. Points: mid-train
(after a mid-stage checkpoint), checkpoint-write (inside a checkpoint's temp folder, half written),
eval (inside a stage's evaluation), mlflow (after a stage is committed to disk, halfway through
mirroring it to MLflow), between-stages.
Unset (always, outside tests), pause() is a no-op.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "HARNESS_FAULT_PAUSE"


def _wanted(point: str, stage: int | None) -> bool:
    for item in os.environ.get(ENV, "").split(","):
        name, _, at = item.strip().partition(":")
        if name == point and (not at or stage is None or int(at) == stage):
            return True
    return False


def pause(point: str, run_dir: Path, stage: int | None = None) -> None:
    if not os.environ.get(ENV) or not _wanted(point, stage):
        return
    marker = Path(run_dir) / f".paused-{point}"
    marker.write_text(str(os.getpid()))
    while marker.exists():  # until SIGKILL, or until the test removes the file
        time.sleep(0.05)
