"""Multi-task learning: one adapter trained once on the union of all tasks, the upper bound CL papers report."""

from __future__ import annotations

from harness.methods.base import register
from harness.methods.lora import SeqLoRA


@register
class MTL(SeqLoRA):
    name = "mtl"
    display = "MTL"
    summary = "MTL: one LoRA adapter trained on the union of all tasks in one stage (same total steps): a reference, not a sequence."
    source = "Multi-task upper bound reported by every CL paper (e.g. O-LoRA, Wang et al. 2023)."
    reference = True
    independent_adapters = False

    @classmethod
    def stage_plan(cls, tasks: list[str]) -> list[list[str]]:
        return [list(tasks)]
