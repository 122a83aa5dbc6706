"""The task-suite format (suite.yaml and its lm-eval task YAMLs) and its pydantic models.

The format, every key with its meaning: docs/suite-format.md. The models below are its definition.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from harness.errors import SuiteError
from harness.suites import data, lm_eval_configs
from harness.suites.data import DATA_EXTS, template_fields
from harness.suites.locations import SUITE_FILE, SUITE_NAME_RE, display

TASK_NAME_RE = re.compile(r"^[a-z0-9_]+$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not a silent default


class Budget(_Strict):
    """Recommended training budget per task. ``lr``: a recommended rate per learning-rate family (lora, lori-d,
    lori-s, or a registered method's own); a family it leaves out trains at the family's default (the method
    registry's LR_FAMILIES), and a family no method has is refused when a run is planned."""

    epochs: float = Field(2, gt=0)
    batch_size: int = Field(8, ge=1)
    max_seq_len: int | None = Field(None, ge=8)
    lr: dict[str, float] = Field(default_factory=dict)


class TaskBudget(_Strict):
    """A task's overrides of the suite budget (every key optional)."""

    epochs: float | None = Field(None, gt=0)
    batch_size: int | None = Field(None, ge=1)
    max_seq_len: int | None = Field(None, ge=8)
    lr: dict[str, float] | None = (
        None  # replaces the suite's whole mapping: the families it leaves out get their defaults
    )


class HFSource(_Strict):
    """A Hugging Face hub dataset (``datasets.load_dataset`` arguments)."""

    path: str
    name: str | None = None
    split: str = "train"
    revision: str | None = None


class TrainSource(_Strict):
    """Where a task's training examples come from: a local file or a hub dataset, and the selection."""

    path: str | None = None
    hf: HFSource | None = None
    columns: dict[str, str] = Field(default_factory=dict)
    per_class: int | None = Field(None, ge=1)
    limit: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> TrainSource:
        if (self.path is None) == (self.hf is None):
            raise ValueError("give exactly one of `path` (local file) or `hf` (hub dataset)")
        if self.path is not None and not self.path.lower().endswith(DATA_EXTS):
            raise ValueError(f"path {self.path!r}: use a .jsonl or .csv file")
        for k, v in self.columns.items():
            if not k.isidentifier() or not str(v).isidentifier():
                raise ValueError(f"columns: {k}: {v}: field and column names must be identifiers")
        return self


class Sizes(_Strict):
    """Example counts of a task's train and test data."""

    train: int = Field(ge=1)
    test: int = Field(ge=1)


class ValidationSplit(_Strict):
    """A validation split carved from the task's training records with a fixed seed: never trained on, and (like
    all training data) checked to share no prompt with the test documents."""

    size: int = Field(ge=1)


class TaskSpec(_Strict):
    """One task of a suite: training data, prompt format and its lm-eval task.

    ``load_suite`` sets the private attributes (the suite's folder, name and file, the task's
    index, data overrides); data and configs are read on demand by ``data`` / ``lm_eval_configs``."""

    name: str
    description: str | None = None
    kind: Literal["multiple_choice", "generate"]
    train: TrainSource
    prompt: str
    target: str = " {answer}"
    choices: list[str] | None = None
    lm_eval: str
    metric: str
    sizes: Sizes
    test_limit: int | None = Field(None, ge=1)
    test_per_class: int | None = Field(None, ge=1)
    budget: TaskBudget | None = None
    validation: ValidationSplit | None = None

    _suite_dir: Path = PrivateAttr(default=Path("."))
    _suite_name: str = PrivateAttr(default="")
    _suite_file: Path = PrivateAttr(default=Path(SUITE_FILE))
    _index: int = PrivateAttr(default=0)
    _train_override: Path | None = PrivateAttr(default=None)
    _test_override: Path | None = PrivateAttr(default=None)
    _cache: dict = PrivateAttr(default_factory=dict)  # files are read once per loaded suite

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not TASK_NAME_RE.match(v):
            raise ValueError(f"{v!r}: use lowercase letters, digits and _ only")
        return v

    @field_validator("prompt", "target")
    @classmethod
    def _template(cls, v: str) -> str:
        template_fields(v)
        return v

    @model_validator(mode="after")
    def _kind_rules(self) -> TaskSpec:
        if self.kind == "multiple_choice":
            if not self.choices or len(self.choices) < 2:
                raise ValueError("choices: a multiple_choice task needs at least 2 choices")
            if len(set(self.choices)) != len(self.choices):
                raise ValueError(f"choices: duplicates in {self.choices}")
            bad = [f for f in template_fields(self.target) if f != "answer"]
            if bad:
                raise ValueError(f"target: a multiple_choice target may only use {{answer}}, not {bad}")
        else:
            if self.choices is not None:
                raise ValueError("choices: only for kind multiple_choice")
            if self.train.per_class is not None or self.test_per_class is not None:
                raise ValueError("per_class / test_per_class: only for kind multiple_choice")
        return self

    # --- identity --------------------------------------------------------------------------
    @property
    def where(self) -> str:
        """The task's place in suite.yaml, for messages: "<file>: tasks[i]"."""
        return f"{display(self._suite_file)}: tasks[{self._index}]"

    @property
    def lm_eval_name(self) -> str:
        return f"{self._suite_name}__{self.name}"

    @property
    def lm_eval_path(self) -> Path:
        return (self._suite_dir / self.lm_eval).resolve()

    @property
    def is_hub(self) -> bool:
        return self.train.hf is not None and self._train_override is None

    @property
    def label_column(self) -> str:
        return self.train.columns.get("label", "label")

    def budget_for(self, suite: Suite) -> Budget:
        """The suite budget with this task's overrides applied."""
        if self.budget is None:
            return suite.budget
        over = {k: v for k, v in self.budget.model_dump().items() if v is not None}
        return suite.budget.model_copy(update=over)

    # --- data and lm-eval (harness.suites.data / lm_eval_configs) ---------------------------
    def render(self, record: dict) -> dict[str, str]:
        """{"prompt", "completion"} of one raw record (columns mapping applied)."""
        return data.render(self, record)

    def train_records(self) -> list[dict]:
        """Raw training records after the suite's per_class / limit selection (fixed seed)."""
        return data.train_records(self)

    def train_examples(self, limit: int | None = None, seed: int = 0) -> list[dict[str, str]]:
        """Training examples [{"prompt", "completion"}] (loss on completion only).

        All of them in file order, or with ``limit`` the first ``limit`` after a shuffle seeded
        with ``seed``."""
        return data.train_examples(self, limit, seed)

    def test_records(self) -> list[dict]:
        """Raw records of the local test file (lm-eval's documents); SuiteError for hub data."""
        return data.test_records(self)

    def validation_records(self) -> list[dict]:
        """Raw records of the validation split (carved from training data; empty without one)."""
        return data.validation_records(self)

    def lm_eval_validation_config(self) -> dict | None:
        """The lm-eval config that scores the validation split as its test documents (None without one)."""
        return lm_eval_configs.lm_eval_validation_config(self)

    @property
    def metric_key(self) -> str:
        """The key of the primary metric in lm-eval's results[task], e.g. "acc,none"."""
        return lm_eval_configs.metric_key(self)

    def lm_eval_config(self) -> dict:
        """The fully resolved lm-eval task config dict (see the module docstring)."""
        return lm_eval_configs.lm_eval_config(self)


class Suite(_Strict):
    """A task suite (suite.yaml) with its folder."""

    name: str
    description: str = ""
    recommended_model: str | None = None
    budget: Budget = Field(default_factory=Budget)
    # Per-suite defaults of method knobs ({section: {knob: value}}), e.g. the baselines' strengths chosen on the
    # validation split by `make tune-baselines`; a knob the experiment sets itself (YAML, flag, grid) wins.
    method_knobs: dict[str, dict[str, Any]] = Field(default_factory=dict)
    orders: list[list[str]]
    tasks: list[TaskSpec]

    _path: Path = PrivateAttr(default=Path("."))
    _file: Path = PrivateAttr(default=Path(SUITE_FILE))
    _notes: list[str] = PrivateAttr(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not SUITE_NAME_RE.match(v):
            raise ValueError(f"{v!r}: use lowercase letters, digits, _ and - only")
        return v

    @field_validator("orders")
    @classmethod
    def _orders_nonempty(cls, v: list[list[str]]) -> list[list[str]]:
        if not v:
            raise ValueError("give at least one task order")
        return v

    @property
    def path(self) -> Path:
        """The suite folder."""
        return self._path

    @property
    def file(self) -> Path:
        return self._file

    @property
    def validation_notes(self) -> list[str]:
        """What validate_suite could not check (hub data), one line each."""
        return self._notes

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise SuiteError(f"{display(self._file)}: no task {name!r} (tasks: {', '.join(self.task_names)})")

    def lm_eval_task_configs(self) -> dict[str, dict]:
        """task name -> resolved lm-eval task config dict (task: '<suite>__<task>')."""
        return {t.name: t.lm_eval_config() for t in self.tasks}

    def lm_eval_validation_configs(self) -> dict[str, dict]:
        """task name -> lm-eval config scoring its validation split, for the tasks that have one."""
        return {t.name: t.lm_eval_validation_config() for t in self.tasks if t.validation is not None}

    def summary(self) -> dict[str, Any]:
        """The row `harness suites` shows (and --json prints) for this suite."""
        return {
            "name": self.name,
            "description": " ".join(self.description.split()),
            "recommended_model": self.recommended_model,
            "n_tasks": len(self.tasks),
            "n_orders": len(self.orders),
            "tasks": self.task_names,
            "kinds": {t.name: t.kind for t in self.tasks},
            "train_sizes": {t.name: t.sizes.train for t in self.tasks},
            "test_sizes": {t.name: t.sizes.test for t in self.tasks},
            "hub": any(t.is_hub for t in self.tasks),
            "path": str(self.path),
        }
