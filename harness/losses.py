"""The training loss: next-token cross-entropy on the labelled (completion) positions of a batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str, *, scale: float | None = None) -> torch.Tensor:
    """Next-token cross-entropy on labelled positions: mean over tokens, or mean of per-example means.

    scale (several processes): a rank's share instead of a mean, the sum of its terms times `scale`
    (world_size / the global batch's number of terms, see rank_batch)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    per_tok = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="none"
    )
    per_tok = per_tok.view(labels.shape)
    valid = (labels != -100).to(per_tok.dtype)
    if reduction == "token":
        return (per_tok * valid).sum() / valid.sum().clamp(min=1) if scale is None else (per_tok * valid).sum() * scale
    if reduction == "example":
        n = valid.sum(dim=1)
        per_ex = (per_tok * valid).sum(dim=1) / n.clamp(min=1)
        return per_ex[n > 0].mean() if scale is None else per_ex[n > 0].sum() * scale
    raise ValueError(f"unknown loss_reduction {reduction!r}")


def loss_terms(batch: list[tuple[list[int], int]], reduction: str) -> int:
    """How many terms lm_loss averages over in a batch: labelled next-token positions, or examples that have any."""
    per_ex = [max(0, len(ids) - max(n_prompt, 1)) for ids, n_prompt in batch]  # position 0 is never a target
    return sum(per_ex) if reduction == "token" else sum(1 for n in per_ex if n > 0)
