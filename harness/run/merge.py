"""`harness merge`: train one adapter per task from the base model, evaluate each alone, merge them, evaluate.

Folder (a contract; see README), per method and seed:
    <results>/<experiment>/merge/<method>/seed-<s>/
        config.yaml, state.json, .lock          as for sequences
        adapters/<task>/                        PEFT folder (adapter_config.json, adapter_model.safetensors),
                                                masks.safetensors, values.safetensors, lori.json (lori-s, as a
                                                sequence's stage), train.json (last, with the SHA-256 of the
                                                other files); appears by atomic rename
        single.csv, single.json                 S[i, j]: adapter i alone on task j
        merged.csv, merged.json                 one row per merge (combination x task set): scores, weights,
                                                relative_error of ΔW against Σ w_i ΔW_i, cross_terms
        documents.json                          each document's score: every adapter alone on its own task and every
                                                merge of all tasks on each task (harness.analysis.documents), the
                                                report's bootstrap over documents; written with summary.json
        summary.json                            per combination: normalised accuracy, average drop; interference
A task adapter is trained once and reused by every merge. Each piece (an adapter, the single matrix, a merge row, the
summary) is committed to the folder before anything else looks at it, so a merge killed anywhere resumes, by the same
command, to the same table: finished adapters (checked against their hashes), the single matrix and finished rows are
kept. MLflow follows the folder (harness/run/merge_mirror.py) through the same Mirror a sequence uses: a parent run per
(method, seed) with tag harness.kind=merge, a child run per trained adapter and per merge; a tracking server that stops
answering does not stop the merge, and `harness sync` (or the next resume) brings MLflow level.
"""

from __future__ import annotations

import itertools
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from harness import faults
from harness import metrics as MX
from harness.adapters.combine import MERGED, folded, load_adapters, merge, relative_error
from harness.adapters.peft_folder import write_peft_folder
from harness.analysis.merging import CROSS_TERM_TOL
from harness.config import ExperimentConfig
from harness.errors import Interrupted
from harness.integrity import HASHES, check_recorded, folder_hashes
from harness.io import atomic_dir, atomic_write_json, atomic_write_yaml, read_json
from harness.locking import SequenceLock
from harness.methods import METHODS, StageContext
from harness.models import load_model, module_shapes, set_torch_threads
from harness.provenance import git_commit
from harness.run import merge_records as REC
from harness.run import merge_weights as MW
from harness.run.batches import task_examples
from harness.run.evaluate import Evaluator, validation_evaluator
from harness.run.merge_mirror import row_name, sync_merge
from harness.run.merge_plan import MergeSpec, merge_config, plan_merge
from harness.run.mirror import Mirror, parent_record, read_state, update_state
from harness.run.planning import preflight_methods, stage_budget, validate
from harness.run.recipe import Recipe
from harness.run.train import train_method
from harness.tracking.client import open_tracker


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class MergeRunner:
    """One (method, seed): task adapters, single-adapter matrix, merges. Each piece is committed to the folder, then
    the Mirror lets MLflow follow (harness/run/merge_mirror.py)."""

    def __init__(
        self, cfg: ExperimentConfig, suite, spec: MergeSpec, model, tokenizer, evaluator, tracker, progress: bool = True
    ):
        self.cfg, self.mcfg, self.suite, self.spec = cfg, merge_config(cfg), suite, spec
        self.model, self.tokenizer, self.evaluator, self.tracker = model, tokenizer, evaluator, tracker
        self.progress, self.dir = progress, spec.run_dir
        self.protocols = MW.protocols(cfg, len(spec.tasks))
        self.weights = {p: MW.weights_for(cfg, spec.method, len(spec.tasks), p) for p in self.protocols}  # tuned: None
        self.validator = (
            validation_evaluator(suite, tokenizer, cfg, progress=progress) if "tuned" in self.protocols else None
        )
        self.mirror: Mirror | None = None

    def run(self) -> dict[str, Any]:
        with SequenceLock(self.dir, wait=self.cfg.wait_for_lock).acquire():
            self.mirror = Mirror(self.tracker, self.dir, self.spec.label, say, sync=sync_merge)
            if (self.dir / "summary.json").exists() and read_json(self.dir / "summary.json").get("complete"):
                say(f"[{self.spec.label}] already complete: skipping")
                self.mirror.catch_up()  # a merge that finished while the tracking server was away
                return read_json(self.dir / "summary.json")
            merge_knobs = {"method": self.spec.method, "seed": self.spec.seed, "tasks": self.spec.tasks}
            atomic_write_yaml(
                self.dir / "config.yaml",
                {**self.cfg.to_yaml_dict(), "merge": {**merge_knobs, "protocols": self.protocols}},
            )
            self._verify_adapters()
            self._open_parent()
            try:
                folders = {task: self._adapter(t, task) for t, task in enumerate(self.spec.tasks, start=1)}
                S = self._single(folders)
                return self._finish(S, self._merges(folders, S))
            except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM: KILLED; the same command continues
                self._end_parent(self.tracker.mark_killed)
                raise Interrupted(getattr(exc, "why", None) or str(exc) or "Ctrl-C") from None
            except BaseException:
                self._end_parent(lambda run_id: self.tracker.finish(run_id, "FAILED"))
                raise

    def _end_parent(self, end) -> None:
        if self.mirror.parent_id:
            self.mirror.call(end, self.mirror.parent_id)

    def _verify_adapters(self) -> None:
        """Finished task adapters are reused as they are: check them against the hashes their train.json recorded."""
        for marker in sorted(self.dir.glob("adapters/*/train.json")):
            check_recorded(
                marker.parent,
                read_json(marker).get(HASHES),
                marker,
                f"Delete {marker.parent} and run the same `harness merge` command again: that adapter is retrained.",
            )

    def _open_parent(self) -> None:
        """Reopen the parent run (a resume: MLflow first brought level with the folder), or create it; what to create
        is kept in state.json first, so a store that does not answer now gets it when the mirror catches up."""
        state = read_state(self.dir)
        if state.get("mlflow_parent_run_id") or state.get("mlflow_parent"):
            self.mirror.sync()  # pieces a kill or an outage kept from MLflow; interrupted children deleted
            if self.mirror.parent_id:
                self.mirror.call(self.tracker.reopen, self.mirror.parent_id, self.dir / "state.json")
            return
        c, s = self.cfg, self.spec
        tags = {
            "harness.protocol": "merge",
            "harness.method": s.method,
            "harness.seed": str(s.seed),
            "harness.suite": self.suite.name,
            "harness.model": c.model,
            "harness.experiment": c.experiment_name,
            "harness.git_commit": git_commit(),
            "harness.run_dir": str(self.dir.resolve()),
        }
        params = {
            "method": s.method,
            "seed": s.seed,
            "tasks": ",".join(s.tasks),
            "rank": c.rank,
            "alpha": c.scale_alpha,
            "targets": ",".join(c.targets),
            "merge_methods": ",".join(c.merge_methods),
            "merge_protocol": ",".join(self.protocols),
            "merge_density": c.merge_density,
            "merge_masks": c.merge_masks,
            "merge_a": c.merge_a,
            **Recipe.from_config(c).model_dump(),
        }
        update_state(self.dir, mlflow_parent=parent_record(s.label, tags, params), mlflow_tracking_uri=self.tracker.uri)
        record = read_state(self.dir)["mlflow_parent"]
        create = self.tracker.create_parent
        parent_id = self.mirror.call(create, record["name"], record["tags"], record["params"], kind="merge")
        if parent_id:
            update_state(self.dir, mlflow_parent_run_id=parent_id)
            self.mirror.parent_id = parent_id

    def _child(self, name: str, tags: dict[str, str]) -> str | None:
        """A child run for the piece about to run (None while tracking is behind: the mirror creates it later)."""
        if not self.mirror.parent_id:
            return None
        return self.mirror.call(self.tracker.create_child, self.mirror.parent_id, name, tags)

    # --- task adapters ------------------------------------------------------------------------
    def _adapter(self, t: int, task: str) -> Path:
        """Train task t's adapter from the base model (once); returns its PEFT folder."""
        final = self.dir / "adapters" / task
        if (final / "train.json").exists():
            return final
        child = self._child(f"adapter-{task}", {"harness.kind": "merge-adapter", "harness.task": task})
        method = METHODS[self.spec.method](self.mcfg, seed=self.spec.seed, tasks=self.spec.tasks, base_model=self.model)
        if self.cfg.merge_masks == "disjoint":  # what earlier tasks used, for the allocator to avoid (LoRI-S: masks)
            for s, earlier in enumerate(self.spec.tasks[: t - 1], start=1):
                method.restore_stage(s, self.dir / "adapters" / earlier)
        try:
            method.begin_stage(
                StageContext(stage=t, task=task, run_dir=self.dir, calibrate=self._calibrator(method, t, task))
            )
            b = stage_budget(self.mcfg, self.suite, [task], self.spec.method, self.spec.seed)
            res = self._train(method, task, b, t)
            stats = method.end_stage()
            with atomic_dir(final) as tmp:
                method.save_stage(
                    tmp
                )  # what the method keeps (lori-s: masks, values, lori.json), then a stock PEFT folder
                shutil.rmtree(tmp / "adapter", ignore_errors=True)
                write_peft_folder(method.adapters, tmp)
                record = {"task": task, "steps": res.steps, "wall_s": res.wall_s, "losses": res.losses, "budget": b}
                record.update(mlflow_run_id=child, **method.param_counts(), **stats)
                atomic_write_json(tmp / "train.json", {**record, HASHES: folder_hashes(tmp)})
        finally:
            self.model = method.unload()
        self.mirror.observe()
        say(
            f"[{self.spec.label}] adapter {t}/{len(self.spec.tasks)} {task}: loss {res.losses[0]:.3f}->{res.losses[-1]:.3f} "
            f"{res.steps} steps in {res.wall_s:.1f}s"
        )
        faults.pause("between-stages", self.dir, t)
        return final

    def _train(self, method, task: str, budget: dict, t: int, **kw):
        recipe = Recipe.from_config(self.mcfg)
        examples = task_examples(self.suite, task, recipe, limit=self.mcfg.train_limit, seed=self.spec.seed)
        desc = f"[merge {self.spec.method} s{self.spec.seed}] {task}"
        return train_method(
            method,
            self.tokenizer,
            examples,
            budget,
            recipe=recipe,
            seed=self.spec.seed,
            stage=t,
            bf16_autocast=self.cfg.bf16_autocast,
            desc=desc,
            progress=self.progress,
            **kw,
        )

    def _calibrator(self, method, t: int, task: str):
        def calibrate(max_steps, lr_method):
            b = stage_budget(self.mcfg, self.suite, [task], lr_method, self.spec.seed)
            self._train(method, task, b, t, max_steps=max_steps, calibration=True)

        return calibrate

    # --- evaluation ---------------------------------------------------------------------------
    def _single(self, folders: dict[str, Path]) -> np.ndarray:
        """S[i, j]: task i's adapter alone on task j, folded into the weights."""
        path = self.dir / "single.json"
        if path.exists():
            return np.array(read_json(path)["S"], dtype=float)
        tasks = self.spec.tasks
        S, docs = np.full((len(tasks), len(tasks)), np.nan), {}
        for i, task in enumerate(tasks):
            model = load_adapters(self.model, {task: folders[task]})
            try:
                with folded(model, task):
                    ev = self.evaluator.evaluate(model, tasks, bf16_autocast=self.cfg.bf16_autocast)
            finally:
                self.model = model.unload()
            S[i] = [ev.scores[t] for t in tasks]
            docs[task] = ev.documents[task]  # the diagonal's documents: what normalised accuracy divides by
        REC.write_single(self.dir, tasks, S, docs)
        self.mirror.observe()
        say(f"[{self.spec.label}] single adapters: " + " ".join(f"{t}={S[i, i]:.2f}" for i, t in enumerate(tasks)))
        faults.pause("between-stages", self.dir, len(tasks) + 1)
        return S

    def _merge_sets(self) -> list[tuple[str, str, list[str]]]:
        """(protocol, combination, tasks) of every merge: each protocol's full merges, then (merge_pairs) its pairs."""
        pairs = [list(p) for p in itertools.combinations(self.spec.tasks, 2)] if self.cfg.merge_pairs else []
        subsets = [list(self.spec.tasks)] + pairs
        return [(p, c, sub) for p in self.protocols for sub in subsets for c in self.cfg.merge_methods]

    def label(self, row: dict) -> str:
        return MW.label(row["combination"], row.get("protocol", self.protocols[0]), self.protocols)

    def _merges(self, folders: dict[str, Path], S: np.ndarray) -> list[dict]:
        path = self.dir / "merged.json"
        rows = read_json(path)["rows"] if path.exists() else []
        done = {(r.get("protocol", self.protocols[0]), r["combination"], tuple(r["tasks"])) for r in rows}
        for protocol, combination, subset in self._merge_sets():
            if (protocol, combination, tuple(subset)) not in done:
                rows.append(self._merge_one(folders, protocol, combination, subset, S))
                REC.write_merged(self.dir, self.spec.tasks, rows, self.label)
                self.mirror.observe()
        return rows

    def _select_weight(self, folders: dict[str, Path], combination: str, subset: list[str]) -> dict[str, Any]:
        """merge_weight_grid: each candidate scored on the validation split of the subset's tasks (harness/run/
        merge_weights.py `select`). The test documents are not looked at."""
        selection = MW.select(
            self.cfg.merge_weight_grid,
            self.cfg.merge_grid_extend,
            lambda w: self._validation_score(folders, combination, subset, w),
        )
        scores = {c["weight"]: c["validation_score"] for c in selection["candidates"]}
        say(
            f"[{self.spec.label}] {combination}: weight {selection['chosen']:g} chosen on the validation split ("
            + " ".join(f"{w:g}={v:.3f}" for w, v in scores.items())
            + ")"
            + (" AT THE GRID'S END" if selection["at_grid_end"] else "")
        )
        return selection

    def _validation_score(self, folders: dict[str, Path], combination: str, subset: list[str], w: float) -> float:
        model = load_adapters(self.model, {t: folders[t] for t in subset})
        try:
            merge(model, subset, [w] * len(subset), combination, self.cfg.merge_density)
            with folded(model, MERGED):
                ev = self.validator.evaluate(model, subset, bf16_autocast=self.cfg.bf16_autocast)
        finally:
            self.model = model.unload()
        return sum(ev.scores.values()) / len(subset)

    def _merge_one(self, folders: dict[str, Path], protocol: str, combination: str, subset: list[str], S) -> dict:
        tasks = self.spec.tasks
        selection = self._select_weight(folders, combination, subset) if protocol == "tuned" else None
        if selection:
            weights = [selection["chosen"]] * len(subset)
        else:
            weights = [self.weights[protocol][tasks.index(t)] for t in subset]
        probe = {"combination": combination, "protocol": protocol, "tasks": subset}
        child = self._child(
            row_name(probe, self.protocols), {"harness.kind": "merge-combination", "harness.combination": combination}
        )
        model = load_adapters(self.model, {t: folders[t] for t in subset})
        try:
            merge(model, subset, weights, combination, self.cfg.merge_density)
            rel = relative_error(model, subset, weights)
            eval_tasks = tasks if len(subset) == len(tasks) else subset
            with folded(model, MERGED):
                ev = self.evaluator.evaluate(model, eval_tasks, bf16_autocast=self.cfg.bf16_autocast)
        finally:
            self.model = model.unload()
        row = REC.merge_row(
            combination,
            protocol,
            subset,
            weights,
            ev,
            density=self.cfg.merge_density,
            relative_error=rel,
            cross_terms=rel > CROSS_TERM_TOL,
            mlflow_run_id=child,
            weight_selection=selection,
        )
        if len(subset) == len(tasks):
            row.update(MX.merge_summary(S, [ev.scores[t] for t in tasks]))
        warn = f"  WARNING: ΔW is {rel:.1%} off Σ w_i ΔW_i (cross terms B_i A_j)" if row["cross_terms"] else ""
        scores = " ".join(f"{t}={v:.2f}" for t, v in ev.scores.items())
        say(f"[{self.spec.label}] {row_name(row, self.protocols)}: {scores}{warn}")
        return row

    def _finish(self, S: np.ndarray, rows: list[dict]) -> dict[str, Any]:
        facts = {"protocols": self.protocols, "weights": self.weights, "pairs": self.cfg.merge_pairs}
        summary = REC.merge_summary(self.dir, self.spec, S, rows, self.label, parent_id=self.mirror.parent_id, **facts)
        atomic_write_json(self.dir / "summary.json", summary)
        self.mirror.settle()  # results, files and FINISHED to MLflow (or, if the store is away, how to sync later)
        merges = summary["merges"].items()
        done = [
            f"{c} norm.acc {v['normalised_accuracy']:.3f}" for c, v in merges if v["normalised_accuracy"] is not None
        ]
        say(f"[{self.spec.label}] done: " + "  ".join(done))
        return summary


def run_merge(cfg: ExperimentConfig, *, progress: bool = True, threads: int | None = None) -> list[dict[str, Any]]:
    """Validate everything (nothing written on bad input), then run every (method, seed) merge protocol in this process
    (threads: a `--jobs` unit's share of the cores; default all this process may use)."""
    mcfg = merge_config(cfg)
    suite, seq_specs, uri, shapes_checked = validate(mcfg)
    specs = plan_merge(cfg, suite)
    set_torch_threads(threads)
    t0 = time.perf_counter()
    model, tokenizer = load_model(
        cfg.model,
        seed=0,
        device=cfg.device,
        dtype=cfg.dtype,
        cache_dir=cfg.cache_dir,
        trust_remote_code=cfg.trust_remote_code,
    )
    say(f"loaded {cfg.model} in {time.perf_counter() - t0:.1f}s")
    if not shapes_checked:  # the same capacity check validate() runs when the config is readable without weights
        preflight_methods(mcfg, seq_specs, module_shapes(model))
    tracker = open_tracker(cfg, uri)
    evaluator = Evaluator.from_config(suite, tokenizer, cfg, progress=progress)
    out = []
    for spec in specs:
        runner = MergeRunner(cfg, suite, spec, model, tokenizer, evaluator, tracker, progress=progress)
        out.append(runner.run())
        model = runner.model
    return out
