"""The experiment config: every knob (declared in harness/config_fields.py) with its checks and derived values.

An experiment config is YAML (yaml.safe_load) whose keys are the fields of ExperimentConfig; CLI flags
(`--field-name`) override YAML; the result is validated before anything is trained or written. The knobs every
experiment has are declared in harness/config_fields.py; this module adds their checks, the derived values and,
from the method registry, one section per method that has knobs and one `lr_<family>` knob per family.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, create_model, field_validator, model_validator

from harness.config_fields import KnobFields
from harness.legacy_keys import upgrade_flat_keys
from harness.methods import LR_FAMILIES, METHODS, lr_knob


class _Knobs(KnobFields):
    """The knobs every experiment has (harness/config_fields.py) and their checks; ExperimentConfig (below) adds
    one section per method that has knobs."""

    @field_validator("targets")
    @classmethod
    def _targets_nonempty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one target module is needed")
        return v

    @field_validator("methods", "seeds", "orders", "general_tasks")
    @classmethod
    def _nonempty_unique(cls, v: list[Any], info) -> list[Any]:
        if not v and info.field_name != "general_tasks":
            raise ValueError("must not be empty")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicates in {v}")
        return v

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; known methods: {', '.join(METHODS)}")
        return v

    @field_validator("eval_batch_size")
    @classmethod
    def _eval_batch_size(cls, v: int | str) -> int | str:
        if v != "auto" and v < 1:
            raise ValueError("use a batch size >= 1, or auto")
        return v

    @field_validator("eval_schedule")
    @classmethod
    def _eval_schedule(cls, v: str) -> str:
        if v in ("full", "diagonal_final") or re.fullmatch(r"every:[1-9][0-9]*", v):
            return v
        raise ValueError(f"{v!r}: use full, diagonal_final or every:K (K >= 1)")

    @field_validator("experiment")
    @classmethod
    def _experiment_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError("use letters, digits, '.', '_' and '-' only (it becomes a folder name)")
        return v

    @model_validator(mode="before")
    @classmethod
    def _flat_keys(cls, data: Any) -> Any:
        """Knobs under their names from before method sections (LoRI's mask_density, ...) go to their section, with a
        note (harness/legacy_keys.py)."""
        return upgrade_flat_keys(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _resolve_eval_batch_size(self) -> "_Knobs":
        """eval_batch_size auto: lm-eval's own search on CUDA (memory decides there), 32 on CPU."""
        if self.eval_batch_size == "auto" and not self._on_cuda():
            object.__setattr__(self, "eval_batch_size", 32)
        return self

    def _on_cuda(self) -> bool:
        return self.device.startswith("cuda") or (self.device == "auto" and torch.cuda.is_available())

    @model_validator(mode="after")
    def _resolve_eval_merged(self) -> "_Knobs":
        """eval_merged unset: folded on CUDA, through PEFT on CPU; resolved here so config.yaml records what ran."""
        if self.eval_merged is None:
            object.__setattr__(self, "eval_merged", self._on_cuda())
        return self

    @model_validator(mode="after")
    def _consistent(self) -> "ExperimentConfig":
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("give warmup_steps or warmup_ratio, not both")
        if isinstance(self.jobs, int) and self.jobs < 1:
            raise ValueError(f"jobs: {self.jobs} is not a number of processes; give 1 or more, or auto")
        if self.jobs != 1 and self.launcher != "local":
            raise ValueError(
                f"jobs: {self.jobs} runs sequences side by side on this machine (launcher local); launcher "
                f"{self.launcher} places one job per sequence itself (job_cpus, job_gpus): drop --jobs"
            )
        bad = sorted(
            k
            for k in (self.grid or {})
            if k.split(".")[0] in NOT_SWEEPABLE or k.split(".")[0] not in type(self).model_fields
        )
        if bad:
            raise ValueError(
                f"grid: cannot sweep {bad}; sweep training, recipe, adapter or method knobs (e.g. lr_lora, warmup_steps, "
                "mask_density, olora.lambda_orth)"
            )
        if any(not v for v in (self.grid or {}).values()):
            raise ValueError("grid: every knob needs at least one value")
        for section, users in section_users().items():
            if section in self.model_fields_set and not set(users) & set(self.methods):
                raise ValueError(
                    f"{section}: knobs of method {' / '.join(map(repr, users))}, which is not in methods {self.methods}; "
                    f"add {users[0]} to methods or drop the {section} section"
                )
        return self

    # derived values ----------------------------------------------------------------------------
    @property
    def scale_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.rank

    @property
    def full_row_every(self) -> int | None:
        """Full evaluation rows every K stages (1 = every stage); None = only the final row (diagonal_final)."""
        if self.eval_schedule == "full":
            return 1
        if self.eval_schedule == "diagonal_final":
            return None
        return int(self.eval_schedule.split(":")[1])

    @property
    def experiment_name(self) -> str:
        if self.experiment:
            return self.experiment
        model = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(self.model).name if "/" in self.model else self.model)
        suite = Path(self.suite).name
        return f"{suite}-{model}"

    def lr_for(self, method: str, suggested: dict[str, float] | None = None) -> float:
        """The learning rate of a method: its family's knob (lr_lora, lr_lori_s, ...), else lr, else the suite's
        recommendation for the family (budget.lr), else the family's default (LR_FAMILIES)."""
        family = METHODS[method].lr_method
        explicit = getattr(self, lr_knob(family))
        if explicit is not None:
            return explicit
        if self.lr is not None:
            return self.lr
        if suggested and family in suggested:
            return float(suggested[family])
        return LR_FAMILIES[family]

    def to_yaml_dict(self) -> dict[str, Any]:
        """The resolved config; sections of methods not in the run are left out (they would not validate)."""
        d = self.model_dump(mode="json")
        for section, users in section_users().items():
            if not set(users) & set(self.methods):
                d.pop(section, None)
        return d


def section_users() -> dict[str, list[str]]:
    """Each method config section and the methods that read it (lori: lori-d and lori-s), from the registry."""
    out: dict[str, list[str]] = {}
    for cls in METHODS.values():
        if cls.section:
            out.setdefault(cls.section, []).append(cls.name)
    return out


def _method_sections() -> dict[str, Any]:
    """The ExperimentConfig fields of the method sections, built from the registry (one field per section)."""
    fields = {}
    for section, users in section_users().items():
        cls = METHODS[users[0]]
        names = ", ".join(users)
        fields[section] = (
            cls.knobs,
            Field(
                default_factory=cls.knobs,
                description=f"{cls.display.split('-')[0] if len(users) > 1 else cls.display} knobs "
                f"(method{'s' if len(users) > 1 else ''} {names}).",
            ),
        )
    return fields


def _lr_fields() -> dict[str, Any]:
    """One learning-rate knob per family (lr_lora, lr_lori_d, lr_lori_s, ...), from the registry."""
    fields = {}
    for family, default in sorted(LR_FAMILIES.items()):
        users = ", ".join(m.name for m in METHODS.values() if m.lr_method == family)
        fields[lr_knob(family)] = (
            float | None,
            Field(
                None,
                gt=0,
                description=(
                    f"Learning rate of the {family} family: {users} (default: the suite budget's, else {default:g})."
                ),
            ),
        )
    return fields


ExperimentConfig = create_model(
    "ExperimentConfig", __base__=_Knobs, __module__=__name__, **_lr_fields(), **_method_sections()
)
ExperimentConfig.__doc__ = "A continual-learning experiment: methods x seeds x task orders over one suite and model."


# The training recipe (harness.run.train.Recipe is built from these fields; logged as MLflow params).
RECIPE_KNOBS = (
    "weight_decay",
    "grad_clip",
    "warmup_steps",
    "warmup_ratio",
    "loss_reduction",
    "completion_eos",
    "gradient_checkpointing",
)

# What the code did before a knob existed, where that is not the knob's default: a run folder whose
# config.yaml lacks the knob was made with this value (harness.run.folder.check_same_config).
BEFORE_KNOB_EXISTED = {"completion_eos": "always"}

# Knobs a grid may not sweep: what the experiment is (model, suite, sequences), where it goes, and
# how it is evaluated (every variant must be scored the same way to be comparable).
# How a sequence is dispatched or split over processes: never what it computes (a resume may change them).
LAUNCH_KEYS = frozenset(
    {
        "launcher",
        "jobs",
        "base_eval_cache",
        "ray_address",
        "job_cpus",
        "job_gpus",
        "job_retries",
        "slurm_partition",
        "slurm_time",
        "distributed",
    }
)
NOT_SWEEPABLE = {
    "experiment",
    "suite",
    "model",
    "methods",
    "seeds",
    "orders",
    "tasks",
    "grid",
    "results_dir",
    "tracking_uri",
    "tracking_optional",
    "system_metrics",
    "cache_dir",
    "device",
    "dtype",
    "compile",
    "trust_remote_code",
    "wait_for_lock",
    "eval_scope",
    "eval_limit",
    "eval_batch_size",
    "eval_schedule",
    "eval_max_length",
    "eval_merged",
    "eval_bf16",
    "general_tasks",
    "general_limit",
    "general_include",
    "general_every",
} | LAUNCH_KEYS
