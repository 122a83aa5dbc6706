"""What a model looks like without loading it: its config (no weights) and its Linear shapes (meta device)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from harness.models.environment import _hf_hub_cache, downloads_allowed, logger
from harness.models.smollm2 import smollm2_config
from harness.models.tiny import _TINY_SPECS, tiny_config


def model_config(name: str, *, cache_dir: str | os.PathLike | None = None, trust_remote_code: bool = False):
    """The model's transformers config, read without loading any weights; None where it cannot be read here."""
    from transformers import AutoConfig  # lazy: transformers' models load in ~0.7 s; validation and --help need none

    try:
        if name == "smollm2-135m":
            return smollm2_config(cache_dir)
        if name in _TINY_SPECS:
            return tiny_config(name)
        local = Path(name).expanduser()
        source = str(local) if local.is_dir() else name
        return AutoConfig.from_pretrained(
            source,
            local_files_only=not downloads_allowed() or local.is_dir(),
            trust_remote_code=trust_remote_code,
            cache_dir=None if local.is_dir() else str(_hf_hub_cache()),
        )
    except Exception as exc:  # noqa: BLE001 - a preflight that cannot read the config falls back to the loaded model
        logger.info("no config for %s without loading weights: %s", name, exc)
        return None


def linear_shapes(config) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every Linear module of a model built from `config` on the meta device (no memory)."""
    from transformers import (
        AutoModelForCausalLM,  # lazy: transformers' models load in ~0.7 s; validation and --help need none
    )

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return module_shapes(model)


def module_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every Linear module of a built (or loaded) model."""
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
