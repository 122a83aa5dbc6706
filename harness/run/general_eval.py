"""General ability through lm-eval's own registry: the knobs general_tasks, general_limit, general_include, general_every.

general_tasks names lm-eval's registered tasks or groups (mmlu, gsm8k, arc_easy, hellaswag, boolq, ...) and, with
general_include, tasks of the user's own YAML folder. They are scored on the base model at stage 0, after the last
stage and, with general_every K, after every K-th stage, through lm-eval's evaluate() on the model in memory, as the
suite's tasks are (harness/run/evaluate.py: HFLM, seeds 0, the task's own few-shot count else zero-shot, bootstrap
off, exact matmuls, eval_merged folding, model.train() restored). Each task's score is the first metric lm-eval's
results list for it (`primary`; the order lm-eval computes them in: for a multiple-choice task acc whatever its
metric_list's order, as tests/data/general shows; acc for arc_easy, boolq, hellaswag and mmlu's aggregate, exact_match
under strict-match for gsm8k, by their YAMLs; eval.json's general_metric says which); general_limit N is lm-eval's own `limit`, the first N documents of each task
(of each subtask of a group), the same at every stage. The context is the model's own (HFLM's max_length default), not
eval_max_length: few-shot prompts run past 512 tokens.

Names are resolved before anything is written (`check_names`, from harness/run/planning.py): the include folder is
indexed alone first, and lm-eval's ~14 000 built-in names (~11-20 s to index) only when a name is not found there.
"""

from __future__ import annotations

import contextlib
import difflib
import time
from pathlib import Path
from typing import Any

import torch

from harness.errors import ConfigError, HarnessError
from harness.models.environment import downloads_allowed
from harness.precision import exact_matmuls
from harness.run.evaluate import has_adapters, run_lm_eval
from harness.suites.lm_eval_configs import task_manager as lm_eval_task_manager

_MANAGERS: dict[tuple[str | None, bool], Any] = {}  # one TaskManager per (include folder, built-ins) in this process


def task_manager(include: Path | None, defaults: bool):
    """lm-eval's TaskManager over the include folder and (defaults) lm-eval's built-in tasks; built once per process."""
    key = (str(include) if include is not None else None, defaults)
    if key not in _MANAGERS:
        _MANAGERS[key] = lm_eval_task_manager(key[0], include_defaults=defaults)
    return _MANAGERS[key]


def resolve(names: list[str], include: Path | None):
    """The TaskManager that knows every name: the include folder's own when its tasks are all of them, else lm-eval's
    built-in tasks with the folder's. ConfigError for an unknown name (with the close matches) or a tag."""
    if include is not None and not Path(include).is_dir():
        raise ConfigError(
            f"--general-include {include}: no such folder. Give the folder that holds your lm-eval task YAMLs."
        )
    if include is not None:
        own = task_manager(include, False)
        if all(n in own.all_subtasks for n in names):
            return own
    tm = task_manager(include, True)
    unknown = [n for n in names if n not in tm.all_tasks]
    if unknown:
        near = {n: difflib.get_close_matches(n, tm.all_tasks, n=5, cutoff=0.6) for n in unknown}
        said = "; ".join(f"{n!r} (close: {', '.join(m)})" if m else f"{n!r} (nothing close)" for n, m in near.items())
        where = f"lm-eval's registry or {include}" if include is not None else "lm-eval's registry"
        raise ConfigError(
            f"--general-tasks: {said} is not a task or group in {where}. Spell it as lm-eval does "
            "(`lm-eval ls tasks` lists them), or pass the folder of your own task YAMLs with --general-include."
        )
    tags = [n for n in names if n in tm.all_tags and n not in tm.all_subtasks and n not in tm.all_groups]
    if tags:
        raise ConfigError(
            f"--general-tasks: {', '.join(tags)} is an lm-eval tag (a list of tasks with no score of its own); "
            "name its tasks instead, or a group that aggregates them."
        )
    return tm


def check_names(cfg) -> None:
    """Before anything is written: every general_tasks name resolves, and the built-in ones can reach their data."""
    if not cfg.general_tasks:
        return
    resolve(cfg.general_tasks, cfg.general_include)
    own = task_manager(cfg.general_include, False).all_tasks if cfg.general_include is not None else []
    hub = [n for n in cfg.general_tasks if n not in own]
    if hub and not downloads_allowed():
        raise HarnessError(
            f"--general-tasks {','.join(hub)}: lm-eval's registered tasks read their datasets from the Hugging Face hub, and hub "
            "downloads are off. On a machine with hub access set HF_HUB_OFFLINE=0 (or HARNESS_ALLOW_DOWNLOADS=1); without the "
            "hub, leave --general-tasks out (general_ce is the offline measure) or give tasks with local data through "
            "--general-include."
        )


def due(cfg, stage: int, last: int) -> bool:
    """Whether stage `stage` (0 = the base model) scores general_tasks: stage 0, the last stage, every general_every-th."""
    if not cfg.general_tasks:
        return False
    return stage in (0, last) or bool(cfg.general_every and stage % cfg.general_every == 0)


def at_stage(model: torch.nn.Module, tokenizer, cfg, stage: int, last: int, *, progress: bool = True) -> dict[str, Any]:
    """The stage's general record (evaluate) when general_tasks is due there; {} otherwise."""
    return evaluate(model, tokenizer, cfg, progress=progress) if due(cfg, stage, last) else {}


def primary(result: dict[str, Any]) -> str | None:
    """The first metric of one task's (or group's) lm-eval result that holds a number: its primary metric."""
    for key, value in result.items():
        if "," in key and "_stderr," not in key and isinstance(value, (int, float)) and not isinstance(value, bool):
            return key
    return None


def evaluate(model: torch.nn.Module, tokenizer, cfg, *, progress: bool = True) -> dict[str, Any]:
    """eval.json's general record: general {task: score}, general_metric {task: lm-eval metric key}, general_n {task:
    documents}, general_s (seconds)."""
    t0 = time.perf_counter()
    tm = resolve(cfg.general_tasks, cfg.general_include)
    fold = contextlib.nullcontext()
    if cfg.eval_merged and has_adapters(model):
        from harness.adapters.combine import folded  # lazy: PEFT loads in ~2 s; only eval_merged needs it

        fold = folded(model)
    with exact_matmuls(), fold:
        out = run_lm_eval(
            model,
            tokenizer,
            lambda: tm.load(list(cfg.general_tasks)),
            batch_size=cfg.eval_batch_size,
            max_length=None,
            bf16=cfg.eval_bf16 or cfg.bf16_autocast,
            limit=cfg.general_limit,
            progress=progress,
            n_tasks=len(cfg.general_tasks),
        )
    results = {**out.get("groups", {}), **out["results"]}
    scores, metrics, n = {}, {}, {}
    for name in cfg.general_tasks:
        key = primary(results.get(name, {}))
        if key is None:
            raise HarnessError(
                f"--general-tasks {name}: lm-eval returned no score for it (got {sorted(results)}); a group "
                "needs an aggregate metric (aggregate_metric_list) to have one. Name its tasks instead."
            )
        scores[name], metrics[name] = float(results[name][key]), key
        n[name] = documents(name, out.get("n-samples", {}), out.get("group_subtasks", {}))
    return {"general": scores, "general_metric": metrics, "general_n": n, "general_s": time.perf_counter() - t0}


def documents(name: str, n_samples: dict[str, dict], children: dict[str, list[str]]) -> int:
    """Documents scored for a task, or for a group: over its tasks, however deeply nested."""
    if name in n_samples:
        return int(n_samples[name].get("effective", 0))
    return sum(documents(c, n_samples, children) for c in children.get(name, []))


def summary(stage_evals: dict[int, dict[str, Any]], last: int) -> dict[str, Any]:
    """summary.json's general_tasks {task: {base, final, change}} from the stages' eval.json (stage -> record): the base
    model's score, the last stage's and final − base; {} when either was not scored (general_tasks off)."""
    base, final = ((stage_evals.get(t) or {}).get("general") for t in (0, last))
    if not base or not final or last == 0:
        return {}
    return {
        "general_tasks": {
            t: {"base": base[t], "final": final[t], "change": final[t] - base[t]} for t in base if t in final
        }
    }
