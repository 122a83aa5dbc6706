"""The compiled training step (`compile: none|default|reduce-overhead|auto`): torch.compile of forward + loss.

What is compiled is the forward pass and the loss (AOTAutograd compiles their backward too); the method's
hooks, clipping and AdamW stay eager. reduce-overhead adds CUDA graphs, which need static shapes, so a
compiled step pads every batch to one of a few fixed lengths (BUCKET multiples, capped by the stage's
longest sequence): the padding is masked out of attention and labelled -100, so the loss is the same
function. Where torch.compile cannot work (no C++ compiler, an unsupported torch or model), the run says
so once, trains eagerly and records `compile_used: none` with the reason (stage.json).
"""

from __future__ import annotations

import shutil
import sys
from typing import Callable

import torch

BUCKET = 32  # compiled steps pad to a multiple of this many tokens: a handful of shapes per stage
COMPILE_AUTO = {"cuda": "none", "cpu": "none"}  # what `compile: auto` means per device (README: On a GPU)

_warned: set[str] = set()


def resolve_mode(mode: str, device: torch.device) -> str:
    return COMPILE_AUTO.get(device.type, "none") if mode == "auto" else mode


def why_not(mode: str, device: torch.device) -> str | None:
    """Why torch.compile cannot run here (None: it can try)."""
    if mode == "none":
        return None
    if device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        return "no C++ compiler on PATH (inductor needs one on CPU)"
    if mode == "reduce-overhead" and device.type != "cuda":
        return "reduce-overhead is CUDA graphs: CUDA only"
    return None


def say_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        sys.stderr.write(msg + "\n")


def pad_to_bucket(batch: dict[str, torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad input_ids, attention_mask and labels to the next multiple of BUCKET (masked, unlabelled)."""
    L = batch["input_ids"].shape[1]
    target = -(-L // BUCKET) * BUCKET
    if target == L:
        return batch
    pad = target - L
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": -100}
    return {k: torch.nn.functional.pad(v, (0, pad), value=fill[k]) if k in fill else v for k, v in batch.items()}


class CompiledLoss:
    """forward + loss compiled once per model; falls back to eager on the first failure, saying why once."""

    def __init__(self, eager: Callable, mode: str, device: torch.device):
        self.eager, self.mode, self.reason = eager, mode, why_not(mode, device)
        self.fn = None
        if self.reason is None and mode != "none":
            self.fn = torch.compile(eager, mode=mode, dynamic=False)
        elif self.reason:
            say_once(f"compile {mode}: {self.reason}; training eagerly (recorded as compile_used: none)")

    @property
    def used(self) -> str:
        return self.mode if self.fn is not None else "none"

    def __call__(self, *args):
        if self.fn is None:
            return self.eager(*args)
        try:
            if self.mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()  # a new training step: the last step's graph outputs may be reused
            return self.fn(*args)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: eager is always correct
            self.reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            say_once(f"compile {self.mode} failed ({self.reason}); training eagerly from here (recorded)")
            self.fn = None
            return self.eager(*args)
