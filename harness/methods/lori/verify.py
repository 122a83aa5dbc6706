"""`harness verify` for LoRI-S (LoRIS.checks): the masks keep the overlap policy (disjoint: no position in two
masks), entries of B outside a stage's mask equal the previous stage's (earlier entries frozen), and A regenerated
from its seed matches the sha256 stored with the stage. Reads only."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from harness.adapters.peft_folder import dense_stage
from harness.checks import FAIL, OK, Check
from harness.errors import HarnessError
from harness.io import read_json
from harness.methods.lori import stage_files as SF
from harness.methods.lori.export import module_d_in, regenerate_A
from harness.methods.lori.sparse import mask_index


def _stage_B(folder: Path, prev: dict[str, torch.Tensor] | None) -> tuple[dict, dict, dict | None]:
    """(masks, B after this stage, lori.json or None) of a LoRI-S stage, sparse or in the older dense layout."""

    if SF.is_sparse_stage(folder):
        masks, values, meta = SF.read_stage(folder)
        B = {
            k: (prev[k].clone() if prev and k in prev else torch.zeros(m.shape, dtype=values[k].dtype))
            for k, m in masks.items()
        }
        for k in masks:
            SF.apply_values(B[k], mask_index(masks[k]), values[k])
        return masks, B, meta
    masks = SF.load_masks(folder)
    if masks is None:
        raise HarnessError(f"{folder}/{SF.MASKS} missing")

    sd = {}
    for f in dense_stage(folder)[0].values():
        sd.update(load_file(str(f)))
    return masks, {k: v for k, v in sd.items() if k in masks}, None


def _overlap_problem(t: int, masks: dict, used: dict, cfg: dict) -> str | None:
    lori = cfg.get("lori") or {}
    policy, x = lori.get("overlap_policy", "disjoint"), float(lori.get("max_overlap") or 0.0)
    if policy == "independent" or not used:
        return None
    over = {k: int((m & used[k]).sum()) for k, m in masks.items() if k in used}
    nnz = {k: int(m.sum()) for k, m in masks.items()}
    if policy == "disjoint" and sum(over.values()):
        k = max(over, key=over.get)
        return f"stage {t}: {sum(over.values())} mask position(s) used by an earlier stage (e.g. {over[k]} in {k}); policy disjoint"
    if policy == "max_overlap":
        per_module = lori.get("mask_strategy") == "random" or lori.get("mask_scope") == "module"
        pairs = over.items() if per_module else [("all modules", sum(over.values()))]
        for k, n in pairs:
            k_t = nnz[k] if per_module else sum(nnz.values())
            if n > math.floor(x * k_t + 1e-12):
                return f"stage {t}: {n} of {k_t} positions of {k} reused, more than max_overlap {x}"
    return None


def check_masks(run_dir: Path, done: dict[int, Path], cfg: dict) -> Check:

    used: dict[str, torch.Tensor] = {}  # positions of every earlier stage's mask (the allocator avoids them all)
    B: dict[str, dict[str, torch.Tensor]] = {}  # per adapter: B after the last stage read
    regenerated, problems, d_in = 0, [], None
    try:
        for t, folder in sorted((t, d) for t, d in done.items() if t > 0):
            name = read_json(folder / SF.META)["adapter"] if (folder / SF.META).exists() else "default"
            masks, B_t, meta = _stage_B(folder, B.get(name))
            if (p := _overlap_problem(t, masks, used, cfg)) is not None:
                problems.append(p)
            prev = B.get(name) or {k: torch.zeros_like(v) for k, v in B_t.items()}
            moved = {k: int(((B_t[k] != prev[k]) & ~masks[k]).sum()) for k in masks if k in prev}
            if sum(moved.values()):
                k = max(moved, key=moved.get)
                problems.append(
                    f"stage {t}: {sum(moved.values())} entries of B outside its mask changed (e.g. {moved[k]} in {k})"
                )
            if meta is not None:
                d_in = d_in or module_d_in(cfg, list(masks))
                regenerate_A(meta, d_in, getattr(torch, meta["dtype"]), folder)  # HarnessError when the sha256 differs
                regenerated += 1
            B[name] = B_t
            used = {k: used[k] | m if k in used else m.clone() for k, m in masks.items()}
    except HarnessError as exc:
        problems.append(str(exc))
    if problems:
        return Check("masks", FAIL, "; ".join(problems))
    policy = (cfg.get("lori") or {}).get("overlap_policy", "disjoint")
    return Check(
        "masks",
        OK,
        f"{len([t for t in done if t > 0])} stage mask(s) keep overlap policy {policy}; B outside each "
        f"stage's mask unchanged; A regenerated from seed {cfg['sequence']['seed']} matches at "
        f"{regenerated} stage(s)",
    )
