"""compile: the compiled training step equals the eager one within tolerance, LoRI-S's masks stay exact, bad values exit 2.

Tolerance: inductor fuses and reorders fp32 reductions and the compiled step pads batches to a bucket
length (masked, unlabelled), so losses and weights agree to rounding, not bit for bit: losses within
LOSS_RTOL relative, trained tensors within W_ATOL (measured: up to 2.2e-5 on LoRA weights of ~0.1 after 6 AdamW steps
at lr 3e-2, i.e. under 0.1% of one step).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from harness.config import ExperimentConfig  # noqa: E402
from harness.methods import METHODS, StageContext  # noqa: E402
from harness.models import load_model  # noqa: E402
from harness.run.batches import collate  # noqa: E402
from harness.run.compiled import BUCKET, pad_to_bucket, pad_to_shape, why_not  # noqa: E402
from harness.run.recipe import Recipe  # noqa: E402
from harness.run.train import forward_loss, train_stage  # noqa: E402
from harness.suites import load_suite  # noqa: E402

LOSS_RTOL = 1e-4
W_ATOL = 1e-4


def _train(name: str, compile_mode: str):
    model, tok = load_model("tiny-llama")
    cfg = ExperimentConfig(model="tiny-llama", suite="smoke", methods=[name])
    method = METHODS[name](cfg, seed=0, tasks=["weather"], base_model=model)
    method.begin_stage(
        StageContext(
            stage=1, task="weather", run_dir=Path("."), calibrate=lambda *a: None, compiled=compile_mode != "none"
        )
    )
    examples = [{**ex, "eos": True} for ex in load_suite("smoke").task("weather").train_examples()]
    res = train_stage(
        method.model,
        tok,
        examples,
        method.trainable(),
        recipe=Recipe.from_config(cfg),
        lr=3e-2,
        epochs=1,
        batch_size=8,
        steps=6,
        max_seq_len=32,
        seed=0,
        stage=1,
        hooks=method,
        progress=False,
        compile_mode=compile_mode,
        compile_shape=(8, 64) if compile_mode != "none" else None,
    )
    mask = getattr(method, "stage_index", None)
    method.end_stage()
    weights = {n: p.detach().clone() for n, p in method.model.named_parameters() if "lora_" in n}
    return res, weights, mask, method


def test_padding_to_a_bucket_does_not_change_the_loss():
    model, tok = load_model("tiny-llama")
    examples = load_suite("smoke").task("weather").train_examples()[:8]
    from harness.run.batches import tokenize_examples

    batch = collate(tokenize_examples(tok, examples, 32), 0, "cpu")
    padded = pad_to_bucket(batch, 0)
    assert padded["input_ids"].shape[1] % BUCKET == 0 and padded["input_ids"].shape[1] >= batch["input_ids"].shape[1]
    with torch.no_grad():
        a = forward_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"], "token")
        b = forward_loss(model, padded["input_ids"], padded["attention_mask"], padded["labels"], "token")
    assert torch.allclose(a, b, rtol=1e-5), (a, b)
    # the sequence's one shape: more rows (pad tokens, attended, unlabelled) and a longer length; same loss and gradient
    short = {k: v[:5] for k, v in batch.items()}
    shaped = pad_to_shape(short, 0, 8, 96)
    assert tuple(shaped["input_ids"].shape) == (8, 96) and bool((shaped["labels"][5:] == -100).all())
    grads = []
    for b in (short, shaped):
        model.zero_grad()
        loss = forward_loss(model, b["input_ids"], b["attention_mask"], b["labels"], "token")
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-5) and torch.isfinite(grads[1][0])
    assert all(torch.allclose(g, h, atol=1e-6, rtol=1e-4) for g, h in zip(grads[0][1], grads[1][1]))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lora", "lori-s"])
def test_compiled_training_equals_eager_within_tolerance(name):
    reason = why_not("default", torch.device("cpu"))
    if reason:
        pytest.skip(f"torch.compile cannot run here: {reason}")
    eager, w_eager, mask, _ = _train(name, "none")
    comp, w_comp, mask_c, method = _train(name, "default")
    assert comp.compile_used == "default", comp.compile_note
    assert eager.compile_used == "none"
    assert len(eager.losses) == len(comp.losses) == 6
    for a, b in zip(eager.losses, comp.losses):
        assert abs(a - b) <= LOSS_RTOL * abs(a), (eager.losses, comp.losses)
    for k in w_eager:
        assert torch.allclose(w_eager[k], w_comp[k], atol=W_ATOL, rtol=0), (k, (w_eager[k] - w_comp[k]).abs().max())
    if name == "lori-s":  # the mask is exact: nothing outside it moved, under compile too
        for k, mod in method.adapters.b_modules(method.adapter).items():
            outside = torch.ones(mod.weight.numel(), dtype=torch.bool)
            outside[mask_c[k].long()] = False
            assert torch.equal(mask[k], mask_c[k])
            assert int(torch.count_nonzero(mod.weight.detach().reshape(-1)[outside])) == 0, k


def test_unknown_compile_value_exits_2_and_writes_nothing(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness.cli",
            "run",
            "--suite",
            "smoke",
            "--model",
            "tiny-llama",
            "--results-dir",
            str(tmp_path / "r"),
            "--compile",
            "max-autotune-please",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2, out.stderr
    assert "--compile" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "r").exists()


def test_reduce_overhead_on_cpu_falls_back_to_eager_and_says_why():
    assert "CUDA only" in why_not("reduce-overhead", torch.device("cpu"))
    res, _, _, _ = _train("lora", "reduce-overhead")
    assert res.compile_used == "none" and "CUDA only" in res.compile_note


@pytest.mark.slow
def test_a_compiled_sequence_builds_its_graph_once(tmp_path):
    """One graph per sequence: after stage 1, no stage recompiles (train.json compile_recompiles, torch's counter), for
    LoRA and for LoRI-S, whose per-stage values change length (they reach the forward as fixed-shape weights)."""
    reason = why_not("default", torch.device("cpu"))
    if reason:
        pytest.skip(f"torch.compile cannot run here: {reason}")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness.cli",
            "run",
            "--suite",
            "smoke",
            "--model",
            "tiny-llama",
            "--methods",
            "lora,lori-s",
            "--seeds",
            "0",
            "--max-steps",
            "3",
            "--compile",
            "default",
            "--results-dir",
            str(tmp_path / "r"),
            "--experiment",
            "c",
            "--no-progress",
            "--no-report",
            "--eval-limit",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for method in ("lora", "lori-s"):
        trains = sorted((tmp_path / "r" / "c" / method / "seed-0").glob("**/stages/*/train.json"))
        records = {int(p.parent.name.split("-")[0]): json.loads(p.read_text()) for p in trains}
        assert sorted(records) == [1, 2, 3], (method, sorted(records))
        assert all(r["compile_used"] == "default" for r in records.values()), (method, records)
        assert records[1]["compile_graphs"] >= 1 or records[1]["compile_recompiles"] == 0
        assert [records[t]["compile_recompiles"] for t in (2, 3)] == [0, 0], (method, records)
        assert [records[t]["compile_graphs"] for t in (2, 3)] == [0, 0], (method, records)
