"""End to end on the tiny model: run, matrix, metrics, MLflow, resume after SIGKILL, bad input."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from harness import metrics as MX
from harness.cli import main
from harness.provenance import git_commit

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--suite", "smoke", "--model", "tiny-llama", "--seeds", "0", "--no-progress"]


def run_cli(*args):
    return main(["run", *BASE, *args])


def read_matrix(path: Path) -> tuple[list[str], np.ndarray]:
    rows = list(csv.reader(path.open()))
    header, body = rows[0], rows[1:]
    assert header[0] == "stage"
    assert [int(r[0]) for r in body] == list(range(len(body)))
    return header[1:], np.array([[float(v) if v != "" else np.nan for v in r[1:]] for r in body])


def mlflow_client(results: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    assert run_cli("--methods", "lori-s,lora", "--results-dir", str(results), "--experiment", "smoke-e2e") == 0
    return results


def test_run_folder_layout_and_matrix(smoke_run):
    exp = smoke_run / "smoke-e2e"
    assert (exp / "config.yaml").exists()
    report = exp / "report"
    assert {"index.html", "comparison.csv", "comparison.json", "accuracy_matrices.png"} <= {
        p.name for p in report.iterdir()
    }
    for method in ("lori-s", "lora"):
        d = exp / method / "seed-0"
        tasks, R = read_matrix(d / "matrix.csv")
        assert R.shape == (len(tasks) + 1, len(tasks)) and len(tasks) == 3
        assert not np.isnan(R).any()  # eval_scope all: every cell
        assert ((R >= 0) & (R <= 1)).all()
        stages = sorted(p.name for p in (d / "stages").iterdir())
        assert stages == ["0-base", *[f"{i + 1}-{t}" for i, t in enumerate(tasks)]]
        summary = json.loads((d / "summary.json").read_text())
        recomputed = MX.summarize(R)
        for key, name in (("acc", "ACC"), ("bwt", "BWT"), ("fwt", "FWT"), ("forgetting", "forgetting")):
            assert summary[key] == pytest.approx(recomputed[name], abs=1e-6)
        assert summary["trainable_params_effective"] > 0
        assert summary["git_commits"] == [git_commit()]  # one code version trained every stage
        for s in stages[1:]:
            files = {p.name for p in (d / "stages" / s).iterdir()}
            marker = json.loads((d / "stages" / s / "stage.json").read_text())
            threads = marker["torch_threads"]
            assert isinstance(threads, int) and threads >= 1  # what the CPU sums depended on
            assert marker["git_commit"] == git_commit()  # the code that trained it
            if method == "lori-s":  # what the stage trained (mask, values, how to regenerate A), never a dense B
                assert {"masks.safetensors", "values.safetensors", "lori.json"} <= files and "adapter" not in files
            else:
                assert (
                    d / "stages" / s / "adapter" / "adapter_model.safetensors"
                ).exists() and "masks.safetensors" not in files
    s_lori = json.loads((exp / "lori-s" / "seed-0" / "summary.json").read_text())
    s_lora = json.loads((exp / "lora" / "seed-0" / "summary.json").read_text())
    assert s_lori["trainable_params_lora_equivalent"] == s_lora["trainable_params_effective"]
    assert s_lori["trainable_params_effective"] < 0.1 * s_lora["trainable_params_effective"]


def test_per_document_files_recompute_every_cell_exactly(smoke_run):
    from harness.analysis.documents import check_documents, matrix_from_documents

    for method in ("lori-s", "lora"):
        d = smoke_run / "smoke-e2e" / method / "seed-0"
        matrix = json.loads((d / "matrix.json").read_text())
        R = MX.as_matrix(matrix["R"])
        for stage in (d / "stages").iterdir():  # every stage folder holds its own, committed with it
            content = json.loads((stage / "documents.json").read_text())
            assert set(content["tasks"]) == set(json.loads((stage / "eval.json").read_text())["scores"])
        docs = json.loads((d / "documents.json").read_text())
        assert docs["tasks"] == matrix["tasks"]
        for task in docs["tasks"]:
            entry = docs["documents"][task]
            assert len(entry["doc_ids"]) == 32 and all(set(row) <= {0, 1} for row in entry["scores"])
        assert check_documents(docs, R) == []
        got = matrix_from_documents(docs)
        assert (got == R).all()  # exactly, not approximately
    assert check_documents(docs, R + np.eye(*R.shape) * 1e-9)  # a cell that differs is found


def test_general_text_cross_entropy_after_every_stage_in_summary_mlflow_and_report(smoke_run):
    c = mlflow_client(smoke_run)
    exp = c.get_experiment_by_name("smoke-e2e")
    for p in c.search_runs([exp.experiment_id], "tags.`harness.kind` = 'sequence'"):
        d = Path(p.data.tags["harness.run_dir"])
        s = json.loads((d / "summary.json").read_text())
        assert len(s["general_ce"]) == 4 and all(v > 0 for v in s["general_ce"])
        assert s["general_ce_base"] == s["general_ce"][0]
        assert s["general_ce_rise"] == pytest.approx(s["general_ce"][-1] - s["general_ce"][0])
        history = {m.step: m.value for m in c.get_metric_history(p.info.run_id, "general_ce")}
        assert history == {t: pytest.approx(v) for t, v in enumerate(s["general_ce"])}
        assert p.data.metrics["general_ce_rise"] == pytest.approx(s["general_ce_rise"])
    comp = json.loads((smoke_run / "smoke-e2e" / "report" / "comparison.json").read_text())
    assert all(r["general_ce_rise"]["n"] == 1 for r in comp["methods"])
    assert (smoke_run / "smoke-e2e" / "report" / "general_ce.png").exists()


def test_lori_s_masks_in_files_are_disjoint_and_B_respects_them(smoke_run, tmp_path):
    from safetensors.torch import load_file

    from harness.methods.lori.stage_files import load_masks
    from harness.run.export import export_adapter

    seq = smoke_run / "smoke-e2e" / "lori-s" / "seed-0"
    stage_dirs = sorted(
        (p for p in (seq / "stages").iterdir() if not p.name.startswith("0-")), key=lambda p: int(p.name.split("-")[0])
    )
    masks = [load_masks(p) for p in stage_dirs]
    final_B = load_file(str(export_adapter(seq, tmp_path / "last") / "adapter_model.safetensors"))
    for k in masks[0]:
        union = sum(m[k].int() for m in masks)
        assert union.max() <= 1, "disjoint masks overlap"
        assert (final_B[k][union == 0] == 0).all()
    # Task 1's entries are bit-identical at the end of the sequence.
    b1 = load_file(str(export_adapter(seq, tmp_path / "first", 1) / "adapter_model.safetensors"))
    for k, m in masks[0].items():
        assert (final_B[k][m] == b1[k][m]).all()


def test_mlflow_holds_parents_children_metrics_and_artifacts(smoke_run):
    c = mlflow_client(smoke_run)
    exp = c.get_experiment_by_name("smoke-e2e")
    parents = c.search_runs([exp.experiment_id], "tags.`harness.kind` = 'sequence'")
    assert sorted(p.data.tags["harness.method"] for p in parents) == ["lora", "lori-s"]
    for p in parents:
        assert p.info.status == "FINISHED"
        assert {"ACC", "BWT", "FWT", "forgetting", "trainable_params_effective"} <= set(p.data.metrics)
        tasks = p.data.params["task_order"].split(",")
        for t in tasks:
            steps = [m.step for m in c.get_metric_history(p.info.run_id, f"acc/{t}")]
            assert steps == [0, 1, 2, 3]
        children = c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{p.info.run_id}'")
        assert sorted(int(ch.data.tags["harness.stage"]) for ch in children) == [1, 2, 3]
        assert all(ch.info.status == "FINISHED" and "train_tok_s" in ch.data.metrics for ch in children)
        names = {a.path for a in c.list_artifacts(p.info.run_id)}
        assert {
            "matrix.csv",
            "matrix.json",
            "matrix_heatmap.png",
            "summary.json",
            "config.yaml",
            "diagnostics.json",
            "documents.json",
        } <= names


def test_rerun_skips_finished_sequences(smoke_run, capsys):
    assert (
        run_cli("--methods", "lori-s,lora", "--results-dir", str(smoke_run), "--experiment", "smoke-e2e", "--no-report")
        == 0
    )
    assert "already complete" in capsys.readouterr().err
    c = mlflow_client(smoke_run)
    exp = c.get_experiment_by_name("smoke-e2e")
    assert len(c.search_runs([exp.experiment_id], "tags.`harness.kind` = 'sequence'")) == 2


BAD_INPUTS = {
    "unknown method": (["--methods", "lori-x"], "methods"),
    "unknown task": (["--methods", "lora", "--tasks", "nope"], "nope"),
    "unknown suite": (["--methods", "lora", "--suite", "no-such-suite"], "no-such-suite"),
    "model unavailable offline": (["--methods", "lora", "--model", "meta-llama/Meta-Llama-3-8B"], "Meta-Llama-3-8B"),
    "impossible capacity": (["--methods", "lori-s", "--mask-density", "0.5"], "capacity"),
    "unreachable tracking server": (["--methods", "lora", "--tracking-uri", "http://127.0.0.1:9"], "unreachable"),
    "bad value": (["--methods", "lora", "--rank", "0"], "--rank"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_message_and_writes_nothing(case, tmp_path, capsys):
    args, needle = BAD_INPUTS[case]
    results = tmp_path / "results"
    rc = main(
        ["run", *BASE[:-1], "--no-progress", *args, "--results-dir", str(results)]
        if "--suite" not in args
        else ["run", "--model", "tiny-llama", *args, "--results-dir", str(results)]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err
    assert "Traceback" not in err
    assert not results.exists()


def test_missing_data_file_is_refused_before_anything_is_written(tmp_path, capsys):
    import shutil

    suite = tmp_path / "broken"
    shutil.copytree(ROOT / "task_suites" / "smoke", suite)
    victim = next(suite.rglob("*.train.jsonl"))
    victim.unlink()
    results = tmp_path / "results"
    rc = main(
        ["run", "--suite", str(suite), "--model", "tiny-llama", "--methods", "lora", "--results-dir", str(results)]
    )
    err = capsys.readouterr().err
    assert rc == 2 and victim.name in err
    assert not results.exists()


def test_unwritable_results_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    rc = main(["run", *BASE, "--methods", "lora", "--results-dir", str(blocker / "results")])
    assert rc == 2 and "not writable" in capsys.readouterr().err


def test_magnitude_masks_per_task_A_and_max_overlap_end_to_end(tmp_path):
    from safetensors.torch import load_file

    from harness.methods.lori.stage_files import load_masks
    from harness.run.export import export_adapter

    results = tmp_path / "r"
    assert (
        run_cli(
            "--methods",
            "lori-s",
            "--mask-strategy",
            "magnitude",
            "--a-mode",
            "per_task",
            "--overlap-policy",
            "max_overlap",
            "--max-overlap",
            "0.2",
            "--calibration-steps",
            "3",
            "--no-report",
            "--results-dir",
            str(results),
            "--experiment",
            "mag",
        )
        == 0
    )
    d = results / "mag" / "lori-s" / "seed-0"
    stage_dirs = sorted(
        (p for p in (d / "stages").iterdir() if not p.name.startswith("0-")), key=lambda p: int(p.name.split("-")[0])
    )
    masks = [load_masks(p) for p in stage_dirs]
    for t, m in enumerate(masks[1:], start=2):
        used = {k: sum(masks[i][k].int() for i in range(t - 1)) > 0 for k in m}
        nnz = sum(int(v.sum()) for v in m.values())
        overlap = sum(int((v & used[k]).sum()) for k, v in m.items())
        assert overlap <= 0.2 * nnz
    # Each task's own B_t is zero outside its mask, from the files alone: the export puts B_1..B_T side by side (r columns each).
    B = load_file(str(export_adapter(d, tmp_path / "out") / "adapter_model.safetensors"))
    for t, m in enumerate(masks):
        for k, v in m.items():
            r = v.shape[1]
            assert (B[k][:, t * r : (t + 1) * r][~v] == 0).all()
    diag = json.loads((d / "diagnostics.json").read_text())
    assert diag["subspace_overlap"]["matrix"][0][1] < diag["subspace_overlap"]["matrix"][0][0]


@pytest.mark.slow
def test_a_stage_that_does_not_train_is_flagged_as_not_learned(tmp_path, monkeypatch, capsys):
    import harness.run.sequence as S
    from harness.run.train import TrainResult

    real = S.train_method

    def zero_steps_at_stage_1(method, *a, stage, **kw):
        return TrainResult(steps=0, tokens=0, wall_s=0.0) if stage == 1 else real(method, *a, stage=stage, **kw)

    monkeypatch.setattr(S, "train_method", zero_steps_at_stage_1)
    assert (
        run_cli(
            "--methods",
            "lora",
            "--tasks",
            "parity,weather",
            "--max-steps",
            "2",
            "--results-dir",
            str(tmp_path),
            "--experiment",
            "untrained",
            "--no-report",
        )
        == 0
    )
    d = tmp_path / "untrained" / "lora" / "seed-0"
    first = json.loads((d / "summary.json").read_text())["tasks"][0]
    stage1 = next(p for p in (d / "stages").iterdir() if p.name.startswith("1-"))
    check = json.loads((stage1 / "stage.json").read_text())["learn_check"]
    assert check["margin"] == 0.05 and [f["task"] for f in check["not_learned"]] == [first]
    assert check["not_learned"][0]["score"] == check["not_learned"][0]["base"]  # B = 0: the base model, exactly
    summary = json.loads((d / "summary.json").read_text())
    assert first in summary["not_learned"] and summary["learn_margin"] == 0.05
    _, R = read_matrix(d / "matrix.csv")
    assert summary["la"] == pytest.approx(MX.learning_accuracy(R), abs=1e-6)
    err = capsys.readouterr().err
    assert f"NOT LEARNED (own-stage score under base + 0.05; a training failure, not forgetting): {first}" in err
