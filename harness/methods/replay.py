"""Experience replay: SeqLoRA whose every later stage also trains on a seeded buffer of earlier tasks."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from harness.methods.base import register
from harness.methods.lora import SeqLoRA
from harness.seeding import stable_seed


class ReplayKnobs(BaseModel):
    """Size of the replay buffer kept per earlier task."""

    model_config = ConfigDict(extra="forbid")
    fraction: float = Field(
        0.1, gt=0, le=1, description="Fraction of each earlier task's training examples kept (TRACE: 10%)."
    )
    per_task: int | None = Field(
        None, ge=1, description="A fixed number of examples per earlier task instead of a fraction."
    )


def buffer_indices(n: int, *, seed: int, task: str, fraction: float, per_task: int | None) -> list[int]:
    """The seeded sample of one task's training examples that later stages replay (sorted indices)."""
    k = min(n, per_task) if per_task is not None else max(1, math.floor(fraction * n))
    return sorted(random.Random(stable_seed(seed, "replay", task)).sample(range(n), k))


@register
class Replay(SeqLoRA):
    name = "replay"
    display = "Replay"
    summary = (
        "Replay: SeqLoRA plus a seeded buffer of each earlier task's training examples mixed into every later stage."
    )
    source = "Experience replay as in TRACE (Wang et al. 2023): 10% of each earlier task's data replayed."
    knobs = ReplayKnobs
    section = "replay"
    independent_adapters = False

    def __init__(self, cfg, **kw):
        super().__init__(cfg, **kw)
        self.replayed: dict[str, list[int]] = {}

    def train_data(self, stage: int, examples: list[dict]) -> list[dict]:
        k = self.cfg.replay
        self.replayed = {}
        mixed = list(examples)
        for task in self.tasks[: stage - 1]:
            pool = self.task_examples(task)
            idx = buffer_indices(len(pool), seed=self.seed, task=task, fraction=k.fraction, per_task=k.per_task)
            self.replayed[task] = idx
            mixed.extend(pool[i] for i in idx)
        return mixed

    def end_stage(self) -> dict[str, float]:
        """replay/stored_examples (stage.json): the earlier tasks' examples mixed into this stage, the memory replay
        keeps (its fraction is a memory budget, not a strength: it is not tuned)."""
        return {**super().end_stage(), "replay/stored_examples": float(sum(len(v) for v in self.replayed.values()))}

    def save_stage(self, folder: Path) -> None:
        super().save_stage(folder)
        (folder / "replay.json").write_text(json.dumps({"replayed": self.replayed}, indent=2))
