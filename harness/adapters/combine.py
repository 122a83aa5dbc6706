"""Merging task adapters with PEFT's add_weighted_adapter, measuring its exactness, folding it into the weights.

The exact multi-task update is ΔW* = Σ_i w_i s_i B_i A_i. PEFT's `cat` reproduces it (ranks are
stacked). `linear`, `ties`, `dare_*` and `magnitude_prune` combine the A's and the B's separately,
(Σ √(w_i s_i) B_i)(Σ √(w_j s_j) A_j), so cross terms B_i A_j appear unless every A_j is the same;
with one shared A, linear is free of cross terms but scales ΔW* by Σ_j √(w_j s_j) / √(w_i s_i)
(T for equal weights): it is exactly proportional, not equal. `relative_error` measures the merged
update against ΔW*, per merge, so a report can say how far a combination is from the weighted sum.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Iterator, Sequence

import torch
from peft import PeftModel
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer

from harness.errors import HarnessError
from harness.precision import exact_matmuls

MERGED = "merged"


def lora_layers(model: torch.nn.Module) -> list[tuple[str, LoraLayer]]:
    """Every LoRA layer of a model, with its qualified name (none for a plain base model)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def load_adapters(base_model: torch.nn.Module, folders: dict[str, Path]) -> PeftModel:
    """One PeftModel holding every adapter (name -> PEFT folder), none merged."""
    names = list(folders)
    model = PeftModel.from_pretrained(base_model, str(folders[names[0]]), adapter_name=names[0], is_trainable=False)
    for name in names[1:]:
        model.load_adapter(str(folders[name]), adapter_name=name, is_trainable=False)
    return model


def merge(model: PeftModel, adapters: list[str], weights: list[float], combination: str, density: float) -> None:
    """Add the combined adapter `merged` (replacing an earlier one) and make it the active adapter."""
    if MERGED in model.peft_config:
        model.delete_adapter(MERGED)
    kwargs = {"density": density} if combination not in ("cat", "linear", "svd") else {}
    model.add_weighted_adapter(adapters, weights, MERGED, combination_type=combination, **kwargs)
    model.set_adapter(MERGED)


@torch.no_grad()
def relative_error(model: PeftModel, adapters: list[str], weights: list[float], merged: str = MERGED) -> float:
    """‖ΔW_merged − Σ w_i ΔW_i‖_F / ‖Σ w_i ΔW_i‖_F over every adapted module (ΔW_i includes its scaling)."""
    num = den = 0.0
    for _, layer in lora_layers(model):
        exact = sum(w * layer.get_delta_weight(a).float() for a, w in zip(adapters, weights))
        diff = layer.get_delta_weight(merged).float() - exact
        num += float(diff.pow(2).sum())
        den += float(exact.pow(2).sum())
    return math.sqrt(num / den) if den > 0 else 0.0


def _adapters_in_forward(layer: LoraLayer) -> list[str]:
    """The adapters this layer's forward adds to the base output (PEFT's lora.Linear.forward, mirrored)."""
    if layer.merged:
        if layer.disable_adapters:  # PEFT would unmerge in place on the next forward
            raise HarnessError(
                "an adapter is merged in place (merge_adapter) and disabled; unmerge it before evaluating"
            )
        return []  # already inside the base weights
    if layer.disable_adapters:
        return []
    return [a for a in layer.active_adapters if a in layer.lora_A]


def _check_foldable(name: str, layer: LoraLayer, adapters: list[str]) -> None:
    """Refuse what W0 + Σ get_delta_weight would not reproduce (DoRA-like variants, LoRA biases, nesting)."""
    where = f"module {name!r}"
    if not isinstance(layer, LoraLinear) or isinstance(layer.base_layer, LoraLayer):
        raise HarnessError(
            f"{where}: only LoRA on plain linear layers can be folded ({type(layer).__name__}); set eval_merged false"
        )
    for a in adapters:
        if a in layer.lora_variant or layer.lora_bias.get(a, False):
            raise HarnessError(
                f"{where}: adapter {a!r} is a LoRA variant or has a LoRA bias, which folding does not "
                "reproduce; set eval_merged false"
            )


@contextlib.contextmanager
def folded(model: torch.nn.Module, adapter: str | Sequence[str] | None = None) -> Iterator[torch.nn.Module]:
    """The adapters' ΔW folded into the weights and the LoRA layers taken out: the model runs at base-model speed.

    adapter: one adapter name or several (summed), or None for exactly what the forward pass adds now (each
    layer's active adapters; IncLoRA's and per-task LoRI's stacks included). Every LoRA layer is replaced in
    its parent by a layer holding W0 + Σ ΔW_a, summed in fp32 and kept in fp32 (a bf16/fp16 base: applied in
    fp32, output in the activations' dtype; see Fp32FoldedLinear). TF32 is off while folded. The original base
    weight tensors are never written and no requires_grad flag is touched (PEFT's disable_adapter would
    re-enable gradients of frozen adapters); layers and weights are put back afterwards, so the base
    weights are bit-identical and training continues as before. Costs one extra copy of the adapted
    weights while folded. A model without LoRA layers (the base model) is left as it is."""
    names = [adapter] if isinstance(adapter, str) else (list(adapter) if adapter is not None else None)
    layers = lora_layers(model)
    plan = []
    for name, layer in layers:
        use = _adapters_in_forward(layer) if names is None else [a for a in names if a in layer.lora_A]
        _check_foldable(name, layer, use)
        plan.append((name, layer, use))
    _refuse_shared_weights(model, [layer.base_layer for _, layer, _ in plan])
    swapped = []  # (parent, child name, lora layer, original base weight Parameter)
    try:
        with exact_matmuls():
            with torch.no_grad():
                for name, layer, use in plan:
                    parent_name, _, child = name.rpartition(".")
                    parent = model.get_submodule(parent_name)
                    swapped.append((parent, child, layer, layer.base_layer.weight))
                    setattr(parent, child, _folded_linear(layer, use))
            yield model
    finally:
        for parent, child, layer, w0 in reversed(swapped):
            layer.base_layer._parameters["weight"] = w0
            setattr(parent, child, layer)


class Fp32FoldedLinear(torch.nn.Module):
    """A folded layer of a low-precision base: W0 + ΔW kept in fp32 and applied in fp32, the output in the input's dtype.

    Rounding W0 + ΔW to bf16 would lose most of a small ΔW (bf16 keeps 8 bits: an update below ~0.4% of a weight
    vanishes), so the folded model would answer differently from the PEFT path, which adds the fp32 LoRA branch to
    the base output and rounds only the sum (tests/test_precision.py)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.float(), self.weight, self.bias).to(x.dtype)


def _folded_linear(layer: LoraLayer, use: list[str]) -> torch.nn.Module:
    """What replaces a LoRA layer while folded: its base layer holding a new fp32 Parameter W0 + Σ ΔW (the
    original W0 tensor is never written and is put back by `folded`), or for a bf16/fp16 base an Fp32FoldedLinear."""
    base = layer.base_layer
    if not use:
        return base  # no adapter in this layer's forward: the base layer as it is
    w0 = base.weight
    w = w0.float() + sum(layer.get_delta_weight(a).float() for a in use)
    if w0.dtype != torch.float32:
        return Fp32FoldedLinear(w, base.bias.detach().float() if base.bias is not None else None)
    base._parameters["weight"] = torch.nn.Parameter(w, requires_grad=False)
    return base


def _refuse_shared_weights(model: torch.nn.Module, bases: list[torch.nn.Module]) -> None:
    """A base weight tied to another module (e.g. embeddings) would be folded for one user and not the other."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    for b in bases:
        if seen.get(id(b.weight), 0) > 1:
            raise HarnessError(
                f"a LoRA-adapted weight of shape {tuple(b.weight.shape)} is tied to another module; "
                "folding cannot serve both. Set eval_merged false"
            )
