"""eval_merged: evaluating with the active adapters folded into the weights gives the PEFT path's answers.

Each method is trained for real on the tiny model (smoke suite), then evaluated through PEFT and
folded, document by document. Tolerance: the same choice ranked first and the same generated text
on every document, multiple-choice log-likelihoods within LL_TOL (fp32: W0·x + s·B·A·x and
(W0 + s·B·A)·x differ only in rounding; measured ~5e-5 on log-likelihoods of ~-20).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from harness.adapters.combine import folded, lora_layers  # noqa: E402
from harness.config import ExperimentConfig  # noqa: E402
from harness.errors import HarnessError  # noqa: E402
from harness.methods import METHODS, StageContext  # noqa: E402
from harness.models import load_model  # noqa: E402
from harness.run.evaluate import Evaluator  # noqa: E402
from harness.run.recipe import Recipe  # noqa: E402
from harness.run.train import train_stage  # noqa: E402
from harness.suites import load_suite  # noqa: E402

LL_TOL = 1e-3
TASKS = ["weather", "copy"]  # one multiple-choice task, one generation task
LIMIT = 16


CASES = {
    "lora": ("lora", 1, {}),
    "inclora-stacked": ("inclora", 2, {}),  # two LoRA adapters, both active
    "lori-s-per-task": ("lori-s", 2, {"a_mode": "per_task"}),  # one adapter per task, all active
    "lori-s-shared": ("lori-s", 2, {}),
}


@functools.cache
def trained(case: str):
    """A method trained on smoke tasks, its adapters as the scheduler leaves them (shared by the tests: evaluation
    must not change it, which is itself tested)."""
    method_name, stages, knobs = CASES[case]
    model, tok = load_model("tiny-llama")
    suite = load_suite("smoke")
    cfg = ExperimentConfig(model="tiny-llama", suite="smoke", methods=[method_name], **knobs)
    order = ["weather", "parity"][:stages]
    method = METHODS[method_name](cfg, seed=0, tasks=order, base_model=model)
    for t, task in enumerate(order, start=1):
        method.begin_stage(StageContext(stage=t, task=task, run_dir=Path("."), calibrate=lambda *a: None))
        examples = [{**ex, "eos": True} for ex in suite.task(task).train_examples()]
        train_stage(
            method.model,
            tok,
            examples,
            method.trainable(),
            recipe=Recipe.from_config(cfg),
            lr=3e-2,
            epochs=1,
            batch_size=8,
            max_seq_len=32,
            seed=0,
            stage=t,
            hooks=method,
            progress=False,
        )
        method.end_stage()
    return method, Evaluator(suite, tok, limit=LIMIT, progress=False)


def preds(ev) -> dict[str, list]:
    return {t: [d["pred"] for d in docs] for t, docs in ev.samples.items()}


def max_ll_diff(a, b) -> float:
    return max(
        abs(x - y)
        for t in a.samples
        for da, db in zip(a.samples[t], b.samples[t])
        for x, y in zip(da.get("loglikelihoods", []), db.get("loglikelihoods", []))
    )


@pytest.mark.parametrize("case", list(CASES))
def test_merged_evaluation_gives_the_peft_path_answers_on_every_document(case):
    method, ev = trained(case)
    peft = ev.evaluate(method.model, TASKS, log_samples=True)
    merged = ev.evaluate(method.model, TASKS, log_samples=True, merged=True)
    assert preds(merged) == preds(peft)
    assert merged.scores == peft.scores
    assert max_ll_diff(merged, peft) < LL_TOL


@pytest.mark.parametrize("case", list(CASES))
def test_merged_evaluation_is_not_the_base_model(case):
    """Would fail if folding ignored the adapters: they change predictions, and folded answers follow them."""
    method, ev = trained(case)
    with folded(method.model, []):  # every LoRA layer out, nothing folded: the base model
        base = ev.evaluate(method.model, TASKS, log_samples=True)
    merged = ev.evaluate(method.model, TASKS, log_samples=True, merged=True)
    assert preds(merged) != preds(base), "training must have changed some prediction (test precondition)"
    assert max_ll_diff(merged, base) > 100 * LL_TOL


@pytest.mark.parametrize("case", ["inclora-stacked", "lori-s-per-task"])
def test_every_active_adapter_is_folded_not_only_the_last(case):
    method, ev = trained(case)
    merged = ev.evaluate(method.model, ["weather"], log_samples=True, merged=True)
    with folded(method.model, method.adapters.adapters[-1]):
        last_only = ev.evaluate(method.model, ["weather"], log_samples=True)
    peft = ev.evaluate(method.model, ["weather"], log_samples=True)
    assert max_ll_diff(merged, peft) < LL_TOL
    assert max_ll_diff(last_only, peft) > 100 * LL_TOL, "the earlier adapter must matter (test precondition)"


def test_base_weights_parameters_and_flags_are_bit_identical_after_merged_evaluation():
    method, ev = trained("inclora-stacked")
    model = method.model
    model.train()
    params = dict(model.named_parameters())
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in params.items()}
    layers = {n: id(m) for n, m in lora_layers(model)}
    ev.evaluate(model, TASKS, merged=True)
    assert {n: id(m) for n, m in lora_layers(model)} == layers  # the same LoRA layers are back in place
    after = dict(model.named_parameters())
    assert after.keys() == params.keys() and all(after[n] is params[n] for n in params)  # same Parameter objects
    for n, (w, flag) in before.items():
        assert torch.equal(after[n], w), n
        assert after[n].requires_grad == flag, n  # earlier adapters stay frozen, the current one trainable
    assert model.training


def _forward_probe(model):
    """Counts LoRA-layer forwards and records whether CPU bf16 autocast was on in the base model's linears."""
    seen = {"lora_calls": 0, "autocast": set()}
    layer = lora_layers(model)[0][1]
    hooks = [
        layer.register_forward_hook(lambda *a: seen.__setitem__("lora_calls", seen["lora_calls"] + 1)),
        layer.base_layer.register_forward_hook(lambda *a: seen["autocast"].add(torch.is_autocast_enabled("cpu"))),
    ]
    return seen, hooks


@pytest.mark.parametrize(
    "eval_merged,eval_bf16,run_bf16",
    [(True, False, False), (False, True, False), (False, False, True), (False, False, False)],
)
def test_from_config_reads_eval_merged_and_eval_bf16(eval_merged, eval_bf16, run_bf16):
    method, trained_ev = trained("lora")
    cfg = ExperimentConfig(
        model="tiny-llama", suite="smoke", eval_merged=eval_merged, eval_bf16=eval_bf16, eval_limit=4
    )
    ev = Evaluator.from_config(load_suite("smoke"), trained_ev.tokenizer, cfg, progress=False)
    ev.checked_fold = (
        True  # the first merged evaluation's PEFT cross-check runs the LoRA layers (tests/test_precision.py)
    )
    seen, hooks = _forward_probe(method.model)
    try:
        ev.evaluate(method.model, ["weather"], bf16_autocast=run_bf16)  # how the scheduler calls it
    finally:
        for h in hooks:
            h.remove()
    assert (seen["lora_calls"] == 0) == eval_merged  # folded: the LoRA layers are out of the forward
    assert seen["autocast"] == {eval_bf16 or run_bf16}


def test_a_lora_variant_is_refused_with_a_clear_message():
    from peft import LoraConfig, get_peft_model

    model, _ = load_model("tiny-llama")
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(HarnessError, match="eval_merged false"):
        with folded(model):
            pass
    assert lora_layers(model), "a refused fold leaves the model as it was"


def test_base_model_without_adapters_evaluates_unchanged():
    model, tok = load_model("tiny-llama")
    ev = Evaluator(load_suite("smoke"), tok, limit=8, progress=False)
    a = ev.evaluate(model, ["weather"], log_samples=True)
    b = ev.evaluate(model, ["weather"], log_samples=True, merged=True)
    assert a.samples == b.samples


def test_the_evaluator_scores_exactly_as_lm_eval_simple_evaluate():
    """The evaluator calls lm-eval's evaluate() once for all of a stage's tasks (skipping simple_evaluate's per-call
    environment report): the same answers as one simple_evaluate over those tasks."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from harness.run.evaluate import predictions

    method, ev = trained("lora")
    ours = ev.evaluate(method.model, TASKS, log_samples=True)
    lm = HFLM(pretrained=method.model, tokenizer=ev.tokenizer, batch_size=ev.batch_size, max_length=ev.max_length)
    ref = lm_eval.simple_evaluate(
        model=lm,
        tasks=[ev.configs[t] for t in TASKS],
        task_manager=TaskManager(include_defaults=False),
        samples=ev.subsets(TASKS),
        bootstrap_iters=0,
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    for t in TASKS:
        name = ev.configs[t]["task"]
        assert ours.scores[t] == ref["results"][name][ev.suite.task(t).metric_key]
        assert ours.samples[t] == predictions(ref["samples"][name], ev.suite.task(t).kind)
        assert ours.n_examples[t] == ref["n-samples"][name]["effective"] == LIMIT


def test_a_stage_is_one_lm_eval_call_with_the_answers_of_one_call_per_task(monkeypatch):
    """All of a stage's tasks go to lm-eval together (their requests batched together); each document gets the answer
    it gets when its task is evaluated alone, and the log-likelihoods agree to float noise."""
    import lm_eval.evaluator

    method, ev = trained("lora")
    alone = {t: ev.evaluate(method.model, [t], log_samples=True) for t in TASKS}
    calls = []
    real = lm_eval.evaluator.evaluate
    monkeypatch.setattr(
        lm_eval.evaluator, "evaluate", lambda **kw: calls.append(sorted(kw["task_dict"]["tasks"])) or real(**kw)
    )
    together = ev.evaluate(method.model, TASKS, log_samples=True)
    assert len(calls) == 1 and len(calls[0]) == len(TASKS)
    for t in TASKS:
        assert together.scores[t] == alone[t].scores[t]
        assert preds(together)[t] == preds(alone[t])[t]
        assert together.documents[t] == alone[t].documents[t]
    assert max_ll_diff(together, SimpleNamespace(samples={t: alone[t].samples[t] for t in TASKS})) < LL_TOL
