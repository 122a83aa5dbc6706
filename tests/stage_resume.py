"""The mid-stage resume check that every per-method test file shares (tests/test_sdlora.py, tests/test_osf.py).

A reference trains stages 1 and 2 straight through. A "new process" then restores stage 1 from its folder, trains
stage 2 with a checkpoint every 2 steps and is killed at step 2; another restores again and resumes from that
checkpoint. Its every tensor must equal the reference's bit for bit, and it must have resumed at step 2 (bit
identity alone would not catch a stage silently restarted from scratch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

from harness.run.checkpoint import StageCheckpointer


class Killed(Exception):
    pass


def _kill_at_2(step: int) -> None:
    if step == 2:
        raise Killed


def check_mid_stage_resume(make: Callable, ctx: Callable, train: Callable, state: Callable, tmp_path: Path,
                           task: str) -> None:
    """make() -> (method, tokenizer); ctx(t, run_dir, **kw), train(method, tok, t, **kw), state(method): the test
    file's own helpers; task: stage 2's task."""
    ref, tok = make()
    ref.begin_stage(ctx(1, tmp_path))
    train(ref, tok, 1)
    ref.end_stage()
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    ref.save_stage(stage1)
    ref.begin_stage(ctx(2, tmp_path))
    train(ref, tok, 2)
    ref.end_stage()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for attempt in ("killed", "resumed"):
        method, _ = make()
        method.restore({1: stage1})  # a new process: stage 1 from its folder
        ckpt = StageCheckpointer(run_dir, 2, task, every=2)
        method.begin_stage(ctx(2, run_dir, resumed_extra=ckpt.load_extra()))
        if attempt == "killed":
            with pytest.raises(Killed):
                train(method, tok, 2, checkpointer=ckpt, on_step=_kill_at_2)
        else:
            assert train(method, tok, 2, checkpointer=ckpt).resumed_from_step == 2
            method.end_stage()
    want, got = state(ref), state(method)
    assert want.keys() == got.keys() and len(want) > 0
    for k in want:
        assert torch.equal(got[k], want[k]), k
