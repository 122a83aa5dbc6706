"""Configuration and CLI: one definition per knob, YAML + flags, clear errors with exit code 2."""

import subprocess
import sys

import pytest

from harness.cli import build_parser, main
from harness.config import ExperimentConfig, load_config


def test_every_knob_is_a_flag_with_help_and_default():
    help_text = build_parser()._subparsers._group_actions[0].choices["run"].format_help()
    for name, field in ExperimentConfig.model_fields.items():
        assert f"--{name.replace('_', '-')}" in help_text, name
        assert field.description, f"{name} has no help text"


def test_help_lists_only_working_commands():
    out = subprocess.run([sys.executable, "-m", "harness.cli", "--help"], capture_output=True, text=True).stdout
    for cmd in ("run", "resume", "validate", "suites", "report", "dashboard", "bench"):
        assert cmd in out


def test_yaml_then_flags_override(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("suite: smoke\nrank: 4\nmethods: [lora]\nseeds: [1, 2]\n")
    cfg = load_config(p, {"rank": "16"})
    assert (cfg.suite, cfg.rank, cfg.methods, cfg.seeds) == ("smoke", 16, ["lora"], [1, 2])


def test_unknown_yaml_key_names_file_and_key(tmp_path, capsys):
    p = tmp_path / "exp.yaml"
    p.write_text("suite: smoke\nrnak: 4\n")
    assert main(["validate", str(p)]) == 2
    err = capsys.readouterr().err
    assert str(p) in err and "rnak" in err and "unknown key" in err


def test_bad_value_names_the_key(tmp_path, capsys):
    p = tmp_path / "exp.yaml"
    p.write_text("mask_density: 1.5\n")
    assert main(["validate", str(p)]) == 2
    assert "mask_density" in capsys.readouterr().err


def test_yaml_is_loaded_safely(tmp_path, capsys):
    p = tmp_path / "exp.yaml"
    p.write_text("suite: !!python/object/apply:os.system ['echo pwned']\n")
    assert main(["validate", str(p)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_validate_a_good_config_writes_nothing(tmp_path, capsys):
    results = tmp_path / "results"
    assert main(["validate", "--suite", "smoke", "--model", "tiny-llama", "--results-dir", str(results)]) == 0
    assert "config OK" in capsys.readouterr().out
    assert not results.exists()


def test_validate_refuses_impossible_capacity(capsys):
    assert main(["validate", "--suite", "default", "--model", "tiny-llama", "--mask-density", "0.3"]) == 2
    assert "capacity" in capsys.readouterr().err


def test_validate_suite_only(capsys):
    assert main(["validate", "--suite", "smoke"]) == 0
    assert "suite smoke: OK" in capsys.readouterr().out


def test_hub_model_offline_is_exit_2_with_one_paragraph(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "harness.cli", "validate", "--model", "meta-llama/Meta-Llama-3-8B",
                          "--results-dir", str(tmp_path / "r")], capture_output=True, text=True, env=env)
    assert out.returncode == 2
    assert "meta-llama/Meta-Llama-3-8B" in out.stderr and "Traceback" not in out.stderr


def test_max_overlap_needs_its_policy():
    with pytest.raises(Exception, match="max_overlap"):
        load_config(None, {"max_overlap": 0.2})


def test_one_lr_for_every_method_as_the_issue_spells_the_grid():
    """`--grid "lr=1e-3,2e-3;warmup_steps=0,5"`: lr sets every family's rate unless the family's own knob is given."""
    from harness.config import load_config, parse_grid
    from harness.run.planning import variants

    cfg = load_config(None, {"methods": ["lora", "lori-s"], "grid": parse_grid("lr=1e-3,2e-3;warmup_steps=0,5")})
    got = sorted((v["lr"], v["warmup_steps"], c.lr_for("lora"), c.lr_for("lori-s")) for _, v, c in variants(cfg))
    assert got == [(1e-3, 0, 1e-3, 1e-3), (1e-3, 5, 1e-3, 1e-3), (2e-3, 0, 2e-3, 2e-3), (2e-3, 5, 2e-3, 2e-3)]
    own = load_config(None, {"lr": "1e-3", "lr_lori_s": "2e-2"})
    assert own.lr_for("lora") == 1e-3 and own.lr_for("lori-s") == 2e-2
