"""The training recipe of a stage and the optimizer it builds: fresh AdamW, linear warm-up, then a constant rate.

The recipe's knobs (EOS after the completion or not, warm-up, clipping, loss reduction, weight decay, gradient
checkpointing) are config.py's RECIPE_KNOBS fields; `Recipe` is built from them and logged as MLflow params. The
training step that follows it is harness/run/train.py's.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, create_model

from harness.config import RECIPE_KNOBS, ExperimentConfig


class _RecipeRules(BaseModel):
    """What the recipe's knobs mean for a step; the knobs themselves (type, default, help) are config.py's fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @classmethod
    def from_config(cls, cfg) -> "_RecipeRules":
        return cls(**{k: getattr(cfg, k) for k in cls.model_fields})

    def add_eos(self, generative: bool) -> bool:
        """auto: EOS only where it is the stop signal (generation); a choice's EOS is never scored."""
        return self.completion_eos == "always" or (self.completion_eos == "auto" and generative)

    def warmup_for(self, total_steps: int) -> int:
        return self.warmup_steps if self.warmup_steps else int(math.ceil(self.warmup_ratio * total_steps))


# The training recipe of every stage: the config's RECIPE_KNOBS fields themselves, not a copy of their declarations.
Recipe = create_model(
    "Recipe",
    __base__=_RecipeRules,
    __module__=__name__,
    **{k: (ExperimentConfig.model_fields[k].annotation, ExperimentConfig.model_fields[k]) for k in RECIPE_KNOBS},
)


def lr_factor(step: int, warmup: int) -> float:
    """Linear warm-up to the full rate over `warmup` steps (step 0 gets 1/(warmup+1)), then constant."""
    return min(1.0, (step + 1) / (warmup + 1)) if warmup > 0 else 1.0


def make_optimizer(params: list[torch.nn.Parameter], lr: float, recipe: Recipe, total_steps: int):
    """AdamW with its state in the parameters' dtype (fp32 adapters: harness/precision.py); fused into a few kernels
    on CUDA (one launch per step instead of one per tensor), PyTorch's default implementation on CPU."""
    fused = bool(params) and all(p.device.type == "cuda" for p in params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=recipe.weight_decay, fused=fused or None)
    warmup = recipe.warmup_for(total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup))
    return opt, sched
