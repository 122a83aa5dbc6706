"""The validation split: carved from the training data with a fixed seed, never trained on, never a test document;
grid selection uses it when every task has one and the report says which split chose."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from harness.cli import main
from harness.errors import SuiteError
from harness.suites import data
from harness.suites.loading import load_suite

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("suite", ["default", "mc4"])
def test_the_validation_split_never_overlaps_train_or_test(suite):
    s = load_suite(suite)
    for t in s.tasks:
        assert t.validation is not None
        train, val, test = t.train_records(), t.validation_records(), t.test_records()
        assert len(val) == t.validation.size and len(train) + len(val) == t.sizes.train
        prompts = {
            name: {t.render(r)["prompt"] for r in rows}
            for name, rows in (("train", train), ("val", val), ("test", test))
        }
        assert len(prompts["val"]) == len(val)
        assert not prompts["val"] & prompts["train"], f"{suite}/{t.name}: validation shares prompts with train"
        assert not prompts["val"] & prompts["test"], f"{suite}/{t.name}: validation shares prompts with test"
        assert [e["prompt"] for e in t.train_examples()] == [
            t.render(r)["prompt"] for r in train
        ]  # trained on: train only


def test_the_validation_split_is_the_same_at_every_load_and_differs_by_task():
    a, b = load_suite("default"), load_suite("default")
    idx = {t.name: data.validation_indices(t) for t in a.tasks}
    assert idx == {t.name: data.validation_indices(t) for t in b.tasks}
    assert len({tuple(v) for v in idx.values()}) == len(idx)


def smoke_with_validation(tmp_path: Path, size: int) -> Path:
    folder = tmp_path / "smoke-val"
    shutil.copytree(ROOT / "task_suites" / "smoke", folder)
    suite = folder / "suite.yaml"
    suite.write_text(
        suite.read_text().replace(
            "    sizes: {train: 64, test: 32}\n",
            f"    sizes: {{train: 64, test: 32}}\n    validation: {{size: {size}}}\n",
        )
    )
    return suite


def test_a_validation_split_as_large_as_the_training_data_is_refused(tmp_path, capsys):
    suite = smoke_with_validation(tmp_path, 64)
    with pytest.raises(SuiteError, match=r"validation.size: 64, but the task has only 64 training examples"):
        load_suite(suite).task("parity").train_records()
    assert main(["validate", "--suite", str(suite)]) == 2
    assert "validation.size: 64" in capsys.readouterr().err


@pytest.mark.slow
def test_grid_selection_uses_the_validation_split_and_says_so(tmp_path):
    suite = smoke_with_validation(tmp_path, 8)
    results = tmp_path / "results"
    assert (
        main(
            [
                "run",
                "--suite",
                str(suite),
                "--model",
                "tiny-llama",
                "--seeds",
                "0",
                "--no-progress",
                "--methods",
                "lora",
                "--tasks",
                "parity,weather",
                "--max-steps",
                "1",
                "--grid",
                "lr_lora=1e-3,2e-3",
                "--experiment",
                "val",
                "--results-dir",
                str(results),
            ]
        )
        == 0
    )
    summaries = [json.loads(p.read_text()) for p in (results / "val").glob("variant-*/lora/seed-0/summary.json")]
    assert len(summaries) == 2
    for s in summaries:
        val = s["validation"]
        assert val["tasks"] == ["parity", "weather"] and val["complete"]
        assert val["acc"] == pytest.approx(sum(val["scores"].values()) / 2)
    train = next((results / "val").glob("variant-*/lora/seed-0/stages/1-parity/train.json"))
    assert json.loads(train.read_text())["train_examples"] == 56  # 64 minus the 8 held out
    comp = json.loads((results / "val" / "report" / "comparison.json").read_text())
    assert comp["selection"]["split"] == "validation" and "validation split" in comp["selection"]["criterion"]
    best = max(comp["variants"], key=lambda v: v["validation_ACC"]["mean"])
    assert comp["selection"]["chosen"]["lora"] == best["variant"]
    assert "The test split did not choose" in (results / "val" / "report" / "index.html").read_text()


def test_a_merge_weight_grid_without_validation_splits_is_refused_before_anything_is_written(tmp_path, capsys):
    code = main(
        [
            "merge",
            "--suite",
            "smoke",
            "--model",
            "tiny-llama",
            "--methods",
            "lora",
            "--seeds",
            "0",
            "--no-progress",
            "--merge-weight-grid",
            "0.5,1",
            "--results-dir",
            str(tmp_path / "r"),
        ]
    )
    assert code == 2 and "validation split on every merged task" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").rglob("summary.json"))


@pytest.mark.slow
def test_merge_weights_are_chosen_on_the_validation_split(tmp_path):
    suite = smoke_with_validation(tmp_path, 8)
    results = tmp_path / "results"
    assert (
        main(
            [
                "merge",
                "--suite",
                str(suite),
                "--model",
                "tiny-llama",
                "--seeds",
                "0",
                "--no-progress",
                "--methods",
                "lora",
                "--tasks",
                "parity,weather",
                "--max-steps",
                "1",
                "--merge-methods",
                "cat",
                "--merge-weight-grid",
                "0.5,1,2",
                "--merge-grid-extend",
                "0",
                "--experiment",
                "mw",
                "--results-dir",
                str(results),
            ]
        )
        == 0
    )
    row = json.loads(next(results.rglob("merged.json")).read_text())["rows"][0]
    sel = row["weight_selection"]
    assert sel["split"] == "validation" and [c["weight"] for c in sel["candidates"]] == [0.5, 1.0, 2.0]
    best = max(sel["candidates"], key=lambda c: c["validation_score"])  # the first on a tie, as the protocol
    assert sel["chosen"] == best["weight"] and row["weights"] == [best["weight"]] * 2
    summary = json.loads(next(results.rglob("merge/lora/seed-0/summary.json")).read_text())
    assert summary["merges"]["cat"]["weight_selection"]["chosen"] == sel["chosen"]
    html = (results / "mw" / "report" / "index.html").read_text()
    assert f'weight chosen on the validation split (per combination)</td><td class="l">cat {sel["chosen"]:g}' in html
