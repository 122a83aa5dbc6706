"""What the analysis works on: one record per sequence or merge run, as read from its run folder.

harness/report/folders.py builds these from results/<experiment>/ (summary.json, matrix.json, state.json, ...);
the analysis (aggregate, intervals, sensitivity, merging) only reads them.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

import numpy as np

from harness.metrics import LEARN_MARGIN

INTERRUPTED, RUNNING = "interrupted", "running"


@dataclass
class SequenceRun:
    """One finished sequence (a whole task sequence) as the report needs it."""

    run_id: str
    run_name: str
    status: str
    method: str
    seed: str
    order: str
    tasks: list[str]
    R: np.ndarray  # (T+1, T), NaN where not evaluated
    metrics: dict[str, float]  # ACC/BWT/FWT/forgetting/LA of summary.json, NaN where undefined
    params_effective: float
    params_lora_equivalent: float
    diagnostics: dict | None
    summary: dict | None
    tags: dict[str, str]
    params: dict[str, str]
    start_time_ms: int | None
    matrix_source: str
    notes: list[str] = field(default_factory=list)
    reference: bool = False  # a reference row (one multi-task stage), never ranked
    documents: dict | None = None  # documents.json (per-document scores) when present and consistent with R
    not_learned: list[str] | None = (
        None  # tasks whose own-stage score did not clear base + learn_margin (None: not judged)
    )
    learn_margin: float = LEARN_MARGIN
    stage_costs: list[dict] | None = (
        None  # per trained stage, from its stage.json: seconds of train, method, calibration, eval
    )


@dataclass
class MergeRun:
    """One finished merge run (one method, one seed) as the report needs it."""

    run_id: str
    run_name: str
    status: str
    method: str
    seed: str
    tasks: list[str]
    weights: list[float]  # per task, as merged; empty when not recorded
    single: dict[str, float]  # S[j, j]: task j's adapter alone on task j (NaN when unknown)
    merges: dict[str, dict]  # combination -> normalised_accuracy, average_drop, relative_error, cross_terms, scores
    interference: dict[str, np.ndarray]  # combination -> (T, T) I[i, j]; NaN on the diagonal and for pairs not run
    tags: dict[str, str]
    params: dict[str, str]
    start_time_ms: int | None
    source: str  # where the merge numbers came from
    notes: list[str] = field(default_factory=list)
    documents: dict | None = None  # its documents.json when that recomputes every S[j, j] and m_j exactly


@dataclass
class UnfinishedRun:
    """One sequence the report lists but does not aggregate: stopped before its summary (interrupted), or running."""

    run_id: str | None  # the MLflow parent run id its state.json records (None when it never opened one)
    run_name: str
    status: str  # MLflow's KILLED, FAILED or RUNNING when it says so, else the state in capitals
    state: str  # INTERRUPTED or RUNNING, from the folder (its lock)
    method: str
    seed: str
    order: str
    run_dir: str | None  # the sequence folder
    last_stage: int | None  # the highest committed stage (0 = only the base model evaluated); None: none committed
    n_stages: int | None  # training stages the sequence has (1 for a reference run), when known
    start_time_ms: int | None

    @property
    def resume_command(self) -> str | None:
        """`harness resume <folder>`; None while another process runs it, or when the folder is not known."""
        return f"harness resume {shlex.quote(self.run_dir)}" if self.run_dir and self.state == INTERRUPTED else None

    @property
    def progress(self) -> str:
        """The last evaluated stage as text: "2 of 3", "0 of 3 (base model only)", "—" when unknown."""
        if self.last_stage is None:
            return "—"
        of = f" of {self.n_stages}" if self.n_stages else ""
        return f"{self.last_stage}{of}" + (" (base model only)" if self.last_stage == 0 else "")

    def as_json(self) -> dict:
        return {
            "run_id": self.run_id,
            "run_name": self.run_name,
            "status": self.status,
            "method": self.method,
            "seed": self.seed,
            "order": self.order,
            "run_dir": self.run_dir,
            "last_stage": self.last_stage,
            "n_stages": self.n_stages,
            "resume_command": self.resume_command,
        }
