"""General-ability forgetting: the cross-entropy on the fixed general text, against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from harness.general_text import GENERAL_TEXT, WINDOW, general_ce, general_tokens, windows
from harness.models import load_model


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama", device="cpu", dtype="float32")


def hand_ce(model, ids: list[int]) -> float:
    """-log p(token | its window's prefix), averaged over every predicted token, with plain Python arithmetic."""
    nll = []
    for start in range(0, len(ids) - 1, WINDOW):
        w = ids[start : start + WINDOW + 1]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([w[:-1]])).logits[0].double().tolist()
        for k, row in enumerate(logits):
            top = max(row)
            lse = top + math.log(sum(math.exp(v - top) for v in row))
            nll.append(lse - row[w[k + 1]])
    return sum(nll) / len(nll)


def test_general_ce_equals_a_hand_computation_on_the_tiny_model(tiny):
    model, tok = tiny
    model.train()
    ids = general_tokens(tok, 300)
    assert len(ids) == 300  # two windows: 256 predicted tokens, then 43
    got = general_ce(model, tok, 300)
    assert got == pytest.approx(hand_ce(model, ids), rel=1e-5)
    assert model.training  # train mode is restored
    assert general_ce(model, tok, 0) is None


def test_windows_predict_every_token_after_the_first_exactly_once():
    ids = list(range(600))
    parts = windows(ids, 256)
    assert [len(w) for w in parts] == [257, 257, 88]
    assert [t for w in parts for t in w[1:]] == ids[1:]


def test_the_general_text_is_prose_and_its_licence_is_noted():
    text = GENERAL_TEXT.read_text(encoding="utf-8")
    assert len(text) > 8000 and "::=" not in text
    notice = GENERAL_TEXT.with_name("general_text.NOTICE").read_text(encoding="utf-8")
    assert "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2" in notice and "pydoc_data.topics" in notice
