"""General-ability forgetting: the model's mean per-token cross-entropy on a fixed general English text.

The text, harness/assets/general_text.txt, is no task's data: prose paragraphs of the Python Language
Reference as CPython ships it in the standard library (pydoc_data.topics), © Python Software Foundation,
PSF License Version 2 (harness/assets/general_text.NOTICE says which paragraphs). It is committed rather than
read from the running Python, whose copy changes between versions, so every machine measures the same
tokens. PEFT's method comparison reports forgetting the same way: the rise of cross-entropy on a fixed general
text over the base model's (general_ce_rise = CE after the last stage − CE of the base model).

The first `general_ce_tokens` tokens are scored in windows of WINDOW tokens (each window predicts its own
tokens from its own prefix), so the number is the same whatever the batch, in eval mode, without dropout.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

GENERAL_TEXT = Path(__file__).parent / "assets" / "general_text.txt"
WINDOW = 256


def general_tokens(tokenizer, n_tokens: int) -> list[int]:
    """The first n_tokens token ids of the general text (fewer if the text is shorter), no special tokens."""
    return list(tokenizer(GENERAL_TEXT.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"][:n_tokens])


def windows(ids: list[int], size: int = WINDOW) -> list[list[int]]:
    """Consecutive windows of size + 1 ids that overlap by one, so every token after the first is predicted once."""
    return [ids[s : s + size + 1] for s in range(0, max(len(ids) - 1, 0), size) if len(ids[s : s + size + 1]) > 1]


@torch.no_grad()
def general_ce(model: torch.nn.Module, tokenizer, n_tokens: int) -> float | None:
    """Mean cross-entropy (nats per predicted token) of the model on the general text; None when n_tokens is 0."""
    ids = general_tokens(tokenizer, n_tokens) if n_tokens else []
    parts = windows(ids)
    if not parts:
        return None
    was_training = model.training
    device = next(model.parameters()).device
    total, count = 0.0, 0
    model.eval()
    try:
        for w in parts:
            x = torch.tensor([w], device=device)
            logits = model(input_ids=x[:, :-1]).logits.float()
            total += float(F.cross_entropy(logits[0], x[0, 1:], reduction="sum"))
            count += len(w) - 1
    finally:
        model.train(was_training)
    return total / count
