"""InfLoRA: a designed, frozen A_t outside the subspace earlier tasks' inputs span; only B_t trains.

Before stage t, the inputs of every adapted module on task t's training data give C_t = mean x xᵀ; A_t is
the top-r left singular vectors of (I − U Uᵀ) C_t, divided by √3 (the code's scale, the same row norm as
PEFT's random A), where U is the module's kept basis of earlier tasks' inputs. After stage t (except the
last), C_t is measured again with the trained model and U grows by the directions of C_t outside it until
a fraction threshold_t of C_t's energy is covered (DualGPM, Eq. 8-9). The designed A's and the bases go
into the stage folder (inflora.safetensors); A_t also into mid-stage checkpoints, so resume is exact.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file, save_file
from scipy import linalg as scipy_linalg
from threadpoolctl import threadpool_limits

from harness.errors import HarnessError
from harness.methods.base import register
from harness.methods.inclora import IncLoRA

FILE = "inflora.safetensors"
# Examples per forward of the covariance passes: no gradients, so only one layer's activations live at a time (a
# training step of 8 keeps every layer's). ~15% faster than 8 on a CPU; the sums differ from batch 8's by float
# rounding (~5e-7 relative on SmolLM2).
COV_BATCH = 32


class InfLoRAKnobs(BaseModel):
    """Energy thresholds of the kept input subspace (the code's lamb and lame)."""

    model_config = ConfigDict(extra="forbid")
    threshold: float = Field(
        0.95,
        gt=0,
        le=1,
        description="Fraction of a task's input energy its kept subspace covers after "
        "the first task (the code's lamb; 0.95 CIFAR-100, 0.98 ImageNet-R).",
    )
    threshold_end: float = Field(
        1.0,
        gt=0,
        le=1,
        description="The threshold grows linearly toward this over the sequence: "
        "threshold + (threshold_end − threshold)·(t−1)/T after stage t (the code's lame).",
    )

    @model_validator(mode="after")
    def _ordered(self) -> "InfLoRAKnobs":
        if self.threshold_end < self.threshold:
            raise ValueError(
                f"threshold_end {self.threshold_end} is below threshold {self.threshold}; it may only grow"
            )
        return self


def eigh_desc(S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and eigenvectors (columns) of a symmetric S, largest first."""
    evals, evecs = torch.linalg.eigh(S)
    return evals.flip(0), evecs.flip(1)


def left_singular(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors (columns) and singular values of M, largest first (float64, via eigh of M Mᵀ)."""
    M = M.double()
    evals, evecs = eigh_desc(M @ M.T)
    return evecs, evals.clamp(min=0).sqrt()


def project_out(C: torch.Tensor, U: torch.Tensor | None) -> torch.Tensor:
    """(I − U Uᵀ) C: C with the kept subspace removed (C itself when nothing is kept)."""
    C = C.double()
    return C if U is None else C - U @ (U.T @ C)


def top_eigvecs(S: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k eigenvectors of a symmetric S (columns, largest eigenvalue first, float64): only those k are solved
    for (LAPACK's syevr through scipy on the CPU, where d_in is 1536-11008 and r is 8-32; a full eigh elsewhere)."""
    S = S.double()
    d = S.shape[0]
    if S.device.type != "cpu" or k >= d:
        return eigh_desc(S)[1][:, :k]
    # scipy's LAPACK runs on its own OpenBLAS threads (one per CPU, whatever torch was given): held to torch's count,
    # so the bits depend only on the threads stage.json records. Two OpenBLAS threads in a --jobs process gave other
    # bits than one under taskset, and at threshold 0.999 another kept basis two stages later.
    with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
        _, vecs = scipy_linalg.eigh(S.numpy(), subset_by_index=[d - k, d - 1], driver="evr")
    return torch.from_numpy(vecs[:, ::-1].copy())


def top_left_singular(M: torch.Tensor, rank: int) -> torch.Tensor:
    """The top-`rank` left singular vectors of M (columns, largest first): the top eigenvectors of M Mᵀ."""
    M = M.double()
    return top_eigvecs(M @ M.T, rank)


def design_A(C: torch.Tensor, U: torch.Tensor | None, rank: int) -> torch.Tensor:
    """A_t (r x d_in, float32): top-r left singular vectors of (I − U Uᵀ) C, transposed, over √3 (InfLoRA code).
    With nothing kept, those of the symmetric C itself: its top eigenvectors, without forming C Cᵀ."""
    vecs = top_eigvecs(C, rank) if U is None else top_left_singular(project_out(C, U), rank)
    return (vecs.T / math.sqrt(3)).float().contiguous()


def per_input(names: list[str], covs: dict[str, torch.Tensor], bases: dict[str, torch.Tensor], fn) -> dict:
    """fn(C, U) once per distinct input (modules fed the same tensor share C, and so U), given to each module: q/k/v
    and gate/up of a layer share one decomposition (120 instead of 210 per stage on SmolLM2)."""
    done: dict[int, tuple[torch.Tensor | None, object]] = {}
    out = {}
    for n in names:
        C, U = covs[n], bases.get(n)
        hit = done.get(id(C))
        if hit is not None and (
            (hit[0] is None and U is None)
            or (hit[0] is not None and U is not None and (hit[0] is U or torch.equal(hit[0], U)))
        ):
            out[n] = hit[
                1
            ].clone()  # its own tensor: the stage files store each module's (safetensors refuses shared ones)
            continue
        out[n] = fn(C, U)
        done[id(C)] = (U, out[n])
    return out


def grow_basis(C: torch.Tensor, U: torch.Tensor | None, threshold: float) -> torch.Tensor:
    """The kept basis after a task with input covariance C: DualGPM's update (InfLoRA code, update_DualGPM 'remove')."""
    if U is None:  # C is symmetric positive semi-definite: its singular values and vectors are its eigenpairs
        evals, vecs = eigh_desc(C.double())
        s = evals.clamp(min=0)
        ratio = s**2 / (s**2).sum()
        r = int((torch.cumsum(ratio, 0) < threshold).sum())
        return vecs[:, : max(r, 1)].contiguous()
    total = (C.double() ** 2).sum()
    hat = project_out(C, U)
    vecs, s = left_singular(hat)
    covered = float((total - (hat**2).sum()) / total)
    r = 0
    for share in (s**2 / total).tolist():
        if covered >= threshold:
            break
        covered += share
        r += 1
    return torch.cat([U, vecs[:, :r]], dim=1)[:, : C.shape[0]].contiguous()


def decoder_body(model, layers: list[torch.nn.Module]) -> torch.nn.Module:
    """The model without its LM head (transformers' get_decoder()) when every adapted layer is inside it, else the
    model: the covariance needs the layers' inputs, not the logits (a vocab-wide product per position: ~20% of
    SmolLM2's forward, and batch x length x vocab floats of memory at 7B)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = base.get_decoder() if hasattr(base, "get_decoder") else None
    if body is None or body is base:
        return model
    inside = {id(m) for m in body.modules()}
    return body if all(id(m) in inside for m in layers) else model


class InputCovariance:
    """mean x xᵀ of every adapted module's input over the non-padded positions of some batches.

    Modules fed the same tensor (q/k/v, gate/up) share one covariance: `leader` maps each to the first."""

    def __init__(self, layers: list[tuple[str, torch.nn.Module]]):
        self.layers = layers
        self.sums: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self.leader: dict[str, str] = {}
        self._mask: torch.Tensor | None = None
        self._last: tuple[torch.Tensor, str] | None = None

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            if self._last is not None and self._last[0] is x:
                self.leader.setdefault(name, self._last[1])
                return
            self.leader.setdefault(name, name)
            masked = self._mask is not None and self._mask.shape == x.shape[:-1]
            xs = (x.detach()[self._mask] if masked else x.detach().reshape(-1, x.shape[-1])).float()
            if name in self.sums:  # in place: no d x d temporary per batch (2x faster at d 1536 on a CPU core)
                self.sums[name].addmm_(xs.T, xs)
            else:
                self.sums[name] = xs.T @ xs
            self.count[name] = self.count.get(name, 0) + xs.shape[0]
            self._last = (x, name)

        return hook

    @torch.no_grad()
    def collect(self, model, batches) -> dict[str, torch.Tensor]:
        """Run the batches through the model (no grad); returns each module's covariance (float64)."""
        handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.layers]
        was_training = model.training
        model.eval()
        body = decoder_body(model, [m for _, m in self.layers])
        try:
            for batch in batches:
                self._mask, self._last = batch["attention_mask"].bool(), None
                body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
            self._mask = self._last = None
        covs = {n: (s.double() / max(self.count[n], 1)) for n, s in self.sums.items()}
        return {n: covs[self.leader[n]] for n, _ in self.layers}


@register
class InfLoRA(IncLoRA):
    name = "inflora"
    display = "InfLoRA"
    summary = "InfLoRA: per-task adapters; A_t designed from the task's inputs outside earlier tasks' input subspace, frozen; only B_t trains."
    source = (
        "Liang & Li, CVPR 2024 (InfLoRA); code liangyanshuo/InfLoRA methods/inflora.py:122-157 (A_t = top-r left singular "
        "vectors of the projected input covariance / √3) and :321-413 (update_DualGPM, threshold (lame − lamb)·t/T + lamb). "
        "Deviations from the ViT setting: every target module of a decoder LLM (the paper: k and v of ViT attention) on the "
        "non-padded token positions of the task's training examples (the paper: all image tokens); the kept basis is always "
        "stored as U ('remove'), never as its complement ('retain', the same projection); no update after the last task "
        "(nothing uses it); suite budget and lr_lora, not the paper's 20 epochs of Adam at 5e-4; no classifier head."
    )
    knobs = InfLoRAKnobs
    section = "inflora"
    strength = "inflora.threshold"
    train_A = False

    def __init__(self, cfg, **kw):
        super().__init__(cfg, **kw)
        self.bases: dict[str, torch.Tensor] = {}  # module -> kept basis of earlier tasks' inputs (d_in x k, float64)
        self.designed: dict[str, torch.Tensor] = {}
        self.threshold_used: float | None = None

    def _covariances(self, ctx) -> dict[str, torch.Tensor]:
        if ctx.batches is None:
            raise HarnessError("InfLoRA needs the stage's training data (StageContext.batches) to measure its inputs.")
        return InputCovariance(list(self.adapters.layers())).collect(self.model, ctx.batches(None, COV_BATCH))

    @torch.no_grad()
    def begin_stage(self, ctx) -> None:
        super().begin_stage(ctx)
        self.ctx, self.threshold_used = ctx, None
        resumed = {k[2:]: v for k, v in (ctx.resumed_extra or {}).items() if k.startswith("A/")}
        if resumed:
            self.designed = resumed
        else:
            covs = self._covariances(ctx)
            names = [n for n, _ in self.adapters.layers()]
            self.designed = per_input(names, covs, self.bases, lambda C, U: design_A(C, U, self.cfg.rank))
        for n, layer in self.adapters.layers():
            layer.lora_A[self.adapter].weight.copy_(self.designed[n])

    def checkpoint_extra(self) -> dict[str, torch.Tensor]:
        return {f"A/{n}": a for n, a in self.designed.items()}

    def end_stage(self) -> dict[str, float]:
        t, T = self.ctx.stage, len(self.tasks)
        if t < T:
            k = self.cfg.inflora
            self.threshold_used = k.threshold + (k.threshold_end - k.threshold) * (t - 1) / T
            covs = self._covariances(self.ctx)
            names = [n for n, _ in self.adapters.layers()]
            self.bases = per_input(names, covs, self.bases, lambda C, U: grow_basis(C, U, self.threshold_used))
        if not self.bases:
            return {}
        kept = sum(U.shape[1] for U in self.bases.values()) / sum(U.shape[0] for U in self.bases.values())
        families: dict[str, list[torch.Tensor]] = {}
        for n, U in self.bases.items():  # q_proj, down_proj, ...: how much of each kind of input is protected
            families.setdefault(n.rsplit(".", 1)[-1], []).append(U)
        per_family = {
            f"inflora/kept_dims_frac/{f}": sum(U.shape[1] for U in us) / sum(U.shape[0] for U in us)
            for f, us in sorted(families.items())
        }
        return {
            "inflora/kept_dims_frac": kept,
            **per_family,
            **({"inflora/threshold": self.threshold_used} if self.threshold_used else {}),
        }

    def save_stage(self, folder: Path) -> None:
        super().save_stage(folder)
        tensors = {f"basis/{n}": U for n, U in self.bases.items()}
        tensors.update({f"A/{n}": a for n, a in self.designed.items()})
        save_file(tensors, str(folder / FILE))

    def restore_stage(self, t: int, folder: Path) -> None:
        path = folder / FILE
        if not path.exists():
            raise HarnessError(
                f"{path}: InfLoRA's kept input bases are missing; the stage folder is incomplete. Delete it to redo the stage."
            )
        sd = load_file(str(path))
        self.bases = {k[len("basis/") :]: v for k, v in sd.items() if k.startswith("basis/")}

    def held_tensors(self) -> list[torch.Tensor]:
        return list(self.bases.values()) + list(self.designed.values())
