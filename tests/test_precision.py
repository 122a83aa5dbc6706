"""The precision policy: a bf16 base, fp32 adapters and optimizer state, exact masks, folding that answers as PEFT does.

harness/precision.py states the policy; README "Precision" the experiment that chose the CUDA default.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from harness.adapters.combine import Fp32FoldedLinear, folded  # noqa: E402
from harness.config import ExperimentConfig  # noqa: E402
from harness.config_loading import load_config
from harness.errors import ConfigError  # noqa: E402
from harness.methods import METHODS, StageContext  # noqa: E402
from harness.models import load_model  # noqa: E402
from harness.precision import exact_matmuls, precision_of, set_tf32  # noqa: E402
from harness.run.evaluate import Evaluator  # noqa: E402
from harness.run.planning import check_precision  # noqa: E402
from harness.run.recipe import Recipe, make_optimizer  # noqa: E402
from harness.run.train import train_stage  # noqa: E402
from harness.suites import load_suite  # noqa: E402

TASKS = ["weather", "copy"]


def _stage(method, suite, tok, t: int, task: str, cfg, *, steps: int = 6, lr: float = 3e-2):
    method.begin_stage(StageContext(stage=t, task=task, run_dir=Path("."), calibrate=lambda *a: None))
    examples = [{**ex, "eos": True} for ex in suite.task(task).train_examples()]
    train_stage(
        method.model,
        tok,
        examples,
        method.trainable(),
        recipe=Recipe.from_config(cfg),
        lr=lr,
        epochs=1,
        batch_size=8,
        steps=steps,
        max_seq_len=32,
        seed=0,
        stage=t,
        hooks=method,
        progress=False,
    )
    method.end_stage()


def _method(name: str, dtype: str, **knobs):
    model, tok = load_model("tiny-llama", dtype=dtype)
    cfg = ExperimentConfig(model="tiny-llama", suite="smoke", methods=[name], dtype=dtype, **knobs)
    return METHODS[name](cfg, seed=0, tasks=TASKS, base_model=model), tok, cfg


@pytest.mark.parametrize("name", ["lora", "lori-s"])
def test_bf16_base_keeps_adapters_and_adamw_state_in_fp32(name):
    method, tok, cfg = _method(name, "bf16")
    method.begin_stage(StageContext(stage=1, task="weather", run_dir=Path("."), calibrate=lambda *a: None))
    base = [p for n, p in method.model.named_parameters() if "lora_" not in n]
    assert base and all(p.dtype == torch.bfloat16 for p in base)
    trainable = method.trainable()
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    for _, layer in method.adapters.layers():  # A (frozen for LoRI), B (for LoRI-S: frozen B plus the sparse values)
        assert layer.lora_A[method.adapter].weight.dtype == torch.float32
        assert layer.lora_B[method.adapter].weight.dtype == torch.float32
    opt, _ = make_optimizer(list(trainable.values()), 1e-3, Recipe.from_config(cfg), 4)
    suite = load_suite("smoke")
    from harness.run.batches import collate, tokenize_examples
    from harness.run.train import train_step

    device = next(method.model.parameters()).device
    batch = collate(tokenize_examples(tok, suite.task("weather").train_examples()[:4], 32), 0, device)
    train_step(
        method.model,
        batch,
        list(trainable.values()),
        opt,
        torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
        Recipe.from_config(cfg),
        method,
    )
    moments = [v for state in opt.state.values() for k, v in state.items() if k in ("exp_avg", "exp_avg_sq")]
    assert moments and all(m.dtype == torch.float32 for m in moments)
    assert precision_of(cfg, method.model).record()["optimizer_state_dtype"] == "float32"


def test_adapter_dtype_base_puts_adapters_in_the_base_dtype():
    method, _, _ = _method("lori-s", "bf16", adapter_dtype="base")
    method.begin_stage(StageContext(stage=1, task="weather", run_dir=Path("."), calibrate=lambda *a: None))
    assert all(p.dtype == torch.bfloat16 for p in method.trainable().values())


def test_earlier_lori_s_entries_are_bit_identical_after_a_bf16_stage():
    method, tok, cfg = _method("lori-s", "bf16")
    suite = load_suite("smoke")
    _stage(method, suite, tok, 1, "weather", cfg)
    mask1 = method.task_masks[0]
    before = {
        k: m.weight.detach().reshape(-1)[mask1[k].long()].clone()
        for k, m in method.adapters.b_modules(method.adapter).items()
    }
    assert any(bool(v.abs().sum() > 0) for v in before.values())
    _stage(method, suite, tok, 2, "copy", cfg)
    after = {
        k: m.weight.detach().reshape(-1)[mask1[k].long()] for k, m in method.adapters.b_modules(method.adapter).items()
    }
    for k in before:
        assert torch.equal(before[k], after[k]), k


def _logits(model, tok, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced next-token logits (fp32) at the real tokens of texts, and the attention mask."""
    tok.padding_side = "right"
    tok.pad_token = tok.pad_token or tok.eos_token
    ids = tok(texts, return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        return model(**ids).logits.float(), ids["attention_mask"].bool()


# How far the folded path's logits may sit from the PEFT path's, as a share of the largest logit: fp32 differs only in
# summation order; a bf16 base matmul rounds each activation to 8 bits (2^-8 = 0.4%), compounded over the layers
# (measured on tiny-llama: 2.4%, one Xeon with AMX; 1e-6 in fp32).
FOLD_TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", ["lora", "lori-s"])
def test_folded_evaluation_answers_as_the_peft_path(name, dtype):
    method, tok, cfg = _method(name, dtype)
    suite = load_suite("smoke")
    _stage(method, suite, tok, 1, "weather", cfg, steps=12)
    # An untrained generation is a chain of near-ties that any rounding flips; a trained one is what is evaluated.
    _stage(method, suite, tok, 2, "copy", cfg, steps=40)
    ev = Evaluator(suite, tok, limit=16, progress=False)
    peft = ev.evaluate(method.model, ["weather", "copy"], merged=False, log_samples=True)
    fold = ev.evaluate(method.model, ["weather", "copy"], merged=True, log_samples=True)
    texts = [e["prompt"] + e["completion"] for e in suite.task("copy").train_examples()[:16]]
    a, mask = _logits(method.model, tok, texts)
    with folded(method.model):
        kinds = {type(m) for m in method.model.modules()}
        b, _ = _logits(method.model, tok, texts)
    gap, scale = (a - b).abs()[mask].max(), a.abs()[mask].max()
    assert gap <= FOLD_TOLERANCE[dtype] * scale, (float(gap), float(scale))
    trained = (a - _logits(load_model("tiny-llama", dtype=dtype)[0], tok, texts)[0]).abs()[mask].max()
    assert trained > 4 * gap  # the adapters move the logits far more than folding them does
    top2 = a.topk(2, dim=-1).values
    clear = ((top2[..., 0] - top2[..., 1]) > 2 * gap) & mask  # no rounding within the gap can flip these
    assert torch.equal(a.argmax(-1)[clear], b.argmax(-1)[clear])
    if dtype == "fp32":  # every answer the same; in bf16 a greedy generation may part at a near-tie (within the gap)
        for t in ("weather", "copy"):
            assert [s["pred"] for s in peft.samples[t]] == [s["pred"] for s in fold.samples[t]], t
    ll = [[s["loglikelihoods"] for s in r.samples["weather"]] for r in (peft, fold)]
    ll_peft, ll_fold = torch.tensor(ll[0]), torch.tensor(ll[1])
    assert (ll_peft - ll_fold).abs().max() <= FOLD_TOLERANCE[dtype] * ll_peft.abs().max()
    assert (Fp32FoldedLinear in kinds) == (dtype == "bf16")  # a bf16 base folds into fp32 weights, never into bf16


def test_first_merged_evaluation_checks_folding_against_peft():
    method, tok, cfg = _method("lori-s", "bf16")
    suite = load_suite("smoke")
    _stage(method, suite, tok, 1, "weather", cfg)
    ev = Evaluator(suite, tok, limit=16, progress=False, merged=True)
    ev.evaluate(method.model, ["weather"])
    assert ev.checked_fold and ev.fold_agreement == {"weather": 1.0}


def test_tf32_is_off_inside_exact_matmuls_and_restored():
    set_tf32(True)
    try:
        with exact_matmuls():
            assert not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        set_tf32(False)


def test_unknown_adapter_dtype_is_a_config_error():
    with pytest.raises(ConfigError, match="adapter-dtype.*fp32.*base"):
        load_config(overrides={"adapter_dtype": "fp8"})


def test_fp16_on_cpu_is_refused_before_anything_is_loaded():
    with pytest.raises(ConfigError, match="fp16 weights need a CUDA GPU"):
        check_precision(load_config(overrides={"dtype": "fp16", "device": "cpu"}))


@pytest.mark.parametrize("flag", [["--adapter-dtype", "fp8"], ["--dtype", "fp16", "--device", "cpu"]])
def test_bad_precision_flags_exit_2_and_write_nothing(tmp_path, flag):
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
            *flag,
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "r").exists()


def test_resuming_a_folder_made_under_another_precision_is_refused_naming_both(tmp_path):
    """dtype auto could mean bf16 on a GPU and fp32 on a CPU: the same config.yaml knobs, another computation."""
    from harness.io import atomic_write_json
    from harness.run.folder import PRECISION, check_same_precision

    cpu = {
        "device_type": "cpu",
        "base_dtype": "float32",
        "adapter_dtype": "float32",
        "optimizer_state_dtype": "float32",
        "tf32_train": False,
        "tf32_eval": False,
        "cpu_bf16_autocast": False,
    }
    gpu = {**cpu, "device_type": "cuda", "base_dtype": "bfloat16"}
    check_same_precision(tmp_path, cpu)  # a folder made before precision.json existed continues
    atomic_write_json(tmp_path / PRECISION, gpu)
    with pytest.raises(
        ConfigError,
        match=r"base_dtype: folder 'bfloat16', now 'float32'.*device_type: folder 'cuda', now 'cpu'.*--dtype",
    ):
        check_same_precision(tmp_path, cpu)
    check_same_precision(tmp_path, gpu)
