"""A suite's method_knobs: the tuned strength of a baseline as the suite's default, which an experiment's own value
overrides, recorded per sequence with where it came from (summary.json `strength`)."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from harness.cli import main
from harness.config_loading import load_config
from harness.errors import ConfigError
from harness.methods import METHODS
from harness.run.planning import plan
from harness.suites import load_suite

SUITES = Path(__file__).resolve().parents[1] / "task_suites"


def suite_with(tmp_path: Path, method_knobs: dict) -> Path:
    """A copy of the smoke suite whose suite.yaml has these method_knobs."""
    folder = tmp_path / "smoke"
    shutil.copytree(SUITES / "smoke", folder)
    data = yaml.safe_load((folder / "suite.yaml").read_text())
    (folder / "suite.yaml").write_text(yaml.safe_dump({**data, "method_knobs": method_knobs}, sort_keys=False))
    return folder


def specs(folder: Path, **overrides):
    cfg = load_config(None, {"suite": str(folder), "model": "tiny-llama", "seeds": [0], **overrides})
    return {s.method: s for s in plan(cfg, load_suite(folder))}


def test_the_suite_value_is_the_default_and_the_experiment_value_wins(tmp_path):
    folder = suite_with(tmp_path, {"ewc": {"lambda": 400}, "nlora": {"lambda_l1": "1e-3"}})
    got = specs(folder, methods=["ewc", "nlora", "lora"])
    assert got["ewc"].cfg.ewc.lambda_ == 400 and got["nlora"].cfg.nlora.lambda_l1 == 1e-3
    assert got["ewc"].strength == {"knob": "ewc.lambda", "value": 400.0, "source": "suite"}
    assert got["nlora"].strength["source"] == "suite" and got["lora"].strength is None
    mine = specs(folder, methods=["ewc"], **{"ewc.lambda": "50"})["ewc"]
    assert mine.cfg.ewc.lambda_ == 50 and mine.strength["source"] == "experiment"
    plain = specs(SUITES / "smoke", methods=["ewc"])["ewc"]
    assert plain.cfg.ewc.lambda_ == 1000 and plain.strength["source"] == "default"


def test_a_grid_sweeps_over_the_suite_value(tmp_path):
    folder = suite_with(tmp_path, {"ewc": {"lambda": 400}})
    cfg = load_config(
        None,
        {
            "suite": str(folder),
            "model": "tiny-llama",
            "seeds": [0],
            "methods": ["ewc"],
            "grid": {"ewc.lambda": ["10", "400"]},
        },
    )
    got = sorted((s.cfg.ewc.lambda_, s.strength["source"]) for s in plan(cfg, load_suite(folder)))
    assert got == [(10.0, "experiment"), (400.0, "suite")]


def test_sections_of_methods_not_in_the_run_are_left_alone(tmp_path):
    folder = suite_with(tmp_path, {"ewc": {"lambda": 400}, "migu": {"top_fraction": 0.5}})
    got = specs(folder, methods=["lora"])["lora"]
    assert "ewc" not in got.cfg.model_fields_set and got.cfg.to_yaml_dict().get("ewc") is None


@pytest.mark.parametrize(
    "knobs, message",
    [
        ({"ewk": {"lambda": 1}}, r"method_knobs.ewk: no method reads a section 'ewk'"),
        ({"ewc": {"lamda": 1}}, r"method_knobs.ewc.lamda: ewc has no knob 'lamda' \(knobs: lambda, fisher_samples\)"),
        ({"ewc": {"lambda": -1}}, r"method_knobs: ewc.lambda"),
    ],
)
def test_a_bad_method_knob_names_the_suite_file_and_the_key(tmp_path, knobs, message):
    folder = suite_with(tmp_path, knobs)
    with pytest.raises(ConfigError, match=message):
        specs(folder, methods=["ewc"])


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_summary_records_the_strength_a_sequence_ran_at(tmp_path, jobs):
    """In this process and as a --jobs process (which re-plans from the config the driver sends it: a config dumped
    before the suite's knobs were filled in held every knob at its default, and the job ran untuned)."""
    folder = suite_with(tmp_path, {"ewc": {"lambda": 400}})
    assert (
        main(
            [
                "run",
                "--suite",
                str(folder),
                "--model",
                "tiny-llama",
                "--methods",
                "ewc",
                "--tasks",
                "parity,weather",
                "--seeds",
                "0",
                "--max-steps",
                "2",
                "--eval-limit",
                "4",
                "--results-dir",
                str(tmp_path / "r"),
                "--experiment",
                "k",
                "--jobs",
                jobs,
                "--no-progress",
                "--no-report",
            ]
        )
        == 0
    )
    assert yaml.safe_load((tmp_path / "r" / "k" / "config.yaml").read_text())["ewc"]["lambda"] == 400
    seq = tmp_path / "r" / "k" / "ewc" / "seed-0"
    assert json.loads((seq / "summary.json").read_text())["strength"] == {
        "knob": "ewc.lambda",
        "value": 400.0,
        "source": "suite",
    }
    assert yaml.safe_load((seq / "config.yaml").read_text())["ewc"]["lambda"] == 400
    assert main(["report", "k", "--results-dir", str(tmp_path / "r")]) == 0
    page = (tmp_path / "r" / "k" / "report" / "index.html").read_text()
    assert "Baseline strength" in page and "<td>ewc.lambda</td><td>400.0</td>" in page and "tuned on the suite" in page


@pytest.mark.parametrize("suite_name", ["default", "mc4"])
def test_the_bundled_suites_tuned_strengths_are_knobs_their_methods_read(suite_name):
    suite = load_suite(suite_name)
    tuned = [m for m, cls in METHODS.items() if cls.strength]
    for method, spec in specs(SUITES / suite_name, methods=tuned).items():
        section, key = spec.strength["knob"].split(".")
        in_suite = key in suite.method_knobs.get(section, {})
        assert spec.strength["source"] == ("suite" if in_suite else "default"), (method, spec.strength)
        if in_suite:
            assert spec.strength["value"] == pytest.approx(float(suite.method_knobs[section][key]))
