"""What the driver shows while jobs run elsewhere: one line per finished stage and sequence, one bar.

It reads the run folders, not the workers' output: a stage exists for everyone once its folder
`stages/<t>-<name>/` holds `stage.json` (committed by atomic rename), so the driver sees the same
progress whatever launcher, node or retry produced it, and a driver that comes back (`harness
resume`) counts what is already done.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm

from harness.run.console import done_line, stage_line
from harness.run.folder import STAGE_MARKER, committed_stages
from harness.run.planning import SequenceSpec


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # not there yet, or on a filesystem that shows it late
        return None


def committed_stage_line(label: str, stage_dir: Path, n_stages: int) -> str | None:
    """The line a local run prints for a finished stage, rebuilt from the stage's files (None: not readable yet)."""
    info, ev = _read(stage_dir / STAGE_MARKER), _read(stage_dir / "eval.json")
    if info is None or ev is None:
        return None
    return stage_line(label, n_stages, info, ev, _read(stage_dir / "train.json"))


class StageMonitor:
    """Polls the run folders of the dispatched sequences; prints new stages; one tqdm bar (stages done / total)."""

    def __init__(self, specs: list[SequenceSpec], *, progress: bool = True):
        self.specs = specs
        self.n_stages = {s.run_dir: len(s.stages) for s in specs}  # the plan's stages (planning.plan fills them)
        # Stage 0 (the base model) is a committed stage too when the plan's schedule has one.
        with_base = {s.run_dir: s.schedule is None or s.schedule.base_stage for s in specs}
        self.total = sum(n + with_base[d] for d, n in self.n_stages.items())
        self.seen: set[Path] = set()
        self.finished: set[Path] = set()

        self.bar = tqdm(
            total=self.total,
            desc="stages",
            unit="stage",
            file=sys.stderr,
            disable=not progress,
            dynamic_ncols=True,
            leave=True,
        )
        already = self._committed()
        if already:
            self.seen |= already
            self.bar.update(len(already))
            self.say(f"{len(already)} of {self.total} stages already committed: they are skipped")

    def say(self, msg: str) -> None:
        if self.bar.disable:
            print(msg, file=sys.stderr, flush=True)
        else:
            self.bar.write(msg, file=sys.stderr)

    def _committed(self, spec: SequenceSpec | None = None) -> set[Path]:
        return {p for s in ([spec] if spec else self.specs) for p in committed_stages(s.run_dir).values()}

    def poll(self) -> None:
        """Print every stage committed since the last poll, in stage order per sequence."""
        for spec in self.specs:
            if spec.run_dir in self.finished:  # its stages were all shown when it finished
                continue
            new = sorted(self._committed(spec) - self.seen, key=lambda p: int(p.name.split("-", 1)[0]))
            for stage_dir in new:
                line = committed_stage_line(spec.label, stage_dir, self.n_stages[spec.run_dir])
                if line is None:
                    continue  # its files are not all visible yet: next poll
                self.seen.add(stage_dir)
                self.bar.update(1)
                self.say(line)

    def sequence_done(self, spec: SequenceSpec, summary: dict) -> None:
        self.poll()
        if spec.run_dir not in self.finished:
            self.finished.add(spec.run_dir)
            self.say(done_line(spec.label, summary))

    def close(self) -> None:
        self.bar.close()
