"""What a sequence's files say: the records of eval.json, train.json and stage.json for a trained stage, summary.json's
metrics, and the MLflow parent record kept in state.json. The runner (harness/run/sequence.py) decides when they are
written; this module decides what they hold (docs/run-folder.md is the contract)."""

from __future__ import annotations

from typing import Any

import numpy as np

from harness import metrics as MX
from harness.provenance import git_commit
from harness.run.mirror import parent_record


def eval_record(t: int, name: str, ev, general_ce: float | None, ce_s: float, general: dict[str, Any]) -> dict:
    """eval.json of trained stage t: its scores (lm-eval's metric), raw results, the general-text CE and general_tasks."""
    return {
        "stage": t,
        "task": name,
        "scores": ev.scores,
        "raw": ev.raw,
        "n": ev.n_examples,
        "wall_s": ev.wall_s,
        "general_ce": general_ce,
        "general_ce_s": ce_s,
        **general,
    }


def train_record(res, budget: dict, calib_s: float, n_examples: int) -> dict:
    """train.json: the stage's steps, tokens, losses, budget, checkpoints and compile facts."""
    return {
        "steps": res.steps,
        "tokens": res.tokens,
        "wall_s": res.wall_s,
        "tok_s": res.tok_s,
        "budget": budget,
        "losses": res.losses,
        "calibration_s": calib_s,
        "checkpoints": res.checkpoints,
        "resumed_from_step": res.resumed_from_step,
        "train_examples": n_examples,
        "compile_used": res.compile_used,
        "compile_note": res.compile_note,
        "compile_graphs": res.compile_graphs,
        "compile_recompiles": res.compile_recompiles,
    }


def stage_record(t: int, name: str, res, ev, timings: dict[str, float], stats: dict[str, Any], **facts: Any) -> dict:
    """stage.json (the commit marker): where the stage's time went, its counts and the method's own statistics.

    timings: total (the stage's wall), calib_s, ce_s, general_s, save_s, resumed_train_s. facts: mlflow_run_id,
    precision, param_counts, learn_check, general_ce, torch_threads."""
    total = timings["total"]
    overhead = (
        total
        - res.wall_s
        - ev.wall_s
        - timings["calib_s"]
        - timings["ce_s"]
        - timings["general_s"]
        - stats["method_setup_s"]
        - stats["method_teardown_s"]
    )
    ce = facts["general_ce"]
    return {
        "stage": t,
        "task": name,
        "wall_s": total,
        "train_s": res.wall_s,
        "eval_s": ev.wall_s,
        "calibration_s": timings["calib_s"],
        "checkpoint_s": res.checkpoint_s,
        "checkpoint_frac": res.checkpoint_s / total,
        "save_s": timings["save_s"],
        "overhead_s": overhead,
        "overhead_frac": overhead / total,
        "resumed_train_s": timings["resumed_train_s"],
        "train_tok_s": res.tok_s,
        "train_steps": res.steps,
        "torch_threads": facts["torch_threads"],  # CPU sums may split differently with another count
        "git_commit": git_commit(),  # the harness code that trained this stage (a resume may run other code)
        "mlflow_run_id": facts["mlflow_run_id"],
        "precision": facts["precision"],
        **facts["param_counts"],
        **stats,
        "learn_check": facts["learn_check"],
        **({"general_ce": ce, "general_ce_s": timings["ce_s"]} if ce is not None else {}),
        **({"general_s": timings["general_s"]} if timings["general_s"] else {}),
    }


def metric_record(R: np.ndarray, tasks: list[str], general_ce: list[float | None], *, reference: bool, margin: float):
    """summary.json's metrics: every entry of harness.metrics.TABLE by its key, the learn check and the general CE."""
    return {
        **MX.summary_values(R, general_ce, reference),
        "learn_margin": margin,
        "not_learned": None if reference else MX.not_learned_tasks(R, tasks, margin),
        **MX.general_ce_summary(general_ce),
    }


def sequence_parent_record(cfg, spec, suite_name: str, method_cls, recipe, precision: dict, first_budget: dict):
    """What state.json keeps to create the sequence's MLflow parent run (now, or when the mirror catches up)."""
    params = {
        "method": spec.method,
        "seed": spec.seed,
        "order_index": spec.order_index,
        "task_order": ",".join(spec.tasks),
        "suite": suite_name,
        "model": cfg.model,
        "rank": cfg.rank,
        "alpha": cfg.scale_alpha,
        "targets": ",".join(cfg.targets),
        "eval_scope": cfg.eval_scope,
        "lr": first_budget["lr"],
        "epochs": first_budget["epochs"],
        "checkpoint_every": cfg.checkpoint_every,
        **recipe.model_dump(),
        **method_cls.params(cfg),
        "dtype": cfg.dtype,
        "adapter_dtype": cfg.adapter_dtype,
        "tf32": cfg.tf32,
        **{f"precision.{k}": v for k, v in precision.items()},
    }
    tags = {
        "harness.method": spec.method,
        "harness.seed": str(spec.seed),
        "harness.order": str(spec.order_index),
        "harness.suite": suite_name,
        "harness.model": cfg.model,
        "harness.experiment": cfg.experiment_name,
        "harness.git_commit": git_commit(),
        "harness.run_dir": str(spec.run_dir.resolve()),
        "harness.reference": str(method_cls.reference).lower(),
        "harness.variant": spec.variant or "",
    }
    params.update({f"grid.{k}": v for k, v in (spec.variant_values or {}).items()})
    return parent_record(spec.label, tags, params)
