"""One stage of training: fresh AdamW, loss on completion tokens only, the method's hooks every step.

The recipe (what the loss sees and how the step is taken) is explicit and logged: EOS after the
completion or not, warm-up, clipping, loss reduction, weight decay (harness/run/recipe.py, with the optimizer it
builds; the data as batches: harness/run/batches.py). `train_step` is THE training step: `harness bench` times this
same function.

Under torchrun / accelerate launch (harness/distributed.py) every rank draws the same global data
order and trains on its slice of each global batch; its loss is the sum of its terms scaled by
world_size / (the global batch's number of terms), so the gradient DDP or FSDP averages over ranks is
the one-process gradient of the global batch. Rank 0 alone writes checkpoints; every rank restores.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch.func import functional_call
from tqdm.auto import tqdm

from harness import distributed as D
from harness import faults
from harness.errors import HarnessError
from harness.losses import lm_loss
from harness.precision import autocast_ctx
from harness.run.batches import rank_batch, tokenize_examples
from harness.run.checkpoint import Progress, StageCheckpointer
from harness.run.compiled import CompiledLoss, resolve_mode, sequence_shape, why_not
from harness.run.recipe import Recipe, make_optimizer
from harness.seeding import stable_seed

LOSS_EVERY = 10  # steps between reads of the loss (each read waits for the device)


def set_checkpointing(model: torch.nn.Module, on: bool) -> None:
    """Gradient checkpointing of the base model's decoder layers (transformers' own, non-reentrant), on or off."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        if on:
            raise HarnessError(
                f"--gradient-checkpointing true: {type(base).__name__} does not support it in transformers; "
                "leave it off for this model"
            )
        return
    # transformers 5.x renamed gradient to activation checkpointing (the old names warn, and go in v6)
    if hasattr(base, "activation_checkpointing_enable"):
        active, enable, disable = (
            base.is_activation_checkpointing,
            base.activation_checkpointing_enable,
            base.activation_checkpointing_disable,
        )
        kwargs = {"activation_checkpointing_kwargs": {"use_reentrant": False}}
    else:
        active, enable, disable = (
            base.is_gradient_checkpointing,
            base.gradient_checkpointing_enable,
            base.gradient_checkpointing_disable,
        )
        kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
    if on and not active:
        enable(**kwargs)
    elif not on and active:
        disable()


class StageHooks(Protocol):
    """What a method may add to the step (see harness/methods/base.py)."""

    def extra_loss(self) -> torch.Tensor | None: ...
    def after_backward(self) -> None: ...
    def after_step(self) -> None: ...
    def weight_overrides(self) -> dict[str, torch.Tensor] | None: ...


@dataclass
class TrainResult:
    steps: int
    tokens: int
    wall_s: float
    losses: list[float] = field(default_factory=list)
    checkpoint_s: float = 0.0
    checkpoints: int = 0
    resumed_from_step: int = 0
    local_trainable: int = 0  # elements of the trainable parameters this rank held (FSDP: its shards)
    compile_used: str = "none"  # the torch.compile mode that ran (none: eager, asked for or fallen back to)
    compile_note: str | None = None  # why compile fell back to eager
    compile_graphs: int = 0  # graphs torch.compile built during the stage (harness/run/compiled.py)
    compile_recompiles: int = 0  # of those, built after this process's first compiled step

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else float("nan")


class LossLog:
    """Step losses kept as device tensors and read every LOSS_EVERY steps (one synchronisation, not one per step)."""

    def __init__(self, losses: list[float], bar):
        self.losses, self.bar, self.pending = losses, bar, []

    def add(self, loss: torch.Tensor) -> None:
        self.pending.append(loss)
        if len(self.pending) >= LOSS_EVERY:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.losses.extend(torch.stack(self.pending).float().cpu().tolist())
            self.pending = []
            self.bar.set_postfix(loss=f"{self.losses[-1]:.3f}")


def forward_loss(
    model,
    input_ids,
    attention_mask,
    labels,
    reduction: str,
    scale: float | None = None,
    overrides: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The forward pass and the loss: what `compile` compiles (harness/run/compiled.py).

    overrides: parameters the forward uses instead of the model's (the method's weight_overrides)."""
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    logits = (functional_call(model, overrides, args=(), kwargs=inputs) if overrides else model(**inputs)).logits
    return lm_loss(logits, labels, reduction, scale=scale)


def train_step(
    model,
    batch,
    params: list[torch.nn.Parameter],
    opt,
    sched,
    recipe: Recipe,
    hooks: StageHooks | None,
    bf16_autocast: bool = False,
    loss_scale: float | None = None,
    loss_fn: Callable | None = None,
) -> torch.Tensor:
    """One optimizer step: loss (+ the method's term), backward, hooks, clip, AdamW, schedule.

    Returns the loss as a detached tensor: reading it (a host-device synchronisation) is the caller's choice.
    loss_fn: forward_loss or its compiled form. With loss_scale (a rank's share, see rank_batch) the returned loss is
    the global batch's, averaged over ranks."""
    device = batch["input_ids"].device
    with autocast_ctx(device, bf16_autocast):
        overrides = (
            hooks.weight_overrides() if hasattr(hooks, "weight_overrides") else None
        )  # optional in a hook object
        loss = (loss_fn or forward_loss)(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"],
            recipe.loss_reduction,
            loss_scale,
            overrides,
        )
    extra = hooks.extra_loss() if hooks is not None else None
    total = loss + extra if extra is not None else loss
    total.backward()
    if hooks is not None:
        hooks.after_backward()  # masks gradients before clipping, so clipping sees what will be applied
    if recipe.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    if hooks is not None:
        hooks.after_step()
    # clone: a CUDA-graph replay (compile reduce-overhead) overwrites its outputs in place at the next step
    return loss.detach().clone() if loss_scale is None else torch.tensor(D.mean_over_ranks(loss))


def _save_checkpoint(
    checkpointer: StageCheckpointer, staged, gen: torch.Generator, prog: Progress, t0: float, *, last: bool, stage: int
) -> float:
    """Write a mid-stage checkpoint (every rank gathers under FSDP; rank 0 writes); the seconds it took.

    `t0` is the stage's start shifted by earlier checkpoints' time, so prog.wall_s counts training only."""
    tc = time.perf_counter()
    prog.wall_s = tc - t0
    full_params, full_opt = staged.full_state()
    if D.is_main():
        checkpointer.save(full_params, full_opt, staged.sched, gen, prog)
    spent = time.perf_counter() - tc
    if not last and D.is_main():
        faults.pause("mid-train", checkpointer.run_dir, stage)
    return spent


def _stage_steps(n_examples: int, batch_size: int, epochs: float, steps: int | None, max_steps: int | None) -> int:
    """The stage's optimizer steps: `steps` if given, else `epochs` over the data; max_steps caps it."""
    total = steps if steps is not None else math.ceil(epochs * math.ceil(n_examples / batch_size))
    return min(total, max_steps) if max_steps is not None else total


def _next_items(prog: Progress, data: list, batch_size: int, gen: torch.Generator) -> list[tuple[list[int], int]]:
    """The next global batch in the stage's data order (a fresh permutation from `gen` once the order runs out)."""
    if not prog.order:
        prog.order = torch.randperm(len(data), generator=gen).tolist()
    idx, prog.order = prog.order[:batch_size], prog.order[batch_size:]
    return [data[i] for i in idx]


def _stage_result(
    prog: Progress,
    wall_s: float,
    ckpt_s: float,
    checkpointer: StageCheckpointer | None,
    resumed_from: int,
    local: int,
    loss_fn: CompiledLoss,
) -> TrainResult:
    """What a finished stage reports: its progress, its time (training and checkpoints) and how its step ran."""
    return TrainResult(
        steps=prog.step,
        tokens=prog.tokens,
        wall_s=wall_s,
        losses=prog.losses,
        checkpoint_s=ckpt_s,
        checkpoints=checkpointer.saves if checkpointer else 0,
        resumed_from_step=resumed_from,
        local_trainable=local,
        compile_used=loss_fn.used,
        compile_note=loss_fn.reason,
        compile_graphs=loss_fn.graphs,
        compile_recompiles=loss_fn.recompiles,
    )


def train_stage(
    model: torch.nn.Module,
    tokenizer,
    examples: list[dict],
    params: dict[str, torch.nn.Parameter],
    *,
    recipe: Recipe,
    lr: float,
    epochs: float,
    batch_size: int,
    steps: int | None = None,
    max_steps: int | None = None,
    max_seq_len: int | None = None,
    seed: int = 0,
    stage: int = 1,
    bf16_autocast: bool = False,
    hooks: StageHooks | None = None,
    checkpointer: StageCheckpointer | None = None,
    desc: str = "train",
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    distributed: str = "ddp",
    compile_mode: str = "none",
    compile_shape: tuple[int, int] | None = None,
) -> TrainResult:
    """Train `params` on `examples` with a fresh optimizer; deterministic given (seed, stage) on CPU.

    The stage takes `steps` optimizer steps if given, else `epochs` over the data; max_steps caps it.
    With a checkpointer, a checkpoint of this stage is restored first (weights, AdamW, schedule,
    RNG and data position), and one is written every `checkpoint_every` steps and at the end.
    Under a launcher the model is wrapped for the stage (`distributed`: ddp or fsdp) after the restore.
    compile_shape: the (rows, length) every compiled step is padded to (harness/run/compiled.py)."""
    device = next(model.parameters()).device
    data = tokenize_examples(tokenizer, examples, max_seq_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total = _stage_steps(len(data), batch_size, epochs, steps, max_steps)
    plist = list(params.values())
    # The stage is a function of (checkpoint, config): its own generator, never global RNG state.
    gen = torch.Generator().manual_seed(stable_seed(seed, "stage", stage))
    opt, sched = make_optimizer(plist, lr, recipe, total)
    prog = (checkpointer.restore(params, opt, sched, gen) if checkpointer else None) or Progress()
    resumed_from = prog.step
    model.train()
    set_checkpointing(model, recipe.gradient_checkpointing)
    staged = D.StageModel.wrap(model, params, opt, sched, distributed, lambda ps: make_optimizer(ps, lr, recipe, total))
    plist, main = list(staged.params.values()), D.is_main()
    t0 = time.perf_counter() - prog.wall_s
    ckpt_s = 0.0
    bar = tqdm(
        total=total, initial=prog.step, desc=desc, leave=False, disable=not progress or not main, dynamic_ncols=True
    )
    losses = LossLog(prog.losses, bar)
    loss_fn = CompiledLoss(forward_loss, compile_mode, device, shape=compile_shape)
    try:
        while prog.step < total:
            items = _next_items(prog, data, batch_size, gen)
            batch, scale = rank_batch(items, pad_id, device, recipe.loss_reduction)
            batch = loss_fn.pad(batch, pad_id)
            losses.add(
                train_step(
                    staged.module, batch, plist, staged.opt, staged.sched, recipe, hooks, bf16_autocast, scale, loss_fn
                )
            )
            prog.step += 1
            prog.tokens += sum(len(ids) for ids, _ in items)  # the global batch's tokens (its attention mask's sum)
            bar.update(1)
            if checkpointer is not None and checkpointer.due(prog.step, total):
                losses.flush()
                ckpt_s += _save_checkpoint(
                    checkpointer, staged, gen, prog, t0 + ckpt_s, last=prog.step >= total, stage=stage
                )
            if on_step is not None:
                on_step(prog.step)
        losses.flush()
        local = staged.local_elements()
        staged.close()
    finally:
        bar.close()
    return _stage_result(prog, time.perf_counter() - t0 - ckpt_s, ckpt_s, checkpointer, resumed_from, local, loss_fn)


def train_method(
    method,
    tokenizer,
    examples: list[dict],
    budget: dict,
    *,
    recipe: Recipe,
    seed: int,
    stage: int,
    bf16_autocast: bool,
    calibration: bool = False,
    max_steps: int | None = None,
    checkpointer: StageCheckpointer | None = None,
    desc: str = "train",
    progress: bool = True,
    distributed: str = "ddp",
    compile_mode: str = "none",
    compile_shape: tuple[int, int] | None = None,
) -> TrainResult:
    """One stage of a method (harness/methods) on a budget from planning.stage_budget; sequences and merging share it.

    calibration=True is the LoRI-D pre-run of a magnitude mask: no method hooks, its own data order."""
    return train_stage(
        method.model,
        tokenizer,
        examples,
        method.trainable(),
        recipe=recipe,
        lr=budget["lr"],
        epochs=budget["epochs"],
        batch_size=budget["batch_size"],
        steps=budget["steps"],
        max_steps=max_steps or budget["max_steps"],
        max_seq_len=budget["max_seq_len"],
        seed=stable_seed(seed, "calib") if calibration else seed,
        stage=stage,
        bf16_autocast=bf16_autocast,
        hooks=None if calibration else method,
        checkpointer=checkpointer,
        desc=desc,
        progress=progress,
        distributed=distributed,
        compile_mode=compile_mode,
        compile_shape=compile_shape,
    )


def compile_plan(compile_knob: str, model, tokenizer, stages: Callable[[], list[tuple[dict, list[dict]]]]):
    """(mode, shape) of a sequence's training steps: the `compile` knob resolved on the model's device and, when the
    step will compile, the one (rows, length) every step is padded to: the longest tokenized training example and the
    largest per-process batch over the stages' (budget, examples) (harness/run/compiled.py: one graph per sequence)."""
    device = next(model.parameters()).device
    mode = resolve_mode(compile_knob, device)
    if mode == "none" or why_not(mode, device) is not None:
        return mode, None
    pairs = stages()
    lengths = [len(ids) for budget, exs in pairs for ids, _ in tokenize_examples(tokenizer, exs, budget["max_seq_len"])]
    return mode, sequence_shape(lengths, [-(-budget["batch_size"] // D.world_size()) for budget, _ in pairs])
