"""What a sequence writes: the base model's stage 0, each trained stage's evaluation and commit (its folder appears by
atomic rename, stage.json last, then MLflow mirrors it), and the finished sequence's matrix, documents and summary.

SequenceRunner (harness/run/sequence.py) runs the loop (plan, resume, train) and inherits these steps; what each file
holds is harness/run/records.py, the folder's names and checks harness/run/folder.py."""

from __future__ import annotations

import time
from typing import Any

import torch

from harness import distributed as D
from harness import faults
from harness.analysis import documents as DOCS
from harness.general_text import general_ce
from harness.heatmap import matrix_heatmap
from harness.io import atomic_dir, atomic_write_json, read_json, tree_size
from harness.models.memory import peak_memory
from harness.run import general_eval as GEN
from harness.run import lineage
from harness.run import records as REC
from harness.run.base_eval import BaseEval, cache_key
from harness.run.checkpoint import remove_checkpoint
from harness.run.console import done_line, say, stage_line
from harness.run.evaluate import validation_scores
from harness.run.folder import (
    code_commits,
    committed_stages,
    learn_check,
    method_seconds,
    result_hashes,
    stage_markers,
    write_documents,
    write_matrix_files,
    write_stage_marker,
)
from harness.run.mirror import general_metrics, mirror_stage


class StageCommits:
    """The evaluate -> write -> mirror half of SequenceRunner (its state: cfg, spec, plan, R, mirror, ...)."""

    def _stage0(self) -> None:
        """The base model on every task (b_j, for FWT) and its general-text CE; the same for every method and seed, so
        evaluated once. Under diagonal_final no task is evaluated here, but the CE is: general_ce_rise needs it."""
        t0 = time.perf_counter()
        tasks = self.eval_tasks(0)
        base = self.base_cache.get(
            cache_key(self.cfg, self.suite, self.model, tasks),
            lambda: BaseEval(
                self.evaluator.evaluate(self.model, tasks, bf16_autocast=self.cfg.bf16_autocast),
                general_ce(self.model, self.tokenizer, self.cfg.general_ce_tokens),
                general=GEN.at_stage(self.model, self.tokenizer, self.cfg, 0, len(self.plan), progress=self.progress),
            ),
        )
        ev, self.general_ce[0] = base.result, base.general_ce
        evj = {
            "stage": 0,
            "scores": ev.scores,
            "raw": ev.raw,
            "n": ev.n_examples,
            "wall_s": ev.wall_s,
            "general_ce": self.general_ce[0],
            **(base.general or {}),
            "base_eval": {"digest": base.digest, "cached": base.cached},
        }
        info = {"stage": 0, "task": None, "wall_s": time.perf_counter() - t0, "mlflow_run_id": None}
        with atomic_dir(self.run_dir / "stages" / "0-base") as tmp:
            atomic_write_json(tmp / "eval.json", evj)
            write_documents(tmp / DOCS.DOCUMENTS_FILE, DOCS.stage_documents(0, ev.documents or {}))
            write_stage_marker(tmp, info)
        self.fill_row(0, ev.scores)
        self.mirror.call(lineage.log_acc, self.tracker, self.mirror.parent_id, ev.scores, 0, self.datasets)
        if general_metrics(evj):  # general_ce and general/<task> at step 0
            self.mirror.call(self.tracker.log_metrics, self.mirror.parent_id, general_metrics(evj), step=0)
        self.stage_wall[0] = time.perf_counter() - t0
        say(stage_line(self.spec.label, len(self.plan), info, evj))

    def _commit(
        self,
        t: int,
        method,
        res,
        stats: dict[str, Any],
        *,
        budget: dict,
        n_examples: int,
        calib_s: float,
        t_stage: float,
        resumed_train_s: float = 0.0,
    ) -> None:
        """Rank 0: evaluate the trained stage, write its folder (atomically, stage.json last), mirror it to MLflow."""
        cfg, spec, name = self.cfg, self.spec, self.stage_name(t)
        faults.pause("eval", self.run_dir, t)
        ev = self.evaluator.evaluate(method.model, self.eval_tasks(t), bf16_autocast=cfg.bf16_autocast)
        t_ce = time.perf_counter()
        self.general_ce[t] = general_ce(method.model, self.tokenizer, cfg.general_ce_tokens)
        ce_s = time.perf_counter() - t_ce
        gen = GEN.at_stage(
            method.model, self.tokenizer, cfg, t, len(self.plan), progress=self.progress
        )  # general_tasks, when due
        stage_dir = self.run_dir / "stages" / f"{t}-{name}"
        t_save = time.perf_counter()
        previous = [p for p in (self.run_dir / "stages").glob(f"{t - 1}-*") if t > 1]
        need = tree_size(previous[0]) if previous else None  # a stage takes about what the last did
        with atomic_dir(stage_dir, need=need) as tmp:
            method.save_stage(tmp)
            evj = REC.eval_record(t, name, ev, self.general_ce[t], ce_s, gen)
            trj = REC.train_record(res, budget, calib_s, n_examples)
            atomic_write_json(tmp / "eval.json", evj)
            write_documents(tmp / DOCS.DOCUMENTS_FILE, DOCS.stage_documents(t, ev.documents or {}))
            atomic_write_json(tmp / "train.json", trj)
            total = time.perf_counter() - t_stage
            timings = {"total": total, "calib_s": calib_s, "ce_s": ce_s, "general_s": gen.get("general_s", 0.0)}
            timings.update(save_s=time.perf_counter() - t_save, resumed_train_s=resumed_train_s)
            info = REC.stage_record(
                t,
                name,
                res,
                ev,
                timings,
                stats,
                mlflow_run_id=self.child_id,
                precision=self.precision,
                param_counts=method.param_counts(),
                learn_check=learn_check(self.plan[t - 1], ev.scores, self.base_scores(), cfg.learn_margin),
                general_ce=self.general_ce[t],
                torch_threads=torch.get_num_threads(),
            )
            write_stage_marker(tmp, info)
        remove_checkpoint(self.run_dir)  # the stage is committed: its mid-stage checkpoint is stale
        self.fill_row(t, ev.scores)
        if self.child_id and not self.mirror.behind:
            self.mirror.call(
                mirror_stage,
                self.tracker,
                self.mirror.parent_id,
                self.child_id,
                stage_dir,
                fresh=True,
                on_half=lambda: faults.pause("mlflow", self.run_dir, t),
            )
        self.mirror.catch_up()
        self.child_id = None
        self.stage_wall[t] = total
        say(stage_line(spec.label, len(self.plan), info, evj, trj))

    def _finish(self, method) -> dict[str, Any]:
        """Rank 0 writes the matrix, diagnostics and summary and logs them; every rank returns that summary."""
        if not D.is_main():
            return D.broadcast_object(None)
        spec, run_dir = self.spec, self.run_dir
        counts = method.param_counts()
        write_matrix_files(run_dir, self.R, spec.tasks)
        committed = committed_stages(run_dir)
        markers = stage_markers(committed)
        stage_docs = DOCS.read_stage_documents(committed)
        if stage_docs and len(stage_docs) == len(committed):  # stages committed before per-document files have none
            write_documents(run_dir / DOCS.DOCUMENTS_FILE, DOCS.gather(stage_docs, spec.tasks, self.R.shape[0]))
        atomic_write_json(
            run_dir / "diagnostics.json", {"mask_overlap": None, "subspace_overlap": None, **method.diagnostics()}
        )

        matrix_heatmap(
            self.R,
            spec.tasks,
            f"{spec.method} seed {spec.seed} order {spec.order_index}",
            run_dir / "matrix_heatmap.png",
        )
        summary = {
            "method": spec.method,
            "seed": spec.seed,
            "order_index": spec.order_index,
            "tasks": spec.tasks,
            "variant": spec.variant,
            "variant_values": spec.variant_values,
            "strength": spec.strength,
            "reference": self.method_cls.reference,
            **counts,
            **REC.metric_record(
                self.R,
                spec.tasks,
                [self.general_ce.get(t) for t in range(len(self.plan) + 1)],
                reference=self.method_cls.reference,
                margin=self.cfg.learn_margin,
            ),
            **GEN.summary({t: read_json(d / "eval.json") for t, d in committed.items()}, len(self.plan)),
            "validation": validation_scores(
                self.suite, self.tokenizer, self.cfg, method.model, spec.tasks, progress=self.progress
            ),
            "stage_wall_s": [self.stage_wall.get(t) for t in range(len(self.plan) + 1)],
            **method_seconds(markers),
            "git_commits": code_commits(markers),
            "peak_memory": peak_memory(next(self.model.parameters()).device),
            "mlflow_parent_run_id": self.mirror.parent_id,
            "mlflow_tracking_uri": self.tracker.uri,
            "complete": True,
            "sha256": result_hashes(run_dir),
        }
        self.mirror.finish(summary, lambda: atomic_write_json(run_dir / "summary.json", summary))
        say(done_line(spec.label, summary))
        return D.broadcast_object(summary)
