"""The merge table of docs/merging.md, generated from committed merge evidence (results/evidence/merge-r<rank>/).

One evidence table per adapter rank, each holding `harness merge` runs (method x seed) collected with
`harness evidence RUN_FOLDER --table NAME`. Per rank and merge (`combination@protocol`), each method's mean
normalised accuracy over its seeds with the t interval over seeds (the test documents' shared noise added:
harness.analysis.over_seeds), the weight each seed's `tuned` merge chose, and the best method against each other
one: the paired t over seeds, Holm-adjusted within the row. The row "alone" is each adapter on its own task (the
mean of S[j, j] over tasks, its interval over seeds alone): the capacity check. A second table puts each method's
last rank against its first on the same seeds (each p alone). A method with fewer than `min_seeds` seeds at a rank is
named as missing. Merge runs are read as the report reads them (harness.report.merge_folders), never from MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from harness.analysis import over_seeds as OS
from harness.analysis.intervals import fmt_holm_verdict, fmt_p, fmt_seed_ci
from harness.analysis.merging import NORM, merge_unit
from harness.analysis.naming import display_name, method_sort_key, num_sort_key
from harness.analysis.runs import MergeRun
from harness.errors import HarnessError
from harness.io import read_json
from harness.report.merge_folders import load_merge
from harness.report.tracked import Tracked
from harness.tools.evidence import EVIDENCE_DIR, MERGE_MARK

ALONE = "alone: mean S[j, j]"


@dataclass(frozen=True)
class MergeTable:
    """Merge runs at several adapter ranks (one evidence table per rank)."""

    name: str
    ranks: tuple[tuple[str, str], ...]  # (rank label, evidence table)
    methods: tuple[str, ...]  # the methods the table should hold, in display order
    merges: tuple[str, ...] = ()  # the `combination@protocol` rows shown (empty: every merge the runs made)
    between_ranks: bool = True  # also each method's last rank against its first
    min_seeds: int = 3


def read_merge_table(table_dir: Path) -> list[MergeRun]:
    """Every merge run of an evidence table, by method then seed; HarnessError when it holds none."""
    folders = sorted({p.parent for p in Path(table_dir).rglob(MERGE_MARK)})
    if not folders:
        raise HarnessError(
            f"{table_dir}: no merge evidence here; collect some with `harness evidence RESULTS/<experiment> "
            f"--table {Path(table_dir).name}`"
        )
    offline = Tracked(client=None, uri="")
    runs = [
        load_merge(f, read_json(f / "summary.json"), yaml.safe_load((f / "config.yaml").read_text()) or {}, offline)
        for f in folders
    ]
    return sorted(runs, key=lambda r: (method_sort_key(r.method), num_sort_key(r.seed)))


def _alone(runs: list[MergeRun]) -> dict[str, float]:
    """seed -> the mean over tasks of each adapter alone on its own task."""
    return {r.seed: float(np.mean([r.single[t] for t in r.tasks])) for r in runs}


def _weights(runs: list[MergeRun], combination: str) -> str:
    picks = [r.merges[combination] for r in runs if combination in r.merges]
    if not picks or any(e.get("chosen_weight") is None for e in picks):
        return ""
    return " (" + ", ".join(f"{e['chosen_weight']:g}" + ("*" if e["at_grid_end"] else "") for e in picks) + ")"


def _verdict(tests: list[OS.SeedTest]) -> str:
    return "; ".join(f"{display_name(t.a)} − {display_name(t.b)} {fmt_holm_verdict(t)}" for t in tests)


def _family(means: dict[str, float | None], test) -> list[OS.SeedTest]:
    """The best method (highest mean) against each other one, Holm-adjusted together; none without 2 finite means."""
    ranked = sorted((m for m, v in means.items() if v is not None and np.isfinite(v)), key=lambda m: -means[m])
    tests = [test(ranked[0], other) for other in ranked[1:]]
    OS.holm_adjust([t for t in tests if t.p is not None])
    return tests


def _rank_rows(label: str, runs: list[MergeRun], methods: list[str], shown: tuple[str, ...]) -> list[str]:
    by = {m: [r for r in runs if r.method == m] for m in methods}
    alone = {m: _alone(by[m]) for m in methods}
    intervals = {m: OS.values_interval(list(alone[m].values())) for m in methods}
    tests = _family(
        {m: intervals[m].mean for m in methods}, lambda a, b: OS.values_test(alone[a], alone[b], ALONE, (a, b))
    )
    rows = [
        f"| {label} | {ALONE} | " + " | ".join(fmt_seed_ci(intervals[m]) for m in methods) + f" | {_verdict(tests)} |"
    ]
    for c in (c for c in dict.fromkeys(c for r in runs for c in r.merges) if not shown or c in shown):
        units = {m: [merge_unit(r, c) for r in by[m] if c in r.merges] for m in methods}
        cis = {m: OS.seed_interval(units[m], NORM) for m in methods}
        tests = _family({m: cis[m].mean for m in methods}, lambda a, b: OS.seed_test(units[a], units[b], NORM, (a, b)))
        cells = [fmt_seed_ci(cis[m]) + _weights(by[m], c) if units[m] else "—" for m in methods]
        rows.append(f"| {label} | `{c}` | " + " | ".join(cells) + f" | {_verdict(tests)} |")
    return rows


def _between_ranks(table: MergeTable, read: dict[str, list[MergeRun]], methods: list[str]) -> list[str]:
    """Per method, the last rank minus the first on the same seeds (the paired t over seeds, each p alone)."""
    (lo, lo_runs), (hi, hi_runs) = (
        (table.ranks[0][0], read[table.ranks[0][0]]),
        (table.ranks[-1][0], read[table.ranks[-1][0]]),
    )
    combos = [
        c
        for c in dict.fromkeys(c for r in lo_runs + hi_runs for c in r.merges)
        if not table.merges or c in table.merges
    ]
    out = [
        f"| method | rank {hi} − rank {lo} (paired t over seeds, each p alone): {ALONE} | "
        + " | ".join(f"`{c}`" for c in combos)
        + " |",
        "|---" * (len(combos) + 2) + "|",
    ]
    for m in methods:
        a, b = [r for r in hi_runs if r.method == m], [r for r in lo_runs if r.method == m]
        tests = [OS.values_test(_alone(a), _alone(b), ALONE, (m, m))]
        for c in combos:
            tests.append(
                OS.seed_test(
                    [merge_unit(r, c) for r in a if c in r.merges], [merge_unit(r, c) for r in b if c in r.merges], NORM
                )
            )
        cells = ["—" if t.p is None else f"{fmt_seed_ci(t, True)}, {fmt_p(t.p)}" for t in tests]
        out.append(f"| {display_name(m)} | " + " | ".join(cells) + " |")
    return out


def _seeds_lines(table: MergeTable, read: dict[str, list[MergeRun]], methods: list[str]) -> list[str]:
    """Which seeds each cell has, and the cells with fewer than min_seeds (never filled from other settings)."""

    def seeds(runs: list[MergeRun], m: str) -> list[str]:
        return sorted((r.seed for r in runs if r.method == m), key=num_sort_key)

    listed = " | ".join(
        f"rank {k}: " + "; ".join(f"{display_name(m)} {', '.join(seeds(runs, m)) or 'none'}" for m in methods)
        for k, runs in read.items()
    )
    short = [
        f"rank {k} {display_name(m)} {len(seeds(runs, m))}/{table.min_seeds}"
        for k, runs in read.items()
        for m in methods
        if len(seeds(runs, m)) < table.min_seeds
    ]
    missing = f"Missing (fewer than {table.min_seeds} seeds): {', '.join(short)}." if short else "No cell is missing."
    notes = [f"{r.method} seed {r.seed}: {n}" for runs in read.values() for r in runs for n in r.notes]
    return [f"Seeds: {listed}.", "", missing] + (["", "Notes: " + "; ".join(notes) + "."] if notes else [])


def _paper_line(dirs: list[Path], methods: list[str]) -> str:
    """The `paper` protocol's per-adapter weights as the runs recorded them (summary.json's protocol_weights), and
    how to read the `tuned` brackets."""
    weights: dict[str, set[str]] = {}
    for f in sorted(p.parent for d in dirs for p in Path(d).rglob(MERGE_MARK)):
        summary = read_json(f / "summary.json")
        w = (summary.get("protocol_weights") or {}).get("paper")
        if w:
            weights.setdefault(summary["method"], set()).add(", ".join(f"{x:g}" for x in dict.fromkeys(w)))
    tuned = (
        "`tuned`: the weight each seed chose on the validation split, in brackets (a grid end's pick is tried "
        "again past that end, so a weight outside the grid can be chosen; * marks a pick still at an end)."
    )
    if not weights:
        return tuned
    listed = "; ".join(f"{display_name(m)} {' or '.join(sorted(weights[m]))}" for m in methods if m in weights)
    return f"`paper` weights (each adapter): {listed}. {tuned}"


def merge_block(table: MergeTable, root: Path = EVIDENCE_DIR) -> str:
    """The Markdown of the merge table: a row per (rank, merge), the seeds and missing cells, then each method's
    last rank against its first."""
    read: dict[str, list[MergeRun]] = {}
    for label, name in table.ranks:
        try:
            read[label] = read_merge_table(root / name)
        except HarnessError:
            read[label] = []
    methods = list(table.methods)
    names = " | ".join(display_name(m) for m in methods)
    out = [f"| rank | merge | {names} | best − each other (Holm within the row) |", "|---" * (len(methods) + 3) + "|"]
    for label, _ in table.ranks:
        empty = [f"| {label} | no evidence yet |" + " |" * (len(methods) + 1)]
        out += _rank_rows(label, read[label], methods, table.merges) if read[label] else empty
    out += ["", *_seeds_lines(table, read, methods), "", _paper_line([root / n for _, n in table.ranks], methods)]
    if table.between_ranks and len(table.ranks) > 1 and all(read[label] for label, _ in table.ranks):
        out += ["", *_between_ranks(table, read, methods)]
    return "\n".join(out) + "\n"
