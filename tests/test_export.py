"""`harness export`: a stock PEFT folder per stage, bit-identical logits, LoRI-S invariants checkable from the files."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file

from harness.adapters.peft_folder import write_peft_folder
from harness.cli import main
from harness.config_loading import load_config
from harness.errors import HarnessError
from harness.methods import METHODS, StageContext
from harness.methods.lori import stage_files as SF
from harness.models import load_model
from harness.run.export import export_adapter, trained_stages

X = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 311], [400, 2, 64, 128, 9, 77, 500, 1]])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    results = tmp_path_factory.mktemp("export")
    assert (
        main(
            [
                "run",
                "--suite",
                "smoke",
                "--model",
                "tiny-llama",
                "--seeds",
                "0",
                "--no-progress",
                "--no-report",
                "--methods",
                "lori-s,lora",
                "--epochs",
                "1",
                "--results-dir",
                str(results),
                "--experiment",
                "ex",
            ]
        )
        == 0
    )
    return results / "ex"


def harness_model(run_dir: Path, stage: int):
    """The harness's own model at `stage`: the method restored from the committed stage folders."""
    data = yaml.safe_load((run_dir / "config.yaml").read_text())
    seq = data.pop("sequence")
    cfg = load_config(None, {**data, "results_dir": "."})
    method = METHODS[seq["method"]](cfg, seed=seq["seed"], tasks=seq["tasks"], base_model=load_model("tiny-llama")[0])
    method.restore({t: p for t, p in trained_stages(run_dir).items() if t <= stage})
    return method


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=X).logits


def stock(folder: Path):
    """What a user does: stock PEFT on a fresh base model."""
    return PeftModel.from_pretrained(load_model("tiny-llama")[0], str(folder))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lori-s", "lora"])
@pytest.mark.parametrize("stage", [None, 1])
def test_export_loads_in_stock_peft_with_bit_identical_logits(runs, tmp_path, method, stage):
    run_dir = runs / method / "seed-0"
    out = export_adapter(run_dir, tmp_path / "out", stage)
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    t = stage or max(trained_stages(run_dir))
    ref = logits(harness_model(run_dir, t).model)
    got = logits(stock(out))
    assert torch.equal(got, ref)
    assert not torch.equal(got, logits(load_model("tiny-llama")[0])), "the adapter must change the outputs"


@pytest.mark.slow
def test_lori_s_stage_folders_hold_masks_and_values_only_and_invariants_check_from_files(runs, tmp_path):
    run_dir = runs / "lori-s" / "seed-0"
    stages = [p for _, p in sorted(trained_stages(run_dir).items())]
    for p in stages:
        assert not (p / "adapter").exists() and {SF.MASKS, SF.VALUES, SF.META} <= {f.name for f in p.iterdir()}
    masks = [SF.load_masks(p) for p in stages]
    exported = []
    for t in range(1, len(stages) + 1):
        exported.append(load_file(str(export_adapter(run_dir, tmp_path / f"s{t}", t) / "adapter_model.safetensors")))
    assert set(masks[0]) == {k for k in exported[-1] if ".lora_B." in k}  # masks keyed like the exported lora_B
    for k in masks[0]:
        union = sum(m[k].int() for m in masks)
        assert union.max() <= 1, "disjoint masks overlap"
        assert (exported[-1][k][union == 0] == 0).all()
        assert torch.equal(exported[-1][k][masks[0][k]], exported[0][k][masks[0][k]])  # task 1's entries, bit-identical
        assert torch.equal(exported[-1][k][masks[0][k]], load_file(str(stages[0] / SF.VALUES))[k])


def test_per_task_adapters_export_as_one_stacked_adapter_with_the_exact_sum(tmp_path):
    """Two per-task LoRI-S adapters -> one rank-2r adapter: ΔW equal to the sum, logits to float rounding."""
    model, _ = load_model("tiny-llama")
    cfg = load_config(None, {"model": "tiny-llama", "a_mode": "per_task", "results_dir": "."})
    method = METHODS["lori-s"](cfg, seed=0, tasks=["a", "b"], base_model=model)
    run_dir = tmp_path / "run"
    (run_dir / "stages").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({**cfg.to_yaml_dict(), "sequence": {"method": "lori-s"}}))
    for t in (1, 2):
        method.begin_stage(StageContext(stage=t, task="ab"[t - 1], run_dir=run_dir, calibrate=None))
        with torch.no_grad():
            for p in method.trainable().values():
                p.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(t))
        method.end_stage()
        folder = run_dir / "stages" / f"{t}-{'ab'[t - 1]}"
        folder.mkdir()
        method.save_stage(folder)
        (folder / "stage.json").write_text("{}")
    (tmp_path / "live").mkdir()
    write_peft_folder(method.adapters, tmp_path / "live")
    out = export_adapter(run_dir, tmp_path / "out")
    from_files, from_live = (
        load_file(str(out / "adapter_model.safetensors")),
        load_file(str(tmp_path / "live" / "adapter_model.safetensors")),
    )
    assert from_files.keys() == from_live.keys() and all(torch.equal(from_files[k], from_live[k]) for k in from_files)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 2 * cfg.rank and config["lora_alpha"] == 2 * cfg.scale_alpha
    loaded = stock(out)
    layer = dict(loaded.named_modules())["base_model.model.model.layers.0.self_attn.q_proj"]
    ours = dict(method.model.named_modules())["base_model.model.model.layers.0.self_attn.q_proj"]
    torch.testing.assert_close(
        layer.get_delta_weight("default"),
        ours.get_delta_weight("task1") + ours.get_delta_weight("task2"),
        rtol=1e-6,
        atol=1e-7,
    )
    torch.testing.assert_close(logits(loaded), logits(method.model), rtol=1e-5, atol=1e-5)


def test_export_refuses_what_it_cannot_do_with_one_clear_message(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with pytest.raises(HarnessError, match="not a sequence folder"):
        export_adapter(tmp_path, tmp_path / "out")
    (run_dir / "stages" / "1-a").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("model: tiny-llama\n")
    with pytest.raises(HarnessError, match="no training stage is committed"):
        export_adapter(run_dir, tmp_path / "out")
    (run_dir / "stages" / "1-a" / "stage.json").write_text("{}")
    with pytest.raises(HarnessError, match=r"stage 3 is not committed .* \(committed: 1\)"):
        export_adapter(run_dir, tmp_path / "out", 3)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(HarnessError, match="not an empty folder"):
        export_adapter(run_dir, tmp_path / "full", 1)
    assert (tmp_path / "full" / "x").read_text() == "keep me"
