"""Numerics shared by training, evaluation and bench: the CPU bf16 autocast context."""

from __future__ import annotations

import contextlib

import torch


def autocast_ctx(device: torch.device, bf16_autocast: bool):
    """bf16 autocast on CPU when asked (CUDA runs in the model's own dtype); otherwise a no-op."""
    if bf16_autocast and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()
