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

Under torch.compile (`functional=True`) the modules are left as they are: a registered parametrization swaps the
module's class, and each stage's index has its own length, so a compiled step would recompile at every stage. The
step instead computes each B outside the compiled graph (`overrides()`, the same scatter) and hands the compiled
forward these dense tensors, whose shapes never change; `values` stay named as the parametrization names them, so
checkpoints are interchangeable between the two forms.
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

    def __init__(
        self,
        modules: Mapping[str, nn.Linear],
        index: Mapping[str, torch.Tensor],
        functional: Mapping[str, str] | None = None,
    ):
        """functional: each module's name in the model the step calls (its weight is then passed to the forward by
        `overrides()`, the module untouched); None: registered as a parametrization."""
        self.modules = dict(modules)
        self.parts: dict[str, MaskedValues] = {}
        self.names = dict(functional) if functional is not None else None
        for key, mod in self.modules.items():
            w = mod.weight
            w.requires_grad_(False)
            index_k = index[key].to(w.device)
            part = MaskedValues(index_k, w.detach().reshape(-1)[index_k].clone())
            if self.names is None:  # unsafe=True: skip the trial forward; shape and dtype hold by construction.
                parametrize.register_parametrization(mod, "weight", part, unsafe=True)
            self.parts[key] = part

    @property
    def functional(self) -> bool:
        return self.names is not None

    def overrides(self) -> dict[str, torch.Tensor]:
        """{`<module name>.weight`: B with the stage's values scattered in} for torch.func.functional_call (functional)."""
        assert self.names is not None
        return {f"{self.names[k]}.weight": part(self.modules[k].weight) for k, part in self.parts.items()}

    def named_values(self) -> dict[str, nn.Parameter]:
        """The trainable values (functional) under the names a registered parametrization gives them in the model."""
        assert self.names is not None
        return {f"{self.names[k]}.parametrizations.weight.0.values": p.values for k, p in self.parts.items()}

    def values(self) -> dict[str, nn.Parameter]:
        return {k: p.values for k, p in self.parts.items()}

    def index(self) -> dict[str, torch.Tensor]:
        return {k: p.index for k, p in self.parts.items()}

    @torch.no_grad()
    def commit(self) -> None:
        """Write the trained values into B (a plain frozen Parameter again) and remove the parametrization."""
        for key, mod in self.modules.items():
            if self.names is not None and key in self.parts:  # what removing the parametrization leaves in B
                mod.weight.copy_(self.parts[key](mod.weight.detach()))
            if parametrize.is_parametrized(mod, "weight"):
                parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
            mod.weight.requires_grad_(False)
        self.parts = {}
