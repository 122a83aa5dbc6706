"""The page's run dates: when an experiment's runs started, to the minute (the start times MLflow recorded)."""

from __future__ import annotations

import datetime as _dt

from harness.analysis.runs import MergeRun, SequenceRun


def run_dates(runs: list[SequenceRun] | list[MergeRun]) -> str:
    """The start minute of the runs, or the range from the first to the last."""
    starts = [r.start_time_ms for r in runs if r.start_time_ms]
    if not starts:
        return "—"

    def minute(ms: int) -> str:
        return _dt.datetime.fromtimestamp(ms / 1000, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    first, last = minute(min(starts)), minute(max(starts))
    return first if first == last else f"{first} – {last}"
