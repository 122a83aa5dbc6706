"""IncLoRA and O-LoRA: a new LoRA adapter per task; earlier adapters frozen bit-identical, all active.

ΔW = Σ_i s B_i A_i. O-LoRA adds λ1 Σ_modules Σ_{i<t} Σ_jk |(A_i A_tᵀ)_jk| (keep the new task's
input subspace orthogonal to earlier ones) + λ2 ‖θ_t‖² to the loss; IncLoRA is O-LoRA with λ1 = 0.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from harness.adapters.keys import b_key
from harness.methods.base import Method, register
from harness.methods.lori import masks as M


@register
class IncLoRA(Method):
    name = "inclora"
    display = "IncLoRA"
    summary = "IncLoRA: a new LoRA adapter per task; earlier adapters frozen and active (ΔW = Σ_i s B_i A_i)."
    source = "Wang et al. 2023 (O-LoRA paper's IncLoRA baseline): O-LoRA with λ1 = λ2 = 0."
    per_task_adapters = True
    independent_adapters = False

    def a_matrices(self) -> list[dict[str, torch.Tensor]]:
        return [self.adapters.a_tensors(n) for n in self.adapters.adapters]

    def diagnostics(self) -> dict:
        As = self.a_matrices()
        return {
            "subspace_overlap": {"tasks": self.tasks, "matrix": M.subspace_overlap_matrix(As)["matrix"]},
            "orth_l1": {
                "tasks": self.tasks,
                "matrix": [[float(orth_l1([As[i]], As[j])) for j in range(len(As))] for i in range(len(As))],
            },
        }


def orth_l1(earlier: list[dict[str, torch.Tensor]], current: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ_modules Σ_{i} Σ_jk |(A_i A_tᵀ)_jk| over earlier tasks' A_i and the current A_t (O-LoRA's L_orth)."""
    total = None
    for A_i in earlier:
        for k, A_t in current.items():
            term = (A_i[k].to(A_t.dtype) @ A_t.T).abs().sum()
            total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


class OLoRAKnobs(BaseModel):
    """O-LoRA's loss weights (defaults: the authors' code for the 4-task benchmark)."""

    model_config = ConfigDict(extra="forbid")
    lambda_orth: float = Field(
        0.5, ge=0, description="λ1: weight of Σ|A_i A_tᵀ| between earlier tasks' A and the new A."
    )
    lambda_l2: float = Field(0.0, ge=0, description="λ2: weight of ‖θ_t‖² over the new adapter's A and B.")


@register
class OLoRA(IncLoRA):
    name = "olora"
    display = "O-LoRA"
    summary = "O-LoRA: IncLoRA + λ1 Σ|A_i A_tᵀ| (orthogonal subspaces) + λ2 ‖θ_t‖²."
    source = (
        "Wang et al., EMNLP Findings 2023 (O-LoRA), L = L_task + λ1 Σ_{i<t} ‖A_i A_tᵀ‖₁ + λ2 ‖θ_t‖²; "
        "the authors' code (src/uie_trainer_lora.py) uses an unsquared norm for the λ2 term."
    )
    knobs = OLoRAKnobs
    section = "olora"
    strength = "olora.lambda_orth"

    def begin_stage(self, ctx) -> None:
        super().begin_stage(ctx)
        layers = dict(self.adapters.layers())
        self._earlier = [{k: v.detach() for k, v in a.items()} for a in self.a_matrices()[:-1]]
        self._current = {k: layers[n].lora_A[self.adapter].weight for n, k in self._keys(layers)}
        self._new_params = [p for p in self.trainable().values()]

    @staticmethod
    def _keys(layers):
        return [(n, b_key(n)) for n in layers]  # the keys a_tensors() uses

    def extra_loss(self) -> torch.Tensor | None:
        k = self.cfg.olora
        loss = None
        if k.lambda_orth > 0 and self._earlier:
            loss = k.lambda_orth * orth_l1(self._earlier, self._current)
        if k.lambda_l2 > 0:
            l2 = k.lambda_l2 * sum((p.float() ** 2).sum() for p in self._new_params)
            loss = l2 if loss is None else loss + l2
        return loss
