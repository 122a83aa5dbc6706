"""The all-methods table, generated from committed evidence (results/evidence/all-methods-<suite>/), with the cells
still missing named.

Per suite, each method's mean ACC and BWT over its seeds (the t interval over seeds, with the test documents' shared
noise where the evidence has per-document scores), and LoRI-S minus the method on ACC: the paired test over seeds,
Holm-adjusted over the suite's comparisons (one family per suite and metric), with the seeds the observed difference
would need. "Undecided" is an answer. A method with fewer than `min_seeds` seeds at today's defaults is listed as
missing, never filled in from runs made at other defaults (the evidence table holds only the experiment's own runs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness.analysis import over_seeds as OS
from harness.analysis.intervals import fmt_holm_verdict, fmt_seed_ci
from harness.analysis.naming import display_name, is_reference_method
from harness.errors import HarnessError
from harness.tools.evidence import EVIDENCE_DIR, EvidenceRun, read_table


@dataclass(frozen=True)
class MethodsTable:
    """Every method against one lead method on several suites (one evidence table per suite)."""

    name: str
    lead: str
    suites: tuple[tuple[str, str], ...]  # (suite label, evidence table)
    methods: tuple[str, ...]  # the methods the table should hold, in display order
    min_seeds: int = 3


def _verdict(t: OS.SeedTest | None) -> str:
    return "" if t is None else fmt_holm_verdict(t)


def _suite_rows(table: MethodsTable, label: str, by_method: dict[str, list[EvidenceRun]]) -> list[str]:
    lead_units = [r.unit for r in by_method.get(table.lead, [])]
    compared = [m for m in table.methods if m in by_method and m != table.lead and not is_reference_method(m)]
    tests = {m: OS.seed_test(lead_units, [r.unit for r in by_method[m]], "ACC", (table.lead, m)) for m in compared}
    OS.holm_adjust([t for t in tests.values() if t.p is not None])
    rows = []
    for m in (m for m in table.methods if m in by_method):
        units = [r.unit for r in by_method[m]]
        cells = [fmt_seed_ci(OS.seed_interval(units, k)) for k in ("ACC", "BWT")]
        rows.append(f"| {label} | {display_name(m)} | {len(units)} | {' | '.join(cells)} | {_verdict(tests.get(m))} |")
    return rows


def methods_block(table: MethodsTable, root: Path = EVIDENCE_DIR) -> str:
    """The Markdown of the table: a row per (suite, method) with evidence, then the missing cells."""
    lead = display_name(table.lead)
    out = [
        f"| suite | method | seeds | ACC [95% CI over seeds] | BWT | {lead} − method: ACC (Holm over the suite) |",
        "|---|---|---|---|---|---|",
    ]
    missing = []
    for label, name in table.suites:
        try:
            by_method = read_table(root / name)
        except HarnessError:
            by_method = {}
        out += _suite_rows(table, label, by_method) or [f"| {label} | no evidence yet | | | | |"]
        short = [f"{m} {len(by_method.get(m, []))}/{table.min_seeds}" for m in table.methods
                 if len(by_method.get(m, [])) < table.min_seeds]  # fmt: skip
        if short:
            missing.append(f"{label}: {', '.join(short)}")
    tail = (
        [f"- Missing (fewer than {table.min_seeds} seeds at today's defaults): " + "; ".join(missing) + "."]
        if missing
        else [f"- Every method has at least {table.min_seeds} seeds on every suite."]
    )
    return "\n".join([*out, "", *tail]) + "\n"
