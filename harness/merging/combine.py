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
from typing import Iterator

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

MERGED = "merged"


def lora_layers(model: PeftModel) -> list[tuple[str, LoraLayer]]:
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


@contextlib.contextmanager
def folded(model: PeftModel, adapter: str) -> Iterator[PeftModel]:
    """The adapter's ΔW added into the base weights, the LoRA branch off: the model runs at base-model speed.

    The base weights are copied first and copied back afterwards, so they are restored bit for bit
    (merging and unmerging in place drifts them)."""
    saved = {}
    with torch.no_grad():
        for name, layer in lora_layers(model):
            if adapter in layer.lora_A:
                w = layer.get_base_layer().weight
                saved[name] = w.detach().clone()
                w.add_(layer.get_delta_weight(adapter).to(w.dtype))
    try:
        with model.disable_adapter():
            yield model
    finally:
        with torch.no_grad():
            layers = dict(lora_layers(model))
            for name, w0 in saved.items():
                layers[name].get_base_layer().weight.copy_(w0)
