"""Evaluation through lm-evaluation-harness with the model (and its adapters) in memory.

One TaskManager (include_defaults=False: indexing lm-eval's built-in tasks costs ~11 s per
construction) serves the whole run. No request cache: lm-eval's cache keys ignore the weights, so
a shared cache would return the previous stage's answers. Bootstrap is off per stage. HFLM puts the
model in eval mode and never switches back, so train mode is restored afterwards.

With eval_limit N, every task is scored on a fixed seeded subset of N test documents, drawn from
(task, N) alone, so a cell means the same documents at every stage, for every method and seed
(lm-eval's own `limit` would take the first N). lm-eval's progress bars and chatter are shown only
with `harness -v`; otherwise one bar per stage evaluation, one tick per task.
"""

from __future__ import annotations

import contextlib
import io
import logging
import random
import sys
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from harness.precision import autocast_ctx
from harness.seeding import stable_seed

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    scores: dict[str, float]  # task -> primary metric in [0, 1]
    raw: dict[str, dict]  # task -> lm-eval's metric dict for that task
    wall_s: float
    n_examples: dict[str, int]


class Evaluator:
    """Scores a model on suite tasks via lm-eval's simple_evaluate."""

    def __init__(self, suite, tokenizer, *, batch_size: int = 32, limit: int | None = None, max_length: int = 512,
                 progress: bool = True):
        from lm_eval.tasks import TaskManager

        self.suite = suite
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.limit = limit
        self.max_length = max_length
        self.progress = progress
        self.configs = suite.lm_eval_task_configs()
        # Task configs are passed as dicts: no folder to index.
        self.task_manager = TaskManager(include_defaults=False)

    @classmethod
    def from_config(cls, suite, tokenizer, cfg, *, progress: bool = True) -> "Evaluator":
        """The evaluator an experiment config asks for (eval_batch_size, eval_limit, eval_max_length)."""
        return cls(suite, tokenizer, batch_size=cfg.eval_batch_size, limit=cfg.eval_limit, max_length=cfg.eval_max_length,
                   progress=progress)

    def subset(self, task: str) -> dict[str, list[int]] | None:
        """The fixed seeded test documents of a task under eval_limit (None: all of them)."""
        if self.limit is None:
            return None
        n = self.suite.task(task).sizes.test
        if self.limit >= n:
            return None
        idx = sorted(random.Random(stable_seed("eval-subset", task, self.limit)).sample(range(n), self.limit))
        return {self.configs[task]["task"]: idx}

    def evaluate(self, model: torch.nn.Module, tasks: list[str], *, bf16_autocast: bool = False) -> EvalResult:
        """Primary metric per task; model.train() is restored afterwards whatever happens."""
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        was_training = model.training
        verbose = logging.getLogger("harness").isEnabledFor(logging.DEBUG)
        t0 = time.perf_counter()
        results, n_samples = {}, {}
        bar = tqdm(total=len(tasks), desc="evaluate", leave=False, disable=not self.progress, dynamic_ncols=True, file=sys.stderr)
        try:
            lm = HFLM(pretrained=model, tokenizer=self.tokenizer, batch_size=self.batch_size, max_length=self.max_length)
            for t in tasks:  # one task at a time: one tick of our bar each, lm-eval's own bars silenced
                quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stderr(io.StringIO())
                with quiet, autocast_ctx(next(model.parameters()).device, bf16_autocast), torch.no_grad():
                    out = lm_eval.simple_evaluate(
                        model=lm, tasks=[self.configs[t]], task_manager=self.task_manager, samples=self.subset(t),
                        bootstrap_iters=0, log_samples=False, use_cache=None, cache_requests=False,
                        verbosity="INFO" if verbose else "ERROR", random_seed=0, numpy_random_seed=0,
                        torch_random_seed=0, fewshot_random_seed=0,
                    )
                results.update(out["results"])
                n_samples.update(out.get("n-samples", {}))
                bar.update(1)
        finally:
            bar.close()
            model.train(was_training)
        scores, raw, n = {}, {}, {}
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
        return EvalResult(scores=scores, raw=raw, wall_s=time.perf_counter() - t0, n_examples=n)
