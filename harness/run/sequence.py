"""The sequence loop: stage 0 evaluates the base model, stage t trains the method on task t, then evaluates.

A stage is a function of (previous stage's checkpoint, config): its RNG is seeded from (seed,
stage), never carried over, so a resumed sequence reproduces an uninterrupted one. The scheduler
never knows which method it runs: it calls the verbs of harness/methods/base.py. The folder is
the source of truth (harness/run/folder.py); MLflow mirrors it (harness/run/mirror.py: a
tracking server that stops answering does not stop the run; the mirror catches up).

Under torchrun / accelerate launch every rank runs the sequence and trains (harness/distributed.py);
rank 0 alone takes the lock, writes files, logs to MLflow and evaluates, and tells the others what is
finished; they wait at barriers. Each stage starts with a check that every rank holds the same masks
and weights (a hash, printed by every rank and kept in stage.json).
"""

from __future__ import annotations

import contextlib
import functools
import time
from pathlib import Path
from typing import Any

import numpy as np

from harness import distributed as D
from harness import faults
from harness.config import ExperimentConfig
from harness.errors import Interrupted
from harness.io import atomic_write_json, atomic_write_yaml, read_json
from harness.locking import SequenceLock
from harness.methods import METHODS, StageContext
from harness.precision import precision_of
from harness.run import lineage
from harness.run import records as REC
from harness.run.base_eval import BaseEvalCache
from harness.run.batches import example_batches, task_examples
from harness.run.checkpoint import StageCheckpointer
from harness.run.console import say
from harness.run.folder import (
    PRECISION,
    STAGE_MARKER,
    check_same_config,
    check_same_precision,
    clean_partial_writes,
    committed_stages,
    finished_stages,
    verify_folder,
    verify_stages,
)
from harness.run.mirror import Mirror, read_state, update_state
from harness.run.planning import SequenceSpec, eval_schedule
from harness.run.recipe import Recipe
from harness.run.stage_commit import StageCommits
from harness.run.train import compile_plan, train_method
from harness.timing import timed


class SequenceRunner(StageCommits):
    """Runs (or resumes) one method x seed x order sequence."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        suite,
        spec: SequenceSpec,
        model,
        tokenizer,
        evaluator,
        tracker,
        progress: bool = True,
        base_cache: BaseEvalCache | None = None,
    ):
        self.cfg, self.suite, self.spec = cfg, suite, spec
        self.base_cache = base_cache if base_cache is not None else BaseEvalCache(None)
        self.model, self.tokenizer, self.evaluator, self.tracker = model, tokenizer, evaluator, tracker
        self.progress = progress
        self.method_cls = METHODS[spec.method]
        self.plan = [s.tasks for s in spec.stages]  # tasks trained at stages 1..S (planning resolved them)
        self.schedule = spec.schedule or eval_schedule(cfg, self.method_cls.reference, spec.tasks, self.plan)
        self.R = np.full((len(self.plan) + 1, len(spec.tasks)), np.nan)
        self.recipe = Recipe.from_config(cfg)
        self.run_dir = spec.run_dir
        self.stage_wall: dict[int, float] = {}
        self.general_ce: dict[int, float | None] = {}  # stage -> cross-entropy on the general text
        self.mirror: Mirror | None = None  # rank 0's MLflow runs (other ranks never log)
        self.precision: dict[str, Any] = {}  # harness/precision.py's record, set when the sequence starts
        self.child_id: str | None = None
        self.datasets: list[
            dict[str, Any]
        ] = []  # harness/run/lineage.py: the train and test data's records, with digests
        self.monitor = None  # MLflow's system-metrics monitor on the parent run (knob system_metrics)

    # --- small facts -------------------------------------------------------------------------
    def stage_name(self, t: int) -> str:
        tasks = self.plan[t - 1]
        return tasks[0] if len(tasks) == 1 else "all"

    def eval_tasks(self, stage: int) -> list[str]:
        """What stage `stage` evaluates (the plan's schedule: harness/run/planning.py eval_schedule)."""
        return self.schedule.at(stage)

    def task_examples(self, task: str) -> list[dict]:
        return task_examples(self.suite, task, self.recipe, limit=self.cfg.train_limit, seed=self.spec.seed)

    def base_scores(self) -> dict[str, float]:
        """task -> the base model's score (stage 0; NaN where it was not evaluated)."""
        return {task: float(self.R[0, j]) for j, task in enumerate(self.spec.tasks)}

    def fill_row(self, stage: int, scores: dict[str, float]) -> None:
        for task, v in scores.items():
            self.R[stage, self.spec.tasks.index(task)] = v

    # --- the sequence ------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        resolved = self.cfg.to_yaml_dict()
        resolved["sequence"] = {
            "method": self.spec.method,
            "seed": self.spec.seed,
            "order_index": self.spec.order_index,
            "tasks": self.spec.tasks,
            "variant": self.spec.variant,
            "variant_values": self.spec.variant_values,
        }
        check_same_config(self.run_dir / "config.yaml", resolved, self.spec.method)
        self.precision = precision = precision_of(
            self.cfg, self.model
        ).record()  # the same for every stage of the sequence
        check_same_precision(self.run_dir, precision)  # a resume under another precision is refused
        main = D.is_main()
        lock = (
            SequenceLock(self.run_dir, wait=self.cfg.wait_for_lock) if main else None
        )  # rank 0 holds it for every rank
        waiting = lambda who: say(f"[{self.spec.label}] waiting for {who} to finish this sequence")  # noqa: E731
        with lock.acquire(on_wait=waiting) if lock else contextlib.nullcontext():
            if main:
                self.mirror = Mirror(self.tracker, self.run_dir, self.spec.label, say)
            done = D.main_then_all(self._finished_summary)
            if done:
                say(f"[{self.spec.label}] already complete: skipping ({self.run_dir})")
                if main:
                    self.mirror.catch_up()  # a run that finished while the tracking server was away
                return done
            if main:
                atomic_write_yaml(self.run_dir / "config.yaml", resolved)
                atomic_write_json(self.run_dir / PRECISION, precision)
                self._open_parent()
                url, self.monitor = lineage.begin_sequence(
                    self.mirror,
                    self.datasets,
                    lineage.system_metrics_wanted(self.cfg.system_metrics, next(self.model.parameters()).device),
                )
                if url:
                    say(f"[{self.spec.label}] MLflow run: {url}")
            try:
                return self._run_stages()
            except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM: KILLED at once, and the exact command to continue
                self._end_runs(self.tracker.mark_killed)
                raise Interrupted(getattr(exc, "why", None) or str(exc) or "Ctrl-C", self.run_dir) from None
            except BaseException:
                self._end_runs(lambda run_id: self.tracker.finish(run_id, "FAILED"))
                raise
            finally:
                if self.monitor is not None:  # system metrics: the last samples go to the parent run
                    self.monitor.finish()

    def _end_runs(self, end) -> None:
        """Rank 0: end the stage run in progress and the parent (while the store answers)."""
        for run_id in (self.child_id, self.mirror.parent_id if self.mirror else None):
            if run_id:
                self.mirror.call(end, run_id)

    def _finished_summary(self) -> dict[str, Any] | None:
        """summary.json of a finished sequence with every stage committed, checked against its hashes; else None."""
        path = self.run_dir / "summary.json"
        summary = read_json(path) if path.exists() else None
        if not (summary and summary.get("complete")) or max(committed_stages(self.run_dir), default=0) < len(self.plan):
            return None  # unfinished, or a stage folder was deleted to be redone
        verify_folder(self.run_dir)
        return summary

    def _open_parent(self) -> None:
        """Reopen the sequence's parent run, or create it (what to create is kept in state.json first: if the store does
        not answer, the mirror creates it when it catches up)."""
        self.datasets = lineage.dataset_records(self.suite, self.spec.tasks)
        update_state(self.run_dir, mlflow_datasets=self.datasets)
        self.mirror.catch_up()  # a folder left behind by an outage: level first, so the reopen below is sent
        state = read_state(self.run_dir)
        if state.get("mlflow_parent_run_id"):
            self.mirror.call(self.tracker.reopen, state["mlflow_parent_run_id"], self.run_dir / "state.json")
            return
        if "mlflow_parent" not in state:
            update_state(self.run_dir, mlflow_parent=self._parent_record(), mlflow_tracking_uri=self.tracker.uri)
        record = read_state(self.run_dir)["mlflow_parent"]
        parent_id = self.mirror.call(self.tracker.create_parent, record["name"], record["tags"], record["params"])
        if parent_id:
            update_state(self.run_dir, mlflow_parent_run_id=parent_id)
            self.mirror.parent_id = parent_id

    def _parent_record(self) -> dict[str, Any]:
        first = self.spec.stages[0].budget
        return REC.sequence_parent_record(
            self.cfg, self.spec, self.suite.name, self.method_cls, self.recipe, self.precision, first
        )

    def _run_stages(self) -> dict[str, Any]:
        main = D.is_main()
        if main:
            clean_partial_writes(self.run_dir)
        done = D.main_then_all(self._committed_verified)
        if main:
            self._replay_committed(done)
            if 0 not in done and self.schedule.base_stage:
                self._stage0()  # under diagonal_final: no task, only the base model's general-text CE (and general_tasks)
        D.barrier()  # the others wait while rank 0 evaluates the base model
        method = self.method_cls(
            self.cfg,
            seed=self.spec.seed,
            tasks=self.spec.tasks,
            base_model=self.model,
            task_examples=self.task_examples,
        )
        try:
            method.restore(done)
            for t in range(max(done, default=0) + 1, len(self.plan) + 1):
                self._stage(t, method)
            return self._finish(method)
        finally:
            self.model = method.unload() if method.model is not None else self.model

    def _committed_verified(self) -> dict[int, Path]:
        """Rank 0: the committed stages (unfinished ones dropped), checked against their hashes before anything reads them."""
        done = finished_stages(self.run_dir)
        verify_stages(self.run_dir, done)
        return done

    def _replay_committed(self, done: dict[int, Path]) -> None:
        """Committed stages fill the matrix; MLflow gets whatever a kill or an outage kept it from receiving."""
        for t, d in sorted(done.items()):
            self.fill_row(t, read_json(d / "eval.json")["scores"])
            self.general_ce[t] = read_json(d / "eval.json").get("general_ce")
            self.stage_wall[t] = read_json(d / STAGE_MARKER).get("wall_s", float("nan"))
        if done:
            say(f"[{self.spec.label}] resuming: stages {sorted(done)} finished")
        self.mirror.sync()

    def _stage(self, t: int, method) -> None:
        """Every rank: set up and train the stage; then rank 0 evaluates and commits it while the others wait."""
        cfg, spec, name = self.cfg, self.spec, self.stage_name(t)
        t_stage = time.perf_counter()
        if D.is_main():
            self.mirror.catch_up()  # no-op unless tracking is behind and the server answers again
            self.child_id = self.mirror.call(
                self.tracker.create_stage,
                self.mirror.parent_id,
                t,
                name,
                {"harness.method": spec.method, "harness.seed": str(spec.seed)},
            )
        budget = self.spec.stages[t - 1].budget
        examples = method.train_data(t, [ex for task in self.plan[t - 1] for ex in self.task_examples(task)])
        ckpt = StageCheckpointer(self.run_dir, t, name, cfg.checkpoint_every)
        calib = {"s": 0.0}

        def calibrate(max_steps: int | None, lr_method: str):
            tc = time.perf_counter()
            self._train(
                method,
                examples,
                self.spec.stages[t - 1].budget_at(lr_method),
                t,
                f"{name} calib",
                max_steps=max_steps,
                calibration=True,
            )
            calib["s"] += time.perf_counter() - tc

        batches = example_batches(self.tokenizer, examples, budget["max_seq_len"], next(self.model.parameters()).device)

        _, setup_s = timed(
            method.begin_stage,
            StageContext(
                stage=t,
                task=name,
                run_dir=self.run_dir,
                calibrate=calibrate,
                resumed_extra=ckpt.load_extra(),
                batches=batches,
                n_examples=len(examples),
                compiled=self.compiling[1] is not None and not D.is_distributed(),
            ),
        )
        ckpt.extra = method.checkpoint_extra()
        launch = self._check_ranks_agree(t, method, ckpt.extra)
        res = self._train(
            method, examples, budget, t, f"[{spec.method} s{spec.seed}] {t}/{len(self.plan)} {name}", checkpointer=ckpt
        )
        stats, teardown_s = timed(method.end_stage)  # the method's own cost, apart from training (stage.json)
        if launch:
            launch["rank0_trainable_elements"] = res.local_trainable  # under FSDP rank 0's shards only
        if D.is_main():
            # Training an earlier process did (restored from the checkpoint) counts as if this stage had started earlier:
            # train_s includes it, so the stage's wall time must too (else "other" goes negative after a resume).
            method_s = {"method_setup_s": setup_s - calib["s"], "method_teardown_s": teardown_s}  # calibration apart
            self._commit(
                t,
                method,
                res,
                {**stats, **launch, **method_s},
                budget=budget,
                n_examples=len(examples),
                calib_s=calib["s"],
                t_stage=t_stage - ckpt.restored_train_s,
                resumed_train_s=ckpt.restored_train_s,
            )
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

    @functools.cached_property
    def compiling(
        self,
    ) -> tuple[str, tuple[int, int] | None]:  # (mode, the one shape of every compiled step; None: eager)
        return compile_plan(
            self.cfg.compile,
            self.model,
            self.tokenizer,
            lambda: [(s.budget, [ex for task in s.tasks for ex in self.task_examples(task)]) for s in self.spec.stages],
        )

    def _train(self, method, examples, budget, stage: int, desc: str, **kw):
        return train_method(
            method,
            self.tokenizer,
            examples,
            budget,
            recipe=self.recipe,
            seed=self.spec.seed,
            stage=stage,
            bf16_autocast=self.cfg.bf16_autocast,
            desc=desc,
            progress=self.progress,
            distributed=self.cfg.distributed,
            compile_mode=self.compiling[0],
            compile_shape=self.compiling[1],
            **kw,
        )
