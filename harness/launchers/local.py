"""Running an experiment in this process: plan (or pick one sequence), preflight, load the model once, run its sequences.

`harness run` with launcher local calls run_experiment for the whole experiment; a launcher's job
(harness/launchers) calls it for one sequence folder with preflight=False. The sequence loop itself
is harness/run/sequence.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from harness import distributed as D
from harness.config import ExperimentConfig
from harness.errors import HarnessError, Interrupted
from harness.io import atomic_write_yaml
from harness.methods import METHODS, Method
from harness.models import load_model, module_shapes, set_torch_threads
from harness.precision import precision_of, set_tf32
from harness.run.base_eval import CACHE_DIR as BASE_EVAL_DIR
from harness.run.base_eval import BaseEvalCache
from harness.run.console import say
from harness.run.evaluate import Evaluator
from harness.run.planning import experiment_dir, plan, preflight_methods, validate
from harness.run.sequence import SequenceRunner
from harness.suites import load_suite
from harness.tracking.client import default_tracking_uri, open_tracker


def check_launch(cfg: ExperimentConfig, suite, specs) -> None:
    """Under several processes, before anything is loaded or written: every stage's global batch must split evenly
    over the ranks, and under FSDP no method may change the step (its verbs would see released parameters)."""
    if not D.is_distributed():
        return
    for spec in specs:
        D.check_fsdp_method(METHODS[spec.method], Method, spec.cfg.distributed)
        for t, stage in enumerate(spec.stages, 1):
            D.check_batch_size(stage.budget["batch_size"], f"{spec.label}, stage {t} ({'+'.join(stage.tasks)})")


def planned_sequences(cfg: ExperimentConfig, only: Path | None = None, *, preflight: bool = True):
    """(suite, specs, tracking URI, shapes checked) of the experiment, or of the one sequence in folder `only`.

    preflight=False is for a launcher's job: its driver already ran the whole preflight, so the job
    only re-plans (cheap, writes nothing) to find its folder."""
    if preflight:
        suite, specs, uri, shapes_checked = validate(cfg)
    else:
        suite = load_suite(cfg.suite)
        specs, uri, shapes_checked = (
            plan(cfg, suite),
            default_tracking_uri(Path(cfg.results_dir), cfg.tracking_uri),
            True,
        )
    if only is not None:
        specs = [s for s in specs if s.run_dir.resolve() == Path(only).resolve()]
        if not specs:
            raise HarnessError(
                f"{only}: not a sequence folder of experiment {cfg.experiment_name} (its config plans other folders)"
            )
    return suite, specs, uri, shapes_checked


def write_experiment_files(cfg: ExperimentConfig, *, only: Path | None = None) -> Path:
    """The experiment folder and its config.yaml; resuming one sequence must not narrow what it says it holds."""
    exp_dir = experiment_dir(cfg)
    exp_dir.mkdir(parents=True, exist_ok=True)
    if only is None:
        atomic_write_yaml(exp_dir / "config.yaml", cfg.to_yaml_dict())
    return exp_dir


def run_experiment(
    cfg: ExperimentConfig,
    *,
    progress: bool = True,
    only: Path | None = None,
    preflight: bool = True,
    threads: int | None = None,
    tracking_by_driver: bool = False,
) -> list[dict[str, Any]]:
    """Validate everything, then run every sequence (or only the one in folder `only`), skipping finished work.

    A launcher's job calls this with only=<its folder>, preflight=False (the driver checked) and
    threads=job_cpus (a Ray worker sees every CPU of its node, not the CPUs it was given); a `--jobs` process with
    tracking_by_driver (it writes its folder only; the driver mirrors it into MLflow)."""
    suite, specs, uri, shapes_checked = planned_sequences(cfg, only, preflight=preflight)
    check_launch(cfg, suite, specs)
    set_torch_threads(threads)
    D.init(cfg.device)  # several processes: join the group now, so each GPU rank loads onto its own device
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tokenizer = load_model(
        cfg.model,
        seed=0,
        device=cfg.device,
        dtype=cfg.dtype,
        cache_dir=cfg.cache_dir,
        trust_remote_code=cfg.trust_remote_code,
    )
    if D.device() is not None and next(model.parameters()).device != D.device():
        model = model.to(D.device())  # e.g. a hub model placed on cuda:0: each rank's model on its own GPU
    set_tf32(
        cfg.tf32
    )  # explicit, never the library's default; evaluation and folding switch it off (precision.exact_matmuls)
    say(
        f"loaded {cfg.model} in {time.perf_counter() - t0:.1f}s on {next(model.parameters()).device}: "
        f"{precision_of(cfg, model).describe()}"
    )
    if not shapes_checked:
        preflight_methods(cfg, specs, module_shapes(model))
    # Only now is anything written: the experiment folder, the store, the runs.
    if D.is_main():  # under torchrun / accelerate launch rank 0 alone writes
        write_experiment_files(cfg, only=only)
    tracker = open_tracker(cfg, uri, deferred=tracking_by_driver)
    evaluator = Evaluator.from_config(suite, tokenizer, cfg, progress=progress)
    results = []
    base_cache = BaseEvalCache(experiment_dir(cfg) / BASE_EVAL_DIR if cfg.base_eval_cache else None)
    for spec in specs:
        runner = SequenceRunner(
            spec.cfg, suite, spec, model, tokenizer, evaluator, tracker, progress=progress, base_cache=base_cache
        )
        try:
            results.append(runner.run())
        except Interrupted as exc:
            if len(specs) > 1:  # resuming this sequence alone would leave the others unrun
                exc.experiment_dir = experiment_dir(cfg)
            raise
        model = runner.model
    return results
