"""The knobs every experiment has, each declared once: type, default, help. CLI flags, YAML keys and docs read them.

harness/config.py builds ExperimentConfig on top of these fields: the checks across knobs, the derived values, one
section per method that has knobs and one `lr_<family>` knob per learning-rate family (both from the registry).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from harness.methods import METHODS
from harness.metrics import LEARN_MARGIN

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class KnobFields(BaseModel):
    """The knobs every experiment has; harness.config adds their checks and the method sections (ExperimentConfig)."""

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
