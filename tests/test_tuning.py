"""harness tuning: a baseline's strength chosen on the validation split, never the test split; its evidence."""

import json
from pathlib import Path

import pytest
import yaml

from harness.cli import main
from harness.errors import HarnessError
from harness.tools.tuning import choose, collect, pending


def row(value, val, acc=0.5):
    return {"value": value, "validation_acc": val, "acc": acc, "bwt": -0.1, "forgetting": 0.1}


def test_the_validation_split_chooses_and_the_test_split_does_not():
    rows = [row(100.0, 0.60, acc=0.9), row(1000.0, 0.70, acc=0.1), row(10000.0, 0.65, acc=0.5)]
    assert choose(rows, 1000.0)["value"] == 1000.0


def test_a_tie_goes_to_the_default_else_to_the_first_value():
    assert choose([row(100.0, 0.7), row(1000.0, 0.7), row(10000.0, 0.6)], 1000.0)["value"] == 1000.0
    assert choose([row(100.0, 0.7), row(1000.0, 0.6), row(10000.0, 0.7)], 1000.0)["value"] == 100.0


def test_a_value_without_validation_acc_is_refused():
    with pytest.raises(HarnessError, match=r"values \[1000.0\]: no validation ACC.*validation: \{size: N\}"):
        choose([row(100.0, 0.7), row(1000.0, None)], 1000.0)


def fake_sequence(root: Path, value: float, val: float, acc: float, rank: int = 8) -> None:
    folder = root / f"variant-{value:g}" / "ewc" / "seed-0"
    (folder / "stages").mkdir(parents=True)
    config = {"methods": ["ewc"], "ewc": {"lambda": value}, "grid": {"ewc.lambda": [str(value)]}, "rank": rank}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    summary = {
        "method": "ewc",
        "seed": 0,
        "acc": acc,
        "bwt": -0.2,
        "forgetting": 0.2,
        "la": 0.9,
        "validation": {"acc": val, "complete": True},
    }
    (folder / "summary.json").write_text(json.dumps(summary))


def test_collect_writes_the_choice_and_each_value_s_evidence(tmp_path, capsys):
    runs = tmp_path / "tune"
    for value, val, acc in ((100.0, 0.5, 0.4), (1000.0, 0.6, 0.3), (10000.0, 0.8, 0.2)):
        fake_sequence(runs, value, val, acc)
    out = collect(runs, "default", root=tmp_path / "evidence")
    ewc = out["methods"]["ewc"]
    assert ewc["chosen"] == 10000.0 and ewc["at_grid_end"] and ewc["default"] == 1000.0
    assert [v["value"] for v in ewc["values"]] == [100.0, 1000.0, 10000.0]
    written = json.loads((tmp_path / "evidence" / "tuning-default" / "tuning.json").read_text())
    assert written["methods"]["ewc"]["chosen"] == 10000.0
    assert (tmp_path / "evidence" / "tuning-default" / "ewc" / "ewc.lambda=100.0" / "summary.json").is_file()


def test_the_command_prints_the_table_and_the_suite_lines(tmp_path, capsys, monkeypatch):
    fake_sequence(tmp_path / "tune", 100.0, 0.5, 0.4)
    fake_sequence(tmp_path / "tune", 1000.0, 0.6, 0.3)
    monkeypatch.chdir(tmp_path)
    assert main(["tuning", str(tmp_path / "tune"), "--suite", "default"]) == 0
    text = capsys.readouterr().out
    assert "<- chosen (at the grid's end)" in text and "method_knobs:\n  ewc: {lambda: 1000.0}" in text
    assert main(["tuning", str(tmp_path / "tune"), "--suite", "default", "--markdown"]) == 0
    assert (
        "| ewc | `ewc.lambda` | 1000 | 0.600 | 0.300 | -0.200 | 0.900 | **chosen**, at the grid's end (default) |"
        in capsys.readouterr().out
    )
    assert main(["tuning", str(tmp_path / "nothing"), "--suite", "default"]) == 0  # the evidence just written
    assert main(["tuning", str(tmp_path / "nothing"), "--suite", "mc4"]) == 2  # no runs, no evidence


def test_one_finished_value_chooses_nothing(tmp_path):
    fake_sequence(tmp_path / "tune", 100.0, 0.5, 0.4)
    ewc = collect(tmp_path / "tune", "default", root=tmp_path / "evidence")["methods"]["ewc"]
    assert ewc["chosen"] is None and not ewc["at_grid_end"]


def test_a_tuning_grows_from_its_evidence_across_sessions(tmp_path):
    evidence = tmp_path / "evidence"
    fake_sequence(tmp_path / "first", 100.0, 0.5, 0.4)
    fake_sequence(tmp_path / "first", 1000.0, 0.6, 0.3)
    collect(tmp_path / "first", "default", root=evidence)
    # a fresh clone: the first session's runs are gone, its evidence is not
    assert pending("ewc:ewc.lambda=100,1e3,1e4", "default", root=evidence) == "ewc:ewc.lambda=1e4"
    assert pending("ewc:ewc.lambda=100,1000", "default", root=evidence) == ""
    fake_sequence(tmp_path / "second", 10000.0, 0.8, 0.2)
    fake_sequence(tmp_path / "second", 100.0, 0.4, 0.4)  # a value run again replaces its evidence
    ewc = collect(tmp_path / "second", "default", root=evidence)["methods"]["ewc"]
    assert [(v["value"], v["validation_acc"]) for v in ewc["values"]] == [(100.0, 0.4), (1000.0, 0.6), (10000.0, 0.8)]
    assert ewc["chosen"] == 10000.0
    alone = collect(tmp_path / "absent", "default", root=evidence)["methods"]["ewc"]
    assert alone == ewc  # the evidence alone gives the same choice


def test_a_run_at_other_settings_never_joins_the_evidence(tmp_path):
    evidence = tmp_path / "evidence"
    fake_sequence(tmp_path / "first", 100.0, 0.5, 0.4)
    collect(tmp_path / "first", "default", root=evidence)
    fake_sequence(tmp_path / "second", 1000.0, 0.6, 0.3, rank=32)
    with pytest.raises(HarnessError, match="settings differ .* in rank"):
        collect(tmp_path / "second", "default", root=evidence)
    assert not (evidence / "tuning-default" / "ewc" / "ewc.lambda=1000.0").exists()


def test_pending_refuses_a_grid_it_cannot_read():
    with pytest.raises(HarnessError, match="expected METHOD:KNOB=V1,V2"):
        pending("lora:lora.x=1", "default")
    with pytest.raises(HarnessError, match="must be numbers"):
        pending("ewc:ewc.lambda=big", "default")
