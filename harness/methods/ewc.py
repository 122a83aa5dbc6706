"""EWC: SeqLoRA plus λ/2 Σ_{i<t} Σ_θ F_i (θ − θ*_i)², one quadratic anchor per earlier task.

After each stage the diagonal (empirical) Fisher F_i of the adapter's parameters is estimated on a seeded
sample of that task's training examples (per-example gradients, computed in batches), and stored with θ*_i (the weights at the
stage's end) in the stage folder (ewc.safetensors, every task so far), so a resume restores them bit for bit.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

from harness.errors import HarnessError
from harness.losses import lm_loss
from harness.methods.base import register
from harness.methods.lora import SeqLoRA
from harness.seeding import stable_seed

FILE = "ewc.safetensors"


class EWCKnobs(BaseModel):
    """EWC's penalty weight and the size of the Fisher estimate."""

    model_config = ConfigDict(
        extra="forbid", populate_by_name=True, serialize_by_alias=True
    )  # `lambda` is a Python keyword
    lambda_: float = Field(
        1000.0,
        ge=0,
        alias="lambda",
        description="λ in λ/2 Σ_i Σ F_i (θ − θ*_i)² (a suite may set its tuned value: method_knobs, make tune-baselines).",
    )
    fisher_samples: int = Field(
        64,
        ge=1,
        description="Training examples (seeded sample; each one's own gradient, computed in batches) per Fisher estimate.",
    )


def ewc_penalty(
    params: dict[str, torch.Tensor],
    fishers: list[dict[str, torch.Tensor]],
    anchors: list[dict[str, torch.Tensor]],
    lam: float,
) -> torch.Tensor:
    """λ/2 Σ_i Σ_k F_i[k] · (θ[k] − θ*_i[k])² over earlier tasks i and parameter keys k."""
    total = None
    for F, star in zip(fishers, anchors):
        for k, p in params.items():
            term = (F[k] * (p - star[k]) ** 2).sum()
            total = term if total is None else total + term
    return 0.5 * lam * total if total is not None else torch.zeros(())


FISHER_BATCH = 8  # examples per backward of the Fisher estimate (the result does not depend on it)


def empirical_fisher(model, params: dict[str, torch.nn.Parameter], batches) -> dict[str, torch.Tensor]:
    """Mean over examples of the squared gradient of each example's own loss (its token-mean cross-entropy).

    Batched: one backward per batch of the sum of the examples' losses, and each example's gradient of a bias-free
    linear layer's weight W taken from that layer's input x and output gradient g as Σ_t g[b, t]ᵀ x[b, t]
    (per_example_grads; Opacus computes them the same way). Padding is on the right, so an example's logits do not
    depend on its batch. The adapter's parameters are such weights (PEFT's lora_A and lora_B); anything else falls
    back to one example per backward."""
    fisher = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
    modules = _linear_modules(model, params)
    n = 0
    was_training = model.training
    model.train()
    with per_example_grads(modules, fisher) if modules else _nothing():
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = lm_loss(logits, batch["labels"], "example", scale=1.0)  # Σ_b (example b's token mean)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            if not modules:  # one example per batch: its gradient is the batch's
                for k, g in zip(params, grads):
                    if g is not None:
                        fisher[k] += g.detach().float() ** 2
            n += batch["input_ids"].shape[0]
    model.train(was_training)
    return {k: (f / max(n, 1)).contiguous() for k, f in fisher.items()}


def _linear_modules(model, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.nn.Linear] | None:
    """key -> the bias-free nn.Linear whose weight is params[key]; None unless every parameter is one."""
    by_id = {id(p): k for k, p in params.items()}
    found = {
        by_id[id(m.weight)]: m
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and m.bias is None and id(m.weight) in by_id
    }
    return found if len(found) == len(params) else None


@contextlib.contextmanager
def per_example_grads(modules: dict[str, torch.nn.Linear], fisher: dict[str, torch.Tensor]):
    """While open, every backward through the modules adds Σ_b (per-example gradient of W)² to fisher[key]."""

    def forward_hook(key):
        def hook(module, inputs, output):
            x = inputs[0].detach()

            def on_grad(g):
                per_example = torch.einsum("bto,bti->boi", g.float(), x.float())
                fisher[key] += (per_example**2).sum(dim=0)

            if output.requires_grad:
                output.register_hook(on_grad)

        return hook

    handles = [m.register_forward_hook(forward_hook(k)) for k, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _nothing():
    yield


@register
class EWC(SeqLoRA):
    name = "ewc"
    display = "EWC"
    summary = "EWC: SeqLoRA + λ/2 Σ_{i<t} F_i (θ − θ*_i)² over the adapter, F_i its diagonal Fisher after task i."
    source = (
        "Kirkpatrick et al., PNAS 2017 (EWC), eq. 3 with one penalty per earlier task (not online EWC's running sum, "
        "Schwarz et al. 2018). Deviations: the empirical Fisher (squared gradient of the training loss at the gold "
        "completion, each example's own gradient, computed in batches) on ewc.fisher_samples seeded training examples, "
        "after every stage but the last (nothing reads that one), not the expected "
        "Fisher under the model's own samples; θ is the LoRA adapter only (A and B), the base model is frozen."
    )
    knobs = EWCKnobs
    section = "ewc"
    strength = "ewc.lambda"
    independent_adapters = False

    def __init__(self, cfg, **kw):
        super().__init__(cfg, **kw)
        self.fishers: list[dict[str, torch.Tensor]] = []
        self.anchors: list[dict[str, torch.Tensor]] = []

    def begin_stage(self, ctx) -> None:
        super().begin_stage(ctx)
        self.ctx = ctx
        self._params = self.trainable()
        if self.fishers and set(self.fishers[0]) != set(self._params):
            raise HarnessError(
                f"EWC: the stored Fisher's parameters {sorted(self.fishers[0])[:2]}... are not this adapter's "
                f"{sorted(self._params)[:2]}...; the stage folders were written with another config."
            )

    def extra_loss(self) -> torch.Tensor | None:
        lam = self.cfg.ewc.lambda_
        return ewc_penalty(self._params, self.fishers, self.anchors, lam) if lam > 0 and self.fishers else None

    def end_stage(self) -> dict[str, float]:
        if self.ctx.stage == len(self.tasks):
            return {}  # the last stage: no later stage reads its Fisher or anchor
        if self.ctx.batches is None:
            raise HarnessError("EWC needs the stage's training data (StageContext.batches) to estimate the Fisher.")
        n = self.ctx.n_examples
        k = min(n, self.cfg.ewc.fisher_samples)
        idx = random.Random(stable_seed(self.seed, "ewc", self.ctx.stage)).sample(range(n), k)
        batch = FISHER_BATCH if _linear_modules(self.model, self._params) else 1
        self.fishers.append(empirical_fisher(self.model, self._params, self.ctx.batches(idx, batch)))
        self.anchors.append({key: p.detach().clone().contiguous() for key, p in self._params.items()})
        F = self.fishers[-1]
        return {
            "ewc/fisher_mean": float(sum(f.sum() for f in F.values()) / sum(f.numel() for f in F.values())),
            "ewc/fisher_samples": k,
        }

    def save_stage(self, folder: Path) -> None:
        super().save_stage(folder)
        tensors = {f"fisher/{i}/{k}": v for i, F in enumerate(self.fishers, start=1) for k, v in F.items()}
        tensors.update({f"anchor/{i}/{k}": v for i, A in enumerate(self.anchors, start=1) for k, v in A.items()})
        save_file(tensors, str(folder / FILE))

    def restore_stage(self, t: int, folder: Path) -> None:
        path = folder / FILE
        if not path.exists():
            raise HarnessError(
                f"{path}: EWC's Fisher and anchors are missing; the stage folder is incomplete. Delete it to redo the stage."
            )
        sd = load_file(str(path))
        self.fishers = [_task(sd, "fisher", i) for i in range(1, t + 1)]
        self.anchors = [_task(sd, "anchor", i) for i in range(1, t + 1)]

    def held_tensors(self) -> list[torch.Tensor]:
        return [v for d in self.fishers + self.anchors for v in d.values()]


def _task(sd: dict[str, torch.Tensor], kind: str, i: int) -> dict[str, torch.Tensor]:
    prefix = f"{kind}/{i}/"
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
