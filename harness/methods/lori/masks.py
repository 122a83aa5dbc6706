"""Mask allocation across the tasks of a sequence, capacity checks, parameter counting, overlaps.

Pure functions over tensors keyed by the lora_B key of each adapted module (the same key the
adapter's safetensors file uses), so every invariant can be checked from the files alone. How a
mask is enforced in training is harness/methods/lori/sparse.py; how it is stored, stage_files.py.

Overlap policies for task t's mask M_t given the positions U used by M_1..M_{t-1}:
- disjoint:     M_t ∩ U = ∅
- max_overlap x: |M_t ∩ U| ≤ floor(x · |M_t|)
- independent:  no constraint (the LoRI reference behaviour)
Within what the policy allows, the k highest-scoring positions win (scores = |B| of a LoRI-D
calibration run for `magnitude`, seeded uniform noise for `random`).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Mapping

import torch

from harness.errors import CapacityError
from harness.seeding import stable_seed

Masks = dict[str, torch.Tensor]  # key -> bool tensor of B's shape


def _exact(density: float) -> Fraction:
    # Fraction(repr(x)) is the decimal the user wrote (0.1 -> 1/10), not the binary float
    # (0.1000000000000000055...), so floor(p * n) and floor(1/p) come out as people compute them.
    return Fraction(repr(float(density)))


def k_for(n: int, density: float) -> int:
    """Trainable entries for n entries at a density: floor(p·n), at least one.

    The floor (not round) is what makes the promise true: T·floor(p·n) ≤ T·p·n ≤ n for every
    T ≤ 1/p, so floor(1/p) disjoint masks always fit a module."""
    return max(1, math.floor(_exact(density) * n))


def reuse_quota(k: int, max_overlap: float) -> int:
    """How many of k positions may be reused under max_overlap x: floor(x·k)."""
    return math.floor(_exact(max_overlap) * k)


def max_disjoint_tasks(density: float) -> int:
    """floor(1/p): how many disjoint masks of density p always fit, whatever the module's size."""
    return math.floor(1 / _exact(density))


def _select(
    scores: torch.Tensor, used: torch.Tensor, k: int, policy: str, max_overlap: float, where: str
) -> torch.Tensor:
    """Boolean mask (flat) choosing k positions of `scores` under the overlap policy."""
    n = scores.numel()
    flat = scores.reshape(-1).float()
    used = used.reshape(-1)
    if policy == "independent":
        quota_used = k
    elif policy == "disjoint":
        quota_used = 0
    elif policy == "max_overlap":
        quota_used = reuse_quota(k, max_overlap)
    else:
        raise ValueError(f"unknown overlap policy {policy!r}")
    free_idx = torch.nonzero(~used, as_tuple=True)[0]
    used_idx = torch.nonzero(used, as_tuple=True)[0]
    quota_used = min(quota_used, used_idx.numel())
    if free_idx.numel() + quota_used < k:
        raise CapacityError(
            f"{where}: mask capacity exhausted: task needs {k} positions, {free_idx.numel()} unused and at most "
            f"{quota_used} reusable remain. Lower mask_density, shorten the sequence, or relax overlap_policy."
        )

    # Best k among free positions, best quota among used ones; the top k of their union is the
    # optimum of "top-k subject to at most quota from used" (a used pick only displaces a worse one).
    def top(idx: torch.Tensor, m: int) -> torch.Tensor:
        if m <= 0 or idx.numel() == 0:
            return idx[:0]
        vals = flat[idx]
        order = torch.sort(vals, descending=True, stable=True).indices[:m]
        return idx[order]

    cand = torch.cat([top(free_idx, k), top(used_idx, quota_used)])
    order = torch.sort(flat[cand], descending=True, stable=True).indices[:k]
    chosen = cand[order]
    out = torch.zeros(n, dtype=torch.bool)
    out[chosen] = True
    return out


def allocate(
    scores: Mapping[str, torch.Tensor],
    used: Mapping[str, torch.Tensor] | None,
    *,
    density: float,
    policy: str,
    max_overlap: float = 0.0,
    scope: str = "module",
) -> Masks:
    """Choose task t's masks: top-k of scores among the positions the overlap policy allows.

    scope="global" ranks all modules together (k = density x all entries, the LoRI paper's choice);
    scope="module" gives every module exactly its own density.
    """
    keys = list(scores)
    used = {
        k: (used[k] if used is not None and k in used else torch.zeros_like(scores[k], dtype=torch.bool)) for k in keys
    }
    if scope == "module":
        return {
            k: _select(
                scores[k].cpu(), used[k].cpu(), k_for(scores[k].numel(), density), policy, max_overlap, k
            ).reshape(scores[k].shape)
            for k in keys
        }
    if scope != "global":
        raise ValueError(f"unknown mask scope {scope!r}")
    flat_scores = torch.cat([scores[k].detach().reshape(-1).float().cpu() for k in keys])
    flat_used = torch.cat([used[k].reshape(-1).cpu() for k in keys])
    sel = _select(flat_scores, flat_used, k_for(flat_scores.numel(), density), policy, max_overlap, "all modules")
    out: Masks = {}
    offset = 0
    for k in keys:
        n = scores[k].numel()
        out[k] = sel[offset : offset + n].reshape(scores[k].shape)
        offset += n
    return out


def random_scores(shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Seeded uniform scores per module (the `random` strategy ranks these)."""
    return {
        k: torch.rand(shape, generator=torch.Generator().manual_seed(stable_seed(seed, "mask", k)))
        for k, shape in shapes.items()
    }


def union(masks: list[Masks]) -> Masks:
    """Positions used by any of the given task masks."""
    out: Masks = {}
    for m in masks:
        for k, v in m.items():
            out[k] = v.clone() if k not in out else (out[k] | v)
    return out


def check_capacity(
    shapes: Mapping[str, tuple[int, ...]], n_tasks: int, *, density: float, policy: str, max_overlap: float, scope: str
) -> None:
    """Refuse, before training, a sequence whose masks cannot all fit (CapacityError)."""
    if policy == "independent" or n_tasks <= 1:
        return
    groups = (
        {k: math.prod(s) for k, s in shapes.items()}
        if scope == "module"
        else {"all modules": sum(math.prod(s) for s in shapes.values())}
    )
    for where, n in groups.items():
        k = k_for(n, density)
        fresh = k if policy == "disjoint" else k - reuse_quota(k, max_overlap)
        need = k + (n_tasks - 1) * fresh
        if need > n:
            fit = 1 + (n - k) // fresh if fresh > 0 else n_tasks
            raise CapacityError(
                f"mask capacity: {n_tasks} tasks at mask_density {density} with overlap_policy {policy}"
                + (f" (max_overlap {max_overlap})" if policy == "max_overlap" else "")
                + f" need {need} positions in {where} but it has {n}; at most {fit} tasks fit "
                f"(disjoint masks fit floor(1/density) = {max_disjoint_tasks(density)}). Lower mask_density, run fewer tasks, "
                "or use overlap_policy max_overlap/independent."
            )


def count_params(shapes: Mapping[str, tuple[int, int]], rank: int) -> dict[str, int]:
    """Trainable-parameter counts for adapted Linear modules given (d_out, d_in) per module.

    lora = Σ r (d_in + d_out); lori_d = Σ r d_out (A is frozen); lori_s = density-dependent and
    counted from the masks themselves (see mask_nnz).
    """
    lora = sum(rank * (d_in + d_out) for d_out, d_in in shapes.values())
    lori_d = sum(rank * d_out for d_out, _ in shapes.values())
    return {"lora": lora, "lori_d": lori_d}


def mask_nnz(masks: Mapping[str, torch.Tensor]) -> int:
    """Effective trainable entries of B: the masks' non-zeros."""
    return int(sum(int(m.sum()) for m in masks.values()))


def mask_overlap_matrix(task_masks: list[Masks]) -> list[list[float]]:
    """O[i][j] = |M_i ∧ M_j| / |M_j| over all modules."""
    T = len(task_masks)
    out = [[0.0] * T for _ in range(T)]
    for i in range(T):
        for j in range(T):
            inter = sum(int((task_masks[i][k] & task_masks[j][k]).sum()) for k in task_masks[j])
            size = mask_nnz(task_masks[j])
            out[i][j] = inter / size if size else float("nan")
    return out


def subspace_overlap(A_i: torch.Tensor, A_j: torch.Tensor) -> float:
    """||A_i A_j^T||_F / (||A_i||_F ||A_j||_F) for two r x d_in projections."""
    a, b = A_i.float(), A_j.float()
    return float(torch.linalg.matrix_norm(a @ b.T) / (torch.linalg.matrix_norm(a) * torch.linalg.matrix_norm(b)))


def subspace_overlap_matrix(task_As: list[Mapping[str, torch.Tensor]]) -> dict[str, object]:
    """Per-module and mean A-subspace overlap between every pair of tasks."""
    T = len(task_As)
    keys = list(task_As[0]) if T else []
    per_module = {
        k: [[subspace_overlap(task_As[i][k], task_As[j][k]) for j in range(T)] for i in range(T)] for k in keys
    }
    mean = [[sum(per_module[k][i][j] for k in keys) / max(1, len(keys)) for j in range(T)] for i in range(T)]
    return {"matrix": mean, "per_module": per_module}
