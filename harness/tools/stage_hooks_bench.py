"""`harness bench --stage-hooks`: what a method costs outside its training steps, on a real task.

Some methods do work between stages: InfLoRA measures the new task's input subspace before it trains and stores the
task's subspace after; EWC computes a Fisher and an anchor after a stage; LoRI-S chooses a mask. A sequence records it
per stage (stage.json `method_setup_s` / `method_teardown_s`, harness/run/sequence.py); this times the same hooks on
a suite's real training data, outside a sequence, so a cost can be checked (and compared across code versions) in
minutes:

- each method runs two stages (the suite's first two tasks of order 0), with `steps` training steps per stage on
  that task's real batches, so that what the teardown measures has been trained;
- for each stage: the setup (`begin_stage`, a magnitude mask's calibration apart) and the teardown (`end_stage`) in
  seconds, and the median training step;
- `train_s_est`: the stage's training time at the suite's budget (its steps x the median step), and
  `method_frac` = (setup + teardown) / train_s_est: the method's own share of a stage.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

from harness.methods import METHODS, StageContext
from harness.models import load_model, set_torch_threads
from harness.models.environment import device_name
from harness.run.batches import example_batches, task_examples
from harness.run.planning import stage_budget
from harness.run.recipe import Recipe, make_optimizer
from harness.run.train import train_step
from harness.suites import load_suite
from harness.tools.profile_step import sync


def _stage(method, cfg, suite, tok, t: int, task: str, steps: int, recipe, device) -> dict:
    """One stage of `method` on `task`: timed setup, `steps` timed training steps, timed teardown."""
    b = stage_budget(cfg, suite, [task], method.name, 0)
    examples = method.train_data(t, task_examples(suite, task, recipe, limit=cfg.train_limit, seed=0))
    batches = example_batches(tok, examples, b["max_seq_len"], device)
    calib = {"s": 0.0}

    def calibrate(max_steps, lr_method):  # a magnitude mask's LoRI-D run: training, not the method's own cost
        t0 = time.perf_counter()
        cb = stage_budget(cfg, suite, [task], lr_method, 0)
        params = list(method.trainable().values())
        opt, sched = make_optimizer(params, cb["lr"], recipe, max_steps or steps)
        for batch, _ in zip(batches(None, cb["batch_size"]), range(max_steps or steps)):
            train_step(method.model, batch, params, opt, sched, recipe, None)
        calib["s"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    method.begin_stage(
        StageContext(
            stage=t, task=task, run_dir=Path("."), calibrate=calibrate, batches=batches, n_examples=len(examples)
        )
    )
    sync(device)
    setup_s = time.perf_counter() - t0 - calib["s"]
    params = list(method.trainable().values())
    opt, sched = make_optimizer(params, b["lr"], recipe, steps)
    method.model.train()
    times = []
    for batch, _ in zip(batches(None, b["batch_size"]), range(steps)):
        t1 = time.perf_counter()
        train_step(method.model, batch, params, opt, sched, recipe, method)
        sync(device)
        times.append(time.perf_counter() - t1)
    t2 = time.perf_counter()
    method.end_stage()
    sync(device)
    teardown_s = time.perf_counter() - t2
    budget_steps = math.ceil(b["epochs"] * math.ceil(len(examples) / b["batch_size"]))
    step_s = statistics.median(times) if times else float("nan")
    train_est = budget_steps * step_s
    return {
        "stage": t,
        "task": task,
        "method_setup_s": setup_s,
        "method_teardown_s": teardown_s,
        "calibration_s": calib["s"],
        "step_s_median": step_s,
        "budget_steps": budget_steps,
        "train_s_est": train_est,
        "method_frac": (setup_s + teardown_s) / train_est if train_est > 0 else float("nan"),
    }


def run_stage_hooks(cfg, *, methods: tuple[str, ...], suite_name: str, steps: int = 3) -> dict:
    """Per method: two stages' setup and teardown seconds, median step and the method's share of a stage."""
    set_torch_threads()
    suite = load_suite(suite_name)
    tasks = list(suite.orders[0][:2]) if suite.orders else [t.name for t in suite.tasks][:2]
    model, tok = load_model(
        cfg.model, device=cfg.device, dtype=cfg.dtype, cache_dir=cfg.cache_dir, trust_remote_code=cfg.trust_remote_code
    )
    recipe, device = Recipe.from_config(cfg), next(model.parameters()).device
    out: dict = {
        "model": cfg.model,
        "suite": suite_name,
        "tasks": tasks,
        "steps": steps,
        "device_name": device_name(device),
        "methods": {},
    }
    for name in methods:
        method = METHODS[name](
            cfg,
            seed=0,
            tasks=tasks,
            base_model=model,
            task_examples=lambda task: task_examples(suite, task, recipe, limit=cfg.train_limit, seed=0),
        )
        out["methods"][name] = [
            _stage(method, cfg, suite, tok, t, task, steps, recipe, device) for t, task in enumerate(tasks, 1)
        ]
        model = method.unload()
    return out


def format_stage_hooks(res: dict) -> str:
    rows = [
        f"model {res['model']} on {res['device_name']}, suite {res['suite']} ({', '.join(res['tasks'])}), "
        f"{res['steps']} timed steps per stage",
        f"{'method':<10}{'stage':>6}{'setup s':>10}{'teardown s':>12}{'step s':>9}{'stage train s (est.)':>22}{'method share':>14}",
    ]
    for name, stages in res["methods"].items():
        for s in stages:
            rows.append(
                f"{name:<10}{s['stage']:>6}{s['method_setup_s']:>10.2f}{s['method_teardown_s']:>12.2f}"
                f"{s['step_s_median']:>9.3f}{s['train_s_est']:>22.1f}{100 * s['method_frac']:>13.1f}%"
            )
    return "\n".join(rows)
