"""OSF: orthogonal subspace fine-tuning through PEFT's own OSF tuner (peft.OSFConfig), continued through the sequence.

At the start of stage t every target weight W (as the earlier stages left it, W0 at stage 1) is split by PEFT's OSF
layer with an SVD: W = U_h S_h V_h + U_l S_l V_l, with the top k_t = int(f_t · min(d_out, d_in)) singular directions
(U_h, V_h) frozen and the rest (U_l, S_l, V_l) trained; the forward adds U_l S_l V_l − (the same at init) to W.
The share frozen, f_t, grows linearly from `freeze_first` (stage 1) to `freeze_last` (last stage), PEFT's continual
example (0.3 / 0.5 / 0.7 for three tasks). At the next stage the update is folded into the weights (PEFT's
merge_and_unload) and the next SVD, of the updated weights, freezes a larger top subspace.

The frozen subspace is kept exactly: PEFT's hooks project the gradients of U_l and V_l off U_h and V_h, but AdamW's
per-coordinate scaling takes a projected gradient back out of that complement, so after every optimizer step U_l and
V_l are projected again (after_step). Then U_hᵀ ΔW = 0 and ΔW V_hᵀ = 0 up to float rounding: the part of each weight
in its frozen subspace does not move.

Stage folders hold osf.safetensors (per target module the stage's trained U_l, S_l, V_l and their SVD initial values)
and osf.json (stage, frozen share). A resume rebuilds the weights stage by stage through PEFT's own layers and merge,
with the stored initial values, so it does not depend on the SVD giving the same bits again. `harness export` writes
one stock LoRA adapter holding W_t − W0 = Σ_i ΔW_i (float64 sum, SVD to rank ≤ min(Σ 2·r_i, d_out, d_in), zero-padded
to one rank, lora_alpha = r so the scale is 1): stock PEFT has no way to put a stage-t OSF adapter, defined on
W_{t−1}, on W0.

Deviations from the paper (Nayak et al. 2025) and its recipe, each deliberate:
- one frozen share per stage for every module (PEFT's effective_rank as a fraction); the paper sets each layer's
  frozen rank from a layer-importance score (input/output cosine similarity of activations) between a minimum and a
  target retention ratio: not implemented;
- the frozen subspace of stage t is the top-k_t subspace of the weights after stage t−1 (a fresh SVD, as PEFT's
  example and the paper do); it contains earlier stages' frozen subspaces only where their singular values stay the
  largest (nothing measures that containment yet);
- PEFT's example calls unload() between tasks, which in peft 0.21.2 throws the trained update away (the OSF layer
  keeps W0 and adds ΔW beside it); here the update is merged (merge_and_unload);
- U_l, V_l re-projected after every AdamW step (above); PEFT only projects gradients;
- the harness's targets (default the 7 linear projections of every block), the suite budget, AdamW at lr_lora (not
  tuned for OSF; PEFT's example uses 5e-6 on an 8B model), factors in the base weights' dtype (adapter_dtype does not
  apply: PEFT's OSF layer makes them so).
Cost: one SVD per target module and stage; (1 − f_t)·min(d)·(d_out + d_in + 1) trainable per module (far more than
LoRA); a copy of the original target weights is held so unload() gives the base model back bit-identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file, save_file

from harness.errors import HarnessError
from harness.methods.base import Method, register
from harness.methods.lori import masks as M

FILE, META = "osf.safetensors", "osf.json"
ADAPTER = "default"  # PEFT's name for the one OSF adapter of a stage
PARTS = (("U", "U_low", "_osf_U_low_init"), ("S", "S_low", "_osf_S_low_init"), ("V", "V_low", "_osf_V_low_init"))


class OSFKnobs(BaseModel):
    """How much of each weight's singular spectrum OSF freezes, stage by stage."""

    model_config = ConfigDict(extra="forbid")
    freeze_first: float = Field(
        0.3,
        gt=0,
        lt=1,
        allow_inf_nan=False,
        description="Share of each target weight's "
        "singular directions (of min(d_out, d_in)) frozen at stage 1 (PEFT's effective_rank "
        "as a fraction; PEFT's continual example: 0.3).",
    )
    freeze_last: float = Field(
        0.7,
        gt=0,
        lt=1,
        allow_inf_nan=False,
        description="Share frozen at the last stage; "
        "stages in between interpolate linearly (PEFT's example: 0.3, 0.5, 0.7 for 3 tasks).",
    )

    @model_validator(mode="after")
    def _grows(self) -> "OSFKnobs":
        if self.freeze_last < self.freeze_first:
            raise ValueError("freeze_last must be >= freeze_first: the frozen subspace grows task by task")
        return self


def frozen_share(knobs: OSFKnobs, stage: int, n_stages: int) -> float:
    """f_t: freeze_first at stage 1, freeze_last at the last stage, linear in between."""
    if n_stages <= 1:
        return knobs.freeze_first
    return knobs.freeze_first + (knobs.freeze_last - knobs.freeze_first) * (stage - 1) / (n_stages - 1)


def off_frozen(layer, adapter: str = ADAPTER) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_l, V_l) projected off the frozen subspace, from what PEFT's OSF layer keeps (U_h / V_h where stored, else
    the complement spanned by the initial U_l / V_l, exact when that factor of the SVD is square)."""
    p = layer.osf_svd_params[adapter]
    U, V = p["U_low"].detach(), p["V_low"].detach()
    if adapter in layer._osf_U_high:
        Uh = layer._osf_U_high[adapter]
        U = U - Uh @ (Uh.T @ U)
    else:
        U0 = layer._osf_U_low_init[adapter]
        U = U0 @ (U0.T @ U)
    if adapter in layer._osf_V_high:
        Vh = layer._osf_V_high[adapter]
        V = V - (V @ Vh.T) @ Vh
    else:
        V0 = layer._osf_V_low_init[adapter]
        V = (V @ V0.T) @ V0
    return U, V


@register
class OSF(Method):
    name = "osf"
    display = "OSF"
    summary = (
        "OSF: per stage, PEFT's OSF tuner freezes each weight's top singular subspace (a share growing "
        "freeze_first → freeze_last) and trains the rest orthogonally to it; updates merged between stages."
    )
    source = (
        "Nayak et al. 2025, 'Sculpting Subspaces: Constrained Full Fine-Tuning in LLMs for Continual Learning' "
        "(arXiv 2504.07097), W = U_h S_h V_h (frozen) + U_l S_l V_l (trained, ⊥); PEFT's OSF tuner "
        "(peft/tuners/osf) and its continual example. Deviations: uniform frozen share per stage (no "
        "layer-importance ranks), update merged between stages, U_l/V_l re-projected after each AdamW step."
    )
    knobs = OSFKnobs
    section = "osf"

    @classmethod
    def export_reads(cls, stages: list[Path]) -> list[Path]:
        """Stages 1..t: the export is the sum of their updates."""
        return stages

    @classmethod
    def export(cls, run_cfg: dict, stages: list[Path], out: Path) -> None:
        export_osf(stages, run_cfg.get("model"), out)

    def __init__(self, cfg, *, seed: int, tasks: list[str], base_model: torch.nn.Module, task_examples=None):
        super().__init__(cfg, seed=seed, tasks=tasks, base_model=base_model, task_examples=task_examples)
        self.adapters = None  # no LoRA adapters: OSF holds PEFT's OSF model itself (self.peft)
        self.base = base_model
        self.peft = None  # the stage's PeftModel (OSF), kept after end_stage for evaluation and saving
        self.w0: dict[str, torch.Tensor] | None = None  # original target weights, to give the base model back
        self.stage, self.share = 0, None

    @property
    def model(self):
        return self.peft

    def layers(self):
        from peft.tuners.osf.layer import OSFLayer  # lazy: PEFT loads in ~2 s; config and --help need none of it

        for n, mod in self.peft.named_modules():
            if isinstance(mod, OSFLayer):
                yield n, mod

    # --- a stage ------------------------------------------------------------------------------------------------
    def _wrap(self, t: int) -> None:
        """Fold the previous stage's update into the weights, then put PEFT's OSF on them at stage t's frozen share."""
        from peft import OSFConfig, get_peft_model  # lazy: as above

        base = self.peft.merge_and_unload() if self.peft is not None else self.base
        if self.w0 is None:
            self.w0 = {
                n: m.weight.detach().clone()
                for n, m in base.named_modules()
                if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in self.cfg.targets
            }
        self.share = frozen_share(self.cfg.osf, t, len(self.stage_plan(self.tasks)))
        try:
            self.peft = get_peft_model(
                base, OSFConfig(target_modules=list(self.cfg.targets), effective_rank=self.share)
            )
        except ValueError as exc:
            raise HarnessError(
                f"OSF at stage {t} (frozen share {self.share:.3f}): {exc}. Raise osf.freeze_first so "
                "every target keeps at least one frozen direction, or set `targets`."
            ) from None
        self.stage = t

    def begin_stage(self, ctx) -> None:
        self._wrap(ctx.stage)
        self.adapter = ADAPTER

    @torch.no_grad()
    def after_step(self) -> None:
        for _, layer in self.layers():
            U, V = off_frozen(layer)
            layer.osf_svd_params[ADAPTER]["U_low"].copy_(U)
            layer.osf_svd_params[ADAPTER]["V_low"].copy_(V)

    @torch.no_grad()
    def end_stage(self) -> dict[str, float]:
        drift = 0.0
        for _, layer in self.layers():
            U, V = off_frozen(layer)
            p = layer.osf_svd_params[ADAPTER]
            drift = max(drift, float((p["U_low"] - U).abs().max()), float((p["V_low"] - V).abs().max()))
        return {"osf/frozen_share": self.share, "osf/frozen_drift": drift}

    # --- the stage folder ---------------------------------------------------------------------------------------
    def save_stage(self, folder: Path) -> None:
        tensors = {}
        for n, layer in self.layers():
            for key, param, init in PARTS:
                tensors[f"{key}/{n}"] = layer.osf_svd_params[ADAPTER][param].detach().cpu().contiguous()
                tensors[f"{key}0/{n}"] = getattr(layer, init)[ADAPTER].detach().cpu().contiguous()
        save_file(tensors, str(folder / FILE))
        (folder / META).write_text(
            json.dumps({"stage": self.stage, "frozen_share": self.share, "targets": list(self.cfg.targets)}, indent=2)
        )

    def restore(self, done: dict[int, Path]) -> None:
        """Stage by stage, as the run did: wrap at the stage's share, load its factors and initial values (merged at
        the next wrap). The last committed stage stays wrapped, as after its end_stage."""
        for t in range(1, max([t for t in done if t > 0], default=0) + 1):
            self._wrap(t)
            self._load(t, done[t])

    @torch.no_grad()
    def _load(self, t: int, folder: Path) -> None:
        path, meta = folder / FILE, folder / META
        if not path.exists() or not meta.exists():
            raise HarnessError(
                f"{folder}: OSF's {FILE} or {META} is missing; the stage folder is incomplete. Delete it "
                "to redo the stage."
            )
        share = json.loads(meta.read_text())["frozen_share"]
        if abs(share - self.share) > 1e-12:
            raise HarnessError(
                f"{meta}: frozen share {share}, this config gives {self.share} at stage {t}; the stage "
                "folders were written by another config (osf.freeze_first / freeze_last, tasks)."
            )
        sd = load_file(str(path))
        for n, layer in self.layers():
            for key, param, init in PARTS:
                for k, dest in (
                    (f"{key}/{n}", layer.osf_svd_params[ADAPTER][param]),
                    (f"{key}0/{n}", getattr(layer, init)[ADAPTER]),
                ):
                    if k not in sd or sd[k].shape != dest.shape:
                        raise HarnessError(
                            f"{path}: {k} missing or of another shape; written with another model, "
                            "targets or frozen share?"
                        )
                    dest.copy_(sd[k])

    def unload(self) -> torch.nn.Module:
        """The base model with its original weights (bit-identical), OSF layers removed, nothing merged."""
        base = self.peft.unload() if self.peft is not None else self.base
        for n, m in base.named_modules():
            if self.w0 is not None and n in self.w0:
                m.weight.data = self.w0[n]
        self.peft, self.w0 = None, None
        return base

    # --- counts and diagnostics ---------------------------------------------------------------------------------
    def param_counts(self) -> dict[str, int]:
        shapes = {n: (layer.out_features, layer.in_features) for n, layer in self.layers()}
        trained = sum(p.numel() for p in self.peft.parameters() if p.requires_grad)
        return {
            "trainable_params_effective": int(trained),
            "trainable_params_lora_equivalent": M.count_params(shapes, self.cfg.rank)["lora"],
        }

    def held_tensors(self) -> list[torch.Tensor]:
        return list((self.w0 or {}).values())


def stage_delta(sd: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    """ΔW of one module in one stage from its stage file, in float64: U_l S_l V_l − U_l0 S_l0 V_l0."""
    f = {k: sd[f"{k}/{module}"].double() for k in ("U", "S", "V", "U0", "S0", "V0")}
    return (f["U"] * f["S"]) @ f["V"] - (f["U0"] * f["S0"]) @ f["V0"]


def export_osf(stage_dirs: list[Path], model: str | None, out: Path) -> None:
    """One stock LoRA adapter (scale 1) holding W_t − W0 = Σ_i ΔW_i of stages 1..t (`harness export`)."""
    from harness.adapters.peft_folder import write_adapters  # lazy: imports PEFT
    from harness.methods.lori.export import lori_s_config  # lazy: as above

    files = [load_file(str(d / FILE)) for d in stage_dirs]
    modules = sorted(k[2:] for k in files[0] if k.startswith("U/"))
    factors, dtype = {}, files[0][f"U/{modules[0]}"].dtype
    for n in modules:
        delta = sum(stage_delta(sd, n) for sd in files)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(S.shape[0], sum(2 * sd[f"S/{n}"].shape[0] for sd in files))  # rank(ΔW_i) ≤ 2 r_i
        factors[n] = ((U[:, :r] * S[:r]).to(dtype), Vh[:r].to(dtype))
    rank = max(B.shape[1] for B, _ in factors.values())
    adapter = {}
    for n, (B, A) in factors.items():  # zero columns / rows pad every module to one rank: the product is unchanged
        adapter[f"{n}.lora_B.weight"] = torch.cat([B, B.new_zeros(B.shape[0], rank - B.shape[1])], dim=1)
        adapter[f"{n}.lora_A.weight"] = torch.cat([A, A.new_zeros(rank - A.shape[0], A.shape[1])], dim=0)
    targets = json.loads((stage_dirs[-1] / META).read_text())["targets"]
    write_adapters(out, [adapter], lori_s_config({"rank": rank, "alpha": rank, "targets": targets}, model))
