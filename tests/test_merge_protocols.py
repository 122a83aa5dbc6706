"""`harness merge --merge-protocol`: the LoRI paper's fixed weights beside weights tuned on the validation split, from
the same task adapters, in one folder and one report table; protocols that cannot apply are refused before anything
is written."""

from __future__ import annotations

import json

import pytest
from test_validation_split import smoke_with_validation

from harness.cli import main
from harness.config import ExperimentConfig
from harness.run import merge_weights as MW


def test_the_paper_weights_depend_on_the_method_and_the_number_of_adapters():
    cfg = ExperimentConfig(model="tiny-llama", suite="smoke", methods=["lora"])
    assert (
        MW.weights_for(cfg, "lori-d", 3, "paper") == [0.5] * 3
        and MW.weights_for(cfg, "lori-s", 3, "paper") == [0.4] * 3
    )
    assert (
        MW.weights_for(cfg, "lori-d", 4, "paper") == [0.4] * 4
        and MW.weights_for(cfg, "lori-s", 4, "paper") == [0.3] * 4
    )
    assert MW.weights_for(cfg, "lora", 4, "paper") == [0.4] * 4  # dense adapters take LoRI-D's
    assert MW.weights_for(cfg, "lora", 2, "equal") == [0.5, 0.5] and MW.weights_for(cfg, "lora", 3, "tuned") is None
    assert MW.protocols(cfg, 4) == ["paper"] and MW.protocols(cfg, 2) == ["equal"]
    assert MW.protocols(cfg.model_copy(update={"merge_weight_grid": [0.5, 1.0]}), 4) == ["tuned"]
    assert MW.protocols(cfg.model_copy(update={"merge_weights": [0.7]}), 4) == ["fixed"]
    assert (
        MW.label("linear", "paper", ["paper"]) == "linear"
        and MW.label("linear", "paper", ["paper", "tuned"]) == "linear@paper"
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "parity,weather", "--merge-protocol", "paper"], "3 or 4 adapters"),
        (["--merge-protocol", "tuned"], "needs --merge-weight-grid"),
        (["--merge-protocol", "fixed"], "needs --merge-weights"),
    ],
)
def test_a_protocol_that_cannot_apply_is_refused_before_anything_is_written(tmp_path, capsys, args, message):
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
            "--results-dir",
            str(tmp_path / "r"),
            *args,
        ]
    )
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").rglob("*.json"))


@pytest.mark.slow
def test_paper_and_tuned_merges_share_the_adapters_and_one_report_table(tmp_path):
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
                "lori-s",
                "--max-steps",
                "1",
                "--merge-methods",
                "linear",
                "--merge-protocol",
                "paper,tuned",
                "--merge-weight-grid",
                "0.25,1",
                "--experiment",
                "mp",
                "--results-dir",
                str(results),
            ]
        )
        == 0
    )
    folder = results / "mp" / "merge" / "lori-s" / "seed-0"
    rows = json.loads((folder / "merged.json").read_text())["rows"]
    assert [(r["protocol"], r["combination"]) for r in rows] == [("paper", "linear"), ("tuned", "linear")]
    paper, tuned = rows
    assert paper["weights"] == [0.4] * 3 and paper["weight_selection"] is None  # LoRI-S, 3 adapters: the paper's 0.4
    assert tuned["weights"] == [tuned["weight_selection"]["chosen"]] * 3 and tuned["weight_selection"]["chosen"] in (
        0.25,
        1.0,
    )
    summary = json.loads((folder / "summary.json").read_text())
    assert set(summary["merges"]) == {"linear@paper", "linear@tuned"} and summary["merge_protocols"] == [
        "paper",
        "tuned",
    ]
    assert sorted(p.name for p in (folder / "adapters").iterdir()) == sorted(summary["tasks"])  # trained once, for both
    docs = json.loads((folder / "documents.json").read_text())["documents"]
    assert all(set(d["merged"]) == {"linear@paper", "linear@tuned"} for d in docs.values())
    html = (results / "mp" / "report" / "index.html").read_text()
    assert "linear@paper" in html and "linear@tuned" in html
    assert "paper = the LoRI paper&#x27;s weights" in html or "paper = the LoRI paper's weights" in html
    assert "paper,tuned" in html  # the protocol row names what ran


@pytest.mark.parametrize(
    "best, expected_tried, chosen, at_end",
    [
        (0.05, [0.25, 1.0, 0.125, 0.0625, 0.03125], 0.0625, False),  # below the grid: halved until interior
        (0.6, [0.25, 1.0, 0.125], 0.25, False),  # 0.25 wins at the low end; 0.125 scores worse: 0.25 is now interior
        (5.0, [0.25, 1.0, 2.0, 4.0, 8.0], 4.0, False),
        (100.0, [0.25, 1.0, 2.0, 4.0, 8.0], 8.0, True),  # still at the end after 3 extensions: said so
    ],
)
def test_a_tuned_weight_at_an_end_of_the_grid_is_pushed_past_it(monkeypatch, best, expected_tried, chosen, at_end):
    from harness.run.merge import MergeRunner

    runner = object.__new__(MergeRunner)
    runner.cfg = ExperimentConfig(model="tiny-llama", suite="smoke", methods=["lora"], merge_weight_grid=[0.25, 1.0])
    runner.spec = type("Spec", (), {"label": "merge/lora/seed-0"})()
    monkeypatch.setattr(MergeRunner, "_validation_score", lambda self, f, c, s, w: -abs(w - best))
    sel = runner._select_weight({}, "linear", ["a", "b"])
    assert [c["weight"] for c in sel["candidates"]] == expected_tried
    assert sel["chosen"] == chosen and sel["at_grid_end"] is at_end and sel["extended"] == expected_tried[2:]


@pytest.mark.slow
def test_verify_checks_a_merge_folder_and_names_a_flipped_file(tmp_path, capsys):
    results = tmp_path / "r"
    assert (
        main(
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
                "--tasks",
                "parity,weather",
                "--max-steps",
                "1",
                "--merge-methods",
                "cat",
                "--experiment",
                "v",
                "--results-dir",
                str(results),
            ]
        )
        == 0
    )
    folder = results / "v" / "merge" / "lora" / "seed-0"
    capsys.readouterr()
    assert main(["verify", str(results / "v")]) == 0
    out = capsys.readouterr().out
    assert "0 sequence folder(s) and 1 merge folder(s) checked" in out and "FAIL" not in out

    def flipped(path):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 1
        path.write_bytes(bytes(data))
        code = main(["verify", str(folder)])
        text = capsys.readouterr().out
        path.write_bytes(
            bytes(data[: len(data) // 2]) + bytes([data[len(data) // 2] ^ 1]) + bytes(data[len(data) // 2 + 1 :])
        )
        return code, text

    for victim in (folder / "merged.json", folder / "adapters" / "parity" / "adapter_model.safetensors"):
        code, text = flipped(victim)
        assert code == 1 and str(victim) in text and "SHA-256 differs" in text, text
    assert main(["verify", str(folder)]) == 0  # restored
    capsys.readouterr()
    summary = json.loads((folder / "summary.json").read_text())
    summary["merges"]["cat"]["normalised_accuracy"] += 0.01  # a number no longer what its documents give
    (folder / "summary.json").write_text(json.dumps(summary))
    assert main(["verify", str(folder)]) == 1
    assert "cat: normalised_accuracy" in capsys.readouterr().out
