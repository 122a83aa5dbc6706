"""Sweeping knobs: --grid makes variants, each in variant-<id>/, tagged in MLflow, resumable, validated up front."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_sequence import mlflow_client, read_matrix

from harness.cli import main

ROOT = Path(__file__).resolve().parents[1]
BASE = [
    "--suite",
    "smoke",
    "--model",
    "tiny-llama",
    "--methods",
    "lora",
    "--tasks",
    "parity,weather",
    "--seeds",
    "0",
    "--no-progress",
    "--no-report",
]


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    results = tmp_path_factory.mktemp("grid")
    assert (
        main(
            [
                "run",
                *BASE,
                "--grid",
                "warmup_steps=0,3;completion_eos=auto,always",
                "--results-dir",
                str(results),
                "--experiment",
                "g",
            ]
        )
        == 0
    )
    return results


def variant_dirs(results: Path) -> dict[tuple, Path]:
    out = {}
    for d in (results / "g").glob("variant-*"):
        seq = d / "lora" / "seed-0"
        v = yaml.safe_load((seq / "config.yaml").read_text())["sequence"]["variant_values"]
        out[(v["warmup_steps"], v["completion_eos"])] = seq
    return out


def test_every_combination_is_a_variant_with_its_knob_values(grid_run):
    dirs = variant_dirs(grid_run)
    assert set(dirs) == {(0, "auto"), (0, "always"), (3, "auto"), (3, "always")}
    for (warmup, eos), seq in dirs.items():
        cfg = yaml.safe_load((seq / "config.yaml").read_text())
        assert cfg["warmup_steps"] == warmup and cfg["completion_eos"] == eos
        assert json.loads((seq / "summary.json").read_text())["complete"]


def test_variants_are_tagged_in_mlflow_with_their_values_as_params(grid_run):
    c = mlflow_client(grid_run)
    runs = c.search_runs([c.get_experiment_by_name("g").experiment_id], "tags.`harness.kind` = 'sequence'")
    assert len(runs) == 4 and len({r.data.tags["harness.variant"] for r in runs}) == 4
    for r in runs:
        assert {"grid.warmup_steps", "grid.completion_eos"} <= set(r.data.params)
        assert r.data.params["grid.warmup_steps"] == r.data.params["warmup_steps"]


def test_a_variant_equals_the_same_knobs_run_without_a_grid(grid_run, tmp_path):
    assert main(["run", *BASE, "--results-dir", str(tmp_path), "--experiment", "plain"]) == 0
    _, plain = read_matrix(tmp_path / "plain" / "lora" / "seed-0" / "matrix.csv")
    _, variant = read_matrix(variant_dirs(grid_run)[(0, "auto")] / "matrix.csv")  # the defaults: warm-up 0, EOS auto
    np.testing.assert_array_equal(variant, plain)


def test_resume_of_a_variant_sequence_stays_in_its_folder(grid_run):
    seq = variant_dirs(grid_run)[(3, "always")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "harness.cli", "resume", str(seq), "--no-report", "--no-progress"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stderr.count("already complete") == 1


@pytest.mark.parametrize(
    "grid,needle",
    [
        ("seeds=0,1", "cannot sweep ['seeds']"),
        ("warmup_steps=-1", "grid variant"),
        ("warmup_steps", "is not knob=v1,v2"),
    ],
)
def test_bad_grid_exits_2_and_writes_nothing(tmp_path, capsys, grid, needle):
    results = tmp_path / "r"
    assert main(["run", *BASE, "--grid", grid, "--results-dir", str(results)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not results.exists()


def test_report_never_averages_variants_and_compares_each_method_at_its_best(grid_run):
    from harness.report import write_report

    index = write_report("g", grid_run, log_to_mlflow=False)
    comp = json.loads((index.parent / "comparison.json").read_text())
    variants = comp["variants"]
    assert len(variants) == 4 and {v["method"] for v in variants} == {"lora"}
    assert {(v["values"]["warmup_steps"], v["values"]["completion_eos"]) for v in variants} == {
        ("0", "auto"),
        ("0", "always"),
        ("3", "auto"),
        ("3", "always"),
    }
    best = max(variants, key=lambda v: v["ACC"]["mean"])
    assert comp["selection"]["chosen"] == {"lora": best["variant"]}
    # The headline row is the chosen variant's one run, with its ACC, not a mean over the four variants.
    (row,) = comp["methods"]
    assert row["n_runs"] == 1 and row["ACC"]["mean"] == pytest.approx(best["ACC"]["mean"])
    for v in variants:  # each variant's numbers are its own run's summary
        seq = variant_dirs(grid_run)[(int(v["values"]["warmup_steps"]), v["values"]["completion_eos"])]
        assert v["ACC"]["mean"] == pytest.approx(json.loads((seq / "summary.json").read_text())["acc"])
    page = index.read_text()
    assert "id='sensitivity'" in page and "sensitivity.png" in page and "highest mean ACC" in page
    assert (index.parent / "sensitivity.png").stat().st_size > 1000


def _vrow(method, eos, per_seed):
    import statistics

    from harness.analysis.sensitivity import VariantRow

    mean, std = statistics.mean(per_seed), statistics.stdev(per_seed)
    return VariantRow(
        method,
        f"v-{eos}",
        {"completion_eos": eos},
        ["0", "1", "2"],
        {
            m: {"mean": mean if m == "ACC" else float("nan"), "std": std, "n": 3}
            for m in ("ACC", "BWT", "FWT", "forgetting")
        },
        None,
        {f"{k}/0": v for k, v in enumerate(per_seed)},
    )


def test_the_report_says_plainly_when_the_verdict_depends_on_the_recipe():
    from harness.analysis.sensitivity import recipe_verdicts

    same = [
        _vrow("lora", "always", [0.30, 0.40, 0.50]),
        _vrow("lori-s", "always", [0.82, 0.85, 0.88]),
        _vrow("lora", "auto", [0.45, 0.50, 0.55]),
        _vrow("lori-s", "auto", [0.78, 0.80, 0.82]),
    ]
    lines, summary = recipe_verdicts(same)
    assert len(lines) == 2 and lines[0].startswith(
        "completion_eos=always: LoRI-S leads on ACC, ahead of LoRA by +0.450"
    )
    assert "paired t over 3 seeds" in lines[0] and ": decided)" in lines[0]
    assert (
        summary.startswith("The verdict is the same at every variant") and "decided by the test over seeds" in summary
    )
    # At `auto` the lead shrinks into the seeds' spread: undecided, so the verdict now depends on the recipe.
    flips = same[:2] + [_vrow("lora", "auto", [0.70, 0.78, 0.86]), _vrow("lori-s", "auto", [0.76, 0.80, 0.84])]
    lines, summary = recipe_verdicts(flips)
    assert "undecided, about" in lines[1] and summary.startswith("The verdict depends on the recipe")
    # One variant: nothing to compare across.
    assert recipe_verdicts(same[:2])[1] is None
