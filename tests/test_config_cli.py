"""Configuration and CLI: one definition per knob, YAML + flags, clear errors with exit code 2."""

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness import legacy_keys
from harness.cli import build_parser, main
from harness.config import ExperimentConfig
from harness.config_loading import load_config, parse_grid
from harness.run.folder import check_same_config
from harness.run.planning import variants


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
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness.cli",
            "validate",
            "--model",
            "meta-llama/Meta-Llama-3-8B",
            "--results-dir",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 2
    assert "meta-llama/Meta-Llama-3-8B" in out.stderr and "Traceback" not in out.stderr


def test_max_overlap_needs_its_policy():
    with pytest.raises(Exception, match="max_overlap"):
        load_config(None, {"max_overlap": 0.2})


def test_one_lr_for_every_method_as_the_issue_spells_the_grid():
    """`--grid "lr=1e-3,2e-3;warmup_steps=0,5"`: lr sets every family's rate unless the family's own knob is given."""
    from harness.config_loading import load_config, parse_grid
    from harness.run.planning import variants

    cfg = load_config(None, {"methods": ["lora", "lori-s"], "grid": parse_grid("lr=1e-3,2e-3;warmup_steps=0,5")})
    got = sorted((v["lr"], v["warmup_steps"], c.lr_for("lora"), c.lr_for("lori-s")) for _, v, c in variants(cfg))
    assert got == [(1e-3, 0, 1e-3, 1e-3), (1e-3, 5, 1e-3, 1e-3), (2e-3, 0, 2e-3, 2e-3), (2e-3, 5, 2e-3, 2e-3)]
    own = load_config(None, {"lr": "1e-3", "lr_lori_s": "2e-2"})
    assert own.lr_for("lora") == 1e-3 and own.lr_for("lori-s") == 2e-2


# --- LoRI's knobs: a section like every method's, the old top-level names still work ------------------------
def test_lori_knobs_are_a_section_read_from_yaml_flags_and_old_names(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(legacy_keys, "_noted", set())  # the note is said once per process: as if this were the first
    p = tmp_path / "new.yaml"
    p.write_text("methods: [lori-s]\nlori: {mask_density: 0.2, overlap_policy: max_overlap, max_overlap: 0.1}\n")
    assert load_config(p).lori.mask_density == 0.2
    old = tmp_path / "old.yaml"
    old.write_text("methods: [lori-s]\nmask_density: 0.2\noverlap_policy: max_overlap\nmax_overlap: 0.1\n")
    assert load_config(old).lori == load_config(p).lori
    assert "`mask_density` is now `lori.mask_density`" in capsys.readouterr().err
    args = build_parser().parse_args(["run", "--mask-density", "0.05"])
    new_args = build_parser().parse_args(["run", "--lori-mask-density", "0.05"])
    assert vars(args)["lori.mask_density"] == vars(new_args)["lori.mask_density"] == "0.05"


def test_a_lori_knob_given_both_ways_exits_2_naming_it(tmp_path, capsys):
    p = tmp_path / "both.yaml"
    p.write_text("methods: [lori-s]\nmask_density: 0.2\nlori: {mask_density: 0.3}\n")
    assert main(["validate", str(p)]) == 2
    assert "mask_density and lori.mask_density both given" in capsys.readouterr().err


def test_old_lori_names_without_a_lori_method_change_nothing(tmp_path):
    """They did nothing for lora before the section existed; they must not now refuse the config either."""
    cfg = load_config(None, {"methods": ["lora"], "mask_density": "0.5"})
    assert "lori" not in cfg.to_yaml_dict() and cfg.lori.mask_density == 0.1


def test_a_grid_over_an_old_lori_name_keeps_its_variant_ids():
    old = variants(load_config(None, {"methods": ["lori-s"], "grid": parse_grid("mask_density=0.05,0.1")}))
    new = variants(load_config(None, {"methods": ["lori-s"], "grid": parse_grid("lori.mask_density=0.05,0.1")}))
    assert [v[0] for v in old] == [v[0] for v in new]
    assert sorted(c.lori.mask_density for _, _, c in new) == [0.05, 0.1]
    # the id of {mask_density: 0.05} as harness versions before the section computed it
    assert hashlib.sha256(json.dumps({"mask_density": 0.05}, sort_keys=True).encode()).hexdigest()[:8] in [
        v[0] for v in new
    ]


def test_a_folder_written_with_flat_lori_keys_resumes_under_the_section(tmp_path):
    cfg = load_config(None, {"methods": ["lori-s"], "mask_density": "0.2"})
    flat = cfg.to_yaml_dict()
    flat.update(flat.pop("lori"))  # what config.yaml held before the section
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(flat))
    check_same_config(tmp_path / "config.yaml", cfg.to_yaml_dict(), "lori-s")  # no refusal
    other = load_config(None, {"methods": ["lori-s"], "mask_density": "0.3"}).to_yaml_dict()
    with pytest.raises(Exception, match="lori"):
        check_same_config(tmp_path / "config.yaml", other, "lori-s")


# Flags of other tools the docs show beside harness's (torchrun, accelerate, ray, pip, sbatch).
OTHER_TOOLS_FLAGS = {
    "--address",
    "--cpu",
    "--cpus-per-task",
    "--gpus-per-node",
    "--head",
    "--index-url",
    "--multi",
    "--nnodes",
    "--no-deps",
    "--nproc",
    "--num",
    "--rdzv",
    "--standalone",
}


def test_every_flag_the_readme_and_docs_spell_is_accepted():
    """The CLI is a contract: a flag written in README.md or docs/ exists on some subcommand (old names included)."""
    known: set[str] = set()

    def walk(parser) -> None:
        for action in parser._actions:
            known.update(action.option_strings)
            for sub in (action.choices or {}).values() if isinstance(action.choices, dict) else ():
                walk(sub)

    walk(build_parser())
    root = Path(__file__).resolve().parents[1]
    spelled = {
        m
        for f in [root / "README.md", *sorted((root / "docs").glob("*.md"))]
        for m in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", f.read_text())
    }
    assert spelled - known - OTHER_TOOLS_FLAGS == set()
    assert "--mask-density" in known and "--lori-mask-density" in known
