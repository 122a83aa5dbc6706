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
A task adapter is trained once and reused by every merge; resume skips finished adapters, the
single matrix and finished merge rows. MLflow: a parent run per (method, seed) with tag
harness.kind=merge, a child run per trained adapter and per merge.
"""

from __future__ import annotations

import csv
import io
import itertools
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness import metrics as MX
from harness.adapters.combine import MERGED, folded, load_adapters, merge, relative_error
from harness.adapters.peft_folder import write_peft_folder
from harness.analysis.documents import DOCUMENTS_FILE, merge_documents
from harness.analysis.merging import CROSS_TERM_TOL
from harness.config import ExperimentConfig
from harness.errors import ConfigError
from harness.integrity import HASHES, check_recorded, file_hashes, folder_hashes
from harness.io import atomic_dir, atomic_write_json, atomic_write_text, atomic_write_yaml, read_json
from harness.locking import SequenceLock
from harness.methods import METHODS, StageContext
from harness.models import load_model, module_shapes, set_torch_threads
from harness.provenance import git_commit
from harness.run import merge_weights as MW
from harness.run.evaluate import Evaluator, validation_evaluator
from harness.run.planning import experiment_dir, preflight_methods, stage_budget, validate
from harness.run.train import Recipe, task_examples, train_method
from harness.tracking.client import open_tracker

MERGE_RESULT_FILES = [
    "single.json",
    "single.csv",
    "merged.json",
    "merged.csv",
    "documents.json",
]  # hashed in summary.json


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class MergeSpec:
    method: str
    seed: int
    tasks: list[str]
    run_dir: Path

    @property
    def label(self) -> str:
        return f"merge/{self.method}/seed-{self.seed}"


def merge_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The knobs a separately trained task adapter uses: its own A (or the shared one) and its mask policy."""
    policy = "disjoint" if cfg.merge_masks == "disjoint" else "independent"
    lori = cfg.lori.model_copy(update={"a_mode": cfg.merge_a, "max_overlap": 0.0, "overlap_policy": policy})
    return cfg.model_copy(update={"lori": lori})


def plan_merge(cfg: ExperimentConfig, suite) -> list[MergeSpec]:
    bad = [m for m in cfg.methods if not METHODS[m].independent_adapters]
    if bad:
        ok = [m for m, c in METHODS.items() if c.independent_adapters]
        raise ConfigError(
            f"--methods: {bad} do not train independent task adapters and cannot be merged; use {', '.join(ok)}"
        )
    order = list(suite.orders[cfg.orders[0]])
    tasks = [t for t in order if not cfg.tasks or t in cfg.tasks]
    if len(tasks) < 2:
        raise ConfigError(f"tasks: merging needs at least 2 tasks, got {tasks}")
    if cfg.merge_weight_grid is not None:
        missing = [t for t in tasks if suite.task(t).validation is None]
        if missing or any(w <= 0 for w in cfg.merge_weight_grid) or not cfg.merge_weight_grid:
            raise ConfigError(
                f"--merge-weight-grid {cfg.merge_weight_grid}: give positive weights, and the suite needs a "
                f"validation split on every merged task (suite.yaml tasks[].validation: {{size: N}}); "
                f"{', '.join(missing) or 'every task has one'}"
            )
    MW.check(cfg, tasks)
    return [
        MergeSpec(m, s, tasks, experiment_dir(cfg) / "merge" / m / f"seed-{s}") for m in cfg.methods for s in cfg.seeds
    ]


class MergeRunner:
    """One (method, seed): task adapters, single-adapter matrix, merges."""

    def __init__(
        self, cfg: ExperimentConfig, suite, spec: MergeSpec, model, tokenizer, evaluator, tracker, progress: bool = True
    ):
        self.cfg, self.mcfg, self.suite, self.spec = cfg, merge_config(cfg), suite, spec
        self.model, self.tokenizer, self.evaluator, self.tracker, self.progress = (
            model,
            tokenizer,
            evaluator,
            tracker,
            progress,
        )
        self.dir = spec.run_dir
        self.protocols = MW.protocols(cfg, len(spec.tasks))
        self.weights = {p: MW.weights_for(cfg, spec.method, len(spec.tasks), p) for p in self.protocols}  # tuned: None
        self.validator = (
            validation_evaluator(suite, tokenizer, cfg, progress=progress) if "tuned" in self.protocols else None
        )

    def run(self) -> dict[str, Any]:
        with SequenceLock(self.dir, wait=self.cfg.wait_for_lock).acquire():
            if (self.dir / "summary.json").exists() and read_json(self.dir / "summary.json").get("complete"):
                say(f"[{self.spec.label}] already complete: skipping")
                return read_json(self.dir / "summary.json")
            atomic_write_yaml(
                self.dir / "config.yaml",
                {
                    **self.cfg.to_yaml_dict(),
                    "merge": {
                        "method": self.spec.method,
                        "seed": self.spec.seed,
                        "tasks": self.spec.tasks,
                        "protocols": self.protocols,
                    },
                },
            )
            self._verify_adapters()
            self.parent_id = self._open_parent()
            try:
                folders = {task: self._adapter(t, task) for t, task in enumerate(self.spec.tasks, start=1)}
                S = self._single(folders)
                rows = self._merges(folders, S)
                out = self._finish(S, rows)
            except BaseException:
                self.tracker.finish(self.parent_id, "FAILED")
                raise
            self.tracker.finish(self.parent_id, "FINISHED")
            return out

    def _verify_adapters(self) -> None:
        """Finished task adapters are reused as they are: check them against the hashes their train.json recorded."""
        for marker in sorted(self.dir.glob("adapters/*/train.json")):
            check_recorded(
                marker.parent,
                read_json(marker).get(HASHES),
                marker,
                f"Delete {marker.parent} and run the same `harness merge` command again: that adapter is retrained.",
            )

    def _open_parent(self) -> str:
        state = self.dir / "state.json"
        if state.exists():
            parent_id = read_json(state)["mlflow_parent_run_id"]
            self.tracker.reopen(parent_id, state)
            done = {read_json(p).get("mlflow_run_id") for p in self.dir.glob("adapters/*/train.json")}
            if (self.dir / "merged.json").exists():
                done |= {r.get("mlflow_run_id") for r in read_json(self.dir / "merged.json")["rows"]}
            self.tracker.drop_unfinished_children(parent_id, done)
            return parent_id
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
        parent_id = self.tracker.create_parent(s.label, tags, params, kind="merge")
        atomic_write_json(state, {"mlflow_parent_run_id": parent_id, "mlflow_tracking_uri": self.tracker.uri})
        return parent_id

    # --- task adapters ------------------------------------------------------------------------
    def _adapter(self, t: int, task: str) -> Path:
        """Train task t's adapter from the base model (once); returns its PEFT folder."""
        final = self.dir / "adapters" / task
        if (final / "train.json").exists():
            return final
        child = self.tracker.create_child(
            self.parent_id, f"adapter-{task}", {"harness.kind": "merge-adapter", "harness.task": task}
        )
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
                atomic_write_json(
                    tmp / "train.json",
                    {
                        "task": task,
                        "steps": res.steps,
                        "wall_s": res.wall_s,
                        "losses": res.losses,
                        "budget": b,
                        "mlflow_run_id": child,
                        **method.param_counts(),
                        **stats,
                        HASHES: folder_hashes(tmp),
                    },
                )
        finally:
            self.model = method.unload()
        self.tracker.log_series(child, "train/loss", res.losses)
        self.tracker.log_metrics(child, {"train_s": res.wall_s, "train_steps": res.steps, **stats})
        self.tracker.finish(child, "FINISHED")
        say(
            f"[{self.spec.label}] adapter {t}/{len(self.spec.tasks)} {task}: loss {res.losses[0]:.3f}->{res.losses[-1]:.3f} "
            f"{res.steps} steps in {res.wall_s:.1f}s"
        )
        return final

    def _train(self, method, task: str, budget: dict, t: int, **kw):
        recipe = Recipe.from_config(self.mcfg)
        return train_method(
            method,
            self.tokenizer,
            task_examples(self.suite, task, recipe, limit=self.mcfg.train_limit, seed=self.spec.seed),
            budget,
            recipe=recipe,
            seed=self.spec.seed,
            stage=t,
            bf16_autocast=self.cfg.bf16_autocast,
            desc=f"[merge {self.spec.method} s{self.spec.seed}] {task}",
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
            self.tracker.log_metrics(self.parent_id, {f"single/{task}": S[i, i]})
        atomic_write_json(path, {"tasks": tasks, "S": S.tolist(), "documents": docs})
        atomic_write_text(
            self.dir / "single.csv", _csv(["adapter", *tasks], [[t, *row] for t, row in zip(tasks, S.tolist())])
        )
        say(f"[{self.spec.label}] single adapters: " + " ".join(f"{t}={S[i, i]:.2f}" for i, t in enumerate(tasks)))
        return S

    def _merge_sets(self) -> list[tuple[str, str, list[str]]]:
        """(protocol, combination, tasks) of every merge: each protocol's full merges, then (merge_pairs) its pairs."""
        subsets = [list(self.spec.tasks)] + (
            [list(p) for p in itertools.combinations(self.spec.tasks, 2)] if self.cfg.merge_pairs else []
        )
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
                atomic_write_json(path, {"rows": rows})
                self._write_merged_csv(rows)
        return rows

    def _select_weight(self, folders: dict[str, Path], combination: str, subset: list[str]) -> dict[str, Any]:
        """merge_weight_grid: each candidate (the same weight for every adapter) merged and scored on the validation
        split of the subset's tasks; the best mean wins (the first on a tie). A best weight at an end of the grid is
        pushed past it (half the lowest, twice the highest), up to merge_grid_extend times, until it is interior. The
        test documents are not looked at."""
        scores = {w: self._validation_score(folders, combination, subset, w) for w in self.cfg.merge_weight_grid}
        extended = []
        for _ in range(self.cfg.merge_grid_extend):
            chosen = max(scores, key=scores.get)
            if chosen not in (min(scores), max(scores)) or len(scores) < 2:
                break
            w = chosen / 2 if chosen == min(scores) else chosen * 2
            scores[w] = self._validation_score(folders, combination, subset, w)
            extended.append(w)
        chosen = max(scores, key=scores.get)
        edge = chosen in (min(scores), max(scores)) and len(scores) > 1
        say(
            f"[{self.spec.label}] {combination}: weight {chosen:g} chosen on the validation split ("
            + " ".join(f"{w:g}={v:.3f}" for w, v in scores.items())
            + ")"
            + (" AT THE GRID'S END" if edge else "")
        )
        return {
            "split": "validation",
            "candidates": [{"weight": w, "validation_score": v} for w, v in scores.items()],
            "chosen": chosen,
            "extended": extended,
            "at_grid_end": edge,
        }

    def _validation_score(self, folders: dict[str, Path], combination: str, subset: list[str], w: float) -> float:
        model = load_adapters(self.model, {t: folders[t] for t in subset})
        try:
            merge(model, subset, [w] * len(subset), combination, self.cfg.merge_density)
            with folded(model, MERGED):
                ev = self.validator.evaluate(model, subset, bf16_autocast=self.cfg.bf16_autocast)
        finally:
            self.model = model.unload()
        return sum(ev.scores.values()) / len(subset)

    def _merge_one(
        self, folders: dict[str, Path], protocol: str, combination: str, subset: list[str], S: np.ndarray
    ) -> dict:
        tasks = self.spec.tasks
        selection = self._select_weight(folders, combination, subset) if protocol == "tuned" else None
        weights = (
            [selection["chosen"]] * len(subset)
            if selection
            else [self.weights[protocol][tasks.index(t)] for t in subset]
        )
        name = f"{MW.label(combination, protocol, self.protocols)}-{'+'.join(subset)}"
        child = self.tracker.create_child(
            self.parent_id, name, {"harness.kind": "merge-combination", "harness.combination": combination}
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
        row = {
            "combination": combination,
            "protocol": protocol,
            "tasks": subset,
            "weights": weights,
            "density": self.cfg.merge_density,
            "scores": ev.scores,
            "relative_error": rel,
            "cross_terms": rel > CROSS_TERM_TOL,
            "eval_s": ev.wall_s,
            "mlflow_run_id": child,
            "weight_selection": selection,
            "documents": ev.documents,
        }
        if len(subset) == len(tasks):
            row.update(MX.merge_summary(S, [ev.scores[t] for t in tasks]))
        self.tracker.log_metrics(
            child,
            {
                "relative_error": rel,
                **{f"eval/{t}": v for t, v in ev.scores.items()},
                **{k: row[k] for k in ("average_drop", "normalised_accuracy") if row.get(k) is not None},
            },
        )
        self.tracker.finish(child, "FINISHED")
        warn = f"  WARNING: ΔW is {rel:.1%} off Σ w_i ΔW_i (cross terms B_i A_j)" if row["cross_terms"] else ""
        say(f"[{self.spec.label}] {name}: " + " ".join(f"{t}={v:.2f}" for t, v in ev.scores.items()) + warn)
        return row

    def _write_merged_csv(self, rows: list[dict]) -> None:
        tasks = self.spec.tasks
        atomic_write_text(
            self.dir / "merged.csv",
            _csv(
                ["combination", "tasks", *tasks, "average_drop", "normalised_accuracy", "relative_error"],
                [
                    [
                        self.label(r),
                        "+".join(r["tasks"]),
                        *[r["scores"].get(t, "") for t in tasks],
                        r.get("average_drop", ""),
                        r.get("normalised_accuracy", ""),
                        r["relative_error"],
                    ]
                    for r in rows
                ],
            ),
        )

    def _finish(self, S: np.ndarray, rows: list[dict]) -> dict[str, Any]:
        tasks, full = self.spec.tasks, [r for r in rows if len(r["tasks"]) == len(self.spec.tasks)]
        summary: dict[str, Any] = {
            "protocol": "merge",
            "method": self.spec.method,
            "seed": self.spec.seed,
            "tasks": tasks,
            "weights": self.weights[self.protocols[0]],
            "merge_protocols": self.protocols,
            "protocol_weights": self.weights,
            "single_diagonal": {t: float(S[i, i]) for i, t in enumerate(tasks)},
            "merges": {
                self.label(r): {
                    k: r.get(k)
                    for k in (
                        "combination",
                        "protocol",
                        "normalised_accuracy",
                        "average_drop",
                        "relative_error",
                        "cross_terms",
                        "weights",
                        "weight_selection",
                    )
                }
                | {"scores": r["scores"]}
                for r in full
            },
            "interference": {},
            "mlflow_parent_run_id": self.parent_id,
            "complete": True,
        }
        for name in summary["merges"] if self.cfg.merge_pairs else []:
            pairs = {
                (tasks.index(r["tasks"][0]), tasks.index(r["tasks"][1])): (
                    r["scores"][r["tasks"][0]],
                    r["scores"][r["tasks"][1]],
                )
                for r in rows
                if self.label(r) == name and len(r["tasks"]) == 2
            }
            summary["interference"][name] = MX.interference_matrix(S, pairs)
        for r in full:
            self.tracker.log_metrics(
                self.parent_id,
                {
                    f"merged/{self.label(r).replace('@', '/')}/{k}": r.get(k)
                    for k in ("normalised_accuracy", "average_drop", "relative_error")
                },
            )
        single_docs = read_json(self.dir / "single.json").get("documents")
        if single_docs and all(r.get("documents") for r in full):  # folders begun before documents were kept have none
            atomic_write_json(
                self.dir / DOCUMENTS_FILE,
                merge_documents(tasks, single_docs, {self.label(r): r["documents"] for r in full}),
            )
            self.tracker.log_artifact(self.parent_id, self.dir / DOCUMENTS_FILE)
        for f in ("single.json", "merged.json", "config.yaml"):
            self.tracker.log_artifact(self.parent_id, self.dir / f)
        summary[HASHES] = file_hashes(
            self.dir, MERGE_RESULT_FILES
        )  # harness verify checks them (tools/verify_merge.py)
        atomic_write_json(self.dir / "summary.json", summary)
        self.tracker.log_json(self.parent_id, summary, "summary.json")
        say(
            f"[{self.spec.label}] done: "
            + "  ".join(
                f"{c} norm.acc {v['normalised_accuracy']:.3f}"
                for c, v in summary["merges"].items()
                if v["normalised_accuracy"] is not None
            )
        )
        return summary


def _csv(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow([f"{v:.6f}" if isinstance(v, float) else v for v in r])
    return buf.getvalue()


def run_merge(cfg: ExperimentConfig, *, progress: bool = True, threads: int | None = None) -> list[dict[str, Any]]:
    """Validate everything (nothing written on bad input), then run every (method, seed) merge protocol in this process
    (threads: a `--jobs` unit's share of the cores; default all this process may use)."""
    mcfg = merge_config(cfg)
    suite, seq_specs, uri, shapes_checked = validate(mcfg)
    specs = plan_merge(cfg, suite)
    if threads is None:
        set_torch_threads()
    else:
        torch.set_num_threads(threads)
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
