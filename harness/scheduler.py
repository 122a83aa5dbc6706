"""The sequence loop: stage 0 evaluates the base model, stage t trains the method on task t, then evaluates.

A stage is a function of (previous stage's checkpoint, config): its RNG is seeded from (seed,
stage), never carried over, so a resumed sequence reproduces an uninterrupted one. The scheduler
never knows which method it runs: it calls the verbs of harness/methods/base.py. The folder is
the source of truth (harness/sequence_files.py); MLflow mirrors it.

Under torchrun / accelerate launch every rank runs the sequence and trains (harness/distributed.py);
rank 0 alone takes the lock, writes files, logs to MLflow and evaluates, and tells the others what is
finished; they wait at barriers. Each stage starts with a check that every rank holds the same masks
and weights (a hash, printed by every rank and kept in stage.json).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from harness import distributed as D
from harness import faults
from harness import metrics as MX
from harness.checkpoint import StageCheckpointer, remove_checkpoint
from harness.config import ExperimentConfig
from harness.io import atomic_dir, atomic_write_json, atomic_write_yaml, read_json
from harness.locking import SequenceLock
from harness.methods import METHODS, StageContext
from harness.planning import SequenceSpec, stage_budget, task_examples
from harness.sequence_files import (STAGE_MARKER, check_same_config, clean_partial_writes, done_line, finished_stages, git_commit,
                                    stage_line, write_matrix_files)
from harness.train import Recipe, collate, tokenize_examples, train_method


def say(msg: str, *, every_rank: bool = False) -> None:
    """One line for the user (stderr, so stdout stays machine-readable); under a launcher only rank 0's,
    unless every_rank (then prefixed with the rank)."""
    if every_rank and D.is_distributed():
        msg = f"[rank {D.rank()}/{D.world_size()}] {msg}"
    elif not D.is_main():
        return
    sys.stderr.write(msg + "\n")  # one write: ranks sharing a stream do not split each other's lines
    sys.stderr.flush()


class SequenceRunner:
    """Runs (or resumes) one method x seed x order sequence."""

    def __init__(self, cfg: ExperimentConfig, suite, spec: SequenceSpec, model, tokenizer, evaluator, tracker,
                 progress: bool = True, base_cache: dict | None = None):
        self.cfg, self.suite, self.spec = cfg, suite, spec
        self.base_cache = base_cache if base_cache is not None else {}
        self.model, self.tokenizer, self.evaluator, self.tracker = model, tokenizer, evaluator, tracker
        self.progress = progress
        self.method_cls = METHODS[spec.method]
        self.plan = self.method_cls.stage_plan(spec.tasks)  # tasks trained at stages 1..S
        self.R = np.full((len(self.plan) + 1, len(spec.tasks)), np.nan)
        self.recipe = Recipe.from_config(cfg)
        self.run_dir = spec.run_dir
        self.stage_wall: dict[int, float] = {}
        self.parent_id: str | None = None  # rank 0's MLflow runs (other ranks never log)
        self.child_id: str | None = None

    # --- small facts -------------------------------------------------------------------------
    def stage_name(self, t: int) -> str:
        tasks = self.plan[t - 1]
        return tasks[0] if len(tasks) == 1 else "all"

    def eval_tasks(self, stage: int) -> list[str]:
        """What stage `stage` evaluates under eval_scope and eval_schedule (cells left out stay NaN: n/a, never guessed)."""
        every, last = self.cfg.full_row_every, len(self.plan)
        if stage == 0:
            return list(self.spec.tasks) if every is not None else []  # diagonal_final: 2T-1 evaluations, no base row
        if stage < last and (every is None or stage % every):
            return [t for t in self.spec.tasks if t in self.plan[stage - 1]]  # the diagonal: R[t, t] only
        if self.cfg.eval_scope == "all" or self.method_cls.reference:
            return list(self.spec.tasks)
        seen = {t for tasks in self.plan[:stage] for t in tasks}
        return [t for t in self.spec.tasks if t in seen]

    def task_examples(self, task: str) -> list[dict]:
        return task_examples(self.cfg, self.suite, task, self.spec.seed, self.recipe)

    def budget(self, tasks: list[str], lr_method: str | None = None) -> dict[str, Any]:
        return stage_budget(self.cfg, self.suite, tasks, lr_method or self.spec.method, self.spec.seed)

    def fill_row(self, stage: int, scores: dict[str, float]) -> None:
        for task, v in scores.items():
            self.R[stage, self.spec.tasks.index(task)] = v

    # --- the sequence ------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        resolved = self.cfg.to_yaml_dict()
        resolved["sequence"] = {"method": self.spec.method, "seed": self.spec.seed, "order_index": self.spec.order_index,
                                "tasks": self.spec.tasks, "variant": self.spec.variant, "variant_values": self.spec.variant_values}
        check_same_config(self.run_dir / "config.yaml", resolved, self.spec.method)
        main = D.is_main()
        lock = SequenceLock(self.run_dir, wait=self.cfg.wait_for_lock) if main else None  # rank 0 holds it for every rank
        waiting = lambda who: say(f"[{self.spec.label}] waiting for {who} to finish this sequence")  # noqa: E731
        with lock.acquire(on_wait=waiting) if lock else contextlib.nullcontext():
            summary_path = self.run_dir / "summary.json"
            done = D.broadcast_object(read_json(summary_path) if main and summary_path.exists() else None)
            if done and done.get("complete"):
                say(f"[{self.spec.label}] already complete: skipping ({self.run_dir})")
                return done
            if main:
                atomic_write_yaml(self.run_dir / "config.yaml", resolved)
                self.parent_id = self._open_parent()
            try:
                out = self._run_stages()
            except BaseException:
                if self.child_id:
                    self.tracker.finish(self.child_id, "FAILED")
                if self.parent_id:
                    self.tracker.finish(self.parent_id, "FAILED")
                raise
            if main:
                self.tracker.finish(self.parent_id, "FINISHED")
            return out

    def _open_parent(self) -> str:
        state_path = self.run_dir / "state.json"
        if state_path.exists():
            parent_id = read_json(state_path)["mlflow_parent_run_id"]
            self.tracker.reopen(parent_id, state_path)
            return parent_id
        cfg, spec = self.cfg, self.spec
        first = self.budget(self.plan[0])
        params = {"method": spec.method, "seed": spec.seed, "order_index": spec.order_index, "task_order": ",".join(spec.tasks),
                  "suite": self.suite.name, "model": cfg.model, "rank": cfg.rank, "alpha": cfg.scale_alpha,
                  "targets": ",".join(cfg.targets), "eval_scope": cfg.eval_scope, "lr": first["lr"], "epochs": first["epochs"],
                  "checkpoint_every": cfg.checkpoint_every, **vars(self.recipe), **self.method_cls.params(cfg)}
        tags = {"harness.method": spec.method, "harness.seed": str(spec.seed), "harness.order": str(spec.order_index),
                "harness.suite": self.suite.name, "harness.model": cfg.model, "harness.experiment": cfg.experiment_name,
                "harness.git_commit": git_commit(), "harness.run_dir": str(self.run_dir.resolve()),
                "harness.reference": str(self.method_cls.reference).lower(), "harness.variant": spec.variant or ""}
        params.update({f"grid.{k}": v for k, v in (spec.variant_values or {}).items()})
        parent_id = self.tracker.create_parent(spec.label, tags, params)
        atomic_write_json(state_path, {"mlflow_parent_run_id": parent_id, "mlflow_tracking_uri": self.tracker.uri})
        return parent_id

    def _run_stages(self) -> dict[str, Any]:
        main = D.is_main()
        if main:
            clean_partial_writes(self.run_dir)
        done = D.broadcast_object(finished_stages(self.run_dir) if main else None)  # rank 0 also drops unfinished ones
        if main:
            self._replay_committed(done)
            if 0 not in done and self.eval_tasks(0):
                self._stage0()
        D.barrier()  # the others wait while rank 0 evaluates the base model
        method = self.method_cls(self.cfg, seed=self.spec.seed, tasks=self.spec.tasks, base_model=self.model,
                                 task_examples=self.task_examples)
        try:
            method.restore(done)
            for t in range(max(done, default=0) + 1, len(self.plan) + 1):
                self._stage(t, method)
            return self._finish(method)
        finally:
            self.model = method.unload() if method.model is not None else self.model

    def _replay_committed(self, done: dict[int, Path]) -> None:
        """Committed stages fill the matrix; MLflow gets whatever a kill kept it from receiving."""
        child_ids = set()
        for t, d in sorted(done.items()):
            info = read_json(d / STAGE_MARKER)
            scores = read_json(d / "eval.json")["scores"]
            self.fill_row(t, scores)
            for task, v in scores.items():
                self.tracker.log_metric_once(self.parent_id, f"acc/{task}", v, t)
            self.stage_wall[t] = info.get("wall_s", float("nan"))
            if info.get("mlflow_run_id"):
                child_ids.add(info["mlflow_run_id"])
                if self.tracker.status(info["mlflow_run_id"]) != "FINISHED":
                    self._mirror_stage(info["mlflow_run_id"], d, fresh=False)
        dropped = self.tracker.drop_unfinished_children(self.parent_id, child_ids)
        if done:
            say(f"[{self.spec.label}] resuming: stages {sorted(done)} finished"
                + (f"; {dropped} interrupted stage run(s) discarded" if dropped else ""))

    def _stage0(self) -> None:
        """The base model on every task (b_j, for FWT); the same for every method and seed, so evaluated once."""
        t0 = time.perf_counter()
        key = tuple(self.eval_tasks(0))
        if key not in self.base_cache:
            self.base_cache[key] = self.evaluator.evaluate(self.model, list(key), bf16_autocast=self.cfg.bf16_autocast)
        ev = self.base_cache[key]
        evj = {"stage": 0, "scores": ev.scores, "raw": ev.raw, "n": ev.n_examples, "wall_s": ev.wall_s}
        info = {"stage": 0, "task": None, "wall_s": time.perf_counter() - t0, "mlflow_run_id": None}
        with atomic_dir(self.run_dir / "stages" / "0-base") as tmp:
            atomic_write_json(tmp / "eval.json", evj)
            atomic_write_json(tmp / STAGE_MARKER, info)
        self.fill_row(0, ev.scores)
        self.tracker.log_metrics(self.parent_id, {f"acc/{task}": v for task, v in ev.scores.items()}, step=0)
        self.stage_wall[0] = time.perf_counter() - t0
        say(stage_line(self.spec.label, len(self.plan), info, evj))

    def _stage(self, t: int, method) -> None:
        """Every rank: set up and train the stage; then rank 0 evaluates and commits it while the others wait."""
        cfg, spec, name = self.cfg, self.spec, self.stage_name(t)
        t_stage = time.perf_counter()
        if D.is_main():
            self.child_id = self.tracker.create_stage(self.parent_id, t, name, {"harness.method": spec.method, "harness.seed": str(spec.seed)})
        budget = self.budget(self.plan[t - 1])
        examples = method.train_data(t, [ex for task in self.plan[t - 1] for ex in self.task_examples(task)])
        ckpt = StageCheckpointer(self.run_dir, t, name, cfg.checkpoint_every)
        calib = {"s": 0.0}

        def calibrate(max_steps: int | None, lr_method: str):
            tc = time.perf_counter()
            self._train(method, examples, self.budget(self.plan[t - 1], lr_method), t, f"{name} calib", max_steps=max_steps,
                        calibration=True)
            calib["s"] += time.perf_counter() - tc

        def batches(indices: list[int] | None, batch_size: int):
            data = tokenize_examples(self.tokenizer, [examples[i] for i in (indices if indices is not None else range(len(examples)))],
                                     budget["max_seq_len"])
            pad_id, device = self.tokenizer.pad_token_id or 0, next(method.model.parameters()).device
            for i in range(0, len(data), batch_size):
                yield collate(data[i : i + batch_size], pad_id, device)

        method.begin_stage(StageContext(stage=t, task=name, run_dir=self.run_dir, calibrate=calibrate, resumed_extra=ckpt.load_extra(),
                                        batches=batches, n_examples=len(examples)))
        ckpt.extra = method.checkpoint_extra()
        launch = self._check_ranks_agree(t, method, ckpt.extra)
        res = self._train(method, examples, budget, t, f"[{spec.method} s{spec.seed}] {t}/{len(self.plan)} {name}", checkpointer=ckpt)
        stats = method.end_stage()
        if launch:
            launch["rank0_trainable_elements"] = res.local_trainable  # under FSDP rank 0's shards only
        if D.is_main():
            self._commit(t, method, res, {**stats, **launch}, budget=budget, n_examples=len(examples), calib_s=calib["s"],
                         t_stage=t_stage)
        D.barrier()  # the others wait while rank 0 evaluates and commits the stage
        if D.is_main():
            faults.pause("between-stages", self.run_dir, t)

    def _check_ranks_agree(self, t: int, method, extra: dict[str, Any]) -> dict[str, Any]:
        """Under a launcher: every rank must start the stage from the same masks, buffers and trainable weights.

        Hashes them on every rank and compares with rank 0's (HarnessError on all ranks if any differs); every
        rank prints its hash. Returns what stage.json records about the launch (nothing for one process)."""
        if not D.is_distributed():
            return {}
        tensors = {f"extra/{k}": v for k, v in extra.items()}
        tensors.update({f"buffer/{n}": b for n, b in method.model.named_buffers()})
        tensors.update({f"param/{n}": p for n, p in method.trainable().items()})
        digest = D.check_identical(tensors, f"[{self.spec.label}] stage {t}: masks, buffers and trainable weights")
        say(f"[{self.spec.label}] stage {t} state hash {digest}", every_rank=True)
        return {"world_size": D.world_size(), "distributed": self.cfg.distributed, "state_hash": digest}

    def _commit(self, t: int, method, res, stats: dict[str, Any], *, budget: dict, n_examples: int, calib_s: float,
                t_stage: float) -> None:
        """Rank 0: evaluate the trained stage, write its folder (atomically, stage.json last), mirror it to MLflow."""
        cfg, spec, name = self.cfg, self.spec, self.stage_name(t)
        faults.pause("eval", self.run_dir, t)
        ev = self.evaluator.evaluate(method.model, self.eval_tasks(t), bf16_autocast=cfg.bf16_autocast)
        stage_dir = self.run_dir / "stages" / f"{t}-{name}"
        t_save = time.perf_counter()
        with atomic_dir(stage_dir) as tmp:
            method.save_stage(tmp)
            evj = {"stage": t, "task": name, "scores": ev.scores, "raw": ev.raw, "n": ev.n_examples, "wall_s": ev.wall_s}
            trj = {"steps": res.steps, "tokens": res.tokens, "wall_s": res.wall_s, "tok_s": res.tok_s, "budget": budget,
                   "losses": res.losses, "calibration_s": calib_s, "checkpoints": res.checkpoints,
                   "resumed_from_step": res.resumed_from_step, "train_examples": n_examples}
            atomic_write_json(tmp / "eval.json", evj)
            atomic_write_json(tmp / "train.json", trj)
            total = time.perf_counter() - t_stage
            overhead = total - res.wall_s - ev.wall_s - calib_s
            info = {
                "stage": t, "task": name, "wall_s": total, "train_s": res.wall_s, "eval_s": ev.wall_s, "calibration_s": calib_s,
                "checkpoint_s": res.checkpoint_s, "checkpoint_frac": res.checkpoint_s / total, "save_s": time.perf_counter() - t_save,
                "overhead_s": overhead, "overhead_frac": overhead / total, "train_tok_s": res.tok_s, "train_steps": res.steps,
                "mlflow_run_id": self.child_id, **method.param_counts(), **stats}
            atomic_write_json(tmp / STAGE_MARKER, info)
        remove_checkpoint(self.run_dir)  # the stage is committed: its mid-stage checkpoint is stale
        self.fill_row(t, ev.scores)
        self._mirror_stage(self.child_id, stage_dir, fresh=True)
        self.child_id = None
        self.stage_wall[t] = total
        say(stage_line(spec.label, len(self.plan), info, evj, trj))

    def _mirror_stage(self, child_id: str, stage_dir: Path, *, fresh: bool) -> None:
        """Copy a committed stage's files into MLflow.

        A fresh stage logs in batches; re-mirroring after a kill (fresh=False) first asks the store what it
        already has, so nothing is logged twice. The history queries stay off the normal path."""
        info, ev, tr = (read_json(stage_dir / f) for f in (STAGE_MARKER, "eval.json", "train.json"))
        t = info["stage"]
        skip = {"stage", "task", "mlflow_run_id"}
        stage_metrics = {k: v for k, v in info.items() if k not in skip and isinstance(v, (int, float))}
        evals = {f"eval/{k}": v for k, v in ev["scores"].items()}
        if fresh:
            self.tracker.log_series(child_id, "train/loss", tr["losses"])
            self.tracker.log_metrics(child_id, stage_metrics)
            faults.pause("mlflow", self.run_dir, t)
            self.tracker.log_metrics(child_id, evals)
            self.tracker.log_metrics(self.parent_id, {f"acc/{k}": v for k, v in ev["scores"].items()}, step=t)
        else:
            self.tracker.log_series_once(child_id, "train/loss", tr["losses"])
            self.tracker.mirror_metrics(child_id, {**stage_metrics, **evals})  # acc/<task>: _replay_committed
        self.tracker.finish(child_id, "FINISHED")

    def _train(self, method, examples, budget, stage: int, desc: str, **kw):
        return train_method(method, self.tokenizer, examples, budget, recipe=self.recipe, seed=self.spec.seed, stage=stage,
                            bf16_autocast=self.cfg.bf16_autocast, desc=desc, progress=self.progress,
                            distributed=self.cfg.distributed, **kw)

    def _finish(self, method) -> dict[str, Any]:
        """Rank 0 writes the matrix, diagnostics and summary and logs them; every rank returns that summary."""
        if not D.is_main():
            return D.broadcast_object(None)
        spec, run_dir = self.spec, self.run_dir
        summ = MX.summarize(self.R) if not self.method_cls.reference else MX.summarize_reference(self.R)
        counts = method.param_counts()
        write_matrix_files(run_dir, self.R, spec.tasks)
        atomic_write_json(run_dir / "diagnostics.json", {"mask_overlap": None, "subspace_overlap": None, **method.diagnostics()})
        from harness.report.figures import matrix_heatmap

        matrix_heatmap(self.R, spec.tasks, f"{spec.method} seed {spec.seed} order {spec.order_index}", run_dir / "matrix_heatmap.png")
        summary = {
            "method": spec.method, "seed": spec.seed, "order_index": spec.order_index, "tasks": spec.tasks,
            "variant": spec.variant, "variant_values": spec.variant_values, "reference": self.method_cls.reference,
            "acc": summ["ACC"], "bwt": summ["BWT"], "fwt": summ["FWT"], "forgetting": summ["forgetting"], **counts,
            "stage_wall_s": [self.stage_wall.get(t) for t in range(len(self.plan) + 1)],
            "mlflow_parent_run_id": self.parent_id, "mlflow_tracking_uri": self.tracker.uri, "complete": True,
        }
        self.tracker.log_metrics(self.parent_id, {**summ, **counts})
        for name in ("matrix.csv", "matrix.json", "diagnostics.json", "matrix_heatmap.png", "config.yaml"):
            self.tracker.log_artifact(self.parent_id, run_dir / name)
        self.tracker.log_json(self.parent_id, summary, "summary.json")
        atomic_write_json(run_dir / "summary.json", summary)
        say(done_line(spec.label, summary))
        return D.broadcast_object(summary)


def install_signal_handlers() -> None:
    """SIGTERM ends like Ctrl-C: runs are marked FAILED, finished stages stay for resume."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
