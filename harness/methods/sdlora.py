"""SD-LoRA: per-task LoRA adapters; earlier tasks' directions frozen, their magnitudes keep training.

During stage t every adapted module computes

    W = W0 + Σ_{i<t} α_i · B_i A_i / ‖B_i A_i‖_F  +  α_t · s · B_t A_t          (s = lora_alpha / r)

B_i A_i / ‖B_i A_i‖_F (i < t) is frozen; the magnitudes α_1..α_{t-1} (one scalar per task and module) and the
new adapter's A_t, B_t and α_t train. The new adapter's own term is not normalised during its stage (B_t starts
at 0, so its direction is undefined at first; the authors' code does the same). At the end of stage t its
direction is frozen with α_t := α_t · s · ‖B_t A_t‖_F, so the model does not change there (up to rounding).

Each α is a parametrization of its adapter's lora_B (torch.nn.utils.parametrize, out of place):
B ↦ B · α · c, with c = 1/(s ‖B A‖_F) for a frozen direction and 1 for the new adapter, so PEFT's own forward
computes the sum above and the α's are ordinary named parameters (the optimizer and mid-stage checkpoints take
them like any other). At the end of a stage the parametrizations are removed and each lora_B holds the folded
B' = α B / (s ‖B A‖_F), i.e. s B' A = α B A / ‖B A‖_F: plain PEFT adapters, which evaluation, the stage folder's
adapter files and `harness export` (stacked into one rank-T·r adapter) use unchanged. The directions' own B (as
trained in their stage, never changed after) and every α go to sdlora.safetensors; a resume rebuilds the
parametrizations from them. ‖B A‖_F comes from the r×r Gram matrices (‖B A‖²_F = Σ (BᵀB) ⊙ (A Aᵀ)) in float64
on the CPU: no d_out × d_in product, the same bits on every device.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

from harness.errors import HarnessError
from harness.methods.base import register
from harness.methods.inclora import IncLoRA

FILE = "sdlora.safetensors"
CODE_ALPHA = 0.8  # the authors' initial magnitude, every task (backbone/lora.py, LoRA_ViT_timm.__init__)


class SDLoRAKnobs(BaseModel):
    """How SD-LoRA's magnitudes start each stage."""

    model_config = ConfigDict(extra="forbid")
    alpha_init: Literal["carry", "constant"] = Field(
        "carry",
        description="carry: an earlier task's α starts each stage where the last stage left it (task t's "
        "own α becomes α_t·s·‖B_tA_t‖_F when its direction is frozen: the model does not jump), and the new α_t "
        "starts at 1; constant: every α (earlier and new) starts each stage at alpha_value, as the authors' code "
        "re-creates them each task.",
    )
    alpha_value: float = Field(
        CODE_ALPHA,
        gt=0,
        allow_inf_nan=False,
        description="With alpha_init constant: the value every α starts each stage at (the code's 0.8).",
    )

    @model_validator(mode="after")
    def _value_needs_constant(self) -> "SDLoRAKnobs":
        if self.alpha_init != "constant" and self.alpha_value != CODE_ALPHA:
            raise ValueError("alpha_value is only used with alpha_init: constant")
        return self


def update_norm(A: torch.Tensor, B: torch.Tensor) -> float:
    """‖B A‖_F (float64, on the CPU) from the r×r Gram matrices, without forming B·A."""
    A, B = A.detach().cpu().double(), B.detach().cpu().double()
    return math.sqrt(max(float(((B.T @ B) * (A @ A.T)).sum()), 0.0))


def fold_factor(scaling: float, norm: float) -> float:
    """c with s·(c·B)·A = BA/‖BA‖_F; 0 for a zero update (its direction is undefined and contributes nothing)."""
    return 1.0 / (scaling * norm) if norm > 0 else 0.0


class Magnitude(nn.Module):
    """The parametrization of one adapter's lora_B in one module: B ↦ B · (alpha · factor); alpha trains."""

    def __init__(self, alpha: float | torch.Tensor, factor: float, like: torch.Tensor):
        super().__init__()
        self.alpha = nn.Parameter(torch.as_tensor(alpha, dtype=like.dtype).reshape(1).to(like.device).clone())
        self.register_buffer("factor", torch.full((1,), factor, dtype=like.dtype, device=like.device))

    def forward(self, B: torch.Tensor) -> torch.Tensor:
        return B * (self.alpha * self.factor)


@register
class SDLoRA(IncLoRA):
    name = "sdlora"
    display = "SD-LoRA"
    summary = (
        "SD-LoRA: per-task adapters; earlier directions B_iA_i/‖B_iA_i‖_F frozen, their magnitudes α_i "
        "train with the new adapter (ΔW = Σ_{i<t} α_i B_iA_i/‖B_iA_i‖_F + α_t s B_tA_t)."
    )
    source = (
        "Wu et al., ICLR 2025 (SD-LoRA), W = W0 + Σ_i α_i A_iB_i/‖A_iB_i‖_F (the paper's A_iB_i is PEFT's "
        "B_iA_i); authors' code WuYichen-97/SD-Lora-CL backbone/lora.py (_LoRA_qkv_timm_train, "
        "LoRA_ViT_timm). Deviations: every target module of a decoder LLM (the code: q and v of ViT blocks); "
        "one α per task and module (the code: one per task, shared by all layers); directions normalised by "
        "‖B_iA_i‖_F as the paper writes (the code divides by ‖B_i‖_F·‖A_i‖_F); alpha_init carry by default "
        "(the code re-creates every α at 0.8 each task: alpha_init constant); the new adapter's unnormalised "
        "term keeps PEFT's scale s = lora_alpha/r (the code: none); suite budget, AdamW and lr_lora instead of "
        "the code's SGD; no classifier head; not the RR/KD variants."
    )
    knobs = SDLoRAKnobs
    section = "sdlora"

    def __init__(self, cfg, **kw):
        super().__init__(cfg, **kw)
        self.directions: list[dict[str, torch.Tensor]] = []  # per finished task: module -> B_i as its stage left it
        self.magnitudes: list[dict[str, torch.Tensor]] = []  # per finished task: module -> α_i (shape (1,))
        self.parts: dict[str, dict[str, Magnitude]] = {}  # during a stage: adapter -> module -> its parametrization

    # --- a stage ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def begin_stage(self, ctx) -> None:
        super().begin_stage(ctx)  # adapter task<t> added; only its A and B require grad
        k = self.cfg.sdlora
        constant = k.alpha_value if k.alpha_init == "constant" else None
        earlier = self.adapters.adapters[:-1]
        if len(earlier) != len(self.directions):
            raise HarnessError(
                f"SD-LoRA: stage {ctx.stage} found {len(self.directions)} frozen direction(s) "
                f"for {len(earlier)} earlier adapter(s); the stage folders were written by another "
                "config."
            )
        self.parts = {}
        for name, B, alpha in zip(earlier, self.directions, self.magnitudes):
            self.parts[name] = self._attach(name, B, alpha if constant is None else constant)
        self.parts[self.adapter] = self._attach(self.adapter, None, 1.0 if constant is None else constant)

    def _attach(
        self, adapter: str, directions: dict[str, torch.Tensor] | None, alpha: dict[str, torch.Tensor] | float
    ) -> dict[str, Magnitude]:
        """Parametrize the adapter's lora_B in every module: a frozen direction (B given) or the new adapter."""
        parts = {}
        for n, layer in self.adapters.layers():
            lin = layer.lora_B[adapter]
            factor = 1.0
            if directions is not None:
                lin.weight.copy_(directions[n])  # the direction's own B (the weight held the folded B')
                norm = update_norm(layer.lora_A[adapter].weight, directions[n])
                factor = fold_factor(layer.scaling[adapter], norm)
            part = Magnitude(alpha[n] if isinstance(alpha, dict) else alpha, factor, lin.weight)  # alpha trains
            # unsafe=True: skip the registration's trial forward; shape and dtype hold by construction.
            parametrize.register_parametrization(lin, "weight", part, unsafe=True)
            parts[n] = part
        return parts

    @torch.no_grad()
    def end_stage(self) -> dict[str, float]:
        """Freeze the new adapter's direction (α_t := α_t·s·‖B_tA_t‖_F), fold every α into its lora_B, detach."""
        B_new, alpha_new = {}, {}
        for n, layer in self.adapters.layers():
            part = self.parts[self.adapter][n]
            B = layer.lora_B[self.adapter].parametrizations.weight.original.detach().clone()  # before the fold
            s, norm = layer.scaling[self.adapter], update_norm(layer.lora_A[self.adapter].weight, B)
            part.alpha.fill_(float(part.alpha) * s * norm)
            part.factor.fill_(fold_factor(s, norm))
            B_new[n], alpha_new[n] = B.cpu(), part.alpha.detach().cpu().clone()
        for i, name in enumerate(self.adapters.adapters[:-1]):
            self.magnitudes[i] = {n: part.alpha.detach().cpu().clone() for n, part in self.parts[name].items()}
        self.directions.append(B_new)
        self.magnitudes.append(alpha_new)
        self._commit()
        return {
            f"sdlora/alpha_mean/task{i}": float(torch.cat(list(m.values())).mean())
            for i, m in enumerate(self.magnitudes, start=1)
        }

    def _commit(self) -> None:
        """Each lora_B a plain frozen weight again, holding the folded B' = B·α·c."""
        for name in self.parts:
            for _, layer in self.adapters.layers():
                lin = layer.lora_B[name]
                if parametrize.is_parametrized(lin, "weight"):
                    parametrize.remove_parametrizations(lin, "weight", leave_parametrized=True)
                lin.weight.requires_grad_(False)
        self.parts = {}

    # --- the stage folder -------------------------------------------------------------------------------------
    def save_stage(self, folder: Path) -> None:
        super().save_stage(folder)  # PEFT files of the folded adapters
        tensors = {f"B/{i}/{n}": B.contiguous() for i, d in enumerate(self.directions, 1) for n, B in d.items()}
        tensors.update({f"alpha/{i}/{n}": a for i, d in enumerate(self.magnitudes, 1) for n, a in d.items()})
        save_file(tensors, str(folder / FILE))

    def restore_stage(self, t: int, folder: Path) -> None:
        path = folder / FILE
        if not path.exists():
            raise HarnessError(
                f"{path}: SD-LoRA's directions and magnitudes are missing; the stage folder is "
                "incomplete. Delete it to redo the stage."
            )
        sd = load_file(str(path))
        self.directions = [_task(sd, "B", i) for i in range(1, t + 1)]
        self.magnitudes = [_task(sd, "alpha", i) for i in range(1, t + 1)]

    def param_counts(self) -> dict[str, int]:
        counts = super().param_counts()  # the new adapter's A and B; plus one α per adapter and module
        counts["trainable_params_effective"] += len(self.adapters.adapters) * len(self.adapters.linear_shapes())
        return counts

    def held_tensors(self) -> list[torch.Tensor]:
        return [v for d in self.directions + self.magnitudes for v in d.values()]


def _task(sd: dict[str, torch.Tensor], kind: str, i: int) -> dict[str, torch.Tensor]:
    prefix = f"{kind}/{i}/"
    found = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    if not found:
        raise HarnessError(f"{FILE}: no {kind} of task {i}; the stage folder was written by another config.")
    return found
