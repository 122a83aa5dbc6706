"""The forgetting report against a real sqlite MLflow store written the way the scheduler writes it.

The fixture store follows the MLflow contract (parent run per sequence with acc/<task> per stage,
final ACC/BWT/FWT/forgetting, matrix.json/csv, summary.json, diagnostics.json, config.yaml; child
runs per stage). Its matrices are made-up test input; the metrics logged for them are computed
here by hand from the formulas in lori-reference.md. Rendering is checked in a real headless
Chromium (Debian's /usr/bin/chromium, driven by the python playwright package).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

from harness.errors import HarnessError  # noqa: E402
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
    if method == "lora":
        return {"mask_overlap": None, "subspace_overlap": None}
    eps = 0.01 * int(seed)
    return {
        "mask_overlap": {"tasks": TASKS, "matrix": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]},
        "subspace_overlap": {
            "tasks": TASKS,
            "matrix": [[1.0, 0.05 + eps, 0.04], [0.05 + eps, 1.0, 0.06], [0.04, 0.06, 1.0]],
        },
    }


def build_fixture_store(results_dir: Path) -> dict:
    """A sqlite MLflow store under results_dir as the scheduler writes it: 2 methods x 2 seeds
    (FINISHED), plus one RUNNING and one FAILED parent run that the report must skip."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    results_dir = Path(results_dir).resolve()
    results_dir.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{results_dir / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=f"file://{results_dir / 'mlartifacts'}")
    ts = 1_760_000_000_000
    parents = {}
    for (method, seed), R in MATRICES.items():
        tags = {
            "harness.kind": "sequence", "harness.method": method, "harness.seed": seed, "harness.order": "0",
            "harness.suite": "default", "harness.model": "smollm2-135m", "harness.experiment": EXPERIMENT,
            "harness.git_commit": "0123abcd",
        }
        run = client.create_run(exp_id, start_time=ts, tags=tags, run_name=f"{method}-s{seed}-o0")
        rid = run.info.run_id
        parents[(method, seed)] = rid
        m = hand_metrics(R)
        eff, lora_eq = PARAMS[method]
        params = {
            "method": method, "seed": seed, "order_index": "0", "task_order": ",".join(TASKS), "suite": "default",
            "model": "smollm2-135m", "rank": "8", "alpha": "16", "targets": "q_proj,v_proj",
            "mask_strategy": "random" if method == "lori-s" else "none", "mask_density": "0.1" if method == "lori-s" else "1.0",
            "overlap_policy": "disjoint", "a_mode": "shared",
        }
        metrics = [Metric(f"acc/{t}", R[s][j], ts + s, s) for s in range(4) for j, t in enumerate(TASKS) if R[s][j] is not None]
        metrics += [Metric(k, v, ts + 9, 0) for k, v in m.items()]
        metrics += [Metric("trainable_params_effective", eff, ts, 0), Metric("trainable_params_lora_equivalent", lora_eq, ts, 0)]
        client.log_batch(rid, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
        client.log_dict(rid, {"tasks": TASKS, "stages": [0, 1, 2, 3], "R": R}, "matrix.json")
        csv = "stage," + ",".join(TASKS) + "\n" + "".join(
            f"{s}," + ",".join("" if v is None else str(v) for v in row) + "\n" for s, row in enumerate(R))
        client.log_text(rid, csv, "matrix.csv")
        client.log_dict(rid, {
            "method": method, "seed": int(seed), "order_index": 0, "tasks": TASKS, "acc": m["ACC"], "bwt": m["BWT"],
            "fwt": m["FWT"], "forgetting": m["forgetting"], "trainable_params_effective": eff,
            "trainable_params_lora_equivalent": lora_eq, "stage_wall_s": [60.0, 61.0, 59.5], "mlflow_parent_run_id": rid,
        }, "summary.json")
        client.log_text(rid, f"experiment: {EXPERIMENT}\nmethods: [{method}]\n", "config.yaml")
        client.log_dict(rid, _diagnostics(method, seed), "diagnostics.json")
        for stage, task in enumerate(TASKS, start=1):
            child = client.create_run(exp_id, start_time=ts + stage, run_name=f"stage-{stage}-{task}", tags={
                "mlflow.parentRunId": rid, "harness.kind": "stage", "harness.stage": str(stage), "harness.task": task})
            cm = [Metric("train/loss", 2.0 / (k + 1), ts + k, k) for k in range(5)]
            cm += [Metric("stage_wall_s", 60.0, ts, 0), Metric("train_tok_s", 150.0, ts, 0)]
            cm += [Metric(f"eval/{t}", R[stage][j], ts, 0) for j, t in enumerate(TASKS) if R[stage][j] is not None]
            client.log_batch(child.info.run_id, metrics=cm)
            client.set_terminated(child.info.run_id, "FINISHED")
        client.set_terminated(rid, "FINISHED")
    # Incomplete sequences: skipped by the report.
    for status, seed in (("RUNNING", "2"), ("FAILED", "3")):
        run = client.create_run(exp_id, start_time=ts, run_name=f"lora-s{seed}-o0", tags={
            "harness.kind": "sequence", "harness.method": "lora", "harness.seed": seed, "harness.order": "0"})
        client.log_metric(run.info.run_id, "acc/arith", 0.1, step=0)
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
    assert cl_metrics(np.array([[0.2], [0.9]])) == {"ACC": pytest.approx(0.9), "BWT": None, "FWT": None, "forgetting": None}


def test_report_files(report, store):
    rdir = store["results_dir"] / EXPERIMENT / "report"
    assert report == rdir / "index.html"
    for name in ("index.html", "comparison.csv", "comparison.json", "mean_matrices.json", "accuracy_matrices.png",
                 "forgetting_curves.png", "cl_metrics.png", "trainable_params.png", "mask_overlap.png",
                 "subspace_overlap.png"):
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
    assert "2 skipped" in text or "skipped (not FINISHED)</td><td class=\"l\">2:" in text
    assert "Avalanche" in text and "Mammoth" in text and "Lopez-Paz" in text and "Chaudhry" in text
    assert "max_{l in 1..T-1} (R[l, j] - R[T, j])" in text
    assert "0123abcd" in text and "smollm2-135m" in text
    assert "every logged ACC/BWT/FWT/forgetting matches" in text


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
    assert "LoRI-S is better" in comp["verdicts"]["forgetting"] and "LoRI-S is better" in comp["verdicts"]["ACC"]

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
    index = write_report(EXPERIMENT, copy, tracking_uri=f"sqlite:///{copy / 'mlflow.db'}", log_to_mlflow=False,
                         generated_at=when)
    assert "Generated 2025-01-02 03:04 UTC from " in index.read_text(encoding="utf-8")
    assert json.loads((index.parent / "comparison.json").read_text())["generated_at"] == "2025-01-02T03:04:05+00:00"


def test_matrix_heatmap_writes_one_png(tmp_path):
    """The scheduler's per-run heatmap: a PNG written atomically, a not-evaluated cell allowed."""
    import numpy as np

    from harness.report.figures import matrix_heatmap

    R = np.array([[np.nan if v is None else v for v in row] for row in MATRICES[("lora", "1")]])
    path = tmp_path / "matrix_heatmap.png"
    matrix_heatmap(R, TASKS, "lora seed 1 order 0", path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["matrix_heatmap.png"]


def test_matrix_rebuilt_from_metrics_when_artifact_missing(report, store, tmp_path):
    """A copy of the store whose matrix.json files are gone: the acc/<task> histories give the same matrix."""
    copy = _copy_store(store, tmp_path / "results")
    removed = list((copy / "mlartifacts").rglob("matrix.json"))
    assert len(removed) == 4
    for p in removed:
        p.unlink()
    index = write_report(EXPERIMENT, copy, tracking_uri=f"sqlite:///{copy / 'mlflow.db'}", log_to_mlflow=False)
    got = json.loads((index.parent / "mean_matrices.json").read_text())
    want = json.loads((report.parent / "mean_matrices.json").read_text())
    assert got["methods"] == want["methods"] and got["columns"] == want["columns"]
    assert "no matrix.json artifact; matrix rebuilt from acc/&lt;task&gt; metrics" in index.read_text()


# --- every method, a reference row, unfinished runs ----------------------------------------------

SEVEN = "all-methods"


def _seven_matrix(k: int, seed: int) -> list[list[float]]:
    """A made-up T = 3 sequence matrix, different per method k and seed (test input, not results)."""
    d = 0.01 * k + 0.005 * seed
    return [[0.25, 0.30, 0.50], [0.90 + d, 0.32, 0.50], [0.70 + d, 0.92, 0.52], [0.55 + 2 * d, 0.80 + d, 0.95]]


def _log_parent(client, exp_id, *, method, seed, tags=None, R=None, metrics=None, ts=1_760_000_000_000):
    """One parent sequence run as the scheduler logs it (tags, params, acc/<task> per stage, matrix.json,
    summary.json, metrics); left RUNNING: the caller terminates it."""
    from mlflow.entities import Metric, Param

    run = client.create_run(exp_id, start_time=ts, run_name=f"{method}-s{seed}-o0", tags={
        "harness.kind": "sequence", "harness.method": method, "harness.seed": str(seed), "harness.order": "0",
        "harness.suite": "default", "harness.model": "smollm2-135m", **(tags or {})})
    rid = run.info.run_id
    params = {"method": method, "seed": str(seed), "order_index": "0", "task_order": ",".join(TASKS), "rank": "8"}
    ms = [Metric(f"acc/{t}", R[s][j], ts + s, s) for s in range(len(R or [])) for j, t in enumerate(TASKS)]
    ms += [Metric(k, v, ts + 9, 0) for k, v in (metrics or {}).items() if v is not None]
    client.log_batch(rid, metrics=ms, params=[Param(k, v) for k, v in params.items()])
    return rid


def build_seven_method_store(results_dir: Path) -> dict:
    """Every method of harness.methods (2 seeds each, FINISHED; mtl as its reference row: one stage, ACC
    only), plus an interrupted lora sequence (KILLED + harness.interrupted, stopped after stage 1) and a
    RUNNING replay sequence that must be listed but never aggregated."""
    import numpy as np
    from mlflow.tracking import MlflowClient

    from harness.methods import METHODS
    from harness.metrics import summarize, summarize_reference

    results_dir = Path(results_dir).resolve()
    results_dir.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{results_dir / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment(SEVEN, artifact_location=f"file://{results_dir / 'mlartifacts'}")
    logged = {}
    for k, (method, cls) in enumerate(METHODS.items()):
        for seed in (0, 1):
            R = [[0.25, 0.30, 0.50], [0.97 - 0.01 * seed, 0.96, 0.98]] if cls.reference else _seven_matrix(k, seed)
            m = (summarize_reference if cls.reference else summarize)(np.array(R))
            rid = _log_parent(client, exp_id, method=method, seed=seed, R=R, metrics={
                **m, "trainable_params_effective": 460_800 * (1 + (method in ("inclora", "olora"))),
                "trainable_params_lora_equivalent": 460_800}, tags={"harness.reference": str(cls.reference).lower()})
            client.log_dict(rid, {"tasks": TASKS, "stages": list(range(len(R))), "R": R}, "matrix.json")
            client.log_dict(rid, {"method": method, "seed": seed, "tasks": TASKS, "reference": cls.reference,
                                  "acc": m["ACC"], "bwt": m["BWT"], "fwt": m["FWT"], "forgetting": m["forgetting"]},
                            "summary.json")
            client.log_dict(rid, _diagnostics("lori-s" if method.startswith("lori") else "lora", str(seed)),
                            "diagnostics.json")
            client.set_terminated(rid, "FINISHED")
            logged[(method, seed)] = m
    run_dir = str(results_dir / SEVEN / "lora" / "seed-7")
    killed = _log_parent(client, exp_id, method="lora", seed=7, R=_seven_matrix(0, 7)[:2],
                         tags={"harness.run_dir": run_dir, "harness.reference": "false"})
    client.set_tag(killed, "harness.interrupted", "true")
    client.set_terminated(killed, "KILLED")
    running = _log_parent(client, exp_id, method="replay", seed=8, R=_seven_matrix(0, 8)[:3])
    return {"uri": uri, "results_dir": results_dir, "logged": logged, "killed": killed, "killed_dir": run_dir,
            "running": running}


@pytest.fixture(scope="module")
def seven(tmp_path_factory):
    store = build_seven_method_store(tmp_path_factory.mktemp("seven"))
    store["index"] = write_report(SEVEN, store["results_dir"], log_to_mlflow=False)
    return store


CHROMIUM = os.environ.get("CHROMIUM_BIN", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_report_renders_in_headless_chromium(report, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} missing: install it with `apt-get install -y chromium chromium-driver` "
                    "(or run .ci/install-browser.sh)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download needed)")
    shot = tmp_path / "report.png"
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(report.as_uri(), wait_until="load")
            imgs = page.evaluate(
                "Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert len(imgs) == len(list(report.parent.glob("*.png"))) == 6
    for src, complete, width in imgs:
        assert complete and width > 0, src
    assert all(u.startswith(("file://", "data:")) for u in requests), [u for u in requests if not u.startswith("file://")]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    keep = os.environ.get("HARNESS_REPORT_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)
