"""The README's and docs' result tables, generated from the committed evidence (results/evidence/).

A published table sits between two markers in a Markdown file (FILES):

    <!-- evidence:NAME -->  ...generated...  <!-- /evidence:NAME -->

`harness tables` rewrites every such block from the evidence; `harness tables --check` exits 1 and names the
blocks that differ (tests/test_published_tables.py runs it, so a number in the README that the evidence does not
give fails the tests). Every interval and verdict is the test over seeds (harness.analysis.over_seeds).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from harness.analysis import over_seeds as OS
from harness.analysis.intervals import fmt_needed, fmt_p, fmt_seed_ci
from harness.analysis.naming import HIGHER_IS_BETTER, display_name
from harness.errors import HarnessError
from harness.io import atomic_write_text
from harness.methods import BUILT_IN
from harness.tools.evidence import EVIDENCE_DIR, EvidenceRun, read_table
from harness.tools.merge_table import MergeTable, merge_block
from harness.tools.methods_table import MethodsTable, methods_block

CE = "general-text CE rise"
PAIR_METRICS = ("ACC", "BWT", "forgetting", "LA")


@dataclass(frozen=True)
class PairTable:
    """A published comparison of two methods on several suites (one evidence table per suite)."""

    name: str
    a: str
    b: str
    suites: tuple[tuple[str, str], ...]  # (suite label, evidence table)


PUBLISHED = (PairTable("headline", "lori-s", "lora", (("default", "headline-default"), ("mc4", "headline-mc4"))),)
ALL_METHODS = MethodsTable(
    "all-methods", "lori-s", (("default", "all-methods-default"), ("mc4", "all-methods-mc4")), BUILT_IN
)
MERGE_RANKS = (("8", "merge-r8"), ("32", "merge-r32"))  # the Makefile's MERGE_RANKS
MERGE_METHODS = ("lora", "lori-d", "lori-s")  # the Makefile's MERGE_METHODS
MERGE = MergeTable("merge", MERGE_RANKS, MERGE_METHODS)  # docs/merging.md
# The README's: the exact merge (`cat`) under both protocols; the rest in docs/merging.md.
MERGE_SUMMARY = MergeTable("merge-summary", MERGE_RANKS, MERGE_METHODS, ("cat@paper", "cat@tuned"), between_ranks=False)
FILES = (Path("README.md"), Path("docs") / "merging.md")
BLOCK = re.compile(r"(<!-- evidence:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /evidence:(?P=name) -->)", re.S)


def _ce(runs: list[EvidenceRun]) -> dict[str, float]:
    return {
        r.unit.key: float(r.summary["general_ce_rise"]) for r in runs if r.summary.get("general_ce_rise") is not None
    }


def _ce_interval(runs: list[EvidenceRun]) -> OS.SeedInterval:
    return OS.values_interval(list(_ce(runs).values()))


def _method_rows(label: str, by_method: dict[str, list[EvidenceRun]], methods: list[str]) -> list[str]:
    rows = []
    for m in methods:
        runs = by_method.get(m, [])
        units = [r.unit for r in runs]
        cells = [fmt_seed_ci(OS.seed_interval(units, k)) for k in ("ACC", "BWT", "LA")]
        per_seed = ", ".join(f"{r.summary['acc']:.3f}" for r in runs)
        rows.append(
            f"| {label} | {display_name(m)} | {len(runs)} | {' | '.join(cells)} | {fmt_seed_ci(_ce_interval(runs), True)} "
            f"| {per_seed} |"
        )
    return rows


def _cell(t: OS.SeedTest, higher: bool) -> str:
    if t.p is None:
        return f"— (fewer than {OS.MIN_SEEDS} seeds)"
    word = "decided" if t.decided else f"undecided, needs {fmt_needed(t)}"
    return f"{fmt_seed_ci(t, True)}, {fmt_p(t.p)}: {word}"


def _pair_tests(table: PairTable, by_method: dict[str, list[EvidenceRun]]) -> list[OS.SeedTest]:
    ua, ub = ([r.unit for r in by_method.get(m, [])] for m in (table.a, table.b))
    tests = [OS.seed_test(ua, ub, m, (table.a, table.b)) for m in PAIR_METRICS]
    return tests + [
        OS.values_test(_ce(by_method.get(table.a, [])), _ce(by_method.get(table.b, [])), CE, (table.a, table.b))
    ]


def _sentence(label: str, t: OS.SeedTest, higher: bool) -> str:
    a, b = display_name(t.a), display_name(t.b)
    if t.p is None:
        return f"- {label}, {t.metric}: not defined for these runs."
    better, worse = (a, b) if (t.difference > 0) == higher else (b, a)
    head = f"- {label}, {t.metric} ({t.n_pairs} seeds): {a} − {b} = {fmt_seed_ci(t, True)}, {fmt_p(t.p)}"
    power = f"{t.n_pairs} seeds detect {t.detectable:.3f} with 80% power"
    if t.decided:
        return f"{head}: **{better} is better than {worse}** ({power})."
    return f"{head}: undecided; the observed difference with this spread needs {fmt_needed(t)} ({power})."


def pair_block(table: PairTable, root: Path = EVIDENCE_DIR) -> str:
    """The Markdown of one published comparison: per-method rows, the paired differences, the verdicts."""
    suites = []
    for label, name in table.suites:
        try:
            suites.append((label, read_table(root / name)))
        except HarnessError:
            suites.append((label, {}))
    a, b = display_name(table.a), display_name(table.b)
    out = [
        "| suite | method | seeds | ACC [95% CI over seeds] | BWT | LA | general-text CE rise | ACC per seed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, by_method in suites:
        out += (
            _method_rows(label, by_method, [table.b, table.a])
            if by_method
            else [f"| {label} | no evidence yet | | | | | | |"]
        )
    out += ["", f"| suite | {a} − {b}: ACC | BWT | forgetting | LA | {CE} |", "|---|---|---|---|---|---|"]
    verdicts = []
    for label, by_method in suites:
        if not by_method:
            continue
        tests = _pair_tests(table, by_method)
        if tests[0].p is None:
            n = {m: len(by_method.get(m, [])) for m in (table.a, table.b)}
            verdicts.append(
                f"- {label}: {n[table.a]} seed(s) of {a} and {n[table.b]} of {b} so far; no test before "
                f"both have {OS.MIN_SEEDS}."
            )
            continue
        higher = [HIGHER_IS_BETTER.get(t.metric, False) for t in tests]  # a CE rise: lower is better
        out.append(f"| {label} | " + " | ".join(_cell(t, h) for t, h in zip(tests, higher)) + " |")
        verdicts += [_sentence(label, t, h) for t, h in zip(tests, higher)]
    flagged = [
        f"{display_name(r.method)} seed {r.seed} ({', '.join(r.summary['not_learned'])})"
        for _, by_method in suites
        for runs in by_method.values()
        for r in runs
        if r.summary.get("not_learned")
    ]
    learned = (
        f"- Not learned at their own stage (a training failure, not forgetting): {'; '.join(flagged)}."
        if flagged
        else "- Every task of every sequence here beat the base model at its own stage (none flagged as not learned)."
    )
    return "\n".join(out + [""] + verdicts + ([learned] if suites else [])) + "\n"


def blocks(root: Path = EVIDENCE_DIR) -> dict[str, str]:
    return {
        **{t.name: pair_block(t, root) for t in PUBLISHED},
        ALL_METHODS.name: methods_block(ALL_METHODS, root),
        **{t.name: merge_block(t, root) for t in (MERGE, MERGE_SUMMARY)},
    }


def rewrite(text: str, generated: dict[str, str]) -> str:
    return BLOCK.sub(lambda m: m.group(1) + generated.get(m.group("name"), m.group("body")) + m.group(4), text)


def _check_files(files) -> None:
    missing = [str(f) for f in files if not Path(f).is_file()]
    if missing:
        raise HarnessError(
            f"{', '.join(missing)}: not found from {Path.cwd()}; run `harness tables` (or `make tables`) "
            f"from the repository root"
        )


def stale(files=FILES, root: Path = EVIDENCE_DIR) -> list[str]:
    """'<file>: <block>' for every published block whose text differs from what the evidence gives."""
    _check_files(files)
    generated, out = blocks(root), []
    for f in files:
        for m in BLOCK.finditer(Path(f).read_text()):
            if m.group("name") in generated and m.group("body") != generated[m.group("name")]:
                out.append(f"{f}: {m.group('name')}")
    return out


def write(files=FILES, root: Path = EVIDENCE_DIR) -> list[str]:
    """Rewrite every published block from the evidence; the files changed."""
    _check_files(files)
    generated, changed = blocks(root), []
    for f in files:
        text = Path(f).read_text()
        new = rewrite(text, generated)
        if new != text:
            atomic_write_text(Path(f), new)
            changed.append(str(f))
    return changed
