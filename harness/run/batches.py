"""A stage's training data as model inputs: examples marked for EOS, tokenized, padded into batches, sharded by rank.

Only completion tokens are labelled (the prompt's labels are -100), so the loss sees the completion alone. Under
torchrun / accelerate launch (harness/distributed.py) each rank collates its slice of the global batch and scales
its loss so that the gradient averaged over ranks is the one-process gradient of the global batch.
"""

from __future__ import annotations

import torch

from harness import distributed as D
from harness.losses import loss_terms
from harness.run.recipe import Recipe


def task_examples(suite, task: str, recipe: Recipe, *, limit: int | None, seed: int) -> list[dict]:
    """A task's training examples, each marked with whether EOS follows its completion (the recipe)."""
    add = recipe.add_eos(suite.task(task).kind == "generate")
    return [{**ex, "eos": add} for ex in suite.task(task).train_examples(limit=limit, seed=seed)]


def tokenize_examples(
    tokenizer, examples: list[dict], max_seq_len: int | None, *, add_eos: bool = True
) -> list[tuple[list[int], int]]:
    """(ids, n_prompt_tokens) per example: prompt + completion (+ EOS), truncated from the left of the prompt.

    An example's own "eos" key (set from the recipe's completion_eos and its task's kind) wins over add_eos."""
    out = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for ex in examples:
        p = tokenizer(ex["prompt"], add_special_tokens=False)["input_ids"]
        c = tokenizer(ex["completion"], add_special_tokens=False)["input_ids"] + (eos if ex.get("eos", add_eos) else [])
        if max_seq_len is not None and len(p) + len(c) > max_seq_len:
            keep = max(1, max_seq_len - len(c))
            p = p[-keep:]
            c = c[: max_seq_len - len(p)]
        out.append((p + c, len(p)))
    return out


def collate(batch: list[tuple[list[int], int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    L = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), L), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), L), -100, dtype=torch.long)
    attn = torch.zeros((len(batch), L), dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attn[i, : len(ids)] = 1
        labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
    return {"input_ids": input_ids.to(device), "attention_mask": attn.to(device), "labels": labels.to(device)}


def example_batches(tokenizer, examples: list[dict], max_seq_len: int | None, device):
    """batches(indices, batch_size): those training examples (None = all, in order) as model inputs on `device`, for
    methods that measure a stage's data outside training (StageContext.batches)."""
    data = tokenize_examples(tokenizer, examples, max_seq_len)
    pad_id = tokenizer.pad_token_id or 0

    def batches(indices: list[int] | None, batch_size: int):
        chosen = [data[i] for i in (indices if indices is not None else range(len(data)))]
        for i in range(0, len(chosen), batch_size):
            yield collate(chosen[i : i + batch_size], pad_id, device)

    return batches


def rank_batch(
    items: list[tuple[list[int], int]], pad_id: int, device, reduction: str
) -> tuple[dict[str, torch.Tensor], float | None]:
    """This rank's slice of a global batch and its loss scale; one process: the whole batch and no scale."""
    if not D.is_distributed():
        return collate(items, pad_id, device), None
    mine, weight = D.shard(items), 1.0
    if not mine:  # a last batch shorter than the world: this rank still steps (collectives), adding nothing
        mine, weight = items[:1], 0.0
    return collate(mine, pad_id, device), weight * D.world_size() / max(1, loss_terms(items, reduction))
