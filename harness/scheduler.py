"""The sequence loop: stage 0 evaluates the base model, stage t trains task t then evaluates.

Run folder (a contract; see README):
    <results>/<experiment>/config.yaml                     the resolved experiment config
    <results>/<experiment>/<method>/seed-<s>[/order-<k>]/  one sequence
        config.yaml   resolved config + this sequence (method, seed, order, tasks)
        state.json    MLflow parent run id (what resume needs besides the stages)
        stages/0-base/eval.json
        stages/<t>-<task>/  adapter/ (PEFT safetensors), masks.safetensors (lori-s), eval.json,
                            train.json, stage.json (written last; the folder appears by rename)
        matrix.csv, matrix.json, summary.json, diagnostics.json, matrix_heatmap.png

A stage is a function of (previous stage's checkpoint, config): its RNG is seeded from
(seed, stage), never carried over, so a resumed sequence reproduces an uninterrupted one.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness import metrics as MX
from harness.adapters import masks as M
from harness.adapters.lori import AdapterSequence, MaskEnforcer
from harness.seeding import stable_seed
from harness.config import ExperimentConfig
from harness.errors import ConfigError, HarnessError
from harness.io import atomic_dir, atomic_write_json, atomic_write_text, atomic_write_yaml, read_json

log = logging.getLogger(__name__)

STAGE_MARKER = "stage.json"


def say(msg: str) -> None:
    """One line for the user (stderr, so stdout stays machine-readable)."""
    print(msg, file=sys.stderr, flush=True)


@dataclass
class SequenceSpec:
    method: str
    seed: int
    order_index: int
    tasks: list[str]
    run_dir: Path

    @property
    def label(self) -> str:
        return f"{self.method}/seed-{self.seed}/order-{self.order_index}"


# --- planning and validation (nothing is written here) ------------------------------------------
def experiment_dir(cfg: ExperimentConfig) -> Path:
    return Path(cfg.results_dir) / cfg.experiment_name


def plan(cfg: ExperimentConfig, suite) -> list[SequenceSpec]:
    """Every method x seed x order, with its run folder."""
    specs = []
    for k in cfg.orders:
        if k < 0 or k >= len(suite.orders):
            raise ConfigError(f"orders: suite {suite.name!r} has {len(suite.orders)} order(s) (0..{len(suite.orders) - 1}); got {k}")
        order = list(suite.orders[k])
        if cfg.tasks:
            unknown = [t for t in cfg.tasks if t not in order]
            if unknown:
                raise ConfigError(f"tasks: {unknown} not in suite {suite.name!r} order {k} ({', '.join(order)})")
            order = [t for t in order if t in cfg.tasks]
        for method in cfg.methods:
            for seed in cfg.seeds:
                d = experiment_dir(cfg) / method / f"seed-{seed}"
                if len(cfg.orders) > 1:
                    d = d / f"order-{k}"
                specs.append(SequenceSpec(method, seed, k, order, d))
    return specs


def quick_capacity_check(cfg: ExperimentConfig, n_tasks: int) -> None:
    """Shape-free capacity check (exact per-module check follows once the model is loaded)."""
    if "lori-s" not in cfg.methods or cfg.overlap_policy == "independent" or n_tasks <= 1:
        return
    fresh = 1.0 if cfg.overlap_policy == "disjoint" else 1.0 - cfg.max_overlap
    need = cfg.mask_density * (1 + (n_tasks - 1) * fresh)
    if need > 1.0 + 1e-9:
        M.check_capacity({"every module": (10**6,)}, n_tasks, density=cfg.mask_density, policy=cfg.overlap_policy,
                         max_overlap=cfg.max_overlap, scope="global")


def check_results_dir(path: Path) -> None:
    probe = Path(path).resolve()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise HarnessError(f"results folder {path} is not writable ({probe} is not a writable folder). Pass another --results-dir.")


def validate(cfg: ExperimentConfig):
    """Everything that can be checked without training: suite, tasks, orders, model, capacity, paths."""
    from harness.models import check_model_available, downloads_allowed
    from harness.suites import validate_suite
    from harness.tracking import check_reachable, default_tracking_uri

    # The thorough check (data files, labels, lm-eval tasks): ~2 s, and a missing file must stop
    # the run here, not at stage 3.
    suite = validate_suite(cfg.suite)
    specs = plan(cfg, suite)
    for spec in specs:
        quick_capacity_check(cfg, len(spec.tasks))
    check_model_available(cfg.model, cache_dir=cfg.cache_dir)
    hub_tasks = sorted({t for spec in specs for t in spec.tasks if suite.task(t).is_hub})
    if hub_tasks and not downloads_allowed():
        raise HarnessError(
            f"suite {suite.name!r} reads Hugging Face datasets ({', '.join(hub_tasks)}) and hub downloads are off. "
            "On a machine with hub access set HF_HUB_OFFLINE=0 (or HARNESS_ALLOW_DOWNLOADS=1); without the hub, "
            "point HARNESS_DATA_OVERRIDES at local files of the same schema (see the README's Task suites)."
        )
    check_results_dir(cfg.results_dir)
    uri = default_tracking_uri(Path(cfg.results_dir), cfg.tracking_uri)
    check_reachable(uri)
    return suite, specs, uri


def target_b_shapes(model: torch.nn.Module, targets: list[str], rank: int) -> dict[str, tuple[int, int]]:
    """lora_B shapes (d_out, r) of every module PEFT would adapt: exact capacity check before training."""
    shapes = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in targets:
            shapes[name] = (mod.out_features, rank)
    if not shapes:
        raise ConfigError(f"targets: none of {targets} names a Linear module of this model. Use names such as q_proj,v_proj.")
    return shapes


# --- the sequence --------------------------------------------------------------------------------
def _resolved_sequence_config(cfg: ExperimentConfig, spec: SequenceSpec) -> dict[str, Any]:
    d = cfg.to_yaml_dict()
    d["sequence"] = {"method": spec.method, "seed": spec.seed, "order_index": spec.order_index, "tasks": spec.tasks}
    return d


def _comparable(d: dict[str, Any]) -> dict[str, Any]:
    # Where results go and how they are tracked does not change what a stage computes.
    skip = {"results_dir", "tracking_uri", "cache_dir", "methods", "seeds", "orders", "experiment"}
    return {k: v for k, v in d.items() if k not in skip}


def finished_stages(run_dir: Path) -> dict[int, Path]:
    out = {}
    sdir = run_dir / "stages"
    if not sdir.is_dir():
        return out
    for p in sdir.iterdir():
        if p.name.startswith(".tmp-"):
            shutil.rmtree(p, ignore_errors=True)  # a stage killed mid-write: redone
            continue
        if (p / STAGE_MARKER).exists():
            out[int(p.name.split("-", 1)[0])] = p
        elif p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    return out


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def write_matrix_files(run_dir: Path, R: np.ndarray, tasks: list[str]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["stage", *tasks])
    for i in range(R.shape[0]):
        w.writerow([i, *["" if math.isnan(v) else f"{v:.6f}" for v in R[i]]])
    atomic_write_text(run_dir / "matrix.csv", buf.getvalue())
    atomic_write_json(run_dir / "matrix.json", {
        "tasks": tasks, "stages": list(range(R.shape[0])),
        "R": [[None if math.isnan(v) else float(v) for v in row] for row in R],
    })


class SequenceRunner:
    """Runs (or resumes) one method x seed x order sequence."""

    def __init__(self, cfg: ExperimentConfig, suite, spec: SequenceSpec, model, tokenizer, evaluator, tracker,
                 progress: bool = True, base_cache: dict | None = None):
        self.cfg, self.suite, self.spec = cfg, suite, spec
        self.base_cache = base_cache if base_cache is not None else {}
        self.model, self.tokenizer, self.evaluator, self.tracker = model, tokenizer, evaluator, tracker
        self.progress = progress
        self.T = len(spec.tasks)
        self.R = np.full((self.T + 1, self.T), np.nan)
        self.budget = suite.budget

    # --- helpers -------------------------------------------------------------------------------
    def _eval_tasks(self, stage: int) -> list[str]:
        if stage == 0 or self.cfg.eval_scope == "all":
            return list(self.spec.tasks)
        return list(self.spec.tasks[:stage])

    def _budget(self, task: str) -> dict[str, Any]:
        """Config values win; the suite's recommended budget (task overrides applied) fills the rest."""
        b = self.suite.task(task).budget_for(self.suite)
        return {
            "epochs": self.cfg.epochs if self.cfg.epochs is not None else b.epochs,
            "batch_size": self.cfg.batch_size if self.cfg.batch_size is not None else b.batch_size,
            "max_seq_len": self.cfg.max_seq_len if self.cfg.max_seq_len is not None else b.max_seq_len,
            "max_steps": self.cfg.max_steps,
            "lr": self.cfg.lr_for(self.spec.method, b.lr),
            "lr_lori_d": self.cfg.lr_for("lori-d", b.lr),
        }

    def _fill_row(self, stage: int, scores: dict[str, float]) -> None:
        for task, v in scores.items():
            self.R[stage, self.spec.tasks.index(task)] = v

    def _log_parent_row(self, stage: int, scores: dict[str, float], *, resumed: bool = False) -> None:
        """acc/<task> at step = stage; a resumed stage may already be logged, a new one never is."""
        if resumed:
            for task, v in scores.items():
                self.tracker.log_metric_once(self.parent_id, f"acc/{task}", v, stage)
        else:
            self.tracker.log_metrics(self.parent_id, {f"acc/{task}": v for task, v in scores.items()}, step=stage)

    # --- main ----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg, spec = self.cfg, self.spec
        run_dir = spec.run_dir
        resolved = _resolved_sequence_config(cfg, spec)
        cfg_path = run_dir / "config.yaml"
        if cfg_path.exists():
            import yaml

            old = yaml.safe_load(cfg_path.read_text()) or {}
            if _comparable(old) != _comparable(resolved):
                diff = sorted(k for k in set(_comparable(old)) | set(_comparable(resolved))
                              if _comparable(old).get(k) != _comparable(resolved).get(k))
                raise ConfigError(
                    f"{cfg_path}: this run folder was made with a different config (keys differ: {', '.join(diff)}). "
                    "Use another --results-dir or experiment name, or delete the folder to start over."
                )
        summary_path = run_dir / "summary.json"
        if summary_path.exists() and (run_dir / "state.json").exists():
            summ = read_json(summary_path)
            if summ.get("complete"):
                say(f"[{spec.label}] already complete: skipping ({run_dir})")
                return summ
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_yaml(cfg_path, resolved)

        state = read_json(run_dir / "state.json") if (run_dir / "state.json").exists() else {}
        parent_id = state.get("mlflow_parent_run_id")
        if parent_id:
            try:
                self.tracker.reopen(parent_id)
            except Exception:
                parent_id = None
        if not parent_id:
            first = self._budget(spec.tasks[0])
            params = {
                "method": spec.method, "seed": spec.seed, "order_index": spec.order_index,
                "task_order": ",".join(spec.tasks), "suite": self.suite.name, "model": cfg.model,
                "rank": cfg.rank, "alpha": cfg.scale_alpha, "targets": ",".join(cfg.targets),
                "eval_scope": cfg.eval_scope, "weight_decay": cfg.weight_decay,
                "lr": first["lr"], "epochs": first["epochs"],
            }
            if spec.method != "lora":
                params.update({"a_init": cfg.a_init, "a_mode": cfg.a_mode})
            if spec.method == "lori-s":
                params.update({"mask_strategy": cfg.mask_strategy, "mask_density": cfg.mask_density,
                               "mask_scope": cfg.mask_scope, "overlap_policy": cfg.overlap_policy, "max_overlap": cfg.max_overlap})
            tags = {"harness.method": spec.method, "harness.seed": str(spec.seed), "harness.order": str(spec.order_index),
                    "harness.suite": self.suite.name, "harness.model": cfg.model, "harness.experiment": cfg.experiment_name,
                    "harness.git_commit": git_commit(), "harness.run_dir": str(run_dir.resolve())}
            parent_id = self.tracker.create_parent(spec.label, tags, params)
            atomic_write_json(run_dir / "state.json", {"mlflow_parent_run_id": parent_id, "mlflow_tracking_uri": self.tracker.uri})
        self.parent_id = parent_id
        self.child_id: str | None = None
        try:
            out = self._run_stages()
        except BaseException:
            if self.child_id:
                self.tracker.finish(self.child_id, "FAILED")
            self.tracker.finish(self.parent_id, "FAILED")
            raise
        self.tracker.finish(self.parent_id, "FINISHED")
        return out

    def _run_stages(self) -> dict[str, Any]:
        cfg, spec, run_dir = self.cfg, self.spec, self.spec.run_dir
        done = finished_stages(run_dir)
        child_ids = set()
        stage_wall: dict[int, float] = {}
        for t, d in sorted(done.items()):
            info = read_json(d / STAGE_MARKER)
            ev = read_json(d / "eval.json")
            self._fill_row(t, ev["scores"])
            self._log_parent_row(t, ev["scores"], resumed=True)
            stage_wall[t] = info.get("wall_s", float("nan"))
            if info.get("mlflow_run_id"):
                child_ids.add(info["mlflow_run_id"])
                if self.tracker.status(info["mlflow_run_id"]) == "RUNNING":
                    self.tracker.finish(info["mlflow_run_id"], "FINISHED")
        dropped = self.tracker.drop_unfinished_children(self.parent_id, child_ids)
        if done:
            say(f"[{spec.label}] resuming: stages {sorted(done)} finished" + (f"; {dropped} interrupted stage run(s) discarded" if dropped else ""))

        # Stage 0: the base model (b_j, needed for FWT).
        if 0 not in done:
            t0 = time.perf_counter()
            # The base model is the same for every method and seed: evaluate it once per task list.
            key = tuple(self._eval_tasks(0))
            if key not in self.base_cache:
                self.base_cache[key] = self.evaluator.evaluate(self.model, list(key), bf16_autocast=cfg.bf16_autocast)
            ev = self.base_cache[key]
            with atomic_dir(run_dir / "stages" / "0-base") as tmp:
                atomic_write_json(tmp / "eval.json", {"stage": 0, "scores": ev.scores, "raw": ev.raw, "n": ev.n_examples, "wall_s": ev.wall_s})
                atomic_write_json(tmp / STAGE_MARKER, {"stage": 0, "task": None, "wall_s": time.perf_counter() - t0, "mlflow_run_id": None})
            self._fill_row(0, ev.scores)
            self._log_parent_row(0, ev.scores)
            stage_wall[0] = time.perf_counter() - t0
            say(f"[{spec.label}] stage 0 (base model) " + " ".join(f"{k}={v:.2f}" for k, v in ev.scores.items()) + f"  eval {ev.wall_s:.1f}s")

        adapters = AdapterSequence(
            self.model, method=spec.method, rank=cfg.rank, alpha=cfg.scale_alpha, targets=cfg.targets,
            a_init=cfg.a_init, a_mode=cfg.a_mode, seed=spec.seed,
        )
        self.adapters = adapters
        try:
            last = max([t for t in done if t > 0], default=0)
            for t in range(1, last + 1):
                adapters.begin_task(t)
                m = AdapterSequence.load_masks(done[t])
                if m is not None:
                    adapters.task_masks.append(m)
            if last:
                adapters.load_weights(done[last])
            for t in range(last + 1, self.T + 1):
                self._stage(t, adapters, stage_wall)
            return self._finish(adapters, stage_wall)
        finally:
            self.model = adapters.unload() if adapters.model is not None else self.model

    def _stage(self, t: int, adapters: AdapterSequence, stage_wall: dict[int, float]) -> None:
        cfg, spec = self.cfg, self.spec
        task = spec.tasks[t - 1]
        t_stage = time.perf_counter()
        self.child_id = self.tracker.create_stage(self.parent_id, t, task, {"harness.method": spec.method, "harness.seed": str(spec.seed)})
        name = adapters.begin_task(t)
        budget = self._budget(task)
        examples = self.suite.task(task).train_examples(limit=cfg.train_limit, seed=spec.seed)
        lr = budget["lr"]
        stage_masks = None
        enforcer = None
        mask_stats: dict[str, float] = {}
        calib_s = 0.0
        if spec.method == "lori-s":
            b_params = adapters.b_params(name)
            shapes = {k: tuple(p.shape) for k, p in b_params.items()}
            used = M.union(adapters.task_masks) if adapters.task_masks else None
            if cfg.mask_strategy == "random":
                scores = M.random_scores(shapes, stable_seed(spec.seed, "task", t))
                scope = "module"
            else:
                tc = time.perf_counter()
                start = {k: p.detach().clone() for k, p in b_params.items()}
                self.model_train(adapters, examples, budget, lr=budget["lr_lori_d"], stage=t, desc=f"{task} calib",
                                 max_steps=cfg.calibration_steps or budget["max_steps"], enforcer=None, salt="calib")
                with torch.no_grad():
                    scores = {k: (p.detach() - start[k]).abs().float().cpu() for k, p in b_params.items()}
                    for k, p in b_params.items():
                        p.copy_(start[k])  # throw the calibration B away: retrain from the start under the mask
                scope = cfg.mask_scope
                calib_s = time.perf_counter() - tc
            stage_masks = M.allocate(scores, used, density=cfg.mask_density, policy=cfg.overlap_policy,
                                     max_overlap=cfg.max_overlap, scope=scope)
            nnz = M.mask_nnz(stage_masks)
            mask_stats = {"mask/nnz": nnz, "mask/density": nnz / sum(math.prod(s) for s in shapes.values())}
            if used is not None:
                mask_stats["mask/overlap_with_earlier"] = sum(int((stage_masks[k] & used[k]).sum()) for k in stage_masks) / nnz
            enforcer = MaskEnforcer(b_params, stage_masks)
        res = self.model_train(adapters, examples, budget, lr=lr, stage=t, desc=f"[{spec.method} s{spec.seed}] {t}/{self.T} {task}",
                               max_steps=budget["max_steps"], enforcer=enforcer)
        if enforcer is not None:
            enforcer.remove()
            adapters.task_masks.append(stage_masks)
        ev = self.evaluator.evaluate(adapters.model, self._eval_tasks(t), bf16_autocast=cfg.bf16_autocast)
        counts = adapters.param_counts(stage_masks)
        stage_dir = self.spec.run_dir / "stages" / f"{t}-{task}"
        t_save = time.perf_counter()
        with atomic_dir(stage_dir) as tmp:
            adapters.save(tmp, stage_masks)
            atomic_write_json(tmp / "eval.json", {"stage": t, "task": task, "scores": ev.scores, "raw": ev.raw, "n": ev.n_examples, "wall_s": ev.wall_s})
            atomic_write_json(tmp / "train.json", {"steps": res.steps, "tokens": res.tokens, "wall_s": res.wall_s, "tok_s": res.tok_s,
                                                    "lr": lr, "budget": budget, "losses": res.losses, "calibration_s": calib_s})
            wall = time.perf_counter() - t_stage
            atomic_write_json(tmp / STAGE_MARKER, {"stage": t, "task": task, "wall_s": wall, "train_s": res.wall_s, "eval_s": ev.wall_s,
                                                   "mlflow_run_id": self.child_id, **counts, **mask_stats})
        save_s = time.perf_counter() - t_save
        # MLflow mirrors the committed stage.
        self.tracker.log_series(self.child_id, "train/loss", res.losses)
        self.tracker.log_metrics(self.child_id, {
            "stage_wall_s": wall, "train_s": res.wall_s, "eval_s": ev.wall_s, "save_s": save_s, "calibration_s": calib_s,
            "train_tok_s": res.tok_s, "train_steps": res.steps, **{f"eval/{k}": v for k, v in ev.scores.items()},
            **counts, **mask_stats})
        self._fill_row(t, ev.scores)
        self._log_parent_row(t, ev.scores)
        # Everything that is neither training nor evaluation: setup, masks, checkpoint, logging.
        total = time.perf_counter() - t_stage
        overhead = total - res.wall_s - ev.wall_s - calib_s
        self.tracker.log_metrics(self.child_id, {"overhead_s": overhead, "overhead_frac": overhead / total})
        self.tracker.finish(self.child_id, "FINISHED")
        self.child_id = None
        stage_wall[t] = total
        seen = " ".join(f"{k}={v:.2f}" for k, v in ev.scores.items())
        say(f"[{spec.label}] stage {t}/{self.T} {task}: loss {res.losses[0]:.3f}->{res.losses[-1]:.3f} "
            f"{res.steps} steps {res.tok_s:.0f} tok/s | train {res.wall_s:.1f}s eval {ev.wall_s:.1f}s "
            f"other {overhead:.1f}s ({100 * overhead / total:.1f}%) | {seen}")

    def model_train(self, adapters: AdapterSequence, examples, budget, *, lr, stage, desc, max_steps, enforcer, salt: str = ""):
        from harness.train import train_stage

        return train_stage(
            adapters.model, self.tokenizer, examples, adapters.trainable_parameters(), lr=lr, epochs=budget["epochs"],
            batch_size=budget["batch_size"], max_steps=max_steps, max_seq_len=budget["max_seq_len"],
            weight_decay=self.cfg.weight_decay, grad_clip=self.cfg.grad_clip, warmup_steps=self.cfg.warmup_steps,
            seed=stable_seed(self.spec.seed, salt) if salt else self.spec.seed, stage=stage,
            bf16_autocast=self.cfg.bf16_autocast, after_step=enforcer.after_step if enforcer else None,
            desc=desc, progress=self.progress,
        )

    def _finish(self, adapters: AdapterSequence, stage_wall: dict[int, float]) -> dict[str, Any]:
        spec, run_dir = self.spec, self.spec.run_dir
        summ = MX.summarize(self.R)
        counts = adapters.param_counts(adapters.task_masks[-1] if adapters.task_masks else None)
        if adapters.task_masks:
            counts["trainable_params_effective"] = max(M.mask_nnz(m) for m in adapters.task_masks)
        write_matrix_files(run_dir, self.R, spec.tasks)
        diagnostics: dict[str, Any] = {"mask_overlap": None, "subspace_overlap": None}
        if adapters.task_masks:
            diagnostics["mask_overlap"] = {"tasks": spec.tasks[: len(adapters.task_masks)], "matrix": M.mask_overlap_matrix(adapters.task_masks)}
        if spec.method != "lora":
            As = [adapters.a_tensors(a) for a in adapters.adapters] if adapters.a_mode == "per_task" else [adapters.a_tensors(adapters.adapters[0])] * self.T
            so = M.subspace_overlap_matrix(As)
            diagnostics["subspace_overlap"] = {"tasks": spec.tasks, "matrix": so["matrix"]}
        atomic_write_json(run_dir / "diagnostics.json", diagnostics)
        from harness.plots import matrix_heatmap

        matrix_heatmap(self.R, spec.tasks, f"{spec.method} seed {spec.seed} order {spec.order_index}", run_dir / "matrix_heatmap.png")
        summary = {
            "method": spec.method, "seed": spec.seed, "order_index": spec.order_index, "tasks": spec.tasks,
            "acc": summ["ACC"], "bwt": summ["BWT"], "fwt": summ["FWT"], "forgetting": summ["forgetting"],
            **counts,
            "stage_wall_s": [stage_wall.get(t) for t in range(self.T + 1)],
            "mlflow_parent_run_id": self.parent_id, "mlflow_tracking_uri": self.tracker.uri,
            "complete": True,
        }
        self.tracker.log_metrics(self.parent_id, {**summ, **counts})
        for name in ("matrix.csv", "matrix.json", "diagnostics.json", "matrix_heatmap.png", "config.yaml"):
            self.tracker.log_artifact(self.parent_id, run_dir / name)
        self.tracker.log_json(self.parent_id, summary, "summary.json")
        atomic_write_json(run_dir / "summary.json", summary)
        fmt = lambda v: "n/a" if v is None else f"{v:+.3f}"
        say(f"[{spec.label}] done: ACC {fmt(summ['ACC'])} BWT {fmt(summ['BWT'])} FWT {fmt(summ['FWT'])} "
            f"forgetting {fmt(summ['forgetting'])}  trainable {counts['trainable_params_effective']:,}")
        return summary


def run_experiment(cfg: ExperimentConfig, *, progress: bool = True, only: SequenceSpec | None = None) -> list[dict[str, Any]]:
    """Validate everything, then run every sequence (skipping finished stages and sequences)."""
    from harness.evaluate import Evaluator
    from harness.models import load_model, set_torch_threads
    from harness.tracking import Tracker

    suite, specs, uri = validate(cfg)
    if only is not None:
        specs = [s for s in specs if s.run_dir.resolve() == only.run_dir.resolve()]
    set_torch_threads()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tokenizer = load_model(cfg.model, seed=0, device=cfg.device, dtype=cfg.dtype, cache_dir=cfg.cache_dir,
                                  trust_remote_code=cfg.trust_remote_code)
    say(f"loaded {cfg.model} in {time.perf_counter() - t0:.1f}s on {next(model.parameters()).device}")
    if "lori-s" in cfg.methods:
        shapes = target_b_shapes(model, cfg.targets, cfg.rank)
        for spec in specs:
            M.check_capacity(shapes, len(spec.tasks), density=cfg.mask_density, policy=cfg.overlap_policy,
                             max_overlap=cfg.max_overlap, scope="module" if cfg.mask_strategy == "random" else cfg.mask_scope)
    else:
        target_b_shapes(model, cfg.targets, cfg.rank)
    # Only now is anything written: the experiment folder, the store, the runs.
    exp_dir = experiment_dir(cfg)
    exp_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_yaml(exp_dir / "config.yaml", cfg.to_yaml_dict())
    tracker = Tracker(uri, cfg.experiment_name, artifact_root=Path(cfg.results_dir) / "mlartifacts")
    evaluator = Evaluator(suite, tokenizer, batch_size=cfg.eval_batch_size, limit=cfg.eval_limit)
    results = []
    base_cache: dict = {}
    for spec in specs:
        runner = SequenceRunner(cfg, suite, spec, model, tokenizer, evaluator, tracker, progress=progress, base_cache=base_cache)
        results.append(runner.run())
        model = runner.model
    return results


def install_signal_handlers() -> None:
    """SIGTERM ends like Ctrl-C: runs are marked FAILED, finished stages stay for resume."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
