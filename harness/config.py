"""Every knob of an experiment, defined once: type, default, help. CLI flags and docs read it here.

An experiment config is YAML (yaml.safe_load) whose keys are the fields below; CLI flags
(`--field-name`) override YAML; the result is validated before anything is trained or written.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from harness.legacy_keys import upgrade_flat_keys
from harness.methods import LR_FAMILIES, METHODS, lr_knob
from harness.metrics import LEARN_MARGIN

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class _Knobs(BaseModel):
    """The knobs every experiment has; ExperimentConfig (below) adds one section per method that has knobs."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- what to run -------------------------------------------------------------------------
    experiment: str | None = Field(
        None, description="MLflow experiment and results sub-folder name (default: <suite>-<model>)."
    )
    suite: str = Field("default", description="Task suite: a name under task_suites/ or a path to a suite folder.")
    model: str = Field(
        "smollm2-135m",
        description="Base model: smollm2-135m (embedded), tiny-llama[-256] (tests), an HF hub id or a local path.",
    )
    methods: list[str] = Field(
        ["lori-s", "lora"],
        description=f"Methods to compare (comma-separated): {', '.join(METHODS)} (see `harness methods`).",
    )
    seeds: list[int] = Field([0], description="Seeds (comma-separated); each is a full sequence.")
    orders: list[int] = Field([0], description="Indices of the suite's task orders to run (comma-separated).")
    tasks: list[str] | None = Field(
        None, description="Restrict each order to these tasks (comma-separated; order kept). Default: all."
    )
    grid: dict[str, list[Any]] | None = Field(
        None,
        description='Sweep knobs: "lr_lora=1e-3,2e-3;warmup_steps=0,5" (YAML: knob: [values]). Each combination '
        "is a variant of the experiment, in its own variant-<id>/ folder level.",
    )

    # --- where things go ---------------------------------------------------------------------
    results_dir: Path = Field(Path("results"), description="Folder for run folders, mlflow.db and reports.")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///<results-dir>/mlflow.db)."
    )
    tracking_optional: bool = Field(
        False,
        description="Start even when the tracking store does not answer: the run folder keeps everything and MLflow "
        "catches up when it is back (harness sync RUN_DIR). Outages during a run never stop it.",
    )
    system_metrics: bool | None = Field(
        None,
        description="Log MLflow's system metrics (CPU, memory, disk, network; GPU with nvidia-ml-py) on each sequence's "
        "parent run, every 10 s. Default: true on CUDA, false on CPU.",
    )
    cache_dir: Path | None = Field(None, description="Model cache folder (default: ~/.cache/lori-harness).")

    # --- hardware ----------------------------------------------------------------------------
    device: str = Field("auto", description="auto (CUDA if present, else CPU), cpu, cuda, cuda:N.")
    dtype: str = Field(
        "auto",
        description="The frozen base model's weights: auto (fp32 on CPU and CUDA; README: Precision), "
        "fp32, bf16, fp16 (CUDA only). Adapters and AdamW stay fp32 unless adapter_dtype says otherwise.",
    )
    adapter_dtype: Literal["fp32", "base"] = Field(
        "fp32",
        description="Adapter tensors (A, B, LoRI-S values), so their gradients and AdamW moments: fp32 whatever the "
        "base dtype (PEFT's autocast_adapter_dtype), or base (the base model's dtype; for precision experiments).",
    )
    tf32: bool = Field(
        False, description="CUDA: TF32 matmuls in training (evaluation, folding and merging always run without)."
    )
    compile: Literal["auto", "none", "default", "reduce-overhead"] = Field(
        "auto",
        description="torch.compile of the training step: none, default, reduce-overhead (CUDA graphs; batches padded "
        "to a multiple of 32 tokens); auto = none on CPU and CUDA (README: On a GPU: compiling costs 17-25 s per stage, more "
        "than a 76-step stage saves). Falls back to eager, once and recorded, where it cannot work.",
    )
    bf16_autocast: bool = Field(False, description="On CPU: run forward/backward under bf16 autocast (faster).")
    trust_remote_code: bool = Field(False, description="Allow model repositories to run their own code.")
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="Under torchrun / accelerate launch (several processes): DDP, or FSDP2 (fully_shard). One process: ignored.",
    )

    # --- launching sequences (one process, a Ray cluster or a Slurm array) ------------------
    launcher: Literal["local", "ray", "slurm"] = Field(
        "local",
        description="local: sequences one after another in this process; ray: one Ray task per sequence; "
        "slurm: one Slurm array job per sequence through submitit. ray and slurm need a tracking server (harness tracking-server).",
    )
    jobs: int | Literal["auto"] = Field(
        1,
        description="launcher local: sequences run at once on this machine, each in its own process (CPU: the cores split "
        "between them; CUDA: one GPU shared). auto: one per core on CPU; on CUDA as many as the free GPU memory holds by "
        "the memory preflight's estimate. This process mirrors the jobs' folders into MLflow (the sqlite store takes one writer).",
    )
    base_eval_cache: bool = Field(
        True,
        description="Keep the base model's stage-0 row and general-text CE in <experiment>/base-eval/, keyed by a hash of "
        "everything they depend on, so every sequence and job of the experiment evaluates the base model once.",
    )
    ray_address: str | None = Field(
        None,
        description="Ray cluster to use with launcher ray (e.g. 10.0.0.5:6379 or ray://host:10001; default: a local Ray started for the run).",
    )
    job_cpus: int = Field(
        1, ge=1, description="CPUs per job (one job = one sequence or one merge job) under ray and slurm."
    )
    job_gpus: float = Field(
        0, ge=0, description="GPUs per job under ray and slurm (0 = CPU only; a fraction shares a GPU under ray)."
    )
    job_retries: int = Field(
        2,
        ge=0,
        description="Times a dead job (worker killed, node lost, preemption) is retried; it resumes from its checkpoint.",
    )
    slurm_partition: str | None = Field(
        None, description="Slurm partition for launcher slurm (default: the cluster's default)."
    )
    slurm_time: int = Field(240, ge=1, description="Slurm time limit per job in minutes.")

    # --- adapters (same for every method so comparisons are fair) ---------------------------
    rank: int = Field(8, ge=1, description="Adapter rank r.")
    alpha: float | None = Field(None, gt=0, description="Scaling numerator; s = alpha / r (default 2r, as LoRI).")
    targets: list[str] = Field(DEFAULT_TARGETS, description="Module names to adapt (comma-separated).")
    a_init: Literal["kaiming_uniform", "gaussian"] = Field(
        "kaiming_uniform",
        description="Init of every adapter's A (LoRI: the frozen random projection; kaiming_uniform = reference code).",
    )

    # --- training budget (default: the suite's recommendation) ------------------------------
    epochs: float | None = Field(None, gt=0, description="Epochs per task (default: suite budget).")
    max_steps: int | None = Field(None, ge=1, description="Cap on optimizer steps per task.")
    batch_size: int | None = Field(None, ge=1, description="Training batch size (default: suite budget).")
    max_seq_len: int | None = Field(None, ge=8, description="Truncate training sequences to this many tokens.")
    lr: float | None = Field(
        None,
        gt=0,
        description='One learning rate for every method of the run (e.g. --grid "lr=1e-3,2e-3"); a family\'s own '
        "lr_<family> (lr_lora, lr_lori_d, lr_lori_s, ...) still wins for that family. Default: per family.",
    )
    train_limit: int | None = Field(None, ge=1, description="Use at most N training examples per task.")

    # --- training recipe (logged as params; see the README's "Training recipe") ----------------
    weight_decay: float = Field(
        0.0, ge=0, description="AdamW weight decay (0 as the LoRI reference; masks stay exact either way)."
    )
    grad_clip: float = Field(1.0, ge=0, description="Max gradient norm (0 = off); sees the masked gradient.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps per stage (0 = none, as the LoRI reference).")
    warmup_ratio: float = Field(
        0.0, ge=0, lt=1, description="Warm-up as a fraction of each stage's steps (instead of warmup_steps)."
    )
    completion_eos: Literal["auto", "always", "never"] = Field(
        "auto",
        description="EOS after each training completion: auto (generate tasks only, where it is the stop signal; "
        "a multiple-choice score never reads it, yet on a one-token answer it is half the loss), always (before "
        "2026-11-25), never. auto was chosen by the recipe ablation, 3 seeds x 2 suites (README: Training recipe).",
    )
    loss_reduction: Literal["token", "example"] = Field(
        "token", description="Loss: mean over completion tokens (token) or mean of per-example means (example)."
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each decoder layer's activations in backward instead of keeping them (transformers' "
        "own, non-reentrant): less memory, about a third more compute, the same losses (tested).",
    )

    # --- crash safety ------------------------------------------------------------------------
    checkpoint_every: int = Field(
        50, ge=0, description="Mid-stage checkpoint every N optimizer steps (0 = off); resume continues from it."
    )
    wait_for_lock: bool = Field(
        False, description="If another process runs a sequence folder, wait for it instead of refusing."
    )

    # --- merging (`harness merge`: one adapter per task, trained separately, then merged) ------
    merge_methods: list[Literal["cat", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "svd"]] = Field(
        ["cat", "linear", "ties"], description="PEFT add_weighted_adapter combinations to evaluate (comma-separated)."
    )
    merge_weights: list[float] | None = Field(
        None,
        description="Fixed weight per task adapter (one value for all, or one per task): the `fixed` merge protocol.",
    )
    merge_density: float = Field(0.5, gt=0, le=1, description="Density kept by ties, dare_* and magnitude_prune.")
    merge_masks: Literal["independent", "disjoint"] = Field(
        "independent",
        description="LoRI-S task masks when merging: independent (the paper) or disjoint through the allocator.",
    )
    merge_a: Literal["per_task", "shared"] = Field(
        "per_task",
        description="LoRI's frozen A when merging: a seed per task, or one A shared by every task (linear is then free of cross terms).",
    )
    merge_pairs: bool = Field(False, description="Also merge every pair of tasks (interference matrix).")
    merge_weight_grid: list[float] | None = Field(
        None,
        description="Candidate weights (one value for every adapter, e.g. 0.25,0.5,0.75,1): each method, seed and "
        "combination is merged at the candidate with the best mean score on the suite's validation split (every task "
        "needs one), so methods are compared at tuned weights: the `tuned` merge protocol.",
    )
    merge_grid_extend: int = Field(
        3,
        ge=0,
        description="tuned: when the best weight is the grid's lowest (highest), also try half (twice) it, up to N "
        "times, until the choice is interior; merged.json records every candidate (0: the grid as given).",
    )
    merge_protocol: list[Literal["paper", "tuned", "fixed", "equal"]] | None = Field(
        None,
        description="How merge weights are set, one or several (comma-separated; each gets its own merges, labelled "
        "combination@protocol when there are several): paper (the LoRI paper's weights, 3 or 4 adapters), tuned "
        "(merge_weight_grid), fixed (merge_weights), equal (1/T). Default: tuned with a grid, fixed with merge_weights, "
        "paper for 3 or 4 tasks, else equal.",
    )

    # --- evaluation --------------------------------------------------------------------------
    eval_scope: Literal["seen", "all"] = Field(
        "all", description="After stage t evaluate tasks 1..t (seen) or every task (all; needed for FWT)."
    )
    eval_limit: int | None = Field(
        None,
        ge=1,
        description="Evaluate a fixed seeded subset of N test examples per task (the same at every stage and run).",
    )
    eval_schedule: str = Field(
        "full",
        description="full (every row), diagonal_final (R[t,t] after each stage + the final row: 2T-1 evaluations; "
        "enough for ACC and BWT), or every:K (full rows every K stages + the final row, R[t,t] in between).",
    )
    eval_max_length: int = Field(
        512, ge=16, description="lm-eval's max_length: longest context + continuation in tokens."
    )
    eval_batch_size: int | Literal["auto"] = Field(
        "auto",
        description="lm-eval batch size: a number, or auto: lm-eval's search for the largest batch that fits on CUDA, "
        "32 on CPU (resolved when the config is read, so config.yaml records what ran).",
    )
    eval_merged: bool | None = Field(
        None,
        description="Evaluate with the adapters folded into the base weights (restored exactly afterwards) instead of through "
        "PEFT. Default: true on CUDA (base-model speed; exact there with TF32 off, checked on a few documents at the first "
        "evaluation), false on CPU.",
    )
    eval_bf16: bool = Field(
        False, description="On CPU: evaluate under bf16 autocast (README: measured speed and agreement)."
    )
    learn_margin: float = Field(
        LEARN_MARGIN,
        ge=0,
        le=1,
        description="A task counts as learned when its score right after its own stage beats the base model's "
        "by at least this much; otherwise the console, summary.json and the report flag it, so a training failure is not read "
        "as forgetting.",
    )
    general_ce_tokens: int = Field(
        1024,
        ge=0,
        description="Tokens of a fixed general English text (harness/assets/general_text.txt) whose mean "
        "cross-entropy is measured for the base model and after every stage: general-ability forgetting (general_ce, "
        "general_ce_rise in summary.json and MLflow); 0 = off.",
    )
    general_tasks: list[str] = Field(
        [],
        description="lm-eval registered tasks or groups (comma-separated, e.g. mmlu,gsm8k,arc_easy,"
        "hellaswag,boolq; needs the hub) scored on the base model and after the last stage: general/<task> in eval.json and MLflow, "
        "general_tasks {base, final, change} in summary.json (docs/metrics.md). Empty: off (general_ce stays the offline measure).",
    )
    general_limit: int | None = Field(
        200, ge=1, description="general_tasks: the first N documents of each task (lm-eval's limit); none: all."
    )
    general_include: Path | None = Field(
        None, description="general_tasks: a folder of your own lm-eval task YAMLs (lm-eval's include_path)."
    )
    general_every: int | None = Field(
        None, ge=1, description="general_tasks: also after every K-th stage (default: base and last stage only)."
    )

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
