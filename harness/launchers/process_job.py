"""One `--jobs` process: `python -m harness.launchers.process_job PAYLOAD RESULT` runs one sequence or merge unit.

It runs job.run_sequence_job on the payload the driver wrote (plain data, as for Ray and Slurm) and writes its
answer to RESULT atomically; a process that ends without RESULT died (the driver retries it). SIGTERM, the
driver's stop, ends it as Ctrl-C ends a run: finished stages kept, nothing half-written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from harness.io import atomic_write_json
from harness.launchers.job import run_merge_job, run_sequence_job
from harness.run.console import install_signal_handlers


def main(argv: list[str]) -> int:
    payload_file, result_file = Path(argv[0]), Path(argv[1])
    install_signal_handlers()
    try:
        payload = json.loads(payload_file.read_text())
        result = (run_merge_job if payload.get("kind") == "merge" else run_sequence_job)(payload)
    except KeyboardInterrupt:
        return 130
    atomic_write_json(result_file, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
