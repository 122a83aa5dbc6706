"""One stage of training: fresh AdamW, loss on completion tokens only, masks enforced every step."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from harness.precision import autocast_ctx
from harness.seeding import stable_seed


@dataclass
class TrainResult:
    steps: int
    tokens: int
    wall_s: float
    losses: list[float] = field(default_factory=list)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else float("nan")


def tokenize_examples(tokenizer, examples: list[dict], max_seq_len: int | None) -> list[tuple[list[int], int]]:
    """(ids, n_prompt_tokens) per example: prompt + completion + EOS, truncated from the left of the prompt."""
    out = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for ex in examples:
        p = tokenizer(ex["prompt"], add_special_tokens=False)["input_ids"]
        c = tokenizer(ex["completion"], add_special_tokens=False)["input_ids"] + eos
        if max_seq_len is not None and len(p) + len(c) > max_seq_len:
            keep = max(1, max_seq_len - len(c))
            p = p[-keep:]
            c = c[: max_seq_len - len(p)]
        out.append((p + c, len(p)))
    return out


def _collate(batch: list[tuple[list[int], int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    L = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), L), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), L), -100, dtype=torch.long)
    attn = torch.zeros((len(batch), L), dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attn[i, : len(ids)] = 1
        labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
    return {"input_ids": input_ids.to(device), "attention_mask": attn.to(device), "labels": labels.to(device)}


def train_stage(
    model: torch.nn.Module,
    tokenizer,
    examples: list[dict],
    params: list[torch.nn.Parameter],
    *,
    lr: float,
    epochs: float,
    batch_size: int,
    max_steps: int | None = None,
    max_seq_len: int | None = None,
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    warmup_steps: int = 0,
    seed: int = 0,
    stage: int = 1,
    bf16_autocast: bool = False,
    after_step: Callable[[], None] | None = None,
    desc: str = "train",
    progress: bool = True,
) -> TrainResult:
    """Train `params` on `examples` with a fresh optimizer; deterministic given (seed, stage) on CPU."""
    device = next(model.parameters()).device
    data = tokenize_examples(tokenizer, examples, max_seq_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    steps_per_epoch = math.ceil(len(data) / batch_size)
    total = math.ceil(epochs * steps_per_epoch)
    if max_steps is not None:
        total = min(total, max_steps)
    # The stage is a function of (checkpoint, config): its own generator, never global RNG state.
    gen = torch.Generator().manual_seed(stable_seed(seed, "stage", stage))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (warmup_steps + 1)) if warmup_steps else 1.0)
    model.train()
    result = TrainResult(steps=0, tokens=0, wall_s=0.0)
    t0 = time.perf_counter()
    order: list[int] = []
    bar = tqdm(total=total, desc=desc, leave=False, disable=not progress, dynamic_ncols=True)
    try:
        while result.steps < total:
            if not order:
                order = torch.randperm(len(data), generator=gen).tolist()
            idx, order = order[:batch_size], order[batch_size:]
            batch = _collate([data[i] for i in idx], pad_id, device)
            with autocast_ctx(device, bf16_autocast):
                out = model(**batch)
            loss = out.loss
            loss.backward()
            if grad_clip and grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if after_step is not None:
                after_step()
            result.steps += 1
            result.tokens += int(batch["attention_mask"].sum())
            result.losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{result.losses[-1]:.3f}")
    finally:
        bar.close()
    result.wall_s = time.perf_counter() - t0
    return result
