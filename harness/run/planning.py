"""Planning and preflight: which sequences an experiment has, where they go, and whether they can run.

Nothing here writes anything: bad input must stop a run before a folder, a store or a run exists.

Run folder layout (a contract; see README):
    <results>/<experiment>/<method>/seed-<s>/            with one task order configured
    <results>/<experiment>/<method>/seed-<s>/order-<k>/  with several
    <results>/<experiment>/variant-<id>/<method>/...      with a grid (id: hash of the variant's knob values)
The layout is a function of the EXPERIMENT's config (its orders list), never of which sequences
one command happens to run: resuming one sequence of a multi-order experiment plans the whole
experiment and picks that sequence out.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from harness import distributed as D
from harness.config import ExperimentConfig
from harness.config_loading import format_errors, nest_overrides, parse_cli_value
from harness.errors import ConfigError, HarnessError
from harness.legacy_keys import flat_name
from harness.methods import LR_FAMILIES, METHODS
from harness.models import check_model_available, downloads_allowed, linear_shapes, model_config
from harness.models import memory as MEM
from harness.models.environment import resolve_device, resolve_dtype
from harness.precision import check_dtype_on_device
from harness.run.general_eval import check_names as check_general_tasks
from harness.run.suite_knobs import check_lr_families, strength, with_suite_knobs
from harness.suites import validate_suite
from harness.tracking.client import check_reachable, default_tracking_uri


@dataclass(frozen=True)
class StagePlan:
    """One training stage of a sequence, resolved before anything runs."""

    tasks: list[str]  # trained at this stage (one task; MTL: all)
    budget: dict[str, Any]  # epochs, batch_size, max_seq_len, max_steps, lr (the method's), steps (None: from epochs)
    lr_of: dict[str, float]  # each lr family's rate (lora, lori-d, lori-s) for these tasks: a calibration run's

    def budget_at(self, family: str) -> dict[str, Any]:
        """The stage's budget at another family's learning rate (LoRI-S's magnitude masks calibrate at LoRI-D's)."""
        return {**self.budget, "lr": self.lr_of[family]}


@dataclass(frozen=True)
class EvalSchedule:
    """What each stage of a sequence evaluates, resolved before anything runs (eval_scope, eval_schedule): the runner
    evaluates it and the progress display counts it; a cell left out stays NaN (n/a, never guessed)."""

    tasks: tuple[tuple[str, ...], ...]  # stage 0 (the base model), 1..S: the tasks scored after it
    base_stage: bool  # stage 0 is committed: it scores tasks, or the base model's general-text CE or general_tasks

    def at(self, stage: int) -> list[str]:
        return list(self.tasks[stage])


def eval_schedule(cfg: ExperimentConfig, reference: bool, tasks: list[str], plan: list[list[str]]) -> EvalSchedule:
    """Stage 0 scores every task unless eval_schedule is diagonal_final (2T-1 evaluations, no base row); stage t < S
    scores only its own task(s) unless it is a full row (every:K); a full row is every task (eval_scope all, or a
    reference method) or the tasks seen so far (seen)."""
    every, last = cfg.full_row_every, len(plan)

    def at(stage: int) -> tuple[str, ...]:
        if stage == 0:
            return tuple(tasks) if every is not None else ()
        if stage < last and (every is None or stage % every):
            return tuple(t for t in tasks if t in plan[stage - 1])  # the diagonal: R[t, t] only
        if cfg.eval_scope == "all" or reference:
            return tuple(tasks)
        seen = {t for ts in plan[:stage] for t in ts}
        return tuple(t for t in tasks if t in seen)

    rows = tuple(at(s) for s in range(last + 1))
    return EvalSchedule(rows, bool(rows[0] or cfg.general_ce_tokens or cfg.general_tasks))


@dataclass
class SequenceSpec:
    method: str
    seed: int
    order_index: int
    tasks: list[str]
    run_dir: Path
    cfg: ExperimentConfig  # the variant's config (a grid sets some knobs), else the experiment's
    variant: str | None = None
    variant_values: dict[str, Any] | None = None
    stages: list[StagePlan] = field(default_factory=list)  # stages 1..S, from plan()
    strength: dict[str, Any] | None = None  # the method's strength knob, its value and its source (run/suite_knobs)
    schedule: EvalSchedule | None = None  # what each stage evaluates, from plan()

    @property
    def label(self) -> str:
        v = f"variant-{self.variant}/" if self.variant else ""
        return f"{v}{self.method}/seed-{self.seed}/order-{self.order_index}"


def experiment_dir(cfg: ExperimentConfig) -> Path:
    return Path(cfg.results_dir) / cfg.experiment_name


def variants(cfg: ExperimentConfig) -> list[tuple[str | None, dict[str, Any], ExperimentConfig]]:
    """(id, knob values, config) per combination of the grid; [(None, {}, cfg)] without one.

    The id is a short hash of the values alone, so a variant keeps its folder whatever else changes."""
    if not cfg.grid:
        return [(None, {}, cfg)]
    keys = sorted(cfg.grid)
    out = []
    for combo in itertools.product(*(cfg.grid[k] for k in keys)):
        values = dict(zip(keys, combo))
        data = cfg.model_dump(exclude_unset=True)  # unset method sections stay unset (they must not validate)
        for k, v in nest_overrides(
            {k: parse_cli_value(k, v) if isinstance(v, str) else v for k, v in values.items()}
        ).items():
            data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
        try:
            vcfg = ExperimentConfig(**data)
        except ValidationError as err:
            raise ConfigError(format_errors(err, f"grid variant {values}", set())) from None
        # The id hashes the validated values, so "5" from a flag and 5 from YAML are the same variant.
        dumped = vcfg.model_dump()  # a method knob under its YAML name (ewc.lambda is the field lambda_)
        values = {k: (dumped[k.split(".")[0]][k.split(".")[1]] if "." in k else getattr(vcfg, k)) for k in keys}
        # LoRI's knobs hash under their old top-level names: a mask_density sweep keeps its folders (knobs.flat_name).
        vid = hashlib.sha256(
            json.dumps({flat_name(k): v for k, v in values.items()}, sort_keys=True, default=str).encode()
        ).hexdigest()[:8]
        out.append((vid, values, vcfg))
    return out


def plan(cfg: ExperimentConfig, suite) -> list[SequenceSpec]:
    """Every method x seed x order, with its run folder."""
    check_lr_families(suite)
    specs = []
    for k in cfg.orders:
        if k < 0 or k >= len(suite.orders):
            raise ConfigError(
                f"orders: suite {suite.name!r} has {len(suite.orders)} order(s) (0..{len(suite.orders) - 1}); got {k}"
            )
        order = list(suite.orders[k])
        if cfg.tasks:
            unknown = [t for t in cfg.tasks if t not in order]
            if unknown:
                raise ConfigError(f"tasks: {unknown} not in suite {suite.name!r} order {k} ({', '.join(order)})")
            order = [t for t in order if t in cfg.tasks]
        for vid, values, vcfg in variants(cfg):
            vcfg = with_suite_knobs(vcfg, suite)
            base = experiment_dir(cfg) / f"variant-{vid}" if vid else experiment_dir(cfg)
            for method in cfg.methods:
                for seed in cfg.seeds:
                    d = base / method / f"seed-{seed}"
                    if len(cfg.orders) > 1:
                        d = d / f"order-{k}"
                    stages = [
                        StagePlan(
                            tasks,
                            stage_budget(vcfg, suite, tasks, method, seed),
                            {f: stage_lr(vcfg, suite, tasks, f) for f in LR_FAMILIES},
                        )
                        for tasks in METHODS[method].stage_plan(order)
                    ]
                    schedule = eval_schedule(vcfg, METHODS[method].reference, order, [s.tasks for s in stages])
                    specs.append(
                        SequenceSpec(
                            method,
                            seed,
                            k,
                            order,
                            d,
                            vcfg,
                            vid,
                            values,
                            stages,
                            strength(vcfg, suite, method),
                            schedule,
                        )
                    )
    return specs


def check_results_dir(path: Path) -> None:
    """The results folder must be creatable: probe the deepest existing ancestor with a real temp folder.

    os.access says yes to root everywhere, and a read-only or virtual filesystem (/proc, a
    read-only mount) only says no when something is actually created there."""
    probe = Path(path).resolve()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise HarnessError(
            f"results folder {path} is not writable ({probe} is a file, not a folder). Pass another --results-dir."
        )
    try:
        os.rmdir(tempfile.mkdtemp(dir=probe, prefix=".harness-probe-"))
    except OSError as exc:
        raise HarnessError(
            f"results folder {path} is not writable ({probe}: {exc.strerror}). Pass another --results-dir."
        ) from None


def b_shapes(linear: dict[str, tuple[int, int]], targets: list[str], rank: int) -> dict[str, tuple[int, int]]:
    """lora_B shapes (d_out, r) of every module PEFT would adapt, keyed like the adapter files."""
    shapes = {
        f"{name}.lora_B.weight": (d_out, rank) for name, (d_out, _) in linear.items() if name.split(".")[-1] in targets
    }
    if not shapes:
        raise ConfigError(
            f"targets: none of {targets} names a Linear module of this model. Use names such as q_proj,v_proj."
        )
    return shapes


def preflight_methods(cfg: ExperimentConfig, specs: list[SequenceSpec], linear: dict[str, tuple[int, int]]) -> None:
    """Each method's own checks (mask capacity for lori-s) on the model's real module shapes."""
    for spec in specs:
        c = spec.cfg
        METHODS[spec.method].preflight(c, b_shapes(linear, c.targets, c.rank), len(spec.tasks))


def check_launcher(cfg: ExperimentConfig, uri: str) -> None:
    """Jobs on Ray or Slurm run in parallel processes: they need a tracking server, and Slurm whole GPUs.

    Several processes opening one sqlite store race on its schema and lock it ("database is
    locked"), so a parallel launcher with sqlite is refused before anything is written."""
    if cfg.jobs != 1 and D.is_distributed():
        raise ConfigError(
            f"--jobs {cfg.jobs}: under torchrun / accelerate launch the ranks share one sequence; run several "
            "sequences at once without the launcher (--jobs), or one sequence over several processes (torchrun)"
        )
    if cfg.launcher == "local":
        return
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        raise ConfigError(
            f"--launcher {cfg.launcher}: its jobs log to MLflow in parallel, which the store {uri} cannot take "
            "(several processes on one sqlite/file store fail). Start a tracking server shared by every job: "
            f"`harness tracking-server --results-dir {cfg.results_dir}` (or `make tracking-server`), then pass the URI it prints, "
            "e.g. --tracking-uri http://127.0.0.1:5001 (or set MLFLOW_TRACKING_URI)."
        )
    if cfg.launcher == "slurm":
        if cfg.job_gpus != int(cfg.job_gpus):
            raise ConfigError(
                f"--job-gpus {cfg.job_gpus}: Slurm gives whole GPUs to a job; use 0, 1, 2, ... with --launcher slurm."
            )

        if shutil.which("sbatch") is None:
            raise HarnessError(
                "--launcher slurm: no `sbatch` on PATH here. Run `harness run` on a Slurm login node "
                "(or use --launcher local / ray)."
            )


def check_precision(cfg: ExperimentConfig) -> None:
    """The base dtype must exist on the device (fp16 needs CUDA; bf16 needs a GPU that has it); nothing is loaded."""
    device = resolve_device(cfg.device)
    why = check_dtype_on_device(resolve_dtype(cfg.dtype, device), device)
    if why:
        raise ConfigError(f"--dtype {cfg.dtype} on {device}: {why}")


ASSUMED_SEQ_LEN = 512  # tokens per training sequence for the memory estimate when no max_seq_len bounds them


def check_memory(cfg: ExperimentConfig, suite, specs: list[SequenceSpec], config, shapes) -> MEM.Estimate | None:
    """The memory preflight (harness/models/memory.py) on CUDA, before anything loads: a stage that cannot fit the
    device's free memory is refused (exit 2) with what would fit. On CPU the estimate is returned, never refused."""
    device = resolve_device(cfg.device)
    shape = MEM.shape_of(config)
    budgets = [stage_budget(cfg, suite, [t], s.method, s.seed) for s in specs for t in s.tasks]
    adapter, adapted = MEM.adapter_sizes(shapes, cfg.targets, cfg.rank)
    seq_lens = [b["max_seq_len"] for b in budgets]
    return MEM.preflight(
        shape,
        dtype=resolve_dtype(cfg.dtype, device, shape.params),
        adapter_params=adapter,
        adapted_params=adapted,
        batch_size=max(b["batch_size"] for b in budgets),
        seq_len=max(seq_lens) if all(seq_lens) else ASSUMED_SEQ_LEN,
        checkpointing=cfg.gradient_checkpointing,
        folded_eval=bool(cfg.eval_merged),
        device=device,
        free=MEM.free_memory(device) if device.type == "cuda" else None,
    )


def sequence_memory(cfg: ExperimentConfig, suite, specs: list[SequenceSpec]) -> MEM.Estimate | None:
    """One sequence's peak memory by the preflight's estimate; None where the model's config cannot be read unloaded."""
    config = model_config(cfg.model, cache_dir=cfg.cache_dir, trust_remote_code=cfg.trust_remote_code)
    return None if config is None else check_memory(cfg, suite, specs, config, linear_shapes(config))


def validate(cfg: ExperimentConfig):
    """Everything that can be checked without training: suite, tasks, orders, model, capacity, general_tasks, paths, launcher."""
    uri = default_tracking_uri(Path(cfg.results_dir), cfg.tracking_uri)
    check_precision(cfg)
    check_launcher(cfg, uri)
    # The thorough check (data files, labels, lm-eval tasks): ~2 s, and a missing file must stop
    # the run here, not at stage 3.
    suite = validate_suite(cfg.suite)
    specs = plan(cfg, suite)
    check_model_available(cfg.model, cache_dir=cfg.cache_dir)
    # Real module shapes from the model's config (meta device, no weights); where the config cannot
    # be read without loading, the same check runs on the loaded model before anything is written.
    config = model_config(cfg.model, cache_dir=cfg.cache_dir, trust_remote_code=cfg.trust_remote_code)
    if config is not None:
        shapes = linear_shapes(config)
        preflight_methods(cfg, specs, shapes)
        check_memory(cfg, suite, specs, config, shapes)
    hub_tasks = sorted({t for spec in specs for t in spec.tasks if suite.task(t).is_hub})
    if hub_tasks and not downloads_allowed():
        raise HarnessError(
            f"suite {suite.name!r} reads Hugging Face datasets ({', '.join(hub_tasks)}) and hub downloads are off. "
            "On a machine with hub access set HF_HUB_OFFLINE=0 (or HARNESS_ALLOW_DOWNLOADS=1); without the hub, "
            "point HARNESS_DATA_OVERRIDES at local files of the same schema (see the README's Task suites)."
        )
    check_general_tasks(
        cfg
    )  # lm-eval's registry: indexed (~11 s) only when general_tasks names a task outside general_include
    check_results_dir(cfg.results_dir)
    if not cfg.tracking_optional:  # with it, the run starts and its mirror catches up once the store answers
        check_reachable(uri)
    return suite, specs, uri, config is not None


def stage_lr(cfg: ExperimentConfig, suite, tasks: list[str], method: str) -> float:
    """The method's (or lr family's) learning rate for a stage: the config's, else the suite's for its first task."""
    return cfg.lr_for(method, suite.task(tasks[0]).budget_for(suite).lr)


def stage_budget(cfg: ExperimentConfig, suite, tasks: list[str], method: str, seed: int) -> dict[str, Any]:
    """Config values win; the suite's budget fills the rest. A multi-task stage gets the sum of its tasks' steps."""
    b = suite.task(tasks[0]).budget_for(suite)
    out = {
        "epochs": cfg.epochs if cfg.epochs is not None else b.epochs,
        "batch_size": cfg.batch_size if cfg.batch_size is not None else b.batch_size,
        "max_seq_len": cfg.max_seq_len if cfg.max_seq_len is not None else b.max_seq_len,
        "max_steps": cfg.max_steps,
        "lr": stage_lr(cfg, suite, tasks, method),
        "steps": None,
    }
    if len(tasks) > 1:
        out["steps"] = sum(_task_steps(cfg, suite, t, method, seed) for t in tasks)
    return out


def _task_steps(cfg: ExperimentConfig, suite, task: str, method: str, seed: int) -> int:
    b = stage_budget(cfg, suite, [task], method, seed)
    n = len(suite.task(task).train_examples(limit=cfg.train_limit, seed=seed))
    steps = math.ceil(b["epochs"] * math.ceil(n / b["batch_size"]))
    return min(steps, b["max_steps"]) if b["max_steps"] else steps
