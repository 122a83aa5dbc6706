"""One experiment as the report reads it: its run folders (folders.py, merge_folders.py) and, from MLflow, only
what lives there (tracked.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from harness.analysis.runs import INTERRUPTED, RUNNING, MergeRun, SequenceRun, UnfinishedRun
from harness.errors import HarnessError
from harness.report.folders import experiment_folder, no_finished_message, read_sequences
from harness.report.merge_folders import read_merges
from harness.report.tracked import Tracked, read_tracked


@dataclass
class ExperimentRuns:
    """What the report reads from one experiment: its finished runs and the ones it lists apart."""

    name: str
    folder: Path
    tracked: Tracked
    runs: list[SequenceRun]
    skipped: list[tuple[str, str, str]]  # (run id, run name, status) of sequences not finished
    interrupted: list[UnfinishedRun] = field(default_factory=list)  # stopped before their summary: to resume
    running: list[UnfinishedRun] = field(default_factory=list)  # a process holds their folder's lock
    merges: list[MergeRun] = field(default_factory=list)  # finished `harness merge` runs
    merge_skipped: list[tuple[str, str, str]] = field(default_factory=list)  # merge runs not finished


def read_experiment(experiment: str | None, results_dir: Path, uri: str) -> ExperimentRuns:
    """The finished sequences and merges of one experiment folder under results_dir (and the unfinished ones);
    HarnessError when there are none of either kind. experiment=None picks the only experiment folder."""
    exp_dir = experiment_folder(Path(results_dir), experiment)
    tracked = read_tracked(exp_dir.name, uri)
    runs, unfinished = read_sequences(exp_dir, tracked)
    merges, merge_skipped = read_merges(exp_dir, tracked)
    if not runs and not merges:
        msg = no_finished_message(exp_dir.name, unfinished)
        if merge_skipped:
            msg += f"; nor FINISHED merge runs ({len(merge_skipped)} not finished: rerun `harness merge`, it resumes)"
        raise HarnessError(msg)
    return ExperimentRuns(
        name=exp_dir.name,
        folder=exp_dir,
        tracked=tracked,
        runs=runs,
        skipped=[(u.run_id or str(u.run_dir), u.run_name, u.status) for u in unfinished],
        interrupted=[u for u in unfinished if u.state == INTERRUPTED],
        running=[u for u in unfinished if u.state == RUNNING],
        merges=merges,
        merge_skipped=merge_skipped,
    )
