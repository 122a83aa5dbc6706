"""SeqLoRA: one PEFT LoRA adapter (A and B trained) continued through the whole sequence."""

from __future__ import annotations

from harness.methods.base import Method, register


@register
class SeqLoRA(Method):
    name = "lora"
    display = "LoRA"
    summary = "Sequential LoRA: one LoRA adapter (A and B trained) continued through the sequence (SeqLoRA)."
    source = "Hu et al. 2021 (LoRA), W = W0 + s·B·A; the naive continual baseline of O-LoRA (Wang et al. 2023)."
    lr_default = 1e-3  # the family lr_lora: every LoRA-based baseline trains at it
    independent_adapters = True
