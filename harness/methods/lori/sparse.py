"""LoRI-S training state that is as sparse as LoRI-S: only the mask's entries of B are parameters.

Each adapted module's lora_B weight is parametrized (torch.nn.utils.parametrize) as

    B = scatter(B_frozen, index, values)        (out of place: B_frozen is never written)

B_frozen is B as the stage found it (earlier tasks' entries, zeros elsewhere), frozen; `index` are
the flat positions of the stage's mask; `values` (one vector per module, initialised from B_frozen
at those positions) is the only trainable tensor. The optimizer therefore holds O(nnz) gradients
and AdamW moments, and the mask is exact by construction: nothing outside `index` can move, so no
gradient hooks, no snapshot and no restore after the step (hook-free under DDP/FSDP too).

Why it equals the dense path (mask the gradient after backward, restore masked-out entries after
each step): the gradient of `values` is the dense gradient of B gathered at `index`, bit for bit;
AdamW is per coordinate, so its update of a kept coordinate does not depend on the others; the
dense path's masked-out coordinates had zero gradient and were restored. Clipping sees the same
norm up to summation order (the dense path's zeros add nothing; tests/test_sparse_lori.py bounds
the difference).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

INDEX_DTYPE = torch.int32  # index_put accepts int32; half the bytes of int64 (every module has < 2**31 entries)


def mask_index(mask: torch.Tensor) -> torch.Tensor:
    """Flat positions (row-major, ascending) of a boolean mask: the order values are stored in."""
    return torch.nonzero(mask.reshape(-1), as_tuple=True)[0].to(INDEX_DTYPE)


def index_to_mask(index: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Boolean mask of `shape` with the flat positions in `index` set."""
    out = torch.zeros(math.prod(shape), dtype=torch.bool)
    out[index.long().cpu()] = True
    return out.reshape(shape)


def scatter_values(frozen: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A copy of `frozen` with its flat positions `index` replaced by `values` (differentiable in values)."""
    return frozen.reshape(-1).index_put((index,), values).view_as(frozen)


class MaskedValues(nn.Module):
    """The parametrization of one lora_B weight: frozen dense B with the mask's positions taken from `values`."""

    def __init__(self, index: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.register_buffer("index", index, persistent=False)
        self.values = nn.Parameter(values)

    def forward(self, frozen: torch.Tensor) -> torch.Tensor:
        return scatter_values(frozen, self.index, self.values)


class SparseStage:
    """One stage's sparse training of lora_B: attach to the modules, train `values`, commit into B, detach.

    modules: lora_B Linear per key (the adapter's B files' keys); index: the mask's flat positions per key
    (mask_index)."""

    def __init__(self, modules: Mapping[str, nn.Linear], index: Mapping[str, torch.Tensor]):
        self.modules = dict(modules)
        self.parts: dict[str, MaskedValues] = {}
        for key, mod in self.modules.items():
            w = mod.weight
            w.requires_grad_(False)
            index_k = index[key].to(w.device)
            part = MaskedValues(index_k, w.detach().reshape(-1)[index_k].clone())
            # unsafe=True: skip the registration's trial forward; shape and dtype hold by construction.
            parametrize.register_parametrization(mod, "weight", part, unsafe=True)
            self.parts[key] = part

    def values(self) -> dict[str, nn.Parameter]:
        return {k: p.values for k, p in self.parts.items()}

    def index(self) -> dict[str, torch.Tensor]:
        return {k: p.index for k, p in self.parts.items()}

    @torch.no_grad()
    def commit(self) -> None:
        """Write the trained values into B (a plain frozen Parameter again) and remove the parametrization."""
        for mod in self.modules.values():
            if parametrize.is_parametrized(mod, "weight"):
                parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
            mod.weight.requires_grad_(False)
        self.parts = {}
