"""The training recipe is explicit: EOS after completions as configured, warm-up values, loss reduction, logged params."""

import math

import pytest
import torch

from harness.losses import lm_loss
from harness.run.batches import tokenize_examples
from harness.run.recipe import Recipe, lr_factor, make_optimizer


class Tok:
    eos_token_id = 1
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + b % 60 for b in text.encode()]}


def recipe(**kw):
    base = dict(
        weight_decay=0.0, grad_clip=1.0, warmup_steps=0, warmup_ratio=0.0, loss_reduction="token", completion_eos="auto"
    )
    return Recipe(**{**base, **kw})


@pytest.mark.parametrize(
    "mode,generative,eos",
    [
        ("auto", True, True),
        ("auto", False, False),
        ("always", False, True),
        ("always", True, True),
        ("never", True, False),
        ("never", False, False),
    ],
)
def test_eos_follows_the_completion_exactly_as_configured(mode, generative, eos):
    r = recipe(completion_eos=mode)
    ex = {"prompt": "Q:", "completion": " A", "eos": r.add_eos(generative)}
    ids, n_prompt = tokenize_examples(Tok(), [ex], None)[0]
    assert (ids[-1] == Tok.eos_token_id) == eos
    assert len(ids) == n_prompt + 2 + int(eos)


def test_scheduler_marks_each_example_from_its_task_kind(tmp_path):
    from harness.config import ExperimentConfig
    from harness.run.planning import SequenceSpec
    from harness.run.sequence import SequenceRunner
    from harness.suites import load_suite

    suite = load_suite("smoke")
    cfg = ExperimentConfig(model="tiny-llama", suite="smoke")  # the default: auto
    runner = SequenceRunner(
        cfg, suite, SequenceSpec("lora", 0, 0, ["parity", "copy"], tmp_path, cfg), None, None, None, None
    )
    assert all(ex["eos"] is False for ex in runner.task_examples("parity"))  # multiple choice: EOS is never scored
    assert all(ex["eos"] is True for ex in runner.task_examples("copy"))  # generation: EOS is the stop signal
    always_cfg = ExperimentConfig(model="tiny-llama", suite="smoke", completion_eos="always")
    always = SequenceRunner(
        always_cfg, suite, SequenceSpec("lora", 0, 0, ["parity"], tmp_path, always_cfg), None, None, None, None
    )
    assert all(ex["eos"] is True for ex in always.task_examples("parity"))


def test_warmup_schedule_values():
    assert [lr_factor(s, 4) for s in range(6)] == [0.2, 0.4, 0.6, 0.8, 1.0, 1.0]
    assert [lr_factor(s, 0) for s in range(3)] == [1.0, 1.0, 1.0]
    assert recipe(warmup_ratio=0.1).warmup_for(76) == 8 and recipe(warmup_steps=5).warmup_for(76) == 5
    p = torch.nn.Parameter(torch.zeros(2))
    opt, sched = make_optimizer([p], 1e-2, recipe(warmup_steps=3), 10)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones(2)
        opt.step()
        sched.step()
    assert lrs == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2])


def test_loss_reduction_token_vs_example():
    # Two examples: one labelled token with loss ln(V)... built from logits with known cross-entropies.
    V = 4
    logits = torch.zeros(2, 4, V)
    labels = torch.full((2, 4), -100)
    labels[0, 1] = 0  # one token in example 0 (uniform logits: loss ln 4)
    labels[1, 1:4] = 0  # three tokens in example 1
    logits[1, 0:3, 0] = 10.0  # ... predicted almost surely: loss ~0
    per_tok_1 = torch.nn.functional.cross_entropy(logits[1, 0:1], torch.tensor([0])).item()
    token = lm_loss(logits, labels, "token").item()
    example = lm_loss(logits, labels, "example").item()
    assert token == pytest.approx((math.log(4) + 3 * per_tok_1) / 4)
    assert example == pytest.approx((math.log(4) + per_tok_1) / 2)


def test_recipe_knobs_are_logged_as_mlflow_params(tmp_path):
    from test_sequence import mlflow_client

    from harness.cli import main

    results = tmp_path / "r"
    assert (
        main(
            [
                "run",
                "--suite",
                "smoke",
                "--model",
                "tiny-llama",
                "--methods",
                "lora",
                "--tasks",
                "parity",
                "--seeds",
                "0",
                "--warmup-ratio",
                "0.25",
                "--completion-eos",
                "never",
                "--loss-reduction",
                "example",
                "--no-progress",
                "--no-report",
                "--results-dir",
                str(results),
                "--experiment",
                "recipe",
            ]
        )
        == 0
    )
    c = mlflow_client(results)
    run = c.search_runs([c.get_experiment_by_name("recipe").experiment_id], "tags.`harness.kind` = 'sequence'")[0]
    p = run.data.params
    assert (p["warmup_ratio"], p["completion_eos"], p["loss_reduction"], p["grad_clip"], p["weight_decay"]) == (
        "0.25",
        "never",
        "example",
        "1.0",
        "0.0",
    )


def test_warmup_steps_and_ratio_together_are_refused(tmp_path, capsys):
    from harness.cli import main

    assert (
        main(
            [
                "run",
                "--suite",
                "smoke",
                "--model",
                "tiny-llama",
                "--warmup-steps",
                "5",
                "--warmup-ratio",
                "0.1",
                "--results-dir",
                str(tmp_path / "r"),
            ]
        )
        == 2
    )
    assert "warmup_steps or warmup_ratio" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
