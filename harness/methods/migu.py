"""MIGU: SeqLoRA whose gradient, in each adapted linear layer, reaches only the output rows with the largest outputs.

Each step, forward hooks sum |output| per output dimension over the batch's positions; after backward, a
row of lora_B (d_out rows: the adapted layer's outputs) or of lora_A (r rows: lora_A's outputs) keeps
its gradient only if its L1-normalised magnitude is at least the (1 − top_fraction) quantile of that
layer's magnitudes, as the authors' code does (torch.quantile; ties at the threshold are kept).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from harness import distributed as D
from harness.methods.base import register
from harness.methods.lora import SeqLoRA


class MIGUKnobs(BaseModel):
    """Which output rows keep their gradient."""

    model_config = ConfigDict(extra="forbid")
    top_fraction: float = Field(
        0.3,
        gt=0,
        le=1,
        description="Fraction of each layer's output rows (largest L1-normalised |output|) whose gradient is kept "
        "(the authors' ini_threshold 0.7 = 1 − 0.3).",
    )
    mask_first_task: bool = Field(
        False, description="Also mask on the first task (the authors' code trains it unmasked)."
    )


def row_mask(magnitude: torch.Tensor, top_fraction: float) -> torch.Tensor:
    """1 for rows whose L1-normalised magnitude reaches the (1 − top_fraction) quantile, else 0 (float, shape (rows,))."""
    m = magnitude.double() / magnitude.double().sum().clamp(min=torch.finfo(torch.float64).tiny)
    return (m >= torch.quantile(m, 1.0 - top_fraction)).float()


@register
class MIGU(SeqLoRA):
    name = "migu"
    display = "MIGU"
    summary = "MIGU: SeqLoRA whose gradient reaches only each adapted layer's output rows with the top L1-normalised |output|."
    source = (
        "Du et al. 2024 (MIGU); authors' code wenyudu/MIGU src/uie_trainer_lora.py:444-461 (hooks sum "
        "|output| over positions) and src/accelerate_local.py:21-29 (mask = activation >= quantile(activation, ini_threshold), "
        "applied to weight.grad rows). Deviations: lora_B's rows are ranked by the adapted layer's output (base + LoRA), "
        "lora_A's by lora_A's own output (the authors' LoRA path, src/accelerate_local.py:61-100, is written for their "
        "clustering variant and does not run as published); padded positions count, as in the code; no mask on the first "
        "task unless migu.mask_first_task, as in the code (is_first_task)."
    )
    knobs = MIGUKnobs
    section = "migu"
    strength = "migu.top_fraction"
    independent_adapters = False

    def begin_stage(self, ctx) -> None:
        super().begin_stage(ctx)
        self.stage = ctx.stage
        self.magnitudes: dict[str, torch.Tensor] = {}
        self.kept: list[float] = []
        self._hooks = []
        self._rows: list[tuple[str, torch.nn.Parameter, str, torch.nn.Parameter]] = []
        if ctx.stage == 1 and not self.cfg.migu.mask_first_task:
            return
        for name, layer in self.adapters.layers():
            A, B = layer.lora_A[self.adapter], layer.lora_B[self.adapter]
            self._hooks.append(layer.register_forward_hook(self._recorder(f"{name}/out")))
            self._hooks.append(A.register_forward_hook(self._recorder(f"{name}/A")))
            self._rows.append((f"{name}/out", B.weight, f"{name}/A", A.weight))

    def _recorder(self, key: str):
        def hook(module, args, output):
            if torch.is_grad_enabled():  # training steps only, not a no-grad forward
                mag = output.detach().abs().reshape(-1, output.shape[-1]).sum(dim=0).float()
                self.magnitudes[key] = self.magnitudes[key] + mag if key in self.magnitudes else mag

        return hook

    @torch.no_grad()
    def after_backward(self) -> None:
        if not self._rows:
            return
        if D.is_distributed():  # every rank must apply the same mask: the global batch's magnitudes
            D.sum_over_ranks_(list(self.magnitudes.values()))
        tf, kept, total = self.cfg.migu.top_fraction, 0.0, 0
        for out_key, B, a_key, A in self._rows:
            for key, W in ((out_key, B), (a_key, A)):
                mask = row_mask(self.magnitudes[key], tf).to(W.device)
                if W.grad is not None:
                    W.grad.mul_(mask.to(W.grad.dtype).unsqueeze(-1))
                kept, total = kept + float(mask.sum()), total + mask.numel()
        self.kept.append(kept / total)
        self.magnitudes = {}

    def end_stage(self) -> dict[str, float]:
        for h in self._hooks:
            h.remove()
        self._hooks, self._rows = [], []
        return {"migu/kept_rows_frac": sum(self.kept) / len(self.kept)} if self.kept else {}
