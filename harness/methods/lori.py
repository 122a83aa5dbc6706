"""LoRI-D and LoRI-S: frozen random A, B dense (D) or trained only under a per-task mask (S).

LoRI-S chooses task t's mask M_t among the positions the overlap policy leaves (disjoint,
max_overlap, independent), from seeded random scores or from |B| after a LoRI-D calibration run
(whose B is then thrown away, as in the reference pipeline), and keeps it exact with MaskEnforcer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from harness.adapters import masks as M
from harness.methods.base import Method, StageContext
from harness.seeding import stable_seed


class LoRID(Method):
    name = "lori-d"
    display = "LoRI-D"
    summary = "LoRI-D: frozen random A, dense trained B (half of LoRA's parameters)."
    source = "Zhang et al. 2025 (LoRI), W = W0 + s·B·A with A frozen random."
    lr_method = "lori-d"
    independent_adapters = True
    a_mode_from_config = True
    train_A = False

    @classmethod
    def params(cls, cfg) -> dict:
        return {"a_init": cfg.a_init, "a_mode": cfg.a_mode}

    def diagnostics(self) -> dict:
        """A-subspace overlap ||A_i A_j^T||_F / (||A_i|| ||A_j||) between the tasks' projections."""
        a = self.adapters
        As = [a.a_tensors(n) for n in a.adapters] if a.a_mode == "per_task" else [a.a_tensors(a.adapters[0])] * len(self.tasks)
        return {"subspace_overlap": {"tasks": self.tasks, "matrix": M.subspace_overlap_matrix(As)["matrix"]}}


class LoRIS(LoRID):
    name = "lori-s"
    display = "LoRI-S"
    summary = "LoRI-S: frozen random A, B trained only under a sparse per-task mask (~5% of LoRA's parameters)."
    source = "Zhang et al. 2025 (LoRI), W = W0 + s·(B ⊙ M)·A; masks across tasks: this project (disjoint / max_overlap)."
    lr_method = "lori-s"

    def __init__(self, cfg, **kw):
        super().__init__(cfg, **kw)
        self.task_masks: list[M.Masks] = []
        self.stage_masks: M.Masks | None = None
        self.enforcer: M.MaskEnforcer | None = None
        self.stats: dict[str, float] = {}

    @classmethod
    def params(cls, cfg) -> dict:
        return {**super().params(cfg), "mask_strategy": cfg.mask_strategy, "mask_density": cfg.mask_density,
                "mask_scope": cfg.mask_scope, "overlap_policy": cfg.overlap_policy, "max_overlap": cfg.max_overlap}

    @classmethod
    def preflight(cls, cfg, shapes, n_tasks) -> None:
        M.check_capacity(shapes, n_tasks, density=cfg.mask_density, policy=cfg.overlap_policy, max_overlap=cfg.max_overlap,
                         scope="module" if cfg.mask_strategy == "random" else cfg.mask_scope)

    def restore_stage(self, t: int, folder: Path) -> None:
        masks = M.load_masks(folder)
        if masks is None:
            raise FileNotFoundError(f"{folder}/masks.safetensors missing: delete the stage folder to redo the stage")
        self.task_masks.append(masks)

    def begin_stage(self, ctx: StageContext) -> None:
        super().begin_stage(ctx)
        b_params = self.adapters.b_params(self.adapter)
        used = M.union(self.task_masks) if self.task_masks else None
        if ctx.resumed_extra:
            masks = {k[len("mask/"):]: v.bool() for k, v in ctx.resumed_extra.items() if k.startswith("mask/")}
        else:
            masks = self._choose_masks(ctx, b_params, used)
        nnz = M.mask_nnz(masks)
        self.stats = {"mask/nnz": nnz, "mask/density": nnz / sum(m.numel() for m in masks.values())}
        if used is not None:
            self.stats["mask/overlap_with_earlier"] = sum(int((masks[k] & used[k]).sum()) for k in masks) / nnz
        self.stage_masks = masks
        self.enforcer = M.MaskEnforcer(b_params, masks)

    def _choose_masks(self, ctx: StageContext, b_params, used) -> M.Masks:
        shapes = {k: tuple(p.shape) for k, p in b_params.items()}
        if self.cfg.mask_strategy == "random":
            scores, scope = M.random_scores(shapes, stable_seed(self.seed, "task", ctx.stage)), "module"
        else:
            start = {k: p.detach().clone() for k, p in b_params.items()}
            ctx.calibrate(self.cfg.calibration_steps, "lori-d")  # a LoRI-D run, at LoRI-D's learning rate
            with torch.no_grad():
                scores = {k: (p.detach() - start[k]).abs().float().cpu() for k, p in b_params.items()}
                for k, p in b_params.items():
                    p.copy_(start[k])  # throw the calibration B away: retrain from the start under the mask
            scope = self.cfg.mask_scope
        return M.allocate(scores, used, density=self.cfg.mask_density, policy=self.cfg.overlap_policy,
                          max_overlap=self.cfg.max_overlap, scope=scope)

    def held_tensors(self) -> list[torch.Tensor]:
        enf = self.enforcer
        return [*enf.snapshot.values(), *enf.masks.values()] if enf is not None else []

    def checkpoint_extra(self) -> dict[str, torch.Tensor]:
        return {f"mask/{k}": v.to(torch.uint8) for k, v in (self.stage_masks or {}).items()}

    def after_backward(self) -> None:
        self.enforcer.after_backward()

    def after_step(self) -> None:
        self.enforcer.after_step()

    def end_stage(self) -> dict[str, float]:
        self.task_masks.append(self.stage_masks)
        self.enforcer = None
        return self.stats

    def save_stage(self, folder: Path) -> None:
        super().save_stage(folder)
        M.save_masks(folder, self.stage_masks)

    def param_counts(self) -> dict[str, int]:
        counts = super().param_counts()
        counts["trainable_params_effective"] = max((M.mask_nnz(m) for m in self.task_masks), default=0)
        return counts

    def diagnostics(self) -> dict:
        out = super().diagnostics()
        out["mask_overlap"] = {"tasks": self.tasks[: len(self.task_masks)], "matrix": M.mask_overlap_matrix(self.task_masks)}
        return out
