"""Evaluation through lm-evaluation-harness with the model (and its adapters) in memory.

One TaskManager (include_defaults=False: indexing lm-eval's built-in tasks costs ~11 s per
construction) serves the whole run. No request cache: lm-eval's cache keys ignore the weights, so
a shared cache would return the previous stage's answers. Bootstrap is off per stage. HFLM puts the
model in eval mode and never switches back, so train mode is restored afterwards.

With eval_limit N, every task is scored on a fixed seeded subset of N test documents, drawn from
(task, N) alone, so a cell means the same documents at every stage, for every method and seed
(lm-eval's own `limit` would take the first N). lm-eval's progress bars and chatter are shown only
with `harness -v`; otherwise one bar per stage evaluation, one tick per task.

eval_merged folds the adapters the forward pass uses into the base weights for the evaluation
(harness.adapters.combine.folded: base weights untouched, LoRA layers out of the forward), so lm-eval
runs at base-model speed; eval_bf16 (or the run's bf16_autocast) evaluates under CPU bf16 autocast.
With log_samples, each task's per-document predictions come back too (the choice ranked first, or the
generated text), so two ways of evaluating can be compared document by document. Every evaluation returns
each document's score on the primary metric (`documents`; harness.analysis.documents): lm-eval keeps its
per-sample output for that, which costs nothing measurable beside the forward passes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import random
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from harness.analysis.documents import sample_scores
from harness.precision import autocast_dtype, exact_matmuls
from harness.seeding import stable_seed
from harness.suites.data import test_file, test_records
from harness.suites.lm_eval_configs import task_manager as lm_eval_task_manager

log = logging.getLogger(__name__)
FOLD_CHECK_DOCS = 8  # documents per task that eval_merged's first evaluation also answers through PEFT


@dataclass
class EvalResult:
    scores: dict[str, float]  # task -> primary metric in [0, 1]
    raw: dict[str, dict]  # task -> lm-eval's metric dict for that task
    wall_s: float
    n_examples: dict[str, int]
    # task -> [{"doc_id", "pred", "loglikelihoods" (multiple choice only)}], only with log_samples
    samples: dict[str, list[dict]] | None = None
    # task -> {"metric", "doc_ids", "scores"}: each document's score on the primary metric (always)
    documents: dict[str, dict] | None = None


class Evaluator:
    """Scores a model on suite tasks via lm-eval's evaluate(), one task at a time."""

    def __init__(
        self,
        suite,
        tokenizer,
        *,
        batch_size: int = 32,
        limit: int | None = None,
        max_length: int = 512,
        progress: bool = True,
        merged: bool | None = False,
        bf16: bool = False,
    ):
        self.suite = suite
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.limit = limit
        self.max_length = max_length
        self.progress = progress
        self.merged = merged  # fold the active adapters into the weights while evaluating
        self.bf16 = bf16  # bf16 autocast whatever the caller passes
        self.configs = suite.lm_eval_task_configs()
        self.checked_fold = False  # eval_merged: the first evaluation of a model with adapters checks folding first
        self.fold_agreement: dict[str, float] | None = None
        # Task configs are passed as dicts: no folder to index.
        self.task_manager = lm_eval_task_manager()

    @classmethod
    def from_config(cls, suite, tokenizer, cfg, *, progress: bool = True) -> "Evaluator":
        """The evaluator an experiment config asks for (eval_batch_size, eval_limit, eval_max_length, eval_merged, eval_bf16)."""
        return cls(
            suite,
            tokenizer,
            batch_size=cfg.eval_batch_size,
            limit=cfg.eval_limit,
            max_length=cfg.eval_max_length,
            progress=progress,
            merged=cfg.eval_merged,
            bf16=cfg.eval_bf16,
        )

    def subsets(self, tasks: list[str]) -> dict[str, list[int]] | None:
        """lm-eval's `samples` for tasks: each task's fixed seeded documents under eval_limit (None: all of every task)."""
        out = {}
        for t in tasks:
            out.update(self.subset(t) or {})
        return out or None

    def subset(self, task: str) -> dict[str, list[int]] | None:
        """The fixed seeded test documents of a task under eval_limit (None: all of them)."""
        if self.limit is None:
            return None
        spec = self.suite.task(task)  # local data: its documents (a data override may be a small sample of sizes.test)
        n = len(test_records(spec)) if test_file(spec) is not None else spec.sizes.test
        if self.limit >= n:
            return None
        idx = sorted(random.Random(stable_seed("eval-subset", task, self.limit)).sample(range(n), self.limit))
        return {self.configs[task]["task"]: idx}

    def evaluate(
        self,
        model: torch.nn.Module,
        tasks: list[str],
        *,
        bf16_autocast: bool = False,
        merged: bool | None = None,
        log_samples: bool = False,
    ) -> EvalResult:
        """Primary metric per task; model.train() is restored afterwards whatever happens.

        bf16 autocast if the caller or eval_bf16 asks; merged (default: eval_merged) folds the active adapters."""
        if not tasks:  # nothing to score (diagonal_final's stage 0): no lm-eval call
            return EvalResult(scores={}, raw={}, wall_s=0.0, n_examples={}, documents={})
        if merged is None:  # the evaluator's setting; None there: folded on CUDA, through PEFT on CPU
            merged = self.merged if self.merged is not None else next(model.parameters()).device.type == "cuda"
        if merged and not self.checked_fold and has_adapters(model):
            self.checked_fold = True  # before the recursive calls below
            self.fold_agreement = self.check_fold(model, tasks, bf16_autocast=bf16_autocast)
        t0 = time.perf_counter()
        fold = contextlib.nullcontext()
        if merged:
            from harness.adapters.combine import folded  # lazy: PEFT loads in ~2 s; only eval_merged needs it

            fold = folded(model)
        with exact_matmuls(), fold:
            results, n_samples, samples = self._run(
                model, tasks, bf16_autocast or self.bf16, True
            )  # per-document scores
        scores, raw, n, preds, docs = {}, {}, {}, ({} if log_samples else None), {}
        for t in tasks:
            spec = self.suite.task(t)
            name = self.configs[t]["task"]
            if name not in results:
                raise RuntimeError(f"lm-eval returned no result for task {name!r} (got {sorted(results)})")
            metric_key = spec.metric_key
            if metric_key not in results[name]:
                raise RuntimeError(f"lm-eval result for {name!r} has no metric {metric_key!r}: {sorted(results[name])}")
            scores[t] = float(results[name][metric_key])
            raw[t] = {k: v for k, v in results[name].items() if isinstance(v, (int, float, str))}
            n[t] = int(n_samples.get(name, {}).get("effective", 0))
            if log_samples:
                preds[t] = predictions(samples[name], spec.kind)
            docs[t] = sample_scores(samples[name], metric_key)
        return EvalResult(
            scores=scores, raw=raw, wall_s=time.perf_counter() - t0, n_examples=n, samples=preds, documents=docs
        )

    def check_fold(self, model: torch.nn.Module, tasks: list[str], *, bf16_autocast: bool = False) -> dict[str, float]:
        """Answer FOLD_CHECK_DOCS documents per task folded and through PEFT; warn (stderr) where they differ.

        Returns the fraction of agreeing documents per task (kept as fold_agreement; 1.0 expected: see README Precision)."""
        saved, self.limit = self.limit, min(FOLD_CHECK_DOCS, self.limit or FOLD_CHECK_DOCS)
        try:
            peft = self.evaluate(model, tasks, bf16_autocast=bf16_autocast, merged=False, log_samples=True).samples
            fold = self.evaluate(model, tasks, bf16_autocast=bf16_autocast, merged=True, log_samples=True).samples
        finally:
            self.limit = saved
        agreement = {
            t: sum(a["pred"] == b["pred"] for a, b in zip(peft[t], fold[t])) / max(1, len(peft[t])) for t in tasks
        }
        bad = {t: f for t, f in agreement.items() if f < 1.0}
        if bad:
            sys.stderr.write(
                f"warning: eval_merged: the folded model answered differently from the PEFT path on "
                f"{', '.join(f'{t} ({1 - f:.0%} of {FOLD_CHECK_DOCS})' for t, f in bad.items())}; its scores are "
                "not exact. Set --eval-merged false, or see the README's Precision section.\n"
            )
        return agreement

    def _run(self, model: torch.nn.Module, tasks: list[str], bf16: bool, log_samples: bool) -> tuple[dict, dict, dict]:
        """lm-eval's results, n-samples and (with log_samples) samples for the tasks, in one lm-eval call (requests of
        every task batched together)."""
        out = run_lm_eval(
            model,
            self.tokenizer,
            lambda: self.task_manager.load([self.configs[t] for t in tasks]),
            batch_size=self.batch_size,
            max_length=self.max_length,
            bf16=bf16,
            samples=self.subsets(tasks),
            log_samples=log_samples,
            progress=self.progress,
            n_tasks=len(tasks),
        )
        return out["results"], out.get("n-samples", {}), out.get("samples") or {}


def run_lm_eval(
    model: torch.nn.Module,
    tokenizer,
    load: Callable[[], dict],
    *,
    batch_size,
    max_length: int | None,
    bf16: bool,
    samples: dict[str, list[int]] | None = None,
    limit: int | None = None,
    log_samples: bool = False,
    progress: bool = True,
    n_tasks: int = 1,
) -> dict:
    """lm-eval's evaluate() output for the tasks load() returns (a TaskManager.load result), on the in-memory model through
    HFLM; model.train() is restored afterwards whatever happens. Also harness/run/general_eval.py's (general_tasks)."""
    from lm_eval.models.huggingface import (
        HFLM,  # lazy: lm-eval loads in ~0.6 s; config checks and --help need none of it
    )

    was_training = model.training
    verbose = logging.getLogger("harness").isEnabledFor(logging.DEBUG)
    bar = tqdm(total=n_tasks, desc="evaluate", leave=False, disable=not progress, dynamic_ncols=True, file=sys.stderr)
    try:
        # lm-eval wraps every forward in torch.autocast(enabled=mixed_precision_dtype is not None), which
        # switches an outer autocast off: bf16 must be asked of HFLM itself. CPU only, as in training.
        device = next(model.parameters()).device
        lm = HFLM(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=batch_size,
            max_length=max_length,
            mixed_precision_dtype=autocast_dtype(device, bf16),
        )
        quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stderr(io.StringIO())  # lm-eval's bars
        with quiet, torch.no_grad():
            out = _lm_eval(lm, load, samples, limit, log_samples, verbose)
        bar.update(n_tasks)
    finally:
        bar.close()
        model.train(was_training)
    return out


def _lm_eval(lm, load: Callable[[], dict], samples, limit: int | None, log_samples: bool, verbose: bool) -> dict:
    """lm-eval's evaluate() on the loaded tasks, set up as simple_evaluate sets it up (seeds 0, the task's own few-shot
    count else zero-shot, fewshot seed 0; bootstrap off).

    Not simple_evaluate itself: after every call it reports the environment (torch's collect_env and
    `pip list` in subprocesses, git), ~0.3-0.7 s per task here: a third of a tiny model's evaluation."""
    from lm_eval.evaluator import evaluate  # lazy: lm-eval loads in ~0.6 s; config checks and --help need none of it
    from lm_eval.utils import setup_logging  # lazy: lm-eval loads in ~0.6 s; config checks and --help need none of it

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    loaded = load()
    for obj in loaded["tasks"].values():
        if obj.get_config("num_fewshot") is None:
            obj.set_config(key="num_fewshot", value=0)
        obj.set_fewshot_seed(seed=0)
    out = evaluate(
        lm=lm,
        task_dict=loaded,
        samples=samples,
        limit=limit,
        bootstrap_iters=0,
        log_samples=log_samples,
        cache_requests=False,
    )
    setup_logging(verbosity="INFO" if verbose else "ERROR")
    return out


def has_adapters(model: torch.nn.Module) -> bool:
    """Whether PEFT LoRA layers are in the model (duck-typed: importing PEFT here would cost the CLI ~2 s)."""
    return any(hasattr(m, "lora_A") for m in model.modules())


def predictions(samples: list[dict], kind: str) -> list[dict]:
    """Per document, in doc_id order: the choice ranked first (with every choice's log-likelihood) or the generated text."""
    out = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        if kind == "multiple_choice":
            lls = [float(r[0]) for r in s["filtered_resps"]]  # one (loglikelihood, is_greedy) per choice
            out.append(
                {"doc_id": s["doc_id"], "pred": max(range(len(lls)), key=lls.__getitem__), "loglikelihoods": lls}
            )
        else:
            out.append({"doc_id": s["doc_id"], "pred": s["filtered_resps"][0]})
    return out


def validation_evaluator(suite, tokenizer, cfg, *, progress: bool = True) -> Evaluator | None:
    """An evaluator whose documents are each task's validation split (suite.yaml `validation:`), all of them; None
    when no task has one. Its results are those tasks' scores on held-out training records, never test documents."""
    configs = suite.lm_eval_validation_configs()
    if not configs:
        return None
    ev = Evaluator.from_config(suite, tokenizer, cfg, progress=progress)
    ev.configs, ev.limit = configs, None
    return ev


def validation_scores(
    suite, tokenizer, cfg, model: torch.nn.Module, tasks: list[str], *, progress: bool = True
) -> dict | None:
    """The model on the validation split of each of the tasks that has one (None: no task has one).

    ACC on the validation split (their mean) is what grid selection reads, so the test split never chooses."""
    ev = validation_evaluator(suite, tokenizer, cfg, progress=progress)
    got = [t for t in tasks if ev is not None and t in ev.configs]
    if not got:
        return None
    res = ev.evaluate(model, got, bf16_autocast=cfg.bf16_autocast)
    return {
        "tasks": got,
        "scores": res.scores,
        "acc": sum(res.scores.values()) / len(got),
        "complete": len(got) == len(tasks),
    }
