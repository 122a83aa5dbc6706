"""Numerics shared by training, evaluation and bench: CPU bf16 autocast, asked for as a context or as a dtype."""

from __future__ import annotations

import contextlib

import torch


def autocast_dtype(device: torch.device, bf16_autocast: bool) -> torch.dtype | None:
    """bf16 on CPU when asked (CUDA runs in the model's own dtype); None: no autocast."""
    return torch.bfloat16 if bf16_autocast and device.type == "cpu" else None


def autocast_ctx(device: torch.device, bf16_autocast: bool):
    """The autocast_dtype as a context; a no-op where there is none."""
    dtype = autocast_dtype(device, bf16_autocast)
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()
