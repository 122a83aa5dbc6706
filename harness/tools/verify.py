"""`harness verify RUN_DIR`: everything a careful reader of a run folder would check, as a short report (exit 0 or 1).

    hashes   every committed file against the SHA-256 its commit marker recorded (stage.json, summary.json)
    (method) the method's own invariants (Method.checks), e.g. LoRI-S's masks (harness/methods/lori/verify.py)
    metrics  the matrix equals every stage's eval.json, each score equals lm-eval's own metric in eval.json's raw
             results, and ACC/BWT/FWT/forgetting recomputed from the matrix equal summary.json
    mlflow   where the store answers: one FINISHED stage run per committed stage, and its metrics, the parent's
             acc/<task> points and final metrics equal the folder

Reads only. RUN_DIR is a sequence folder, a merge folder or any folder above them (an experiment); merge folders get
the checks of harness/tools/verify_merge.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import yaml

from harness import metrics as MX
from harness.analysis import documents as DOCS
from harness.checks import FAIL, OK, SKIP, Check
from harness.errors import HarnessError
from harness.integrity import HASHES, mismatches
from harness.io import read_json
from harness.legacy_keys import upgrade_flat_keys
from harness.methods import METHODS
from harness.run.export import method_of
from harness.run.folder import STAGE_MARKER, committed_stages, merge_folders, sequence_folders
from harness.suites import load_suite
from harness.tools.verify_merge import verify_merge
from harness.tracking.client import check_reachable, redact_uri

_TOL = 1e-9


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(float(a), float(b), rel_tol=_TOL, abs_tol=_TOL)


# --- hashes ----------------------------------------------------------------------------------------
def check_hashes(run_dir: Path, done: dict[int, Path]) -> Check:
    bad, files, unhashed = [], 0, []
    for t, d in sorted(done.items()):
        recorded = read_json(d / STAGE_MARKER).get(HASHES)
        if recorded is None:
            unhashed.append(t)
            continue
        files += len(recorded)
        bad += [f"{p} {what}" for p, what in mismatches(d, recorded)]
    summary = run_dir / "summary.json"
    if summary.is_file() and (recorded := read_json(summary).get(HASHES)) is not None:
        files += len(recorded)
        bad += [f"{p} {what}" for p, what in mismatches(run_dir, recorded)]
    if bad:
        return Check("hashes", FAIL, "; ".join(bad))
    if unhashed and len(unhashed) == len(done):
        return Check("hashes", SKIP, "no hashes recorded (folder written before the harness recorded them)")
    note = f"; stages {unhashed}: no hashes recorded" if unhashed else ""
    return Check("hashes", OK, f"{len(done)} stage(s), {files} file(s) match the SHA-256 recorded at commit{note}")


# --- metrics --------------------------------------------------------------------------------------
def _metric_keys(cfg: dict) -> dict[str, str]:
    """task -> the lm-eval metric its score is (from the suite); {} when the suite cannot be read here."""

    try:
        suite = load_suite(cfg["suite"])
        return {t: suite.task(t).metric_key for t in (cfg.get("sequence") or {}).get("tasks", [])}
    except Exception:  # noqa: BLE001 - a suite that moved only skips this part of the check
        return {}


def check_metrics(run_dir: Path, done: dict[int, Path], cfg: dict) -> Check:
    problems, keys = [], _metric_keys(cfg)
    for t, d in sorted(done.items()):
        ev = read_json(d / "eval.json")
        for task, v in ev["scores"].items():
            raw = (ev.get("raw") or {}).get(task, {})
            if task in keys and keys[task] in raw and not _same(raw[keys[task]], v):
                problems.append(f"{d / 'eval.json'}: {task} score {v} is not lm-eval's {keys[task]} {raw[keys[task]]}")
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        return Check(
            "metrics",
            FAIL if problems else OK,
            "; ".join(problems)
            or f"{len(done)} stage score(s) = lm-eval's metrics; sequence not finished: no matrix or summary yet",
        )
    summary, m = read_json(summary_path), read_json(run_dir / "matrix.json")
    R, tasks = MX.as_matrix(m["R"]), m["tasks"]
    for t, d in sorted(done.items()):
        for task, v in read_json(d / "eval.json")["scores"].items():
            if not _same(R[t, tasks.index(task)], v):
                problems.append(f"matrix.json R[{t}, {task}] = {R[t, tasks.index(task)]}, {d / 'eval.json'} says {v}")
    evaluated = {(t, task) for t, d in done.items() for task in read_json(d / "eval.json")["scores"]}
    extra = [(i, tasks[j]) for i, j in zip(*np.where(~np.isnan(R))) if (int(i), tasks[j]) not in evaluated]
    if extra:
        problems.append(f"matrix.json has cells no stage evaluated: {extra[:3]}")
    docs_path = run_dir / DOCS.DOCUMENTS_FILE
    if docs_path.is_file():  # every cell again, from each document's score
        problems += [f"{docs_path}: {p}" for p in DOCS.check_documents(read_json(docs_path), R)]
    # Every metric of harness.metrics.TABLE that summary.json records (a folder keeps the ones of its day), recomputed
    # from the matrix, or from the stages' general-text CE.
    ce = [read_json(done[t] / "eval.json").get("general_ce") if t in done else None for t in range(len(R))]
    inputs, checked = {"matrix": R, "general_ce": ce}, []
    for m in (m for m in MX.TABLE if m.key in summary):
        v = m.of(inputs[m.over], bool(summary.get("reference")) and m.over == "matrix")
        checked.append(m.name)
        if not _same(v, summary.get(m.key)):
            problems.append(f"summary.json {m.key} = {summary.get(m.key)}, recomputed from the matrix {v}")
    if problems:
        return Check("metrics", FAIL, "; ".join(problems))
    docs = (
        "every cell recomputed from documents.json; "
        if docs_path.is_file()
        else "(no per-document scores: an older folder) "
    )
    return Check(
        "metrics",
        OK,
        f"matrix = eval.json of {len(done)} stage(s) = lm-eval's metrics; {docs}{', '.join(checked)} recomputed "
        "from the matrix equal summary.json",
    )


# --- MLflow ---------------------------------------------------------------------------------------
def check_mlflow(run_dir: Path, done: dict[int, Path], uri: str | None) -> Check:
    state = run_dir / "state.json"
    parent_id = read_json(state).get("mlflow_parent_run_id") if state.is_file() else None
    uri = uri or (read_json(state).get("mlflow_tracking_uri") if state.is_file() else None)
    if not parent_id or not uri:
        return Check("mlflow", SKIP, "no MLflow parent run recorded in state.json (`harness sync RUN_DIR` logs it)")
    try:
        if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists():
            raise HarnessError(f"no store at {uri}")
        check_reachable(uri, timeout_s=5)
        from mlflow.tracking import (
            MlflowClient,  # lazy: MLflow loads in ~1 s; commands that only read folders need none of it
        )

        client = MlflowClient(tracking_uri=uri)
        parent = client.get_run(parent_id)
    except Exception as exc:  # noqa: BLE001 - an unreachable store only skips this part
        return Check("mlflow", SKIP, f"store {redact_uri(uri)} not reachable here ({str(exc).splitlines()[0][:160]})")
    problems = _compare_mlflow(client, parent, run_dir, done)
    if problems:
        return Check("mlflow", FAIL, "; ".join(problems) + ". `harness sync RUN_DIR` re-mirrors the folder")
    return Check(
        "mlflow",
        OK,
        f"parent {parent.info.status}, one FINISHED stage run per committed stage "
        f"({len([t for t in done if t > 0])}), metrics equal the folder ({redact_uri(uri)})",
    )


def _compare_mlflow(client, parent, run_dir: Path, done: dict[int, Path]) -> list[str]:
    problems = []
    summary = read_json(run_dir / "summary.json") if (run_dir / "summary.json").is_file() else None
    if summary and summary.get("complete") and parent.info.status != "FINISHED":
        problems.append(f"parent run {parent.info.run_id} is {parent.info.status}, the folder is finished")
    if summary:
        for k, s in (("ACC", "acc"), ("BWT", "bwt"), ("FWT", "fwt"), ("forgetting", "forgetting")):
            if summary.get(s) is not None and not _same(parent.data.metrics.get(k), summary[s]):
                problems.append(f"parent {k} = {parent.data.metrics.get(k)}, summary.json {summary[s]}")
    children: dict[int, list] = {}
    for r in client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=1000
    ):
        children.setdefault(int(r.data.tags.get("harness.stage", -1)), []).append(r)
    for t, d in sorted(done.items()):
        scores = read_json(d / "eval.json")["scores"]
        for task, v in scores.items():
            points = [m.value for m in client.get_metric_history(parent.info.run_id, f"acc/{task}") if m.step == t]
            if len(points) != 1 or not _same(points[0], v):
                problems.append(f"parent acc/{task} at step {t}: {points or 'missing'}, eval.json {v}")
        if t == 0:
            continue
        runs = children.get(t, [])
        if len(runs) != 1 or runs[0].info.status != "FINISHED":
            problems.append(
                f"stage {t}: {len(runs)} stage run(s) ({', '.join(r.info.status for r in runs) or 'none'}), expected one FINISHED"
            )
            continue
        got = runs[0].data.metrics
        bad = [task for task, v in scores.items() if not _same(got.get(f"eval/{task}"), v)]
        if bad:
            problems.append(f"stage {t}: eval/{bad[0]} = {got.get(f'eval/{bad[0]}')}, eval.json {scores[bad[0]]}")
    return problems


# --- the report -----------------------------------------------------------------------------------
def verify_sequence(run_dir: Path, tracking_uri: str | None = None) -> list[Check]:
    run_dir = Path(run_dir)
    cfg = upgrade_flat_keys(
        yaml.safe_load((run_dir / "config.yaml").read_text()) or {}, note=False
    )  # older folders: flat LoRI keys
    done = committed_stages(run_dir)
    if not done:
        return [Check("stages", SKIP, "no committed stage yet")]
    name = method_of(run_dir, cfg)
    own = (
        METHODS[name].checks(run_dir, done, cfg)
        if name in METHODS
        else [
            Check(
                "method",
                SKIP,
                f"method {name!r} is not registered here (a method from outside the package: name its "
                f"module in $HARNESS_METHODS)",
            )
        ]
    )
    return [
        check_hashes(run_dir, done),
        *own,
        check_metrics(run_dir, done, cfg),
        check_mlflow(run_dir, done, tracking_uri),
    ]


def verify_path(path: Path, tracking_uri: str | None = None) -> tuple[str, bool]:
    """(the report's text, whether nothing failed) for a sequence or merge folder, or every one under path."""
    folders = [(f, verify_sequence) for f in sequence_folders(path)] + [(f, None) for f in merge_folders(path)]
    if not folders:
        raise HarnessError(
            f"{path}: no sequence or merge folder here (a folder with config.yaml and stages/ or adapters/). "
            "Pass a run folder: results/<experiment>/<method>/seed-<s>, results/<experiment>/merge/<method>/"
            "seed-<s> or results/<experiment>."
        )
    lines, failed = [], 0
    for folder, verify in folders:
        checks = verify(folder, tracking_uri) if verify else verify_merge(folder)
        failed += sum(c.status == FAIL for c in checks)
        lines.append(f"{folder}")
        lines += [f"  {c.name:<8} {c.status:<8} {c.detail}" for c in checks]
    n_merge = sum(verify is None for _, verify in folders)
    lines.append(
        f"{'FAILED' if failed else 'OK'}: {len(folders) - n_merge} sequence folder(s)"
        + (f" and {n_merge} merge folder(s)" if n_merge else "")
        + " checked"
        + (f", {failed} check(s) failed" if failed else "")
    )
    return "\n".join(lines), not failed
