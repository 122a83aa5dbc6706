"""The compact evidence behind published tables: collected from finished sequences, read back without the runs.

    results/evidence/<table>/<method>/seed-<s>[/order-<k>]/
        summary.json  matrix.csv  matrix.json  documents.json  config.yaml  precision.json   (about 15 KB)
    results/evidence/<table>/<method>/seed-<s>/          (a merge run: `harness merge`)
        summary.json  documents.json  config.yaml  merged.csv  single.csv                  (about 50 KB)

`harness evidence RUN_FOLDER --table NAME` copies each finished sequence's (or merge run's) files there (RUN_FOLDER
may also be another table's evidence, e.g. the headline's LoRI-S and LoRA seeds pooled into the all-methods table)
(atomically, one file at a time; an existing seed is replaced only by the same run). A table never pools runs made
at different settings: every run's config.yaml, less its seed and sequence (merge) block, must agree with the
table's first, and a table holds sequences or merge runs, never both. Anyone can add seeds to a table later without
re-running the earlier ones; harness/tools/tables.py turns the evidence into the README's and docs' tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from harness.analysis import statistics as ST
from harness.analysis.documents import check_documents, score_arrays
from harness.config import LAUNCH_KEYS, ExperimentConfig
from harness.errors import HarnessError
from harness.io import atomic_write_bytes, read_json
from harness.methods import METHODS
from harness.run.folder import merge_folders, sequence_folders

EVIDENCE_DIR = Path("results") / "evidence"
REQUIRED = ("summary.json", "matrix.json", "documents.json", "config.yaml")
OPTIONAL = ("matrix.csv", "precision.json")  # for readers; copied when the sequence has them
# A merge run's summary.json holds every merge's per-task scores and weight choice; documents.json recomputes them.
MERGE_REQUIRED = ("summary.json", "documents.json", "config.yaml", "merged.csv")
MERGE_OPTIONAL = ("single.csv",)
MERGE_MARK = "merged.csv"  # an evidence folder holding it is a merge run's
# Knobs that may differ between the runs of one table: what a run is, and where it was written.
PER_SEQUENCE = ("seeds", "sequence", "merge", "methods", "results_dir", "tracking_uri", "experiment", "orders")


@dataclass
class EvidenceRun:
    """One sequence as its evidence gives it."""

    method: str
    seed: str
    order: str
    summary: dict
    unit: ST.Unit
    notes: list[str] = field(default_factory=list)


def _settings(config: Path) -> dict:
    """What a run computed from: its config less the launch and per-sequence keys, and, for a sequence, less the
    sections of the experiment's other methods (an EWC sequence does not read `inflora`: an InfLoRA default that
    moved must not set the EWC rows apart from the InfLoRA row run after it)."""
    data = yaml.safe_load(config.read_text()) or {}
    method = METHODS.get((data.get("sequence") or {}).get("method"))
    others = _sections() - {method.section} if method else set()
    return {
        k: v for k, v in data.items() if k not in PER_SEQUENCE and k not in LAUNCH_KEYS and k not in others
    }  # launch: never what it computes


def _target(root: Path, table: str, folder: Path, summary: dict) -> Path:
    out = root / table / summary["method"] / f"seed-{summary['seed']}"
    return out / f"order-{summary['order_index']}" if folder.name.startswith("order-") else out


def _finished(run_folder: Path) -> tuple[list[Path], tuple[str, ...], tuple[str, ...]]:
    """(finished runs under run_folder, the files evidence needs, the files copied when present): the sequences,
    or, when there are none, the merge runs (a finished one has summary.json saying complete)."""
    sequences = [f for f in sequence_folders(run_folder) if (f / "summary.json").is_file()]
    if sequences:
        return sequences, REQUIRED, OPTIONAL
    merges = [f for f in merge_folders(run_folder) if (f / "summary.json").is_file()]
    merges = [f for f in merges if read_json(f / "summary.json").get("complete")]
    if merges:
        return merges, MERGE_REQUIRED, MERGE_OPTIONAL
    held = sorted({p.parent for p in Path(run_folder).rglob("summary.json")})  # another table's evidence
    merge = bool(held) and all((f / MERGE_MARK).is_file() for f in held)
    required, optional = (MERGE_REQUIRED, MERGE_OPTIONAL) if merge else (REQUIRED, OPTIONAL)
    found = [f for f in held if all((f / n).is_file() for n in required)]
    if found:
        return found, required, optional
    raise HarnessError(
        f"{run_folder}: no finished sequence or merge run under it (a finished one has summary.json), nor another "
        f"table's evidence; pass an experiment folder such as results/<experiment>/<experiment>"
    )


def _check_kind(root: Path, table: str, merge: bool) -> None:
    held = [p.parent for p in (root / table).rglob("summary.json")] if (root / table).is_dir() else []
    if held and any((p / MERGE_MARK).is_file() for p in held) != merge:
        kinds = ("sequences", "merge runs") if merge else ("merge runs", "sequences")
        raise HarnessError(
            f"table {table!r} holds {kinds[0]}; these are {kinds[1]}: collect them into a table of their own"
        )


def collect(run_folder: Path, table: str, root: Path = EVIDENCE_DIR) -> list[Path]:
    """Copy every finished sequence (or merge run) under run_folder into the table's evidence; the folders written.

    Refused (HarnessError, nothing copied) when a run's settings differ from the table's or a file is missing."""
    finished, required, optional = _finished(Path(run_folder))
    _check_kind(root, table, required is MERGE_REQUIRED)
    reference = _table_settings(root / table)
    plan = []
    for f in finished:
        missing = [n for n in required if not (f / n).is_file()]
        if missing:
            raise HarnessError(
                f"{f}: {', '.join(missing)} missing; evidence needs {', '.join(required)} "
                f"(runs written before documents.json existed cannot be evidence: re-run them)"
            )
        settings = _settings(f / "config.yaml")
        reference = _joined(reference, settings) if reference is not None else settings
        diff = _differences(settings, reference)
        if diff:
            raise HarnessError(
                f"{f}: its settings differ from table {table!r}'s in {', '.join(diff)}; a table never "
                f"pools runs made at different settings: collect it into a new table"
            )
        plan.append((f, _target(root, table, f, read_json(f / "summary.json"))))
    for src, dst in plan:
        dst.mkdir(parents=True, exist_ok=True)
        for n in required + tuple(n for n in optional if (src / n).is_file()):
            atomic_write_bytes(dst / n, (src / n).read_bytes())
    return [dst for _, dst in plan]


def _value(settings: dict, key: str):
    """A knob's value in a config.yaml; one it does not name ran at its default (a knob added later keeps the old
    behaviour as its default), so a table's older runs still pair with newer ones."""
    if key in settings:
        return settings[key]
    field = ExperimentConfig.model_fields.get(key)
    return field.default if field is not None else None


def _sections() -> set[str]:
    return {m.section for m in METHODS.values() if m.section}


def _joined(reference: dict, settings: dict) -> dict:
    """The table's settings: its first run's, plus every method section that only a later run wrote."""
    return {**reference, **{k: v for k, v in settings.items() if k in _sections() and k not in reference}}


def _differences(settings: dict, reference: dict) -> list[str]:
    """The knobs whose values differ. A method's config section is written only when that method is among the
    experiment's methods (a LoRA run launched alone has no `lori` section), so one that only one side has is not a
    difference; runs that have it must agree (the table's reference holds the first value any run wrote)."""
    sections = _sections()
    keys = {k for k in set(settings) | set(reference) if k not in sections or (k in settings and k in reference)}
    return sorted(k for k in keys if _value(settings, k) != _value(reference, k))


def _table_settings(table_dir: Path) -> dict | None:
    configs = sorted(table_dir.rglob("config.yaml")) if table_dir.is_dir() else []
    reference = None
    for c in configs:
        reference = _joined(reference, _settings(c)) if reference is not None else _settings(c)
    return reference


def _matrix(matrix: dict) -> np.ndarray:
    return np.array([[np.nan if v is None else float(v) for v in row] for row in matrix["R"]], dtype=float)


def read_run(folder: Path) -> EvidenceRun:
    """One evidence folder as a unit of the statistics (per-document scores when they recompute the matrix)."""
    summary, matrix, docs = (read_json(folder / n) for n in ("summary.json", "matrix.json", "documents.json"))
    R = _matrix(matrix)
    problems = check_documents(docs, R)
    scores = None if problems else score_arrays(docs)
    ids = None if problems else {t: list(docs["documents"][t]["doc_ids"]) for t in docs["tasks"]}
    seed, order = str(summary["seed"]), str(summary["order_index"])
    unit = ST.Unit(
        key=f"{seed}/{order}",
        tasks=list(matrix["tasks"]),
        R=R,
        scores=scores,
        doc_ids=ids,
        reference=bool(summary.get("reference")),
    )
    return EvidenceRun(summary["method"], seed, order, summary, unit, problems)


def read_table(table_dir: Path) -> dict[str, list[EvidenceRun]]:
    """method -> its runs in the table, by seed; HarnessError when the table has no evidence."""
    folders = sorted({p.parent for p in Path(table_dir).rglob("summary.json")})
    if not folders:
        raise HarnessError(
            f"{table_dir}: no evidence here; collect some with `harness evidence RUN_FOLDER "
            f"--table {Path(table_dir).name}`"
        )
    out: dict[str, list[EvidenceRun]] = {}
    for f in folders:
        r = read_run(f)
        out.setdefault(r.method, []).append(r)
    for runs in out.values():
        runs.sort(key=lambda r: (int(r.seed) if r.seed.isdigit() else r.seed, r.order))
    return out
