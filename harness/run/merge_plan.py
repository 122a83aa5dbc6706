"""What `harness merge` will run: one unit per (method, seed), the tasks it merges, the knobs its task adapters use; every
check on the merge knobs that can be made before anything is trained or written."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness.config import ExperimentConfig
from harness.errors import ConfigError
from harness.methods import METHODS
from harness.run import merge_weights as MW
from harness.run.planning import experiment_dir


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
