"""Fault injection for crash tests: stop dead at a named point so a test can SIGKILL the run there.

HARNESS_FAULT_PAUSE=<point>[:<stage>] makes the run, on reaching that point (of that stage, if
given), write `<sequence>/.paused-<point>` and sleep until killed. Tests wait for the file instead
of guessing with sleeps. Points: mid-train (after a mid-stage checkpoint), checkpoint-write (inside
a checkpoint's temp folder, half written), eval (inside a stage's evaluation), mlflow (after a stage
is committed to disk, halfway through mirroring it to MLflow), between-stages.
Unset (always, outside tests), pause() is a no-op.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "HARNESS_FAULT_PAUSE"


def pause(point: str, run_dir: Path, stage: int | None = None) -> None:
    want = os.environ.get(ENV)
    if not want:
        return
    name, _, at = want.partition(":")
    if name != point or (at and stage is not None and int(at) != stage):
        return
    (Path(run_dir) / f".paused-{point}").write_text(str(os.getpid()))
    while True:  # until SIGKILL
        time.sleep(60)
