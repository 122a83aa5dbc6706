"""The metric table (harness.metrics.TABLE) is the one declaration of every metric: a metric added to it as one entry
reaches summary.json, the parent run's MLflow metrics, `harness verify` and the report, and docs/metrics.md's table is
written from it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from harness import metrics as MX
from harness.cli import main

ROOT = Path(__file__).resolve().parents[1]


def worst_final_values(R) -> np.ndarray:
    """The lowest final score over the tasks: min_j R[T, j] (a metric that is in no table today)."""
    return np.asarray(R, dtype=float)[..., -1, :].min(axis=-1)


WORST = MX.Metric("worst_final", "worst_final", worst_final_values, True, "min_j R[T, j]", "never")


def test_docs_metrics_md_holds_the_table_written_from_the_metric_table():
    assert MX.markdown_table() in (ROOT / "docs" / "metrics.md").read_text()


def test_every_metric_is_defined_on_a_hand_computed_matrix():
    R = MX.as_matrix([[0.1, 0.2], [0.9, 0.3], [0.6, 0.8]])
    assert MX.summarize(R) == pytest.approx({"ACC": 0.7, "BWT": -0.3, "FWT": 0.1, "forgetting": 0.3, "LA": 0.85})
    values = MX.summary_values(R, [2.0, 2.5, 2.75])
    assert values == pytest.approx(
        {"acc": 0.7, "bwt": -0.3, "fwt": 0.1, "forgetting": 0.3, "la": 0.85, "general_ce_rise": 0.75}
    )
    assert MX.summary_values(R[[0, 2]], [2.0, None], reference=True) == {
        "acc": pytest.approx(0.7),
        "bwt": None,
        "fwt": None,
        "forgetting": None,
        "la": None,
        "general_ce_rise": None,
    }


@pytest.mark.slow
def test_a_metric_added_as_one_entry_reaches_summary_mlflow_verify_and_the_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(MX, "TABLE", [*MX.TABLE, WORST])
    results = tmp_path / "r"
    args = ["--suite", "smoke", "--model", "tiny-llama", "--methods", "lora", "--seeds", "0", "--max-steps", "1"]
    assert main(["run", *args, "--no-progress", "--results-dir", str(results), "--experiment", "mt"]) == 0
    folder = results / "mt" / "lora" / "seed-0"
    final = json.loads((folder / "matrix.json").read_text())["R"][-1]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["worst_final"] == pytest.approx(min(final))  # by hand, from the matrix the run wrote

    client = MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    assert client.get_run(summary["mlflow_parent_run_id"]).data.metrics["worst_final"] == pytest.approx(min(final))

    capsys.readouterr()
    assert main(["verify", str(folder)]) == 0
    assert "worst_final" in capsys.readouterr().out
    summary["worst_final"] += 0.01  # a number its matrix no longer gives
    (folder / "summary.json").write_text(json.dumps(summary))
    assert main(["verify", str(folder)]) == 1
    assert "summary.json worst_final" in capsys.readouterr().out

    html = (results / "mt" / "report" / "index.html").read_text()
    assert "worst_final (↑)" in html
    comparison = json.loads((results / "mt" / "report" / "comparison.json").read_text())
    assert "worst_final" in json.dumps(comparison)
