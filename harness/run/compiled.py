"""The compiled training step (`compile: none|default|reduce-overhead|auto`): torch.compile of forward + loss.

What is compiled is the forward pass and the loss (AOTAutograd compiles their backward too); the method's
hooks, clipping and AdamW stay eager. Where torch.compile cannot work (no C++ compiler, an unsupported torch or
model), the run says so once, trains eagerly and records `compile_used: none` with the reason (train.json).

One graph per sequence, not per stage. A graph is specialised to its input shapes and module structure, so:
- a sequence's compiled steps all have one shape (`sequence_shape`): every batch is padded to the sequence's longest
  training example (a BUCKET multiple) and to its largest batch size. Padded positions are masked out of attention
  and padded rows are all pad tokens; both are labelled -100, so the loss is the same function (token reduction);
- methods whose trainable tensors change shape by stage (LoRI-S's per-stage values) hand the forward dense weights
  of fixed shape (`weight_overrides`, torch.func.functional_call) instead of re-parametrizing modules.
train.json records `compile_graphs` (graphs torch built during the stage, torch's own counter) and
`compile_recompiles` (those built after the process's first compiled step: 0 after stage 1 for lora and lori-s,
tests/test_compile.py). Methods that add adapters by stage (inclora, per_task A) change the structure, and
recompile once per stage.
"""

from __future__ import annotations

import shutil
import sys
from typing import Callable

import torch

BUCKET = 32  # compiled steps pad to a multiple of this many tokens: a handful of shapes per stage
COMPILE_AUTO = {"cuda": "none", "cpu": "none"}  # what `compile: auto` means per device (README: On a GPU)

_warned: set[str] = set()
_first_compile_done = [False]  # this process has compiled a training step once: later graphs are recompiles


def graphs_built() -> int:
    """Graphs torch.compile has built in this process (torch._dynamo's own counter)."""
    from torch._dynamo.utils import counters  # lazy: importing dynamo costs about a second; eager runs never need it

    return counters["stats"]["unique_graphs"]


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


def pad_to_shape(batch: dict[str, torch.Tensor], pad_id: int, rows: int, length: int) -> dict[str, torch.Tensor]:
    """Pad to (rows, length): positions right-padded as pad_to_bucket does; added rows are pad tokens, attended (a
    row attending nothing gives NaN logits) and unlabelled, so they add nothing to a token-mean loss or its gradient.
    A batch larger than the shape (never, from sequence_shape) keeps its own bucketed shape."""
    n, L = batch["input_ids"].shape
    if n > rows or L > length:
        return pad_to_bucket(batch, pad_id)
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": -100}
    out = {k: torch.nn.functional.pad(v, (0, length - L), value=fill[k]) if k in fill else v for k, v in batch.items()}
    if n < rows:
        extra = {"input_ids": pad_id, "attention_mask": 1, "labels": -100}
        out = {k: torch.cat([v, v.new_full((rows - n, length), extra[k])]) if k in extra else v for k, v in out.items()}
    return out


def sequence_shape(lengths: list[int], batch_sizes: list[int]) -> tuple[int, int]:
    """(rows, length) of every compiled step of a sequence: its largest batch size and longest training example
    (token count after truncation), rounded up to a BUCKET multiple."""
    return max(batch_sizes), -(-max(lengths) // BUCKET) * BUCKET


class CompiledLoss:
    """forward + loss compiled once per model; falls back to eager on the first failure, saying why once."""

    def __init__(self, eager: Callable, mode: str, device: torch.device, shape: tuple[int, int] | None = None):
        """shape: the (rows, length) every compiled step is padded to (sequence_shape); None: bucketed lengths."""
        self.eager, self.mode, self.reason, self.shape = eager, mode, why_not(mode, device), shape
        self.fn = None
        self.graphs = self.recompiles = 0  # graphs built during this object's calls, and how many were recompiles
        if self.reason is None and mode != "none":
            self.fn = torch.compile(eager, mode=mode, dynamic=False)
        elif self.reason:
            say_once(f"compile {mode}: {self.reason}; training eagerly (recorded as compile_used: none)")

    @property
    def used(self) -> str:
        return self.mode if self.fn is not None else "none"

    def pad(self, batch: dict[str, torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
        """The batch as the compiled step takes it (unchanged when the step runs eagerly)."""
        if self.fn is None:
            return batch
        return pad_to_shape(batch, pad_id, *self.shape) if self.shape else pad_to_bucket(batch, pad_id)

    def __call__(self, *args):
        if self.fn is None:
            return self.eager(*args)
        try:
            if self.mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()  # a new training step: the last step's graph outputs may be reused
            before = graphs_built()
            out = self.fn(*args)
            new = graphs_built() - before
            self.graphs += new
            self.recompiles += new if _first_compile_done[0] else 0
            _first_compile_done[0] = True
            return out
        except Exception as exc:  # noqa: BLE001 - any compiler failure: eager is always correct
            self.reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            say_once(f"compile {self.mode} failed ({self.reason}); training eagerly from here (recorded)")
            self.fn = None
            return self.eager(*args)
