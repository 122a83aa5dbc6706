"""The memory preflight: estimates from a model's config, against what backward keeps; the refusal; dtype auto by size;
gradient checkpointing gives the same losses."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, MistralConfig

from harness.config import ExperimentConfig
from harness.errors import HarnessError
from harness.losses import lm_loss
from harness.methods import METHODS, StageContext
from harness.models import load_model, model_config, module_shapes, resolve_dtype
from harness.models import memory as M
from harness.models.shapes import linear_shapes
from harness.run.recipe import Recipe
from harness.run.train import set_checkpointing, train_stage

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA3_8B = LlamaConfig(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    tie_word_embeddings=False,
)
MISTRAL_7B = MistralConfig(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=32000,
)


def big_estimate(config, dtype, checkpointing=False, batch_size=8, seq_len=512):
    shape = M.shape_of(config)
    adapter, adapted = M.adapter_sizes(linear_shapes(config), TARGETS, 8)
    return shape, M.estimate(
        shape,
        dtype=dtype,
        adapter_params=adapter,
        adapted_params=adapted,
        batch_size=batch_size,
        seq_len=seq_len,
        checkpointing=checkpointing,
        folded_eval=True,
        cuda=True,
    )


@pytest.mark.parametrize("config, params", [(LLAMA3_8B, 8_030_261_248), (MISTRAL_7B, 7_241_732_096)])
def test_8b_and_7b_estimates_from_their_configs(config, params):
    shape, fp32 = big_estimate(config, torch.float32)
    assert shape.params == params  # the published sizes, from the config alone (meta device)
    _, bf16 = big_estimate(config, torch.bfloat16)
    assert fp32.weights == 4 * params and bf16.weights == 2 * params
    assert resolve_dtype("auto", "cuda", params) == torch.bfloat16  # above AUTO_BF16_ABOVE
    adapter, adapted = M.adapter_sizes(linear_shapes(config), TARGETS, 8)
    assert adapter == 8 * 32 * (4 * 4096 + 1024 * 2 + 4096 * 2 + 3 * (4096 + 14336))  # r·(d_in + d_out), 7 modules x 32
    assert bf16.evaluation == 4 * adapted  # folded evaluation's fp32 copies of the adapted layers
    _, ckpt = big_estimate(config, torch.bfloat16, checkpointing=True)
    assert ckpt.activations < bf16.activations / 10 and ckpt.total <= bf16.total
    assert bf16.total < 74 * M.GiB < fp32.total  # an 80 GB card (about 74 GiB free) takes bf16, not fp32


def test_a_stage_that_cannot_fit_is_refused_with_what_would_fit():
    shape, _ = big_estimate(LLAMA3_8B, torch.float32)
    adapter, adapted = M.adapter_sizes(linear_shapes(LLAMA3_8B), TARGETS, 8)
    kw = dict(
        adapter_params=adapter,
        adapted_params=adapted,
        batch_size=8,
        seq_len=512,
        folded_eval=True,
        device=torch.device("cuda", 0),
    )
    with pytest.raises(HarnessError) as exc:  # a 40 GiB card, simulated: nothing touches CUDA
        M.preflight(shape, dtype=torch.float32, checkpointing=False, free=40 * M.GiB, **kw)
    msg = str(exc.value)
    assert msg.startswith("memory: a training stage of this model (batch 8 x 512 tokens") and "40.0 GiB is free" in msg
    assert "--dtype bf16: " in msg and "--gradient-checkpointing true: " in msg and "--eval-merged false" in msg
    assert "weights 29.9 GiB" in msg and "folded evaluation 26.0 GiB" in msg and "all of these: " in msg
    fits = M.preflight(shape, dtype=torch.bfloat16, checkpointing=True, free=40 * M.GiB, **{**kw, "folded_eval": False})
    assert fits.total < 40 * M.GiB


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_estimate_errs_high_against_what_backward_keeps_on_the_tiny_model(checkpointing):
    """Measured: the bytes of every tensor autograd saves for backward in one forward (parameters excepted)."""
    model, tok = load_model("tiny-llama")
    cfg = ExperimentConfig(model="tiny-llama", methods=["lora"])
    method = METHODS["lora"](cfg, seed=0, tasks=["a"], base_model=model)
    method.begin_stage(StageContext(stage=1, task="a", run_dir=None, calibrate=None))
    set_checkpointing(method.model, checkpointing)
    method.model.train()
    ids = torch.randint(5, 400, (8, 128), generator=torch.Generator().manual_seed(0))
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lm_loss(method.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, ids, "token")
    params = {p.untyped_storage().data_ptr() for p in method.model.parameters()}
    measured = sum(n for ptr, n in saved.items() if ptr not in params)
    adapter, adapted = M.adapter_sizes(module_shapes(model), cfg.targets, cfg.rank)
    est = M.estimate(
        M.shape_of(model_config("tiny-llama")),
        dtype=torch.float32,
        adapter_params=adapter,
        adapted_params=adapted,
        batch_size=8,
        seq_len=128,
        checkpointing=checkpointing,
        folded_eval=False,
        cuda=False,
    )
    assert measured <= est.activations + est.logits <= (2.5 if not checkpointing else 6) * measured


def test_dtype_auto_is_fp32_for_the_small_models_and_records_what_it_picked():
    assert resolve_dtype("auto", "cpu", M.model_params("tiny-llama")) == torch.float32
    assert resolve_dtype("auto", "cpu", None) == torch.float32
    assert resolve_dtype("fp32", "cuda", 8_000_000_000) == torch.float32  # an explicit dtype always wins


def test_gradient_checkpointing_gives_the_same_losses_on_the_tiny_model():
    losses = {}
    for on in (False, True):
        model, tok = load_model("tiny-llama")
        cfg = ExperimentConfig(model="tiny-llama", methods=["lora"], gradient_checkpointing=on)
        method = METHODS["lora"](cfg, seed=0, tasks=["a"], base_model=model)
        method.begin_stage(StageContext(stage=1, task="a", run_dir=None, calibrate=None))
        examples = [
            {"prompt": f"count {i} to", "completion": " " + " ".join(str(i + k) for k in range(3)), "eos": True}
            for i in range(16)
        ]
        res = train_stage(
            method.model,
            tok,
            examples,
            method.trainable(),
            recipe=Recipe.from_config(cfg),
            lr=1e-3,
            epochs=1,
            batch_size=4,
            max_steps=4,
            progress=False,
        )
        losses[on] = res.losses
        assert method.model.get_base_model().is_activation_checkpointing == on
    assert len(losses[True]) > 0 and losses[True] == pytest.approx(losses[False], rel=1e-5)
