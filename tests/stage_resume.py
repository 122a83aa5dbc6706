"""What the per-method test files share (tests/test_sdlora.py, tests/test_osf.py): the method on the tiny model, a
stage context, a few training steps on a smoke task, and the mid-stage resume check.

A reference trains stages 1 and 2 straight through. A "new process" then restores stage 1 from its folder, trains
stage 2 with a checkpoint every 2 steps and is killed at step 2; another restores again and resumes from that
checkpoint. Its every tensor must equal the reference's bit for bit, and it must have resumed at step 2 (bit
identity alone would not catch a stage silently restarted from scratch).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from test_methods import stage_dirs

from harness.cli import main
from harness.config import ExperimentConfig
from harness.methods import METHODS, StageContext
from harness.models import load_model
from harness.run.checkpoint import StageCheckpointer
from harness.run.recipe import Recipe
from harness.run.train import train_stage
from harness.suites import load_suite

TASKS = ["parity", "weather", "copy"]


def build(name: str, **knobs):
    """(method `name` on a fresh tiny-llama over TASKS, its tokenizer)."""
    model, tok = load_model("tiny-llama")
    cfg = ExperimentConfig(model="tiny-llama", suite="smoke", methods=[name], **knobs)
    return METHODS[name](cfg, seed=0, tasks=TASKS, base_model=model), tok


def ctx(t: int, run_dir: Path, **kw) -> StageContext:
    return StageContext(stage=t, task=TASKS[t - 1], run_dir=run_dir, calibrate=None, **kw)


def train(method, tok, t: int, steps: int = 4, **kw):
    """`steps` steps of stage t on its smoke task, with the method's hooks."""
    examples = load_suite("smoke").task(TASKS[t - 1]).train_examples()
    return train_stage(
        method.model,
        tok,
        examples,
        method.trainable(),
        recipe=Recipe.from_config(method.cfg),
        lr=3e-2,
        epochs=1,
        batch_size=4,
        steps=steps,
        max_seq_len=32,
        seed=0,
        stage=t,
        hooks=method,
        progress=False,
        **kw,
    )


class Killed(Exception):
    pass


def _kill_at_2(step: int) -> None:
    if step == 2:
        raise Killed


def check_mid_stage_resume(make: Callable, state: Callable, tmp_path: Path) -> None:
    """make() -> (method, tokenizer); state(method) -> every tensor the method's result depends on."""
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
        ckpt = StageCheckpointer(run_dir, 2, TASKS[1], every=2)
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


def resume_without_last_stage(run: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of run's experiment with its last stage and summary deleted, resumed by `harness resume`; (the copy's
    retrained last stage folder, the original's)."""
    shutil.copytree(run.parents[2], tmp_path / "r")  # resume needs the experiment folder around the sequence
    copy = tmp_path / "r" / run.relative_to(run.parents[2])
    last = stage_dirs(run)[-1]
    shutil.rmtree(copy / "stages" / last.name)
    (copy / "summary.json").unlink()
    assert main(["resume", str(copy), "--no-report", "--no-progress"]) == 0
    return copy / "stages" / last.name, last
