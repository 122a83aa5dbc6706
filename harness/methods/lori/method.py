"""LoRI-D and LoRI-S: frozen random A, B dense (D) or trained only under a per-task mask (S).

LoRI-S chooses task t's mask M_t among the positions the overlap policy leaves (disjoint,
max_overlap, independent), from seeded random scores or from |B| after a LoRI-D calibration run
(whose B is then thrown away, as in the reference pipeline), and trains only the mask's entries
(harness/methods/lori/sparse.py: per module a values vector scattered into the frozen B, so gradients,
AdamW moments and the stage files are O(nnz) and the mask is exact by construction). A stage folder
holds the stage's mask and values (harness/methods/lori/stage_files.py), never a dense B.
"""

from __future__ import annotations

from pathlib import Path

import torch

from harness.adapters.keys import a_key
from harness.errors import HarnessError
from harness.methods.base import Method, StageContext, register
from harness.methods.lori import masks as M
from harness.methods.lori import stage_files as SF
from harness.methods.lori.knobs import SECTION, LoRIKnobs
from harness.methods.lori.sparse import SparseStage, index_to_mask, mask_index
from harness.seeding import stable_seed, tensors_digest


@register
class LoRID(Method):
    name = "lori-d"
    display = "LoRI-D"
    summary = "LoRI-D: frozen random A, dense trained B (half of LoRA's parameters)."
    source = "Zhang et al. 2025 (LoRI), W = W0 + s·B·A with A frozen random."
    lr_method = "lori-d"
    lr_default = 1e-3
    independent_adapters = True
    a_mode_from_config = True
    train_A = False
    knobs = LoRIKnobs  # shared with lori-s: the config section `lori`
    section = SECTION
    flat_knobs = True  # mask_density, a_mode, ... were top-level keys until 2026-12

    @classmethod
    def params(cls, cfg) -> dict:
        return {"a_init": cfg.a_init, "a_mode": cfg.lori.a_mode}

    def diagnostics(self) -> dict:
        """A-subspace overlap ||A_i A_j^T||_F / (||A_i|| ||A_j||) between the tasks' projections."""
        a = self.adapters
        As = (
            [a.a_tensors(n) for n in a.adapters]
            if a.a_mode == "per_task"
            else [a.a_tensors(a.adapters[0])] * len(self.tasks)
        )
        return {"subspace_overlap": {"tasks": self.tasks, "matrix": M.subspace_overlap_matrix(As)["matrix"]}}


@register
class LoRIS(LoRID):
    name = "lori-s"
    display = "LoRI-S"
    summary = "LoRI-S: frozen random A, B trained only under a sparse per-task mask (~5% of LoRA's parameters)."
    source = (
        "Zhang et al. 2025 (LoRI), W = W0 + s·(B ⊙ M)·A; masks across tasks: this project (disjoint / max_overlap)."
    )
    lr_method = "lori-s"
    lr_default = 1e-2  # ~10x lori-d, as the paper

    def __init__(self, cfg, **kw):
        super().__init__(cfg, **kw)
        # Masks as flat positions (int32), O(nnz): M_1..M_t of the committed stages, and the current stage's.
        self.task_masks: list[dict[str, torch.Tensor]] = []
        self.stage_index: dict[str, torch.Tensor] | None = None
        self.stage = 0
        self.b_shapes: dict[str, tuple[int, int]] = {}
        self.sparse: SparseStage | None = None
        self.stats: dict[str, float] = {}

    @classmethod
    def params(cls, cfg) -> dict:
        return {
            **super().params(cfg),
            "mask_strategy": cfg.lori.mask_strategy,
            "mask_density": cfg.lori.mask_density,
            "mask_scope": cfg.lori.mask_scope,
            "overlap_policy": cfg.lori.overlap_policy,
            "max_overlap": cfg.lori.max_overlap,
        }

    @classmethod
    def preflight(cls, cfg, shapes, n_tasks) -> None:
        M.check_capacity(
            shapes,
            n_tasks,
            density=cfg.lori.mask_density,
            policy=cfg.lori.overlap_policy,
            max_overlap=cfg.lori.max_overlap,
            scope="module" if cfg.lori.mask_strategy == "random" else cfg.lori.mask_scope,
        )

    # --- masks as positions --------------------------------------------------------------------
    def _dense(self, index: dict[str, torch.Tensor]) -> M.Masks:
        return {k: index_to_mask(v, self.b_shapes[k]) for k, v in index.items()}

    def _used(self) -> M.Masks | None:
        """Positions used by M_1..M_{t-1} (dense, built for the allocator and dropped)."""
        return M.union([self._dense(m) for m in self.task_masks]) if self.task_masks else None

    # --- resume --------------------------------------------------------------------------------
    def restore(self, done: dict[int, Path]) -> None:
        """Replay the committed stages' files: B.flat[M_t] = values_t for t = 1..last, A regenerated and verified.

        Stages written by an older harness (a dense adapter/ holding all of B, no values) may come first:
        the last of them is loaded whole, and the sparse stages replay on top."""
        stages = sorted(t for t in done if t > 0)
        dense = [t for t in stages if not SF.is_sparse_stage(done[t])]
        if dense != stages[: len(dense)]:
            raise HarnessError(
                f"{done[dense[-1]]}: a LoRI-S stage in the older dense layout after sparse ones; "
                "delete the stage folders from that one on to redo them."
            )
        for t in stages:
            name = self.adapters.begin_task(t)
            if t in dense:
                self.restore_stage(t, done[t])
                if t == dense[-1]:
                    self.adapters.load_weights(done[t])
                continue
            masks, values, meta = SF.read_stage(done[t])
            self._record(masks)
            self._check_A(name, meta, done[t])
            for k, mod in self.adapters.b_modules(name).items():
                SF.apply_values(mod.weight, self.task_masks[-1][k], values[k])  # the positions _record just took

    def restore_stage(self, t: int, folder: Path) -> None:
        """Record committed stage t's mask (the allocator avoids it); the model is not touched."""
        masks = SF.load_masks(folder)
        if masks is None:
            raise HarnessError(f"{folder}/{SF.MASKS} missing: delete the stage folder to redo the stage")
        self._record(masks)

    def _record(self, masks: M.Masks) -> None:
        self.b_shapes.update({k: tuple(v.shape) for k, v in masks.items()})
        self.task_masks.append({k: mask_index(v) for k, v in masks.items()})

    def _check_A(self, name: str, meta: dict, folder: Path) -> None:
        digest = tensors_digest(self._a(name))
        if digest != meta.get("a_sha256"):
            raise HarnessError(
                f"{folder}/{SF.META}: A regenerated from seed {self.seed} does not match the A this stage trained "
                "with (sha256 differs: another torch version, a_init or model?). Re-run with the environment "
                "that wrote it, or delete the stage folders to redo them."
            )

    def _a(self, name: str) -> dict[str, torch.Tensor]:

        return {a_key(k): v for k, v in self.adapters.a_tensors(name).items()}

    # --- the stage -----------------------------------------------------------------------------
    def begin_stage(self, ctx: StageContext) -> None:
        super().begin_stage(ctx)
        self.stage = ctx.stage
        modules = self.adapters.b_modules(self.adapter)
        self.b_shapes = {k: tuple(m.weight.shape) for k, m in modules.items()}
        used = self._used()
        if ctx.resumed_extra:
            index = {
                k[len("mask/") :]: mask_index(v.bool())
                if v.dtype == torch.uint8
                else v.to(torch.int32)  # uint8: older dense masks
                for k, v in ctx.resumed_extra.items()
                if k.startswith("mask/")
            }
            masks = self._dense(index)
        else:
            masks = self._choose_masks(ctx, self.adapters.b_params(self.adapter), used)
            index = {k: mask_index(v) for k, v in masks.items()}
        nnz = M.mask_nnz(masks)
        self.stats = {"mask/nnz": nnz, "mask/density": nnz / sum(m.numel() for m in masks.values())}
        if used is not None:
            self.stats["mask/overlap_with_earlier"] = sum(int((masks[k] & used[k]).sum()) for k in masks) / nnz
        self.stage_index = index
        names = {id(m): n for n, m in self.model.named_modules()} if ctx.compiled else None  # see SparseStage
        self.sparse = SparseStage(modules, index, {k: names[id(m)] for k, m in modules.items()} if names else None)

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return self.sparse.named_values() if self.sparse is not None and self.sparse.functional else super().trainable()

    def weight_overrides(self) -> dict[str, torch.Tensor] | None:
        return self.sparse.overrides() if self.sparse is not None and self.sparse.functional else None

    def _choose_masks(self, ctx: StageContext, b_params, used) -> M.Masks:
        shapes = {k: tuple(p.shape) for k, p in b_params.items()}
        if self.cfg.lori.mask_strategy == "random":
            scores, scope = M.random_scores(shapes, stable_seed(self.seed, "task", ctx.stage)), "module"
        else:
            start = {k: p.detach().clone() for k, p in b_params.items()}
            ctx.calibrate(
                self.cfg.lori.calibration_steps, "lori-d"
            )  # a LoRI-D run (dense B trains), at LoRI-D's learning rate
            with torch.no_grad():
                scores = {k: (p.detach() - start[k]).abs().float().cpu() for k, p in b_params.items()}
                for k, p in b_params.items():
                    p.copy_(start[k])  # throw the calibration B away: retrain from the start under the mask
            scope = self.cfg.lori.mask_scope
        return M.allocate(
            scores,
            used,
            density=self.cfg.lori.mask_density,
            policy=self.cfg.lori.overlap_policy,
            max_overlap=self.cfg.lori.max_overlap,
            scope=scope,
        )

    def held_tensors(self) -> list[torch.Tensor]:
        """The mask positions held (this stage's and the committed stages'); no copy of B, no dense mask."""
        tensors = [
            *(self.sparse.index().values() if self.sparse else []),
            *(self.stage_index or {}).values(),
            *(v for m in self.task_masks for v in m.values()),
        ]
        return list({(t.device, t.data_ptr()): t for t in tensors}.values())

    def checkpoint_extra(self) -> dict[str, torch.Tensor]:
        return {f"mask/{k}": v for k, v in (self.stage_index or {}).items()}

    def end_stage(self) -> dict[str, float]:
        self.sparse.commit()  # B is a plain frozen Parameter again, holding the trained values
        self.sparse = None
        self.task_masks.append(self.stage_index)
        return self.stats

    def save_stage(self, folder: Path) -> None:
        """The stage's mask and values, and how to regenerate and check A; the sequence's B is the replay of its stages."""
        a = self.adapters
        modules = a.b_modules(self.adapter)
        values = {
            k: mod.weight.detach().reshape(-1)[self.stage_index[k].to(mod.weight.device)] for k, mod in modules.items()
        }
        dtype = next(iter(values.values())).dtype
        meta = {
            "adapter": self.adapter,
            "a_mode": a.a_mode,
            "rank": a.rank,
            "alpha": a.alpha,
            "targets": a.targets,
            "a_init": a.a_init,
            "seed": a.seed,
            "a_task": a.a_task(self.stage),
            "dtype": str(dtype).removeprefix("torch."),
            "nnz": int(sum(v.numel() for v in values.values())),
            "a_sha256": tensors_digest(self._a(self.adapter)),
        }
        SF.save_stage(folder, self._dense(self.stage_index), values, meta)

    @classmethod
    def export_reads(cls, stages: list[Path]) -> list[Path]:
        """Stages 1..t: B is rebuilt by replaying their sparse files (an older harness's dense stage: its own folder)."""
        return stages if SF.is_sparse_stage(stages[-1]) else stages[-1:]

    @classmethod
    def export(cls, run_cfg: dict, stages: list[Path], out: Path) -> None:
        """One dense adapter: B replayed from the masks and values of stages 1..t, A regenerated from its seed and
        checked against the sha256 stored with the stage (harness/methods/lori/export.py)."""
        if not SF.is_sparse_stage(stages[-1]):
            return super().export(run_cfg, stages, out)
        from harness.adapters.peft_folder import (
            write_adapters,  # lazy: PEFT loads in ~2 s; config and --help need none of it
        )
        from harness.methods.lori.export import lori_s_adapters, lori_s_config  # lazy: the same

        adapters, meta = lori_s_adapters(run_cfg, stages)
        write_adapters(out, adapters, lori_s_config(meta, run_cfg.get("model")))

    @classmethod
    def checks(cls, run_dir: Path, done: dict[int, Path], cfg: dict) -> list:
        from harness.methods.lori.verify import check_masks  # lazy: PEFT (A's regeneration) loads in ~2 s

        return [check_masks(run_dir, done, cfg)]

    def param_counts(self) -> dict[str, int]:
        counts = super().param_counts()
        counts["trainable_params_effective"] = max(
            (sum(v.numel() for v in m.values()) for m in self.task_masks), default=0
        )
        return counts

    def diagnostics(self) -> dict:
        out = super().diagnostics()
        out["mask_overlap"] = {
            "tasks": self.tasks[: len(self.task_masks)],
            "matrix": M.mask_overlap_matrix([self._dense(m) for m in self.task_masks]),
        }
        return out
