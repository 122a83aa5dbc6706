"""The evaluation bench: one JSON-able result per mode, and folded weights agree with PEFT on every document.

Structure and agreement only: timings on this machine are noise, so no threshold on them."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from harness.adapters.combine import lora_layers  # noqa: E402
from harness.config import ExperimentConfig  # noqa: E402
from harness.errors import HarnessError  # noqa: E402
from harness.models import load_model  # noqa: E402
from harness.tools.eval_bench import MODES, format_eval_table, load_adapter, run_eval_modes, seeded_adapter  # noqa: E402

CFG = ExperimentConfig(model="tiny-llama", suite="smoke", eval_limit=6)
TASKS = ["parity", "weather", "copy"]


@pytest.fixture(scope="module")
def bench():
    return run_eval_modes(CFG, modes=("merged_fp32", "merged_bf16", "peft_bf16"), repeats=2)


def test_every_mode_reports_seconds_speedup_scores_and_agreement(bench):
    json.dumps(bench)  # JSON-able as it is
    assert bench["model"] == "tiny-llama" and bench["suite"] == "smoke" and bench["tasks"] == TASKS
    assert list(bench["modes"]) == ["peft_fp32", "merged_fp32", "merged_bf16", "peft_bf16"]  # the reference first
    for m in bench["modes"].values():
        assert m["seconds"] > 0 and m["speedup"] > 0 and 0 <= m["agree"] <= 1 and len(m["seconds_all"]) == 2
        assert set(m["tasks"]) == set(TASKS)
        for t, r in m["tasks"].items():
            assert r["documents"] == 6 and 0 <= r["score"] <= 1 and 0 <= r["agree"] <= 1
            assert (r["max_loglikelihood_diff"] is None) == (t == "copy")  # generation has no log-likelihoods
    assert bench["modes"]["peft_fp32"]["speedup"] == 1.0
    assert "merged_bf16" in format_eval_table(bench)


def test_folded_fp32_agrees_with_peft_on_every_document_and_bf16_is_really_bf16(bench):
    merged = bench["modes"]["merged_fp32"]
    assert merged["agree"] == 1.0
    assert all(merged["tasks"][t]["score"] == bench["modes"]["peft_fp32"]["tasks"][t]["score"] for t in TASKS)
    assert all(merged["tasks"][t]["max_loglikelihood_diff"] < 1e-3 for t in ("parity", "weather"))
    # bf16 rounds ~3 significant digits: log-likelihoods move visibly (an fp32 run would stay below 1e-3)
    assert bench["modes"]["merged_bf16"]["tasks"]["parity"]["max_loglikelihood_diff"] > 1e-3


def test_a_saved_adapter_loads_and_scores_as_the_seeded_one(bench, tmp_path):
    model, _ = load_model("tiny-llama")
    seeded_adapter(model, CFG).save_pretrained(str(tmp_path / "adapter"))
    loaded = run_eval_modes(CFG, modes=("peft_fp32",), adapter=tmp_path / "adapter")
    assert loaded["adapter"]["source"] == str(tmp_path / "adapter")
    for t in TASKS:
        assert loaded["modes"]["peft_fp32"]["tasks"][t]["score"] == bench["modes"]["peft_fp32"]["tasks"][t]["score"]


def test_a_stage_folder_loads_every_adapter_active_with_its_weights(tmp_path):
    from harness.adapters.sequence import AdapterSequence

    model, _ = load_model("tiny-llama")
    seq = AdapterSequence(model, rank=4, alpha=8, targets=["q_proj", "v_proj"], a_mode="per_task")
    for t in (1, 2):
        seq.begin_task(t)
        for p in seq.b_params(f"task{t}").values():
            p.data.normal_(0, 0.1)
    seq.save(tmp_path)
    want = {n: p.detach().clone() for n, p in seq.model.named_parameters() if "lora_" in n}
    loaded = load_adapter(load_model("tiny-llama")[0], tmp_path)
    layer = lora_layers(loaded)[0][1]
    assert layer.active_adapters == ["task1", "task2"]
    got = dict(loaded.named_parameters())
    assert all(torch.equal(got[n], w) for n, w in want.items())


def test_unknown_mode_and_a_folder_without_an_adapter_are_clear_errors(tmp_path):
    with pytest.raises(HarnessError, match="choose from"):
        run_eval_modes(CFG, modes=("fast",))
    with pytest.raises(HarnessError, match="1 or more"):
        run_eval_modes(CFG, repeats=0)
    with pytest.raises(HarnessError, match="adapter_config.json"):
        run_eval_modes(CFG, adapter=tmp_path)


def test_modes_cover_peft_and_merged_in_fp32_and_bf16():
    assert set(MODES.values()) == {(False, False), (True, False), (True, True), (False, True)}
