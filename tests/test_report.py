"""The forgetting report against run folders and a real sqlite MLflow store, written the way the scheduler writes them.

Each fixture sequence is a run folder (config.yaml with its sequence block, state.json, matrix.json,
diagnostics.json, summary.json with the hashes of its results; README "Results folder"), which the report
reads, and its MLflow copy (parent run per sequence with acc/<task> per stage, final ACC/BWT/FWT/forgetting,
the artifacts; child runs per stage), from which the report takes only the run dates and statuses and to
which it logs its figures. Its matrices are made-up test input; the metrics recorded for them are computed
here by hand from the formulas in lori-reference.md. Rendering is checked in a real headless
Chromium (Debian's /usr/bin/chromium, driven by the python playwright package).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
from html import escape as html_escape
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

from harness.errors import HarnessError  # noqa: E402
from harness.methods import METHODS  # noqa: E402
from harness.metrics import summarize as cl_metrics  # noqa: E402
from harness.report import write_report  # noqa: E402

EXPERIMENT = "default-smollm2-135m"
TASKS = ["arith", "capitals", "sentiment"]
N = None  # not evaluated at that stage

# R[stage][task], stage 0 = base model. Test input, not results.
MATRICES = {
    ("lori-s", "0"): [[0.25, 0.30, 0.50], [0.95, 0.35, 0.52], [0.90, 0.97, 0.55], [0.88, 0.93, 0.96]],
    ("lori-s", "1"): [[0.25, 0.30, 0.50], [0.93, 0.33, 0.50], [0.91, 0.95, 0.53], [0.85, 0.94, 0.97]],
    ("lora", "0"): [[0.25, 0.30, 0.50], [0.97, 0.31, 0.48], [0.60, 0.98, 0.51], [0.40, 0.70, 0.99]],
    ("lora", "1"): [[0.25, 0.30, 0.50], [0.96, 0.30, N], [0.65, 0.97, 0.49], [0.52, 0.66, 0.98]],
}
PARAMS = {"lori-s": (23_040, 460_800), "lora": (460_800, 460_800)}


def hand_metrics(R: list[list[float | None]]) -> dict[str, float]:
    """lori-reference.md, written out for T = 3 tasks (R[i][j]: stage i, task j; 1-based j -> j-1)."""
    T = 3
    acc = (R[T][0] + R[T][1] + R[T][2]) / T
    bwt = ((R[3][0] - R[1][0]) + (R[3][1] - R[2][1])) / (T - 1)
    fwt = ((R[1][1] - R[0][1]) + (R[2][2] - R[0][2])) / (T - 1)

    def best(j):  # max over stages l = 1..T-1 where task j was evaluated
        return max(R[l][j] for l in (1, 2) if R[l][j] is not None)

    forgetting = ((best(0) - R[3][0]) + (best(1) - R[3][1])) / (T - 1)
    return {"ACC": acc, "BWT": bwt, "FWT": fwt, "forgetting": forgetting}


def _diagnostics(method: str, seed: str) -> dict:
    if not method.startswith("lori"):
        return {"mask_overlap": None, "subspace_overlap": None}
    eps = 0.01 * int(seed)
    return {
        "mask_overlap": {"tasks": TASKS, "matrix": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]},
        "subspace_overlap": {
            "tasks": TASKS,
            "matrix": [[1.0, 0.05 + eps, 0.04], [0.05 + eps, 1.0, 0.06], [0.04, 0.06, 1.0]],
        },
    }


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def write_sequence_folder(
    run_dir: Path, record: dict, R: list, summary: dict, diagnostics: dict | None = None, documents: dict | None = None
) -> None:
    """A finished sequence folder with the files the report reads, as the scheduler writes them.

    record: state.json's parent record (name, tags, params) and run id; summary.json gets the hashes of the results."""
    import yaml

    from harness.run.folder import result_hashes

    seq = {"method": summary["method"], "seed": summary["seed"], "order_index": 0, "tasks": TASKS}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"suite": "default", "model": "smollm2-135m", "sequence": seq}))
    _write_json(run_dir / "state.json", record)
    _write_json(run_dir / "matrix.json", {"tasks": TASKS, "stages": list(range(len(R))), "R": R})
    if diagnostics is not None:
        _write_json(run_dir / "diagnostics.json", diagnostics)
    if documents is not None:
        _write_json(run_dir / "documents.json", documents)
    for t in range(len(R)):
        costs = STAGE_COSTS(t) if t else {}
        _write_json(run_dir / "stages" / f"{t}-{(['base'] + TASKS)[t]}" / "stage.json", {"stage": t, **costs})
    _write_json(run_dir / "summary.json", {**summary, "complete": True, "sha256": result_hashes(run_dir)})


def STAGE_COSTS(t: int) -> dict:  # noqa: N802 - a fixture table as a function of the stage
    """stage.json seconds of trained stage t in every fixture sequence (the cost table's input)."""
    return {"train_s": 10.0 * t, "method_setup_s": 1.0, "method_teardown_s": 0.5, "calibration_s": 0.0, "eval_s": 3.0}


def write_unfinished_folder(run_dir: Path, method: str, seed: str, n_stages: int, run_id: str, run_name: str) -> None:
    """A sequence folder that stopped after committing stages 0..n_stages-1: no summary.json."""
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    seq = {"method": method, "seed": int(seed), "order_index": 0, "tasks": TASKS}
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"suite": "default", "model": "smollm2-135m", "sequence": seq}))
    _write_json(
        run_dir / "state.json",
        {"mlflow_parent": {"name": run_name, "tags": {}, "params": {}}, "mlflow_parent_run_id": run_id},
    )
    for t in range(n_stages):
        _write_json(run_dir / "stages" / f"{t}-{(['base'] + TASKS)[t]}" / "stage.json", {"stage": t})


def _log_sequence(
    client,
    exp_id: str,
    method: str,
    seed: str,
    R: list,
    eff: float,
    lora_eq: float,
    experiment: str = EXPERIMENT,
    reference: bool = False,
    results_dir: Path | None = None,
    documents: dict | None = None,
) -> str:
    """One FINISHED sequence: its run folder under results_dir/<experiment>/<method>/seed-<seed>, and its MLflow
    parent run with its children, as the scheduler writes them; a reference trains all tasks in one stage."""
    import numpy as np
    from mlflow.entities import Metric, Param

    from harness.metrics import summarize

    ts = 1_760_000_000_000
    tags = {
        "harness.kind": "sequence",
        "harness.method": method,
        "harness.seed": seed,
        "harness.order": "0",
        "harness.suite": "default",
        "harness.model": "smollm2-135m",
        "harness.experiment": experiment,
        "harness.git_commit": "0123abcd",
        **({"harness.reference": "true"} if reference else {}),
    }
    rid = client.create_run(exp_id, start_time=ts, tags=tags, run_name=f"{method}-s{seed}-o0").info.run_id
    m = summarize(np.array(R), reference=True) if reference else hand_metrics(R)
    params = {
        "method": method,
        "seed": seed,
        "order_index": "0",
        "task_order": ",".join(TASKS),
        "suite": "default",
        "model": "smollm2-135m",
        "rank": "8",
        "alpha": "16",
        "targets": "q_proj,v_proj",
        "mask_strategy": "random" if method == "lori-s" else "none",
        "mask_density": "0.1" if method == "lori-s" else "1.0",
        "overlap_policy": "disjoint",
        "a_mode": "shared",
    }
    metrics = [
        Metric(f"acc/{t}", R[s][j], ts + s, s)
        for s in range(len(R))
        for j, t in enumerate(TASKS)
        if R[s][j] is not None
    ]
    metrics += [Metric(k, v, ts + 9, 0) for k, v in m.items() if v is not None]
    metrics += [
        Metric("trainable_params_effective", eff, ts, 0),
        Metric("trainable_params_lora_equivalent", lora_eq, ts, 0),
    ]
    client.log_batch(rid, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
    client.log_dict(rid, {"tasks": TASKS, "stages": list(range(len(R))), "R": R}, "matrix.json")
    csv = (
        "stage,"
        + ",".join(TASKS)
        + "\n"
        + "".join(f"{s}," + ",".join("" if v is None else str(v) for v in row) + "\n" for s, row in enumerate(R))
    )
    client.log_text(rid, csv, "matrix.csv")
    summary = {
        "method": method,
        "seed": int(seed),
        "order_index": 0,
        "tasks": TASKS,
        "acc": m["ACC"],
        "bwt": m["BWT"],
        "fwt": m["FWT"],
        "forgetting": m["forgetting"],
        "trainable_params_effective": eff,
        "reference": reference,
        "trainable_params_lora_equivalent": lora_eq,
        "stage_wall_s": [60.0, 61.0, 59.5],
        "mlflow_parent_run_id": rid,
    }
    client.log_dict(rid, summary, "summary.json")
    client.log_text(rid, f"experiment: {experiment}\nmethods: [{method}]\n", "config.yaml")
    client.log_dict(rid, _diagnostics(method, seed), "diagnostics.json")
    if documents is not None:
        client.log_dict(rid, documents, "documents.json")
    record = {
        "mlflow_parent": {"name": f"{method}-s{seed}-o0", "tags": tags, "params": params},
        "mlflow_parent_run_id": rid,
    }
    write_sequence_folder(
        results_dir / experiment / method / f"seed-{seed}", record, R, summary, _diagnostics(method, seed), documents
    )
    for stage, task in enumerate(["all"] if reference else TASKS, start=1):
        child = client.create_run(
            exp_id,
            start_time=ts + stage,
            run_name=f"stage-{stage}-{task}",
            tags={
                "mlflow.parentRunId": rid,
                "harness.kind": "stage",
                "harness.stage": str(stage),
                "harness.task": task,
            },
        )
        cm = [Metric("train/loss", 2.0 / (k + 1), ts + k, k) for k in range(5)]
        cm += [Metric("stage_wall_s", 60.0, ts, 0), Metric("train_tok_s", 150.0, ts, 0)]
        cm += [Metric(f"eval/{t}", R[stage][j], ts, 0) for j, t in enumerate(TASKS) if R[stage][j] is not None]
        client.log_batch(child.info.run_id, metrics=cm)
        client.set_terminated(child.info.run_id, "FINISHED")
    client.set_terminated(rid, "FINISHED")
    return rid


def build_fixture_store(results_dir: Path) -> dict:
    """A sqlite MLflow store under results_dir as the scheduler writes it: 2 methods x 2 seeds
    (FINISHED), plus one RUNNING and one FAILED parent run that the report must skip."""
    from mlflow.tracking import MlflowClient

    results_dir = Path(results_dir).resolve()
    results_dir.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{results_dir / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=f"file://{results_dir / 'mlartifacts'}")
    ts = 1_760_000_000_000
    parents = {
        (method, seed): _log_sequence(client, exp_id, method, seed, R, *PARAMS[method], results_dir=results_dir)
        for (method, seed), R in MATRICES.items()
    }
    # Incomplete sequences (folders without summary.json): skipped by the report.
    for status, seed in (("RUNNING", "2"), ("FAILED", "3")):
        run = client.create_run(
            exp_id,
            start_time=ts,
            run_name=f"lora-s{seed}-o0",
            tags={"harness.kind": "sequence", "harness.method": "lora", "harness.seed": seed, "harness.order": "0"},
        )
        client.log_metric(run.info.run_id, "acc/arith", 0.1, step=0)
        write_unfinished_folder(
            results_dir / EXPERIMENT / "lora" / f"seed-{seed}", "lora", seed, 1, run.info.run_id, f"lora-s{seed}-o0"
        )
        if status != "RUNNING":
            client.set_terminated(run.info.run_id, status)
    return {"uri": uri, "experiment_id": exp_id, "parents": parents, "results_dir": results_dir}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_fixture_store(tmp_path_factory.mktemp("results"))


@pytest.fixture(scope="module")
def report(store):
    index = write_report(None, store["results_dir"])  # the only harness experiment is picked
    return index


def test_hand_metrics_match_the_reference_formulas():
    R = MATRICES[("lori-s", "0")]
    m = hand_metrics(R)
    assert m["ACC"] == pytest.approx((0.88 + 0.93 + 0.96) / 3)
    assert m["BWT"] == pytest.approx(((0.88 - 0.95) + (0.93 - 0.97)) / 2)
    assert m["FWT"] == pytest.approx(((0.35 - 0.30) + (0.55 - 0.50)) / 2)
    assert m["forgetting"] == pytest.approx(((0.95 - 0.88) + (0.97 - 0.93)) / 2)
    # The shared definitions the report cross-checks with agree, including a not-evaluated cell.
    import numpy as np

    for R in MATRICES.values():
        arr = np.array([[np.nan if v is None else v for v in row] for row in R])
        got, want = cl_metrics(arr), hand_metrics(R)
        for k in want:
            assert got[k] == pytest.approx(want[k])
    assert cl_metrics(np.array([[0.2], [0.9]])) == {
        "ACC": pytest.approx(0.9),
        "BWT": None,
        "FWT": None,
        "forgetting": None,
        "LA": pytest.approx(0.9),
    }


def test_report_files(report, store):
    rdir = store["results_dir"] / EXPERIMENT / "report"
    assert report == rdir / "index.html"
    for name in (
        "index.html",
        "comparison.csv",
        "comparison.json",
        "mean_matrices.json",
        "accuracy_matrices.png",
        "forgetting_curves.png",
        "cl_metrics.png",
        "trainable_params.png",
        "mask_overlap.png",
        "subspace_overlap.png",
    ):
        p = rdir / name
        assert p.is_file() and p.stat().st_size > 0, name
    assert not list(rdir.glob("*.tmp")) and not list(rdir.glob(".*.tmp"))
    for png in rdir.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = report.read_text(encoding="utf-8")
    for png in rdir.glob("*.png"):
        assert f'src="{png.name}"' in text, png.name
    # Self-contained: nothing fetched from elsewhere.
    assert "http://" not in text and "https://" not in text and "<script" not in text and "<link" not in text
    assert "2 skipped" in text or 'skipped (not FINISHED)</td><td class="l">2:' in text
    assert "Avalanche" in text and "Mammoth" in text and "Lopez-Paz" in text and "Chaudhry" in text
    assert "max_{l in 1..T-1} (R[l, j] - R[T, j])" in text
    assert "0123abcd" in text and "smollm2-135m" in text
    assert "every ACC/BWT/FWT/forgetting in summary.json matches" in text


def test_comparison_numbers(report, store):
    rdir = report.parent
    comp = json.loads((rdir / "comparison.json").read_text())
    by = {r["method"]: r for r in comp["methods"]}
    assert list(by) == ["lori-s", "lora"]
    for method in ("lori-s", "lora"):
        logged = [hand_metrics(MATRICES[(method, s)]) for s in ("0", "1")]
        for k in ("ACC", "BWT", "FWT", "forgetting"):
            vals = [m[k] for m in logged]
            assert by[method][k]["mean"] == pytest.approx(statistics.mean(vals), abs=1e-12)
            assert by[method][k]["std"] == pytest.approx(statistics.stdev(vals), abs=1e-12)
            assert by[method][k]["n"] == 2
        assert by[method]["n_runs"] == 2 and by[method]["seeds"] == ["0", "1"]
        assert by[method]["trainable_params_effective"] == PARAMS[method][0]
        assert by[method]["trainable_params_lora_equivalent"] == PARAMS[method][1]
    assert {(s["status"]) for s in comp["skipped_runs"]} == {"RUNNING", "FAILED"}
    assert len(comp["runs"]) == 4
    # LoRI-S forgets less in the fixture, by far more than the std.
    for m in ("forgetting", "ACC"):  # 2 seeds: ahead, but no verdict (a test over seeds needs 3)
        assert (
            "LoRI-S is ahead by" in comp["verdicts"][m] and "a test over seeds needs at least 3" in comp["verdicts"][m]
        )

    import csv

    rows = {r["method"]: r for r in csv.DictReader((rdir / "comparison.csv").open())}
    assert float(rows["lora"]["ACC_mean"]) == pytest.approx(by["lora"]["ACC"]["mean"], rel=1e-5)
    assert float(rows["lori-s"]["BWT_std"]) == pytest.approx(by["lori-s"]["BWT"]["std"], rel=1e-5)

    # Mean matrices over seeds, aligned by task name; the not-evaluated cell is skipped, not zero.
    mm = json.loads((rdir / "mean_matrices.json").read_text())
    assert mm["columns"] == TASKS and mm["stages"] == [0, 1, 2, 3]
    lora = mm["methods"]["lora"]
    assert lora["mean"][1][2] == pytest.approx(0.48) and lora["count"][1][2] == 1 and lora["std"][1][2] is None
    assert lora["mean"][3][1] == pytest.approx((0.70 + 0.66) / 2)
    assert lora["std"][3][1] == pytest.approx(statistics.stdev([0.70, 0.66]))


def test_figures_logged_to_parent_runs(report, store):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store["uri"])
    for rid in store["parents"].values():
        names = {Path(a.path).name for a in client.list_artifacts(rid, "report")}
        assert {"accuracy_matrices.png", "forgetting_curves.png", "cl_metrics.png"} <= names


def test_experiment_selection_errors(store, tmp_path):
    with pytest.raises(HarnessError, match="no experiment named 'nope'.*default-smollm2-135m"):
        write_report("nope", store["results_dir"], log_to_mlflow=False)
    with pytest.raises(HarnessError, match="no runs yet under .*make run-sequence"):
        write_report(None, tmp_path / "empty")
    assert not (tmp_path / "empty" / "mlflow.db").exists()  # nothing created by looking


def _copy_store(store, copy: Path) -> Path:
    """A copy of the fixture store (without its report) that reads its own artifacts."""
    import sqlite3

    shutil.copytree(store["results_dir"], copy, ignore=shutil.ignore_patterns("report"))
    # The copied db's artifact URIs still name the original folder: point them at the copy.
    con = sqlite3.connect(copy / "mlflow.db")
    con.execute("UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (str(store["results_dir"]), str(copy)))
    con.commit()
    con.close()
    return copy


def test_generated_at_is_the_time_stated(store, tmp_path):
    """A fixed generation time makes the whole report reproducible (the page shows it to the minute)."""
    import datetime as dt

    copy = _copy_store(store, tmp_path / "results")
    when = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    index = write_report(
        EXPERIMENT, copy, tracking_uri=f"sqlite:///{copy / 'mlflow.db'}", log_to_mlflow=False, generated_at=when
    )
    assert "Generated 2025-01-02 03:04 UTC from " in index.read_text(encoding="utf-8")
    assert json.loads((index.parent / "comparison.json").read_text())["generated_at"] == "2025-01-02T03:04:05+00:00"


def test_matrix_heatmap_writes_one_png(tmp_path):
    """The scheduler's per-run heatmap: a PNG written atomically, a not-evaluated cell allowed."""
    import numpy as np

    from harness.heatmap import matrix_heatmap

    R = np.array([[np.nan if v is None else v for v in row] for row in MATRICES[("lora", "1")]])
    path = tmp_path / "matrix_heatmap.png"
    matrix_heatmap(R, TASKS, "lora seed 1 order 0", path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["matrix_heatmap.png"]


def test_the_matrices_come_from_the_run_folders_not_from_mlflow(report, store, tmp_path):
    """A copy of the results whose MLflow artifacts are all gone: the folders give the same matrices and numbers."""
    copy = _copy_store(store, tmp_path / "results")
    removed = list((copy / "mlartifacts").rglob("matrix.json"))
    assert len(removed) == 4
    shutil.rmtree(copy / "mlartifacts")
    index = write_report(EXPERIMENT, copy, tracking_uri=f"sqlite:///{copy / 'mlflow.db'}", log_to_mlflow=False)
    got = json.loads((index.parent / "mean_matrices.json").read_text())
    want = json.loads((report.parent / "mean_matrices.json").read_text())
    assert got["methods"] == want["methods"] and got["columns"] == want["columns"]
    comp, want_comp = (json.loads((i.parent / "comparison.json").read_text()) for i in (index, report))
    assert comp["methods"] == want_comp["methods"] and comp["verdicts"] == want_comp["verdicts"]
    assert "every ACC/BWT/FWT/forgetting in summary.json matches" in index.read_text()


def test_a_folder_whose_matrix_changed_after_its_summary_is_refused(store, tmp_path):
    """summary.json records the matrix's SHA-256: a matrix.json edited afterwards stops the report (exit 2), naming it."""
    from harness.integrity import IntegrityError

    copy = _copy_store(store, tmp_path / "results")
    matrix = copy / EXPERIMENT / "lora" / "seed-0" / "matrix.json"
    data = json.loads(matrix.read_text())
    data["R"][3][0] = 0.99
    matrix.write_text(json.dumps(data))
    with pytest.raises(IntegrityError, match=rf"{matrix}: SHA-256 differs.*harness resume"):
        write_report(EXPERIMENT, copy, tracking_uri=f"sqlite:///{copy / 'mlflow.db'}", log_to_mlflow=False)


# --- every method, a reference row, unfinished runs (test input, not results) ---------------------
SEVEN = "all-methods"


def _seven_matrix(k: int, seed: int, reference: bool = False) -> list[list[float]]:
    d = 0.01 * k + 0.005 * seed  # a reference has one multi-task stage: base, all tasks
    return [[0.25, 0.30, 0.50]] + (
        [[0.97 - d, 0.96, 0.98]]
        if reference
        else [[0.90 + d, 0.32, 0.50], [0.70 + d, 0.92, 0.52], [0.55 + 2 * d, 0.80 + d, 0.95]]
    )


def _log_unfinished(client, exp_id, run_dir: Path, method, seed, R, tags, status=None) -> str:
    """A sequence that did not finish: its folder with stages 0..len(R)-1 committed, and its parent run with its
    acc/<task> up to where it stopped (step = stage)."""
    from mlflow.entities import Metric, Param

    rid = client.create_run(
        exp_id,
        run_name=f"{method}-s{seed}-o0",
        tags={
            "harness.kind": "sequence",
            "harness.method": method,
            "harness.seed": str(seed),
            "harness.order": "0",
            **tags,
        },
    ).info.run_id
    client.log_batch(
        rid,
        metrics=[Metric(f"acc/{t}", v, 0, s) for s, row in enumerate(R) for t, v in zip(TASKS, row)],
        params=[Param("task_order", ",".join(TASKS))],
    )
    write_unfinished_folder(run_dir, method, str(seed), len(R), rid, f"{method}-s{seed}-o0")
    if status:
        client.set_terminated(rid, status)
    return rid


@contextlib.contextmanager
def lock_held_by_another_process(run_dir: Path):
    """A child process holds the folder's lock (harness/locking.py) until the block ends, as a running sequence does."""
    import subprocess
    import sys

    code = (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.lockf(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield
    finally:
        proc.kill()
        proc.wait()


def build_seven_method_store(results_dir: Path) -> dict:
    """Every method of harness.methods x 2 seeds, FINISHED (mtl: the reference, one stage, ACC only), plus a
    sequence interrupted after stage 1 (KILLED + harness.interrupted, as mark_interrupted leaves it) and a RUNNING one."""
    from mlflow.tracking import MlflowClient

    from harness.methods import METHODS

    client = MlflowClient(tracking_uri=f"sqlite:///{results_dir / 'mlflow.db'}")
    exp_id = client.create_experiment(SEVEN, artifact_location=f"file://{results_dir / 'mlartifacts'}")
    st = {"results_dir": results_dir, "killed_dir": str(results_dir / SEVEN / "lora" / "seed-7"), "R": {}}
    for k, (method, cls) in enumerate(METHODS.items()):
        for seed in ("0", "1"):
            R = st["R"][(method, seed)] = _seven_matrix(k, int(seed), cls.reference)
            _log_sequence(client, exp_id, method, seed, R, 4e5 * (1 + k), 4e5, SEVEN, cls.reference, results_dir)
    st["killed"] = _log_unfinished(
        client,
        exp_id,
        Path(st["killed_dir"]),
        "lora",
        7,
        _seven_matrix(0, 7)[:2],
        {"harness.run_dir": st["killed_dir"], "harness.interrupted": "true"},
        status="KILLED",
    )
    st["running_dir"] = results_dir / SEVEN / "replay" / "seed-8"
    st["running"] = _log_unfinished(client, exp_id, st["running_dir"], "replay", 8, _seven_matrix(0, 8)[:3], {})
    return st


@pytest.fixture(scope="module")
def seven(tmp_path_factory):
    store = build_seven_method_store(tmp_path_factory.mktemp("seven").resolve())
    with lock_held_by_another_process(store["running_dir"]):  # replay seed 8 is running
        return {**store, "index": write_report(SEVEN, store["results_dir"], log_to_mlflow=False)}


def test_method_names_and_order_come_from_the_method_layer():
    from harness.analysis.naming import display_name, is_reference_method, method_sort_key
    from harness.methods import METHODS

    assert [display_name(m) for m in METHODS] == [c.display for c in METHODS.values()] and display_name("old") == "old"
    assert sorted(["zzz", "mtl", "aaa", "lora", "lori-s"], key=method_sort_key) == [
        "lori-s",
        "lora",
        "mtl",
        "aaa",
        "zzz",
    ]
    assert is_reference_method("mtl") and not is_reference_method("lora") and not is_reference_method("nope")


def test_seven_methods_reference_row_never_ranked(seven):
    import csv

    from harness.methods import METHODS

    text, rdir = seven["index"].read_text(encoding="utf-8"), seven["index"].parent
    assert all(f'<td class="l">{c.display}' in text for c in METHODS.values())
    assert (
        "MTL is a reference (upper bound), not ranked" in text
        and "every ACC/BWT/FWT/forgetting in summary.json matches" in text
    )
    row = text[text.index("MTL <em>reference (upper bound)</em></td><td>2</td>") :].split("</tr>")[0]
    assert row.count("<td>n/a</td>") == 4  # BWT, FWT, forgetting, LA do not apply
    assert len(list(rdir.glob("*.png"))) == 6
    comp = json.loads((rdir / "comparison.json").read_text())
    by = {r["method"]: r for r in comp["methods"]}
    assert list(by) == list(METHODS) and [m for m in by if by[m]["reference"]] == ["mtl"]
    assert by["mtl"]["ACC"]["mean"] == pytest.approx(
        statistics.mean(statistics.mean(seven["R"][("mtl", s)][1]) for s in "01")
    )
    assert all(by["mtl"][k]["mean"] is None for k in ("BWT", "FWT", "forgetting"))
    assert not any("MTL" in v or "mtl" in v for v in comp["verdicts"].values())
    best = [c.display for c in METHODS.values() if not c.reference][-1]  # _seven_matrix: later methods score higher
    assert comp["verdicts"]["ACC"].startswith(f"ACC (higher is better): {best} ")  # MTL's higher ACC is not ranked
    assert [r["method"] for r in comp["rows"] if r["reference"]] == ["mtl"]
    rows = {r["method"]: r for r in csv.DictReader((rdir / "comparison.csv").open())}
    assert (rows["mtl"]["reference"], rows["lora"]["reference"], rows["mtl"]["BWT_mean"]) == ("True", "False", "")
    mm = json.loads((rdir / "mean_matrices.json").read_text())["methods"]
    assert mm["mtl"]["reference"] and len(mm["mtl"]["mean"]) == 2 and len(mm["lora"]["mean"]) == 4


def test_interrupted_and_running_runs_are_listed_not_aggregated(seven, tmp_path):
    text, comp = (
        seven["index"].read_text(encoding="utf-8"),
        json.loads((seven["index"].parent / "comparison.json").read_text()),
    )
    assert {seven["killed"], seven["running"]}.isdisjoint(r["run_id"] for r in comp["runs"]) and len(
        comp["runs"]
    ) == 2 * len(METHODS)
    assert all(r["seeds"] == ["0", "1"] for r in comp["methods"])
    [killed], [running] = comp["interrupted_runs"], comp["running_runs"]
    assert (killed["run_id"], killed["status"], killed["last_stage"]) == (seven["killed"], "KILLED", 1)
    assert killed["resume_command"] == f"harness resume {seven['killed_dir']}"
    assert (running["run_id"], running["last_stage"], running["resume_command"]) == (seven["running"], 2, None)
    section = text[text.index("<h2>Interrupted sequences</h2>") : text.index("<h2>Running sequences</h2>")]
    assert "lora-s7-o0" in section and "1 of 3" in section and f"harness resume {seven['killed_dir']}" in section
    assert "replay-s8-o0" in text[text.index("<h2>Running sequences</h2>") : text.index("<h2>Which method")]
    assert (
        "lora-s7-o0" not in text[text.index("<h2>Runs</h2>") :] and "replay-s8-o0" not in text[text.index("<h2>Runs") :]
    )
    # Nothing finished yet: the error says what to resume.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp_id = client.create_experiment("cut", artifact_location=f"file://{tmp_path / 'mlartifacts'}")
    cut_dir = tmp_path / "cut" / "lora" / "seed-0"
    _log_unfinished(
        client,
        exp_id,
        cut_dir,
        "lora",
        0,
        [],
        {"harness.run_dir": str(cut_dir), "harness.interrupted": "true"},
        "KILLED",
    )
    with pytest.raises(HarnessError, match=rf"no FINISHED sequence runs .*1 interrupted.*`harness resume {cut_dir}`"):
        write_report("cut", tmp_path, log_to_mlflow=False)


def test_reference_matrix_comes_from_its_folder_without_any_mlflow_store(seven, tmp_path):
    """The whole MLflow store gone: the folders alone give the same matrices (mtl: 2 rows, still consistent); the page
    says MLflow was not read, and the interrupted sequence is still listed with its command."""
    copy = _copy_store(seven, tmp_path / "results")
    shutil.rmtree(copy / "mlartifacts")
    (copy / "mlflow.db").unlink()
    index = write_report(SEVEN, copy, tracking_uri=f"sqlite:///{copy / 'mlflow.db'}", log_to_mlflow=False)
    got, want = (json.loads((i.parent / "mean_matrices.json").read_text())["methods"] for i in (index, seven["index"]))
    text = index.read_text(encoding="utf-8")
    assert got == want and "summary.json has ACC" not in text
    assert f"MLflow, for the run dates: not read: no MLflow store at {copy / 'mlflow.db'}" in text
    assert not (copy / "mlflow.db").exists()  # nothing created by looking
    assert f"harness resume {copy / SEVEN / 'lora' / 'seed-7'}" in text


CHROMIUM = os.environ.get("CHROMIUM_BIN", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextlib.contextmanager
def chromium_page(path: Path):
    """A page of Debian's headless Chromium (driven by playwright) that has loaded `path`, and the URLs it requested.

    Skips, saying how to get one, where Chromium or playwright is missing."""
    if not Path(CHROMIUM).exists():
        pytest.skip(
            f"{CHROMIUM} missing: install it with `apt-get install -y chromium chromium-driver` "
            "(or run .ci/install-browser.sh)"
        )
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download needed)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(path.as_uri(), wait_until="load")
            yield page, requests
        finally:
            browser.close()


def test_report_renders_in_headless_chromium(report, tmp_path):
    shot = tmp_path / "report.png"
    with chromium_page(report) as (page, requests):
        imgs = page.evaluate(
            "Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])"
        )
        page.screenshot(path=str(shot), full_page=True)
    assert len(imgs) == len(list(report.parent.glob("*.png"))) == 6
    for src, complete, width in imgs:
        assert complete and width > 0, src
    assert all(u.startswith(("file://", "data:")) for u in requests), [
        u for u in requests if not u.startswith("file://")
    ]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    keep = os.environ.get("HARNESS_REPORT_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)


def test_verdicts_without_per_document_results_test_over_the_seeds_alone_and_say_so(report):
    comp = json.loads((report.parent / "comparison.json").read_text())
    assert "on 2 seed(s): undecided, a test over seeds needs at least 3 seeds of each" in comp["verdicts"]["ACC"]
    assert comp["verdicts_std_rule"]["ACC"].startswith("ACC (higher is better): LoRI-S ")  # the old rule, kept
    acc = next(c for c in comp["paired_comparisons"] if c["metric"] == "ACC")
    assert acc["test"] == "paired t over seeds" and acc["document_se"] is None and acc["n_pairs"] == 2
    assert acc["p"] is None and acc["low"] is None and acc["sd"] > 0 and not acc["decided"]  # a spread, no verdict
    assert acc["resampled"] == "nothing" and acc["measurement_low"] is None  # no documents: nothing to measure
    assert acc["std_rule"] in ("within", "beyond") and len(acc["per_seed"]) == 2


DOC_P = {
    "lori-s": [[0.3, 0.3, 0.5], [0.9, 0.35, 0.5], [0.85, 0.9, 0.5], [0.8, 0.85, 0.9]],
    # LoRA forgets more, and never learns the last task: its own-stage score stays at the base model's.
    "lora": [[0.3, 0.3, 0.5], [0.9, 0.35, 0.5], [0.5, 0.9, 0.5], [0.3, 0.5, 0.5]],
}


@pytest.fixture(scope="module")
def doc_report(tmp_path_factory):
    """2 methods x 3 seeds whose matrices are the means of per-document scores logged as documents.json."""
    import numpy as np
    from mlflow.tracking import MlflowClient

    results_dir = tmp_path_factory.mktemp("doc-results").resolve()
    client = MlflowClient(tracking_uri=f"sqlite:///{results_dir / 'mlflow.db'}")
    exp_id = client.create_experiment("docs", artifact_location=f"file://{results_dir / 'mlartifacts'}")
    rng = np.random.default_rng(0)
    difficulty = {t: rng.random(40) for t in TASKS}  # the same 40 test documents for every method and seed
    for method, P in DOC_P.items():
        for seed in ("0", "1", "2"):
            u = {t: np.where(rng.random(40) < 0.8, difficulty[t], rng.random(40)) for t in TASKS}
            rows = {t: [[int(u[t][d] < P[i][j]) for d in range(40)] for i in range(4)] for j, t in enumerate(TASKS)}
            R = [[sum(rows[t][i]) / 40 for t in TASKS] for i in range(4)]
            _log_sequence(
                client,
                exp_id,
                method,
                seed,
                R,
                *PARAMS[method],
                experiment="docs",
                results_dir=results_dir,
                documents={
                    "tasks": TASKS,
                    "stages": [0, 1, 2, 3],
                    "documents": {t: {"doc_ids": list(range(40)), "scores": rows[t]} for t in TASKS},
                },
            )
    return write_report("docs", results_dir, log_to_mlflow=False)


def test_verdicts_come_from_the_test_over_seeds_with_the_documents_noise_added(doc_report):
    comp = json.loads((doc_report.parent / "comparison.json").read_text())
    acc = next(c for c in comp["paired_comparisons"] if c["metric"] == "ACC")
    assert (acc["a"], acc["b"], acc["n_pairs"]) == ("lori-s", "lora", 3)
    assert acc["test"] == "paired t over seeds, documents' sampling variance added" and acc["document_se"] > 0
    assert acc["resampled"] == "documents" and acc["measurement_low"] <= acc["difference"] <= acc["measurement_high"]
    assert acc["significant"] == acc["decided"] and acc["low"] <= acc["difference"] <= acc["high"]
    assert acc["detectable_difference"] > 0 and acc["p_holm"] is not None and acc["family_size"] >= 1
    verdict = comp["verdicts"]["ACC"]
    assert "paired t over 3 seeds: LoRI-S − LoRA" in verdict and "95% CI [" in verdict and "at 80% power" in verdict
    assert ("LoRI-S is better by" in verdict) == acc["decided"] and ("undecided: 3 seeds" in verdict) != acc["decided"]
    by = {r["method"]: r for r in comp["methods"]}
    for m in ("ACC", "BWT", "forgetting", "LA"):
        e = by["lori-s"][m]
        assert e["ci_low"] <= e["mean"] <= e["ci_high"] and e["ci_kind"] == "t over seeds, documents added"
        assert e["measurement_low"] <= e["mean"] <= e["measurement_high"] and e["ci_resampled"] == "documents"
    cells = json.loads((doc_report.parent / "mean_matrices.json").read_text())["methods"]["lora"]
    for lo, mean, hi in zip(sum(cells["ci_low"], []), sum(cells["mean"], []), sum(cells["ci_high"], [])):
        assert lo <= mean <= hi
    html = doc_report.read_text(encoding="utf-8")
    assert "std rule (old verdict)" in html and html_escape(comp["verdicts"]["ACC"]) in html


def test_a_baseline_is_compared_with_every_method_not_only_with_the_best(doc_report, tmp_path):
    """--baseline lora (not the best): lora against lori-s, with the sign kept and the better method named."""
    results_dir = doc_report.parent.parent.parent
    copy = _copy_store({"results_dir": results_dir}, tmp_path / "results")
    with pytest.raises(
        HarnessError, match="--baseline olora: experiment 'docs' has no finished sequence run.*lori-s, lora"
    ):
        write_report(
            "docs", copy, tracking_uri=f"sqlite:///{copy / 'mlflow.db'}", log_to_mlflow=False, baseline="olora"
        )
    assert not (copy / "docs" / "report").exists()  # refused before anything is written
    index = write_report(
        "docs", copy, tracking_uri=f"sqlite:///{copy / 'mlflow.db'}", log_to_mlflow=False, baseline="lora"
    )
    comp = json.loads((index.parent / "comparison.json").read_text())
    best = next(c for c in comp["paired_comparisons"] if c["metric"] == "ACC" and c["role"] == "best")
    base = next(c for c in comp["paired_comparisons"] if c["metric"] == "ACC" and c["role"] == "baseline")
    assert (best["a"], best["b"], base["a"], base["b"]) == ("lori-s", "lora", "lora", "lori-s")
    assert base["difference"] == pytest.approx(-best["difference"]) and base["high"] < 0 and base["significant"]
    assert comp["baseline"] == "lora" and set(comp["verdicts_baseline"]) == {"ACC", "BWT", "FWT", "forgetting", "LA"}
    assert comp["verdicts_baseline"]["ACC"].startswith("ACC (higher is better), LoRA against each method: LoRA ")
    assert "LoRI-S is better by" in comp["verdicts_baseline"]["ACC"]
    html = index.read_text(encoding="utf-8")
    assert "Against LoRA (<code>--baseline</code>)" in html and html_escape(comp["verdicts_baseline"]["ACC"]) in html
    assert "LoRA (baseline)" in html and "LoRI-S (best)" in html


def test_a_task_never_learned_is_flagged_in_the_report(doc_report):
    comp = json.loads((doc_report.parent / "comparison.json").read_text())
    flagged = {(f["method"], f["seed"]): f["tasks"] for f in comp["not_learned"]}
    assert flagged == {("lora", s): ["sentiment"] for s in ("0", "1", "2")}
    html = doc_report.read_text(encoding="utf-8")
    assert "LoRA seed 0 order 0: sentiment did not beat the base model by 0.05" in html
    by = {r["method"]: r for r in comp["methods"]}
    assert by["lora"]["LA"]["mean"] < by["lori-s"]["LA"]["mean"]


def test_a_metric_no_run_defines_is_explained_by_its_cause_not_by_t_equals_1():
    """Under eval_schedule diagonal_final FWT and forgetting are n/a for every method: the page says why."""
    from harness.analysis.aggregate import verdicts

    nan = float("nan")
    rows = [
        {
            "method": m,
            "reference": False,
            "ACC": {"mean": a, "std": 0.0},
            "BWT": {"mean": -0.2, "std": 0.0},
            "FWT": {"mean": nan, "std": nan},
            "forgetting": {"mean": nan, "std": nan},
            "LA": {"mean": 0.9, "std": 0.0},
        }
        for m, a in (("lora", 0.4), ("lori-s", 0.8))
    ]
    v = verdicts(rows)
    assert "diagonal_final" in v["FWT"] and "diagonal_final" in v["forgetting"]
    assert "T = 1" not in v["FWT"] + v["forgetting"]


def test_a_long_figure_title_is_wrapped_to_the_figure_width_not_cut():
    from harness.heatmap import fit_title

    title = "Accuracy matrix R[i, j] after each stage, mean over seeds and orders (one panel per method)"
    lines = fit_title(title, 4.0, 11).splitlines()
    assert len(lines) > 1 and " ".join(lines) == title
    assert all(len(line) * 0.6 * 11 <= 4.0 * 72 for line in lines)  # each line fits 4 inches at 11 pt


def test_every_method_of_a_report_gets_its_own_colour_beyond_ten_methods():
    """All 11 harness methods in one report: the 11th must not reuse the 1st's colour (it did modulo tab10)."""
    import matplotlib

    from harness.methods import METHODS
    from harness.report.figures import method_colors

    for n in (3, len(METHODS), 20, 25):
        colors = method_colors([f"m{i}" for i in range(n)])
        assert len(set(colors.values())) == n, n
    first_ten = method_colors(list(METHODS))
    assert [first_ten[m] for m in list(METHODS)[:10]] == [matplotlib.colormaps["tab10"](i) for i in range(10)]


def test_the_cost_table_is_the_mean_over_stages_of_each_stage_json(report):
    """Per method: training, the method's own stage hooks, calibration and evaluation seconds, mean over every trained
    stage of every run (the fixture: 2 seeds x stages 1-3 training 10, 20 and 30 s, hooks 1 + 0.5 s, evaluation 3 s)."""
    import re

    html = Path(report).read_text()
    assert "Cost per stage" in html
    section = html[html.index("Cost per stage") : html.index("Trainable parameters")]
    cells = [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", section, flags=re.S)]
    rows = [cells[i : i + 7] for i in range(0, len(cells), 7)]
    assert {r[0] for r in rows} == {"LoRA", "LoRI-S"}
    for r in rows:
        assert r[1:] == ["6", "20.0", "1.5", "0.0", "3.0", "7.5%"], r
